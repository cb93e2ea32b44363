//! The daemon's side of `FLOWS4`, the IPv4 flow table (layout and claim protocol in
//! `lb_common::flow_table`): a shared mapping of the kernel's array, read slot by slot and
//! edited with the same compare-and-swaps of tag words the program uses. A sweep reads it
//! without a system call, and a removal cannot undo a slot the program has since reused.

use std::{
    os::fd::{AsRawFd as _, BorrowedFd},
    sync::atomic::{AtomicU64, Ordering, fence},
};

use anyhow::bail;
use lb_common::{
    Flow, FlowKey4,
    flow_table::{Bucket, EMPTY, LIVE, Place, STATE_MASK, Slot, WAYS, key_words},
};

/// `FLOWS4`, mapped into this process.
pub struct FlowTable4 {
    base: *mut Bucket,
    buckets: u32,
    len: usize,
    seed: u64,
}

// SAFETY: the mapping is shared memory owned by this value; it is only accessed through
// atomic operations on tag words and volatile reads of slots, from whichever thread holds it.
unsafe impl Send for FlowTable4 {}

impl FlowTable4 {
    /// Maps the array `fd`, of `buckets` buckets hashed with `seed`, read-write and shared.
    pub fn map(fd: BorrowedFd<'_>, buckets: u32, seed: u64) -> anyhow::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (buckets as usize * size_of::<Bucket>()).next_multiple_of(page);
        // SAFETY: a fresh shared mapping of a BPF_F_MMAPABLE array's values, whose length is
        // the kernel's (the values, rounded up to a page); nothing else is mapped there.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "mapping the IPv4 flow table: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            base: p.cast(),
            buckets,
            len,
            seed,
        })
    }

    fn bucket(&self, index: u32) -> *mut Bucket {
        debug_assert!(index < self.buckets);
        // SAFETY: `index` is below the bucket count (`Place` maps into it), so the bucket is
        // inside the mapping.
        unsafe { self.base.add(index as usize) }
    }

    fn tag(&self, bucket: *mut Bucket, i: usize) -> &AtomicU64 {
        // SAFETY: an aligned u64 inside the mapping (the mapping is page-aligned and buckets
        // are multiples of 8 bytes), which the program only changes atomically too.
        unsafe { AtomicU64::from_ptr(&raw mut (*bucket).tags[i]) }
    }

    /// Every live entry. An entry that changes while it is read is left out: it was removed
    /// or replaced meanwhile.
    pub fn entries(&self) -> Vec<(FlowKey4, Flow)> {
        let mut out = Vec::new();
        for b in 0..self.buckets {
            let bucket = self.bucket(b);
            for i in 0..WAYS {
                let tag = self.tag(bucket, i).load(Ordering::Acquire);
                if tag & STATE_MASK != LIVE {
                    continue;
                }
                // SAFETY: a slot inside the mapping; the program may be updating its counters
                // meanwhile, so it is read with a volatile copy and checked below.
                let slot: Slot = unsafe { std::ptr::read_volatile(&raw const (*bucket).slots[i]) };
                fence(Ordering::Acquire);
                if self.tag(bucket, i).load(Ordering::Relaxed) == tag {
                    out.push((slot.key, slot.flow));
                }
            }
        }
        out
    }

    /// Removes the live entry of `key`; whether there was one.
    pub fn remove(&self, key: &FlowKey4) -> bool {
        let p = Place::of(key, self.seed, self.buckets);
        let words = key_words(key);
        for b in [p.first, p.second] {
            let bucket = self.bucket(b);
            for i in 0..WAYS {
                let t = self.tag(bucket, i);
                if t.load(Ordering::Acquire) != p.tag | LIVE {
                    continue;
                }
                // SAFETY: a slot inside the mapping whose key is fixed while it is live.
                let k = unsafe { std::ptr::read_volatile(&raw const (*bucket).slots[i].key) };
                if key_words(&k) == words
                    && t.compare_exchange(p.tag | LIVE, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    return true;
                }
            }
        }
        false
    }

    /// Inserts an entry as the program would, without its guard against concurrent inserts of
    /// the same key (tests fill the table with it while no program runs).
    #[cfg(test)]
    pub fn insert(&self, key: &FlowKey4, flow: &Flow) -> bool {
        let p = Place::of(key, self.seed, self.buckets);
        for b in [p.first, p.second] {
            let bucket = self.bucket(b);
            for i in 0..WAYS {
                if self.tag(bucket, i).load(Ordering::Acquire) == EMPTY {
                    // SAFETY: an empty slot inside the mapping.
                    unsafe {
                        std::ptr::write_volatile(
                            &raw mut (*bucket).slots[i],
                            Slot {
                                key: *key,
                                flow: *flow,
                            },
                        )
                    };
                    self.tag(bucket, i).store(p.tag | LIVE, Ordering::Release);
                    return true;
                }
            }
        }
        false
    }
}

impl Drop for FlowTable4 {
    fn drop(&mut self) {
        // SAFETY: mapped in `map` with this length, and not used after this.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
