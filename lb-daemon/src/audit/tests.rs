use std::{
    fs::OpenOptions,
    io::{Seek, SeekFrom, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use super::*;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("lb-audit-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn every_kind() -> Vec<Event> {
    vec![
        Event::DaemonStart(DaemonStart {
            version: "0.1.0".into(),
            config: r#"{"ifaces":["eth0"]}"#.into(),
        }),
        Event::ConnOpen(ConnOpen {
            flow_id: 7,
            proto: Proto::Tcp,
            client: sa("10.0.1.2:40000"),
            vip: sa("10.0.0.100:80"),
            service: "web".into(),
            backend: sa("10.0.2.2:8080"),
            snat: sa("10.0.2.1:20000"),
            reason: "maglev".into(),
            generation: 1,
        }),
        Event::ConnClose(ConnClose {
            flow_id: 7,
            proto: Proto::Udp,
            client: sa("[fd00:1::2]:40000"),
            vip: sa("[fd00::100]:53"),
            service: "dns6".into(),
            backend: sa("[fd00:2::2]:5353"),
            duration_ns: 123_456_789,
            bytes_to_backend: 100,
            bytes_to_client: 333,
            packets_to_backend: 4,
            packets_to_client: 3,
            close_reason: CloseReason::IdleTimeout,
        }),
        Event::ConnDeny(ConnDeny {
            proto: Proto::Tcp,
            client: sa("10.1.2.5:1000"),
            vip: sa("10.0.0.100:22"),
            service: "adm".into(),
            reason: DenyReason::Acl,
            rule: Some("deny 10.1.2.0/24".into()),
            suppressed: 9,
        }),
        Event::DaemonStop(DaemonStop {
            reason: "signal".into(),
        }),
    ]
}

fn read_all(dir: &Path) -> anyhow::Result<Vec<Record>> {
    AuditReader::open(dir)?.collect()
}

fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(1_795_000_000_123_456_789)
}

#[test]
fn every_kind_round_trips_in_order() {
    let d = Dir::new("roundtrip");
    let mut w = AuditWriter::open(&d.0).unwrap();
    for (i, e) in every_kind().into_iter().enumerate() {
        assert_eq!(
            w.append(t0() + Duration::from_secs(i as u64), e).unwrap(),
            i as u64 + 1
        );
    }
    w.sync().unwrap();
    let recs = read_all(&d.0).unwrap();
    assert_eq!(
        recs.iter().map(|r| r.event.clone()).collect::<Vec<_>>(),
        every_kind()
    );
    assert_eq!(
        recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(recs[0].time_ns, 1_795_000_000_123_456_789);
}

#[test]
fn seq_continues_across_reopen() {
    let d = Dir::new("reopen");
    {
        let mut w = AuditWriter::open(&d.0).unwrap();
        w.append(t0(), every_kind()[0].clone()).unwrap();
        w.append(t0(), every_kind()[1].clone()).unwrap();
        w.sync().unwrap();
    }
    let mut w = AuditWriter::open(&d.0).unwrap();
    assert_eq!(w.append(t0(), every_kind()[4].clone()).unwrap(), 3);
    w.sync().unwrap();
    assert_eq!(read_all(&d.0).unwrap().len(), 3);
}

#[test]
fn a_torn_tail_is_cut_off_on_reopen() {
    let d = Dir::new("torn");
    {
        let mut w = AuditWriter::open(&d.0).unwrap();
        for e in every_kind() {
            w.append(t0(), e).unwrap();
        }
        w.sync().unwrap();
    }
    let seg = segment::segment_path(&d.0, 1);
    let len = std::fs::metadata(&seg).unwrap().len();
    // A crash in the middle of writing the last record.
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    assert_eq!(
        read_all(&d.0).unwrap().len(),
        4,
        "a reader stops before the torn record"
    );
    let mut w = AuditWriter::open(&d.0).unwrap();
    assert_eq!(
        w.append(t0(), every_kind()[4].clone()).unwrap(),
        6,
        "seq goes on after the recovery record"
    );
    w.sync().unwrap();
    let recs = read_all(&d.0).unwrap();
    assert_eq!(recs.len(), 6);
    match &recs[4].event {
        Event::Recovery(r) => {
            assert_eq!(
                (r.segment, r.bytes_removed),
                (1, len - 5 - r.offset),
                "the torn bytes"
            );
            assert!(r.reason.contains("truncated"), "{}", r.reason);
        }
        other => panic!("expected a recovery record, found {other:?}"),
    }
    assert_eq!(recs[5].event, every_kind()[4]);
}

#[test]
fn damage_in_the_middle_is_an_error_naming_the_place() {
    let d = Dir::new("flip");
    {
        let mut w = AuditWriter::open(&d.0).unwrap();
        for e in every_kind() {
            w.append(t0(), e).unwrap();
        }
        w.sync().unwrap();
    }
    let seg = segment::segment_path(&d.0, 1);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    f.seek(SeekFrom::Start(segment::HEADER_LEN as u64 + 20))
        .unwrap();
    f.write_all(&[0xff]).unwrap();
    let err = format!("{:#}", read_all(&d.0).unwrap_err());
    assert!(
        err.contains("00000001.lbaudit") && err.contains("offset 128") && err.contains("checksum"),
        "{err}"
    );
    // The writer does not take damage followed by whole records for a torn tail: it refuses
    // to append, and cuts nothing off.
    let before = std::fs::read(&seg).unwrap();
    let err = format!("{:#}", AuditWriter::open(&d.0).err().expect("refused"));
    assert!(
        err.contains("offset 128") && err.contains("not a write cut short"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        before,
        "the segment is left as it was"
    );
}

#[test]
fn garbage_is_refused_not_panicked_on() {
    let d = Dir::new("garbage");
    std::fs::create_dir_all(&d.0).unwrap();
    std::fs::write(segment::segment_path(&d.0, 1), b"definitely not a segment").unwrap();
    assert!(read_all(&d.0).is_err());
    assert!(
        AuditWriter::open(&d.0).is_err(),
        "the writer does not append to something it cannot read"
    );
    let header = |incompat| segment::Header {
        incompat,
        compat: 0,
        index: 1,
        first_seq: 1,
        created_ns: 0,
        host_id: [0; 16],
        boot_id: [0; 16],
        prev_head: [0; 32],
    };
    std::fs::write(segment::segment_path(&d.0, 1), header(0x8000).encode()).unwrap();
    let err = format!("{:#}", read_all(&d.0).unwrap_err());
    assert!(err.contains("incompatible features"), "{err}");
    // Random bytes after a valid header: an error or a clean end, never a panic or a hang.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300 {
        let mut seg = header(0).encode().to_vec();
        for _ in 0..(seed % 64) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seg.push(seed as u8);
        }
        std::fs::write(segment::segment_path(&d.0, 1), &seg).unwrap();
        let _ = read_all(&d.0);
    }
}

#[test]
fn json_uses_the_contract_names() {
    let recs: Vec<Record> = every_kind()
        .into_iter()
        .enumerate()
        .map(|(i, event)| Record {
            seq: i as u64 + 1,
            time_ns: 1_795_000_000_123_456_789,
            event,
        })
        .collect();
    let j: Vec<_> = recs.iter().map(record_to_json).collect();
    assert_eq!(j[0]["kind"], "daemon_start");
    assert_eq!(
        j[0]["config"]["ifaces"][0], "eth0",
        "config is the parsed object"
    );
    assert_eq!(j[0]["time"], "2026-11-18T11:06:40.123456789Z");
    for k in [
        "flow_id",
        "proto",
        "client",
        "vip",
        "service",
        "backend",
        "snat",
        "reason",
        "generation",
    ] {
        assert!(!j[1][k].is_null(), "conn_open lacks {k}");
    }
    assert_eq!(j[1]["client"], "10.0.1.2:40000");
    for k in [
        "flow_id",
        "proto",
        "client",
        "vip",
        "service",
        "backend",
        "duration_ns",
        "bytes_to_backend",
        "bytes_to_client",
        "packets_to_backend",
        "packets_to_client",
        "close_reason",
    ] {
        assert!(!j[2][k].is_null(), "conn_close lacks {k}");
    }
    assert_eq!(j[2]["client"], "[fd00:1::2]:40000");
    assert_eq!(j[2]["close_reason"], "idle_timeout");
    assert_eq!(
        (j[3]["reason"].as_str(), j[3]["rule"].as_str()),
        (Some("acl"), Some("deny 10.1.2.0/24"))
    );
    assert_eq!(j[4]["kind"], "daemon_stop");
}

/// The two example frames of docs/audit-format.md, byte for byte: the encoding is frozen, and
/// the bytes decode back to the records.
#[test]
fn golden_frames_match_the_specification() {
    for (bytes, rec) in [(GOLDEN_OPEN, 1u64), (GOLDEN_CLOSE, 300)] {
        let raw: Vec<u8> = bytes
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        let (decoded, used) =
            bincode::serde::decode_from_slice::<Record, _>(&raw[9..], segment::bincode_config())
                .unwrap();
        assert_eq!((decoded.seq, used), (rec, raw.len() - 9));
        assert_eq!(
            crc32c::crc32c(&raw[8..]),
            u32::from_le_bytes(raw[4..8].try_into().unwrap())
        );
    }
    let hex = |f: Vec<u8>| {
        f.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let open = Record {
        seq: 1,
        time_ns: 1_795_000_000_123_456_789,
        event: every_kind()[1].clone(),
    };
    assert_eq!(
        hex(segment::encode_frame(&open).unwrap()),
        norm(GOLDEN_OPEN)
    );
    let close = Record {
        seq: 300,
        time_ns: 1_795_000_000_123_456_789,
        event: every_kind()[2].clone(),
    };
    assert_eq!(
        hex(segment::encode_frame(&close).unwrap()),
        norm(GOLDEN_CLOSE)
    );
}

const GOLDEN_OPEN: &str = "38 00 00 00 af 8e 71 d7 01 01 fd 2a 9a 5e c6 fa 3d d2 31 02 07 00 00 0a 00 01 02 fb 40 9c
    00 0a 00 00 64 50 03 77 65 62 00 0a 00 02 02 fb 90 1f 00 0a 00 02 01 fb 20 4e 06 6d 61 67 6c 65 76 01";

const GOLDEN_CLOSE: &str = "5b 00 00 00 a7 66 32 ec 01 fb 2c 01 fd 2a 9a 5e c6 fa 3d d2 31 03 07 01 01 fd 00 00 01
    00 00 00 00 00 00 00 00 00 00 00 02 fb 40 9c 01 fd 00 00 00 00 00 00 00 00 00 00 00 00 00 01 00 35 04 64 6e 73
    36 01 fd 00 00 02 00 00 00 00 00 00 00 00 00 00 00 02 fb e9 14 fc 15 cd 5b 07 64 fb 4d 01 04 03 02";

fn key_file(d: &Dir) -> PathBuf {
    let p = d.0.with_extension("key");
    std::fs::write(&p, "0123456789abcdef-test-seal-key\n").unwrap();
    p
}

/// A sealed log of `n` records over several small segments.
fn sealed_log(d: &Dir, n: u64) -> PathBuf {
    let key = key_file(d);
    let opts = Options {
        segment_bytes: 2048,
        checkpoint_records: 7,
        seal_key: Some(SealKey::from_file(&key).unwrap()),
        ..Options::default()
    };
    let mut w = AuditWriter::open_with(&d.0, opts).unwrap();
    for i in 0..n {
        w.append(t0(), every_kind()[(i % 5) as usize].clone())
            .unwrap();
    }
    w.close().unwrap();
    key
}

fn verify_with(d: &Dir, key: &Path) -> Result<verify::Report, verify::Damage> {
    verify::verify(&d.0, Some(SealKey::from_file(key).unwrap()))
}

/// Frames of a segment: (offset, bytes).
fn frames(path: &Path) -> Vec<(usize, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = segment::HEADER_LEN;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        out.push((at, bytes[at..at + 8 + len].to_vec()));
        at += 8 + len;
    }
    out
}

/// A frame around `body` (its type byte and payload), length and checksum as the writer makes
/// them: damage inside a frame that its checksum does not give away.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

fn rewrite_segment(path: &Path, edit: impl FnOnce(&mut Vec<Vec<u8>>)) {
    let bytes = std::fs::read(path).unwrap();
    let mut fs: Vec<Vec<u8>> = frames(path).into_iter().map(|(_, f)| f).collect();
    edit(&mut fs);
    let mut out = bytes[..segment::HEADER_LEN].to_vec();
    for f in fs {
        out.extend_from_slice(&f);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn an_intact_sealed_log_verifies_across_segments() {
    let d = Dir::new("intact");
    let key = sealed_log(&d, 60);
    let r = verify_with(&d, &key).expect("intact");
    assert!(r.segments >= 3, "{} segments", r.segments);
    assert!(r.checkpoints >= 8);
    assert_eq!(
        r.proven_through,
        r.last_seq.map(|s| s - 1),
        "close() ends with a checkpoint"
    );
    // Without the key the chain still verifies.
    assert!(verify::verify(&d.0, None).is_ok());
    // A wrong key does not.
    let wrong = d.0.with_extension("wrong");
    std::fs::write(&wrong, "another key of enough length").unwrap();
    let e = verify_with(&d, &wrong).unwrap_err();
    assert!(e.what.contains("seal"), "{e}");
    // Reopening continues seq, chain and seal epochs.
    let opts = Options {
        seal_key: Some(SealKey::from_file(&key).unwrap()),
        ..Options::default()
    };
    let mut w = AuditWriter::open_with(&d.0, opts).unwrap();
    w.append(t0(), every_kind()[4].clone()).unwrap();
    w.close().unwrap();
    assert!(verify_with(&d, &key).is_ok());
}

#[test]
fn tampering_is_detected_and_located() {
    let seg1 = |d: &Dir| segment::segment_path(&d.0, 1);
    type Damage<'a> = Box<dyn Fn(&Dir) + 'a>;
    let cases: Vec<(&str, Damage<'_>, &str)> = vec![
        (
            "flipped byte",
            Box::new(|d| {
                let mut b = std::fs::read(seg1(d)).unwrap();
                b[segment::HEADER_LEN + 30] ^= 0x01;
                std::fs::write(seg1(d), b).unwrap();
            }),
            "checksum",
        ),
        (
            "deleted record",
            Box::new(|d| {
                rewrite_segment(&seg1(d), |f| {
                    f.remove(2);
                })
            }),
            "seq",
        ),
        (
            "inserted record",
            Box::new(|d| {
                rewrite_segment(&seg1(d), |f| {
                    let x = f[1].clone();
                    f.insert(3, x);
                })
            }),
            "seq",
        ),
        (
            "reordered records",
            Box::new(|d| rewrite_segment(&seg1(d), |f| f.swap(1, 2))),
            "seq",
        ),
        (
            "removed segment",
            Box::new(|d| std::fs::remove_file(segment::segment_path(&d.0, 2)).unwrap()),
            "missing",
        ),
        (
            "reordered segments",
            Box::new(|d| {
                let (a, b) = (
                    segment::segment_path(&d.0, 2),
                    segment::segment_path(&d.0, 3),
                );
                let tmp = d.0.join("tmp");
                std::fs::rename(&a, &tmp).unwrap();
                std::fs::rename(&b, &a).unwrap();
                std::fs::rename(&tmp, &b).unwrap();
            }),
            "segment",
        ),
        (
            "truncated in the middle",
            Box::new(|d| {
                let len = std::fs::metadata(seg1(d)).unwrap().len();
                OpenOptions::new()
                    .write(true)
                    .open(seg1(d))
                    .unwrap()
                    .set_len(len - 10)
                    .unwrap();
            }),
            "truncated",
        ),
    ];
    for (what, damage, expect) in cases {
        let d = Dir::new(&what.replace(' ', "-"));
        let key = sealed_log(&d, 60);
        damage(&d);
        let e = verify_with(&d, &key).expect_err(what);
        assert!(e.to_string().contains(expect), "{what}: {e}");
        assert!(e.segment.starts_with(&d.0), "{what}: names the segment");
    }
}

#[test]
fn a_recomputed_chain_does_not_verify_without_the_key() {
    let d = Dir::new("forged");
    let key = sealed_log(&d, 30);
    // Someone without the key rewrites history: changes a record, and rebuilds every frame,
    // chain head and checkpoint so that everything but the seals is consistent.
    let mut recs: Vec<Record> = AuditReader::open(&d.0)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    if let Event::ConnOpen(o) = &mut recs[1].event {
        o.client = sa("10.66.66.66:40000");
    }
    let forged = Dir::new("forged-copy");
    let mut w = AuditWriter::open_with(
        &forged.0,
        Options {
            segment_bytes: u64::MAX,
            checkpoint_records: u64::MAX,
            ..Options::default()
        },
    )
    .unwrap();
    let mut head = [0u8; 32];
    for r in &recs {
        let event = match &r.event {
            // Keep the original seals: they do not match the new heads.
            Event::Checkpoint(c) => Event::Checkpoint(Checkpoint {
                head,
                epoch: c.epoch,
                seal: c.seal,
            }),
            e => e.clone(),
        };
        let rec = Record {
            seq: r.seq,
            time_ns: r.time_ns,
            event: event.clone(),
        };
        head = segment::chain(&head, &segment::encode_frame(&rec).unwrap());
        w.append(
            SystemTime::UNIX_EPOCH + Duration::from_nanos(r.time_ns as u64),
            event,
        )
        .unwrap();
    }
    w.sync().unwrap();
    assert!(
        verify::verify(&forged.0, None).is_ok(),
        "the forged chain is self-consistent"
    );
    let e = verify_with(&forged, &key).unwrap_err();
    assert!(e.what.contains("seal"), "{e}");
}

#[test]
fn fsync_policies_parse() {
    assert_eq!("always".parse::<FsyncPolicy>(), Ok(FsyncPolicy::Always));
    assert_eq!("never".parse::<FsyncPolicy>(), Ok(FsyncPolicy::Never));
    assert_eq!(
        "interval=250ms".parse::<FsyncPolicy>(),
        Ok(FsyncPolicy::Interval(Duration::from_millis(250)))
    );
    assert!("sometimes".parse::<FsyncPolicy>().is_err());
}

#[test]
fn retention_deletes_old_segments_on_record_and_the_rest_still_verifies() {
    let d = Dir::new("retain");
    let opts = Options {
        segment_bytes: 2048,
        retain_bytes: Some(6000),
        checkpoint_records: 10,
        ..Options::default()
    };
    let mut w = AuditWriter::open_with(&d.0, opts).unwrap();
    for i in 0..300u64 {
        w.append(t0(), every_kind()[(i % 5) as usize].clone())
            .unwrap();
    }
    w.close().unwrap();
    let segs = segment::list(&d.0).unwrap();
    assert!(segs[0].0 > 1, "old segments are gone");
    let total: u64 = segs
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        total <= 6000 + 2048 + 512,
        "the log stays near its limit: {total}"
    );
    let r = verify::verify(&d.0, None).expect("what is left verifies");
    assert_eq!(
        r.deleted_segments,
        segs[0].0 - 1,
        "every deletion is on record"
    );
    let recs: Vec<Record> = AuditReader::open(&d.0)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let newest_gone = segs[0].0 - 1;
    assert!(recs.iter().any(|r| matches!(&r.event, Event::SegmentDeleted(s) if s.index == newest_gone && s.reason == "size")));
    // A segment removed by someone else is not on record.
    std::fs::remove_file(&segs[0].1).unwrap();
    let e = verify::verify(&d.0, None).unwrap_err();
    assert!(e.what.contains("no record says it was deleted"), "{e}");
}

#[test]
fn segments_rotate_by_age() {
    let d = Dir::new("age");
    let opts = Options {
        segment_age: Duration::ZERO,
        ..Options::default()
    };
    let mut w = AuditWriter::open_with(&d.0, opts).unwrap();
    for e in every_kind() {
        w.append(t0(), e).unwrap();
        w.sync().unwrap();
    }
    w.close().unwrap();
    assert!(segment::list(&d.0).unwrap().len() >= 5);
    assert!(verify::verify(&d.0, None).is_ok());
}

/// Randomized corruption of a sealed multi-segment log: every flipped byte and every cut in a
/// closed segment is detected by `verify` (never a panic, never a clean "intact"), and `read`
/// either errors or stops — it never returns a record that is not in the original log.
#[test]
fn random_corruption_is_always_detected() {
    let d = Dir::new("fuzz");
    let key = sealed_log(&d, 80);
    let segs = segment::list(&d.0).unwrap();
    let originals: Vec<Vec<u8>> = segs
        .iter()
        .map(|(_, p)| std::fs::read(p).unwrap())
        .collect();
    let good: Vec<Record> = read_all(&d.0).unwrap();
    let mut rng = 0x1234_5678_9abc_def1u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..400 {
        let s = (next() % segs.len() as u64) as usize;
        let mut bytes = originals[s].clone();
        let cut = next() % 3 == 0 && s + 1 < segs.len();
        if cut {
            bytes.truncate((next() % bytes.len() as u64) as usize);
        } else {
            let at = (next() % bytes.len() as u64) as usize;
            bytes[at] ^= 1 << (next() % 8);
        }
        std::fs::write(&segs[s].1, &bytes).unwrap();
        match verify_with(&d, &key) {
            Err(_) => {}
            // A damaged length in the very last frame reads as a write torn by a crash, which
            // verify reports (and the daemon cuts off) rather than calls tampering.
            Ok(r) => assert!(
                s + 1 == segs.len() && r.torn_tail_bytes > 0,
                "case {i}: corruption of segment {s} went unnoticed"
            ),
        }
        for rec in AuditReader::open(&d.0).unwrap() {
            match rec {
                Ok(r) => assert!(
                    good.contains(&r),
                    "case {i}: read returned a record not in the log"
                ),
                Err(_) => break,
            }
        }
        std::fs::write(&segs[s].1, &originals[s]).unwrap();
    }
    assert!(verify_with(&d, &key).is_ok());
}

/// A small deterministic generator (xorshift64) for the randomized tests below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Integers of every varint width, and the edges between them.
    fn int(&mut self) -> u64 {
        match self.below(6) {
            0 => self.below(251),
            1 => 250 + self.below(3),
            2 => self.below(1 << 16),
            3 => self.below(1 << 32),
            4 => [u64::MAX, 0xffff, 0x10000, 0xffff_ffff, 1 << 32][self.below(5) as usize],
            _ => self.next(),
        }
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len() as u64) as usize]
    }

    fn text(&mut self) -> String {
        let words = ["web", "dns6", "", "adm", "ünïcödé", "a,b\"c", "maglev", "x"];
        let mut s = self.pick(&words).to_string();
        if self.below(8) == 0 {
            s.push_str(&"y".repeat(self.below(300) as usize));
        }
        s
    }

    fn opt_text(&mut self) -> Option<String> {
        (self.below(2) == 0).then(|| self.text())
    }

    fn addr(&mut self) -> SocketAddr {
        let ips = [
            "10.1.0.7",
            "10.1.0.200",
            "10.0.0.100",
            "10.0.2.2",
            "fd00::100",
            "fd00:1::2",
        ];
        let port = [0u16, 80, 250, 251, 8080, 65535][self.below(6) as usize];
        SocketAddr::new(self.pick(&ips).parse().unwrap(), port)
    }

    fn proto(&mut self) -> Proto {
        if self.below(2) == 0 {
            Proto::Tcp
        } else {
            Proto::Udp
        }
    }

    fn actor(&mut self) -> Actor {
        Actor {
            uid: self.int() as u32,
            user: self.text(),
            pid: self.int() as u32,
            exe: self.text(),
        }
    }

    fn hash(&mut self) -> [u8; 32] {
        let mut h = [0u8; 32];
        h.iter_mut().for_each(|b| *b = self.next() as u8);
        h
    }

    /// A record of any kind with arbitrary fields.
    fn record(&mut self) -> Record {
        let event = match self.below(14) {
            0 => Event::DaemonStart(DaemonStart {
                version: self.text(),
                config: self.text(),
            }),
            1 => Event::DaemonStop(DaemonStop {
                reason: self.text(),
            }),
            2 => Event::ConnOpen(ConnOpen {
                flow_id: self.int(),
                proto: self.proto(),
                client: self.addr(),
                vip: self.addr(),
                service: self.text(),
                backend: self.addr(),
                snat: self.addr(),
                reason: self.text(),
                generation: self.int() as u32,
            }),
            3 => Event::ConnClose(ConnClose {
                flow_id: self.int(),
                proto: self.proto(),
                client: self.addr(),
                vip: self.addr(),
                service: self.text(),
                backend: self.addr(),
                duration_ns: self.int(),
                bytes_to_backend: self.int(),
                bytes_to_client: self.int(),
                packets_to_backend: self.int(),
                packets_to_client: self.int(),
                close_reason: [
                    CloseReason::Fin,
                    CloseReason::Rst,
                    CloseReason::IdleTimeout,
                    CloseReason::Evicted,
                    CloseReason::Shutdown,
                ][self.below(5) as usize],
            }),
            4 => Event::ConnDeny(ConnDeny {
                proto: self.proto(),
                client: self.addr(),
                vip: self.addr(),
                service: self.text(),
                reason: [
                    DenyReason::Acl,
                    DenyReason::RateLimited,
                    DenyReason::NoBackend,
                    DenyReason::SnatExhausted,
                    DenyReason::ConntrackFull,
                    DenyReason::AuditUnavailable,
                ][self.below(6) as usize],
                rule: self.opt_text(),
                suppressed: self.int(),
            }),
            5 => Event::Checkpoint(Checkpoint {
                head: self.hash(),
                epoch: self.int(),
                seal: (self.below(2) == 0).then(|| self.hash()),
            }),
            6 => Event::Recovery(Recovery {
                segment: self.int(),
                offset: self.int(),
                bytes_removed: self.int(),
                reason: self.text(),
            }),
            7 => Event::Loss(Loss {
                source: self.text(),
                count: self.int(),
                since_ns: self.int() as i64,
                until_ns: self.int() as i64,
            }),
            8 => Event::ConfigChange(ConfigChange {
                actor: self.actor(),
                action: self.text(),
                target: self.text(),
                before: self.text(),
                after: self.text(),
                generation_before: self.int(),
                generation_after: self.int(),
            }),
            9 => Event::HealthChange(HealthChange {
                service: self.text(),
                backend: self.addr(),
                from: self.text(),
                to: self.text(),
                consecutive_failures: self.int() as u32,
                last_error: self.opt_text(),
            }),
            10 => Event::ControlDenied(ControlDenied {
                actor: self.actor(),
                action: self.text(),
                target: self.text(),
                reason: self.text(),
            }),
            11 => Event::Alert(Alert {
                rule: self.text(),
                source: self.opt_text(),
                message: self.text(),
                action: self.opt_text(),
            }),
            12 => Event::SegmentDeleted(SegmentDeleted {
                index: self.int(),
                first_seq: self.int(),
                last_seq: self.int(),
                bytes: self.int(),
                reason: self.text(),
            }),
            _ => Event::BackendDrained(BackendDrained {
                service: self.text(),
                backend: self.addr(),
            }),
        };
        Record {
            seq: self.int(),
            time_ns: self.int() as i64,
            event,
        }
    }

    /// A filter of a few random conditions, drawn from values records have.
    fn filter(&mut self) -> filter::Filter {
        let mut f = filter::Filter::default();
        for _ in 0..1 + self.below(3) {
            match self.below(9) {
                0 => f.since_ns = Some(self.int() as i64),
                1 => f.until_ns = Some(self.int() as i64),
                2 => {
                    f.kinds = (0..1 + self.below(3))
                        .map(|_| scan::KINDS[self.below(14) as usize].to_string())
                        .collect()
                }
                3 => {
                    f.client = Some(
                        self.pick(&["10.1.0.0/24", "10.0.0.0/8", "fd00::/16", "10.1.0.7/32"])
                            .parse()
                            .unwrap(),
                    )
                }
                4 => {
                    let a = self.addr();
                    f.vip = Some(if self.below(2) == 0 {
                        filter::Endpoint::Ip(a.ip())
                    } else {
                        filter::Endpoint::Socket(a)
                    })
                }
                5 => f.service = Some(self.text()),
                6 => {
                    let a = self.addr();
                    f.backend = Some(if self.below(2) == 0 {
                        filter::Endpoint::Ip(a.ip())
                    } else {
                        filter::Endpoint::Socket(a)
                    })
                }
                7 => f.proto = Some(self.proto()),
                _ => f.flow = Some(self.int()),
            }
        }
        f
    }
}

