//! Types and constants shared by the kernel programs (`lb-ebpf`) and user space (`lb-daemon`).
//!
//! Every struct here crosses the kernel/user boundary through a BPF map or the ring buffer, so
//! each is `#[repr(C)]` with explicit padding and fixed-width integers only. Padding is made of
//! integers, not byte arrays: the BPF backend turns array initialisation into byte-loop calls. Addresses are stored
//! as four `u32` words holding the raw network-order bytes as they appear in the packet: an IPv4
//! address occupies word 0 and words 1..3 are zero. Ports are stored in network byte order.
#![no_std]

pub mod flow_table;

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
/// Default Maglev lookup table size per service; a prime so every backend permutation is
/// complete. The daemon may choose another prime at load time (`Config::maglev_size`).
pub const MAGLEV_TABLE_SIZE: u32 = 65537;
/// Maximum number of access-control rules (allow/deny CIDRs) across all services.
pub const MAX_ACL_RULES: u32 = 4096;
/// Sources tracked for per-source rate limiting and deny-record suppression.
pub const SOURCES_MAX: u32 = 65_536;
/// At most one deny record per source and service per this interval (ns); the others are
/// counted, and the daemon records those no later record carries once the last is this old.
pub const DENY_RECORD_INTERVAL_NS: u64 = 1_000_000_000;
/// Default connection-tracking capacity in connections (each flow map holds two entries,
/// one per direction, for each).
pub const CONNTRACK_MAX: u32 = 262_144;
/// Slots of the `SNAT_HISTORY` array (a power of two): when each (backend, SNAT port) was last
/// used by a TCP flow, so that a port is not handed to another client while the backend may
/// hold the old connection in TIME_WAIT. Pages of 65536 slots, one per port.
pub const SNAT_HISTORY_SLOTS: u32 = 1 << 20;
/// Ring buffer size in bytes (power of two, multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 24;

/// Map names, as the kernel object declares them and user space looks them up.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV: &str = "MAGLEV";
    /// IPv4 flows: the table of `flow_table`.
    pub const FLOWS4: &str = "FLOWS4";
    /// Claim words of IPv4 reply keys (`flow_table::claim_of`).
    pub const CLAIMS4: &str = "CLAIMS4";
    /// IPv6 flows, keyed by `FlowKey`.
    pub const FLOWS6: &str = "FLOWS6";
    pub const HOPS: &str = "HOPS";
    pub const EVENTS: &str = "EVENTS";
    pub const STATS: &str = "STATS";
    pub const CONFIG: &str = "CONFIG";
    pub const FLOW_SEQ: &str = "FLOW_SEQ";
    pub const VIPS: &str = "VIPS";
    pub const ACL: &str = "ACL";
    pub const RULE_HITS: &str = "RULE_HITS";
    pub const SOURCES: &str = "SOURCES";
    pub const SNAT_HISTORY: &str = "SNAT_HISTORY";
}

