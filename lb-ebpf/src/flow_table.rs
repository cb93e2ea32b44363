//! `FLOWS4`, the IPv4 flow table: its layout and the claim protocol are in
//! `lb_common::flow_table`. Lookups are inlined (array lookups are, by the verifier); inserts
//! and removals are BPF functions of their own.
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, PerCpuArray},
};
use lb_common::{
    CONNTRACK_MAX, Flow, FlowKey4,
    flow_table::{Bucket, EMPTY, LIVE, PENDING, Place, Slot, WAYS, buckets_for, key_words},
};

use crate::{CONFIG, atomic};

/// Sized by the daemon at load time (`buckets_for(--conntrack-size)`), and mapped by it.
#[map]
static FLOWS4: Array<Bucket> = Array::with_max_entries(buckets_for(CONNTRACK_MAX), BPF_F_MMAPABLE);

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
/// The key is in the table (and was not to be replaced).
pub const EEXIST: i64 = 17;

#[inline(always)]
fn place(key: &FlowKey4) -> Option<Place> {
    let cfg = CONFIG.get_ptr(0)?;
    // SAFETY: array value, valid for the duration of this run.
    let (seed, buckets) = unsafe { ((*cfg).flow4_seed, (*cfg).flow4_buckets) };
    Some(Place::of(key, seed, buckets))
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

/// The live entry of `key`: the first bucket's tags, then the second's (loading the second
/// from the start, in case).
#[inline(always)]
pub fn lookup(key: &FlowKey4) -> Option<*mut Flow> {
    let p = place(key)?;
    let words = key_words(key);
    if let Some(b2) = FLOWS4.get_ptr(p.second) {
        touch(b2);
    }
    let (_, s) =
        find(p.first, p.tag | LIVE, &words).or_else(|| find(p.second, p.tag | LIVE, &words))?;
    // SAFETY: a slot of a live array value.
    Some(unsafe { &raw mut (*s).flow })
}

/// Starts loading the first tag lines of both of `key`'s buckets (see `touch`), for an access
/// to come.
#[inline(always)]
pub fn prefetch(key: &FlowKey4) {
    let Some(p) = place(key) else {
        return;
    };
    if let Some(b) = FLOWS4.get_ptr(p.first) {
        touch(b);
    }
    if let Some(b) = FLOWS4.get_ptr(p.second) {
        touch(b);
    }
}

/// Removes the entry of `key`, if any.
#[inline(never)]
pub fn remove(key: &FlowKey4) {
    let Some(p) = place(key) else {
        return;
    };
    let words = key_words(key);
    let live = p.tag | LIVE;
    if let Some((t, _)) = find(p.first, live, &words).or_else(|| find(p.second, live, &words)) {
        // SAFETY: an aligned tag word of a live array value.
        unsafe { atomic::cmpxchg(t, live, EMPTY) };
    }
}

/// Inserts `flow` under `key`; an entry of `key` already there is removed first when
/// `replace`, else the insert fails with `-EEXIST`. Returns 0 or the negative error.
#[inline(never)]
pub fn insert(key: &FlowKey4, flow: &Flow, replace: bool) -> i64 {
    let Some(p) = place(key) else {
        return -E2BIG;
    };
    let (Some(b1), Some(b2)) = (FLOWS4.get_ptr_mut(p.first), FLOWS4.get_ptr_mut(p.second)) else {
        return -E2BIG;
    };
    touch(b2);
    // SAFETY: an aligned field of a live array value, changed only atomically.
    let lock = unsafe { &raw mut (*b1).lock };
    // SAFETY: as above.
    if unsafe { atomic::cmpxchg(lock, 0, 1) } != 0 {
        return -EAGAIN;
    }
    let r = insert_locked(key, flow, replace, &p, b1, b2);
    // SAFETY: as above. A plain store: the insert's last step, the compare-and-swap that
    // publishes its slot, already ordered everything before it.
    unsafe { core::ptr::write_volatile(lock, 0) };
    r
}

/// `insert`, with the first bucket's lock held: no other CPU inserts this key meanwhile.
#[inline(always)]
fn insert_locked(
    key: &FlowKey4,
    flow: &Flow,
    replace: bool,
    p: &Place,
    b1: *mut Bucket,
    b2: *mut Bucket,
) -> i64 {
    let words = key_words(key);
    let free1 = match scan(b1, p, &words, replace) {
        Ok(n) => n,
        Err(e) => return e,
    };
    let free2 = if p.second == p.first {
        0
    } else {
        match scan(b2, p, &words, replace) {
            Ok(n) => n,
            Err(e) => return e,
        }
    };
    // The emptier bucket; its first free slot (inserts of other keys may be claiming too).
    let (free1, free2) = (opaque(free1 as u64), opaque(free2 as u64));
    let b = if free2 > free1 { b2 } else { b1 };
    let pending = p.tag | PENDING;
    let mut claimed = WAYS;
    for i in 0..WAYS {
        // SAFETY: fields of a live array value; tag words are changed only atomically.
        unsafe {
            let t = &raw mut (*b).tags[i];
            if atomic::load(t) == EMPTY && atomic::cmpxchg(t, EMPTY, pending) == EMPTY {
                claimed = i;
                break;
            }
        }
    }
    let Some(claimed) = opaque_index(claimed) else {
        return -E2BIG;
    };
    // SAFETY: the claimed slot is ours until published; word by word, with volatile stores
    // (a struct copy would go through the stack).
    unsafe {
        let s = &raw mut (*b).slots[claimed];
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
        // The compare-and-swap orders the slot's stores before the tag's.
        atomic::cmpxchg(&raw mut (*b).tags[claimed], pending, p.tag | LIVE);
    }
    0
}

/// Free slots of bucket `b`, after removing `key`'s entry there when `replace`; `-EEXIST`
/// when it is there and not to be replaced.
#[inline(always)]
fn scan(b: *mut Bucket, p: &Place, words: &[u64; 2], replace: bool) -> Result<u32, i64> {
    let mut free = 0;
    for i in 0..WAYS {
        // SAFETY: an aligned tag word of a live array value, changed only atomically.
        unsafe {
            let t = &raw mut (*b).tags[i];
            let tag = atomic::load(t);
            if tag == EMPTY {
                free += 1;
            } else if tag == p.tag | LIVE && holds(b, i, words) {
                if !replace {
                    return Err(-EEXIST);
                }
                atomic::cmpxchg(t, tag, EMPTY);
                free += 1;
            }
        }
    }
    Ok(free)
}
