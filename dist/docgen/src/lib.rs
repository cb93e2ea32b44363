//! Man pages and shell completions of `lb-daemon`, `lbctl` and `lb-audit`, generated from the
//! same clap definitions the binaries parse ([`lb_daemon::cli::commands`]), so the package's
//! documentation cannot drift from the flags.
//!
//! [`generate`] writes, under one directory:
//! - `man/NAME.S`: one page per binary (`lb-daemon.8`, `lbctl.1`, `lb-audit.1`) and one per
//!   subcommand (`lbctl-backend-drain.1`, `lb-audit-verify.1`, …), roff, uncompressed;
//! - `completions/bash/NAME`, `completions/zsh/_NAME`, `completions/fish/NAME.fish`.
//!
//! `cargo xtask dist` runs the `lb-docgen` binary and places these files in the package.
#![forbid(unsafe_code)]

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap_complete::Shell;

/// The manual section of a binary: the daemon in 8 (system administration), the others in 1.
pub fn section(binary: &str) -> &'static str {
    if binary == "lb-daemon" { "8" } else { "1" }
}

/// Files written by [`generate`], relative to its output directory.
#[derive(Debug, Default)]
pub struct Generated {
    pub man_pages: Vec<PathBuf>,
    pub completions: Vec<PathBuf>,
}

/// Writes every man page and completion script under `out` (created when missing).
pub fn generate(out: &Path) -> Result<Generated> {
    let mut generated = Generated::default();
    let man_dir = out.join("man");
    std::fs::create_dir_all(&man_dir).with_context(|| format!("creating {}", man_dir.display()))?;
    let commands = lb_daemon::cli::commands();
    let names: Vec<String> = commands.iter().map(|c| c.get_name().to_owned()).collect();
    for cmd in &commands {
        let name = cmd.get_name().to_owned();
        let mut cmd = cmd.clone().disable_help_subcommand(true);
        cmd.build();
        let see_also: Vec<String> = names
            .iter()
            .filter(|n| **n != name)
            .map(|n| format!("{n}({})", section(n)))
            .collect();
        man_pages(&cmd, section(&name), &see_also, &man_dir, &mut generated)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let rel = PathBuf::from("completions")
                .join(shell.to_string())
                .join(completion_file(shell, &name));
            let path = out.join(&rel);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut buf);
            std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
            generated.completions.push(rel);
        }
    }
    Ok(generated)
}

/// The file name a shell looks for: `lbctl` (bash), `_lbctl` (zsh), `lbctl.fish` (fish).
pub fn completion_file(shell: Shell, name: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        _ => name.to_owned(),
    }
}

/// The page of `cmd` and, recursively, of each of its subcommands (`lbctl-backend-drain`).
fn man_pages(
    cmd: &clap::Command,
    section: &str,
    see_also: &[String],
    dir: &Path,
    generated: &mut Generated,
) -> Result<()> {
    let title = cmd.get_display_name().unwrap_or(cmd.get_name()).to_owned();
    let version = env!("CARGO_PKG_VERSION");
    let man = clap_mangen::Man::new(cmd.clone())
        .title(title.to_uppercase())
        .section(section)
        .source(format!("lb {version}"))
        .manual("lb manual");
    let mut page = Vec::new();
    man.render(&mut page)
        .with_context(|| format!("rendering the man page of {title}"))?;
    // Related pages: the parent's subcommands and the other binaries.
    let subs: Vec<String> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| {
            format!(
                "{}({section})",
                s.get_display_name().unwrap_or(s.get_name())
            )
        })
        .collect();
    for (heading, items) in extra_sections(&title) {
        writeln!(page, ".SH \"{heading}\"")?;
        for (term, text) in *items {
            writeln!(page, ".TP\n{}\n{}", roff_escape(term), roff_escape(text))?;
        }
    }
    let related: Vec<String> = subs.iter().chain(see_also).cloned().collect();
    if !related.is_empty() {
        writeln!(page, ".SH \"SEE ALSO\"")?;
        writeln!(page, "{}", roff_escape(&related.join(", ")))?;
    }
    let file = format!("{title}.{section}");
    let path = dir.join(&file);
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    generated.man_pages.push(PathBuf::from("man").join(file));
    let top = title.split('-').next().unwrap_or(&title).to_owned();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // A subcommand's page points back at its binary's page.
        let parent = format!("{}({section})", cmd.get_display_name().unwrap_or(&top));
        man_pages(sub, section, &[parent], dir, generated)?;
    }
    Ok(())
}