fn payload(r: &Record) -> Vec<u8> {
    segment::encode_frame(r).unwrap()[9..].to_vec()
}

#[test]
fn scan_names_kinds_as_the_records_do() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < scan::KINDS.len() {
        let r = rng.record();
        let p = payload(&r);
        assert_eq!(scan::scan(&p).unwrap().kind, r.event.kind());
        seen.insert(r.event.kind());
    }
    // No variant beyond the last known one decodes, in either decoder.
    let mut p = payload(&Record {
        seq: 1,
        time_ns: 0,
        event: Event::DaemonStop(DaemonStop { reason: "".into() }),
    });
    p[2] = scan::KINDS.len() as u8;
    assert!(scan::scan(&p).is_err());
    assert!(segment::decode_payload(&p).is_err());
}

/// The fast path agrees with the full decoder: on every random record it reads the same
/// fields, and on damaged payloads (bytes flipped, set to varint markers, cut, inserted) it
/// accepts exactly what the decoder accepts, with the same fields.
#[test]
fn scan_agrees_with_the_full_decoder() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..20_000 {
        let r = rng.record();
        let good = payload(&r);
        assert_eq!(scan::scan(&good), Ok(scan::Fields::of(&r)), "{r:?}");
        let mut bad = good.clone();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(bad.len() as u64) as usize;
            match rng.below(5) {
                0 => bad[at] ^= 1 << rng.below(8),
                1 => bad[at] = 250 + rng.below(6) as u8,
                2 => bad.truncate(at),
                3 => bad.insert(at, rng.next() as u8),
                _ => bad[at] = rng.below(3) as u8,
            }
            if bad.is_empty() {
                break;
            }
        }
        match (scan::scan(&bad), segment::decode_payload(&bad)) {
            (Ok(f), Ok(rec)) => {
                assert_eq!(f, scan::Fields::of(&rec));
                accepted += 1;
            }
            (Err(_), Err(_)) => refused += 1,
            (s, d) => panic!("scan {s:?} but the decoder {d:?} on {bad:02x?}"),
        }
    }
    // Both outcomes were exercised.
    assert!(accepted > 1000 && refused > 1000, "{accepted} {refused}");
}

