//! The daemon's side of `FLOWS4`, the IPv4 flow table, and of `CLAIMS4`, its reply keys' claim
//! words (layout and protocols in `lb_common::flow_table`): shared mappings of the kernel's
//! arrays, read slot by slot and edited with the same compare-and-swaps the program uses. A
//! sweep reads the table without a system call, and a removal cannot undo a slot the program
//! has since reused.

use std::{
    os::fd::BorrowedFd,
    sync::atomic::{AtomicU64, Ordering, fence},
};

use lb_common::{
    Flow, FlowKey4, flow_dir, flow_state,
    flow_table::{
        Bucket, EMPTY, LIVE, Place, STATE_MASK, Slot, UNCLAIMED, WAYS, claim_of, key_words,
        placed_bucket,
    },
};

use crate::mapping::{Mapping, page_size};

/// `FLOWS4` and `CLAIMS4`, mapped into this process.
pub struct FlowTable4 {
    mapping: Mapping,
    buckets: u32,
    seed: u64,
    claims: Mapping,
    claim_count: u32,
}

/// A live slot found by key: its tag word and the word's value, the slot, and, when it was
/// found through a claim word, that word and its value.
struct Found<'a> {
    tag: &'a AtomicU64,
    live: u64,
    slot: *mut Slot,
    claim: Option<(&'a AtomicU64, u64)>,
}

// SAFETY: the mapping is shared memory owned by this value; it is only accessed through
// atomic operations on tag words and volatile reads of slots, from whichever thread holds it.
unsafe impl Send for FlowTable4 {}

/// How many buckets ahead of the one it reads `entries` prefetches.
const SCAN_AHEAD: u32 = 8;

/// Asks for bucket `b`'s lock and tag words (its first two cache lines) to be loaded.
fn prefetch_tags(b: *const Bucket) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let p = b.cast::<i8>();
        // SAFETY: a prefetch reads nothing and cannot fault; both lines are inside the bucket.
        unsafe {
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p.wrapping_add(64), _MM_HINT_T0);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = b;
}

impl FlowTable4 {
    /// Maps the arrays `table`, of `buckets` buckets hashed with `seed`, and `claims`, of
    /// `claim_count` words, read-write and shared.
    pub fn map(
        table: BorrowedFd<'_>,
        buckets: u32,
        seed: u64,
        claims: BorrowedFd<'_>,
        claim_count: u32,
    ) -> anyhow::Result<Self> {
        // A BPF_F_MMAPABLE array's values, rounded up to a page, from offset 0.
        let len = |n: usize, size: usize| (n * size).next_multiple_of(page_size());
        Ok(Self {
            mapping: Mapping::new(
                table,
                0,
                len(buckets as usize, size_of::<Bucket>()),
                true,
                "the IPv4 flow table",
            )?,
            buckets,
            seed,
            claims: Mapping::new(
                claims,
                0,
                len(claim_count as usize, size_of::<u64>()),
                true,
                "the IPv4 claim words",
            )?,
            claim_count,
        })
    }

    /// The claim word of the reply key `key`.
    fn claim_word(&self, key: &FlowKey4) -> &AtomicU64 {
        let i = claim_of(key, self.seed, self.claim_count);
        // SAFETY: `claim_of` is below the word count, so the aligned word is inside the
        // mapping; the program changes it only atomically.
        unsafe { AtomicU64::from_ptr(self.claims.ptr().cast::<u64>().add(i as usize)) }
    }

    fn bucket(&self, index: u32) -> *mut Bucket {
        debug_assert!(index < self.buckets);
        // SAFETY: `index` is below the bucket count (`Place` maps into it), so the bucket is
        // inside the mapping.
        unsafe { self.mapping.ptr().cast::<Bucket>().add(index as usize) }
    }

    fn tag(&self, bucket: *mut Bucket, i: usize) -> &AtomicU64 {
        // SAFETY: an aligned u64 inside the mapping (the mapping is page-aligned and buckets
        // are multiples of 8 bytes), which the program only changes atomically too.
        unsafe { AtomicU64::from_ptr(&raw mut (*bucket).tags[i]) }
    }