/// Sections the command definitions do not carry: files, exit codes.
fn extra_sections(
    page: &str,
) -> &'static [(&'static str, &'static [(&'static str, &'static str)])] {
    match page {
        "lb-daemon" => &[
            (
                "FILES",
                &[
                    (
                        "/etc/default/lb-daemon",
                        "LB_DAEMON_ARGS, the flags the systemd unit starts the daemon with",
                    ),
                    (
                        "/lib/systemd/system/lb-daemon.service",
                        "the systemd unit (Type=notify)",
                    ),
                    (
                        "/var/lib/lb-daemon/audit",
                        "the audit log (the default of --audit-dir)",
                    ),
                    (
                        "/run/lb-daemon/control.sock",
                        "the control socket of lbctl (the default of --control-socket)",
                    ),
                    (
                        "/usr/share/doc/lb/operations.md",
                        "installation, upgrades, hardening, several balancers, shipping the log",
                    ),
                ],
            ),
            (
                "EXIT STATUS",
                &[
                    (
                        "0",
                        "stopped by SIGTERM or SIGINT after writing the records of open flows and daemon_stop",
                    ),
                    (
                        "non-zero",
                        "a bad flag (the message names it) or a failure to start (no such interface, forwarding disabled, the log cannot be opened)",
                    ),
                ],
            ),
        ],
        "lbctl" => &[(
            "EXIT STATUS",
            &[
                ("0", "done"),
                ("1", "cannot reach the daemon"),
                ("2", "bad usage"),
                (
                    "3",
                    "refused: the caller's role does not allow the request (recorded as control_denied)",
                ),
                ("4", "invalid: no such service or backend, or a bad value"),
                (
                    "5",
                    "failed, e.g. the change could not be recorded in the audit log",
                ),
            ],
        )],
        "lb-audit" => &[(
            "EXIT STATUS",
            &[
                ("0", "success (verify: the log is intact)"),
                (
                    "1",
                    "the log is damaged, tampered with or unreadable (the message names the segment and offset)",
                ),
                ("2", "bad usage: unknown command or bad filter"),
            ],
        )],
        _ => &[],
    }
}

/// Escapes what roff would take for a request or an escape sequence.
fn roff_escape(text: &str) -> String {
    let text = text.replace('\\', "\\\\").replace('-', "\\-");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-docgen-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn every_page_and_completion_is_written_with_the_flags_in_it() {
        let out = tmp("all");
        let g = generate(&out).unwrap();
        let read = |rel: &str| std::fs::read_to_string(out.join(rel)).unwrap();
        for page in ["man/lb-daemon.8", "man/lbctl.1", "man/lb-audit.1"] {
            assert!(g.man_pages.contains(&PathBuf::from(page)), "{page}");
            let text = read(page);
            assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
            assert!(text.contains(".SH NAME"), "{page}");
            assert!(text.contains("SEE ALSO"), "{page}");
            assert!(text.contains("EXIT STATUS"), "{page}");
        }
        let daemon = read("man/lb-daemon.8");
        for flag in ["iface", "audit\\-dir", "alert\\-denied", "control\\-socket"] {
            assert!(daemon.contains(flag), "lb-daemon.8 mentions {flag}");
        }
        assert!(read("man/lbctl-backend-drain.1").contains("SERVICE"));
        assert!(read("man/lb-audit-verify.1").contains("key"));
        for (file, word) in [
            ("completions/bash/lbctl", "drain"),
            ("completions/zsh/_lbctl", "undrain"),
            ("completions/fish/lbctl.fish", "backends"),
            ("completions/bash/lb-audit", "verify"),
            ("completions/fish/lb-daemon.fish", "audit-seal-key"),
        ] {
            assert!(read(file).contains(word), "{file} mentions {word}");
        }
        assert_eq!(g.completions.len(), 9);
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn roff_lines_cannot_become_requests() {
        assert_eq!(roff_escape(".x-y"), "\\&.x\\-y");
        assert_eq!(roff_escape("a\\b"), "a\\\\b");
    }
}
