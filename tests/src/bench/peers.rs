//! The configurations the peers benchmark compares, each started in the `lb` namespace of a
//! [`Topology::balancer`] and stopped before the next one starts:
//!
//! | peer | TCP 10.0.0.100:80 | UDP 10.0.0.100:53 |
//! |---|---|---|
//! | `direct` | no balancer: the client connects to 10.0.2.2:8080 / 10.0.3.2:8080 in turn, routed by the lb namespace's kernel | to 10.0.2.2:5353 / 10.0.3.2:5353 |
//! | `lb` | `lb-daemon`, XDP on c0, b1, b2, full NAT | same daemon, service `dns` |
//! | `nft` | nftables DNAT (round robin with `numgen`) + masquerade towards the backends, conntrack | same table |
//! | `haproxy` | `mode tcp`, round robin, `nbthread` = workers | — (HAProxy has no UDP) |
//! | `nginx` | `stream`, round robin, `worker_processes` = workers | `listen … udp reuseport` |
//!
//! The userspace proxies need the VIP as a local address: it is put on `lo` of the lb
//! namespace while they run, and removed after. The kernel paths (lb, nft, direct) run without
//! it. Every process started here is registered for [`crate::cleanup_all`], gets SIGTERM when
//! this process dies (`PR_SET_PDEATHSIG`), and is stopped by [`Running::stop`] or on drop.

use std::{
    fs::File,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    Daemon, TempDir,
    audit::{of_kind, read_audit},
    netns::{register_pid, unregister_pid},
    topology::{Topology, layout},
};

/// UDP port of the benchmark's DNS-like service on the VIP, and on the backends.
pub const VIP_UDP_PORT: u16 = 53;
pub const BACKEND_UDP_PORT: u16 = 5353;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    Direct,
    Lb,
    Nft,
    Haproxy,
    Nginx,
}

impl Peer {
    pub const ALL: [Peer; 5] = [
        Peer::Direct,
        Peer::Lb,
        Peer::Nft,
        Peer::Haproxy,
        Peer::Nginx,
    ];

    /// Short name, as on the command line (`--only lb,nft`).
    pub fn name(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::Lb => "lb",
            Peer::Nft => "nft",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
        }
    }

    /// Name in tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            Peer::Direct => "direct path",
            Peer::Lb => "lb (XDP)",
            Peer::Nft => "kernel DNAT (nft)",
            Peer::Haproxy => "HAProxy",
            Peer::Nginx => "nginx stream",
        }
    }

    pub fn from_name(s: &str) -> Option<Peer> {
        Peer::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Whether it forwards UDP.
    pub fn udp(self) -> bool {
        self != Peer::Haproxy
    }

    /// Whether it is one of the alternatives to lb (not lb, not the direct path).
    pub fn is_alternative(self) -> bool {
        matches!(self, Peer::Nft | Peer::Haproxy | Peer::Nginx)
    }

    /// Where the client sends short TCP connections.
    pub fn tcp_targets(self) -> Vec<SocketAddr> {
        match self {
            Peer::Direct => Topology::backends().to_vec(),
            _ => vec![Topology::vip()],
        }
    }

    /// Where the client sends UDP.
    pub fn udp_targets(self) -> Vec<SocketAddr> {
        match self {
            Peer::Direct => Topology::backends()
                .iter()
                .map(|b| SocketAddr::new(b.ip(), BACKEND_UDP_PORT))
                .collect(),
            _ => vec![SocketAddr::new(Topology::vip().ip(), VIP_UDP_PORT)],
        }
    }

    /// What it needs installed, as (program, Debian package); empty when nothing. The UDP
    /// phase counts arrivals at the backends with an nftables rule.
    pub fn needs(self) -> &'static [(&'static str, &'static str)] {
        const NFT: (&str, &str) = ("nft", "nftables");
        match self {
            Peer::Direct | Peer::Lb | Peer::Nft => &[NFT],
            Peer::Haproxy => &[("haproxy", "haproxy")],
            Peer::Nginx => &[
                ("nginx", "nginx-light"),
                (NGINX_STREAM, "libnginx-mod-stream"),
                NFT,
            ],
        }
    }

    /// Why it cannot run here, if it cannot.
    pub fn missing(self) -> Option<String> {
        let missing: Vec<&str> = self
            .needs()
            .iter()
            .filter(|(prog, _)| find_program(prog).is_none())
            .map(|(_, pkg)| *pkg)
            .collect();
        (!missing.is_empty()).then(|| format!("not installed: {}", missing.join(", ")))
    }
}

