//! The audit log as the tests see it: decoded by `lb-audit read DIR --format json`, one JSON
//! object per line; and temporary directories to hold it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::daemon::{bin, run_bounded};

/// Decodes the audit log in `dir` with `lb-audit read DIR --format json` (bounded to 30 s);
/// one value per record, in log order.
pub fn read_audit(dir: &Path) -> Result<Vec<Value>> {
    let exe = bin("lb-audit")?;
    let out = run_bounded(
        Command::new(&exe)
            .arg("read")
            .arg(dir)
            .args(["--format", "json"]),
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!(
            "`lb-audit read {} --format json` failed ({}): {}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text =
        String::from_utf8(out.stdout).context("lb-audit printed something that is not UTF-8")?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("line {} of lb-audit's output is not JSON: {l}", i + 1))
        })
        .collect()
}

/// The records of one `kind`.
pub fn of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == kind).collect()
}

/// How many refusals a `conn_deny` record stands for: itself and those it says the program
/// suppressed (`None` without a `suppressed` field).
pub fn refusals(deny: &Value) -> Option<u64> {
    deny["suppressed"].as_u64().map(|n| 1 + n)
}

/// A directory under the system's temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "lbt-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
