//! Packet tests: the XDP program run with BPF_PROG_TEST_RUN on crafted frames, inside a network
//! namespace of the test's own whose FIB knows the backends' next hops (a veth interface with
//! permanent neighbour entries). Each test asserts the action, the bytes that leave (addresses,
//! ports, MACs, checksums recomputed here from scratch) and the ring-buffer records.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{ConnEvent, close_reason, deny_reason, event_kind, stat};
use lb_daemon::{
    audit::Proto,
    balancer,
    config::{BackendSpec, Cidr, ServiceSpec, Settings},
    dataplane::{self, Dataplane},
};
use lb_tests::packet::{self, End, L4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const SNAT_PORT: u16 = 40000;
const SNAT_PORTS: u16 = 20000;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];

fn backend_mac(ip: IpAddr) -> [u8; 6] {
    match ip {
        IpAddr::V4(v4) => [0x02, 0, 0, 0, 0x02, v4.octets()[3]],
        IpAddr::V6(v6) => [0x02, 0, 0, 0, 0x06, v6.octets()[15]],
    }
}

fn end(ip: &str, port: u16, mac: [u8; 6]) -> End {
    End {
        mac,
        ip: ip.parse().unwrap(),
        port,
    }
}
fn client(ip: &str, port: u16) -> End {
    end(ip, port, CLIENT_MAC)
}
fn vip(ip: &str, port: u16) -> End {
    end(ip, port, LB_MAC)
}

fn service(name: &str, proto: Proto, vip: &str, backends: &[&str]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        proto,
        vip: vip.parse().unwrap(),
        backends: backends
            .iter()
            .map(|b| BackendSpec {
                addr: b.parse().unwrap(),
                weight: 1,
            })
            .collect(),
        allow: vec![],
        deny: vec![],
        rate_limit: None,
        health: None,
    }
}

/// A loaded data plane and its ring buffer, in a namespace whose veth interface `d0` holds
/// 10.0.2.1/24 and fd00:2::1/64, with permanent neighbours 10.0.2.2-9 and fd00:2::2-9.
struct Fixture {
    dp: Dataplane,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    mac: [u8; 6],
    services: Vec<balancer::PlacedService>,
}

fn setup_ns() -> lb_tests::Netns {
    let ns = lb_tests::Netns::new("pkt");
    let mut script = String::from(
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 && \
         ip link add d0 type veth peer name d1 && ip link set d1 up && ip addr add 10.0.2.1/24 dev d0 && \
         ip addr add fd00:2::1/64 dev d0 nodad && ip link set d0 up",
    );
    for i in 2..10 {
        script += &format!(
            " && ip neigh add 10.0.2.{i} lladdr 02:00:00:00:02:{i:02x} dev d0 nud permanent \
             && ip neigh add fd00:2::{i:x} lladdr 02:00:00:00:06:{i:02x} dev d0 nud permanent"
        );
    }
    ns.run(&script);
    ns
}

fn settings(services: Vec<ServiceSpec>, maglev: u32) -> Settings {
    Settings {
        ifaces: vec![],
        services,
        snat_ips: vec!["10.0.2.1".parse().unwrap(), "fd00:2::1".parse().unwrap()],
        snat_ports: (SNAT_PORT, SNAT_PORT + SNAT_PORTS - 1),
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
        maglev_table_size: maglev,
        conntrack_size: 65536,
        bpf_dir: lb_daemon::config::DEFAULT_BPF_DIR.into(),
        reset_state: false,
        on_stop: lb_daemon::config::OnStop::Detach,
    }
}

fn fixture(services: Vec<ServiceSpec>) -> Fixture {
    fixture_sized(services, 4093)
}

fn fixture_sized(services: Vec<ServiceSpec>, maglev: u32) -> Fixture {
    fixture_with(settings(services, maglev))
}

/// The settings of one TCP service, web (10.0.0.100:80), with one backend, 10.0.2.2:8080.
fn web_settings() -> Settings {
    settings(
        vec![service(
            "web",
            Proto::Tcp,
            "10.0.0.100:80",
            &["10.0.2.2:8080"],
        )],
        4093,
    )
}

/// Service `web` (`web_settings`).
fn web_fixture() -> Fixture {
    fixture_with(web_settings())
}

/// Service `web` (`web_settings`) with the SNAT ports 50000–50003 only.
fn web_with_four_snat_ports() -> Fixture {
    let mut st = web_settings();
    st.snat_ports = (50000, 50003);
    fixture_with(st)
}

fn fixture_with(settings: Settings) -> Fixture {
    let maglev = settings.maglev_table_size;
    let services = balancer::place(&settings).unwrap();
    let mut dp = Dataplane::load(maglev, settings.conntrack_size).unwrap();
    dp.configure(settings.snat_ports, maglev, 1 << 24).unwrap();
    dp.install(&services).unwrap();
    let events = dp.take_events().unwrap();
    Fixture {
        dp,
        events,
        mac: mac_of("d0"),
        services,
    }
}

