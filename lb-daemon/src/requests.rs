//! Control requests as the run loop executes them: the caller's role is checked (a refusal is
//! a `control_denied` record), queries are answered from the kernel's maps and the run loop's
//! state, and every change is validated with the same checks as the flags, recorded as a
//! durable `config_change` (who, what, before, after, configuration generation) and only then
//! applied. Under fail-closed, a change that cannot be recorded is refused.

use std::{collections::HashMap, net::SocketAddr, time::SystemTime};

use serde_json::{Value, json};
use tracing::warn;

use crate::{
    audit::{ConfigChange, ControlDenied, Event},
    balancer::{self, PlacedBackend, PlacedRule, PlacedService},
    config::{self, Cidr, ServiceSpec, Settings},
    control::{self, Refusal, Response},
    dataplane::{Dataplane, socket_addr},
    health,
    journal::Journal,
};

/// What the control plane keeps between requests.
pub struct ControlState {
    /// Configuration generation: 1 at start, one more per accepted change.
    pub generation: u64,
    /// Drained backends whose `backend_drained` record is written.
    pub drained_reported: Vec<(u32, SocketAddr)>,
    pub started: SystemTime,
}

/// Health checks: the state of each checked backend and the task that probes it.
pub struct Health {
    pub state: HashMap<(u32, SocketAddr), health::State>,
    tasks: HashMap<(u32, SocketAddr), tokio::task::AbortHandle>,
    tx: tokio::sync::mpsc::Sender<health::Probe>,
}

impl Health {
    pub fn new(tx: tokio::sync::mpsc::Sender<health::Probe>) -> Self {
        Health {
            state: HashMap::new(),
            tasks: HashMap::new(),
            tx,
        }
    }

    /// Starts checking a backend when its service has checks.
    pub fn start(&mut self, s: &PlacedService, addr: SocketAddr) {
        if let Some(spec) = &s.spec.health {
            let task = health::spawn(s.id, addr, spec.clone(), self.tx.clone());
            self.tasks.insert((s.id, addr), task);
            self.state.insert((s.id, addr), health::State::default());
        }
    }

    /// Stops checking a backend; results still in flight are ignored.
    pub fn stop(&mut self, service: u32, addr: SocketAddr) {
        if let Some(t) = self.tasks.remove(&(service, addr)) {
            t.abort();
        }
        self.state.remove(&(service, addr));
    }
}

/// What kernel records refer to by number: services and access rules. Names of removed
/// services and rules stay until their id is given to something else, so the records of
/// their last flows are still named.
pub struct Names {
    pub services: HashMap<u32, String>,
    pub rules: HashMap<u32, String>,
}

impl Names {
    pub fn new(services: &[PlacedService]) -> Self {
        Self {
            services: services
                .iter()
                .map(|s| (s.id, s.spec.name.clone()))
                .collect(),
            rules: services
                .iter()
                .flat_map(|s| s.rules.iter().map(|r| (r.id, r.describe())))
                .collect(),
        }
    }
}

/// Everything a request may read or change.
pub struct Plane<'a> {
    pub services: &'a mut Vec<PlacedService>,
    pub names: &'a mut Names,
    pub health: &'a mut Health,
    pub dp: &'a mut Dataplane,
    pub audit: &'a mut Journal,
    pub settings: &'a Settings,
    pub state: &'a mut ControlState,
}

/// A refusal of the request, as its response.
type Refused = Response;

fn invalid(msg: impl Into<String>) -> Refused {
    Response::err(Refusal::Invalid, msg)
}

