//! One SMTP session: the RFC 5321 state machine. Replies are queued and sent when no further
//! pipelined command is waiting (RFC 2920), so a pipelining client gets them in one write.

mod cluster;

use std::net::SocketAddr;
use std::sync::Arc;

use super::address::Address;
use super::body::{BodyScanner, Violation, MAX_LINE};
use super::command::{self, BodyType, Command};
use super::reply::Reply;
use super::sasl::{self, Credentials, Mechanism, SaslError};
use super::submission::HeaderBuffer;
use super::{Mode, SmtpContext};
use crate::delivery::{trace_headers, TraceInfo};
use crate::net::{Conn, Line};
use crate::queue::Incoming;
use crate::routing::{Destination, RouteError};
use crate::store::BlobWriter;
use crate::store::{DeliveryTarget, QueueRecipient};

struct Transaction {
    from: Option<Address>,
    rcpts: Vec<(Address, Vec<Destination>)>,
    smtputf8: bool,
    #[allow(dead_code)]
    body: BodyType,
    /// A BDAT transfer in progress.
    chunked: Option<(BlobWriter, BodyScanner)>,
    /// Submission: the header section held back to complete it (RFC 6409 §8).
    headers: Option<HeaderBuffer>,
    /// MAIL FROM's SIZE= (RFC 1870), 0 when not given: what each recipient's quota must hold.
    declared_size: u64,
}

/// SASL responses may be longer than command lines (RFC 4954 §4).
const MAX_SASL_LINE: usize = 12 * 1024;

/// How an AUTH exchange ended early.
enum AuthEnd {
    Reply(Reply),
    Close(&'static str),
}

/// Printable, bounded: a user name from the client goes into the log.
fn log_safe(s: &str) -> String {
    s.chars().filter(|c| !c.is_control() && !c.is_whitespace()).take(128).collect()
}

pub struct Session {
    ctx: Arc<SmtpContext>,
    sid: String,
    peer: SocketAddr,
    helo: Option<String>,
    esmtp: bool,
    tx: Option<Transaction>,
    errors: usize,
    messages: u64,
    /// Forward-confirmed reverse DNS name of the client.
    client_host: Option<String>,
    mode: Mode,
    /// The authenticated user (lowercase address), submission only.
    user: Option<String>,
    /// The cluster node that authenticated on port 25 (a backup relaying to us).
    peer_node: Option<String>,
}

enum Flow {
    Continue,
    Close(&'static str),
}

impl Session {
    pub fn new(ctx: Arc<SmtpContext>, sid: String, peer: SocketAddr, mode: Mode) -> Self {
        Session {
            ctx,
            sid,
            peer,
            helo: None,
            esmtp: false,
            tx: None,
            errors: 0,
            messages: 0,
            client_host: None,
            mode,
            user: None,
            peer_node: None,
        }
    }

    fn reply(&mut self, conn: &mut Conn, r: Reply) {
        if r.is_error() && r.code != 421 {
            self.errors += 1;
        }
        let mut out = Vec::new();
        r.render(&mut out);
        conn.write(&out);
    }

    /// Runs until the client quits or the connection ends; returns why, for the log.
    pub async fn run(mut self, mut conn: Conn) -> &'static str {
        let greeting = format!("{} ESMTP Postern", self.ctx.hostname);
        self.reply(&mut conn, Reply::new(220, "", greeting));
        // The greeting goes out first; the client's first command waits at most for the lookup.
        if conn.flush().await.is_err() {
            return "io-error";
        }
        let ip = self.peer.ip();
        let limit = self.ctx.resolver.timeout() * 3;
        self.client_host =
            tokio::time::timeout(limit, super::confirmed_reverse_name(&self.ctx.resolver, ip)).await.ok().flatten();
        let host = self.client_host.as_deref().unwrap_or("<unknown>");
        if self.mode == Mode::Mx {
            tracing::info!("{} smtp connected address={ip} host={host}", self.sid);
        } else {
            tracing::info!("{} smtp connected address={ip} host={host} mode={}", self.sid, self.mode.name());
        }
        loop {
            if !conn.buffered().contains(&b'\n') && conn.flush().await.is_err() {
                return "io-error";
            }
            if self.errors >= self.ctx.settings.max_errors {
                self.reply(&mut conn, Reply::new(421, "4.7.0", "Too many errors, closing connection"));
                conn.shutdown().await;
                return "too-many-errors";
            }
            let line = match conn.read_line(MAX_LINE, self.ctx.settings.command_timeout).await {
                Ok(Line::Ok(line)) => line,
                Ok(Line::TooLong) => {
                    // RFC 5321 §4.5.3.1.4 / §4.2.2: the rest of the line was dropped.
                    self.reply(&mut conn, Reply::new(500, "5.5.2", "Line too long"));
                    continue;
                }
                Ok(Line::Eof) => return "disconnected",
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    // RFC 5321 §4.5.3.2.7: the server may close after its timeout, with a 421.
                    self.reply(&mut conn, Reply::new(421, "4.4.2", "Timeout, closing connection"));
                    conn.shutdown().await;
                    return "timeout";
                }
                Err(_) => return "io-error",
            };
            let cmd = match command::parse(&line) {
                Ok(cmd) => cmd,
                Err(r) => {
                    self.reply(&mut conn, r);
                    continue;
                }
            };
            if let Flow::Close(reason) = self.dispatch(cmd, &mut conn).await {
                conn.shutdown().await;
                return reason;
            }
        }
    }