fn mac_of(iface: &str) -> [u8; 6] {
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).unwrap();
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// Runs one frame through the program; returns the action and the frame as it left.
fn run(fx: &mut Fixture, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let prog = fx.dp.program().unwrap();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let r = prog.test_run(opts).unwrap();
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn events(fx: &mut Fixture) -> Vec<ConnEvent> {
    let mut v = Vec::new();
    while let Some(item) = fx.events.next() {
        v.push(dataplane::decode_event(&item).expect("record of ConnEvent size"));
    }
    v
}

fn stat_of(fx: &mut Fixture, index: u32) -> u64 {
    fx.dp.stat(index).unwrap()
}

fn addr(words: [u32; 4], af: u8, port: u16) -> String {
    dataplane::socket_addr(words, af, port).to_string()
}

fn root(test: &str) -> bool {
    lb_tests::require_root(test)
}

#[test]
fn tcp_ipv4_flow_is_natted_and_tracked_through_close() {
    if !root("tcp_ipv4_flow_is_natted_and_tracked_through_close") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = web_fixture();
        let (c, v) = (client("10.0.1.2", 33333), vip("10.0.0.100", 80));
        let backend = end("10.0.2.2", 8080, fx.mac);

        // SYN: full NAT towards the backend, next hop from the FIB.
        let (action, out) = run(&mut fx, &packet::syn(c, v));
        assert_eq!(action, XDP_REDIRECT);
        let p = packet::parse(&out);
        assert_eq!(
            (p.src, p.dst, p.dport),
            (IpAddr::from([10, 0, 2, 1]), backend.ip, 8080)
        );
        assert!(
            (SNAT_PORT..SNAT_PORT + SNAT_PORTS).contains(&p.sport),
            "SNAT port {}",
            p.sport
        );
        assert_eq!((p.dst_mac, p.src_mac), (backend_mac(backend.ip), fx.mac));
        assert!(packet::checksums_ok(&out), "IPv4 and TCP checksums");
        let snat = end("10.0.2.1", p.sport, fx.mac);
        let ev = events(&mut fx);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, event_kind::CONN_OPEN);
        assert_eq!(
            addr(ev[0].client, ev[0].af, ev[0].client_port),
            "10.0.1.2:33333"
        );
        assert_eq!(addr(ev[0].vip, ev[0].af, ev[0].vip_port), "10.0.0.100:80");
        assert_eq!(
            addr(ev[0].backend, ev[0].af, ev[0].backend_port),
            "10.0.2.2:8080"
        );
        assert_eq!(
            addr(ev[0].snat, ev[0].af, ev[0].snat_port),
            format!("10.0.2.1:{}", snat.port)
        );
        assert_eq!(ev[0].generation, 1);
        let flow_id = ev[0].flow_id;

        // A retransmitted SYN follows the flow: no second open.
        assert_eq!(run(&mut fx, &packet::syn(c, v)).0, XDP_REDIRECT);
        assert!(events(&mut fx).is_empty());

        // SYN-ACK from the backend: reverse NAT, back where the SYN came from.
        let (action, out) = run(
            &mut fx,
            &packet::tcp_frame(backend, snat, TCP_SYN | TCP_ACK, 5000, &[]),
        );
        assert_eq!(
            action, XDP_TX,
            "test-run frames arrive on lo, and replies leave the way the SYN came"
        );
        let p = packet::parse(&out);
        assert_eq!((p.src, p.sport, p.dst, p.dport), (v.ip, 80, c.ip, 33333));
        assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, LB_MAC));
        assert!(packet::checksums_ok(&out));

        // Data both ways, then FIN from each side: one close record with exact counts.
        let (a, out) = run(
            &mut fx,
            &packet::tcp_frame(c, v, TCP_ACK | TCP_PSH, 1001, &[7u8; 100]),
        );
        assert_eq!(a, XDP_REDIRECT);
        assert!(
            packet::checksums_ok(&out),
            "payload-carrying forward checksum"
        );
        let (a, out) = run(
            &mut fx,
            &packet::tcp_frame(backend, snat, TCP_ACK | TCP_PSH, 5001, &[9u8; 333]),
        );
        assert_eq!(a, XDP_TX);
        assert!(
            packet::checksums_ok(&out),
            "payload-carrying reply checksum"
        );
        run(
            &mut fx,
            &packet::tcp_frame(c, v, TCP_ACK | TCP_FIN, 1101, &[]),
        );
        assert!(
            events(&mut fx).is_empty(),
            "a half-closed flow is still open"
        );
        run(
            &mut fx,
            &packet::tcp_frame(backend, snat, TCP_ACK | TCP_FIN, 5334, &[]),
        );
        let ev = events(&mut fx);
        assert_eq!(ev.len(), 1);
        let cl = ev[0];
        assert_eq!(
            (cl.kind, cl.reason, cl.flow_id),
            (event_kind::CONN_CLOSE, close_reason::FIN, flow_id)
        );
        assert_eq!((cl.bytes_to_backend, cl.bytes_to_client), (100, 333));
        assert_eq!((cl.packets_to_backend, cl.packets_to_client), (4, 3));

        // The last ACK of the closed flow still reaches the backend; no second close.
        assert_eq!(
            run(&mut fx, &packet::tcp_frame(c, v, TCP_ACK, 1102, &[])).0,
            XDP_REDIRECT
        );
        assert!(events(&mut fx).is_empty());

        // The 5-tuple reused by a new SYN is a new flow with a new id.
        assert_eq!(run(&mut fx, &packet::syn(c, v)).0, XDP_REDIRECT);
        let ev = events(&mut fx);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, event_kind::CONN_OPEN);
        assert_ne!(ev[0].flow_id, flow_id);

        // RST from the backend closes it at once.
        let snat2 = {
            let flows = fx.dp.flows().unwrap();
            assert_eq!(flows.len(), 1);
            end("10.0.2.1", u16::from_be(flows[0].fwd.nat_sport), fx.mac)
        };
        assert_eq!(
            run(
                &mut fx,
                &packet::tcp_frame(backend, snat2, TCP_RST | TCP_ACK, 1, &[])
            )
            .0,
            XDP_TX
        );
        let ev = events(&mut fx);
        assert_eq!(
            (ev.len(), ev[0].kind, ev[0].reason),
            (1, event_kind::CONN_CLOSE, close_reason::RST)
        );
    });
}

/// Bytes and packets so far of the only flow in the table: `[to backend, to client]` each.
fn counts(fx: &mut Fixture) -> ([u64; 2], [u64; 2]) {
    let flows = fx.dp.flows().unwrap();
    assert_eq!(flows.len(), 1, "one flow in the table");
    let rev = flows[0].rev.expect("reply entry");
    (
        [flows[0].fwd.bytes, rev.bytes],
        [flows[0].fwd.packets, rev.packets],
    )
}

/// TCP bytes are the advance of each direction's sequence space: a retransmitted segment adds
/// nothing, an out-of-order segment and then the gap count each byte once, a partly overlapping
/// segment counts only its new bytes, segments far behind or beyond any window count nothing,
/// the reply direction's numbers wrap around 2^32, SYN and FIN take a sequence number but are
/// not bytes; packets are counted as seen. The close record carries exactly those counts.
#[test]
fn tcp_bytes_count_each_sequence_number_once() {
    if !root("tcp_bytes_count_each_sequence_number_once") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = web_fixture();
        let (c, v) = (client("10.0.1.2", 33334), vip("10.0.0.100", 80));
        let backend = end("10.0.2.2", 8080, fx.mac);
        let data = [5u8; 300];
        let fwd = |fx: &mut Fixture, flags: u8, seq: u32, len: usize| {
            let (a, out) = run(fx, &packet::tcp_frame(c, v, flags, seq, &data[..len]));
            assert_eq!(a, XDP_REDIRECT, "client segment {seq}+{len}");
            assert!(packet::checksums_ok(&out));
        };
        // The client's SYN (sequence 1000): its first byte will be 1001.
        fwd(&mut fx, TCP_SYN, 1000, 0);
        let snat = end("10.0.2.1", open_port(&mut fx), fx.mac);
        // The backend's SYN-ACK, 0x100 before the wrap: its first byte is 0xffff_ff01.
        let isn = 0xffff_ff00u32;
        let rev = |fx: &mut Fixture, flags: u8, seq: u32, len: usize| {
            let (a, out) = run(
                fx,
                &packet::tcp_frame(backend, snat, flags, seq, &data[..len]),
            );
            assert_eq!(a, XDP_TX, "backend segment {seq:#x}+{len}");
            assert!(packet::checksums_ok(&out));
        };
        rev(&mut fx, TCP_SYN | TCP_ACK, isn, 0);
        assert_eq!(
            counts(&mut fx),
            ([0, 0], [1, 1]),
            "SYN and SYN-ACK are no bytes"
        );

        let ack = TCP_ACK | TCP_PSH;
        fwd(&mut fx, ack, 1001, 100); // 1001..1101
        assert_eq!(counts(&mut fx).0, [100, 0]);
        fwd(&mut fx, ack, 1001, 100); // retransmitted whole
        assert_eq!(
            counts(&mut fx),
            ([100, 0], [3, 1]),
            "a retransmission adds no bytes"
        );
        fwd(&mut fx, ack, 1201, 100); // out of order: 1101..1201 not seen yet
        assert_eq!(counts(&mut fx).0, [300, 0], "sequence space up to 1301");
        fwd(&mut fx, ack, 1101, 100); // the gap, filled
        assert_eq!(
            counts(&mut fx).0,
            [300, 0],
            "the gap's bytes are counted once"
        );
        fwd(&mut fx, ack, 1251, 100); // 1251..1351: 50 old, 50 new
        assert_eq!(
            counts(&mut fx).0,
            [350, 0],
            "only the new part of an overlap"
        );
        fwd(&mut fx, ack, 1, 50); // far behind
        fwd(&mut fx, ack, 1351 + (1 << 30) + 1, 10); // beyond any TCP window
        fwd(&mut fx, ack, 1351u32.wrapping_sub(1 << 31), 10); // half the space away
        assert_eq!(
            counts(&mut fx),
            ([350, 0], [9, 1]),
            "segments outside the window count as packets only"
        );

        // Reply data across the wrap: 0xffff_ff01 .. 0x2d.
        rev(&mut fx, ack, isn.wrapping_add(1), 300);
        assert_eq!(counts(&mut fx).0, [350, 300], "across 2^32");
        rev(&mut fx, ack, isn.wrapping_add(1 + 200), 100); // last 100 again, after the wrap
        assert_eq!(
            counts(&mut fx).0,
            [350, 300],
            "retransmission across the wrap"
        );
        rev(&mut fx, ack, 0x2d - 20, 64); // 20 old bytes, 44 new
        assert_eq!(counts(&mut fx).0, [350, 344]);

        // A FIN with 16 bytes from the backend (0x59..0x69, the FIN is 0x69), a retransmission
        // of it, then the client's FIN: the FINs' sequence numbers are not bytes.
        rev(&mut fx, TCP_ACK | TCP_FIN, 0x59, 16);
        rev(&mut fx, TCP_ACK | TCP_FIN, 0x59, 16);
        assert_eq!(counts(&mut fx), ([350, 360], [9, 6]));
        assert!(events(&mut fx).is_empty(), "half closed");
        fwd(&mut fx, TCP_ACK | TCP_FIN, 1351, 0);
        let ev = events(&mut fx);
        assert_eq!(ev.len(), 1);
        let cl = ev[0];
        assert_eq!(
            (cl.kind, cl.reason),
            (event_kind::CONN_CLOSE, close_reason::FIN)
        );
        assert_eq!((cl.bytes_to_backend, cl.bytes_to_client), (350, 360));
        assert_eq!((cl.packets_to_backend, cl.packets_to_client), (10, 6));
        // The last ACK and a late retransmission after the close change nothing recorded.
        fwd(&mut fx, TCP_ACK, 1352, 0);
        fwd(&mut fx, ack, 1251, 100);
        assert!(events(&mut fx).is_empty());
        assert_eq!(counts(&mut fx).0, [350, 360]);
    });
}