/// Executes one control request.
pub fn handle(call: &control::Call, p: &mut Plane<'_>) -> anyhow::Result<Response> {
    let req = &call.request;
    let Some(needed) = control::required_role(&req.action) else {
        return Ok(invalid(format!("unknown action '{}'", req.action)));
    };
    if call.role < Some(needed) {
        let target = [
            req.service.as_deref(),
            req.backend.as_deref(),
            req.value.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        let has = call
            .role
            .map_or("no role".to_string(), |r| format!("the {} role", r.name()));
        let reason = format!(
            "{} requires the {} role; {} has {has}",
            req.action,
            needed.name(),
            call.actor.user
        );
        warn!(actor = %call.actor.user, uid = call.actor.uid, action = %req.action, "control request refused");
        p.audit.record(
            SystemTime::now(),
            Event::ControlDenied(ControlDenied {
                actor: call.actor.clone(),
                action: req.action.clone(),
                target,
                reason: reason.clone(),
            }),
        );
        p.audit.sync();
        return Ok(Response::err(Refusal::Refused, reason));
    }
    let result = match req.action.as_str() {
        "status" => status(p),
        "services" => Ok(Ok(services(p))),
        "backends" => Ok(backends(req, p)),
        "flows" => flows(req, p),
        "service.add" => Ok(service_add(call, p)),
        "service.remove" => Ok(service_remove(call, p)),
        "backend.add" => Ok(backend_add(call, p)),
        "backend.remove" => Ok(backend_remove(call, p)),
        "backend.drain" | "backend.undrain" | "backend.weight" | "backend.enable"
        | "backend.disable" => Ok(backend_set(call, p)),
        "acl.add" | "acl.remove" => Ok(acl_change(call, p)),
        _ => Ok(Err(invalid(format!("unknown action '{}'", req.action)))),
    };
    match result {
        Ok(Ok(data)) => Ok(Response::ok(data)),
        Ok(Err(refused)) => Ok(refused),
        Err(e) => Err(e),
    }
}

fn status(p: &mut Plane<'_>) -> anyhow::Result<Result<Value, Refused>> {
    let stats = p.dp.stats()?;
    Ok(Ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": SystemTime::now().duration_since(p.state.started).unwrap_or_default().as_secs(),
        "config_generation": p.state.generation,
        "services": p.services.len(),
        "flows": p.dp.flows()?.len(),
        "audit_dir": p.settings.audit_dir,
        "counters": lb_common::stat::NAMES.iter().zip(stats).map(|(n, v)| (n.to_string(), v)).collect::<std::collections::BTreeMap<_, _>>(),
    })))
}

fn services(p: &Plane<'_>) -> Value {
    json!(p.services.iter().map(|s| json!({
        "name": s.spec.name, "proto": s.spec.proto.name(), "vip": s.spec.vip.to_string(),
        "backends": s.backends.len(), "in_rotation": s.in_rotation().len(), "generation": s.generation,
        "rules": s.rules.iter().map(PlacedRule::describe).collect::<Vec<_>>(),
        "rate_limit": s.spec.rate_limit,
    })).collect::<Vec<_>>())
}

fn backends(req: &control::Request, p: &Plane<'_>) -> Result<Value, Refused> {
    let s = &p.services[find(p.services, req)?];
    Ok(json!(s.backends.iter().map(|b| json!({
        "backend": b.addr.to_string(), "weight": b.weight, "health": if b.up { "up" } else { "down" },
        "drained": b.drained, "disabled": b.disabled, "snat": b.snat.to_string(),
        "failures": p.health.state.get(&(s.id, b.addr)).map_or(0, |h| h.failures),
    })).collect::<Vec<_>>()))
}

fn flows(req: &control::Request, p: &mut Plane<'_>) -> anyhow::Result<Result<Value, Refused>> {
    use lb_common::flow_state;
    let now = crate::daemon::clock_ns(libc::CLOCK_MONOTONIC_COARSE);
    let only = req.service.as_deref();
    let names = &p.names.services;
    let flows: Vec<_> = p
        .dp
        .flows()?
        .into_iter()
        .filter(|f| {
            only.is_none_or(|n| names.get(&f.fwd.service_id).map(String::as_str) == Some(n))
        })
        .map(|f| {
            let k = &f.key;
            let proto = if k.proto == lb_common::PROTO_UDP {
                "udp"
            } else {
                "tcp"
            };
            json!({
                "flow_id": f.fwd.flow_id, "proto": proto, "service": names.get(&f.fwd.service_id),
                "client": socket_addr(k.src, k.af, k.sport).to_string(),
                "vip": socket_addr(k.dst, k.af, k.dport).to_string(),
                "backend": socket_addr(f.fwd.nat_dst, k.af, f.fwd.nat_dport).to_string(),
                "state": if f.fwd.state & flow_state::CLOSED != 0 { "closed" } else { "open" },
                "bytes_to_backend": f.fwd.bytes, "bytes_to_client": f.rev.map_or(0, |r| r.bytes),
                "idle_s": now.saturating_sub(f.last_seen_ns()) / 1_000_000_000,
            })
        })
        .collect();
    Ok(Ok(json!(flows)))
}

