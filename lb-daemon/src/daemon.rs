//! The daemon's life: install the data plane, turn kernel records into audit records, sweep
//! idle and closed flows, and on shutdown account for every flow still open.

use std::{
    collections::HashMap,
    future::Future,
    net::IpAddr,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, anyhow};
use lb_common::{ConnEvent, close_reason, deny_reason, event_kind, flow_state, open_reason};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::{info, warn};

use crate::{
    audit::{
        self, BackendDrained, CloseReason, ConnClose, ConnDeny, ConnOpen, DaemonStart, DaemonStop,
        DenyReason, Event, HealthChange, Loss, Proto, SealKey,
    },
    balancer::{self, PlacedService},
    config::{OnStop, Settings},
    control,
    dataplane::{self, Dataplane, FlowPair, socket_addr},
    export, health,
    journal::Journal,
    metrics, neighbors, notify,
    requests::{self, ControlState, Health, Names, Plane},
};

/// How often flows are swept and backends' neighbour entries refreshed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
const NEIGHBOR_REFRESH: Duration = Duration::from_secs(30);

/// Runs the daemon until `shutdown` completes.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    for iface in &settings.ifaces {
        if !std::path::Path::new("/sys/class/net").join(iface).exists() {
            anyhow::bail!("--iface {iface}: no such network interface");
        }
    }
    let seal_key = match &settings.audit.seal_key {
        Some(path) => Some(SealKey::from_file(path).context("--audit-seal-key")?),
        None => None,
    };
    let opts = audit::Options {
        fsync: settings.audit.fsync,
        segment_bytes: settings.audit.segment_mib << 20,
        segment_age: settings.audit.segment_age,
        retain_age: settings.audit.retain_age,
        retain_bytes: settings.audit.retain_mib.map(|m| m << 20),
        checkpoint_records: settings.audit.checkpoint_records,
        checkpoint_interval: settings.audit.checkpoint_interval,
        seal_key,
        commit_window: settings.audit.commit_window,
    };
    let mut audit = Journal::open(
        settings.audit_dir.clone(),
        opts,
        settings.audit.on_failure,
        settings.alerts.clone(),
    )
    .with_context(|| {
        format!(
            "--audit-dir {}: cannot open the audit log",
            settings.audit_dir.display()
        )
    })?;
    let mut dp = Dataplane::load_pinned(
        settings.maglev_table_size,
        settings.conntrack_size,
        &settings.bpf_dir,
        settings.reset_state,
    )?;
    // Ids the flows of a previous daemon carry keep their meaning.
    let layout = dp.previous_layout()?;
    let mut services = balancer::place_after(&settings, &layout)?;
    let mut names = Names::new(&services);
    check_forwarding(&services)?;

    dp.configure(
        settings.snat_ports,
        settings.maglev_table_size,
        flow_id_base(),
    )?;
    dp.install(&services)?;
    refresh_neighbors(backend_ips(&services)).await;
    for iface in &settings.ifaces {
        dp.attach(iface)?;
    }
    for iface in dp.detach_others(&settings.ifaces)? {
        info!(iface = %iface, "detached from an interface no longer given with --iface");
    }
    // Attaching a native XDP program may reset the device; readiness means traffic can flow.
    wait_for_carrier(&settings.ifaces, Duration::from_secs(3)).await;
    let ring = dp.take_events()?;
    let backlog = dataplane::RingBacklog::new(std::os::fd::AsFd::as_fd(&ring))?;
    // SAFETY: the ring buffer owns its fd, which stays open as long as the AsyncFd owns it.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow!("watching the ring buffer: {e}"))?;

    let config = serde_json::to_string(&settings)?;
    audit.record(
        SystemTime::now(),
        Event::DaemonStart(DaemonStart {
            version: env!("CARGO_PKG_VERSION").to_string(),
            config,
        }),
    );
    audit.sync();
    audit.apply(&mut dp)?;
    if dp.adopted() {
        info!(
            flows = layout.flows,
            bpf_dir = %settings.bpf_dir.display(),
            "adopted the running data plane and its flows"
        );
    }

    // Health checks: one task per checked backend, results come back on one channel.
    let (health_tx, mut health_rx) = tokio::sync::mpsc::channel::<health::Probe>(1024);
    let mut health = Health::new(health_tx);
    for s in &services {
        for b in &s.backends {
            health.start(s, b.addr);
        }
    }

    let (calls_tx, mut calls_rx) = tokio::sync::mpsc::channel::<control::Call>(64);
    control::serve(&settings.control_socket, settings.roles.clone(), calls_tx)?;
    let export_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let exporters: Vec<_> = settings
        .export
        .iter()
        .map(|t| export::spawn(settings.audit_dir.clone(), t.clone(), export_stop.clone()))
        .collect();
    let (scrape_tx, mut scrape_rx) =
        tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<String>>(8);
    if let Some(addr) = settings.metrics_addr {
        metrics::serve(addr, scrape_tx).await?;
    } else {
        drop(scrape_tx);
    }
    let mut control_state = ControlState {
        generation: 1,
        drained_reported: Vec::new(),
        started: SystemTime::now(),
    };
    info!(ifaces = ?settings.ifaces, services = services.len(), "ready");
    notify::notify(&format!(
        "READY=1\nSTATUS=forwarding {} service(s) on {}",
        services.len(),
        settings.ifaces.join(", ")
    ));

    // Losses a previous daemon recorded are not recorded again; those since (while no daemon
    // ran, or after it was killed) are.
    let mut loss_seen = KernelLoss {
        count: dp.ringbuf_loss_recorded()?,
        since: SystemTime::now(),
    };
    let mut blocks = crate::blocks::Blocks::default();
    let mut closed_here = ClosedHere::default();
    let mut denials_seen = SuppressedDenials::default();
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut neigh = tokio::time::interval(NEIGHBOR_REFRESH);
    neigh.tick().await; // the first tick is immediate; neighbours were just primed
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            // Group commit (--audit-commit-window): the first record of a window wakes the
            // daemon, which then leaves the ring buffer alone (the kernel does not wake a
            // consumer that has not caught up) until the window ends; then everything queued is
            // drained, written and made durable together. Without a window, at once.
            guard = ring.readable_mut(), if audit.commit_due().is_none() => {
                let mut guard = guard?;
                if !audit.start_commit_window() {
                    drain(guard.get_inner_mut(), &mut audit, &names, &mut closed_here);
                    audit.sync();
                }
                guard.clear_ready();
                audit.apply(&mut dp)?;
            }
            () = commit_at(audit.commit_due()) => {
                drain(ring.get_mut(), &mut audit, &names, &mut closed_here);
                audit.commit();
                audit.apply(&mut dp)?;
                if let Some(length) = settings.alerts.block {
                    blocks.add(audit.take_blocks(), length, &mut services, &mut names, &mut dp)?;
                }
            }
            _ = sweep.tick() => {
                audit.retry();
                sweep_flows(&mut dp, &mut audit, &names, &settings, &mut closed_here)?;
                denials_seen.sweep(&mut dp, &mut audit, &names, &services)?;
                report_drained(&mut dp, &services, &mut audit, &mut control_state)?;
                record_kernel_loss(&mut dp, &mut audit, &mut loss_seen)?;
                blocks.expire(&mut services, &mut dp)?;
                audit.sync();
                audit.apply(&mut dp)?;
            }
            _ = neigh.tick() => refresh_neighbors(backend_ips(&services)).await,
            Some(reply) = scrape_rx.recv() => {
                let _ = reply.send(scrape(&mut dp, &services, &health.state, &names, &audit, &backlog)?);
            }
            Some(call) = calls_rx.recv() => {
                let mut plane = Plane {
                    services: &mut services,
                    names: &mut names,
                    health: &mut health,
                    dp: &mut dp,
                    audit: &mut audit,
                    settings: &settings,
                    state: &mut control_state,
                };
                let response = requests::handle(&call, &mut plane)?;
                let _ = call.reply.send(response);
                audit.apply(&mut dp)?;
            }
            Some(probe) = health_rx.recv() => {
                health_result(&probe, &mut services, &mut health.state, &mut dp, &mut audit, settings.maglev_table_size)?;
                audit.sync();
                audit.apply(&mut dp)?;
            }
            () = &mut shutdown => break,
        }
    }

    info!("stopping");
    let reason = match settings.on_stop {
        OnStop::Keep => {
            // The program keeps forwarding on the pinned maps; the next daemon adopts the
            // flows and writes their records, from the ring buffer's unread ones on.
            notify::notify("STOPPING=1\nSTATUS=leaving the data plane running");
            drain(ring.get_mut(), &mut audit, &names, &mut closed_here);
            record_unrecorded_denials(&mut dp, &mut audit, &names, &services, Duration::ZERO)?;
            record_kernel_loss(&mut dp, &mut audit, &mut loss_seen)?;
            let open = dp
                .flows()?
                .iter()
                .filter(|p| p.fwd.state & flow_state::CLOSED == 0)
                .count();
            info!(
                open_flows = open,
                "data plane left running for the next daemon"
            );
            format!("signal; data plane kept running with {open} open flows")
        }
        OnStop::Detach => {
            notify::notify("STOPPING=1\nSTATUS=writing the records of open flows");
            dp.detach_all()?;
            // Records the program pushed before it was detached come first.
            drain(ring.get_mut(), &mut audit, &names, &mut closed_here);
            record_unrecorded_denials(&mut dp, &mut audit, &names, &services, Duration::ZERO)?;
            let clock = Clock::now();
            let mut closed = 0;
            for pair in dp.flows()? {
                if pair.fwd.state & flow_state::CLOSED == 0 {
                    record_close(&mut audit, &names, &pair, close_reason::SHUTDOWN, &clock);
                    closed += 1;
                }
                dp.remove_flow(&pair)?;
            }
            record_kernel_loss(&mut dp, &mut audit, &mut loss_seen)?;
            dp.unpin_all()?;
            info!(closed_at_shutdown = closed, "data plane detached");
            "signal".to_string()
        }
    };
    // The alerts of the records drained last, and everything durable, before the stop.
    audit.commit();
    audit.record(SystemTime::now(), Event::DaemonStop(DaemonStop { reason }));
    audit.close()?;
    // The exporters send what is in the log, then stop.
    export_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for e in exporters {
        let _ = e.join();
    }
    info!("stopped");
    Ok(())
}