/// The first packet of each direction sets the base: a SYN's own payload (TCP Fast Open) and
/// data together with a FIN count as bytes, the SYN and FIN themselves do not; the RST close
/// record carries the exact counts; UDP counts every datagram's payload, repeated or not.
#[test]
fn syn_and_fin_with_data_and_udp_repeats_are_counted_exactly() {
    if !root("syn_and_fin_with_data_and_udp_repeats_are_counted_exactly") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = fixture(vec![
            service("web", Proto::Tcp, "10.0.0.100:80", &["10.0.2.2:8080"]),
            service("dns", Proto::Udp, "10.0.0.100:53", &["10.0.2.3:5353"]),
        ]);
        let (c, v) = (client("10.0.1.2", 33335), vip("10.0.0.100", 80));
        let backend = end("10.0.2.2", 8080, fx.mac);
        // SYN with 20 bytes of data, sequence u32::MAX: its data is 0..20 after the wrap.
        let (a, _) = run(
            &mut fx,
            &packet::tcp_frame(c, v, TCP_SYN, u32::MAX, &[1; 20]),
        );
        assert_eq!(a, XDP_REDIRECT);
        let snat = end("10.0.2.1", open_port(&mut fx), fx.mac);
        assert_eq!(
            counts(&mut fx),
            ([20, 0], [1, 0]),
            "the SYN's data is counted"
        );
        // Retransmitted SYN with the same data: nothing new.
        run(
            &mut fx,
            &packet::tcp_frame(c, v, TCP_SYN, u32::MAX, &[1; 20]),
        );
        assert_eq!(counts(&mut fx), ([20, 0], [2, 0]));
        // SYN-ACK carrying 7 bytes, then a FIN with 5 bytes right after them.
        let (a, _) = run(
            &mut fx,
            &packet::tcp_frame(backend, snat, TCP_SYN | TCP_ACK, 77, &[2; 7]),
        );
        assert_eq!(a, XDP_TX);
        run(
            &mut fx,
            &packet::tcp_frame(backend, snat, TCP_ACK | TCP_FIN, 85, &[3; 5]),
        );
        // Retransmitted FIN with its data, then the client's data 20..120.
        run(
            &mut fx,
            &packet::tcp_frame(backend, snat, TCP_ACK | TCP_FIN, 85, &[3; 5]),
        );
        run(&mut fx, &packet::tcp_frame(c, v, TCP_ACK, 20, &[4; 100]));
        assert_eq!(counts(&mut fx), ([120, 12], [3, 3]));
        // The client resets: one close record, exact counts.
        run(
            &mut fx,
            &packet::tcp_frame(c, v, TCP_RST | TCP_ACK, 120, &[]),
        );
        let ev = events(&mut fx);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].kind, ev[0].reason),
            (event_kind::CONN_CLOSE, close_reason::RST)
        );
        assert_eq!((ev[0].bytes_to_backend, ev[0].bytes_to_client), (120, 12));
        assert_eq!((ev[0].packets_to_backend, ev[0].packets_to_client), (4, 3));
        sweep(&mut fx, "10.0.1.2");

        // UDP has no sequence: the same datagram twice is counted twice.
        let (c, v) = (client("10.0.1.2", 5000), vip("10.0.0.100", 53));
        for _ in 0..2 {
            let (a, _) = run(&mut fx, &packet::frame(c, v, L4::Udp, b"query"));
            assert_eq!(a, XDP_REDIRECT);
        }
        assert_eq!(events(&mut fx).len(), 1, "one open");
        assert_eq!(counts(&mut fx), ([10, 0], [2, 0]));
    });
}

/// The SNAT port of the flow just opened (from its open record, which this consumes).
fn open_port(fx: &mut Fixture) -> u16 {
    let ev = events(fx);
    assert_eq!(
        (ev.len(), ev[0].kind),
        (1, event_kind::CONN_OPEN),
        "one open record"
    );
    u16::from_be(ev[0].snat_port)
}

#[test]
fn udp_and_ipv6_flows_are_natted_both_ways() {
    if !root("udp_and_ipv6_flows_are_natted_both_ways") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = fixture(vec![
            service("dns", Proto::Udp, "10.0.0.100:53", &["10.0.2.3:5353"]),
            service("web6", Proto::Tcp, "[fd00::100]:80", &["[fd00:2::2]:8080"]),
            service("dns6", Proto::Udp, "[fd00::100]:53", &["[fd00:2::3]:5353"]),
        ]);
        let cases = [
            (
                "10.0.1.2",
                "10.0.0.100",
                53,
                "10.0.2.3",
                5353,
                "10.0.2.1",
                L4::Udp,
            ),
            (
                "fd00:1::2",
                "fd00::100",
                80,
                "fd00:2::2",
                8080,
                "fd00:2::1",
                L4::Tcp {
                    flags: TCP_SYN,
                    seq: 9,
                },
            ),
            (
                "fd00:1::2",
                "fd00::100",
                53,
                "fd00:2::3",
                5353,
                "fd00:2::1",
                L4::Udp,
            ),
        ];
        for (cip, vip_ip, vport, bip, bport, snat_ip, l4) in cases {
            let (c, v) = (client(cip, 40001), vip(vip_ip, vport));
            let (a, out) = run(&mut fx, &packet::frame(c, v, l4, b"query"));
            assert_eq!(a, XDP_REDIRECT, "{cip} → {vip_ip}:{vport}");
            let p = packet::parse(&out);
            let b: IpAddr = bip.parse().unwrap();
            assert_eq!(
                (p.src, p.dst, p.dport),
                (snat_ip.parse().unwrap(), b, bport)
            );
            assert_eq!(p.dst_mac, backend_mac(b));
            assert!(
                packet::checksums_ok(&out),
                "{cip} → {vip_ip}: checksums after NAT"
            );
            let ev = events(&mut fx);
            assert_eq!(
                (ev.len(), ev[0].kind),
                (1, event_kind::CONN_OPEN),
                "{cip} → {vip_ip}"
            );
            assert_eq!(ev[0].proto, if l4 == L4::Udp { 17 } else { 6 });

            let reply_l4 = if l4 == L4::Udp {
                L4::Udp
            } else {
                L4::Tcp {
                    flags: TCP_SYN | TCP_ACK,
                    seq: 1,
                }
            };
            let reply = packet::frame(
                end(bip, bport, fx.mac),
                end(snat_ip, p.sport, fx.mac),
                reply_l4,
                b"answer!",
            );
            let (a, out) = run(&mut fx, &reply);
            assert_eq!(a, XDP_TX);
            let r = packet::parse(&out);
            assert_eq!((r.src, r.sport, r.dst, r.dport), (v.ip, vport, c.ip, 40001));
            assert!(
                packet::checksums_ok(&out),
                "{cip} ← {vip_ip}: checksums after reverse NAT"
            );
        }
        // UDP over IPv4 without a checksum stays without one.
        let mut f = packet::frame(
            client("10.0.1.9", 999),
            vip("10.0.0.100", 53),
            L4::Udp,
            b"no-csum",
        );
        f[14 + 20 + 6] = 0;
        f[14 + 20 + 7] = 0;
        let (a, out) = run(&mut fx, &f);
        assert_eq!(a, XDP_REDIRECT);
        assert_eq!(out[40..42], [0, 0], "zero UDP checksum preserved");
    });
}

