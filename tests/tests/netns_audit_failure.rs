//! A full disk under the audit log, on a small tmpfs: `fail-closed` refuses new flows until the
//! log can be written again, `fail-open` keeps forwarding; either way a `loss` record states
//! what was not written, and the log still verifies.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use lb_tests::{TempDir, Topology, audit::of_kind, echo_exchange, read_audit, require_root};

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(ok.success(), "mounting a tmpfs at {}", at.display());
        Tmpfs(at.to_path_buf())
    }

    /// Fills the file system; returns the filler file.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = [0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs the scenario; returns (connections that worked before, during and after the outage)
/// and the decoded log.
fn scenario(tag: &str, policy: &str) -> ((usize, usize, usize), Vec<serde_json::Value>, String) {
    let t = Topology::balancer(tag).expect("topology");
    let dir = TempDir::new(tag).unwrap();
    let fs = Tmpfs::mount(&dir.path().join("audit"), "256k");
    let _servers = t.echo_backends().unwrap();
    let mut args = Topology::daemon_args(&fs.0);
    args.extend(["--audit-on-failure".into(), policy.into()]);
    let mut daemon = t.spawn_daemon(&args).expect("daemon");
    daemon.wait_ready(Duration::from_secs(20)).expect("ready");
    let client = t.ns("client");
    let burst = |n: usize, limit: Duration| {
        client.enter(|| {
            (0..n)
                .filter(|i| {
                    let payload = vec![*i as u8; 100];
                    echo_exchange(Topology::vip(), &payload, limit)
                        .map(|e| e.received == payload)
                        .unwrap_or(false)
                })
                .count()
        })
    };
    let before = burst(5, Duration::from_millis(700));
    let filler = fs.fill();
    // Records still fit in the log file's last allocated page for a while; enough flows fill
    // it, and the first write past it fails. From then on, new flows follow the policy.
    burst(80, Duration::from_millis(200));
    std::thread::sleep(Duration::from_millis(300));
    let during = burst(10, Duration::from_millis(700));
    std::fs::remove_file(&filler).unwrap();
    // The daemon retries on its next sweep (every 2 s).
    std::thread::sleep(Duration::from_secs(3));
    let after = burst(5, Duration::from_millis(700));
    daemon.stop(Duration::from_secs(10)).expect("stop");
    let log = read_audit(&fs.0).expect("the log decodes");
    let verify = Command::new(lb_tests::bin("lb-audit").unwrap())
        .arg("verify")
        .arg(&fs.0)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "lb-audit verify: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    (
        (before, during, after),
        log,
        String::from_utf8_lossy(&verify.stdout).into_owned(),
    )
}

fn loss_count(log: &[serde_json::Value]) -> u64 {
    of_kind(log, "loss")
        .iter()
        .filter(|r| r["source"] == "write_failure")
        .map(|r| r["count"].as_u64().unwrap())
        .sum()
}

#[test]
fn fail_closed_refuses_new_flows_while_the_log_cannot_be_written() {
    if !require_root("fail_closed_refuses_new_flows_while_the_log_cannot_be_written") {
        return;
    }
    let ((before, during, after), log, verify) = scenario("fclosed", "fail-closed");
    eprintln!(
        "fail-closed: {before} before, {during} during, {after} after the outage; verify: {verify}"
    );
    assert_eq!((before, during, after), (5, 0, 5));
    assert!(
        loss_count(&log) >= 1,
        "a loss record states the records that were not written"
    );
    assert!(
        verify.contains("write_failure"),
        "verify's summary names the loss: {verify}"
    );
}

#[test]
fn fail_open_keeps_forwarding_and_accounts_for_the_gap() {
    if !require_root("fail_open_keeps_forwarding_and_accounts_for_the_gap") {
        return;
    }
    let ((before, during, after), log, verify) = scenario("fopen", "fail-open");
    eprintln!(
        "fail-open: {before} before, {during} during, {after} after the outage; verify: {verify}"
    );
    assert_eq!((before, during, after), (5, 10, 5));
    // The outage's flows are missing from the log, and the loss record counts at least the
    // opens and closes of the 10 flows after the failure.
    assert!(
        loss_count(&log) >= 20,
        "loss {} for at least 10 flows",
        loss_count(&log)
    );
    let opens = of_kind(&log, "conn_open").len() as u64;
    let closes = of_kind(&log, "conn_close").len() as u64;
    assert_eq!(
        opens + closes + loss_count(&log),
        2 * (5 + 80 + 10 + 5),
        "every record is either in the log or counted as lost"
    );
}
