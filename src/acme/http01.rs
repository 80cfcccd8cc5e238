//! The HTTP-01 responder on port 80 (RFC 8555 §8.3): answers
//! `GET /.well-known/acme-challenge/TOKEN` with the key authorization and 404s everything else.
//! One request per connection, bounded in size and time.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Challenges;

const MAX_REQUEST: usize = 8 * 1024;
const PREFIX: &str = "/.well-known/acme-challenge/";

pub async fn handle_connection(challenges: Challenges, mut tcp: TcpStream, peer: SocketAddr) {
    let mut buf = Vec::with_capacity(1024);
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
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
        return;
    }
    let request_line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(request_line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let answer = match target.strip_prefix(PREFIX) {
        Some(token) if method == "GET" || method == "HEAD" => challenges.http_token(token),
        _ => None,
    };
    let response = match answer {
        Some(key_authorization) => {
            tracing::info!("acme http-01 answered token={} address={}", &target[PREFIX.len()..], peer.ip());
            let body = if method == "HEAD" { String::new() } else { key_authorization.clone() };
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                key_authorization.len()
            )
        }
        None => "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: close\r\n\r\nnot found\n"
            .to_string(),
    };
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}
