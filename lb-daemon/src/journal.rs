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

/// Group commit (`--audit-commit-window`, this by default): with `--audit-fsync always`, the
/// records the kernel queues are drained, written and made durable by one fdatasync at most
/// this long after the first of them, together with whatever else arrived in the meantime
/// (`start_commit_window`); until then they wait in the ring buffer, which outlives a crash of
/// the daemon. Records someone waits on (a configuration change before its reply)
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
    /// When the open commit window ends: the records queued meanwhile are then written and
    /// synced.
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
        if let Some(w) = &mut self.writer
            && let Err(e) = w.sync()
        {
            self.fail(e, 0);
        }
    }

    /// Group commit, for records nobody waits on (those the kernel queues): with
    /// `--audit-fsync always` and a commit window, starts the window (if none is open) and
    /// returns `true`: the records stay in the ring buffer until `commit_due`, when they are
    /// drained, written and made durable by one `sync` together with all that arrived in the
    /// meantime. `false` (other policies, or no window): drain and `sync` them now. Other
    /// syncs meanwhile (a configuration change, a sweep) leave the window open: its records
    /// are still in the ring buffer.
    pub fn start_commit_window(&mut self) -> bool {
        if self.opts.fsync != FsyncPolicy::Always || self.opts.commit_window.is_zero() {
            return false;
        }
        self.commit_due
            .get_or_insert_with(|| Instant::now() + self.opts.commit_window);
        true
    }

    /// Ends the open commit window, once its records have been drained: `sync`.
    pub fn commit(&mut self) {
        self.commit_due = None;
        self.sync();
    }

    /// When the open commit window ends (see `start_commit_window`).
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
        // An open commit window stays open: its records are still in the ring buffer, and
        // are counted as lost when it ends.
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

    /// Group commit: the first wake-up opens a window that ends within the commit window,
    /// later ones within it keep its end, and so does a `sync` for something else (the
    /// window's records are still in the ring buffer); `commit` writes and syncs everything
    /// and closes it.
    #[test]
    fn group_commit_opens_one_window_and_commit_closes_it() {
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
        assert!(j.start_commit_window());
        let due = j.commit_due().expect("a window is open");
        assert!(due > before && due <= Instant::now() + DEFAULT_COMMIT_WINDOW);
        // A second wake-up before the end goes with the same commit.
        assert!(j.start_commit_window());
        assert_eq!(j.commit_due(), Some(due));
        j.sync();
        assert_eq!(j.commit_due(), Some(due), "still open after another sync");
        // At the end: what was drained meanwhile is written and synced together.
        j.record(SystemTime::now(), stop("one"));
        j.record(SystemTime::now(), stop("two"));
        j.commit();
        assert_eq!(j.commit_due(), None);
        assert_eq!(on_disk(&dir), 2);
        assert!(!j.writer.as_ref().unwrap().unsynced());
        j.close().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// With `interval` and `never`, and with a zero window, there is no group commit: the
    /// daemon drains and syncs at every wake-up.
    #[test]
    fn other_policies_sync_as_before() {
        for (fsync, commit_window) in [
            (FsyncPolicy::Never, DEFAULT_COMMIT_WINDOW),
            (
                FsyncPolicy::Interval(Duration::from_secs(60)),
                DEFAULT_COMMIT_WINDOW,
            ),
            (FsyncPolicy::Always, Duration::ZERO),
        ] {
            let dir = std::env::temp_dir().join(format!("lb-journal-other-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let opts = audit::Options {
                fsync,
                commit_window,
                ..audit::Options::default()
            };
            let mut j = Journal::open(
                dir.clone(),
                opts,
                FailurePolicy::FailOpen,
                Default::default(),
            )
            .unwrap();
            assert!(!j.start_commit_window());
            assert_eq!(j.commit_due(), None);
            j.close().unwrap();
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
