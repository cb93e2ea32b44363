//! Building and checking frames for packet tests, independently of the data plane's code:
//! checksums here are computed from scratch, never incrementally.

use std::net::IpAddr;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// One end of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub mac: [u8; 6],
    pub ip: IpAddr,
    pub port: u16,
}

/// The transport of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp { flags: u8, seq: u32 },
    Udp,
}

/// A TCP SYN from `src` to `dst`.
pub fn syn(src: End, dst: End) -> Vec<u8> {
    frame(
        src,
        dst,
        L4::Tcp {
            flags: TCP_SYN,
            seq: 1000,
        },
        &[],
    )
}

/// A TCP/IPv4 frame (the common case in tests).
pub fn tcp_frame(src: End, dst: End, flags: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    frame(src, dst, L4::Tcp { flags, seq }, payload)
}

/// An Ethernet + IPv4/IPv6 + TCP/UDP frame with correct checksums. Both ends must be of the
/// same address family.
pub fn frame(src: End, dst: End, l4: L4, payload: &[u8]) -> Vec<u8> {
    let mut seg = match l4 {
        L4::Tcp { flags, seq } => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&src.port.to_be_bytes());
            t[2..4].copy_from_slice(&dst.port.to_be_bytes());
            t[4..8].copy_from_slice(&seq.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = flags;
            t[14..16].copy_from_slice(&64240u16.to_be_bytes());
            t
        }
        L4::Udp => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&src.port.to_be_bytes());
            u[2..4].copy_from_slice(&dst.port.to_be_bytes());
            u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            u
        }
    };
    seg.extend_from_slice(payload);
    let proto = match l4 {
        L4::Tcp { .. } => 6,
        L4::Udp => 17,
    };
    let c = l4_checksum(src.ip, dst.ip, proto, &seg);
    let off = if proto == 6 { 16 } else { 6 };
    seg[off..off + 2].copy_from_slice(&c.to_be_bytes());
    ethernet(src.mac, dst.mac, &ip_packet(src.ip, dst.ip, proto, &seg))
}

/// An Ethernet frame around an IP packet (the ether type follows the IP version).
pub fn ethernet(src: [u8; 6], dst: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + ip.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(if ip[0] >> 4 == 6 {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    f.extend_from_slice(ip);
    f
}

/// An IP packet (IPv4 with no options, don't-fragment set; or IPv6) carrying `payload`.
pub fn ip_packet(src: IpAddr, dst: IpAddr, proto: u8, payload: &[u8]) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&0x1c46u16.to_be_bytes());
            ip[6] = 0x40;
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip.extend_from_slice(payload);
            ip
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            ip.extend_from_slice(payload);
            ip
        }
        _ => panic!("mixed address families: {src} → {dst}"),
    }
}

/// An ICMP error from `from` to `to` quoting `quoted` (an IP packet): IPv4 "fragmentation
/// needed" (type 3 code 4, MTU 1400) or ICMPv6 "packet too big" (type 2, MTU 1400).
pub fn icmp_error(from: End, to: End, quoted: &[u8]) -> Vec<u8> {
    let v6 = from.ip.is_ipv6();
    let mut m = vec![0u8; 8];
    if v6 {
        m[0] = 2;
        m[4..8].copy_from_slice(&1400u32.to_be_bytes());
    } else {
        m[0] = 3;
        m[1] = 4;
        m[6..8].copy_from_slice(&1400u16.to_be_bytes());
    }
    m.extend_from_slice(quoted);
    let proto = if v6 { 58 } else { 1 };
    let c = if v6 {
        l4_checksum(from.ip, to.ip, 58, &m)
    } else {
        checksum(&m)
    };
    m[2..4].copy_from_slice(&c.to_be_bytes());
    ethernet(from.mac, to.mac, &ip_packet(from.ip, to.ip, proto, &m))
}

/// The fields of a frame that a balancer rewrites, parsed back.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// Offset of the transport header.
    pub l4: usize,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (0 otherwise).
    pub flags: u8,
}

pub fn parse(f: &[u8]) -> Parsed {
    assert!(f.len() >= 14 + 20, "frame too short: {}", f.len());
    let (src, dst, proto, l4) = if f[12..14] == [0x86, 0xdd] {
        let s: [u8; 16] = f[22..38].try_into().unwrap();
        let d: [u8; 16] = f[38..54].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), f[20], 54)
    } else {
        let ihl = (f[14] & 0x0f) as usize * 4;
        let s: [u8; 4] = f[26..30].try_into().unwrap();
        let d: [u8; 4] = f[30..34].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), f[23], 14 + ihl)
    };
    Parsed {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src,
        dst,
        proto,
        l4,
        sport: u16::from_be_bytes([f[l4], f[l4 + 1]]),
        dport: u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]),
        flags: if proto == 6 { f[l4 + 13] } else { 0 },
    }
}

/// True when every checksum of the frame verifies: the IPv4 header's, and the transport's
/// (TCP, UDP unless zero over IPv4, ICMP, ICMPv6). For an ICMP error the quoted IP header's
/// checksum is checked too.
pub fn checksums_ok(f: &[u8]) -> bool {
    let p = parse(f);
    let v6 = p.src.is_ipv6();
    let ip_end = if v6 {
        54 + u16::from_be_bytes([f[18], f[19]]) as usize
    } else {
        if checksum(&f[14..p.l4]) != 0 {
            return false;
        }
        14 + u16::from_be_bytes([f[16], f[17]]) as usize
    };
    let seg = &f[p.l4..ip_end];
    match p.proto {
        6 | 58 => l4_checksum(p.src, p.dst, p.proto, seg) == 0,
        17 => (!v6 && seg[6..8] == [0, 0]) || l4_checksum(p.src, p.dst, 17, seg) == 0,
        1 => checksum(seg) == 0 && checksum(&seg[8..8 + (seg[8] & 0x0f) as usize * 4]) == 0,
        _ => false,
    }
}

/// The transport checksum over `seg` with the pseudo-header: 0 when `seg` holds a correct one.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, seg: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + seg.len());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed address families: {src} → {dst}"),
    }
    pseudo.extend_from_slice(seg);
    checksum(&pseudo)
}

/// RFC 1071 Internet checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(ip: &str, port: u16) -> End {
        End {
            mac: [2, 0, 0, 0, 0, port as u8],
            ip: ip.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn built_frames_verify_and_parse_back() {
        for (a, b) in [("10.0.1.2", "10.0.0.100"), ("fd00:1::2", "fd00::100")] {
            for l4 in [
                L4::Tcp {
                    flags: TCP_ACK | TCP_PSH,
                    seq: 7,
                },
                L4::Udp,
            ] {
                let f = frame(end(a, 40000), end(b, 80), l4, b"hello, world");
                assert!(checksums_ok(&f), "{a} {l4:?}");
                let p = parse(&f);
                assert_eq!(
                    (p.src, p.dst, p.sport, p.dport),
                    (a.parse().unwrap(), b.parse().unwrap(), 40000, 80)
                );
                let mut bad = f.clone();
                *bad.last_mut().unwrap() ^= 1;
                assert!(!checksums_ok(&bad), "{a} {l4:?}");
            }
        }
    }

    #[test]
    fn icmp_errors_verify() {
        for (a, b) in [("10.0.2.2", "10.0.2.1"), ("fd00:2::2", "fd00:2::1")] {
            let quoted = frame(end(b, 40000), end(a, 8080), L4::Udp, b"x");
            let e = icmp_error(end(a, 0), end(b, 0), &quoted[14..]);
            assert!(checksums_ok(&e), "{a}");
        }
    }
}
