//! APPEND (RFC 9051 §6.3.12) with LITERAL+ (RFC 7888), APPENDLIMIT (RFC 7889), APPENDUID
//! (RFC 4315) and MULTIAPPEND (RFC 3502). A message literal is never buffered whole: the
//! session's reader stops at the literal announcement of an APPEND (`message_literal`), and
//! `append` copies it from the connection into the store's `BlobWriter` one read block at a time.
//! The messages of a MULTIAPPEND are committed in one batch after the last one arrived.
//!
//! Bare LF line endings in the message are stored as CRLF (as Dovecot does), so FETCH serves
//! RFC 5322 line endings; the stored size is that of the converted message.
//!
//! Refusals: a synchronising literal over APPENDLIMIT gets `NO [TOOBIG]` before the continuation
//! (nothing is read, the session goes on); a refused non-synchronising literal is read and dropped
//! up to `discard_cap` (twice APPENDLIMIT), beyond that the server says BYE and closes.

use std::time::Duration;

use super::parse::{parse_request, Token};
use super::session::Reply;
use super::ImapContext;
use crate::net::{Conn, Line};
use crate::store::{BlobWriter, Flags, MessageMeta, PendingBlob, StoreError};

/// A message literal announced but not yet read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Literal {
    pub size: u64,
    pub sync: bool,
    /// RFC 6855 §4 `UTF8 (literal8)`: a `)` follows the message.
    pub close: bool,
}

impl Literal {
    /// The literal announced after `prefix` (the command text before its `{`).
    pub fn after(prefix: &[u8], size: u64, sync: bool) -> Literal {
        Literal { size, sync, close: strip_markers(prefix).1 }
    }
}

/// The text before a message literal without the markers of RFC 3516 §4.4 (`~` of a literal8,
/// which APPEND takes like any literal: the store keeps bytes) and RFC 6855 §4 (`UTF8 (`), and
/// whether the UTF8 form's `)` must follow the message.
pub(super) fn strip_markers(prefix: &[u8]) -> (&[u8], bool) {
    let p = prefix.strip_suffix(b"~").unwrap_or(prefix);
    let n = p.len();
    if n >= 6 && p[n - 6..].eq_ignore_ascii_case(b"UTF8 (") && (n == 6 || p[n - 7] == b' ') {
        return (&p[..n - 6], true);
    }
    (p, false)
}

/// Longest rest-of-line after the message literal.
const MAX_TAIL: usize = 8 * 1024;

/// The largest non-synchronising literal that is read and thrown away when refused (the client
/// is sending it anyway); beyond this the server says BYE and closes (RFC 7888 §4).
pub(super) fn discard_cap(limit: u64) -> u64 {
    limit.saturating_mul(2).max(1 << 20)
}

/// Whether a literal announced after `text` + `prefix` is an APPEND's message: the command so
/// far parses as `tag APPEND mailbox [flags] [date-time] ` with nothing else.
pub(super) fn message_literal(text: &[u8], prefix: &[u8], literals: &[Vec<u8>]) -> Option<Vec<u8>> {
    let prefix = strip_markers(prefix).0;
    let mut line = text.to_vec();
    line.extend_from_slice(prefix);
    if line.pop() != Some(b' ') {
        return None;
    }
    let req = parse_request(&line, &mut literals.to_vec()).ok()?;
    let fits = req.name == "APPEND"
        && (1..=3).contains(&req.args.len())
        && req.args[0].astring().is_some()
        && req.args[1..].iter().all(|t| matches!(t, Token::List(_) | Token::Str(_)));
    fits.then_some(line)
}

/// Reads and drops a refused non-synchronising literal and the rest of its line, and so on for
/// the further non-synchronising messages of a MULTIAPPEND (a synchronising one waits for a
/// continuation that never comes). A refused synchronising literal was never sent. At most
/// `discard_cap` bytes are skipped in all. Err: the connection must be closed.
pub(super) async fn skip(conn: &mut Conn, lit: Literal, timeout: Duration, cap: u64) -> Result<(), &'static str> {
    let mut lit = lit;
    let mut budget = cap;
    while !lit.sync {
        if lit.size > budget {
            conn.write(b"* BYE Literal too large\r\n");
            return Err("literal-too-large");
        }
        budget -= lit.size;
        let mut left = lit.size;
        while left > 0 {
            if conn.buffered().is_empty() {
                match conn.fill(timeout).await {
                    Ok(0) | Err(_) => return Err("disconnected-in-literal"),
                    Ok(_) => {}
                }
            }
            let take = (conn.buffered().len() as u64).min(left) as usize;
            conn.consume(take);
            left -= take as u64;
        }
        let tail = match conn.read_line(MAX_TAIL, timeout).await {
            Ok(Line::Ok(t)) => t,
            Ok(Line::TooLong) => return Ok(()),
            _ => return Err("disconnected"),
        };
        match super::session::literal_suffix(&tail) {
            Some((prefix, size, sync)) => lit = Literal::after(prefix, size, sync),
            None => return Ok(()),
        }
    }
    Ok(())
}

