//! Monitoring rules evaluated on the live record stream:
//! - `--alert-denied N/DUR`: a source refused N times within DUR;
//! - `--alert-burst N/DUR`: a source opening N flows within DUR;
//! - `--alert-outside-hours HH:MM-HH:MM`: a flow opened outside working hours (local time, as
//!   the process's time zone says);
//! - every refused control request.
//!
//! A rule fires once per source per window. An alert is an `alert` record, a log line, and,
//! with `--alert-exec CMD`, a command run with the alert as JSON on its stdin. With
//! `--alert-block DUR`, a client address that trips `denied` or `burst` is also refused in the
//! kernel for DUR ([`crate::blocks`]); the alert's `action` says so.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    str::FromStr,
    time::Duration,
};

use crate::{
    audit::{Alert, Event},
    config::parse_duration,
};

/// `N/DUR`, e.g. `20/1m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Threshold {
    pub count: u32,
    #[serde(serialize_with = "secs")]
    pub window: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl FromStr for Threshold {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, d) = s
            .split_once('/')
            .ok_or_else(|| format!("'{s}': expected COUNT/DURATION, e.g. 20/1m"))?;
        let count = n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("'{n}' is not a positive count"))?;
        let window = parse_duration(d)?;
        if window.is_zero() {
            return Err("the window must be positive".into());
        }
        Ok(Threshold { count, window })
    }
}

/// `HH:MM-HH:MM`: working hours, in minutes of the local day (may wrap past midnight).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Hours {
    pub start: u32,
    pub end: u32,
}

impl FromStr for Hours {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let minute = |t: &str| -> Result<u32, String> {
            let (h, m) = t
                .split_once(':')
                .ok_or_else(|| format!("'{t}' is not HH:MM"))?;
            match (h.parse::<u32>(), m.parse::<u32>()) {
                (Ok(h), Ok(m)) if h < 24 && m < 60 => Ok(h * 60 + m),
                _ => Err(format!("'{t}' is not HH:MM")),
            }
        };
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("'{s}': expected HH:MM-HH:MM"))?;
        Ok(Hours {
            start: minute(a)?,
            end: minute(b)?,
        })
    }
}

impl Hours {
    pub fn contains(&self, minute: u32) -> bool {
        if self.start <= self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

/// The rules configured (`Settings::alerts`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Rules {
    pub denied: Option<Threshold>,
    pub burst: Option<Threshold>,
    pub outside_hours: Option<Hours>,
    pub exec: Option<String>,
    /// How long a source that trips `denied` or `burst` is refused in the kernel.
    #[serde(serialize_with = "opt_secs")]
    pub block: Option<Duration>,
}

fn opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Sources tracked per rule at most; beyond, the quietest are forgotten.
const MAX_SOURCES: usize = 65_536;

/// Sliding windows of one rule.
#[derive(Default)]
struct Window {
    events: HashMap<IpAddr, VecDeque<i64>>,
    /// When each source last fired, so it fires once per window.
    fired: HashMap<IpAddr, i64>,
}

impl Window {
    /// Counts an event of `source` at `now_ns` (plus `extra` more); true when the threshold is
    /// reached and the source has not fired within the window.
    fn hit(&mut self, source: IpAddr, now_ns: i64, extra: u64, t: &Threshold) -> bool {
        let window = t.window.as_nanos() as i64;
        if self.events.len() >= MAX_SOURCES && !self.events.contains_key(&source) {
            self.events
                .retain(|_, q| q.back().is_some_and(|last| now_ns - last < window));
            if self.events.len() >= MAX_SOURCES {
                return false;
            }
        }
        let q = self.events.entry(source).or_default();
        for _ in 0..=extra.min(t.count as u64) {
            q.push_back(now_ns);
        }
        while q.front().is_some_and(|first| now_ns - first >= window) || q.len() > t.count as usize
        {
            q.pop_front();
        }
        if q.len() >= t.count as usize
            && self
                .fired
                .get(&source)
                .is_none_or(|at| now_ns - at >= window)
        {
            self.fired.insert(source, now_ns);
            return true;
        }
        false
    }
}

#[derive(Default)]
pub struct Engine {
    pub rules: Rules,
    denied: Window,
    burst: Window,
    outside: Window,
    pending: Vec<Alert>,
    /// Client addresses to refuse in the kernel (`--alert-block`).
    blocks: Vec<IpAddr>,
}

impl Engine {
    pub fn new(rules: Rules) -> Engine {
        Engine {
            rules,
            ..Engine::default()
        }
    }

