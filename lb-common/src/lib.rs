//! Types and constants shared by the kernel programs (`lb-ebpf`) and user space (`lb-daemon`).
//!
//! Every struct here crosses the kernel/user boundary through a BPF map or the ring buffer, so
//! each is `#[repr(C)]` with explicit padding and fixed-width integers only. Addresses are stored
//! as four `u32` words holding the raw network-order bytes as they appear in the packet: an IPv4
//! address occupies word 0 and words 1..3 are zero. Ports are stored in network byte order.
#![no_std]

/// Address family tags (values of `af` fields).
pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

/// IP protocol numbers (values of `proto` fields).
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Maximum number of services (VIP:port/proto) the data plane can hold.
pub const MAX_SERVICES: u32 = 64;
/// Maximum number of backends across all services.
pub const MAX_BACKENDS: u32 = 4096;
/// Maglev lookup table size per service; a prime so every backend permutation is complete.
pub const MAGLEV_TABLE_SIZE: u32 = 65537;
/// Connection-tracking capacity (flows). The reverse (reply) table has the same size.
pub const CONNTRACK_MAX: u32 = 262_144;
/// Ring buffer size in bytes (power of two, multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 24;

/// Map names, as the kernel object declares them and user space looks them up.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV: &str = "MAGLEV";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const REVERSE: &str = "REVERSE";
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const CONFIG: &str = "CONFIG";
    pub const FLOW_SEQ: &str = "FLOW_SEQ";
}

/// Name of the XDP program in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";

/// Indices into the per-CPU `STATS` counter array.
pub mod stat {
    /// Ring-buffer reservations that failed (an audit record was lost in the kernel).
    pub const RINGBUF_LOSS: u32 = 0;
    /// Packets for a service that were forwarded to a backend.
    pub const FORWARDED: u32 = 1;
    /// Reply packets reverse-NATed back to a client.
    pub const REPLIED: u32 = 2;
    /// Packets passed to the host stack untouched (not ours).
    pub const PASSED: u32 = 3;
    /// Packets dropped because the FIB had no route or no neighbour for the next hop.
    pub const DROP_NO_ROUTE: u32 = 4;
    /// Non-SYN TCP packets to a VIP with no tracked flow.
    pub const DROP_NO_FLOW: u32 = 5;
    /// New flows refused because no SNAT port was free.
    pub const DROP_SNAT_EXHAUSTED: u32 = 6;
    /// New flows to a service without a usable backend.
    pub const DROP_NO_BACKEND: u32 = 7;
    /// Flows that could not be inserted into the conntrack table.
    pub const DROP_CONNTRACK_FULL: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
}

/// Key of the `SERVICES` hash map: a virtual IP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub af: u8,
}

/// Value of the `SERVICES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceInfo {
    /// Index of the service; its Maglev table occupies
    /// `MAGLEV[id * MAGLEV_TABLE_SIZE .. (id + 1) * MAGLEV_TABLE_SIZE]`.
    pub id: u32,
    /// Number of usable backends; 0 means new flows are refused.
    pub backend_count: u32,
    /// Maglev table generation that is currently written.
    pub generation: u32,
    pub _pad: u32,
}

/// Entry of the `BACKENDS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u32; 4],
    /// Source address used towards this backend (full NAT).
    pub snat_addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub af: u8,
    pub _pad: [u8; 5],
}

/// A directional flow: the key of both conntrack maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub af: u8,
    pub _pad: [u8; 2],
}

/// Flow state bits (`Flow::state`).
pub mod flow_state {
    pub const FIN_FROM_CLIENT: u64 = 1;
    pub const FIN_FROM_BACKEND: u64 = 2;
    /// The close record has been emitted; the entry only lingers so trailing ACKs pass.
    pub const CLOSED: u64 = 4;
}

