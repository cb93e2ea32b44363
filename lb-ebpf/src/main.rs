//! The XDP data plane: full-NAT TCP load balancing with connection tracking and one audit
//! record per connection opening and closing, pushed through a ring buffer.
//!
//! Per packet, in order:
//! 1. parse Ethernet / IPv4 / TCP; anything else goes to the host stack untouched;
//! 2. a packet whose 5-tuple is in `REVERSE` is a backend's reply: reverse-NAT it to the client;
//! 3. a packet to a service (`SERVICES`) follows its `CONNTRACK` entry, or opens one on a SYN
//!    (Maglev slot → backend, next hop from the FIB, SNAT port reserved in `REVERSE`);
//! 4. addresses, ports and checksums are rewritten and the frame is redirected.
//!
//! A flow closes when both sides have sent FIN, or on RST; the entry then lingers (marked
//! `CLOSED`) so trailing ACKs still pass, until the daemon sweeps it.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod atomic;
mod csum;
mod headers;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, bpf_fib_lookup, xdp_action},
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_get_smp_processor_id,
        bpf_ktime_get_boot_ns, bpf_redirect,
    },
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    AF_INET, Backend, Config, ConnEvent, CONNTRACK_MAX, EVENTS_RING_BYTES, Flow, FlowKey,
    MAGLEV_TABLE_SIZE, MAX_BACKENDS, MAX_SERVICES, NextHop, PROTO_TCP, ServiceInfo, ServiceKey,
    close_reason, event_kind, flow_state, open_reason, stat,
};

use headers::{ETH_HLEN, ETH_P_IP, EthHdr, Ipv4Hdr, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, TcpHdr};