#[test]
fn access_rules_longest_prefix_wins_and_deny_records_are_limited() {
    if !root("access_rules_longest_prefix_wins_and_deny_records_are_limited") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut adm = service("adm", Proto::Tcp, "10.0.0.100:22", &["10.0.2.2:22"]);
        adm.allow = vec!["10.1.0.0/16".parse::<Cidr>().unwrap()];
        adm.deny = vec!["10.1.2.0/24".parse::<Cidr>().unwrap()];
        let open = service("web", Proto::Tcp, "10.0.0.100:80", &["10.0.2.2:80"]);
        let mut fx = fixture(vec![adm, open]);
        let v = vip("10.0.0.100", 22);

        assert_eq!(
            run(&mut fx, &packet::syn(client("10.1.1.5", 1000), v)).0,
            XDP_REDIRECT,
            "allowed by /16"
        );
        assert_eq!(events(&mut fx)[0].kind, event_kind::CONN_OPEN);

        assert_eq!(
            run(&mut fx, &packet::syn(client("10.1.2.5", 1000), v)).0,
            XDP_DROP,
            "denied by /24"
        );
        let ev = events(&mut fx);
        assert_eq!(
            (ev.len(), ev[0].kind, ev[0].reason),
            (1, event_kind::CONN_DENY, deny_reason::ACL)
        );
        let deny_rule = fx.services[0]
            .rules
            .iter()
            .find(|r| !r.allow)
            .copied()
            .unwrap();
        assert_eq!(ev[0].rule, deny_rule.id);
        assert_eq!(deny_rule.describe(), "deny 10.1.2.0/24");
        assert_eq!(
            addr(ev[0].client, ev[0].af, ev[0].client_port),
            "10.1.2.5:1000"
        );

        // No allow rule matches: refused by the service's default.
        assert_eq!(
            run(&mut fx, &packet::syn(client("10.2.0.1", 1000), v)).0,
            XDP_DROP
        );
        let ev = events(&mut fx);
        assert_eq!((ev[0].reason, ev[0].rule), (deny_reason::ACL, u32::MAX));
        // Another service without rules is open to the same client.
        assert_eq!(
            run(
                &mut fx,
                &packet::syn(client("10.2.0.1", 1000), vip("10.0.0.100", 80))
            )
            .0,
            XDP_REDIRECT
        );
        events(&mut fx);

        // A flood from one source: every SYN is counted, one record per second is written, and
        // the next record says how many were suppressed.
        for port in 2000..2100 {
            assert_eq!(
                run(&mut fx, &packet::syn(client("10.1.2.5", port), v)).0,
                XDP_DROP
            );
        }
        assert!(events(&mut fx).is_empty(), "suppressed within the second");
        assert_eq!(
            fx.dp.rule_hits(8).unwrap()[deny_rule.id as usize],
            101,
            "exact per-rule count"
        );
        assert_eq!(stat_of(&mut fx, stat::DENY_RECORDS_SUPPRESSED), 100);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            run(&mut fx, &packet::syn(client("10.1.2.5", 3000), v)).0,
            XDP_DROP
        );
        let ev = events(&mut fx);
        assert_eq!(
            (ev.len(), ev[0].packets_to_backend),
            (1, 100),
            "the record carries the suppressed count"
        );

        // Refusals after the last record, which no later record carries: the daemon takes them
        // from `SOURCES` once that record is a second old (here: at once), exactly once.
        for port in 3001..3006 {
            assert_eq!(
                run(&mut fx, &packet::syn(client("10.1.2.5", port), v)).0,
                XDP_DROP
            );
        }
        assert!(events(&mut fx).is_empty(), "suppressed within the second");
        let second = Duration::from_secs(1).as_nanos() as u64;
        let (taken, left) = fx.dp.take_unrecorded_denials(boot_ns(), second).unwrap();
        assert!(
            taken.is_empty() && left,
            "not while the source's last record is recent, but left for later"
        );
        let now = boot_ns();
        let (taken, left) = fx.dp.take_unrecorded_denials(now, 0).unwrap();
        assert_eq!((taken.len(), left), (1, false), "{taken:?}");
        let (key, st) = taken[0];
        assert_eq!(addr(key.addr, key.af, 0), "10.1.2.5:0");
        assert_eq!(key.service_id, fx.services[0].id);
        assert_eq!(
            (st.suppressed, st.reason, st.rule, st.proto),
            (5, deny_reason::ACL, deny_rule.id, lb_common::PROTO_TCP)
        );
        assert!(st.last_refusal_ns > ev[0].ts_ns && st.last_refusal_ns <= now);
        assert_eq!(
            fx.dp.take_unrecorded_denials(boot_ns(), 0).unwrap(),
            (vec![], false),
            "taken once"
        );
        // The entry is back, as of the daemon's record: the next refusal is suppressed again.
        assert_eq!(
            run(&mut fx, &packet::syn(client("10.1.2.5", 3006), v)).0,
            XDP_DROP
        );
        assert!(
            events(&mut fx).is_empty(),
            "suppressed after the daemon's record"
        );
        let (taken, _) = fx.dp.take_unrecorded_denials(boot_ns(), 0).unwrap();
        assert_eq!(taken.iter().map(|(_, st)| st.suppressed).sum::<u64>(), 1);
        assert_eq!(
            fx.dp.rule_hits(8).unwrap()[deny_rule.id as usize],
            108,
            "exact per-rule count"
        );
    });
}

/// CLOCK_BOOTTIME now, the clock of the program's timestamps.
fn boot_ns() -> u64 {
    lb_daemon::daemon::clock_ns(libc::CLOCK_BOOTTIME)
}

