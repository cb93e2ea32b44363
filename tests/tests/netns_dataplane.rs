//! The data plane with real sockets across network namespaces: UDP and IPv6 services, access
//! rules and the rate limit, and the Maglev spread over weighted backends, each checked against
//! the decoded audit log.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lb_tests::{
    EchoServer, TempDir, Topology,
    audit::{of_kind, refusals},
    echo_exchange, read_audit, require_root, spawn_in_netns,
    topology::layout::*,
};
use serde_json::Value;

/// Adds IPv6 to the standard layout: client fd00:1::2, lb fd00:1::1 / fd00:2::1 / fd00:3::1,
/// backends fd00:2::2 and fd00:3::2; the IPv6 VIP fd00::100 routes via the balancer.
fn add_ipv6(t: &Topology) {
    for (role, iface, cidr) in [
        (CLIENT, "eth0", "fd00:1::2/64"),
        (LB, "c0", "fd00:1::1/64"),
        (LB, "b1", "fd00:2::1/64"),
        (LB, "b2", "fd00:3::1/64"),
        (BACKEND1, "eth0", "fd00:2::2/64"),
        (BACKEND2, "eth0", "fd00:3::2/64"),
    ] {
        t.ns(role)
            .run(&format!("ip addr add {cidr} dev {iface} nodad"));
    }
    t.route(CLIENT, "fd00::100/128 via fd00:1::1").unwrap();
    t.route(BACKEND1, "default via fd00:2::1").unwrap();
    t.route(BACKEND2, "default via fd00:3::1").unwrap();
    t.sysctl(LB, "net.ipv6.conf.all.forwarding", "1").unwrap();
}

/// A UDP echo server in a namespace; stops when dropped.
struct UdpEcho {
    stop: Arc<AtomicBool>,
    served: Arc<std::sync::Mutex<usize>>,
}