/// nginx's stream module, as Debian's libnginx-mod-stream installs it.
pub const NGINX_STREAM: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// A program on PATH or in the sbin directories, or an absolute path that exists.
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What lb's audit log says about one daemon session, and what the backends saw meanwhile.
#[derive(Clone, Debug, Default)]
pub struct AuditCheck {
    /// TCP connections the backends accepted while the daemon ran (each one a forwarded flow).
    pub tcp_flows_forwarded: u64,
    /// Distinct UDP sources (SNAT address and port) the backends saw while the daemon ran.
    pub udp_flows_forwarded: u64,
    pub conn_open_tcp: u64,
    pub conn_open_udp: u64,
    pub conn_close: u64,
    pub conn_deny: u64,
    /// Sum of the `count` of `loss` records.
    pub lost: u64,
    pub records: u64,
    /// Pairs of flows that held the same (backend, SNAT address and port) at the same time
    /// (by their open and close times): must be zero.
    pub snat_overlaps: u64,
    /// Pairs of flows on the same (backend, SNAT address and port) where the second opened
    /// less than 60 s (Linux's TIME_WAIT) after the first closed: the backend may still hold
    /// the first one's TIME_WAIT socket when the second one's SYN arrives.
    pub snat_reuse_in_time_wait: u64,
}

impl AuditCheck {
    /// Forwarded flows with no `conn_open` record.
    pub fn unaccounted(&self) -> u64 {
        self.tcp_flows_forwarded.saturating_sub(self.conn_open_tcp)
            + self.udp_flows_forwarded.saturating_sub(self.conn_open_udp)
    }

    pub fn add(&mut self, o: &AuditCheck) {
        self.tcp_flows_forwarded += o.tcp_flows_forwarded;
        self.udp_flows_forwarded += o.udp_flows_forwarded;
        self.conn_open_tcp += o.conn_open_tcp;
        self.conn_open_udp += o.conn_open_udp;
        self.conn_close += o.conn_close;
        self.conn_deny += o.conn_deny;
        self.lost += o.lost;
        self.records += o.records;
        self.snat_overlaps += o.snat_overlaps;
        self.snat_reuse_in_time_wait += o.snat_reuse_in_time_wait;
    }
}

/// A peer running in the lb namespace.
pub struct Running {
    pub peer: Peer,
    lb_ns: String,
    daemon: Option<Daemon>,
    audit: Option<TempDir>,
    child: Option<Child>,
    workdir: Option<TempDir>,
    vip_on_lo: bool,
    nft_table: bool,
}

/// The `lb-daemon` flags of the benchmark.
pub fn lb_args(audit_dir: &Path) -> Vec<String> {
    let [b1, b2] = Topology::backends();
    let mut v: Vec<String> = Vec::new();
    for iface in layout::LB_IFACES {
        v.extend(["--iface".into(), iface.into()]);
    }
    let vip = Topology::vip();
    v.extend([
        "--service".into(),
        format!("web=tcp:{vip}"),
        "--backend".into(),
        format!("web={b1}"),
        "--backend".into(),
        format!("web={b2}"),
        "--service".into(),
        format!("dns=udp:{}:{VIP_UDP_PORT}", vip.ip()),
        "--backend".into(),
        format!("dns={}:{BACKEND_UDP_PORT}", b1.ip()),
        "--backend".into(),
        format!("dns={}:{BACKEND_UDP_PORT}", b2.ip()),
        "--audit-dir".into(),
        audit_dir.display().to_string(),
    ]);
    v
}

