//! Outbound SMTP client: hands a stored message to a remote MX or a smarthost.
//!
//! One [`SmtpClient`] is one connection: greeting, EHLO (HELO fallback), STARTTLS or implicit
//! TLS per [`TlsPolicy`], optional AUTH, then any number of transactions via
//! [`SmtpClient::send`]. The body is streamed from a [`ChunkSource`] with dot-stuffing done on
//! the fly, so a large message never sits whole in memory.
//!
//! Transfer is always `DATA`. CHUNKING (RFC 3030) is recognised in [`Capabilities`] but not
//! used: DATA works everywhere, and our bodies are already CRLF-clean, so BDAT would only save
//! the dot-stuffing pass.
//!
//! Outcomes are per recipient ([`RcptOutcome`], in envelope order) so the queue can retry the
//! 4xx ones and bounce the 5xx ones; whole-transaction failures are [`SessionError`]s with
//! [`SessionError::is_permanent`] telling the two apart.

mod client;
mod reply;
mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use client::SmtpClient;
pub use reply::{Capabilities, Reply, MAX_LINE, MAX_LINES};

/// How to use TLS with a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// STARTTLS when offered; the certificate is verified, but a failure is only recorded in
    /// the report (RFC 7435 opportunistic security: unauthenticated encryption still beats
    /// plain text, which is the only alternative for MX delivery without DANE/MTA-STS).
    Opportunistic,
    /// STARTTLS must be offered and the certificate must verify (smarthosts, MTA-STS enforce).
    Required,
    /// TLS from the first byte (submissions/smtps, port 465, RFC 8314 §3.3); verified.
    Implicit,
    /// STARTTLS must be offered; the certificate may be self-signed because the cluster
    /// secret authenticates both ends (`crate::cluster`): the hop between our own nodes.
    Cluster,
    /// Never TLS.
    Disabled,
}

pub struct ClientConfig {
    /// Our host name, sent in EHLO/HELO.
    pub helo: String,
    /// Trust anchors for certificate verification.
    pub roots: Arc<rustls::RootCertStore>,
    /// TCP connect and TLS handshake.
    pub connect_timeout: Duration,
    /// Each command reply and each body write (RFC 5321 §4.5.3.2: 5 minutes for most).
    pub command_timeout: Duration,
    /// The reply to the final "." (RFC 5321 §4.5.3.2.6: 10 minutes).
    pub data_timeout: Duration,
    pub tls: TlsPolicy,
    /// User and password for AUTH PLAIN (LOGIN if only that is offered); sent only over TLS.
    pub auth: Option<(String, String)>,
    /// This node's name and the cluster secret: AUTH X-POSTERN-CLUSTER (with `TlsPolicy::Cluster`).
    pub cluster: Option<(String, crate::config::Secret)>,
}

impl ClientConfig {
    /// RFC 5321 §4.5.3.2 timeouts, opportunistic TLS, no AUTH.
    pub fn new(helo: impl Into<String>, roots: Arc<rustls::RootCertStore>) -> Self {
        ClientConfig {
            helo: helo.into(),
            roots,
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            tls: TlsPolicy::Opportunistic,
            auth: None,
            cluster: None,
        }
    }
}

/// One transaction's envelope.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// Reverse path without brackets; "" for the null sender (bounces).
    pub from: &'a str,
    pub recipients: &'a [String],
    /// Body size in bytes, announced with SIZE= (RFC 1870).
    pub size: u64,
    /// The body has 8-bit bytes: needs BODY=8BITMIME (RFC 6152).
    pub eight_bit: bool,
    /// Non-ASCII addresses or headers: needs SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    Accepted,
    Temporary(Reply),
    Permanent(Reply),
}

impl RcptOutcome {
    fn from_reply(r: &Reply) -> RcptOutcome {
        if r.is_positive() {
            RcptOutcome::Accepted
        } else if r.is_permanent() {
            RcptOutcome::Permanent(r.clone())
        } else {
            RcptOutcome::Temporary(r.clone())
        }
    }
}

/// The TLS state of a connection, for logs, Received headers and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOutcome {
    pub version: String,
    pub cipher: String,
    /// The certificate chained to `roots` and matched the host name.
    pub verified: bool,
    /// Why it did not (opportunistic mode only; required mode fails instead).
    pub verify_error: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DeliveryReport {
    pub host: String,
    pub peer: SocketAddr,
    pub tls: Option<TlsOutcome>,
    /// Same order as the envelope's recipients. Recipients accepted at RCPT take the outcome
    /// of the reply to the final ".".
    pub recipients: Vec<RcptOutcome>,
    /// The reply to the final "." (None when no recipient was accepted).
    pub data_reply: Option<Reply>,
}