impl UdpEcho {
    fn start(ns: &str, addr: SocketAddr) -> UdpEcho {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(std::sync::Mutex::new(0));
        let (stop2, served2) = (stop.clone(), served.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        spawn_in_netns(ns, move || {
            let sock = UdpSocket::bind(addr)?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let _ = tx.send(());
            let mut buf = [0u8; 65536];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    sock.send_to(&buf[..n], peer)?;
                    *served2.lock().unwrap() += 1;
                }
            }
            Ok(())
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("UDP echo server did not start");
        UdpEcho { stop, served }
    }

    fn served(&self) -> usize {
        *self.served.lock().unwrap()
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One datagram to `target` and its echo, from a fresh socket. The socket is returned open:
/// the caller keeps it while it makes other exchanges, so that no two of them share a source
/// port (the kernel may hand a closed socket's port out again), and thus each is a flow.
fn udp_exchange(target: SocketAddr, payload: &[u8]) -> std::io::Result<(UdpSocket, Vec<u8>)> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    sock.send_to(payload, target)?;
    let mut buf = [0u8; 65536];
    let (n, _) = sock.recv_from(&mut buf)?;
    Ok((sock, buf[..n].to_vec()))
}

fn str_of<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn udp_ipv6_acl_and_rate_limit_with_real_sockets() {
    if !require_root("udp_ipv6_acl_and_rate_limit_with_real_sockets") {
        return;
    }
    let t = Topology::balancer("dp").expect("topology");
    add_ipv6(&t);
    let dir = TempDir::new("dp").unwrap();
    let (b1, b2) = (
        t.ns(BACKEND1).name().to_string(),
        t.ns(BACKEND2).name().to_string(),
    );
    let _tcp = [
        EchoServer::start(&b1, "10.0.2.2:8080".parse().unwrap()).unwrap(),
        EchoServer::start(&b2, "10.0.3.2:8080".parse().unwrap()).unwrap(),
        EchoServer::start(&b1, "[fd00:2::2]:8080".parse().unwrap()).unwrap(),
        EchoServer::start(&b2, "[fd00:3::2]:8080".parse().unwrap()).unwrap(),
    ];
    let udp = [
        UdpEcho::start(&b1, "10.0.2.2:5353".parse().unwrap()),
        UdpEcho::start(&b2, "10.0.3.2:5353".parse().unwrap()),
        UdpEcho::start(&b1, "[fd00:2::2]:5353".parse().unwrap()),
        UdpEcho::start(&b2, "[fd00:3::2]:5353".parse().unwrap()),
    ];
    let mut args: Vec<String> = Vec::new();
    for iface in LB_IFACES {
        args.extend(["--iface".into(), iface.into()]);
    }
    for a in [
        "--service=web6=tcp:[fd00::100]:80",
        "--backend=web6=[fd00:2::2]:8080",
        "--backend=web6=[fd00:3::2]:8080",
        "--service=dns=udp:10.0.0.100:53",
        "--backend=dns=10.0.2.2:5353",
        "--backend=dns=10.0.3.2:5353",
        "--service=dns6=udp:[fd00::100]:53",
        "--backend=dns6=[fd00:2::2]:5353",
        "--backend=dns6=[fd00:3::2]:5353",
        "--service=adm=tcp:10.0.0.100:22",
        "--backend=adm=10.0.2.2:8080",
        "--allow=adm=10.9.0.0/16",
        "--service=lim=tcp:10.0.0.100:443",
        "--backend=lim=10.0.2.2:8080",
        "--rate-limit=lim=5/s",
        "--udp-idle-timeout=2s",
    ] {
        args.push(a.into());
    }
    args.extend(["--audit-dir".into(), dir.path().display().to_string()]);
    let mut daemon = t.spawn_daemon(&args).expect("daemon");
    daemon
        .wait_ready(Duration::from_secs(20))
        .expect("daemon ready");

    let client = t.ns(CLIENT);
    let (tcp6_ok, udp4_ok, udp6_ok, adm_refused, lim_ok) = client.enter(|| {
        let mut tcp6_ok = 0;
        for i in 0..10 {
            let payload = vec![i as u8; 1000 + i * 100];
            let ex = echo_exchange(
                "[fd00::100]:80".parse().unwrap(),
                &payload,
                Duration::from_secs(5),
            )
            .unwrap();
            tcp6_ok += (ex.received == payload) as usize;
        }
        let mut udp4_ok = 0;
        let mut udp6_ok = 0;
        let mut open_sockets = Vec::new();
        for i in 0..10u8 {
            let payload = vec![i; 200];
            for (vip, ok) in [
                ("10.0.0.100:53", &mut udp4_ok),
                ("[fd00::100]:53", &mut udp6_ok),
            ] {
                if let Ok((sock, echo)) = udp_exchange(vip.parse().unwrap(), &payload) {
                    *ok += (echo == payload) as usize;
                    open_sockets.push(sock);
                }
            }
        }
        drop(open_sockets);
        let adm_refused = TcpStream::connect_timeout(
            &"10.0.0.100:22".parse().unwrap(),
            Duration::from_millis(500),
        )
        .is_err();
        // 15 connection attempts at once against 5/s: about 5 get through (a refused SYN is
        // dropped; each attempt gives up before the client would retransmit it).
        let lim_ok = std::thread::scope(|s| {
            let attempts: Vec<_> = (0..15)
                .map(|_| {
                    s.spawn(|| {
                        let vip = "10.0.0.100:443".parse().unwrap();
                        TcpStream::connect_timeout(&vip, Duration::from_millis(800)).is_ok()
                    })
                })
                .collect();
            attempts
                .into_iter()
                .map(|a| a.join())
                .filter(|r| matches!(r, Ok(true)))
                .count()
        });
        (tcp6_ok, udp4_ok, udp6_ok, adm_refused, lim_ok)
    });
    assert_eq!(tcp6_ok, 10, "TCP over IPv6 echoes");
    assert_eq!(udp4_ok, 10, "UDP over IPv4 echoes");
    assert_eq!(udp6_ok, 10, "UDP over IPv6 echoes");
    assert!(udp[0].served() + udp[1].served() == 10 && udp[2].served() + udp[3].served() == 10);
    assert!(adm_refused, "a client outside the allow list is refused");
    assert!(
        (4..=7).contains(&lim_ok),
        "rate limit 5/s admitted {lim_ok} of 15"
    );

    // UDP flows end by idle timeout.
    std::thread::sleep(Duration::from_secs(5));
    daemon.stop(Duration::from_secs(10)).expect("daemon stop");
    let log = read_audit(dir.path()).expect("audit log");

    let opens = of_kind(&log, "conn_open");
    let closes = of_kind(&log, "conn_close");
    let by_service =
        |kind: &[&Value], svc: &str| kind.iter().filter(|r| str_of(r, "service") == svc).count();
    let clients = |svc: &str| -> Vec<&str> {
        opens
            .iter()
            .filter(|r| str_of(r, "service") == svc)
            .map(|r| str_of(r, "client"))
            .collect()
    };
    for svc in ["web6", "dns", "dns6"] {
        assert_eq!(by_service(&opens, svc), 10, "{svc}: {:?}", clients(svc));
    }
    assert_eq!(by_service(&opens, "lim"), lim_ok);
    for r in opens.iter().filter(|r| str_of(r, "service") == "dns6") {
        assert_eq!(str_of(r, "proto"), "udp");
        assert!(str_of(r, "client").starts_with("[fd00:1::2]:"), "{r}");
        assert_eq!(str_of(r, "vip"), "[fd00::100]:53");
    }
    let udp_closes: Vec<_> = closes
        .iter()
        .filter(|r| str_of(r, "proto") == "udp")
        .collect();
    assert_eq!(udp_closes.len(), 20);
    for r in &udp_closes {
        assert_eq!(str_of(r, "close_reason"), "idle_timeout", "{r}");
        assert_eq!(
            (
                r["bytes_to_backend"].as_u64(),
                r["bytes_to_client"].as_u64()
            ),
            (Some(200), Some(200)),
            "{r}"
        );
    }
    // Every open has exactly one close.
    let mut ids: HashMap<u64, (usize, usize)> = HashMap::new();
    for r in &opens {
        ids.entry(r["flow_id"].as_u64().unwrap()).or_default().0 += 1;
    }
    for r in &closes {
        ids.entry(r["flow_id"].as_u64().unwrap()).or_default().1 += 1;
    }
    assert!(
        ids.values().all(|c| *c == (1, 1)),
        "open/close pairs: {ids:?}"
    );

    let denies = of_kind(&log, "conn_deny");
    let acl: Vec<_> = denies
        .iter()
        .filter(|r| str_of(r, "service") == "adm")
        .collect();
    assert!(!acl.is_empty(), "a conn_deny for the ACL refusal");
    assert_eq!(str_of(acl[0], "reason"), "acl");
    assert_eq!(str_of(acl[0], "rule"), "default deny");
    assert!(str_of(acl[0], "client").starts_with("10.0.1.2:"));
    let rate: Vec<_> = denies
        .iter()
        .filter(|r| str_of(r, "service") == "lim")
        .collect();
    assert!(!rate.is_empty() && rate.iter().all(|r| str_of(r, "reason") == "rate_limited"));
    // Every refusal is in the log: each record stands for itself and the refusals it says
    // were suppressed, including those after a source's last record, which the daemon writes
    // (client port 0) once that record is a second old, or at the stop. Each refused attempt
    // sent one SYN (it gave up before the first retransmission).
    let total = |records: &[&&Value]| -> u64 { records.iter().map(|r| refusals(r).unwrap()).sum() };
    assert_eq!(total(&acl), 1, "{acl:?}");
    assert_eq!(total(&rate), 15 - lim_ok as u64, "{rate:?}");
}

#[test]
fn maglev_spreads_real_connections_by_weight() {
    if !require_root("maglev_spreads_real_connections_by_weight") {
        return;
    }
    let t = Topology::balancer("spread").expect("topology");
    let dir = TempDir::new("spread").unwrap();
    let [a1, a2] = Topology::backends();
    let s1 = EchoServer::start(t.ns(BACKEND1).name(), a1).unwrap();
    let s2 = EchoServer::start(t.ns(BACKEND2).name(), a2).unwrap();
    let mut daemon = t
        .spawn_daemon(&Topology::daemon_args(dir.path()))
        .expect("daemon");
    daemon
        .wait_ready(Duration::from_secs(20))
        .expect("daemon ready");
    const N: usize = 600;
    let ok = t.ns(CLIENT).enter(|| {
        (0..N)
            .filter(|i| {
                let payload = vec![*i as u8; 16];
                match echo_exchange(Topology::vip(), &payload, Duration::from_secs(5)) {
                    Ok(e) => e.received == payload,
                    Err(e) => {
                        eprintln!("connection {i}: {e:#}");
                        false
                    }
                }
            })
            .count()
    });
    assert_eq!(ok, N);
    daemon.stop(Duration::from_secs(10)).unwrap();
    let (n1, n2) = (s1.stop().len(), s2.stop().len());
    let share2 = n2 as f64 / (n1 + n2) as f64;
    eprintln!("weights 1:2 over {N} connections: {n1} / {n2} (share {share2:.3}, ideal 0.667)");
    assert!((share2 - 2.0 / 3.0).abs() < 0.07, "backend2 share {share2}");
    // The log agrees with the servers.
    let log = read_audit(dir.path()).unwrap();
    let opens = of_kind(&log, "conn_open");
    let to2 = opens
        .iter()
        .filter(|r| str_of(r, "backend") == a2.to_string())
        .count();
    assert_eq!((opens.len(), to2), (N, n2));
    assert!(
        opens
            .iter()
            .all(|r| str_of(r, "reason") == "maglev" && r["generation"].as_u64() == Some(1))
    );
}

/// A full conntrack table: the daemon evicts the least recently active flows above 95% of
/// `--conntrack-size`, and each evicted flow still gets its one `conn_close` (`evicted`).
#[test]
fn a_full_table_evicts_with_a_record_for_every_flow() {
    if !require_root("a_full_table_evicts_with_a_record_for_every_flow") {
        return;
    }
    let t = Topology::balancer("evict").expect("topology");
    let dir = TempDir::new("evict").unwrap();
    let _echo = UdpEcho::start(t.ns(BACKEND1).name(), "10.0.2.2:5353".parse().unwrap());
    let mut args: Vec<String> = Vec::new();
    for iface in LB_IFACES {
        args.extend(["--iface".into(), iface.into()]);
    }
    for a in [
        "--service=dns=udp:10.0.0.100:53",
        "--backend=dns=10.0.2.2:5353",
        "--conntrack-size=1024",
    ] {
        args.push(a.into());
    }
    args.extend(["--audit-dir".into(), dir.path().display().to_string()]);
    let mut daemon = t.spawn_daemon(&args).expect("daemon");
    daemon
        .wait_ready(Duration::from_secs(20))
        .expect("daemon ready");
    const N: usize = 1010;
    // Each flow from its own client port (distinct 5-tuples): above the 95% high-water mark
    // (972), below the table size (1024), so none is refused before the sweep evicts.
    let ports = t.ns(CLIENT).enter(|| {
        for i in 0..N {
            let sock = UdpSocket::bind(("0.0.0.0", 20000 + i as u16)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let payload = (i as u32).to_be_bytes();
            sock.send_to(&payload, "10.0.0.100:53").unwrap();
            let mut buf = [0u8; 16];
            let (n, _) = sock.recv_from(&mut buf).expect("echo");
            assert_eq!(&buf[..n], &payload);
        }
        N
    });
    // Two sweeps (every 2 s) bring the table back under its high-water mark.
    std::thread::sleep(Duration::from_secs(5));
    daemon.stop(Duration::from_secs(10)).expect("daemon stop");
    let log = read_audit(dir.path()).expect("audit log");
    let (opens, closes) = (of_kind(&log, "conn_open"), of_kind(&log, "conn_close"));
    assert_eq!(
        (opens.len(), closes.len()),
        (ports, ports),
        "every flow opened and closed once"
    );
    let evicted = closes
        .iter()
        .filter(|r| str_of(r, "close_reason") == "evicted")
        .count();
    let shutdown = closes
        .iter()
        .filter(|r| str_of(r, "close_reason") == "shutdown")
        .count();
    eprintln!(
        "{ports} UDP flows into a 1024-flow table: {evicted} evicted, {shutdown} closed at shutdown"
    );
    assert!(evicted >= ports - 1024 * 95 / 100, "evicted {evicted}");
    assert!(
        shutdown <= 1024 * 95 / 100,
        "left {shutdown} flows above the high-water mark"
    );
    // The least recently active went first: flows from the older half (activity times have
    // the coarse clock's resolution, and two sweeps may each have evicted).
    let first_ports: Vec<&str> = opens
        .iter()
        .take(opens.len() / 2)
        .map(|r| str_of(r, "client"))
        .collect();
    let evicted_clients: Vec<&str> = closes
        .iter()
        .filter(|r| str_of(r, "close_reason") == "evicted")
        .map(|r| str_of(r, "client"))
        .collect();
    assert!(
        evicted_clients.iter().all(|c| first_ports.contains(c)),
        "eviction took the oldest flows"
    );
}
