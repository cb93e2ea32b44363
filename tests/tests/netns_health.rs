//! Health checks with real backends: a backend whose server dies leaves the rotation within
//! fall × interval and comes back after rise × interval; with every backend down new flows are
//! refused with `no_backend`; each transition is a `health_change` record.

use std::time::{Duration, Instant};

use lb_tests::{
    EchoServer, TempDir, Topology, audit::of_kind, echo_exchange, read_audit, require_root,
};

const INTERVAL_MS: u64 = 300;
const RISE: u64 = 2;
const FALL: u64 = 2;

#[test]
fn a_dead_backend_leaves_rotation_and_returns() {
    if !require_root("a_dead_backend_leaves_rotation_and_returns") {
        return;
    }
    let t = Topology::balancer("health").expect("topology");
    let dir = TempDir::new("health").unwrap();
    let [a1, a2] = Topology::backends();
    let (b1, b2) = (
        t.ns("backend1").name().to_string(),
        t.ns("backend2").name().to_string(),
    );
    let s1 = EchoServer::start(&b1, a1).unwrap();
    let s2 = EchoServer::start(&b2, a2).unwrap();
    let mut args = Topology::daemon_args(dir.path());
    args.extend([
        "--health".into(),
        format!("web=tcp,interval={INTERVAL_MS}ms,timeout=200ms,rise={RISE},fall={FALL}"),
    ]);
    let mut daemon = t.spawn_daemon(&args).expect("daemon");
    daemon.wait_ready(Duration::from_secs(20)).expect("ready");
    let client = t.ns("client");
    let exchanges = |n: usize| {
        client.enter(|| {
            (0..n)
                .filter(|i| {
                    echo_exchange(Topology::vip(), &[*i as u8; 32], Duration::from_millis(800))
                        .is_ok()
                })
                .count()
        })
    };
    assert_eq!(exchanges(20), 20);
    let served_by_2 = s2.stop().len();
    assert!(served_by_2 > 0, "both backends served at first");

    // backend2's server is gone: within fall × interval (+ one probe timeout) it is out.
    let died = Instant::now();
    let limit = Duration::from_millis(FALL * INTERVAL_MS + 200 + 300);
    let out_after = loop {
        // A connection that lands on backend2 now is refused by its kernel.
        if exchanges(12) == 12 {
            break died.elapsed();
        }
        assert!(
            died.elapsed() < limit + Duration::from_secs(2),
            "backend2 still in rotation after {:?}",
            died.elapsed()
        );
    };
    eprintln!(
        "backend2 left the rotation {out_after:?} after its server died (fall × interval = {} ms)",
        FALL * INTERVAL_MS
    );
    assert!(
        out_after <= limit + Duration::from_millis(500),
        "left after {out_after:?}"
    );

    // Back: a new server, and within rise × interval new flows reach it again.
    let s2 = EchoServer::start(&b2, a2).unwrap();
    std::thread::sleep(Duration::from_millis(RISE * INTERVAL_MS + 400));
    assert_eq!(exchanges(30), 30);
    assert!(s2.accepted() > 0, "backend2 is back in rotation");

    // Every backend down: new flows are refused, and said so.
    drop(s2);
    drop(s1);
    std::thread::sleep(Duration::from_millis(FALL * INTERVAL_MS + 600));
    assert_eq!(exchanges(3), 0);
    daemon.stop(Duration::from_secs(10)).unwrap();

    let log = read_audit(dir.path()).unwrap();
    let changes: Vec<(String, String, String)> = of_kind(&log, "health_change")
        .iter()
        .map(|r| {
            (
                r["backend"].as_str().unwrap().to_string(),
                r["from"].as_str().unwrap().to_string(),
                r["to"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let b2 = a2.to_string();
    assert!(
        changes.starts_with(&[
            (b2.clone(), "up".into(), "down".into()),
            (b2.clone(), "down".into(), "up".into())
        ]),
        "{changes:?}"
    );
    assert!(
        changes.iter().filter(|c| c.2 == "down").count() >= 3,
        "{changes:?}"
    );
    let down = of_kind(&log, "health_change")
        .into_iter()
        .find(|r| r["to"] == "down")
        .unwrap();
    assert!(
        down["consecutive_failures"].as_u64().unwrap() >= FALL && down["last_error"].is_string(),
        "{down}"
    );
    let no_backend = of_kind(&log, "conn_deny")
        .into_iter()
        .filter(|r| r["reason"] == "no_backend")
        .count();
    assert!(
        no_backend >= 1,
        "refusals with every backend down are recorded"
    );
    // Each table change is a new Maglev generation in the opens that follow.
    let generations: Vec<u64> = of_kind(&log, "conn_open")
        .iter()
        .map(|r| r["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(generations.first(), Some(&1));
    assert!(generations.last().unwrap() >= &3, "{generations:?}");
}