/// The kernel's FIB lookup from XDP answers "forwarding disabled" unless the host forwards;
/// refuse to start rather than drop every new flow.
fn check_forwarding(services: &[PlacedService]) -> anyhow::Result<()> {
    for v6 in [false, true] {
        if services.iter().any(|s| s.spec.vip.is_ipv6() == v6) {
            check_forwarding_for(v6)?;
        }
    }
    Ok(())
}

/// Whether the host forwards IPv4 (or IPv6) packets.
pub(crate) fn check_forwarding_for(v6: bool) -> anyhow::Result<()> {
    let key = if v6 {
        "net/ipv6/conf/all/forwarding"
    } else {
        "net/ipv4/ip_forward"
    };
    let on = std::fs::read_to_string(format!("/proc/sys/{key}"))
        .map(|v| v.trim() == "1")
        .unwrap_or(false);
    if !on {
        let name = key.replace('/', ".");
        anyhow::bail!(
            "{name} is not 1: the XDP program's FIB lookups need forwarding enabled (sysctl -w {name}=1)"
        );
    }
    Ok(())
}

/// Renders the metrics from the run loop's state and the kernel's maps.
fn scrape(
    dp: &mut Dataplane,
    services: &[PlacedService],
    health: &HashMap<(u32, std::net::SocketAddr), health::State>,
    names: &Names,
    audit: &Journal,
    backlog: &dataplane::RingBacklog,
) -> anyhow::Result<String> {
    let svc_name = |id: u32| {
        names
            .services
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("#{id}"))
    };
    let active = dp
        .flows()?
        .into_iter()
        .filter(|p| p.fwd.state & flow_state::CLOSED == 0)
        .map(|p| {
            let be = socket_addr(p.fwd.nat_dst, p.key.af, p.fwd.nat_dport).to_string();
            let r = p.rev.unwrap_or_default();
            (
                svc_name(p.fwd.service_id),
                be,
                [p.fwd.bytes, r.bytes, p.fwd.packets, r.packets],
            )
        })
        .collect();
    let stats = dp.stats()?;
    let rule_count = services.iter().map(|s| s.rules.len()).sum::<usize>() as u32;
    let hits = dp.rule_hits(rule_count)?;
    let log_bytes = std::fs::read_dir(audit.dir())
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let snapshot = metrics::Snapshot {
        totals: &audit.totals,
        active,
        backends: services
            .iter()
            .flat_map(|s| {
                s.backends.iter().map(move |b| {
                    let up = health.get(&(s.id, b.addr)).is_none_or(|h| !h.down);
                    (s.spec.name.clone(), b.addr.to_string(), up, b.drained)
                })
            })
            .collect(),
        generations: services
            .iter()
            .map(|s| (s.spec.name.clone(), s.generation))
            .collect(),
        counters: lb_common::stat::NAMES.iter().copied().zip(stats).collect(),
        rules: services
            .iter()
            .flat_map(|s| {
                s.rules.iter().map(|r| {
                    (
                        format!("{} {}", s.spec.name, r.describe()),
                        hits.get(r.id as usize).copied().unwrap_or(0),
                    )
                })
            })
            .collect(),
        log_bytes,
        audit_failing: audit.failing(),
        ring_backlog: backlog.bytes(),
    };
    Ok(metrics::render(&snapshot))
}