/// Name of the XDP program in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";
/// A program in the same object that passes every packet: the benchmarks' floor.
pub const XDP_PASS_PROGRAM: &str = "lb_pass";

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
    /// New flows dropped because the FIB had no route or no neighbour for the next hop.
    pub const DROP_NO_ROUTE: u32 = 4;
    /// Non-SYN TCP packets to a service with no tracked flow.
    pub const DROP_NO_FLOW: u32 = 5;
    /// New flows refused because no SNAT port was free.
    pub const DENY_SNAT_EXHAUSTED: u32 = 6;
    /// New flows to a service without a usable backend.
    pub const DENY_NO_BACKEND: u32 = 7;
    /// New flows refused because the conntrack table was full.
    pub const DENY_CONNTRACK_FULL: u32 = 8;
    /// New flows refused by an access-control rule (per-rule counts are in `RULE_HITS`).
    pub const DENY_ACL: u32 = 9;
    /// New flows refused by the per-source rate limit.
    pub const DENY_RATE_LIMITED: u32 = 10;
    /// New flows refused because the audit log cannot be written (fail-closed).
    pub const DENY_AUDIT_UNAVAILABLE: u32 = 11;
    /// Deny records not emitted because the source already had one in the last second.
    pub const DENY_RECORDS_SUPPRESSED: u32 = 12;
    /// Malformed packets to a VIP (truncated or inconsistent headers, invalid TCP flags).
    pub const DROP_MALFORMED: u32 = 13;
    /// IP fragments to a VIP (the balancer does not reassemble).
    pub const DROP_FRAGMENT: u32 = 14;
    /// IPv6 packets to a VIP carrying extension headers.
    pub const DROP_IPV6_EXT: u32 = 15;
    /// VLAN-tagged frames (passed to the host stack).
    pub const PASSED_VLAN: u32 = 16;
    /// ICMP errors about a NATed flow translated back to its client.
    pub const ICMP_TRANSLATED: u32 = 17;
    /// Packets to a VIP of a protocol no service there carries (ICMP echo, other IP protocols).
    pub const DROP_UNSUPPORTED: u32 = 18;
    /// Packets that would open a flow another CPU was opening at the same instant (a
    /// retransmitted SYN, typically): dropped, the flow is open for the next one.
    pub const DROP_OPEN_RACE: u32 = 19;
    /// Number of counters.
    pub const COUNT: u32 = 20;
    /// Their names, by index (for status output and metrics).
    pub const NAMES: [&str; COUNT as usize] = [
        "ringbuf_loss",
        "forwarded",
        "replied",
        "passed",
        "drop_no_route",
        "drop_no_flow",
        "deny_snat_exhausted",
        "deny_no_backend",
        "deny_conntrack_full",
        "deny_acl",
        "deny_rate_limited",
        "deny_audit_unavailable",
        "deny_records_suppressed",
        "drop_malformed",
        "drop_fragment",
        "drop_ipv6_ext",
        "passed_vlan",
        "icmp_translated",
        "drop_unsupported",
        "drop_open_race",
    ];
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
    /// `service_flags` bits.
    pub flags: u32,
    /// New flows per second allowed from one source address; 0 means unlimited.
    pub rate_per_sec: u32,
    pub _pad: u32,
}

/// `ServiceInfo::flags` bits.
pub mod service_flags {
    /// The service has allow rules: a source no rule matches is refused.
    pub const DEFAULT_DENY: u32 = 1;
    /// The service has access rules at all (the ACL lookup is skipped otherwise).
    pub const HAS_RULES: u32 = 2;
}

/// Key of the `VIPS` hash map: every address that is some service's VIP. Packets to a VIP that
/// the balancer cannot handle (fragments, malformed headers) are dropped instead of reaching
/// the host stack, which does not own the VIP and would route them away.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    pub addr: [u32; 4],
    pub af: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// Data of the `ACL` longest-prefix-match trie key (the trie's key is `prefix_len: u32`
/// followed by this). The matched bits are, in order, the 32-bit big-endian `scope` (service id
/// and address family) and then the address, so a rule for a CIDR of length n has
/// `prefix_len = 32 + n`, and a lookup uses `ACL_LOOKUP_PREFIX`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AclKey {
    /// `(service_id << 8 | af)`, stored big-endian so it is the first matched bits.
    pub scope: [u8; 4],
    pub addr: [u32; 4],
}

/// Prefix length of an `ACL` lookup key: every bit of `AclKey`.
pub const ACL_LOOKUP_PREFIX: u32 = 32 + 128;

impl AclKey {
    /// The scope bytes for a service and address family.
    pub const fn scope(service_id: u32, af: u8) -> [u8; 4] {
        ((service_id << 8) | af as u32).to_be_bytes()
    }
}

/// Value of the `ACL` trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AclRule {
    /// Index into `RULE_HITS`, and the rule number in deny records.
    pub rule_id: u32,
    /// `acl_action` value.
    pub action: u32,
}

/// `AclRule::action` values.
pub mod acl_action {
    pub const ALLOW: u32 = 1;
    pub const DENY: u32 = 2;
}

/// Key of the `SOURCES` LRU map: one client address as seen by one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceKey {
    pub addr: [u32; 4],
    pub service_id: u32,
    pub af: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

/// Per-source state: a token bucket for new flows, and deny-record suppression.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SourceState {
    /// Tokens, in millionths of a new flow.
    pub tokens_micro: u64,
    /// When tokens were last added (CLOCK_MONOTONIC_COARSE ns).
    pub refill_ns: u64,
    /// When the last deny record for this source was emitted (CLOCK_BOOTTIME ns).
    pub last_deny_record_ns: u64,
    /// Denies since that record that emitted no record of their own.
    pub suppressed: u64,
    /// The last of those: when (CLOCK_BOOTTIME ns), why (`deny_reason`), by which rule, and its
    /// IP protocol. The daemon records them from here when no later refusal's record carries
    /// them.
    pub last_refusal_ns: u64,
    pub rule: u32,
    pub reason: u8,
    pub proto: u8,
    pub _pad: u16,
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
    pub _pad0: u8,
    pub _pad1: u32,
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
    pub _pad: u16,
}

