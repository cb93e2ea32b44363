//! Prometheus metrics (`--metrics-addr`): a minimal HTTP endpoint serving the text format,
//! rendered by the run loop from its own state and the kernel's maps at each scrape.

use std::{collections::HashMap, net::SocketAddr};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tracing::warn;

use crate::audit::Event;

type Labels = Vec<(String, String)>;

/// Running totals of what the log recorded, per service and backend.
#[derive(Default)]
pub struct Totals {
    pub new_flows: HashMap<(String, String), u64>,
    /// (bytes to backend, bytes to client, packets to backend, packets to client) of closed flows.
    pub closed: HashMap<(String, String), [u64; 4]>,
    pub denies: HashMap<(String, String), u64>,
    pub records: u64,
    /// Records not written, by source.
    pub lost: HashMap<String, u64>,
}

impl Totals {
    pub fn observe(&mut self, e: &Event) {
        self.records += 1;
        match e {
            Event::ConnOpen(o) => {
                *self
                    .new_flows
                    .entry((o.service.clone(), o.backend.to_string()))
                    .or_default() += 1
            }
            Event::ConnClose(c) => {
                let t = self
                    .closed
                    .entry((c.service.clone(), c.backend.to_string()))
                    .or_default();
                t[0] += c.bytes_to_backend;
                t[1] += c.bytes_to_client;
                t[2] += c.packets_to_backend;
                t[3] += c.packets_to_client;
            }
            Event::ConnDeny(d) => {
                *self
                    .denies
                    .entry((d.service.clone(), d.reason.name().to_string()))
                    .or_default() += 1 + d.suppressed
            }
            Event::Loss(l) => *self.lost.entry(l.source.clone()).or_default() += l.count,
            _ => {}
        }
    }
}

