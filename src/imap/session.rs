//! One IMAP session: the RFC 3501 state machine (not authenticated → authenticated → selected).

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;

use super::fetch::{self, FetchItem};
use super::parse::{parse_request, parse_sequence_set, Request, Token, LITERAL_MARK};
use super::ImapContext;
use crate::net::{Conn, Line};
use crate::store::{FlagOp, Flags, StoreError};

/// Longest command line (one line; literals are counted separately).
const MAX_LINE: usize = 8 * 1024;
/// Largest total of literals in one command. APPEND (with its large literals) is not served yet.
const MAX_LITERALS: u64 = 64 * 1024;
/// Failed logins before the server hangs up.
const MAX_AUTH_FAILURES: u32 = 3;

pub(super) struct User {
    pub acct: u32,
    /// CONDSTORE/QRESYNC, once turned on (RFC 7162 §3.1).
    pub ext: super::condstore::Enabled,
    /// How mailbox names travel: modified UTF-7, or UTF-8 once enabled (RFC 6855, RFC 9051).
    pub names: super::names::Names,
    /// ENABLE IMAP4rev2 (RFC 9051 §6.3.1): rev2 responses (ESEARCH, no RECENT).
    pub rev2: bool,
}

/// The selected mailbox as this session sees it: sequence number n is `uids[n - 1]`.
pub(super) struct Selected {
    pub mbox: u32,
    pub read_only: bool,
    pub uids: Vec<u32>,
    pub modseq: u64,
    /// Expunges seen but not yet announced (none may be sent during FETCH/STORE by sequence).
    pub pending_expunge: bool,
    /// Flag changes this session made and already answered: (uid, modseq), so the next refresh
    /// does not announce them a second time.
    pub answered: std::collections::HashSet<(u32, u64)>,
    /// The SEARCHRES result (`$`, RFC 5182) as UIDs, sorted; empty at SELECT.
    pub saved: Vec<u32>,
    /// The connection's CONDSTORE/QRESYNC state (kept equal to `User::ext`).
    pub ext: super::condstore::Enabled,
}

enum State {
    NotAuthenticated,
    Authenticated(User),
    Selected(User, Selected),
}

pub(super) struct Session {
    ctx: Arc<ImapContext>,
    sid: String,
    peer: SocketAddr,
    state: State,
    auth_failures: u32,
    /// The message literal of the APPEND being executed, not yet read.
    append_literal: Option<super::append::Literal>,
}

enum Read {
    Command(Vec<u8>, Vec<Vec<u8>>),
    /// An APPEND up to its message literal, which is left unread (`append::append` streams it).
    Append(Vec<u8>, Vec<Vec<u8>>, super::append::Literal),
    /// Refused before it was complete; the reply was written.
    Refused,
    Closed(&'static str),
}

enum Outcome {
    Continue,
    Close(&'static str),
}

fn capabilities(tls: bool, append_limit: u64) -> String {
    if tls {
        format!("IMAP4rev1 IMAP4rev2 AUTH=PLAIN AUTH=LOGIN SASL-IR SPECIAL-USE CREATE-SPECIAL-USE LIST-EXTENDED LIST-STATUS CHILDREN STATUS=SIZE BINARY UNSELECT ESEARCH SEARCHRES UIDPLUS MOVE LITERAL+ MULTIAPPEND APPENDLIMIT={append_limit} IDLE ENABLE UTF8=ACCEPT CONDSTORE QRESYNC NAMESPACE ID QUOTA QUOTA=RES-STORAGE SORT THREAD=ORDEREDSUBJECT THREAD=REFERENCES COMPRESS=DEFLATE")
    } else {
        "IMAP4rev1 IMAP4rev2 STARTTLS LOGINDISABLED".to_string()
    }
}

/// A string for IMAP output: quoted when it can be, else a literal.
pub(super) fn quote(s: &str) -> String {
    if s.bytes().all(|b| (b' '..0x7f).contains(&b)) {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        format!("{{{}}}\r\n{}", s.len(), s)
    }
}

impl Session {
    pub fn new(ctx: Arc<ImapContext>, sid: String, peer: SocketAddr) -> Self {
        Session { ctx, sid, peer, state: State::NotAuthenticated, auth_failures: 0, append_literal: None }
    }

    pub async fn run(mut self, mut conn: Conn) -> &'static str {
        let greeting = format!(
            "* OK [CAPABILITY {}] {} Postern IMAP ready\r\n",
            capabilities(self.secure(&conn), self.ctx.append_limit),
            self.ctx.hostname
        );
        conn.write(greeting.as_bytes());
        loop {
            if conn.flush().await.is_err() {
                return "io-error";
            }
            let (line, mut literals, append) = match self.read_command(&mut conn).await {
                Read::Command(l, lits) => (l, lits, None),
                Read::Append(l, lits, lit) => (l, lits, Some(lit)),
                Read::Refused => continue,
                Read::Closed(why) => return why,
            };
            self.append_literal = append;
            let outcome = match parse_request(&line, &mut literals) {
                Ok(req) if !super::misc::valid_tag(&req.tag) => {
                    conn.write(b"* BAD Invalid tag\r\n");
                    Outcome::Continue
                }
                Ok(req) => self.execute(req, &mut conn).await,
                Err((tag, msg)) => {
                    let tag = tag.filter(|t| super::misc::valid_tag(t)).unwrap_or_else(|| "*".to_string());
                    conn.write(format!("{tag} BAD {msg}\r\n").as_bytes());
                    Outcome::Continue
                }
            };
            let outcome = match (outcome, self.append_literal.take()) {
                // A message literal the command did not consume (it was refused before).
                (Outcome::Continue, Some(lit)) => {
                    match super::append::skip(
                        &mut conn,
                        lit,
                        self.ctx.idle_timeout,
                        super::append::discard_cap(self.ctx.append_limit),
                    )
                    .await
                    {
                        Ok(()) => Outcome::Continue,
                        Err(why) => Outcome::Close(why),
                    }
                }
                (outcome, _) => outcome,
            };
            if let Outcome::Close(why) = outcome {
                conn.shutdown().await;
                return why;
            }
        }
    }

