//! lb against the balancers a user would pick instead — kernel DNAT (nftables + conntrack),
//! HAProxy (TCP mode), nginx stream — and the direct path, on one namespace topology, in one
//! run, as medians of interleaved rounds and as ratios.
//!
//! `cargo xtask bench --peers [--quick] [-- ARGS]` (installs the peers when missing, builds the
//! release binaries), or `LB_BIN_DIR=target/release cargo bench -p lb-tests --bench peers --
//! ARGS`. Needs root. ARGS:
//!
//! - `--quick`: 2 short rounds (under two minutes);
//! - `--rounds N`, `--secs S` (length of each load phase, seconds), `--rate R` (the fixed
//!   offered load for the CPU and latency figures, connections/s), `--threads N` (client
//!   threads for short connections), `--workers N` (HAProxy threads, nginx workers; default 2),
//!   `--only direct,lb,nft,haproxy,nginx`;
//! - `--svg PATH`, `--json PATH`: where the plot and the raw samples go (default: a full run of
//!   every peer writes docs/benchmarks-peers.svg, a run of some peers
//!   target/bench-peers-some.svg, a quick run target/bench-peers-quick.svg; the samples go to
//!   target/bench-peers.json, or target/bench-peers-quick.json).
//!
//! Each round runs every peer in turn (the order rotates from round to round); for each: start
//! it, then (1) short TCP connections as fast as the client threads go, (2) short connections at
//! the fixed offered load with machine CPU from /proc/stat and per-connection setup latency,
//! (3) one bulk TCP stream, (4) a UDP blast; then stop it (lb: its audit log is decoded and
//! compared with the flows the backends saw). Only one peer runs at a time.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_tests::{
    Topology,
    bench::{
        load::{self, Backend, ConnSpec, RawUdpSpec},
        peers::{self, AuditCheck, BACKEND_UDP_PORT, Peer},
        stats::{CpuTimes, cpus, median, parse_nft_counter, percentile},
        svg,
    },
    topology::layout,
};
use serde_json::json;

#[derive(Clone, Debug)]
struct Opts {
    quick: bool,
    rounds: usize,
    secs: f64,
    rate: f64,
    threads: usize,
    workers: usize,
    udp_flows: usize,
    only: Vec<Peer>,
    svg: PathBuf,
    json: PathBuf,
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn parse_args() -> Result<Opts> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Opts {
        quick,
        rounds: if quick { 2 } else { 5 },
        secs: if quick { 1.0 } else { 3.0 },
        rate: 1000.0,
        threads: 8,
        workers: 2,
        udp_flows: 16,
        only: Peer::ALL.to_vec(),
        svg: if quick {
            workspace().join("target/bench-peers-quick.svg")
        } else {
            workspace().join("docs/benchmarks-peers.svg")
        },
        json: workspace().join(if quick {
            "target/bench-peers-quick.json"
        } else {
            "target/bench-peers.json"
        }),
    };
    let mut svg_given = false;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut val = || -> Result<String> {
            i += 1;
            args.get(i)
                .cloned()
                .with_context(|| format!("{a} needs a value"))
        };
        match a {
            "--quick" => {}
            // cargo bench passes --bench to harness = false benchmarks.
            "--bench" => {}
            "--rounds" => o.rounds = val()?.parse().context("--rounds")?,
            "--secs" => o.secs = val()?.parse().context("--secs")?,
            "--rate" => o.rate = val()?.parse().context("--rate")?,
            "--threads" => o.threads = val()?.parse().context("--threads")?,
            "--workers" => o.workers = val()?.parse().context("--workers")?,
            "--svg" => {
                o.svg = val()?.into();
                svg_given = true;
            }
            "--json" => o.json = val()?.into(),
            "--only" => {
                let v = val()?;
                o.only = v
                    .split(',')
                    .map(|n| Peer::from_name(n.trim()).with_context(|| format!("unknown peer {n}")))
                    .collect::<Result<_>>()?;
            }
            // The other benchmarks' flags, when `cargo xtask bench` passes ARGS to all three.
            "--repeat" | "--conntrack" | "--records" => {
                val()?;
            }
            "--new-flow-only" => {}
            other => eprintln!("peers bench: ignoring unknown argument {other}"),
        }
        i += 1;
    }
    if !o.only.contains(&Peer::Direct) {
        o.only.insert(0, Peer::Direct);
    }
    // The plot in the docs shows every peer: a run of some leaves it alone.
    if !svg_given && !quick && Peer::ALL.iter().any(|p| !o.only.contains(p)) {
        o.svg = workspace().join("target/bench-peers-some.svg");
    }
    o.rounds = o.rounds.max(1);
    Ok(o)
}