/// The nftables ruleset of the kernel DNAT peer.
pub fn nft_ruleset() -> String {
    let [b1, b2] = Topology::backends();
    let (b1, b2) = (b1.ip(), b2.ip());
    let vip = Topology::vip();
    format!(
        "table ip lbbench {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {vip_ip} tcp dport {vport} dnat to numgen inc mod 2 map {{ 0 : {b1}, 1 : {b2} }} : {bport}
    ip daddr {vip_ip} udp dport {VIP_UDP_PORT} dnat to numgen inc mod 2 map {{ 0 : {b1}, 1 : {b2} }} : {BACKEND_UDP_PORT}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname {{ \"b1\", \"b2\" }} ct status dnat masquerade
  }}
}}
",
        vip_ip = vip.ip(),
        vport = vip.port(),
        bport = layout::BACKEND_PORT,
    )
}

/// HAProxy's configuration: TCP mode, round robin, `workers` threads, no logging. `maxconn`
/// stays within what the default descriptor limit (20,000 here) allows HAProxy; the client
/// keeps at most a few dozen connections open at once.
pub fn haproxy_config(workers: usize) -> String {
    let [b1, b2] = Topology::backends();
    format!(
        "global
  nbthread {workers}
  maxconn 8000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend web
  bind {vip}
  default_backend web
backend web
  balance roundrobin
  server b1 {b1}
  server b2 {b2}
",
        vip = Topology::vip()
    )
}

/// nginx's configuration: stream TCP and UDP, round robin, `workers` worker processes, no
/// access log.
pub fn nginx_config(workers: usize, dir: &Path) -> String {
    let [b1, b2] = Topology::backends();
    let vip = Topology::vip();
    format!(
        "load_module {NGINX_STREAM};
daemon off;
master_process on;
user root;
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8000; }}
stream {{
  upstream web {{ server {b1}; server {b2}; }}
  upstream dns {{ server {b1ip}:{BACKEND_UDP_PORT}; server {b2ip}:{BACKEND_UDP_PORT}; }}
  server {{ listen {vip} reuseport backlog=4096; proxy_pass web; proxy_connect_timeout 2s; proxy_half_close on; }}
  server {{ listen {vip_ip}:{VIP_UDP_PORT} udp reuseport; proxy_pass dns; proxy_timeout 10s; }}
}}
",
        dir = dir.display(),
        b1ip = b1.ip(),
        b2ip = b2.ip(),
        vip_ip = vip.ip(),
    )
}

/// Removes the TIME_WAIT sockets of every namespace of the topology (`ss -K`), so that each
/// peer starts from the same state: on Linux with per-connection TCP timestamp offsets (the
/// offset is a hash of the 4-tuple), a SYN that reuses a backend-side 4-tuple still in
/// TIME_WAIT from *another* client connection is refused by PAWS half of the time and retried
/// 1 s later. Without the flush, one peer's leftover TIME_WAIT sockets would slow the next.
pub fn flush_time_wait(topo: &Topology) {
    for role in [
        layout::CLIENT,
        layout::LB,
        layout::BACKEND1,
        layout::BACKEND2,
    ] {
        if let Ok(ns) = topo.try_ns(role) {
            let _ = ns.try_run("ss -K -tan state time-wait >/dev/null");
        }
    }
}

