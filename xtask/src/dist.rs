//! `cargo xtask dist`: a Debian package of lb, built with `dpkg-deb --build` from a staged tree.
//!
//! ```text
//! /usr/bin/lb-daemon, /usr/bin/lbctl, /usr/bin/lb-audit      the binaries (stripped)
//! /lib/systemd/system/lb-daemon.service                     dist/systemd/lb-daemon.service
//! /etc/default/lb-daemon                                    dist/systemd/lb-daemon.default (conffile)
//! /usr/share/man/man8/lb-daemon.8.gz, man1/lbctl*.1.gz, man1/lb-audit*.1.gz
//! /usr/share/bash-completion/completions/NAME, /usr/share/zsh/vendor-completions/_NAME,
//! /usr/share/fish/vendor_completions.d/NAME.fish
//! /usr/share/doc/lb/{copyright, README.md, *.md}
//! DEBIAN/{control, conffiles, md5sums, postinst, prerm, postrm}   (scripts from dist/debian)
//! ```
//!
//! Man pages and completions come from the binaries' own clap definitions, through the
//! `lb-docgen` program (dist/docgen). The binaries are the release build, or those of
//! `--bin-dir` (the tests package the debug build). Dependencies (`libc6 (>= 2.N)`,
//! `libgcc-s1`) are read from the binaries' dynamic section and symbol versions.

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{build, root, run, setup, show, target_dir};

/// The package's name.
pub const PACKAGE: &str = "lb";
/// The binaries, all installed in /usr/bin (where the unit's ExecStart looks).
pub const BINARIES: [&str; 3] = ["lb-daemon", "lbctl", "lb-audit"];
/// The documents installed in /usr/share/doc/lb, from the workspace.
const DOCS: [&str; 5] = [
    "README.md",
    "docs/operations.md",
    "docs/architecture.md",
    "docs/audit-format.md",
    "docs/benchmarks.md",
];

pub struct Options {
    /// Package the binaries found here instead of building the release binaries.
    pub bin_dir: Option<PathBuf>,
    /// Where the .deb goes (default target/dist).
    pub out_dir: Option<PathBuf>,
    /// dpkg-deb's compressor: xz (the default, smallest), gzip (faster), none.
    pub compress: String,
}