/// One peer, one round.
#[derive(Clone, Debug)]
struct Sample {
    conn_rate: f64,
    conn_failed: u64,
    fixed_rate: f64,
    fixed_failed: u64,
    /// Machine-wide busy CPU during the fixed load, in cores.
    busy_cores: f64,
    /// The same from the tick-sampled columns of /proc/stat (undercounts short bursts).
    sampled_busy_cores: f64,
    /// CPU of the lb-daemon process itself (user + system, its threads), in cores.
    daemon_cores: f64,
    steal_cores: f64,
    setup_p50: f64,
    setup_p99: f64,
    connect_p50: f64,
    connect_p99: f64,
    bulk_gbps: f64,
    udp_pps: f64,
    udp_sent_pps: f64,
    /// Fraction of the balancer's CPU busy in the blast of `udp_pps`.
    udp_balancer_busy: f64,
    errors: BTreeMap<String, u64>,
}

/// User + system CPU seconds of a process (fields 14 and 15 of /proc/PID/stat).
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks / hz)
}

/// The MAC address of `iface` in `ns`.
fn mac(ns: &lb_tests::Netns, iface: &str) -> Result<[u8; 6]> {
    let text = ns.try_exec(&["cat", &format!("/sys/class/net/{iface}/address")])?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address of {iface}: {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC address of {iface}: {text:?}"))
}

/// CPUs of the UDP phase: the sender's, and the balancer's, which also receives for the
/// backends (their interfaces are fed by its CPU).
const SENDER_CPU: usize = 0;
const BALANCER_CPU: usize = 1;

/// Whether the UDP phase splits the CPUs: not on a machine of one.
fn split_possible() -> bool {
    cpus() > 1
}

/// Moves everything the balancer does onto `BALANCER_CPU`, away from the sender's CPU, as
/// separate machines would: packets the lb namespace's kernel receives are steered there
/// (RPS on its interfaces), an XDP program's receive queue is polled by a NAPI thread there,
/// and its processes (proxies, the daemon) run there. `share_cpus` puts everything back.
fn split_cpus(topo: &Topology) -> Result<()> {
    place_balancer(
        topo,
        &format!("{:x}", 1 << BALANCER_CPU),
        1,
        &BALANCER_CPU.to_string(),
    )
}

fn share_cpus(topo: &Topology) -> Result<()> {
    place_balancer(topo, "0", 0, &format!("0-{}", cpus() - 1))
}

/// Sets the RPS CPU mask `rps` and NAPI threading `threaded` of the lb namespace's
/// interfaces, and keeps its processes and those NAPI threads on the CPU list `allowed`.
fn place_balancer(topo: &Topology, rps: &str, threaded: u8, allowed: &str) -> Result<()> {
    if !split_possible() {
        return Ok(());
    }
    let ns = topo.ns(layout::LB);
    let mut script = String::new();
    for iface in layout::LB_IFACES {
        // Only an interface with NAPI (an XDP program attached) has a poll thread to set.
        script.push_str(&format!(
            "for q in /sys/class/net/{iface}/queues/rx-*; do echo {rps} > $q/rps_cpus; done; \
             echo {threaded} > /sys/class/net/{iface}/threaded 2>/dev/null || true; "
        ));
    }
    ns.try_run(&script)?;
    let mut pids = ns.try_exec(&["ip", "netns", "pids", ns.name()])?;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if layout::LB_IFACES
            .iter()
            .any(|i| comm.starts_with(&format!("napi/{i}-")))
        {
            pids.push_str(&format!(" {}", entry.file_name().to_string_lossy()));
        }
    }
    let pids: Vec<&str> = pids.split_whitespace().collect();
    if !pids.is_empty() {
        // A process that exited meanwhile is no error.
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for p in {}; do taskset -a -p -c {allowed} $p; done",
                pids.join(" ")
            ))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    Ok(())
}

/// What one UDP blast got through.
#[derive(Clone, Copy, Debug)]
struct UdpRate {
    /// Datagrams/s that reached the backends.
    arrived: f64,
    /// Datagrams/s the sender got out.
    sent: f64,
    /// Fraction of the balancer's CPU that was busy meanwhile.
    balancer_busy: f64,
}

/// One blast as `spec` says, with the balancer on a CPU of its own (`split_cpus`), counted
/// where it arrives: an ingress filter on each backend's interface counts and drops it, so
/// that the backends' UDP sockets are not what limits the rate.
fn udp_blast(topo: &Topology, spec: &RawUdpSpec) -> Result<UdpRate> {
    let bns = [topo.ns(layout::BACKEND1), topo.ns(layout::BACKEND2)];
    for ns in bns {
        install_udp_counter(ns)?;
    }
    // The balancer's CPU, or the only one.
    let balancer = split_possible().then_some(BALANCER_CPU);
    let blast = split_cpus(topo).and_then(|()| {
        let cpu0 = CpuTimes::read(balancer)?;
        let u = load::run_raw_udp(topo.ns(layout::CLIENT).name(), spec)?;
        let cpu1 = CpuTimes::read(balancer)?;
        let wall = cpu1.at.duration_since(cpu0.at).as_secs_f64();
        Ok((u, cpu0.busy_secs_until(&cpu1) / wall))
    });
    let undone = share_cpus(topo);
    std::thread::sleep(Duration::from_millis(100));
    // Both counters are read and removed, even if the blast failed.
    let counted = bns.map(take_udp_counter);
    let (u, balancer_busy) = blast?;
    undone?;
    let mut arrived = 0;
    for c in counted {
        arrived += c?;
    }
    let secs = u.elapsed.as_secs_f64();
    Ok(UdpRate {
        arrived: arrived as f64 / secs,
        sent: u.sent as f64 / secs,
        balancer_busy,
    })
}

