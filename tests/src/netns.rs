//! Network namespaces owned by a test: unique names, commands and closures run inside them,
//! deletion on drop (also while a panic unwinds), and a process-wide registry so a signal
//! handler can remove whatever is still alive ([`cleanup_all`]).

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Mutex, Once,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Prefix of every namespace the harness creates: `lbt-<pid>-<n>-<tag>`.
pub const PREFIX: &str = "lbt-";

/// True when the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True when the test may go on; otherwise prints a visible skip line and returns false.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    // Written to the stderr handle directly, not with eprintln!, so the test harness's output
    // capture does not hide it.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs root");
    false
}

/// What is alive and must go if the process is interrupted.
#[derive(Default)]
struct Registry {
    namespaces: BTreeSet<String>,
    pids: BTreeSet<i32>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    namespaces: BTreeSet::new(),
    pids: BTreeSet::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn register_pid(pid: u32) {
    registry().pids.insert(pid as i32);
}

pub(crate) fn unregister_pid(pid: u32) {
    registry().pids.remove(&(pid as i32));
}

/// Stops every process started through this crate (SIGTERM, then SIGKILL after 3 s) and
/// deletes every namespace it created. Meant for a Ctrl-C handler, just before exiting.
pub fn cleanup_all() {
    let (pids, namespaces) = {
        let r = registry();
        (r.pids.clone(), r.namespaces.clone())
    };
    for &pid in &pids {
        // SAFETY: plain syscall on a pid this process started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut left: BTreeSet<i32> = pids;
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&pid| {
            let mut status = 0;
            // SAFETY: waitpid on our own child; WNOHANG never blocks.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            r == 0
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in &left {
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    for ns in namespaces {
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        registry().namespaces.remove(&ns);
    }
}

/// Deletes namespaces left by earlier processes that died without cleaning up
/// (`lbt-<pid>-…` whose pid no longer exists); returns their names.
pub fn remove_stale_namespaces() -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return removed;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let dead =
            pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists();
        if dead {
            remove_bpf_dir(&name);
        }
        if dead
            && Command::new("ip")
                .args(["netns", "del", &name])
                .output()
                .is_ok_and(|o| o.status.success())
        {
            removed.push(name);
        }
    }
    removed
}

/// [`remove_stale_namespaces`], once per process.
fn reap_stale() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        remove_stale_namespaces();
    });
}

/// A network namespace created for one test; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `lbt-<pid>-<n>-<tag>` with `lo` up. Panics on failure (see [`Netns::try_new`]).
    pub fn new(tag: &str) -> Netns {
        Netns::try_new(tag).unwrap_or_else(|e| panic!("creating a network namespace: {e:#}"))
    }

    /// Creates `lbt-<pid>-<n>-<tag>` with `lo` up.
    pub fn try_new(tag: &str) -> Result<Netns> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        reap_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{tag}", std::process::id());
        run_cmd(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        registry().namespaces.insert(name.clone());
        let ns = Netns { name };
        ns.try_exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a shell command inside the namespace; panics with its output when it fails.
    pub fn run(&self, script: &str) -> String {
        self.try_run(script).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Runs a shell command inside the namespace; returns its stdout.
    pub fn try_run(&self, script: &str) -> Result<String> {
        run_cmd(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", script]))
            .with_context(|| format!("in namespace {}: `{script}`", self.name))
    }

    /// Runs a program with arguments inside the namespace (no shell); returns its stdout.
    pub fn try_exec(&self, argv: &[&str]) -> Result<String> {
        run_cmd(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
        )
        .with_context(|| format!("in namespace {}: `{}`", self.name, argv.join(" ")))
    }

    /// Runs `f` on a thread that has entered the namespace; see [`in_netns`].
    pub fn enter<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        in_netns(&self.name, f)
    }
}

/// A bpf filesystem of the harness's own: the daemon of a test pins its kernel state in the
/// directory named after its namespace ([`bpf_dir`]), and the namespace's deletion removes it.
pub const BPF_ROOT: &str = "/run/lb-tests/bpf";

/// The state directory (`--bpf-dir`) for a daemon in namespace `ns`, mounting the harness's
/// bpf filesystem first when needed.
pub fn bpf_dir(ns: &str) -> Result<std::path::PathBuf> {
    static MOUNT: Mutex<()> = Mutex::new(());
    let _once = MOUNT.lock().unwrap_or_else(|p| p.into_inner());
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPF_ROOT) && l.contains(" bpf "));
    if !mounted {
        std::fs::create_dir_all(BPF_ROOT).with_context(|| format!("creating {BPF_ROOT}"))?;
        run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", BPF_ROOT]))
            .with_context(|| format!("mounting a bpf filesystem at {BPF_ROOT}"))?;
    }
    Ok(std::path::Path::new(BPF_ROOT).join(ns))
}

