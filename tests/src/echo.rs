//! A TCP echo server for backend namespaces, and the client side of one exchange.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};

use crate::netns::spawn_in_netns;

/// How long one echo connection may stay silent before the server gives it up.
const IDLE: Duration = Duration::from_secs(30);

/// One connection an [`EchoServer`] handled.
#[derive(Clone, Debug)]
pub struct Served {
    /// The peer as the server saw it (behind a full-NAT balancer: the SNAT address and port).
    pub peer: SocketAddr,
    /// Bytes echoed back.
    pub bytes: u64,
}

/// A TCP echo server listening inside a namespace until stopped or dropped: each connection
/// gets back every byte it sends, and a FIN after its own FIN.
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    served: Arc<Mutex<Vec<Served>>>,
    accepted: Arc<Mutex<usize>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl EchoServer {
    /// Binds `addr` inside namespace `ns` and serves in the background.
    pub fn start(ns: &str, addr: SocketAddr) -> Result<EchoServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(0usize));
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop2, served2, accepted2) = (stop.clone(), served.clone(), accepted.clone());
        let thread = spawn_in_netns(ns, move || {
            let listener =
                match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(anyhow!("binding {addr}: {e}")));
                        return Ok(());
                    }
                };
            let mut handlers = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        *accepted2.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                        let served = served2.clone();
                        handlers.push(std::thread::spawn(move || {
                            if let Ok(bytes) = echo(stream) {
                                served
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(Served { peer, bytes });
                            }
                        }));
                        handlers.retain(|h| !h.is_finished());
                    }
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e).context("accept"),
                }
            }
            for h in handlers {
                let _ = h.join();
            }
            Ok(())
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(EchoServer {
                addr,
                stop,
                served,
                accepted,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e.context(format!("echo server in {ns}"))),
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e.context(format!("echo server in {ns}"))),
                _ => Err(anyhow!("echo server in {ns} did not start")),
            },
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections fully served so far (echoed to the end and closed).
    pub fn served(&self) -> Vec<Served> {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops accepting, waits for the connections in progress (each bounded by an idle
    /// timeout) and returns what was served.
    pub fn stop(mut self) -> Vec<Served> {
        self.shutdown();
        self.served()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Echoes until the peer's FIN, then sends our own; returns the byte count.
fn echo(mut stream: TcpStream) -> std::io::Result<u64> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(IDLE))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
        total += n as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(total)
}

/// What one client exchange did.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The client's own address (its port identifies the flow in the audit log).
    pub local: SocketAddr,
    /// Bytes sent.
    pub sent: usize,
    /// Everything received until the server's FIN.
    pub received: Vec<u8>,
    /// From connect to the server's FIN.
    pub elapsed: Duration,
}

/// Connects to `target`, sends `payload`, half-closes, and reads until EOF; every step is
/// bounded by `limit` (connect, and each read or write stalling). Call it inside the client's
/// namespace ([`crate::in_netns`]).
pub fn echo_exchange(target: SocketAddr, payload: &[u8], limit: Duration) -> Result<Exchange> {
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&target, limit)
        .with_context(|| format!("connecting to {target}"))?;
    let local = stream.local_addr()?;
    stream.set_read_timeout(Some(limit))?;
    stream.set_write_timeout(Some(limit))?;
    let mut writer = stream.try_clone()?;
    let mut reader = stream;
    let received = std::thread::scope(|s| -> Result<Vec<u8>> {
        let w = s.spawn(move || -> std::io::Result<()> {
            writer.write_all(payload)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut received = Vec::with_capacity(payload.len());
        let r = reader.read_to_end(&mut received);
        let w = w.join().map_err(|_| anyhow!("writer thread panicked"))?;
        w.with_context(|| format!("{local} → {target}: sending {} bytes", payload.len()))?;
        r.with_context(|| {
            format!(
                "{local} → {target}: reading the echo (got {} bytes so far)",
                received.len()
            )
        })?;
        Ok(received)
    })?;
    Ok(Exchange {
        local,
        sent: payload.len(),
        received,
        elapsed: start.elapsed(),
    })
}

/// `n` bytes of pseudo-random data.
pub fn random_payload(n: usize) -> Vec<u8> {
    use rand::RngCore as _;
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}
