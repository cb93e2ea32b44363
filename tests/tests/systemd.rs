//! The systemd unit passes `systemd-analyze verify`, and the daemon speaks the readiness
//! protocol (`READY=1`, `STATUS=`, `STOPPING=1`) to a notify socket the test owns.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use lb_tests::{TempDir, Topology, require_root};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn the_unit_file_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED the_unit_file_verifies: systemd-analyze is not installed");
        return;
    }
    let dir = TempDir::new("unit").unwrap();
    let unit = std::fs::read_to_string(workspace().join("dist/systemd/lb-daemon.service")).unwrap();
    assert!(
        unit.contains("Type=notify")
            && unit.contains("EnvironmentFile=")
            && unit.contains("NoNewPrivileges=yes")
    );
    // Verify against the built binary (the packaged path does not exist here).
    let exe = lb_tests::bin("lb-daemon").unwrap();
    let path = dir.path().join("lb-daemon.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/lb-daemon", &exe.display().to_string()),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("lb-daemon.service:"),
        "no complaint about the unit: {text}"
    );
}

#[test]
fn readiness_and_stopping_are_notified() {
    if !require_root("readiness_and_stopping_are_notified") {
        return;
    }
    let t = Topology::balancer("notify").expect("topology");
    let dir = TempDir::new("notify").unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut args = Topology::daemon_args(&dir.path().join("audit"));
    args.push(format!(
        "--control-socket={}",
        dir.path().join("control.sock").display()
    ));
    let mut child = Command::new("ip")
        .args(["netns", "exec", t.ns("lb").name()])
        .arg(lb_tests::bin("lb-daemon").unwrap())
        .args(&args)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .expect("a notification before the timeout");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("a stopping notification");
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = child.wait().unwrap();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=forwarding 1 service(s)")),
        "{ready}"
    );
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert!(status.success());
}
