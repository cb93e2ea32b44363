//! Services and backends as the data plane sees them: ids, backend slots, SNAT addresses and
//! the weighted Maglev lookup table of each service.
//!
//! The Maglev table depends only on the backends' addresses and weights (not on their order or
//! on the host), so several balancers announcing the same VIP send a flow to the same backend.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr, UdpSocket},
};

use anyhow::{Context as _, bail};

use crate::{
    config::{Cidr, ServiceSpec, Settings},
    dataplane::{Layout, proto_number},
};

/// A backend placed in the data plane.
#[derive(Clone, Debug)]
pub struct PlacedBackend {
    /// Slot in the `BACKENDS` array.
    pub index: u32,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Source address used towards this backend.
    pub snat: IpAddr,
    /// Health checks pass (or none are configured).
    pub up: bool,
    /// An operator drained it: no new flows, established ones continue.
    pub drained: bool,
    /// An operator took it out of rotation whatever its health checks say.
    pub disabled: bool,
}

impl PlacedBackend {
    /// Whether new flows may go to it.
    pub fn in_rotation(&self) -> bool {
        self.up && !self.drained && !self.disabled
    }
}

/// An access rule placed in the data plane.
#[derive(Clone, Copy, Debug)]
pub struct PlacedRule {
    /// Index in `RULE_HITS`, unique across services.
    pub id: u32,
    pub net: Cidr,
    pub allow: bool,
    /// A temporary deny of one address an alert asked for (`--alert-block`), not configuration.
    pub block: bool,
}

impl PlacedRule {
    /// How deny records and counters name the rule, e.g. `deny 10.1.2.0/24`, or
    /// `block 10.1.2.3/32` for an alert's block.
    pub fn describe(&self) -> String {
        let kind = match (self.block, self.allow) {
            (true, _) => "block",
            (false, true) => "allow",
            (false, false) => "deny",
        };
        format!("{kind} {}", self.net)
    }
}

/// A service placed in the data plane.
#[derive(Clone, Debug)]
pub struct PlacedService {
    /// Service id: index of its Maglev table.
    pub id: u32,
    pub spec: ServiceSpec,
    pub backends: Vec<PlacedBackend>,
    /// Maglev table generation, bumped on every rebuild.
    pub generation: u32,
    /// Maglev table: for each slot, the `BACKENDS` index of the backend it points to.
    pub table: Vec<u32>,
    pub rules: Vec<PlacedRule>,
}

/// Assigns ids and slots to the configured services, backends and access rules, resolves SNAT
/// addresses and builds the Maglev tables.
pub fn place(settings: &Settings) -> anyhow::Result<Vec<PlacedService>> {
    place_after(settings, &Layout::default())
}

/// As [`place`], after a previous daemon: ids its flows still use keep their meaning (the
/// same service and backend get them again, nothing else does), so adopted flows stay
/// correctly named and accounted.
pub fn place_after(settings: &Settings, previous: &Layout) -> anyhow::Result<Vec<PlacedService>> {
    let mut out: Vec<PlacedService> = Vec::new();
    let reserved_ids: HashSet<u32> = previous.flow_services.clone();
    let reserved_slots: HashSet<u32> = previous.backends.values().copied().collect();
    // First the services and backends whose ids carry over, then the rest.
    let kept = |spec: &ServiceSpec| {
        previous
            .services
            .get(&(proto_number(spec.proto), spec.vip))
            .copied()
    };
    for spec in &settings.services {
        let id = match kept(spec) {
            Some(id) if !out.iter().any(|s| s.id == id) => id,
            _ => free_id(
                out.iter().map(|s| s.id).chain(
                    reserved_ids
                        .iter()
                        .copied()
                        .filter(|r| !settings.services.iter().any(|o| kept(o) == Some(*r))),
                ),
                lb_common::MAX_SERVICES,
            )
            .context("--service: no free service id")?,
        };
        out.push(PlacedService {
            id,
            spec: spec.clone(),
            backends: Vec::new(),
            generation: 1,
            table: Vec::new(),
            rules: Vec::new(),
        });
    }
    for i in 0..out.len() {
        let id = out[i].id;
        for b in &settings.services[i].backends {
            let used = out
                .iter()
                .flat_map(|s| s.backends.iter().map(|b| b.index))
                .collect::<HashSet<u32>>();
            let index = match previous.backends.get(&(id, b.addr)) {
                Some(&slot) if !used.contains(&slot) => slot,
                _ => free_id(
                    used.iter().copied().chain(reserved_slots.iter().copied()),
                    lb_common::MAX_BACKENDS,
                )
                .context("--backend: no free backend slot")?,
            };
            let backend = place_backend(settings, &out[i].spec.name, index, b.addr, b.weight)?;
            out[i].backends.push(backend);
        }
        for (nets, allow) in [
            (settings.services[i].allow.clone(), true),
            (settings.services[i].deny.clone(), false),
        ] {
            for net in nets {
                let rid = free_id(
                    out.iter().flat_map(|s| s.rules.iter().map(|r| r.id)),
                    lb_common::MAX_ACL_RULES,
                )
                .context("--allow/--deny: no free rule id")?;
                out[i].rules.push(PlacedRule {
                    id: rid,
                    net,
                    allow,
                    block: false,
                });
            }
        }
        out[i].table = maglev_table(&out[i].in_rotation(), settings.maglev_table_size);
    }
    Ok(out)
}