/// The best rate the balancer forwards `flows` at: a blast as fast as the sender goes and,
/// while more than a tenth of what was sent is lost on the way (a proxy whose socket
/// overflows while the kernel spends the CPU receiving what it then drops), blasts offering
/// half the rate of the one before. After such halving, one more blast offers √2 times the
/// last rate, between it and the one before. Returns the blast in which the most arrived.
fn udp_forwarding_rate(
    topo: &Topology,
    flows: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
    duration: Duration,
) -> Result<UdpRate> {
    let mut spec = RawUdpSpec {
        iface: "eth0".into(),
        src_mac: mac(topo.ns(layout::CLIENT), "eth0")?,
        dst_mac: mac(topo.ns(layout::LB), layout::LB_IFACES[0])?,
        flows,
        payload: 64,
        duration,
        rate: None,
        cpu: split_possible().then_some(SENDER_CPU),
    };
    let flood = udp_blast(topo, &spec)?;
    let mut offer = |rate: f64| -> Result<UdpRate> {
        spec.rate = Some(rate);
        let got = udp_blast(topo, &spec)?;
        println!(
            "    udp offered {rate:.0}/s: {:.0}/s sent, {:.0}/s arrived, balancer CPU {:.0}% busy",
            got.sent,
            got.arrived,
            got.balancer_busy * 100.0
        );
        Ok(got)
    };
    let (mut best, mut last, mut rate) = (flood, flood, flood.sent);
    while last.arrived < 0.9 * last.sent && rate > 1000.0 {
        rate /= 2.0;
        last = offer(rate)?;
        if last.arrived > best.arrived {
            best = last;
        }
    }
    if rate < flood.sent {
        // Between the last rate that lost too much and the first that did not.
        let got = offer(rate * std::f64::consts::SQRT_2)?;
        if got.arrived > best.arrived {
            best = got;
        }
    }
    Ok(best)
}

/// The nftables table of the ingress filter that counts and drops the UDP blast.
const UDP_COUNTER: &str = "lbbench";

/// Installs that filter on a backend's `eth0`.
fn install_udp_counter(ns: &lb_tests::Netns) -> Result<()> {
    // One left by an interrupted round would count too.
    let _ = ns.try_exec(&["nft", "delete", "table", "netdev", UDP_COUNTER]);
    ns.try_exec(&["nft", "add", "table", "netdev", UDP_COUNTER])?;
    ns.try_exec(&[
        "nft",
        "add",
        "chain",
        "netdev",
        UDP_COUNTER,
        "blast",
        "{ type filter hook ingress device eth0 priority 0 ; }",
    ])?;
    let port = BACKEND_UDP_PORT.to_string();
    ns.try_exec(&[
        "nft",
        "add",
        "rule",
        "netdev",
        UDP_COUNTER,
        "blast",
        "udp",
        "dport",
        &port,
        "counter",
        "drop",
    ])?;
    Ok(())
}

/// Removes that filter; the datagrams it counted.
fn take_udp_counter(ns: &lb_tests::Netns) -> Result<u64> {
    let listed = ns.try_exec(&["nft", "list", "chain", "netdev", UDP_COUNTER, "blast"]);
    ns.try_exec(&["nft", "delete", "table", "netdev", UDP_COUNTER])?;
    parse_nft_counter(&listed?)
}

