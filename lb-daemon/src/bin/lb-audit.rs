//! `lb-audit`: reads lb's audit log.
//!
//! Exit codes: 0 success; 1 the log is damaged or unreadable (the error names the segment and
//! offset); 2 bad usage.
use std::{
    io::{BufWriter, Write},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use lb_daemon::audit::{AuditReader, Event, Record, record_to_json, rfc3339};

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
    "packets_to_client", "close_reason", "rule", "suppressed", "version",
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
