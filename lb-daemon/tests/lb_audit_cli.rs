//! `lb-audit` as a user runs it: filters, formats, follow across rotation, verify, exit codes.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use lb_daemon::audit::{self, AuditWriter, ConnDeny, ConnOpen, DenyReason, Event, Options, Proto};

const BIN: &str = env!("CARGO_BIN_EXE_lb-audit");

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("lb-audit-cli-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(i: u64, client: &str, backend: &str) -> Event {
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    Event::ConnOpen(ConnOpen {
        flow_id: i,
        proto: if i.is_multiple_of(2) {
            Proto::Tcp
        } else {
            Proto::Udp
        },
        client: sa(client),
        vip: sa("10.0.0.100:80"),
        service: "web".into(),
        backend: sa(backend),
        snat: sa("10.0.2.1:20000"),
        reason: "maglev".into(),
        generation: 1,
    })
}

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn write_log(dir: &Path, opts: Options) {
    let mut w = AuditWriter::open_with(dir, opts).unwrap();
    let old = SystemTime::now() - Duration::from_secs(3 * 3600);
    w.append(old, open(1, "10.1.0.5:1000", "10.0.2.2:8080"))
        .unwrap();
    w.append(SystemTime::now(), open(2, "10.2.0.5:1000", "10.0.3.2:8080"))
        .unwrap();
    w.append(
        SystemTime::now(),
        Event::ConnDeny(ConnDeny {
            proto: Proto::Tcp,
            client: "10.1.2.7:999".parse().unwrap(),
            vip: "10.0.0.100:22".parse().unwrap(),
            service: "adm".into(),
            reason: DenyReason::Acl,
            rule: Some("deny 10.1.2.0/24".into()),
            suppressed: 4,
        }),
    )
    .unwrap();
    w.close().unwrap();
}

#[test]
fn filters_formats_and_exit_codes() {
    let d = Dir::new("filters");
    write_log(&d.0, Options::default());
    let dir = d.0.to_str().unwrap();
    let (code, out, _) = run(&["read", dir, "--format", "json", "--client", "10.1.0.0/16"]);
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        (lines[0]["kind"].as_str(), lines[1]["kind"].as_str()),
        (Some("conn_open"), Some("conn_deny"))
    );
    let (_, out, _) = run(&["read", dir, "--format", "json", "--since", "1h"]);
    assert_eq!(
        out.lines().filter(|l| l.contains("conn_open")).count(),
        1,
        "--since 1h drops the 3-hour-old record"
    );
    let (_, out, _) = run(&[
        "read",
        dir,
        "--format",
        "json",
        "--backend",
        "10.0.3.2",
        "--proto",
        "tcp",
    ]);
    assert_eq!(out.lines().count(), 1);
    let (_, out, _) = run(&["read", dir, "--format", "json", "--kind", "checkpoint"]);
    assert_eq!(out.lines().count(), 1, "close() writes a checkpoint");
    let (_, out, _) = run(&["read", dir, "--format", "csv", "--service", "adm"]);
    assert!(out.starts_with("seq,time,kind,"), "{out}");
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.contains("conn_deny") && l.contains("deny 10.1.2.0/24")),
        "{out}"
    );
    let (_, out, _) = run(&["stats", dir]);
    assert!(
        out.contains("acl (deny 10.1.2.0/24)") && out.contains("5"),
        "{out}"
    );
    let (code, out, _) = run(&["verify", dir]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("intact") && out.contains("proven through seq 3"),
        "{out}"
    );

    assert_eq!(
        run(&["read", dir, "--client", "not-a-cidr"]).0,
        2,
        "bad filter: usage"
    );
    assert_eq!(run(&["read", "/nonexistent/dir"]).0, 1, "unreadable log");
    assert_eq!(run(&["frobnicate"]).0, 2, "unknown command");
    // A flipped byte: read and verify both exit 1 and say where.
    let seg = audit::segment::segment_path(&d.0, 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[200] ^= 0x20;
    std::fs::write(&seg, bytes).unwrap();
    let (code, out, _) = run(&["verify", dir]);
    assert_eq!(code, 1);
    assert!(
        out.contains("DAMAGED") && out.contains("00000001.lbaudit at offset"),
        "{out}"
    );
    assert_eq!(run(&["read", dir]).0, 1);
}

#[test]
fn follow_prints_new_records_across_rotation() {
    let d = Dir::new("follow");
    let opts = Options {
        segment_bytes: 600,
        ..Options::default()
    };
    let mut w = AuditWriter::open_with(&d.0, opts).unwrap();
    w.append(SystemTime::now(), open(1, "10.1.0.1:1", "10.0.2.2:8080"))
        .unwrap();
    w.sync().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "follow",
            d.0.to_str().unwrap(),
            "--format",
            "json",
            "--kind",
            "conn_open",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // A follow that stops printing must not hang the test: kill it after a while.
    let pid = child.id();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(15));
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    // Enough records to rotate through several 600-byte segments, written while following.
    for i in 2..=20 {
        w.append(SystemTime::now(), open(i, "10.1.0.1:1", "10.0.2.2:8080"))
            .unwrap();
        w.sync().unwrap();
    }
    assert!(
        audit::segment::list(&d.0).unwrap().len() >= 3,
        "the log rotated"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ids = Vec::new();
    while ids.len() < 20 && Instant::now() < deadline {
        let Some(Ok(line)) = lines.next() else { break };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        ids.push(v["flow_id"].as_u64().unwrap());
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ids, (1..=20).collect::<Vec<_>>());
}
