//! Packet tests: the XDP program run with BPF_PROG_TEST_RUN on crafted TCP/IPv4 frames, inside
//! a network namespace of the test's own whose FIB knows the backend's next hop.

use std::{net::Ipv4Addr, time::Duration};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{ConnEvent, event_kind, close_reason};
use lb_daemon::{
    audit::Proto,
    balancer,
    config::{BackendSpec, ServiceSpec, Settings},
    dataplane::{self, Dataplane},
};
use lb_tests::packet::{self, End, TCP_ACK, TCP_FIN, TCP_PSH, TCP_SYN};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];
const SNAT_PORT: u16 = 40000;

/// The data plane loaded in `ns` with one service, web = 10.0.0.100:80 → 10.0.2.2:8080.
struct Fixture {
    dp: Dataplane,
    events: aya::maps::RingBuf<aya::maps::MapData>,
    dummy_mac: [u8; 6],
    dummy_ifindex: u32,
}

fn client() -> End {
    End { mac: [0x02, 0, 0, 0, 0x01, 0x02], ip: Ipv4Addr::new(10, 0, 1, 2), port: 33333 }
}
fn vip() -> End {
    End { mac: [0x02, 0, 0, 0, 0x01, 0x01], ip: Ipv4Addr::new(10, 0, 0, 100), port: 80 }
}

fn fixture() -> Fixture {
    let settings = Settings {
        ifaces: vec![],
        services: vec![ServiceSpec {
            name: "web".into(),
            proto: Proto::Tcp,
            vip: "10.0.0.100:80".parse().unwrap(),
            backends: vec![BackendSpec { addr: "10.0.2.2:8080".parse().unwrap(), weight: 1 }],
        }],
        snat_ip: Some("10.0.2.1".parse().unwrap()),
        snat_ports: (SNAT_PORT, SNAT_PORT),
        audit_dir: "/nonexistent".into(),
        tcp_idle_timeout: Duration::from_secs(300),
        closed_linger: Duration::from_secs(10),
    };
    let services = balancer::place(&settings, lb_common::MAGLEV_TABLE_SIZE).unwrap();
    let mut dp = Dataplane::load().unwrap();
    dp.configure(settings.snat_ports, 1 << 24).unwrap();
    dp.install(&services).unwrap();
    let events = dp.take_events().unwrap();
    let dummy_mac = mac_of("d0");
    let dummy_ifindex = std::fs::read_to_string("/sys/class/net/d0/ifindex").unwrap().trim().parse().unwrap();
    Fixture { dp, events, dummy_mac, dummy_ifindex }
}

fn mac_of(iface: &str) -> [u8; 6] {
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).unwrap();
    let bytes: Vec<u8> = text.trim().split(':').map(|h| u8::from_str_radix(h, 16).unwrap()).collect();
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

