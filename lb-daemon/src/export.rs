//! Shipping the audit log to a central store (`--export`): a thread tails the log files (not
//! the writer: a slow or absent collector never slows the daemon) and sends every record over
//! TCP, as JSON lines with the contract names (`tcp://HOST:PORT`) or as RFC 5424 syslog
//! messages with octet-counting framing (`syslog+tcp://HOST:PORT`, RFC 6587).
//!
//! Delivery is at least once: the cursor file next to the log holds the last `seq` whose bytes
//! the collector's TCP stack acknowledged (the socket's send queue drained, `TIOCOUTQ` = 0);
//! after a collector outage or a daemon restart, sending resumes after it (a record may be
//! sent twice, none is skipped).

use std::{
    fmt,
    io::{BufWriter, Write},
    net::{TcpStream, ToSocketAddrs},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::audit::{
    Record, record_to_json, rfc3339,
    segment::{self, Frame, SegmentReader},
};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    pub syslog: bool,
    pub addr: String,
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (syslog, addr) = if let Some(a) = s.strip_prefix("tcp://") {
            (false, a)
        } else if let Some(a) = s.strip_prefix("syslog+tcp://") {
            (true, a)
        } else {
            return Err(format!(
                "'{s}': expected tcp://HOST:PORT or syslog+tcp://HOST:PORT"
            ));
        };
        if addr
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(format!("'{s}': expected HOST:PORT"));
        }
        Ok(Target {
            syslog,
            addr: addr.to_string(),
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}",
            if self.syslog { "syslog+tcp" } else { "tcp" },
            self.addr
        )
    }
}

/// The cursor file of a target, in the log directory.
pub fn cursor_path(dir: &Path, target: &Target) -> PathBuf {
    let name: String = target
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dir.join(format!("export-{name}.cursor"))
}

fn load_cursor(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn save_cursor(path: &Path, seq: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{seq}\n"))?;
    std::fs::rename(&tmp, path)
}

/// One record as the collector receives it.
fn format(rec: &Record, syslog: bool, host: &str) -> Vec<u8> {
    let json = record_to_json(rec).to_string();
    if !syslog {
        return format!("{json}\n").into_bytes();
    }
    // RFC 5424: <PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG; facility authpriv (10),
    // severity notice (5) for refusals and alerts, info (6) otherwise.
    let kind = rec.event.kind();
    let severity = if matches!(kind, "conn_deny" | "control_denied" | "alert" | "loss") {
        5
    } else {
        6
    };
    let msg = format!(
        "<{}>1 {} {host} lb-daemon - {kind} [lb@32473 seq=\"{}\"] {json}",
        10 * 8 + severity,
        rfc3339(rec.time_ns),
        rec.seq
    );
    format!("{} {msg}", msg.len()).into_bytes()
}

/// Starts the exporter thread; it stops when `stop` is set.
pub fn spawn(dir: PathBuf, target: Target, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("lb-export".into())
        .spawn(move || run(&dir, &target, &stop))
        .expect("spawning the exporter thread")
}

/// Sends records after the cursor until `stop`, reconnecting as needed.
pub fn run(dir: &Path, target: &Target, stop: &AtomicBool) {
    let cursor_file = cursor_path(dir, target);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "-".into());
    let mut backoff = Duration::from_millis(200);
    while !stop.load(Ordering::Relaxed) {
        let cursor = load_cursor(&cursor_file);
        match session(dir, target, &cursor_file, cursor, &host, stop) {
            Ok(()) => return,
            Err(e) => {
                warn!(target = %target, error = %e, "export interrupted; resuming after seq {}", load_cursor(&cursor_file));
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// One connection: from the record after `cursor` on, following the log as it grows.
fn session(
    dir: &Path,
    target: &Target,
    cursor_file: &Path,
    cursor: u64,
    host: &str,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let addr = target
        .addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{} does not resolve", target.addr))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut out = BufWriter::new(stream.try_clone()?);
    info!(target = %target, after_seq = cursor, "exporting the audit log");
    let (mut sent, mut acked) = (cursor, cursor);
    let (mut index, mut offset) = start_position(dir, cursor)?;
    loop {
        let path = segment::segment_path(dir, index);
        let mut r = SegmentReader::open_at(&path, offset)?;
        r.keep_frames = false;
        loop {
            match r.next_frame()? {
                Frame::Record(rec) => {
                    offset = r.offset;
                    if rec.seq <= sent {
                        continue;
                    }
                    out.write_all(&format(&rec, target.syslog, host))?;
                    sent = rec.seq;
                }
                Frame::End => break,
                Frame::Bad { why, .. } if why.starts_with("truncated") => break,
                Frame::Bad { offset, why } => {
                    anyhow::bail!("{} at offset {offset}: {why}", path.display())
                }
            }
        }
        out.flush()?;
        // The cursor moves only over what the collector has acknowledged.
        if sent > acked && unacknowledged(&stream)? == 0 {
            acked = sent;
            save_cursor(cursor_file, acked)?;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if r.offset == r.len && segment::segment_path(dir, index + 1).exists() {
            index += 1;
            offset = 0;
            continue;
        }
        // A collector that went away shows up as an error on the next write.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes written to the socket that the peer has not acknowledged yet.
fn unacknowledged(stream: &TcpStream) -> std::io::Result<i32> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int through the pointer, on a socket we own.
    if unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n)
}

/// The segment holding the record after `cursor`, from its start (records up to the cursor
/// are skipped as they are read).
fn start_position(dir: &Path, cursor: u64) -> anyhow::Result<(u64, u64)> {
    let segments = segment::list(dir)?;
    let mut chosen = segments
        .first()
        .map(|(i, _)| *i)
        .ok_or_else(|| anyhow::anyhow!("no audit segments yet"))?;
    for (index, path) in &segments {
        if SegmentReader::open(path)?.header.first_seq <= cursor + 1 {
            chosen = *index;
        }
    }
    Ok((chosen, 0))
}
