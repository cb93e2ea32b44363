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
/// Default location of the pinned kernel state.
pub const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/lb-daemon";

#[derive(Parser, Debug)]
#[command(
    name = "lb-daemon",
    version,
    about = "L4 TCP/UDP load balancer with an XDP data plane and a tamper-evident audit log"
)]
pub struct Args {
    /// Interface to attach the XDP program to (repeatable): client-facing and backend-facing.
    #[arg(long = "iface", value_name = "IF", required = true, value_parser = parse_iface)]
    pub ifaces: Vec<String>,

    /// A service: its name, protocol, virtual IP and port, IPv6 as [IP]:PORT (repeatable).
    #[arg(long = "service", value_name = "NAME=tcp|udp:IP:PORT", value_parser = parse_service)]
    pub services: Vec<ServiceFlag>,

    /// A backend of a service, with an optional weight (repeatable).
    #[arg(long = "backend", value_name = "SERVICE=IP:PORT[,weight=N]", value_parser = parse_backend)]
    pub backends: Vec<BackendFlag>,

    /// Allow clients in CIDR to reach SERVICE (repeatable). A service with allow rules refuses
    /// everyone else; the longest matching prefix among allow and deny rules decides.
    #[arg(long = "allow", value_name = "SERVICE=CIDR", value_parser = parse_acl)]
    pub allow: Vec<AclFlag>,

    /// Refuse clients in CIDR for SERVICE (repeatable).
    #[arg(long = "deny", value_name = "SERVICE=CIDR", value_parser = parse_acl)]
    pub deny: Vec<AclFlag>,

    /// Health checks of SERVICE's backends: `tcp`, `udp[:PAYLOAD]` or `http[:/PATH]`, then
    /// `,interval=2s,timeout=1s,rise=2,fall=3`.
    #[arg(long = "health", value_name = "SERVICE=CHECK", value_parser = parse_health)]
    pub health: Vec<(String, crate::health::CheckSpec)>,

    /// At most N new flows per second from one client address to SERVICE.
    #[arg(long = "rate-limit", value_name = "SERVICE=N/s", value_parser = parse_rate)]
    pub rate_limits: Vec<RateFlag>,

    /// Source address towards backends, one per address family (default: the address of the
    /// interface leading to each backend).
    #[arg(long = "snat-ip", value_name = "IP")]
    pub snat_ips: Vec<IpAddr>,

    /// SNAT source ports (default: below the host's ephemeral range, from
    /// /proc/sys/net/ipv4/ip_local_port_range).
    #[arg(long = "snat-ports", value_name = "LO-HI", value_parser = parse_port_range)]
    pub snat_ports: Option<(u16, u16)>,

    /// Alert when one source is refused N times within DURATION, e.g. 20/1m.
    #[arg(long = "alert-denied", value_name = "N/DURATION", value_parser = clap::value_parser!(crate::alerts::Threshold))]
    pub alert_denied: Option<crate::alerts::Threshold>,

    /// Alert when one source opens N flows within DURATION, e.g. 500/10s.
    #[arg(long = "alert-burst", value_name = "N/DURATION", value_parser = clap::value_parser!(crate::alerts::Threshold))]
    pub alert_burst: Option<crate::alerts::Threshold>,

    /// Alert on flows opened outside these local hours, e.g. 08:00-19:00 (time zone: TZ).
    #[arg(long = "alert-outside-hours", value_name = "HH:MM-HH:MM", value_parser = clap::value_parser!(crate::alerts::Hours))]
    pub alert_outside_hours: Option<crate::alerts::Hours>,

    /// Run this shell command for each alert, with the alert as JSON on its stdin.
    #[arg(long = "alert-exec", value_name = "CMD")]
    pub alert_exec: Option<String>,

    /// Refuse a client address in the kernel for DURATION when it trips --alert-denied or
    /// --alert-burst (on every service of its address family), e.g. 10m.
    #[arg(long = "alert-block", value_name = "DURATION", value_parser = parse_duration)]
    pub alert_block: Option<Duration>,