/// The key of an IPv4 flow in `FLOWS4` (`flow_table`): 24 of `FlowKey`'s 40 bytes are zeros
/// for IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey4 {
    pub src: u32,
    pub dst: u32,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub _pad1: u16,
}

impl FlowKey4 {
    /// `key`'s IPv4 5-tuple.
    #[inline(always)]
    pub fn of(key: &FlowKey) -> Self {
        FlowKey4 {
            src: key.src[0],
            dst: key.dst[0],
            sport: key.sport,
            dport: key.dport,
            proto: key.proto,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The `FlowKey` this key stands for.
    pub fn key(&self) -> FlowKey {
        FlowKey {
            src: [self.src, 0, 0, 0],
            dst: [self.dst, 0, 0, 0],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            af: AF_INET,
            _pad: 0,
        }
    }
}

/// Flow state bits (`Flow::state`).
pub mod flow_state {
    /// This entry's direction has sent a FIN.
    pub const FIN: u64 = 1;
    /// (Forward entry) the close record has been emitted; both entries only linger so trailing
    /// ACKs pass, until the daemon sweeps them.
    pub const CLOSED: u64 = 4;
}

/// `Flow::seq_base` flag: the low 32 bits hold this direction's base sequence number.
pub const SEQ_BASED: u64 = 1 << 32;

/// Direction of a flow entry (`Flow::dir`).
pub mod flow_dir {
    /// Keyed by the client's packets (client → VIP).
    pub const FORWARD: u8 = 1;
    /// Keyed by the backend's replies (backend → SNAT address).
    pub const REPLY: u8 = 2;
}

/// A value of the flow maps (`FLOWS4`, `FLOWS6`). Each connection has two entries, one per
/// direction, so that every packet, either way, costs one lookup: the forward entry is keyed by
/// the client's 5-tuple, the reply entry by the backend's. Each holds what its direction's packets are
/// rewritten to, where they leave, and their counters.
///
/// The entries find each other: the peer's key is this entry's rewrite target reversed
/// (`src = nat_dst, dst = nat_src, sport = nat_dport, dport = nat_sport`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    pub flow_id: u64,
    /// CLOCK_BOOTTIME nanoseconds when the flow opened.
    pub opened_ns: u64,
    /// CLOCK_MONOTONIC_COARSE nanoseconds of this direction's last packet.
    pub last_seen_ns: u64,
    /// Transport payload bytes in this direction. UDP: every datagram's payload, added
    /// atomically. TCP: the advance of this direction's sequence space past `seq_base`, so a
    /// retransmitted or overlapping segment adds only bytes not counted before; raised with a
    /// compare-and-swap (see `seq_base`).
    pub bytes: u64,
    /// Packets in this direction, added atomically.
    pub packets: u64,
    /// `flow_state` bits, updated atomically (64-bit: the BPF CPU baseline has no 32-bit
    /// fetch-or).
    pub state: u64,
    /// TCP: `SEQ_BASED | s`, where `s` is the sequence number of this direction's first
    /// payload byte (the first packet's sequence number, plus one for a SYN), set once by
    /// that packet; 0 before (and for UDP). The highest sequence number counted so far is
    /// `s + bytes` (mod 2^32).
    pub seq_base: u64,
    /// Source address written into this direction's packets (SNAT address, or the VIP).
    pub nat_src: [u32; 4],
    /// Destination address written (the backend, or the client).
    pub nat_dst: [u32; 4],
    /// Ports written, network byte order.
    pub nat_sport: u16,
    pub nat_dport: u16,
    pub service_id: u32,
    pub backend_idx: u32,
    pub generation: u32,
    /// Where this direction's packets leave.
    pub hop: NextHop,
    /// `flow_dir` value.
    pub dir: u8,
    pub _pad0: u8,
    pub _pad1: u16,
    /// Low 32 bits of the kernel's jiffies when `last_seen_ns` was last set: the coarse clock
    /// only moves once a tick, so a packet in the same tick leaves both alone (and skips the
    /// clock helper).
    pub seen_tick: u32,
}

impl Flow {
    /// The key of this entry's peer (the other direction).
    pub fn peer_key(&self, proto: u8, af: u8) -> FlowKey {
        FlowKey {
            src: self.nat_dst,
            dst: self.nat_src,
            sport: self.nat_dport,
            dport: self.nat_sport,
            proto,
            af,
            _pad: 0,
        }
    }
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
    pub const CONN_DENY: u8 = 3;
}

/// Why a new flow was refused (`ConnEvent::reason` of a deny).
pub mod deny_reason {
    pub const ACL: u8 = 1;
    pub const RATE_LIMITED: u8 = 2;
    pub const NO_BACKEND: u8 = 3;
    pub const SNAT_EXHAUSTED: u8 = 4;
    pub const CONNTRACK_FULL: u8 = 5;
    pub const AUDIT_UNAVAILABLE: u8 = 6;
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

/// A record pushed by the kernel through the `EVENTS` ring buffer. For a deny, `backend` and
/// `snat` are zero, `rule` is the matched ACL rule (or `u32::MAX`), and `packets_to_backend`
/// counts the earlier denies of this source that were suppressed (not recorded one by one).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEvent {
    pub kind: u8,
    pub proto: u8,
    pub af: u8,
    /// `open_reason`, `close_reason` or `deny_reason`, depending on `kind`.
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
    pub rule: u32,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub packets_to_backend: u64,
    pub packets_to_client: u64,
}

/// A next hop resolved by the FIB, cached per CPU and backend (`HOPS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HopCache {
    pub hop: NextHop,
    /// CLOCK_MONOTONIC_COARSE nanoseconds of the lookup; 0 = never.
    pub resolved_ns: u64,
}