    /// Looks at one record; alerts it causes wait in `take`.
    pub fn observe(&mut self, time_ns: i64, e: &Event) {
        match e {
            Event::ConnDeny(d) => {
                if let Some(t) = self.rules.denied {
                    let ip = d.client.ip();
                    if self.denied.hit(ip, time_ns, d.suppressed, &t) {
                        let action = self.block(ip);
                        self.pending.push(Alert {
                            rule: "denied".into(),
                            source: Some(ip.to_string()),
                            message: format!(
                                "{ip} was refused {} times within {:?} (last: {} to {}, {})",
                                t.count,
                                t.window,
                                d.service,
                                d.vip,
                                d.reason.name()
                            ),
                            action,
                        });
                    }
                }
            }
            Event::ConnOpen(o) => {
                let ip = o.client.ip();
                if let Some(t) = self.rules.burst
                    && self.burst.hit(ip, time_ns, 0, &t)
                {
                    let action = self.block(ip);
                    self.pending.push(Alert {
                        rule: "burst".into(),
                        source: Some(ip.to_string()),
                        message: format!(
                            "{ip} opened {} flows within {:?} (last to {} {})",
                            t.count, t.window, o.service, o.vip
                        ),
                        action,
                    });
                }
                if let Some(h) = self.rules.outside_hours {
                    let minute = local_minute_of_day(time_ns);
                    let hour = Threshold {
                        count: 1,
                        window: Duration::from_secs(3600),
                    };
                    if !h.contains(minute) && self.outside.hit(ip, time_ns, 0, &hour) {
                        self.pending.push(Alert {
                            rule: "outside_hours".into(),
                            source: Some(ip.to_string()),
                            message: format!("{ip} connected to {} at {:02}:{:02} local time, outside working hours", o.service, minute / 60, minute % 60),
                            action: None,
                        });
                    }
                }
            }
            Event::ControlDenied(c) => self.pending.push(Alert {
                rule: "control_denied".into(),
                source: Some(format!("uid {} ({})", c.actor.uid, c.actor.user)),
                message: format!(
                    "{} tried {} {}: {}",
                    c.actor.user, c.action, c.target, c.reason
                ),
                action: None,
            }),
            _ => {}
        }
    }

    pub fn take(&mut self) -> Vec<Alert> {
        std::mem::take(&mut self.pending)
    }

    /// The sources to block that alerts asked for since the last call.
    pub fn take_blocks(&mut self) -> Vec<IpAddr> {
        std::mem::take(&mut self.blocks)
    }

    /// With `--alert-block`, queues `ip` for blocking and says so for the alert's `action`.
    fn block(&mut self, ip: IpAddr) -> Option<String> {
        let d = self.rules.block?;
        self.blocks.push(ip);
        Some(format!("blocked in the kernel for {}s", d.as_secs()))
    }
}

/// Minutes since local midnight, in the process's time zone (`TZ`, /etc/localtime).
fn local_minute_of_day(time_ns: i64) -> u32 {
    let secs = (time_ns / 1_000_000_000) as libc::time_t;
    // SAFETY: zeroed tm is a valid out-parameter; localtime_r is thread-safe.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return 0;
    }
    (tm.tm_hour * 60 + tm.tm_min) as u32
}

/// Runs `--alert-exec CMD` with the alert as JSON on stdin, without waiting for it.
pub fn exec(cmd: &str, alert_json: &serde_json::Value) {
    use std::io::Write;
    let child = std::process::Command::new("/bin/sh")
        .args(["-c", cmd])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(mut c) => {
            if let Some(mut stdin) = c.stdin.take() {
                let _ = stdin.write_all(format!("{alert_json}\n").as_bytes());
            }
            // Reap it in the background.
            std::thread::spawn(move || c.wait());
        }
        Err(e) => tracing::warn!(error = %e, "--alert-exec"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_hours_and_windows() {
        let t: Threshold = "3/1s".parse().unwrap();
        assert_eq!((t.count, t.window), (3, Duration::from_secs(1)));
        assert!("0/1s".parse::<Threshold>().is_err() && "3".parse::<Threshold>().is_err());
        let h: Hours = "08:00-19:00".parse().unwrap();
        assert!(h.contains(8 * 60) && !h.contains(19 * 60) && !h.contains(3 * 60));
        let night: Hours = "22:00-06:00".parse().unwrap();
        assert!(night.contains(23 * 60) && night.contains(60) && !night.contains(12 * 60));
        assert!("25:00-01:00".parse::<Hours>().is_err());

        let mut w = Window::default();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let s = 1_000_000_000i64;
        assert!(!w.hit(ip, 0, 0, &t) && !w.hit(ip, s / 10, 0, &t));
        assert!(w.hit(ip, s / 5, 0, &t), "third within the second fires");
        assert!(!w.hit(ip, s / 4, 0, &t), "once per window");
        assert!(!w.hit(ip, 3 * s, 0, &t), "old events left the window");
        // Suppressed denies count too.
        let other: IpAddr = "10.9.9.9".parse().unwrap();
        assert!(w.hit(other, 0, 5, &t));
    }
}