/// `read` with a filter (the scanning path) returns exactly the records that the filter
/// matches on the fully decoded log, over random logs and random filters.
#[test]
fn filtered_reading_matches_filtering_decoded_records() {
    let d = Dir::new("filtered");
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut w = AuditWriter::open_with(
        &d.0,
        Options {
            segment_bytes: 16 << 10,
            fsync: FsyncPolicy::Never,
            ..Options::default()
        },
    )
    .unwrap();
    for _ in 0..3000 {
        let r = rng.record();
        let ns = r.time_ns.unsigned_abs() % (1 << 62);
        w.append(SystemTime::UNIX_EPOCH + Duration::from_nanos(ns), r.event)
            .unwrap();
    }
    w.close().unwrap();
    assert!(segment::list(&d.0).unwrap().len() > 3);
    let all = read_all(&d.0).unwrap();
    let mut nonempty = 0;
    for _ in 0..300 {
        let mut f = rng.filter();
        if rng.below(3) == 0 {
            // Times that split the log.
            f.since_ns = Some(all[rng.below(all.len() as u64) as usize].time_ns);
        }
        let expected: Vec<&Record> = all.iter().filter(|r| f.matches(r)).collect();
        let got: Vec<Record> = AuditReader::open(&d.0)
            .unwrap()
            .matching(&f)
            .collect::<anyhow::Result<_>>()
            .unwrap();
        assert_eq!(got.iter().collect::<Vec<_>>(), expected, "{f:?}");
        nonempty += !got.is_empty() as usize;
    }
    assert!(
        nonempty > 50,
        "too few filters matched anything: {nonempty}"
    );
}