/// The service a request names.
fn find(services: &[PlacedService], req: &control::Request) -> Result<usize, Refused> {
    let name = req
        .service
        .as_deref()
        .ok_or_else(|| invalid("which service?"))?;
    services
        .iter()
        .position(|s| s.spec.name == name)
        .ok_or_else(|| invalid(format!("no service '{name}'")))
}

/// The backend (IP:PORT) a request names, in service `i`.
fn find_backend(
    p: &Plane<'_>,
    i: usize,
    req: &control::Request,
) -> Result<(SocketAddr, usize), Refused> {
    let addr = backend_addr(req)?;
    let b = p.services[i]
        .backends
        .iter()
        .position(|b| b.addr == addr)
        .ok_or_else(|| {
            invalid(format!(
                "{addr} is not a backend of {}",
                p.services[i].spec.name
            ))
        })?;
    Ok((addr, b))
}

fn backend_addr(req: &control::Request) -> Result<SocketAddr, Refused> {
    req.backend
        .as_deref()
        .and_then(|b| b.parse::<SocketAddr>().ok())
        .ok_or_else(|| invalid("which backend (IP:PORT; IPv6 as [IP]:PORT)?"))
}

/// Writes the `config_change` record and makes it durable; refuses when the log cannot
/// take it under fail-closed. Returns the new configuration generation.
fn commit(
    call: &control::Call,
    p: &mut Plane<'_>,
    target: String,
    before: Value,
    after: Value,
) -> Result<u64, Refused> {
    p.audit.record(
        SystemTime::now(),
        Event::ConfigChange(ConfigChange {
            actor: call.actor.clone(),
            action: call.request.action.clone(),
            target,
            before: before.to_string(),
            after: after.to_string(),
            generation_before: p.state.generation,
            generation_after: p.state.generation + 1,
        }),
    );
    p.audit.sync();
    if p.audit.refusing_changes() {
        return Err(Response::err(
            Refusal::Failed,
            "the audit log cannot record the change (fail-closed)",
        ));
    }
    p.state.generation += 1;
    Ok(p.state.generation)
}

/// The answer to an applied change.
fn done(p: &Plane<'_>, service: Option<&PlacedService>) -> Value {
    json!({
        "config_generation": p.state.generation,
        "maglev_generation": service.map(|s| s.generation),
    })
}

/// A failure to apply a change that is already recorded: the daemon cannot go on
/// pretending the kernel holds what the log says.
fn kernel(e: anyhow::Error) -> Refused {
    Response::err(Refusal::Failed, format!("{e:#}"))
}

fn specs(p: &Plane<'_>) -> Vec<ServiceSpec> {
    p.services.iter().map(|s| s.spec.clone()).collect()
}

/// Ids that live flows carry: they are not given to anything new while those flows last.
fn ids_in_flows(p: &mut Plane<'_>) -> Result<(Vec<u32>, Vec<u32>), Refused> {
    let flows = p.dp.flows().map_err(kernel)?;
    Ok((
        flows.iter().map(|f| f.fwd.service_id).collect(),
        flows.iter().map(|f| f.fwd.backend_idx).collect(),
    ))
}

