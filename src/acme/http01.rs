//! The HTTP-01 responder on port 80 (RFC 8555 §8.3): answers
//! `GET /.well-known/acme-challenge/TOKEN` with the key authorization and 404s everything else.
//! One request per connection, bounded in size and time.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::Challenges;
use crate::net::http;

const PREFIX: &str = "/.well-known/acme-challenge/";

pub async fn handle_connection(challenges: Challenges, mut tcp: TcpStream, peer: SocketAddr) {
    let Some((method, target)) = http::read_request(&mut tcp).await else { return };
    let head = method == "HEAD";
    let answer = match target.strip_prefix(PREFIX) {
        Some(token) if method == "GET" || head => challenges.http_token(token),
        _ => None,
    };
    match answer {
        Some(key_authorization) => {
            tracing::info!("acme http-01 answered token={} address={}", &target[PREFIX.len()..], peer.ip());
            http::respond(&mut tcp, head, "200 OK", "application/octet-stream", key_authorization.as_bytes()).await;
        }
        None => http::respond(&mut tcp, head, "404 Not Found", "text/plain", b"not found\n").await,
    }
}
