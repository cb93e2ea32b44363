//! Copies of addresses and MACs as word loads and stores. Array assignments would become
//! calls to byte-loop `memmove`/`memcpy` functions on this target, which cost far more than the
//! few instructions here and add stack frames.
use core::ptr::{read_unaligned as rd, write_unaligned as wr};

/// Copies an address (four 32-bit words) between any two locations.
///
/// # Safety
/// Both pointers must be valid for 16 bytes (packet data bounds-checked, or map values).
#[inline(always)]
pub unsafe fn addr(dst: *mut [u32; 4], src: *const [u32; 4]) {
    let (d, s) = (dst as *mut u32, src as *const u32);
    // SAFETY: guaranteed by the caller.
    unsafe {
        wr(d, rd(s));
        wr(d.add(1), rd(s.add(1)));
        wr(d.add(2), rd(s.add(2)));
        wr(d.add(3), rd(s.add(3)));
    }
}

/// Reads an address (four 32-bit words) from any location.
///
/// # Safety
/// `src` must be valid for 16 bytes.
#[inline(always)]
pub unsafe fn read_addr(src: *const [u32; 4]) -> [u32; 4] {
    let s = src as *const u32;
    // SAFETY: guaranteed by the caller.
    unsafe { [rd(s), rd(s.add(1)), rd(s.add(2)), rd(s.add(3))] }
}

/// Copies a MAC address (6 bytes) between any two locations.
///
/// # Safety
/// Both pointers must be valid for 6 bytes.
#[inline(always)]
pub unsafe fn mac(dst: *mut [u8; 6], src: *const [u8; 6]) {
    let (d, s) = (dst as *mut u8, src as *const u8);
    // SAFETY: guaranteed by the caller.
    unsafe {
        wr(d as *mut u32, rd(s as *const u32));
        wr(d.add(4) as *mut u16, rd(s.add(4) as *const u16));
    }
}