/// APPEND mailbox [flags] [date-time] literal, and MULTIAPPEND (RFC 3502): more
/// `[flags] [date-time] literal` groups on the same command, stored all together or not at all.
/// `lit` is the first message literal, which the reader left unread (None when the command had
/// none where a message belongs).
pub(super) async fn append(
    ctx: &ImapContext,
    acct: u32,
    args: &[Token],
    lit: Option<Literal>,
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let Some(lit) = lit else {
        return Err(Reply::Bad("Syntax: APPEND mailbox [(flags)] [date-time] literal".into()));
    };
    let mut pending = Vec::new();
    let result = receive(ctx, acct, args, lit, conn, &mut pending).await;
    let mbox = match result {
        Ok(mbox) => mbox,
        Err(reply) => {
            for (blob, ..) in pending {
                let _ = ctx.store.discard(blob);
            }
            return Err(reply);
        }
    };
    let (blobs, metas): (Vec<PendingBlob>, Vec<Checked>) =
        pending.into_iter().map(|(blob, flags, keywords, date)| (blob, (flags, keywords, date))).unzip();
    let items = blobs
        .into_iter()
        .zip(metas.iter().map(|(flags, keywords, date)| MessageMeta {
            flags: *flags,
            keywords,
            internal_date: date.0,
            tz_offset_minutes: date.1,
        }))
        .collect();
    let store = &ctx.store;
    let (uidvalidity, uids) = store.append_messages(acct, mbox, items).map_err(|e| match e {
        StoreError::NoSuchMailbox => Reply::No("[TRYCREATE] No such mailbox".into()),
        e => store_no(e),
    })?;
    store.sync().await.map_err(store_no)?;
    // Issue 8, durable delivery: a peer holds the messages too before the OK, or the wait ran
    // out (`[sync] ack_timeout`) and they are counted under-replicated.
    if let Some(r) = &ctx.replication {
        let placed: Vec<(u32, u32, u32)> = uids.iter().map(|&uid| (acct, mbox, uid)).collect();
        r.wait_stored(&placed).await;
    }
    Ok(Some(format!("[APPENDUID {uidvalidity} {}] APPEND completed", super::copy::uid_set(&uids))))
}

type Received = (PendingBlob, Flags, Vec<String>, (i64, i16));

