//! `cargo xtask`: the project's own commands.
//!
//! - `setup`: the eBPF toolchain (nightly with rust-src, a bpf-linker on the nightly's LLVM) and
//!   the system tools the tests use (ip, ethtool); idempotent;
//! - `build [--release]`: setup, then every binary (the eBPF object is embedded in lb-daemon);
//! - `test [-- ARGS]`: setup, build, then every test, the root-only namespace tests included;
//! - `bench [--dataplane] [--audit] [--peers] [--quick] [-- ARGS]`: setup, then the data-plane
//!   benchmark, the audit log benchmark (writer, decoder, verify) and the peers benchmark (lb
//!   against kernel DNAT, HAProxy and nginx stream on one namespace topology); all three
//!   without a flag;
//! - `dist [--bin-dir DIR] [--out-dir DIR] [--compress xz|gzip|none]`: a Debian package (binaries, systemd unit, default
//!   environment file, man pages, shell completions, documentation), `target/dist/lb_*.deb`;
//! - `demo`: setup, build, a client → balancer → two backends topology in network namespaces,
//!   the daemon, TCP and UDP traffic, refusals, a backend failing and recovering, a drain, a
//!   refused control request, an alert, then `lb-audit stats` and `verify`; everything removed
//!   afterwards.
mod demo;
mod dist;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "lb's development commands"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need, when missing: nightly + rust-src, bpf-linker
    /// matching the nightly's LLVM, and the system tools the tests use (ip, ethtool, setpriv,
    /// dpkg-deb, binutils, man).
    Setup {
        /// Also the peers of the benchmark (Debian packages nftables, haproxy, nginx-light,
        /// libnginx-mod-stream) and GNU time, when missing.
        #[arg(long)]
        bench_tools: bool,
    },
    /// Setup, then build every binary (lb-daemon with its XDP program, lbctl, lb-audit).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, build, then run every test (as root the network-namespace tests run too).
    /// Arguments after `--` go to `cargo test`.
    Test {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build a Debian package: the release binaries (or those of --bin-dir), the systemd unit,
    /// /etc/default/lb-daemon, man pages and shell completions generated from the command
    /// lines, and the documentation. Prints the path of the .deb (target/dist by default).
    Dist {
        /// Package the binaries in DIR (e.g. target/debug) instead of building release ones.
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
        /// Where to write the package (default: target/dist).
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// Compression of the package's data: xz (smallest), gzip (faster), none.
        #[arg(long, value_name = "xz|gzip|none", default_value = "xz", value_parser = ["xz", "gzip", "none"])]
        compress: String,
    },
    /// Setup, build, and show lb at work on a topology of network namespaces: TCP and UDP
    /// traffic, a denied client and its alert, a backend failing and recovering, a drain, a
    /// refused lbctl request, then lb-audit read, stats and verify on the log. Needs root;
    /// cleans up after itself.
    Demo,
    /// Setup, then the benchmarks (need root): the data-plane benchmark (per-packet cost of the
    /// XDP program with BPF_PROG_TEST_RUN), the audit log benchmark (writer, decoder and verify
    /// throughput, the decoder's memory, the writer in the daemon's pattern) and the peers
    /// benchmark (lb against kernel DNAT, HAProxy and nginx stream on one namespace topology,
    /// in one run; installs the peers when missing and builds the release binaries). All three
    /// when no flag is given. Arguments after `--` go to each benchmark (e.g.
    /// `-- --repeat 100000`, `-- --rounds 7`); each skips the others' flags, and a flag both
    /// the audit and the peers benchmark have (`--secs`, `--rate`, `--only`) reaches both.
    Bench {
        /// The data-plane benchmark.
        #[arg(long)]
        dataplane: bool,
        /// The audit log benchmark.
        #[arg(long)]
        audit: bool,
        /// The peers benchmark.
        #[arg(long)]
        peers: bool,
        /// Shorter runs: the peers benchmark in under two minutes, the data-plane benchmark
        /// with 200,000 repetitions per row, the audit benchmark on 200,000 records.
        #[arg(long)]
        quick: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// `cargo` as invoked by the user (the one running this xtask).
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// Runs a command, printing it first; fails when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    println!("$ {}", show(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// A command as a shell line, for messages.
pub fn show(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// `cargo build [--release] --workspace --bins` (lb-ebpf is built for BPF by lb-daemon's build
/// script, never for the host).
pub fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--workspace", "--exclude", "lb-ebpf", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

fn test(args: &[String]) -> Result<()> {
    setup::setup()?;
    build(false)?;
    let bin_dir = target_dir().join("debug");
    let mut c = cargo();
    c.args(["test", "--workspace", "--exclude", "lb-ebpf"])
        .args(args)
        .env("LB_BIN_DIR", &bin_dir);
    let result = run(&mut c);
    // A test process killed mid-way (Ctrl-C, timeout) cannot remove its namespaces itself.
    let stale = lb_tests::netns::remove_stale_namespaces();
    if !stale.is_empty() {
        println!(
            "removed namespaces left by interrupted tests: {}",
            stale.join(", ")
        );
    }
    result.context("tests failed")
}

/// The benchmarks flagged, or all of them when none is.
fn bench(dataplane: bool, audit: bool, peers: bool, quick: bool, args: &[String]) -> Result<()> {
    let all = !(dataplane || audit || peers);
    let (dataplane, audit, peers) = (dataplane || all, audit || all, peers || all);
    setup::setup()?;
    if peers || audit {
        setup::bench_tools()?;
    }
    // Ctrl-C reaches the benchmark too (same process group): it stops what it started and
    // deletes its namespaces. Wait for it instead of dying first.
    ctrlc::set_handler(|| {
        eprintln!("\nxtask: interrupted; waiting for the benchmark to clean up");
    })
    .context("installing the Ctrl-C handler")?;
    let mut failed = Vec::new();
    if dataplane {
        let mut c = cargo();
        c.args([
            "bench",
            "--package",
            "lb-tests",
            "--bench",
            "dataplane",
            "--",
        ]);
        if quick && !args.iter().any(|a| a == "--repeat") {
            c.args(["--repeat", "200000"]);
        }
        c.args(args);
        if let Err(e) = run(&mut c) {
            failed.push(format!("data-plane benchmark: {e:#}"));
        }
    }
    if audit {
        let mut c = cargo();
        c.args(["bench", "--package", "lb-daemon", "--bench", "audit", "--"]);
        if quick {
            for (flag, value) in [("--records", "200000"), ("--secs", "1")] {
                if !args.iter().any(|a| a == flag) {
                    c.args([flag, value]);
                }
            }
        }
        c.args(args);
        if let Err(e) = run(&mut c) {
            failed.push(format!("audit benchmark: {e:#}"));
        }
    }
    if peers {
        // The daemon under test as users run it: the release build.
        build(true)?;
        let mut c = cargo();
        c.args(["bench", "--package", "lb-tests", "--bench", "peers", "--"]);
        if quick {
            c.arg("--quick");
        }
        c.args(args).env("LB_BIN_DIR", target_dir().join("release"));
        if let Err(e) = run(&mut c) {
            failed.push(format!("peers benchmark: {e:#}"));
        }
        let stale = lb_tests::netns::remove_stale_namespaces();
        if !stale.is_empty() {
            println!(
                "removed namespaces left by an interrupted benchmark: {}",
                stale.join(", ")
            );
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup { bench_tools } => setup::setup().and_then(|()| {
            if bench_tools {
                setup::bench_tools()
            } else {
                Ok(())
            }
        }),
        Cmd::Build { release } => setup::setup().and_then(|()| build(release)),
        Cmd::Test { args } => test(&args),
        Cmd::Dist {
            bin_dir,
            out_dir,
            compress,
        } => dist::dist(&dist::Options {
            bin_dir,
            out_dir,
            compress,
        })
        .map(|deb| println!("{}", deb.display())),
        Cmd::Demo => demo::demo(),
        Cmd::Bench {
            dataplane,
            audit,
            peers,
            quick,
            args,
        } => bench(dataplane, audit, peers, quick, &args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
