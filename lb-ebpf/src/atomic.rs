//! Atomic operations on map values. The BPF target's `core::sync::atomic` lacks read-modify-
//! write methods, so these wrap the compiler intrinsics, which lower to BPF atomic
//! instructions (`lock xadd`, `atomic_fetch_or`, `cmpxchg`).
use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xadd};

/// Adds `v` to `*p`.
///
/// # Safety
/// `p` must point to a live, aligned u64 (a field of a map value).
#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// Sets `bits` in `*p` and returns the previous value.
///
/// # Safety
/// `p` must point to a live, aligned u64 (a field of a map value).
#[inline(always)]
pub unsafe fn fetch_or(p: *mut u64, bits: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(p, bits) }
}

/// Stores `new` in `*p` if it holds `old`; returns the value it held (`old` on success).
///
/// # Safety
/// `p` must point to a live, aligned u64 (a field of a map value).
#[inline(always)]
pub unsafe fn cmpxchg(p: *mut u64, old: u64, new: u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(p, old, new).0
    }
}

/// Reads `*p` once, as other CPUs may be adding to it. An aligned 64-bit BPF load is
/// single-copy atomic; the baseline CPU has no atomic-load instruction to ask for it.
///
/// # Safety
/// `p` must point to a live, aligned u64 (a field of a map value).
#[inline(always)]
pub unsafe fn load(p: *const u64) -> u64 {
    // SAFETY: guaranteed by the caller.
    unsafe { core::ptr::read_volatile(p) }
}