    /// Ship every audit record to a collector (repeatable): `tcp://HOST:PORT` (JSON lines) or
    /// `syslog+tcp://HOST:PORT` (RFC 5424), at least once, resuming after outages and restarts.
    #[arg(long = "export", value_name = "TARGET", value_parser = clap::value_parser!(crate::export::Target))]
    pub export: Vec<crate::export::Target>,

    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9650.
    #[arg(long = "metrics-addr", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// The control socket `lbctl` talks to (mode 0660).
    #[arg(long = "control-socket", value_name = "PATH", default_value = crate::control::DEFAULT_SOCKET)]
    pub control_socket: PathBuf,

    /// Who may do what on the control socket (repeatable): `admin`, `operator` or `viewer`
    /// granted to `user:NAME` or `group:NAME`. root is always admin.
    #[arg(long = "role", value_name = "ROLE=user:NAME|group:NAME", value_parser = clap::value_parser!(crate::control::RoleGrant))]
    pub roles: Vec<crate::control::RoleGrant>,

    /// Log lines on stderr: `text` (reads well in journald) or `json` (one object per line).
    #[arg(long = "log-format", value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Directory of the audit log.
    #[arg(long = "audit-dir", value_name = "DIR", default_value = DEFAULT_AUDIT_DIR)]
    pub audit_dir: PathBuf,

    /// When audit records are made durable: `always` (each batch, group commit), `interval=1s`,
    /// or `never` (left to the kernel).
    #[arg(long = "audit-fsync", value_name = "POLICY", default_value = "always", value_parser = clap::value_parser!(crate::audit::FsyncPolicy))]
    pub audit_fsync: crate::audit::FsyncPolicy,

    /// When the audit log cannot be written (disk full, I/O error): `fail-open` keeps
    /// forwarding, `fail-closed` refuses new flows until it can. Either way a `loss` record
    /// states what was not written once writing works again.
    #[arg(long = "audit-on-failure", value_name = "POLICY", default_value = "fail-open", value_parser = clap::value_parser!(crate::journal::FailurePolicy))]
    pub audit_on_failure: crate::journal::FailurePolicy,

    /// Seal checkpoints with a forward-secure key derived from this file (keep a copy offline:
    /// `lb-audit verify --key` needs the original).
    #[arg(long = "audit-seal-key", value_name = "FILE")]
    pub audit_seal_key: Option<PathBuf>,

    /// Start a new audit segment when the current one reaches this many MiB.
    #[arg(long = "audit-segment-mib", value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub audit_segment_mib: u64,

    /// ...or when it is this old.
    #[arg(long = "audit-segment-age", value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub audit_segment_age: Duration,

    /// Delete closed segments whose newest record is older than this (each deletion is
    /// recorded). Default: keep everything.
    #[arg(long = "audit-retain-age", value_name = "DURATION", value_parser = parse_duration)]
    pub audit_retain_age: Option<Duration>,

    /// Delete the oldest closed segments while the log is larger than this many MiB.
    #[arg(long = "audit-retain-mib", value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_retain_mib: Option<u64>,

    /// A checkpoint (chain head, seal) every N records...
    #[arg(long = "audit-checkpoint-records", value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_checkpoint_records: u64,

    /// ...or this long after the previous one.
    #[arg(long = "audit-checkpoint-interval", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub audit_checkpoint_interval: Duration,

    /// With `--audit-fsync always`: connection records are written and made durable together
    /// at most this long after the first of them (group commit; meanwhile they wait in the
    /// kernel's ring buffer); `0s` syncs at every wake-up. Configuration changes and refused
    /// requests are always durable before the reply.
    #[arg(long = "audit-commit-window", value_name = "DURATION", default_value = "10ms", value_parser = parse_commit_window)]
    pub audit_commit_window: Duration,

    /// A TCP flow with no packet for this long is closed (`idle_timeout`).
    #[arg(long = "tcp-idle-timeout", value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,

    /// A UDP flow with no packet for this long is closed (`idle_timeout`).
    #[arg(long = "udp-idle-timeout", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub udp_idle_timeout: Duration,

