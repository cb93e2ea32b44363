//! `lb-audit`: reads lb's audit log.
//!
//! Exit codes: 0 success (for `verify`: the log is intact); 1 the log is damaged, tampered
//! with or unreadable (the message names the segment, offset and seq); 2 bad usage.
use std::{
    io::{BufWriter, Write},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Parser as _;
use lb_daemon::{
    audit::{
        AuditReader, Event, Record, SealKey,
        filter::{self, Filter},
        record::hex,
        record_to_json, rfc3339,
        segment::{self, Frame, SegmentReader},
        verify,
    },
    cli::audit::{Cli, Command, Format},
};

/// CSV columns: every field of every kind, empty where a kind has none.
const CSV_COLUMNS: &[&str] = &[
    "seq",
    "time",
    "kind",
    "flow_id",
    "proto",
    "client",
    "vip",
    "service",
    "backend",
    "snat",
    "reason",
    "generation",
    "duration_ns",
    "bytes_to_backend",
    "bytes_to_client",
    "packets_to_backend",
    "packets_to_client",
    "close_reason",
    "rule",
    "suppressed",
    "version",
    "source",
    "count",
];

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Verify { dir, key } => return verify_cmd(&dir, key.as_deref()),
        Command::Read {
            dir,
            format,
            filter,
        } => filter
            .build()
            .map_err(usage)
            .and_then(|f| read(&dir, format, &f)),
        Command::Follow {
            dir,
            format,
            filter,
        } => filter
            .build()
            .map_err(usage)
            .and_then(|f| follow(&dir, format, &f)),
        Command::Config { dir, at } => config_at(&dir, at.as_deref()),
        Command::Stats { dir, filter, top } => filter
            .build()
            .map_err(usage)
            .and_then(|f| stats(&dir, &f, top)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A closed pipe (`| head`) is not an error of the log.
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("lb-audit: {e:#}");
            ExitCode::from(if e.is::<Usage>() { 2 } else { 1 })
        }
    }
}

/// A usage error (bad filter), exit code 2.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn usage(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Usage(format!("{e:#}")))
}

fn verify_cmd(dir: &std::path::Path, key: Option<&std::path::Path>) -> ExitCode {
    let key = match key.map(SealKey::from_file).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("lb-audit: {e:#}");
            return ExitCode::from(2);
        }
    };
    match verify::verify(dir, key) {
        Ok(r) => {
            println!(
                "intact: {} segment(s), {} record(s), seq {}..{}",
                r.segments,
                r.records,
                r.first_seq.map_or("-".into(), |s| s.to_string()),
                r.last_seq.map_or("-".into(), |s| s.to_string())
            );
            let what = if r.sealed {
                "sealed checkpoints"
            } else {
                "checkpoints (unsealed: no --key)"
            };
            match r.proven_through {
                Some(p) => println!(
                    "{} {what}; the hash chain is proven through seq {p}",
                    r.checkpoints
                ),
                None => println!("no checkpoint yet: nothing is proven by the hash chain"),
            }
            if let (Some(p), Some(last)) = (r.proven_through, r.last_seq)
                && last > p + 1
            {
                println!(
                    "{} record(s) after the last checkpoint (written since, not yet covered)",
                    last - p - 1
                );
            }
            if r.losses.is_empty() {
                println!("no loss recorded");
            }
            for (source, count, window) in &r.losses {
                println!("loss: {count} record(s) from {source} in {window}");
            }
            if r.recoveries > 0 {
                println!(
                    "{} recovery record(s): torn tails cut off after crashes",
                    r.recoveries
                );
            }
            if r.torn_tail_bytes > 0 {
                println!(
                    "a torn record of {} byte(s) ends the log (cut off when the daemon restarts)",
                    r.torn_tail_bytes
                );
            }
            ExitCode::SUCCESS
        }
        Err(d) => {
            println!("DAMAGED: {d}");
            ExitCode::from(1)
        }
    }
}

fn print(out: &mut impl Write, format: Format, rec: &Record) -> std::io::Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", record_to_json(rec)),
        Format::Csv => writeln!(out, "{}", csv_line(rec)),
        Format::Text => writeln!(out, "{}", text_line(rec)),
    }
}

fn read(dir: &std::path::Path, format: Format, filter: &Filter) -> anyhow::Result<()> {
    let reader = AuditReader::open(dir)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if let Format::Csv = format {
        writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    }
    for rec in reader.matching(filter) {
        print(&mut out, format, &rec?)?;
    }
    out.flush()?;
    Ok(())
}