fn service_add(call: &control::Call, p: &mut Plane<'_>) -> Result<Value, Refused> {
    let req = &call.request;
    let name = req
        .service
        .clone()
        .ok_or_else(|| invalid("which service?"))?;
    let (proto, vip) = config::parse_vip(req.value.as_deref().unwrap_or_default())
        .map_err(|e| invalid(format!("service {name}: {e}")))?;
    let mut spec = ServiceSpec::new(name.clone(), proto, vip);
    spec.rate_limit = req
        .rate_limit
        .as_deref()
        .map(config::parse_rate_value)
        .transpose()
        .map_err(|e| invalid(format!("--rate-limit: {e}")))?;
    config::add_service(&mut specs(p), spec.clone())
        .map_err(|e| invalid(format!("service {name}: {e}")))?;
    crate::daemon::check_forwarding_for(vip.is_ipv6()).map_err(|e| invalid(format!("{e:#}")))?;
    let (flow_services, _) = ids_in_flows(p)?;
    let id = balancer::free_id(
        p.services.iter().map(|s| s.id).chain(flow_services),
        lb_common::MAX_SERVICES,
    )
    .ok_or_else(|| invalid("no free service id (services with live flows keep theirs)"))?;
    commit(call, p, name.clone(), Value::Null, json!(spec))?;
    let placed = PlacedService {
        id,
        spec,
        backends: Vec::new(),
        generation: 1,
        table: Vec::new(),
        rules: Vec::new(),
    };
    p.dp.install_service(&placed).map_err(kernel)?;
    p.names.services.insert(id, name);
    p.services.push(placed);
    Ok(done(p, p.services.last()))
}

fn service_remove(call: &control::Call, p: &mut Plane<'_>) -> Result<Value, Refused> {
    let i = find(p.services, &call.request)?;
    let before = json!(p.services[i].spec);
    commit(
        call,
        p,
        p.services[i].spec.name.clone(),
        before,
        Value::Null,
    )?;
    let s = p.services.remove(i);
    let vip_in_use = p
        .services
        .iter()
        .any(|o| o.spec.vip.ip() == s.spec.vip.ip());
    p.dp.remove_service(&s, vip_in_use).map_err(kernel)?;
    for b in &s.backends {
        p.health.stop(s.id, b.addr);
    }
    p.state.drained_reported.retain(|(id, _)| *id != s.id);
    Ok(done(p, None))
}

fn backend_add(call: &control::Call, p: &mut Plane<'_>) -> Result<Value, Refused> {
    let req = &call.request;
    let i = find(p.services, req)?;
    let addr = backend_addr(req)?;
    let weight = req.weight.unwrap_or(1);
    let name = p.services[i].spec.name.clone();
    config::add_backend(&mut specs(p), &name, addr, weight)
        .map_err(|e| invalid(format!("backend {name}={addr}: {e}")))?;
    let (_, flow_slots) = ids_in_flows(p)?;
    let index = balancer::free_id(
        p.services
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| b.index))
            .chain(flow_slots),
        lb_common::MAX_BACKENDS,
    )
    .ok_or_else(|| invalid("no free backend slot"))?;
    let backend = balancer::place_backend(p.settings, &name, index, addr, weight)
        .map_err(|e| invalid(format!("{e:#}")))?;
    commit(
        call,
        p,
        format!("{name} {addr}"),
        Value::Null,
        json!(config::BackendSpec { addr, weight }),
    )?;
    p.dp.set_backend(index, Some((addr, backend.snat)))
        .map_err(kernel)?;
    let s = &mut p.services[i];
    s.spec.backends.push(config::BackendSpec { addr, weight });
    s.backends.push(backend);
    s.rebuild(p.settings.maglev_table_size);
    p.dp.update_service(s).map_err(kernel)?;
    p.health.start(s, addr);
    crate::daemon::prime_neighbor(addr.ip());
    Ok(done(p, Some(&p.services[i])))
}

fn backend_remove(call: &control::Call, p: &mut Plane<'_>) -> Result<Value, Refused> {
    let req = &call.request;
    let i = find(p.services, req)?;
    let (addr, b) = find_backend(p, i, req)?;
    let before = backend_view(&p.services[i].backends[b]);
    commit(
        call,
        p,
        format!("{} {addr}", p.services[i].spec.name),
        before,
        Value::Null,
    )?;
    let s = &mut p.services[i];
    s.backends.remove(b);
    s.spec.backends.retain(|o| o.addr != addr);
    s.rebuild(p.settings.maglev_table_size);
    let id = s.id;
    p.dp.update_service(&p.services[i]).map_err(kernel)?;
    p.health.stop(id, addr);
    p.state.drained_reported.retain(|k| *k != (id, addr));
    Ok(done(p, Some(&p.services[i])))
}

/// A backend's operator-set state, as `config_change` records show it.
fn backend_view(b: &PlacedBackend) -> Value {
    json!({ "addr": b.addr, "weight": b.weight, "drained": b.drained, "disabled": b.disabled })
}