    /// Maglev lookup table size per service: a prime, much larger than the number of backends.
    #[arg(long = "maglev-table-size", value_name = "PRIME", default_value_t = lb_common::MAGLEV_TABLE_SIZE, value_parser = parse_table_size)]
    pub maglev_table_size: u32,

    /// Connection-tracking capacity (flows). Above 95% the least recently active flows are
    /// evicted, each with a `conn_close` (`evicted`).
    #[arg(long = "conntrack-size", value_name = "FLOWS", default_value_t = lb_common::CONNTRACK_MAX, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub conntrack_size: u32,

    /// How long a closed flow's entry lingers so trailing ACKs and retransmitted FINs pass.
    #[arg(long = "closed-linger", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub closed_linger: Duration,

    /// Where the kernel state (maps, XDP links) is pinned, on a bpf filesystem; a daemon
    /// started on a directory a previous one left adopts its flows.
    #[arg(long = "bpf-dir", value_name = "DIR", default_value = DEFAULT_BPF_DIR)]
    pub bpf_dir: PathBuf,

    /// Start clean: drop the kernel state a previous daemon left (its flows are forgotten).
    #[arg(long = "reset-state")]
    pub reset_state: bool,

    /// On SIGTERM: `keep` the data plane forwarding for the next daemon to adopt, or `detach`
    /// it, closing every open flow (`shutdown`).
    #[arg(
        long = "on-stop",
        value_name = "WHAT",
        value_enum,
        default_value = "keep"
    )]
    pub on_stop: OnStop,
}

/// `--service NAME=PROTO:IP:PORT`
#[derive(Clone, Debug)]
pub struct ServiceFlag {
    pub name: String,
    pub proto: Proto,
    pub vip: SocketAddr,
}

/// `--allow SERVICE=CIDR` / `--deny SERVICE=CIDR`
#[derive(Clone, Debug)]
pub struct AclFlag {
    pub service: String,
    pub net: Cidr,
}

/// `--rate-limit SERVICE=N/s`
#[derive(Clone, Debug)]
pub struct RateFlag {
    pub service: String,
    pub per_sec: u32,
}

/// An address prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("'{s}': prefix length must be 0-{max}"))?,
            None => max,
        };
        let c = Cidr { addr, len };
        // Host bits set (10.1.2.3/16) are almost always a typo for the network: refuse them.
        if !c.contains(addr) || c.network() != addr {
            return Err(format!(
                "'{s}': address has bits set beyond the prefix (did you mean {}/{len}?)",
                c.network()
            ));
        }
        Ok(c)
    }
}

impl Cidr {
    /// The address with the bits beyond the prefix cleared.
    pub fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(
                (u32::from(a) & u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0)).into(),
            ),
            IpAddr::V6(a) => IpAddr::V6(
                (u128::from(a) & u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0)).into(),
            ),
        }
    }
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
    pub snat_ips: Vec<IpAddr>,
    pub snat_ports: (u16, u16),
    pub audit_dir: PathBuf,
    pub audit: AuditSettings,
    pub control_socket: PathBuf,
    pub roles: Vec<crate::control::RoleGrant>,
    pub metrics_addr: Option<SocketAddr>,
    pub export: Vec<crate::export::Target>,
    pub alerts: crate::alerts::Rules,
    #[serde(serialize_with = "as_secs")]
    pub tcp_idle_timeout: Duration,
    #[serde(serialize_with = "as_secs")]
    pub udp_idle_timeout: Duration,
    #[serde(serialize_with = "as_secs")]
    pub closed_linger: Duration,
    pub maglev_table_size: u32,
    pub conntrack_size: u32,
    pub bpf_dir: PathBuf,
    pub reset_state: bool,
    pub on_stop: OnStop,
}

/// What a stopping daemon does with the data plane (`--on-stop`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnStop {
    /// Leave the program attached and the flows in its pinned maps: forwarding goes on and
    /// the next daemon adopts them (restarts and upgrades drop no connection).
    Keep,
    /// Detach the program, close every open flow (`shutdown`) and free the kernel state.
    Detach,
}

