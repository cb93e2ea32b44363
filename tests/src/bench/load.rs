//! The backends' servers and the load generators of the peers benchmark.
//!
//! Protocol on TCP: the client's first byte chooses the exchange.
//! - `R` (request/reply): the client sends [`REQUEST`] bytes, the server answers [`REPLY`]
//!   bytes and closes first; the client reads the reply and the server's FIN, then closes;
//! - `B` (bulk): the client streams bytes and half-closes; the server counts them until EOF
//!   and answers with the count (8 bytes, little endian).
//!
//! On UDP the backends only count what arrives (and from whom).
//!
//! Every loop here is bounded twice: by a count and by a deadline; every socket operation has
//! a timeout. Nothing here sends to an address outside the namespaces it is given.

use std::{
    collections::{BTreeMap, HashSet},
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::netns::{in_netns, spawn_in_netns};

/// Bytes of a request (its first byte is the mode).
pub const REQUEST: usize = 64;
/// Bytes of a reply.
pub const REPLY: usize = 64;
const MODE_RR: u8 = b'R';
const MODE_BULK: u8 = b'B';
/// How long a server waits on one connection before giving it up.
const SERVER_IO: Duration = Duration::from_secs(5);

/// The TCP and UDP servers of one backend namespace: `workers` threads accepting on one TCP
/// listener (each serves its connection to the end before accepting the next), one thread
/// draining a UDP socket. Stopped on drop.
pub struct Backend {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    udp_peers: Arc<Mutex<HashSet<SocketAddr>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Listens on `tcp` and `udp` inside namespace `ns`.
    pub fn start(ns: &str, tcp: SocketAddr, udp: SocketAddr, workers: usize) -> Result<Backend> {
        let (listener, usock) = in_netns(ns, || -> Result<(TcpListener, UdpSocket)> {
            let l = TcpListener::bind(tcp).with_context(|| format!("binding {tcp}"))?;
            // SAFETY: listen(2) again on a listening socket only changes its backlog.
            unsafe { libc::listen(l.as_raw_fd(), 4096) };
            l.set_nonblocking(true)?;
            let u = UdpSocket::bind(udp).with_context(|| format!("binding udp {udp}"))?;
            set_int_opt(&u, libc::SO_RCVBUFFORCE, 8 << 20);
            u.set_read_timeout(Some(Duration::from_millis(100)))?;
            Ok((l, u))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let udp_peers = Arc::new(Mutex::new(HashSet::new()));
        let mut threads = Vec::new();
        for _ in 0..workers.max(1) {
            let l = listener.try_clone()?;
            let (stop, accepted) = (stop.clone(), accepted.clone());
            threads.push(std::thread::spawn(move || tcp_worker(l, &stop, &accepted)));
        }
        {
            let (stop, peers) = (stop.clone(), udp_peers.clone());
            threads.push(std::thread::spawn(move || udp_sink(usock, &stop, &peers)));
        }
        Ok(Backend {
            stop,
            accepted,
            udp_peers,
            threads,
        })
    }

    /// TCP connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Forgets the UDP sources seen so far.
    pub fn clear_udp_peers(&self) {
        self.udp_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Distinct UDP sources (address and port) seen since the last [`Backend::clear_udp_peers`].
    pub fn udp_peers(&self) -> usize {
        self.udp_peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn set_int_opt(s: &impl AsRawFd, opt: libc::c_int, v: libc::c_int) {
    // SAFETY: setsockopt with a valid fd and a pointer to an int of the right size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn tcp_worker(l: TcpListener, stop: &AtomicBool, accepted: &AtomicU64) {
    let mut buf = vec![0u8; 256 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let mut p = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 100) };
        // A bounded burst of accepts, then look at the stop flag again.
        for _ in 0..1024 {
            match l.accept() {
                Ok((s, _)) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let _ = serve(s, &mut buf);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }
}

fn serve(mut s: TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(SERVER_IO))?;
    s.set_write_timeout(Some(SERVER_IO))?;
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode)?;
    match mode[0] {
        MODE_RR => {
            s.read_exact(&mut buf[..REQUEST - 1])?;
            buf[..REPLY].fill(b'r');
            s.write_all(&buf[..REPLY])?;
            // Dropping closes: the server sends its FIN first.
        }
        MODE_BULK => {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut total = 1u64;
            loop {
                match s.read(buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                if Instant::now() > deadline {
                    return Err(ErrorKind::TimedOut.into());
                }
            }
            s.write_all(&total.to_le_bytes())?;
            s.shutdown(Shutdown::Write)?;
        }
        _ => {}
    }
    Ok(())
}

fn udp_sink(u: UdpSocket, stop: &AtomicBool, peers: &Mutex<HashSet<SocketAddr>>) {
    const BATCH: usize = 64;
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut addrs: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut last: Option<SocketAddr> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: zeroed mmsghdr is a valid empty header.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
        for i in 0..BATCH {
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: msgs point to live buffers and addresses of the stated sizes; the socket has
        // a 100 ms receive timeout, so this returns at least that often.
        let n = unsafe {
            libc::recvmmsg(
                u.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        for a in &addrs[..n as usize] {
            let peer = SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(a.sin_addr.s_addr).into(),
                u16::from_be(a.sin_port),
            ));
            if last != Some(peer) {
                peers.lock().unwrap_or_else(|p| p.into_inner()).insert(peer);
                last = Some(peer);
            }
        }
    }
}

/// Short TCP connections: connect, request, reply, close.
#[derive(Clone, Debug)]
pub struct ConnSpec {
    /// Connections go to these in turn.
    pub targets: Vec<SocketAddr>,
    pub threads: usize,
    /// At most this many connections in all.
    pub max_conns: u64,
    /// At most this long.
    pub duration: Duration,
    /// Offered load in connections per second (open loop, paced per thread); `None`: as fast
    /// as each thread can go (closed loop, one connection at a time per thread).
    pub rate: Option<f64>,
    /// Bound on connect and on each read or write.
    pub timeout: Duration,
}

/// What a [`run_conns`] did.
#[derive(Clone, Debug, Default)]
pub struct ConnStats {
    pub ok: u64,
    pub failed: u64,
    pub elapsed: Duration,
    /// Per successful connection, µs from the start of connect to the whole reply read
    /// (connection setup and the first exchange through the balancer), sorted.
    pub setup_us: Vec<u32>,
    /// Per successful connection, µs that connect() took (for a proxy: until it accepted),
    /// sorted.
    pub connect_us: Vec<u32>,
    /// Failures by what failed.
    pub errors: BTreeMap<String, u64>,
}

impl ConnStats {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

struct ThreadConns {
    ok: u64,
    failed: u64,
    setup_us: Vec<u32>,
    connect_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

/// Runs short connections from namespace `ns` as `spec` says; returns when every thread has
/// reached its count or the deadline.
pub fn run_conns(ns: &str, spec: &ConnSpec) -> Result<ConnStats> {
    if spec.targets.is_empty() || spec.threads == 0 {
        bail!("no targets or no threads");
    }
    let barrier = Arc::new(Barrier::new(spec.threads + 1));
    let mut handles = Vec::new();
    for k in 0..spec.threads {
        let spec = spec.clone();
        let barrier = barrier.clone();
        handles.push(spawn_in_netns(ns, move || {
            barrier.wait();
            Ok(conn_thread(&spec, k))
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    let mut all = ConnStats::default();
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow!("a client thread panicked"))??;
        all.ok += r.ok;
        all.failed += r.failed;
        all.setup_us.extend(r.setup_us);
        all.connect_us.extend(r.connect_us);
        for (k, v) in r.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    all.elapsed = t0.elapsed();
    all.setup_us.sort_unstable();
    all.connect_us.sort_unstable();
    Ok(all)
}

fn conn_thread(spec: &ConnSpec, k: usize) -> ThreadConns {
    let start = Instant::now();
    let deadline = start + spec.duration;
    let quota = spec.max_conns / spec.threads as u64
        + u64::from((k as u64) < spec.max_conns % spec.threads as u64);
    let period = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.threads as f64 / r.max(1e-3)));
    let offset = period.map(|p| p.mul_f64(k as f64 / spec.threads as f64));
    let mut t = ThreadConns {
        ok: 0,
        failed: 0,
        setup_us: Vec::with_capacity(quota.min(1 << 20) as usize),
        connect_us: Vec::with_capacity(quota.min(1 << 20) as usize),
        errors: BTreeMap::new(),
    };
    let mut req = [b'q'; REQUEST];
    req[0] = MODE_RR;
    for i in 0..quota {
        if let (Some(p), Some(o)) = (period, offset) {
            let at = start + o + p.mul_f64(i as f64);
            if at >= deadline {
                break;
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        let target = spec.targets[(i as usize * spec.threads + k) % spec.targets.len()];
        match one_conn(target, &req, spec.timeout) {
            Ok((connect, setup)) => {
                t.ok += 1;
                t.connect_us
                    .push(connect.as_micros().min(u32::MAX as u128) as u32);
                t.setup_us
                    .push(setup.as_micros().min(u32::MAX as u128) as u32);
            }
            Err(what) => {
                t.failed += 1;
                *t.errors.entry(what).or_default() += 1;
            }
        }
    }
    t
}

/// One short connection; (connect time, time to the whole reply) or what failed.
fn one_conn(
    target: SocketAddr,
    req: &[u8; REQUEST],
    timeout: Duration,
) -> std::result::Result<(Duration, Duration), String> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| format!("connect: {}", e.kind()))?;
    let connect = t.elapsed();
    let io = |e: std::io::Error, what: &str| format!("{what}: {}", e.kind());
    s.set_nodelay(true).map_err(|e| io(e, "setsockopt"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| io(e, "setsockopt"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| io(e, "setsockopt"))?;
    s.write_all(req).map_err(|e| io(e, "send request"))?;
    let mut reply = [0u8; REPLY];
    s.read_exact(&mut reply).map_err(|e| io(e, "read reply"))?;
    let setup = t.elapsed();
    let mut more = [0u8; 16];
    match s.read(&mut more) {
        Ok(0) => Ok((connect, setup)),
        Ok(_) => Err("read reply: more than expected".into()),
        Err(e) => Err(io(e, "read server's FIN")),
    }
}

/// One bulk TCP stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct BulkStats {
    /// Bytes the server counted.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl BulkStats {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e9
    }
}

/// Streams to `target` from namespace `ns` for `duration` (or `max_bytes`), then half-closes
/// and waits for the server's count: throughput is what the server received, over the time
/// until it said so.
pub fn run_bulk(
    ns: &str,
    target: SocketAddr,
    duration: Duration,
    max_bytes: u64,
) -> Result<BulkStats> {
    in_netns(ns, || -> Result<BulkStats> {
        let timeout = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut s = TcpStream::connect_timeout(&target, timeout)
            .with_context(|| format!("bulk: connecting to {target}"))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut chunk = vec![b'b'; 256 * 1024];
        chunk[0] = MODE_BULK;
        s.write_all(&chunk).context("bulk: sending")?;
        chunk[0] = b'b';
        let mut sent = chunk.len() as u64;
        while t0.elapsed() < duration && sent < max_bytes {
            s.write_all(&chunk).context("bulk: sending")?;
            sent += chunk.len() as u64;
        }
        s.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count)
            .context("bulk: reading the server's count")?;
        let bytes = u64::from_le_bytes(count);
        let elapsed = t0.elapsed();
        if bytes != sent {
            bail!("bulk: sent {sent} bytes but the server counted {bytes}");
        }
        Ok(BulkStats { bytes, elapsed })
    })
}

#[derive(Clone, Copy, Debug, Default)]
pub struct UdpStats {
    /// Datagrams the interface took (forwarded or dropped further on).
    pub sent: u64,
    pub elapsed: Duration,
}

/// Opens `flows` UDP flows from namespace `ns` (one socket each, to the targets in turn), with
/// a few datagrams each so that every balancer on the way has set each flow up and the
/// backends have seen it. Returns each flow's (source, destination).
pub fn open_udp_flows(
    ns: &str,
    targets: &[SocketAddr],
    flows: usize,
    payload: usize,
) -> Result<Vec<(SocketAddr, SocketAddr)>> {
    in_netns(ns, || {
        let data = vec![b'u'; payload.max(1)];
        let mut out = Vec::new();
        let mut socks = Vec::new();
        for j in 0..flows {
            let target = targets[j % targets.len()];
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(target)?;
            for _ in 0..3 {
                s.send(&data)?;
            }
            out.push((s.local_addr()?, target));
            // Kept until all are open, so that no two flows share a source port.
            socks.push(s);
        }
        Ok(out)
    })
}

/// A raw UDP blaster: prebuilt Ethernet frames of known flows, sent on one interface by one
/// thread with `sendmmsg` on a packet socket that bypasses the queueing discipline. Per
/// datagram it costs far less than a UDP socket (no socket layer, route or neighbour lookup),
/// so that the path under test rather than the sender is the limit.
#[derive(Clone, Debug)]
pub struct RawUdpSpec {
    pub iface: String,
    pub src_mac: [u8; 6],
    /// The next hop's address.
    pub dst_mac: [u8; 6],
    /// (source, destination) of each flow, IPv4.
    pub flows: Vec<(SocketAddr, SocketAddr)>,
    pub payload: usize,
    pub duration: Duration,
    /// Datagrams per second to offer; `None`: as fast as the sender goes.
    pub rate: Option<f64>,
    /// The CPU the sender runs on, if it is to stay on one.
    pub cpu: Option<usize>,
}

/// Blasts from namespace `ns` as `spec` says.
pub fn run_raw_udp(ns: &str, spec: &RawUdpSpec) -> Result<UdpStats> {
    let spec = spec.clone();
    spawn_in_netns(ns, move || -> Result<UdpStats> {
        if spec.flows.is_empty() {
            bail!("no UDP flows to send");
        }
        let frames: Vec<Vec<u8>> = spec
            .flows
            .iter()
            .map(|&(src, dst)| {
                crate::packet::frame(
                    crate::packet::End {
                        mac: spec.src_mac,
                        ip: src.ip(),
                        port: src.port(),
                    },
                    crate::packet::End {
                        mac: spec.dst_mac,
                        ip: dst.ip(),
                        port: dst.port(),
                    },
                    crate::packet::L4::Udp,
                    &vec![b'u'; spec.payload.max(1)],
                )
            })
            .collect();
        if let Some(cpu) = spec.cpu {
            pin_to_cpu(cpu)?;
        }
        let sock = PacketSocket::open(&spec.iface)?;
        let t0 = Instant::now();
        let sent = sock.blast(&frames, spec.duration, spec.rate);
        Ok(UdpStats {
            sent,
            elapsed: t0.elapsed(),
        })
    })
    .join()
    .map_err(|_| anyhow!("the UDP sender panicked"))?
}

/// Keeps the calling thread on CPU `cpu`.
fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays within it for any CPU below
    // CPU_SETSIZE, which sched_setaffinity checks against the machine.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "keeping a thread on CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// An `AF_PACKET` socket bound to one interface, for sending whole frames.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn open(iface: &str) -> Result<PacketSocket> {
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}: {}", std::io::Error::last_os_error());
        }
        // Protocol 0: a socket that sends and receives nothing.
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor, owned from here on.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_ll is valid; the fields that matter are set.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a sockaddr_ll of the size given.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        } < 0
        {
            bail!(
                "binding a packet socket to {iface}: {}",
                std::io::Error::last_os_error()
            );
        }
        let one: libc::c_int = 1;
        // SAFETY: an int option of the size given.
        if unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        } < 0
        {
            bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
        }
        Ok(PacketSocket(fd))
    }

    /// Sends `frames` round and round until `duration` is over, at most `rate` a second;
    /// returns the frames the interface took (a frame the receiving side's queue had no room
    /// for fails to send, and is not counted).
    fn blast(&self, frames: &[Vec<u8>], duration: Duration, rate: Option<f64>) -> u64 {
        const BATCH: usize = 64;
        let start = Instant::now();
        let deadline = start + duration;
        let mut iovs: Vec<libc::iovec> = (0..BATCH)
            .map(|i| {
                let f = &frames[i % frames.len()];
                libc::iovec {
                    iov_base: f.as_ptr() as *mut libc::c_void,
                    iov_len: f.len(),
                }
            })
            .collect();
        // SAFETY: a zeroed mmsghdr is a valid empty header; each points to its iovec, which
        // outlives the calls below (the socket is bound, so no address is needed).
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0u64;
        let mut round = 0u64;
        let mut offered = 0u64;
        loop {
            if let Some(rate) = rate {
                // Paced: wait for the instant this batch is due.
                let due = start + Duration::from_secs_f64(offered as f64 / rate);
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                if due > now {
                    std::thread::sleep(due - now);
                }
                offered += BATCH as u64;
            } else if round.is_multiple_of(16) && Instant::now() >= deadline {
                break;
            }
            round += 1;
            // SAFETY: see above; the frames are only read.
            let n = unsafe {
                libc::sendmmsg(
                    self.0.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                sent += n as u64;
            }
        }
        sent
    }
}
