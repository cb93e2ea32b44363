//! Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
//!
//! Values are the raw 16-bit words as they sit in memory; the one's-complement sum is
//! byte-order independent, so no swapping is needed as long as all operands agree.

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum after a 32-bit field changed from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nf = !from;
    let s = (!check) as u32 + (nf & 0xffff) + (nf >> 16) + (to & 0xffff) + (to >> 16);
    !fold(s)
}

/// The checksum after a 16-bit field changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    !fold((!check) as u32 + (!from) as u32 + to as u32)
}

/// The checksum after a 128-bit field (an IPv6 address, as four raw words) changed.
#[inline(always)]
pub fn replace16(mut check: u16, from: &[u32; 4], to: &[u32; 4]) -> u16 {
    check = replace4(check, from[0], to[0]);
    check = replace4(check, from[1], to[1]);
    check = replace4(check, from[2], to[2]);
    replace4(check, from[3], to[3])
}

/// The one's-complement difference of a 32-bit field changing from `from` to `to`, to be summed
/// with others and applied once (`apply`).
#[inline(always)]
pub fn diff4(from: u32, to: u32) -> u64 {
    (!from) as u64 + to as u64
}

/// As `diff4`, for a 16-bit field.
#[inline(always)]
pub fn diff2(from: u16, to: u16) -> u64 {
    (!from) as u64 + to as u64
}

/// As `diff4`, for a 128-bit field (an IPv6 address, as four raw words).
#[inline(always)]
pub fn diff16(from: &[u32; 4], to: &[u32; 4]) -> u64 {
    diff4(from[0], to[0]) + diff4(from[1], to[1]) + diff4(from[2], to[2]) + diff4(from[3], to[3])
}

/// The checksum after changes whose summed differences are `d` (any sum of fewer than 32
/// `diff4`/`diff2` terms: below 2^37, which three 16-bit folds bring below 2^16).
#[inline(always)]
pub fn apply(check: u16, d: u64) -> u16 {
    let mut s = (!check) as u64 + d;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}