    /// Whether passwords may cross this connection: TLS, or loopback when the config allows
    /// plaintext there for development.
    fn secure(&self, conn: &Conn) -> bool {
        conn.tls().is_some() || (self.ctx.plaintext_on_loopback && self.peer.ip().is_loopback())
    }

    /// Reads one command, answering `{n}` literals with a continuation, within fixed bounds.
    async fn read_command(&mut self, conn: &mut Conn) -> Read {
        let mut text = Vec::new();
        let mut literals: Vec<Vec<u8>> = Vec::new();
        let mut literal_total = 0u64;
        loop {
            let line = match conn.read_line(MAX_LINE, self.ctx.idle_timeout).await {
                Ok(Line::Ok(l)) => l,
                Ok(Line::TooLong) => {
                    conn.write(b"* BAD Command line too long\r\n");
                    return Read::Refused;
                }
                Ok(Line::Eof) => return Read::Closed("disconnected"),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    // RFC 9051 §5.4: autologout after the inactivity timer.
                    conn.write(b"* BYE Autologout; idle for too long\r\n");
                    conn.shutdown().await;
                    return Read::Closed("timeout");
                }
                Err(_) => return Read::Closed("io-error"),
            };
            if line.contains(&LITERAL_MARK) {
                conn.write(b"* BAD NUL in command\r\n");
                return Read::Refused;
            }
            let Some((prefix, size, sync)) = literal_suffix(&line) else {
                text.extend_from_slice(&line);
                return Read::Command(text, literals);
            };
            if let Some(command) = super::append::message_literal(&text, prefix, &literals) {
                if !sync && size > super::append::discard_cap(self.ctx.append_limit) {
                    conn.write(b"* BYE Literal too large\r\n");
                    conn.shutdown().await;
                    return Read::Closed("literal-too-large");
                }
                return Read::Append(command, literals, super::append::Literal::after(prefix, size, sync));
            }
            literal_total = literal_total.saturating_add(size);
            if literal_total > MAX_LITERALS {
                let first: &[u8] = if text.is_empty() { &line } else { &text };
                let tag = String::from_utf8_lossy(first.split(|&b| b == b' ').next().unwrap_or(b"*")).into_owned();
                if sync {
                    // The client waits for our continuation, so it sends nothing more: the
                    // connection stays usable.
                    conn.write(format!("{tag} BAD Literal too large\r\n").as_bytes());
                    return Read::Refused;
                }
                conn.write(b"* BYE Literal too large\r\n");
                conn.shutdown().await;
                return Read::Closed("literal-too-large");
            }
            if sync {
                conn.write(b"+ Ready for literal data\r\n");
                if conn.flush().await.is_err() {
                    return Read::Closed("io-error");
                }
            }
            let mut lit = Vec::with_capacity(size as usize);
            while (lit.len() as u64) < size {
                if conn.buffered().is_empty() {
                    match conn.fill(self.ctx.idle_timeout).await {
                        Ok(0) | Err(_) => return Read::Closed("disconnected-in-literal"),
                        Ok(_) => {}
                    }
                }
                let take = (conn.buffered().len() as u64).min(size - lit.len() as u64) as usize;
                lit.extend_from_slice(&conn.buffered()[..take]);
                conn.consume(take);
            }
            text.extend_from_slice(prefix);
            text.push(LITERAL_MARK);
            text.extend_from_slice(literals.len().to_string().as_bytes());
            literals.push(lit);
        }
    }

    async fn execute(&mut self, req: Request, conn: &mut Conn) -> Outcome {
        let tag = req.tag.clone();
        let name = req.name.clone();
        let result = self.command(req, conn).await;
        if let Err(Reply::Close(why)) = result {
            if why == "too-many-auth-failures" {
                // RFC 9051 §7.1.5: BYE before the server closes the connection.
                conn.write(b"* BYE Too many failed logins\r\n");
            }
            return Outcome::Close(why);
        }
        // Untagged updates go before the tagged completion. New mail and flag changes may be
        // announced after any command; expunges not after FETCH, STORE or SEARCH by sequence
        // number (RFC 3501 §7.4.1).
        let allow_expunge = !matches!(name.as_str(), "FETCH" | "STORE" | "SEARCH" | "SORT" | "THREAD");
        match self.refresh(conn, allow_expunge) {
            Ok(true) => {}
            Ok(false) => {
                // The selected mailbox is gone: no view of it can be kept consistent.
                conn.write(b"* BYE Selected mailbox was deleted, have to disconnect\r\n");
                return Outcome::Close("mailbox-deleted");
            }
            Err(e) => tracing::error!("{} imap store-error error={e}", self.sid),
        }
        match result {
            Ok(Some(text)) => conn.write(format!("{tag} OK {text}\r\n").as_bytes()),
            Ok(None) | Err(Reply::Close(_)) => {}
            Err(Reply::No(text)) => conn.write(format!("{tag} NO {text}\r\n").as_bytes()),
            Err(Reply::Bad(text)) => conn.write(format!("{tag} BAD {text}\r\n").as_bytes()),
        }
        Outcome::Continue
    }

