//! The Debian package of `cargo xtask dist`, built from the binaries under test: its control
//! data and every expected file, man pages that `man -l` renders with the flags in them,
//! completions that name the subcommands and parse, binaries that run; then, as root, a real
//! `dpkg -i`, the installed binaries, unit and environment file, `dpkg -r` (the conffile
//! stays) and `dpkg --purge`, and nothing of the package left. The package is purged also
//! when an assertion fails.

use std::{
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use lb_tests::{TempDir, daemon::run_bounded};

const PKG: &str = "lb";
const BINARIES: [&str; 3] = ["lb-daemon", "lbctl", "lb-audit"];

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> Output {
    let text = format!("{cmd:?}");
    run_bounded(cmd, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{text}: {e:#}"))
}

/// Runs a command that must succeed; its stdout.
fn ok(cmd: &mut Command) -> String {
    let text = format!("{cmd:?}");
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{text} failed ({}):\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `cargo xtask dist --bin-dir <the binaries under test>` into `out`; the .deb's path.
fn build_package(out: &Path) -> PathBuf {
    let bin_dir = lb_tests::bin_dir()
        .canonicalize()
        .expect("the binaries' directory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace())
        .args(["run", "--quiet", "--package", "xtask", "--", "dist"])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out-dir")
        .arg(out)
        .args(["--compress", "gzip"]);
    let text = format!("{cmd:?}");
    let o = run_bounded(&mut cmd, Duration::from_secs(600)).expect("cargo xtask dist");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text} failed ({}):\n{stdout}{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let deb = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("the path of the package")
            .trim(),
    );
    let version = env!("CARGO_PKG_VERSION");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("{PKG}_{version}_")) && name.ends_with(".deb"),
        "{name}"
    );
    assert!(deb.is_file(), "{} exists", deb.display());
    deb
}

/// The files (not directories) of `dpkg-deb -c`, as absolute paths, with their mode string.
fn contents(deb: &Path) -> Vec<(String, String)> {
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(deb));
    listing
        .lines()
        .filter(|l| !l.starts_with('d'))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            assert!(fields.len() >= 6, "a dpkg-deb -c line: {l}");
            assert_eq!(fields[1], "root/root", "owned by root: {l}");
            let path = fields[5].trim_start_matches('.').to_owned();
            (path, fields[0].to_owned())
        })
        .collect()
}

fn expected_files() -> Vec<String> {
    let mut v: Vec<String> = BINARIES.iter().map(|b| format!("/usr/bin/{b}")).collect();
    v.extend(
        [
            "/lib/systemd/system/lb-daemon.service",
            "/etc/default/lb-daemon",
            "/usr/share/man/man8/lb-daemon.8.gz",
            "/usr/share/man/man1/lbctl.1.gz",
            "/usr/share/man/man1/lbctl-backend-drain.1.gz",
            "/usr/share/man/man1/lbctl-status.1.gz",
            "/usr/share/man/man1/lb-audit.1.gz",
            "/usr/share/man/man1/lb-audit-verify.1.gz",
            "/usr/share/doc/lb/copyright",
            "/usr/share/doc/lb/README.md",
            "/usr/share/doc/lb/operations.md",
        ]
        .map(str::to_owned),
    );
    for b in BINARIES {
        v.push(format!("/usr/share/bash-completion/completions/{b}"));
        v.push(format!("/usr/share/zsh/vendor-completions/_{b}"));
        v.push(format!("/usr/share/fish/vendor_completions.d/{b}.fish"));
    }
    v
}

