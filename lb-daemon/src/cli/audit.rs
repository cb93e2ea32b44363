//! `lb-audit`'s command line: read, follow, config, stats, verify, and the record filters.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::audit::{
    Proto,
    filter::{self, Endpoint, Filter},
};

#[derive(Parser)]
#[command(name = "lb-audit", version, about = "Read lb's audit log")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Print the records of the log in DIR that match the filters, in order.
    Read {
        /// The log directory (the daemon's --audit-dir).
        dir: PathBuf,
        /// Output format: aligned text for people, JSON lines, or CSV with a header.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Like `read`, then keep printing new records as they are written (across segment
    /// rotation), like `tail -f`, until interrupted.
    Follow {
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// The configuration in force at a moment, rebuilt from the log alone: the last
    /// `daemon_start` before it, with every `config_change` after that applied.
    Config {
        dir: PathBuf,
        /// RFC 3339, or a time ago like 15m (default: now).
        #[arg(long)]
        at: Option<String>,
    },
    /// Summaries: top clients, flows and bytes per backend, refusals by reason and rule, new
    /// flows per minute.
    Stats {
        dir: PathBuf,
        #[command(flatten)]
        filter: FilterArgs,
        /// How many clients to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Prove the log in DIR intact: checksums, sequence, segments, hash chain, and with --key
    /// every checkpoint's seal. Prints a summary; exit 1 with the first bad position otherwise.
    Verify {
        dir: PathBuf,
        /// The initial seal key (the file given to lb-daemon --audit-seal-key).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
    },
}

/// Record filters; all given ones must hold.
#[derive(clap::Args)]
pub struct FilterArgs {
    /// Records at or after this time: RFC 3339, or a time ago like 15m, 2h, 7d.
    #[arg(long)]
    pub since: Option<String>,
    /// Records at or before this time.
    #[arg(long)]
    pub until: Option<String>,
    /// Only these kinds (repeatable): conn_open, conn_close, conn_deny, checkpoint, ...
    #[arg(long)]
    pub kind: Vec<String>,
    /// Clients in this CIDR (or address).
    #[arg(long)]
    pub client: Option<String>,
    /// This VIP (address, or address:port).
    #[arg(long)]
    pub vip: Option<String>,
    #[arg(long)]
    pub service: Option<String>,
    /// This backend (address, or address:port).
    #[arg(long)]
    pub backend: Option<String>,
    /// tcp or udp.
    #[arg(long)]
    pub proto: Option<String>,
    /// One flow id.
    #[arg(long)]
    pub flow: Option<u64>,
}

impl FilterArgs {
    pub fn build(&self) -> anyhow::Result<Filter> {
        let now = std::time::SystemTime::now();
        Ok(Filter {
            since_ns: self
                .since
                .as_deref()
                .map(|s| filter::parse_instant(s, now))
                .transpose()
                .context("--since")?,
            until_ns: self
                .until
                .as_deref()
                .map(|s| filter::parse_instant(s, now))
                .transpose()
                .context("--until")?,
            kinds: self.kind.clone(),
            client: self
                .client
                .as_deref()
                .map(|c| c.parse().map_err(|e: String| anyhow::anyhow!(e)))
                .transpose()
                .context("--client")?,
            vip: self
                .vip
                .as_deref()
                .map(Endpoint::parse)
                .transpose()
                .context("--vip")?,
            service: self.service.clone(),
            backend: self
                .backend
                .as_deref()
                .map(Endpoint::parse)
                .transpose()
                .context("--backend")?,
            proto: match self.proto.as_deref() {
                None => None,
                Some("tcp") => Some(Proto::Tcp),
                Some("udp") => Some(Proto::Udp),
                Some(p) => anyhow::bail!("--proto: '{p}' is not tcp or udp"),
            },
            flow: self.flow,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Text,
    Json,
    Csv,
}