#[test]
fn rate_limit_refuses_new_flows_beyond_the_rate() {
    if !root("rate_limit_refuses_new_flows_beyond_the_rate") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut web = service("web", Proto::Tcp, "10.0.0.100:80", &["10.0.2.2:80"]);
        web.rate_limit = Some(20);
        let mut fx = fixture(vec![web]);
        let v = vip("10.0.0.100", 80);
        let actions: Vec<u32> = (0..40)
            .map(|p| run(&mut fx, &packet::syn(client("10.1.1.1", 5000 + p), v)).0)
            .collect();
        let passed = actions.iter().filter(|a| **a == XDP_REDIRECT).count();
        assert!(
            (20..=21).contains(&passed),
            "a burst of 40 against 20/s lets about 20 through, got {passed}"
        );
        let ev = events(&mut fx);
        assert_eq!(
            ev.iter()
                .filter(|e| e.kind == event_kind::CONN_OPEN)
                .count(),
            passed
        );
        let denies: Vec<_> = ev
            .iter()
            .filter(|e| e.kind == event_kind::CONN_DENY)
            .collect();
        assert_eq!(denies.len(), 1, "one deny record per source per second");
        assert_eq!(denies[0].reason, deny_reason::RATE_LIMITED);
        assert_eq!(
            stat_of(&mut fx, stat::DENY_RATE_LIMITED),
            40 - passed as u64
        );
        // Another source has its own bucket; packets of admitted flows are not limited.
        assert_eq!(
            run(&mut fx, &packet::syn(client("10.1.1.2", 5000), v)).0,
            XDP_REDIRECT
        );
        assert_eq!(
            run(
                &mut fx,
                &packet::tcp_frame(client("10.1.1.1", 5000), v, TCP_ACK, 2, b"x")
            )
            .0,
            XDP_REDIRECT
        );
    });
}

/// Each hostile or unusual frame has one defined outcome, and nothing is forwarded
/// half-rewritten.
#[test]
fn hostile_packets_have_defined_outcomes() {
    if !root("hostile_packets_have_defined_outcomes") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = fixture(vec![
            service("web", Proto::Tcp, "10.0.0.100:80", &["10.0.2.2:8080"]),
            service("dns", Proto::Udp, "10.0.0.100:53", &["10.0.2.3:53"]),
            service("web6", Proto::Tcp, "[fd00::100]:80", &["[fd00:2::2]:8080"]),
        ]);
        let (c, v) = (client("10.0.1.2", 33333), vip("10.0.0.100", 80));
        let syn = packet::syn(c, v);
        let v6syn = packet::syn(client("fd00:1::2", 33333), vip("fd00::100", 80));

        let mut cases: Vec<(&str, Vec<u8>, u32, Option<u32>)> = Vec::new();
        // (BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.)
        cases.push(("truncated IPv4 header", syn[..30].to_vec(), XDP_PASS, None));
        let mut f = syn.clone();
        f[14] = 0x44; // IHL 4: below the minimum
        cases.push(("IPv4 IHL below 5", f, XDP_DROP, Some(stat::DROP_MALFORMED)));
        let mut f = syn.clone();
        f[16..18].copy_from_slice(&2000u16.to_be_bytes());
        cases.push((
            "IPv4 length beyond the frame",
            f,
            XDP_DROP,
            Some(stat::DROP_MALFORMED),
        ));
        let mut f = syn.clone();
        f[20] = 0x20; // more fragments
        cases.push((
            "IPv4 first fragment",
            f,
            XDP_DROP,
            Some(stat::DROP_FRAGMENT),
        ));
        let mut f = syn.clone();
        f[21] = 0x10; // fragment offset
        cases.push((
            "IPv4 later fragment",
            f,
            XDP_DROP,
            Some(stat::DROP_FRAGMENT),
        ));
        let mut f = syn.clone();
        f[14 + 20 + 12] = 0x40; // TCP data offset 4
        cases.push((
            "TCP header shorter than 20 bytes",
            f,
            XDP_DROP,
            Some(stat::DROP_MALFORMED),
        ));
        cases.push((
            "TCP with no flags",
            packet::tcp_frame(c, v, 0, 1, &[]),
            XDP_DROP,
            Some(stat::DROP_MALFORMED),
        ));
        cases.push((
            "TCP SYN+FIN",
            packet::tcp_frame(c, v, TCP_SYN | TCP_FIN, 1, &[]),
            XDP_DROP,
            Some(stat::DROP_MALFORMED),
        ));
        cases.push((
            "TCP with all flags",
            packet::tcp_frame(c, v, 0x3f, 1, &[]),
            XDP_DROP,
            Some(stat::DROP_MALFORMED),
        ));
        cases.push((
            "TCP ACK without a flow",
            packet::tcp_frame(c, v, TCP_ACK, 1, &[]),
            XDP_DROP,
            Some(stat::DROP_NO_FLOW),
        ));
        let mut f = packet::frame(client("10.0.1.2", 5), vip("10.0.0.100", 53), L4::Udp, &[]);
        f[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
        cases.push((
            "UDP length below 8",
            f,
            XDP_DROP,
            Some(stat::DROP_MALFORMED),
        ));
        let mut f = syn.clone();
        f[12..14].copy_from_slice(&[0x81, 0x00]);
        cases.push(("VLAN-tagged frame", f, XDP_PASS, Some(stat::PASSED_VLAN)));
        let mut f = v6syn.clone();
        f[20] = 0; // hop-by-hop options header
        cases.push((
            "IPv6 extension header",
            f,
            XDP_DROP,
            Some(stat::DROP_IPV6_EXT),
        ));
        let mut f = v6syn.clone();
        f[20] = 44;
        cases.push((
            "IPv6 fragment header",
            f,
            XDP_DROP,
            Some(stat::DROP_FRAGMENT),
        ));
        let mut f = packet::syn(c, vip("10.0.0.100", 81));
        f[0] = 2;
        cases.push((
            "VIP, port without a service",
            f,
            XDP_DROP,
            Some(stat::DROP_UNSUPPORTED),
        ));
        let f = packet::syn(c, vip("10.0.0.99", 80));
        cases.push(("not a VIP at all", f, XDP_PASS, Some(stat::PASSED)));

        for (what, frame, want, counter) in cases {
            let before = counter.map(|i| stat_of(&mut fx, i));
            let (a, out) = run(&mut fx, &frame);
            assert_eq!(a, want, "{what}");
            if a == XDP_PASS {
                assert_eq!(out, frame, "{what}: passed frames are untouched");
            }
            if let (Some(i), Some(b)) = (counter, before) {
                assert_eq!(stat_of(&mut fx, i), b + 1, "{what}: counter {i}");
            }
        }
        assert!(events(&mut fx).is_empty(), "no hostile frame opened a flow");

        // IPv4 options are fine: the flow opens and the options survive.
        let mut ip = packet::ip_packet(c.ip, v.ip, 6, &packet::syn(c, v)[34..]);
        ip.splice(20..20, [1u8, 1, 1, 0]); // NOP NOP NOP EOL
        ip[0] = 0x46;
        let len = ip.len() as u16;
        ip[2..4].copy_from_slice(&len.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let c16 = packet::checksum(&ip[..24]);
        ip[10..12].copy_from_slice(&c16.to_be_bytes());
        let f = packet::ethernet(c.mac, v.mac, &ip);
        let (a, out) = run(&mut fx, &f);
        assert_eq!(a, XDP_REDIRECT, "SYN with IPv4 options");
        assert!(packet::checksums_ok(&out), "options kept, checksums right");
        assert_eq!(out[34..38], [1, 1, 1, 0]);

        // A wrong TCP checksum is carried, not repaired: the backend drops it as the client's
        // own stack would.
        let mut f = packet::syn(client("10.0.1.3", 4000), v);
        f[14 + 20 + 16] ^= 0xff;
        let (a, out) = run(&mut fx, &f);
        assert_eq!(a, XDP_REDIRECT);
        assert!(!packet::checksums_ok(&out), "a bad checksum stays bad");
    });
}

