//! systemd's notification protocol (`sd_notify`) for `Type=notify` units: `READY=1` with
//! `MAINPID` once the process serves (after an upgrade, the successor tells systemd it is the
//! main process now), `STOPPING=1` when it drains. Without `NOTIFY_SOCKET` it does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (`KEY=value` lines) to systemd, if it listens.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let address = match socket.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(&socket),
    };
    let sent = address
        .and_then(|address| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address));
    if let Err(e) = sent {
        tracing::warn!("cannot notify systemd ({state:?}): {e}");
    }
}

/// Tells systemd this process serves, and is the unit's main process.
pub fn ready() {
    notify(&format!("READY=1\nMAINPID={}", std::process::id()));
}
