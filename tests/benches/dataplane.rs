//! Per-packet cost of the XDP program, measured with BPF_PROG_TEST_RUN inside a network
//! namespace of its own, against a program that only returns XDP_PASS (the floor on this
//! machine), all in one run.
//!
//! `cargo bench -p lb-tests --bench dataplane [-- --repeat N] [--conntrack N] [--new-flow-only]`
//! (or `cargo xtask bench --dataplane`); `--conntrack` sizes the new-flow row's table (default
//! 65536); `--new-flow-only` measures only the new-flow row (and its floor), for profiles of it.
//!
//! BPF_PROG_TEST_RUN's `repeat` runs the program N times on the same buffer, and the program's
//! rewrites persist between runs. The steady-state paths are therefore measured on flows whose
//! rewrite is the identity (VIP = backend, client address and port = SNAT address and port),
//! so each run does the full work (lookups, checksum updates, counters, redirect) on the same
//! bytes, in rounds that each run the floor and then every such row. A new flow cannot repeat
//! on one buffer: that row runs N distinct SYNs once each and averages the kernel-measured
//! durations, against the pass program run on the same frames in alternating batches.

use std::{net::IpAddr, time::Duration};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_daemon::{
    audit::Proto,
    balancer,
    config::{BackendSpec, ServiceSpec, Settings},
    dataplane::Dataplane,
};
use lb_tests::packet::{self, End, L4, TCP_ACK};

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const PORT: u16 = 40000;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

fn main() {
    if !lb_tests::require_root("dataplane benchmark") {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str, default: u32, min: u32| -> u32 {
        let Some(i) = args.iter().position(|a| a == name) else {
            return default;
        };
        match args.get(i + 1).map(|v| v.parse::<u32>()) {
            Some(Ok(n)) if n >= min => n,
            _ => {
                eprintln!("dataplane benchmark: {name} takes a number, at least {min}");
                std::process::exit(2);
            }
        }
    };
    let repeat = value("--repeat", 1_000_000, 1);
    // The new-flow row's table (`--conntrack-size`): room for a batch of 8192 flows, each with
    // its reply entry, well below its high-water mark.
    let conntrack = value("--conntrack", 65536, 12288);
    let ns = lb_tests::Netns::new("bench");
    ns.run(
        "sysctl -qw net.ipv4.ip_forward=1 && ip link add d0 type veth peer name d1 && ip link set d1 up && ip addr add 10.0.2.1/24 dev d0 && ip link set d0 up && \
         for i in 2 3 4 5 6; do ip neigh add 10.0.2.$i lladdr 02:00:00:00:02:0$i dev d0 nud permanent; done",
    );
    let new_flow_only = args.iter().any(|a| a == "--new-flow-only");
    let rows = ns.enter(|| {
        let mut rows = if new_flow_only {
            Vec::new()
        } else {
            established_rows(repeat)
        };
        rows.extend(new_flow_rows(repeat, conntrack));
        rows
    });
    println!("\nper-packet cost through BPF_PROG_TEST_RUN ({repeat} runs per row)\n");
    println!("| path | ns/packet | × floor | target |");
    println!("|---|---:|---:|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {:.2} | {} |",
            r.name, r.ns, r.ratio, r.target
        );
    }
    println!(
        "\nThe ratio over each row's {ROUNDS} rounds or batches of 8192 (25th, 50th, 75th percentile):\n"
    );
    for r in &rows {
        if let Some([p25, p50, p75]) = r.spread {
            println!("- {}: {p25:.2}×, {p50:.2}×, {p75:.2}×", r.name);
        }
    }
}

/// Rounds of the steady-state rows: each round runs the floor and then every row, so that a
/// drift of the machine's speed during the run moves the floor and the rows alike.
const ROUNDS: usize = 5;

struct Row {
    name: &'static str,
    ns: f64,
    ratio: f64,
    target: &'static str,
    /// The quartiles of the ratio over the row's rounds or batches.
    spread: Option<[f64; 3]>,
}

fn service(name: &str, proto: Proto, vip: &str, backend: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        proto,
        vip: vip.parse().unwrap(),
        backends: vec![BackendSpec {
            addr: backend.parse().unwrap(),
            weight: 1,
        }],
        allow: vec![],
        deny: vec![],
        rate_limit: None,
        health: None,
    }
}

fn load(services: Vec<ServiceSpec>, snat_ports: (u16, u16), conntrack: u32) -> Dataplane {
    let settings = Settings {
        ifaces: vec![],
        services,
        snat_ips: vec!["10.0.2.1".parse().unwrap()],
        snat_ports,
        audit_dir: "/nonexistent".into(),
        audit: Default::default(),
        control_socket: "/nonexistent".into(),
        metrics_addr: None,
        export: vec![],
        alerts: Default::default(),
        roles: vec![],
        tcp_idle_timeout: Duration::from_secs(300),
        udp_idle_timeout: Duration::from_secs(30),
        closed_linger: Duration::from_secs(10),
        maglev_table_size: 4093,
        conntrack_size: conntrack,
        bpf_dir: lb_daemon::config::DEFAULT_BPF_DIR.into(),
        reset_state: false,
        on_stop: lb_daemon::config::OnStop::Detach,
    };
    let placed = balancer::place(&settings).expect("placing services");
    let mut dp =
        Dataplane::load(settings.maglev_table_size, conntrack).expect("loading the data plane");
    dp.configure(snat_ports, settings.maglev_table_size, 1 << 24)
        .unwrap();
    dp.install(&placed).unwrap();
    dp
}

