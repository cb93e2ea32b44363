//! `cargo xtask setup`: idempotent bootstrap of what building and testing need.
//!
//! 1. rustup, and the nightly toolchain with `rust-src` (the eBPF crate is built with
//!    `-Z build-std=core --target bpfel-unknown-none`);
//! 2. bpf-linker built for the nightly rustc's LLVM major version. Recipe (a): bpf-linker 0.13.0
//!    linked against the nightly toolchain's own `libLLVM.so` (about a minute); recipe (b), if
//!    (a) fails: bpf-linker 0.10.4 with its bundled LLVM (several minutes);
//! 3. the system tools the tests use, installed with apt-get when running as root: `ip`
//!    (iproute2) and `ethtool` for the namespace tests; `setpriv` (util-linux) for control
//!    requests as an unprivileged user; `dpkg-deb`, `strip`/`readelf`/`objdump` (binutils) and
//!    `man` (man-db) for the package and its test;
//! 4. only with `--bench-tools` (and for `cargo xtask bench --peers`): the peers the benchmark
//!    compares lb with, from Debian packages: nftables, haproxy, nginx-light,
//!    libnginx-mod-stream ([`bench_tools`]).
//!
//! Each step prints `ok` when already satisfied, what it did otherwise, and on failure what to
//! do by hand.

use std::{ffi::OsString, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{cargo, run};

fn step(what: &str) {
    println!("setup: {what} ...");
}

fn ok(what: &str, detail: &str) {
    if detail.is_empty() {
        println!("setup: {what}: ok");
    } else {
        println!("setup: {what}: ok ({detail})");
    }
}

/// Output of a command, trimmed, when it succeeds.
fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

pub fn setup() -> Result<()> {
    rustup()?;
    let nightly = nightly()?;
    bpf_linker(&nightly)?;
    system_tools()?;
    println!("setup: done");
    Ok(())
}

fn rustup() -> Result<()> {
    match output(Command::new("rustup").arg("--version")) {
        Some(v) => {
            ok("rustup", v.lines().next().unwrap_or(""));
            Ok(())
        }
        None => bail!(
            "rustup is not installed (or not on PATH). Install it from https://rustup.rs, then run `cargo xtask setup` again"
        ),
    }
}

/// What we need to know about the nightly toolchain.
pub struct Nightly {
    /// `rustc +nightly --print sysroot`
    pub sysroot: PathBuf,
    /// LLVM major version of the nightly rustc.
    pub llvm_major: u32,
}

fn nightly() -> Result<Nightly> {
    const WHAT: &str = "nightly toolchain with rust-src";
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Some(list)
            if list
                .lines()
                .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src")) =>
        {
            ok(WHAT, "")
        }
        Some(_) => {
            step("adding rust-src to the nightly toolchain");
            run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"])).context(
                "could not add rust-src; run `rustup component add rust-src --toolchain nightly` by hand",
            )?;
        }
        None => {
            step("installing the nightly toolchain with rust-src");
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
            .context(
                "could not install nightly; run `rustup toolchain install nightly --profile minimal --component rust-src` by hand",
            )?;
        }
    }
    let verbose = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))
        .ok_or_else(|| {
            anyhow!(
                "`rustc +nightly --version --verbose` failed: is the nightly toolchain complete?"
            )
        })?;
    let llvm_major = llvm_major(&verbose).ok_or_else(|| {
        anyhow!("no `LLVM version: N.M` line in `rustc +nightly --version --verbose`:\n{verbose}")
    })?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("`rustc +nightly --print sysroot` failed"))?;
    ok(
        "nightly rustc",
        &format!(
            "{}, LLVM {llvm_major}",
            verbose.lines().next().unwrap_or("")
        ),
    );
    Ok(Nightly {
        sysroot,
        llvm_major,
    })
}

/// `LLVM version: 22.1.4` → 22
fn llvm_major(verbose: &str) -> Option<u32> {
    verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next())
        .and_then(|m| m.parse().ok())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        })
}

