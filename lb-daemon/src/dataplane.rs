//! The kernel side as user space drives it: load the embedded eBPF object, write the service,
//! backend, Maglev and configuration maps, attach the XDP program, and read back flows,
//! counters and ring-buffer records.
//!
//! Every map and every interface's XDP link is pinned under the state directory
//! (`--bpf-dir`, on a bpf filesystem). The kernel keeps forwarding while no daemon runs, and
//! the next daemon loads its program onto the same maps and swaps it into the links
//! atomically: established flows, the ring buffer's unread records and the counters carry
//! over. State whose layout differs from this build's is refused rather than misread.

use std::{
    collections::HashMap as StdHashMap,
    hash::BuildHasherDefault,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapInfo, PerCpuArray, PerCpuValues, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
    util::nr_cpus,
};
use lb_common::{
    AF_INET, AclKey, AclRule, Backend, Config, ConnEvent, Flow, FlowKey, FlowKey4, HopCache,
    MAX_ACL_RULES, MAX_BACKENDS, MAX_SERVICES, ServiceInfo, ServiceKey, SourceKey, SourceState,
    VipKey, acl_action, addr, config_flags, flow_dir, flow_table, maps, service_flags, stat,
};

use crate::{
    audit::Proto,
    balancer::{PlacedRule, PlacedService},
    flow_table::FlowTable4,
    mapping::{Mapping, page_size},
};

/// The eBPF object built from `lb-ebpf` by the build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

/// A connection as the kernel tracks it: the forward entry (keyed by the client's 5-tuple)
/// and, normally, its reply entry.
#[derive(Clone, Copy, Debug)]
pub struct FlowPair {
    pub key: FlowKey,
    pub fwd: Flow,
    pub rev: Option<Flow>,
}

impl FlowPair {
    /// The last packet either way (CLOCK_MONOTONIC_COARSE ns).
    pub fn last_seen_ns(&self) -> u64 {
        self.fwd
            .last_seen_ns
            .max(self.rev.map_or(0, |r| r.last_seen_ns))
    }
}

/// A loaded data plane. Without a state directory (tests, benchmarks) dropping it detaches
/// the program; with one, what is attached stays attached until [`Dataplane::unpin_all`].
pub struct Dataplane {
    ebpf: Ebpf,
    /// Where maps and links are pinned; `None`: nothing is pinned.
    state: Option<PathBuf>,
    /// Interfaces the program is attached to.
    ifaces: Vec<String>,
    /// Links owned by this process (only without a state directory).
    links: Vec<aya::programs::xdp::XdpLinkId>,
    /// Whether the maps were adopted from a previous daemon.
    adopted: bool,
    /// `FLOWS4`, mapped.
    flows4: FlowTable4,
}

/// Bumped whenever the layout or meaning of a map's key or value changes, so that a daemon
/// never adopts state written by an incompatible build.
const STATE_LAYOUT: u32 = 6;

impl Dataplane {
    /// Loads the object and the XDP program into the kernel, without attaching it, and with
    /// maps of its own. The Maglev and conntrack maps are sized here, from the configuration.
    pub fn load(maglev_size: u32, conntrack_size: u32) -> anyhow::Result<Self> {
        Self::load_with(maglev_size, conntrack_size, None, false)
    }

