//! The daemon's side of the audit log: writes records, and when writing fails (disk full, I/O
//! error) applies `--audit-on-failure`:
//! - `fail-closed`: the data plane refuses new flows (`conn_deny`, `audit_unavailable`) until
//!   the log can be written again — nothing happens that is not recorded;
//! - `fail-open`: forwarding goes on.
//!
//! Either way, records that could not be written are counted, the writer is reopened every
//! sweep (which cuts off a partly written record), and the first thing written once it works
//! again is a `loss` record stating how many records are missing and over which window.

use std::{
    path::PathBuf,
    str::FromStr,
    time::{Duration, Instant, SystemTime},
};

use tracing::{error, info};

use crate::{
    audit::{self, AuditWriter, Event, FsyncPolicy, Loss},
    dataplane::Dataplane,
};

/// Group commit (`--audit-commit-window`, this by default): with `--audit-fsync always`,
/// records drained from the kernel are written out at once (`sync_soon`) and made durable by
/// one fdatasync at most this long after the first of them, together with whatever else
/// arrived in the meantime. Records someone waits on (a configuration change before its reply)
/// are made durable at once (`sync`), and take any pending ones with them.
pub const DEFAULT_COMMIT_WINDOW: Duration = Duration::from_millis(10);

/// `--audit-on-failure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    FailOpen,
    FailClosed,
}

impl FromStr for FailurePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fail-open" => Ok(FailurePolicy::FailOpen),
            "fail-closed" => Ok(FailurePolicy::FailClosed),
            _ => Err(format!("'{s}': expected fail-open or fail-closed")),
        }
    }
}

struct Failure {
    since: SystemTime,
    /// Records dropped while the log could not be written.
    dropped: u64,
    error: String,
}

pub struct Journal {
    dir: PathBuf,
    opts: audit::Options,
    policy: FailurePolicy,
    writer: Option<AuditWriter>,
    /// The seq of the last record handed to the writer (buffered records included).
    last_appended: u64,
    failure: Option<Failure>,
    refusing: bool,
    /// What was recorded, for the metrics.
    pub totals: crate::metrics::Totals,
    alerts: crate::alerts::Engine,
    /// When the records written by `sync_soon` and not yet durable must be synced.
    commit_due: Option<Instant>,
}

impl Journal {
    pub fn open(
        dir: PathBuf,
        opts: audit::Options,
        policy: FailurePolicy,
        alert_rules: crate::alerts::Rules,
    ) -> anyhow::Result<Journal> {
        let writer = AuditWriter::open_with(&dir, opts.clone())?;
        Ok(Journal {
            dir,
            opts,
            policy,
            writer: Some(writer),
            last_appended: 0,
            failure: None,
            refusing: false,
            totals: Default::default(),
            alerts: crate::alerts::Engine::new(alert_rules),
            commit_due: None,
        })
    }

    /// Records an event; a failure to write switches to the failure policy.
    pub fn record(&mut self, time: SystemTime, event: Event) {
        self.totals.observe(&event);
        let ns = time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        self.alerts.observe(ns, &event);
        let Some(w) = &mut self.writer else {
            if let Some(f) = &mut self.failure {
                f.dropped += 1;
            }
            return;
        };
        match w.append(time, event) {
            Ok(seq) => self.last_appended = seq,
            Err(e) => self.fail(e, 1),
        }
    }

    /// Client addresses that alerts asked to block (`--alert-block`), once each.
    pub fn take_blocks(&mut self) -> Vec<std::net::IpAddr> {
        self.alerts.take_blocks()
    }

    /// Makes written records durable (as the fsync policy says), after turning the alerts the
    /// records since the last sync raised into `alert` records, log lines and `--alert-exec`.
    pub fn sync(&mut self) {
        self.raise_alerts();
        self.commit_due = None;
        if let Some(w) = &mut self.writer
            && let Err(e) = w.sync()
        {
            self.fail(e, 0);
        }
    }

    /// Group commit, for records nobody waits on (those drained from the kernel): with
    /// `--audit-fsync always`, writes them out now — a crash of the daemon no longer loses
    /// them — and leaves the fdatasync to a `sync` at `commit_due`, at most the commit window after
    /// the first record written since the last one. With the other policies, `sync`.
    pub fn sync_soon(&mut self) {
        if self.opts.fsync != FsyncPolicy::Always {
            return self.sync();
        }
        self.raise_alerts();
        let Some(w) = &mut self.writer else { return };
        match w.flush() {
            Ok(()) if w.unsynced() => {
                self.commit_due
                    .get_or_insert_with(|| Instant::now() + self.opts.commit_window);
            }
            Ok(()) => {}
            Err(e) => self.fail(e, 0),
        }
    }

    /// When written records must be made durable by `sync` (see `sync_soon`).
    pub fn commit_due(&self) -> Option<Instant> {
        self.commit_due
    }