/// Random corruptions of valid frames: every outcome is one of the defined actions, a passed
/// frame is untouched, and a forwarded frame is fully rewritten (both addresses belong to one
/// side of the NAT).
#[test]
fn random_malformed_frames_are_forwarded_whole_or_not_at_all() {
    if !root("random_malformed_frames_are_forwarded_whole_or_not_at_all") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = fixture(vec![
            service("web", Proto::Tcp, "10.0.0.100:80", &["10.0.2.2:8080"]),
            service("dns", Proto::Udp, "10.0.0.100:53", &["10.0.2.3:53"]),
            service("web6", Proto::Tcp, "[fd00::100]:80", &["[fd00:2::2]:8080"]),
        ]);
        let seeds = [
            packet::syn(client("10.0.1.2", 1), vip("10.0.0.100", 80)),
            packet::frame(
                client("10.0.1.2", 1),
                vip("10.0.0.100", 53),
                L4::Udp,
                b"hello",
            ),
            packet::syn(client("fd00:1::2", 1), vip("fd00::100", 80)),
            packet::tcp_frame(
                client("10.0.1.2", 1),
                vip("10.0.0.100", 80),
                TCP_ACK,
                1,
                b"data",
            ),
        ];
        let vip_side: [IpAddr; 2] = ["10.0.0.100".parse().unwrap(), "fd00::100".parse().unwrap()];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut outcomes: HashMap<u32, usize> = HashMap::new();
        for i in 0..5000 {
            let mut f = seeds[i % seeds.len()].clone();
            for _ in 0..1 + next() % 4 {
                match next() % 3 {
                    0 => {
                        let at = (next() as usize) % f.len();
                        f[at] ^= 1 << (next() % 8);
                    }
                    1 => {
                        let at = 12 + (next() as usize) % 50;
                        if at < f.len() {
                            f[at] = next() as u8;
                        }
                    }
                    _ => f.truncate(14 + (next() as usize) % (f.len() - 13)),
                }
            }
            let (a, out) = run(&mut fx, &f);
            *outcomes.entry(a).or_default() += 1;
            match a {
                XDP_PASS | XDP_DROP => {
                    if a == XDP_PASS {
                        assert_eq!(out, f, "case {i}: passed frames are untouched");
                    }
                }
                XDP_TX | XDP_REDIRECT => {
                    let p = packet::parse(&out);
                    let to_backend = p.dst_mac == backend_mac(p.dst) && !vip_side.contains(&p.dst);
                    let to_client = vip_side.contains(&p.src) && p.dst_mac == CLIENT_MAC;
                    assert!(
                        to_backend || to_client,
                        "case {i}: half-rewritten frame {p:?}"
                    );
                }
                other => panic!("case {i}: undefined action {other}"),
            }
        }
        eprintln!("outcomes of 5000 corrupted frames: {outcomes:?}");
        assert!(outcomes.len() >= 2, "the corpus exercises several outcomes");
    });
}

#[test]
fn icmp_errors_about_a_flow_are_translated_for_the_client() {
    if !root("icmp_errors_about_a_flow_are_translated_for_the_client") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = fixture(vec![
            service("web", Proto::Tcp, "10.0.0.100:80", &["10.0.2.2:8080"]),
            service("dns6", Proto::Udp, "[fd00::100]:53", &["[fd00:2::3]:5353"]),
        ]);
        for (c, v, l4) in [
            (
                client("10.0.1.2", 33333),
                vip("10.0.0.100", 80),
                L4::Tcp {
                    flags: TCP_SYN,
                    seq: 1,
                },
            ),
            (client("fd00:1::2", 33333), vip("fd00::100", 53), L4::Udp),
        ] {
            let (a, fwd) = run(&mut fx, &packet::frame(c, v, l4, &[0u8; 64]));
            assert_eq!(a, XDP_REDIRECT);
            let p = packet::parse(&fwd);
            // The backend (or a router before it) answers with "too big", quoting our packet.
            let err = packet::icmp_error(
                end(&p.dst.to_string(), 0, fx.mac),
                end(&p.src.to_string(), 0, fx.mac),
                &fwd[14..],
            );
            let before = stat_of(&mut fx, stat::ICMP_TRANSLATED);
            let (a, out) = run(&mut fx, &err);
            assert_eq!(a, XDP_TX, "{}", c.ip);
            assert_eq!(stat_of(&mut fx, stat::ICMP_TRANSLATED), before + 1);
            let o = packet::parse(&out);
            assert_eq!(
                (o.src, o.dst),
                (v.ip, c.ip),
                "the error comes from the VIP to the client"
            );
            assert!(
                packet::checksums_ok(&out),
                "{}: outer, ICMP and quoted checksums",
                c.ip
            );
            // The quoted packet is the client's own.
            let q = packet::parse(&packet::ethernet(LB_MAC, LB_MAC, &out[o.l4 + 8..]));
            assert_eq!(
                (q.src, q.sport, q.dst, q.dport),
                (c.ip, c.port, v.ip, v.port)
            );
        }
        // An ICMP error about nothing we track goes to the host.
        let stray = packet::frame(
            end("10.0.2.1", 1, fx.mac),
            end("10.0.2.2", 2, fx.mac),
            L4::Udp,
            b"x",
        );
        let err = packet::icmp_error(
            end("10.0.2.2", 0, fx.mac),
            end("10.0.2.1", 0, fx.mac),
            &stray[14..],
        );
        assert_eq!(run(&mut fx, &err), (XDP_PASS, err.clone()));
    });
}

/// Weighted Maglev through the program: shares follow weights, removing a backend moves only
/// its flows (plus a small Maglev disruption), and established flows keep their backend.
#[test]
fn maglev_spread_weights_and_minimal_disruption() {
    if !root("maglev_spread_weights_and_minimal_disruption") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut web = service("web", Proto::Tcp, "10.0.0.100:80", &["10.0.2.2:80", "10.0.2.3:80", "10.0.2.4:80"]);
        web.backends[1].weight = 2;
        let mut fx = fixture_sized(vec![web.clone()], 65537);
        let v = vip("10.0.0.100", 80);
        const N: u16 = 8000;
        let clients: Vec<End> =
            (0..N).map(|i| client(&format!("10.{}.{}.{}", 1 + i / 2000, (i / 200) % 10, i % 200 + 1), 1024 + i)).collect();
        let backend_of = |fx: &mut Fixture, c: &End| -> IpAddr {
            let (a, out) = run(fx, &packet::syn(*c, v));
            assert_eq!(a, XDP_REDIRECT, "{c:?}: counters {:?}", fx.dp.stats().unwrap());
            packet::parse(&out).dst
        };
        let first: Vec<IpAddr> = clients.iter().map(|c| backend_of(&mut fx, c)).collect();
        let share = |of: &[IpAddr], ip: &str| of.iter().filter(|b| **b == ip.parse::<IpAddr>().unwrap()).count() as f64 / of.len() as f64;
        let (s2, s3, s4) = (share(&first, "10.0.2.2"), share(&first, "10.0.2.3"), share(&first, "10.0.2.4"));
        eprintln!("weights 1:2:1 → shares {s2:.3} {s3:.3} {s4:.3} over {N} flows");
        assert!((s2 - 0.25).abs() < 0.03 && (s3 - 0.5).abs() < 0.03 && (s4 - 0.25).abs() < 0.03);
        assert_eq!(events(&mut fx).len(), N as usize);

        // Remove 10.0.2.4: new table, generation 2.
        let mut smaller = web.clone();
        smaller.backends.retain(|b| b.addr.ip() != "10.0.2.4".parse::<IpAddr>().unwrap());
        let placed = balancer::place(&settings(vec![smaller], 65537)).unwrap();
        let mut placed = placed;
        placed[0].generation = 2;
        fx.dp.install(&placed).unwrap();

        // Established flows keep their backend, the removed one included (drain semantics).
        for (c, b) in clients.iter().zip(&first).take(500) {
            let (a, out) = run(&mut fx, &packet::tcp_frame(*c, v, TCP_ACK, 2, b"x"));
            assert_eq!(a, XDP_REDIRECT);
            assert_eq!(packet::parse(&out).dst, *b, "established flow moved");
        }
        // Close everything, then reopen the same 5-tuples under the new table.
        for c in &clients {
            run(&mut fx, &packet::tcp_frame(*c, v, TCP_RST, 3, &[]));
        }
        events(&mut fx);
        let second: Vec<IpAddr> = clients.iter().map(|c| backend_of(&mut fx, c)).collect();
        let ev = events(&mut fx);
        assert!(ev.iter().all(|e| e.kind != event_kind::CONN_OPEN || e.generation == 2));
        let removed: IpAddr = "10.0.2.4".parse().unwrap();
        assert!(!second.contains(&removed));
        let moved = first.iter().zip(&second).filter(|(a, b)| a != b).count() as f64 / N as f64;
        let minimum = share(&first, "10.0.2.4");
        let kept_elsewhere = first.iter().zip(&second).filter(|(a, _)| **a != removed).filter(|(a, b)| a == b).count()
            as f64
            / first.iter().filter(|a| **a != removed).count() as f64;
        eprintln!("removing 1 of 3 backends moved {moved:.3} of flows; theoretical minimum {minimum:.3}; {kept_elsewhere:.3} of the others stayed");
        assert!(moved <= minimum + 0.03, "moved {moved} vs minimum {minimum}");
        assert!(kept_elsewhere > 0.96);
    });
}

