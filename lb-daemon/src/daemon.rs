//! The daemon's life: install the data plane, turn kernel records into audit records, sweep
//! idle and closed flows, and on shutdown account for every flow still open.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, anyhow};
use lb_common::{ConnEvent, Flow, FlowKey, close_reason, event_kind, flow_state, open_reason};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

use crate::{
    audit::{AuditWriter, CloseReason, ConnClose, ConnOpen, DaemonStart, DaemonStop, Event, Proto},
    balancer::{self, PlacedService},
    config::Settings,
    dataplane::{self, Dataplane, socket_addr},
    neighbors,
};

/// How often flows are swept and backends' neighbour entries refreshed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
const NEIGHBOR_REFRESH: Duration = Duration::from_secs(30);

/// Runs the daemon until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut audit = AuditWriter::open(&settings.audit_dir)
        .with_context(|| format!("--audit-dir {}: cannot open the audit log", settings.audit_dir.display()))?;
    let services = balancer::place(&settings, lb_common::MAGLEV_TABLE_SIZE)?;
    let names = dataplane::service_names(&services);

    let mut dp = Dataplane::load()?;
    dp.configure(settings.snat_ports, flow_id_base())?;
    dp.install(&services)?;
    let backend_ips = backend_ips(&services);
    refresh_neighbors(backend_ips.clone()).await;
    for iface in &settings.ifaces {
        dp.attach(iface)?;
    }
    let ring = dp.take_events()?;
    // SAFETY: the ring buffer owns its fd, which stays open as long as the AsyncFd owns it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("watching the ring buffer: {e}"))?;

    let config = serde_json::to_string(&settings)?;
    audit.append(
        SystemTime::now(),
        Event::DaemonStart(DaemonStart { version: env!("CARGO_PKG_VERSION").to_string(), config }),
    )?;
    audit.sync()?;
    info!(ifaces = ?settings.ifaces, services = services.len(), "ready");

    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut neigh = tokio::time::interval(NEIGHBOR_REFRESH);
    neigh.tick().await; // the first tick is immediate; neighbours were just primed
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), &mut audit, &names)?;
                guard.clear_ready();
                audit.sync()?;
            }
            _ = sweep.tick() => {
                sweep_flows(&mut dp, &mut audit, &names, &settings)?;
                audit.sync()?;
            }
            _ = neigh.tick() => refresh_neighbors(backend_ips.clone()).await,
            () = &mut shutdown => break,
        }
    }

    info!("stopping");
    dp.detach_all()?;
    // Records the program pushed before it was detached come first.
    drain(ring.get_mut(), &mut audit, &names)?;
    let now = SystemTime::now();
    let now_boot = boottime_ns();
    let mut closed = 0;
    for (key, flow) in dp.flows()? {
        if flow.state & flow_state::CLOSED == 0 {
            let ev = close_record(&key, &flow, close_reason::SHUTDOWN, now_boot);
            if let Some(event) = conn_event(&ev, &names) {
                audit.append(now, event)?;
                closed += 1;
            }
        }
        dp.remove_flow(&key, &flow)?;
    }
    audit.append(now, Event::DaemonStop(DaemonStop { reason: "signal".to_string() }))?;
    audit.sync()?;
    info!(closed_at_shutdown = closed, "stopped");
    Ok(())
}

/// A flow-id base that differs across restarts: seconds since the epoch in the high bits.
fn flow_id_base() -> u64 {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    secs << 24
}

fn backend_ips(services: &[PlacedService]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = services.iter().flat_map(|s| s.backends.iter().map(|b| b.addr.ip())).collect();
    ips.sort();
    ips.dedup();
    ips
}

async fn refresh_neighbors(ips: Vec<IpAddr>) {
    let wanted = ips.len();
    match tokio::task::spawn_blocking(move || neighbors::prime(&ips, Duration::from_secs(1))).await {
        Ok(Ok(answered)) if answered.len() < wanted => {
            warn!(answered = answered.len(), wanted, "some backends did not answer ICMP echo; new flows to them may be dropped until their address resolves")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot send ICMP echo to backends"),
        Err(e) => warn!(error = %e, "neighbour refresh task failed"),
    }
}

/// Moves every pending kernel record into the audit log.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    audit: &mut AuditWriter,
    names: &HashMap<u32, String>,
) -> anyhow::Result<()> {
    let clock = Clock::now();
    while let Some(item) = ring.next() {
        let Some(ev) = dataplane::decode_event(&item) else {
            warn!(len = item.len(), "ignoring a ring-buffer record of unexpected size");
            continue;
        };
        if let Some(event) = conn_event(&ev, names) {
            audit.append(clock.to_system(ev.ts_ns), event)?;
        }
    }
    Ok(())
}