/// Damage that only the decoder would find (a frame with a good checksum around a payload
/// that does not decode) is still an error when the filter rejects the record.
#[test]
fn filtered_reading_still_reports_undecodable_records() {
    let d = Dir::new("filtered-bad");
    let mut w = AuditWriter::open(&d.0).unwrap();
    for e in every_kind() {
        w.append(t0(), e).unwrap();
    }
    w.close().unwrap();
    let (_, path) = segment::list(&d.0).unwrap()[0].clone();
    rewrite_segment(&path, |frames| {
        // The conn_deny's reason set to an unknown DenyReason, checksum recomputed.
        let f = &mut frames[3];
        let mut body = f[8..].to_vec();
        let rec: Record = segment::decode_payload(&body[1..]).unwrap();
        assert_eq!(rec.event.kind(), "conn_deny");
        // ... reason, rule tag, rule length, rule, suppressed (one byte each but the rule).
        let at = body.len() - 1 - "deny 10.1.2.0/24".len() - 3;
        assert_eq!(body[at], 0, "DenyReason::Acl");
        body[at] = 9;
        *f = framed(&body);
    });
    let f = filter::Filter {
        kinds: vec!["daemon_stop".into()],
        ..Default::default()
    };
    let err = AuditReader::open(&d.0)
        .unwrap()
        .matching(&f)
        .collect::<anyhow::Result<Vec<_>>>()
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("undecodable record") && msg.contains("offset"),
        "{msg}"
    );
}

