//! The Prometheus endpoint, scraped for real: counters move with traffic, labels name
//! services and backends, and the text parses as the exposition format.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use lb_tests::{TempDir, Topology, echo_exchange, require_root};

fn scrape(t: &Topology) -> String {
    t.ns("lb").enter(|| {
        let mut s =
            TcpStream::connect_timeout(&"127.0.0.1:9650".parse().unwrap(), Duration::from_secs(3))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

/// The value of the sample whose line starts with `prefix`.
fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_follow_traffic() {
    if !require_root("metrics_follow_traffic") {
        return;
    }
    let t = Topology::balancer("metrics").expect("topology");
    let dir = TempDir::new("metrics").unwrap();
    let _servers = t.echo_backends().unwrap();
    let mut args = Topology::daemon_args(dir.path());
    args.push("--metrics-addr=127.0.0.1:9650".into());
    let mut daemon = t.spawn_daemon(&args).expect("daemon");
    daemon.wait_ready(Duration::from_secs(20)).expect("ready");
    let before = scrape(&t);
    assert!(before.starts_with("HTTP/1.1 200 OK"), "{before}");
    let ok = t.ns("client").enter(|| {
        (0..10)
            .filter(|_| {
                echo_exchange(Topology::vip(), &[1u8; 1000], Duration::from_secs(3)).is_ok()
            })
            .count()
    });
    assert_eq!(ok, 10);
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape(&t);
    daemon.stop(Duration::from_secs(10)).unwrap();
    let body = after.split("\r\n\r\n").nth(1).unwrap();
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    let new_flows: f64 = body
        .lines()
        .filter(|l| l.starts_with("lb_new_flows_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(new_flows, 10.0, "{body}");
    let bytes_to_backend: f64 = body
        .lines()
        .filter(|l| l.starts_with("lb_bytes_total{") && l.contains("direction=\"to_backend\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(bytes_to_backend, 10_000.0, "{body}");
    assert_eq!(
        value(body, "lb_maglev_generation{service=\"web\"}"),
        Some(1.0)
    );
    assert!(
        value(body, "lb_audit_records_total").unwrap() >= 21.0,
        "daemon_start and 20 connection records"
    );
    assert!(value(body, "lb_audit_log_bytes").unwrap() > 0.0);
    // Traffic is over and its records are written: nothing waits in the ring buffer.
    assert_eq!(value(body, "lb_ringbuf_backlog_bytes"), Some(0.0), "{body}");
    assert_eq!(value(body, "lb_audit_failing"), Some(0.0));
    assert!(
        body.contains("lb_dataplane_packets_total{counter=\"forwarded\"}"),
        "{body}"
    );
    let backend_up = body
        .lines()
        .filter(|l| l.starts_with("lb_backend_up{") && l.ends_with(" 1"))
        .count();
    assert_eq!(backend_up, 2);
}
