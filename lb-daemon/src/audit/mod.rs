//! The audit log: a directory of segment files holding framed, checksummed records with a
//! gapless sequence number, linked by a SHA-256 hash chain that `checkpoint` records carry and
//! optionally seal with a forward-secure key. `AuditWriter` appends (continuing an existing
//! log after cutting off a torn tail, which it records); `AuditReader` streams every record
//! back in order; `verify` proves a log intact or names the first damage.
//!
//! The byte layout is specified in docs/audit-format.md and in `segment`.

pub mod filter;
pub mod record;
pub mod scan;
pub mod seal;
pub mod segment;
pub mod verify;

use std::{
    path::{Path, PathBuf},
    str::FromStr,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, anyhow, bail};
use tracing::warn;

use filter::Filter;
pub use record::{
    Actor, Alert, BackendDrained, Checkpoint, CloseReason, ConfigChange, ConnClose, ConnDeny,
    ConnOpen, ControlDenied, DaemonStart, DaemonStop, DenyReason, Event, HealthChange, Loss, Proto,
    Record, Recovery, SegmentDeleted, record_to_json, rfc3339,
};
pub use seal::SealKey;
use segment::{Frame, Header, Raw, SegmentReader, SegmentWriter};

#[cfg(test)]
mod tests;

/// When written records are made durable (`--audit-fsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every `sync` (each batch of records: group commit) ends with fdatasync.
    Always,
    /// Records are written at once, fdatasync at most this often.
    Interval(Duration),
    /// Records are written at once; the kernel decides when they reach the disk.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => match s.strip_prefix("interval=") {
                Some(d) => crate::config::parse_duration(d).map(FsyncPolicy::Interval),
                None => Err(format!(
                    "'{s}': expected always, never or interval=DURATION"
                )),
            },
        }
    }
}

/// How the writer lays out and protects the log.
#[derive(Clone)]
pub struct Options {
    pub fsync: FsyncPolicy,
    /// A segment that reaches this size is closed and a new one started...
    pub segment_bytes: u64,
    /// ...and so is one that is this old.
    pub segment_age: Duration,
    /// Closed segments whose newest record is older than this are deleted.
    pub retain_age: Option<Duration>,
    /// The oldest closed segments are deleted while the log is larger than this.
    pub retain_bytes: Option<u64>,
    /// A checkpoint after this many records...
    pub checkpoint_records: u64,
    /// ...or this long after the previous one, whichever comes first.
    pub checkpoint_interval: Duration,
    /// The initial seal key; `None` leaves checkpoints unsealed.
    pub seal_key: Option<SealKey>,
    /// With `FsyncPolicy::Always`, how long the daemon's journal may wait to fdatasync records
    /// it has written (group commit; see `crate::journal`). Zero: at every wake-up.
    pub commit_window: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync: FsyncPolicy::Always,
            segment_bytes: 64 << 20,
            segment_age: Duration::from_secs(86400),
            retain_age: None,
            retain_bytes: None,
            checkpoint_records: 1000,
            checkpoint_interval: Duration::from_secs(10),
            seal_key: None,
            commit_window: crate::journal::DEFAULT_COMMIT_WINDOW,
        }
    }
}

/// Appends records to a log directory.
pub struct AuditWriter {
    dir: PathBuf,
    opts: Options,
    segment: SegmentWriter,
    index: u64,
    next_seq: u64,
    head: [u8; 32],
    since_checkpoint: u64,
    last_checkpoint: Instant,
    last_fsync: Instant,
    seal: Option<SealKey>,
    /// The seq of the last whole record found on disk when the log was opened.
    resumed_after: u64,
    /// When the current segment was created.
    segment_created: SystemTime,
    /// The frame being written, reused from record to record.
    frame: Vec<u8>,
}

impl AuditWriter {
    /// `open_with` and the default options.
    pub fn open(dir: &Path) -> anyhow::Result<AuditWriter> {
        Self::open_with(dir, Options::default())
    }

