//! Forward-secure sealing of checkpoints.
//!
//! The operator gives an initial key; checkpoint `n` is sealed with key `n`, and key `n + 1` is
//! `SHA-256("lb-audit seal" ‖ key n)`. The daemon keeps only the current key (in `seal.state`
//! next to the log) and forgets the ones before, so someone who takes the host later cannot
//! forge seals on the history before that moment; an auditor with the initial key recomputes
//! every key and checks every seal.

use std::{fs, io::Write, path::Path};

use anyhow::{Context as _, bail};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// File in the log directory holding the current epoch and key.
pub const STATE_FILE: &str = "seal.state";

#[derive(Clone)]
pub struct SealKey {
    pub epoch: u64,
    key: Vec<u8>,
}

impl SealKey {
    /// The initial key (epoch 0) from a key file: its bytes, surrounding whitespace removed.
    pub fn from_file(path: &Path) -> anyhow::Result<SealKey> {
        let raw =
            fs::read(path).with_context(|| format!("reading the seal key {}", path.display()))?;
        let key = raw.trim_ascii().to_vec();
        if key.len() < 16 {
            bail!("{}: a seal key needs at least 16 bytes", path.display());
        }
        Ok(SealKey { epoch: 0, key })
    }

    /// The key state saved in `dir`, if any.
    pub fn load_state(dir: &Path) -> anyhow::Result<Option<SealKey>> {
        let path = dir.join(STATE_FILE);
        let raw = match fs::read(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if raw.len() != 8 + 32 {
            bail!("{}: not a seal state", path.display());
        }
        let epoch = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        Ok(Some(SealKey {
            epoch,
            key: raw[8..].to_vec(),
        }))
    }

    /// Saves the current epoch and key durably (write, fsync, rename, fsync the directory).
    pub fn save_state(&self, dir: &Path) -> anyhow::Result<()> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&self.epoch.to_le_bytes())?;
        f.write_all(&self.key)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(STATE_FILE))?;
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    /// The seal of a checkpoint record: HMAC-SHA256(key, seq as u64 LE ‖ head).
    pub fn seal(&self, seq: u64, head: &[u8; 32]) -> [u8; 32] {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&seq.to_le_bytes());
        mac.update(head);
        mac.finalize().into_bytes().into()
    }

    /// Moves to the next epoch; the old key is gone.
    pub fn evolve(&mut self) {
        let mut h = Sha256::new();
        h.update(b"lb-audit seal");
        h.update(&self.key);
        self.key = h.finalize().to_vec();
        self.epoch += 1;
    }
}