/// Prints what is there, then polls for more: a frame not yet whole is waited for, a new
/// segment is followed into.
fn follow(dir: &std::path::Path, format: Format, filter: &Filter) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Format::Csv = format {
        writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    }
    let segments = segment::list(dir)?;
    let Some(&(first, _)) = segments.first() else {
        anyhow::bail!("{}: no audit segments", dir.display());
    };
    let (mut index, mut offset) = (first, 0u64);
    loop {
        let path = segment::segment_path(dir, index);
        // Opened before the next segment is looked for: a segment that was already closed
        // then is read to its end here, and one closed since is read again.
        let closed = segment::segment_path(dir, index + 1).exists();
        let mut r = SegmentReader::open_at(&path, offset)?;
        loop {
            match r.next_frame()? {
                Frame::Record(rec) => {
                    if filter.matches(&rec) {
                        print(&mut out, format, &rec)?;
                    }
                    offset = r.offset;
                }
                Frame::End => break,
                Frame::Bad { offset, why } if closed || !why.starts_with("truncated") => {
                    anyhow::bail!("{} at offset {offset}: {why}", path.display())
                }
                // A frame the writer has not finished.
                Frame::Bad { .. } => break,
            }
        }
        out.flush()?;
        if closed {
            index += 1;
            offset = 0;
            continue;
        }
        if segment::segment_path(dir, index + 1).exists() {
            // Closed meanwhile: what it got since it was opened here is read next.
            continue;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn config_at(dir: &std::path::Path, at: Option<&str>) -> anyhow::Result<()> {
    let at_ns = match at {
        Some(t) => filter::parse_instant(t, std::time::SystemTime::now())
            .map_err(usage)
            .context("--at")?,
        None => i64::MAX,
    };
    let mut config: Option<serde_json::Value> = None;
    let mut generation = 0u64;
    for rec in AuditReader::open(dir)? {
        let rec = rec?;
        if rec.time_ns > at_ns {
            break;
        }
        match &rec.event {
            Event::DaemonStart(d) => {
                config = Some(
                    serde_json::from_str(&d.config)
                        .context("daemon_start holds no JSON configuration")?,
                );
                generation = 1;
            }
            Event::ConfigChange(c) => {
                if let Some(cfg) = &mut config {
                    lb_daemon::history::apply_change(cfg, c);
                    generation = c.generation_after;
                }
            }
            _ => {}
        }
    }
    let Some(mut config) = config else {
        anyhow::bail!("no daemon_start at or before that time");
    };
    config["config_generation"] = generation.into();
    println!("{}", serde_json::to_string_pretty(&config)?);
    Ok(())
}

fn stats(dir: &std::path::Path, filter: &Filter, top: usize) -> anyhow::Result<()> {
    use std::collections::{BTreeMap, HashMap};
    let mut clients: HashMap<std::net::IpAddr, (u64, u64)> = HashMap::new(); // opens, denies
    let mut backends: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new(); // flows, bytes to backend, to client
    let mut denies: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut per_minute: BTreeMap<i64, u64> = BTreeMap::new();
    let mut records = 0u64;
    for rec in AuditReader::open(dir)?.matching(filter) {
        let rec = rec?;
        records += 1;
        match &rec.event {
            Event::ConnOpen(o) => {
                clients.entry(o.client.ip()).or_default().0 += 1;
                backends
                    .entry(format!("{} {}", o.service, o.backend))
                    .or_default()
                    .0 += 1;
                *per_minute
                    .entry(rec.time_ns.div_euclid(60_000_000_000))
                    .or_default() += 1;
            }
            Event::ConnClose(c) => {
                let b = backends
                    .entry(format!("{} {}", c.service, c.backend))
                    .or_default();
                b.1 += c.bytes_to_backend;
                b.2 += c.bytes_to_client;
            }
            Event::ConnDeny(d) => {
                clients.entry(d.client.ip()).or_default().1 += 1 + d.suppressed;
                *denies
                    .entry((
                        d.reason.name().to_string(),
                        d.rule.clone().unwrap_or_default(),
                    ))
                    .or_default() += 1 + d.suppressed;
            }
            _ => {}
        }
    }
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    writeln!(out, "{records} record(s)")?;
    let mut top_clients: Vec<_> = clients.into_iter().collect();
    top_clients.sort_by(|a, b| (b.1.0 + b.1.1).cmp(&(a.1.0 + a.1.1)).then(a.0.cmp(&b.0)));
    writeln!(
        out,
        "\ntop clients                              flows   refused"
    )?;
    for (ip, (opens, refused)) in top_clients.iter().take(top) {
        writeln!(out, "  {:<38} {:>6} {:>9}", ip.to_string(), opens, refused)?;
    }
    writeln!(
        out,
        "\nbackends                                 flows  bytes to backend  bytes to client"
    )?;
    for (b, (flows, tb, tc)) in &backends {
        writeln!(out, "  {b:<38} {flows:>6} {tb:>17} {tc:>16}")?;
    }
    writeln!(out, "\nrefused by reason and rule")?;
    for ((reason, rule), n) in &denies {
        writeln!(
            out,
            "  {:<38} {n:>6}",
            if rule.is_empty() {
                reason.clone()
            } else {
                format!("{reason} ({rule})")
            }
        )?;
    }
    writeln!(out, "\nnew flows per minute")?;
    for (minute, n) in &per_minute {
        writeln!(out, "  {} {n:>8}", &rfc3339(minute * 60_000_000_000)[..16])?;
    }
    out.flush()?;
    Ok(())
}

fn csv_line(rec: &Record) -> String {
    let v = record_to_json(rec);
    CSV_COLUMNS
        .iter()
        .map(|c| match &v[*c] {
            serde_json::Value::Null => String::new(),
            serde_json::Value::String(s) => csv_field(s),
            other => csv_field(&other.to_string()),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One aligned line: time, seq, kind, then what matters for the kind.
fn text_line(rec: &Record) -> String {
    let head = format!(
        "{} {:>8} {:<12}",
        rfc3339(rec.time_ns),
        rec.seq,
        rec.event.kind()
    );
    let rest = match &rec.event {
        Event::DaemonStart(d) => format!("version {}", d.version),
        Event::Checkpoint(c) => format!(
            "head {} epoch {}{}",
            hex(&c.head),
            c.epoch,
            if c.seal.is_some() { " sealed" } else { "" }
        ),
        Event::Recovery(r) => format!(
            "segment {} offset {}: {} byte(s) cut off ({})",
            r.segment, r.offset, r.bytes_removed, r.reason
        ),
        Event::Loss(l) => format!(
            "{} record(s) lost from {} between {} and {}",
            l.count,
            l.source,
            rfc3339(l.since_ns),
            rfc3339(l.until_ns)
        ),
        Event::ConfigChange(c) => format!(
            "{} {} by {} (uid {}): {} → {}",
            c.action, c.target, c.actor.user, c.actor.uid, c.before, c.after
        ),
        Event::HealthChange(h) => format!("{} {} {} → {}", h.service, h.backend, h.from, h.to),
        Event::ControlDenied(c) => format!(
            "{} {} by {} (uid {}): {}",
            c.action, c.target, c.actor.user, c.actor.uid, c.reason
        ),
        Event::Alert(a) => format!("{}: {}", a.rule, a.message),
        Event::BackendDrained(d) => format!("{} {} has no flow left", d.service, d.backend),
        Event::SegmentDeleted(d) => format!(
            "segment {} (seq {}..{}, {} bytes) deleted by retention ({})",
            d.index, d.first_seq, d.last_seq, d.bytes, d.reason
        ),
        Event::DaemonStop(d) => format!("reason {}", d.reason),
        Event::ConnOpen(o) => format!(
            "{} {:<22} → {:<22} {} via {} (snat {}, {} gen {}) flow {}",
            o.proto.name(),
            o.client,
            o.vip,
            o.service,
            o.backend,
            o.snat,
            o.reason,
            o.generation,
            o.flow_id
        ),
        Event::ConnClose(c) => format!(
            "{} {:<22} → {:<22} {} via {} {} after {:.3}s, {}B/{}p to backend, {}B/{}p to client, flow {}",
            c.proto.name(),
            c.client,
            c.vip,
            c.service,
            c.backend,
            c.close_reason.name(),
            c.duration_ns as f64 / 1e9,
            c.bytes_to_backend,
            c.packets_to_backend,
            c.bytes_to_client,
            c.packets_to_client,
            c.flow_id
        ),
        Event::ConnDeny(d) => format!(
            "{} {:<22} → {:<22} {} refused: {}{}{}",
            d.proto.name(),
            d.client,
            d.vip,
            d.service,
            d.reason.name(),
            d.rule
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            if d.suppressed > 0 {
                format!(", {} more since the last record", d.suppressed)
            } else {
                String::new()
            }
        ),
    };
    format!("{head} {rest}")
}