    /// Opens (creating if needed) the log directory; continues an existing log (`seq` and the
    /// hash chain go on) or starts a new one at `seq` 1. A torn record at the end of the last
    /// segment (a write cut short by a crash) is cut off and a `recovery` record says so; a
    /// damaged record with whole records after it is refused (an error), never cut off.
    pub fn open_with(dir: &Path, opts: Options) -> anyhow::Result<AuditWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let seal = match (&opts.seal_key, SealKey::load_state(dir)?) {
            (None, _) => None,
            (Some(_), Some(state)) => Some(state),
            (Some(initial), None) => Some(initial.clone()),
        };
        let now = Instant::now();
        let segments = segment::list(dir)?;
        let Some((index, path)) = segments.last().cloned() else {
            let segment = SegmentWriter::create(dir, &new_header(1, 1, [0; 32]))?;
            return Ok(AuditWriter {
                dir: dir.to_path_buf(),
                opts,
                segment,
                index: 1,
                next_seq: 1,
                head: [0; 32],
                since_checkpoint: 0,
                last_checkpoint: now,
                last_fsync: now,
                seal,
                resumed_after: 0,
                segment_created: SystemTime::now(),
                frame: Vec::new(),
            });
        };
        let mut reader = SegmentReader::open(&path)?;
        let mut next_seq = reader.header.first_seq;
        let mut head = reader.header.prev_head;
        let mut torn = None;
        let valid_len = loop {
            match reader.next_frame()? {
                Frame::Record(r) => {
                    if r.seq != next_seq {
                        bail!(
                            "{}: record seq {} where {} was expected",
                            path.display(),
                            r.seq,
                            next_seq
                        );
                    }
                    head = segment::chain(&head, &reader.last_frame);
                    next_seq += 1;
                }
                Frame::End => break reader.offset,
                Frame::Bad { offset, why } => {
                    // A write cut short leaves nothing whole after it. A bad frame followed by
                    // a good one is damage, not a crash: cutting it off would destroy the
                    // records after it, so the log is left as it is for an investigation.
                    if reader.offset > offset
                        && matches!(reader.next_raw(), Ok(segment::Raw::Record))
                    {
                        bail!(
                            "{}: the record at offset {offset} is damaged ({why}) and whole records follow it: \
                             this is not a write cut short by a crash, so nothing is cut off. \
                             `lb-audit verify` shows the damage; keep this directory as evidence and start \
                             the daemon on a new --audit-dir",
                            path.display()
                        );
                    }
                    warn!(segment = %path.display(), offset, why, "cutting off a torn record at the end of the audit log");
                    torn = Some(Recovery {
                        segment: index,
                        offset,
                        bytes_removed: reader.len - offset,
                        reason: why,
                    });
                    break offset;
                }
            }
        };
        let segment = SegmentWriter::reopen(&path, valid_len)?;
        let mut w = AuditWriter {
            dir: dir.to_path_buf(),
            opts,
            segment,
            index,
            next_seq,
            head,
            since_checkpoint: 0,
            last_checkpoint: now,
            last_fsync: now,
            seal,
            resumed_after: next_seq - 1,
            segment_created: SystemTime::UNIX_EPOCH
                + Duration::from_nanos(reader.header.created_ns.max(0) as u64),
            frame: Vec::new(),
        };
        if let Some(recovery) = torn {
            w.append(SystemTime::now(), Event::Recovery(recovery))?;
            w.sync()?;
        }
        Ok(w)
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The seq of the last whole record found on disk when the log was opened (before any
    /// `recovery` record it then wrote).
    pub fn resumed_after(&self) -> u64 {
        self.resumed_after
    }

    /// Appends one record stamped with `time`; returns its seq. Written at once, durable after
    /// `sync` (as the fsync policy says). Checkpoints and segment rotation happen here.
    pub fn append(&mut self, time: SystemTime, event: Event) -> anyhow::Result<u64> {
        let seq = self.write(time, event)?;
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.opts.checkpoint_records {
            self.checkpoint()?;
        }
        if self.segment.len >= self.opts.segment_bytes {
            self.rotate()?;
        }
        Ok(seq)
    }

    fn write(&mut self, time: SystemTime, event: Event) -> anyhow::Result<u64> {
        let time_ns = match time.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i64,
            Err(e) => -(e.duration().as_nanos() as i64),
        };
        let seq = self.next_seq;
        segment::encode_frame_into(
            &Record {
                seq,
                time_ns,
                event,
            },
            &mut self.frame,
        )?;
        self.segment
            .write(&self.frame)
            .with_context(|| format!("writing {}", self.segment.path.display()))?;
        self.head = segment::chain(&self.head, &self.frame);
        self.next_seq += 1;
        Ok(seq)
    }

