//! `cargo xtask demo`: lb at work on a topology of network namespaces, one act at a time.
//!
//! ```text
//!  client   10.0.1.2 ──┐                            ┌── backend1 10.0.2.2  TCP echo :8080, UDP echo :5353
//!                      ├─ lb (XDP on c0, c1, b1, b2) ┤
//!  intruder 10.0.4.2 ──┘   VIP 10.0.0.100:80/tcp     └── backend2 10.0.3.2  (weight 2 for web)
//!                              10.0.0.100:53/udp
//! ```
//!
//! 1. TCP connections of various sizes and UDP exchanges through the VIP;
//! 2. the intruder's network is denied (`--deny`): its attempts are refused in the XDP program,
//!    and repeated refusals raise an alert (`--alert-denied 3/1m`);
//! 3. backend2's server stops: the health checks take it out of rotation, traffic goes on to
//!    backend1; the server returns and so does backend2;
//! 4. an operator drains backend2 with `lbctl backend drain`: new flows avoid it, and
//!    `backend_drained` is recorded; then undrains it;
//! 5. the unprivileged user `nobody` (a viewer) may read but not drain: exit 3, `control_denied`,
//!    an alert;
//! 6. the daemon stops; every act is checked in the audit log, then `lb-audit read` (the story),
//!    `lb-audit stats` and `lb-audit verify` (with the seal key) run on it.
//!
//! Namespaces and processes are removed at the end, on error, on panic and on Ctrl-C; the log
//! stays in target/lb-demo for a second look.

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use lb_tests::{
    Daemon, EchoServer, TempDir, Topology,
    audit::of_kind,
    daemon::run_bounded,
    echo::random_payload,
    echo_exchange, in_netns, read_audit, spawn_in_netns,
    topology::layout::{BACKEND1, BACKEND2, CLIENT, LB},
};
use serde_json::Value;

use crate::{build, root, setup, target_dir};

const SIZES: [usize; 10] = [
    64, 1_000, 4_096, 12_345, 40_000, 65_536, 100_000, 250_000, 512_000, 1_000_000,
];
const INTRUDER: &str = "intruder";
const INTRUDER_IP: &str = "10.0.4.2";
const UDP_VIP: &str = "10.0.0.100:53";
const UDP_PORT: u16 = 5353;
/// Health checks: a probe every 300 ms; out after 2 failures, back after 2 successes.
const HEALTH: &str = "web=tcp,interval=300ms,timeout=200ms,rise=2,fall=2";
/// The unprivileged user that tries a change (uid/gid of `nobody`/`nogroup` on Debian).
const NOBODY: u32 = 65534;

/// The control socket's directory, removed by the Ctrl-C handler too.
static SOCKET_DIR: OnceLock<PathBuf> = OnceLock::new();

