//! The configuration at any moment, from the audit log alone: the effective configuration in
//! `daemon_start`, then each `config_change` applied in order. Changes record `before` and
//! `after` as JSON: a whole object when something is added (`before` null) or removed
//! (`after` null), the changed fields otherwise.

use serde_json::Value;

use crate::audit::ConfigChange;

/// Applies one recorded change to the configuration (the `daemon_start` JSON) it was made on.
/// Targets are `SERVICE` for service and access-rule changes, `SERVICE IP:PORT` for backend
/// changes. A change that does not fit the configuration (a log edited by hand) is ignored.
pub fn apply_change(cfg: &mut Value, change: &ConfigChange) {
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
    let (action, target) = (change.action.as_str(), change.target.as_str());
    let (before, after) = (parse(&change.before), parse(&change.after));
    let (service, backend) = match target.split_once(' ') {
        Some((s, b)) => (s, Some(b)),
        None => (target, None),
    };
    let Some(services) = cfg["services"].as_array_mut() else {
        return;
    };
    match action {
        "service.add" => services.push(after),
        "service.remove" => services.retain(|s| s["name"] != service),
        _ => {
            let Some(s) = services.iter_mut().find(|s| s["name"] == service) else {
                return;
            };
            match (action, backend) {
                ("acl.add", _) => acl_change(s, true, &after),
                ("acl.remove", _) => acl_change(s, false, &before),
                ("backend.add", Some(_)) => {
                    if let Some(list) = s["backends"].as_array_mut() {
                        list.push(after);
                    }
                }
                ("backend.remove", Some(b)) => {
                    if let Some(list) = s["backends"].as_array_mut() {
                        list.retain(|o| o["addr"] != b);
                    }
                }
                (_, Some(b)) if action.starts_with("backend.") => {
                    for o in s["backends"]
                        .as_array_mut()
                        .into_iter()
                        .flatten()
                        .filter(|o| o["addr"] == b)
                    {
                        for (k, v) in after.as_object().into_iter().flatten() {
                            o[k] = v.clone();
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// An access rule as recorded: `{"allow": CIDR}` or `{"deny": CIDR}`.
fn acl_change(service: &mut Value, add: bool, rule: &Value) {
    for (kind, net) in rule.as_object().into_iter().flatten() {
        if let Some(list) = service[kind.as_str()].as_array_mut() {
            if add {
                list.push(net.clone());
            } else {
                list.retain(|n| n != net);
            }
        }
    }
}