/// Finds an executable on PATH (and in the sbin directories, which a non-root PATH may lack).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .chain(std::iter::once(cargo_home().join("bin")))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// LD_LIBRARY_PATH with the nightly toolchain's lib directory first: a bpf-linker built by
/// recipe (a) loads the toolchain's libLLVM from there (rustup sets the same when the nightly
/// cargo runs it).
fn ld_library_path(n: &Nightly) -> OsString {
    let mut paths = vec![n.sysroot.join("lib")];
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

/// What cargo recorded about an installed bpf-linker: (version, LLVM major from its features).
fn installed_bpf_linker() -> Option<(String, Option<u32>)> {
    let text = std::fs::read_to_string(cargo_home().join(".crates2.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let (key, info) = v["installs"]
        .as_object()?
        .iter()
        .find(|(k, _)| k.starts_with("bpf-linker "))?;
    let version = key.split_whitespace().nth(1).unwrap_or("?").to_owned();
    let major = info["features"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str())
        .find_map(|f| {
            f.strip_prefix("rust-llvm-")
                .or_else(|| f.strip_prefix("llvm-"))
                .and_then(|m| m.parse::<u32>().ok())
        });
    Some((version, major))
}

fn bpf_linker(n: &Nightly) -> Result<()> {
    let what = format!("bpf-linker for LLVM {}", n.llvm_major);
    let problem = match which("bpf-linker") {
        None => "not installed".to_owned(),
        Some(path) => {
            let runs = output(
                Command::new(&path)
                    .arg("--version")
                    .env("LD_LIBRARY_PATH", ld_library_path(n)),
            );
            match (runs, installed_bpf_linker()) {
                (None, _) => format!(
                    "{} does not run (its LLVM library is gone?)",
                    path.display()
                ),
                (Some(_), Some((v, Some(m)))) if m != n.llvm_major => {
                    format!("installed bpf-linker {v} is built for LLVM {m}")
                }
                (Some(ver), Some((_, Some(_)))) => {
                    ok(&what, &ver);
                    return Ok(());
                }
                (Some(ver), _) => {
                    ok(
                        &what,
                        &format!("{ver}; its LLVM version is not recorded, assumed to match"),
                    );
                    return Ok(());
                }
            }
        }
    };
    step(&format!("{what}: {problem}; installing"));
    match install_linked_to_nightly(n) {
        Ok(()) => {
            println!(
                "setup: installed bpf-linker 0.13.0 linked to the nightly toolchain's LLVM {}",
                n.llvm_major
            );
            return Ok(());
        }
        Err(e) => println!(
            "setup: recipe (a) failed: {e:#}\nsetup: trying recipe (b), bpf-linker 0.10.4 with its own LLVM (several minutes)"
        ),
    }
    run(cargo().args(["install", "bpf-linker", "--version", "0.10.4", "--locked", "--force"])).with_context(|| {
        format!(
            "could not install bpf-linker. By hand: link $CARGO_HOME/lb-llvm/lib/libLLVM.so to {}/lib/libLLVM.so.{}.*-rust-*, then \
             `LLVM_PREFIX=$CARGO_HOME/lb-llvm cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-{} --locked --force`",
            n.sysroot.display(),
            n.llvm_major,
            n.llvm_major
        )
    })?;
    println!("setup: installed bpf-linker 0.10.4");
    Ok(())
}

/// Recipe (a): `$CARGO_HOME/lb-llvm/lib/libLLVM.so` → the nightly's `libLLVM.so.<major>.*-rust-*`,
/// then bpf-linker 0.13.0 built against it.
fn install_linked_to_nightly(n: &Nightly) -> Result<()> {
    let libdir = n.sysroot.join("lib");
    let prefix = format!("libLLVM.so.{}.", n.llvm_major);
    let lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&prefix) && f.contains("-rust-"))
        })
        .ok_or_else(|| anyhow!("no {prefix}*-rust-* in {}", libdir.display()))?;
    let llvm_prefix = cargo_home().join("lb-llvm");
    let link_dir = llvm_prefix.join("lib");
    std::fs::create_dir_all(&link_dir)
        .with_context(|| format!("creating {}", link_dir.display()))?;
    let link = link_dir.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)
        .with_context(|| format!("linking {} to {}", link.display(), lib.display()))?;
    println!("setup: {} -> {}", link.display(), lib.display());
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--no-default-features",
            "--features",
            &format!("llvm-{}", n.llvm_major),
            "--locked",
            "--force",
        ])
        .env("LLVM_PREFIX", &llvm_prefix))?;
    Ok(())
}