    /// Appends a checkpoint: the chain head so far, sealed when a key is set.
    pub fn checkpoint(&mut self) -> anyhow::Result<()> {
        let seq = self.next_seq;
        let head = self.head;
        let (epoch, seal) = match &self.seal {
            Some(k) => (k.epoch, Some(k.seal(seq, &head))),
            None => (0, None),
        };
        self.write(
            SystemTime::now(),
            Event::Checkpoint(Checkpoint { head, epoch, seal }),
        )?;
        if let Some(k) = &mut self.seal {
            // The sealed checkpoint must be on disk before its key is forgotten.
            self.segment.sync()?;
            k.evolve();
            k.save_state(&self.dir)?;
        }
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Closes the current segment (with a checkpoint) and starts the next one, which carries
    /// the chain head in its header.
    fn rotate(&mut self) -> anyhow::Result<()> {
        if self.since_checkpoint > 0 {
            self.checkpoint()?;
        }
        self.segment.sync()?;
        self.index += 1;
        self.segment =
            SegmentWriter::create(&self.dir, &new_header(self.index, self.next_seq, self.head))?;
        self.segment_created = SystemTime::now();
        self.retain()
    }

    /// Deletes closed segments beyond the retention limits, oldest first, each with a
    /// `segment_deleted` record. The active segment is never deleted.
    fn retain(&mut self) -> anyhow::Result<()> {
        if self.opts.retain_age.is_none() && self.opts.retain_bytes.is_none() {
            return Ok(());
        }
        let segments = segment::list(&self.dir)?;
        let sizes: Vec<u64> = segments
            .iter()
            .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .collect();
        let mut total: u64 = sizes.iter().sum();
        let now = SystemTime::now();
        for (i, (index, path)) in segments.iter().enumerate() {
            if *index >= self.index {
                break;
            }
            // A closed segment's newest record is no younger than the next segment's creation.
            let (next_first, next_created) = match segments.get(i + 1) {
                Some((_, next)) => {
                    let h = SegmentReader::open(next)?.header;
                    (
                        h.first_seq,
                        SystemTime::UNIX_EPOCH + Duration::from_nanos(h.created_ns.max(0) as u64),
                    )
                }
                None => break,
            };
            let too_old = self
                .opts
                .retain_age
                .is_some_and(|age| now.duration_since(next_created).unwrap_or_default() > age);
            let too_big = self.opts.retain_bytes.is_some_and(|max| total > max);
            if !(too_old || too_big) {
                break;
            }
            let first_seq = SegmentReader::open(path)?.header.first_seq;
            std::fs::remove_file(path).with_context(|| format!("deleting {}", path.display()))?;
            total -= sizes[i];
            let reason = if too_old { "age" } else { "size" };
            self.write(
                now,
                Event::SegmentDeleted(SegmentDeleted {
                    index: *index,
                    first_seq,
                    last_seq: next_first - 1,
                    bytes: sizes[i],
                    reason: reason.into(),
                }),
            )?;
        }
        Ok(())
    }

    /// Hands the buffered records to the kernel in one write, without waiting for the disk:
    /// from then on a crash of the daemon (kill -9) no longer loses them, a crash of the
    /// machine still may until `sync`. Also writes the periodic checkpoint and closes an old
    /// segment when due.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if self.since_checkpoint > 0
            && self.last_checkpoint.elapsed() >= self.opts.checkpoint_interval
        {
            self.checkpoint()?;
        }
        if self.segment.len > segment::HEADER_LEN as u64
            && SystemTime::now()
                .duration_since(self.segment_created)
                .unwrap_or_default()
                >= self.opts.segment_age
        {
            self.rotate()?;
        }
        let segment = &mut self.segment;
        segment
            .flush()
            .with_context(|| format!("writing {}", segment.path.display()))
    }

    /// `flush`, then, as the fsync policy says, makes the records durable (fdatasync, when
    /// anything was written since the last one).
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.flush()?;
        let fsync = self.segment.unsynced()
            && match self.opts.fsync {
                FsyncPolicy::Always => true,
                FsyncPolicy::Interval(d) => self.last_fsync.elapsed() >= d,
                FsyncPolicy::Never => false,
            };
        if fsync {
            let segment = &mut self.segment;
            segment
                .sync()
                .with_context(|| format!("syncing {}", segment.path.display()))?;
            self.last_fsync = Instant::now();
        }
        Ok(())
    }

    /// Whether records were written since the last fdatasync.
    pub fn unsynced(&self) -> bool {
        self.segment.unsynced()
    }

    /// Ends a run: a final checkpoint, and everything durable.
    pub fn close(mut self) -> anyhow::Result<()> {
        if self.since_checkpoint > 0 {
            self.checkpoint()?;
        }
        self.segment.sync()?;
        Ok(())
    }
}