/// Mean ns per run of `repeat` runs on one frame; asserts the action each time.
fn repeated(prog: &Xdp, frame: &[u8], want: u32, repeat: u32) -> f64 {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, want, "unexpected action while benchmarking");
    r.duration.as_nanos() as f64
}

/// Runs one frame once; returns the action.
fn once(prog: &Xdp, frame: &[u8]) -> u32 {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    prog.test_run(opts).expect("BPF_PROG_TEST_RUN").return_value
}

/// Kernel-measured ns of one run of `prog` on `frame`; asserts the action.
fn run_once(
    dp: &mut Dataplane,
    pass_program: bool,
    frame: &[u8],
    out: &mut [u8],
    want: u32,
) -> u128 {
    let prog = if pass_program {
        dp.pass_program()
    } else {
        dp.program()
    }
    .expect("program");
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(out);
    let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
    assert_eq!(
        r.return_value,
        want,
        "unexpected action while benchmarking: counters {:?}",
        dp.stats()
    );
    r.duration.as_nanos()
}

/// Runs each of `n` frames once through the pass program and once through the balancer, side
/// by side in batches of 8192 (the pass program on a batch, then the balancer on the same
/// batch), so that both meet the machine in the same state. Returns the kernel-measured mean
/// ns per run of each, and the ratio of the two in each batch. After each batch, outside the
/// measured time, `between` runs.
fn side_by_side(
    dp: &mut Dataplane,
    n: u32,
    frame: impl Fn(u32) -> Vec<u8>,
    want: u32,
    mut between: impl FnMut(&mut Dataplane),
) -> (f64, f64, Vec<f64>) {
    const BATCH: u32 = 8192;
    let (mut pass, mut prog) = (0u128, 0u128);
    let mut batch_ratios = Vec::new();
    let mut out = vec![0u8; 512];
    for start in (0..n).step_by(BATCH as usize) {
        let frames: Vec<Vec<u8>> = (start..n.min(start + BATCH)).map(&frame).collect();
        let (pass_before, prog_before) = (pass, prog);
        for f in &frames {
            pass += run_once(dp, true, f, &mut out, XDP_PASS);
        }
        for f in &frames {
            prog += run_once(dp, false, f, &mut out, want);
        }
        batch_ratios.push((prog - prog_before) as f64 / (pass - pass_before).max(1) as f64);
        between(dp);
    }
    (pass as f64 / n as f64, prog as f64 / n as f64, batch_ratios)
}

/// The quartiles (25th, 50th, 75th percentiles) of `v`.
fn quartiles(mut v: Vec<f64>) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |q: usize| {
        v.get((v.len().saturating_sub(1)) * q / 4)
            .copied()
            .unwrap_or(f64::NAN)
    };
    [at(1), at(2), at(3)]
}

fn end(ip: &str, port: u16) -> End {
    End {
        mac: MAC,
        ip: ip.parse::<IpAddr>().unwrap(),
        port,
    }
}

