//! The XDP data plane: full-NAT TCP and UDP load balancing over IPv4 and IPv6, with connection
//! tracking, access control, and one audit record per connection opening, closing or refusal,
//! pushed through a ring buffer.
//!
//! Per packet, in order:
//! 1. parse Ethernet / IPv4 or IPv6 / TCP or UDP (or an ICMP error); anything else, and
//!    anything not addressed to a service, goes to the host stack untouched;
//! 2. a 5-tuple in `FLOWS` is an established flow, one entry per direction: the forward entry
//!    NATs the client's packets to the backend, the reply entry the backend's back to the client;
//! 3. otherwise a packet that may open a flow (a TCP SYN, any UDP datagram) to a service in
//!    `SERVICES` passes the access checks (fail-closed audit, ACL, rate limit), gets a backend
//!    from the Maglev table, a next hop from the FIB and a SNAT port, and opens a flow.
//! Every check happens before the first byte is rewritten: a packet is forwarded whole or not
//! at all.
//!
//! A TCP flow closes when both sides have sent FIN, or on RST; the entry then lingers (marked
//! `CLOSED`) so trailing ACKs still pass, until the daemon sweeps it. UDP flows, and TCP flows
//! that go quiet, are closed by the daemon's idle sweep.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod atomic;
mod copy;
mod csum;
mod headers;

use core::ptr::{read_unaligned as rd, write_unaligned as wr};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, bpf_fib_lookup, xdp_action},
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_smp_processor_id, bpf_ktime_get_boot_ns,
        bpf_ktime_get_coarse_ns, bpf_redirect,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    ACL_LOOKUP_PREFIX, AF_INET, AF_INET6, AclKey, AclRule, Backend, CONNTRACK_MAX, Config,
    ConnEvent, EVENTS_RING_BYTES, Flow, FlowKey, HopCache, MAGLEV_TABLE_SIZE, MAX_ACL_RULES,
    MAX_BACKENDS, MAX_SERVICES, NextHop, PROTO_TCP, PROTO_UDP, SEQ_BASED, SNAT_HISTORY_SLOTS,
    SOURCES_MAX, ServiceInfo, ServiceKey, SourceKey, SourceState, VipKey, acl_action, close_reason,
    config_flags, deny_reason, event_kind, flow_dir, flow_state, open_reason, service_flags, stat,
};

use headers::*;

#[map]
static SERVICES: HashMap<ServiceKey, ServiceInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static VIPS: HashMap<VipKey, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
/// Sized by the daemon at load time: `MAX_SERVICES * Config::maglev_size`.
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(MAX_SERVICES * MAGLEV_TABLE_SIZE, 0);
/// Both directions of every connection (see `Flow`); sized by the daemon at load time to
/// twice `--conntrack-size`. Not LRU: the kernel never drops a flow silently. The daemon evicts
/// (with a record) before the table fills; a flow that still finds it full is refused with a
/// record.
#[map]
static FLOWS: HashMap<FlowKey, Flow> = HashMap::with_max_entries(2 * CONNTRACK_MAX, 0);
/// Next hop per backend, resolved by the FIB at most once a second per CPU.
#[map]
static HOPS: PerCpuArray<HopCache> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
static ACL: LpmTrie<AclKey, AclRule> = LpmTrie::with_max_entries(MAX_ACL_RULES, 0);
#[map]
static RULE_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_ACL_RULES, 0);
#[map]
static SOURCES: LruHashMap<SourceKey, SourceState> = LruHashMap::with_max_entries(SOURCES_MAX, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static FLOW_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// Per (backend, SNAT port) slot, when a TCP flow last took or released it and which client
/// 5-tuple that was (`snat_mark`): a port stays out of use for other clients while the
/// backend may still hold the old connection in TIME_WAIT. Slots are shared by hashing; a
/// shared slot can only keep a port out of use longer, never hand one out sooner.
#[map]
static SNAT_HISTORY: Array<u64> = Array::with_max_entries(SNAT_HISTORY_SLOTS, 0);
/// Per-CPU scratch space where a new flow's two entries are built: the BPF stack (512 bytes)
/// is too small to hold them next to everything else.
#[map]
static SCRATCH_FLOW: PerCpuArray<Flow> = PerCpuArray::with_max_entries(2, 0);

/// How long a cached next hop is trusted.
const HOP_TTL_NS: u64 = 1_000_000_000;
/// SNAT ports tried per new flow before it is refused.
const SNAT_PORT_TRIES: u32 = 8;
/// How long a released TCP SNAT port stays out of use for other clients (`snat_clock` units):
/// Linux's TIME_WAIT, 60 s.
const SNAT_HOLD: u32 = (60_000_000_000u64 >> 20) as u32 + 1;
/// At most one deny record per source and service per this interval; the others are counted.
const DENY_RECORD_INTERVAL_NS: u64 = 1_000_000_000;
/// Token-bucket units per new flow.
const TOKEN: u64 = 1_000_000;
/// Largest transport header offset: Ethernet, then an IPv4 header with 40 bytes of options.
const MAX_L4_OFFSET: usize = ETH_HLEN + 60;
/// `rule` of a deny record that no ACL rule caused.
const NO_RULE: u32 = u32::MAX;
const E2BIG: i64 = 7;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

/// A program that passes every packet: the per-packet floor the benchmarks compare against.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, and XDP does not preempt itself on one CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn pass() -> Result<u32, ()> {
    count(stat::PASSED);
    Ok(xdp_action::XDP_PASS)
}

#[inline(always)]
fn drop_with(index: u32) -> Result<u32, ()> {
    count(index);
    Ok(xdp_action::XDP_DROP)
}

/// Packets the balancer will not handle: dropped with a counter when addressed to a VIP (the
/// host does not own the VIP and would route them away), passed to the host otherwise.
#[inline(always)]
fn not_handled(dst: &[u32; 4], af: u8, index: u32) -> Result<u32, ()> {
    let key = VipKey {
        addr: *dst,
        af,
        _pad0: 0,
        _pad1: 0,
    };
    // SAFETY: map lookup; the value is not used.
    if unsafe { VIPS.get(&key) }.is_some() {
        drop_with(index)
    } else {
        pass()
    }
}

/// Pointer to a `T` at `offset` in the packet, if the whole `T` is inside it.
///
/// The context fields are read with volatile loads so LLVM cannot hoist them into a caller
/// and pass them as plain integers: the verifier refuses arithmetic on such copies.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    // SAFETY: `ctx.ctx` is the program's context pointer.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize,
        )
    };
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// A parsed TCP or UDP packet. It lives in a per-CPU scratch map rather than on the 512-byte
/// BPF stack, and header positions are offsets: each use re-checks bounds (cheaply).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Packet {
    key: FlowKey,
    /// Offset of the transport header.
    l4: u64,
    /// Transport payload bytes.
    payload: u64,
    /// TCP flags (0 for UDP).
    flags: u8,
    _pad0: u8,
    _pad1: u16,
    /// TCP sequence number, host byte order (0 for UDP).
    seq: u32,
}

/// Scratch space for the packet being handled (one per CPU; XDP runs to completion).
#[map]
static SCRATCH_PACKET: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

fn try_lb(ctx: &XdpContext) -> Result<u32, ()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == ETH_P_IP.to_be() {
        ipv4(ctx)
    } else if ether_type == ETH_P_IPV6.to_be() {
        ipv6(ctx)
    } else if ether_type == ETH_P_8021Q.to_be() || ether_type == ETH_P_8021AD.to_be() {
        count(stat::PASSED_VLAN);
        Ok(xdp_action::XDP_PASS)
    } else {
        pass()
    }
}

