//! `FLOWS4`, the IPv4 flow table, and `CLAIMS4`, the claim words that reserve SNAT ports and
//! find reply entries: the layout and the protocols are in `lb_common::flow_table`. Lookups
//! are inlined (array lookups are, by the verifier); inserts and removals are BPF functions of
//! their own.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, PerCpuArray},
};
use lb_common::{
    CONNTRACK_MAX, Config, Flow, FlowKey4, config_flags, flow_dir,
    flow_table::{
        Bucket, CLAIMED, EMPTY, LIVE, PENDING, Place, Slot, UNCLAIMED, WAYS, buckets_for, claim_of,
        claims_for, key_words, placed, placed_bucket,
    },
};

use crate::{CONFIG, atomic};

/// Sized by the daemon at load time (`buckets_for(--conntrack-size)`), and mapped by it.
#[map]
static FLOWS4: Array<Bucket> = Array::with_max_entries(buckets_for(CONNTRACK_MAX), BPF_F_MMAPABLE);

/// Sized by the daemon at load time (`claims_for(--conntrack-size)`), and mapped by it.
#[map]
static CLAIMS4: Array<u64> = Array::with_max_entries(claims_for(CONNTRACK_MAX), BPF_F_MMAPABLE);

/// Where `opaque` passes values through.
#[map]
static OPAQUE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `v`, as a value the verifier does not know. A scan leaves with a slot index or a count that
/// is a different constant on each of its paths, and the verifier would check the code after
/// it once per value (for each call); through memory it is one unknown value, checked once.
#[inline(always)]
fn opaque(v: u64) -> u64 {
    match OPAQUE.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, ours during this run.
        Some(p) => unsafe {
            core::ptr::write_volatile(p, v);
            core::ptr::read_volatile(p)
        },
        None => v,
    }
}

/// Slot index `i` (below `WAYS`) through `opaque`: one value below `WAYS`.
#[inline(always)]
fn opaque_index(i: usize) -> Option<usize> {
    let i = opaque(i as u64) as usize;
    (i < WAYS).then_some(i)
}

/// Both candidate buckets were full.
pub const E2BIG: i64 = 7;
/// Another CPU was inserting into the same bucket at the same instant.
pub const EAGAIN: i64 = 11;

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

#[inline(always)]
fn place(key: &FlowKey4, cfg: &Config) -> Place {
    Place::of(key, cfg.flow4_seed, cfg.flow4_buckets)
}

/// The claim word of the reply key `key`.
#[inline(always)]
fn claim_word(key: &FlowKey4, cfg: &Config) -> Option<*mut u64> {
    CLAIMS4.get_ptr_mut(claim_of(key, cfg.flow4_seed, cfg.flow4_claims))
}

/// The claim word of `key` and what it holds, when `key` may be a reply key (its destination
/// port is one a flow in the table may have as SNAT port) and the word is `placed`: the word,
/// its value, and the bucket of the reply entry.
#[inline(always)]
fn placed_claim(key: &FlowKey4, cfg: &Config) -> Option<(*mut u64, u64, u32)> {
    let port = u16::from_be(key.dport);
    if port < cfg.claimed_port_min || port > cfg.claimed_port_max {
        return None;
    }
    let c = claim_word(key, cfg)?;
    // SAFETY: an aligned word of a live array value, changed only atomically.
    let w = unsafe { atomic::load(c) };
    Some((c, w, placed_bucket(w)?))
}

/// The slot of bucket `index` whose tag word is `tag` and whose key is `words`: its tag word
/// and the slot.
#[inline(always)]
fn find(index: u32, tag: u64, words: &[u64; 2]) -> Option<(*mut u64, *mut Slot)> {
    let b = FLOWS4.get_ptr_mut(index)?;
    let i = opaque_index(scan_for(b, tag, words)?)?;
    // SAFETY: `i` is below `WAYS`: a slot of a live array value.
    unsafe { Some((&raw mut (*b).tags[i], &raw mut (*b).slots[i])) }
}

#[inline(always)]
fn scan_for(b: *mut Bucket, tag: u64, words: &[u64; 2]) -> Option<usize> {
    // SAFETY: an aligned tag word of a live array value, which other CPUs (and the daemon)
    // change only atomically.
    (0..WAYS)
        .find(|&i| unsafe { atomic::load(&raw const (*b).tags[i]) } == tag && holds(b, i, words))
}

