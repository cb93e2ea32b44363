//! `cargo xtask demo`: lb at work on a topology of network namespaces.
//!
//! client (10.0.1.2) → lb (XDP on c0, b1, b2; VIP 10.0.0.100:80) → backend1 10.0.2.2:8080 /
//! backend2 10.0.3.2:8080 (weight 2), TCP echo servers. Ten connections of various sizes, then
//! the daemon is stopped and its audit log decoded. Namespaces and processes are removed at
//! the end, on error, on panic and on Ctrl-C.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_tests::{
    Daemon, EchoServer, Topology,
    audit::of_kind,
    daemon::run_bounded,
    echo::random_payload,
    echo_exchange, in_netns, read_audit,
    topology::layout::{BACKEND1, BACKEND2, CLIENT, LB},
};

use crate::{build, root, setup, target_dir};

const SIZES: [usize; 10] = [
    64, 1_000, 4_096, 12_345, 40_000, 65_536, 100_000, 250_000, 512_000, 1_000_000,
];

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
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    println!("\n== demo topology (network namespaces)");
    let topo = Topology::balancer("demo")?;
    for (role, what) in [
        (
            CLIENT,
            "eth0 10.0.1.2, route to the VIP 10.0.0.100 via 10.0.1.1",
        ),
        (
            LB,
            "c0 10.0.1.1 | b1 10.0.2.1 | b2 10.0.3.1, lb-daemon's XDP program on all three",
        ),
        (BACKEND1, "eth0 10.0.2.2, TCP echo on :8080, weight 1"),
        (BACKEND2, "eth0 10.0.3.2, TCP echo on :8080, weight 2"),
    ] {
        println!("   {role:<9} {:<28} {what}", topo.ns(role).name());
    }
    let [b1, b2] = Topology::backends();
    let s1 = EchoServer::start(topo.ns(BACKEND1).name(), b1)?;
    let s2 = EchoServer::start(topo.ns(BACKEND2).name(), b2)?;

    let log = root().join("target").join("lb-demo").join("audit");
    let _ = std::fs::remove_dir_all(&log);
    std::fs::create_dir_all(&log).with_context(|| format!("creating {}", log.display()))?;

    println!("\n== starting lb-daemon in {}", topo.ns(LB).name());
    let args = Topology::daemon_args(&log);
    println!("$ lb-daemon {}", args.join(" "));
    let mut daemon = Daemon::spawn_with(topo.ns(LB).name(), &args, Some("   lb-daemon | "))?;
    daemon.wait_ready(Duration::from_secs(20))?;

    println!(
        "\n== {} TCP connections from {} to {}",
        SIZES.len(),
        topo.ns(CLIENT).name(),
        Topology::vip()
    );
    let vip = Topology::vip();
    let total = SIZES.len();
    in_netns(topo.ns(CLIENT).name(), || -> Result<()> {
        for (i, &n) in SIZES.iter().enumerate() {
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
    let (served1, served2) = (s1.stop(), s2.stop());
    println!(
        "   backend1 served {} connections, backend2 served {}",
        served1.len(),
        served2.len()
    );

    // A bounded moment for the daemon to take the last close records from the ring buffer.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        match read_audit(&log) {
            Ok(r) if of_kind(&r, "conn_close").len() >= total => break,
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }

    println!("\n== stopping lb-daemon (SIGTERM)");
    let status = daemon.stop(Duration::from_secs(15))?;
    if !status.success() {
        bail!("lb-daemon exited with {status}");
    }
    println!("   lb-daemon exited: {status}");

    println!("\n== the audit log: lb-audit read {}", log.display());
    let out = run_bounded(
        Command::new(lb_tests::bin("lb-audit")?)
            .arg("read")
            .arg(&log),
        Duration::from_secs(30),
    )?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!(
            "lb-audit read failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let names = topo.names();
    drop(daemon);
    drop(topo);
    println!("\n== cleaned up: namespaces {} removed", names.join(", "));
    println!(
        "   the log stays in {}: `{}/lb-audit read {} --format json` decodes it again",
        log.display(),
        bin_dir.display(),
        log.display()
    );
    Ok(())
}
