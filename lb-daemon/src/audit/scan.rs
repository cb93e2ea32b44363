//! Reading a record's encoding without building the record: a walk over the bincode bytes
//! (docs/audit-format.md, "Payload encoding") that checks every field exactly as the full
//! decoder does and picks out what the filters look at — `seq`, `time_ns`, the kind and, where
//! the kind has them, the client, VIP, service, backend, protocol and flow id — borrowing the
//! service name from the frame. It allocates nothing.
//!
//! `scan` accepts a payload exactly when `bincode` decodes it into a `Record` using every
//! byte, and then returns the same `Fields` as `Fields::of` on the decoded record (the tests
//! check both over random records and random damage). A reader can therefore skip the full
//! decode of every record a filter rejects without missing damage.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use super::{Event, Proto, Record};

/// The `kind` names by variant index (the enum order of `Event`).
pub const KINDS: [&str; 14] = [
    "daemon_start",
    "daemon_stop",
    "conn_open",
    "conn_close",
    "conn_deny",
    "checkpoint",
    "recovery",
    "loss",
    "config_change",
    "health_change",
    "control_denied",
    "alert",
    "segment_deleted",
    "backend_drained",
];

/// What filters look at, where a record has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields<'a> {
    pub seq: u64,
    pub time_ns: i64,
    pub kind: &'static str,
    pub client: Option<SocketAddr>,
    pub vip: Option<SocketAddr>,
    pub service: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    pub proto: Option<Proto>,
    pub flow: Option<u64>,
}

impl<'a> Fields<'a> {
    fn bare(seq: u64, time_ns: i64, kind: &'static str) -> Fields<'a> {
        Fields {
            seq,
            time_ns,
            kind,
            client: None,
            vip: None,
            service: None,
            backend: None,
            proto: None,
            flow: None,
        }
    }

    /// The fields of a decoded record.
    pub fn of(r: &'a Record) -> Fields<'a> {
        let bare = Fields::bare(r.seq, r.time_ns, r.event.kind());
        match &r.event {
            Event::ConnOpen(o) => Fields {
                client: Some(o.client),
                vip: Some(o.vip),
                service: Some(&o.service),
                backend: Some(o.backend),
                proto: Some(o.proto),
                flow: Some(o.flow_id),
                ..bare
            },
            Event::ConnClose(c) => Fields {
                client: Some(c.client),
                vip: Some(c.vip),
                service: Some(&c.service),
                backend: Some(c.backend),
                proto: Some(c.proto),
                flow: Some(c.flow_id),
                ..bare
            },
            Event::ConnDeny(d) => Fields {
                client: Some(d.client),
                vip: Some(d.vip),
                service: Some(&d.service),
                proto: Some(d.proto),
                ..bare
            },
            Event::HealthChange(h) => Fields {
                service: Some(&h.service),
                backend: Some(h.backend),
                ..bare
            },
            _ => bare,
        }
    }
}

/// Why a payload is not a record (the full decoder words it its own way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

type Result<T> = std::result::Result<T, Invalid>;

/// Reads a record payload (the frame after its type byte). See the module documentation.
pub fn scan(payload: &[u8]) -> Result<Fields<'_>> {
    let mut c = Cursor { b: payload };
    let seq = c.u64()?;
    let time_ns = c.i64()?;
    let variant = c.variant(KINDS.len() as u32)?;
    let mut f = Fields::bare(seq, time_ns, KINDS[variant as usize]);
    match variant {
        // DaemonStart { version, config }
        0 => {
            c.str()?;
            c.str()?;
        }
        // DaemonStop { reason }
        1 => {
            c.str()?;
        }
        // ConnOpen
        2 => {
            f.flow = Some(c.u64()?);
            f.proto = Some(c.proto()?);
            f.client = Some(c.addr()?);
            f.vip = Some(c.addr()?);
            f.service = Some(c.str()?);
            f.backend = Some(c.addr()?);
            c.addr()?; // snat
            c.str()?; // reason
            c.u32()?; // generation
        }
        // ConnClose
        3 => {
            f.flow = Some(c.u64()?);
            f.proto = Some(c.proto()?);
            f.client = Some(c.addr()?);
            f.vip = Some(c.addr()?);
            f.service = Some(c.str()?);
            f.backend = Some(c.addr()?);
            for _ in 0..5 {
                c.u64()?; // duration, bytes and packets each way
            }
            c.variant(5)?; // close_reason
        }
        // ConnDeny
        4 => {
            f.proto = Some(c.proto()?);
            f.client = Some(c.addr()?);
            f.vip = Some(c.addr()?);
            f.service = Some(c.str()?);
            c.variant(6)?; // reason
            if c.option()? {
                c.str()?; // rule
            }
            c.u64()?; // suppressed
        }
        // Checkpoint { head, epoch, seal }
        5 => {
            c.take(32)?;
            c.u64()?;
            if c.option()? {
                c.take(32)?;
            }
        }
        // Recovery { segment, offset, bytes_removed, reason }
        6 => {
            c.u64()?;
            c.u64()?;
            c.u64()?;
            c.str()?;
        }
        // Loss { source, count, since_ns, until_ns }
        7 => {
            c.str()?;
            c.u64()?;
            c.i64()?;
            c.i64()?;
        }
        // ConfigChange
        8 => {
            c.actor()?;
            c.str()?;
            c.str()?;
            c.str()?;
            c.str()?;
            c.u64()?;
            c.u64()?;
        }
        // HealthChange
        9 => {
            f.service = Some(c.str()?);
            f.backend = Some(c.addr()?);
            c.str()?;
            c.str()?;
            c.u32()?;
            if c.option()? {
                c.str()?;
            }
        }
        // ControlDenied
        10 => {
            c.actor()?;
            c.str()?;
            c.str()?;
            c.str()?;
        }
        // Alert { rule, source, message, action }
        11 => {
            c.str()?;
            if c.option()? {
                c.str()?;
            }
            c.str()?;
            if c.option()? {
                c.str()?;
            }
        }
        // SegmentDeleted { index, first_seq, last_seq, bytes, reason }
        12 => {
            c.u64()?;
            c.u64()?;
            c.u64()?;
            c.u64()?;
            c.str()?;
        }
        // BackendDrained { service, backend } (not looked at by filters, as in `Fields::of`)
        13 => {
            c.str()?;
            c.addr()?;
        }
        _ => unreachable!("variant() bounds the index"),
    }
    if !c.b.is_empty() {
        return Err(Invalid("trailing bytes after the record"));
    }
    Ok(f)
}

/// The unread rest of a payload.
struct Cursor<'a> {
    b: &'a [u8],
}

