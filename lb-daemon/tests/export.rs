//! Export to a collector that goes away mid-stream and comes back, and to a restarted
//! exporter: every `seq` arrives (at least once), in the chosen format.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use lb_daemon::{
    audit::{AuditWriter, DaemonStop, Event},
    export,
};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A collector on `addr` recording every `seq` it receives, until `stop`.
fn collector(
    listener: TcpListener,
    got: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    syslog: bool,
) {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut r = BufReader::new(conn);
            while !stop.load(Ordering::Relaxed) {
                let seq = if syslog {
                    // Octet counting: "LEN SP MSG".
                    let mut len = Vec::new();
                    match r.read_until(b' ', &mut len) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(_) => continue,
                    }
                    let n: usize = String::from_utf8_lossy(&len).trim().parse().unwrap();
                    let mut msg = vec![0u8; n];
                    r.read_exact(&mut msg).unwrap();
                    let msg = String::from_utf8(msg).unwrap();
                    assert!(
                        msg.starts_with("<8") && msg.contains(" lb-daemon - "),
                        "{msg}"
                    );
                    let json = &msg[msg.find('{').unwrap()..];
                    serde_json::from_str::<serde_json::Value>(json).unwrap()["seq"]
                        .as_u64()
                        .unwrap()
                } else {
                    let mut line = String::new();
                    match r.read_line(&mut line) {
                        Ok(0) => break,
                        Ok(_) => serde_json::from_str::<serde_json::Value>(&line).unwrap()["seq"]
                            .as_u64()
                            .unwrap(),
                        Err(_) => continue,
                    }
                };
                got.lock().unwrap().push(seq);
            }
        }
    });
}

fn write(w: &mut AuditWriter, n: usize) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        last = w
            .append(
                SystemTime::now(),
                Event::DaemonStop(DaemonStop {
                    reason: "test".into(),
                }),
            )
            .unwrap();
    }
    w.sync().unwrap();
    last
}

fn wait_for(got: &Mutex<Vec<u64>>, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !got.lock().unwrap().contains(&seq) {
        assert!(Instant::now() < deadline, "seq {seq} never arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scenario(syslog: bool) {
    let dir = Dir(std::env::temp_dir().join(format!("lb-export-{}-{syslog}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let mut w = AuditWriter::open(&dir.0).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let target: export::Target = format!("{}://{addr}", if syslog { "syslog+tcp" } else { "tcp" })
        .parse()
        .unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let collector_stop = Arc::new(AtomicBool::new(false));
    collector(listener, got.clone(), collector_stop.clone(), syslog);
    let stop = Arc::new(AtomicBool::new(false));
    let exporter = export::spawn(dir.0.clone(), target.clone(), stop.clone());
    wait_for(&got, write(&mut w, 100));

    // The collector goes away; records keep coming; it comes back on the same port.
    collector_stop.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    write(&mut w, 150);
    std::thread::sleep(Duration::from_millis(500));
    let collector_stop = Arc::new(AtomicBool::new(false));
    collector(
        TcpListener::bind(addr).unwrap(),
        got.clone(),
        collector_stop.clone(),
        syslog,
    );
    let last = write(&mut w, 50);
    wait_for(&got, last);

    // The exporter restarts (as with the daemon): it resumes after its cursor.
    stop.store(true, Ordering::Relaxed);
    exporter.join().unwrap();
    let before_restart = got.lock().unwrap().len();
    let last = write(&mut w, 30);
    let stop = Arc::new(AtomicBool::new(false));
    let exporter = export::spawn(dir.0.clone(), target, stop.clone());
    wait_for(&got, last);
    stop.store(true, Ordering::Relaxed);
    exporter.join().unwrap();
    collector_stop.store(true, Ordering::Relaxed);

    let got = got.lock().unwrap();
    let distinct: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(
        distinct,
        (1..=last).collect::<BTreeSet<u64>>(),
        "every seq arrived"
    );
    let resent_after_restart = got[before_restart..]
        .iter()
        .filter(|s| **s <= last - 30)
        .count();
    assert!(
        resent_after_restart < 50,
        "the restart resumed from the cursor, not the start ({resent_after_restart} resent)"
    );
}

#[test]
fn json_lines_survive_a_collector_outage_and_an_exporter_restart() {
    scenario(false);
}

#[test]
fn syslog_rfc5424_with_octet_counting() {
    scenario(true);
}

#[test]
fn targets_parse() {
    assert!("tcp://collector:5170".parse::<export::Target>().is_ok());
    assert!(
        "syslog+tcp://10.0.0.1:6514"
            .parse::<export::Target>()
            .unwrap()
            .syslog
    );
    assert!("udp://x:1".parse::<export::Target>().is_err());
    assert!("tcp://nohost".parse::<export::Target>().is_err());
}