    async fn command(&mut self, req: Request, conn: &mut Conn) -> Result<Option<String>, Reply> {
        let mut args = req.args;
        if let Some(reply) = super::misc::precheck(&req.name, &args, matches!(self.state, State::Selected(..))) {
            return Err(reply);
        }
        if let State::Authenticated(u) | State::Selected(u, _) = &self.state {
            // Mailbox names reach the commands in the store's UTF-8.
            u.names.decode_args(&req.name, &mut args)?;
        }
        match (req.name.as_str(), &self.state) {
            ("CAPABILITY", _) => {
                let caps = capabilities(self.secure(conn), self.ctx.append_limit);
                conn.write(format!("* CAPABILITY {caps}\r\n").as_bytes());
                Ok(Some("CAPABILITY completed".into()))
            }
            ("NOOP" | "CHECK", _) => Ok(Some(format!("{} completed", req.name))),
            ("LOGOUT", _) => {
                conn.write(b"* BYE Logging out\r\n");
                conn.write(format!("{} OK LOGOUT completed\r\n", req.tag).as_bytes());
                Err(Reply::Close("logout"))
            }
            ("STARTTLS", State::NotAuthenticated) => {
                if conn.tls().is_some() {
                    return Err(Reply::Bad("TLS is already active".into()));
                }
                conn.write(format!("{} OK Begin TLS negotiation now\r\n", req.tag).as_bytes());
                if conn.flush().await.is_err() {
                    return Err(Reply::Close("io-error"));
                }
                // Anything pipelined after STARTTLS in the clear is dropped by start_tls.
                match conn.start_tls(&self.ctx.tls, crate::net::TLS_HANDSHAKE_TIMEOUT).await {
                    Ok(()) => Ok(None),
                    Err(e) => {
                        tracing::info!("{} imap tls failed error={e}", self.sid);
                        Err(Reply::Close("tls-failed"))
                    }
                }
            }
            ("LOGIN", State::NotAuthenticated) => {
                if !self.secure(conn) {
                    return Err(Reply::No("[PRIVACYREQUIRED] Use STARTTLS or port 993 first".into()));
                }
                let [user, pass] = &args[..] else { return Err(Reply::Bad("Syntax: LOGIN user password".into())) };
                let (Some(user), Some(pass)) = (user.astring(), pass.astring()) else {
                    return Err(Reply::Bad("Syntax: LOGIN user password".into()));
                };
                self.login(&user, &pass).await
            }
            ("AUTHENTICATE", State::NotAuthenticated) => self.authenticate(&args, conn).await,
            ("ID", _) => super::misc::id(&self.sid, &args, conn),
            ("LOGIN" | "AUTHENTICATE" | "STARTTLS", _) => Err(Reply::Bad("Already authenticated".into())),
            (_, State::NotAuthenticated) => Err(Reply::Bad(format!("{} needs authentication first", req.name))),
            ("APPEND", _) => {
                let (ctx, lit) = (self.ctx.clone(), self.append_literal.take());
                super::append::append(&ctx, self.user().acct, &args, lit, conn).await
            }
            ("ENABLE", State::Authenticated(_)) => {
                let State::Authenticated(u) = &mut self.state else { unreachable!("matched Authenticated") };
                super::misc::enable(&args, &mut u.ext, &mut u.names, &mut u.rev2, conn)
            }
            ("ENABLE", _) => Err(Reply::Bad("ENABLE is only valid before SELECT".into())),
            ("NAMESPACE", _) => super::misc::namespace(&args, conn),
            ("COMPRESS", _) => {
                // RFC 4978 §3: one mechanism, DEFLATE; BAD for any other, NO once active.
                let [Token::Atom(mech)] = &args[..] else { return Err(Reply::Bad("Syntax: COMPRESS DEFLATE".into())) };
                if !mech.eq_ignore_ascii_case("DEFLATE") {
                    return Err(Reply::Bad("Unknown compression mechanism".into()));
                }
                if conn.compressed() {
                    return Err(Reply::No("[COMPRESSIONACTIVE] DEFLATE active via COMPRESS".into()));
                }
                // The OK goes in the clear; everything after it, both ways, is raw DEFLATE.
                conn.write(format!("{} OK DEFLATE active\r\n", req.tag).as_bytes());
                if conn.flush().await.is_err() {
                    return Err(Reply::Close("io-error"));
                }
                match conn.start_compress() {
                    Ok(()) => Ok(None),
                    Err(_) => Err(Reply::Close("io-error")),
                }
            }
            ("GETQUOTAROOT", _) => {
                super::quota::getquotaroot(&self.ctx, self.user().acct, self.user().names, &args, conn)
            }
            ("GETQUOTA", _) => super::quota::getquota(&self.ctx, self.user().acct, &args, conn),
            ("SETQUOTA", _) => super::quota::setquota(&args),
            ("IDLE", _) => {
                if !args.is_empty() {
                    return Err(Reply::Bad("IDLE takes no arguments".into()));
                }
                let mut events = self.ctx.store.subscribe();
                let watched = match &self.state {
                    State::Selected(u, s) => Some((u.acct, s.mbox)),
                    _ => None,
                };
                conn.write(b"+ idling\r\n");
                let timeout = self.ctx.idle_timeout;
                super::idle::idle(conn, &mut events, watched, timeout, |c| self.refresh(c, true)).await
            }
            ("SELECT" | "EXAMINE", _) => self.select(&args, req.name == "EXAMINE", conn),
            ("LIST" | "LSUB", _) => {
                let u = self.user();
                super::mailboxes::list(&self.ctx.store, u.acct, u.names, &args, req.name == "LSUB", conn)
            }
            ("STATUS", _) if super::condstore::mentions(&args, "HIGHESTMODSEQ") && !self.user().ext.condstore => {
                self.enable_condstore(conn);
                super::mailboxes::status(&self.ctx.store, self.user().acct, self.user().names, &args, conn)
            }
            ("STATUS", _) => {
                super::mailboxes::status(&self.ctx.store, self.user().acct, self.user().names, &args, conn)
            }
            ("CREATE" | "DELETE" | "SUBSCRIBE" | "UNSUBSCRIBE", _) => {
                let done = super::mailboxes::mailbox_op(&self.ctx.store, self.user().acct, &req.name, &args)?;
                if let State::Selected(u, s) = &self.state {
                    if req.name == "DELETE" && self.ctx.store.mailbox(u.acct, s.mbox).map_err(no)?.is_none() {
                        // The session deleted its own selected mailbox: it is closed, and the
                        // session goes on in the authenticated state (BYE is for other sessions
                        // that had it selected).
                        if u.ext.qresync || u.rev2 {
                            conn.write(b"* OK [CLOSED] Mailbox deleted\r\n");
                        }
                        let State::Selected(user, _) = std::mem::replace(&mut self.state, State::NotAuthenticated)
                        else {
                            unreachable!("matched Selected")
                        };
                        self.state = State::Authenticated(user);
                    }
                }
                Ok(done)
            }
            ("RENAME", _) if args.first().and_then(Token::astring).is_some_and(|n| n.eq_ignore_ascii_case("INBOX")) => {
                super::misc::rename_inbox(&self.ctx.store, self.user().acct, &args)
            }
            ("RENAME", _) => super::mailboxes::rename(&self.ctx.store, self.user().acct, &args),
            (_, State::Authenticated(_)) => Err(Reply::Bad(format!("{} needs a selected mailbox", req.name))),
            ("FETCH", _) => self.fetch(&args, false, conn).await,
            ("STORE", _) => self.store(&args, false, conn),
            ("SEARCH", _) => {
                if super::condstore::mentions(&args, "MODSEQ") {
                    self.enable_condstore(conn);
                }
                let store = self.ctx.store.clone();
                let (user, sel) = self.selected();
                super::search::search(store, user.acct, user.rev2, sel, &args, false, &req.tag, conn).await
            }
            ("SORT" | "THREAD", _) => {
                let store = self.ctx.store.clone();
                let (user, sel) = self.selected();
                super::sort::run_command(&req.name, store, user.acct, sel, &args, false, conn).await
            }
            ("COPY" | "MOVE", _) => self.copy(&args, false, req.name == "MOVE", conn),
            ("UID", _) => {
                let sub = match args.first() {
                    Some(Token::Atom(a)) => a.to_ascii_uppercase(),
                    _ => return Err(Reply::Bad("Syntax: UID FETCH|STORE ...".into())),
                };
                match sub.as_str() {
                    "FETCH" => self.fetch(&args[1..], true, conn).await,
                    "STORE" => self.store(&args[1..], true, conn),
                    "SEARCH" => {
                        if super::condstore::mentions(&args, "MODSEQ") {
                            self.enable_condstore(conn);
                        }
                        let store = self.ctx.store.clone();
                        let (user, sel) = self.selected();
                        super::search::search(store, user.acct, user.rev2, sel, &args[1..], true, &req.tag, conn).await
                    }
                    "SORT" | "THREAD" => {
                        let store = self.ctx.store.clone();
                        let (user, sel) = self.selected();
                        super::sort::run_command(&sub, store, user.acct, sel, &args[1..], true, conn).await
                    }
                    "COPY" | "MOVE" => self.copy(&args[1..], true, sub == "MOVE", conn),
                    "EXPUNGE" => {
                        let store = self.ctx.store.clone();
                        let (user, sel) = self.selected();
                        super::copy::uid_expunge(&store, user.acct, sel, &args[1..], conn)
                    }
                    _ => Err(Reply::Bad(format!("UID {sub} is not supported"))),
                }
            }
            ("EXPUNGE", _) => {
                self.expunge_deleted()?;
                Ok(Some("EXPUNGE completed".into()))
            }
            ("CLOSE" | "UNSELECT", _) => {
                if req.name == "CLOSE" && !self.selected().1.read_only {
                    // RFC 3501 §6.4.2: CLOSE expunges silently (RFC 9051 §6.4.1: not after EXAMINE).
                    self.expunge_deleted()?;
                }
                let State::Selected(user, _) = std::mem::replace(&mut self.state, State::NotAuthenticated) else {
                    unreachable!("matched Selected")
                };
                self.state = State::Authenticated(user);
                Ok(Some(format!("{} completed", req.name)))
            }
            _ => Err(Reply::Bad(format!("Unknown command {}", req.name))),
        }
    }