fn ipv4(ctx: &XdpContext) -> Result<u32, ()> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let (vhl, frag, proto, tot_len, dst) = unsafe {
        (
            (*ip).vhl,
            u16::from_be(rd(&raw const (*ip).frag_off)),
            (*ip).protocol,
            u16::from_be(rd(&raw const (*ip).tot_len)) as usize,
            rd(&raw const (*ip).daddr),
        )
    };
    let dst = [dst, 0, 0, 0];
    let ihl = ((vhl & 0x0f) as usize) * 4;
    if vhl >> 4 != 4
        || ihl < 20
        || tot_len < ihl
        || ctx.data() + ETH_HLEN + tot_len > ctx.data_end()
    {
        return not_handled(&dst, AF_INET, stat::DROP_MALFORMED);
    }
    if frag & 0x3fff != 0 {
        return not_handled(&dst, AF_INET, stat::DROP_FRAGMENT);
    }
    let l4 = ETH_HLEN + ihl;
    match proto {
        PROTO_TCP | PROTO_UDP => Ok(handle(ctx, l4, tot_len - ihl, AF_INET)),
        IPPROTO_ICMP => Ok(icmp_error(ctx, l4, AF_INET)),
        _ => not_handled(&dst, AF_INET, stat::DROP_UNSUPPORTED),
    }
}

fn ipv6(ctx: &XdpContext) -> Result<u32, ()> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let (vtc, next, plen, dst) = unsafe {
        (
            rd(&raw const (*ip).vtc_flow),
            (*ip).nexthdr,
            u16::from_be(rd(&raw const (*ip).payload_len)) as usize,
            rd(&raw const (*ip).daddr),
        )
    };
    if (u32::from_be(vtc) >> 28) != 6 || ctx.data() + ETH_HLEN + IPV6_HLEN + plen > ctx.data_end() {
        return not_handled(&dst, AF_INET6, stat::DROP_MALFORMED);
    }
    let l4 = ETH_HLEN + IPV6_HLEN;
    match next {
        PROTO_TCP | PROTO_UDP => Ok(handle(ctx, l4, plen, AF_INET6)),
        IPPROTO_ICMPV6 => Ok(icmp_error(ctx, l4, AF_INET6)),
        IPPROTO_FRAGMENT => not_handled(&dst, AF_INET6, stat::DROP_FRAGMENT),
        // Hop-by-hop, routing, destination options, mobility, HIP, shim6, AH, ESP...
        0 | 43 | 60 | 135 | 139 | 140 | 51 | 50 => not_handled(&dst, AF_INET6, stat::DROP_IPV6_EXT),
        _ => not_handled(&dst, AF_INET6, stat::DROP_UNSUPPORTED),
    }
}

/// Parses a TCP or UDP header at `l4` whose IP payload is `l4_len` bytes. `Ok(None)` for a
/// header that is truncated or inconsistent with the IP length.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn transport(
    ctx: &XdpContext,
    out: &mut Packet,
    l4: usize,
    l4_len: usize,
    proto: u8,
    src: [u32; 4],
    dst: [u32; 4],
    af: u8,
) -> Result<bool, ()> {
    let (payload, flags, csum_off) = if proto == PROTO_TCP {
        let Ok(t) = ptr_at::<[u8; TCP_HLEN]>(ctx, l4) else {
            return Ok(false);
        };
        // SAFETY: bounds-checked by `ptr_at`.
        let (doff, flags) = unsafe { ((((*t)[12] >> 4) as usize) * 4, (*t)[13]) };
        if doff < TCP_HLEN || doff > l4_len {
            return Ok(false);
        }
        (l4_len - doff, flags, TCP_CSUM_OFF)
    } else {
        let Ok(u) = ptr_at::<[u8; UDP_HLEN]>(ctx, l4) else {
            return Ok(false);
        };
        // SAFETY: bounds-checked by `ptr_at`.
        let ulen = unsafe { u16::from_be_bytes([(*u)[4], (*u)[5]]) } as usize;
        if ulen < UDP_HLEN || ulen > l4_len {
            return Ok(false);
        }
        (ulen - UDP_HLEN, 0, UDP_CSUM_OFF)
    };
    let _: *mut u16 = ptr_at(ctx, l4 + csum_off)?;
    let l4p: *mut L4Ports = ptr_at(ctx, l4)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let (sport, dport, word1) = unsafe {
        (
            rd(&raw const (*l4p).source),
            rd(&raw const (*l4p).dest),
            rd(&raw const (*l4p).word1),
        )
    };
    // SAFETY: plain copies into the scratch value.
    unsafe {
        copy::addr(&raw mut out.key.src, &src);
        copy::addr(&raw mut out.key.dst, &dst);
    }
    out.key.sport = sport;
    out.key.dport = dport;
    out.key.proto = proto;
    out.key.af = af;
    out.key._pad = 0;
    out.l4 = l4 as u64;
    out.payload = payload as u64;
    out.flags = flags;
    out.seq = if proto == PROTO_TCP {
        u32::from_be(word1)
    } else {
        0
    };
    Ok(true)
}

/// TCP flag combinations no legitimate stack sends: none at all, SYN with FIN or RST.
#[inline(always)]
fn bad_flags(pkt: &Packet) -> bool {
    pkt.key.proto == PROTO_TCP
        && (pkt.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == 0
            || (pkt.flags & TCP_SYN != 0 && pkt.flags & (TCP_FIN | TCP_RST) != 0))
}

/// Whether the packet may open a new flow: a pure SYN for TCP, any datagram for UDP.
#[inline(always)]
fn opens_flow(pkt: &Packet) -> bool {
    pkt.key.proto == PROTO_UDP || pkt.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN
}

/// Parses the TCP or UDP header at `l4` (the IP payload is `l4_len` bytes) into
/// `SCRATCH_PACKET`; returns `PARSED`, or the XDP action for a packet it will not handle.
#[inline(never)]
fn parse(ctx: &XdpContext, l4: usize, l4_len: usize, af: u8) -> u32 {
    let Some(pkt) = SCRATCH_PACKET.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: per-CPU scratch, exclusively ours during this run.
    let pkt = unsafe { &mut *pkt };
    let parsed = if af == AF_INET {
        match ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) {
            // SAFETY: bounds-checked by `ptr_at`.
            Ok(ip) => unsafe {
                let (s, d) = (rd(&raw const (*ip).saddr), rd(&raw const (*ip).daddr));
                transport(
                    ctx,
                    pkt,
                    l4,
                    l4_len,
                    (*ip).protocol,
                    [s, 0, 0, 0],
                    [d, 0, 0, 0],
                    af,
                )
            },
            Err(()) => return xdp_action::XDP_PASS,
        }
    } else {
        match ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) {
            // SAFETY: bounds-checked by `ptr_at`.
            Ok(ip) => unsafe {
                let (s, d) = (
                    copy::read_addr(&raw const (*ip).saddr),
                    copy::read_addr(&raw const (*ip).daddr),
                );
                transport(ctx, pkt, l4, l4_len, (*ip).nexthdr, s, d, af)
            },
            Err(()) => return xdp_action::XDP_PASS,
        }
    };
    match parsed {
        Ok(true) => {}
        Ok(false) => {
            let Ok(dst) = outer_dst(ctx, af) else {
                return xdp_action::XDP_PASS;
            };
            return not_handled(&dst, af, stat::DROP_MALFORMED).unwrap_or(xdp_action::XDP_PASS);
        }
        Err(()) => return xdp_action::XDP_PASS,
    }
    PARSED
}

/// `parse`'s answer when the packet is a TCP or UDP packet now in `SCRATCH_PACKET`.
const PARSED: u32 = 0xffff_0001;

