//! The IPv4 flow table, `FLOWS4`: an array of buckets that the XDP program and the daemon
//! share through a memory mapping, instead of a kernel hash map.
//!
//! A lookup in a kernel hash map is a helper call with three more calls behind it (hash, bucket
//! walk, key compare); on CPUs that mitigate return-stack attacks every return costs a
//! misprediction, more than the whole established path's own work. An array lookup is inlined
//! by the verifier, so the table's lookup is plain loads and compares in the program.
//!
//! Layout: a key hashes (with a per-table random seed, so that clients cannot aim at one
//! bucket) to two candidate buckets and a 62-bit tag. A bucket is a lock word and `WAYS` tag
//! words (two cache lines) followed by `WAYS` slots (key and `Flow`); a lookup compares the
//! tags of both buckets and the key of a slot whose tag matches. A new entry goes to the
//! emptier of its two buckets (the "power of two choices" keeps buckets even: with
//! `buckets_for`'s five eighths load at a full table no bucket overflows in practice).
//!
//! A tag word's low two bits are its slot's state (`EMPTY`, `PENDING`, `LIVE`); the other
//! bits are the key's tag. An insert holds the lock of its key's first bucket (taken by a
//! compare-and-swap, never waited for: a CPU that finds it taken gives up), so that two CPUs
//! never insert one key at once; it claims a slot in either bucket by a compare-and-swap of its
//! tag word from `EMPTY` to `PENDING` (inserts of other keys may share the bucket), fills it,
//! and publishes it as `LIVE` (by a compare-and-swap, or a plain store after the slot's where
//! the CPU keeps stores in order: `config_flags::TOTAL_STORE_ORDER`). Readers take `LIVE`
//! slots only. Removal is a compare-and-swap from the `LIVE` tag to `EMPTY`, by the program or
//! by the daemon through the mapping, without the lock.
//!
//! Both entries of a connection live in the buckets of its forward (client) key, so that
//! opening it touches one pair of random buckets, not two. The reply entry is found through
//! `CLAIMS4`, an array of claim words indexed by the reply key (`claim_of`): the backend, SNAT
//! address and protocol choose where a run of words starts, the SNAT port the word in it. A
//! new flow reserves its SNAT port by a compare-and-swap of that word from `UNCLAIMED` to
//! `CLAIMED` (so two live flows never share a reply key), inserts both entries, and then
//! stores `placed(bucket)`, the bucket of its reply entry. Removing a reply entry empties its
//! slot first and then releases its word, so a word is never free while its entry is live.
use crate::{Flow, FlowKey4};

/// Slots per bucket.
pub const WAYS: usize = 15;

/// Slot states, the low bits of a tag word.
pub const EMPTY: u64 = 0;
pub const PENDING: u64 = 1;
pub const LIVE: u64 = 2;
pub const STATE_MASK: u64 = 3;

/// Claim words (`CLAIMS4`) for `conntrack_size` connections: a power of two, four times as
/// many, so that a SNAT port a new flow asks for is taken by another flow's word (of another
/// backend's run) at most a quarter of the time at a full table.
pub const fn claims_for(conntrack_size: u32) -> u32 {
    let n = conntrack_size as u64 * 4;
    if n <= 1 {
        1
    } else if n >= 1 << 31 {
        1 << 31
    } else {
        n.next_power_of_two() as u32
    }
}

/// Claim word states: free; reserved by a flow being opened; `placed`.
pub const UNCLAIMED: u64 = 0;
pub const CLAIMED: u64 = 1;
const PLACED: u64 = 3;

/// The claim word of a flow whose reply entry is in bucket `bucket`.
#[inline(always)]
pub const fn placed(bucket: u32) -> u64 {
    (bucket as u64) << 32 | PLACED
}

/// The bucket of the reply entry a claim word points to, if it is `placed`.
#[inline(always)]
pub const fn placed_bucket(word: u64) -> Option<u32> {
    if word & PLACED == PLACED {
        Some((word >> 32) as u32)
    } else {
        None
    }
}

/// The `CLAIMS4` word (of `claims`, a power of two) of the reply key `key`: its SNAT port's
/// word in the run of its backend, SNAT address and protocol. Distinct ports of one run have
/// distinct words (up to `claims` ports).
#[inline(always)]
pub fn claim_of(key: &FlowKey4, seed: u64, claims: u32) -> u32 {
    let [w0, w1] = key_words(key);
    // The destination port (the SNAT port) is bits 16..32 of the second word.
    let port = u16::from_be((w1 >> 16) as u16) as u32;
    let mut h = (w0 ^ seed.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 29) ^ (w1 & !0xffff_0000)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 32;
    (h as u32).wrapping_add(port) & claims.wrapping_sub(1)
}

/// One entry: a direction of a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Slot {
    pub key: FlowKey4,
    pub flow: Flow,
}

/// One element of the `FLOWS4` array.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    /// Held (1) by an insert of a key whose first bucket this is.
    pub lock: u64,
    /// Per slot: the key's tag and the slot's state.
    pub tags: [u64; WAYS],
    pub slots: [Slot; WAYS],
}