    fn user(&self) -> &User {
        match &self.state {
            State::Authenticated(u) | State::Selected(u, _) => u,
            State::NotAuthenticated => unreachable!("checked by command()"),
        }
    }

    async fn login(&mut self, user: &str, pass: &str) -> Result<Option<String>, Reply> {
        let address = user.to_lowercase();
        let ip = self.peer.ip();
        let shown: String = address.chars().take(128).map(|c| if c.is_control() { '?' } else { c }).collect();
        let limiter = self.ctx.auth_limiter.clone();
        if limiter.blocked(ip, Some(&address)) {
            // Past the limit the password is not even checked: guessing gains nothing.
            tracing::warn!("{} imap login blocked user={shown} address={ip}", self.sid);
            self.auth_failures += 1;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if self.auth_failures >= MAX_AUTH_FAILURES {
                return Err(Reply::Close("too-many-auth-failures"));
            }
            return Err(Reply::No("[UNAVAILABLE] Too many failed logins, try again later".into()));
        }
        let hash = self.ctx.users.get(&address).cloned();
        // Unknown users cost the same time as known ones: no user enumeration by timing.
        let ok = match hash {
            Some(h) => crate::auth::verify_password_async(h, pass.to_string()).await,
            None => {
                let dummy = DUMMY_HASH.get_or_init(|| crate::auth::hash_password("dummy")).clone();
                crate::auth::verify_password_async(dummy, pass.to_string()).await;
                false
            }
        };
        if !ok {
            self.auth_failures += 1;
            limiter.record_failure(ip, Some(&address));
            tracing::warn!("{} imap login failed user={shown} address={ip}", self.sid);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            if self.auth_failures >= MAX_AUTH_FAILURES {
                return Err(Reply::Close("too-many-auth-failures"));
            }
            return Err(Reply::No("[AUTHENTICATIONFAILED] Authentication failed".into()));
        }
        let acct = self.ctx.store.ensure_account(&address).map_err(no)?;
        tracing::info!("{} imap login user={shown} address={ip}", self.sid);
        self.state =
            State::Authenticated(User { acct, ext: Default::default(), names: Default::default(), rev2: false });
        Ok(Some(format!("[CAPABILITY {}] Logged in", capabilities(true, self.ctx.append_limit))))
    }

