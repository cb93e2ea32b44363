//! The audit log: a directory of segment files holding framed, checksummed records with a
//! gapless sequence number. `AuditWriter` appends (continuing an existing log after cutting
//! off a torn tail); `AuditReader` streams every record back in order.
//!
//! The byte layout is specified in docs/audit-format.md and in `segment`.

pub mod record;
pub mod segment;

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, bail};
use tracing::warn;

pub use record::{
    CloseReason, ConnClose, ConnDeny, ConnOpen, DaemonStart, DaemonStop, DenyReason, Event, Proto,
    Record, record_to_json, rfc3339,
};
use segment::{Frame, Header, SegmentReader, SegmentWriter};

#[cfg(test)]
mod tests;

/// Appends records to a log directory.
pub struct AuditWriter {
    dir: PathBuf,
    segment: SegmentWriter,
    next_seq: u64,
}

impl AuditWriter {
    /// Opens (creating if needed) the log directory; continues an existing log (`seq` goes on
    /// gaplessly) or starts a new one at `seq` 1. A torn record at the end of the last segment
    /// (a write cut short by a crash) is cut off, with a warning.
    pub fn open(dir: &Path) -> anyhow::Result<AuditWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let segments = segment::list(dir)?;
        let Some((index, path)) = segments.last().cloned() else {
            let segment = SegmentWriter::create(dir, &new_header(1, 1))?;
            return Ok(AuditWriter { dir: dir.to_path_buf(), segment, next_seq: 1 });
        };
        let mut reader = SegmentReader::open(&path)?;
        let mut next_seq = reader.header.first_seq;
        let valid_len = loop {
            match reader.next_frame()? {
                Frame::Record(r) => {
                    if r.seq != next_seq {
                        bail!("{}: record seq {} where {} was expected", path.display(), r.seq, next_seq);
                    }
                    next_seq += 1;
                }
                Frame::End => break reader.offset,
                Frame::Bad { offset, why } => {
                    warn!(segment = %path.display(), offset, why, "cutting off a torn record at the end of the audit log");
                    break offset;
                }
            }
        };
        let _ = index;
        let segment = SegmentWriter::reopen(&path, valid_len)?;
        Ok(AuditWriter { dir: dir.to_path_buf(), segment, next_seq })
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one record stamped with `time`; returns its seq. Buffered until `sync`.
    pub fn append(&mut self, time: SystemTime, event: Event) -> anyhow::Result<u64> {
        let time_ns = match time.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(e) => -(e.duration().as_nanos() as i64),
        };
        let seq = self.next_seq;
        let frame = segment::encode_frame(&Record { seq, time_ns, event })?;
        self.segment.write(&frame).with_context(|| format!("writing {}", self.segment.path.display()))?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Writes buffered records to the file and makes them durable (fdatasync).
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.segment.sync().with_context(|| format!("syncing {}", self.segment.path.display()))
    }
}

fn new_header(index: u64, first_seq: u64) -> Header {
    let created_ns = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
    Header {
        incompat: 0,
        compat: 0,
        index,
        first_seq,
        created_ns,
        host_id: segment::read_id("/etc/machine-id"),
        boot_id: segment::read_id("/proc/sys/kernel/random/boot_id"),
        prev_head: [0; 32],
    }
}

/// Streams every record of a log directory in order, one segment at a time. Any damage —
/// a bad header, checksum, length, decoding, or a gap in `seq` — is an error naming the
/// segment and offset; only the end of the last segment may hold a torn record, which ends the
/// stream (it is what the writer cuts off on its next start).
pub struct AuditReader {
    segments: std::vec::IntoIter<(u64, PathBuf)>,
    current: Option<(PathBuf, SegmentReader)>,
    last: Option<u64>,
    next_seq: Option<u64>,
    done: bool,
}

impl AuditReader {
    pub fn open(dir: &Path) -> anyhow::Result<AuditReader> {
        if !dir.is_dir() {
            bail!("{}: not a directory", dir.display());
        }
        let segments = segment::list(dir)?;
        if segments.is_empty() {
            bail!("{}: no audit segments (*.{})", dir.display(), segment::SUFFIX);
        }
        let last = segments.last().map(|(i, _)| *i);
        Ok(AuditReader { segments: segments.into_iter(), current: None, last, next_seq: None, done: false })
    }

    fn step(&mut self) -> anyhow::Result<Option<Record>> {
        loop {
            if self.current.is_none() {
                let Some((index, path)) = self.segments.next() else { return Ok(None) };
                let reader = SegmentReader::open(&path)?;
                if reader.header.index != index {
                    bail!("{}: header says segment {}", path.display(), reader.header.index);
                }
                if let Some(expected) = self.next_seq {
                    if reader.header.first_seq != expected {
                        bail!("{}: starts at seq {} where {} was expected", path.display(), reader.header.first_seq, expected);
                    }
                }
                self.next_seq = Some(reader.header.first_seq);
                self.current = Some((path, reader));
            }
            let (path, reader) = self.current.as_mut().expect("set above");
            match reader.next_frame().with_context(|| path.display().to_string())? {
                Frame::Record(r) => {
                    let expected = self.next_seq.unwrap_or(r.seq);
                    if r.seq != expected {
                        bail!("{}: record seq {} where {} was expected", path.display(), r.seq, expected);
                    }
                    self.next_seq = Some(r.seq + 1);
                    return Ok(Some(*r));
                }
                Frame::End => self.current = None,
                Frame::Bad { offset, why } => {
                    let is_last = Some(reader.header.index) == self.last;
                    if is_last && why.starts_with("truncated") {
                        return Ok(None);
                    }
                    bail!("{} at offset {offset}: {why}", path.display());
                }
            }
        }
    }
}

impl Iterator for AuditReader {
    type Item = anyhow::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