/// SNAT ports: a small range is used without collision, and a flow that finds it exhausted is
/// refused with a record; a released port is reused.
#[test]
fn snat_ports_never_collide_and_exhaustion_is_refused_with_a_record() {
    if !root("snat_ports_never_collide_and_exhaustion_is_refused_with_a_record") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = web_with_four_snat_ports();
        let v = vip("10.0.0.100", 80);
        let mut ports = Vec::new();
        for i in 0..4u16 {
            let (a, out) = run(&mut fx, &packet::syn(client("10.0.1.2", 1000 + i), v));
            assert_eq!(a, XDP_REDIRECT, "flow {i}");
            ports.push(packet::parse(&out).sport);
        }
        ports.sort();
        assert_eq!(
            ports,
            [50000, 50001, 50002, 50003],
            "four flows, four distinct ports"
        );
        events(&mut fx);
        assert_eq!(
            run(&mut fx, &packet::syn(client("10.0.1.2", 2000), v)).0,
            XDP_DROP
        );
        let ev = events(&mut fx);
        assert_eq!(
            (ev.len(), ev[0].kind, ev[0].reason),
            (1, event_kind::CONN_DENY, deny_reason::SNAT_EXHAUSTED)
        );
        assert_eq!(stat_of(&mut fx, stat::DENY_SNAT_EXHAUSTED), 1);
        // One flow resets; once its entries are gone its port serves a new flow.
        let pair = fx
            .dp
            .flows()
            .unwrap()
            .into_iter()
            .find(|p| u16::from_be(p.key.sport) == 1000)
            .unwrap();
        fx.dp.remove_flow(&pair).unwrap();
        let (a, out) = run(&mut fx, &packet::syn(client("10.0.1.2", 2001), v));
        assert_eq!(a, XDP_REDIRECT);
        assert_eq!(packet::parse(&out).sport, u16::from_be(pair.fwd.nat_sport));
    });
}

/// An insert that finds its bucket's lock taken (another CPU inserting there at that instant)
/// gives up whole: the SYN is dropped and counted, no entry and no record are left, and the
/// client's retransmission opens the flow.
#[test]
fn a_syn_meeting_a_held_bucket_lock_is_dropped_whole_and_its_retransmission_opens() {
    if !root("a_syn_meeting_a_held_bucket_lock_is_dropped_whole_and_its_retransmission_opens") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = web_fixture();
        let (c, v) = (client("10.0.1.2", 40000), vip("10.0.0.100", 80));
        let word = |ip: &str| lb_common::addr::to_words(ip.parse().unwrap()).0[0];
        let key = lb_common::FlowKey4 {
            src: word("10.0.1.2"),
            dst: word("10.0.0.100"),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            ..Default::default()
        };
        assert!(fx.dp.flow_table4().set_insert_lock(&key, true));
        assert_eq!(run(&mut fx, &packet::syn(c, v)).0, XDP_DROP);
        assert_eq!(stat_of(&mut fx, stat::DROP_OPEN_RACE), 1);
        assert!(
            fx.dp.flow_table4().entries().is_empty(),
            "no entry left behind, the reply entry reserved before included"
        );
        assert!(
            events(&mut fx).is_empty(),
            "no record for a flow that did not open"
        );
        assert!(fx.dp.flow_table4().set_insert_lock(&key, false));
        open_tcp(&mut fx, c, v);
        assert_eq!(fx.dp.flows().unwrap().len(), 1);
    });
}

/// A flow whose candidate buckets have no room for its two entries is refused with a record
/// (`conntrack_full`) and leaves nothing behind: no slot (one it claimed before finding none
/// for the other entry included), no SNAT port. Once the flows are gone, the same SYNs have
/// the same outcomes again.
#[test]
fn a_flow_without_room_is_refused_with_a_record_and_takes_no_slot() {
    if !root("a_flow_without_room_is_refused_with_a_record_and_takes_no_slot") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut st = web_settings();
        // Four buckets of 15 slots.
        st.conntrack_size = 16;
        let mut fx = fixture_with(st);
        let v = vip("10.0.0.100", 80);
        // The outcome of each of 300 SYNs: opened or refused. Past the first refusal, a SYN
        // may still find room, or find one free slot where it needs two.
        let fill = |fx: &mut Fixture| -> Vec<bool> {
            (0..300u16)
                .map(|i| {
                    let (a, _) = run(fx, &packet::syn(client("10.0.1.2", 1024 + i), v));
                    assert!(a == XDP_REDIRECT || a == XDP_DROP, "{a}");
                    a == XDP_REDIRECT
                })
                .collect()
        };
        let first = fill(&mut fx);
        let (opened, refused) = (
            first.iter().filter(|o| **o).count(),
            first.iter().filter(|o| !**o).count(),
        );
        assert!(
            opened > 0 && opened <= 30 && refused > 0,
            "{opened} {refused}"
        );
        // One record for the client (deny records are limited per source), every refusal
        // counted.
        let ev = events(&mut fx);
        assert!(ev.iter().any(
            |e| e.kind == event_kind::CONN_DENY && e.reason == deny_reason::CONNTRACK_FULL
        ));
        assert_eq!(stat_of(&mut fx, stat::DENY_CONNTRACK_FULL), refused as u64);
        assert_eq!(fx.dp.flow_table4().entries().len(), 2 * opened);
        for pair in fx.dp.flows().unwrap() {
            fx.dp.remove_flow(&pair).unwrap();
        }
        assert!(fx.dp.flow_table4().entries().is_empty());
        assert_eq!(
            fill(&mut fx),
            first,
            "a refused flow left a slot or a port taken"
        );
    });
}