/// Steers the packet in `SCRATCH_PACKET`; returns the XDP action, or `NEW_FLOW`.
#[inline(never)]
fn steer(ctx: &XdpContext) -> u32 {
    let Some(pkt) = SCRATCH_PACKET.get_ptr(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: per-CPU scratch, filled by `parse` during this run.
    let pkt = unsafe { &*pkt };
    // A header that cannot be located again (never expected after parsing) drops the packet:
    // nothing has been rewritten at that point.
    try_steer(ctx, pkt).unwrap_or(xdp_action::XDP_DROP)
}

/// Parses, steers and, for a new flow, admits a TCP or UDP packet. Each step is its own BPF
/// function so that their stack frames do not add up (the BPF stack is 512 bytes in all).
#[inline(always)]
fn handle(ctx: &XdpContext, l4: usize, l4_len: usize, af: u8) -> u32 {
    match parse(ctx, l4, l4_len, af) {
        PARSED => match steer(ctx) {
            NEW_FLOW => new_flow(ctx),
            action => action,
        },
        action => action,
    }
}

#[inline(always)]
fn try_steer(ctx: &XdpContext, pkt: &Packet) -> Result<u32, ()> {
    let existing = FLOWS.get_ptr_mut(&pkt.key);
    if let Some(e) = existing {
        // SAFETY: map value pointer, valid for the duration of this run.
        let (dir, state) = unsafe { ((*e).dir, (*e).state) };
        let reopen = dir == flow_dir::FORWARD
            && state & flow_state::CLOSED != 0
            && pkt.key.proto == PROTO_TCP
            && opens_flow(pkt);
        if !reopen {
            if bad_flags(pkt) {
                return drop_with(stat::DROP_MALFORMED);
            }
            return Ok(follow(ctx, pkt, e));
        }
    }
    let svc_key = ServiceKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        af: pkt.key.af,
    };
    // SAFETY: map value, valid for the duration of this run (not copied: stack space).
    let Some(svc) = (unsafe { SERVICES.get(&svc_key) }) else {
        // Not a service port; a packet to a VIP on another port is still not the host's.
        return not_handled(&pkt.key.dst, pkt.key.af, stat::DROP_UNSUPPORTED);
    };
    if bad_flags(pkt) {
        return drop_with(stat::DROP_MALFORMED);
    }
    if !opens_flow(pkt) {
        return drop_with(stat::DROP_NO_FLOW);
    }
    if let Some(old) = existing {
        // A closed flow's 5-tuple is being reused: release its reply entry (and SNAT port).
        // SAFETY: map value pointer, read in place.
        let _ = FLOWS.remove(&unsafe { &*old }.peer_key(pkt.key.proto, pkt.key.af));
    }
    let _ = svc;
    Ok(NEW_FLOW)
}

/// `steer`'s answer when the packet opens a flow: `new_flow` handles it next.
const NEW_FLOW: u32 = 0xffff_0000;

/// Admits (or refuses) the flow the packet in `SCRATCH_PACKET` opens, and forwards the packet.
/// Returns the XDP action.
#[inline(never)]
fn new_flow(ctx: &XdpContext) -> u32 {
    try_new_flow(ctx).unwrap_or(xdp_action::XDP_DROP)
}

#[inline(always)]
fn try_new_flow(ctx: &XdpContext) -> Result<u32, ()> {
    let pkt = SCRATCH_PACKET.get_ptr(0).ok_or(())?;
    // SAFETY: per-CPU scratch, filled by `steer` during this run.
    let pkt = unsafe { &*pkt };
    let svc_key = ServiceKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        af: pkt.key.af,
    };
    // SAFETY: map value, valid for the duration of this run.
    let svc = unsafe { SERVICES.get(&svc_key) }.ok_or(())?;
    let refusal = open_flow(ctx, pkt, svc);
    if refusal & REFUSE_DENY != 0 {
        return Ok(deny(pkt, svc, (refusal >> 32) as u8, refusal as u32));
    }
    if refusal != 0 {
        return drop_with(refusal as u32);
    }
    Ok(forward_opened(ctx))
}

/// Forwards the packet that opened a flow. The new forward entry is still in the scratch
/// space, its counters already include this packet: rewrite from there, without looking the
/// flow up again. Returns the XDP action.
#[inline(never)]
fn forward_opened(ctx: &XdpContext) -> u32 {
    let (Some(pkt), Some(f)) = (SCRATCH_PACKET.get_ptr(0), SCRATCH_FLOW.get_ptr(0)) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: per-CPU scratch, ours during this run.
    let (pkt, f) = unsafe { (&*pkt, &*f) };
    if rewrite(
        ctx,
        pkt,
        &f.nat_src,
        &f.nat_dst,
        f.nat_sport,
        f.nat_dport,
        &f.hop,
    )
    .is_err()
    {
        return xdp_action::XDP_DROP;
    }
    count(stat::FORWARDED);
    transmit(ctx, f.hop.ifindex)
}

/// One packet of an established flow, either way: rewrite it as the entry says, count it,
/// follow FIN/RST. Returns the XDP action.
#[inline(never)]
fn follow(ctx: &XdpContext, pkt: &Packet, e: *mut Flow) -> u32 {
    try_follow(ctx, pkt, e).unwrap_or(xdp_action::XDP_DROP)
}

#[inline(always)]
fn try_follow(ctx: &XdpContext, pkt: &Packet, e: *mut Flow) -> Result<u32, ()> {
    // SAFETY: `e` points into FLOWS for the duration of this run; fields that other CPUs
    // update are only touched through `atomic`.
    let f = unsafe { &*e };
    rewrite(
        ctx,
        pkt,
        &f.nat_src,
        &f.nat_dst,
        f.nat_sport,
        f.nat_dport,
        &f.hop,
    )?;
    if pkt.key.proto == PROTO_TCP {
        count_tcp_bytes(pkt, e);
    } else {
        // SAFETY: as above.
        unsafe { atomic::add(&raw mut (*e).bytes, pkt.payload) };
    }
    // SAFETY: as above.
    unsafe {
        atomic::add(&raw mut (*e).packets, 1);
        (*e).last_seen_ns = bpf_ktime_get_coarse_ns();
    }
    if pkt.key.proto == PROTO_TCP && pkt.flags & (TCP_FIN | TCP_RST) != 0 {
        track_close(pkt, e);
    }
    count(if f.dir == flow_dir::FORWARD {
        stat::FORWARDED
    } else {
        stat::REPLIED
    });
    Ok(transmit(ctx, f.hop.ifindex))
}

/// Largest advance of the sequence space one TCP segment may count: the largest window TCP can
/// offer (2^30 bytes, window scale 14). A segment ending further ahead than that, or not ahead
/// at all (a retransmission, or behind by up to 2^31), counts nothing and moves nothing.
const MAX_SEQ_ADVANCE: u32 = 1 << 30;
/// Compare-and-swap attempts per segment; each failure means another CPU has just counted.
const COUNT_TRIES: u32 = 4;

/// Counts a TCP segment's bytes as the advance of its direction's sequence space: only bytes
/// beyond the highest sequence number counted so far (`seq_base + bytes`, 32-bit, wrap-around
/// safe). A retransmitted segment adds nothing, a partly overlapping one only its new bytes; an
/// out-of-order segment counts the gap before it too, which the gap's own segment then does
/// not count again. The first packet of a direction sets the base (a SYN takes one sequence
/// number before its payload); segments without payload count nothing, so a FIN's sequence
/// number, which the next ACK steps over, is never a byte.
///
/// Both directions of a flow may be handled on several CPUs at once: the base is set with a
/// compare-and-swap from 0, so one packet's base wins, and `bytes` is raised with a
/// compare-and-swap from the value the advance was computed against, so two CPUs never count
/// the same bytes. A CPU that loses `COUNT_TRIES` races in a row leaves its segment's new bytes
/// uncounted (they would be counted again by the next segment beyond them): the count errs
/// only towards fewer, never more.
#[inline(always)]
fn count_tcp_bytes(pkt: &Packet, e: *mut Flow) {
    let start = pkt.seq.wrapping_add((pkt.flags & TCP_SYN != 0) as u32);
    // SAFETY: `e` points into FLOWS for the duration of this run; both fields are aligned u64s
    // that other CPUs only change atomically.
    unsafe {
        let mut base = atomic::load(&raw const (*e).seq_base);
        if base == 0 {
            let want = SEQ_BASED | start as u64;
            base = match atomic::cmpxchg(&raw mut (*e).seq_base, 0, want) {
                0 => want,
                other => other,
            };
        }
        // A segment without payload moves nothing: the sequence number after a FIN (that of
        // the final ACK) is not a byte.
        if pkt.payload == 0 {
            return;
        }
        let end = start.wrapping_add(pkt.payload as u32);
        let mut old = atomic::load(&raw const (*e).bytes);
        for _ in 0..COUNT_TRIES {
            let advance = end.wrapping_sub((base as u32).wrapping_add(old as u32));
            if advance == 0 || advance > MAX_SEQ_ADVANCE {
                return;
            }
            let seen = atomic::cmpxchg(&raw mut (*e).bytes, old, old + advance as u64);
            if seen == old {
                return;
            }
            old = seen;
        }
    }
}

