//! Connections shared by the SMTP and IMAP listeners: a buffered stream that reads bounded lines,
//! upgrades to TLS in place, and a per-IP connection limiter.

mod conn;
mod limit;

pub use conn::{accept_tls, describe_tls, Conn, Line, Stream, TlsInfo};
pub use limit::{ConnGuard, ConnLimiter};

/// A TLS handshake that takes longer than this is abandoned: it holds a connection slot.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Binds a listening socket. IPv6 sockets are IPv6-only so that `0.0.0.0:25` and `[::]:25` can
/// both be listed, as operators do (Linux would otherwise let `[::]` take the IPv4 port too).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}