/// The rows of flows that exist: steady state, and segments that each carry new bytes.
fn established_rows(repeat: u32) -> Vec<Row> {
    // Identity-rewrite flows: the SNAT range is the one port the client uses.
    let mut deny = service("ssh", Proto::Tcp, "10.0.2.4:22", "10.0.2.4:22");
    deny.deny = vec!["10.0.2.0/24".parse().unwrap()];
    let mut dp = load(
        vec![
            service("tcp", Proto::Tcp, "10.0.2.2:8080", "10.0.2.2:8080"),
            service("udp", Proto::Udp, "10.0.2.3:5353", "10.0.2.3:5353"),
            deny,
        ],
        (PORT, PORT),
        65536,
    );
    let (client, tcp_vip, udp_vip) = (
        end("10.0.2.1", PORT),
        end("10.0.2.2", 8080),
        end("10.0.2.3", 5353),
    );
    let syn = packet::syn(client, tcp_vip);
    let opened = once(dp.program().unwrap(), &syn);
    assert_eq!(
        opened,
        XDP_REDIRECT,
        "opening the benchmark flow: counters {:?}",
        dp.stats().unwrap()
    );
    let prog = dp.program().unwrap();
    // The SYN's sequence number is 1000: this segment carries bytes 1001..1065. Repeated, it is
    // a retransmission after the first run (counted as a packet, adding no bytes).
    let established = packet::tcp_frame(client, tcp_vip, TCP_ACK, 1001, &[0u8; 64]);
    let udp = packet::frame(client, udp_vip, L4::Udp, &[0u8; 64]);
    assert_eq!(
        once(prog, &udp),
        XDP_REDIRECT,
        "opening the UDP benchmark flow"
    );
    let reply = packet::tcp_frame(tcp_vip, client, TCP_ACK, 1, &[0u8; 64]);
    let ssh = packet::syn(client, end("10.0.2.4", 22));

    // Per round: the floor, established forward, reply, UDP forward, ACL deny.
    let mut rounds: Vec<[f64; 5]> = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let floor = repeated(dp.pass_program().unwrap(), &syn, XDP_PASS, repeat);
        let prog = dp.program().unwrap();
        rounds.push([
            floor,
            repeated(prog, &established, XDP_REDIRECT, repeat),
            // Replies leave where the client's SYN came from (lo in a test run): XDP_TX.
            repeated(prog, &reply, XDP_TX, repeat),
            repeated(prog, &udp, XDP_REDIRECT, repeat),
            repeated(prog, &ssh, XDP_DROP, repeat),
        ]);
    }
    let steady = |column: usize, name, target| {
        let mean = |c: usize| rounds.iter().map(|r| r[c]).sum::<f64>() / rounds.len() as f64;
        Row {
            name,
            ns: mean(column),
            ratio: mean(column) / mean(0),
            target,
            spread: (column != 0)
                .then(|| quartiles(rounds.iter().map(|r| r[column] / r[0]).collect())),
        }
    };

    // Established segments that each carry new bytes (the sequence-space mark advances with a
    // compare-and-swap every time): distinct frames, once each, against the pass program run
    // the same way on the same frames.
    let seg = |i: u32| {
        packet::tcp_frame(
            client,
            tcp_vip,
            TCP_ACK,
            1065u32.wrapping_add(i.wrapping_mul(64)),
            &[0u8; 64],
        )
    };
    let advancing_n = repeat.min(200_000);
    let (pass_seg, advancing, advancing_batches) =
        side_by_side(&mut dp, advancing_n, seg, XDP_REDIRECT, |_| {});
    let bytes = dp
        .flows()
        .unwrap()
        .iter()
        .find(|p| p.key.proto == lb_common::PROTO_TCP)
        .expect("the TCP benchmark flow")
        .fwd
        .bytes;
    assert!(
        bytes == 64 * (advancing_n as u64 + 1),
        "every advancing segment counted once: {bytes}"
    );

    vec![
        steady(0, "XDP_PASS program (floor)", ""),
        steady(1, "established TCP forward", "≤ 3×"),
        steady(2, "reply (reverse NAT)", "≤ 3×"),
        steady(3, "UDP forward", "≤ 3×"),
        steady(4, "ACL deny", ""),
        Row {
            name: "XDP_PASS program, one run per call, TCP segments (floor)",
            ns: pass_seg,
            ratio: 1.0,
            target: "",
            spread: None,
        },
        Row {
            name: "established TCP forward, new bytes in every segment, one run per call",
            ns: advancing,
            ratio: advancing / pass_seg,
            target: "",
            spread: Some(quartiles(advancing_batches)),
        },
    ]
}

/// The new-flow row and its floor.
fn new_flow_rows(repeat: u32, conntrack: u32) -> Vec<Row> {
    // New flows: distinct SYNs, once each. Between batches of 8192 (outside the measured
    // time) the ring buffer is drained, as the daemon does, and the flows are removed, as they
    // would close: the SNAT port space towards one backend (64k ports) stays far from full.
    // The SYNs come from one client address whose ports go round 1024-61023, as a busy client's
    // do: each asks for its own port as SNAT port, which is free and held by no other client.
    let n = repeat;
    let mut dp2 = load(
        vec![service("new", Proto::Tcp, "10.0.0.100:80", "10.0.2.5:80")],
        (1024, 65535),
        conntrack,
    );
    let syn = |i: u32| {
        packet::syn(
            end("10.128.0.1", 1024 + (i % 60000) as u16),
            end("10.0.0.100", 80),
        )
    };
    let mut ring = dp2.take_events().unwrap();
    let mut records = 0u64;
    let mut drain = |dp: &mut Dataplane| {
        while ring.next().is_some() {
            records += 1;
        }
        for pair in dp.flows().unwrap() {
            dp.remove_flow(&pair).unwrap();
        }
    };
    let (pass_each, new_ns, new_batches) = side_by_side(&mut dp2, n, syn, XDP_REDIRECT, &mut drain);
    drain(&mut dp2);
    let lost = dp2.stat(lb_common::stat::RINGBUF_LOSS).unwrap();
    assert_eq!(
        (records, lost),
        (n as u64, 0),
        "one conn_open per new flow, none lost"
    );

    vec![
        Row {
            name: "XDP_PASS program, one run per call (floor)",
            ns: pass_each,
            ratio: 1.0,
            target: "",
            spread: None,
        },
        Row {
            name: "new TCP flow (SYN: Maglev + conntrack insert + record), one run per call",
            ns: new_ns,
            ratio: new_ns / pass_each,
            target: "≤ 10×",
            spread: Some(quartiles(new_batches)),
        },
    ]
}