pub fn demo() -> Result<()> {
    setup::setup()?;
    build(false)?;
    if !lb_tests::is_root() {
        bail!("the demo creates network namespaces and attaches an XDP program: run it as root");
    }
    let bin_dir = target_dir().join("debug");
    // SAFETY: the process has a single thread yet.
    unsafe { std::env::set_var("LB_BIN_DIR", &bin_dir) };

    // Ctrl-C (or SIGTERM/SIGHUP): stop what we started and delete the namespaces, then leave.
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: stopping the daemon and removing the demo namespaces");
        lb_tests::cleanup_all();
        if let Some(d) = SOCKET_DIR.get() {
            let _ = std::fs::remove_dir_all(d);
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    let started = Instant::now();
    let result = story(&bin_dir);
    match &result {
        Ok(()) => println!(
            "\n== the demo took {:.1} s; everything it created is removed",
            started.elapsed().as_secs_f64()
        ),
        Err(_) => eprintln!("\nthe demo failed; everything it created is removed"),
    }
    result
}

fn act(title: &str) {
    println!("\n== {title}");
}

fn story(bin_dir: &Path) -> Result<()> {
    act("the topology: network namespaces joined by veth pairs");
    let topo = topology()?;
    for (role, what) in [
        (
            CLIENT,
            "eth0 10.0.1.2, route to the VIP 10.0.0.100 via 10.0.1.1",
        ),
        (INTRUDER, "eth0 10.0.4.2, a network the service denies"),
        (
            LB,
            "c0 10.0.1.1 | c1 10.0.4.1 | b1 10.0.2.1 | b2 10.0.3.1, lb-daemon's XDP program on all four",
        ),
        (
            BACKEND1,
            "eth0 10.0.2.2, TCP echo :8080 (weight 1), UDP echo :5353",
        ),
        (
            BACKEND2,
            "eth0 10.0.3.2, TCP echo :8080 (weight 2), UDP echo :5353",
        ),
    ] {
        println!("   {role:<9} {:<28} {what}", topo.ns(role).name());
    }
    let [b1, b2] = Topology::backends();
    let s1 = EchoServer::start(topo.ns(BACKEND1).name(), b1)?;
    let mut s2 = Some(EchoServer::start(topo.ns(BACKEND2).name(), b2)?);
    let u1 = UdpEcho::start(topo.ns(BACKEND1).name(), SocketAddr::new(b1.ip(), UDP_PORT))?;
    let u2 = UdpEcho::start(topo.ns(BACKEND2).name(), SocketAddr::new(b2.ip(), UDP_PORT))?;

    let demo_dir = root().join("target").join("lb-demo");
    let log = demo_dir.join("audit");
    let _ = std::fs::remove_dir_all(&log);
    std::fs::create_dir_all(&log).with_context(|| format!("creating {}", log.display()))?;
    let key = demo_dir.join("seal.key");
    std::fs::write(&key, random_payload(32))
        .with_context(|| format!("writing {}", key.display()))?;
    // The control socket where `nobody` can reach it (every parent directory searchable).
    let sock_dir = TempDir::new("demo-ctl")?;
    let _ = SOCKET_DIR.set(sock_dir.path().to_path_buf());
    set_mode(sock_dir.path(), 0o755)?;
    let socket = sock_dir.path().join("control.sock");

    act(&format!("starting lb-daemon in {}", topo.ns(LB).name()));
    let mut args = Topology::daemon_args(&log);
    args.extend([
        "--iface=c1".to_owned(),
        format!("--service=dns=udp:{UDP_VIP}"),
        format!("--backend=dns={}:{UDP_PORT}", b1.ip()),
        format!("--backend=dns={}:{UDP_PORT}", b2.ip()),
        "--deny=web=10.0.4.0/24".to_owned(),
        format!("--health={HEALTH}"),
        "--alert-denied=3/1m".to_owned(),
        format!("--control-socket={}", socket.display()),
        "--role=viewer=user:nobody".to_owned(),
        format!("--audit-seal-key={}", key.display()),
        "--audit-checkpoint-interval=2s".to_owned(),
    ]);
    println!("$ lb-daemon {}", args.join(" "));
    let mut daemon = Daemon::spawn_with(topo.ns(LB).name(), &args, Some("   lb-daemon | "))?;
    daemon.wait_ready(Duration::from_secs(20))?;
    let ctl = Ctl {
        bin: lb_tests::bin("lbctl")?,
        socket: socket.clone(),
    };
    ctl.show(&["services"])?;

    let vip = Topology::vip();
    act(&format!(
        "1. {} TCP connections and 6 UDP exchanges from the client to {vip} and {UDP_VIP}",
        SIZES.len()
    ));
    let before = (data_connections(&s1), served(&s2));
    tcp_connections(&topo, &SIZES)?;
    println!(
        "   TCP: backend1 took {} connections, backend2 {} (weights 1 and 2)",
        data_connections(&s1) - before.0,
        served(&s2) - before.1
    );
    let udp_vip: SocketAddr = UDP_VIP.parse().expect("constant");
    in_netns(topo.ns(CLIENT).name(), || -> Result<()> {
        for i in 0..6 {
            let sock = UdpSocket::bind((lb_tests::topology::layout::CLIENT_IP, 0))
                .context("binding a UDP socket")?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            let query = format!("query {i}");
            sock.send_to(query.as_bytes(), udp_vip)?;
            let mut buf = [0u8; 512];
            let (n, from) = sock
                .recv_from(&mut buf)
                .with_context(|| format!("no UDP answer from {udp_vip} to {query:?}"))?;
            let verdict = if &buf[..n] == query.as_bytes() {
                "echo exact"
            } else {
                "ECHO DIFFERS"
            };
            println!(
                "   [udp {}/6] {} → {udp_vip}: {n} B back from {from}, {verdict}",
                i + 1,
                sock.local_addr()?
            );
            if &buf[..n] != query.as_bytes() {
                bail!("the UDP echo differs from what was sent");
            }
        }
        Ok(())
    })?;
    println!(
        "   UDP: backend1 answered {}, backend2 {}",
        u1.served(),
        u2.served()
    );

    act(&format!(
        "2. the intruder ({INTRUDER_IP}, denied by --deny web=10.0.4.0/24) tries four times"
    ));
    in_netns(topo.ns(INTRUDER).name(), || -> Result<()> {
        for i in 1..=4 {
            let t = Instant::now();
            match TcpStream::connect_timeout(&vip, Duration::from_millis(600)) {
                Ok(_) => bail!("the denied client got a connection to {vip}"),
                Err(e) => println!(
                    "   [{i}/4] {INTRUDER_IP} → {vip}: no connection after {:.0} ms ({e}): dropped in XDP",
                    t.elapsed().as_secs_f64() * 1e3
                ),
            }
        }
        Ok(())
    })?;

    act("3. backend2's server stops; the health checks take it out of rotation");
    let fell = Instant::now();
    drop(s2.take());
    println!("   backend2 no longer listens on {b2} ({HEALTH})");
    ctl.wait_backend(&b2, "health", "down", Duration::from_secs(5))?;
    println!(
        "   out of rotation {:.0} ms later",
        fell.elapsed().as_secs_f64() * 1e3
    );
    ctl.show(&["backends", "web"])?;
    let before = data_connections(&s1);
    tcp_connections(&topo, &[2_000; 6])?;
    println!(
        "   all {} new connections went to backend1",
        data_connections(&s1) - before
    );
    if data_connections(&s1) - before != 6 {
        bail!("with backend2 down, backend1 should have taken every connection");
    }
    let back = Instant::now();
    s2 = Some(EchoServer::start(topo.ns(BACKEND2).name(), b2)?);
    println!("   backend2 listens again");
    ctl.wait_backend(&b2, "health", "up", Duration::from_secs(5))?;
    println!(
        "   back in rotation {:.0} ms later",
        back.elapsed().as_secs_f64() * 1e3
    );
    let before = served(&s2);
    tcp_connections(&topo, &[2_000; 6])?;
    println!(
        "   backend2 took {} of 6 new connections",
        served(&s2) - before
    );

    act("4. an operator drains backend2 (lbctl backend drain)");
    ctl.expect(0, &["backend", "drain", "web", &b2.to_string()])?;
    ctl.show(&["backends", "web"])?;
    let before = (data_connections(&s1), served(&s2));
    tcp_connections(&topo, &[2_000; 6])?;
    println!(
        "   new connections: backend1 {}, backend2 {} (drained)",
        data_connections(&s1) - before.0,
        served(&s2) - before.1
    );
    if served(&s2) != before.1 {
        bail!("a new connection reached the drained backend");
    }
    println!("   waiting for the drain to complete (backend_drained, checked every 2 s)");
    wait_for_record(&log, Duration::from_secs(6), |r| {
        r["kind"] == "backend_drained"
    })?;
    ctl.expect(0, &["backend", "undrain", "web", &b2.to_string()])?;

    act("5. the unprivileged user nobody (role viewer) uses lbctl");
    // The socket is 0660 root:root; operators give it a group such as lb-admin. Here: nogroup.
    let chgrp = Command::new("chgrp")
        .arg(NOBODY.to_string())
        .arg(&socket)
        .status()
        .context("running chgrp")?;
    if !chgrp.success() {
        bail!("chgrp {NOBODY} {} failed", socket.display());
    }
    let (code, out, err) = ctl.run(Some(NOBODY), &["services"])?;
    println!("$ setpriv --reuid=nobody lbctl services   → exit {code}");
    print!("{}", indent(&out));
    if code != 0 {
        bail!("a viewer could not read the services: {err}");
    }
    let drain = ["backend", "drain", "web", &b1.to_string()];
    let (code, _, err) = ctl.run(Some(NOBODY), &drain)?;
    println!(
        "$ setpriv --reuid=nobody lbctl {}   → exit {code}",
        drain.join(" ")
    );
    print!("{}", indent(&err));
    if code != 3 {
        bail!("the viewer's drain should be refused with exit 3, got {code}: {err}");
    }

    act("6. stopping lb-daemon (SIGTERM)");
    // The alert of the refused control request and the last records reach the log first.
    std::thread::sleep(Duration::from_millis(500));
    let status = daemon.stop(Duration::from_secs(15))?;
    if !status.success() {
        bail!("lb-daemon exited with {status}");
    }
    println!("   lb-daemon exited: {status}");
    drop(s2);
    drop(s1);
    drop((u1, u2));

    act("the story, checked in the audit log");
    check_story(&read_audit(&log)?)?;

    let audit = lb_tests::bin("lb-audit")?;
    let story_kinds = [
        "daemon_start",
        "conn_deny",
        "health_change",
        "config_change",
        "backend_drained",
        "control_denied",
        "alert",
        "daemon_stop",
    ];
    let mut read = Command::new(&audit);
    read.arg("read").arg(&log);
    for k in story_kinds {
        read.args(["--kind", k]);
    }
    lb_audit(
        &format!(
            "every record but connections and checkpoints: lb-audit read {} --kind …",
            log.display()
        ),
        &mut read,
    )?;
    lb_audit(
        "the UDP flows: lb-audit read … --proto udp --kind conn_close",
        Command::new(&audit)
            .arg("read")
            .arg(&log)
            .args(["--proto", "udp", "--kind", "conn_close"]),
    )?;
    lb_audit(
        &format!("lb-audit stats {}", log.display()),
        Command::new(&audit).arg("stats").arg(&log),
    )?;
    lb_audit(
        &format!("lb-audit verify {} --key {}", log.display(), key.display()),
        Command::new(&audit)
            .arg("verify")
            .arg(&log)
            .arg("--key")
            .arg(&key),
    )?;

    let names = topo.names();
    drop(daemon);
    drop(topo);
    drop(sock_dir);
    println!("\n== cleaned up: namespaces {} removed", names.join(", "));
    println!(
        "   the log stays in {}: `{}/lb-audit read {} --format json` decodes it again",
        log.display(),
        bin_dir.display(),
        log.display()
    );
    Ok(())
}

/// The standard balancer layout plus the intruder's namespace on a fourth interface.
fn topology() -> Result<Topology> {
    let mut topo = Topology::balancer("demo")?;
    topo.add(INTRUDER)?;
    topo.link((INTRUDER, "eth0"), (LB, "c1"))?;
    topo.addr(INTRUDER, "eth0", &format!("{INTRUDER_IP}/24"))?;
    topo.addr(LB, "c1", "10.0.4.1/24")?;
    topo.route(INTRUDER, "default via 10.0.4.1")?;
    topo.wire_like(INTRUDER, "eth0")?;
    Ok(topo)
}

/// Client connections a backend has served: the health checks' probes (connect, close) carry
/// no data and do not count.
fn served(s: &Option<EchoServer>) -> usize {
    s.as_ref().map_or(0, data_connections)
}

fn data_connections(s: &EchoServer) -> usize {
    s.served().iter().filter(|c| c.bytes > 0).count()
}

/// One echo connection per size from the client to the VIP, each checked byte for byte.
fn tcp_connections(topo: &Topology, sizes: &[usize]) -> Result<()> {
    let vip = Topology::vip();
    let total = sizes.len();
    in_netns(topo.ns(CLIENT).name(), || -> Result<()> {
        for (i, &n) in sizes.iter().enumerate() {
            let payload = random_payload(n);
            let x = echo_exchange(vip, &payload, Duration::from_secs(10))
                .with_context(|| format!("connection {} of {total} ({n} bytes)", i + 1))?;
            let verdict = if x.received == payload {
                "echo exact"
            } else {
                "ECHO DIFFERS"
            };
            println!(
                "   [{:>2}/{total}] {} → {vip}: sent {:>9} B, received {:>9} B in {:>7.2} ms, {verdict}",
                i + 1,
                x.local,
                x.sent,
                x.received.len(),
                x.elapsed.as_secs_f64() * 1e3
            );
            if x.received != payload {
                bail!(
                    "the echo of connection {} differs from what was sent",
                    i + 1
                );
            }
        }
        Ok(())
    })?;
    // A server records a connection just after its last byte reaches the client.
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

/// `lbctl` against the demo daemon's socket.
struct Ctl {
    bin: PathBuf,
    socket: PathBuf,
}

impl Ctl {
    /// Runs lbctl (as `uid` with `setpriv` when given): exit code, stdout, stderr.
    fn run(&self, uid: Option<u32>, args: &[&str]) -> Result<(i32, String, String)> {
        let mut cmd = match uid {
            None => Command::new(&self.bin),
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".to_owned(),
                ])
                .arg(&self.bin);
                c
            }
        };
        cmd.arg("--socket").arg(&self.socket).args(args);
        let o = run_bounded(&mut cmd, Duration::from_secs(10))?;
        Ok((
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    }

    /// Runs lbctl as root, prints the command and its output; fails unless it exits `code`.
    fn expect(&self, code: i32, args: &[&str]) -> Result<String> {
        let (got, out, err) = self.run(None, args)?;
        println!("$ lbctl {}   → exit {got}", args.join(" "));
        print!("{}", indent(&out));
        if got != code {
            bail!("`lbctl {}` exited {got}, not {code}: {err}", args.join(" "));
        }
        Ok(out)
    }

    fn show(&self, args: &[&str]) -> Result<()> {
        self.expect(0, args).map(drop)
    }

    /// Polls `lbctl --json backends web` until `backend`'s `field` is `value`.
    fn wait_backend(
        &self,
        backend: &SocketAddr,
        field: &str,
        value: &str,
        limit: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let (code, out, err) = self.run(None, &["--json", "backends", "web"])?;
            if code != 0 {
                bail!("lbctl backends web exited {code}: {err}");
            }
            let rows: Value = serde_json::from_str(out.trim())
                .with_context(|| format!("lbctl --json printed {out:?}"))?;
            let now = rows
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["backend"] == backend.to_string())
                .map(|r| r[field].as_str().unwrap_or_default().to_owned());
            if now.as_deref() == Some(value) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{backend}: {field} is {now:?}, not {value:?}, after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits until the log holds a record `pred` accepts.
fn wait_for_record(log: &Path, limit: Duration, pred: impl Fn(&Value) -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if read_audit(log).is_ok_and(|r| r.iter().any(&pred)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the record did not appear in {} within {limit:?}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every act of the demo left its records; prints one line per check, fails on the first miss.
fn check_story(log: &[Value]) -> Result<()> {
    let is = |r: &Value, k: &str, v: &str| r[k].as_str() == Some(v);
    let b2 = Topology::backends()[1].to_string();
    let count = |pred: &dyn Fn(&Value) -> bool| log.iter().filter(|r| pred(r)).count();
    let checks: Vec<(String, usize)> = vec![
        (
            "TCP connections opened and closed (conn_open, conn_close)".into(),
            count(&|r| is(r, "kind", "conn_close") && is(r, "proto", "tcp")),
        ),
        (
            "UDP flows (conn_open, conn_close on service dns)".into(),
            count(&|r| is(r, "kind", "conn_open") && is(r, "service", "dns")),
        ),
        (
            format!(
                "refusals of the intruder {INTRUDER_IP} (conn_deny, reason acl; each record \
                 stands for itself and the refusals it says were suppressed)"
            ),
            log.iter()
                .filter(|r| {
                    is(r, "kind", "conn_deny")
                        && is(r, "reason", "acl")
                        && r["client"].as_str().is_some_and(|c| {
                            c == INTRUDER_IP || c.starts_with(&format!("{INTRUDER_IP}:"))
                        })
                })
                .map(|r| lb_tests::audit::refusals(r).unwrap_or(1) as usize)
                .sum(),
        ),
        (
            "backend2 went down and came back (health_change)".into(),
            count(&|r| is(r, "kind", "health_change")),
        ),
        (
            "the drain and the undrain (config_change, actor root)".into(),
            count(&|r| is(r, "kind", "config_change")),
        ),
        (
            format!("the drain of {b2} completed (backend_drained)"),
            count(&|r| is(r, "kind", "backend_drained")),
        ),
        (
            "nobody's drain refused (control_denied)".into(),
            count(&|r| is(r, "kind", "control_denied")),
        ),
        (
            "alerts: repeated refusals and a refused control request (alert)".into(),
            count(&|r| is(r, "kind", "alert")),
        ),
    ];
    let mut missing = Vec::new();
    for (what, n) in &checks {
        println!("   [{}] {what}: {n}", if *n > 0 { "ok" } else { "MISSING" });
        if *n == 0 {
            missing.push(what.clone());
        }
    }
    let rules: Vec<&str> = of_kind(log, "alert")
        .iter()
        .filter_map(|a| a["rule"].as_str())
        .collect();
    for rule in ["denied", "control_denied"] {
        if !rules.contains(&rule) {
            missing.push(format!("an alert of rule {rule} (alerts: {rules:?})"));
        }
    }
    if !missing.is_empty() {
        bail!("the audit log lacks: {}", missing.join("; "));
    }
    Ok(())
}

/// Runs an lb-audit command, prints its output; fails when it fails.
fn lb_audit(title: &str, cmd: &mut Command) -> Result<Output> {
    act(title);
    let out = run_bounded(cmd, Duration::from_secs(30))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "{title} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// A UDP echo server in a namespace, until dropped.
struct UdpEcho {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl UdpEcho {
    fn start(ns: &str, addr: SocketAddr) -> Result<UdpEcho> {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (stop2, served2) = (stop.clone(), served.clone());
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let tx = Mutex::new(tx);
        let thread = spawn_in_netns(ns, move || {
            let sock = match UdpSocket::bind(addr) {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx
                        .lock()
                        .map(|t| t.send(Err(format!("binding udp {addr}: {e}"))));
                    return Ok(());
                }
            };
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let _ = tx.lock().map(|t| t.send(Ok(())));
            let mut buf = [0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    sock.send_to(&buf[..n], peer)?;
                    served2.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(UdpEcho {
                stop,
                served,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(anyhow!("UDP echo server in {ns}: {e}")),
            Err(_) => Err(anyhow!("UDP echo server in {ns} did not start")),
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
