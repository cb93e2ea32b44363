//! Namespaces joined by veth pairs, and the standard layout of the balancer tests:
//!
//! ```text
//!  client                 lb (ip_forward=1)                 backend1
//!  eth0 10.0.1.2/24 ───── c0 10.0.1.1/24   b1 10.0.2.1/24 ───── eth0 10.0.2.2/24
//!  route 10.0.0.100/32                     b2 10.0.3.1/24 ───── eth0 10.0.3.2/24
//!        via 10.0.1.1                                           backend2
//! ```
//!
//! Every veth end outside `lb` has GRO on, so frames the XDP program redirects into a veth are
//! accepted by its peer, and transmit checksum offload off, so the frames the balancer sees
//! carry complete checksums as they would from a wire (a partial checksum rewritten in XDP
//! and redirected would arrive corrupt).

use std::{net::SocketAddr, path::Path};

use anyhow::{Context as _, Result, anyhow};

use crate::{daemon::Daemon, echo::EchoServer, netns::Netns};

/// Names and addresses of the standard balancer layout ([`Topology::balancer`]).
pub mod layout {
    pub const CLIENT: &str = "client";
    pub const LB: &str = "lb";
    pub const BACKEND1: &str = "backend1";
    pub const BACKEND2: &str = "backend2";
    pub const CLIENT_IP: &str = "10.0.1.2";
    pub const VIP: &str = "10.0.0.100";
    pub const VIP_PORT: u16 = 80;
    pub const BACKEND1_IP: &str = "10.0.2.2";
    pub const BACKEND2_IP: &str = "10.0.3.2";
    pub const BACKEND_PORT: u16 = 8080;
    /// The balancer's interfaces: towards the client, backend1, backend2.
    pub const LB_IFACES: [&str; 3] = ["c0", "b1", "b2"];
}

/// A set of namespaces, each known by a role ("client", "lb", …); all deleted on drop.
#[derive(Debug)]
pub struct Topology {
    tag: String,
    namespaces: Vec<(String, Netns)>,
}

impl Topology {
    /// An empty topology; `tag` goes into the namespaces' names (keep it short).
    pub fn new(tag: &str) -> Topology {
        Topology {
            tag: tag.to_owned(),
            namespaces: Vec::new(),
        }
    }

    /// Adds a namespace for `role`, with `lo` up.
    pub fn add(&mut self, role: &str) -> Result<&Netns> {
        if self.namespaces.iter().any(|(r, _)| r == role) {
            return Err(anyhow!("role {role} already exists"));
        }
        let ns = Netns::try_new(&format!("{}-{role}", self.tag))?;
        self.namespaces.push((role.to_owned(), ns));
        Ok(&self.namespaces.last().expect("just pushed").1)
    }