#[map]
static SERVICES: HashMap<ServiceKey, ServiceInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(MAX_SERVICES * MAGLEV_TABLE_SIZE, 0);
#[map]
static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(CONNTRACK_MAX, 0);
#[map]
static REVERSE: LruHashMap<FlowKey, FlowKey> = LruHashMap::with_max_entries(CONNTRACK_MAX, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static FLOW_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// SNAT ports tried per new flow before it is refused.
const SNAT_PORT_TRIES: u32 = 8;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match try_lb(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
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

/// Pointer to a `T` at `offset` in the packet, if the whole `T` is inside it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

fn try_lb(ctx: &XdpContext) -> Result<u32, ()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `eth` is bounds-checked by `ptr_at`.
    if unsafe { (*eth).ether_type } != ETH_P_IP.to_be() {
        return pass();
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: `ip` is bounds-checked by `ptr_at`; fields are read unaligned.
    let (vhl, frag, proto, tot_len) = unsafe {
        (
            (*ip).vhl,
            u16::from_be(core::ptr::read_unaligned(&raw const (*ip).frag_off)),
            (*ip).protocol,
            u16::from_be(core::ptr::read_unaligned(&raw const (*ip).tot_len)) as usize,
        )
    };
    let ihl = ((vhl & 0x0f) as usize) * 4;
    // Malformed headers and fragments are the host stack's business, not ours.
    if vhl >> 4 != 4 || ihl < 20 || frag & 0x3fff != 0 || proto != PROTO_TCP {
        return pass();
    }
    let l4 = ETH_HLEN + ihl;
    let tcp: *mut TcpHdr = ptr_at(ctx, l4)?;
    // SAFETY: `ip` and `tcp` are bounds-checked.
    let (src, dst, sport, dport, doff, flags) = unsafe {
        (
            core::ptr::read_unaligned(&raw const (*ip).saddr),
            core::ptr::read_unaligned(&raw const (*ip).daddr),
            core::ptr::read_unaligned(&raw const (*tcp).source),
            core::ptr::read_unaligned(&raw const (*tcp).dest),
            (((*tcp).doff_res >> 4) as usize) * 4,
            (*tcp).flags,
        )
    };
    if doff < 20 || tot_len < ihl + doff {
        return pass();
    }
    let payload = (tot_len - ihl - doff) as u64;
    let key = FlowKey {
        src: [src, 0, 0, 0],
        dst: [dst, 0, 0, 0],
        sport,
        dport,
        proto,
        af: AF_INET,
        _pad: [0; 2],
    };
    let pkt = Packet { ctx, eth, ip, tcp, payload, flags };

    if let Some(client_key) = REVERSE.get_ptr(&key) {
        // SAFETY: map value pointer, valid for the duration of this program run.
        let client_key = unsafe { *client_key };
        return reply(&pkt, &key, &client_key);
    }
    let svc_key = ServiceKey { addr: key.dst, port: dport, proto, af: AF_INET };
    // SAFETY: map value pointer, copied at once.
    let Some(svc) = (unsafe { SERVICES.get(&svc_key) }).copied() else {
        return pass();
    };
    forward(&pkt, &key, &svc)
}

/// The parsed packet being handled.
struct Packet<'a> {
    ctx: &'a XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    tcp: *mut TcpHdr,
    payload: u64,
    flags: u8,
}

fn forward(pkt: &Packet, key: &FlowKey, svc: &ServiceInfo) -> Result<u32, ()> {
    let syn = pkt.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let flow = match CONNTRACK.get_ptr_mut(key) {
        // SAFETY: map value pointer, valid for the duration of this program run.
        Some(f) if !(syn && unsafe { (*f).state } & flow_state::CLOSED != 0) => f,
        existing => {
            if !syn {
                return drop_with(stat::DROP_NO_FLOW);
            }
            if let Some(old) = existing {
                // A closed flow's 5-tuple is being reused: release its SNAT port first.
                // SAFETY: map value pointer.
                let old = unsafe { *old };
                let _ = REVERSE.remove(&reverse_key(key, &old));
            }
            match open_flow(pkt, key, svc, now) {
                Ok(f) => f,
                Err(stat_index) => return drop_with(stat_index),
            }
        }
    };
    // SAFETY: `flow` points into the conntrack map for the duration of this run; fields that
    // other CPUs update are only touched through `atomic`.
    let (snat, backend, snat_port, backend_port, hop) = unsafe {
        ((*flow).snat[0], (*flow).backend[0], (*flow).snat_port, (*flow).backend_port, (*flow).to_backend)
    };
    rewrite(pkt, snat, backend, snat_port, backend_port, &hop);
    // SAFETY: as above.
    unsafe {
        atomic::add(&raw mut (*flow).bytes_to_backend, pkt.payload);
        atomic::add(&raw mut (*flow).packets_to_backend, 1);
        (*flow).last_seen_ns = now;
    }
    track_close(pkt.flags, key, flow, flow_state::FIN_FROM_CLIENT, flow_state::FIN_FROM_BACKEND, now);
    count(stat::FORWARDED);
    Ok(transmit(pkt.ctx, hop.ifindex))
}

fn reply(pkt: &Packet, key: &FlowKey, client_key: &FlowKey) -> Result<u32, ()> {
    let Some(flow) = CONNTRACK.get_ptr_mut(client_key) else {
        return drop_with(stat::DROP_NO_FLOW);
    };
    // SAFETY: `flow` points into the conntrack map for the duration of this run.
    let (snat_port, backend, hop) = unsafe { ((*flow).snat_port, (*flow).backend[0], (*flow).to_client) };
    // The reverse entry may outlive a reused forward entry; only the current pairing counts.
    if snat_port != key.dport || backend != key.src[0] {
        return drop_with(stat::DROP_NO_FLOW);
    }
    let now = unsafe { bpf_ktime_get_boot_ns() };
    rewrite(
        pkt,
        client_key.dst[0],
        client_key.src[0],
        client_key.dport,
        client_key.sport,
        &hop,
    );
    // SAFETY: as above; shared counters only through `atomic`.
    unsafe {
        atomic::add(&raw mut (*flow).bytes_to_client, pkt.payload);
        atomic::add(&raw mut (*flow).packets_to_client, 1);
        (*flow).last_seen_ns = now;
    }
    track_close(pkt.flags, client_key, flow, flow_state::FIN_FROM_BACKEND, flow_state::FIN_FROM_CLIENT, now);
    count(stat::REPLIED);
    Ok(transmit(pkt.ctx, hop.ifindex))
}

#[inline(always)]
fn transmit(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex as usize == ctx.ingress_ifindex() {
        xdp_action::XDP_TX
    } else {
        // SAFETY: plain helper call; the action it returns is XDP_REDIRECT or XDP_ABORTED.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }
}

/// Follows FIN and RST: the flow closes on RST, or on the FIN that completes both sides'.
/// `mine` is this packet's side, `other` the opposite side's FIN bit.
#[inline(always)]
fn track_close(flags: u8, client_key: &FlowKey, flow: *mut Flow, mine: u64, other: u64, now: u64) {
    let reason = if flags & TCP_RST != 0 {
        close_reason::RST
    } else if flags & TCP_FIN != 0 {
        // SAFETY: aligned field of a live map value.
        let prev = unsafe { atomic::fetch_or(&raw mut (*flow).state, mine) };
        if prev & other == 0 {
            return;
        }
        close_reason::FIN
    } else {
        return;
    };
    // Exactly one CPU wins the CLOSED bit and emits the record.
    // SAFETY: aligned field of a live map value.
    let prev = unsafe { atomic::fetch_or(&raw mut (*flow).state, flow_state::CLOSED) };
    if prev & flow_state::CLOSED == 0 {
        // SAFETY: live map value.
        emit(event_kind::CONN_CLOSE, reason, client_key, unsafe { &*flow }, now);
    }
}

fn open_flow(pkt: &Packet, key: &FlowKey, svc: &ServiceInfo, now: u64) -> Result<*mut Flow, u32> {
    if svc.backend_count == 0 {
        return Err(stat::DROP_NO_BACKEND);
    }
    let slot = svc.id * MAGLEV_TABLE_SIZE + flow_hash(key) % MAGLEV_TABLE_SIZE;
    let backend_idx = *MAGLEV.get(slot).ok_or(stat::DROP_NO_BACKEND)?;
    let be = *BACKENDS.get(backend_idx).ok_or(stat::DROP_NO_BACKEND)?;
    let to_backend = next_hop(pkt.ctx, &be).ok_or(stat::DROP_NO_ROUTE)?;
    let snat_port = reserve_snat_port(key, &be)?;

    // SAFETY: `eth` is bounds-checked; replies go back the way the client's packet came.
    let to_client = unsafe {
        NextHop {
            ifindex: pkt.ctx.ingress_ifindex() as u32,
            dst_mac: (*pkt.eth).src,
            src_mac: (*pkt.eth).dst,
        }
    };
    let flow = Flow {
        flow_id: next_flow_id(),
        opened_ns: now,
        last_seen_ns: now,
        backend: be.addr,
        snat: be.snat_addr,
        backend_port: be.port,
        snat_port,
        service_id: svc.id,
        backend_idx,
        generation: svc.generation,
        to_backend,
        to_client,
        ..Flow::default()
    };
    if CONNTRACK.insert(key, &flow, BPF_ANY as u64).is_err() {
        let _ = REVERSE.remove(&reverse_key(key, &flow));
        return Err(stat::DROP_CONNTRACK_FULL);
    }
    emit(event_kind::CONN_OPEN, open_reason::MAGLEV, key, &flow, now);
    CONNTRACK.get_ptr_mut(key).ok_or(stat::DROP_CONNTRACK_FULL)
}

/// The key under which a backend's replies to this flow are found.
#[inline(always)]
fn reverse_key(key: &FlowKey, f: &Flow) -> FlowKey {
    FlowKey {
        src: f.backend,
        dst: f.snat,
        sport: f.backend_port,
        dport: f.snat_port,
        proto: key.proto,
        af: key.af,
        _pad: [0; 2],
    }
}

/// Picks a free SNAT port towards `be` and reserves it by inserting the reverse entry.
/// `BPF_NOEXIST` makes the insert the collision check, so two live flows never share a port.
fn reserve_snat_port(key: &FlowKey, be: &Backend) -> Result<u16, u32> {
    let cfg = CONFIG.get(0).ok_or(stat::DROP_SNAT_EXHAUSTED)?;
    let (min, max) = (cfg.snat_port_min as u32, cfg.snat_port_max as u32);
    let range = max.wrapping_sub(min).wrapping_add(1);
    if min == 0 || max < min || range == 0 {
        return Err(stat::DROP_SNAT_EXHAUSTED);
    }
    let mut rkey = FlowKey {
        src: be.addr,
        dst: be.snat_addr,
        sport: be.port,
        dport: 0,
        proto: key.proto,
        af: key.af,
        _pad: [0; 2],
    };
    for _ in 0..SNAT_PORT_TRIES {
        // SAFETY: plain helper call.
        let port = (min + unsafe { bpf_get_prandom_u32() } % range) as u16;
        rkey.dport = port.to_be();
        if REVERSE.insert(&rkey, key, BPF_NOEXIST as u64).is_ok() {
            return Ok(rkey.dport);
        }
    }
    Err(stat::DROP_SNAT_EXHAUSTED)
}

/// Resolves the next hop towards a backend with the kernel's FIB.
fn next_hop(ctx: &XdpContext, be: &Backend) -> Option<NextHop> {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = 2; // AF_INET
    p.l4_protocol = PROTO_TCP;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = be.snat_addr[0];
    p.__bindgen_anon_4.ipv4_dst = be.addr[0];
    // SAFETY: `p` is a valid request of the size passed.
    let rc = unsafe {
        fib_lookup(ctx.as_ptr(), &mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    Some(NextHop { ifindex: p.ifindex, dst_mac: p.dmac, src_mac: p.smac })
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
    for w in [key.src[0], key.src[1], key.src[2], key.src[3], key.dst[0], key.dst[1], key.dst[2], key.dst[3]] {
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

/// Rewrites source and destination address and port, fixes both checksums, sets the MACs.
#[inline(always)]
fn rewrite(pkt: &Packet, saddr: u32, daddr: u32, sport: u16, dport: u16, hop: &NextHop) {
    // SAFETY: every pointer was bounds-checked when the packet was parsed.
    unsafe {
        let ip = pkt.ip;
        let tcp = pkt.tcp;
        let old_saddr = core::ptr::read_unaligned(&raw const (*ip).saddr);
        let old_daddr = core::ptr::read_unaligned(&raw const (*ip).daddr);
        let old_sport = core::ptr::read_unaligned(&raw const (*tcp).source);
        let old_dport = core::ptr::read_unaligned(&raw const (*tcp).dest);

        let mut ipc = core::ptr::read_unaligned(&raw const (*ip).check);
        ipc = csum::replace4(ipc, old_saddr, saddr);
        ipc = csum::replace4(ipc, old_daddr, daddr);
        core::ptr::write_unaligned(&raw mut (*ip).check, ipc);
        core::ptr::write_unaligned(&raw mut (*ip).saddr, saddr);
        core::ptr::write_unaligned(&raw mut (*ip).daddr, daddr);

        // The TCP checksum covers the pseudo-header's addresses and the ports.
        let mut tc = core::ptr::read_unaligned(&raw const (*tcp).check);
        tc = csum::replace4(tc, old_saddr, saddr);
        tc = csum::replace4(tc, old_daddr, daddr);
        tc = csum::replace2(tc, old_sport, sport);
        tc = csum::replace2(tc, old_dport, dport);
        core::ptr::write_unaligned(&raw mut (*tcp).check, tc);
        core::ptr::write_unaligned(&raw mut (*tcp).source, sport);
        core::ptr::write_unaligned(&raw mut (*tcp).dest, dport);

        (*pkt.eth).dst = hop.dst_mac;
        (*pkt.eth).src = hop.src_mac;
    }
}

/// Pushes a connection record; a failed reservation is counted, never silent.
fn emit(kind: u8, reason: u8, client_key: &FlowKey, f: &Flow, now: u64) {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count(stat::RINGBUF_LOSS);
        return;
    };
    // SAFETY: fields of a live value; other CPUs may be adding to the counters.
    let (btb, btc, ptb, ptc) = unsafe {
        (
            atomic::load(&raw const f.bytes_to_backend),
            atomic::load(&raw const f.bytes_to_client),
            atomic::load(&raw const f.packets_to_backend),
            atomic::load(&raw const f.packets_to_client),
        )
    };
    entry.write(ConnEvent {
        kind,
        proto: client_key.proto,
        af: client_key.af,
        reason,
        service_id: f.service_id,
        flow_id: f.flow_id,
        ts_ns: now,
        opened_ns: f.opened_ns,
        client: client_key.src,
        vip: client_key.dst,
        backend: f.backend,
        snat: f.snat,
        client_port: client_key.sport,
        vip_port: client_key.dport,
        backend_port: f.backend_port,
        snat_port: f.snat_port,
        generation: f.generation,
        _pad: 0,
        bytes_to_backend: btb,
        bytes_to_client: btc,
        packets_to_backend: ptb,
        packets_to_client: ptc,
    });
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
