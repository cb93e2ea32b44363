//! TCP through the balancer, end to end: a client namespace, `lb-daemon` with its XDP program on
//! the balancer namespace's three veths, two backend namespaces running echo servers. Fifty
//! connections of different random sizes must each be echoed exactly, both backends must
//! serve, and the decoded audit log must hold one `conn_open` and one `conn_close` per
//! connection whose byte counts equal what the client sent and received.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use lb_tests::{
    EchoServer, TempDir, Topology,
    audit::of_kind,
    echo::random_payload,
    echo_exchange, in_netns, read_audit, require_root,
    topology::layout::{BACKEND1, BACKEND2, CLIENT},
};
use rand::Rng as _;
use serde_json::Value;

const CONNECTIONS: usize = 50;
const MAX_BYTES: usize = 200_000;

#[test]
fn fifty_tcp_connections_are_echoed_and_audited() {
    if !require_root("fifty_tcp_connections_are_echoed_and_audited") {
        return;
    }
    let topo = Topology::balancer("tcp").unwrap();
    let [b1, b2] = Topology::backends();
    let s1 = EchoServer::start(topo.ns(BACKEND1).name(), b1).unwrap();
    let s2 = EchoServer::start(topo.ns(BACKEND2).name(), b2).unwrap();
    let log = TempDir::new("tcp-audit").unwrap();
    let mut daemon = topo
        .spawn_daemon(&Topology::daemon_args(log.path()))
        .unwrap();
    daemon.wait_ready(Duration::from_secs(20)).unwrap();

    // Fifty different sizes, one connection each, from the client namespace to the VIP.
    let mut sizes = BTreeSet::new();
    let mut rng = rand::rng();
    while sizes.len() < CONNECTIONS {
        sizes.insert(rng.random_range(1..=MAX_BYTES));
    }
    let vip = Topology::vip();
    let exchanges = in_netns(topo.ns(CLIENT).name(), || {
        sizes
            .iter()
            .map(|&n| {
                let payload = random_payload(n);
                let x = echo_exchange(vip, &payload, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("connection sending {n} bytes: {e:#}"));
                assert!(
                    x.received == payload,
                    "echo of {n} bytes on {} is not exact: {} bytes back",
                    x.local,
                    x.received.len()
                );
                x
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(exchanges.len(), CONNECTIONS);

    // Both backends served, every connection exactly once, behind the balancer's SNAT.
    let (served1, served2) = (s1.stop(), s2.stop());
    assert!(
        !served1.is_empty() && !served2.is_empty(),
        "both backends must serve: backend1 {}, backend2 {}",
        served1.len(),
        served2.len()
    );
    assert_eq!(served1.len() + served2.len(), CONNECTIONS);
    assert!(
        served1
            .iter()
            .all(|s| s.peer.ip().to_string() == "10.0.2.1"),
        "backend1 sees the SNAT address"
    );
    assert!(
        served2
            .iter()
            .all(|s| s.peer.ip().to_string() == "10.0.3.1"),
        "backend2 sees the SNAT address"
    );

    // Give the daemon a bounded moment to take the last close records from the ring buffer.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match read_audit(log.path()) {
            Ok(r) if of_kind(&r, "conn_close").len() >= CONNECTIONS => break,
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let status = daemon.stop(Duration::from_secs(15)).unwrap();
    assert!(
        status.success(),
        "lb-daemon exited with {status}; stderr:\n{}",
        daemon.stderr()
    );

    let records = read_audit(log.path()).unwrap();
    let dump = || {
        records
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };

    // The envelope: gapless sequence from 1, start first, stop last.
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            r["seq"].as_u64(),
            Some(i as u64 + 1),
            "seq of record {i}: {r}"
        );
        assert!(
            r["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "time of {r}"
        );
    }
    assert_eq!(
        records.first().map(|r| &r["kind"]),
        Some(&Value::from("daemon_start")),
        "log:\n{}",
        dump()
    );
    // The run ends with daemon_stop, then the checkpoint that covers it.
    let kinds: Vec<&Value> = records.iter().rev().take(2).map(|r| &r["kind"]).collect();
    assert_eq!(
        kinds,
        [&Value::from("checkpoint"), &Value::from("daemon_stop")],
        "log:\n{}",
        dump()
    );

    let opens = of_kind(&records, "conn_open");
    let closes = of_kind(&records, "conn_close");
    assert_eq!(
        opens.len(),
        CONNECTIONS,
        "conn_open records; log:\n{}",
        dump()
    );
    assert_eq!(
        closes.len(),
        CONNECTIONS,
        "conn_close records; log:\n{}",
        dump()
    );

    let backends = [b1.to_string(), b2.to_string()];
    let mut open_by_flow = BTreeMap::new();
    let mut open_by_client = BTreeMap::new();
    for o in &opens {
        assert_eq!(o["proto"], "tcp", "{o}");
        assert_eq!(o["service"], "web", "{o}");
        assert_eq!(o["vip"], vip.to_string(), "{o}");
        assert!(
            backends.iter().any(|b| o["backend"] == b.as_str()),
            "backend of {o}"
        );
        assert!(
            o["snat"]
                .as_str()
                .is_some_and(|s| s.starts_with("10.0.2.1:") || s.starts_with("10.0.3.1:")),
            "snat of {o}"
        );
        assert!(
            o["reason"].as_str().is_some_and(|s| !s.is_empty()),
            "reason of {o}"
        );
        let flow = o["flow_id"].clone();
        assert!(
            open_by_flow.insert(flow.to_string(), *o).is_none(),
            "flow_id opened twice: {o}"
        );
        let client = o["client"].as_str().expect("client is a string").to_owned();
        assert!(
            open_by_client.insert(client, *o).is_none(),
            "client address opened twice: {o}"
        );
    }

    let close_by_client: BTreeMap<String, &Value> = closes
        .iter()
        .map(|c| {
            (
                c["client"].as_str().expect("client is a string").to_owned(),
                *c,
            )
        })
        .collect();
    assert_eq!(
        close_by_client.len(),
        CONNECTIONS,
        "client addresses of conn_close are unique"
    );
    for x in &exchanges {
        let client = x.local.to_string();
        let o = open_by_client
            .get(&client)
            .unwrap_or_else(|| panic!("no conn_open for client {client}; log:\n{}", dump()));
        let c = close_by_client
            .get(&client)
            .unwrap_or_else(|| panic!("no conn_close for client {client}; log:\n{}", dump()));
        assert_eq!(c["flow_id"], o["flow_id"], "close and open of {client}");
        assert!(open_by_flow.contains_key(&c["flow_id"].to_string()));
        for field in ["proto", "vip", "service", "backend"] {
            assert_eq!(c[field], o[field], "{field} of {client}'s close vs open");
        }
        assert_eq!(c["close_reason"], "fin", "{c}");
        assert_eq!(
            c["bytes_to_backend"].as_u64(),
            Some(x.sent as u64),
            "bytes_to_backend of {client}: {c}"
        );
        assert_eq!(
            c["bytes_to_client"].as_u64(),
            Some(x.received.len() as u64),
            "bytes_to_client of {client}: {c}"
        );
        assert!(
            c["packets_to_backend"].as_u64().is_some_and(|p| p >= 2),
            "packets_to_backend of {c}"
        );
        assert!(
            c["packets_to_client"].as_u64().is_some_and(|p| p >= 2),
            "packets_to_client of {c}"
        );
        assert!(
            c["duration_ns"].as_u64().is_some_and(|d| d > 0),
            "duration_ns of {c}"
        );
    }
}