fn measure(
    peer: Peer,
    topo: &Topology,
    backends: &[Backend; 2],
    o: &Opts,
) -> Result<(Sample, Option<AuditCheck>)> {
    let client = topo.ns(layout::CLIENT).name().to_owned();
    let secs = Duration::from_secs_f64(o.secs);
    let accepted0: u64 = backends.iter().map(Backend::accepted).sum();
    backends.iter().for_each(Backend::clear_udp_peers);
    peers::flush_time_wait(topo);
    let running = peers::start(peer, topo, o.workers)?;

    // 1. Short connections, closed loop: as many as the client threads get through.
    let c = load::run_conns(
        &client,
        &ConnSpec {
            targets: peer.tcp_targets(),
            threads: o.threads,
            max_conns: 2_000_000,
            duration: secs,
            rate: None,
            timeout: Duration::from_secs(1),
        },
    )?;
    std::thread::sleep(Duration::from_millis(300));

    // 2. The same at a fixed offered load: machine CPU and setup latency.
    let daemon_pid = running.daemon_pid();
    let d0 = daemon_pid.and_then(proc_cpu_secs);
    let cpu0 = CpuTimes::read(None)?;
    let f = load::run_conns(
        &client,
        &ConnSpec {
            targets: peer.tcp_targets(),
            threads: o.threads,
            max_conns: (o.rate * o.secs * 1.5) as u64 + 10,
            duration: Duration::from_secs_f64(o.secs * 1.5),
            rate: Some(o.rate),
            timeout: Duration::from_secs(1),
        },
    )?;
    let cpu1 = CpuTimes::read(None)?;
    let d1 = daemon_pid.and_then(proc_cpu_secs);
    let window = cpu1.at.duration_since(cpu0.at).as_secs_f64();
    if std::env::var_os("LB_BENCH_DEBUG").is_some() {
        for role in [layout::CLIENT, layout::LB, layout::BACKEND1] {
            let out = topo.ns(role).try_run("nstat -asz | grep -E 'Retrans|PAWS|TW|SynRetrans|ListenDrops|ListenOverflows|Timeouts|OutRsts|EstabResets|AttemptFails|TCPAbort|Backlog|Drop' | awk '$2 != 0'").unwrap_or_default();
            println!(
                "    [{role}] {}",
                out.split_whitespace()
                    .collect::<Vec<_>>()
                    .chunks(3)
                    .map(|c| format!("{}={}", c[0], c.get(1).unwrap_or(&"")))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        if let Ok(ct) = topo
            .ns(layout::LB)
            .try_run("cat /proc/net/stat/nf_conntrack 2>/dev/null | head -3")
        {
            println!("    [lb conntrack] {}", ct.replace('\n', " | "));
        }
    }
    std::thread::sleep(Duration::from_millis(300));

    // 3. One bulk TCP stream.
    let bulk = load::run_bulk(&client, peer.tcp_targets()[0], secs, 64 << 30)?;
    std::thread::sleep(Duration::from_millis(300));

    // 4. UDP datagrams of a few flows: the best rate the balancer forwards.
    let mut udp = UdpRate {
        arrived: f64::NAN,
        sent: f64::NAN,
        balancer_busy: f64::NAN,
    };
    if peer.udp() {
        let flows = load::open_udp_flows(&client, &peer.udp_targets(), o.udp_flows, 64)?;
        std::thread::sleep(Duration::from_millis(300));
        udp = udp_forwarding_rate(topo, flows, secs)?;
    }

    let mut audit = running.stop()?;
    if let Some(a) = audit.as_mut() {
        let accepted1: u64 = backends.iter().map(Backend::accepted).sum();
        a.tcp_flows_forwarded = accepted1 - accepted0;
        a.udp_flows_forwarded = backends.iter().map(|b| b.udp_peers() as u64).sum();
    }
    let mut errors = c.errors.clone();
    for (k, v) in &f.errors {
        *errors.entry(k.clone()).or_default() += v;
    }
    Ok((
        Sample {
            conn_rate: c.rate(),
            conn_failed: c.failed,
            fixed_rate: f.rate(),
            fixed_failed: f.failed,
            busy_cores: cpu0.busy_secs_until(&cpu1) / window,
            sampled_busy_cores: cpu0.sampled_busy_secs_until(&cpu1) / window,
            daemon_cores: match (d0, d1) {
                (Some(a), Some(b)) => (b - a) / window,
                _ => f64::NAN,
            },
            steal_cores: cpu0.steal_secs_until(&cpu1) / window,
            setup_p50: percentile(&f.setup_us, 50.0),
            setup_p99: percentile(&f.setup_us, 99.0),
            connect_p50: percentile(&f.connect_us, 50.0),
            connect_p99: percentile(&f.connect_us, 99.0),
            bulk_gbps: bulk.gbit_per_s(),
            udp_pps: udp.arrived,
            udp_sent_pps: udp.sent,
            udp_balancer_busy: udp.balancer_busy,
            errors,
        },
        audit,
    ))
}

/// How a figure compares: higher or lower is better.
#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
}

/// One row of the results table.
struct Figure {
    name: String,
    better: Better,
    /// "added over direct": the direct path is 0 by definition.
    added: bool,
    values: BTreeMap<Peer, f64>,
    fmt: fn(f64) -> String,
}

fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let neg = v < 0.0;
    let s = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    if neg { format!("−{out}") } else { out }
}

fn f2(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "n/a".into()
    }
}

fn signed0(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v >= 0.5 {
        format!("+{}", thousands(v))
    } else {
        thousands(v)
    }
}

fn signed1(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    if v >= 0.05 {
        format!("+{v:.1}")
    } else {
        format!("{v:.1}").replace('-', "−")
    }
}