/// Whether slot `i` of bucket `b` holds the key `words` (fixed while its tag is `LIVE`).
#[inline(always)]
fn holds(b: *mut Bucket, i: usize, words: &[u64; 2]) -> bool {
    // SAFETY: the 8-byte aligned key of a slot of a live array value.
    unsafe {
        let k = (&raw const (*b).slots[i].key).cast::<u64>();
        *k == words[0] && *k.add(1) == words[1]
    }
}

/// Reads bucket `b`'s first tag line, so that, when the bucket is not in the caches, its miss
/// overlaps the first candidate's instead of following it.
#[inline(always)]
fn touch(b: *const Bucket) {
    // SAFETY: an aligned tag word of a live array value.
    unsafe { atomic::load(&raw const (*b).tags[0]) };
}

/// The live entry of `key`: in the bucket its claim word points to, when it is a reply key;
/// else in the first bucket's tags, then the second's (loading the second from the start, in
/// case).
#[inline(always)]
pub fn lookup(key: &FlowKey4) -> Option<*mut Flow> {
    let cfg = config()?;
    let p = place(key, cfg);
    let words = key_words(key);
    if let Some(b2) = FLOWS4.get_ptr(p.second) {
        touch(b2);
    }
    let live = p.tag | LIVE;
    let (_, s) = placed_claim(key, cfg)
        .and_then(|(_, _, b)| find(b, live, &words))
        .or_else(|| find(p.first, live, &words))
        .or_else(|| find(p.second, live, &words))?;
    // SAFETY: a slot of a live array value.
    Some(unsafe { &raw mut (*s).flow })
}

/// Reserves the reply key `key` (a SNAT port towards a backend) for a flow about to be
/// inserted with it (`reserve_slots`): whether it was free.
#[inline(always)]
pub fn claim(key: &FlowKey4) -> bool {
    let Some(c) = config().and_then(|cfg| claim_word(key, cfg)) else {
        return false;
    };
    // SAFETY: an aligned word of a live array value, changed only atomically.
    unsafe { atomic::load(c) == UNCLAIMED && atomic::cmpxchg(c, UNCLAIMED, CLAIMED) == UNCLAIMED }
}

/// Whether the reply key `key` is reserved by a flow.
#[inline(always)]
pub fn claimed(key: &FlowKey4) -> bool {
    // SAFETY: an aligned word of a live array value.
    config()
        .and_then(|cfg| claim_word(key, cfg))
        .is_some_and(|c| unsafe { atomic::load(c) } != UNCLAIMED)
}

/// Removes the entry of `key`, if any; a reply entry's claim word is released after it.
#[inline(never)]
pub fn remove(key: &FlowKey4) {
    let Some(cfg) = config() else {
        return;
    };
    let p = place(key, cfg);
    let words = key_words(key);
    let live = p.tag | LIVE;
    if let Some((c, w, b)) = placed_claim(key, cfg)
        && let Some((t, s)) = find(b, live, &words)
    {
        // SAFETY: an aligned tag word and a field fixed while the slot is live, of a live
        // array value.
        unsafe {
            let reply = (*s).flow.dir == flow_dir::REPLY;
            if atomic::cmpxchg(t, live, EMPTY) == live && reply {
                atomic::cmpxchg(c, w, UNCLAIMED);
            }
        }
        return;
    }
    if let Some((t, _)) = find(p.first, live, &words).or_else(|| find(p.second, live, &words)) {
        // SAFETY: an aligned tag word of a live array value.
        unsafe { atomic::cmpxchg(t, live, EMPTY) };
    }
}