/// A frame with a good checksum around a payload whose string claims to be enormous is damage
/// for `read` (with and without a filter) and `verify`, never an attempt to allocate that much.
#[test]
fn huge_lengths_inside_a_valid_frame_are_errors() {
    let d = Dir::new("huge-len");
    let mut w = AuditWriter::open(&d.0).unwrap();
    for e in every_kind() {
        w.append(t0(), e).unwrap();
    }
    w.close().unwrap();
    let (_, path) = segment::list(&d.0).unwrap()[0].clone();
    rewrite_segment(&path, |frames| {
        // daemon_stop { reason }: seq, time, variant, then the reason's length.
        let f = &mut frames[4];
        let rec: Record = segment::decode_payload(&f[9..]).unwrap();
        assert_eq!(rec.event.kind(), "daemon_stop");
        let mut body = vec![segment::FRAME_RECORD];
        body.extend_from_slice(
            &bincode::serde::encode_to_vec(rec.seq, segment::bincode_config()).unwrap(),
        );
        body.extend_from_slice(
            &bincode::serde::encode_to_vec(rec.time_ns, segment::bincode_config()).unwrap(),
        );
        body.push(1); // DaemonStop
        body.push(253);
        body.extend_from_slice(&(1u64 << 40).to_le_bytes());
        body.extend_from_slice(b"signal");
        *f = framed(&body);
    });
    let all: anyhow::Result<Vec<Record>> = AuditReader::open(&d.0).unwrap().collect();
    assert!(format!("{:#}", all.unwrap_err()).contains("undecodable record"));
    let f = filter::Filter {
        kinds: vec!["daemon_stop".into()],
        ..Default::default()
    };
    let some: anyhow::Result<Vec<Record>> = AuditReader::open(&d.0).unwrap().matching(&f).collect();
    assert!(some.is_err());
    let damage = verify::verify(&d.0, None).unwrap_err();
    assert!(damage.what.contains("undecodable record"), "{damage}");
}