const END: Invalid = Invalid("unexpected end of the record");
const BAD_INT: Invalid = Invalid("invalid integer encoding");

impl<'a> Cursor<'a> {
    #[inline]
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(END);
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    #[inline]
    fn byte(&mut self) -> Result<u8> {
        let (&b, rest) = self.b.split_first().ok_or(END)?;
        self.b = rest;
        Ok(b)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// An unsigned varint of at most `max_marker` (251: u16, 252: u32, 253: u64).
    #[inline]
    fn varint(&mut self, max_marker: u8) -> Result<u64> {
        let m = self.byte()?;
        if m < 251 {
            return Ok(m as u64);
        }
        if m > max_marker {
            return Err(BAD_INT);
        }
        Ok(match m {
            251 => u16::from_le_bytes(self.array()?) as u64,
            252 => u32::from_le_bytes(self.array()?) as u64,
            _ => u64::from_le_bytes(self.array()?),
        })
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(self.varint(251)? as u16)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(self.varint(252)? as u32)
    }

    fn u64(&mut self) -> Result<u64> {
        self.varint(253)
    }

    fn i64(&mut self) -> Result<i64> {
        let z = self.u64()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    /// An enum's variant index, below `count`.
    fn variant(&mut self, count: u32) -> Result<u32> {
        let v = self.u32()?;
        if v >= count {
            return Err(Invalid("unknown enum variant"));
        }
        Ok(v)
    }

    fn option(&mut self) -> Result<bool> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Invalid("invalid option tag")),
        }
    }

    fn str(&mut self) -> Result<&'a str> {
        let len = self.u64()?;
        let len = usize::try_from(len).map_err(|_| END)?;
        std::str::from_utf8(self.take(len)?).map_err(|_| Invalid("string is not UTF-8"))
    }

    fn proto(&mut self) -> Result<Proto> {
        Ok(match self.variant(2)? {
            0 => Proto::Tcp,
            _ => Proto::Udp,
        })
    }

    fn addr(&mut self) -> Result<SocketAddr> {
        Ok(match self.variant(2)? {
            0 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                SocketAddr::new(ip.into(), self.u16()?)
            }
            _ => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                SocketAddr::V6(SocketAddrV6::new(ip, self.u16()?, 0, 0))
            }
        })
    }

    fn actor(&mut self) -> Result<()> {
        self.u32()?; // uid
        self.str()?; // user
        self.u32()?; // pid
        self.str()?; // exe
        Ok(())
    }
}
