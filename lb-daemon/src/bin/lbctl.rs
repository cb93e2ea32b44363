//! `lbctl`: control client for `lb-daemon`.
//!
//! Exit codes: 0 done; 1 cannot reach the daemon; 2 bad usage; 3 refused (the caller's role
//! does not allow it); 4 invalid (no such service or backend, bad value); 5 failed (e.g. the
//! change could not be recorded).
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_daemon::control::{self, Refusal, Request};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "lbctl", version, about = "Control and inspect lb-daemon")]
struct Cli {
    /// The daemon's control socket (default: $LB_CONTROL_SOCKET, else /run/lb-daemon/control.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print the daemon's answer as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Change a backend (operator).
    Backend {
        #[command(subcommand)]
        op: BackendOp,
    },
}

#[derive(Subcommand)]
enum BackendOp {
    /// No new flows to it; established ones continue.
    Drain { service: String, backend: String },
    /// Back into rotation.
    Undrain { service: String, backend: String },
    /// Set its weight (1 to 1000).
    Weight {
        service: String,
        backend: String,
        weight: u32,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let request = match &cli.command {
        Command::Status => req("status", None, None, None),
        Command::Services => req("services", None, None, None),
        Command::Backends { service } => req("backends", Some(service), None, None),
        Command::Flows { service } => req("flows", service.as_ref(), None, None),
        Command::Backend {
            op: BackendOp::Drain { service, backend },
        } => req("backend.drain", Some(service), Some(backend), None),
        Command::Backend {
            op: BackendOp::Undrain { service, backend },
        } => req("backend.undrain", Some(service), Some(backend), None),
        Command::Backend {
            op:
                BackendOp::Weight {
                    service,
                    backend,
                    weight,
                },
        } => req(
            "backend.weight",
            Some(service),
            Some(backend),
            Some(*weight),
        ),
    };
    let socket = control::socket_path(cli.socket.clone());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::from(1);
        }
    };
    let response = match runtime.block_on(control::call(&socket, &request)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: {e:#}");
            return ExitCode::from(1);
        }
    };
    if !response.ok {
        eprintln!(
            "lbctl: {}",
            response.error.as_deref().unwrap_or("the daemon refused")
        );
        return ExitCode::from(match response.code {
            Some(Refusal::Refused) => 3,
            Some(Refusal::Invalid) => 4,
            _ => 5,
        });
    }
    let data = response.data.unwrap_or(Value::Null);
    if cli.json {
        println!("{data}");
    } else {
        print_human(&cli.command, &data);
    }
    ExitCode::SUCCESS
}

fn req(
    action: &str,
    service: Option<&String>,
    backend: Option<&String>,
    weight: Option<u32>,
) -> Request {
    Request {
        action: action.into(),
        service: service.cloned(),
        backend: backend.cloned(),
        weight,
    }
}

/// A table of the given columns from an array of objects.
fn table(rows: &Value, columns: &[&str]) {
    let rows: Vec<Vec<String>> = rows
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    columns
                        .iter()
                        .map(|c| match &r[*c] {
                            Value::String(s) => s.clone(),
                            Value::Null => "-".into(),
                            v => v.to_string(),
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for r in rows {
        println!("{}", line(r));
    }
}

fn print_human(command: &Command, data: &Value) {
    match command {
        Command::Status => {
            if let Some(o) = data.as_object() {
                for (k, v) in o {
                    if k != "counters" {
                        println!(
                            "{k:<18} {}",
                            v.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| v.to_string())
                        );
                    }
                }
                println!("counters");
                for (k, v) in data["counters"].as_object().into_iter().flatten() {
                    println!("  {k:<24} {v}");
                }
            }
        }
        Command::Services => table(
            data,
            &[
                "name",
                "proto",
                "vip",
                "backends",
                "in_rotation",
                "generation",
            ],
        ),
        Command::Backends { .. } => table(
            data,
            &["backend", "weight", "health", "drained", "snat", "failures"],
        ),
        Command::Flows { .. } => table(
            data,
            &[
                "proto",
                "client",
                "vip",
                "backend",
                "service",
                "state",
                "bytes_to_backend",
                "bytes_to_client",
                "idle_s",
            ],
        ),
        Command::Backend { .. } => println!(
            "done: configuration generation {}, Maglev generation {}",
            data["config_generation"], data["maglev_generation"]
        ),
    }
}
