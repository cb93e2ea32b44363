//! kill -9 while the daemon writes: the log stays verifiable, a restarted daemon continues it
//! (cutting off a torn record with a `recovery` record), and nothing acknowledged is lost.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lb_tests::{TempDir, Topology, audit::of_kind, echo_exchange, read_audit, require_root};

#[test]
fn kill_9_mid_traffic_leaves_a_verifiable_log_that_a_restart_continues() {
    if !require_root("kill_9_mid_traffic_leaves_a_verifiable_log_that_a_restart_continues") {
        return;
    }
    let t = Topology::balancer("crash").expect("topology");
    let dir = TempDir::new("crash").unwrap();
    let _servers = t.echo_backends().unwrap();
    let mut args = Topology::daemon_args(dir.path());
    args.extend([
        "--audit-fsync".into(),
        "always".into(),
        "--audit-checkpoint-records".into(),
        "20".into(),
    ]);
    let mut daemon = t.spawn_daemon(&args).expect("daemon");
    daemon.wait_ready(Duration::from_secs(20)).expect("ready");

    // Traffic until told to stop, bounded.
    let stop = Arc::new(AtomicBool::new(false));
    let client_ns = t.ns("client").name().to_string();
    let stop2 = stop.clone();
    let traffic = lb_tests::spawn_in_netns(&client_ns, move || {
        let mut n = 0;
        while !stop2.load(Ordering::Relaxed) && n < 2000 {
            let _ = echo_exchange(Topology::vip(), &[7u8; 64], Duration::from_millis(300));
            n += 1;
        }
        Ok(n)
    });
    std::thread::sleep(Duration::from_millis(700));
    let pid = daemon.pid().expect("daemon pid") as i32;
    // SAFETY: kill(2) on the daemon's own pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.join().unwrap().unwrap();
    let _ = daemon.stop(Duration::from_secs(5));

    let lb_audit = lb_tests::bin("lb-audit").unwrap();
    let verify = |what: &str| {
        let out = Command::new(&lb_audit)
            .arg("verify")
            .arg(dir.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{what}: {text}");
        text
    };
    let after_crash = verify("after kill -9");
    let before = read_audit(dir.path()).unwrap();
    assert!(
        of_kind(&before, "conn_open").len() > 5,
        "traffic was recorded before the crash ({sent} attempts)"
    );

    // A restart continues the same log.
    let mut daemon = t.spawn_daemon(&args).expect("daemon again");
    daemon
        .wait_ready(Duration::from_secs(20))
        .expect("ready again");
    let ok = t.ns("client").enter(|| {
        (0..5)
            .filter(|_| echo_exchange(Topology::vip(), b"after", Duration::from_secs(3)).is_ok())
            .count()
    });
    assert_eq!(ok, 5);
    daemon.stop(Duration::from_secs(10)).unwrap();
    let after_restart = verify("after the restart");
    let log = read_audit(dir.path()).unwrap();
    eprintln!("after kill -9: {after_crash}\nafter restart: {after_restart}");
    assert_eq!(of_kind(&log, "daemon_start").len(), 2);
    // Everything that was on disk at the crash is still there, in place.
    assert!(log.len() > before.len());
    for (a, b) in before.iter().zip(&log) {
        assert_eq!(a, b, "records written before the crash are unchanged");
    }
}