/// Builds the package and returns its path.
pub fn dist(opts: &Options) -> Result<PathBuf> {
    if !["xz", "gzip", "none"].contains(&opts.compress.as_str()) {
        bail!("--compress {}: not xz, gzip or none", opts.compress);
    }
    for (tool, pkg) in [
        ("dpkg-deb", "dpkg"),
        ("dpkg", "dpkg"),
        ("gzip", "gzip"),
        ("md5sum", "coreutils"),
        ("strip", "binutils"),
        ("readelf", "binutils"),
        ("objdump", "binutils"),
    ] {
        if setup::which(tool).is_none() {
            bail!("`{tool}` is not installed: `apt-get install -y {pkg}` (or `cargo xtask setup`)");
        }
    }
    let bin_dir = match &opts.bin_dir {
        Some(d) => d.clone(),
        None => {
            setup::setup()?;
            build(true)?;
            target_dir().join("release")
        }
    };
    for b in BINARIES {
        let p = bin_dir.join(b);
        if !p.is_file() {
            bail!(
                "{} not found: build the binaries first (`cargo xtask build [--release]`), or leave out --bin-dir to build the release binaries",
                p.display()
            );
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    let arch = capture(Command::new("dpkg").arg("--print-architecture"))?;
    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| target_dir().join("dist"));
    let stage = out_dir.join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)
            .with_context(|| format!("removing the old staging tree {}", stage.display()))?;
    }
    println!(
        "dist: staging {} from {}",
        stage.display(),
        bin_dir.display()
    );
    let src = root();

    // Binaries.
    let usr_bin = stage.join("usr/bin");
    mkdir(&usr_bin)?;
    for b in BINARIES {
        let dst = usr_bin.join(b);
        run(Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&dst)
            .arg(bin_dir.join(b)))?;
        set_mode(&dst, 0o755)?;
    }

    // systemd unit and its environment file.
    install(
        &src.join("dist/systemd/lb-daemon.service"),
        &stage.join("lib/systemd/system/lb-daemon.service"),
        0o644,
    )?;
    install(
        &src.join("dist/systemd/lb-daemon.default"),
        &stage.join("etc/default/lb-daemon"),
        0o644,
    )?;

    // Man pages and completions, from the binaries' command definitions.
    let generated = out_dir.join("docgen");
    if generated.exists() {
        std::fs::remove_dir_all(&generated)
            .with_context(|| format!("removing {}", generated.display()))?;
    }
    let docgen = bin_dir.join("lb-docgen");
    if docgen.is_file() {
        run(Command::new(&docgen).arg(&generated))?;
    } else {
        run(crate::cargo()
            .args(["run", "--quiet", "--package", "lb-docgen", "--"])
            .arg(&generated))?;
    }
    let man_src = generated.join("man");
    let mut pages = 0;
    for entry in read_dir_sorted(&man_src)? {
        let name = file_name(&entry)?;
        let section = name
            .rsplit_once('.')
            .map(|(_, s)| s)
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
            .ok_or_else(|| anyhow!("{}: no manual section in its name", entry.display()))?;
        let dir = stage.join(format!("usr/share/man/man{section}"));
        mkdir(&dir)?;
        let dst = dir.join(format!("{name}.gz"));
        let page =
            std::fs::File::create(&dst).with_context(|| format!("creating {}", dst.display()))?;
        let mut gz = Command::new("gzip");
        gz.args(["-9", "-n", "-c"]).arg(&entry).stdout(page);
        let status = gz
            .status()
            .with_context(|| format!("running {}", show(&gz)))?;
        if !status.success() {
            bail!("`{}` failed ({status})", show(&gz));
        }
        set_mode(&dst, 0o644)?;
        pages += 1;
    }
    for (shell, dir) in [
        ("bash", "usr/share/bash-completion/completions"),
        ("zsh", "usr/share/zsh/vendor-completions"),
        ("fish", "usr/share/fish/vendor_completions.d"),
    ] {
        for entry in read_dir_sorted(&generated.join("completions").join(shell))? {
            install(&entry, &stage.join(dir).join(file_name(&entry)?), 0o644)?;
        }
    }

    // Documentation.
    let doc = stage.join(format!("usr/share/doc/{PACKAGE}"));
    install(
        &src.join("dist/debian/copyright"),
        &doc.join("copyright"),
        0o644,
    )?;
    for d in DOCS {
        let from = src.join(d);
        install(&from, &doc.join(file_name(&from)?), 0o644)?;
    }

    // Control area.
    let debian = stage.join("DEBIAN");
    mkdir(&debian)?;
    for script in ["postinst", "prerm", "postrm"] {
        install(
            &src.join("dist/debian").join(script),
            &debian.join(script),
            0o755,
        )?;
    }
    write(&debian.join("conffiles"), "/etc/default/lb-daemon\n", 0o644)?;
    write(&debian.join("md5sums"), &md5sums(&stage)?, 0o644)?;
    let binaries: Vec<PathBuf> = BINARIES.iter().map(|b| usr_bin.join(b)).collect();
    let depends = depends(&binaries)?;
    let control = control(version, &arch, &depends, installed_size_kib(&stage)?);
    write(&debian.join("control"), &control, 0o644)?;

    let deb = out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    let _ = std::fs::remove_file(&deb);
    run(Command::new("dpkg-deb")
        .arg("--root-owner-group")
        .arg(format!("-Z{}", opts.compress))
        .arg("--build")
        .arg(&stage)
        .arg(&deb))?;
    println!(
        "dist: {} ({} binaries, {pages} man pages, completions for bash, zsh, fish; Depends: {depends})",
        deb.display(),
        BINARIES.len()
    );
    Ok(deb)
}

/// The control file. `Maintainer` is `$DEBFULLNAME <$DEBEMAIL>` when both are set.
fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    let maintainer = match (std::env::var("DEBFULLNAME"), std::env::var("DEBEMAIL")) {
        (Ok(n), Ok(e)) if !n.trim().is_empty() && !e.trim().is_empty() => {
            format!("{} <{}>", n.trim(), e.trim())
        }
        _ => "lb maintainers <root@localhost>".to_owned(),
    };
    format!(
        "Package: {PACKAGE}
Version: {version}
Architecture: {arch}
Maintainer: {maintainer}
Installed-Size: {installed_kib}
Depends: {depends}
Recommends: ethtool
Suggests: bird2
Section: net
Priority: optional
Description: L4 TCP/UDP load balancer with an XDP data plane and a tamper-evident audit log
 lb steers packets to a virtual IP to a backend in the kernel driver path (an XDP eBPF
 program doing full NAT, with connection tracking and weighted Maglev hashing), and records
 every connection, refusal, health transition and configuration change in one binary log
 whose records are CRC32C-framed and linked by a SHA-256 hash chain with optionally sealed
 checkpoints.
 .
 This package contains lb-daemon (the balancer, with a systemd unit of type notify),
 lbctl (its control client, with roles from peer credentials) and lb-audit (the log's
 decoder: read, follow, stats, verify), with their man pages and shell completions.
"
    )
}

