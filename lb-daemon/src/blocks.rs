//! Temporary blocks of client addresses that tripped an alert (`--alert-block`): a deny rule
//! for the single address in the kernel's access-control trie of every service of its address
//! family, removed when the time is up. The alert record's `action` says the block was made;
//! refused flows name the rule `block IP/32`. A block is not configuration: it is not a
//! `config_change`, does not outlive the daemon, and yields to a configured rule for the same
//! prefix.

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    balancer::{self, PlacedRule, PlacedService},
    config::Cidr,
    dataplane::Dataplane,
    requests::Names,
};

#[derive(Default)]
pub struct Blocks {
    until: HashMap<IpAddr, Instant>,
}

impl Blocks {
    /// Blocks `ips` for `length` (a blocked address's time starts again).
    pub fn add(
        &mut self,
        ips: Vec<IpAddr>,
        length: Duration,
        services: &mut [PlacedService],
        names: &mut Names,
        dp: &mut Dataplane,
    ) -> anyhow::Result<()> {
        for ip in ips {
            let fresh = self.until.insert(ip, Instant::now() + length).is_none();
            if !fresh {
                continue;
            }
            let net = single(ip);
            for i in 0..services.len() {
                let s = &services[i];
                if s.spec.vip.is_ipv4() != ip.is_ipv4() || s.rules.iter().any(|r| r.net == net) {
                    continue;
                }
                let Some(id) = balancer::free_id(
                    services.iter().flat_map(|s| s.rules.iter().map(|r| r.id)),
                    lb_common::MAX_ACL_RULES,
                ) else {
                    warn!(%ip, "cannot block: no free rule id");
                    break;
                };
                let rule = PlacedRule {
                    id,
                    net,
                    allow: false,
                    block: true,
                };
                let s = &mut services[i];
                s.rules.push(rule);
                names.rules.insert(id, rule.describe());
                dp.set_rule(s.id, &rule, true)?;
                dp.update_service(s)?;
            }
            info!(%ip, seconds = length.as_secs(), "source blocked in the kernel (alert)");
        }
        Ok(())
    }

    /// Lifts the blocks whose time is up.
    pub fn expire(
        &mut self,
        services: &mut [PlacedService],
        dp: &mut Dataplane,
    ) -> anyhow::Result<()> {
        let now = Instant::now();
        let done: Vec<IpAddr> = self
            .until
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in done {
            self.until.remove(&ip);
            let net = single(ip);
            for s in services.iter_mut() {
                if let Some(pos) = s.rules.iter().position(|r| r.block && r.net == net) {
                    let rule = s.rules.remove(pos);
                    dp.set_rule(s.id, &rule, false)?;
                    dp.update_service(s)?;
                }
            }
            info!(%ip, "block lifted");
        }
        Ok(())
    }
}

/// The prefix of exactly one address.
fn single(ip: IpAddr) -> Cidr {
    Cidr {
        addr: ip,
        len: if ip.is_ipv4() { 32 } else { 128 },
    }
}
