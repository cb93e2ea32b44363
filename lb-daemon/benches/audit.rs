//! Audit log throughput: the writer (CRC32C framing, SHA-256 chain, checkpoints, interval
//! fsync), `read` with a filter, and `verify`; and the peak memory of `lb-audit read` and
//! `verify` on two log sizes, to show it does not grow with the log.
//!
//! `cargo bench -p lb-daemon --bench audit [-- --records N]`

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use lb_daemon::audit::{
    AuditReader, AuditWriter, CloseReason, ConnClose, Event, FsyncPolicy, Options, Proto,
    filter::Filter, verify,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .iter()
        .position(|a| a == "--records")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let base = std::env::temp_dir().join(format!("lb-audit-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (big, small) = (base.join("big"), base.join("small"));

    let write_s = write(&big, n);
    write(&small, n / 20);
    let size = std::fs::read_dir(&big)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum::<u64>();

    let filter = Filter {
        client: Some("10.1.0.0/24".parse().unwrap()),
        ..Filter::default()
    };
    let t = Instant::now();
    let mut matched = 0u64;
    for r in AuditReader::open(&big).unwrap() {
        if filter.matches(&r.unwrap()) {
            matched += 1;
        }
    }
    let read_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let report = verify::verify(&big, None).expect("intact");
    let verify_s = t.elapsed().as_secs_f64();
    assert_eq!(report.records, n + report.checkpoints);

    let rss = |cmd: &str, dir: &Path| peak_rss_kib(&[cmd, dir.to_str().unwrap()]);
    println!(
        "\naudit log throughput ({n} conn_close records, {:.0} MiB)\n",
        size as f64 / 1048576.0
    );
    println!("| operation | records/s | target |");
    println!("|---|---:|---|");
    println!(
        "| write (CRC32C, SHA-256 chain, checkpoints, fsync=interval 1s) | {:.0} | ≥ 1,000,000 |",
        n as f64 / write_s
    );
    println!(
        "| read with a client filter ({matched} matches), library | {:.0} | ≥ 5,000,000 |",
        report.records as f64 / read_s
    );
    println!(
        "| verify (checksums, seq, chain, checkpoints) | {:.0} | ≥ 2,000,000 |",
        report.records as f64 / verify_s
    );
    println!(
        "\npeak memory (max RSS) of lb-audit, small log ({} records) vs big log ({} records)\n",
        n / 20,
        n
    );
    println!("| command | small | big |");
    println!("|---|---:|---:|");
    for cmd in ["read", "verify"] {
        let extra: &[&str] = if cmd == "read" {
            &["--client", "10.1.0.0/24", "--format", "json"]
        } else {
            &[]
        };
        let s = peak_rss_kib(&[&[cmd, small.to_str().unwrap()], extra].concat());
        let b = peak_rss_kib(&[&[cmd, big.to_str().unwrap()], extra].concat());
        println!("| lb-audit {cmd} | {s} KiB | {b} KiB |");
    }
    let _ = rss;
    let _ = std::fs::remove_dir_all(&base);
}

fn write(dir: &Path, n: u64) -> f64 {
    let opts = Options {
        fsync: FsyncPolicy::Interval(Duration::from_secs(1)),
        ..Options::default()
    };
    let mut w = AuditWriter::open_with(dir, opts).unwrap();
    let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
    let t = Instant::now();
    let now = SystemTime::now();
    for i in 0..n {
        let client = SocketAddr::new(
            std::net::Ipv4Addr::from(0x0a01_0000u32 + (i % 65536) as u32).into(),
            1024 + (i % 60000) as u16,
        );
        w.append(
            now,
            Event::ConnClose(ConnClose {
                flow_id: i,
                proto: Proto::Tcp,
                client,
                vip: sa("10.0.0.100:80"),
                service: "web".into(),
                backend: sa("10.0.2.2:8080"),
                duration_ns: 1_234_567,
                bytes_to_backend: 1000 + i % 5000,
                bytes_to_client: 20000 + i % 70000,
                packets_to_backend: 10,
                packets_to_client: 25,
                close_reason: CloseReason::Fin,
            }),
        )
        .unwrap();
        // The daemon syncs once per ring-buffer batch: model batches of 256.
        if i % 256 == 255 {
            w.sync().unwrap();
        }
    }
    w.close().unwrap();
    t.elapsed().as_secs_f64()
}

/// Peak resident memory of an `lb-audit` run, from its rusage.
fn peak_rss_kib(args: &[&str]) -> i64 {
    let bin = std::env::var("LB_AUDIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let exe = std::env::current_exe().unwrap();
            exe.ancestors()
                .nth(3)
                .unwrap()
                .join("release")
                .join("lb-audit")
        });
    let status = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg(&bin)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output();
    match status {
        Ok(o) => String::from_utf8_lossy(&o.stderr)
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(-1),
        Err(_) => -1,
    }
}
