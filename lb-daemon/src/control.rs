//! The control socket: a Unix socket (mode 0660) where `lbctl` sends one JSON request per
//! connection and reads one JSON response. The caller's identity comes from the kernel
//! (SO_PEERCRED: uid, gid, pid), resolved to a user name and executable; its role (from
//! `--role`, root is admin) decides what it may do. The daemon's run loop executes requests, so
//! every change goes through the same path as everything else: recorded, then applied.

use std::{
    ffi::{CStr, CString},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::warn;

use crate::audit::Actor;

/// Default path of the control socket (`--control-socket`, `lbctl --socket`).
pub const DEFAULT_SOCKET: &str = "/run/lb-daemon/control.sock";

/// What a caller may do; each role includes the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// `--role ROLE=user:NAME|group:NAME`
#[derive(Clone, Debug, Serialize)]
pub struct RoleGrant {
    pub role: Role,
    pub principal: Principal,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Principal {
    User(String),
    Group(String),
}

impl FromStr for RoleGrant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (role, who) = s
            .split_once('=')
            .ok_or("expected ROLE=user:NAME or ROLE=group:NAME")?;
        let role = match role {
            "admin" => Role::Admin,
            "operator" => Role::Operator,
            "viewer" => Role::Viewer,
            r => return Err(format!("unknown role '{r}' (admin, operator, viewer)")),
        };
        let principal = match who.split_once(':') {
            Some(("user", n)) if !n.is_empty() => Principal::User(n.to_string()),
            Some(("group", n)) if !n.is_empty() => Principal::Group(n.to_string()),
            _ => return Err(format!("'{who}': expected user:NAME or group:NAME")),
        };
        Ok(RoleGrant { role, principal })
    }
}

/// A request on the socket.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Request {
    /// `status`, `services`, `backends`, `flows`; `service.add|remove`,
    /// `backend.add|remove|drain|undrain|weight|enable|disable`, `acl.add|remove`.
    pub action: String,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    /// `service.add`: `tcp|udp:IP:PORT`; `acl.add|remove`: `allow|deny CIDR`.
    #[serde(default)]
    pub value: Option<String>,
    /// `service.add`: `N/s`.
    #[serde(default)]
    pub rate_limit: Option<String>,
}

/// Why a request was not carried out (also `lbctl`'s exit code).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Refusal {
    /// The caller's role does not allow it.
    Refused,
    /// The request is malformed or names something that does not exist.
    Invalid,
    /// It could not be done (e.g. the audit log cannot record it under fail-closed).
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Refusal>,
}

impl Response {
    pub fn ok(data: Value) -> Response {
        Response {
            ok: true,
            data: Some(data),
            error: None,
            code: None,
        }
    }
    pub fn err(code: Refusal, error: impl Into<String>) -> Response {
        Response {
            ok: false,
            data: None,
            error: Some(error.into()),
            code: Some(code),
        }
    }
}

/// A request with the caller's identity, for the run loop; the answer goes back on `reply`.
pub struct Call {
    pub request: Request,
    pub actor: Actor,
    pub role: Option<Role>,
    pub reply: oneshot::Sender<Response>,
}

/// The role an action needs.
pub fn required_role(action: &str) -> Option<Role> {
    match action {
        "status" | "services" | "backends" | "flows" => Some(Role::Viewer),
        "backend.drain" | "backend.undrain" | "backend.weight" | "backend.enable"
        | "backend.disable" => Some(Role::Operator),
        "service.add" | "service.remove" | "backend.add" | "backend.remove" | "acl.add"
        | "acl.remove" => Some(Role::Admin),
        _ => None,
    }
}

/// Binds the socket (replacing a stale one), mode 0660, and serves it until the channel's
/// receiver is gone.
pub fn serve(path: &Path, grants: Vec<RoleGrant>, calls: mpsc::Sender<Call>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing the stale socket {}", path.display()));
        }
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("--control-socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (grants, calls) = (grants.clone(), calls.clone());
            tokio::spawn(async move {
                if let Err(e) = connection(stream, &grants, calls).await {
                    warn!(error = %e, "control connection");
                }
            });
        }
    });
    Ok(())
}

/// Largest request accepted (a request is a few hundred bytes).
const MAX_REQUEST: usize = 64 * 1024;