/// Buckets for `conntrack_size` connections (two entries each, in the buckets of one key) at
/// five eighths load.
pub const fn buckets_for(conntrack_size: u32) -> u32 {
    let b = (conntrack_size as u64 * 2 * 8).div_ceil(5 * WAYS as u64);
    if b == 0 {
        1
    } else if b > u32::MAX as u64 {
        u32::MAX
    } else {
        b as u32
    }
}

/// Where a key may be: its two candidate buckets and its tag (state bits clear).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub first: u32,
    pub second: u32,
    pub tag: u64,
}

impl Place {
    /// `key`'s place in a table of `buckets` buckets hashed with `seed`.
    #[inline(always)]
    pub fn of(key: &FlowKey4, seed: u64, buckets: u32) -> Place {
        let [w0, w1] = key_words(key);
        let mut h = (w0 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 29) ^ w1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 32;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 29;
        // Multiply-shift maps 32 bits onto [0, buckets) without a division.
        let n = buckets as u64;
        Place {
            first: (((h & 0xffff_ffff) * n) >> 32) as u32,
            second: (((h >> 32) * n) >> 32) as u32,
            tag: h & !STATE_MASK,
        }
    }
}

/// `key_words` of the key of these fields, without the key in memory.
#[inline(always)]
pub fn words(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> [u64; 2] {
    key_words(&FlowKey4 {
        src,
        dst,
        sport,
        dport,
        proto,
        _pad0: 0,
        _pad1: 0,
    })
}

/// The key as the two words a slot is compared by (its memory, read as two u64s: the
/// program and the daemon run on one machine, so both read the same words).
#[inline(always)]
pub fn key_words(key: &FlowKey4) -> [u64; 2] {
    // SAFETY: `FlowKey4` is 16 bytes of plain integers without implicit padding.
    unsafe { core::ptr::read_unaligned((key as *const FlowKey4).cast::<[u64; 2]>()) }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// Keys as real traffic has them: clients from a few subnets, ports in sequence, towards a
    /// few VIPs; and each connection's reply key (backend, SNAT address and port).
    fn keys(n: u32) -> impl Iterator<Item = [FlowKey4; 2]> {
        (0..n).map(|i| {
            let client = FlowKey4 {
                src: u32::from_be_bytes([
                    10,
                    (i >> 24) as u8 & 3,
                    (i >> 16) as u8,
                    1 + (i & 7) as u8,
                ]),
                dst: u32::from_be_bytes([10, 0, 0, 100 + ((i >> 3) & 3) as u8]),
                sport: (32768 + ((i >> 5) & 0x7fff) as u16).to_be(),
                dport: 443u16.to_be(),
                proto: crate::PROTO_TCP,
                ..FlowKey4::default()
            };
            let reply = FlowKey4 {
                src: u32::from_be_bytes([10, 0, 2, 2 + (i % 12) as u8]),
                dst: u32::from_be_bytes([10, 0, 1, 1 + ((i / 12) % 4) as u8]),
                sport: 8080u16.to_be(),
                dport: (1024 + (i / 48) % 31000) as u16,
                proto: crate::PROTO_TCP,
                ..FlowKey4::default()
            };
            [client, reply]
        })
    }

    /// The program's placement (the emptier candidate bucket) over a whole table's worth of
    /// connections, then as many again opened while random ones close: no insert may find both
    /// of its buckets full.
    #[test]
    fn buckets_never_overflow_at_a_full_table() {
        let conntrack = 262_144u32;
        let buckets = buckets_for(conntrack);
        let seed = 0x243f_6a88_85a3_08d3;
        let mut load = std::vec![0u8; buckets as usize];
        let mut placed: Vec<u32> = Vec::new();
        let (mut overflows, mut max) = (0, 0);
        let mut insert = |k: &FlowKey4, load: &mut Vec<u8>, placed: &mut Vec<u32>| {
            let p = Place::of(k, seed, buckets);
            assert!(p.first < buckets && p.second < buckets);
            let b = if load[p.second as usize] < load[p.first as usize] {
                p.second
            } else {
                p.first
            };
            if load[b as usize] as usize == WAYS {
                overflows += 1;
                return;
            }
            load[b as usize] += 1;
            max = max.max(load[b as usize]);
            placed.push(b);
        };
        // Both entries of a connection are placed by its client key.
        let mut all = keys(2 * conntrack);
        for [client, _] in all.by_ref().take(conntrack as usize) {
            for _ in 0..2 {
                insert(&client, &mut load, &mut placed);
            }
        }
        // Churn: close a pseudo-random connection's two entries, open the next one.
        let mut x = 0x9e37_79b9u64;
        for [client, _] in all {
            for _ in 0..2 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let j = (x % placed.len() as u64) as usize;
                load[placed.swap_remove(j) as usize] -= 1;
                insert(&client, &mut load, &mut placed);
            }
        }
        assert_eq!(
            overflows, 0,
            "inserts that found both buckets full (fullest: {max})"
        );
        assert!(max as usize <= WAYS);
    }
}
