//! The control socket with real callers: an unprivileged user (run with setpriv) may read but
//! not change, and the refusal is recorded; root drains a backend: new flows avoid it, an
//! established connection to it keeps exchanging data, and when it closes `backend_drained`
//! is recorded; every accepted change is a `config_change` with actor, before and after.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use lb_tests::{
    EchoServer, TempDir, Topology, audit::of_kind, echo_exchange, read_audit, require_root,
};

/// Runs lbctl as `uid:gid` (0 = root) and returns (exit code, stdout, stderr).
fn lbctl(socket: &Path, uid: u32, args: &[&str]) -> (i32, String, String) {
    let bin = lb_tests::bin("lbctl").unwrap();
    let mut cmd = if uid == 0 {
        Command::new(&bin)
    } else {
        let mut c = Command::new("setpriv");
        c.args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ])
        .arg(&bin);
        c
    };
    let o = cmd
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("running lbctl");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn roles_are_enforced_and_a_drain_is_proven() {
    if !require_root("roles_are_enforced_and_a_drain_is_proven") {
        return;
    }
    let t = Topology::balancer("ctl").expect("topology");
    let dir = TempDir::new("ctl").unwrap();
    let socket = dir.path().join("control.sock");
    let [_, a2] = Topology::backends();
    let [_s1, s2] = t.echo_backends().unwrap();
    let audit = dir.path().join("audit");
    let mut args = Topology::daemon_args(&audit);
    args.extend([
        format!("--control-socket={}", socket.display()),
        "--role=viewer=user:nobody".into(),
    ]);
    let mut daemon = t.spawn_daemon(&args).expect("daemon");
    daemon.wait_ready(Duration::from_secs(20)).expect("ready");
    // The socket is 0660; give its group to nobody's group for the test (operators use a group
    // such as lb-admin).
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

    // A viewer reads...
    let (code, out, err) = lbctl(&socket, 65534, &["services"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("web") && out.contains("10.0.0.100:80"),
        "{out}"
    );
    // ...and may not change anything: refused (exit 3), and on record.
    let (code, _, err) = lbctl(
        &socket,
        65534,
        &["backend", "drain", "web", &a2.to_string()],
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("requires the operator role; nobody has the viewer role"),
        "{err}"
    );
    // Invalid requests are told apart from refusals.
    assert_eq!(
        lbctl(&socket, 0, &["backend", "drain", "web", "10.9.9.9:1"]).0,
        4
    );
    assert_eq!(lbctl(&socket, 0, &["backends", "nope"]).0, 4);

    // An established connection to backend2, kept open across the drain.
    let long = t.ns("client").enter(|| {
        (0..20)
            .find_map(|_| {
                let s =
                    TcpStream::connect_timeout(&Topology::vip(), Duration::from_secs(2)).ok()?;
                std::thread::sleep(Duration::from_millis(50));
                (s2.accepted() > 0 && s2.served().is_empty()).then_some(s)
            })
            .expect("a connection that landed on backend2")
    });
    let (code, out, err) = lbctl(&socket, 0, &["backend", "drain", "web", &a2.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    let before = s2.accepted();
    let ok = t.ns("client").enter(|| {
        (0..30)
            .filter(|i| {
                echo_exchange(Topology::vip(), &[*i as u8; 16], Duration::from_secs(2)).is_ok()
            })
            .count()
    });
    assert_eq!(ok, 30);
    assert_eq!(
        s2.accepted(),
        before,
        "no new flow reached the drained backend"
    );
    // The established one still works.
    let mut long = long;
    long.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    long.write_all(b"still here").unwrap();
    long.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    long.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"still here");
    drop(long);
    // Its close makes the drain complete (the daemon checks every 2 s).
    std::thread::sleep(Duration::from_secs(3));
    let (code, out, _) = lbctl(&socket, 0, &["--json", "backends", "web"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"drained\":true"), "{out}");
    assert_eq!(
        lbctl(&socket, 0, &["backend", "undrain", "web", &a2.to_string()]).0,
        0
    );
    assert_eq!(
        lbctl(
            &socket,
            0,
            &["backend", "weight", "web", &a2.to_string(), "5"]
        )
        .0,
        0
    );
    assert_eq!(
        lbctl(
            &socket,
            0,
            &["backend", "weight", "web", &a2.to_string(), "0"]
        )
        .0,
        4
    );
    let (code, out, _) = lbctl(&socket, 0, &["flows"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("PROTO"), "{out}");
    daemon.stop(Duration::from_secs(10)).unwrap();

    let log = read_audit(&audit).unwrap();
    let denied = of_kind(&log, "control_denied");
    assert_eq!(denied.len(), 1);
    assert_eq!(
        (
            denied[0]["actor"]["uid"].as_u64(),
            denied[0]["action"].as_str()
        ),
        (Some(65534), Some("backend.drain"))
    );
    assert!(
        denied[0]["actor"]["exe"]
            .as_str()
            .is_some_and(|e| e.ends_with("lbctl")),
        "{}",
        denied[0]
    );
    let changes = of_kind(&log, "config_change");
    let actions: Vec<&str> = changes
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["backend.drain", "backend.undrain", "backend.weight"]
    );
    assert_eq!(changes[0]["before"]["drained"], false);
    assert_eq!(changes[0]["after"]["drained"], true);
    assert_eq!(changes[2]["after"]["weight"], 5);
    assert_eq!(
        (
            changes[0]["generation_before"].as_u64(),
            changes[2]["generation_after"].as_u64()
        ),
        (Some(1), Some(4))
    );
    assert_eq!(changes[0]["actor"]["uid"], 0);
    let drained = of_kind(&log, "backend_drained");
    assert_eq!(drained.len(), 1, "the drain completed once");
    assert_eq!(drained[0]["backend"], a2.to_string());
    // Between the drain and the undrain records, no flow opened to the drained backend.
    let (drain_seq, undrain_seq) = (
        changes[0]["seq"].as_u64().unwrap(),
        changes[1]["seq"].as_u64().unwrap(),
    );
    let during: Vec<_> = of_kind(&log, "conn_open")
        .into_iter()
        .filter(|o| (drain_seq..undrain_seq).contains(&o["seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(during.len(), 30);
    assert!(during.iter().all(|o| o["backend"] != a2.to_string()));

    // The log alone says what the configuration was, now and at the drain.
    let backend2 = |cfg: &serde_json::Value| {
        cfg["services"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["addr"] == a2.to_string())
            .unwrap()
            .clone()
    };
    let now = config_at(&audit, None);
    assert_eq!(
        (
            backend2(&now)["weight"].as_u64(),
            backend2(&now)["drained"].as_bool()
        ),
        (Some(5), Some(false))
    );
    assert_eq!(now["config_generation"], 4);
    let at_drain = config_at(&audit, changes[0]["time"].as_str());
    assert_eq!(
        (
            backend2(&at_drain)["weight"].as_u64(),
            backend2(&at_drain)["drained"].as_bool()
        ),
        (Some(2), Some(true))
    );
    let at_start = config_at(&audit, log[0]["time"].as_str());
    assert_eq!(at_start["config_generation"], 1);
    assert!(
        backend2(&at_start)["drained"].is_null(),
        "nothing drained at start"
    );
}

/// (address, weight) of a list of backends, sorted; the address is in field `addr_field`.
fn addr_weights(list: &serde_json::Value, addr_field: &str) -> Vec<(String, u64)> {
    let mut b: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b[addr_field].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    b.sort();
    b
}

/// `lb-audit config --at` rebuilds, from the log alone, what the daemon had at each moment.
fn config_at(audit: &Path, at: Option<&str>) -> serde_json::Value {
    let mut cmd = Command::new(lb_tests::bin("lb-audit").unwrap());
    cmd.arg("config").arg(audit);
    if let Some(t) = at {
        cmd.args(["--at", t]);
    }
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Services, backends and access rules change at run time through `lbctl`: traffic follows
/// each change, an operator may not make them, bad ones are refused as invalid, and the
/// configuration rebuilt from the log matches what the daemon reports.
#[test]
fn run_time_changes_take_effect_and_the_log_rebuilds_them() {
    if !require_root("run_time_changes_take_effect_and_the_log_rebuilds_them") {
        return;
    }
    let t = Topology::balancer("chg").expect("topology");
    let dir = TempDir::new("chg").unwrap();
    let socket = dir.path().join("control.sock");
    let [a1, a2] = Topology::backends();
    let [s1, s2] = t.echo_backends().unwrap();
    let other = std::net::SocketAddr::new(a1.ip(), 8081);
    let s3 = EchoServer::start(t.ns("backend1").name(), other).unwrap();
    let audit = dir.path().join("audit");
    let mut args = Topology::daemon_args(&audit);
    args.extend([
        format!("--control-socket={}", socket.display()),
        "--role=operator=user:nobody".into(),
    ]);
    let mut daemon = t.spawn_daemon(&args).expect("daemon");
    daemon.wait_ready(Duration::from_secs(20)).expect("ready");
    Command::new("chgrp")
        .arg("65534")
        .arg(&socket)
        .status()
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ok = |args: &[&str]| {
        let (code, out, err) = lbctl(&socket, 0, args);
        assert_eq!(code, 0, "lbctl {args:?}: {out}{err}");
    };
    let exchanges = |target: std::net::SocketAddr, n: usize| {
        t.ns("client").enter(|| {
            (0..n)
                .filter(|i| {
                    echo_exchange(target, &[*i as u8; 32], Duration::from_secs(2))
                        .is_ok_and(|e| e.received.len() == 32)
                })
                .count()
        })
    };

    // Without backend2, every new flow goes to backend1.
    ok(&["backend", "remove", "web", &a2.to_string()]);
    let before = (s1.accepted(), s2.accepted());
    assert_eq!(exchanges(Topology::vip(), 10), 10);
    assert_eq!(
        (s1.accepted() - before.0, s2.accepted() - before.1),
        (10, 0)
    );
    ok(&["backend", "add", "web", &a2.to_string(), "--weight", "3"]);
    let before = s2.accepted();
    assert_eq!(exchanges(Topology::vip(), 20), 20);
    assert!(s2.accepted() > before, "backend2 is back in rotation");

    // A service added at run time carries traffic; removed, it stops taking new flows.
    let vip2 = std::net::SocketAddr::new(Topology::vip().ip(), 8081);
    ok(&[
        "service",
        "add",
        "api",
        &format!("tcp:{vip2}"),
        "--rate-limit",
        "1000/s",
    ]);
    ok(&["backend", "add", "api", &other.to_string()]);
    assert_eq!(exchanges(vip2, 5), 5);
    assert_eq!(s3.accepted(), 5);

    // An access rule added at run time refuses the client; removed, it lets it in again.
    ok(&["acl", "add", "web", "deny", "10.0.1.0/24"]);
    assert_eq!(exchanges(Topology::vip(), 1), 0);
    ok(&["acl", "remove", "web", "deny", "10.0.1.0/24"]);
    assert_eq!(exchanges(Topology::vip(), 3), 3);
    ok(&["acl", "add", "api", "allow", "10.0.1.2/32"]);
    ok(&["backend", "disable", "api", &other.to_string()]);
    assert_eq!(exchanges(vip2, 1), 0, "no backend in rotation");
    ok(&["backend", "enable", "api", &other.to_string()]);
    assert_eq!(exchanges(vip2, 2), 2);

    // An operator may disable but not add; bad requests are invalid, not refused.
    let (code, _, err) = lbctl(&socket, 65534, &["backend", "add", "web", "10.0.2.2:9999"]);
    assert_eq!(code, 3, "{err}");
    assert_eq!(
        lbctl(
            &socket,
            65534,
            &["backend", "disable", "web", &a1.to_string()]
        )
        .0,
        0
    );
    assert_eq!(
        lbctl(
            &socket,
            65534,
            &["backend", "enable", "web", &a1.to_string()]
        )
        .0,
        0
    );
    for bad in [
        &["backend", "add", "web", &a1.to_string()][..],
        &["backend", "add", "web", "[fd00::1]:80"],
        &["backend", "add", "nope", "10.0.2.2:80"],
        &["service", "add", "web", "tcp:10.0.0.101:80"],
        &["service", "add", "dup", &format!("tcp:{}", Topology::vip())],
        &["service", "add", "bad", "sctp:10.0.0.101:80"],
        &["acl", "add", "web", "deny", "10.0.1.1/24"],
        &["acl", "remove", "web", "allow", "10.0.0.0/8"],
        &["backend", "remove", "web", "10.0.9.9:80"],
    ] {
        let (code, out, err) = lbctl(&socket, 0, bad);
        assert_eq!(code, 4, "lbctl {bad:?}: {out}{err}");
    }

    // What the daemon reports now...
    let (code, out, _) = lbctl(&socket, 0, &["--json", "services"]);
    assert_eq!(code, 0);
    let live: serde_json::Value = serde_json::from_str(&out).unwrap();
    let backends_of = |svc: &str| -> Vec<(String, u64)> {
        let (code, out, _) = lbctl(&socket, 0, &["--json", "backends", svc]);
        assert_eq!(code, 0);
        addr_weights(&serde_json::from_str(&out).unwrap(), "backend")
    };
    let live_backends = [backends_of("web"), backends_of("api")];
    ok(&["service", "remove", "api"]);
    assert_eq!(exchanges(vip2, 1), 0, "a removed service takes no new flow");
    daemon.stop(Duration::from_secs(10)).unwrap();

    // ...is what the log alone rebuilds, at that moment and after the removal.
    let log = read_audit(&audit).unwrap();
    let changes = of_kind(&log, "config_change");
    let after_removal = changes.last().unwrap()["time"]
        .as_str()
        .unwrap()
        .to_string();
    let cfg_then = config_at(&audit, Some(&after_removal));
    let services_then = cfg_then["services"].as_array().unwrap();
    // `--at` includes the change made at that instant: rebuild without the last one too.
    let rebuilt = |cfg: &serde_json::Value, name: &str| -> Vec<(String, u64)> {
        let s = cfg["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {cfg}"));
        addr_weights(&s["backends"], "addr")
    };
    assert!(
        services_then.iter().all(|s| s["name"] != "api"),
        "{cfg_then}"
    );
    let second_last = changes[changes.len() - 2]["time"].as_str().unwrap();
    let cfg = config_at(&audit, Some(second_last));
    assert_eq!(
        [rebuilt(&cfg, "web"), rebuilt(&cfg, "api")],
        live_backends,
        "{cfg}"
    );
    let api = cfg["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "api")
        .unwrap();
    assert_eq!(api["vip"], vip2.to_string());
    assert_eq!(api["rate_limit"], 1000);
    assert_eq!(api["allow"], serde_json::json!(["10.0.1.2/32"]));
    let web = &cfg["services"][0];
    assert_eq!(web["deny"], serde_json::json!([]));
    let live_names: Vec<&str> = live
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(live_names, ["web", "api"]);
    assert_eq!(
        cfg["config_generation"].as_u64(),
        Some(changes.len() as u64),
        "one generation per change"
    );
    // The refusal of the operator's `backend add` is on record, with what was attempted.
    let denied = of_kind(&log, "control_denied");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["action"], "backend.add");
    assert_eq!(denied[0]["target"], "web 10.0.2.2:9999");
    // The client refused by the run-time rule was recorded with that rule.
    let denies = of_kind(&log, "conn_deny");
    assert!(
        denies.iter().any(|d| d["service"] == "web"
            && d["reason"] == "acl"
            && d["rule"] == "deny 10.0.1.0/24"),
        "{denies:?}"
    );
}
