//! Wire headers, laid out as on the wire. Multi-byte fields hold network byte order and are
//! accessed with `read_unaligned`/`write_unaligned`, since the IP header sits 2 bytes off a
//! 4-byte boundary.

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_FRAGMENT: u8 = 44;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Lengths and checksum offsets of the transport headers.
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PKT_TOOBIG: u8 = 2;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub vhl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub saddr: u32,
    pub daddr: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtc_flow: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
}

pub const IPV6_HLEN: usize = 40;

/// The first 8 bytes of TCP and UDP: ports, then (TCP) sequence or (UDP) length+checksum.
#[repr(C)]
pub struct L4Ports {
    pub source: u16,
    pub dest: u16,
    pub word1: u32,
}

/// An ICMP (v4 or v6) error header; the offending packet follows it.
#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

pub const ICMP_HLEN: usize = 8;