#[inline(always)]
fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex as usize == ctx.ingress_ifindex() {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call; it returns XDP_REDIRECT, or XDP_ABORTED on a bad index.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// Follows TCP FIN and RST: the flow closes on RST, or on a FIN when the other direction has
/// sent one too. Exactly one CPU wins the forward entry's CLOSED bit and emits the record.
#[inline(never)]
fn track_close(pkt: &Packet, e: *mut Flow) {
    // SAFETY: `e` points into FLOWS for the duration of this run.
    let f = unsafe { &*e };
    let peer_key = f.peer_key(pkt.key.proto, pkt.key.af);
    let Some(peer) = FLOWS.get_ptr_mut(&peer_key) else {
        return;
    };
    let reason = if pkt.flags & TCP_RST != 0 {
        close_reason::RST
    } else {
        // SAFETY: aligned field of a live map value.
        unsafe { atomic::fetch_or(&raw mut (*e).state, flow_state::FIN) };
        // Set ours, then read theirs: of two FINs racing on two CPUs, at least one sees both.
        // SAFETY: live map value.
        if unsafe { (*peer).state } & flow_state::FIN == 0 {
            return;
        }
        close_reason::FIN
    };
    let (fwd, rev, fkey) = if f.dir == flow_dir::FORWARD {
        (e, peer, pkt.key)
    } else {
        (peer, e, peer_key)
    };
    // SAFETY: aligned field of a live map value.
    let prev = unsafe { atomic::fetch_or(&raw mut (*fwd).state, flow_state::CLOSED) };
    if prev & flow_state::CLOSED == 0 {
        // SAFETY: live map values.
        let (f, r) = unsafe { (&*fwd, &*rev) };
        emit_flow(event_kind::CONN_CLOSE, reason, &fkey, f, r);
        // The backend's TIME_WAIT, if any, starts about now: hold the port from here.
        let port = u16::from_be(f.nat_sport) as u32;
        let tuple = snat_tuple(flow_hash(&fkey), f.backend_idx);
        // SAFETY: plain helper call.
        let now = snat_clock(unsafe { bpf_ktime_get_coarse_ns() });
        snat_mark(snat_slot(f.backend_idx, port), snat_owner(tuple, port), now);
    }
}

/// Why a new flow did not open, as one integer so it crosses BPF function calls in a register
/// (aggregates are returned through the stack, which the verifier refuses).
/// `drop_code`: dropped and counted without a record (transient: the client retransmits).
/// `deny_code`: refused by policy or a full resource, counted and recorded.
type Refusal = u64;
const REFUSE_DROP: u64 = 1 << 48;
const REFUSE_DENY: u64 = 2 << 48;

#[inline(always)]
const fn drop_code(stat_index: u32) -> Refusal {
    REFUSE_DROP | stat_index as u64
}

#[inline(always)]
const fn deny_code(reason: u8, rule: u32) -> Refusal {
    REFUSE_DENY | (reason as u64) << 32 | rule as u64
}

/// Opens a flow for `pkt`: both entries are inserted, the open record is pushed, and the
/// forward entry (counting this packet) is left in `SCRATCH_FLOW[0]`. Returns 0, or the
/// refusal.
#[inline(never)]
fn open_flow(ctx: &XdpContext, pkt: &Packet, svc: &ServiceInfo) -> Refusal {
    match try_open_flow(ctx, pkt, svc) {
        Ok(()) => 0,
        Err(r) => r,
    }
}

#[inline(always)]
fn try_open_flow(ctx: &XdpContext, pkt: &Packet, svc: &ServiceInfo) -> Result<(), Refusal> {
    let key = &pkt.key;
    let cfg = CONFIG.get(0).ok_or(drop_code(stat::DENY_NO_BACKEND))?;
    if cfg.flags & config_flags::REFUSE_NEW_FLOWS != 0 {
        return Err(deny_code(deny_reason::AUDIT_UNAVAILABLE, NO_RULE));
    }
    if svc.flags & service_flags::HAS_RULES != 0 {
        match check_acl(key, svc) {
            0 => {}
            r => return Err(r),
        }
    }
    // SAFETY: plain helper call.
    let coarse = unsafe { bpf_ktime_get_coarse_ns() };
    if svc.rate_per_sec != 0 && !take_token(key, svc, coarse) {
        return Err(deny_code(deny_reason::RATE_LIMITED, NO_RULE));
    }
    if svc.backend_count == 0 || cfg.maglev_size == 0 {
        return Err(deny_code(deny_reason::NO_BACKEND, NO_RULE));
    }
    let hash = flow_hash(key);
    let slot = svc.id * cfg.maglev_size + hash % cfg.maglev_size;
    let backend_idx = *MAGLEV
        .get(slot)
        .ok_or(deny_code(deny_reason::NO_BACKEND, NO_RULE))?;
    let be = BACKENDS
        .get(backend_idx)
        .ok_or(deny_code(deny_reason::NO_BACKEND, NO_RULE))?;
    let to_backend = next_hop(ctx, be, backend_idx, coarse);
    if to_backend == 0 {
        return Err(drop_code(stat::DROP_NO_ROUTE));
    }
    let fwd = SCRATCH_FLOW
        .get_ptr_mut(0)
        .ok_or(drop_code(stat::DENY_CONNTRACK_FULL))?;
    let rev = SCRATCH_FLOW
        .get_ptr_mut(1)
        .ok_or(drop_code(stat::DENY_CONNTRACK_FULL))?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).map_err(|()| drop_code(stat::DROP_MALFORMED))?;
    let hops = HOPS
        .get_ptr(backend_idx)
        .ok_or(drop_code(stat::DROP_NO_ROUTE))?;
    // SAFETY: per-CPU scratch values and cache, exclusively ours during this run; `eth` is
    // bounds-checked.
    let (fwd, rev) = unsafe {
        let (f, r) = (&mut *fwd, &mut *rev);
        let now = bpf_ktime_get_boot_ns();
        f.flow_id = next_flow_id();
        f.opened_ns = now;
        f.last_seen_ns = coarse;
        f.bytes = pkt.payload;
        f.packets = 1;
        f.state = 0;
        // A SYN's payload (TCP Fast Open) starts one past its sequence number.
        f.seq_base = if key.proto == PROTO_TCP {
            SEQ_BASED | pkt.seq.wrapping_add(1) as u64
        } else {
            0
        };
        copy::addr(&raw mut f.nat_src, &be.snat_addr);
        copy::addr(&raw mut f.nat_dst, &be.addr);
        f.nat_sport = 0; // chosen below
        f.nat_dport = be.port;
        f.service_id = svc.id;
        f.backend_idx = backend_idx;
        f.generation = svc.generation;
        f.hop.ifindex = (*hops).hop.ifindex;
        copy::mac(&raw mut f.hop.dst_mac, &(*hops).hop.dst_mac);
        copy::mac(&raw mut f.hop.src_mac, &(*hops).hop.src_mac);
        f.dir = flow_dir::FORWARD;
        // Field by field: a whole-struct copy would go through the stack.
        r.flow_id = f.flow_id;
        r.opened_ns = now;
        r.last_seen_ns = coarse;
        r.bytes = 0;
        r.packets = 0;
        r.state = 0;
        r.seq_base = 0; // set by the backend's first packet (its SYN-ACK)
        r.service_id = svc.id;
        r.backend_idx = backend_idx;
        r.generation = svc.generation;
        copy::addr(&raw mut r.nat_src, &key.dst);
        copy::addr(&raw mut r.nat_dst, &key.src);
        r.nat_sport = key.dport;
        r.nat_dport = key.sport;
        // Replies go back the way the client's packet came.
        r.hop.ifindex = ctx.ingress_ifindex() as u32;
        copy::mac(&raw mut r.hop.dst_mac, &raw const (*eth).src);
        copy::mac(&raw mut r.hop.src_mac, &raw const (*eth).dst);
        r.dir = flow_dir::REPLY;
        (f, r)
    };
    let port = reserve_snat_port(key, be, cfg, rev, hash);
    if port > u16::MAX as u64 {
        return Err(port);
    }
    fwd.nat_sport = port as u16;
    if FLOWS.insert(key, &*fwd, BPF_ANY as u64).is_err() {
        let _ = FLOWS.remove(&fwd.peer_key(key.proto, key.af));
        return Err(deny_code(deny_reason::CONNTRACK_FULL, NO_RULE));
    }
    emit_flow(event_kind::CONN_OPEN, open_reason::MAGLEV, key, fwd, rev);
    Ok(())
}