/// How the audit log is written.
#[derive(Clone, Debug, Serialize)]
pub struct AuditSettings {
    #[serde(serialize_with = "fsync_name")]
    pub fsync: crate::audit::FsyncPolicy,
    pub on_failure: crate::journal::FailurePolicy,
    /// The key file's path (its content is never recorded).
    pub seal_key: Option<PathBuf>,
    pub segment_mib: u64,
    #[serde(serialize_with = "as_secs")]
    pub segment_age: Duration,
    #[serde(serialize_with = "opt_secs")]
    pub retain_age: Option<Duration>,
    pub retain_mib: Option<u64>,
    pub checkpoint_records: u64,
    #[serde(serialize_with = "as_secs")]
    pub checkpoint_interval: Duration,
    #[serde(serialize_with = "as_secs")]
    pub commit_window: Duration,
}

impl Default for AuditSettings {
    /// The flags' defaults.
    fn default() -> Self {
        AuditSettings {
            fsync: crate::audit::FsyncPolicy::Always,
            on_failure: crate::journal::FailurePolicy::FailOpen,
            seal_key: None,
            segment_mib: 64,
            segment_age: Duration::from_secs(86400),
            retain_age: None,
            retain_mib: None,
            checkpoint_records: 1000,
            checkpoint_interval: Duration::from_secs(10),
            commit_window: crate::journal::DEFAULT_COMMIT_WINDOW,
        }
    }
}