    /// AUTHENTICATE PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login), with an initial
    /// response (SASL-IR, RFC 4959) or without.
    async fn authenticate(&mut self, args: &[Token], conn: &mut Conn) -> Result<Option<String>, Reply> {
        if !self.secure(conn) {
            return Err(Reply::No("[PRIVACYREQUIRED] Use STARTTLS or port 993 first".into()));
        }
        let mech = args.first().and_then(Token::astring).unwrap_or_default().to_ascii_uppercase();
        if mech != "PLAIN" && mech != "LOGIN" {
            return Err(Reply::No("Unsupported authentication mechanism".into()));
        }
        let initial = match args.get(1) {
            Some(t) => Some(decode_sasl(&t.astring().unwrap_or_default())?),
            None => None,
        };
        if mech == "LOGIN" {
            let user = match initial {
                Some(u) => u,
                None => self.sasl_step(conn, "VXNlcm5hbWU6").await?, // "Username:"
            };
            let pass = self.sasl_step(conn, "UGFzc3dvcmQ6").await?; // "Password:"
            let (Ok(user), Ok(pass)) = (String::from_utf8(user), String::from_utf8(pass)) else {
                return Err(Reply::Bad("Malformed LOGIN response".into()));
            };
            return self.login(&user, &pass).await;
        }
        let decoded = match initial {
            Some(d) => d,
            None => self.sasl_step(conn, "").await?,
        };
        let parts: Vec<&[u8]> = decoded.split(|&b| b == 0).collect();
        let [authz, authc, pass] = parts[..] else { return Err(Reply::Bad("Malformed PLAIN response".into())) };
        let (Ok(authz), Ok(authc), Ok(pass)) =
            (std::str::from_utf8(authz), std::str::from_utf8(authc), std::str::from_utf8(pass))
        else {
            return Err(Reply::Bad("Malformed PLAIN response".into()));
        };
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(authc) {
            return Err(Reply::No("[AUTHORIZATIONFAILED] Cannot act as another user".into()));
        }
        self.login(authc, pass).await
    }

    /// One SASL round trip: the challenge (base64) out, the client's decoded response in.
    async fn sasl_step(&mut self, conn: &mut Conn, challenge: &str) -> Result<Vec<u8>, Reply> {
        conn.write(format!("+ {challenge}\r\n").as_bytes());
        if conn.flush().await.is_err() {
            return Err(Reply::Close("io-error"));
        }
        match conn.read_line(MAX_LINE, self.ctx.idle_timeout).await {
            Ok(Line::Ok(l)) => decode_sasl(&String::from_utf8_lossy(&l)),
            Ok(Line::TooLong) => Err(Reply::Bad("Response too long".into())),
            _ => Err(Reply::Close("disconnected")),
        }
    }

