//! `lbctl`'s command line. Each command is one control request ([`Command::request`]).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::control::Request;

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Control and inspect lb-daemon")]
pub struct Cli {
    /// The daemon's control socket (default: $LB_CONTROL_SOCKET, else /run/lb-daemon/control.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print the daemon's answer as JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Version, uptime, configuration generation, flows, data-plane counters.
    Status,
    /// The services.
    Services,
    /// A service's backends: weight, health, drain state.
    Backends { service: String },
    /// Live connections from the kernel's flow table (like `ipvsadm -Lnc`).
    Flows {
        #[arg(long)]
        service: Option<String>,
    },
    /// Add or remove a service (admin).
    Service {
        #[command(subcommand)]
        op: ServiceOp,
    },
    /// Add, remove (admin), drain, undrain, weigh, enable or disable (operator) a backend.
    Backend {
        #[command(subcommand)]
        op: BackendOp,
    },
    /// Add or remove an access rule (admin).
    Acl {
        #[command(subcommand)]
        op: AclOp,
    },
}

#[derive(Subcommand)]
pub enum ServiceOp {
    /// A new service, without backends until `backend add`.
    Add {
        name: String,
        /// tcp|udp:IP:PORT, IPv6 as [IP]:PORT.
        #[arg(value_name = "PROTO:VIP:PORT")]
        vip: String,
        /// At most N new flows per second from one client address.
        #[arg(long, value_name = "N/s")]
        rate_limit: Option<String>,
    },
    /// Removes a service: no new flows; established ones continue until they end.
    Remove { name: String },
}

#[derive(Subcommand)]
pub enum BackendOp {
    /// A new backend of a service (same address family as its VIP).
    Add {
        service: String,
        backend: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Removes a backend: no new flows; established ones continue until they end.
    Remove { service: String, backend: String },
    /// No new flows to it; established ones continue; `backend_drained` once the last ends.
    Drain { service: String, backend: String },
    /// Back into rotation.
    Undrain { service: String, backend: String },
    /// Set its weight (1 to 1000).
    Weight {
        service: String,
        backend: String,
        weight: u32,
    },
    /// Back into rotation after `disable` (health checks decide again).
    Enable { service: String, backend: String },
    /// Out of rotation whatever its health checks say; established flows continue.
    Disable { service: String, backend: String },
}

#[derive(Subcommand)]
pub enum AclOp {
    /// A new access rule: `allow` or `deny` clients in CIDR.
    Add {
        service: String,
        #[arg(value_parser = ["allow", "deny"])]
        action: String,
        cidr: String,
    },
    /// Removes an access rule.
    Remove {
        service: String,
        #[arg(value_parser = ["allow", "deny"])]
        action: String,
        cidr: String,
    },
}

impl Command {
    /// The control request this command sends.
    pub fn request(&self) -> Request {
        let r = |action: &str| Request {
            action: action.to_string(),
            ..Request::default()
        };
        let on = |action: &str, service: &str, backend: &str| Request {
            service: Some(service.to_string()),
            backend: Some(backend.to_string()),
            ..r(action)
        };
        match self {
            Command::Status => r("status"),
            Command::Services => r("services"),
            Command::Backends { service } => Request {
                service: Some(service.clone()),
                ..r("backends")
            },
            Command::Flows { service } => Request {
                service: service.clone(),
                ..r("flows")
            },
            Command::Service { op } => match op {
                ServiceOp::Add {
                    name,
                    vip,
                    rate_limit,
                } => Request {
                    service: Some(name.clone()),
                    value: Some(vip.clone()),
                    rate_limit: rate_limit.clone(),
                    ..r("service.add")
                },
                ServiceOp::Remove { name } => Request {
                    service: Some(name.clone()),
                    ..r("service.remove")
                },
            },
            Command::Backend { op } => match op {
                BackendOp::Add {
                    service,
                    backend,
                    weight,
                } => Request {
                    weight: Some(*weight),
                    ..on("backend.add", service, backend)
                },
                BackendOp::Remove { service, backend } => on("backend.remove", service, backend),
                BackendOp::Drain { service, backend } => on("backend.drain", service, backend),
                BackendOp::Undrain { service, backend } => on("backend.undrain", service, backend),
                BackendOp::Weight {
                    service,
                    backend,
                    weight,
                } => Request {
                    weight: Some(*weight),
                    ..on("backend.weight", service, backend)
                },
                BackendOp::Enable { service, backend } => on("backend.enable", service, backend),
                BackendOp::Disable { service, backend } => on("backend.disable", service, backend),
            },
            Command::Acl { op } => {
                let (action, service, kind, cidr) = match op {
                    AclOp::Add {
                        service,
                        action,
                        cidr,
                    } => ("acl.add", service, action, cidr),
                    AclOp::Remove {
                        service,
                        action,
                        cidr,
                    } => ("acl.remove", service, action, cidr),
                };
                Request {
                    service: Some(service.clone()),
                    value: Some(format!("{kind} {cidr}")),
                    ..r(action)
                }
            }
        }
    }
}