    /// The namespace of `role`; panics when there is none.
    pub fn ns(&self, role: &str) -> &Netns {
        self.try_ns(role).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_ns(&self, role: &str) -> Result<&Netns> {
        self.namespaces
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, ns)| ns)
            .ok_or_else(|| anyhow!("no namespace for role {role}"))
    }

    /// The namespaces' names, in creation order.
    pub fn names(&self) -> Vec<String> {
        self.namespaces
            .iter()
            .map(|(_, ns)| ns.name().to_owned())
            .collect()
    }

    /// A veth pair whose ends are created directly inside their namespaces:
    /// `a_if` in `a`, `b_if` in `b`. Both ends are brought up.
    pub fn link(&self, (a, a_if): (&str, &str), (b, b_if): (&str, &str)) -> Result<()> {
        let (na, nb) = (
            self.try_ns(a)?.name().to_owned(),
            self.try_ns(b)?.name().to_owned(),
        );
        crate::netns::run_cmd(std::process::Command::new("ip").args([
            "link", "add", a_if, "netns", &na, "type", "veth", "peer", "name", b_if, "netns", &nb,
        ]))
        .with_context(|| format!("veth {a}/{a_if} <-> {b}/{b_if}"))?;
        self.try_ns(a)?
            .try_exec(&["ip", "link", "set", a_if, "up"])?;
        self.try_ns(b)?
            .try_exec(&["ip", "link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Adds an address (`10.0.1.2/24`) to an interface of `role`.
    pub fn addr(&self, role: &str, iface: &str, cidr: &str) -> Result<()> {
        self.try_ns(role)?
            .try_exec(&["ip", "addr", "add", cidr, "dev", iface])?;
        Ok(())
    }

    /// Adds a route in `role`, e.g. `route("client", "10.0.0.100/32 via 10.0.1.1")`.
    pub fn route(&self, role: &str, spec: &str) -> Result<()> {
        let mut argv = vec!["ip", "route", "add"];
        argv.extend(spec.split_whitespace());
        self.try_ns(role)?.try_exec(&argv)?;
        Ok(())
    }

    /// Writes a sysctl of `role` (`net.ipv4.ip_forward`, "1"); network sysctls are per namespace.
    pub fn sysctl(&self, role: &str, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.try_ns(role)?
            .try_run(&format!("echo {value} > {path}"))?;
        Ok(())
    }

    /// Makes a veth end outside the balancer behave like a NIC on a wire: GRO on (it then
    /// accepts frames redirected by XDP into its peer) and transmit checksum offload off.
    pub fn wire_like(&self, role: &str, iface: &str) -> Result<()> {
        let ns = self.try_ns(role)?;
        ns.try_exec(&["ethtool", "-K", iface, "gro", "on"])
            .with_context(|| format!("enabling GRO on {role}/{iface} (is ethtool installed?)"))?;
        ns.try_exec(&["ethtool", "-K", iface, "tx", "off"])
            .with_context(|| format!("disabling tx checksum offload on {role}/{iface}"))?;
        Ok(())
    }

    /// The standard balancer layout (see the module documentation).
    pub fn balancer(tag: &str) -> Result<Topology> {
        use layout::*;
        let mut t = Topology::new(tag);
        for role in [CLIENT, LB, BACKEND1, BACKEND2] {
            t.add(role)?;
        }
        t.link((CLIENT, "eth0"), (LB, "c0"))?;
        t.link((BACKEND1, "eth0"), (LB, "b1"))?;
        t.link((BACKEND2, "eth0"), (LB, "b2"))?;
        t.addr(CLIENT, "eth0", &format!("{CLIENT_IP}/24"))?;
        t.addr(LB, "c0", "10.0.1.1/24")?;
        t.addr(LB, "b1", "10.0.2.1/24")?;
        t.addr(LB, "b2", "10.0.3.1/24")?;
        t.addr(BACKEND1, "eth0", &format!("{BACKEND1_IP}/24"))?;
        t.addr(BACKEND2, "eth0", &format!("{BACKEND2_IP}/24"))?;
        t.route(CLIENT, &format!("{VIP}/32 via 10.0.1.1"))?;
        t.route(CLIENT, "default via 10.0.1.1")?;
        t.route(BACKEND1, "default via 10.0.2.1")?;
        t.route(BACKEND2, "default via 10.0.3.1")?;
        t.sysctl(LB, "net.ipv4.ip_forward", "1")?;
        for role in [CLIENT, BACKEND1, BACKEND2] {
            t.wire_like(role, "eth0")?;
        }
        Ok(t)
    }

    /// The VIP of the standard layout's service `web`.
    pub fn vip() -> SocketAddr {
        SocketAddr::new(layout::VIP.parse().expect("constant"), layout::VIP_PORT)
    }

    /// The standard layout's backends, in order.
    pub fn backends() -> [SocketAddr; 2] {
        [
            SocketAddr::new(
                layout::BACKEND1_IP.parse().expect("constant"),
                layout::BACKEND_PORT,
            ),
            SocketAddr::new(
                layout::BACKEND2_IP.parse().expect("constant"),
                layout::BACKEND_PORT,
            ),
        ]
    }

    /// `lb-daemon` flags for the standard layout: the three interfaces, service `web` on the
    /// VIP, backend1 with weight 1 and backend2 with weight 2, the given audit directory.
    pub fn daemon_args(audit_dir: &Path) -> Vec<String> {
        let [b1, b2] = Topology::backends();
        let mut v = Vec::new();
        for iface in layout::LB_IFACES {
            v.extend(["--iface".to_owned(), iface.to_owned()]);
        }
        v.extend([
            "--service".to_owned(),
            format!("web=tcp:{}", Topology::vip()),
            "--backend".to_owned(),
            format!("web={b1}"),
            "--backend".to_owned(),
            format!("web={b2},weight=2"),
            "--audit-dir".to_owned(),
            audit_dir.display().to_string(),
        ]);
        v
    }

    /// A TCP echo server on each backend of the standard layout ([`Topology::backends`]).
    pub fn echo_backends(&self) -> Result<[EchoServer; 2]> {
        let [a1, a2] = Topology::backends();
        Ok([
            EchoServer::start(self.try_ns(layout::BACKEND1)?.name(), a1)?,
            EchoServer::start(self.try_ns(layout::BACKEND2)?.name(), a2)?,
        ])
    }

    /// Starts `lb-daemon` in the `lb` namespace with `args` (not yet waited for: see
    /// [`Daemon::wait_ready`]).
    pub fn spawn_daemon(&self, args: &[String]) -> Result<Daemon> {
        Daemon::spawn(self.try_ns(layout::LB)?.name(), args)
    }
}