    fn select(&mut self, args: &[Token], read_only: bool, conn: &mut Conn) -> Result<Option<String>, Reply> {
        let name = args.first().and_then(Token::astring).ok_or_else(|| Reply::Bad("Syntax: SELECT mailbox".into()))?;
        let params = super::condstore::select_params(&args[1..]).map_err(|e| Reply::Bad(e.into()))?;
        if params.qresync.is_some() && !self.user().ext.qresync {
            // RFC 7162 §3.2.5: QRESYNC without ENABLE QRESYNC first.
            return Err(Reply::Bad("QRESYNC parameter needs ENABLE QRESYNC first".into()));
        }
        // RFC 3501 §6.3.1: a failed SELECT leaves no mailbox selected.
        let mut user = match std::mem::replace(&mut self.state, State::NotAuthenticated) {
            State::Authenticated(u) => u,
            State::Selected(u, _) => {
                if u.ext.qresync || u.rev2 {
                    // RFC 7162 §3.2.11, RFC 9051 §6.3.2: what follows is about the newly
                    // selected mailbox.
                    conn.write(b"* OK [CLOSED] Previous mailbox closed\r\n");
                }
                u
            }
            State::NotAuthenticated => unreachable!("checked by command()"),
        };
        // RFC 7162 §3.1: SELECT (CONDSTORE) is CONDSTORE-enabling.
        user.ext.condstore |= params.condstore;
        let store = &self.ctx.store;
        let info = store.mailbox_by_name(user.acct, &name);
        let info = match info {
            Ok(Some(i)) => i,
            Ok(None) => {
                self.state = State::Authenticated(user);
                return Err(Reply::No("[NONEXISTENT] No such mailbox".into()));
            }
            Err(e) => {
                self.state = State::Authenticated(user);
                return Err(no(e));
            }
        };
        let uids = store.uids(user.acct, info.id).map_err(no)?;
        let m = &info.mailbox;
        conn.write(b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)\r\n");
        let perm = if read_only { "" } else { "\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*" };
        conn.write(format!("* OK [PERMANENTFLAGS ({perm})] Flags permitted\r\n").as_bytes());
        conn.write(format!("* {} EXISTS\r\n", uids.len()).as_bytes());
        if user.rev2 {
            // RFC 9051 §6.3.2: a LIST response for the mailbox instead of RECENT and UNSEEN.
            conn.write(format!("* LIST () \"/\" {}\r\n", user.names.show(&m.name)).as_bytes());
        } else {
            conn.write(b"* 0 RECENT\r\n");
        }
        conn.write(format!("* OK [UIDVALIDITY {}] UIDs valid\r\n", m.uidvalidity).as_bytes());
        conn.write(format!("* OK [UIDNEXT {}] Predicted next UID\r\n", m.uidnext).as_bytes());
        if m.unseen > 0 && !user.rev2 {
            // A store error here only loses the hint; the SELECT itself has succeeded.
            if let Ok(Some(n)) = super::misc::first_unseen(store, user.acct, info.id) {
                conn.write(format!("* OK [UNSEEN {n}] First unseen\r\n").as_bytes());
            }
        }
        // RFC 7162 §3.1.2.1: every successful SELECT/EXAMINE of a mailbox with persistent
        // mod-sequences says HIGHESTMODSEQ, CONDSTORE enabled or not.
        let highest = super::condstore::highest(store, m);
        conn.write(format!("* OK [HIGHESTMODSEQ {highest}] Highest\r\n").as_bytes());
        let selected = Selected {
            mbox: info.id,
            read_only,
            uids,
            modseq: m.highest_modseq,
            pending_expunge: false,
            answered: std::collections::HashSet::new(),
            saved: Vec::new(),
            ext: user.ext,
        };
        let uidvalidity = m.uidvalidity;
        self.state = State::Selected(user, selected);
        if let Some(q) = params.qresync.filter(|q| q.uidvalidity == uidvalidity) {
            let store = self.ctx.store.clone();
            let (user, sel) = self.selected();
            super::condstore::resync(&store, user.acct, sel, &q, conn).map_err(no)?;
        }
        Ok(Some(if read_only {
            "[READ-ONLY] EXAMINE completed".into()
        } else {
            "[READ-WRITE] SELECT completed".into()
        }))
    }

    /// RFC 7162 §3.1: a CONDSTORE-enabling command turns CONDSTORE on for the rest of the
    /// connection; with a mailbox selected, the client learns its HIGHESTMODSEQ at once.
    fn enable_condstore(&mut self, conn: &mut Conn) {
        let store = &self.ctx.store;
        match &mut self.state {
            State::Authenticated(u) => u.ext.condstore = true,
            State::Selected(u, s) if !s.ext.condstore => {
                u.ext.condstore = true;
                s.ext.condstore = true;
                let highest = super::condstore::shown(store, s.modseq.max(1));
                conn.write(format!("* OK [HIGHESTMODSEQ {highest}] Highest\r\n").as_bytes());
            }
            _ => {}
        }
    }

    fn selected(&mut self) -> (&User, &mut Selected) {
        match &mut self.state {
            State::Selected(u, s) => (u, s),
            _ => unreachable!("checked by command()"),
        }
    }

    async fn fetch(&mut self, args: &[Token], uid: bool, conn: &mut Conn) -> Result<Option<String>, Reply> {
        let (Some(Token::Atom(set)), Some(items), 2..=3) = (args.first(), args.get(1), args.len()) else {
            return Err(Reply::Bad("Syntax: FETCH set items [(modifiers)]".into()));
        };
        let mut items = FetchItem::parse_list(items).map_err(|e| Reply::Bad(e.into()))?;
        let mods = super::condstore::fetch_modifiers(args.get(2)).map_err(|e| Reply::Bad(e.into()))?;
        if mods.vanished && !(uid && self.user().ext.qresync && mods.changed_since.is_some()) {
            // RFC 7162 §3.2.6: only UID FETCH with CHANGEDSINCE, once QRESYNC is enabled.
            return Err(Reply::Bad("VANISHED needs UID FETCH, CHANGEDSINCE and ENABLE QRESYNC".into()));
        }
        if mods.changed_since.is_some() || items.contains(&FetchItem::ModSeq) {
            self.enable_condstore(conn);
        }
        let store = self.ctx.store.clone();
        let (user, sel) = self.selected();
        let mut targets = resolve_set(sel, set, uid)?;
        super::condstore::changed_since(&store, user.acct, sel, set, &mods, &mut targets, &mut items, conn)
            .map_err(no)?;
        fetch::fetch(&store, user.acct, sel, &targets, &items, uid, conn).await.map_err(no)?;
        Ok(Some(format!("{}FETCH completed", if uid { "UID " } else { "" })))
    }

