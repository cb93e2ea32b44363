//! `lbctl`: control client for `lb-daemon`.
//!
//! Exit codes: 0 done; 1 cannot reach the daemon; 2 bad usage; 3 refused (the caller's role
//! does not allow it); 4 invalid (no such service or backend, bad value); 5 failed (e.g. the
//! change could not be recorded).
use std::process::ExitCode;

use clap::Parser as _;
use lb_daemon::{
    cli::lbctl::{Cli, Command},
    control::{self, Refusal},
};
use serde_json::Value;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let request = cli.command.request();
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
        Command::Service { .. } | Command::Backend { .. } | Command::Acl { .. } => {
            match data["maglev_generation"].as_u64() {
                Some(m) => println!(
                    "done: configuration generation {}, Maglev generation {m}",
                    data["config_generation"]
                ),
                None => println!(
                    "done: configuration generation {}",
                    data["config_generation"]
                ),
            }
        }
    }
}