fn fsync_name<S: serde::Serializer>(
    p: &crate::audit::FsyncPolicy,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&match p {
        crate::audit::FsyncPolicy::Always => "always".to_string(),
        crate::audit::FsyncPolicy::Never => "never".to_string(),
        crate::audit::FsyncPolicy::Interval(d) => format!("interval={}ms", d.as_millis()),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub proto: Proto,
    pub vip: SocketAddr,
    pub backends: Vec<BackendSpec>,
    /// Access rules in flag order; the rule number in deny records is the position in the
    /// daemon-wide list (`Settings::acl_rules`).
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    /// New flows per second per client address; `None` is unlimited.
    pub rate_limit: Option<u32>,
    /// Active health checks of the backends; `None`: backends are always considered up.
    pub health: Option<crate::health::CheckSpec>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    pub weight: u32,
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Args {
    /// Cross-checks the flags and builds the effective configuration.
    pub fn into_settings(self) -> anyhow::Result<Settings> {
        let mut services: Vec<ServiceSpec> = Vec::new();
        for s in self.services {
            let name = s.name.clone();
            add_service(&mut services, ServiceSpec::new(s.name, s.proto, s.vip))
                .map_err(|e| anyhow::anyhow!("--service {name}: {e}"))?;
        }
        for b in self.backends {
            add_backend(&mut services, &b.service, b.addr, b.weight)
                .map_err(|e| anyhow::anyhow!("--backend {}={}: {e}", b.service, b.addr))?;
        }
        for (flag, rules, allow) in [
            ("--allow", &self.allow, true),
            ("--deny", &self.deny, false),
        ] {
            for r in rules {
                add_rule(&mut services, &r.service, r.net, allow)
                    .map_err(|e| anyhow::anyhow!("{flag} {}={}: {e}", r.service, r.net))?;
            }
        }
        for r in self.rate_limits {
            let Some(svc) = services.iter_mut().find(|s| s.name == r.service) else {
                bail!(
                    "--rate-limit {}={}/s: unknown service '{}' (declare it with --service)",
                    r.service,
                    r.per_sec,
                    r.service
                );
            };
            if svc.rate_limit.replace(r.per_sec).is_some() {
                bail!("--rate-limit {}: given twice", r.service);
            }
        }
        for (name, spec) in self.health {
            let Some(svc) = services.iter_mut().find(|s| s.name == name) else {
                bail!("--health {name}=...: unknown service '{name}' (declare it with --service)");
            };
            if svc.health.replace(spec).is_some() {
                bail!("--health {name}: given twice");
            }
        }
        if self.snat_ips.iter().filter(|ip| ip.is_ipv4()).count() > 1
            || self.snat_ips.iter().filter(|ip| ip.is_ipv6()).count() > 1
        {
            bail!("--snat-ip: give at most one address per family");
        }
        let snat_ports = match self.snat_ports {
            Some(r) => r,
            None => default_snat_ports()?,
        };
        Ok(Settings {
            ifaces: self.ifaces,
            services,
            snat_ips: self.snat_ips,
            snat_ports,
            audit_dir: self.audit_dir,
            control_socket: self.control_socket,
            metrics_addr: self.metrics_addr,
            export: self.export,
            alerts: crate::alerts::Rules {
                denied: self.alert_denied,
                burst: self.alert_burst,
                outside_hours: self.alert_outside_hours,
                exec: self.alert_exec,
                block: self.alert_block,
            },
            roles: self.roles,
            audit: AuditSettings {
                fsync: self.audit_fsync,
                on_failure: self.audit_on_failure,
                seal_key: self.audit_seal_key,
                segment_mib: self.audit_segment_mib,
                segment_age: self.audit_segment_age,
                retain_age: self.audit_retain_age,
                retain_mib: self.audit_retain_mib,
                checkpoint_records: self.audit_checkpoint_records,
                checkpoint_interval: self.audit_checkpoint_interval,
                commit_window: self.audit_commit_window,
            },
            tcp_idle_timeout: self.tcp_idle_timeout,
            udp_idle_timeout: self.udp_idle_timeout,
            closed_linger: self.closed_linger,
            maglev_table_size: self.maglev_table_size,
            conntrack_size: self.conntrack_size,
            bpf_dir: self.bpf_dir,
            reset_state: self.reset_state,
            on_stop: self.on_stop,
        })
    }
}

impl ServiceSpec {
    /// A service without backends, rules, rate limit or health checks.
    pub fn new(name: String, proto: Proto, vip: SocketAddr) -> Self {
        ServiceSpec {
            name,
            proto,
            vip,
            backends: Vec::new(),
            allow: Vec::new(),
            deny: Vec::new(),
            rate_limit: None,
            health: None,
        }
    }
}

// The checks below are shared by the flags and by control requests (`lbctl service add`, ...),
// so a running daemon accepts exactly what it would accept at start.

/// Adds a service unless its name or its VIP and protocol are taken, or the table is full.
pub fn add_service(services: &mut Vec<ServiceSpec>, spec: ServiceSpec) -> Result<(), String> {
    check_name(&spec.name)?;
    if services.iter().any(|o| o.name == spec.name) {
        return Err("service name declared twice".into());
    }
    if let Some(o) = services
        .iter()
        .find(|o| o.vip == spec.vip && o.proto == spec.proto)
    {
        return Err(format!("{} is already service '{}'", spec.vip, o.name));
    }
    if services.len() >= lb_common::MAX_SERVICES as usize {
        return Err(format!(
            "at most {} services are supported",
            lb_common::MAX_SERVICES
        ));
    }
    services.push(spec);
    Ok(())
}

/// Adds a backend to a service: same address family as the VIP, not listed twice, within the
/// daemon-wide limit.
pub fn add_backend(
    services: &mut [ServiceSpec],
    service: &str,
    addr: SocketAddr,
    weight: u32,
) -> Result<(), String> {
    let total: usize = services.iter().map(|s| s.backends.len()).sum();
    let svc = find_service(services, service)?;
    same_family(svc, addr.ip())?;
    if addr.port() == 0 {
        return Err("port 0 is not a valid backend port".into());
    }
    if !(1..=1000).contains(&weight) {
        return Err(format!("weight {weight} is not from 1 to 1000"));
    }
    if svc.backends.iter().any(|o| o.addr == addr) {
        return Err("backend listed twice".into());
    }
    if total >= lb_common::MAX_BACKENDS as usize {
        return Err(format!(
            "at most {} backends are supported",
            lb_common::MAX_BACKENDS
        ));
    }
    svc.backends.push(BackendSpec { addr, weight });
    Ok(())
}

/// Adds an access rule to a service: same family as the VIP, one rule per prefix, within the
/// daemon-wide limit.
pub fn add_rule(
    services: &mut [ServiceSpec],
    service: &str,
    net: Cidr,
    allow: bool,
) -> Result<(), String> {
    let total: usize = services.iter().map(|s| s.allow.len() + s.deny.len()).sum();
    let svc = find_service(services, service)?;
    same_family(svc, net.addr)?;
    if svc.allow.contains(&net) || svc.deny.contains(&net) {
        return Err("a rule for this prefix already exists".into());
    }
    if total >= lb_common::MAX_ACL_RULES as usize {
        return Err(format!(
            "at most {} rules are supported",
            lb_common::MAX_ACL_RULES
        ));
    }
    if allow {
        svc.allow.push(net)
    } else {
        svc.deny.push(net)
    }
    Ok(())
}

fn same_family(svc: &ServiceSpec, ip: IpAddr) -> Result<(), String> {
    if ip.is_ipv4() == svc.vip.is_ipv4() {
        Ok(())
    } else {
        Err(format!(
            "address family differs from the service's VIP {}",
            svc.vip
        ))
    }
}

fn find_service<'a>(
    services: &'a mut [ServiceSpec],
    name: &str,
) -> Result<&'a mut ServiceSpec, String> {
    services
        .iter_mut()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("unknown service '{name}' (declare it with --service)"))
}