/// Single entry of the `CONFIG` array: run-time settings written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Inclusive SNAT port range, host byte order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Maglev table size per service (a prime).
    pub maglev_size: u32,
    /// `config_flags` bits.
    pub flags: u32,
    /// Buckets of `FLOWS4` (its entries; `flow_table::buckets_for` the connection capacity).
    pub flow4_buckets: u32,
    /// `FLOWS4`'s hash seed, drawn at random when the table is created.
    pub flow4_seed: u64,
    /// The `STATS[RINGBUF_LOSS]` total the daemon has recorded in `loss` records, so that a
    /// daemon adopting the data plane records only what came after (the program never reads
    /// it).
    pub ringbuf_loss_recorded: u64,
    /// Words of `CLAIMS4` (`flow_table::claims_for` the connection capacity).
    pub flow4_claims: u32,
    /// Inclusive range, host byte order, of the SNAT ports any flow in `FLOWS4` may have: the
    /// SNAT ranges of every daemon since the table was created. A key whose destination port
    /// is outside it is no reply key, and its lookup skips `CLAIMS4`.
    pub claimed_port_min: u16,
    pub claimed_port_max: u16,
    /// Moved by the daemon after each change to `SERVICES`: what the program has cached of a
    /// service is good while this has not moved since.
    pub services_version: u32,
    pub _pad0: u32,
}

/// `Config::flags` bits.
pub mod config_flags {
    /// The audit log cannot be written and the policy is fail-closed: refuse new flows.
    pub const REFUSE_NEW_FLOWS: u32 = 1;
    /// The CPU keeps memory accesses in program order as other CPUs see them, but for loads
    /// passing stores (x86-64's total store order): the program may publish with plain stores
    /// (`flow_table`'s `publish`) and rely on the order of its loads (the service cache).
    pub const TOTAL_STORE_ORDER: u32 = 2;
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
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for ConnEvent {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for HopCache {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for AclKey {}
    unsafe impl aya::Pod for AclRule {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for SourceState {}
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
                    *word =
                        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
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
        assert_eq!(size_of::<ServiceInfo>(), 24);
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<AclKey>(), 20);
        assert_eq!(size_of::<AclRule>(), 8);
        assert_eq!(size_of::<SourceKey>(), 24);
        assert_eq!(size_of::<SourceState>(), 48);
        assert_eq!(size_of::<Backend>(), 40);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowKey4>(), 16);
        assert_eq!(size_of::<Flow>(), 7 * 8 + 32 + 4 + 12 + 16 + 8);
        assert_eq!(size_of::<NextHop>(), 16);
        assert_eq!(size_of::<ConnEvent>(), 8 + 8 + 8 + 8 + 64 + 8 + 8 + 32);
        assert_eq!(size_of::<Config>(), 48);
        assert_eq!(size_of::<flow_table::Bucket>(), 16 * 8 + 15 * (16 + 128));
    }
}