impl DeliveryReport {
    pub fn all_accepted(&self) -> bool {
        self.recipients.iter().all(|r| *r == RcptOutcome::Accepted)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// TCP connect failed: try another host or later.
    #[error("connect failed: {0}")]
    Connect(io::Error),
    /// The connection broke during the session.
    #[error("connection error: {0}")]
    Io(io::Error),
    #[error("timeout during {0}")]
    Timeout(&'static str),
    /// The server said something that is not SMTP.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A command that concerns the whole transaction (or session) was refused: greeting
    /// ("CONNECT"), "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "DATA".
    #[error("{stage} refused: {reply}")]
    Rejected { stage: &'static str, reply: Reply },
    #[error("TLS: {0}")]
    Tls(String),
    /// The message needs an extension the server lacks (8BITMIME, SMTPUTF8) or exceeds its
    /// SIZE: retrying the same server cannot help (RFC 6152 §3, RFC 6531 §3.4, RFC 1870 §6).
    #[error("server cannot take this message: {0}")]
    Unsupported(String),
    /// The envelope cannot be sent (empty, or an address that would break the command line).
    #[error("invalid envelope: {0}")]
    Envelope(String),
    /// Reading the body from the store failed; the transaction was abandoned mid-DATA.
    #[error("reading the message body: {0}")]
    Body(io::Error),
}

impl SessionError {
    /// True when the queue should bounce rather than retry.
    pub fn is_permanent(&self) -> bool {
        match self {
            SessionError::Rejected { reply, .. } => reply.is_permanent(),
            SessionError::Unsupported(_) | SessionError::Envelope(_) => true,
            SessionError::Connect(_)
            | SessionError::Io(_)
            | SessionError::Timeout(_)
            | SessionError::Protocol(_)
            | SessionError::Tls(_)
            | SessionError::Body(_) => false,
        }
    }
}

/// Where the body comes from, chunk by chunk. Chunk boundaries may fall anywhere, even
/// between CR and LF or right before a line's leading dot.
pub trait ChunkSource {
    type Chunk: AsRef<[u8]>;
    fn next_chunk(&mut self) -> Option<io::Result<Self::Chunk>>;
}

/// A stored body, read one store chunk at a time.
impl ChunkSource for crate::store::BlobReader {
    type Chunk = sled::IVec;
    fn next_chunk(&mut self) -> Option<io::Result<sled::IVec>> {
        self.next().map(|r| r.map_err(io::Error::other))
    }
}

/// An in-memory body, as one chunk.
impl<'a> ChunkSource for &'a [u8] {
    type Chunk = &'a [u8];
    fn next_chunk(&mut self) -> Option<io::Result<&'a [u8]>> {
        let s = std::mem::take(self);
        (!s.is_empty()).then_some(Ok(s))
    }
}

/// Any iterator of chunks.
pub struct IterSource<I>(pub I);

impl<I, C> ChunkSource for IterSource<I>
where
    I: Iterator<Item = io::Result<C>>,
    C: AsRef<[u8]>,
{
    type Chunk = C;
    fn next_chunk(&mut self) -> Option<io::Result<C>> {
        self.0.next()
    }
}

/// Dot-stuffing (RFC 5321 §4.5.2) across chunk boundaries: the state that matters is only
/// whether the next byte starts a line, and how the body ended so far.
#[derive(Debug, Clone)]
pub(crate) struct DotStuffer {
    at_line_start: bool,
    last_two: [u8; 2],
    len: u64,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer { at_line_start: true, last_two: [0, 0], len: 0 }
    }
}

impl DotStuffer {
    pub(crate) fn stuff(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + 8);
        let mut rest = chunk;
        while !rest.is_empty() {
            if self.at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            // Copy up to and including the next LF in one go.
            let end = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |p| p + 1);
            out.extend_from_slice(&rest[..end]);
            self.at_line_start = rest[end - 1] == b'\n';
            rest = &rest[end..];
        }
        match chunk {
            [] => {}
            [b] => self.last_two = [self.last_two[1], *b],
            [.., a, b] => self.last_two = [*a, *b],
        }
        self.len += chunk.len() as u64;
    }

    /// The terminator: the body must end with CRLF before the "." line (RFC 5321 §4.1.1.4).
    pub(crate) fn end(&self) -> &'static [u8] {
        if self.len == 0 || self.last_two == *b"\r\n" {
            b".\r\n"
        } else if self.last_two[1] == b'\r' {
            b"\n.\r\n"
        } else {
            b"\r\n.\r\n"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stuff_all(chunks: &[&[u8]]) -> Vec<u8> {
        let mut s = DotStuffer::default();
        let mut out = Vec::new();
        for c in chunks {
            s.stuff(c, &mut out);
        }
        out.extend_from_slice(s.end());
        out
    }

    #[test]
    fn stuffing_across_boundaries() {
        let whole: &[u8] = b".a\r\nb\r\n.\r\n..c\r\nd.e\r\n";
        let want: &[u8] = b"..a\r\nb\r\n..\r\n...c\r\nd.e\r\n.\r\n";
        assert_eq!(stuff_all(&[whole]), want);
        // Every split point, including between CR and LF and right before a dot.
        for i in 0..=whole.len() {
            assert_eq!(stuff_all(&[&whole[..i], &whole[i..]]), want, "split at {i}");
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(stuff_all(&bytes), want);
    }

    #[test]
    fn terminator() {
        assert_eq!(stuff_all(&[]), b".\r\n");
        assert_eq!(stuff_all(&[b"x"]), b"x\r\n.\r\n");
        assert_eq!(stuff_all(&[b"x\r"]), b"x\r\n.\r\n");
        assert_eq!(stuff_all(&[b"x\r", b"\n"]), b"x\r\n.\r\n");
        assert_eq!(stuff_all(&[b"x\r\n", b""]), b"x\r\n.\r\n");
    }
}