/// Longest-prefix match of the client address among the service's rules. A match counts
/// towards its rule; a deny rule, or no match on a service that has allow rules, refuses.
#[inline(never)]
fn check_acl(key: &FlowKey, svc: &ServiceInfo) -> Refusal {
    let lookup = Key::new(
        ACL_LOOKUP_PREFIX,
        AclKey {
            scope: AclKey::scope(svc.id, key.af),
            addr: key.src,
        },
    );
    match ACL.get(&lookup) {
        Some(rule) => {
            let rule = *rule;
            if let Some(hits) = RULE_HITS.get_ptr_mut(rule.rule_id) {
                // SAFETY: per-CPU slot.
                unsafe { *hits += 1 };
            }
            if rule.action == acl_action::DENY {
                return deny_code(deny_reason::ACL, rule.rule_id);
            }
            0
        }
        None if svc.flags & service_flags::DEFAULT_DENY != 0 => {
            deny_code(deny_reason::ACL, NO_RULE)
        }
        None => 0,
    }
}

#[inline(always)]
fn source_key(key: &FlowKey, svc: &ServiceInfo) -> SourceKey {
    SourceKey {
        addr: key.src,
        service_id: svc.id,
        af: key.af,
        _pad0: 0,
        _pad1: 0,
    }
}

/// Token bucket per source and service: `rate_per_sec` new flows per second, bursts of as
/// many. Updates from several CPUs may race and lose a token now and then; the limit is a
/// policy, not an account (the audit records are the account).
#[inline(never)]
fn take_token(key: &FlowKey, svc: &ServiceInfo, now: u64) -> bool {
    let skey = source_key(key, svc);
    let cap = svc.rate_per_sec as u64 * TOKEN;
    match SOURCES.get_ptr_mut(&skey) {
        Some(s) => {
            // SAFETY: map value pointer for the duration of this run.
            let s = unsafe { &mut *s };
            let elapsed = now.saturating_sub(s.refill_ns).min(1_000_000_000);
            let tokens = (s.tokens_micro + elapsed * svc.rate_per_sec as u64 / 1000).min(cap);
            s.refill_ns = now;
            if tokens >= TOKEN {
                s.tokens_micro = tokens - TOKEN;
                true
            } else {
                s.tokens_micro = tokens;
                false
            }
        }
        None => {
            let s = SourceState {
                tokens_micro: cap - TOKEN,
                refill_ns: now,
                ..SourceState::default()
            };
            let _ = SOURCES.insert(&skey, &s, BPF_ANY as u64);
            true
        }
    }
}

/// Refuses a new flow: counted always, recorded at most once per source per second (the
/// record carries how many were suppressed since the previous one).
#[inline(never)]
fn deny(pkt: &Packet, svc: &ServiceInfo, reason: u8, rule: u32) -> u32 {
    count(match reason {
        deny_reason::ACL => stat::DENY_ACL,
        deny_reason::RATE_LIMITED => stat::DENY_RATE_LIMITED,
        deny_reason::NO_BACKEND => stat::DENY_NO_BACKEND,
        deny_reason::SNAT_EXHAUSTED => stat::DENY_SNAT_EXHAUSTED,
        deny_reason::CONNTRACK_FULL => stat::DENY_CONNTRACK_FULL,
        _ => stat::DENY_AUDIT_UNAVAILABLE,
    });
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let skey = source_key(&pkt.key, svc);
    let suppressed = match SOURCES.get_ptr_mut(&skey) {
        Some(s) => {
            // SAFETY: map value pointer for the duration of this run.
            let s = unsafe { &mut *s };
            if s.last_deny_record_ns != 0
                && now.saturating_sub(s.last_deny_record_ns) < DENY_RECORD_INTERVAL_NS
            {
                s.suppressed += 1;
                count(stat::DENY_RECORDS_SUPPRESSED);
                return xdp_action::XDP_DROP;
            }
            let n = s.suppressed;
            s.suppressed = 0;
            s.last_deny_record_ns = now;
            n
        }
        None => {
            let s = SourceState {
                last_deny_record_ns: now,
                ..SourceState::default()
            };
            let _ = SOURCES.insert(&skey, &s, BPF_ANY as u64);
            0
        }
    };
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count(stat::RINGBUF_LOSS);
        return xdp_action::XDP_DROP;
    };
    let k = &pkt.key;
    // SAFETY: the reserved entry is ours until submitted; every field is written.
    unsafe {
        let e = &mut *entry.as_mut_ptr();
        *e = ConnEvent::default();
        e.kind = event_kind::CONN_DENY;
        e.proto = k.proto;
        e.af = k.af;
        e.reason = reason;
        e.service_id = svc.id;
        e.ts_ns = now;
        e.client = k.src;
        e.vip = k.dst;
        e.client_port = k.sport;
        e.vip_port = k.dport;
        e.generation = svc.generation;
        e.rule = rule;
        e.packets_to_backend = suppressed;
    }
    entry.submit(0);
    xdp_action::XDP_DROP
}

/// The SNAT port a flow asks for first: the client's own port when it is in the range, else
/// the client's port folded into the range. Distinct ports of one client address therefore get
/// distinct SNAT ports (when the client's port range is no larger than the SNAT range), and a
/// client that reuses its port for the same VIP gets the same backend-side 4-tuple again.
#[inline(always)]
fn preferred_snat_offset(sport_be: u16, min: u32, range: u32) -> u32 {
    let sport = u16::from_be(sport_be) as u32;
    // `sport + k * range - min` with k large enough to stay non-negative; `range` is not 0.
    rem(sport + (div(65536, range) + 1) * range - min, range)
}

/// `a % b`, 0 when `b` is 0: without a panic path, which the verifier would refuse.
#[inline(always)]
fn rem(a: u32, b: u32) -> u32 {
    if b == 0 { 0 } else { a % b }
}

/// `a / b`, 0 when `b` is 0 (as `rem`).
#[inline(always)]
fn div(a: u32, b: u32) -> u32 {
    if b == 0 { 0 } else { a / b }
}

/// The `SNAT_HISTORY` slot of (backend, SNAT port), host byte order port.
#[inline(always)]
fn snat_slot(backend_idx: u32, port: u32) -> u32 {
    mix(backend_idx << 16 ^ port) & (SNAT_HISTORY_SLOTS - 1)
}

/// Identity of (client 5-tuple, backend, SNAT port) as stored in `SNAT_HISTORY`: `tuple` is
/// `snat_tuple` of the client's 5-tuple and backend.
#[inline(always)]
fn snat_owner(tuple: u32, port: u32) -> u32 {
    mix(tuple ^ port.wrapping_mul(0x85eb_ca6b))
}