    /// As [`Dataplane::load`], on the maps pinned under `state`: those a previous daemon left
    /// (adopted), else new ones pinned there. `reset` removes the previous state first
    /// (detaching its program).
    pub fn load_pinned(
        maglev_size: u32,
        conntrack_size: u32,
        state: &Path,
        reset: bool,
    ) -> anyhow::Result<Self> {
        prepare_state_dir(state)?;
        let layout = state.join(layout_name());
        if reset {
            remove_pins(state)
                .with_context(|| format!("--reset-state: clearing {}", state.display()))?;
        }
        // State of another layout: refuse to guess what its bytes mean.
        for entry in std::fs::read_dir(state)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with("layout-") && name != layout_name() {
                bail!(
                    "--bpf-dir {}: the kernel state there ({name}) was written by an incompatible version; \
                     start once with --reset-state (established flows are then dropped)",
                    state.display()
                );
            }
        }
        let adopted = layout.join(maps::FLOWS4).exists();
        if adopted {
            for (map, want) in [
                (maps::FLOWS4, flow_table::buckets_for(conntrack_size)),
                (maps::CLAIMS4, flow_table::claims_for(conntrack_size)),
                (maps::FLOWS6, 2 * conntrack_size),
                (maps::MAGLEV, MAX_SERVICES * maglev_size),
            ] {
                let have = MapInfo::from_pin(layout.join(map))
                    .with_context(|| format!("reading the pinned map {map}"))?
                    .max_entries();
                if have != want {
                    bail!(
                        "--bpf-dir {}: the running data plane's {map} map has {have} entries, this configuration needs {want} \
                         (--conntrack-size or --maglev-table-size changed); keep the old sizes, or start with --reset-state",
                        state.display()
                    );
                }
            }
        }
        std::fs::create_dir_all(&layout)
            .with_context(|| format!("creating {}", layout.display()))?;
        let mut dp = Self::load_with(maglev_size, conntrack_size, Some(&layout), adopted)?;
        dp.state = Some(state.to_path_buf());
        Ok(dp)
    }

    /// Loads onto new maps, or onto pinned ones under `pins` (`adopted`: left by a previous
    /// daemon, whose `FLOWS4` hash seed carries over with its flows).
    fn load_with(
        maglev_size: u32,
        conntrack_size: u32,
        pins: Option<&Path>,
        adopted: bool,
    ) -> anyhow::Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(anyhow!(
                "this binary was built without the eBPF object (AYA_BUILD_SKIP); rebuild after `cargo xtask setup`"
            ));
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::MAGLEV, MAX_SERVICES * maglev_size)
            .map_max_entries(maps::FLOWS4, flow_table::buckets_for(conntrack_size))
            .map_max_entries(maps::CLAIMS4, flow_table::claims_for(conntrack_size))
            .map_max_entries(maps::FLOWS6, 2 * conntrack_size);
        let names = map_names()?;
        if let Some(dir) = pins {
            for name in &names {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let prog: &mut Xdp = program(&mut ebpf)?;
        prog.load().context("loading the XDP program (verifier)")?;
        let flows4 = flow_table4(&mut ebpf, conntrack_size, adopted)?;
        Ok(Self {
            ebpf,
            state: None,
            ifaces: Vec::new(),
            links: Vec::new(),
            adopted,
            flows4,
        })
    }

    /// Whether the maps, and the flows in them, were left by a previous daemon.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        program(&mut self.ebpf)
    }

    /// The pass-everything program of the same object, loaded: the benchmarks' floor.
    pub fn pass_program(&mut self) -> anyhow::Result<&mut Xdp> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(lb_common::XDP_PASS_PROGRAM)
            .ok_or_else(|| {
                anyhow!(
                    "program {} missing from the eBPF object",
                    lb_common::XDP_PASS_PROGRAM
                )
            })?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        Ok(prog)
    }

    /// Attaches the program to an interface, in native mode when the driver has it. With a
    /// state directory the link is pinned there; a link a previous daemon pinned gets this
    /// program swapped in atomically (no packet meets an interface without a program).
    pub fn attach(&mut self, iface: &str) -> anyhow::Result<()> {
        let context = || format!("--iface {iface}: cannot attach the XDP program");
        let Some(pin) = self.link_pin(iface) else {
            let id = program(&mut self.ebpf)?
                .attach(iface, XdpMode::default())
                .with_context(context)?;
            self.links.push(id);
            self.ifaces.push(iface.to_string());
            return Ok(());
        };
        let prog = program(&mut self.ebpf)?;
        let id = match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let link = XdpLink::try_from(FdLink::from(pinned)).with_context(context)?;
                prog.attach_to_link(link).with_context(context)?
            }
            Err(_) => prog
                .attach(iface, XdpMode::default())
                .with_context(context)?,
        };
        let link = FdLink::try_from(prog.take_link(id).with_context(context)?)
            .map_err(|e| anyhow!("{}: the XDP link cannot be pinned: {e}", context()))?;
        if !pin.exists() {
            link.pin(&pin)
                .with_context(|| format!("pinning the XDP link of {iface} at {}", pin.display()))?;
        }
        self.ifaces.push(iface.to_string());
        Ok(())
    }

    /// Detaches interfaces a previous daemon attached that are not in `keep`.
    pub fn detach_others(&mut self, keep: &[String]) -> anyhow::Result<Vec<String>> {
        let Some(dir) = self.layout_dir() else {
            return Ok(Vec::new());
        };
        let mut gone = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if let Some(iface) = name.strip_prefix(LINK_PREFIX)
                && !keep.iter().any(|k| k == iface)
            {
                std::fs::remove_file(dir.join(&name))?;
                gone.push(iface.to_string());
            }
        }
        Ok(gone)
    }

    /// Detaches the program from every interface it was attached to.
    pub fn detach_all(&mut self) -> anyhow::Result<()> {
        let prog = program(&mut self.ebpf)?;
        for id in std::mem::take(&mut self.links) {
            prog.detach(id).context("detaching the XDP program")?;
        }
        if let Some(dir) = self.layout_dir() {
            for iface in &self.ifaces {
                let pin = dir.join(format!("{LINK_PREFIX}{iface}"));
                match std::fs::remove_file(&pin) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(e).with_context(|| format!("unpinning {}", pin.display()));
                    }
                }
            }
        }
        self.ifaces.clear();
        Ok(())
    }

    /// Removes every pin (links and maps): the kernel frees the state once this process
    /// exits. Call after [`Dataplane::detach_all`] when the data plane should not outlive us.
    pub fn unpin_all(&mut self) -> anyhow::Result<()> {
        if let Some(state) = &self.state {
            remove_pins(state).with_context(|| format!("clearing {}", state.display()))?;
        }
        Ok(())
    }

    fn layout_dir(&self) -> Option<PathBuf> {
        self.state.as_ref().map(|s| s.join(layout_name()))
    }

    fn link_pin(&self, iface: &str) -> Option<PathBuf> {
        self.layout_dir()
            .map(|d| d.join(format!("{LINK_PREFIX}{iface}")))
    }

    /// Writes run-time settings and seeds the per-CPU flow-id counters.
    pub fn configure(
        &mut self,
        snat_ports: (u16, u16),
        maglev_size: u32,
        flow_id_base: u64,
    ) -> anyhow::Result<()> {
        let mut cfg: Array<&mut MapData, Config> = Array::try_from(self.map(maps::CONFIG)?)?;
        // The flow table's parameters, and what a previous daemon recorded of the kernel's
        // losses, carry over.
        let old = cfg.get(&0, 0)?;
        // Flows of earlier daemons keep the ports they have: the ports a reply key may have
        // grow to include this range.
        let (claimed_port_min, claimed_port_max) = if old.claimed_port_max == 0 {
            snat_ports
        } else {
            (
                old.claimed_port_min.min(snat_ports.0),
                old.claimed_port_max.max(snat_ports.1),
            )
        };
        cfg.set(
            0,
            Config {
                snat_port_min: snat_ports.0,
                snat_port_max: snat_ports.1,
                maglev_size,
                flags: if cfg!(target_arch = "x86_64") {
                    config_flags::TOTAL_STORE_ORDER
                } else {
                    0
                },
                claimed_port_min,
                claimed_port_max,
                ..old
            },
            0,
        )?;
        let ncpu = nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let mut seq: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map(maps::FLOW_SEQ)?)?;
        seq.set(0, PerCpuValues::try_from(vec![flow_id_base; ncpu])?, 0)?;
        Ok(())
    }

    /// Makes the program refuse (`true`) or accept new flows: the fail-closed audit policy.
    pub fn refuse_new_flows(&mut self, refuse: bool) -> anyhow::Result<()> {
        let mut cfg: Array<&mut MapData, Config> = Array::try_from(self.map(maps::CONFIG)?)?;
        let mut c = cfg.get(&0, 0)?;
        if refuse {
            c.flags |= config_flags::REFUSE_NEW_FLOWS;
        } else {
            c.flags &= !config_flags::REFUSE_NEW_FLOWS;
        }
        cfg.set(0, c, 0)?;
        Ok(())
    }

    /// Writes services, backends, Maglev tables and access rules, replacing whatever a
    /// previous daemon left in those maps (flows are kept).
    pub fn install(&mut self, services: &[PlacedService]) -> anyhow::Result<()> {
        if self.adopted {
            self.clear_configuration()?;
        }
        for s in services {
            self.install_service(s)?;
        }
        Ok(())
    }

    /// Empties the service, VIP and access-rule maps and the rule counters.
    fn clear_configuration(&mut self) -> anyhow::Result<()> {
        let mut svc: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map(maps::SERVICES)?)?;
        for k in svc.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            let _ = svc.remove(&k);
        }
        self.services_changed()?;
        let mut vips: HashMap<&mut MapData, VipKey, u32> =
            HashMap::try_from(self.map(maps::VIPS)?)?;
        for k in vips.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            let _ = vips.remove(&k);
        }
        let mut acl: LpmTrie<&mut MapData, AclKey, AclRule> =
            LpmTrie::try_from(self.map(maps::ACL)?)?;
        for k in acl.keys().filter_map(Result::ok).collect::<Vec<_>>() {
            let _ = acl.remove(&k);
        }
        for id in 0..MAX_ACL_RULES {
            self.clear_rule_hits(id)?;
        }
        Ok(())
    }

    /// Writes one service: its backends, access rules, VIP, Maglev table and entry.
    pub fn install_service(&mut self, s: &PlacedService) -> anyhow::Result<()> {
        for b in &s.backends {
            self.set_backend(b.index, Some((b.addr, b.snat)))?;
        }
        for r in &s.rules {
            self.set_rule(s.id, r, true)?;
        }
        let mut vips: HashMap<&mut MapData, VipKey, u32> =
            HashMap::try_from(self.map(maps::VIPS)?)?;
        vips.insert(vip_key(s.spec.vip), 1, 0)?;
        self.update_service(s)
    }

    /// Removes a service's entry (no new flows; established ones keep their own state), its
    /// access rules, and its VIP unless `vip_in_use` (another service has the same address).
    pub fn remove_service(&mut self, s: &PlacedService, vip_in_use: bool) -> anyhow::Result<()> {
        let mut svc_map: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map(maps::SERVICES)?)?;
        let _ = svc_map.remove(&service_key(s));
        self.services_changed()?;
        for r in &s.rules {
            self.set_rule(s.id, r, false)?;
        }
        if !vip_in_use {
            let mut vips: HashMap<&mut MapData, VipKey, u32> =
                HashMap::try_from(self.map(maps::VIPS)?)?;
            let _ = vips.remove(&vip_key(s.spec.vip));
        }
        Ok(())
    }

    /// Writes (`Some((backend, snat))`) or clears a `BACKENDS` slot, and forgets the next hop
    /// cached for it: a reused slot must not send to the previous backend's neighbour.
    pub fn set_backend(
        &mut self,
        index: u32,
        backend: Option<(SocketAddr, std::net::IpAddr)>,
    ) -> anyhow::Result<()> {
        let entry = match backend {
            Some((a, snat)) => {
                let (words, af) = addr::to_words(a.ip());
                Backend {
                    addr: words,
                    snat_addr: addr::to_words(snat).0,
                    port: a.port().to_be(),
                    af,
                    _pad0: 0,
                    _pad1: 0,
                }
            }
            None => Backend::default(),
        };
        let mut backends: Array<&mut MapData, Backend> =
            Array::try_from(self.map(maps::BACKENDS)?)?;
        backends.set(index, entry, 0)?;
        let ncpu = nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let mut hops: PerCpuArray<&mut MapData, HopCache> =
            PerCpuArray::try_from(self.map(maps::HOPS)?)?;
        hops.set(
            index,
            PerCpuValues::try_from(vec![HopCache::default(); ncpu])?,
            0,
        )?;
        Ok(())
    }

    /// Inserts (`present`) or removes an access rule of service `id`; a new rule's hit
    /// counter starts at zero.
    pub fn set_rule(&mut self, id: u32, r: &PlacedRule, present: bool) -> anyhow::Result<()> {
        let (words, af) = addr::to_words(r.net.addr);
        let key = Key::new(
            32 + r.net.len as u32,
            AclKey {
                scope: AclKey::scope(id, af),
                addr: words,
            },
        );
        if present {
            self.clear_rule_hits(r.id)?;
        }
        let mut acl: LpmTrie<&mut MapData, AclKey, AclRule> =
            LpmTrie::try_from(self.map(maps::ACL)?)?;
        if present {
            let action = if r.allow {
                acl_action::ALLOW
            } else {
                acl_action::DENY
            };
            acl.insert(
                &key,
                AclRule {
                    rule_id: r.id,
                    action,
                },
                0,
            )?;
        } else {
            let _ = acl.remove(&key);
        }
        Ok(())
    }

    fn clear_rule_hits(&mut self, id: u32) -> anyhow::Result<()> {
        let ncpu = nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        let mut hits: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map(maps::RULE_HITS)?)?;
        hits.set(id, PerCpuValues::try_from(vec![0u64; ncpu])?, 0)?;
        Ok(())
    }

    /// What a previous daemon's maps say about ids still referenced by flows: services by
    /// (protocol, VIP) and backend slots by (service id, backend address).
    pub fn previous_layout(&mut self) -> anyhow::Result<Layout> {
        let mut layout = Layout::default();
        if !self.adopted {
            return Ok(layout);
        }
        let svc: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map(maps::SERVICES)?)?;
        for (k, v) in svc.iter().filter_map(Result::ok) {
            let vip = socket_addr(k.addr, k.af, k.port);
            layout.services.insert((k.proto, vip), v.id);
        }
        let flows = self.flows()?;
        layout.flows = flows.len();
        for p in flows {
            let backend = socket_addr(p.fwd.nat_dst, p.key.af, p.fwd.nat_dport);
            layout
                .backends
                .insert((p.fwd.service_id, backend), p.fwd.backend_idx);
            layout.flow_services.insert(p.fwd.service_id);
        }
        Ok(layout)
    }

    /// Writes one service's Maglev table, then its entry (backend count, generation): new
    /// flows move to the new table as its slots are written; established flows are not
    /// affected.
    pub fn update_service(&mut self, s: &PlacedService) -> anyhow::Result<()> {
        {
            let mut maglev: Array<&mut MapData, u32> = Array::try_from(self.map(maps::MAGLEV)?)?;
            let base = s.id * s.table.len() as u32;
            for (slot, &idx) in s.table.iter().enumerate() {
                maglev.set(base + slot as u32, idx, 0)?;
            }
        }
        let mut svc_map: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map(maps::SERVICES)?)?;
        let info = ServiceInfo {
            id: s.id,
            backend_count: s.backends.iter().filter(|b| b.in_rotation()).count() as u32,
            generation: s.generation,
            flags: if s.rules.iter().any(|r| r.allow) {
                service_flags::DEFAULT_DENY
            } else {
                0
            } | if s.rules.is_empty() {
                0
            } else {
                service_flags::HAS_RULES
            },
            rate_per_sec: s.spec.rate_limit.unwrap_or(0),
            _pad: 0,
        };
        svc_map.insert(service_key(s), info, 0)?;
        self.services_changed()
    }

    /// Moves `Config::services_version` after a change to `SERVICES`, so that the program's
    /// cached copies of services are not used again.
    fn services_changed(&mut self) -> anyhow::Result<()> {
        let mut cfg: Array<&mut MapData, Config> = Array::try_from(self.map(maps::CONFIG)?)?;
        let mut c = cfg.get(&0, 0)?;
        c.services_version = c.services_version.wrapping_add(1);
        cfg.set(0, c, 0)?;
        Ok(())
    }

    /// Takes the ring buffer of connection records (once).
    pub fn take_events(&mut self) -> anyhow::Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .ok_or_else(|| anyhow!("map {} missing", maps::EVENTS))?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Every connection in the kernel, both directions paired.
    pub fn flows(&mut self) -> anyhow::Result<Vec<FlowPair>> {
        let v4 = self.flows4.entries();
        let v6 = self.read_flows6()?;
        Ok(pair(
            v4.into_iter().map(|(k, f)| (k.key(), f)).chain(v6),
            |_| true,
        ))
    }

    /// The connections a sweep may close or forget: those whose forward direction has been
    /// quiet since `before_ns` (CLOCK_MONOTONIC_COARSE; a connection is never quieter than its
    /// forward direction), both directions paired; and how many connections there are in all.
    /// An IPv4 reply entry is looked up in the table for each of them, rather than every one
    /// indexed.
    pub fn quiet_flows(&mut self, before_ns: u64) -> anyhow::Result<(Vec<FlowPair>, usize)> {
        let quiet = |f: &Flow| f.last_seen_ns <= before_ns;
        let v6 = self.read_flows6()?;
        let mut total = v6
            .iter()
            .filter(|(_, f)| f.dir == flow_dir::FORWARD)
            .count();
        let mut pairs = pair(v6, quiet);
        for (k, fwd) in self.flows4.entries() {
            if fwd.dir != flow_dir::FORWARD {
                continue;
            }
            total += 1;
            if quiet(&fwd) {
                let key = k.key();
                let peer = FlowKey4::of(&fwd.peer_key(key.proto, key.af));
                let rev = self.flows4.get(&peer, fwd.flow_id);
                pairs.push(FlowPair { key, fwd, rev });
            }
        }
        Ok((pairs, total))
    }

    /// The kernel hash map `name` (`FLOWS6`, `SOURCES`), for system calls of its own.
    fn hash_map_fd(&mut self, name: &str) -> anyhow::Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        match self.map(name)? {
            aya::maps::Map::HashMap(data) | aya::maps::Map::LruHashMap(data) => {
                Ok(data.fd().as_fd())
            }
            _ => bail!("map {name} is not a hash map"),
        }
    }

    /// Refusals the program counted as suppressed and no deny record carries yet: per source
    /// and service whose last deny record is at least `min_age_ns` old at `now_ns`
    /// (CLOCK_BOOTTIME), the entry of `SOURCES` as it was, taken with a lookup-and-delete so
    /// that no refusal is handed out twice. Each is put back at once with nothing suppressed and
    /// a record as of `now_ns` (its token bucket kept), unless the program has made the source a
    /// new entry meanwhile; a refusal that the program counts on the entry between the daemon's
    /// read and its removal is lost to the log (the per-reason and per-rule counters have it).
    /// Also returns whether entries with suppressed refusals were left for being too recent.
    pub fn take_unrecorded_denials(
        &mut self,
        now_ns: u64,
        min_age_ns: u64,
    ) -> anyhow::Result<(Vec<(SourceKey, SourceState)>, bool)> {
        let fd = self.hash_map_fd(maps::SOURCES)?;
        let entries: Vec<(SourceKey, SourceState)> =
            lookup_batch(fd).map_err(|e| anyhow!("reading {}: {e}", maps::SOURCES))?;
        let (mut taken, mut left) = (Vec::new(), false);
        for (key, seen) in entries {
            if seen.suppressed == 0 {
                continue;
            }
            if now_ns.saturating_sub(seen.last_deny_record_ns) < min_age_ns {
                left = true;
                continue;
            }
            let mut was = SourceState::default();
            if !map_elem(fd, MapElemOp::LookupAndDelete, &key, &mut was)
                .map_err(|e| anyhow!("taking a {} entry: {e}", maps::SOURCES))?
            {
                continue;
            }
            let mut back = was;
            if was.suppressed > 0 {
                taken.push((key, was));
                back.suppressed = 0;
                back.last_deny_record_ns = now_ns;
            }
            map_elem(fd, MapElemOp::InsertNew, &key, &mut back)
                .map_err(|e| anyhow!("putting a {} entry back: {e}", maps::SOURCES))?;
        }
        Ok((taken, left))
    }

    /// Every entry of `FLOWS6`, in batches.
    fn read_flows6(&mut self) -> anyhow::Result<Vec<(FlowKey, Flow)>> {
        lookup_batch(self.hash_map_fd(maps::FLOWS6)?)
            .map_err(|e| anyhow!("reading the IPv6 flow table: {e}"))
    }

    /// Closes a connection in the kernel's state, as the program does when it sees the end of
    /// one: whether the caller is the one that closed it, and so writes its close record
    /// (`false`: the program closed it meanwhile, and its record is in the ring buffer). IPv6
    /// flows are in a kernel hash map, whose values user space cannot change atomically: `true`.
    pub fn close_flow(&mut self, pair: &FlowPair) -> bool {
        pair.key.af != AF_INET
            || self
                .flows4
                .mark_closed(&FlowKey4::of(&pair.key), pair.fwd.flow_id)
    }

    /// The IPv4 flow table, mapped.
    pub fn flow_table4(&self) -> &FlowTable4 {
        &self.flows4
    }

    /// Removes both entries of a connection (IPv4: if they still belong to it).
    pub fn remove_flow(&mut self, pair: &FlowPair) -> anyhow::Result<()> {
        let peer = pair.fwd.peer_key(pair.key.proto, pair.key.af);
        if pair.key.af == AF_INET {
            let id = pair.fwd.flow_id;
            self.flows4.remove(&FlowKey4::of(&pair.key), id);
            self.flows4.remove(&FlowKey4::of(&peer), id);
        } else {
            let fd = self.hash_map_fd(maps::FLOWS6)?;
            for key in [pair.key, peer] {
                // Removed, then put back if it turns out to be another flow's: the program
                // reopened the 5-tuple (or reused the SNAT port) since the entry was read.
                let mut flow = Flow::default();
                if map_elem(fd, MapElemOp::LookupAndDelete, &key, &mut flow)
                    .map_err(|e| anyhow!("removing a flow entry: {e}"))?
                    && flow.flow_id != pair.fwd.flow_id
                {
                    // Fails only if the program has inserted the key again meanwhile.
                    let _ = map_elem(fd, MapElemOp::InsertNew, &key, &mut flow);
                }
            }
        }
        Ok(())
    }

    /// The `STATS` counters summed over CPUs, indexed by `lb_common::stat`.
    pub fn stats(&mut self) -> anyhow::Result<Vec<u64>> {
        (0..stat::COUNT).map(|i| self.stat(i)).collect()
    }

    /// One `STATS` counter (an `lb_common::stat` index), summed over CPUs.
    pub fn stat(&mut self, index: u32) -> anyhow::Result<u64> {
        let st: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map(maps::STATS)?)?;
        Ok(st.get(&index, 0)?.iter().sum())
    }

    /// How many of the kernel's lost ring-buffer records are in `loss` records already.
    pub fn ringbuf_loss_recorded(&mut self) -> anyhow::Result<u64> {
        let cfg: Array<&mut MapData, Config> = Array::try_from(self.map(maps::CONFIG)?)?;
        Ok(cfg.get(&0, 0)?.ringbuf_loss_recorded)
    }

    /// Notes, in the kernel's state, how many lost records are in `loss` records now.
    pub fn set_ringbuf_loss_recorded(&mut self, total: u64) -> anyhow::Result<()> {
        let mut cfg: Array<&mut MapData, Config> = Array::try_from(self.map(maps::CONFIG)?)?;
        let mut c = cfg.get(&0, 0)?;
        c.ringbuf_loss_recorded = total;
        cfg.set(0, c, 0)?;
        Ok(())
    }

    /// Matches per access rule, summed over CPUs, indexed by rule id.
    pub fn rule_hits(&mut self, rules: u32) -> anyhow::Result<Vec<u64>> {
        let hits: PerCpuArray<&mut MapData, u64> =
            PerCpuArray::try_from(self.map(maps::RULE_HITS)?)?;
        (0..rules.min(MAX_ACL_RULES))
            .map(|i| Ok(hits.get(&i, 0)?.iter().sum()))
            .collect()
    }

    fn map(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        map(&mut self.ebpf, name)
    }
}