/// A backend in slot `index`, with its SNAT address: `--snat-ip` of its family, else the
/// kernel's route source towards it.
pub fn place_backend(
    settings: &Settings,
    service: &str,
    index: u32,
    addr: SocketAddr,
    weight: u32,
) -> anyhow::Result<PlacedBackend> {
    let snat = match settings
        .snat_ips
        .iter()
        .find(|ip| ip.is_ipv4() == addr.is_ipv4())
    {
        Some(ip) => *ip,
        None => route_source(addr).with_context(|| {
            format!(
                "backend {service}={addr}: cannot find a source address towards it (give --snat-ip)"
            )
        })?,
    };
    Ok(PlacedBackend {
        index,
        addr,
        weight,
        snat,
        up: true,
        drained: false,
        disabled: false,
    })
}

/// The lowest id below `limit` that is not in `used`.
pub fn free_id(used: impl IntoIterator<Item = u32>, limit: u32) -> Option<u32> {
    let used: HashSet<u32> = used.into_iter().collect();
    (0..limit).find(|i| !used.contains(i))
}

impl PlacedService {
    /// The backends that receive new flows.
    pub fn in_rotation(&self) -> Vec<PlacedBackend> {
        self.backends
            .iter()
            .filter(|b| b.in_rotation())
            .cloned()
            .collect()
    }

    /// Rebuilds the Maglev table from the backends in rotation, as a new generation.
    pub fn rebuild(&mut self, table_size: u32) {
        self.table = maglev_table(&self.in_rotation(), table_size);
        self.generation += 1;
    }
}

/// The local address the kernel would use to reach `addr` (no packet is sent).
fn route_source(addr: SocketAddr) -> anyhow::Result<IpAddr> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind)?;
    sock.connect(addr)?;
    let ip = sock.local_addr()?.ip();
    if ip.is_unspecified() {
        bail!("no route to {addr}");
    }
    Ok(ip)
}

/// Weighted Maglev (Eisenbud et al., NSDI 2016): each backend walks its own permutation of the
/// slots and claims the next free one; a backend of weight w takes w turns per round, so it
/// ends up with a share of slots proportional to w. Returns `BACKENDS` indices; empty when
/// there is no backend.
pub fn maglev_table(backends: &[PlacedBackend], size: u32) -> Vec<u32> {
    if backends.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = size as u64;
    // Sort by address so the table does not depend on flag order.
    let mut order: Vec<&PlacedBackend> = backends.iter().collect();
    order.sort_by_key(|b| b.addr);
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|b| {
            let id = b.addr.to_string();
            let offset = fnv1a(id.as_bytes(), 0xcbf2_9ce4_8422_2325) % m;
            let skip = fnv1a(id.as_bytes(), 0x8422_2325_cbf2_9ce4) % (m - 1).max(1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut table = vec![u32::MAX; size as usize];
    let mut filled = 0u64;
    'fill: loop {
        for (i, b) in order.iter().enumerate() {
            for _ in 0..b.weight {
                let (offset, skip) = perms[i];
                let mut slot = (offset + next[i] * skip) % m;
                while table[slot as usize] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % m;
                }
                table[slot as usize] = b.index;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
    }
    table
}

/// FNV-1a, 64-bit, with a chosen basis: stable across hosts and releases.
fn fnv1a(data: &[u8], basis: u64) -> u64 {
    data.iter().fold(basis, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(i: u32, addr: &str, weight: u32) -> PlacedBackend {
        PlacedBackend {
            index: i,
            addr: addr.parse().unwrap(),
            weight,
            snat: "10.0.0.1".parse().unwrap(),
            up: true,
            drained: false,
            disabled: false,
        }
    }

    #[test]
    fn weights_are_respected() {
        let bs = [
            backend(0, "10.0.2.2:80", 1),
            backend(1, "10.0.3.2:80", 2),
            backend(2, "10.0.4.2:80", 1),
        ];
        let t = maglev_table(&bs, 65537);
        let share = |i| t.iter().filter(|&&x| x == i).count() as f64 / t.len() as f64;
        assert!((share(0) - 0.25).abs() < 0.01, "{}", share(0));
        assert!((share(1) - 0.50).abs() < 0.01, "{}", share(1));
        assert!((share(2) - 0.25).abs() < 0.01, "{}", share(2));
    }

    #[test]
    fn table_is_independent_of_order_and_removal_moves_little() {
        let a = [
            backend(0, "10.0.2.2:80", 1),
            backend(1, "10.0.3.2:80", 1),
            backend(2, "10.0.4.2:80", 1),
        ];
        let b = [
            backend(2, "10.0.4.2:80", 1),
            backend(0, "10.0.2.2:80", 1),
            backend(1, "10.0.3.2:80", 1),
        ];
        assert_eq!(maglev_table(&a, 4093), maglev_table(&b, 4093));
        let fewer = [a[0].clone(), a[1].clone()];
        let (t3, t2) = (maglev_table(&a, 4093), maglev_table(&fewer, 4093));
        // Slots that did not belong to the removed backend mostly stay where they were.
        let kept = t3
            .iter()
            .zip(&t2)
            .filter(|(x, y)| **x != 2 && x == y)
            .count();
        let others = t3.iter().filter(|x| **x != 2).count();
        assert!(kept as f64 / others as f64 > 0.9, "{kept}/{others}");
    }

    #[test]
    fn empty_pool_gives_empty_table() {
        assert!(maglev_table(&[], 65537).is_empty());
    }
}
