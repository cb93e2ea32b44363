//! The systemd readiness protocol (`Type=notify`): datagrams such as `READY=1` or
//! `STATUS=...` sent to the socket named by `$NOTIFY_SOCKET`. Without that variable (not
//! started by systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends one notification; errors are ignored (the daemon works without a supervisor).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let _ = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: the name after '@', with a leading NUL.
        abstract_send(&sock, name, state)
    } else {
        sock.send_to(state.as_bytes(), &path).map(drop)
    };
}

fn abstract_send(sock: &UnixDatagram, name: &[u8], state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(state.as_bytes(), &addr).map(drop)
}