fn new_header(index: u64, first_seq: u64, prev_head: [u8; 32]) -> Header {
    let created_ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    Header {
        incompat: 0,
        compat: 0,
        index,
        first_seq,
        created_ns,
        host_id: segment::read_id("/etc/machine-id"),
        boot_id: segment::read_id("/proc/sys/kernel/random/boot_id"),
        prev_head,
    }
}

/// Streams every record of a log directory in order, one segment at a time. Any damage —
/// a bad header, checksum, length, decoding, or a gap in `seq` — is an error naming the
/// segment and offset; only the end of the last segment may hold a torn record, which ends the
/// stream (it is what the writer cuts off on its next start). `verify` also checks the chain.
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
            bail!(
                "{}: no audit segments (*.{})",
                dir.display(),
                segment::SUFFIX
            );
        }
        let last = segments.last().map(|(i, _)| *i);
        Ok(AuditReader {
            segments: segments.into_iter(),
            current: None,
            last,
            next_seq: None,
            done: false,
        })
    }

    /// The records `filter` matches, in order. Every frame is still checked (length,
    /// checksum, a payload that decodes, `seq`), but only the records that match are decoded:
    /// the others are read in place by `scan`, which allocates nothing.
    pub fn matching(self, filter: &Filter) -> Matching<'_> {
        Matching {
            reader: self,
            filter: (!filter.is_empty()).then_some(filter),
        }
    }

    /// The next record (that `filter` matches, when given).
    fn step(&mut self, filter: Option<&Filter>) -> anyhow::Result<Option<Record>> {
        loop {
            if self.current.is_none() {
                let Some((index, path)) = self.segments.next() else {
                    return Ok(None);
                };
                let reader = SegmentReader::open(&path)?;
                if reader.header.index != index {
                    bail!(
                        "{}: header says segment {}",
                        path.display(),
                        reader.header.index
                    );
                }
                if let Some(expected) = self.next_seq
                    && reader.header.first_seq != expected
                {
                    bail!(
                        "{}: starts at seq {} where {} was expected",
                        path.display(),
                        reader.header.first_seq,
                        expected
                    );
                }
                self.next_seq = Some(reader.header.first_seq);
                self.current = Some((path, reader));
            }
            let (path, reader) = self.current.as_mut().expect("set above");
            match reader
                .next_raw()
                .with_context(|| path.display().to_string())?
            {
                Raw::Record => {
                    let damaged = |why: String| {
                        anyhow!(
                            "{} at offset {}: {why}",
                            path.display(),
                            reader.frame_offset
                        )
                    };
                    let (seq, wanted) = match filter {
                        Some(f) => match scan::scan(reader.payload()) {
                            Ok(fields) => (fields.seq, f.matches_fields(&fields)),
                            // The full decoder's words for the damage.
                            Err(scan::Invalid(why)) => {
                                return Err(damaged(
                                    segment::decode_payload(reader.payload())
                                        .err()
                                        .unwrap_or_else(|| format!("undecodable record: {why}")),
                                ));
                            }
                        },
                        None => (0, true),
                    };
                    let rec = if wanted {
                        Some(segment::decode_payload(reader.payload()).map_err(damaged)?)
                    } else {
                        None
                    };
                    let seq = rec.as_ref().map_or(seq, |r| r.seq);
                    let expected = self.next_seq.unwrap_or(seq);
                    if seq != expected {
                        bail!(
                            "{}: record seq {seq} where {expected} was expected",
                            path.display(),
                        );
                    }
                    self.next_seq = Some(seq + 1);
                    if rec.is_some() {
                        return Ok(rec);
                    }
                }
                Raw::End => self.current = None,
                Raw::Bad { offset, why } => {
                    let is_last = Some(reader.header.index) == self.last;
                    if is_last && why.starts_with("truncated") {
                        return Ok(None);
                    }
                    bail!("{} at offset {offset}: {why}", path.display());
                }
            }
        }
    }

    fn next_item(&mut self, filter: Option<&Filter>) -> Option<anyhow::Result<Record>> {
        if self.done {
            return None;
        }
        match self.step(filter) {
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

/// `AuditReader::matching`: the records a filter matches.
pub struct Matching<'f> {
    reader: AuditReader,
    /// `None` for a filter that matches everything: then every record is decoded at once.
    filter: Option<&'f Filter>,
}

impl Iterator for Matching<'_> {
    type Item = anyhow::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        self.reader.next_item(self.filter)
    }
}

impl Iterator for AuditReader {
    type Item = anyhow::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_item(None)
    }
}