/// Writes `backend_drained` for drained backends whose last flow has closed.
fn report_drained(
    dp: &mut Dataplane,
    services: &[PlacedService],
    audit: &mut Journal,
    state: &mut ControlState,
) -> anyhow::Result<()> {
    let pending: Vec<(u32, u32, std::net::SocketAddr, String)> = services
        .iter()
        .flat_map(|s| {
            s.backends
                .iter()
                .filter(|b| b.drained)
                .map(move |b| (s.id, b.index, b.addr, s.spec.name.clone()))
        })
        .filter(|(id, _, addr, _)| !state.drained_reported.contains(&(*id, *addr)))
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    let flows = dp.flows()?;
    for (id, index, addr, service) in pending {
        let open = flows.iter().any(|p| {
            p.fwd.service_id == id
                && p.fwd.backend_idx == index
                && p.fwd.state & flow_state::CLOSED == 0
        });
        if !open {
            audit.record(
                SystemTime::now(),
                Event::BackendDrained(BackendDrained {
                    service,
                    backend: addr,
                }),
            );
            state.drained_reported.push((id, addr));
        }
    }
    Ok(())
}

/// Counts a health probe; on a transition records it and gives the service a new Maglev table
/// of the backends that are up. Established flows to a backend that went down continue (they
/// end by FIN, RST or idle timeout); a service with no backend up refuses new flows
/// (`no_backend`).
fn health_result(
    probe: &health::Probe,
    services: &mut [PlacedService],
    state: &mut HashMap<(u32, std::net::SocketAddr), health::State>,
    dp: &mut Dataplane,
    audit: &mut Journal,
    table_size: u32,
) -> anyhow::Result<()> {
    let Some(svc) = services.iter_mut().find(|s| s.id == probe.service) else {
        return Ok(());
    };
    let Some(spec) = svc.spec.health.clone() else {
        return Ok(());
    };
    let Some(st) = state.get_mut(&(probe.service, probe.backend)) else {
        return Ok(());
    };
    let failures = st.failures + u32::from(probe.result.is_err());
    if !st.observe(&probe.result, &spec) {
        return Ok(());
    }
    let (from, to) = if st.down {
        ("up", "down")
    } else {
        ("down", "up")
    };
    let error = if st.down {
        st.last_error.as_deref()
    } else {
        None
    };
    warn!(service = %svc.spec.name, backend = %probe.backend, from, to, error, "backend health changed");
    if let Some(b) = svc.backends.iter_mut().find(|b| b.addr == probe.backend) {
        b.up = !st.down;
    }
    svc.rebuild(table_size);
    dp.update_service(svc)?;
    audit.record(
        SystemTime::now(),
        Event::HealthChange(HealthChange {
            service: svc.spec.name.clone(),
            backend: probe.backend,
            from: from.into(),
            to: to.into(),
            consecutive_failures: if st.down { failures } else { 0 },
            last_error: if st.down { st.last_error.clone() } else { None },
        }),
    );
    Ok(())
}