/// Starts `peer` in `topo`'s lb namespace and waits until a short connection through it
/// succeeds. Call it from the thread that will outlive the peer (the parent-death signal is
/// tied to the spawning thread).
pub fn start(peer: Peer, topo: &Topology, workers: usize) -> Result<Running> {
    let lb_ns = topo.try_ns(layout::LB)?.name().to_owned();
    let mut r = Running {
        peer,
        lb_ns: lb_ns.clone(),
        daemon: None,
        audit: None,
        child: None,
        workdir: None,
        vip_on_lo: false,
        nft_table: false,
    };
    let vip = Topology::vip();
    match peer {
        Peer::Direct => {}
        Peer::Lb => {
            let dir = TempDir::new("lb-audit")?;
            let mut d = Daemon::spawn(&lb_ns, &lb_args(dir.path()))?;
            r.audit = Some(dir);
            d.wait_ready(Duration::from_secs(30))?;
            r.daemon = Some(d);
        }
        Peer::Nft => {
            let dir = TempDir::new("nft")?;
            let file = dir.path().join("rules.nft");
            std::fs::write(&file, nft_ruleset())?;
            r.workdir = Some(dir);
            topo.ns(layout::LB)
                .try_exec(&["nft", "-f", &file.display().to_string()])
                .context("loading the nftables DNAT ruleset")?;
            r.nft_table = true;
        }
        Peer::Haproxy | Peer::Nginx => {
            let dir = TempDir::new(peer.name())?;
            topo.ns(layout::LB).try_exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/32", vip.ip()),
                "dev",
                "lo",
            ])?;
            r.vip_on_lo = true;
            let log = dir.path().join("out.log");
            let argv: Vec<String> = if peer == Peer::Haproxy {
                let conf = dir.path().join("haproxy.cfg");
                std::fs::write(&conf, haproxy_config(workers))?;
                vec![
                    "haproxy".into(),
                    "-db".into(),
                    "-f".into(),
                    conf.display().to_string(),
                ]
            } else {
                let conf = dir.path().join("nginx.conf");
                std::fs::write(&conf, nginx_config(workers, dir.path()))?;
                vec![
                    "nginx".into(),
                    "-e".into(),
                    "stderr".into(),
                    "-p".into(),
                    dir.path().display().to_string(),
                    "-c".into(),
                    conf.display().to_string(),
                ]
            };
            r.workdir = Some(dir);
            r.child = Some(spawn_logged(&lb_ns, &argv, &log)?);
        }
    }
    // Ready when one short connection through it goes through.
    let client = topo.try_ns(layout::CLIENT)?.name().to_owned();
    let deadline = Instant::now() + Duration::from_secs(15);
    let spec = super::load::ConnSpec {
        targets: peer.tcp_targets(),
        threads: 1,
        max_conns: 2,
        duration: Duration::from_secs(3),
        rate: None,
        timeout: Duration::from_secs(1),
    };
    loop {
        if let Some(c) = r.child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            let log = r.log();
            bail!("{} exited with {status}: {log}", peer.name());
        }
        let got = super::load::run_conns(&client, &spec)?;
        if got.ok == spec.max_conns {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: no connection through it within 15 s ({:?}); its output: {}",
                peer.name(),
                got.errors,
                r.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(r)
}

/// Starts `argv` in namespace `ns` with stdout and stderr to `log`; SIGTERM when this process
/// dies; registered for [`crate::cleanup_all`].
fn spawn_logged(ns: &str, argv: &[String], log: &Path) -> Result<Child> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} in {ns}", argv.join(" ")))?;
    register_pid(child.id());
    Ok(child)
}

