//! Active health checks: a tokio task per backend probes it (TCP connect, UDP request/reply,
//! or HTTP GET expecting 2xx) every `interval`; `rise` successes in a row bring a backend up,
//! `fall` failures in a row take it down. The daemon turns transitions into `health_change`
//! records and a new Maglev table without the backend.

use std::{net::SocketAddr, str::FromStr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::mpsc,
    time::timeout,
};

use crate::config::parse_duration;

/// How a service's backends are checked (`--health SERVICE=KIND,interval=..,timeout=..,rise=..,fall=..`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CheckSpec {
    pub kind: CheckKind,
    #[serde(serialize_with = "secs")]
    pub interval: Duration,
    #[serde(serialize_with = "secs")]
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// The backend accepts a TCP connection.
    Tcp,
    /// The backend answers a UDP datagram carrying this payload.
    Udp(String),
    /// `GET path` answers with a 2xx status.
    Http(String),
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl FromStr for CheckSpec {
    type Err = String;
    /// `tcp`, `udp`, `udp:PAYLOAD`, `http`, `http:/path`, then `,interval=2s,timeout=1s,rise=2,fall=3`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let kind = match parts.next().unwrap_or_default() {
            "tcp" => CheckKind::Tcp,
            "udp" => CheckKind::Udp("ping".into()),
            "http" => CheckKind::Http("/".into()),
            k if k.starts_with("udp:") => CheckKind::Udp(k[4..].to_string()),
            k if k.starts_with("http:/") => CheckKind::Http(k[5..].to_string()),
            k => {
                return Err(format!(
                    "unknown check '{k}' (tcp, udp[:PAYLOAD], http[:/PATH])"
                ));
            }
        };
        let mut spec = CheckSpec {
            kind,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        };
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("'{opt}': expected NAME=VALUE"))?;
            let count = || {
                v.parse::<u32>()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| format!("{k}={v}: expected 1 to 100"))
            };
            match k {
                "interval" => spec.interval = parse_duration(v)?,
                "timeout" => spec.timeout = parse_duration(v)?,
                "rise" => spec.rise = count()?,
                "fall" => spec.fall = count()?,
                _ => {
                    return Err(format!(
                        "unknown option '{k}' (interval, timeout, rise, fall)"
                    ));
                }
            }
        }
        if spec.interval.is_zero() || spec.timeout.is_zero() || spec.timeout > spec.interval {
            return Err("timeout must be positive and no longer than interval".into());
        }
        Ok(spec)
    }
}

/// One probe's outcome.
#[derive(Debug)]
pub struct Probe {
    pub service: u32,
    pub backend: SocketAddr,
    pub result: Result<(), String>,
}

/// Starts the probes of one backend; they run until the receiver is dropped.
pub fn spawn(
    service: u32,
    backend: SocketAddr,
    spec: CheckSpec,
    tx: mpsc::Sender<Probe>,
) -> tokio::task::AbortHandle {
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(spec.interval);
        loop {
            tick.tick().await;
            let result = match timeout(spec.timeout, probe(backend, &spec.kind)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {:?}", spec.timeout)),
            };
            if tx
                .send(Probe {
                    service,
                    backend,
                    result,
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    task.abort_handle()
}

async fn probe(backend: SocketAddr, kind: &CheckKind) -> Result<(), String> {
    match kind {
        CheckKind::Tcp => TcpStream::connect(backend)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        CheckKind::Udp(payload) => {
            let bind: SocketAddr = if backend.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                ([0u16; 8], 0).into()
            };
            let sock = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
            sock.connect(backend).await.map_err(|e| e.to_string())?;
            sock.send(payload.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1500];
            sock.recv(&mut buf)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        }
        CheckKind::Http(path) => {
            let mut s = TcpStream::connect(backend)
                .await
                .map_err(|e| e.to_string())?;
            let req = format!(
                "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: lb-health\r\n\r\n",
                backend.ip()
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut head = [0u8; 64];
            let n = s.read(&mut head).await.map_err(|e| e.to_string())?;
            let line = String::from_utf8_lossy(&head[..n]);
            let status = line.split_whitespace().nth(1).unwrap_or_default();
            if status.starts_with('2') && status.len() == 3 {
                Ok(())
            } else {
                Err(format!("HTTP status {status:?}"))
            }
        }
    }
}

/// Rise/fall bookkeeping of one backend.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub down: bool,
    pub successes: u32,
    pub failures: u32,
    pub last_error: Option<String>,
}

impl State {
    /// Counts a probe; returns true when the backend changes state.
    pub fn observe(&mut self, result: &Result<(), String>, spec: &CheckSpec) -> bool {
        match result {
            Ok(()) => {
                self.successes += 1;
                self.failures = 0;
                if self.down && self.successes >= spec.rise {
                    self.down = false;
                    return true;
                }
            }
            Err(e) => {
                self.failures += 1;
                self.successes = 0;
                self.last_error = Some(e.clone());
                if !self.down && self.failures >= spec.fall {
                    self.down = true;
                    return true;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s: CheckSpec = "http:/healthz,interval=500ms,timeout=200ms,rise=2,fall=3"
            .parse()
            .unwrap();
        assert_eq!(s.kind, CheckKind::Http("/healthz".into()));
        assert_eq!(
            (s.interval, s.timeout, s.rise, s.fall),
            (Duration::from_millis(500), Duration::from_millis(200), 2, 3)
        );
        assert_eq!(
            "udp:hello".parse::<CheckSpec>().unwrap().kind,
            CheckKind::Udp("hello".into())
        );
        assert!("icmp".parse::<CheckSpec>().is_err());
        assert!("tcp,interval=1s,timeout=2s".parse::<CheckSpec>().is_err());
        assert!("tcp,rise=0".parse::<CheckSpec>().is_err());
    }

    #[test]
    fn rise_and_fall() {
        let spec: CheckSpec = "tcp,rise=2,fall=3".parse().unwrap();
        let mut st = State::default();
        let (ok, bad) = (Ok(()), Err("refused".to_string()));
        assert!(!st.observe(&bad, &spec) && !st.observe(&bad, &spec));
        assert!(st.observe(&bad, &spec) && st.down, "down after 3 failures");
        assert!(!st.observe(&ok, &spec));
        assert!(st.observe(&ok, &spec) && !st.down, "up after 2 successes");
        assert_eq!(st.last_error.as_deref(), Some("refused"));
    }
}