    fn store(&mut self, args: &[Token], uid: bool, conn: &mut Conn) -> Result<Option<String>, Reply> {
        let (args, unchanged_since) = super::condstore::store_modifiers(args).map_err(|e| Reply::Bad(e.into()))?;
        if unchanged_since.is_some() {
            // RFC 7162 §3.1: STORE UNCHANGEDSINCE is CONDSTORE-enabling.
            self.enable_condstore(conn);
        }
        let [Token::Atom(set), Token::Atom(what), flags] = &args[..] else {
            return Err(Reply::Bad("Syntax: STORE set [+|-]FLAGS[.SILENT] (flags)".into()));
        };
        let what = what.to_ascii_uppercase();
        let silent = what.ends_with(".SILENT");
        let op = match what.trim_end_matches(".SILENT") {
            "FLAGS" => FlagOp::Replace,
            "+FLAGS" => FlagOp::Add,
            "-FLAGS" => FlagOp::Remove,
            _ => return Err(Reply::Bad("Syntax: STORE set [+|-]FLAGS[.SILENT] (flags)".into())),
        };
        let list: Vec<&Token> = match flags {
            Token::List(l) => l.iter().collect(),
            t => vec![t],
        };
        let (mut sys, mut keywords) = (Flags::default(), Vec::new());
        for f in list {
            let Token::Atom(a) = f else { return Err(Reply::Bad("Invalid flag".into())) };
            if let Some(flag) = Flags::from_name(a) {
                sys = sys.union(flag);
            } else if a.starts_with('\\') {
                return Err(Reply::Bad(format!("Flag {a} cannot be stored")));
            } else {
                keywords.push(a.clone());
            }
        }
        let store = self.ctx.store.clone();
        let (user, sel) = self.selected();
        if sel.read_only {
            return Err(Reply::No("[READ-ONLY] Mailbox is read-only".into()));
        }
        let targets = resolve_set(sel, set, uid)?;
        let uids: Vec<u32> = targets.iter().map(|&(_, u)| u).collect();
        // RFC 7162 §3.1.3: another node's modseq becomes 0, so every message is MODIFIED (plan §2.5).
        let unchanged_since = match unchanged_since {
            Some(m) => Some(super::condstore::from_client(&store, user.acct, sel.mbox, m).map_err(no)?.modseq),
            None => None,
        };
        let (changed, modified) = store
            .store_flags_unchanged_since(user.acct, sel.mbox, &uids, op, sys, &keywords, unchanged_since)
            .map_err(no)?;
        let modified: std::collections::HashSet<u32> = modified.into_iter().collect();
        sel.answered.extend(changed.iter().map(|(u, e)| (*u, e.modseq)));
        let mut changed: std::collections::HashMap<u32, crate::store::Entry> = changed.into_iter().collect();
        for (seq, uid_v) in &targets {
            if modified.contains(uid_v) {
                continue;
            }
            // RFC 7162 §3.1.3: a conditional STORE reports every change, .SILENT or not.
            let entry = match changed.remove(uid_v) {
                Some(e) => e,
                None if silent => continue,
                None => match store.entry(user.acct, sel.mbox, *uid_v).map_err(no)? {
                    Some(e) => e,
                    None => continue,
                },
            };
            if silent && unchanged_since.is_none() {
                continue;
            }
            let uid_part = if uid { format!("UID {uid_v} ") } else { String::new() };
            let modseq = super::condstore::modseq_item(&store, sel.ext, &entry);
            conn.write(
                format!("* {seq} FETCH ({uid_part}FLAGS ({}){modseq})\r\n", fetch::flag_list(&entry)).as_bytes(),
            );
        }
        if !modified.is_empty() {
            // RFC 7162 §3.1.3: the messages not stored, by UID for UID STORE.
            let mut nums: Vec<u32> =
                targets.iter().filter(|(_, u)| modified.contains(u)).map(|&(s, u)| if uid { u } else { s }).collect();
            nums.sort_unstable();
            let set = super::copy::uid_set(&nums);
            return Ok(Some(format!("[MODIFIED {set}] Conditional {}STORE failed", if uid { "UID " } else { "" })));
        }
        Ok(Some(format!("{}STORE completed", if uid { "UID " } else { "" })))
    }

    fn copy(&mut self, args: &[Token], uid: bool, mv: bool, conn: &mut Conn) -> Result<Option<String>, Reply> {
        let ctx = self.ctx.clone();
        let (user, sel) = self.selected();
        super::copy::copy(&ctx, user.acct, sel, args, uid, mv, conn)
    }

    fn expunge_deleted(&mut self) -> Result<(), Reply> {
        let store = self.ctx.store.clone();
        let (user, sel) = self.selected();
        if sel.read_only {
            return Err(Reply::No("[READ-ONLY] Mailbox is read-only".into()));
        }
        let deleted = store.deleted_uids(user.acct, sel.mbox).map_err(no)?;
        store.expunge(user.acct, sel.mbox, &deleted).map_err(no)?;
        Ok(())
    }

