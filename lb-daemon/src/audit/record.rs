//! Audit records: the binary model (encoded with bincode 2, `config::standard()`) and its JSON
//! view. The binary enum order is part of the on-disk format: variants are only ever appended.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    Fin,
    Rst,
    IdleTimeout,
    Evicted,
    Shutdown,
}

impl CloseReason {
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Fin => "fin",
            CloseReason::Rst => "rst",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Evicted => "evicted",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    Acl,
    RateLimited,
    NoBackend,
    SnatExhausted,
    ConntrackFull,
    AuditUnavailable,
}

impl DenyReason {
    pub fn name(self) -> &'static str {
        match self {
            DenyReason::Acl => "acl",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::NoBackend => "no_backend",
            DenyReason::SnatExhausted => "snat_exhausted",
            DenyReason::ConntrackFull => "conntrack_full",
            DenyReason::AuditUnavailable => "audit_unavailable",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DaemonStart {
    pub version: String,
    /// The effective configuration, as JSON text.
    pub config: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DaemonStop {
    pub reason: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConnOpen {
    pub flow_id: u64,
    pub proto: Proto,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub service: String,
    pub backend: SocketAddr,
    pub snat: SocketAddr,
    /// Why this backend: "maglev" or "conntrack".
    pub reason: String,
    /// Maglev table generation that chose the backend.
    pub generation: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConnClose {
    pub flow_id: u64,
    pub proto: Proto,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub service: String,
    pub backend: SocketAddr,
    pub duration_ns: u64,
    pub bytes_to_backend: u64,
    pub bytes_to_client: u64,
    pub packets_to_backend: u64,
    pub packets_to_client: u64,
    pub close_reason: CloseReason,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConnDeny {
    pub proto: Proto,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub service: String,
    pub reason: DenyReason,
    /// The access rule that refused (`deny 10.1.2.0/24`, `default deny`), for `acl`.
    pub rule: Option<String>,
    /// Denies of the same source and service since the previous deny record that were not
    /// recorded one by one.
    pub suppressed: u64,
}

/// The chain head at a point of the log, optionally sealed with the (evolving) seal key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// SHA-256 chain head over every frame before this record.
    pub head: [u8; 32],
    /// Seal-key epoch: the number of checkpoints sealed before this one.
    pub epoch: u64,
    /// HMAC-SHA256 of `seq ‖ head` under the epoch's key, when the log is sealed.
    pub seal: Option<[u8; 32]>,
}

/// What the daemon cut off when it found a torn tail on start.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Recovery {
    pub segment: u64,
    pub offset: u64,
    pub bytes_removed: u64,
    pub reason: String,
}

/// Records that could not be written or were never produced, and where.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Loss {
    /// `kernel_ringbuf`, `queue`, `write_failure`.
    pub source: String,
    pub count: u64,
    /// The window the loss happened in (Unix ns).
    pub since_ns: i64,
    pub until_ns: i64,
}

/// Who did something through the control socket.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Actor {
    pub uid: u32,
    pub user: String,
    pub pid: u32,
    pub exe: String,
}

/// An accepted configuration change; `before` and `after` are JSON text.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ConfigChange {
    pub actor: Actor,
    pub action: String,
    pub target: String,
    pub before: String,
    pub after: String,
    pub generation_before: u64,
    pub generation_after: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HealthChange {
    pub service: String,
    pub backend: SocketAddr,
    pub from: String,
    pub to: String,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ControlDenied {
    pub actor: Actor,
    pub action: String,
    pub target: String,
    pub reason: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Alert {
    pub rule: String,
    pub source: Option<String>,
    pub message: String,
    pub action: Option<String>,
}

/// Everything the log records. New kinds are appended, never inserted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum Event {
    DaemonStart(DaemonStart),
    DaemonStop(DaemonStop),
    ConnOpen(ConnOpen),
    ConnClose(ConnClose),
    ConnDeny(ConnDeny),
    Checkpoint(Checkpoint),
    Recovery(Recovery),
    Loss(Loss),
    ConfigChange(ConfigChange),
    HealthChange(HealthChange),
    ControlDenied(ControlDenied),
    Alert(Alert),
    SegmentDeleted(SegmentDeleted),
    BackendDrained(BackendDrained),
}

/// A drained backend's last flow has closed: it can be taken away.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BackendDrained {
    pub service: String,
    pub backend: SocketAddr,
}

/// A segment removed by retention (`--audit-retain-*`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SegmentDeleted {
    pub index: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub bytes: u64,
    /// `age` or `size`.
    pub reason: String,
}

impl Event {
    /// The `kind` name of the JSON contract.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::DaemonStart(_) => "daemon_start",
            Event::DaemonStop(_) => "daemon_stop",
            Event::ConnOpen(_) => "conn_open",
            Event::ConnClose(_) => "conn_close",
            Event::ConnDeny(_) => "conn_deny",
            Event::Checkpoint(_) => "checkpoint",
            Event::Recovery(_) => "recovery",
            Event::Loss(_) => "loss",
            Event::ConfigChange(_) => "config_change",
            Event::HealthChange(_) => "health_change",
            Event::ControlDenied(_) => "control_denied",
            Event::Alert(_) => "alert",
            Event::SegmentDeleted(_) => "segment_deleted",
            Event::BackendDrained(_) => "backend_drained",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Record {
    /// Gapless, from 1 in a new log.
    pub seq: u64,
    /// Unix time in nanoseconds, UTC.
    pub time_ns: i64,
    pub event: Event,
}

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-24T13:01:02.123456789Z`.
pub fn rfc3339(time_ns: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(time_ns as i128) {
        Ok(t) => {
            let d = t.date();
            let tm = t.time();
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
                d.year(),
                d.month() as u8,
                d.day(),
                tm.hour(),
                tm.minute(),
                tm.second(),
                tm.nanosecond()
            )
        }
        Err(_) => format!("@{time_ns}ns"),
    }
}

/// The JSON object for a record, with the contract's names.
pub fn record_to_json(r: &Record) -> Value {
    let mut v = json!({ "seq": r.seq, "time": rfc3339(r.time_ns), "kind": r.event.kind() });
    let fields = match &r.event {
        Event::DaemonStart(d) => json!({
            "version": d.version,
            "config": parsed(&d.config),
        }),
        Event::DaemonStop(d) => json!({ "reason": d.reason }),
        Event::ConnOpen(o) => json!({
            "flow_id": o.flow_id, "proto": o.proto.name(), "client": o.client.to_string(),
            "vip": o.vip.to_string(), "service": o.service, "backend": o.backend.to_string(),
            "snat": o.snat.to_string(), "reason": o.reason, "generation": o.generation,
        }),
        Event::ConnClose(c) => json!({
            "flow_id": c.flow_id, "proto": c.proto.name(), "client": c.client.to_string(),
            "vip": c.vip.to_string(), "service": c.service, "backend": c.backend.to_string(),
            "duration_ns": c.duration_ns, "bytes_to_backend": c.bytes_to_backend,
            "bytes_to_client": c.bytes_to_client, "packets_to_backend": c.packets_to_backend,
            "packets_to_client": c.packets_to_client, "close_reason": c.close_reason.name(),
        }),
        Event::ConnDeny(d) => json!({
            "proto": d.proto.name(), "client": d.client.to_string(), "vip": d.vip.to_string(),
            "service": d.service, "reason": d.reason.name(), "rule": d.rule, "suppressed": d.suppressed,
        }),
        Event::Checkpoint(c) => json!({
            "head": hex(&c.head), "epoch": c.epoch, "seal": c.seal.as_ref().map(|s| hex(s)),
        }),
        Event::Recovery(r) => json!({
            "segment": r.segment, "offset": r.offset, "bytes_removed": r.bytes_removed, "reason": r.reason,
        }),
        Event::Loss(l) => json!({
            "source": l.source, "count": l.count, "since": rfc3339(l.since_ns), "until": rfc3339(l.until_ns),
        }),
        Event::ConfigChange(c) => json!({
            "actor": actor(&c.actor), "action": c.action, "target": c.target,
            "before": parsed(&c.before), "after": parsed(&c.after),
            "generation_before": c.generation_before, "generation_after": c.generation_after,
        }),
        Event::HealthChange(h) => json!({
            "service": h.service, "backend": h.backend.to_string(), "from": h.from, "to": h.to,
            "consecutive_failures": h.consecutive_failures, "last_error": h.last_error,
        }),
        Event::ControlDenied(c) => json!({
            "actor": actor(&c.actor), "action": c.action, "target": c.target, "reason": c.reason,
        }),
        Event::Alert(a) => {
            json!({ "rule": a.rule, "source": a.source, "message": a.message, "action": a.action })
        }
        Event::BackendDrained(d) => {
            json!({ "service": d.service, "backend": d.backend.to_string() })
        }
        Event::SegmentDeleted(d) => json!({
            "segment": d.index, "first_seq": d.first_seq, "last_seq": d.last_seq, "bytes": d.bytes, "reason": d.reason,
        }),
    };
    if let (Value::Object(all), Value::Object(more)) = (&mut v, fields) {
        all.extend(more);
    }
    v
}

/// JSON text as a value (a string if it does not parse).
fn parsed(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn actor(a: &Actor) -> Value {
    json!({ "uid": a.uid, "user": a.user, "pid": a.pid, "exe": a.exe })
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