    /// Every live entry. An entry that changes while it is read is left out: it was removed
    /// or replaced meanwhile. The scan asks for the tag lines of the bucket `SCAN_AHEAD` on
    /// while it reads one: the scan is a walk through memory far larger than the caches.
    pub fn entries(&self) -> Vec<(FlowKey4, Flow)> {
        let mut out = Vec::new();
        for b in 0..self.buckets {
            let bucket = self.bucket(b);
            if b + SCAN_AHEAD < self.buckets {
                prefetch_tags(self.bucket(b + SCAN_AHEAD));
            }
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

    /// The live entry of `key` that belongs to flow `flow_id`, read as `entries` reads one.
    pub fn get(&self, key: &FlowKey4, flow_id: u64) -> Option<Flow> {
        let f = self.find(key, flow_id)?;
        // SAFETY: a slot inside the mapping, read with a volatile copy and checked below, as
        // in `entries`.
        let flow = unsafe { std::ptr::read_volatile(&raw const (*f.slot).flow) };
        fence(Ordering::Acquire);
        (f.tag.load(Ordering::Relaxed) == f.live).then_some(flow)
    }

    /// The live slot of `key` whose entry belongs to flow `flow_id`: in the bucket of its claim
    /// word when that is `placed` (a reply entry), else in its own two buckets.
    fn find(&self, key: &FlowKey4, flow_id: u64) -> Option<Found<'_>> {
        let p = Place::of(key, self.seed, self.buckets);
        let claim = self.claim_word(key);
        let word = claim.load(Ordering::Acquire);
        if let Some(b) = placed_bucket(word).filter(|&b| b < self.buckets)
            && let Some((tag, slot)) = self.find_in(b, key, p.tag | LIVE, flow_id)
        {
            return Some(Found {
                tag,
                live: p.tag | LIVE,
                slot,
                claim: Some((claim, word)),
            });
        }
        [p.first, p.second].into_iter().find_map(|b| {
            let (tag, slot) = self.find_in(b, key, p.tag | LIVE, flow_id)?;
            Some(Found {
                tag,
                live: p.tag | LIVE,
                slot,
                claim: None,
            })
        })
    }

    /// The slot of bucket `b` whose tag word is `live`, key `key` and flow id `flow_id`.
    fn find_in(
        &self,
        b: u32,
        key: &FlowKey4,
        live: u64,
        flow_id: u64,
    ) -> Option<(&AtomicU64, *mut Slot)> {
        let bucket = self.bucket(b);
        (0..WAYS).find_map(|i| {
            let t = self.tag(bucket, i);
            if t.load(Ordering::Acquire) != live {
                return None;
            }
            // SAFETY: a slot inside the mapping, whose key and flow id are fixed while it is
            // live.
            let slot = unsafe { &raw mut (*bucket).slots[i] };
            // SAFETY: as above.
            let (k, id) = unsafe {
                (
                    std::ptr::read_volatile(&raw const (*slot).key),
                    std::ptr::read_volatile(&raw const (*slot).flow.flow_id),
                )
            };
            (key_words(&k) == key_words(key) && id == flow_id).then_some((t, slot))
        })
    }

    /// Removes the entry of `key` if it still belongs to flow `flow_id` (the program may have
    /// reopened the 5-tuple since it was read); whether it did. A reply entry's claim word is
    /// released after it, as the program does.
    pub fn remove(&self, key: &FlowKey4, flow_id: u64) -> bool {
        let Some(f) = self.find(key, flow_id) else {
            return false;
        };
        // SAFETY: a field of a live slot inside the mapping, fixed while it is live.
        let reply =
            unsafe { std::ptr::read_volatile(&raw const (*f.slot).flow.dir) } == flow_dir::REPLY;
        let removed = f
            .tag
            .compare_exchange(f.live, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if removed
            && reply
            && let Some((claim, word)) = f.claim
        {
            let _ = claim.compare_exchange(word, UNCLAIMED, Ordering::AcqRel, Ordering::Relaxed);
        }
        removed
    }

    /// Sets `CLOSED` on the forward entry `key` of flow `flow_id`, as the program does when it
    /// closes a flow; whether this call set it (and so the caller writes the close record),
    /// rather than the program before it, or the entry being gone.
    pub fn mark_closed(&self, key: &FlowKey4, flow_id: u64) -> bool {
        self.find(key, flow_id).is_some_and(|f| {
            // SAFETY: an aligned u64 of a live slot inside the mapping, which the program
            // changes only atomically.
            let state = unsafe { AtomicU64::from_ptr(&raw mut (*f.slot).flow.state) };
            state.fetch_or(flow_state::CLOSED, Ordering::AcqRel) & flow_state::CLOSED == 0
        })
    }

    /// Takes (`true`) or releases the insert lock of `key`'s first bucket, as an insert on
    /// another CPU holds it: what the program does when it finds the lock taken can then be
    /// tested on one CPU. Whether the lock changed.
    pub fn set_insert_lock(&self, key: &FlowKey4, held: bool) -> bool {
        let p = Place::of(key, self.seed, self.buckets);
        // SAFETY: an aligned u64 inside the mapping, which the program changes only atomically.
        let lock = unsafe { AtomicU64::from_ptr(&raw mut (*self.bucket(p.first)).lock) };
        let (from, to) = if held { (0, 1) } else { (1, 0) };
        lock.compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Inserts a connection as the program would, without its guards against concurrent
    /// inserts (tests fill the table with it while no program runs): the forward entry, and
    /// the reply entry if given, both in the forward key's buckets, the reply key claimed.
    #[cfg(test)]
    pub fn insert(&self, key: &FlowKey4, flow: &Flow, reply: Option<(&FlowKey4, &Flow)>) -> bool {
        use lb_common::flow_table::placed;
        let p = Place::of(key, self.seed, self.buckets);
        let put = |k: &FlowKey4, f: &Flow| {
            let tag = Place::of(k, self.seed, self.buckets).tag;
            for b in [p.first, p.second] {
                let bucket = self.bucket(b);
                for i in 0..WAYS {
                    if self.tag(bucket, i).load(Ordering::Acquire) == EMPTY {
                        // SAFETY: an empty slot inside the mapping.
                        unsafe {
                            std::ptr::write_volatile(
                                &raw mut (*bucket).slots[i],
                                Slot { key: *k, flow: *f },
                            )
                        };
                        self.tag(bucket, i).store(tag | LIVE, Ordering::Release);
                        return Some(b);
                    }
                }
            }
            None
        };
        if put(key, flow).is_none() {
            return false;
        }
        match reply {
            None => true,
            Some((rkey, rev)) => put(rkey, rev).is_some_and(|b| {
                self.claim_word(rkey)
                    .compare_exchange(UNCLAIMED, placed(b), Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            }),
        }
    }
}
