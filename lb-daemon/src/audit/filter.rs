//! Record filters for `lb-audit read` / `follow` (ausearch-style), evaluated on a record's
//! `Fields`: taken from a decoded record, or read from its encoding by `scan` without decoding
//! it (what `AuditReader::matching` does for every record a filter looks at).

use std::{
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use anyhow::{Context as _, bail};

use super::{Proto, Record, scan::Fields};
use crate::config::Cidr;

/// Every condition must hold; an absent condition holds for every record.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub kinds: Vec<String>,
    pub client: Option<Cidr>,
    pub vip: Option<Endpoint>,
    pub service: Option<String>,
    pub backend: Option<Endpoint>,
    pub proto: Option<Proto>,
    pub flow: Option<u64>,
}

/// An address, with or without a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Ip(IpAddr),
    Socket(SocketAddr),
}

impl Endpoint {
    pub fn parse(s: &str) -> anyhow::Result<Endpoint> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Endpoint::Socket(sa));
        }
        let ip = s.trim_start_matches('[').trim_end_matches(']');
        Ok(Endpoint::Ip(ip.parse().with_context(|| {
            format!("'{s}' is not an address or address:port")
        })?))
    }

    fn matches(&self, a: SocketAddr) -> bool {
        match self {
            Endpoint::Ip(ip) => a.ip() == *ip,
            Endpoint::Socket(sa) => a == *sa,
        }
    }
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.since_ns.is_none()
            && self.until_ns.is_none()
            && self.kinds.is_empty()
            && self.client.is_none()
            && self.vip.is_none()
            && self.service.is_none()
            && self.backend.is_none()
            && self.proto.is_none()
            && self.flow.is_none()
    }

    pub fn matches(&self, r: &Record) -> bool {
        self.matches_fields(&Fields::of(r))
    }

    /// The same decision on the fields alone, as `scan` reads them from a record's encoding.
    pub fn matches_fields(&self, v: &Fields<'_>) -> bool {
        if self.since_ns.is_some_and(|t| v.time_ns < t)
            || self.until_ns.is_some_and(|t| v.time_ns > t)
        {
            return false;
        }
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k == v.kind) {
            return false;
        }
        // A condition on a field the record does not have excludes it.
        self.client
            .is_none_or(|c| v.client.is_some_and(|a| c.contains(a.ip())))
            && self.vip.is_none_or(|e| v.vip.is_some_and(|a| e.matches(a)))
            && self.service.as_deref().is_none_or(|s| v.service == Some(s))
            && self
                .backend
                .is_none_or(|e| v.backend.is_some_and(|a| e.matches(a)))
            && self.proto.is_none_or(|p| v.proto == Some(p))
            && self.flow.is_none_or(|f| v.flow == Some(f))
    }
}

/// An instant: RFC 3339 (`2026-11-24T13:00:00Z`), or a time ago: `15m`, `2h`, `30s`, `7d`.
pub fn parse_instant(s: &str, now: SystemTime) -> anyhow::Result<i64> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t.unix_timestamp_nanos() as i64);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("'{s}' is not RFC 3339 or a time ago like 15m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("'{s}': unknown unit '{unit}' (s, m, h, d)"),
    };
    let now_ns = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    Ok(now_ns - secs as i64 * 1_000_000_000)
}