    fn raise_alerts(&mut self) {
        for alert in self.alerts.take() {
            tracing::warn!(rule = %alert.rule, source = ?alert.source, "alert: {}", alert.message);
            if let Some(cmd) = self.alerts.rules.exec.clone() {
                let now = SystemTime::now();
                let ns = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as i64)
                    .unwrap_or(0);
                let json = audit::record_to_json(&audit::Record {
                    seq: 0,
                    time_ns: ns,
                    event: Event::Alert(alert.clone()),
                });
                crate::alerts::exec(&cmd, &json);
            }
            self.record(SystemTime::now(), Event::Alert(alert));
        }
    }

    fn fail(&mut self, e: anyhow::Error, dropped: u64) {
        error!(error = %format!("{e:#}"), policy = ?self.policy, "cannot write the audit log");
        // The writer's buffered records are lost with it; reopening tells how many reached
        // the disk.
        self.writer = None;
        self.commit_due = None;
        self.failure = Some(Failure {
            since: SystemTime::now(),
            dropped,
            error: format!("{e:#}"),
        });
    }

    /// While failing: tries to reopen the log and, if it works, records the loss.
    pub fn retry(&mut self) {
        let Some(f) = &self.failure else { return };
        let mut w = match AuditWriter::open_with(&self.dir, self.opts.clone()) {
            Ok(w) => w,
            Err(_) => return,
        };
        let on_disk = w.resumed_after();
        let lost = f.dropped + self.last_appended.saturating_sub(on_disk);
        let ns = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0)
        };
        let now = SystemTime::now();
        let loss = Event::Loss(Loss {
            source: "write_failure".into(),
            count: lost,
            since_ns: ns(f.since),
            until_ns: ns(now),
        });
        self.totals.observe(&loss);
        match w.append(now, loss).and_then(|seq| w.sync().map(|()| seq)) {
            Ok(seq) => {
                info!(lost, error = %f.error, "the audit log can be written again");
                self.last_appended = seq;
                self.writer = Some(w);
                self.failure = None;
            }
            Err(_) => {
                // Still failing: the partial record is cut off at the next try.
            }
        }
    }

    /// Whether the log cannot be written at the moment.
    pub fn failing(&self) -> bool {
        self.failure.is_some()
    }

    /// The log directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Whether a change must be refused because it could not be recorded (fail-closed with a
    /// log that cannot be written).
    pub fn refusing_changes(&self) -> bool {
        self.policy == FailurePolicy::FailClosed && self.failure.is_some()
    }

    /// Brings the data plane in line with the policy: refuse new flows while a fail-closed log
    /// cannot be written.
    pub fn apply(&mut self, dp: &mut Dataplane) -> anyhow::Result<()> {
        let refuse = self.policy == FailurePolicy::FailClosed && self.failure.is_some();
        if refuse != self.refusing {
            dp.refuse_new_flows(refuse)?;
            self.refusing = refuse;
        }
        Ok(())
    }

    /// Ends the run (final checkpoint, everything durable); reports a log that could not be
    /// written to the end.
    pub fn close(self) -> anyhow::Result<()> {
        match (self.writer, self.failure) {
            (Some(w), _) => w.close(),
            (None, Some(f)) => anyhow::bail!(
                "the audit log could not be written since the failure ({}); {} record(s) lost",
                f.error,
                f.dropped
            ),
            (None, None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditReader, DaemonStop};

    fn stop(reason: &str) -> Event {
        Event::DaemonStop(DaemonStop {
            reason: reason.into(),
        })
    }

    fn on_disk(dir: &std::path::Path) -> usize {
        AuditReader::open(dir).unwrap().count()
    }

    /// Group commit: a record that `sync_soon` took is in the file at once (another reader
    /// sees it: a crash of the daemon cannot lose it), and a sync is due within
    /// the commit window; `sync` makes it durable and clears the due time.
    #[test]
    fn group_commit_writes_at_once_and_syncs_within_the_bound() {
        let dir = std::env::temp_dir().join(format!("lb-journal-group-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut j = Journal::open(
            dir.clone(),
            audit::Options::default(),
            FailurePolicy::FailOpen,
            Default::default(),
        )
        .unwrap();
        assert_eq!(j.commit_due(), None);
        let before = Instant::now();
        j.record(SystemTime::now(), stop("one"));
        j.sync_soon();
        assert_eq!(on_disk(&dir), 1, "written before the fdatasync");
        let due = j.commit_due().expect("a sync is due");
        assert!(due > before && due <= Instant::now() + DEFAULT_COMMIT_WINDOW);
        // More records before the due time go with the same commit.
        j.record(SystemTime::now(), stop("two"));
        j.sync_soon();
        assert_eq!(j.commit_due(), Some(due));
        assert_eq!(on_disk(&dir), 2);
        j.sync();
        assert_eq!(j.commit_due(), None);
        assert!(!j.writer.as_ref().unwrap().unsynced());
        // Nothing new: nothing due.
        j.sync_soon();
        assert_eq!(j.commit_due(), None);
        j.close().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With `interval` and `never` there is no group commit: `sync_soon` is `sync`.
    #[test]
    fn other_policies_sync_as_before() {
        for fsync in [
            FsyncPolicy::Never,
            FsyncPolicy::Interval(Duration::from_secs(60)),
        ] {
            let dir = std::env::temp_dir().join(format!("lb-journal-other-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let opts = audit::Options {
                fsync,
                ..audit::Options::default()
            };
            let mut j = Journal::open(
                dir.clone(),
                opts,
                FailurePolicy::FailOpen,
                Default::default(),
            )
            .unwrap();
            j.record(SystemTime::now(), stop("one"));
            j.sync_soon();
            assert_eq!(j.commit_due(), None);
            assert_eq!(on_disk(&dir), 1);
            j.close().unwrap();
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