/// Reads every message of the command into `pending`; returns the mailbox id.
async fn receive(
    ctx: &ImapContext,
    acct: u32,
    args: &[Token],
    first: Literal,
    conn: &mut Conn,
    pending: &mut Vec<Received>,
) -> Result<u32, Reply> {
    let cap = discard_cap(ctx.append_limit);
    let name = match args.first().and_then(Token::astring) {
        Some(name) => name,
        None => {
            skip(conn, first, ctx.idle_timeout, cap).await.map_err(Reply::Close)?;
            return Err(syntax());
        }
    };
    let mbox = match ctx.store.mailbox_id(acct, &name) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(Reply::No("[TRYCREATE] No such mailbox".into())),
        Err(e) => Err(store_no(e)),
    };
    let mut lit = first;
    let mut args = args[1..].to_vec();
    loop {
        let checked = match &mbox {
            // RFC 9208 §5.1: the whole command counts, earlier messages of a MULTIAPPEND too.
            Ok(_) => check(ctx, &args, lit).and_then(|c| {
                let earlier: u64 = pending.iter().map(|p| p.0.size).sum();
                super::quota::check(ctx, acct, earlier + lit.size).map(|()| c)
            }),
            Err(Reply::No(text)) => Err(Reply::No(text.clone())),
            Err(_) => Err(store_no(StoreError::Invalid("mailbox lookup failed"))),
        };
        let (flags, keywords, date) = match checked {
            Ok(c) => c,
            Err(reply) => {
                skip(conn, lit, ctx.idle_timeout, cap).await.map_err(Reply::Close)?;
                return Err(reply);
            }
        };
        if lit.sync {
            conn.write(b"+ Ready for literal data\r\n");
            if conn.flush().await.is_err() {
                return Err(Reply::Close("io-error"));
            }
        }
        let (blob, tail) = stream(ctx, lit, conn).await?;
        let blob = match blob {
            Ok(blob) => blob,
            Err(reply) => {
                // The store failed; later messages of the command still have to be skipped.
                if let Some((prefix, size, sync)) = super::session::literal_suffix(&tail) {
                    let next = Literal::after(prefix, size, sync);
                    skip(conn, next, ctx.idle_timeout, cap).await.map_err(Reply::Close)?;
                }
                return Err(reply);
            }
        };
        pending.push((blob, flags, keywords, date));
        if tail.is_empty() {
            return mbox;
        }
        // MULTIAPPEND: ` [flags] [date-time] literal` follows.
        let Some((prefix, size, sync)) = super::session::literal_suffix(&tail) else {
            return Err(syntax());
        };
        lit = Literal::after(prefix, size, sync);
        let mut line = b"t APPEND m".to_vec();
        line.extend_from_slice(strip_markers(prefix).0);
        let parsed = match line.pop() {
            Some(b' ') => parse_request(&line, &mut Vec::new()).ok().filter(|r| r.args.len() <= 3),
            _ => None,
        };
        let Some(req) = parsed else {
            skip(conn, lit, ctx.idle_timeout, cap).await.map_err(Reply::Close)?;
            return Err(syntax());
        };
        args = req.args[1..].to_vec();
    }
}

/// Copies one literal from the connection into a new body; then reads the rest of the line.
/// The outer error closes or refuses the command; the inner one is the store's.
async fn stream(
    ctx: &ImapContext,
    lit: Literal,
    conn: &mut Conn,
) -> Result<(Result<PendingBlob, Reply>, Vec<u8>), Reply> {
    let mut writer = ctx.store.blob_writer().map_err(store_no);
    let mut crlf = CrlfWriter::default();
    let mut left = lit.size;
    let mut failed = None;
    while left > 0 {
        if conn.buffered().is_empty() {
            match conn.fill(ctx.idle_timeout).await {
                Ok(0) | Err(_) => return Err(Reply::Close("disconnected-in-literal")),
                Ok(_) => {}
            }
        }
        let take = (conn.buffered().len() as u64).min(left) as usize;
        if let (Ok(w), None) = (&mut writer, &failed) {
            if let Err(e) = crlf.write(w, &conn.buffered()[..take]) {
                failed = Some(store_no(e));
            }
        }
        conn.consume(take);
        left -= take as u64;
    }
    let mut tail = match conn.read_line(MAX_TAIL, ctx.idle_timeout).await {
        Ok(Line::Ok(t)) => t,
        Ok(Line::TooLong) => return Err(Reply::Bad("Command line too long".into())),
        _ => return Err(Reply::Close("disconnected")),
    };
    if lit.close {
        match tail.strip_prefix(b")") {
            Some(rest) => tail = rest.to_vec(),
            None if failed.is_none() => failed = Some(syntax()),
            None => {}
        }
    }
    let blob = match (writer, failed) {
        (_, Some(reply)) | (Err(reply), _) => Err(reply),
        (Ok(w), None) => w.finish().map_err(store_no),
    };
    Ok((blob, tail))
}

fn syntax() -> Reply {
    Reply::Bad("Syntax: APPEND mailbox [(flags)] [date-time] literal".into())
}

type Checked = (Flags, Vec<String>, (i64, i16));

/// The flags, date-time and size of one message, before its literal is read.
fn check(ctx: &ImapContext, args: &[Token], lit: Literal) -> Result<Checked, Reply> {
    let (mut flags, mut keywords) = (Flags::default(), Vec::new());
    let mut date = None;
    let mut seen_flags = false;
    for arg in args {
        match arg {
            Token::List(list) if date.is_none() && !seen_flags => {
                seen_flags = true;
                for f in list {
                    let Token::Atom(a) = f else { return Err(Reply::Bad("Invalid flag".into())) };
                    if let Some(flag) = Flags::from_name(a) {
                        flags = flags.union(flag);
                    } else if a.starts_with('\\') {
                        return Err(Reply::Bad(format!("Flag {a} cannot be stored")));
                    } else if !keywords.iter().any(|k: &String| k.eq_ignore_ascii_case(a)) {
                        keywords.push(a.clone());
                    }
                }
            }
            Token::Str(s) if date.is_none() => {
                let text = std::str::from_utf8(s).map_err(|_| syntax())?;
                date = Some(parse_date_time(text).ok_or_else(|| Reply::Bad("Invalid date-time".into()))?);
            }
            _ => return Err(syntax()),
        }
    }
    if lit.size > ctx.append_limit {
        return Err(Reply::No(format!("[TOOBIG] Message larger than APPENDLIMIT={}", ctx.append_limit)));
    }
    if lit.size == 0 {
        return Err(Reply::No("Cannot store an empty message".into()));
    }
    let date = date.unwrap_or_else(|| (chrono::Utc::now().timestamp(), 0));
    Ok((flags, keywords, date))
}