/// How far the daemon is behind the kernel: the ring buffer's producer position minus its
/// consumer position, read from the two pages the kernel shares for them.
pub struct RingBacklog {
    consumer: Mapping,
    producer: Mapping,
}

impl RingBacklog {
    /// Maps the position pages of the ring buffer `fd` (read-only): at the offsets the kernel
    /// defines, the consumer page, then the producer page.
    pub fn new(fd: std::os::fd::BorrowedFd<'_>) -> anyhow::Result<Self> {
        let page = page_size();
        let what = "the ring buffer's positions";
        Ok(Self {
            consumer: Mapping::new(fd, 0, page, false, what)?,
            producer: Mapping::new(fd, page, page, false, what)?,
        })
    }

    /// Unread bytes (record headers included).
    pub fn bytes(&self) -> u64 {
        // SAFETY: both pages stay mapped for our lifetime; the kernel updates the first u64 of
        // each, which volatile reads observe.
        let (c, p) = unsafe {
            (
                std::ptr::read_volatile(self.consumer.ptr().cast::<u64>()),
                std::ptr::read_volatile(self.producer.ptr().cast::<u64>()),
            )
        };
        p.saturating_sub(c)
    }
}

/// Every entry of a hash map in batches (`BPF_MAP_LOOKUP_BATCH`): a few system calls for the
/// whole flow table, where one lookup per key takes two each. Entries the program adds or
/// deletes meanwhile may be missed or seen, as with any iteration of a live map.
fn lookup_batch<K: aya::Pod + Default, V: aya::Pod + Default>(
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<Vec<(K, V)>> {
    use std::os::fd::AsRawFd as _;
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let mut chunk = 4096usize;
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    let mut out = Vec::new();
    // The hash map's cursor is a bucket number.
    let (mut token, mut next, mut first) = (0u32, 0u32, true);
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const token as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is a valid batch attribute; `keys` and `values` hold `count` elements
        // of the map's key and value types (plain data: any bytes the kernel writes are valid
        // values), which the kernel fills; `token` and `next` outlive the call.
        let err = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        let n = (attr.count as usize).min(chunk);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            // A bucket holds more entries than the buffers: retry it with bigger ones.
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 && chunk < 1 << 20 => {
                chunk *= 2;
                keys.resize(chunk, K::default());
                values.resize(chunk, V::default());
                continue;
            }
            Some(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

/// The connections of `entries` (both directions, in any order) whose forward entry `want`s,
/// each with its reply entry.
fn pair(
    entries: impl IntoIterator<Item = (FlowKey, Flow)>,
    want: impl Fn(&Flow) -> bool,
) -> Vec<FlowPair> {
    let (mut forward, mut replies) = (Vec::new(), Vec::new());
    for (key, f) in entries {
        match f.dir {
            flow_dir::FORWARD if want(&f) => forward.push((key, f)),
            flow_dir::REPLY => replies.push((key, f)),
            _ => {}
        }
    }
    // A scrape of the metrics pairs every entry: a cheap hash, and indexes rather than copies
    // of the entries.
    let mut index: StdHashMap<FlowKey, usize, BuildHasherDefault<KeyHasher>> =
        StdHashMap::with_capacity_and_hasher(replies.len(), Default::default());
    index.extend(replies.iter().enumerate().map(|(i, (k, _))| (*k, i)));
    forward
        .into_iter()
        .map(|(key, fwd)| {
            let rev = index
                .get(&fwd.peer_key(key.proto, key.af))
                .map(|&i| replies[i].1);
            FlowPair { key, fwd, rev }
        })
        .collect()
}

/// A one-element hash-map operation `map_elem` makes.
#[derive(Clone, Copy)]
enum MapElemOp {
    /// Removes the key and reads the value it had, in one step.
    LookupAndDelete,
    /// Inserts the value unless the key is there.
    InsertNew,
}

/// Applies `op` to `key` of the hash map `fd` (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, or
/// `BPF_MAP_UPDATE_ELEM` with `BPF_NOEXIST`), with `value` read or written; `false` when the
/// key was not there (`LookupAndDelete`) or already was (`InsertNew`).
fn map_elem<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    op: MapElemOp,
    key: &K,
    value: &mut V,
) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd as _;
    /// The element member of `union bpf_attr`.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    const BPF_NOEXIST: u64 = 1;
    let (cmd, flags, absent) = match op {
        MapElemOp::LookupAndDelete => (BPF_MAP_LOOKUP_AND_DELETE_ELEM, 0, libc::ENOENT),
        MapElemOp::InsertNew => (BPF_MAP_UPDATE_ELEM, BPF_NOEXIST, libc::EEXIST),
    };
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: (key as *const K) as u64,
        value: (value as *mut V) as u64,
        flags,
    };
    // SAFETY: `attr` is a valid element attribute; `key` and `value` are of the map's key and
    // value types (plain data: any bytes the kernel writes are a valid value) and outlive the
    // call.
    match unsafe { sys_bpf(cmd, &mut attr) } {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(absent) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The `bpf` system call `cmd` with `attr`, a member of `union bpf_attr`.
///
/// # Safety
/// `attr` must be the member `cmd` takes, and every pointer in it valid for what the kernel
/// reads and writes there.
unsafe fn sys_bpf<A>(cmd: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    // SAFETY: guaranteed by the caller.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut A, std::mem::size_of::<A>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Ids a previous daemon gave, which the flows it left still carry.
#[derive(Debug, Default)]
pub struct Layout {
    /// (IP protocol number, VIP) → service id.
    pub services: StdHashMap<(u8, SocketAddr), u32>,
    /// (service id, backend address) → `BACKENDS` slot.
    pub backends: StdHashMap<(u32, SocketAddr), u32>,
    /// Service ids that live flows carry.
    pub flow_services: std::collections::HashSet<u32>,
    /// Connections adopted.
    pub flows: usize,
}

/// A multiply-rotate hash (FxHash's) for the reply entries' keys the sweeps pair by. Of such a
/// key (backend address and port towards a SNAT address and port) a client chooses only the
/// SNAT port, 16 low bits of the last word, which distinct values keep distinct through the
/// multiply: there is no set of colliding keys to build, and SipHash would cost more than
/// the rest of the pairing.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        for &b in chunks.remainder() {
            self.write_u64(b as u64);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Maps `FLOWS4` and `CLAIMS4` of a loaded object. A new table (not `adopted`) gets its sizes
/// and a random hash seed in `CONFIG` first; an adopted one is hashed as its creator chose.
fn flow_table4(ebpf: &mut Ebpf, conntrack_size: u32, adopted: bool) -> anyhow::Result<FlowTable4> {
    let (buckets, claims) = (
        flow_table::buckets_for(conntrack_size),
        flow_table::claims_for(conntrack_size),
    );
    let mut cfg: Array<&mut MapData, Config> = Array::try_from(map(ebpf, maps::CONFIG)?)?;
    let mut c = cfg.get(&0, 0)?;
    // An adopted table without parameters was created by a daemon that stopped before it
    // wrote them, before any program ran on it.
    if !adopted || c.flow4_buckets == 0 {
        let mut seed = [0u8; 8];
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        if n != seed.len() as isize {
            bail!(
                "drawing the flow table's hash seed: {}",
                std::io::Error::last_os_error()
            );
        }
        c.flow4_seed = u64::from_ne_bytes(seed);
        c.flow4_buckets = buckets;
        c.flow4_claims = claims;
        cfg.set(0, c, 0)?;
    } else if (c.flow4_buckets, c.flow4_claims) != (buckets, claims) {
        bail!(
            "the adopted flow table has {} buckets and {} claim words, its configuration says {buckets} and {claims}",
            c.flow4_buckets,
            c.flow4_claims
        );
    }
    let fd = |name| -> anyhow::Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd as _;
        match ebpf.map(name) {
            Some(aya::maps::Map::Array(data)) => Ok(data.fd().as_fd()),
            Some(_) => bail!("map {name} is not an array"),
            None => bail!("map {name} missing from the eBPF object"),
        }
    };
    FlowTable4::map(
        fd(maps::FLOWS4)?,
        buckets,
        c.flow4_seed,
        fd(maps::CLAIMS4)?,
        claims,
    )
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

/// Pins of XDP links are named after their interface.
const LINK_PREFIX: &str = "link-";

/// The directory of this build's state, named by its layout.
fn layout_name() -> String {
    let sizes = [
        std::mem::size_of::<Flow>(),
        std::mem::size_of::<FlowKey>(),
        std::mem::size_of::<FlowKey4>(),
        std::mem::size_of::<flow_table::Bucket>(),
        std::mem::size_of::<ServiceInfo>(),
        std::mem::size_of::<ServiceKey>(),
        std::mem::size_of::<Backend>(),
        std::mem::size_of::<Config>(),
        std::mem::size_of::<ConnEvent>(),
        std::mem::size_of::<HopCache>(),
        MAX_SERVICES as usize,
        MAX_BACKENDS as usize,
        MAX_ACL_RULES as usize,
    ];
    let mut h: u32 = 0x811c_9dc5;
    for b in sizes.iter().flat_map(|n| n.to_le_bytes()) {
        h = (h ^ b as u32).wrapping_mul(0x0100_0193);
    }
    format!("layout-{STATE_LAYOUT}-{h:08x}")
}

/// The object's maps, by name (data sections such as `.rodata` are the program's own).
fn map_names() -> anyhow::Result<Vec<String>> {
    let obj = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the eBPF object")?;
    Ok(obj
        .maps
        .keys()
        .filter(|n| !n.starts_with('.'))
        .cloned()
        .collect())
}

/// bpf(2) pins live on a bpf filesystem: make sure `dir` is on one, mounting it at
/// `/sys/fs/bpf` when that is where it should be and nothing is mounted there yet.
fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let fs_type = |p: &Path| -> Option<i64> {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: zeroed statfs is a valid out-parameter; `c` is a NUL-terminated path.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the call.
        (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
    };
    let existing = dir
        .ancestors()
        .find(|a| a.exists())
        .unwrap_or(Path::new("/"));
    if fs_type(existing) != Some(BPF_FS_MAGIC) {
        let bpffs = Path::new("/sys/fs/bpf");
        if existing == bpffs {
            let src = c"bpf";
            let target = c"/sys/fs/bpf";
            // SAFETY: valid NUL-terminated strings; no data argument.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    src.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                bail!(
                    "--bpf-dir {}: /sys/fs/bpf is not a bpf filesystem and mounting one failed: {} (mount -t bpf bpf /sys/fs/bpf)",
                    dir.display(),
                    std::io::Error::last_os_error()
                );
            }
        } else {
            bail!(
                "--bpf-dir {}: not on a bpf filesystem (mount -t bpf bpf {})",
                dir.display(),
                existing.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("--bpf-dir {}", dir.display()))
}

/// Removes the pins under `state` (and the directories that held them).
fn remove_pins(state: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(state) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            for pin in std::fs::read_dir(&path)? {
                std::fs::remove_file(pin?.path())?;
            }
            std::fs::remove_dir(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn vip_key(vip: SocketAddr) -> VipKey {
    let (words, af) = addr::to_words(vip.ip());
    VipKey {
        addr: words,
        af,
        _pad0: 0,
        _pad1: 0,
    }
}

fn program(ebpf: &mut Ebpf) -> anyhow::Result<&mut Xdp> {
    let prog = ebpf.program_mut(lb_common::XDP_PROGRAM).ok_or_else(|| {
        anyhow!(
            "program {} missing from the eBPF object",
            lb_common::XDP_PROGRAM
        )
    })?;
    Ok(prog.try_into()?)
}

/// The `SERVICES` key of a service: its VIP, port (network byte order), protocol and family.
pub fn service_key(s: &PlacedService) -> ServiceKey {
    let (a, af) = addr::to_words(s.spec.vip.ip());
    ServiceKey {
        addr: a,
        port: s.spec.vip.port().to_be(),
        proto: proto_number(s.spec.proto),
        af,
    }
}

/// The IP protocol number of a service protocol.
pub fn proto_number(p: Proto) -> u8 {
    match p {
        Proto::Tcp => lb_common::PROTO_TCP,
        Proto::Udp => lb_common::PROTO_UDP,
    }
}

/// Decodes a ring-buffer record; `None` when its size is not a `ConnEvent`'s.
pub fn decode_event(bytes: &[u8]) -> Option<ConnEvent> {
    if bytes.len() < std::mem::size_of::<ConnEvent>() {
        return None;
    }
    // SAFETY: the length is checked above, `ConnEvent` is plain old data for which every bit
    // pattern is valid, and `read_unaligned` has no alignment requirement.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ConnEvent>()) })
}

/// Socket address from raw words, an `af` tag and a network-order port.
pub fn socket_addr(words: [u32; 4], af: u8, port_be: u16) -> SocketAddr {
    SocketAddr::new(addr::from_words(words, af), u16::from_be(port_be))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether test `name` can load the program (it needs root and the eBPF object); says so
    /// when it cannot.
    fn can_load(name: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        let ok = unsafe { libc::geteuid() } == 0 && !EBPF_OBJECT.is_empty();
        if !ok {
            eprintln!("SKIPPED {name}: needs root and the eBPF object");
        }
        ok
    }

    /// An IPv6 connection is removed only while its entries are still its own: an entry that
    /// a new flow has taken (the 5-tuple reopened) stays (loading a program needs root).
    #[test]
    fn ipv6_entries_of_another_flow_are_not_removed() {
        if !can_load("ipv6_entries_of_another_flow_are_not_removed") {
            return;
        }
        let mut dp = Dataplane::load(lb_common::MAGLEV_TABLE_SIZE, 1024).unwrap();
        let key = FlowKey {
            src: [0xfd00_0000, 0, 0, 1],
            dst: [0xfd00_0000, 0, 0, 0x100],
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            af: lb_common::AF_INET6,
            ..FlowKey::default()
        };
        let fwd = |id: u64| Flow {
            flow_id: id,
            dir: flow_dir::FORWARD,
            nat_src: [0xfd00_0002, 0, 0, 1],
            nat_dst: [0xfd00_0002, 0, 0, 2],
            nat_sport: 1024u16.to_be(),
            nat_dport: 8080u16.to_be(),
            ..Flow::default()
        };
        let write = |dp: &mut Dataplane, id: u64| {
            let mut map: HashMap<&mut MapData, FlowKey, Flow> =
                HashMap::try_from(dp.map(maps::FLOWS6).unwrap()).unwrap();
            let f = fwd(id);
            let reply = Flow {
                flow_id: id,
                dir: flow_dir::REPLY,
                ..Flow::default()
            };
            map.insert(key, f, 0).unwrap();
            map.insert(f.peer_key(key.proto, key.af), reply, 0).unwrap();
        };
        write(&mut dp, 1);
        let old = dp.flows().unwrap();
        assert_eq!(old.len(), 1);
        assert!(old[0].rev.is_some(), "both directions read");
        // The program reopens the 5-tuple (same SNAT port: the same reply key) as flow 2.
        write(&mut dp, 2);
        dp.remove_flow(&old[0]).unwrap();
        let now = dp.flows().unwrap();
        assert_eq!(now.len(), 1, "flow 2 is still there");
        assert_eq!(now[0].fwd.flow_id, 2);
        assert_eq!(now[0].rev.map(|r| r.flow_id), Some(2));
        dp.remove_flow(&now[0]).unwrap();
        assert!(
            dp.flows().unwrap().is_empty(),
            "its own entries are removed"
        );
    }

    /// The table's reader sees exactly its entries, and pairs them (loading a program needs
    /// root).
    #[test]
    fn flows_reads_every_entry_and_pairs_the_directions() {
        if !can_load("flows_reads_every_entry_and_pairs_the_directions") {
            return;
        }
        let mut dp = Dataplane::load(lb_common::MAGLEV_TABLE_SIZE, 65536).unwrap();
        let mut written = Vec::new();
        for i in 0..10_000u32 {
            let key = FlowKey4 {
                src: i,
                sport: (i as u16).to_be(),
                proto: lb_common::PROTO_TCP,
                ..FlowKey4::default()
            };
            let flow = Flow {
                flow_id: i as u64,
                last_seen_ns: i as u64,
                dir: flow_dir::FORWARD,
                nat_src: [0x0a00_0201, 0, 0, 0],
                // One backend: distinct SNAT ports have distinct claim words.
                nat_dst: [0x0a00_0302, 0, 0, 0],
                nat_sport: (i as u16).wrapping_add(1),
                nat_dport: 80u16.to_be(),
                ..Flow::default()
            };
            written.push((key, flow.flow_id, flow.dir));
            // Every other connection has its reply entry too (same flow id, as the program
            // writes it; its packet count marks it).
            let peer = FlowKey4::of(&flow.peer_key(key.proto, AF_INET));
            let reply = Flow {
                flow_id: i as u64,
                packets: (1 << 32) | i as u64,
                dir: flow_dir::REPLY,
                ..Flow::default()
            };
            if i % 2 == 0 {
                assert!(dp.flows4.insert(&key, &flow, Some((&peer, &reply))));
                written.push((peer, reply.flow_id, reply.dir));
            } else {
                assert!(dp.flows4.insert(&key, &flow, None));
            }
        }
        let mut read: Vec<(FlowKey4, u64, u8)> = dp
            .flows4
            .entries()
            .into_iter()
            .map(|(k, f)| (k, f.flow_id, f.dir))
            .collect();
        let order = |v: &mut Vec<(FlowKey4, u64, u8)>| v.sort_by_key(|(_, id, dir)| (*id, *dir));
        order(&mut read);
        order(&mut written);
        assert_eq!(read, written);
        let pairs = dp.flows().unwrap();
        assert_eq!(pairs.len(), 10_000);
        for p in &pairs {
            let i = p.fwd.flow_id;
            assert_eq!(
                p.rev.map(|r| r.packets),
                (i % 2 == 0).then_some((1 << 32) | i),
                "pairing of connection {i}"
            );
        }
        // What a sweep reads: the connections whose forward direction is quiet since a time,
        // paired the same way, and how many there are in all.
        let (quiet, total) = dp.quiet_flows(2_999).unwrap();
        assert_eq!((quiet.len(), total), (3_000, 10_000));
        for p in &quiet {
            let i = p.fwd.flow_id;
            assert!(i < 3_000, "connection {i} is not quiet");
            assert_eq!(
                p.rev.map(|r| r.packets),
                (i % 2 == 0).then_some((1 << 32) | i),
                "pairing of quiet connection {i}"
            );
        }
        // Closing: whoever sets CLOSED first (the program or the daemon) records the end.
        let first = pairs.iter().find(|p| p.fwd.flow_id == 0).unwrap();
        assert!(dp.close_flow(first));
        assert!(!dp.close_flow(first), "closed once only");
        // An entry that a new flow has taken over (another flow id) is not the daemon's to
        // close or remove.
        let stale = FlowPair {
            fwd: Flow {
                flow_id: 99_999,
                ..first.fwd
            },
            ..*first
        };
        assert!(!dp.close_flow(&stale));
        dp.remove_flow(&stale).unwrap();
        assert_eq!(dp.flows().unwrap().len(), 10_000);
        // Removal finds both entries, the reply entry through its claim word.
        for p in pairs.iter().filter(|p| p.fwd.flow_id % 4 == 0) {
            dp.remove_flow(p).unwrap();
        }
        let left = dp.flows().unwrap();
        assert_eq!(left.len(), 7_500);
        assert!(left.iter().all(|p| p.fwd.flow_id % 4 != 0));
        assert_eq!(dp.flows4.entries().len(), written.len() - 2 * 2_500);
        // A removed reply entry's claim word is free again (its SNAT port with it); a live
        // one's is not.
        let claim_of = |p: &FlowPair| {
            let peer = FlowKey4::of(&p.fwd.peer_key(p.key.proto, AF_INET));
            (FlowKey4::of(&p.key), p.fwd, peer, p.rev.unwrap())
        };
        let (removed, live) = (
            pairs.iter().find(|p| p.fwd.flow_id == 4).unwrap(),
            pairs.iter().find(|p| p.fwd.flow_id == 6).unwrap(),
        );
        let (key, fwd, peer, rev) = claim_of(removed);
        assert!(dp.flows4.insert(&key, &fwd, Some((&peer, &rev))));
        let (key, fwd, peer, rev) = claim_of(live);
        let other = FlowKey4 {
            src: !key.src,
            ..key
        };
        assert!(!dp.flows4.insert(&other, &fwd, Some((&peer, &rev))));
    }
}
