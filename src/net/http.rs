//! The little HTTP/1.x the node speaks on its side ports (ACME HTTP-01 on 80, Prometheus metrics):
//! one request per connection, its head read with a bound on size and time, no body.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest request head read; the rest of a bigger one is not looked at.
const MAX_HEAD: usize = 8 * 1024;
/// A client that has not sent its request head by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The method and target of the request on `tcp`, or `None` when the client sent nothing usable
/// in time.
pub async fn read_request(tcp: &mut TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
            let n = tcp.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return None;
    }
    let request_line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(request_line);
    let mut parts = line.split_whitespace();
    Some((parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string()))
}

/// Sends a complete response and closes the connection. `body` is left out for HEAD, but its
/// length is still announced (RFC 9110 §9.3.2).
pub async fn respond(tcp: &mut TcpStream, head_only: bool, status: &str, content_type: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = tcp.write_all(head.as_bytes()).await;
    if !head_only {
        let _ = tcp.write_all(body).await;
    }
    let _ = tcp.shutdown().await;
}
