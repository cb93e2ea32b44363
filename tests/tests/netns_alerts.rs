//! Alert rules on live traffic: repeated refusals, a burst of new flows, access outside
//! working hours and a refused control request each become an `alert` record and run the
//! `--alert-exec` command with the alert as JSON.

use std::{net::TcpStream, process::Command, time::Duration};

use lb_tests::{TempDir, Topology, audit::of_kind, echo_exchange, read_audit, require_root};

#[test]
fn alerts_fire_on_denials_bursts_hours_and_control() {
    if !require_root("alerts_fire_on_denials_bursts_hours_and_control") {
        return;
    }
    let t = Topology::balancer("alerts").expect("topology");
    let dir = TempDir::new("alerts").unwrap();
    let [a1, _] = Topology::backends();
    let _servers = t.echo_backends().unwrap();
    let exec_out = dir.path().join("alerts.jsonl");
    let socket = dir.path().join("control.sock");
    // Working hours that exclude the present moment (the daemon's time zone here is UTC).
    let now_min = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
        % 1440) as u32;
    let (from, to) = ((now_min + 60) % 1440, (now_min + 120) % 1440);
    let hours = format!(
        "{:02}:{:02}-{:02}:{:02}",
        from / 60,
        from % 60,
        to / 60,
        to % 60
    );
    let mut args = Topology::daemon_args(&dir.path().join("audit"));
    args.extend([
        "--service=adm=tcp:10.0.0.100:22".into(),
        format!("--backend=adm={a1}"),
        "--allow=adm=10.9.0.0/16".into(),
        "--alert-denied=3/30s".into(),
        "--alert-burst=15/30s".into(),
        format!("--alert-outside-hours={hours}"),
        format!("--alert-exec=cat >> {}", exec_out.display()),
        format!("--control-socket={}", socket.display()),
    ]);
    let mut daemon = lb_tests::Daemon::spawn(t.ns("lb").name(), &args).expect("daemon");
    daemon.wait_ready(Duration::from_secs(20)).expect("ready");

    t.ns("client").enter(|| {
        // Refused: attempts at the service the client may not use, over more than a second
        // (deny records for one source are written at most once a second, carrying the count
        // of the ones in between).
        for _ in 0..4 {
            let _ = TcpStream::connect_timeout(
                &"10.0.0.100:22".parse().unwrap(),
                Duration::from_millis(600),
            );
        }
        // A burst of 20 new flows.
        for i in 0..20 {
            echo_exchange(Topology::vip(), &[i as u8; 8], Duration::from_secs(2)).unwrap();
        }
    });
    // A refused control request.
    let lbctl = lb_tests::bin("lbctl").unwrap();
    assert!(
        Command::new("chgrp")
            .arg("65534")
            .arg(&socket)
            .status()
            .unwrap()
            .success()
    );
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&lbctl)
        .arg("--socket")
        .arg(&socket)
        .args(["backend", "drain", "web", &a1.to_string()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    std::thread::sleep(Duration::from_millis(500));
    daemon.stop(Duration::from_secs(10)).unwrap();

    let log = read_audit(&dir.path().join("audit")).unwrap();
    let alerts = of_kind(&log, "alert");
    let rules: Vec<&str> = alerts.iter().map(|a| a["rule"].as_str().unwrap()).collect();
    for rule in ["denied", "burst", "outside_hours", "control_denied"] {
        assert_eq!(
            rules.iter().filter(|r| **r == rule).count(),
            1,
            "one {rule} alert in {rules:?}"
        );
    }
    let denied = alerts.iter().find(|a| a["rule"] == "denied").unwrap();
    assert_eq!(denied["source"], "10.0.1.2");
    let exec = std::fs::read_to_string(&exec_out).unwrap_or_default();
    let from_exec: Vec<serde_json::Value> = exec
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        from_exec.len(),
        4,
        "--alert-exec ran once per alert: {exec}"
    );
    assert!(from_exec.iter().all(|a| a["kind"] == "alert"));
}

/// `--alert-block`: a source that trips `--alert-denied` is refused on every service for the
/// block's length (the alert says so, refusals name the block), then let in again.
#[test]
fn an_alerting_source_is_blocked_for_a_while() {
    if !require_root("an_alerting_source_is_blocked_for_a_while") {
        return;
    }
    let t = Topology::balancer("block").expect("topology");
    let dir = TempDir::new("block").unwrap();
    let [a1, _] = Topology::backends();
    let _servers = t.echo_backends().unwrap();
    let mut args = Topology::daemon_args(&dir.path().join("audit"));
    args.extend([
        "--service=adm=tcp:10.0.0.100:22".into(),
        format!("--backend=adm={a1}"),
        "--allow=adm=10.9.0.0/16".into(),
        "--alert-denied=3/30s".into(),
        "--alert-block=4s".into(),
        format!(
            "--control-socket={}",
            dir.path().join("control.sock").display()
        ),
    ]);
    let mut daemon = lb_tests::Daemon::spawn(t.ns("lb").name(), &args).expect("daemon");
    daemon.wait_ready(Duration::from_secs(20)).expect("ready");
    let web = |limit| echo_exchange(Topology::vip(), b"hello", limit).is_ok();
    let (blocked, lifted_after) = t.ns("client").enter(|| {
        assert!(web(Duration::from_secs(2)), "web works before");
        for _ in 0..4 {
            let _ = TcpStream::connect_timeout(
                &"10.0.0.100:22".parse().unwrap(),
                Duration::from_millis(600),
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        let blocked = !web(Duration::from_millis(800));
        let start = std::time::Instant::now();
        while !web(Duration::from_millis(500)) && start.elapsed() < Duration::from_secs(15) {}
        (blocked, start.elapsed())
    });
    daemon.stop(Duration::from_secs(10)).unwrap();
    assert!(blocked, "the alerting source was refused on web too");
    assert!(
        lifted_after < Duration::from_secs(15),
        "the block was lifted ({lifted_after:?})"
    );
    let log = read_audit(&dir.path().join("audit")).unwrap();
    let alert = of_kind(&log, "alert")
        .into_iter()
        .find(|a| a["rule"] == "denied")
        .cloned()
        .expect("a denied alert");
    assert_eq!(alert["action"], "blocked in the kernel for 4s");
    assert!(
        of_kind(&log, "conn_deny")
            .iter()
            .any(|d| d["service"] == "web" && d["rule"] == "block 10.0.1.2/32"),
        "refusals name the block"
    );
}
