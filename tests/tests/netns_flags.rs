//! Bad flags make `lb-daemon` exit non-zero with a message that names the flag and the value.
//!
//! As root every case runs inside a namespace of its own holding a veth pair `d0`/`d1` (d0 on
//! the backends' subnet, forwarding on: only the flag under test is wrong), so even a daemon
//! that wrongly accepted the flags could only touch that namespace; as another user the flag
//! cases still run (they fail before anything needs privileges) and the missing-interface
//! case is skipped.

use std::{process::Command, time::Duration};

use lb_tests::{Netns, TempDir, bin, daemon::run_bounded, is_root, require_root};

/// Runs `lb-daemon` with `args` (bounded to 20 s); returns (exit success, stderr).
fn daemon_with(args: &[&str]) -> (bool, String) {
    let exe = bin("lb-daemon").unwrap();
    let log = TempDir::new("flags").unwrap();
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    argv.extend([
        "--audit-dir".to_owned(),
        log.path().join("audit").display().to_string(),
    ]);
    let ns = is_root().then(|| {
        let ns = Netns::new("flags");
        ns.run(
            "ip link add d0 type veth peer name d1 && ip link set d0 up && ip link set d1 up && \
             ip addr add 10.0.2.1/24 dev d0 && echo 1 > /proc/sys/net/ipv4/ip_forward",
        );
        ns
    });
    let mut cmd = match &ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name()]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let out = run_bounded(cmd.args(&argv), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("lb-daemon {}: {e:#}", argv.join(" ")));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_refused(args: &[&str], must_name: &[&str]) {
    let (ok, stderr) = daemon_with(args);
    assert!(
        !ok,
        "lb-daemon {} should exit non-zero; stderr:\n{stderr}",
        args.join(" ")
    );
    for word in must_name {
        assert!(
            stderr.contains(word),
            "the message should name `{word}`; lb-daemon {} said:\n{stderr}",
            args.join(" ")
        );
    }
}

#[test]
fn backend_of_an_unknown_service_is_refused() {
    assert_refused(
        &[
            "--iface",
            "d0",
            "--service",
            "web=tcp:10.0.0.100:80",
            "--backend",
            "nosuch=10.0.2.2:8080",
        ],
        &["--backend", "nosuch"],
    );
}

#[test]
fn malformed_addresses_are_refused() {
    assert_refused(
        &[
            "--iface",
            "d0",
            "--service",
            "web=tcp:10.0.0.300:80",
            "--backend",
            "web=10.0.2.2:8080",
        ],
        &["--service", "10.0.0.300"],
    );
    assert_refused(
        &[
            "--iface",
            "d0",
            "--service",
            "web=tcp:10.0.0.100:80",
            "--backend",
            "web=10.0.2.2",
        ],
        &["--backend", "10.0.2.2"],
    );
    assert_refused(
        &[
            "--iface",
            "d0",
            "--service",
            "web=tcp:10.0.0.100:80",
            "--backend",
            "web=10.0.2.2:8080",
            "--snat-ip",
            "10.0.2",
        ],
        &["--snat-ip", "10.0.2"],
    );
}

#[test]
fn missing_interface_is_refused() {
    if !require_root("missing_interface_is_refused") {
        return;
    }
    assert_refused(
        &[
            "--iface",
            "nosuch0",
            "--service",
            "web=tcp:10.0.0.100:80",
            "--backend",
            "web=10.0.2.2:8080",
        ],
        &["--iface", "nosuch0"],
    );
}