async fn connection(
    stream: UnixStream,
    grants: &[RoleGrant],
    calls: mpsc::Sender<Call>,
) -> anyhow::Result<()> {
    let cred = stream.peer_cred()?;
    let pid = cred.pid().unwrap_or(0) as u32;
    let actor = Actor {
        uid: cred.uid(),
        user: user_name(cred.uid()).unwrap_or_else(|| format!("uid {}", cred.uid())),
        pid,
        exe: std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    };
    let role = role_of(&actor, cred.gid(), grants);
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    reader.read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::err(Refusal::Invalid, format!("not a request: {e}")),
        Ok(request) => {
            let (tx, rx) = oneshot::channel();
            if calls
                .send(Call {
                    request,
                    actor,
                    role,
                    reply: tx,
                })
                .await
                .is_err()
            {
                Response::err(Refusal::Failed, "the daemon is stopping")
            } else {
                rx.await
                    .unwrap_or_else(|_| Response::err(Refusal::Failed, "no answer"))
            }
        }
    };
    let mut out = serde_json::to_vec(&response)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

/// root is admin; otherwise the highest role granted to the user or one of its groups.
fn role_of(actor: &Actor, gid: u32, grants: &[RoleGrant]) -> Option<Role> {
    if actor.uid == 0 {
        return Some(Role::Admin);
    }
    let groups = groups_of(&actor.user, gid);
    grants
        .iter()
        .filter(|g| match &g.principal {
            Principal::User(u) => *u == actor.user,
            Principal::Group(name) => group_id(name).is_some_and(|id| groups.contains(&id)),
        })
        .map(|g| g.role)
        .max()
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: zeroed passwd is a valid out-parameter for getpwuid_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given; the result points into `buf`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return None;
    }
    // SAFETY: on success pw_name is a NUL-terminated string inside `buf`.
    Some(
        unsafe { CStr::from_ptr(pw.pw_name) }
            .to_string_lossy()
            .into_owned(),
    )
}

fn group_id(name: &str) -> Option<u32> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: zeroed group is a valid out-parameter for getgrnam_r.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut gr,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        None
    } else {
        Some(gr.gr_gid)
    }
}

/// The user's groups, its primary group included.
fn groups_of(user: &str, gid: u32) -> Vec<u32> {
    let Ok(cuser) = CString::new(user) else {
        return vec![gid];
    };
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: `groups` holds `n` entries; getgrouplist writes at most that many.
    let rc = unsafe { libc::getgrouplist(cuser.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    if rc < 0 {
        return vec![gid];
    }
    groups.truncate(n.max(0) as usize);
    groups
}

/// Sends one request to the daemon and returns its response (for `lbctl` and tests).
pub async fn call(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (read, mut write) = stream.into_split();
    let mut out = serde_json::to_vec(request)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(read.take(16 << 20))
        .read_line(&mut line)
        .await?;
    serde_json::from_str(&line)
        .with_context(|| format!("the daemon answered something that is not a response: {line:?}"))
}

/// The socket path from `--socket`, the environment, or the default.
pub fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("LB_CONTROL_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_order() {
        let g: RoleGrant = "operator=user:ops".parse().unwrap();
        assert_eq!(
            (g.role, g.principal),
            (Role::Operator, Principal::User("ops".into()))
        );
        assert!("boss=user:x".parse::<RoleGrant>().is_err());
        assert!("admin=team:x".parse::<RoleGrant>().is_err());
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(required_role("backend.drain"), Some(Role::Operator));
        assert_eq!(required_role("rm -rf"), None);
    }

    #[test]
    fn root_is_admin_and_others_need_a_grant() {
        let root = Actor {
            uid: 0,
            user: "root".into(),
            pid: 1,
            exe: String::new(),
        };
        assert_eq!(role_of(&root, 0, &[]), Some(Role::Admin));
        let nobody = Actor {
            uid: 65534,
            user: "nobody".into(),
            pid: 1,
            exe: String::new(),
        };
        assert_eq!(role_of(&nobody, 65534, &[]), None);
        let grants = ["viewer=user:nobody".parse().unwrap()];
        assert_eq!(role_of(&nobody, 65534, &grants), Some(Role::Viewer));
    }
}