impl Figure {
    /// The best alternative (nft, HAProxy, nginx) and its value.
    fn best_alternative(&self) -> Option<(Peer, f64)> {
        self.values
            .iter()
            .filter(|(p, v)| p.is_alternative() && v.is_finite())
            .map(|(p, v)| (*p, *v))
            .reduce(|a, b| match self.better {
                Better::Higher if b.1 > a.1 => b,
                Better::Lower if b.1 < a.1 => b,
                _ => a,
            })
    }
    fn get(&self, p: Peer) -> f64 {
        self.values.get(&p).copied().unwrap_or(f64::NAN)
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b.abs() > 1e-12 {
        format!("{:.2}×", a / b)
    } else {
        "—".into()
    }
}

struct Results {
    peers: Vec<Peer>,
    samples: BTreeMap<Peer, Vec<Sample>>,
    /// Per round, the samples of every peer measured in it (for per-round differences).
    rounds: Vec<BTreeMap<Peer, Sample>>,
}

impl Results {
    fn med(&self, p: Peer, f: impl Fn(&Sample) -> f64) -> f64 {
        median(
            &self
                .samples
                .get(&p)
                .map(|v| v.iter().map(&f).collect::<Vec<_>>())
                .unwrap_or_default(),
        )
    }

    /// Median over rounds of (peer − direct) in the same round.
    fn med_added(&self, p: Peer, f: impl Fn(&Sample) -> f64) -> f64 {
        let v: Vec<f64> = self
            .rounds
            .iter()
            .filter_map(|r| Some(f(r.get(&p)?) - f(r.get(&Peer::Direct)?)))
            .collect();
        median(&v)
    }

