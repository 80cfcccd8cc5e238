//! The connection and the SMTP dialogue.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::reply::{Capabilities, Reply, MAX_LINE, MAX_LINES};
use super::tls::{client_config, RecordingVerifier};
use super::{ChunkSource, ClientConfig, DeliveryReport, DotStuffer, Envelope, RcptOutcome, SessionError};
use super::{TlsOutcome, TlsPolicy};

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// After a failed handshake consumed the socket.
    Closed,
}

impl Stream {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf).await,
            Stream::Tls(s) => s.read(buf).await,
            Stream::Closed => Ok(0),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(data).await,
            Stream::Tls(s) => s.write_all(data).await,
            Stream::Closed => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush().await,
            Stream::Tls(s) => s.flush().await,
            Stream::Closed => Ok(()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Plain(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
            Stream::Closed => Ok(()),
        };
    }
}

const READ_SIZE: usize = 8 * 1024;

/// An SMTP client connection. Several transactions may use it in turn; after a failed
/// transaction it sends RSET (RFC 5321 §4.1.1.5) so the next one starts clean. After an I/O
/// error, timeout or protocol error it is unusable and `send` says so.
pub struct SmtpClient {
    stream: Stream,
    /// Received, not yet consumed. Never more than one line limit plus one read.
    buf: Vec<u8>,
    start: usize,
    host: String,
    peer: SocketAddr,
    caps: Capabilities,
    tls: Option<TlsOutcome>,
    command_timeout: Duration,
    data_timeout: Duration,
    broken: bool,
    /// The first word of the greeting: the server's own name for itself (loop detection).
    greeting_name: String,
}

/// Runs `f` under `limit`, mapping expiry to `Timeout(stage)`.
async fn timed<T>(
    limit: Duration,
    stage: &'static str,
    f: impl Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    tokio::time::timeout(limit, f).await.unwrap_or(Err(SessionError::Timeout(stage)))
}

/// Addresses go into a command line: refuse anything that could end it or nest brackets.
fn check_address(a: &str) -> Result<(), SessionError> {
    if a.len() > 512 || a.chars().any(|c| c.is_control() || c == '<' || c == '>' || c == ' ') {
        return Err(SessionError::Envelope(format!("unusable address {:?}", a.escape_debug().to_string())));
    }
    Ok(())
}