/// `tcp|udp:IP:PORT`, the part of `--service` after `NAME=`.
pub fn parse_vip(s: &str) -> Result<(Proto, SocketAddr), String> {
    let f = parse_service(&format!("x={s}"))?;
    Ok((f.proto, f.vip))
}

/// `N/s`, the part of `--rate-limit` after `SERVICE=`.
pub fn parse_rate_value(s: &str) -> Result<u32, String> {
    parse_rate(&format!("x={s}")).map(|r| r.per_sec)
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
        bail!(
            "--snat-ports: the host's ephemeral range starts at {lo}; give a SNAT range explicitly"
        );
    }
    Ok((1024, lo - 1))
}

fn parse_service(s: &str) -> Result<ServiceFlag, String> {
    let (name, rest) = s.split_once('=').ok_or("expected NAME=tcp|udp:IP:PORT")?;
    check_name(name)?;
    let (proto, addr) = rest
        .split_once(':')
        .ok_or("expected NAME=tcp|udp:IP:PORT")?;
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => return Err(format!("unknown protocol '{other}' (expected tcp or udp)")),
    };
    let vip: SocketAddr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not IP:PORT (IPv6 as [IP]:PORT)"))?;
    if vip.ip().is_unspecified() || vip.ip().is_multicast() {
        return Err(format!("{} cannot be a virtual IP", vip.ip()));
    }
    if vip.port() == 0 {
        return Err("port 0 is not a valid service port".into());
    }
    Ok(ServiceFlag {
        name: name.to_string(),
        proto,
        vip,
    })
}

fn parse_backend(s: &str) -> Result<BackendFlag, String> {
    let (service, rest) = s
        .split_once('=')
        .ok_or("expected SERVICE=IP:PORT[,weight=N]")?;
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
            _ => {
                return Err(format!(
                    "unknown backend option '{opt}' (expected weight=N)"
                ));
            }
        }
    }
    Ok(BackendFlag {
        service: service.to_string(),
        addr,
        weight,
    })
}

fn parse_iface(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() < 16
        && !s.contains(['/', ':'])
        && !s.chars().any(char::is_whitespace)
        && s != "."
        && s != "..";
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' is not a valid interface name"))
    }
}

fn parse_acl(s: &str) -> Result<AclFlag, String> {
    let (service, net) = s.split_once('=').ok_or("expected SERVICE=CIDR")?;
    check_name(service)?;
    Ok(AclFlag {
        service: service.to_string(),
        net: net.parse()?,
    })
}

fn parse_health(s: &str) -> Result<(String, crate::health::CheckSpec), String> {
    let (service, spec) = s
        .split_once('=')
        .ok_or("expected SERVICE=CHECK, e.g. web=tcp,interval=2s")?;
    check_name(service)?;
    Ok((service.to_string(), spec.parse()?))
}

