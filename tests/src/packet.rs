//! Building and checking frames for packet tests, independently of the data plane's code:
//! checksums here are computed from scratch, never incrementally.

use std::net::Ipv4Addr;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// One end of a TCP/IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// An Ethernet + IPv4 + TCP frame with the given flags and payload, checksums correct.
pub fn tcp_frame(src: End, dst: End, flags: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(54 + payload.len());
    f.extend_from_slice(&dst.mac);
    f.extend_from_slice(&src.mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let tot_len = (20 + 20 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1c46u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.ip.octets());
    ip[16..20].copy_from_slice(&dst.ip.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.port.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    f.extend_from_slice(&tcp);
    f.extend_from_slice(payload);
    let c = tcp_checksum(&f);
    f[14 + 20 + 16..14 + 20 + 18].copy_from_slice(&c.to_be_bytes());
    f
}

/// The fields of a TCP/IPv4 frame that a balancer rewrites, parsed back.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub payload_len: usize,
}

pub fn parse(f: &[u8]) -> Parsed {
    assert!(f.len() >= 54, "frame too short: {}", f.len());
    let ihl = (f[14] & 0x0f) as usize * 4;
    let l4 = 14 + ihl;
    let doff = (f[l4 + 12] >> 4) as usize * 4;
    let tot = u16::from_be_bytes([f[16], f[17]]) as usize;
    Parsed {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src: Ipv4Addr::new(f[26], f[27], f[28], f[29]),
        dst: Ipv4Addr::new(f[30], f[31], f[32], f[33]),
        sport: u16::from_be_bytes([f[l4], f[l4 + 1]]),
        dport: u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]),
        flags: f[l4 + 13],
        payload_len: tot - ihl - doff,
    }
}

/// True when the IPv4 header checksum of the frame verifies.
pub fn ipv4_checksum_ok(f: &[u8]) -> bool {
    let ihl = (f[14] & 0x0f) as usize * 4;
    checksum(&f[14..14 + ihl]) == 0
}

/// True when the TCP checksum (with the IPv4 pseudo-header) of the frame verifies.
pub fn tcp_checksum_ok(f: &[u8]) -> bool {
    let ihl = (f[14] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([f[16], f[17]]) as usize;
    let seg = &f[14 + ihl..14 + tot];
    let mut pseudo = Vec::with_capacity(12 + seg.len());
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(seg);
    checksum(&pseudo) == 0
}

/// The TCP checksum of a frame whose TCP checksum field is zero.
fn tcp_checksum(f: &[u8]) -> u16 {
    let tot = u16::from_be_bytes([f[16], f[17]]) as usize;
    let seg = &f[34..14 + tot];
    let mut pseudo = Vec::with_capacity(12 + seg.len());
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
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

    #[test]
    fn built_frames_verify_and_parse_back() {
        let a = End { mac: [2, 0, 0, 0, 0, 1], ip: Ipv4Addr::new(10, 0, 1, 2), port: 40000 };
        let b = End { mac: [2, 0, 0, 0, 0, 2], ip: Ipv4Addr::new(10, 0, 0, 100), port: 80 };
        let f = tcp_frame(a, b, TCP_ACK | TCP_PSH, 7, b"hello, world");
        assert!(ipv4_checksum_ok(&f));
        assert!(tcp_checksum_ok(&f));
        let p = parse(&f);
        assert_eq!((p.src, p.dst, p.sport, p.dport, p.payload_len), (a.ip, b.ip, 40000, 80, 12));
        let mut bad = f.clone();
        bad[60] ^= 1;
        assert!(!tcp_checksum_ok(&bad));
    }
}
