//! Command-line flags of `lb-daemon` and their validation into `Settings`, the effective
//! configuration. Every error names the flag and the value that is wrong.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::Parser;
use serde::Serialize;

use crate::audit::Proto;

/// Default location of the audit log.
pub const DEFAULT_AUDIT_DIR: &str = "/var/lib/lb-daemon/audit";

#[derive(Parser, Debug)]
#[command(
    name = "lb-daemon",
    version,
    about = "L4 TCP load balancer with an XDP data plane and a tamper-evident audit log"
)]
pub struct Args {
    /// Interface to attach the XDP program to (repeatable): client-facing and backend-facing.
    #[arg(long = "iface", value_name = "IF", required = true)]
    pub ifaces: Vec<String>,

    /// A service: its name, protocol, virtual IP and port (repeatable).
    #[arg(long = "service", value_name = "NAME=tcp:IP:PORT", value_parser = parse_service)]
    pub services: Vec<ServiceFlag>,

    /// A backend of a service, with an optional weight (repeatable).
    #[arg(long = "backend", value_name = "SERVICE=IP:PORT[,weight=N]", value_parser = parse_backend)]
    pub backends: Vec<BackendFlag>,

    /// Source address towards backends (default: the address of the interface leading to each).
    #[arg(long = "snat-ip", value_name = "IP")]
    pub snat_ip: Option<IpAddr>,

    /// SNAT source ports (default: below the host's ephemeral range, from
    /// /proc/sys/net/ipv4/ip_local_port_range).
    #[arg(long = "snat-ports", value_name = "LO-HI", value_parser = parse_port_range)]
    pub snat_ports: Option<(u16, u16)>,

    /// Directory of the audit log.
    #[arg(long = "audit-dir", value_name = "DIR", default_value = DEFAULT_AUDIT_DIR)]
    pub audit_dir: PathBuf,

    /// A TCP flow with no packet for this long is closed (`idle_timeout`).
    #[arg(long = "tcp-idle-timeout", value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,

    /// How long a closed flow's entry lingers so trailing ACKs and retransmitted FINs pass.
    #[arg(long = "closed-linger", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub closed_linger: Duration,
}

/// `--service NAME=PROTO:IP:PORT`
#[derive(Clone, Debug)]
pub struct ServiceFlag {
    pub name: String,
    pub proto: Proto,
    pub vip: SocketAddr,
}

/// `--backend SERVICE=IP:PORT[,weight=N]`
#[derive(Clone, Debug)]
pub struct BackendFlag {
    pub service: String,
    pub addr: SocketAddr,
    pub weight: u32,
}

/// The effective configuration, as recorded in `daemon_start`.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub ifaces: Vec<String>,
    pub services: Vec<ServiceSpec>,
    pub snat_ip: Option<IpAddr>,
    pub snat_ports: (u16, u16),
    pub audit_dir: PathBuf,
    #[serde(serialize_with = "as_secs")]
    pub tcp_idle_timeout: Duration,
    #[serde(serialize_with = "as_secs")]
    pub closed_linger: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub proto: Proto,
    pub vip: SocketAddr,
    pub backends: Vec<BackendSpec>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: u32,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Args {
    /// Cross-checks the flags and builds the effective configuration.
    pub fn into_settings(self) -> anyhow::Result<Settings> {
        let mut services: Vec<ServiceSpec> = Vec::new();
        for s in self.services {
            if services.iter().any(|o| o.name == s.name) {
                bail!("--service {}: service name declared twice", s.name);
            }
            if let Some(o) = services.iter().find(|o| o.vip == s.vip && o.proto == s.proto) {
                bail!("--service {}: {} is already service '{}'", s.name, s.vip, o.name);
            }
            services.push(ServiceSpec { name: s.name, proto: s.proto, vip: s.vip, backends: Vec::new() });
        }
        if services.len() > lb_common::MAX_SERVICES as usize {
            bail!("--service: at most {} services are supported", lb_common::MAX_SERVICES);
        }
        for b in self.backends {
            let Some(svc) = services.iter_mut().find(|s| s.name == b.service) else {
                bail!(
                    "--backend {}={}: unknown service '{}' (declare it with --service)",
                    b.service, b.addr, b.service
                );
            };
            if b.addr.is_ipv4() != svc.vip.is_ipv4() {
                bail!("--backend {}={}: address family differs from the service's VIP {}", b.service, b.addr, svc.vip);
            }
            if svc.backends.iter().any(|o| o.addr == b.addr) {
                bail!("--backend {}={}: backend listed twice", b.service, b.addr);
            }
            svc.backends.push(BackendSpec { addr: b.addr, weight: b.weight });
        }
        let total: usize = services.iter().map(|s| s.backends.len()).sum();
        if total > lb_common::MAX_BACKENDS as usize {
            bail!("--backend: at most {} backends are supported", lb_common::MAX_BACKENDS);
        }
        if let Some(ip) = self.snat_ip {
            if ip.is_ipv6() {
                bail!("--snat-ip {ip}: IPv6 SNAT addresses are not supported yet");
            }
        }
        let snat_ports = match self.snat_ports {
            Some(r) => r,
            None => default_snat_ports()?,
        };
        Ok(Settings {
            ifaces: self.ifaces,
            services,
            snat_ip: self.snat_ip,
            snat_ports,
            audit_dir: self.audit_dir,
            tcp_idle_timeout: self.tcp_idle_timeout,
            closed_linger: self.closed_linger,
        })
    }
}

