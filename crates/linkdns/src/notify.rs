//! The service manager's readiness protocol (`sd_notify`): with systemd's `Type=notify`, the
//! node says `READY=1` once DNS answers and the admin endpoint is up, and `STOPPING=1` when it
//! begins to stop. Without `NOTIFY_SOCKET` in the environment (not started by systemd) it does
//! nothing.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, `STOPPING=1`, `STATUS=…`, one per line) to the service manager,
/// if there is one. A failure is logged, never fatal: the node serves either way.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&socket, state) {
        tracing::warn!(error = %e, socket = %socket.to_string_lossy(), "cannot notify the service manager");
    }
}

fn send(socket: &OsStr, state: &str) -> std::io::Result<()> {
    let datagram = UnixDatagram::unbound()?;
    match socket.as_bytes().strip_prefix(b"@") {
        // An abstract socket (systemd's is a path, but the protocol allows both).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            datagram.send_to_addr(state.as_bytes(), &addr)?;
        }
        None => {
            datagram.send_to(state.as_bytes(), socket)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sends_one_datagram_to_a_path_and_to_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("linkdns-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixDatagram::bind(&path).expect("bind");
        super::send(path.as_os_str(), "READY=1").expect("send");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).expect("cleanup");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("linkdns-notify-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract");
        let listener = std::os::unix::net::UnixDatagram::bind_addr(&addr).expect("bind");
        super::send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send");
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