/// Value of the `CONNTRACK` map, keyed by the client-side `FlowKey` (client → VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    pub flow_id: u64,
    /// CLOCK_BOOTTIME nanoseconds when the flow opened.
    pub opened_ns: u64,
    /// CLOCK_BOOTTIME nanoseconds of the last packet in either direction.
    pub last_seen_ns: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub packets_to_backend: u64,
    pub packets_to_client: u64,
    pub backend: [u32; 4],
    pub snat: [u32; 4],
    /// Network byte order.
    pub backend_port: u16,
    /// Network byte order.
    pub snat_port: u16,
    pub service_id: u32,
    pub backend_idx: u32,
    pub generation: u32,
    /// `flow_state` bits, updated atomically (64-bit: the BPF CPU baseline has no 32-bit
    /// fetch-or).
    pub state: u64,
    /// Where packets towards the backend leave (resolved once, when the flow opens).
    pub to_backend: NextHop,
    /// Where replies leave: back to the interface and router the client's first packet came from.
    pub to_client: NextHop,
}

/// A resolved link-layer next hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NextHop {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
}

/// Ring-buffer record kinds (`ConnEvent::kind`).
pub mod event_kind {
    pub const CONN_OPEN: u8 = 1;
    pub const CONN_CLOSE: u8 = 2;
}

/// Why a backend was chosen (`ConnEvent::reason` of an open).
pub mod open_reason {
    pub const MAGLEV: u8 = 1;
}

/// Why a flow ended (`ConnEvent::reason` of a close).
pub mod close_reason {
    pub const FIN: u8 = 1;
    pub const RST: u8 = 2;
    pub const IDLE_TIMEOUT: u8 = 3;
    pub const EVICTED: u8 = 4;
    pub const SHUTDOWN: u8 = 5;
}

/// A record pushed by the kernel through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEvent {
    pub kind: u8,
    pub proto: u8,
    pub af: u8,
    /// `open_reason` or `close_reason`, depending on `kind`.
    pub reason: u8,
    pub service_id: u32,
    pub flow_id: u64,
    /// CLOCK_BOOTTIME nanoseconds when the event happened.
    pub ts_ns: u64,
    /// CLOCK_BOOTTIME nanoseconds when the flow opened.
    pub opened_ns: u64,
    pub client: [u32; 4],
    pub vip: [u32; 4],
    pub backend: [u32; 4],
    pub snat: [u32; 4],
    /// Ports in network byte order.
    pub client_port: u16,
    pub vip_port: u16,
    pub backend_port: u16,
    pub snat_port: u16,
    pub generation: u32,
    pub _pad: u32,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub packets_to_backend: u64,
    pub packets_to_client: u64,
}

/// Single entry of the `CONFIG` array: run-time settings written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Inclusive SNAT port range, host byte order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and explicit padding, and
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceInfo {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for ConnEvent {}
    unsafe impl aya::Pod for Config {}
}

/// Conversions between the raw address words and `std::net` types (user space only).
#[cfg(feature = "user")]
pub mod addr {
    extern crate std;
    use super::{AF_INET, AF_INET6};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// The raw words for an address, and its `af` tag.
    pub fn to_words(ip: IpAddr) -> ([u32; 4], u8) {
        match ip {
            IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                let mut w = [0u32; 4];
                for (i, word) in w.iter_mut().enumerate() {
                    *word = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
                (w, AF_INET6)
            }
        }
    }

    /// The address held in raw words with the given `af` tag.
    pub fn from_words(words: [u32; 4], af: u8) -> IpAddr {
        if af == AF_INET6 {
            let mut o = [0u8; 16];
            for (i, word) in words.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        } else {
            IpAddr::V4(Ipv4Addr::from(words[0].to_ne_bytes()))
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn address_words_round_trip() {
        for s in ["10.0.2.2", "255.1.0.7", "fd00::100", "2001:db8::1:2"] {
            let ip: IpAddr = s.parse().unwrap();
            let (w, af) = addr::to_words(ip);
            assert_eq!(addr::from_words(w, af), ip);
        }
        // IPv4 words hold the packet's byte order.
        let (w, _) = addr::to_words("10.0.2.2".parse().unwrap());
        assert_eq!(w[0].to_ne_bytes(), [10, 0, 2, 2]);
    }

    #[test]
    fn shared_layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<ServiceInfo>(), 16);
        assert_eq!(size_of::<Backend>(), 40);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 56 + 32 + 4 + 4 * 5 + 2 * 16);
        assert_eq!(size_of::<NextHop>(), 16);
        assert_eq!(size_of::<ConnEvent>(), 8 + 8 + 8 + 8 + 64 + 8 + 8 + 32);
        assert_eq!(size_of::<Config>(), 8);
    }
}