/// First half of inserting a new connection, whose forward key is `key` and whose reply key
/// `rkey` the caller has claimed (`claim`): takes the lock of `key`'s first bucket, removes an
/// entry of `key` already there (a closed flow's, whose 5-tuple is reused) and claims a slot
/// for each entry, each in the emptier of `key`'s buckets. Returns `Slots`, with the lock
/// still held, for `publish`; or the negative error, with the claim word released.
#[inline(never)]
pub fn reserve_slots(key: &FlowKey4, rkey: &FlowKey4) -> i64 {
    let Some(cfg) = config() else {
        return -E2BIG;
    };
    let r = reserve_locked(key, rkey, cfg);
    if r < 0
        && let Some(c) = claim_word(rkey, cfg)
    {
        // SAFETY: an aligned word of a live array value, ours (`CLAIMED`).
        unsafe { atomic::cmpxchg(c, CLAIMED, UNCLAIMED) };
    }
    r
}

/// Where `reserve_slots` put the two entries: the slot of each (bits 0..4 forward, 4..8
/// reply) and whether it is in the second bucket (bit 8 forward, bit 9 reply).
pub type Slots = i64;

#[inline(always)]
fn reserve_locked(key: &FlowKey4, rkey: &FlowKey4, cfg: &Config) -> i64 {
    let p = place(key, cfg);
    let (Some(b1), Some(b2)) = (FLOWS4.get_ptr_mut(p.first), FLOWS4.get_ptr_mut(p.second)) else {
        return -E2BIG;
    };
    // SAFETY: an aligned field of a live array value, changed only atomically.
    let lock = unsafe { &raw mut (*b1).lock };
    // SAFETY: as above.
    if unsafe { atomic::cmpxchg(lock, 0, 1) } != 0 {
        return -EAGAIN;
    }
    let r = claim_slots(key, rkey, cfg, &p, b1, b2);
    if r < 0 {
        // SAFETY: as above; a plain store, after the compare-and-swaps.
        unsafe { core::ptr::write_volatile(lock, 0) };
    }
    r
}

/// `reserve_slots`' slots, with the first bucket's lock held: no other CPU inserts `key`
/// meanwhile (and none `rkey`, whose claim word is the caller's). `-E2BIG`, with no slot
/// claimed, when there is no room for both.
#[inline(always)]
fn claim_slots(
    key: &FlowKey4,
    rkey: &FlowKey4,
    cfg: &Config,
    p: &Place,
    b1: *mut Bucket,
    b2: *mut Bucket,
) -> i64 {
    let words = key_words(key);
    let free1 = scan(b1, p, &words);
    let free2 = if p.second == p.first {
        0
    } else {
        scan(b2, p, &words)
    };
    // The emptier bucket; its first free slot (inserts of other keys may be claiming too).
    let (free1, free2) = (opaque(free1 as u64), opaque(free2 as u64));
    let fwd_second = free2 > free1;
    let fb = if fwd_second { b2 } else { b1 };
    // Through `opaque`: one unknown value rather than one path per slot index.
    let fi = opaque(claim_slot(fb, p.tag) as u64) as usize;
    if fi >= WAYS {
        return -E2BIG;
    }
    let (free1, free2) = if fwd_second {
        (free1, free2.saturating_sub(1))
    } else {
        (free1.saturating_sub(1), free2)
    };
    let rev_second = free2 > free1;
    let ri =
        opaque(claim_slot(if rev_second { b2 } else { b1 }, place(rkey, cfg).tag) as u64) as usize;
    if ri < WAYS {
        let at = (fwd_second as usize) << 8 | (rev_second as usize) << 9;
        return opaque((fi | ri << 4 | at) as u64) as Slots;
    }
    // No slot for the reply entry: the forward entry's goes back.
    if let Some(fi) = opaque_index(fi) {
        // SAFETY: the forward entry's claimed slot, ours: given back.
        unsafe { atomic::cmpxchg(&raw mut (*fb).tags[fi], p.tag | PENDING, EMPTY) };
    }
    -E2BIG
}