/// Renders a man page with `man -l` (plain ASCII, wide) and returns the text; asserts that
/// man and groff raise no warning.
fn render_man(page: &Path) -> String {
    let o = run(Command::new("man")
        .args(["--warnings", "-l"])
        .arg(page)
        .env("LANG", "C")
        .env("LC_ALL", "C")
        .env("MANWIDTH", "200")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "man -l {}: {err}", page.display());
    assert!(
        err.trim().is_empty(),
        "man -l {} warns: {err}",
        page.display()
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What the package must say about itself, checked without installing it.
fn inspect(deb: &Path, scratch: &Path) {
    // Control data.
    let field = |f: &str| ok(Command::new("dpkg-deb").arg("-f").arg(deb).arg(f));
    assert_eq!(field("Package").trim(), PKG);
    assert_eq!(field("Version").trim(), env!("CARGO_PKG_VERSION"));
    let arch = ok(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(field("Architecture").trim(), arch.trim());
    let depends = field("Depends");
    for dep in ["libc6 (>= 2.", "iproute2"] {
        assert!(depends.contains(dep), "Depends has {dep}: {depends}");
    }
    assert!(!field("Maintainer").trim().is_empty());
    assert!(field("Description").contains("load balancer"));
    let info = ok(Command::new("dpkg-deb").arg("-I").arg(deb));
    for part in [
        "control",
        "conffiles",
        "md5sums",
        "postinst",
        "prerm",
        "postrm",
    ] {
        assert!(info.contains(part), "control area has {part}: {info}");
    }
    let conffiles = ok(Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/default/lb-daemon");
    // The maintainer scripts parse.
    let control = scratch.join("control");
    ok(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
    for script in ["postinst", "prerm", "postrm"] {
        let p = control.join(script);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o755,
            "{script} is executable"
        );
        ok(Command::new("sh").arg("-n").arg(&p));
    }

    // Every expected file, with sensible modes.
    let files = contents(deb);
    let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    for f in expected_files() {
        assert!(paths.contains(&f.as_str()), "{f} is in the package");
    }
    for (p, mode) in &files {
        let want = if p.starts_with("/usr/bin/") {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, want, "mode of {p}");
    }

    // The files themselves.
    let root = scratch.join("root");
    ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    for (ours, theirs) in [
        (
            "dist/systemd/lb-daemon.service",
            "lib/systemd/system/lb-daemon.service",
        ),
        ("dist/systemd/lb-daemon.default", "etc/default/lb-daemon"),
    ] {
        assert_eq!(
            std::fs::read(workspace().join(ours)).unwrap(),
            std::fs::read(root.join(theirs)).unwrap(),
            "{theirs} is {ours}"
        );
    }
    let version = ok(Command::new(root.join("usr/bin/lb-daemon")).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("lb-daemon {}", env!("CARGO_PKG_VERSION"))
    );

    // Man pages: every one renders; the top pages carry the flags and the exit codes.
    let man = root.join("usr/share/man");
    let pages: Vec<PathBuf> = ["man1", "man8"]
        .iter()
        .flat_map(|d| std::fs::read_dir(man.join(d)).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    assert!(pages.len() >= 20, "a page per command: {pages:?}");
    if have("man") {
        for page in &pages {
            let name = page
                .file_name()
                .unwrap()
                .to_string_lossy()
                .split('.')
                .next()
                .unwrap()
                .to_owned();
            let text = render_man(page);
            assert!(text.contains("NAME"), "{name}: {text}");
            assert!(text.contains(&name), "{name}: {text}");
        }
        let daemon = render_man(&man.join("man8/lb-daemon.8.gz"));
        for flag in [
            "--iface <IF>",
            "--service",
            "--deny",
            "--health",
            "--audit-dir",
            "--audit-seal-key",
            "--control-socket",
            "--export",
            "EXIT STATUS",
            "/etc/default/lb-daemon",
        ] {
            assert!(daemon.contains(flag), "lb-daemon(8) has {flag}:\n{daemon}");
        }
        let lbctl = render_man(&man.join("man1/lbctl.1.gz"));
        for word in [
            "--socket",
            "--json",
            "backends",
            "lbctl-backend(1)",
            "refused",
        ] {
            assert!(lbctl.contains(word), "lbctl(1) has {word}:\n{lbctl}");
        }
        let drain = render_man(&man.join("man1/lbctl-backend-drain.1.gz"));
        assert!(
            drain.contains("lbctl backend drain") && drain.contains("<SERVICE>"),
            "{drain}"
        );
        let audit = render_man(&man.join("man1/lb-audit.1.gz"));
        for word in ["read", "follow", "stats", "verify", "EXIT STATUS"] {
            assert!(audit.contains(word), "lb-audit(1) has {word}:\n{audit}");
        }
    } else {
        eprintln!("NOTE dist: `man` is not installed (man-db); checking the pages as roff only");
        let raw = String::from_utf8(
            ok(Command::new("gzip")
                .args(["-dc"])
                .arg(man.join("man8/lb-daemon.8.gz")))
            .into_bytes(),
        )
        .unwrap();
        assert!(raw.contains(".TH") && raw.contains("audit\\-dir"), "{raw}");
    }

    // Completions name the subcommands and parse.
    let comp = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let bash = comp("usr/share/bash-completion/completions/lbctl");
    for word in [
        "status", "services", "backends", "drain", "undrain", "--socket",
    ] {
        assert!(bash.contains(word), "bash completion of lbctl has {word}");
    }
    let audit = comp("usr/share/bash-completion/completions/lb-audit");
    for word in ["read", "follow", "stats", "verify", "--since"] {
        assert!(
            audit.contains(word),
            "bash completion of lb-audit has {word}"
        );
    }
    assert!(comp("usr/share/zsh/vendor-completions/_lbctl").starts_with("#compdef lbctl"));
    assert!(comp("usr/share/fish/vendor_completions.d/lbctl.fish").contains("complete -c lbctl"));
    assert!(comp("usr/share/fish/vendor_completions.d/lb-daemon.fish").contains("audit-seal-key"));
    for b in BINARIES {
        ok(Command::new("bash")
            .arg("-n")
            .arg(root.join("usr/share/bash-completion/completions").join(b)));
        if have("zsh") {
            ok(Command::new("zsh").arg("-n").arg(
                root.join("usr/share/zsh/vendor-completions")
                    .join(format!("_{b}")),
            ));
        }
    }
}

/// dpkg's idea of the package: `installed`, `config-files`, or `not-installed`.
fn status() -> String {
    let o = run(Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status}"])
        .arg(PKG));
    if !o.status.success() {
        return "not-installed".into();
    }
    let s = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    if s.is_empty() {
        "not-installed".into()
    } else {
        s
    }
}

/// Purges the package when dropped, whatever happened in between.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        if status() != "not-installed" {
            let o = Command::new("dpkg").args(["--purge", PKG]).output();
            if !o.is_ok_and(|o| o.status.success()) {
                eprintln!("warning: `dpkg --purge {PKG}` failed: remove the package by hand");
            }
        }
    }
}

/// An exclusive lock across processes (another checkout's suite on the same machine), held
/// while the package is installed.
struct HostLock {
    _file: std::fs::File,
}

impl HostLock {
    fn take() -> HostLock {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/lb-tests-dpkg.lock")
            .expect("opening /run/lb-tests-dpkg.lock");
        // SAFETY: flock on an fd we own; blocks until the other holder is done.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        HostLock { _file: f }
    }
}

/// Paths that dpkg is configured not to install (`path-exclude`, e.g. in slim containers).
fn excluded_by_dpkg(path: &str) -> bool {
    let Ok(dir) = std::fs::read_dir("/etc/dpkg/dpkg.cfg.d") else {
        return false;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().strip_prefix("path-exclude"))
                .map(|p| {
                    p.trim_start_matches(['=', ' '])
                        .split('*')
                        .next()
                        .unwrap_or("")
                        .to_owned()
                })
                .collect::<Vec<_>>()
        })
        .any(|prefix| !prefix.is_empty() && path.starts_with(&prefix))
}