fn parse_rate(s: &str) -> Result<RateFlag, String> {
    let (service, rate) = s.split_once('=').ok_or("expected SERVICE=N/s")?;
    check_name(service)?;
    let n = rate
        .strip_suffix("/s")
        .ok_or_else(|| format!("'{rate}': expected N/s, e.g. 200/s"))?;
    let per_sec = n
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=10_000_000).contains(n))
        .ok_or_else(|| format!("'{n}' is not a rate from 1 to 10000000 per second"))?;
    Ok(RateFlag {
        service: service.to_string(),
        per_sec,
    })
}

fn parse_table_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(251..=1_000_003).contains(&n) || !is_prime(n) {
        return Err(format!(
            "{n} is not a prime between 251 and 1000003 (e.g. 65537, 655373)"
        ));
    }
    Ok(n)
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d: &u32| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid name (1-64 of A-Z a-z 0-9 . _ -)"
        ))
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or("expected LO-HI, e.g. 10000-29999")?;
    let lo: u16 = lo.parse().map_err(|_| format!("'{lo}' is not a port"))?;
    let hi: u16 = hi.parse().map_err(|_| format!("'{hi}' is not a port"))?;
    if lo == 0 || hi < lo {
        return Err(format!(
            "{lo}-{hi} is not a non-empty range of non-zero ports"
        ));
    }
    Ok((lo, hi))
}

/// Parses `300s`, `5m`, `250ms`, `2h`, or a bare number of seconds.
fn parse_commit_window(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > Duration::from_secs(1) {
        return Err(format!("'{s}': at most 1s"));
    }
    Ok(d)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (e.g. 300s, 5m, 250ms)"))?;
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
        let mut v = vec![
            "lb-daemon",
            "--iface",
            "eth0",
            "--snat-ports",
            "10000-20000",
        ];
        v.extend_from_slice(args);
        Args::try_parse_from(v)?.into_settings()
    }

    #[test]
    fn services_and_weighted_backends() {
        let s = settings(&[
            "--service",
            "web=tcp:10.0.0.100:80",
            "--backend",
            "web=10.0.2.2:8080",
            "--backend",
            "web=10.0.3.2:8080,weight=2",
        ])
        .unwrap();
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.services[0].backends[1].weight, 2);
        assert_eq!(s.snat_ports, (10000, 20000));
    }

    #[test]
    fn errors_name_the_flag() {
        let e = settings(&[
            "--service",
            "web=tcp:10.0.0.100:80",
            "--backend",
            "db=10.0.2.2:5432",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--backend") && e.contains("unknown service 'db'"),
            "{e}"
        );
        let e = settings(&["--service", "web=tcp:10.0.0.300:80"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--service") && e.contains("10.0.0.300:80"),
            "{e}"
        );
        let e = settings(&[
            "--service",
            "web=tcp:10.0.0.1:80",
            "--backend",
            "web=10.0.2.2:80,weight=0",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--backend") && e.contains("weight"), "{e}");
    }

    #[test]
    fn acl_rate_and_ipv6() {
        let s = settings(&[
            "--service",
            "web6=tcp:[fd00::100]:80",
            "--backend",
            "web6=[fd00:2::2]:8080",
            "--service",
            "dns=udp:10.0.0.100:53",
            "--allow",
            "dns=10.1.0.0/16",
            "--deny",
            "dns=10.1.2.0/24",
            "--rate-limit",
            "dns=200/s",
        ])
        .unwrap();
        assert_eq!(s.services[1].allow.len(), 1);
        assert_eq!(s.services[1].rate_limit, Some(200));
        let e = settings(&[
            "--service",
            "web=tcp:10.0.0.1:80",
            "--allow",
            "web=10.1.2.3/16",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--allow") && e.contains("10.1.0.0/16"), "{e}");
        let e = settings(&["--service", "web=tcp:10.0.0.1:80", "--deny", "web=fd00::/8"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--deny") && e.contains("family"), "{e}");
        let e = settings(&[
            "--service",
            "web=tcp:10.0.0.1:80",
            "--rate-limit",
            "web=fast",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--rate-limit"), "{e}");
        assert!(settings(&["--maglev-table-size", "65536"]).is_err());
        assert_eq!(
            settings(&["--maglev-table-size", "4093"])
                .unwrap()
                .maglev_table_size,
            4093
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }
}