    async fn dispatch(&mut self, cmd: Command, conn: &mut Conn) -> Flow {
        if self.tx.as_ref().is_some_and(|t| t.chunked.is_some())
            && !matches!(cmd, Command::Bdat { .. } | Command::Rset | Command::Quit | Command::Noop)
        {
            // RFC 3030 §2: only BDAT, RSET and QUIT make sense in the middle of a BDAT series.
            self.reply(conn, Reply::new(503, "5.5.1", "BDAT transfer in progress; send BDAT or RSET"));
            return Flow::Continue;
        }
        match cmd {
            Command::Ehlo(host) => {
                self.tx = None;
                self.helo = Some(host.clone());
                self.esmtp = true;
                let r = Reply::new(250, "", self.ehlo_text(&host, conn.tls().is_some()));
                self.reply(conn, r);
            }
            Command::Helo(host) => {
                self.tx = None;
                self.helo = Some(host);
                self.esmtp = false;
                let r = Reply::new(250, "", format!("{} Hello", self.ctx.hostname));
                self.reply(conn, r);
            }
            Command::StartTls => return self.starttls(conn).await,
            Command::Mail { from, size, body, smtputf8 } => {
                let r = self.mail(from, size, body, smtputf8, conn.tls().is_some());
                self.reply(conn, r);
            }
            Command::Rcpt { to } => {
                let r = self.rcpt(to);
                self.reply(conn, r);
            }
            Command::Data => return self.data(conn).await,
            Command::Bdat { size, last } => return self.bdat(conn, size, last).await,
            Command::Rset => {
                self.tx = None;
                self.reply(conn, Reply::new(250, "2.0.0", "Reset state"));
            }
            Command::Noop => self.reply(conn, Reply::new(250, "2.0.0", "OK")),
            Command::Quit => {
                self.reply(conn, Reply::new(221, "2.0.0", "Bye"));
                return Flow::Close("quit");
            }
            Command::Help => self.reply(
                conn,
                Reply::new(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY STARTTLS"),
            ),
            // RFC 5321 §3.5.3: 252 when we will not verify but will accept.
            Command::Vrfy => self.reply(
                conn,
                Reply::new(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery"),
            ),
            Command::Expn => self.reply(conn, Reply::new(502, "5.5.1", "EXPN not available")),
            Command::Auth(args) if self.mode == Mode::Mx && self.ctx.cluster.is_some() => {
                return self.cluster_auth(&args, conn).await;
            }
            Command::Auth(_) if self.mode == Mode::Mx => {
                self.reply(conn, Reply::new(502, "5.5.1", "AUTH not available on this port; use submission"))
            }
            Command::Auth(args) => return self.auth(&args, conn).await,
        }
        Flow::Continue
    }

    fn ehlo_text(&self, host: &str, tls: bool) -> String {
        let mut lines = vec![
            format!("{} Hello {} [{}]", self.ctx.hostname, host, self.peer.ip()),
            "PIPELINING".to_string(),
            format!("SIZE {}", self.ctx.settings.max_message_size),
            "8BITMIME".to_string(),
            "SMTPUTF8".to_string(),
            "ENHANCEDSTATUSCODES".to_string(),
            "CHUNKING".to_string(),
        ];
        if self.ctx.tls.is_some() && !tls {
            lines.push("STARTTLS".to_string());
        }
        // RFC 4954 §4 / RFC 8314: credentials only ever travel over TLS.
        if self.mode.is_submission() && tls {
            lines.push("AUTH PLAIN LOGIN".to_string());
        }
        if self.mode == Mode::Mx && tls && self.ctx.cluster.is_some() {
            lines.push(format!("AUTH {}", crate::cluster::MECHANISM));
        }
        lines.push("HELP".to_string());
        lines.join("\n")
    }

    async fn starttls(&mut self, conn: &mut Conn) -> Flow {
        let Some(acceptor) = self.ctx.tls.clone() else {
            self.reply(conn, Reply::new(502, "5.5.1", "STARTTLS not available"));
            return Flow::Continue;
        };
        if conn.tls().is_some() {
            self.reply(conn, Reply::new(503, "5.5.1", "TLS already active"));
            return Flow::Continue;
        }
        self.reply(conn, Reply::new(220, "2.0.0", "Ready to start TLS"));
        if conn.flush().await.is_err() {
            return Flow::Close("io-error");
        }
        match conn.start_tls(&acceptor, crate::net::TLS_HANDSHAKE_TIMEOUT).await {
            Ok(()) => {
                if let Some(info) = conn.tls() {
                    tracing::info!("{} smtp tls ciphers={} version={}", self.sid, info.cipher, info.version);
                }
                // RFC 3207 §4.2: forget everything learnt before TLS, including EHLO.
                self.helo = None;
                self.esmtp = false;
                self.tx = None;
                self.user = None;
                self.peer_node = None;
                Flow::Continue
            }
            Err(e) => {
                tracing::warn!("{} smtp tls failed error={e}", self.sid);
                Flow::Close("tls-failed")
            }
        }
    }

    fn mail(&mut self, from: Option<Address>, size: Option<u64>, body: BodyType, smtputf8: bool, tls: bool) -> Reply {
        if self.helo.is_none() {
            return Reply::new(503, "5.5.1", "Send EHLO/HELO first");
        }
        if self.tx.is_some() {
            return Reply::new(503, "5.5.1", "Nested MAIL command");
        }
        if !self.esmtp && (size.is_some() || smtputf8 || body != BodyType::SevenBit) {
            return Reply::new(555, "5.5.4", "MAIL parameters need EHLO");
        }
        if size.is_some_and(|s| s > self.ctx.settings.max_message_size) {
            // RFC 1870 §6.2.
            return Reply::new(552, "5.3.4", "Message size exceeds fixed maximum message size");
        }
        if let Some(f) = &from {
            if !smtputf8 && (!f.local.is_ascii() || !f.domain.is_ascii()) {
                return Reply::new(553, "5.6.7", "Non-ASCII address needs SMTPUTF8");
            }
        }
        let mut headers = None;
        if self.mode.is_submission() {
            if let Some(r) = self.submission_sender(from.as_ref(), tls) {
                return r;
            }
            headers = Some(HeaderBuffer::new(&self.ctx.hostname));
        }
        let declared_size = size.unwrap_or(0);
        self.tx = Some(Transaction { from, rcpts: Vec::new(), smtputf8, body, chunked: None, headers, declared_size });
        Reply::new(250, "2.1.0", "Sender OK")
    }

    /// Submission MAIL checks: TLS, AUTH, the sender policy and the hourly rate.
    fn submission_sender(&self, from: Option<&Address>, tls: bool) -> Option<Reply> {
        if !tls {
            return Some(Reply::new(530, "5.7.0", "Must issue a STARTTLS command first"));
        }
        let Some(user) = self.user.as_deref() else {
            return Some(Reply::new(530, "5.7.0", "Authentication required"));
        };
        let sub = &self.ctx.submission;
        let Some(from) = from else {
            tracing::info!("{} smtp mail refused user={user} from=<> reason=null-sender", self.sid);
            return Some(Reply::new(553, "5.7.1", "Null sender not allowed for this user"));
        };
        if !sub.may_send_as(user, &from.to_string()) {
            tracing::info!("{} smtp mail refused user={user} from=<{from}> reason=sender-not-allowed", self.sid);
            return Some(Reply::new(553, "5.7.1", "Sender address not allowed for this user"));
        }
        if !sub.rate.allowed(user, sub.max_messages_per_hour(user)) {
            tracing::info!("{} smtp mail refused user={user} from=<{from}> reason=rate-limit", self.sid);
            return Some(Reply::new(451, "4.7.1", "Sending rate limit exceeded, try again later"));
        }
        None
    }

    /// RCPT: the cluster's addresses through the router on every port; other domains are relay
    /// (refused) on port 25 and remote recipients on submission, once authenticated.
    fn rcpt(&mut self, to: Address) -> Reply {
        let submission = self.mode.is_submission();
        let user = self.user.clone();
        let limit = match (&user, submission) {
            (Some(u), true) => self.ctx.submission.max_recipients(u),
            (None, true) => return Reply::new(530, "5.7.0", "Authentication required"),
            (_, false) => self.ctx.settings.max_recipients,
        };
        // Only for the log: `user=` appears on submission.
        let who = user.as_deref().map(|u| format!(" user={u}")).unwrap_or_default();
        let Some(tx) = self.tx.as_mut() else {
            return Reply::new(503, "5.5.1", "Need MAIL before RCPT");
        };
        if tx.rcpts.len() >= limit {
            // RFC 5321 §4.5.3.1.10: 452 lets the client send the rest in another transaction.
            tracing::info!("{} smtp rcpt refused{who} to=<{to}> reason=too-many-recipients", self.sid);
            return Reply::new(452, "4.5.3", "Too many recipients");
        }
        if !tx.smtputf8 && (!to.local.is_ascii() || !to.domain.is_ascii()) {
            return Reply::new(553, "5.6.7", "Non-ASCII address needs SMTPUTF8");
        }
        match self.ctx.router.resolve(&to) {
            // A backup MX keeps no mailboxes: the recipient goes to the primaries as the
            // sender wrote it, and they expand aliases themselves.
            Ok(_) if self.ctx.role == crate::config::Role::Backup => {
                let address = to.to_string();
                tx.rcpts.push((to, vec![Destination::Forward(address)]));
                Reply::new(250, "2.1.5", "Recipient OK")
            }
            Ok(dest) => {
                if let Some(full) = self.ctx.over_quota(&dest, tx.declared_size) {
                    // RFC 3463 X.2.2 "mailbox full", temporary: the sender's queue retries while
                    // the user makes room, and nothing is bounced for a transient state.
                    tracing::info!("{} smtp rcpt refused{who} to=<{to}> reason=over-quota user={full}", self.sid);
                    return Reply::new(452, "4.2.2", "Mailbox full");
                }
                tx.rcpts.push((to, dest));
                Reply::new(250, "2.1.5", "Recipient OK")
            }
            Err(RouteError::ForeignDomain) if submission => {
                let address = to.to_string().to_lowercase();
                tx.rcpts.push((to, vec![Destination::Forward(address)]));
                Reply::new(250, "2.1.5", "Recipient OK")
            }
            Err(RouteError::ForeignDomain) => {
                tracing::info!("{} smtp rcpt refused to=<{to}> reason=relay-denied", self.sid);
                Reply::new(550, "5.7.1", "Relay access denied")
            }
            Err(RouteError::UnknownUser) => {
                if let Some(why) = self.ctx.router.srs_refusal(&to) {
                    tracing::info!("{} smtp rcpt refused{who} to=<{to}> reason=srs ({why})", self.sid);
                    return Reply::new(550, "5.7.1", format!("Invalid SRS address: {why}"));
                }
                tracing::info!("{} smtp rcpt refused{who} to=<{to}> reason=unknown-user", self.sid);
                Reply::new(550, "5.1.1", "User unknown")
            }
        }
    }

    /// AUTH (RFC 4954) on the submission ports: PLAIN and LOGIN, over TLS only.
    async fn auth(&mut self, args: &str, conn: &mut Conn) -> Flow {
        let r = if self.helo.is_none() || !self.esmtp {
            Reply::new(503, "5.5.1", "Send EHLO first")
        } else if conn.tls().is_none() {
            Reply::new(530, "5.7.0", "Must issue a STARTTLS command first")
        } else if self.user.is_some() {
            Reply::new(503, "5.5.1", "Already authenticated")
        } else if self.tx.is_some() {
            Reply::new(503, "5.5.1", "AUTH not allowed during a mail transaction")
        } else {
            match self.authenticate(args, conn).await {
                Ok(r) => r,
                Err(AuthEnd::Reply(r)) => r,
                Err(AuthEnd::Close(reason)) => return Flow::Close(reason),
            }
        };
        self.reply(conn, r);
        Flow::Continue
    }

    async fn authenticate(&mut self, args: &str, conn: &mut Conn) -> Result<Reply, AuthEnd> {
        let (mech, initial) = match sasl::parse_auth_args(args) {
            Ok(x) => x,
            Err(SaslError::UnknownMechanism) => {
                return Ok(Reply::new(504, "5.5.4", "Unrecognized authentication type"));
            }
            Err(_) => return Ok(Reply::new(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")),
        };
        let ip = self.peer.ip();
        let limiter = self.ctx.submission.auth_limiter.clone();
        let too_many = || Reply::new(454, "4.7.0", "Too many failed authentication attempts, try again later");
        if limiter.blocked(ip, None) {
            tracing::warn!("{} smtp auth user=- address={ip} result=blocked", self.sid);
            return Ok(too_many());
        }
        let creds = match mech {
            Mechanism::Plain => {
                let data = match initial {
                    Some(i) => sasl::decode_response(i).map_err(sasl_reply)?,
                    None => self.sasl_step(conn, "").await?,
                };
                sasl::decode_plain(&data).map_err(sasl_reply)?
            }
            Mechanism::Login => {
                let user = match initial {
                    Some(i) => sasl::decode_response(i).map_err(sasl_reply)?,
                    None => self.sasl_step(conn, sasl::LOGIN_USERNAME).await?,
                };
                let user = sasl::text(&user).map_err(sasl_reply)?;
                let password = self.sasl_step(conn, sasl::LOGIN_PASSWORD).await?;
                let password = sasl::text(&password).map_err(sasl_reply)?;
                Credentials { authzid: None, user, password }
            }
        };
        let name = creds.user.to_lowercase();
        let shown = log_safe(&name);
        if limiter.blocked(ip, Some(&name)) {
            tracing::warn!("{} smtp auth user={shown} address={ip} result=blocked", self.sid);
            return Ok(too_many());
        }
        let known = self.ctx.submission.users.get(&name);
        let hash = known.map(|u| u.password_hash.clone()).unwrap_or_else(dummy_hash);
        // Unknown users cost the same argon2 work, so timing does not tell them apart.
        let password_ok = crate::auth::verify_password_async(hash, creds.password).await;
        let authz_ok = creds.authzid.as_deref().is_none_or(|z| z.eq_ignore_ascii_case(&creds.user));
        if password_ok && known.is_some() && authz_ok {
            tracing::info!("{} smtp auth user={shown} result=ok", self.sid);
            self.user = Some(name);
            return Ok(Reply::new(235, "2.7.0", "Authentication successful"));
        }
        limiter.record_failure(ip, Some(&name));
        tracing::warn!("{} smtp auth user={shown} address={ip} result=failed", self.sid);
        Ok(Reply::new(535, "5.7.8", "Authentication credentials invalid"))
    }

    /// Sends a `334` challenge and reads the client's base64 answer.
    async fn sasl_step(&mut self, conn: &mut Conn, challenge: &str) -> Result<Vec<u8>, AuthEnd> {
        conn.write(format!("334 {challenge}\r\n").as_bytes());
        if conn.flush().await.is_err() {
            return Err(AuthEnd::Close("io-error"));
        }
        match conn.read_line(MAX_SASL_LINE, self.ctx.settings.command_timeout).await {
            Ok(Line::Ok(line)) => {
                let line = String::from_utf8(line).map_err(|_| sasl_reply(SaslError::BadBase64))?;
                sasl::decode_response(&line).map_err(sasl_reply)
            }
            Ok(Line::TooLong) => {
                Err(AuthEnd::Reply(Reply::new(500, "5.5.6", "Authentication exchange line is too long")))
            }
            Ok(Line::Eof) => Err(AuthEnd::Close("disconnected")),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                self.reply(conn, Reply::new(421, "4.4.2", "Timeout, closing connection"));
                Err(AuthEnd::Close("timeout"))
            }
            Err(_) => Err(AuthEnd::Close("io-error")),
        }
    }

    /// What `queue list` shows as the source of a queued message.
    fn origin(&self) -> String {
        match &self.user {
            Some(u) => format!("submission {u}"),
            None if self.ctx.role == crate::config::Role::Backup => format!("backup-mx {}", self.peer.ip()),
            None => "forward".to_string(),
        }
    }

    fn protocol(&self, tls: bool) -> &'static str {
        if self.user.is_some() || self.peer_node.is_some() {
            // RFC 3848.
            return if tls { "ESMTPSA" } else { "ESMTPA" };
        }
        match (self.esmtp, tls) {
            (false, _) => "SMTP",
            (true, false) => "ESMTP",
            (true, true) => "ESMTPS",
        }
    }

    /// A writer with the trace headers already in it.
    fn start_body(&self, conn: &Conn) -> Result<BlobWriter, Reply> {
        let tx = self.tx.as_ref().expect("checked by caller");
        let return_path = tx.from.as_ref().map(|a| a.to_string()).unwrap_or_default();
        let single = if tx.rcpts.len() == 1 { Some(tx.rcpts[0].0.to_string()) } else { None };
        let headers = trace_headers(&TraceInfo {
            return_path: &return_path,
            helo: self.helo.as_deref().unwrap_or(""),
            client_ip: self.peer.ip(),
            client_host: self.client_host.as_deref(),
            hostname: &self.ctx.hostname,
            protocol: self.protocol(conn.tls().is_some()),
            session_id: &self.sid,
            tls: conn.tls(),
            single_recipient: single.as_deref(),
        });
        let mut writer = self.ctx.queue.store().blob_writer().map_err(|e| self.local_error(e))?;
        writer.write(&headers).map_err(|e| self.local_error(e))?;
        Ok(writer)
    }

    fn local_error(&self, e: impl std::fmt::Display) -> Reply {
        tracing::error!("{} smtp store-error error={e}", self.sid);
        Reply::new(451, "4.3.0", "Local error in processing, try again later")
    }

    fn ready_for_body(&self) -> Option<Reply> {
        match &self.tx {
            None => Some(Reply::new(503, "5.5.1", "Need MAIL command")),
            Some(tx) if tx.rcpts.is_empty() => Some(Reply::new(554, "5.5.1", "No valid recipients")),
            _ => None,
        }
    }

    async fn data(&mut self, conn: &mut Conn) -> Flow {
        if let Some(r) = self.ready_for_body() {
            self.reply(conn, r);
            return Flow::Continue;
        }
        let mut writer = match self.start_body(conn) {
            Ok(w) => Some(w),
            Err(r) => {
                self.reply(conn, r);
                self.tx = None;
                return Flow::Continue;
            }
        };
        self.reply(conn, Reply::new(354, "", "End data with <CR><LF>.<CR><LF>"));
        if conn.flush().await.is_err() {
            return Flow::Close("io-error");
        }
        let mut scanner = BodyScanner::new(true, self.ctx.settings.max_message_size);
        let mut out = Vec::with_capacity(crate::store::CHUNK_SIZE);
        let mut store_error = None;
        loop {
            if conn.buffered().is_empty() {
                match conn.fill(self.ctx.settings.data_timeout).await {
                    Ok(0) => return Flow::Close("disconnected-in-data"),
                    Ok(_) => {}
                    Err(_) => {
                        self.reply(conn, Reply::new(421, "4.4.2", "Timeout waiting for data"));
                        return Flow::Close("timeout-in-data");
                    }
                }
            }
            let scan = scanner.scan(conn.buffered(), &mut out);
            conn.consume(scan.consumed);
            if let Some(w) = writer.as_mut() {
                if scanner.violation().is_some() {
                    writer = None;
                } else if !out.is_empty() {
                    let held;
                    let bytes: &[u8] = match self.tx.as_mut().and_then(|t| t.headers.as_mut()) {
                        Some(h) => {
                            held = h.feed(&out);
                            &held
                        }
                        None => &out,
                    };
                    if let Err(e) = w.write(bytes) {
                        store_error = Some(e);
                        writer = None;
                    }
                }
            }
            out.clear();
            if scan.done {
                break;
            }
        }
        let r = self.finish_body(writer, &scanner, store_error.map(|e| e.to_string())).await;
        self.reply(conn, r);
        Flow::Continue
    }

    async fn bdat(&mut self, conn: &mut Conn, size: u64, last: bool) -> Flow {
        let refusal = self.ready_for_body();
        if refusal.is_none() && self.tx.as_ref().is_some_and(|t| t.chunked.is_none()) {
            match self.start_body(conn) {
                Ok(w) => {
                    let scanner = BodyScanner::new(false, self.ctx.settings.max_message_size);
                    self.tx.as_mut().expect("checked").chunked = Some((w, scanner));
                }
                Err(r) => {
                    self.tx = None;
                    return self.skip_chunk(conn, size, r).await;
                }
            }
        }
        if let Some(r) = refusal {
            // RFC 3030 §3: the chunk is read (and dropped) even when the command is refused.
            return self.skip_chunk(conn, size, r).await;
        }
        let mut remaining = size;
        let mut out = Vec::new();
        let mut failed = None;
        while remaining > 0 {
            if conn.buffered().is_empty() {
                match conn.fill(self.ctx.settings.data_timeout).await {
                    Ok(0) => return Flow::Close("disconnected-in-data"),
                    Ok(_) => {}
                    Err(_) => return Flow::Close("timeout-in-data"),
                }
            }
            let take = (conn.buffered().len() as u64).min(remaining) as usize;
            let tx = self.tx.as_mut().expect("chunked state");
            let (writer, scanner) = tx.chunked.as_mut().expect("chunked state");
            scanner.scan(&conn.buffered()[..take], &mut out);
            conn.consume(take);
            remaining -= take as u64;
            if scanner.violation().is_none() && failed.is_none() {
                let held;
                let bytes: &[u8] = match tx.headers.as_mut() {
                    Some(h) => {
                        held = h.feed(&out);
                        &held
                    }
                    None => &out,
                };
                if let Err(e) = writer.write(bytes) {
                    failed = Some(e.to_string());
                }
            }
            out.clear();
        }
        if let Some(e) = failed {
            self.tx = None;
            let r = self.local_error(e);
            self.reply(conn, r);
            return Flow::Continue;
        }
        if !last {
            self.reply(conn, Reply::new(250, "2.0.0", format!("{size} octets received")));
            return Flow::Continue;
        }
        let (writer, mut scanner) = self.tx.as_mut().and_then(|t| t.chunked.take()).expect("chunked state");
        scanner.finish_chunked();
        let writer = if scanner.violation().is_none() { Some(writer) } else { None };
        let r = self.finish_body(writer, &scanner, None).await;
        self.reply(conn, r);
        Flow::Continue
    }

    async fn skip_chunk(&mut self, conn: &mut Conn, mut size: u64, r: Reply) -> Flow {
        while size > 0 {
            if conn.buffered().is_empty() {
                match conn.fill(self.ctx.settings.data_timeout).await {
                    Ok(0) | Err(_) => return Flow::Close("disconnected-in-data"),
                    Ok(_) => {}
                }
            }
            let take = (conn.buffered().len() as u64).min(size) as usize;
            conn.consume(take);
            size -= take as u64;
        }
        self.reply(conn, r);
        Flow::Continue
    }

    /// Ends a transaction: refuse a bad body, or store it and answer 250 once it is durable.
    async fn finish_body(
        &mut self,
        writer: Option<BlobWriter>,
        scanner: &BodyScanner,
        store_error: Option<String>,
    ) -> Reply {
        let mut tx = self.tx.take().expect("transaction");
        let from = tx.from.as_ref().map(|a| a.to_string()).unwrap_or_default();
        if let Some(e) = store_error {
            return self.local_error(e);
        }
        if let Some(v) = scanner.violation() {
            let (reply, reason) = match v {
                Violation::TooBig => {
                    (Reply::new(552, "5.3.4", "Message size exceeds fixed maximum message size"), "too-big")
                }
                Violation::LineTooLong => {
                    (Reply::new(500, "5.5.2", "Line too long (RFC 5321 §4.5.3.1.6)"), "line-too-long")
                }
                Violation::BareLineEnding => (
                    Reply::new(550, "5.6.2", "Bare CR or LF not allowed; lines must end with CRLF"),
                    "bare-line-ending",
                ),
            };
            tracing::info!("{} smtp message refused from=<{from}> size={} reason={reason}", self.sid, scanner.size());
            return reply;
        }
        let Some(mut writer) = writer else {
            return self.local_error("body writer lost");
        };
        if let Some(h) = tx.headers.as_mut() {
            let rest = h.finish();
            if let Err(e) = writer.write(&rest) {
                return self.local_error(e);
            }
            let user = self.user.as_deref().unwrap_or_default();
            let bad = h.from.iter().find(|a| !self.ctx.submission.may_send_as(user, a));
            if bad.is_some() || h.from_unreadable || (h.overflow && h.from.is_empty()) {
                let shown = log_safe(bad.map(|s| s.as_str()).unwrap_or("-"));
                tracing::info!(
                    "{} smtp message refused user={user} from=<{from}> header_from=<{shown}> reason=from-header-not-allowed",
                    self.sid
                );
                return Reply::new(553, "5.7.1", "From header address not allowed for this user");
            }
        }
        let facts = super::checks::Facts {
            mode: self.mode,
            client_ip: self.peer.ip(),
            helo: self.helo.as_deref().unwrap_or(""),
            mail_from: &from,
            sid: &self.sid,
            peer_node: self.peer_node.as_deref(),
        };
        let (writer, placement) = match super::checks::before_commit(&self.ctx, writer, &facts).await {
            Ok(done) => done,
            Err(reply) => {
                tracing::info!(
                    "{} smtp message refused from=<{from}> reason=policy reply=\"{}\"",
                    self.sid,
                    reply.text
                );
                return reply;
            }
        };
        let pending = match writer.finish() {
            Ok(p) => p,
            Err(e) => return self.local_error(e),
        };
        self.messages += 1;
        let msgid = format!("{}.{}", self.sid, self.messages);
        let mut users: Vec<String> = Vec::new();
        let mut remote: Vec<QueueRecipient> = Vec::new();
        for (rcpt, dests) in &tx.rcpts {
            for d in dests {
                match d {
                    Destination::Mailbox(u) if !users.contains(u) => users.push(u.clone()),
                    Destination::Forward(a) if !remote.iter().any(|r| &r.address == a) => {
                        let mut q = QueueRecipient::new(a.clone());
                        let asked = rcpt.to_string();
                        if !asked.eq_ignore_ascii_case(a) {
                            q.original = Some(asked);
                        }
                        remote.push(q);
                    }
                    _ => {}
                }
            }
        }
        let size = pending.size;
        let sender = self.user.clone();
        let mut local: Vec<DeliveryTarget> =
            users.iter().map(|u| DeliveryTarget { address: u, mailbox: placement.mailbox(), seen: false }).collect();
        if let Some(u) = sender.as_deref().filter(|u| self.ctx.submission.save_sent(u)) {
            local.push(DeliveryTarget { address: u, mailbox: "Sent", seen: true });
        }
        // Forwards leave with a rewritten sender (SRS) so the next hop's SPF check passes.
        let primary = self.ctx.role == crate::config::Role::Primary;
        let remote_from = match (&self.ctx.srs, self.mode) {
            (Some(srs), Mode::Mx) if primary && !remote.is_empty() => Some(srs.forward(&from)),
            _ => None,
        };
        let incoming =
            Incoming { from: &from, remote_from, local, remote, smtputf8: tx.smtputf8, origin: self.origin() };
        match self.ctx.queue.accept(pending, incoming).await {
            Ok((stored, queued)) => {
                let queued = queued.map(crate::store::queue::format_id).unwrap_or_default();
                for (rcpt, dests) in &tx.rcpts {
                    for d in dests {
                        let to = match d {
                            Destination::Mailbox(u) => {
                                let uid = stored.iter().find(|s| &s.address == u).map(|s| s.uid).unwrap_or(0);
                                format!("{u} uid={uid}")
                            }
                            Destination::Discard => "/dev/null".to_string(),
                            Destination::Forward(a) => format!("{a} queue={queued}"),
                        };
                        tracing::info!(
                            "{} delivery id={msgid} from=<{from}> to=<{rcpt}> rcpt={to} size={size} result=Ok",
                            self.sid
                        );
                    }
                }
                if let Some(u) = sender.as_deref() {
                    let sub = &self.ctx.submission;
                    sub.rate.record(u, sub.max_messages_per_hour(u));
                }
                Reply::new(250, "2.0.0", format!("Message accepted for delivery: {msgid}"))
            }
            Err(e) => self.local_error(e),
        }
    }
}

fn sasl_reply(e: SaslError) -> AuthEnd {
    AuthEnd::Reply(match e {
        SaslError::Cancelled => Reply::new(501, "5.0.0", "Authentication cancelled"),
        SaslError::BadBase64 => Reply::new(501, "5.5.2", "Invalid base64 data"),
        _ => Reply::new(501, "5.5.2", "Malformed authentication data"),
    })
}

/// A hash to verify unknown user names against (the same cost as a real one).
fn dummy_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| crate::auth::hash_password("postern-unknown-user")).clone()
}