/// Closes idle flows and forgets closed ones once their linger time is over.
fn sweep_flows(
    dp: &mut Dataplane,
    audit: &mut AuditWriter,
    names: &HashMap<u32, String>,
    settings: &Settings,
) -> anyhow::Result<()> {
    let clock = Clock::now();
    let idle = settings.tcp_idle_timeout.as_nanos() as u64;
    let linger = settings.closed_linger.as_nanos() as u64;
    for (key, flow) in dp.flows()? {
        let quiet = clock.boot_ns.saturating_sub(flow.last_seen_ns);
        if flow.state & flow_state::CLOSED != 0 {
            if quiet > linger {
                dp.remove_flow(&key, &flow)?;
            }
        } else if quiet > idle {
            let ev = close_record(&key, &flow, close_reason::IDLE_TIMEOUT, clock.boot_ns);
            if let Some(event) = conn_event(&ev, names) {
                audit.append(clock.to_system(ev.ts_ns), event)?;
            }
            dp.remove_flow(&key, &flow)?;
        }
    }
    Ok(())
}

/// A close record built in user space, shaped like the kernel's.
fn close_record(key: &FlowKey, f: &Flow, reason: u8, now_boot: u64) -> ConnEvent {
    ConnEvent {
        kind: event_kind::CONN_CLOSE,
        proto: key.proto,
        af: key.af,
        reason,
        service_id: f.service_id,
        flow_id: f.flow_id,
        ts_ns: now_boot,
        opened_ns: f.opened_ns,
        client: key.src,
        vip: key.dst,
        backend: f.backend,
        snat: f.snat,
        client_port: key.sport,
        vip_port: key.dport,
        backend_port: f.backend_port,
        snat_port: f.snat_port,
        generation: f.generation,
        _pad: 0,
        bytes_to_backend: f.bytes_to_backend,
        bytes_to_client: f.bytes_to_client,
        packets_to_backend: f.packets_to_backend,
        packets_to_client: f.packets_to_client,
    }
}

/// The audit event for a kernel connection record; `None` for a record it cannot name.
pub fn conn_event(ev: &ConnEvent, names: &HashMap<u32, String>) -> Option<Event> {
    let proto = match ev.proto {
        lb_common::PROTO_TCP => Proto::Tcp,
        lb_common::PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let service = names.get(&ev.service_id).cloned().unwrap_or_else(|| format!("#{}", ev.service_id));
    let client = socket_addr(ev.client, ev.af, ev.client_port);
    let vip = socket_addr(ev.vip, ev.af, ev.vip_port);
    let backend = socket_addr(ev.backend, ev.af, ev.backend_port);
    match ev.kind {
        event_kind::CONN_OPEN => Some(Event::ConnOpen(ConnOpen {
            flow_id: ev.flow_id,
            proto,
            client,
            vip,
            service,
            backend,
            snat: socket_addr(ev.snat, ev.af, ev.snat_port),
            reason: match ev.reason {
                open_reason::MAGLEV => "maglev",
                _ => "conntrack",
            }
            .to_string(),
            generation: ev.generation,
        })),
        event_kind::CONN_CLOSE => Some(Event::ConnClose(ConnClose {
            flow_id: ev.flow_id,
            proto,
            client,
            vip,
            service,
            backend,
            duration_ns: ev.ts_ns.saturating_sub(ev.opened_ns),
            bytes_to_backend: ev.bytes_to_backend,
            bytes_to_client: ev.bytes_to_client,
            packets_to_backend: ev.packets_to_backend,
            packets_to_client: ev.packets_to_client,
            close_reason: match ev.reason {
                close_reason::FIN => CloseReason::Fin,
                close_reason::RST => CloseReason::Rst,
                close_reason::IDLE_TIMEOUT => CloseReason::IdleTimeout,
                close_reason::EVICTED => CloseReason::Evicted,
                _ => CloseReason::Shutdown,
            },
        })),
        _ => None,
    }
}

/// Converts kernel timestamps (CLOCK_BOOTTIME, which keeps counting across suspend) to UTC:
/// both clocks are read together, and an event's time is "now" minus how long ago it happened.
struct Clock {
    real: SystemTime,
    boot_ns: u64,
}

impl Clock {
    fn now() -> Self {
        Self { real: SystemTime::now(), boot_ns: boottime_ns() }
    }

    fn to_system(&self, event_boot_ns: u64) -> SystemTime {
        let ago = Duration::from_nanos(self.boot_ns.saturating_sub(event_boot_ns));
        self.real.checked_sub(ago).unwrap_or(self.real)
    }
}

/// CLOCK_BOOTTIME in nanoseconds, the clock of `bpf_ktime_get_boot_ns`.
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every supported kernel.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