/// Second half of the insert `reserve_slots` began: fills its slots with `fwd` under `key`
/// and `rev` under `rkey`, publishes them, releases the lock and stores the claim word.
///
/// Where the CPU makes stores visible in program order (`config_flags::TOTAL_STORE_ORDER`),
/// each is a plain store, after the slots' stores: the slots' cache lines, cold, are then
/// written while the program goes on, where a compare-and-swap would wait for them. Elsewhere
/// the tags and the claim word are stored by compare-and-swaps, which order what came before
/// them.
#[inline(always)]
pub fn publish(key: &FlowKey4, fwd: &Flow, rkey: &FlowKey4, rev: &Flow, slots: Slots) {
    let Some(cfg) = config() else {
        return;
    };
    let p = place(key, cfg);
    let rtag = place(rkey, cfg).tag;
    let bucket = |second: bool| if second { p.second } else { p.first };
    let (fwd_at, rev_at) = (bucket(slots & 1 << 8 != 0), bucket(slots & 1 << 9 != 0));
    let (Some(b1), Some(fb), Some(rb), Some(c)) = (
        FLOWS4.get_ptr_mut(p.first),
        FLOWS4.get_ptr_mut(fwd_at),
        FLOWS4.get_ptr_mut(rev_at),
        claim_word(rkey, cfg),
    ) else {
        return;
    };
    let (Some(fi), Some(ri)) = (
        opaque_index(slots as usize & 15),
        opaque_index(slots as usize >> 4 & 15),
    ) else {
        return;
    };
    let ordered = cfg.flags & config_flags::TOTAL_STORE_ORDER != 0;
    // SAFETY: both slots were claimed by `reserve_slots` and are ours until published; the
    // lock and the claim word are ours too. Aligned words of live array values.
    unsafe {
        fill(&raw mut (*fb).slots[fi], &key_words(key), fwd);
        fill(&raw mut (*rb).slots[ri], &key_words(rkey), rev);
        let (ft, rt) = (&raw mut (*fb).tags[fi], &raw mut (*rb).tags[ri]);
        if ordered {
            core::ptr::write_volatile(ft, p.tag | LIVE);
            core::ptr::write_volatile(rt, rtag | LIVE);
            core::ptr::write_volatile(c, placed(rev_at));
        } else {
            atomic::cmpxchg(ft, p.tag | PENDING, p.tag | LIVE);
            atomic::cmpxchg(rt, rtag | PENDING, rtag | LIVE);
            atomic::cmpxchg(c, CLAIMED, placed(rev_at));
        }
        // A plain store: the lock only keeps out inserts of `key`, which see the forward
        // entry once it is visible.
        core::ptr::write_volatile(&raw mut (*b1).lock, 0);
    }
}

/// Claims the first free slot of bucket `b` for a key of tag `tag` (inserts of other keys may
/// be claiming too): its index, or `WAYS` when there is none.
#[inline(always)]
fn claim_slot(b: *mut Bucket, tag: u64) -> usize {
    let pending = tag | PENDING;
    for i in 0..WAYS {
        // SAFETY: an aligned tag word of a live array value, changed only atomically.
        unsafe {
            let t = &raw mut (*b).tags[i];
            if atomic::load(t) == EMPTY && atomic::cmpxchg(t, EMPTY, pending) == EMPTY {
                return i;
            }
        }
    }
    WAYS
}

/// Writes `words` and `flow` into the claimed slot `s`, word by word, with volatile stores (a
/// struct copy would go through the stack).
///
/// # Safety
/// `s` must be a slot of a live array value, claimed by the caller and not yet published.
#[inline(always)]
unsafe fn fill(s: *mut Slot, words: &[u64; 2], flow: &Flow) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        let dst = (&raw mut (*s).key).cast::<u64>();
        core::ptr::write_volatile(dst, words[0]);
        core::ptr::write_volatile(dst.add(1), words[1]);
        let (src, dst) = (
            (flow as *const Flow).cast::<u64>(),
            (&raw mut (*s).flow).cast::<u64>(),
        );
        for w in 0..core::mem::size_of::<Flow>() / 8 {
            core::ptr::write_volatile(dst.add(w), *src.add(w));
        }
    }
}

/// Free slots of bucket `b`, after removing `key`'s entry there.
#[inline(always)]
fn scan(b: *mut Bucket, p: &Place, words: &[u64; 2]) -> u32 {
    let mut free = 0;
    for i in 0..WAYS {
        // SAFETY: an aligned tag word of a live array value, changed only atomically.
        unsafe {
            let t = &raw mut (*b).tags[i];
            let tag = atomic::load(t);
            if tag == EMPTY {
                free += 1;
            } else if tag == p.tag | LIVE && holds(b, i, words) {
                atomic::cmpxchg(t, tag, EMPTY);
                free += 1;
            }
        }
    }
    free
}