    /// Announces what changed in the selected mailbox since this session last looked; false when
    /// the mailbox no longer exists.
    fn refresh(&mut self, conn: &mut Conn, allow_expunge: bool) -> Result<bool, StoreError> {
        let store = self.ctx.store.clone();
        let State::Selected(user, sel) = &mut self.state else { return Ok(true) };
        let Some(mailbox) = store.mailbox(user.acct, sel.mbox)? else { return Ok(false) };
        if mailbox.highest_modseq == sel.modseq && !(allow_expunge && sel.pending_expunge) {
            return Ok(true);
        }
        let current = store.uids(user.acct, sel.mbox)?;
        let flag_changes = store.changed_since(user.acct, sel.mbox, sel.modseq)?;
        if allow_expunge {
            // Announce in ascending order, adjusting for each removal (RFC 3501 §7.4.1).
            let mut seq = 1usize;
            let mut kept = Vec::with_capacity(sel.uids.len());
            let mut vanished = Vec::new();
            for &u in &sel.uids {
                if current.binary_search(&u).is_ok() {
                    kept.push(u);
                    seq += 1;
                } else if sel.ext.qresync {
                    vanished.push(u);
                } else {
                    conn.write(format!("* {seq} EXPUNGE\r\n").as_bytes());
                }
            }
            if !vanished.is_empty() {
                // RFC 7162 §3.2.10: with QRESYNC, VANISHED replaces EXPUNGE.
                conn.write(super::condstore::vanished_line(&vanished, false).as_bytes());
            }
            sel.uids = kept;
            sel.pending_expunge = false;
        } else if sel.uids.iter().any(|u| current.binary_search(u).is_err()) {
            sel.pending_expunge = true;
        }
        let max_known = sel.uids.last().copied().unwrap_or(0);
        let known_len = sel.uids.len();
        sel.uids.extend(current.iter().copied().filter(|&u| u > max_known));
        if sel.uids.len() != known_len {
            conn.write(format!("* {} EXISTS\r\n", sel.uids.len()).as_bytes());
        }
        for uid in flag_changes {
            if uid > max_known {
                continue;
            }
            if let Ok(pos) = sel.uids.binary_search(&uid) {
                if let Some(e) = store.entry(user.acct, sel.mbox, uid)? {
                    if sel.answered.contains(&(uid, e.modseq)) {
                        continue;
                    }
                    let modseq = super::condstore::modseq_item(&store, sel.ext, &e);
                    conn.write(
                        format!("* {} FETCH (UID {uid} FLAGS ({}){modseq})\r\n", pos + 1, fetch::flag_list(&e))
                            .as_bytes(),
                    );
                }
            }
        }
        sel.modseq = mailbox.highest_modseq;
        sel.answered.clear();
        Ok(true)
    }
}

static DUMMY_HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub(super) enum Reply {
    No(String),
    Bad(String),
    Close(&'static str),
}

pub(super) fn no(e: StoreError) -> Reply {
    match e {
        StoreError::NoSuchMailbox => Reply::No("[NONEXISTENT] No such mailbox".into()),
        StoreError::MailboxExists => Reply::No("[ALREADYEXISTS] Mailbox already exists".into()),
        // A text that carries its own response code (FETCH BINARY's `[UNKNOWN-CTE]`) keeps it.
        StoreError::Invalid(why) if why.starts_with('[') => Reply::No(why.into()),
        StoreError::Invalid(why) => Reply::No(format!("[CANNOT] {why}")),
        e => {
            tracing::error!("imap store-error error={e}");
            Reply::No("[SERVERBUG] Internal error, try again later".into())
        }
    }
}

/// A SASL response: base64, `=` for an empty one (RFC 4959), `*` to cancel (RFC 9051 §6.2.2).
fn decode_sasl(response: &str) -> Result<Vec<u8>, Reply> {
    match response.trim() {
        "*" => Err(Reply::Bad("Authentication cancelled".into())),
        "=" => Ok(Vec::new()),
        r => base64::engine::general_purpose::STANDARD.decode(r).map_err(|_| Reply::Bad("Invalid base64".into())),
    }
}

/// Lives with the tokeniser, where the fuzz target reaches it.
pub(super) use super::parse::literal_suffix;

/// (sequence number, UID) pairs named by a set, in sequence order.
pub(super) fn resolve_set(sel: &Selected, set: &str, uid: bool) -> Result<Vec<(u32, u32)>, Reply> {
    let bad = || Reply::Bad("Invalid message set".into());
    if set == "$" {
        // RFC 5182 §2.1: the saved result, by SEQUENCE or UID alike; expunged messages have
        // left it; an empty result names no message and is not an error.
        return Ok(sel
            .uids
            .iter()
            .enumerate()
            .filter(|(_, u)| sel.saved.binary_search(u).is_ok())
            .map(|(i, &u)| (i as u32 + 1, u))
            .collect());
    }
    if uid {
        let max = sel.uids.last().copied().unwrap_or(0);
        let ranges = parse_sequence_set(set, max.max(1)).ok_or_else(bad)?;
        Ok(sel
            .uids
            .iter()
            .enumerate()
            .filter(|(_, &u)| super::parse::in_set(&ranges, u))
            .map(|(i, &u)| (i as u32 + 1, u))
            .collect())
    } else {
        let n = sel.uids.len() as u32;
        let ranges = parse_sequence_set(set, n).ok_or_else(bad)?;
        if n == 0 || ranges.iter().any(|&(_, b)| b > n) {
            return Err(Reply::Bad("Invalid message sequence number".into()));
        }
        let mut out: Vec<(u32, u32)> = Vec::new();
        for seq in 1..=n {
            if super::parse::in_set(&ranges, seq) {
                out.push((seq, sel.uids[seq as usize - 1]));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_suffixes() {
        assert_eq!(literal_suffix(b"a LOGIN {5}"), Some((&b"a LOGIN "[..], 5, true)));
        assert_eq!(literal_suffix(b"a LOGIN {5+}"), Some((&b"a LOGIN "[..], 5, false)));
        assert_eq!(literal_suffix(b"a LOGIN {4000000000}"), Some((&b"a LOGIN "[..], 4_000_000_000, true)));
        assert_eq!(literal_suffix(b"a LOGIN {}"), None);
        assert_eq!(literal_suffix(b"a LOGIN {99999999999999999999}"), None);
    }
}