/// The ports below the host's ephemeral range, so SNAT never collides with the host's own
/// outgoing connections.
fn default_snat_ports() -> anyhow::Result<(u16, u16)> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    let lo: u16 = text
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("unexpected content in {PATH}: {text:?}"))?;
    if lo <= 2048 {
        bail!("--snat-ports: the host's ephemeral range starts at {lo}; give a SNAT range explicitly");
    }
    Ok((1024, lo - 1))
}

fn parse_service(s: &str) -> Result<ServiceFlag, String> {
    let (name, rest) = s.split_once('=').ok_or("expected NAME=tcp:IP:PORT")?;
    check_name(name)?;
    let (proto, addr) = rest.split_once(':').ok_or("expected NAME=tcp:IP:PORT")?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => return Err("UDP services are not supported yet".into()),
        other => return Err(format!("unknown protocol '{other}' (expected tcp)")),
    };
    let vip: SocketAddr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not IP:PORT (IPv6 as [IP]:PORT)"))?;
    if vip.is_ipv6() {
        return Err("IPv6 services are not supported yet".into());
    }
    if vip.port() == 0 {
        return Err("port 0 is not a valid service port".into());
    }
    Ok(ServiceFlag { name: name.to_string(), proto, vip })
}

fn parse_backend(s: &str) -> Result<BackendFlag, String> {
    let (service, rest) = s.split_once('=').ok_or("expected SERVICE=IP:PORT[,weight=N]")?;
    check_name(service)?;
    let mut parts = rest.split(',');
    let addr_text = parts.next().unwrap_or_default();
    let addr: SocketAddr = addr_text
        .parse()
        .map_err(|_| format!("'{addr_text}' is not IP:PORT (IPv6 as [IP]:PORT)"))?;
    if addr.port() == 0 {
        return Err("port 0 is not a valid backend port".into());
    }
    let mut weight = 1;
    for opt in parts {
        match opt.split_once('=') {
            Some(("weight", w)) => {
                weight = w
                    .parse()
                    .ok()
                    .filter(|w| (1..=1000).contains(w))
                    .ok_or_else(|| format!("weight '{w}' is not an integer from 1 to 1000"))?;
            }
            _ => return Err(format!("unknown backend option '{opt}' (expected weight=N)")),
        }
    }
    Ok(BackendFlag { service: service.to_string(), addr, weight })
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!("'{name}' is not a valid name (1-64 of A-Z a-z 0-9 . _ -)"))
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s.split_once('-').ok_or("expected LO-HI, e.g. 10000-29999")?;
    let lo: u16 = lo.parse().map_err(|_| format!("'{lo}' is not a port"))?;
    let hi: u16 = hi.parse().map_err(|_| format!("'{hi}' is not a port"))?;
    if lo == 0 || hi < lo {
        return Err(format!("{lo}-{hi} is not a non-empty range of non-zero ports"));
    }
    Ok((lo, hi))
}

/// Parses `300s`, `5m`, `250ms`, `2h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration (e.g. 300s, 5m, 250ms)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("'{s}': unknown unit '{unit}' (ms, s, m, h)")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> anyhow::Result<Settings> {
        let mut v = vec!["lb-daemon", "--iface", "eth0", "--snat-ports", "10000-20000"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)?.into_settings()
    }

    #[test]
    fn services_and_weighted_backends() {
        let s = settings(&[
            "--service", "web=tcp:10.0.0.100:80",
            "--backend", "web=10.0.2.2:8080",
            "--backend", "web=10.0.3.2:8080,weight=2",
        ])
        .unwrap();
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.services[0].backends[1].weight, 2);
        assert_eq!(s.snat_ports, (10000, 20000));
    }

    #[test]
    fn errors_name_the_flag() {
        let e = settings(&["--service", "web=tcp:10.0.0.100:80", "--backend", "db=10.0.2.2:5432"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--backend") && e.contains("unknown service 'db'"), "{e}");
        let e = settings(&["--service", "web=tcp:10.0.0.300:80"]).unwrap_err().to_string();
        assert!(e.contains("--service") && e.contains("10.0.0.300:80"), "{e}");
        let e = settings(&["--service", "web=tcp:10.0.0.1:80", "--backend", "web=10.0.2.2:80,weight=0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--backend") && e.contains("weight"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }
}
