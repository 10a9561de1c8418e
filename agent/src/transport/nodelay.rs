//! Turns Nagle's algorithm off on the store's PostgreSQL sockets.
//!
//! sqlx 0.9.0 opens its sockets without `TCP_NODELAY` (launchbadge/sqlx issue 4335, fixed upstream
//! by pull request 4336, not released when this was written). With Nagle on, the tail of any
//! request longer than one TCP segment waits for the server to acknowledge the rest, and the
//! server delays that acknowledgement by up to 40 ms on Linux: every row batch the sink writes
//! (about 100 KiB) stalled for 40 ms, which bounded a pull at about 23,000 rows/s.
//!
//! sqlx gives no access to its socket, so each new connection asks the server which client port
//! it sees (`inet_client_port()`), finds the process's own TCP socket bound to that port and
//! connected to that server port, and sets `TCP_NODELAY` on it. Behind a proxy or NAT the ports
//! do not match and nothing changes (logged at debug level); over a Unix socket there is nothing
//! to do.

use sqlx::PgConnection;

/// Sets `TCP_NODELAY` on the socket of `conn` (see the module docs). Never fails the connection.
pub(crate) async fn disable_nagle(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let (client_port, server_port): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT inet_client_port(), inet_server_port()")
            .fetch_one(&mut *conn)
            .await?;
    let (Some(client_port), Some(server_port)) = (client_port, server_port) else {
        return Ok(()); // a Unix socket
    };
    let (Ok(client_port), Ok(server_port)) =
        (u16::try_from(client_port), u16::try_from(server_port))
    else {
        return Ok(());
    };
    if !set_on_socket(client_port, server_port) {
        tracing::debug!(
            client_port,
            server_port,
            "no local socket matches the PostgreSQL connection; TCP_NODELAY left unset"
        );
    }
    Ok(())
}

/// Finds the process's TCP socket from `local_port` to `peer_port` and sets `TCP_NODELAY`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_on_socket(local_port: u16, peer_port: u16) -> bool {
    use std::os::fd::{BorrowedFd, RawFd};

    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the duration of a few socket-option
        // calls and never closed here. If it was closed (or reused) since the directory was
        // read, the calls fail or look at another descriptor, whose addresses then do not match;
        // nothing is written unless they do.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let local = socket.local_addr().ok().and_then(|a| a.as_socket());
        let peer = socket.peer_addr().ok().and_then(|a| a.as_socket());
        if let (Some(local), Some(peer)) = (local, peer)
            && local.port() == local_port
            && peer.port() == peer_port
        {
            return socket.set_tcp_nodelay(true).is_ok();
        }
    }
    false
}

#[cfg(not(target_os = "linux"))]
fn set_on_socket(_local_port: u16, _peer_port: u16) -> bool {
    false
}
