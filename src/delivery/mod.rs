//! Delivery: the trace headers every accepted message gets, and `remote`, the SMTP client that
//! hands queued mail to other servers. Local copies are committed by `queue::Queue::accept`,
//! together with the queue entry, and flushed before anyone is told "250".

pub mod remote;

use chrono::Utc;

use crate::net::TlsInfo;

/// What the trace headers record about the SMTP hop that brought a message.
pub struct TraceInfo<'a> {
    pub return_path: &'a str,
    pub helo: &'a str,
    pub client_ip: std::net::IpAddr,
    /// The client's forward-confirmed reverse DNS name, if it has one.
    pub client_host: Option<&'a str>,
    pub hostname: &'a str,
    /// RFC 3848 protocol keyword: SMTP, ESMTP, ESMTPS, ...
    pub protocol: &'a str,
    pub session_id: &'a str,
    pub tls: Option<&'a TlsInfo>,
    /// Named only when there is exactly one, so a message does not reveal its other recipients.
    pub single_recipient: Option<&'a str>,
}

/// `Return-Path:` (RFC 5321 §4.4, added by the delivering MTA) and `Received:` (RFC 5321 §4.4,
/// RFC 5322 §3.6.7), folded under 78 columns where it can be.
pub fn trace_headers(t: &TraceInfo<'_>) -> Vec<u8> {
    let mut h = format!("Return-Path: <{}>\r\n", t.return_path);
    // RFC 5321 §4.4 TCP-info: the verified name, if any, then the address literal.
    let tcp_info = match t.client_host {
        Some(name) => format!("{} {}", sanitize(name), bracket(t.client_ip)),
        None => bracket(t.client_ip),
    };
    h.push_str(&format!("Received: from {} ({tcp_info})\r\n", sanitize(t.helo)));
    h.push_str(&format!("\tby {} (Postern) with {} id {}", t.hostname, t.protocol, t.session_id));
    if let Some(tls) = t.tls {
        h.push_str(&format!("\r\n\t(version={} cipher={})", tls.version, tls.cipher));
    }
    if let Some(rcpt) = t.single_recipient {
        h.push_str(&format!("\r\n\tfor <{}>", sanitize(rcpt)));
    }
    h.push_str(&format!(";\r\n\t{}\r\n", Utc::now().format("%a, %d %b %Y %H:%M:%S +0000")));
    h.into_bytes()
}

fn bracket(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("[{v4}]"),
        std::net::IpAddr::V6(v6) => format!("[IPv6:{v6}]"),
    }
}

/// The client's HELO is untrusted text inside our header: keep it printable and on one line.
fn sanitize(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic() || !c.is_ascii()).take(255).collect()
}