fn system_tools() -> Result<()> {
    let tools = [
        ("ip", "iproute2"),
        ("ethtool", "ethtool"),
        ("setpriv", "util-linux"),
        ("dpkg-deb", "dpkg"),
        ("strip", "binutils"),
        ("readelf", "binutils"),
        ("objdump", "binutils"),
        ("man", "man-db"),
    ];
    let missing: Vec<(&str, &str)> = tools
        .iter()
        .copied()
        .filter(|(bin, _)| which(bin).is_none())
        .collect();
    for (bin, pkg) in tools {
        if which(bin).is_some() {
            ok(&format!("{bin} ({pkg})"), "");
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    pkgs.sort_unstable();
    pkgs.dedup();
    let by_hand = format!(
        "install them with `apt-get install -y {}` (as root)",
        pkgs.join(" ")
    );
    if !lb_tests::is_root() || which("apt-get").is_none() {
        bail!("missing {}: {by_hand}", pkgs.join(", "));
    }
    step(&format!("installing {}", pkgs.join(" ")));
    run(Command::new("apt-get").arg("update"))
        .with_context(|| format!("apt-get update failed; {by_hand}"))?;
    run(Command::new("apt-get")
        .args(["install", "-y"])
        .args(&pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .with_context(|| format!("apt-get install failed; {by_hand}"))?;
    for (bin, pkg) in &missing {
        match which(bin) {
            Some(p) => println!("setup: installed {pkg} ({})", p.display()),
            None => bail!("{pkg} was installed but `{bin}` is still not found"),
        }
    }
    Ok(())
}

/// What the benchmarks need beyond the build: what the peers benchmark compares lb with, and
/// the audit benchmark's GNU time, as (what must exist, Debian package): a program on PATH,
/// or an absolute path for a file a package installs.
pub const BENCH_TOOLS: [(&str, &str); 5] = [
    ("nft", "nftables"),
    ("haproxy", "haproxy"),
    ("nginx", "nginx-light"),
    (lb_tests::bench::peers::NGINX_STREAM, "libnginx-mod-stream"),
    // The audit benchmark's measure of lb-audit's peak memory.
    ("/usr/bin/time", "time"),
];

/// `cargo xtask setup --bench-tools` and `cargo xtask bench --peers` or `--audit`: installs the
/// peers of the benchmark from Debian packages when missing (kernel DNAT with nftables, HAProxy,
/// nginx with its stream module), and GNU time. The peers' services are not started: the
/// benchmark runs them itself, inside its namespaces.
pub fn bench_tools() -> Result<()> {
    let present = |what: &str| {
        if what.starts_with('/') {
            std::path::Path::new(what).is_file()
        } else {
            which(what).is_some()
        }
    };
    let mut missing = Vec::new();
    for (what, pkg) in BENCH_TOOLS {
        if present(what) {
            ok(&format!("{what} ({pkg})"), "");
        } else {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let by_hand = format!(
        "install them with `apt-get install -y {}` (as root)",
        missing.join(" ")
    );
    if !lb_tests::is_root() || which("apt-get").is_none() {
        bail!("missing {}: {by_hand}", missing.join(", "));
    }
    step(&format!(
        "installing {} (the benchmarks' peers and tools)",
        missing.join(" ")
    ));
    // Debian starts a package's service on install unless policy-rc.d says no: the benchmark
    // runs nginx and HAProxy itself, in its namespaces, so keep them from starting on the host.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        println!(
            "setup: writing {} (exit 101: no service starts during the install)",
            policy.display()
        );
        std::fs::write(
            policy,
            "#!/bin/sh\n# written by cargo xtask for the duration of an install\nexit 101\n",
        )
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))
        })
        .with_context(|| format!("writing {}", policy.display()))?;
    }
    let result = (|| -> Result<()> {
        run(Command::new("apt-get").arg("update"))
            .with_context(|| format!("apt-get update failed; {by_hand}"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("apt-get install failed; {by_hand}"))
    })();
    if ours {
        let _ = std::fs::remove_file(policy);
        println!("setup: removed {}", policy.display());
    }
    result?;
    for (what, pkg) in BENCH_TOOLS {
        if !present(what) {
            bail!("{pkg} was installed but {what} is still not found");
        }
    }
    println!("setup: installed {}", missing.join(" "));
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn llvm_major_from_rustc_verbose() {
        let v = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(super::llvm_major(v), Some(22));
        assert_eq!(super::llvm_major("rustc 1.0"), None);
    }
}
