//! `lb-daemon` (and the other binaries) as child processes of a test.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::netns::{register_pid, unregister_pid};

/// Where the binaries under test are: `$LB_BIN_DIR`, else `$CARGO_TARGET_DIR/debug`, else
/// `<workspace>/target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LB_BIN_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d).join("debug");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("debug")
}

/// The path of one of lb's binaries (`lb-daemon`, `lb-audit`, `lbctl`); an error that says
/// how to build it when it is missing.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.is_file() {
        bail!(
            "{} not found: build the binaries first (`cargo xtask test` does) or set LB_BIN_DIR",
            p.display()
        );
    }
    Ok(p)
}

/// Runs a command with a time limit; kills it and fails when the limit passes.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    register_pid(child.id());
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    unregister_pid(child.id());
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => Err(anyhow!(
            "{:?} did not finish within {limit:?}; stderr: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&stderr)
        )),
    }
}

#[derive(Default)]
struct Captured {
    text: String,
    ready: bool,
    closed: bool,
}

/// A running `lb-daemon` inside a namespace. Dropping it kills the process (SIGKILL) if it
/// is still running, and prints what it wrote to stderr when the thread is panicking.
pub struct Daemon {
    child: Option<Child>,
    captured: Arc<(Mutex<Captured>, Condvar)>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// True when `line` contains the word `ready` (not as part of `already`).
fn says_ready(line: &str) -> bool {
    line.match_indices("ready").any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + 5..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
    })
}

impl Daemon {
    /// Starts `ip netns exec <ns> <bin_dir>/lb-daemon <args>`, capturing stderr.
    pub fn spawn(ns: &str, args: &[String]) -> Result<Daemon> {
        Daemon::spawn_with(ns, args, None)
    }

    /// As [`Daemon::spawn`]; each stderr line is also printed with `echo_prefix` when given.
    pub fn spawn_with(ns: &str, args: &[String], echo_prefix: Option<&str>) -> Result<Daemon> {
        let exe = bin("lb-daemon")?;
        // Daemons of tests running in parallel each get a control socket of their own.
        let mut args = args.to_vec();
        if !args.iter().any(|a| a.starts_with("--control-socket")) {
            args.push(format!("--control-socket=/run/lb-tests/{ns}.sock"));
        }
        // ... and a kernel-state directory of their own, removed with the namespace.
        if !args.iter().any(|a| a.starts_with("--bpf-dir")) {
            args.push(format!(
                "--bpf-dir={}",
                crate::netns::bpf_dir(ns)?.display()
            ));
        }
        // Tests count every flow's close at stop, unless they test the hand-over itself.
        if !args.iter().any(|a| a.starts_with("--on-stop")) {
            args.push("--on-stop=detach".into());
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&exe)
            .args(&args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} in {ns}", exe.display()))?;
        register_pid(child.id());
        let stderr = child.stderr.take().expect("piped");
        let captured = Arc::new((Mutex::new(Captured::default()), Condvar::new()));
        let c = captured.clone();
        let prefix = echo_prefix.map(str::to_owned);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(p) = &prefix {
                    println!("{p}{line}");
                }
                let (m, cv) = &*c;
                let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
                g.ready |= says_ready(&line);
                g.text.push_str(&line);
                g.text.push('\n');
                cv.notify_all();
            }
            let (m, cv) = &*c;
            m.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
            cv.notify_all();
        });
        Ok(Daemon {
            child: Some(child),
            captured,
            reader: Some(reader),
        })
    }

    /// The process id (that of `lb-daemon` itself: `ip netns exec` execs it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.captured
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .text
            .clone()
    }

    /// Waits until a stderr line says `ready`; fails with the captured stderr when the
    /// daemon exits first or `limit` passes.
    pub fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let (m, cv) = &*self.captured;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if g.ready {
                return Ok(());
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                let text = g.text.clone();
                drop(g);
                let status = match self.child.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(s))) => format!("it exited with {s}"),
                    _ if now >= deadline => format!("it did not say `ready` within {limit:?}"),
                    _ => "it closed stderr".to_owned(),
                };
                bail!("lb-daemon is not ready: {status}; its stderr:\n{text}");
            }
            let (g2, _) = cv
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(200)))
                .unwrap_or_else(|p| p.into_inner());
            g = g2;
        }
    }

    /// Sends SIGTERM and waits up to `limit` for the exit; then SIGKILL (and an error).
    pub fn stop(&mut self, limit: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("the daemon was already stopped")
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        let result = loop {
            if let Some(s) = child.try_wait()? {
                break Ok(s);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break Err(anyhow!(
                    "lb-daemon did not exit within {limit:?} of SIGTERM (killed); its stderr:\n{}",
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        unregister_pid(child.id());
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        result
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            unregister_pid(child.id());
        }
        if std::thread::panicking() {
            eprintln!(
                "---- lb-daemon stderr ----\n{}---- end of lb-daemon stderr ----",
                self.stderr()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::says_ready;

    #[test]
    fn ready_is_a_word() {
        assert!(says_ready(
            "2026-01-01T00:00:00Z  INFO lb_daemon::daemon: ready ifaces=[\"c0\"]"
        ));
        assert!(says_ready("ready"));
        assert!(!says_ready(
            "error: --service web: 10.0.0.100:80 is already service 'x'"
        ));
        assert!(!says_ready("not_ready_yet"));
    }
}