/// A hash of the client's 5-tuple (`flow_hash`) and the backend.
#[inline(always)]
fn snat_tuple(flow_hash: u32, backend_idx: u32) -> u32 {
    mix(flow_hash ^ backend_idx.wrapping_add(1).wrapping_mul(0x9e37_79b9))
}

/// Coarse clock in `SNAT_HISTORY` units (2^20 ns, about 1.05 ms).
#[inline(always)]
fn snat_clock(coarse_ns: u64) -> u32 {
    (coarse_ns >> 20) as u32
}

/// Records that (backend, SNAT port) was used by `owner` at `now` (`snat_clock` units).
#[inline(always)]
fn snat_mark(slot: u32, owner: u32, now: u32) {
    if let Some(h) = SNAT_HISTORY.get_ptr_mut(slot) {
        // SAFETY: array slot; one aligned 64-bit store, so readers on other CPUs see the old
        // or the new value whole.
        unsafe { core::ptr::write_volatile(h, (now as u64) << 32 | owner as u64) };
    }
}

/// How much longer (`snat_clock` units) (backend, SNAT port) is held from the client 5-tuple
/// `owner`, or 0 when it may be taken at once: never used, used longer than `SNAT_HOLD` ago,
/// or last used by this very client 5-tuple (whose next SYN the backend's TIME_WAIT accepts).
#[inline(always)]
fn snat_held(slot: u32, owner: u32, now: u32) -> u32 {
    let Some(h) = SNAT_HISTORY.get_ptr(slot) else {
        return 0;
    };
    // SAFETY: array slot; an aligned 64-bit load.
    let h = unsafe { core::ptr::read_volatile(h) };
    let age = now.wrapping_sub((h >> 32) as u32);
    if h == 0 || h as u32 == owner || age >= SNAT_HOLD {
        0
    } else {
        // At least 1: "held".
        SNAT_HOLD - age
    }
}

/// Picks a SNAT port towards `be` and reserves it by inserting the reply entry `rev` under it.
/// `BPF_NOEXIST` makes the insert the collision check, so two live flows never share a port.
///
/// TCP ports are also kept from reuse while the backend may still hold the old connection in
/// TIME_WAIT (`SNAT_HOLD` after it closed), unless the same client 5-tuple comes back: its
/// timestamps and sequence numbers continue the old connection's, which TIME_WAIT accepts,
/// while another client's (the kernel derives the timestamp offset from the 4-tuple) are
/// refused by PAWS about half the time, costing the client an RST and a 1 s SYN retry.
///
/// Candidates: the preferred port (`preferred_snat_offset`), then pseudo-random ports drawn
/// from a hash of the client 5-tuple and backend, so a client that had to move elsewhere finds
/// the same substitute again. The first candidate that is free and not held wins; when every
/// candidate is held, the free one released longest ago; when none is free, the flow is
/// refused. A range no larger than the tries is walked whole. Returns the port (network byte
/// order), or a refusal (greater than any port).
#[inline(never)]
fn reserve_snat_port(key: &FlowKey, be: &Backend, cfg: &Config, rev: &Flow, hash: u32) -> u64 {
    let (min, max) = (cfg.snat_port_min as u32, cfg.snat_port_max as u32);
    let range = max.wrapping_sub(min).wrapping_add(1);
    if min == 0 || max < min || range == 0 {
        return deny_code(deny_reason::SNAT_EXHAUSTED, NO_RULE);
    }
    let mut rkey = FlowKey {
        src: be.addr,
        dst: be.snat_addr,
        sport: be.port,
        dport: 0,
        proto: key.proto,
        af: key.af,
        _pad: 0,
    };
    let tcp = key.proto == PROTO_TCP;
    let tuple = snat_tuple(hash, rev.backend_idx);
    let now = snat_clock(rev.last_seen_ns);
    let first = preferred_snat_offset(key.sport, min, range);
    let walk = range <= SNAT_PORT_TRIES;
    // The held candidate released longest ago: (port + 1, time left).
    let (mut oldest, mut oldest_left) = (0u32, u32::MAX);
    for i in 0..SNAT_PORT_TRIES {
        let offset = if i == 0 {
            first
        } else if walk {
            rem(first + i, range)
        } else {
            rem(mix(tuple.wrapping_add(i.wrapping_mul(0x9e37_79b9))), range)
        };
        let port = min + offset;
        let slot = snat_slot(rev.backend_idx, port);
        let owner = snat_owner(tuple, port);
        let left = if tcp { snat_held(slot, owner, now) } else { 0 };
        rkey.dport = (port as u16).to_be();
        if left != 0 {
            // SAFETY: map lookup; the value is not used.
            if left < oldest_left && unsafe { FLOWS.get(&rkey) }.is_none() {
                (oldest, oldest_left) = (port + 1, left);
            }
            continue;
        }
        match FLOWS.insert(&rkey, rev, BPF_NOEXIST as u64) {
            Ok(()) => {
                if tcp {
                    snat_mark(slot, owner, now);
                }
                return rkey.dport as u64;
            }
            Err(e) if e as i64 == -E2BIG => return deny_code(deny_reason::CONNTRACK_FULL, NO_RULE),
            Err(_) => {}
        }
    }
    if oldest != 0 {
        let port = oldest - 1;
        rkey.dport = (port as u16).to_be();
        if FLOWS.insert(&rkey, rev, BPF_NOEXIST as u64).is_ok() {
            snat_mark(
                snat_slot(rev.backend_idx, port),
                snat_owner(tuple, port),
                now,
            );
            return rkey.dport as u64;
        }
    }
    deny_code(deny_reason::SNAT_EXHAUSTED, NO_RULE)
}

/// The next hop towards backend `idx` from this CPU's cache, refreshed from the kernel's FIB
/// when older than `HOP_TTL_NS`. Returns the egress ifindex, 0 when there is no route or no
/// resolved neighbour.
#[inline(never)]
fn next_hop(ctx: &XdpContext, be: &Backend, idx: u32, now: u64) -> u32 {
    let Some(cache) = HOPS.get_ptr_mut(idx) else {
        return 0;
    };
    // SAFETY: per-CPU slot, ours during this run.
    let cache = unsafe { &mut *cache };
    if cache.resolved_ns != 0 && now.saturating_sub(cache.resolved_ns) < HOP_TTL_NS {
        return cache.hop.ifindex;
    }
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.l4_protocol = PROTO_TCP;
    p.ifindex = ctx.ingress_ifindex() as u32;
    if be.af == AF_INET6 {
        p.family = 10; // AF_INET6
        p.__bindgen_anon_3.ipv6_src = be.snat_addr;
        p.__bindgen_anon_4.ipv6_dst = be.addr;
    } else {
        p.family = 2; // AF_INET
        p.__bindgen_anon_3.ipv4_src = be.snat_addr[0];
        p.__bindgen_anon_4.ipv4_dst = be.addr[0];
    }
    // SAFETY: `p` is a valid request of the size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        cache.resolved_ns = 0;
        return 0;
    }
    cache.hop.ifindex = p.ifindex;
    // SAFETY: both sides are 6-byte arrays.
    unsafe {
        copy::mac(&raw mut cache.hop.dst_mac, &p.dmac);
        copy::mac(&raw mut cache.hop.src_mac, &p.smac);
    }
    cache.resolved_ns = now;
    p.ifindex
}

/// Unique flow ids without atomics: a per-CPU counter (seeded by the daemon from the clock)
/// with the CPU number in the low byte.
#[inline(always)]
fn next_flow_id() -> u64 {
    // SAFETY: plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    match FLOW_SEQ.get_ptr_mut(0) {
        Some(seq) => {
            // SAFETY: per-CPU slot, and XDP does not preempt itself on one CPU.
            let n = unsafe {
                *seq += 1;
                *seq
            };
            (n << 8) | (cpu & 0xff)
        }
        None => cpu,
    }
}

