//! Connections shared by the SMTP and IMAP listeners: a buffered stream that reads bounded lines,
//! upgrades to TLS in place, and a per-IP connection limiter.

mod compress;
mod conn;
pub mod http;
mod limit;

pub use conn::{accept_tls, describe_tls, Conn, Filled, Line, Stream, TlsInfo};
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

/// The addresses of this machine's network interfaces (getifaddrs, on Linux and the BSDs
/// alike), for recognising ourselves in an MX list when listening on a wildcard address.
pub fn interface_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list that we only read and then free with freeifaddrs; each
    // ifa_addr is checked for null and read according to its family.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(std::net::IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(std::net::IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}