/// RFC 9051 date-time: `"dd-Mon-yyyy hh:mm:ss +zzzz"` (day may be space-padded), as
/// (seconds since the epoch, offset in minutes).
pub(super) fn parse_date_time(s: &str) -> Option<(i64, i16)> {
    let t = chrono::DateTime::parse_from_str(s.trim_start(), "%d-%b-%Y %H:%M:%S %z").ok()?;
    Some((t.timestamp(), i16::try_from(t.offset().local_minus_utc() / 60).ok()?))
}

/// Writes message bytes, turning bare LF into CRLF across chunk boundaries.
#[derive(Default)]
struct CrlfWriter {
    last_cr: bool,
    out: Vec<u8>,
}

impl CrlfWriter {
    fn write(&mut self, writer: &mut BlobWriter, data: &[u8]) -> crate::store::Result<()> {
        let mut prev_cr = self.last_cr;
        let bare = data.iter().any(|&b| {
            let bare = b == b'\n' && !prev_cr;
            prev_cr = b == b'\r';
            bare
        });
        if !bare {
            if let Some(&b) = data.last() {
                self.last_cr = b == b'\r';
            }
            return writer.write(data);
        }
        self.out.clear();
        for &b in data {
            if b == b'\n' && !self.last_cr {
                self.out.push(b'\r');
            }
            self.out.push(b);
            self.last_cr = b == b'\r';
        }
        writer.write(&self.out)
    }
}

fn store_no(e: StoreError) -> Reply {
    super::session::no(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(parse_date_time("21-Nov-2026 15:40:00 +0000"), Some((1_795_275_600, 0)));
        assert_eq!(parse_date_time(" 1-Jan-2020 01:00:00 +0100"), Some((1_577_836_800, 60)));
        assert_eq!(parse_date_time("1-Jan-2020 01:00:00 -0130"), Some((1_577_836_800 + 9000, -90)));
        assert_eq!(parse_date_time("32-Jan-2020 01:00:00 +0000"), None);
        assert_eq!(parse_date_time("garbage"), None);
    }

    #[test]
    fn message_literal_position() {
        let lits = Vec::new();
        assert!(message_literal(b"", b"a APPEND INBOX ", &lits).is_some());
        assert!(message_literal(b"", b"a APPEND INBOX (\\Seen) \"1-Jan-2020 01:00:00 +0100\" ", &lits).is_some());
        assert!(message_literal(b"", b"a append \"Sent Items\" () ", &lits).is_some());
        assert!(message_literal(b"", b"a APPEND ", &lits).is_none());
        assert!(message_literal(b"", b"a LOGIN user ", &lits).is_none());
        assert!(message_literal(b"", b"a APPEND INBOX", &lits).is_none());
        assert!(message_literal(b"", b"a APPEND INBOX x ", &lits).is_none());
        // The mailbox name as a literal, then the message.
        let lits = vec![b"INBOX".to_vec()];
        assert!(message_literal(b"a APPEND \x000", b" ", &lits).is_some());
    }
}

#[cfg(test)]
mod crlf_tests {
    use super::CrlfWriter;

    #[test]
    fn bare_lf_becomes_crlf_across_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), "t", 1 << 20).unwrap();
        let input = b"a\nb\r\nc\r\n\nd\re\n";
        for split in 0..input.len() {
            let mut w = store.blob_writer().unwrap();
            let mut crlf = CrlfWriter::default();
            crlf.write(&mut w, &input[..split]).unwrap();
            crlf.write(&mut w, &input[split..]).unwrap();
            assert_eq!(w.contents().unwrap(), b"a\r\nb\r\nc\r\n\r\nd\re\r\n", "split at {split}");
        }
    }
}