/// Removes what a daemon pinned for namespace `ns` (its program stays attached until then).
/// The same walk as `lb_daemon::dataplane::remove_pins`, which this crate's library cannot
/// call: xtask links it, and must build before the eBPF toolchain lb-daemon needs exists.
pub fn remove_bpf_dir(ns: &str) {
    let dir = std::path::Path::new(BPF_ROOT).join(ns);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            for pin in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                let _ = std::fs::remove_file(pin.path());
            }
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    let _ = std::fs::remove_dir(&dir);
}

impl Drop for Netns {
    fn drop(&mut self) {
        remove_bpf_dir(&self.name);
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: cannot delete network namespace {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!(
                "warning: cannot delete network namespace {}: {e}",
                self.name
            ),
        }
        registry().namespaces.remove(&self.name);
    }
}

/// Runs a command to completion; its stdout on success, an error with its output otherwise.
pub(crate) fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into the named network namespace, with a mount namespace of its
/// own whose `/sys` describes that network namespace (as `ip netns exec` does), so
/// `/sys/class/net` shows the namespace's interfaces. Only this thread is affected.
fn enter_thread(name: &str) -> Result<()> {
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid fd of a network namespace; affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns({path}, CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
    }
    // A private mount namespace for this thread (CLONE_NEWNS implies an unshared fs struct),
    // then a fresh sysfs. Nothing propagates back: "/" becomes a recursive slave first.
    // SAFETY: plain syscalls with valid, NUL-terminated arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            bail!("unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
        }
        let root = CString::new("/").unwrap();
        let none = CString::new("none").unwrap();
        if libc::mount(
            none.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            bail!(
                "making / a slave mount: {}",
                std::io::Error::last_os_error()
            );
        }
        let sys = CString::new("/sys").unwrap();
        let sysfs = CString::new("sysfs").unwrap();
        let mut flags = 0;
        if libc::umount2(sys.as_ptr(), libc::MNT_DETACH) != 0 {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(sys.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0 {
                flags = libc::MS_RDONLY;
            }
        }
        let src = CString::new(name).unwrap();
        if libc::mount(
            src.as_ptr(),
            sys.as_ptr(),
            sysfs.as_ptr(),
            flags,
            std::ptr::null(),
        ) != 0
        {
            bail!(
                "mounting sysfs for {name}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside the named network namespace and returns its result;
/// a panic in `f` is resumed on the caller. Sockets `f` creates belong to the namespace.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(name: &str, f: F) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            enter_thread(name)
                .unwrap_or_else(|e| panic!("entering network namespace {name}: {e:#}"));
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    })
}

/// Starts `f` on a background thread inside the named network namespace. Threads that `f`
/// spawns stay in that namespace.
pub fn spawn_in_netns<T, F>(name: &str, f: F) -> JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let name = name.to_owned();
    std::thread::Builder::new()
        .name(format!("in-{name}"))
        .spawn(move || {
            enter_thread(&name).with_context(|| format!("entering network namespace {name}"))?;
            f()
        })
        .expect("spawning a thread")
}

/// True when `/run/netns/<name>` exists.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}
