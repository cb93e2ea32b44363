//! `lb-audit`: reads lb's audit log.
//!
//! Exit codes: 0 success (for `verify`: the log is intact); 1 the log is damaged, tampered
//! with or unreadable (the message names the segment, offset and seq); 2 bad usage.
use std::{
    io::{BufWriter, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use lb_daemon::audit::{AuditReader, Event, Record, SealKey, record::hex, record_to_json, rfc3339, verify};

#[derive(Parser)]
#[command(name = "lb-audit", version, about = "Read lb's audit log")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print every record of the log in DIR, in order.
    Read {
        /// The log directory (the daemon's --audit-dir).
        dir: PathBuf,
        /// Output format: aligned text for people, JSON lines, or CSV with a header.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Prove the log in DIR intact: checksums, sequence, segments, hash chain, and with --key
    /// every checkpoint's seal. Prints a summary; exit 1 with the first bad position otherwise.
    Verify {
        dir: PathBuf,
        /// The initial seal key (the file given to lb-daemon --audit-seal-key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
    Csv,
}

/// CSV columns: every field of every kind, empty where a kind has none.
const CSV_COLUMNS: &[&str] = &[
    "seq", "time", "kind", "flow_id", "proto", "client", "vip", "service", "backend", "snat", "reason",
    "generation", "duration_ns", "bytes_to_backend", "bytes_to_client", "packets_to_backend",
    "packets_to_client", "close_reason", "rule", "suppressed", "version", "source", "count",
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
    match cli.command {
        Command::Verify { dir, key } => verify_cmd(&dir, key.as_deref()),
        Command::Read { dir, format } => match read(&dir, format) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // A closed pipe (`| head`) is not an error of the log.
                if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
                    return ExitCode::SUCCESS;
                }
                eprintln!("lb-audit: {e:#}");
                ExitCode::from(1)
            }
        },
    }
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
            println!("intact: {} segment(s), {} record(s), seq {}..{}", r.segments, r.records,
                r.first_seq.map_or("-".into(), |s| s.to_string()), r.last_seq.map_or("-".into(), |s| s.to_string()));
            let what = if r.sealed { "sealed checkpoints" } else { "checkpoints (unsealed: no --key)" };
            match r.proven_through {
                Some(p) => println!("{} {what}; the hash chain is proven through seq {p}", r.checkpoints),
                None => println!("no checkpoint yet: nothing is proven by the hash chain"),
            }
            if let (Some(p), Some(last)) = (r.proven_through, r.last_seq) {
                if last > p + 1 {
                    println!("{} record(s) after the last checkpoint (written since, not yet covered)", last - p - 1);
                }
            }
            if r.losses.is_empty() {
                println!("no loss recorded");
            }
            for (source, count, window) in &r.losses {
                println!("loss: {count} record(s) from {source} in {window}");
            }
            if r.recoveries > 0 {
                println!("{} recovery record(s): torn tails cut off after crashes", r.recoveries);
            }
            if r.torn_tail_bytes > 0 {
                println!("a torn record of {} byte(s) ends the log (cut off when the daemon restarts)", r.torn_tail_bytes);
            }
            ExitCode::SUCCESS
        }
        Err(d) => {
            println!("DAMAGED: {d}");
            ExitCode::from(1)
        }
    }
}

fn read(dir: &std::path::Path, format: Format) -> anyhow::Result<()> {
    let reader = AuditReader::open(dir)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    if let Format::Csv = format {
        writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    }
    for rec in reader {
        let rec = rec?;
        match format {
            Format::Json => writeln!(out, "{}", record_to_json(&rec))?,
            Format::Csv => writeln!(out, "{}", csv_line(&rec))?,
            Format::Text => writeln!(out, "{}", text_line(&rec))?,
        }
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
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// One aligned line: time, seq, kind, then what matters for the kind.
fn text_line(rec: &Record) -> String {
    let head = format!("{} {:>8} {:<12}", rfc3339(rec.time_ns), rec.seq, rec.event.kind());
    let rest = match &rec.event {
        Event::DaemonStart(d) => format!("version {}", d.version),
        Event::Checkpoint(c) => format!(
            "head {} epoch {}{}",
            hex(&c.head),
            c.epoch,
            if c.seal.is_some() { " sealed" } else { "" }
        ),
        Event::Recovery(r) => format!("segment {} offset {}: {} byte(s) cut off ({})", r.segment, r.offset, r.bytes_removed, r.reason),
        Event::Loss(l) => format!("{} record(s) lost from {} between {} and {}", l.count, l.source, rfc3339(l.since_ns), rfc3339(l.until_ns)),
        Event::ConfigChange(c) => format!("{} {} by {} (uid {}): {} → {}", c.action, c.target, c.actor.user, c.actor.uid, c.before, c.after),
        Event::HealthChange(h) => format!("{} {} {} → {}", h.service, h.backend, h.from, h.to),
        Event::ControlDenied(c) => format!("{} {} by {} (uid {}): {}", c.action, c.target, c.actor.user, c.actor.uid, c.reason),
        Event::Alert(a) => format!("{}: {}", a.rule, a.message),
        Event::DaemonStop(d) => format!("reason {}", d.reason),
        Event::ConnOpen(o) => format!(
            "{} {:<22} → {:<22} {} via {} (snat {}, {} gen {}) flow {}",
            o.proto.name(), o.client, o.vip, o.service, o.backend, o.snat, o.reason, o.generation, o.flow_id
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
            d.rule.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
            if d.suppressed > 0 { format!(", {} more since the last record", d.suppressed) } else { String::new() }
        ),
    };
    format!("{head} {rest}")
}