#[test]
fn syn_to_vip_is_rewritten_and_tracked_through_close() {
    if !lb_tests::require_root("syn_to_vip_is_rewritten_and_tracked_through_close") {
        return;
    }
    let ns = lb_tests::Netns::new("pkt");
    ns.run(
        "ip link add d0 type dummy && ip addr add 10.0.2.1/24 dev d0 && ip link set d0 up && \
         ip neigh add 10.0.2.2 lladdr 02:00:00:00:02:02 dev d0 nud permanent",
    );
    ns.enter(|| {
        let mut fx = fixture();
        let backend = End { mac: fx.dummy_mac, ip: Ipv4Addr::new(10, 0, 2, 2), port: 8080 };
        let snat = End { mac: fx.dummy_mac, ip: Ipv4Addr::new(10, 0, 2, 1), port: SNAT_PORT };

        // SYN: full NAT towards the backend, next hop from the FIB.
        let syn = packet::tcp_frame(client(), vip(), TCP_SYN, 1000, &[]);
        let (action, out) = run(&mut fx, &syn);
        assert_eq!(action, XDP_REDIRECT);
        let p = packet::parse(&out);
        assert_eq!((p.src, p.sport), (snat.ip, SNAT_PORT));
        assert_eq!((p.dst, p.dport), (backend.ip, 8080));
        assert_eq!(p.dst_mac, BACKEND_MAC);
        assert_eq!(p.src_mac, fx.dummy_mac);
        assert!(packet::ipv4_checksum_ok(&out), "IPv4 checksum");
        assert!(packet::tcp_checksum_ok(&out), "TCP checksum");
        let ev = events(&mut fx);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, event_kind::CONN_OPEN);
        assert_eq!(dataplane::socket_addr(ev[0].client, ev[0].af, ev[0].client_port).to_string(), "10.0.1.2:33333");
        assert_eq!(dataplane::socket_addr(ev[0].backend, ev[0].af, ev[0].backend_port).to_string(), "10.0.2.2:8080");
        assert_eq!(dataplane::socket_addr(ev[0].snat, ev[0].af, ev[0].snat_port).to_string(), "10.0.2.1:40000");
        let flow_id = ev[0].flow_id;
        let _ = fx.dummy_ifindex;

        // SYN-ACK from the backend: reverse NAT, back where the SYN came from.
        let synack = packet::tcp_frame(backend, snat, TCP_SYN | TCP_ACK, 5000, &[]);
        let (action, out) = run(&mut fx, &synack);
        assert_eq!(action, XDP_TX, "test-run frames arrive on lo, so the reply leaves on lo");
        let p = packet::parse(&out);
        assert_eq!((p.src, p.sport, p.dst, p.dport), (vip().ip, 80, client().ip, 33333));
        assert_eq!((p.dst_mac, p.src_mac), (client().mac, vip().mac));
        assert!(packet::ipv4_checksum_ok(&out) && packet::tcp_checksum_ok(&out));

        // Data both ways, then FIN from each side: one close record with exact counts.
        let (a, _) = run(&mut fx, &packet::tcp_frame(client(), vip(), TCP_ACK | TCP_PSH, 1001, &[7u8; 100]));
        assert_eq!(a, XDP_REDIRECT);
        let (a, out) = run(&mut fx, &packet::tcp_frame(backend, snat, TCP_ACK | TCP_PSH, 5001, &[9u8; 333]));
        assert_eq!(a, XDP_TX);
        assert!(packet::tcp_checksum_ok(&out), "payload-carrying reply checksum");
        run(&mut fx, &packet::tcp_frame(client(), vip(), TCP_ACK | TCP_FIN, 1101, &[]));
        assert!(events(&mut fx).is_empty(), "half-closed flow is still open");
        run(&mut fx, &packet::tcp_frame(backend, snat, TCP_ACK | TCP_FIN, 5334, &[]));
        let ev = events(&mut fx);
        assert_eq!(ev.len(), 1);
        let c = ev[0];
        assert_eq!((c.kind, c.reason, c.flow_id), (event_kind::CONN_CLOSE, close_reason::FIN, flow_id));
        assert_eq!((c.bytes_to_backend, c.bytes_to_client), (100, 333));
        assert_eq!((c.packets_to_backend, c.packets_to_client), (3, 3));

        // The last ACK of the closed flow still reaches the backend; no second close.
        let (a, _) = run(&mut fx, &packet::tcp_frame(client(), vip(), TCP_ACK, 1102, &[]));
        assert_eq!(a, XDP_REDIRECT);
        assert!(events(&mut fx).is_empty());
    });
}

#[test]
fn traffic_not_for_a_service_passes_untouched() {
    if !lb_tests::require_root("traffic_not_for_a_service_passes_untouched") {
        return;
    }
    let ns = lb_tests::Netns::new("pkt");
    ns.run("ip link add d0 type dummy && ip addr add 10.0.2.1/24 dev d0 && ip link set d0 up");
    ns.enter(|| {
        let mut fx = fixture();
        let other = End { port: 22, ..vip() };
        let ssh = packet::tcp_frame(client(), End { ip: Ipv4Addr::new(10, 0, 0, 99), ..other }, TCP_SYN, 1, &[]);
        let (a, out) = run(&mut fx, &ssh);
        assert_eq!((a, out), (XDP_PASS, ssh));
        // Same VIP, another port.
        let f = packet::tcp_frame(client(), other, TCP_SYN, 1, &[]);
        assert_eq!(run(&mut fx, &f), (XDP_PASS, f.clone()));
        // An ARP request.
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&client().mac);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&[0u8; 20]);
        assert_eq!(run(&mut fx, &arp), (XDP_PASS, arp.clone()));
        // A non-SYN packet for a flow the balancer does not know is dropped, not forwarded.
        let stray = packet::tcp_frame(client(), vip(), TCP_ACK, 1, &[1, 2, 3]);
        assert_eq!(run(&mut fx, &stray).0, XDP_DROP);
        assert!(events(&mut fx).is_empty());
    });
}