fn install_and_remove(deb: &Path) {
    let _lock = HostLock::take();
    if status() != "not-installed" {
        eprintln!(
            "SKIPPED the install part of dist: the package {PKG} is already on this machine ({}); not touching it",
            status()
        );
        return;
    }
    let state_dir = Path::new("/var/lib/lb-daemon");
    let state_existed = state_dir.exists();
    let _purge = Purge;
    let files = contents(deb);

    let out = ok(Command::new("dpkg").arg("-i").arg(deb));
    assert_eq!(status(), "installed", "{out}");
    eprintln!("dist: dpkg -i {} done", deb.display());
    assert!(
        out.contains("/etc/default/lb-daemon"),
        "postinst says where the flags go: {out}"
    );
    for (path, _) in &files {
        if !excluded_by_dpkg(path) {
            assert!(Path::new(path).is_file(), "{path} is installed");
        }
    }
    let version = ok(Command::new("/usr/bin/lb-daemon").arg("--version"));
    assert_eq!(
        version.trim(),
        format!("lb-daemon {}", env!("CARGO_PKG_VERSION"))
    );
    let help = ok(Command::new("/usr/bin/lbctl").arg("--help"));
    for word in ["status", "backends", "backend", "--socket"] {
        assert!(help.contains(word), "lbctl --help has {word}: {help}");
    }
    let help = ok(Command::new("/usr/bin/lb-audit").arg("--help"));
    for word in ["read", "stats", "verify"] {
        assert!(help.contains(word), "lb-audit --help has {word}: {help}");
    }
    assert_eq!(
        std::fs::read(workspace().join("dist/systemd/lb-daemon.service")).unwrap(),
        std::fs::read("/lib/systemd/system/lb-daemon.service").unwrap()
    );
    let listed = ok(Command::new("dpkg").args(["-L", PKG]));
    assert!(listed.contains("/lib/systemd/system/lb-daemon.service"));
    // postinst made the audit log's directory, for root only.
    let audit = std::fs::metadata("/var/lib/lb-daemon/audit").expect("the audit directory");
    assert!(audit.is_dir());
    assert_eq!(audit.permissions().mode() & 0o777, 0o750);
    // The installed unit verifies, when systemd's tools are here.
    if have("systemd-analyze") {
        let o = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg("/lib/systemd/system/lb-daemon.service"));
        let text = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{text}");
        assert!(!text.contains("lb-daemon.service:"), "{text}");
    }

    // Removed: everything but the conffile goes.
    ok(Command::new("dpkg").args(["-r", PKG]));
    assert_eq!(status(), "config-files");
    eprintln!("dist: dpkg -r {PKG} done");
    for (path, _) in &files {
        if path == "/etc/default/lb-daemon" {
            assert!(Path::new(path).is_file(), "the conffile stays until purge");
        } else {
            assert!(!Path::new(path).exists(), "{path} is gone after dpkg -r");
        }
    }
    // Purged: the conffile goes, and the (empty) audit directory the package made.
    ok(Command::new("dpkg").args(["--purge", PKG]));
    assert_eq!(status(), "not-installed");
    eprintln!("dist: dpkg --purge {PKG} done");
    assert!(!Path::new("/etc/default/lb-daemon").exists());
    if !state_existed {
        assert!(
            !state_dir.exists(),
            "purge removes the empty /var/lib/lb-daemon"
        );
    }
}

#[test]
fn the_package_holds_everything_installs_and_removes_cleanly() {
    for tool in ["dpkg-deb", "dpkg", "dpkg-query", "strip", "bash"] {
        if !have(tool) {
            eprintln!(
                "SKIPPED the_package_holds_everything_installs_and_removes_cleanly: `{tool}` is not installed (cargo xtask setup installs it)"
            );
            return;
        }
    }
    if !lb_tests::bin_dir().join("lb-daemon").is_file() {
        eprintln!(
            "SKIPPED the_package_holds_everything_installs_and_removes_cleanly: no binaries in {} (cargo xtask test builds them)",
            lb_tests::bin_dir().display()
        );
        return;
    }
    let dir = TempDir::new("dist").unwrap();
    let deb = build_package(&dir.path().join("out"));
    inspect(&deb, dir.path());
    eprintln!("dist: {} holds every expected file", deb.display());
    if lb_tests::require_root(
        "the_package_holds_everything_installs_and_removes_cleanly (dpkg -i, -r, --purge)",
    ) {
        install_and_remove(&deb);
    }
}