fn backend_set(call: &control::Call, p: &mut Plane<'_>) -> Result<Value, Refused> {
    let req = &call.request;
    let i = find(p.services, req)?;
    let (addr, b) = find_backend(p, i, req)?;
    let old = p.services[i].backends[b].clone();
    let mut changed = old.clone();
    let field = match req.action.as_str() {
        "backend.drain" => {
            changed.drained = true;
            "drained"
        }
        "backend.undrain" => {
            changed.drained = false;
            "drained"
        }
        "backend.enable" => {
            changed.disabled = false;
            "disabled"
        }
        "backend.disable" => {
            changed.disabled = true;
            "disabled"
        }
        _ => match req.weight {
            Some(w) if (1..=1000).contains(&w) => {
                changed.weight = w;
                "weight"
            }
            _ => return Err(invalid("weight must be 1 to 1000")),
        },
    };
    let (before, after) = (backend_view(&old), backend_view(&changed));
    commit(
        call,
        p,
        format!("{} {addr}", p.services[i].spec.name),
        json!({ field: before[field] }),
        json!({ field: after[field] }),
    )?;
    let s = &mut p.services[i];
    if !changed.drained {
        p.state.drained_reported.retain(|k| *k != (s.id, addr));
    }
    if let Some(spec) = s.spec.backends.iter_mut().find(|o| o.addr == addr) {
        spec.weight = changed.weight;
    }
    s.backends[b] = changed;
    s.rebuild(p.settings.maglev_table_size);
    p.dp.update_service(&p.services[i]).map_err(kernel)?;
    Ok(done(p, Some(&p.services[i])))
}

/// `acl.add` / `acl.remove` with the value `allow|deny CIDR`.
fn acl_change(call: &control::Call, p: &mut Plane<'_>) -> Result<Value, Refused> {
    let req = &call.request;
    let i = find(p.services, req)?;
    let name = p.services[i].spec.name.clone();
    let (kind, net) = req
        .value
        .as_deref()
        .and_then(|v| v.split_once(' '))
        .ok_or_else(|| invalid("expected allow|deny CIDR"))?;
    let allow = match kind {
        "allow" => true,
        "deny" => false,
        _ => return Err(invalid(format!("'{kind}': expected allow or deny"))),
    };
    let net: Cidr = net.parse().map_err(|e: String| invalid(e))?;
    let rule = json!({ kind: net.to_string() });
    if req.action == "acl.add" {
        config::add_rule(&mut specs(p), &name, net, allow)
            .map_err(|e| invalid(format!("{kind} {name}={net}: {e}")))?;
        let id = balancer::free_id(
            p.services.iter().flat_map(|s| s.rules.iter().map(|r| r.id)),
            lb_common::MAX_ACL_RULES,
        )
        .ok_or_else(|| invalid("no free rule id"))?;
        commit(call, p, name.clone(), Value::Null, rule)?;
        let placed = PlacedRule {
            id,
            net,
            allow,
            block: false,
        };
        let s = &mut p.services[i];
        // The configured rule takes the place of an alert's block of the same address.
        s.rules.retain(|r| !(r.block && r.net == net));
        if allow {
            s.spec.allow.push(net);
        } else {
            s.spec.deny.push(net);
        }
        p.names.rules.insert(id, placed.describe());
        s.rules.push(placed);
        let sid = s.id;
        p.dp.set_rule(sid, &placed, true).map_err(kernel)?;
    } else {
        let r = p.services[i]
            .rules
            .iter()
            .position(|r| !r.block && r.allow == allow && r.net == net)
            .ok_or_else(|| invalid(format!("{name} has no rule '{kind} {net}'")))?;
        commit(call, p, name.clone(), rule, Value::Null)?;
        let s = &mut p.services[i];
        let placed = s.rules.remove(r);
        s.spec.allow.retain(|n| !allow || *n != net);
        s.spec.deny.retain(|n| allow || *n != net);
        let sid = s.id;
        p.dp.set_rule(sid, &placed, false).map_err(kernel)?;
    }
    // The service entry carries whether it has rules and whether allow rules make it
    // default-deny.
    p.dp.update_service(&p.services[i]).map_err(kernel)?;
    Ok(done(p, Some(&p.services[i])))
}