/// The kernel's count of ring-buffer records it could not reserve, as last recorded.
struct KernelLoss {
    count: u64,
    since: SystemTime,
}

/// Turns new kernel ring-buffer losses into a `loss` record, so the log states its own gaps.
fn record_kernel_loss(
    dp: &mut Dataplane,
    audit: &mut Journal,
    seen: &mut KernelLoss,
) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let count = dp.stat(lb_common::stat::RINGBUF_LOSS)?;
    if count > seen.count {
        let ns = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i64)
                .unwrap_or(0)
        };
        warn!(
            lost = count - seen.count,
            "the kernel could not queue audit records: ring buffer full"
        );
        audit.record(
            now,
            Event::Loss(Loss {
                source: "kernel_ringbuf".into(),
                count: count - seen.count,
                since_ns: ns(seen.since),
                until_ns: ns(now),
            }),
        );
        seen.count = count;
        dp.set_ringbuf_loss_recorded(count)?;
    }
    seen.since = now;
    Ok(())
}

/// Waits (bounded) until every interface reports carrier again.
async fn wait_for_carrier(ifaces: &[String], limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    for iface in ifaces {
        let path = format!("/sys/class/net/{iface}/carrier");
        while std::fs::read_to_string(&path)
            .map(|c| c.trim() != "1")
            .unwrap_or(false)
        {
            if tokio::time::Instant::now() >= deadline {
                warn!(iface = %iface, "no carrier after attaching the XDP program");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A flow-id base that differs across restarts: seconds since the epoch in the high bits.
fn flow_id_base() -> u64 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    secs << 24
}

fn backend_ips(services: &[PlacedService]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.addr.ip()))
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

/// Resolves a new backend's link-layer address in the background.
pub(crate) fn prime_neighbor(ip: IpAddr) {
    tokio::spawn(refresh_neighbors(vec![ip]));
}

async fn refresh_neighbors(ips: Vec<IpAddr>) {
    let wanted = ips.len();
    match tokio::task::spawn_blocking(move || neighbors::prime(&ips, Duration::from_secs(1))).await
    {
        Ok(Ok(answered)) if answered.len() < wanted => {
            warn!(
                answered = answered.len(),
                wanted,
                "some backends did not answer ICMP echo; new flows to them may be dropped until their address resolves"
            )
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, "cannot send ICMP echo to backends"),
        Err(e) => warn!(error = %e, "neighbour refresh task failed"),
    }
}

/// Waits until `due`, or forever when nothing waits to be made durable.
async fn commit_at(due: Option<std::time::Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Moves every pending kernel record into the audit log.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    audit: &mut Journal,
    names: &Names,
    closed_here: &mut ClosedHere,
) {
    let clock = Clock::now();
    while let Some(item) = ring.next() {
        let Some(ev) = dataplane::decode_event(&item) else {
            warn!(
                len = item.len(),
                "ignoring a ring-buffer record of unexpected size"
            );
            continue;
        };
        if ev.kind == event_kind::CONN_CLOSE && closed_here.take(ev.flow_id) {
            continue;
        }
        if let Some(event) = conn_event(&ev, names) {
            audit.record(clock.to_system(ev.ts_ns), event);
        }
    }
}

/// Closes idle flows, forgets closed ones once their linger time is over, and keeps the
/// conntrack table below its high-water mark by evicting the least recently active flows, so
/// the kernel never has to refuse a new flow for want of room.
fn sweep_flows(
    dp: &mut Dataplane,
    audit: &mut Journal,
    names: &Names,
    settings: &Settings,
    closed_here: &mut ClosedHere,
) -> anyhow::Result<()> {
    let clock = Clock::now();
    closed_here.expire(Instant::now());
    let linger = settings.closed_linger.as_nanos() as u64;
    // Only connections quiet for the shortest of these can be due.
    let due_after = settings
        .closed_linger
        .min(settings.udp_idle_timeout)
        .min(settings.tcp_idle_timeout)
        .as_nanos() as u64;
    let (quiet_flows, mut remaining) = dp.quiet_flows(clock.coarse_ns.saturating_sub(due_after))?;
    for pair in quiet_flows {
        let quiet = clock.coarse_ns.saturating_sub(pair.last_seen_ns());
        let idle = if pair.key.proto == lb_common::PROTO_UDP {
            settings.udp_idle_timeout
        } else {
            settings.tcp_idle_timeout
        };
        if pair.fwd.state & flow_state::CLOSED != 0 {
            if quiet > linger {
                dp.remove_flow(&pair)?;
                remaining -= 1;
            }
        } else if quiet > idle.as_nanos() as u64 {
            close_in_user_space(
                dp,
                audit,
                names,
                closed_here,
                &pair,
                close_reason::IDLE_TIMEOUT,
                &clock,
            )?;
            remaining -= 1;
        }
    }
    let size = settings.conntrack_size as usize;
    let (high, low) = (size * 95 / 100, size * 90 / 100);
    if remaining > high {
        let mut open: Vec<FlowPair> = dp
            .flows()?
            .into_iter()
            .filter(|p| p.fwd.state & flow_state::CLOSED == 0)
            .collect();
        open.sort_by_key(|p| p.last_seen_ns());
        let evict = (remaining - low).min(open.len());
        warn!(
            evict,
            table = size,
            "conntrack table above 95%: evicting the least recently active flows"
        );
        for pair in &open[..evict] {
            close_in_user_space(
                dp,
                audit,
                names,
                closed_here,
                pair,
                close_reason::EVICTED,
                &clock,
            )?;
        }
    }
    Ok(())
}

/// What the last read of `SOURCES` for suppressed refusals saw: the program's count of
/// suppressed refusals just before it, and whether it left some for a later sweep (their
/// source's last record too recent).
#[derive(Default)]
struct SuppressedDenials {
    counted: u64,
    left: bool,
}

impl SuppressedDenials {
    /// Whether `SOURCES` may hold refusals to record, the program's count being `counted` now:
    /// a map of thousands of quiet sources is not read every second for nothing.
    fn due(&self, counted: u64) -> bool {
        counted != self.counted || self.left
    }

    /// The sweep's `record_unrecorded_denials`, when due.
    fn sweep(
        &mut self,
        dp: &mut Dataplane,
        audit: &mut Journal,
        names: &Names,
        services: &[PlacedService],
    ) -> anyhow::Result<()> {
        let counted = dp.stat(lb_common::stat::DENY_RECORDS_SUPPRESSED)?;
        if self.due(counted) {
            let min_age = Duration::from_nanos(lb_common::DENY_RECORD_INTERVAL_NS);
            self.left = record_unrecorded_denials(dp, audit, names, services, min_age)?;
            self.counted = counted;
        }
        Ok(())
    }
}

/// Records the refusals that no deny record carries: those the program suppressed after a
/// source's last record, once that record is `min_age` old (at a stop, all of them). One
/// `conn_deny` per source and service stands for them all: the time, reason and rule of the
/// last, the client's address without a port, and `suppressed` the others. Returns whether
/// some were left for being too recent.
fn record_unrecorded_denials(
    dp: &mut Dataplane,
    audit: &mut Journal,
    names: &Names,
    services: &[PlacedService],
    min_age: Duration,
) -> anyhow::Result<bool> {
    let clock = Clock::now();
    let (taken, left) = dp.take_unrecorded_denials(clock.boot_ns, min_age.as_nanos() as u64)?;
    for (key, st) in taken {
        // A service removed since has no VIP left to name.
        let vip = services
            .iter()
            .find(|s| s.id == key.service_id)
            .map(dataplane::service_key)
            .unwrap_or_default();
        let ev = ConnEvent {
            kind: event_kind::CONN_DENY,
            proto: st.proto,
            af: key.af,
            reason: st.reason,
            service_id: key.service_id,
            ts_ns: st.last_refusal_ns,
            client: key.addr,
            vip: vip.addr,
            vip_port: vip.port,
            rule: st.rule,
            packets_to_backend: st.suppressed - 1,
            ..ConnEvent::default()
        };
        if let Some(event) = conn_event(&ev, names) {
            audit.record(clock.to_system(ev.ts_ns), event);
        }
    }
    Ok(left)
}

/// Records a flow's end decided in user space (idle, evicted) and removes it from the kernel.
fn close_in_user_space(
    dp: &mut Dataplane,
    audit: &mut Journal,
    names: &Names,
    closed_here: &mut ClosedHere,
    pair: &FlowPair,
    reason: u8,
    clock: &Clock,
) -> anyhow::Result<()> {
    // Closed first, as the program closes a flow: of the two, exactly one records the end.
    // Then removed before the record: a packet arriving now finds no flow rather than being
    // counted after the record was written.
    let ours = dp.close_flow(pair);
    dp.remove_flow(pair)?;
    if ours {
        // (Only TCP: the program never closes a UDP flow.)
        if pair.key.af != lb_common::AF_INET && pair.key.proto == lb_common::PROTO_TCP {
            closed_here.insert(pair.fwd.flow_id, Instant::now());
        }
        record_close(audit, names, pair, reason, clock);
    }
    Ok(())
}

/// IPv6 TCP flows the daemon closed itself (idle, evicted), for a while. `FLOWS6` is a kernel hash
/// map, whose values user space cannot change atomically: between the sweep's read of a flow
/// and its removal, the program may see the flow's FIN or RST, close it too and push a
/// `conn_close` of its own, which `drain` then drops, so that the flow still has exactly one.
/// (IPv4 flows are closed with a compare-and-swap in the table, so only one side closes.)
#[derive(Default)]
struct ClosedHere {
    since: HashMap<u64, Instant>,
}

impl ClosedHere {
    /// Far longer than a record of the program waits in the ring buffer for the daemon (a
    /// commit window, or a sweep).
    const KEEP: Duration = Duration::from_secs(10);

    fn insert(&mut self, flow_id: u64, now: Instant) {
        self.since.insert(flow_id, now);
    }

    /// Whether flow `flow_id` was closed here (a close record of the program's is then the
    /// second one); forgets it.
    fn take(&mut self, flow_id: u64) -> bool {
        // Almost always empty: no hashing in the ring-buffer loop then.
        !self.since.is_empty() && self.since.remove(&flow_id).is_some()
    }

    fn expire(&mut self, now: Instant) {
        self.since
            .retain(|_, at| now.saturating_duration_since(*at) < Self::KEEP);
    }
}

fn record_close(audit: &mut Journal, names: &Names, pair: &FlowPair, reason: u8, clock: &Clock) {
    let ev = close_record(pair, reason, clock.boot_ns);
    if let Some(event) = conn_event(&ev, names) {
        audit.record(clock.to_system(ev.ts_ns), event);
    }
}

/// A close record built in user space, shaped like the kernel's.
fn close_record(pair: &FlowPair, reason: u8, now_boot: u64) -> ConnEvent {
    let (k, f) = (&pair.key, &pair.fwd);
    let rev = pair.rev.unwrap_or_default();
    ConnEvent {
        kind: event_kind::CONN_CLOSE,
        proto: k.proto,
        af: k.af,
        reason,
        service_id: f.service_id,
        flow_id: f.flow_id,
        ts_ns: now_boot,
        opened_ns: f.opened_ns,
        client: k.src,
        vip: k.dst,
        backend: f.nat_dst,
        snat: f.nat_src,
        client_port: k.sport,
        vip_port: k.dport,
        backend_port: f.nat_dport,
        snat_port: f.nat_sport,
        generation: f.generation,
        rule: u32::MAX,
        bytes_to_backend: f.bytes,
        bytes_to_client: rev.bytes,
        packets_to_backend: f.packets,
        packets_to_client: rev.packets,
    }
}

/// The audit event for a kernel connection record; `None` for a record it cannot name.
pub fn conn_event(ev: &ConnEvent, names: &Names) -> Option<Event> {
    let proto = match ev.proto {
        lb_common::PROTO_TCP => Proto::Tcp,
        lb_common::PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let service = names
        .services
        .get(&ev.service_id)
        .cloned()
        .unwrap_or_else(|| format!("#{}", ev.service_id));
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
        event_kind::CONN_DENY => Some(Event::ConnDeny(ConnDeny {
            proto,
            client,
            vip,
            service,
            reason: match ev.reason {
                deny_reason::ACL => DenyReason::Acl,
                deny_reason::RATE_LIMITED => DenyReason::RateLimited,
                deny_reason::NO_BACKEND => DenyReason::NoBackend,
                deny_reason::SNAT_EXHAUSTED => DenyReason::SnatExhausted,
                deny_reason::CONNTRACK_FULL => DenyReason::ConntrackFull,
                _ => DenyReason::AuditUnavailable,
            },
            rule: match ev.reason {
                deny_reason::ACL => Some(
                    names
                        .rules
                        .get(&ev.rule)
                        .cloned()
                        .unwrap_or_else(|| "default deny".to_string()),
                ),
                _ => None,
            },
            suppressed: ev.packets_to_backend,
        })),
        _ => None,
    }
}

/// Converts kernel timestamps (CLOCK_BOOTTIME, which keeps counting across suspend) to UTC:
/// both clocks are read together, and an event's time is "now" minus how long ago it happened.
struct Clock {
    real: SystemTime,
    boot_ns: u64,
    /// CLOCK_MONOTONIC_COARSE, the clock of flows' `last_seen_ns`.
    coarse_ns: u64,
}

impl Clock {
    fn now() -> Self {
        Self {
            real: SystemTime::now(),
            boot_ns: clock_ns(libc::CLOCK_BOOTTIME),
            coarse_ns: clock_ns(libc::CLOCK_MONOTONIC_COARSE),
        }
    }

    fn to_system(&self, event_boot_ns: u64) -> SystemTime {
        let ago = Duration::from_nanos(self.boot_ns.saturating_sub(event_boot_ns));
        self.real.checked_sub(ago).unwrap_or(self.real)
    }
}

/// A clock in nanoseconds: CLOCK_BOOTTIME is `bpf_ktime_get_boot_ns`'s, CLOCK_MONOTONIC_COARSE
/// is `bpf_ktime_get_coarse_ns`'s.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; both clocks exist on every supported kernel.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SOURCES` is read when the program suppressed refusals since the last read, or when
    /// that read left some for later; not otherwise.
    #[test]
    fn suppressed_refusals_are_looked_for_only_when_due() {
        let mut seen = SuppressedDenials::default();
        assert!(!seen.due(0), "nothing suppressed yet");
        assert!(seen.due(3), "suppressed since");
        seen = SuppressedDenials {
            counted: 3,
            left: true,
        };
        assert!(seen.due(3), "left for later");
        seen.left = false;
        assert!(!seen.due(3), "all taken, nothing since");
        assert!(seen.due(4));
    }

    /// A kernel close of a flow the daemon closed itself is recognised once, and only for
    /// that flow and for a while.
    #[test]
    fn a_flow_closed_here_is_recognised_once() {
        let t0 = Instant::now();
        let mut closed = ClosedHere::default();
        closed.insert(7, t0);
        closed.insert(9, t0);
        assert!(!closed.take(8), "a flow not closed here");
        assert!(closed.take(7));
        assert!(
            !closed.take(7),
            "a third close is not expected and not dropped"
        );
        closed.expire(t0 + ClosedHere::KEEP / 2);
        closed.insert(11, t0 + ClosedHere::KEEP / 2);
        closed.expire(t0 + ClosedHere::KEEP);
        assert!(!closed.take(9), "forgotten after KEEP");
        assert!(closed.take(11), "kept until its own KEEP is over");
    }
}
