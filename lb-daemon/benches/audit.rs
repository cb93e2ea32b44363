//! Audit log benchmarks.
//!
//! Throughput: the writer (CRC32C framing, SHA-256 chain, checkpoints, interval fsync), `read`
//! with a filter (the scanning path, and for comparison every record decoded before the
//! filter looks at it), and `verify`; and the peak memory of `lb-audit read` and `verify` on
//! two log sizes, to show it does not grow with the log.
//!
//! Daemon pattern: the writer as the daemon drives it under a light load of connections —
//! records arriving one by one at a fixed rate, each arrival a wake-up — with
//! `--audit-fsync always`, once syncing at every wake-up, with group commit as the daemon did it
//! before (a write at every wake-up, the fdatasync at most the commit window later) and as it
//! does it now (the first record's wake-up opens the window, the records stay in the ring
//! buffer until it ends and are then written and synced together), and without fdatasync as
//! the floor. It reports the writer's CPU per record (getrusage of the
//! thread: user + system), fdatasyncs, and the longest time a record waited to be durable.
//!
//! `cargo bench -p lb-daemon --bench audit [-- --records N] [--rate RECORDS_PER_S]
//! [--secs S] [--only throughput|daemon]`

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use lb_daemon::audit::{
    AuditReader, AuditWriter, CloseReason, ConnClose, ConnOpen, Event, FsyncPolicy, Options, Proto,
    filter::Filter, verify,
};

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = arg(&args, "--records").unwrap_or(2_000_000);
    let rate: f64 = arg(&args, "--rate").unwrap_or(1400.0);
    let secs: f64 = arg(&args, "--secs").unwrap_or(3.0);
    let only: Option<String> = arg(&args, "--only");
    let base = std::env::temp_dir().join(format!("lb-audit-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    if only.as_deref() != Some("daemon") {
        throughput(&base, n);
    }
    if only.as_deref() != Some("throughput") {
        daemon_pattern(&base, rate, secs);
    }
    let _ = std::fs::remove_dir_all(&base);
}

/// CPU time (user + system) of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Wall and CPU seconds of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (t, c) = (Instant::now(), thread_cpu());
    let out = f();
    (
        out,
        t.elapsed().as_secs_f64(),
        (thread_cpu() - c).as_secs_f64(),
    )
}