impl Running {
    fn log(&self) -> String {
        self.workdir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.path().join("out.log")).ok())
            .unwrap_or_default()
    }

    /// The daemon's process id when the peer is lb.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(Daemon::pid)
    }

    /// Stops the peer and removes what it added to the namespace. For lb, the daemon is
    /// stopped with SIGTERM (it closes the records of open flows) and its log decoded.
    pub fn stop(mut self) -> Result<Option<AuditCheck>> {
        let audit = self.stop_inner();
        self.cleanup_ns();
        audit
    }

    fn stop_inner(&mut self) -> Result<Option<AuditCheck>> {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(5));
        }
        let Some(mut d) = self.daemon.take() else {
            return Ok(None);
        };
        let status = d.stop(Duration::from_secs(30))?;
        if !status.success() {
            bail!("lb-daemon exited with {status}: {}", d.stderr());
        }
        let dir = self.audit.as_ref().ok_or_else(|| anyhow!("no audit dir"))?;
        let recs = read_audit(dir.path())?;
        let proto = |kind: &str, p: &str| {
            of_kind(&recs, kind)
                .iter()
                .filter(|r| r["proto"] == p)
                .count() as u64
        };
        Ok(Some(AuditCheck {
            conn_open_tcp: proto("conn_open", "tcp"),
            conn_open_udp: proto("conn_open", "udp"),
            conn_close: of_kind(&recs, "conn_close").len() as u64,
            conn_deny: of_kind(&recs, "conn_deny").len() as u64,
            lost: of_kind(&recs, "loss")
                .iter()
                .map(|r| r["count"].as_u64().unwrap_or(0))
                .sum(),
            records: recs.len() as u64,
            ..snat_reuse(&recs)
        }))
    }

    fn cleanup_ns(&mut self) {
        if self.nft_table {
            let _ = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.lb_ns,
                    "nft",
                    "delete",
                    "table",
                    "ip",
                    "lbbench",
                ])
                .output();
            self.nft_table = false;
        }
        if self.vip_on_lo {
            let _ = Command::new("ip")
                .args(["netns", "exec", &self.lb_ns, "ip", "addr", "del"])
                .arg(format!("{}/32", Topology::vip().ip()))
                .args(["dev", "lo"])
                .output();
            self.vip_on_lo = false;
        }
        // Whatever is still running inside the namespace was started by this benchmark (the
        // namespace is its own): nginx workers whose master died, for instance.
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.lb_ns])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a process inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(5));
        }
        // Dropping the daemon kills it.
        self.daemon.take();
        self.cleanup_ns();
    }
}

/// Seconds since midnight of an RFC 3339 UTC time (`…THH:MM:SS.nnnnnnnnnZ`).
fn day_secs(t: &str) -> Option<f64> {
    let (_, tod) = t.split_once('T')?;
    let mut it = tod.trim_end_matches('Z').split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// How flows shared (backend, SNAT address and port), from `conn_open` and `conn_close`.
fn snat_reuse(recs: &[serde_json::Value]) -> AuditCheck {
    use std::collections::HashMap;
    let mut closes: HashMap<u64, f64> = HashMap::new();
    for r in of_kind(recs, "conn_close") {
        if let (Some(id), Some(t)) = (r["flow_id"].as_u64(), r["time"].as_str().and_then(day_secs))
        {
            closes.insert(id, t);
        }
    }
    let mut by_tuple: HashMap<(String, String), Vec<(f64, f64)>> = HashMap::new();
    for r in of_kind(recs, "conn_open") {
        let (Some(id), Some(t)) = (r["flow_id"].as_u64(), r["time"].as_str().and_then(day_secs))
        else {
            continue;
        };
        let key = (r["backend"].to_string(), r["snat"].to_string());
        let close = closes.get(&id).copied().unwrap_or(f64::INFINITY);
        by_tuple.entry(key).or_default().push((t, close));
    }
    let mut out = AuditCheck::default();
    for v in by_tuple.values_mut() {
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        for w in v.windows(2) {
            let ((_, a_close), (b_open, _)) = (w[0], w[1]);
            if b_open < a_close {
                out.snat_overlaps += 1;
            } else if b_open - a_close < 60.0 {
                out.snat_reuse_in_time_wait += 1;
            }
        }
    }
    out
}

/// SIGTERM, wait up to `limit`, then SIGKILL.
fn stop_child(c: &mut Child, limit: Duration) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + limit;
    loop {
        match c.try_wait() {
            Ok(Some(_)) | Err(_) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    unregister_pid(c.id());
}
