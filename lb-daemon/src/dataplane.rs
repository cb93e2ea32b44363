//! The kernel side as user space drives it: load the embedded eBPF object, write the service,
//! backend, Maglev and configuration maps, attach the XDP program, and read back flows,
//! counters and ring-buffer records.

use std::{collections::HashMap as StdHashMap, net::SocketAddr};

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, RingBuf, lpm_trie::Key},
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
    util::nr_cpus,
};
use lb_common::{
    AclKey, AclRule, Backend, Config, ConnEvent, Flow, FlowKey, MAX_ACL_RULES, MAX_SERVICES,
    ServiceInfo, ServiceKey, VipKey, acl_action, addr, config_flags, flow_dir, maps, service_flags,
    stat,
};

use crate::{audit::Proto, balancer::PlacedService};

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

/// A loaded (and possibly attached) data plane. Dropping it detaches the program.
pub struct Dataplane {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
}

impl Dataplane {
    /// Loads the object and the XDP program into the kernel, without attaching it. The Maglev
    /// and conntrack maps are sized here, from the configuration.
    pub fn load(maglev_size: u32, conntrack_size: u32) -> anyhow::Result<Self> {
        if EBPF_OBJECT.is_empty() {
            return Err(anyhow!(
                "this binary was built without the eBPF object (AYA_BUILD_SKIP); rebuild after `cargo xtask setup`"
            ));
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::MAGLEV, MAX_SERVICES * maglev_size)
            .map_max_entries(maps::FLOWS, 2 * conntrack_size)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let prog: &mut Xdp = program(&mut ebpf)?;
        prog.load().context("loading the XDP program (verifier)")?;
        Ok(Self {
            ebpf,
            links: Vec::new(),
        })
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

    /// Attaches the program to an interface, in native mode when the driver has it.
    pub fn attach(&mut self, iface: &str) -> anyhow::Result<()> {
        let prog = program(&mut self.ebpf)?;
        let id = prog
            .attach(iface, XdpMode::default())
            .with_context(|| format!("--iface {iface}: cannot attach the XDP program"))?;
        self.links.push((iface.to_string(), id));
        Ok(())
    }

    /// Detaches the program from every interface it was attached to.
    pub fn detach_all(&mut self) -> anyhow::Result<()> {
        let links = std::mem::take(&mut self.links);
        let prog = program(&mut self.ebpf)?;
        for (iface, id) in links {
            prog.detach(id)
                .with_context(|| format!("detaching from {iface}"))?;
        }
        Ok(())
    }

    /// Writes run-time settings and seeds the per-CPU flow-id counters.
    pub fn configure(
        &mut self,
        snat_ports: (u16, u16),
        maglev_size: u32,
        flow_id_base: u64,
    ) -> anyhow::Result<()> {
        let mut cfg: Array<&mut MapData, Config> = Array::try_from(self.map(maps::CONFIG)?)?;
        cfg.set(
            0,
            Config {
                snat_port_min: snat_ports.0,
                snat_port_max: snat_ports.1,
                maglev_size,
                flags: 0,
                _pad: 0,
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

    /// Writes services, backends, Maglev tables and access rules.
    pub fn install(&mut self, services: &[PlacedService]) -> anyhow::Result<()> {
        {
            let mut backends: Array<&mut MapData, Backend> =
                Array::try_from(self.map(maps::BACKENDS)?)?;
            for s in services {
                for b in &s.backends {
                    let (a, af) = addr::to_words(b.addr.ip());
                    let (snat, _) = addr::to_words(b.snat);
                    let entry = Backend {
                        addr: a,
                        snat_addr: snat,
                        port: b.addr.port().to_be(),
                        af,
                        _pad0: 0,
                        _pad1: 0,
                    };
                    backends.set(b.index, entry, 0)?;
                }
            }
        }
        {
            let mut acl: LpmTrie<&mut MapData, AclKey, AclRule> =
                LpmTrie::try_from(self.map(maps::ACL)?)?;
            for s in services {
                for r in &s.rules {
                    let (words, af) = addr::to_words(r.net.addr);
                    let key = Key::new(
                        32 + r.net.len as u32,
                        AclKey {
                            scope: AclKey::scope(s.id, af),
                            addr: words,
                        },
                    );
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
                }
            }
        }
        {
            let mut vips: HashMap<&mut MapData, VipKey, u32> =
                HashMap::try_from(self.map(maps::VIPS)?)?;
            for s in services {
                let (words, af) = addr::to_words(s.spec.vip.ip());
                vips.insert(
                    VipKey {
                        addr: words,
                        af,
                        _pad0: 0,
                        _pad1: 0,
                    },
                    1,
                    0,
                )?;
            }
        }
        for s in services {
            self.update_service(s)?;
        }
        Ok(())
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
        let map: HashMap<&mut MapData, FlowKey, Flow> = HashMap::try_from(self.map(maps::FLOWS)?)?;
        // Entries may vanish while iterating (the program's own updates): skip those.
        let entries: Vec<(FlowKey, Flow)> = map.iter().filter_map(Result::ok).collect();
        let replies: StdHashMap<FlowKey, Flow> = entries
            .iter()
            .filter(|(_, f)| f.dir == flow_dir::REPLY)
            .map(|(k, f)| (*k, *f))
            .collect();
        Ok(entries
            .into_iter()
            .filter(|(_, f)| f.dir == flow_dir::FORWARD)
            .map(|(key, fwd)| {
                let rev = replies.get(&fwd.peer_key(key.proto, key.af)).copied();
                FlowPair { key, fwd, rev }
            })
            .collect())
    }

    /// Removes both entries of a connection.
    pub fn remove_flow(&mut self, pair: &FlowPair) -> anyhow::Result<()> {
        let mut map: HashMap<&mut MapData, FlowKey, Flow> =
            HashMap::try_from(self.map(maps::FLOWS)?)?;
        let _ = map.remove(&pair.key);
        let _ = map.remove(&pair.fwd.peer_key(pair.key.proto, pair.key.af));
        Ok(())
    }

    /// The `STATS` counters summed over CPUs, indexed by `lb_common::stat`.
    pub fn stats(&mut self) -> anyhow::Result<Vec<u64>> {
        let st: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(self.map(maps::STATS)?)?;
        (0..stat::COUNT)
            .map(|i| Ok(st.get(&i, 0)?.iter().sum()))
            .collect()
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
        self.ebpf
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
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

fn service_key(s: &PlacedService) -> ServiceKey {
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