/// A well-mixed hash of the flow's 5-tuple, for the Maglev slot.
#[inline(always)]
fn flow_hash(key: &FlowKey) -> u32 {
    let mut h: u32 = 0x9e37_79b9;
    for w in [
        key.src[0], key.src[1], key.src[2], key.src[3], key.dst[0], key.dst[1], key.dst[2],
        key.dst[3],
    ] {
        h = mix(h ^ w);
    }
    mix(h ^ ((key.sport as u32) << 16 | key.dport as u32) ^ (key.proto as u32) << 8)
}

#[inline(always)]
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^ (h >> 16)
}

/// Rewrites source and destination address and port, fixes the checksums, sets the MACs.
/// Every header is located (bounds-checked) before the first byte changes.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    saddr: &[u32; 4],
    daddr: &[u32; 4],
    sport: u16,
    dport: u16,
    hop: &NextHop,
) -> Result<(), ()> {
    let k = &pkt.key;
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // The offset comes back from a map: bound it again for the verifier.
    let l4_off = pkt.l4 as usize;
    if l4_off > MAX_L4_OFFSET {
        return Err(());
    }
    let l4: *mut L4Ports = ptr_at(ctx, l4_off)?;
    let csum: *mut u16 = ptr_at(
        ctx,
        l4_off
            + if k.proto == PROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            },
    )?;
    // SAFETY: every pointer is bounds-checked by `ptr_at`.
    unsafe {
        let mut c = rd(csum);
        // A zero UDP checksum over IPv4 means "none": leave it so.
        let has_csum = !(k.proto == PROTO_UDP && c == 0);
        if k.af == AF_INET {
            let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
            let mut ipc = rd(&raw const (*ip).check);
            ipc = csum::replace4(ipc, k.src[0], saddr[0]);
            ipc = csum::replace4(ipc, k.dst[0], daddr[0]);
            wr(&raw mut (*ip).check, ipc);
            wr(&raw mut (*ip).saddr, saddr[0]);
            wr(&raw mut (*ip).daddr, daddr[0]);
            c = csum::replace4(c, k.src[0], saddr[0]);
            c = csum::replace4(c, k.dst[0], daddr[0]);
        } else {
            let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_HLEN)?;
            copy::addr(&raw mut (*ip).saddr, saddr);
            copy::addr(&raw mut (*ip).daddr, daddr);
            c = csum::replace16(c, &k.src, saddr);
            c = csum::replace16(c, &k.dst, daddr);
        }
        c = csum::replace2(c, k.sport, sport);
        c = csum::replace2(c, k.dport, dport);
        if has_csum {
            // For UDP a computed 0 is sent as all ones (RFC 768).
            wr(
                csum,
                if c == 0 && k.proto == PROTO_UDP {
                    0xffff
                } else {
                    c
                },
            );
        }
        wr(&raw mut (*l4).source, sport);
        wr(&raw mut (*l4).dest, dport);
        copy::mac(&raw mut (*eth).dst, &hop.dst_mac);
        copy::mac(&raw mut (*eth).src, &hop.src_mac);
    }
    Ok(())
}

