//! Restarting the daemon drops no flow: with `--on-stop keep` the XDP program keeps
//! forwarding on its pinned maps while no daemon runs, and the next daemon adopts them. An
//! established TCP connection exchanges data before, during and after the gap; a connection
//! opened and closed during the gap is recorded by the next daemon from the ring buffer; the
//! adopted connection's `conn_close` carries the bytes of all three phases, although the next
//! daemon takes SNAT ports from another range. `--reset-state` starts clean.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    process::Command,
    time::Duration,
};

use lb_tests::{
    TempDir, Topology, audit::of_kind, echo_exchange, read_audit, require_root,
    topology::layout::CLIENT_IP,
};

/// Sends `chunk` on the connection and reads the same bytes back.
fn round_trip(s: &mut TcpStream, chunk: &[u8]) {
    s.write_all(chunk).expect("sending");
    let mut back = vec![0u8; chunk.len()];
    s.read_exact(&mut back).expect("reading the echo");
    assert_eq!(back, chunk);
}

#[test]
fn established_flows_survive_a_daemon_restart() {
    if !require_root("established_flows_survive_a_daemon_restart") {
        return;
    }
    let t = Topology::balancer("restart").expect("topology");
    let dir = TempDir::new("restart").unwrap();
    let _servers = t.echo_backends().unwrap();
    let audit = dir.path().join("audit");
    let socket = dir.path().join("control.sock");
    let bpf = lb_tests::netns::bpf_dir(t.ns("lb").name()).unwrap();
    let args = |on_stop: &str, extra: &[&str]| {
        let mut a = Topology::daemon_args(&audit);
        a.push(format!("--control-socket={}", socket.display()));
        a.push(format!("--bpf-dir={}", bpf.display()));
        a.push(format!("--on-stop={on_stop}"));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // The daemons take their SNAT ports from two different ranges: the adopted connection's
    // replies must still find it by its port from the first.
    let mut first = t
        .spawn_daemon(&args("keep", &["--snat-ports=20000-20999"]))
        .expect("daemon");
    first.wait_ready(Duration::from_secs(20)).expect("ready");
    let mut long = t.ns("client").enter(|| {
        TcpStream::connect_timeout(&Topology::vip(), Duration::from_secs(3)).expect("connect")
    });
    long.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let client_port = long.local_addr().unwrap().port();
    round_trip(&mut long, &[1u8; 1000]);
    let status = first.stop(Duration::from_secs(10)).expect("stop");
    assert!(status.success(), "{status}");

    // No daemon runs: the kernel still forwards the established flow, and new ones.
    round_trip(&mut long, &[2u8; 2000]);
    let gap = t
        .ns("client")
        .enter(|| echo_exchange(Topology::vip(), b"during the gap", Duration::from_secs(3)))
        .expect("a new connection while no daemon runs");
    assert_eq!(gap.received, b"during the gap");

    let mut second = t
        .spawn_daemon(&args("detach", &["--snat-ports=21000-21999"]))
        .expect("daemon");
    second
        .wait_ready(Duration::from_secs(20))
        .expect("ready again");
    assert!(
        second.stderr().contains("adopted the running data plane"),
        "{}",
        second.stderr()
    );
    // The new daemon lists the adopted connection.
    let o = Command::new(lb_tests::bin("lbctl").unwrap())
        .arg("--socket")
        .arg(&socket)
        .args(["--json", "flows"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let flows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let client = format!("{}:{client_port}", CLIENT_IP);
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["client"] == client && f["service"] == "web"),
        "{flows}"
    );
    round_trip(&mut long, &[3u8; 3000]);
    long.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    long.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(long);
    std::thread::sleep(Duration::from_millis(500));
    second.stop(Duration::from_secs(10)).expect("stop");

    let log = read_audit(&audit).unwrap();
    let starts = of_kind(&log, "daemon_start");
    let stops = of_kind(&log, "daemon_stop");
    assert_eq!((starts.len(), stops.len()), (2, 2));
    assert!(
        stops[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("kept running with 1 open flows")),
        "{}",
        stops[0]
    );
    let of_client = |kind: &str, port: u16| -> Vec<serde_json::Value> {
        of_kind(&log, kind)
            .into_iter()
            .filter(|r| r["client"] == format!("{}:{port}", CLIENT_IP))
            .cloned()
            .collect()
    };
    let opens = of_client("conn_open", client_port);
    let closes = of_client("conn_close", client_port);
    assert_eq!((opens.len(), closes.len()), (1, 1), "{opens:?} {closes:?}");
    assert_eq!(opens[0]["flow_id"], closes[0]["flow_id"]);
    let snat_port = |r: &serde_json::Value| {
        r["snat"]
            .as_str()
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.port())
    };
    assert!(
        snat_port(&opens[0]).is_some_and(|p| (20000..=20999).contains(&p)),
        "{}",
        opens[0]
    );
    assert_eq!(closes[0]["service"], "web");
    assert_eq!(closes[0]["close_reason"], "fin");
    assert_eq!(closes[0]["bytes_to_backend"], 6000);
    assert_eq!(closes[0]["bytes_to_client"], 6000);
    assert!(
        opens[0]["seq"].as_u64() < stops[0]["seq"].as_u64()
            && closes[0]["seq"].as_u64() > starts[1]["seq"].as_u64(),
        "opened under the first daemon, closed under the second"
    );
    // The connection of the gap was recorded by the second daemon, from the ring buffer.
    let gap_open = of_client("conn_open", gap.local.port());
    let gap_close = of_client("conn_close", gap.local.port());
    assert_eq!((gap_open.len(), gap_close.len()), (1, 1));
    assert!(gap_open[0]["seq"].as_u64() > starts[1]["seq"].as_u64());
    assert_eq!(gap_close[0]["bytes_to_backend"], 14);
    // Every conn_open has its conn_close, and the log verifies across both runs.
    assert_eq!(
        of_kind(&log, "conn_open").len(),
        of_kind(&log, "conn_close").len()
    );
    let v = Command::new(lb_tests::bin("lb-audit").unwrap())
        .arg("verify")
        .arg(&audit)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));

    // A kept data plane is adopted unless the next daemon is told to start clean.
    let mut third = t.spawn_daemon(&args("keep", &[])).expect("daemon");
    third.wait_ready(Duration::from_secs(20)).expect("ready");
    assert!(
        !third.stderr().contains("adopted"),
        "detach left nothing: {}",
        third.stderr()
    );
    third.stop(Duration::from_secs(10)).expect("stop");
    let mut fourth = t
        .spawn_daemon(&args("detach", &["--reset-state"]))
        .expect("daemon");
    fourth.wait_ready(Duration::from_secs(20)).expect("ready");
    assert!(!fourth.stderr().contains("adopted"), "{}", fourth.stderr());
    fourth.stop(Duration::from_secs(10)).expect("stop");
}