/// `Depends:` from what the binaries link: `libc6 (>= 2.N)` with N the newest glibc symbol
/// version they use, `libgcc-s1` when they need libgcc_s, and iproute2 (the host's network
/// setup, as the documentation shows it).
fn depends(binaries: &[PathBuf]) -> Result<String> {
    let mut needed = BTreeSet::new();
    let mut glibc: Option<(u32, u32)> = None;
    for b in binaries {
        let dynamic = capture(Command::new("readelf").arg("--dynamic").arg("-W").arg(b))?;
        for line in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
            if let Some(lib) = line.split('[').nth(1).and_then(|r| r.split(']').next()) {
                needed.insert(lib.to_owned());
            }
        }
        let symbols = capture(Command::new("objdump").arg("-T").arg(b))?;
        for v in glibc_versions(&symbols) {
            glibc = glibc.max(Some(v));
        }
    }
    let mut deps = Vec::new();
    let mut libc = false;
    for lib in &needed {
        match lib.as_str() {
            "libc.so.6" | "libm.so.6" | "libdl.so.2" | "libpthread.so.0" | "librt.so.1"
            | "libutil.so.1" => libc = true,
            l if l.starts_with("ld-linux") => libc = true,
            "libgcc_s.so.1" => deps.push("libgcc-s1".to_owned()),
            other => bail!(
                "the binaries link {other}, which the package does not know the Debian package of (xtask/src/dist.rs, fn depends)"
            ),
        }
    }
    if libc || glibc.is_some() {
        deps.insert(
            0,
            match glibc {
                Some((major, minor)) => format!("libc6 (>= {major}.{minor})"),
                None => "libc6".to_owned(),
            },
        );
    }
    deps.push("iproute2".to_owned());
    Ok(deps.join(", "))
}

/// The `GLIBC_2.34`-style versions in `objdump -T` output.
fn glibc_versions(objdump: &str) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for (i, _) in objdump.match_indices("GLIBC_") {
        let rest = &objdump[i + "GLIBC_".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let mut parts = rest[..end].split('.').map(|p| p.parse::<u32>());
        if let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) {
            out.push((major, minor));
        }
    }
    out
}

/// `md5sum` lines of every file under the staged tree but DEBIAN/, paths relative to it.
fn md5sums(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    walk(stage, &mut files)?;
    let rel: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.strip_prefix(stage).ok().map(Path::to_path_buf))
        .filter(|r| !r.starts_with("DEBIAN"))
        .collect();
    let mut c = Command::new("md5sum");
    c.current_dir(stage).args(&rel);
    capture(&mut c).map(|s| s + "\n")
}

/// Sum of file sizes in KiB, rounded up per file (what `Installed-Size` estimates).
fn installed_size_kib(stage: &Path) -> Result<u64> {
    let mut files = Vec::new();
    walk(stage, &mut files)?;
    let mut kib = 0;
    for f in files
        .iter()
        .filter(|f| !f.strip_prefix(stage).is_ok_and(|r| r.starts_with("DEBIAN")))
    {
        let len = std::fs::metadata(f)
            .with_context(|| format!("reading {}", f.display()))?
            .len();
        kib += len.div_ceil(1024);
    }
    Ok(kib)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in read_dir_sorted(dir)? {
        if entry.is_dir() {
            walk(&entry, files)?;
        } else {
            files.push(entry);
        }
    }
    Ok(())
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    v.sort();
    Ok(v)
}

fn file_name(p: &Path) -> Result<String> {
    p.file_name()
        .and_then(|f| f.to_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{}: no UTF-8 file name", p.display()))
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    set_mode(dir, 0o755)
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        mkdir(dir)?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Stdout of a command that must succeed, trimmed.
fn capture(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            show(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_versions_are_read_from_objdump() {
        let text = "0000 DF *UND* 0000 (GLIBC_2.2.5) memcpy\n0000 DF *UND* 0000 (GLIBC_2.34) __libc_start_main\n0000 DF *UND* GLIBC_PRIVATE x\n";
        assert_eq!(super::glibc_versions(text), vec![(2, 2), (2, 34)]);
        assert_eq!(super::glibc_versions(text).into_iter().max(), Some((2, 34)));
    }

    #[test]
    fn control_has_the_required_fields() {
        let c = super::control("0.1.0", "amd64", "libc6 (>= 2.34)", 1234);
        for field in [
            "Package: lb\n",
            "Version: 0.1.0\n",
            "Architecture: amd64\n",
            "Maintainer: ",
            "Depends: libc6 (>= 2.34)\n",
            "Installed-Size: 1234\n",
            "Description: ",
        ] {
            assert!(c.contains(field), "{field}");
        }
        // Continuation lines of the description start with a space; none is empty.
        let desc = c.split("Description: ").nth(1).unwrap();
        for line in desc.lines().skip(1) {
            assert!(line.starts_with(' ') && line.len() > 1, "{line:?}");
        }
    }
}