/// What one scrape shows, gathered by the run loop.
pub struct Snapshot<'a> {
    pub totals: &'a Totals,
    /// (service, backend, bytes to backend, bytes to client, packets to backend, packets to client) per open flow.
    pub active: Vec<(String, String, [u64; 4])>,
    /// (service, backend, up, drained)
    pub backends: Vec<(String, String, bool, bool)>,
    /// (service, Maglev generation)
    pub generations: Vec<(String, u32)>,
    /// Data-plane counters by name.
    pub counters: Vec<(&'static str, u64)>,
    /// (rule description, matches)
    pub rules: Vec<(String, u64)>,
    pub log_bytes: u64,
    pub audit_failing: bool,
    /// Bytes of kernel records waiting in the ring buffer.
    pub ring_backlog: u64,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The Prometheus text exposition of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut reg = Registry::with_prefix("lb");
    let counter = |reg: &mut Registry, name: &str, help: &str, values: Vec<(Labels, u64)>| {
        let fam = Family::<Labels, Counter>::default();
        for (l, v) in values {
            fam.get_or_create(&l).inc_by(v);
        }
        reg.register(name, help, fam);
    };
    let gauge = |reg: &mut Registry, name: &str, help: &str, values: Vec<(Labels, i64)>| {
        let fam = Family::<Labels, Gauge>::default();
        for (l, v) in values {
            fam.get_or_create(&l).set(v);
        }
        reg.register(name, help, fam);
    };
    let mut active: HashMap<(String, String), (i64, [u64; 4])> = HashMap::new();
    for (svc, be, c) in &s.active {
        let a = active.entry((svc.clone(), be.clone())).or_default();
        a.0 += 1;
        for (sum, v) in a.1.iter_mut().zip(c) {
            *sum += v;
        }
    }
    gauge(
        &mut reg,
        "active_flows",
        "Connections in the kernel's flow table",
        active
            .iter()
            .map(|((svc, be), (n, _))| (labels(&[("service", svc), ("backend", be)]), *n))
            .collect(),
    );
    counter(
        &mut reg,
        "new_flows",
        "Connections opened",
        s.totals
            .new_flows
            .iter()
            .map(|((svc, be), n)| (labels(&[("service", svc), ("backend", be)]), *n))
            .collect(),
    );
    let mut keys: Vec<&(String, String)> = s.totals.closed.keys().chain(active.keys()).collect();
    keys.sort();
    keys.dedup();
    // Closed flows' totals plus the open flows' counts so far, per direction.
    let per_direction = |to_backend: usize, to_client: usize| -> Vec<(Labels, u64)> {
        keys.iter()
            .flat_map(|k| {
                [("to_backend", to_backend), ("to_client", to_client)].map(|(dir, j)| {
                    let closed = s.totals.closed.get(*k).map_or(0, |t| t[j]);
                    let open = active.get(*k).map_or(0, |a| a.1[j]);
                    (
                        labels(&[("service", &k.0), ("backend", &k.1), ("direction", dir)]),
                        closed + open,
                    )
                })
            })
            .collect()
    };
    counter(
        &mut reg,
        "bytes",
        "Transport payload bytes",
        per_direction(0, 1),
    );
    counter(&mut reg, "packets", "Packets", per_direction(2, 3));
    gauge(
        &mut reg,
        "backend_up",
        "1 when the backend passes its health checks",
        s.backends
            .iter()
            .map(|(svc, be, up, _)| (labels(&[("service", svc), ("backend", be)]), *up as i64))
            .collect(),
    );
    gauge(
        &mut reg,
        "backend_drained",
        "1 when an operator drained the backend",
        s.backends
            .iter()
            .map(|(svc, be, _, d)| (labels(&[("service", svc), ("backend", be)]), *d as i64))
            .collect(),
    );
    gauge(
        &mut reg,
        "maglev_generation",
        "Generation of the service's Maglev table",
        s.generations
            .iter()
            .map(|(svc, g)| (labels(&[("service", svc)]), *g as i64))
            .collect(),
    );
    counter(
        &mut reg,
        "denied_flows",
        "New flows refused, by reason (as recorded, suppressed ones included)",
        s.totals
            .denies
            .iter()
            .map(|((svc, r), n)| (labels(&[("service", svc), ("reason", r)]), *n))
            .collect(),
    );
    counter(
        &mut reg,
        "acl_rule_matches",
        "New flows that matched each access rule",
        s.rules
            .iter()
            .map(|(r, n)| (labels(&[("rule", r)]), *n))
            .collect(),
    );
    counter(
        &mut reg,
        "dataplane_packets",
        "XDP program counters",
        s.counters
            .iter()
            .map(|(n, v)| (labels(&[("counter", n)]), *v))
            .collect(),
    );
    counter(
        &mut reg,
        "audit_records",
        "Audit records written",
        vec![(vec![], s.totals.records)],
    );
    counter(
        &mut reg,
        "audit_lost_records",
        "Audit records not written, by source",
        s.totals
            .lost
            .iter()
            .map(|(src, n)| (labels(&[("source", src)]), *n))
            .collect(),
    );
    gauge(
        &mut reg,
        "audit_log_bytes",
        "Size of the audit log on disk",
        vec![(vec![], s.log_bytes as i64)],
    );
    gauge(
        &mut reg,
        "audit_failing",
        "1 while the audit log cannot be written",
        vec![(vec![], s.audit_failing as i64)],
    );
    gauge(
        &mut reg,
        "ringbuf_backlog_bytes",
        "Kernel records waiting in the ring buffer to be written to the audit log",
        vec![(vec![], s.ring_backlog as i64)],
    );
    let mut out = String::new();
    let _ = encode(&mut out, &reg);
    out
}

/// Serves `GET /metrics` on `addr`; each scrape asks the run loop for the text.
pub async fn serve(
    addr: SocketAddr,
    scrapes: mpsc::Sender<oneshot::Sender<String>>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let scrapes = scrapes.clone();
            tokio::spawn(async move {
                let mut head = [0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut head),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&head[..n]);
                let response = if request.starts_with("GET /metrics ")
                    || request.starts_with("GET /metrics?")
                {
                    let (tx, rx) = oneshot::channel();
                    let body = match scrapes.send(tx).await {
                        Ok(()) => rx.await.unwrap_or_default(),
                        Err(_) => String::new(),
                    };
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                if let Err(e) = stream.write_all(response.as_bytes()).await {
                    warn!(error = %e, "metrics response");
                }
            });
        }
    });
    Ok(())
}