fn throughput(base: &Path, n: u64) {
    let (big, small) = (base.join("big"), base.join("small"));
    let ((), write_s, write_cpu) = timed(|| write(&big, n));
    write(&small, n / 20);
    let size = std::fs::read_dir(&big)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum::<u64>();

    let filter = Filter {
        client: Some("10.1.0.0/24".parse().unwrap()),
        ..Filter::default()
    };
    let (matched, read_s, read_cpu) = timed(|| {
        let mut matched = 0u64;
        for r in AuditReader::open(&big).unwrap().matching(&filter) {
            r.unwrap();
            matched += 1;
        }
        matched
    });
    // The same filter on records decoded in full first: what `read` did before it scanned.
    let (decoded_matched, decoded_s, decoded_cpu) = timed(|| {
        let mut matched = 0u64;
        for r in AuditReader::open(&big).unwrap() {
            if filter.matches(&r.unwrap()) {
                matched += 1;
            }
        }
        matched
    });
    assert_eq!(matched, decoded_matched);
    let (report, verify_s, verify_cpu) = timed(|| verify::verify(&big, None).expect("intact"));
    assert_eq!(report.records, n + report.checkpoints);
    let all = report.records as f64;

    println!(
        "\naudit log throughput ({n} conn_close records, {:.0} MiB); records/s of wall time, \
         and of the thread's CPU time (what a core would do on a machine not shared)\n",
        size as f64 / 1048576.0
    );
    println!("| operation | records/s (wall) | records/s (CPU) | target |");
    println!("|---|---:|---:|---|");
    let row = |what: &str, records: f64, wall: f64, cpu: f64, target: &str| {
        println!(
            "| {what} | {:.0} | {:.0} | {target} |",
            records / wall,
            records / cpu.max(1e-9)
        )
    };
    row(
        "write (CRC32C, SHA-256 chain, checkpoints, fsync=interval 1s)",
        n as f64,
        write_s,
        write_cpu,
        "≥ 1,000,000",
    );
    row(
        &format!("read with a client filter ({matched} matches), library"),
        all,
        read_s,
        read_cpu,
        "≥ 5,000,000",
    );
    row(
        "… the same with every record decoded before filtering (comparison)",
        all,
        decoded_s,
        decoded_cpu,
        "",
    );
    row(
        "verify (checksums, seq, chain, checkpoints)",
        all,
        verify_s,
        verify_cpu,
        "≥ 2,000,000",
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
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn client(i: u64) -> SocketAddr {
    SocketAddr::new(
        Ipv4Addr::from(0x0a01_0000u32 + (i % 65536) as u32).into(),
        1024 + (i % 60000) as u16,
    )
}

fn conn_close(i: u64, vip: SocketAddr, backend: SocketAddr) -> Event {
    Event::ConnClose(ConnClose {
        flow_id: i,
        proto: Proto::Tcp,
        client: client(i),
        vip,
        service: "web".into(),
        backend,
        duration_ns: 1_234_567,
        bytes_to_backend: 1000 + i % 5000,
        bytes_to_client: 20000 + i % 70000,
        packets_to_backend: 10,
        packets_to_client: 25,
        close_reason: CloseReason::Fin,
    })
}

fn write(dir: &Path, n: u64) {
    let opts = Options {
        fsync: FsyncPolicy::Interval(Duration::from_secs(1)),
        ..Options::default()
    };
    let mut w = AuditWriter::open_with(dir, opts).unwrap();
    let (vip, backend) = (sa("10.0.0.100:80"), sa("10.0.2.2:8080"));
    let now = SystemTime::now();
    for i in 0..n {
        w.append(now, conn_close(i, vip, backend)).unwrap();
        // The daemon syncs once per ring-buffer batch: model batches of 256.
        if i % 256 == 255 {
            w.sync().unwrap();
        }
    }
    w.close().unwrap();
}

#[derive(Clone, Copy, PartialEq)]
enum Commit {
    /// Drain, write and fdatasync at every wake-up (what `always` did before group commit).
    EveryWakeup,
    /// The daemon's group commit: the first record's wake-up opens the window and leaves the
    /// ring buffer alone (the kernel signals no more until the consumer catches up); when the
    /// window is over, drain, write and fdatasync.
    Group(Duration),
    /// Group commit as the daemon did it before: drain and write at a wake-up, leave the ring
    /// buffer alone until the window is over (the kernel wakes the consumer once more, for the
    /// first record after the drain), then drain, write and fdatasync.
    WriteThenGroup(Duration),
    /// Drain and write at every wake-up, no fdatasync.
    None,
}

/// The daemon's pattern at `rate` records/s for `secs`: records arrive at a fixed rate,
/// alternating `conn_open` and `conn_close`; a wake-up takes every record that has arrived.
fn daemon_pattern(base: &Path, rate: f64, secs: f64) {
    println!(
        "\naudit writer in the daemon's pattern: {rate:.0} records/s ({:.0} connections/s, a \
         conn_open and a conn_close each), a wake-up per record the kernel signals, {secs} s \
         per row, --audit-fsync always; CPU of the writer's thread (getrusage, user + system)\n",
        rate / 2.0
    );
    println!(
        "| commit | CPU µs per record | CPU µs per connection | wake-ups/s | fdatasyncs/s | records per fdatasync | longest wait until durable |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, commit) in [
        (
            "before: write and fdatasync at every wake-up".to_string(),
            Commit::EveryWakeup,
        ),
        (
            "before: group commit, records written at once, fdatasync ≤ 10ms later".to_string(),
            Commit::WriteThenGroup(lb_daemon::journal::DEFAULT_COMMIT_WINDOW),
        ),
        (
            "group commit: records drained, written and fdatasync'ed ≤ 2ms after the first"
                .to_string(),
            Commit::Group(Duration::from_millis(2)),
        ),
        (
            "group commit: records drained, written and fdatasync'ed ≤ 10ms after the first (the default window)"
                .to_string(),
            Commit::Group(lb_daemon::journal::DEFAULT_COMMIT_WINDOW),
        ),
        (
            "no fdatasync: write at every wake-up (floor)".to_string(),
            Commit::None,
        ),
    ] {
        let dir = base.join(format!("daemon-{}", name.len()));
        let r = run_pattern(&dir, commit, rate, secs);
        println!(
            "| {name} | {:.1} | {:.1} | {:.0} | {:.0} | {} | {} |",
            r.cpu_us_per_record,
            2.0 * r.cpu_us_per_record,
            r.wakeups as f64 / secs,
            r.fsyncs as f64 / secs,
            if r.fsyncs > 0 {
                format!("{:.1}", r.records as f64 / r.fsyncs as f64)
            } else {
                "—".into()
            },
            if r.fsyncs > 0 {
                format!("{:.2} ms", r.longest_wait.as_secs_f64() * 1e3)
            } else {
                "—".into()
            }
        );
    }
}

struct PatternRun {
    records: u64,
    wakeups: u64,
    fsyncs: u64,
    cpu_us_per_record: f64,
    longest_wait: Duration,
}

fn run_pattern(dir: &Path, commit: Commit, rate: f64, secs: f64) -> PatternRun {
    let mut w = AuditWriter::open_with(dir, Options::default()).unwrap();
    let (vip, backend, snat) = (
        sa("10.0.0.100:80"),
        sa("10.0.2.2:8080"),
        sa("10.0.2.1:20000"),
    );
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (start, cpu0) = (Instant::now(), thread_cpu());
    let end = start + Duration::from_secs_f64(secs);
    let (mut records, mut wakeups, mut fsyncs) = (0u64, 0u64, 0u64);
    let mut longest_wait = Duration::ZERO;
    let mut next_arrival = start;
    // Arrival of the oldest record written and not yet durable.
    let mut oldest_unsynced: Option<Instant> = None;
    // Group commit: when the pending fdatasync is due, and whether the kernel has signalled
    // the first record after the drain (it signals no more until the consumer catches up).
    let mut due: Option<Instant> = None;
    let mut signalled = false;
    loop {
        let wake = match due {
            Some(d) if !signalled && next_arrival < d => next_arrival,
            Some(d) => d,
            None => next_arrival,
        };
        if wake >= end {
            break;
        }
        let now = Instant::now();
        if wake > now {
            std::thread::sleep(wake - now);
        }
        wakeups += 1;
        let now = Instant::now();
        if let (Commit::Group(window), None) = (commit, due) {
            due = Some(now + window);
            signalled = true; // the ring buffer is not drained: no more signals meanwhile
            continue;
        }
        if due.is_some_and(|d| now < d) {
            signalled = true; // a wake-up with nothing to do until the commit is due
            continue;
        }
        // Drain: every record that has arrived by now.
        while next_arrival <= now {
            let i = records;
            let event = if i % 2 == 0 {
                Event::ConnOpen(ConnOpen {
                    flow_id: i / 2,
                    proto: Proto::Tcp,
                    client: client(i / 2),
                    vip,
                    service: "web".into(),
                    backend,
                    snat,
                    reason: "maglev".into(),
                    generation: 1,
                })
            } else {
                conn_close(i / 2, vip, backend)
            };
            w.append(SystemTime::now(), event).unwrap();
            oldest_unsynced.get_or_insert(next_arrival);
            records += 1;
            next_arrival += interval;
        }
        let sync_now = match commit {
            Commit::EveryWakeup => true,
            Commit::Group(_) | Commit::WriteThenGroup(_) => due.take().is_some(),
            Commit::None => false,
        };
        if sync_now {
            w.sync().unwrap();
            fsyncs += 1;
            if let Some(t) = oldest_unsynced.take() {
                longest_wait = longest_wait.max(t.elapsed());
            }
        } else {
            w.flush().unwrap();
            if let Commit::WriteThenGroup(window) = commit {
                due = Some(Instant::now() + window);
                signalled = false;
            }
        }
    }
    let cpu = thread_cpu() - cpu0;
    drop(w);
    PatternRun {
        records,
        wakeups,
        fsyncs,
        cpu_us_per_record: cpu.as_secs_f64() * 1e6 / records.max(1) as f64,
        longest_wait,
    }
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