/// Opens a TCP flow from `c` to `v`; returns the SNAT port it got.
fn open_tcp(fx: &mut Fixture, c: End, v: End) -> u16 {
    let (a, out) = run(fx, &packet::syn(c, v));
    assert_eq!(
        a,
        XDP_REDIRECT,
        "SYN from {c:?}: counters {:?}",
        fx.dp.stats()
    );
    let ev = events(fx);
    assert_eq!(
        (ev.len(), ev[0].kind),
        (1, event_kind::CONN_OPEN),
        "one open record"
    );
    packet::parse(&out).sport
}

/// Closes the flow from `c` to `v` with a FIN each way (the backend at `backend`, the flow on
/// SNAT port `port`), and checks its close record.
fn close_tcp(fx: &mut Fixture, c: End, v: End, backend: End, port: u16) {
    let snat = end("10.0.2.1", port, fx.mac);
    assert_eq!(
        run(
            fx,
            &packet::tcp_frame(backend, snat, TCP_ACK | TCP_FIN, 7000, &[])
        )
        .0,
        XDP_TX
    );
    assert_eq!(
        run(fx, &packet::tcp_frame(c, v, TCP_ACK | TCP_FIN, 1001, &[])).0,
        XDP_REDIRECT
    );
    let ev = events(fx);
    assert_eq!(
        (ev.len(), ev[0].kind, ev[0].reason),
        (1, event_kind::CONN_CLOSE, close_reason::FIN)
    );
}

/// Removes every flow of the client address `ip`, as the daemon does when a closed flow's
/// linger time is over.
fn sweep(fx: &mut Fixture, ip: &str) {
    let ip: IpAddr = ip.parse().unwrap();
    for pair in fx.dp.flows().unwrap() {
        if dataplane::socket_addr(pair.key.src, pair.key.af, 0).ip() == ip {
            fx.dp.remove_flow(&pair).unwrap();
        }
    }
}

/// SNAT ports and the backends' TIME_WAIT: a client's port is kept (folded into the range when
/// outside it); a port whose TCP flow just closed is not handed to another client while other
/// ports are free, but the same client 5-tuple gets it back at once (its next SYN continues the
/// old connection's timestamps, which the backend's TIME_WAIT accepts); the hold is per backend
/// and for TCP only.
#[test]
fn snat_port_follows_the_client_and_is_held_from_other_clients_after_close() {
    if !root("snat_port_follows_the_client_and_is_held_from_other_clients_after_close") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = fixture(vec![
            service("web", Proto::Tcp, "10.0.0.100:80", &["10.0.2.2:8080"]),
            service("web2", Proto::Tcp, "10.0.0.101:80", &["10.0.2.4:8080"]),
            service("dns", Proto::Udp, "10.0.0.100:53", &["10.0.2.3:5353"]),
        ]);
        let (v, v2) = (vip("10.0.0.100", 80), vip("10.0.0.101", 80));
        let backend = end("10.0.2.2", 8080, fx.mac);
        let a = client("10.0.1.2", 45000);
        let b = client("10.0.1.3", 45000);

        // In the range (40000-59999): the client's own port. Outside: folded into it.
        assert_eq!(open_tcp(&mut fx, a, v), 45000);
        let out_of_range = client("10.0.1.2", 33333);
        assert_eq!(
            open_tcp(&mut fx, out_of_range, v),
            SNAT_PORT
                + ((33333 + 2 * SNAT_PORTS as u32 - SNAT_PORT as u32) % SNAT_PORTS as u32) as u16
        );

        // a closes and its entries are swept: another client asking for the same port gets
        // another one, although 45000 is free.
        close_tcp(&mut fx, a, v, backend, 45000);
        sweep(&mut fx, "10.0.1.2");
        assert!(fx.dp.flows().unwrap().is_empty());
        let pb = open_tcp(&mut fx, b, v);
        assert_ne!(pb, 45000, "a just-released port went to another client");
        assert!((SNAT_PORT..SNAT_PORT + SNAT_PORTS).contains(&pb), "{pb}");
        // ... and that client comes back to the port it was given.
        close_tcp(&mut fx, b, v, backend, pb);
        sweep(&mut fx, "10.0.1.3");
        assert_eq!(
            open_tcp(&mut fx, b, v),
            pb,
            "same client 5-tuple, same port"
        );

        // The same client 5-tuple takes its port back at once, swept or still lingering.
        assert_eq!(open_tcp(&mut fx, a, v), 45000);
        close_tcp(&mut fx, a, v, backend, 45000);
        assert_eq!(
            fx.dp.flows().unwrap().len(),
            2,
            "a's closed flow lingers next to b's"
        );
        assert_eq!(open_tcp(&mut fx, a, v), 45000, "SYN on the closed 5-tuple");

        // Held per backend: towards another backend the port is not in TIME_WAIT anywhere.
        close_tcp(&mut fx, a, v, backend, 45000);
        assert_eq!(open_tcp(&mut fx, client("10.0.1.4", 45000), v2), 45000);

        // UDP keeps no TIME_WAIT: a released port serves another client at once.
        let dns = vip("10.0.0.100", 53);
        let udp = |fx: &mut Fixture, c: End| {
            let (act, out) = run(fx, &packet::frame(c, dns, L4::Udp, b"q"));
            assert_eq!(act, XDP_REDIRECT);
            events(fx);
            packet::parse(&out).sport
        };
        assert_eq!(udp(&mut fx, client("10.0.1.5", 45001)), 45001);
        sweep(&mut fx, "10.0.1.5");
        assert_eq!(udp(&mut fx, client("10.0.1.6", 45001)), 45001);
        assert_eq!(stat_of(&mut fx, stat::DENY_SNAT_EXHAUSTED), 0);
    });
}

/// When every candidate port is held, the free one released longest ago is taken: a flow is
/// refused (`snat_exhausted`) only when no port is free at all.
#[test]
fn held_snat_ports_are_reused_least_recently_released_first() {
    if !root("held_snat_ports_are_reused_least_recently_released_first") {
        return;
    }
    let ns = setup_ns();
    ns.enter(|| {
        let mut fx = web_with_four_snat_ports();
        let v = vip("10.0.0.100", 80);
        let backend = end("10.0.2.2", 8080, fx.mac);
        // Client ports 1000-1003 fold onto 50000-50003 (1000 ≡ 50000 mod 4).
        let first: Vec<End> = (0..4).map(|i| client("10.0.1.2", 1000 + i)).collect();
        for (i, c) in first.iter().enumerate() {
            assert_eq!(open_tcp(&mut fx, *c, v), 50000 + i as u16);
        }
        // Released in the order 50002, 50000, 50003, 50001.
        for i in [2usize, 0, 3, 1] {
            close_tcp(&mut fx, first[i], v, backend, 50000 + i as u16);
            std::thread::sleep(Duration::from_millis(25));
        }
        sweep(&mut fx, "10.0.1.2");
        // Another client's flows: every port is held, each takes the oldest release.
        let mut got = Vec::new();
        for i in 0..4 {
            got.push(open_tcp(&mut fx, client("10.0.1.3", 1001 + i), v));
        }
        assert_eq!(got, [50002, 50000, 50003, 50001]);
        // Every port live: refused, with a record.
        assert_eq!(
            run(&mut fx, &packet::syn(client("10.0.1.3", 2000), v)).0,
            XDP_DROP
        );
        let ev = events(&mut fx);
        assert_eq!(
            (ev.len(), ev[0].kind, ev[0].reason),
            (1, event_kind::CONN_DENY, deny_reason::SNAT_EXHAUSTED)
        );
        assert_eq!(stat_of(&mut fx, stat::DENY_SNAT_EXHAUSTED), 1);
    });
}
