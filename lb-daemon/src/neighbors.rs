//! Keeps the link-layer addresses of backends resolved.
//!
//! The XDP program asks the kernel's FIB for the next hop of a new flow, and the FIB only
//! answers with a MAC address the neighbour table already holds; XDP cannot resolve one. An
//! ICMP (or ICMPv6) echo to each backend makes the kernel resolve (and keep refreshing) the entry without
//! touching the backend's service ports.

use std::{
    collections::HashSet,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

/// Sends an echo request to each address and waits (up to `timeout`) for the replies.
/// Returns the addresses that answered; the caller reports the others.
pub fn prime(addrs: &[IpAddr], timeout: Duration) -> std::io::Result<HashSet<IpAddr>> {
    let deadline = Instant::now() + timeout;
    let mut answered = HashSet::new();
    for v6 in [false, true] {
        let targets: HashSet<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv6() == v6)
            .collect();
        if !targets.is_empty() {
            answered.extend(ping(&targets, v6, deadline)?);
        }
    }
    Ok(answered)
}

fn ping(
    targets: &HashSet<IpAddr>,
    v6: bool,
    deadline: Instant,
) -> std::io::Result<HashSet<IpAddr>> {
    let sock = if v6 {
        // The kernel fills in ICMPv6 checksums on raw sockets.
        Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?
    } else {
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?
    };
    let ident = (std::process::id() & 0xffff) as u16;
    for (seq, ip) in targets.iter().enumerate() {
        let packet = echo_request(if v6 { 128 } else { 8 }, ident, seq as u16);
        // A send error (no route) just means no answer; the caller reports missing ones.
        let _ = sock.send_to(&packet, &SocketAddr::new(*ip, 0).into());
    }
    let mut answered = HashSet::new();
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    while answered.len() < targets.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left))?;
        let (_, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e),
        };
        // Any packet from the target proves its link-layer address is resolved.
        if let Some(from) = from.as_socket().map(|s| s.ip())
            && targets.contains(&from)
        {
            answered.insert(from);
        }
    }
    Ok(answered)
}

/// An ICMP (type 8) or ICMPv6 (type 128) echo request with an 8-byte payload. The ICMPv6
/// checksum computed here is replaced by the kernel's (it covers a pseudo-header).
fn echo_request(kind: u8, ident: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = kind;
    p[4..6].copy_from_slice(&ident.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"lb-neigh");
    let sum = internet_checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksum_verifies() {
        let p = echo_request(8, 0x1234, 7);
        // A packet including its own checksum sums to 0xffff (checksum 0).
        assert_eq!(internet_checksum(&p), 0);
    }
}
