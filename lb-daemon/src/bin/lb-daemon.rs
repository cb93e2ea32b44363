//! `lb-daemon`: the load balancer daemon.
use clap::Parser;
use lb_daemon::{config::Args, daemon};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if args.log_format == "json" {
        logs.json().init();
    } else {
        // journald adds its own timestamps; a terminal gets colours.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let settings = match args.into_settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lb-daemon: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lb-daemon: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        daemon::run(settings, shutdown).await
    }) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-daemon: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