    fn figures(&self, o: &Opts) -> Vec<Figure> {
        let mut out = Vec::new();
        let mut fig =
            |name: String, better, added, fmt: fn(f64) -> String, val: &dyn Fn(Peer) -> f64| {
                out.push(Figure {
                    name,
                    better,
                    added,
                    values: self.peers.iter().map(|&p| (p, val(p))).collect(),
                    fmt,
                });
            };
        fig(
            format!(
                "TCP new connections/s ({} client threads, closed loop)",
                o.threads
            ),
            Better::Higher,
            false,
            thousands,
            &|p| self.med(p, |s| s.conn_rate),
        );
        fig(
            format!(
                "machine CPU busy at {} conn/s (cores of 2)",
                thousands(o.rate)
            ),
            Better::Lower,
            false,
            f2,
            &|p| self.med(p, |s| s.busy_cores),
        );
        fig(
            format!(
                "CPU the balancer adds at {} conn/s (% of one core)",
                thousands(o.rate)
            ),
            Better::Lower,
            true,
            signed1,
            &|p| {
                if p == Peer::Direct {
                    0.0
                } else {
                    self.med_added(p, |s| s.busy_cores * 100.0)
                }
            },
        );
        fig(
            format!(
                "of which lb-daemon (audit writer) at {} conn/s (% of one core)",
                thousands(o.rate)
            ),
            Better::Lower,
            true,
            signed1,
            &|p| {
                if p == Peer::Lb {
                    self.med(p, |s| s.daemon_cores * 100.0)
                } else {
                    f64::NAN
                }
            },
        );
        fig(
            "CPU the balancer adds per connection (µs)".into(),
            Better::Lower,
            true,
            signed1,
            &|p| {
                if p == Peer::Direct {
                    0.0
                } else {
                    self.med_added(p, |s| s.busy_cores / s.fixed_rate.max(1.0) * 1e6)
                }
            },
        );
        fig(
            "TCP bulk, one stream (Gbit/s)".into(),
            Better::Higher,
            false,
            f2,
            &|p| self.med(p, |s| s.bulk_gbps),
        );
        fig(
            format!("UDP datagrams/s forwarded (64 B, {} flows)", o.udp_flows),
            Better::Higher,
            false,
            thousands,
            &|p| self.med(p, |s| s.udp_pps),
        );
        fig(
            "… the balancer's CPU per datagram (µs: its busy share ÷ that rate)".into(),
            Better::Lower,
            false,
            f2,
            &|p| self.med(p, |s| s.udp_balancer_busy / s.udp_pps * 1e6),
        );
        fig(
            "setup latency p50: connect → reply (µs)".into(),
            Better::Lower,
            false,
            thousands,
            &|p| self.med(p, |s| s.setup_p50),
        );
        fig(
            "setup latency p99: connect → reply (µs)".into(),
            Better::Lower,
            false,
            thousands,
            &|p| self.med(p, |s| s.setup_p99),
        );
        fig(
            "added setup latency p50 over direct (µs)".into(),
            Better::Lower,
            true,
            signed0,
            &|p| {
                if p == Peer::Direct {
                    0.0
                } else {
                    self.med_added(p, |s| s.setup_p50)
                }
            },
        );
        fig(
            "added setup latency p99 over direct (µs)".into(),
            Better::Lower,
            true,
            signed0,
            &|p| {
                if p == Peer::Direct {
                    0.0
                } else {
                    self.med_added(p, |s| s.setup_p99)
                }
            },
        );
        out
    }
}

fn table(figs: &[Figure], peers: &[Peer]) -> String {
    let mut s = String::new();
    s.push_str("| figure (median of rounds) |");
    for p in peers {
        s.push_str(&format!(" {} |", p.label()));
    }
    s.push_str(" best alternative | lb ÷ best alternative | lb ÷ direct |\n|---|");
    for _ in peers {
        s.push_str("---:|");
    }
    s.push_str("---|---:|---:|\n");
    for f in figs {
        s.push_str(&format!("| {} |", f.name));
        let direct = f.get(Peer::Direct);
        for &p in peers {
            let v = f.get(p);
            let cell = if p == Peer::Direct && f.added {
                "0 (baseline)".to_string()
            } else if p != Peer::Direct && !f.added && v.is_finite() {
                format!("{} ({})", (f.fmt)(v), ratio(v, direct))
            } else {
                (f.fmt)(v)
            };
            s.push_str(&format!(" {cell} |"));
        }
        let lb = f.get(Peer::Lb);
        match f.best_alternative() {
            Some((bp, bv)) => s.push_str(&format!(
                " {} {} | {} |",
                bp.label(),
                (f.fmt)(bv),
                ratio(lb, bv)
            )),
            None => s.push_str(" — | — |"),
        }
        s.push_str(&format!(
            " {} |\n",
            if f.added {
                "—".into()
            } else {
                ratio(lb, direct)
            }
        ));
    }
    s
}

/// The targets, checked against the figures.
fn targets(figs: &[Figure]) -> String {
    let find = |prefix: &str| figs.iter().find(|f| f.name.starts_with(prefix));
    let mut s = String::from("| target | measured | met? |\n|---|---|---|\n");
    let mut row = |target: &str, measured: String, met: Option<bool>, short: String| {
        let m = match met {
            Some(true) => "yes".to_string(),
            Some(false) => format!("**no**: {short}"),
            None => "not measured".to_string(),
        };
        s.push_str(&format!("| {target} | {measured} | {m} |\n"));
    };
    if let Some(cpu) = find("CPU the balancer adds at") {
        let lb = cpu.get(Peer::Lb);
        for (peer, frac, what) in [
            (Peer::Nft, 0.5, "≤ 1/2 of kernel DNAT's"),
            (Peer::Haproxy, 0.25, "≤ 1/4 of HAProxy's"),
        ] {
            let other = cpu.get(peer);
            let ok = (lb.is_finite() && other.is_finite()).then_some(lb <= other * frac);
            row(
                &format!("added CPU {what}"),
                format!(
                    "lb {} vs {} {} % of a core ({})",
                    signed1(lb),
                    peer.label(),
                    signed1(other),
                    ratio(lb, other)
                ),
                ok,
                format!(
                    "lb adds {} of {}'s, the target is {frac}×",
                    ratio(lb, other),
                    peer.label()
                ),
            );
        }
    }
    if let Some(udp) = find("UDP datagrams/s") {
        let lb = udp.get(Peer::Lb);
        for (peer, k) in [(Peer::Nft, 2.0), (Peer::Nginx, 10.0)] {
            let other = udp.get(peer);
            let ok = (lb.is_finite() && other.is_finite()).then_some(lb >= other * k);
            row(
                &format!("UDP datagrams/s ≥ {k}× {}", peer.label()),
                format!("lb {} vs {}", thousands(lb), thousands(other)),
                ok,
                format!("{} of the {k}× asked", ratio(lb, other)),
            );
        }
    }
    if let Some(bulk) = find("TCP bulk") {
        let (lb, d) = (bulk.get(Peer::Lb), bulk.get(Peer::Direct));
        let ok = (lb.is_finite() && d.is_finite()).then_some(lb >= 0.95 * d);
        row(
            "bulk TCP ≥ 95% of the direct path",
            format!(
                "lb {} vs direct {} Gbit/s ({})",
                f2(lb),
                f2(d),
                ratio(lb, d)
            ),
            ok,
            format!(
                "{:.0}% of the direct path, {:.0} points short",
                lb / d * 100.0,
                95.0 - lb / d * 100.0
            ),
        );
    }
    if let Some(p99) = find("added setup latency p99") {
        let (lb, n) = (p99.get(Peer::Lb), p99.get(Peer::Nft));
        let ok = (lb.is_finite() && n.is_finite()).then_some(lb <= n.max(0.0) + 1.0);
        row(
            "added p99 setup latency ≤ kernel DNAT's",
            format!("lb {} µs vs kernel DNAT {} µs", signed0(lb), signed0(n)),
            ok,
            format!("{} µs more", thousands(lb - n)),
        );
    }
    s
}

fn plot(figs: &[Figure], peers: &[Peer], o: &Opts, machine: &str) -> String {
    let color = |p: Peer| match p {
        Peer::Direct => "#9e9e9e",
        Peer::Lb => "#1f77b4",
        Peer::Nft => "#2ca02c",
        Peer::Haproxy => "#ff7f0e",
        Peer::Nginx => "#9467bd",
    };
    let pick = [
        "TCP new connections/s",
        "CPU the balancer adds at",
        "TCP bulk",
        "UDP datagrams/s",
        "added setup latency p50",
        "added setup latency p99",
    ];
    let panels = pick
        .iter()
        .filter_map(|prefix| figs.iter().find(|f| f.name.starts_with(prefix)))
        .map(|f| svg::Panel {
            title: format!(
                "{} — {} is better",
                f.name,
                if f.better == Better::Higher {
                    "higher"
                } else {
                    "lower"
                }
            ),
            fmt: f.fmt,
            bars: peers
                .iter()
                .filter(|&&p| !(f.added && p == Peer::Direct))
                .map(|&p| svg::Bar {
                    label: p.label().into(),
                    value: f.get(p),
                    color: color(p),
                })
                .collect(),
        })
        .collect::<Vec<_>>();
    svg::render(
        "lb vs the peers, one topology, one run (medians of rounds)",
        &format!(
            "{machine}; {} rounds × {} s per phase; fixed load {} conn/s; {} workers per proxy",
            o.rounds, o.secs, o.rate, o.workers
        ),
        &panels,
    )
}

fn machine() -> String {
    let cpus = cpus();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    format!("{cpus} vCPUs ({model}), Linux {kernel}")
}

fn main() {
    if !lb_tests::require_root("peers benchmark") {
        return;
    }
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: stopping the peers and removing the benchmark's namespaces");
        lb_tests::cleanup_all();
        std::process::exit(130);
    })
    .expect("installing the Ctrl-C handler");
    if let Err(e) = run() {
        eprintln!("peers bench: error: {e:#}");
        lb_tests::cleanup_all();
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let o = parse_args()?;
    let t_start = Instant::now();
    lb_tests::bin("lb-daemon")?;
    lb_tests::bin("lb-audit")?;
    let mut peers_list = Vec::new();
    let mut skipped = Vec::new();
    for &p in &o.only {
        match p.missing() {
            Some(why) => {
                println!(
                    "peers bench: skipping {}: {why} (`cargo xtask bench --peers` installs it)",
                    p.label()
                );
                skipped.push((p, why));
            }
            None => peers_list.push(p),
        }
    }
    let machine = machine();
    println!(
        "peers bench: {machine}; {} rounds, {} s per load phase, fixed load {} conn/s, {} client threads, {} workers per proxy; peers: {}",
        o.rounds,
        o.secs,
        o.rate,
        o.threads,
        o.workers,
        peers_list
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("lb-daemon: {}", lb_tests::bin("lb-daemon")?.display());

    let topo = Topology::balancer("pb")?;
    let [b1, b2] = Topology::backends();
    let backends = [
        Backend::start(
            topo.ns(layout::BACKEND1).name(),
            b1,
            std::net::SocketAddr::new(b1.ip(), BACKEND_UDP_PORT),
            o.workers,
        )?,
        Backend::start(
            topo.ns(layout::BACKEND2).name(),
            b2,
            std::net::SocketAddr::new(b2.ip(), BACKEND_UDP_PORT),
            o.workers,
        )?,
    ];

    let mut results = Results {
        peers: peers_list.clone(),
        samples: BTreeMap::new(),
        rounds: Vec::new(),
    };
    let mut audit_total = AuditCheck::default();
    let mut audit_rounds = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for round in 0..o.rounds {
        let mut order = peers_list.clone();
        let n = order.len();
        order.rotate_left(round % n);
        let mut this = BTreeMap::new();
        for &p in &order {
            let t = Instant::now();
            match measure(p, &topo, &backends, &o) {
                Ok((s, audit)) => {
                    println!(
                        "round {}/{} {:<8} {:>7.0} conn/s ({} failed) | fixed {:>5.0}/s busy {:.2} cores (daemon {:.2}) p50 {:>5.0} µs p99 {:>6.0} µs ({} failed) | bulk {:>5.2} Gbit/s | udp {:>9.0} pps of {:>9.0} sent, balancer CPU {:.0}% busy | {:.1} s",
                        round + 1,
                        o.rounds,
                        p.name(),
                        s.conn_rate,
                        s.conn_failed,
                        s.fixed_rate,
                        s.busy_cores,
                        s.daemon_cores,
                        s.setup_p50,
                        s.setup_p99,
                        s.fixed_failed,
                        s.bulk_gbps,
                        s.udp_pps,
                        s.udp_sent_pps,
                        s.udp_balancer_busy * 100.0,
                        t.elapsed().as_secs_f64()
                    );
                    if !s.errors.is_empty() {
                        println!("    failures: {:?}", s.errors);
                    }
                    if let Some(a) = audit {
                        println!(
                            "    lb audit: tcp flows forwarded {} / conn_open tcp {}, udp flows {} / conn_open udp {}, conn_close {}, conn_deny {}, lost {} → unaccounted {}; SNAT tuple overlaps {}, reused within 60 s {}",
                            a.tcp_flows_forwarded,
                            a.conn_open_tcp,
                            a.udp_flows_forwarded,
                            a.conn_open_udp,
                            a.conn_close,
                            a.conn_deny,
                            a.lost,
                            a.unaccounted(),
                            a.snat_overlaps,
                            a.snat_reuse_in_time_wait
                        );
                        audit_total.add(&a);
                        audit_rounds.push(a);
                    }
                    results.samples.entry(p).or_default().push(s.clone());
                    this.insert(p, s);
                }
                Err(e) => {
                    let msg = format!("round {} {}: {e:#}", round + 1, p.name());
                    println!("{msg}");
                    failures.push(msg);
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        results.rounds.push(this);
    }
    drop(backends);
    drop(topo);

    let figs = results.figures(&o);
    let tbl = table(&figs, &peers_list);
    let tgt = targets(&figs);
    println!(
        "\n## Results ({machine}; {:.0} s)\n",
        t_start.elapsed().as_secs_f64()
    );
    println!("{tbl}");
    println!("{tgt}");
    println!(
        "lb audit over the run: {} TCP flows forwarded, {} conn_open tcp; {} UDP flows forwarded, {} conn_open udp; {} conn_close; {} conn_deny; {} records lost; unaccounted: {}",
        audit_total.tcp_flows_forwarded,
        audit_total.conn_open_tcp,
        audit_total.udp_flows_forwarded,
        audit_total.conn_open_udp,
        audit_total.conn_close,
        audit_total.conn_deny,
        audit_total.lost,
        audit_total.unaccounted()
    );
    let failed: BTreeMap<Peer, (u64, u64)> = results
        .samples
        .iter()
        .map(|(p, v)| {
            (
                *p,
                (
                    v.iter().map(|s| s.conn_failed + s.fixed_failed).sum(),
                    v.iter().map(|s| (s.conn_rate * o.secs) as u64).sum(),
                ),
            )
        })
        .collect();
    println!("failed short connections per peer (all rounds): {failed:?}");
    for (p, why) in &skipped {
        println!("not measured: {} ({why})", p.label());
    }
    for f in &failures {
        println!("failed: {f}");
    }

    if let Some(dir) = o.svg.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.svg, plot(&figs, &peers_list, &o, &machine))
        .with_context(|| format!("writing {}", o.svg.display()))?;
    println!("plot: {}", o.svg.display());
    let samples_json: serde_json::Map<String, serde_json::Value> = results
        .samples
        .iter()
        .map(|(p, v)| {
            (
                p.name().to_owned(),
                v.iter()
                    .map(|s| {
                        json!({
                            "conn_rate": s.conn_rate, "conn_failed": s.conn_failed,
                            "fixed_rate": s.fixed_rate, "fixed_failed": s.fixed_failed,
                            "busy_cores": s.busy_cores, "sampled_busy_cores": s.sampled_busy_cores, "daemon_cores": s.daemon_cores, "steal_cores": s.steal_cores,
                            "setup_p50_us": s.setup_p50, "setup_p99_us": s.setup_p99,
                            "connect_p50_us": s.connect_p50, "connect_p99_us": s.connect_p99,
                            "bulk_gbps": s.bulk_gbps, "udp_pps": s.udp_pps, "udp_sent_pps": s.udp_sent_pps, "udp_balancer_busy": s.udp_balancer_busy,
                            "errors": s.errors,
                        })
                    })
                    .collect(),
            )
        })
        .collect();
    let doc = json!({
        "machine": machine,
        "options": { "quick": o.quick, "rounds": o.rounds, "secs": o.secs, "rate": o.rate,
                     "threads": o.threads, "workers": o.workers,
                     "udp_flows": o.udp_flows },
        "samples": samples_json,
        "audit": audit_rounds.iter().map(|a| json!({
            "tcp_flows_forwarded": a.tcp_flows_forwarded, "conn_open_tcp": a.conn_open_tcp,
            "udp_flows_forwarded": a.udp_flows_forwarded, "conn_open_udp": a.conn_open_udp,
            "conn_close": a.conn_close, "conn_deny": a.conn_deny, "lost": a.lost,
            "records": a.records, "unaccounted": a.unaccounted(),
        })).collect::<Vec<_>>(),
        "failures": failures,
        "table": tbl,
        "targets": tgt,
    });
    if let Some(dir) = o.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.json, serde_json::to_string_pretty(&doc)?)?;
    println!("samples: {}", o.json.display());
    println!(
        "peers bench: done in {:.0} s",
        t_start.elapsed().as_secs_f64()
    );
    if audit_total.unaccounted() > 0 {
        bail!(
            "lb forwarded {} flows that have no conn_open record",
            audit_total.unaccounted()
        );
    }
    Ok(())
}