/// ICMP "destination unreachable" (with "fragmentation needed") and ICMPv6 "packet too big"
/// about a packet the balancer sent to a backend are translated for the client: the quoted
/// packet becomes the client's own (client → VIP), the error comes from the VIP, and it goes
/// out the way the client's packets came in. Other ICMP goes to the host (or, to a VIP, is
/// dropped and counted).
#[inline(never)]
fn icmp_error(ctx: &XdpContext, l4: usize, af: u8) -> u32 {
    try_icmp_error(ctx, l4, af).unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn try_icmp_error(ctx: &XdpContext, l4: usize, af: u8) -> Result<u32, ()> {
    let icmp: *mut IcmpHdr = ptr_at(ctx, l4)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let kind = unsafe { (*icmp).kind };
    let is_error = if af == AF_INET {
        kind == ICMP_DEST_UNREACH
    } else {
        kind == ICMPV6_DEST_UNREACH || kind == ICMPV6_PKT_TOOBIG
    };
    if !is_error {
        let dst = outer_dst(ctx, af)?;
        return not_handled(&dst, af, stat::DROP_UNSUPPORTED);
    }
    // Keys are built in the per-CPU scratch packet rather than on the stack (stack space).
    let key = &mut unsafe { &mut *SCRATCH_PACKET.get_ptr_mut(0).ok_or(())? }.key;
    // The quoted packet: an IP header without options, then at least the 8 bytes of ports. It
    // went snat:port → backend:port; the flow's reply entry has the reverse key.
    let inner = l4 + ICMP_HLEN;
    let inner_l4 = if af == AF_INET {
        let iip: *mut Ipv4Hdr = ptr_at(ctx, inner)?;
        // SAFETY: bounds-checked by `ptr_at`.
        unsafe {
            if (*iip).vhl != 0x45 {
                return pass();
            }
            key.src = [rd(&raw const (*iip).daddr), 0, 0, 0];
            key.dst = [rd(&raw const (*iip).saddr), 0, 0, 0];
            key.proto = (*iip).protocol;
        }
        inner + 20
    } else {
        let iip: *mut Ipv6Hdr = ptr_at(ctx, inner)?;
        // SAFETY: bounds-checked by `ptr_at`.
        unsafe {
            copy::addr(&raw mut key.src, &raw const (*iip).daddr);
            copy::addr(&raw mut key.dst, &raw const (*iip).saddr);
            key.proto = (*iip).nexthdr;
        }
        inner + IPV6_HLEN
    };
    if key.proto != PROTO_TCP && key.proto != PROTO_UDP {
        return pass();
    }
    key.af = af;
    key._pad = 0;
    let ports: *mut L4Ports = ptr_at(ctx, inner_l4)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        key.sport = rd(&raw const (*ports).dest);
        key.dport = rd(&raw const (*ports).source);
    }
    // The reply entry of the flow says where the client is, and how to reach it.
    let Some(rev) = FLOWS.get_ptr(&*key) else {
        return pass();
    };
    // SAFETY: map value, valid for the duration of this run.
    let rev = unsafe { &*rev };
    if rev.dir != flow_dir::REPLY {
        return pass();
    }
    // The client's own 5-tuple (client → VIP), which the quoted packet becomes.
    // SAFETY: plain copies between map values.
    unsafe {
        copy::addr(&raw mut key.src, &rev.nat_dst);
        copy::addr(&raw mut key.dst, &rev.nat_src);
    }
    key.sport = rev.nat_dport;
    key.dport = rev.nat_sport;
    let translated = if af == AF_INET {
        icmp_translate4(ctx, l4, key)
    } else {
        icmp_translate6(ctx, l4, key)
    };
    if !translated {
        return pass();
    }
    let hop = &rev.hop;
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`.
    unsafe {
        copy::mac(&raw mut (*eth).dst, &hop.dst_mac);
        copy::mac(&raw mut (*eth).src, &hop.src_mac);
    }
    count(stat::ICMP_TRANSLATED);
    Ok(transmit(ctx, hop.ifindex))
}

#[inline(always)]
fn outer_dst(ctx: &XdpContext, af: u8) -> Result<[u32; 4], ()> {
    if af == AF_INET {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
        // SAFETY: bounds-checked by `ptr_at`.
        Ok([unsafe { rd(&raw const (*ip).daddr) }, 0, 0, 0])
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_HLEN)?;
        // SAFETY: bounds-checked by `ptr_at`.
        Ok(unsafe { rd(&raw const (*ip).daddr) })
    }
}

/// Rewrites the quoted transport ports and checksum from `from` (snat → backend) to `to`
/// (client → VIP); returns the ICMP checksum `ic` updated for those changes, or a value above
/// 0xffff when the quoted ports are not in the packet.
#[inline(never)]
fn icmp_quoted_ports(
    ctx: &XdpContext,
    inner_l4: usize,
    from: &FlowKey,
    to: &FlowKey,
    ic: u16,
) -> u32 {
    let Ok(ports) = ptr_at::<L4Ports>(ctx, inner_l4) else {
        return u32::MAX;
    };
    let mut ic = ic;
    // UDP's checksum is always inside the 8 quoted bytes; TCP's only when the router quoted
    // enough. A zero UDP checksum means none.
    let off = if from.proto == PROTO_TCP {
        TCP_CSUM_OFF
    } else {
        UDP_CSUM_OFF
    };
    // SAFETY: every pointer is bounds-checked by `ptr_at`.
    unsafe {
        if let Ok(qc) = ptr_at::<u16>(ctx, inner_l4 + off) {
            let old = rd(qc);
            if old != 0 || from.proto == PROTO_TCP {
                let mut new = if from.af == AF_INET {
                    csum::replace4(
                        csum::replace4(old, from.src[0], to.src[0]),
                        from.dst[0],
                        to.dst[0],
                    )
                } else {
                    csum::replace16(csum::replace16(old, &from.src, &to.src), &from.dst, &to.dst)
                };
                new = csum::replace2(
                    csum::replace2(new, from.sport, to.sport),
                    from.dport,
                    to.dport,
                );
                wr(qc, new);
                ic = csum::replace2(ic, old, new);
            }
        }
        wr(&raw mut (*ports).source, to.sport);
        wr(&raw mut (*ports).dest, to.dport);
    }
    csum::replace2(
        csum::replace2(ic, from.sport, to.sport),
        from.dport,
        to.dport,
    ) as u32
}

/// IPv4: the quoted packet snat:port → backend:port becomes client → VIP; the error goes from
/// the VIP to the client.
#[inline(never)]
fn icmp_translate4(ctx: &XdpContext, l4: usize, ck: &FlowKey) -> bool {
    try_icmp_translate4(ctx, l4, ck).is_ok()
}

#[inline(always)]
fn try_icmp_translate4(ctx: &XdpContext, l4: usize, ck: &FlowKey) -> Result<(), ()> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    let icmp: *mut IcmpHdr = ptr_at(ctx, l4)?;
    let iip: *mut Ipv4Hdr = ptr_at(ctx, l4 + ICMP_HLEN)?;
    let ports: *mut L4Ports = ptr_at(ctx, l4 + ICMP_HLEN + 20)?;
    // SAFETY: every pointer is bounds-checked by `ptr_at`.
    unsafe {
        let from = FlowKey {
            src: [rd(&raw const (*iip).saddr), 0, 0, 0],
            dst: [rd(&raw const (*iip).daddr), 0, 0, 0],
            sport: rd(&raw const (*ports).source),
            dport: rd(&raw const (*ports).dest),
            proto: (*iip).protocol,
            af: AF_INET,
            _pad: 0,
        };
        let ic = icmp_quoted_ports(
            ctx,
            l4 + ICMP_HLEN + 20,
            &from,
            ck,
            rd(&raw const (*icmp).check),
        );
        if ic > 0xffff {
            return Err(());
        }
        let mut ic = ic as u16;
        let old = rd(&raw const (*iip).check);
        let new = csum::replace4(
            csum::replace4(old, from.src[0], ck.src[0]),
            from.dst[0],
            ck.dst[0],
        );
        wr(&raw mut (*iip).check, new);
        wr(&raw mut (*iip).saddr, ck.src[0]);
        wr(&raw mut (*iip).daddr, ck.dst[0]);
        ic = csum::replace2(ic, old, new);
        ic = csum::replace4(
            csum::replace4(ic, from.src[0], ck.src[0]),
            from.dst[0],
            ck.dst[0],
        );
        wr(&raw mut (*icmp).check, ic);
        let (osrc, odst) = (rd(&raw const (*ip).saddr), rd(&raw const (*ip).daddr));
        let oc = csum::replace4(
            csum::replace4(rd(&raw const (*ip).check), osrc, ck.dst[0]),
            odst,
            ck.src[0],
        );
        wr(&raw mut (*ip).check, oc);
        wr(&raw mut (*ip).saddr, ck.dst[0]);
        wr(&raw mut (*ip).daddr, ck.src[0]);
    }
    Ok(())
}

/// IPv6: as `icmp_translate4`; ICMPv6's checksum also covers the outer addresses.
#[inline(never)]
fn icmp_translate6(ctx: &XdpContext, l4: usize, ck: &FlowKey) -> bool {
    try_icmp_translate6(ctx, l4, ck).is_ok()
}

#[inline(always)]
fn try_icmp_translate6(ctx: &XdpContext, l4: usize, ck: &FlowKey) -> Result<(), ()> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_HLEN)?;
    let icmp: *mut IcmpHdr = ptr_at(ctx, l4)?;
    let iip: *mut Ipv6Hdr = ptr_at(ctx, l4 + ICMP_HLEN)?;
    let ports: *mut L4Ports = ptr_at(ctx, l4 + ICMP_HLEN + IPV6_HLEN)?;
    // SAFETY: every pointer is bounds-checked by `ptr_at`.
    unsafe {
        let mut from = FlowKey {
            src: rd(&raw const (*iip).saddr),
            dst: rd(&raw const (*iip).daddr),
            sport: rd(&raw const (*ports).source),
            dport: rd(&raw const (*ports).dest),
            proto: (*iip).nexthdr,
            af: AF_INET6,
            _pad: 0,
        };
        let ic = icmp_quoted_ports(
            ctx,
            l4 + ICMP_HLEN + IPV6_HLEN,
            &from,
            ck,
            rd(&raw const (*icmp).check),
        );
        if ic > 0xffff {
            return Err(());
        }
        let mut ic = csum::replace16(
            csum::replace16(ic as u16, &from.src, &ck.src),
            &from.dst,
            &ck.dst,
        );
        wr(&raw mut (*iip).saddr, ck.src);
        wr(&raw mut (*iip).daddr, ck.dst);
        // Outer addresses, reusing `from` as scratch (stack space).
        from.src = rd(&raw const (*ip).saddr);
        from.dst = rd(&raw const (*ip).daddr);
        ic = csum::replace16(csum::replace16(ic, &from.src, &ck.dst), &from.dst, &ck.src);
        wr(&raw mut (*icmp).check, ic);
        wr(&raw mut (*ip).saddr, ck.dst);
        wr(&raw mut (*ip).daddr, ck.src);
    }
    Ok(())
}

/// Pushes a flow's open or close record, from its forward entry `f` (keyed by `client_key`)
/// and its reply entry `r`; a failed reservation is counted, never silent.
#[inline(never)]
fn emit_flow(kind: u8, reason: u8, client_key: &FlowKey, f: &Flow, r: &Flow) {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count(stat::RINGBUF_LOSS);
        return;
    };
    // Fields are written in place: building the record on the stack first would not fit.
    // SAFETY: the reserved entry is ours until submitted; every field is written. Counters
    // other CPUs may be adding to are read once each.
    unsafe {
        let e = &mut *entry.as_mut_ptr();
        e.kind = kind;
        e.proto = client_key.proto;
        e.af = client_key.af;
        e.reason = reason;
        e.service_id = f.service_id;
        e.flow_id = f.flow_id;
        e.ts_ns = bpf_ktime_get_boot_ns();
        e.opened_ns = f.opened_ns;
        copy::addr(&raw mut e.client, &client_key.src);
        copy::addr(&raw mut e.vip, &client_key.dst);
        copy::addr(&raw mut e.backend, &f.nat_dst);
        copy::addr(&raw mut e.snat, &f.nat_src);
        e.client_port = client_key.sport;
        e.vip_port = client_key.dport;
        e.backend_port = f.nat_dport;
        e.snat_port = f.nat_sport;
        e.generation = f.generation;
        e.rule = NO_RULE;
        e.bytes_to_backend = atomic::load(&raw const f.bytes);
        e.bytes_to_client = atomic::load(&raw const r.bytes);
        e.packets_to_backend = atomic::load(&raw const f.packets);
        e.packets_to_client = atomic::load(&raw const r.packets);
    }
    entry.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
