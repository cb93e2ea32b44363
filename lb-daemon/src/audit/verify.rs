//! Proving a log intact: every segment in sequence, every header consistent with the one
//! before, every frame's checksum, `seq` gapless, the hash chain recomputed from the first
//! record and compared with every checkpoint and segment header, and, with the seal key,
//! every checkpoint's seal.

use std::path::{Path, PathBuf};

use super::{
    Event, SealKey,
    record::rfc3339,
    scan,
    segment::{self, Raw, SegmentReader},
};

/// What an intact log holds.
#[derive(Debug, Default)]
pub struct Report {
    pub segments: u64,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub checkpoints: u64,
    /// The last record covered by a (sealed, when a key was given) checkpoint.
    pub proven_through: Option<u64>,
    pub sealed: bool,
    /// Loss records: (source, count, window).
    pub losses: Vec<(String, u64, String)>,
    pub recoveries: u64,
    /// Segments deleted by retention (all those before the first one present).
    pub deleted_segments: u64,
    /// Bytes of a torn record at the end of the last segment (a crash; cut off on restart).
    pub torn_tail_bytes: u64,
}

/// The first place where the log is not what it should be.
#[derive(Debug)]
pub struct Damage {
    pub segment: PathBuf,
    pub offset: u64,
    pub seq: Option<u64>,
    pub what: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at offset {}", self.segment.display(), self.offset)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// A record as verify reads it: its seq, and the event where verify looks into it.
struct Scanned {
    seq: u64,
    event: Option<Event>,
}

pub fn verify(dir: &Path, key: Option<SealKey>) -> Result<Report, Damage> {
    let damage = |segment: &Path, offset: u64, seq: Option<u64>, what: String| Damage {
        segment: segment.to_path_buf(),
        offset,
        seq,
        what,
    };
    let segments = segment::list(dir).map_err(|e| damage(dir, 0, None, format!("{e:#}")))?;
    if segments.is_empty() {
        return Err(damage(dir, 0, None, "no audit segments".into()));
    }
    let sealed = key.is_some();
    let mut key = key;
    let mut report = Report {
        sealed,
        ..Report::default()
    };
    let mut head = [0u8; 32];
    let mut next_seq: Option<u64> = None;
    let last_index = segments.last().map(|(i, _)| *i).unwrap_or(0);
    // Retention may have deleted the oldest segments; each deletion must be on record.
    let first_index = segments[0].0;
    let mut deleted: Vec<u64> = Vec::new();
    for (n, (index, path)) in segments.iter().enumerate() {
        let expected_index = first_index + n as u64;
        if *index != expected_index {
            return Err(damage(
                path,
                0,
                None,
                format!("segment {expected_index} is missing (found {index})"),
            ));
        }
        let mut r =
            SegmentReader::open(path).map_err(|e| damage(path, 0, None, format!("{e:#}")))?;
        if r.header.index != *index {
            return Err(damage(
                path,
                0,
                None,
                format!("header says segment {}", r.header.index),
            ));
        }
        if let Some(s) = next_seq
            && r.header.first_seq != s
        {
            return Err(damage(
                path,
                0,
                None,
                format!(
                    "starts at seq {} where {s} was expected",
                    r.header.first_seq
                ),
            ));
        }
        if n == 0 && first_index > 1 {
            // The chain is proven from here on: the segments before are gone.
            head = r.header.prev_head;
        }
        if r.header.prev_head != head {
            return Err(damage(
                path,
                0,
                None,
                "header's chain head does not continue the previous segment".into(),
            ));
        }
        next_seq = Some(r.header.first_seq);
        report.segments += 1;
        loop {
            let offset = r.offset;
            match r
                .next_raw()
                .map_err(|e| damage(path, offset, next_seq, e.to_string()))?
            {
                Raw::End => break,
                Raw::Bad { offset, why } => {
                    if *index == last_index && why.starts_with("truncated") {
                        report.torn_tail_bytes = r.len - offset;
                        break;
                    }
                    return Err(damage(path, offset, next_seq, why));
                }
                Raw::Record => {
                    // Every record is checked to decode, but only the kinds verify reads are
                    // decoded in full.
                    let fields = scan::scan(r.payload()).map_err(|scan::Invalid(why)| {
                        let why = segment::decode_payload(r.payload())
                            .err()
                            .unwrap_or_else(|| format!("undecodable record: {why}"));
                        damage(path, offset, next_seq, why)
                    })?;
                    let event = match fields.kind {
                        "checkpoint" | "loss" | "recovery" | "segment_deleted" => Some(
                            segment::decode_payload(r.payload())
                                .map_err(|why| damage(path, offset, Some(fields.seq), why))?
                                .event,
                        ),
                        _ => None,
                    };
                    let rec = Scanned {
                        seq: fields.seq,
                        event,
                    };
                    let expected = next_seq.unwrap_or(rec.seq);
                    if rec.seq != expected {
                        return Err(damage(
                            path,
                            offset,
                            Some(expected),
                            format!("record seq {} where {expected} was expected", rec.seq),
                        ));
                    }
                    match &rec.event {
                        Some(Event::Checkpoint(c)) => {
                            if c.head != head {
                                return Err(damage(
                                    path,
                                    offset,
                                    Some(rec.seq),
                                    "checkpoint does not match the hash chain".into(),
                                ));
                            }
                            if let Some(k) = &mut key {
                                if c.epoch != k.epoch {
                                    return Err(damage(
                                        path,
                                        offset,
                                        Some(rec.seq),
                                        format!(
                                            "checkpoint of seal epoch {} where {} was expected",
                                            c.epoch, k.epoch
                                        ),
                                    ));
                                }
                                match c.seal {
                                    Some(s) if s == k.seal(rec.seq, &c.head) => k.evolve(),
                                    Some(_) => {
                                        return Err(damage(
                                            path,
                                            offset,
                                            Some(rec.seq),
                                            "seal does not verify with the key".into(),
                                        ));
                                    }
                                    None => {
                                        return Err(damage(
                                            path,
                                            offset,
                                            Some(rec.seq),
                                            "checkpoint is not sealed".into(),
                                        ));
                                    }
                                }
                            }
                            report.checkpoints += 1;
                            report.proven_through = rec.seq.checked_sub(1);
                        }
                        Some(Event::Loss(l)) => report.losses.push((
                            l.source.clone(),
                            l.count,
                            format!("{} .. {}", rfc3339(l.since_ns), rfc3339(l.until_ns)),
                        )),
                        Some(Event::Recovery(_)) => report.recoveries += 1,
                        Some(Event::SegmentDeleted(d)) => deleted.push(d.index),
                        _ => {}
                    }
                    head = segment::chain(&head, &r.last_frame);
                    report.records += 1;
                    report.first_seq.get_or_insert(rec.seq);
                    report.last_seq = Some(rec.seq);
                    next_seq = Some(rec.seq + 1);
                }
            }
        }
    }
    // Retention deletes oldest first, so a record of segment k's deletion accounts for 1..=k
    // (the records of earlier deletions may have gone with the segments that held them).
    let accounted = deleted.iter().copied().max().unwrap_or(0);
    if first_index > 1 && accounted < first_index - 1 {
        return Err(damage(
            &segments[0].1,
            0,
            None,
            format!(
                "segment {} is missing and no record says it was deleted",
                first_index - 1
            ),
        ));
    }
    report.deleted_segments = first_index - 1;
    Ok(report)
}