impl SmtpClient {
    /// Connects and gets the session ready for MAIL: greeting, EHLO (HELO if EHLO gets 5xx,
    /// RFC 5321 §3.2), STARTTLS per policy followed by a fresh EHLO (RFC 3207 §4.2), AUTH.
    /// `host_name` is the name the certificate must match (the MX or smarthost name) and the
    /// SNI sent.
    pub async fn connect(addr: SocketAddr, host_name: &str, cfg: &ClientConfig) -> Result<SmtpClient, SessionError> {
        let tcp = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SessionError::Connect(e)),
            Err(_) => return Err(SessionError::Connect(io::Error::new(io::ErrorKind::TimedOut, "connect timeout"))),
        };
        let _ = tcp.set_nodelay(true);
        let mut client = SmtpClient {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            start: 0,
            host: host_name.to_string(),
            peer: addr,
            caps: Capabilities::default(),
            tls: None,
            command_timeout: cfg.command_timeout,
            data_timeout: cfg.data_timeout,
            broken: false,
            greeting_name: String::new(),
        };
        if cfg.tls == TlsPolicy::Implicit {
            client.start_tls(cfg, false).await?;
        }
        // RFC 5321 §4.5.3.2.1: the greeting wait is 5 minutes, like a command.
        let greeting = client.read_reply("greeting").await?;
        if greeting.code != 220 {
            client.quit_quietly().await;
            return Err(SessionError::Rejected { stage: "CONNECT", reply: greeting });
        }
        let first = greeting.lines.first().and_then(|l| l.split_whitespace().next()).unwrap_or("");
        client.greeting_name = first.trim_end_matches('.').to_ascii_lowercase();
        client.hello(cfg).await?;
        let required = matches!(cfg.tls, TlsPolicy::Required | TlsPolicy::Cluster);
        match cfg.tls {
            TlsPolicy::Opportunistic | TlsPolicy::Required | TlsPolicy::Cluster if client.caps.starttls => {
                let reply = client.command(b"STARTTLS\r\n".to_vec(), "STARTTLS").await?;
                if reply.code == 220 {
                    let lenient = matches!(cfg.tls, TlsPolicy::Opportunistic | TlsPolicy::Cluster);
                    client.start_tls(cfg, lenient).await?;
                    client.hello(cfg).await?;
                } else if required {
                    client.quit_quietly().await;
                    return Err(SessionError::Rejected { stage: "STARTTLS", reply });
                } else {
                    tracing::info!("smtp-out host={} starttls refused reply={reply}; continuing in clear", client.host);
                }
            }
            TlsPolicy::Required | TlsPolicy::Cluster => {
                client.quit_quietly().await;
                return Err(SessionError::Tls(format!("{host_name} does not offer STARTTLS")));
            }
            _ => {}
        }
        if let Some((node, secret)) = &cfg.cluster {
            client.authenticate_cluster(node, secret).await?;
        } else if let Some((user, password)) = &cfg.auth {
            client.authenticate(user, password).await?;
        }
        Ok(client)
    }

    /// The name the server gave in its greeting (lowercase).
    pub fn greeting_name(&self) -> &str {
        &self.greeting_name
    }

    /// False after an I/O error, timeout or protocol error: the connection cannot be reused.
    pub fn usable(&self) -> bool {
        !self.broken
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn tls(&self) -> Option<&TlsOutcome> {
        self.tls.as_ref()
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    async fn hello(&mut self, cfg: &ClientConfig) -> Result<(), SessionError> {
        let ehlo = self.command(format!("EHLO {}\r\n", cfg.helo).into_bytes(), "EHLO").await?;
        if ehlo.is_positive() {
            self.caps = Capabilities::from_ehlo(&ehlo);
            return Ok(());
        }
        if !ehlo.is_permanent() {
            self.quit_quietly().await;
            return Err(SessionError::Rejected { stage: "EHLO", reply: ehlo });
        }
        let helo = self.command(format!("HELO {}\r\n", cfg.helo).into_bytes(), "HELO").await?;
        if !helo.is_positive() {
            self.quit_quietly().await;
            return Err(SessionError::Rejected { stage: "HELO", reply: helo });
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    /// The TLS handshake on the current socket. Whatever was received in the clear and not yet
    /// read is dropped first: a man in the middle could have appended fake replies after the
    /// 220 that we would otherwise read as if they came over TLS (RFC 3207 §4.2).
    async fn start_tls(&mut self, cfg: &ClientConfig, lenient: bool) -> Result<(), SessionError> {
        self.buf.clear();
        self.start = 0;
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Closed) else {
            return Err(SessionError::Tls("not a plain connection".into()));
        };
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| SessionError::Tls(format!("invalid host name {:?}: {e}", self.host)))?;
        let (config, verifier): (_, Arc<RecordingVerifier>) =
            client_config(cfg.roots.clone(), lenient).map_err(|e| SessionError::Tls(e.to_string()))?;
        let handshake = TlsConnector::from(config).connect(name, tcp);
        let tls = match tokio::time::timeout(cfg.connect_timeout, handshake).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SessionError::Tls(e.to_string())),
            Err(_) => return Err(SessionError::Timeout("TLS handshake")),
        };
        let crate::net::TlsInfo { version, cipher } = crate::net::describe_tls(tls.get_ref().1);
        let verify_error = verifier.failure();
        let outcome = TlsOutcome { version, cipher, verified: verify_error.is_none(), verify_error };
        tracing::info!(
            "smtp-out host={} peer={} tls version={} cipher={} verified={} verify_error={}",
            self.host,
            self.peer,
            outcome.version,
            outcome.cipher,
            outcome.verified,
            outcome.verify_error.as_deref().unwrap_or("-")
        );
        self.tls = Some(outcome);
        self.stream = Stream::Tls(Box::new(tls));
        // RFC 3207 §4.2: forget what we learnt before TLS; the caller sends EHLO again.
        self.caps = Capabilities::default();
        Ok(())
    }

    /// AUTH PLAIN (RFC 4616) or, when only that is offered, LOGIN; never in the clear.
    async fn authenticate(&mut self, user: &str, password: &str) -> Result<(), SessionError> {
        if self.tls.is_none() {
            self.quit_quietly().await;
            return Err(SessionError::Tls("refusing to send credentials without TLS".into()));
        }
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let has = |m: &str| self.caps.auth.iter().any(|a| a == m);
        let reply = if has("PLAIN") {
            let token = b64(format!("\0{user}\0{password}").as_bytes());
            self.command(format!("AUTH PLAIN {token}\r\n").into_bytes(), "AUTH").await?
        } else if has("LOGIN") {
            let mut r = self.command(b"AUTH LOGIN\r\n".to_vec(), "AUTH").await?;
            for secret in [user, password] {
                if r.code != 334 {
                    break;
                }
                r = self.command(format!("{}\r\n", b64(secret.as_bytes())).into_bytes(), "AUTH").await?;
            }
            r
        } else {
            self.quit_quietly().await;
            return Err(SessionError::Protocol("server offers neither AUTH PLAIN nor AUTH LOGIN".into()));
        };
        if reply.code != 235 {
            if reply.code == 334 {
                // Cancel an exchange we cannot continue (RFC 4954 §4).
                let _ = self.command(b"*\r\n".to_vec(), "AUTH").await;
            }
            self.quit_quietly().await;
            return Err(SessionError::Rejected { stage: "AUTH", reply });
        }
        Ok(())
    }

    /// AUTH X-POSTERN-CLUSTER: proves we are node `node` on this very TLS session, and checks
    /// the server's proof in its 235 reply, so both ends know the other holds the secret.
    async fn authenticate_cluster(&mut self, node: &str, secret: &crate::config::Secret) -> Result<(), SessionError> {
        let binding = match &self.stream {
            Stream::Tls(s) => crate::cluster::binding(s.get_ref().1),
            _ => None,
        };
        let Some(binding) = binding else {
            self.quit_quietly().await;
            return Err(SessionError::Tls("cluster authentication needs TLS".into()));
        };
        if !self.caps.auth.iter().any(|m| m == crate::cluster::MECHANISM) {
            self.quit_quietly().await;
            return Err(SessionError::Protocol(format!(
                "{} does not offer AUTH {} (not a node of this cluster, or no cluster secret there)",
                self.host,
                crate::cluster::MECHANISM
            )));
        }
        let token = base64::engine::general_purpose::STANDARD.encode(crate::cluster::response(secret, node, &binding));
        let reply =
            self.command(format!("AUTH {} {token}\r\n", crate::cluster::MECHANISM).into_bytes(), "AUTH").await?;
        if reply.code != 235 {
            if reply.code == 334 {
                let _ = self.command(b"*\r\n".to_vec(), "AUTH").await;
            }
            self.quit_quietly().await;
            // Not permanent: a secret being rotated across the cluster must not bounce mail.
            return Err(SessionError::Protocol(format!("cluster authentication refused: {reply}")));
        }
        if !crate::cluster::check_server_proof(secret, node, &binding, &reply.lines.join(" ")) {
            self.quit_quietly().await;
            return Err(SessionError::Protocol(format!(
                "{} accepted cluster authentication without proving it holds the cluster secret",
                self.host
            )));
        }
        Ok(())
    }

    /// One transaction. Per-recipient refusals are in the report; only failures of the whole
    /// transaction are errors.
    pub async fn send(&mut self, env: &Envelope<'_>, body: impl ChunkSource) -> Result<DeliveryReport, SessionError> {
        if self.broken {
            return Err(SessionError::Protocol("connection unusable after an earlier error".into()));
        }
        let r = self.transaction(env, body).await;
        if let Err(e) = &r {
            if !matches!(e, SessionError::Rejected { .. } | SessionError::Unsupported(_) | SessionError::Envelope(_)) {
                self.broken = true;
            }
        }
        r
    }

    async fn transaction(
        &mut self,
        env: &Envelope<'_>,
        mut body: impl ChunkSource,
    ) -> Result<DeliveryReport, SessionError> {
        if env.recipients.is_empty() {
            return Err(SessionError::Envelope("no recipients".into()));
        }
        check_address(env.from)?;
        for r in env.recipients {
            check_address(r)?;
            if r.is_empty() {
                return Err(SessionError::Envelope("empty recipient".into()));
            }
        }
        // RFC 6152 §3 and RFC 6531 §3.4: without the extension the server may not take the
        // message; downgrading is not our job here, so the queue bounces (or tries another MX).
        if env.eight_bit && !self.caps.eight_bit_mime {
            return Err(SessionError::Unsupported(format!("{} does not support 8BITMIME", self.host)));
        }
        if env.smtputf8 && !self.caps.smtputf8 {
            return Err(SessionError::Unsupported(format!("{} does not support SMTPUTF8", self.host)));
        }
        if let Some(limit) = self.caps.size_limit().filter(|&l| env.size > l) {
            return Err(SessionError::Unsupported(format!(
                "message of {} bytes exceeds {}'s limit of {limit} (RFC 1870)",
                env.size, self.host
            )));
        }
        let mut mail = format!("MAIL FROM:<{}>", env.from);
        if self.caps.size.is_some() {
            mail.push_str(&format!(" SIZE={}", env.size));
        }
        if env.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");

        let mut rcpt_replies = Vec::with_capacity(env.recipients.len());
        let mail_reply;
        let data_reply;
        if self.caps.pipelining {
            // RFC 2920 §3.1: MAIL, every RCPT and DATA in one write, then all replies in order.
            let mut out = mail.into_bytes();
            for r in env.recipients {
                out.extend_from_slice(format!("RCPT TO:<{r}>\r\n").as_bytes());
            }
            out.extend_from_slice(b"DATA\r\n");
            self.write(&out).await?;
            mail_reply = self.read_reply("MAIL").await?;
            for _ in env.recipients {
                rcpt_replies.push(self.read_reply("RCPT").await?);
            }
            data_reply = Some(self.read_reply("DATA").await?);
        } else {
            mail_reply = self.command(mail.into_bytes(), "MAIL").await?;
            if !mail_reply.is_positive() {
                self.rset().await?;
                return Err(SessionError::Rejected { stage: "MAIL", reply: mail_reply });
            }
            for r in env.recipients {
                rcpt_replies.push(self.command(format!("RCPT TO:<{r}>\r\n").into_bytes(), "RCPT").await?);
            }
            data_reply = if rcpt_replies.iter().any(Reply::is_positive) {
                Some(self.command(b"DATA\r\n".to_vec(), "DATA").await?)
            } else {
                None
            };
        }
        let mail_ok = mail_reply.is_positive();
        let mut recipients: Vec<RcptOutcome> = rcpt_replies.iter().map(RcptOutcome::from_reply).collect();
        let any_accepted = mail_ok && recipients.contains(&RcptOutcome::Accepted);

        let data_reply = match data_reply {
            None => {
                self.rset().await?;
                return Ok(self.report(recipients, None));
            }
            Some(r) if r.code == 354 && !any_accepted => {
                // RFC 2920 §3.1: the server accepted DATA although nothing before it was: "the
                // client SMTP should send a single dot". It then refuses the empty transaction
                // (no recipients), and we reset.
                self.write(b".\r\n").await?;
                let _ = self.read_reply_for(self.data_timeout, "end of data").await?;
                self.rset().await?;
                if !mail_ok {
                    return Err(SessionError::Rejected { stage: "MAIL", reply: mail_reply });
                }
                return Ok(self.report(recipients, None));
            }
            Some(r) if r.code != 354 => {
                self.rset().await?;
                if !mail_ok {
                    return Err(SessionError::Rejected { stage: "MAIL", reply: mail_reply });
                }
                if !any_accepted {
                    // The DATA refusal (503/554) only follows from the RCPT refusals.
                    return Ok(self.report(recipients, None));
                }
                return Err(SessionError::Rejected { stage: "DATA", reply: r });
            }
            Some(_) => {
                self.stream_body(&mut body).await?;
                self.read_reply_for(self.data_timeout, "end of data").await?
            }
        };
        let outcome = RcptOutcome::from_reply(&data_reply);
        for r in recipients.iter_mut().filter(|r| **r == RcptOutcome::Accepted) {
            *r = outcome.clone();
        }
        Ok(self.report(recipients, Some(data_reply)))
    }

    fn report(&self, recipients: Vec<RcptOutcome>, data_reply: Option<Reply>) -> DeliveryReport {
        DeliveryReport { host: self.host.clone(), peer: self.peer, tls: self.tls.clone(), recipients, data_reply }
    }

    /// Writes the body dot-stuffed, then the terminator. A failing source leaves the
    /// transaction half-sent: the connection is dropped rather than ending the data with "."
    /// (which would deliver a truncated message).
    async fn stream_body(&mut self, body: &mut impl ChunkSource) -> Result<(), SessionError> {
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::new();
        while let Some(chunk) = body.next_chunk() {
            let chunk = chunk.map_err(SessionError::Body)?;
            out.clear();
            stuffer.stuff(chunk.as_ref(), &mut out);
            let limit = self.command_timeout;
            timed(limit, "DATA block", async { self.stream.write_all(&out).await.map_err(SessionError::Io) }).await?;
        }
        self.write(stuffer.end()).await
    }

    async fn rset(&mut self) -> Result<(), SessionError> {
        let r = self.command(b"RSET\r\n".to_vec(), "RSET").await?;
        if !r.is_positive() {
            // A server that will not reset cannot run another transaction safely.
            self.broken = true;
        }
        Ok(())
    }

    /// Says QUIT and closes; errors do not matter any more.
    pub async fn quit(mut self) {
        self.quit_quietly().await;
    }

    async fn quit_quietly(&mut self) {
        if !self.broken && self.write(b"QUIT\r\n").await.is_ok() {
            let _ = self.read_reply_for(Duration::from_secs(5).min(self.command_timeout), "QUIT").await;
        }
        self.broken = true;
        self.stream.shutdown().await;
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), SessionError> {
        let limit = self.command_timeout;
        timed(limit, "write", async {
            self.stream.write_all(data).await.map_err(SessionError::Io)?;
            self.stream.flush().await.map_err(SessionError::Io)
        })
        .await
    }

    async fn command(&mut self, line: Vec<u8>, stage: &'static str) -> Result<Reply, SessionError> {
        self.write(&line).await?;
        self.read_reply(stage).await
    }

    async fn read_reply(&mut self, stage: &'static str) -> Result<Reply, SessionError> {
        self.read_reply_for(self.command_timeout, stage).await
    }

    async fn read_reply_for(&mut self, limit: Duration, stage: &'static str) -> Result<Reply, SessionError> {
        let r = timed(limit, stage, async {
            let mut lines = Vec::new();
            loop {
                let line = self.read_line().await?;
                let last = super::reply::parse_line(&line).map(|(_, last, _)| last);
                lines.push(line);
                match last {
                    Some(true) => break,
                    Some(false) if lines.len() < MAX_LINES => {}
                    Some(false) => return Err(SessionError::Protocol(format!("{stage} reply over {MAX_LINES} lines"))),
                    None => {
                        let shown = String::from_utf8_lossy(lines.last().map_or(&[][..], |l| &l[..l.len().min(80)]))
                            .escape_debug()
                            .to_string();
                        return Err(SessionError::Protocol(format!("{stage}: malformed reply line \"{shown}\"")));
                    }
                }
            }
            Reply::parse(&lines).ok_or_else(|| SessionError::Protocol(format!("{stage}: malformed reply")))
        })
        .await;
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// One line without its CRLF, at most `MAX_LINE` bytes.
    async fn read_line(&mut self) -> Result<Vec<u8>, SessionError> {
        loop {
            let avail = &self.buf[self.start..];
            if let Some(pos) = avail.iter().position(|&b| b == b'\n') {
                if pos + 1 > MAX_LINE {
                    return Err(SessionError::Protocol("reply line too long".into()));
                }
                let mut line = avail[..pos].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.start += pos + 1;
                return Ok(line);
            }
            if avail.len() >= MAX_LINE {
                return Err(SessionError::Protocol("reply line too long".into()));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let len = self.buf.len();
            self.buf.resize(len + READ_SIZE, 0);
            let n = match self.stream.read(&mut self.buf[len..]).await {
                Ok(n) => n,
                Err(e) => {
                    self.buf.truncate(len);
                    return Err(SessionError::Io(e));
                }
            };
            self.buf.truncate(len + n);
            if n == 0 {
                return Err(SessionError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by server",
                )));
            }
        }
    }
}
