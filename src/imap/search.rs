//! SEARCH and UID SEARCH (RFC 9051 §6.4.4, RFC 3501 §6.4.4), with the ESEARCH result form
//! (RFC 4731, `RETURN (MIN MAX COUNT ALL)`), CHARSET, and the MODSEQ key of RFC 7162 §3.1.5
//! (against each message's modseq; the store keeps no per-flag modseq).
//!
//! The program is parsed from the session's tokens into a `Key` tree, then evaluated on the
//! blocking pool against a snapshot of the session's view (its sequence numbers). Flag, size,
//! date and UID keys use only the index entries; a message body is read only when a key needs
//! it and the cheap keys have not already decided. Header keys match the decoded value
//! (RFC 2047 words, address display names), BODY and TEXT the decoded text parts (transfer
//! encoding and charset, HTML turned into text), never raw base64; all case-insensitively, as
//! substrings.

use std::sync::Arc;

use chrono::{FixedOffset, NaiveDate, TimeZone};
use mail_parser::{Address, HeaderName, HeaderValue, Message, MessageParser, PartType};

use super::parse::{in_set, parse_sequence_set, Token};
use super::session::{quote, Reply, Selected};
use crate::net::Conn;
use crate::store::{Entry, Flags, Store};

/// Deepest nesting of NOT, OR and parentheses accepted; bounds recursion on hostile input.
const MAX_DEPTH: usize = 100;
/// Nested message/rfc822 parts searched into.
const MAX_MESSAGE_DEPTH: usize = 8;
/// Charsets we advertise in BADCHARSET; any other name mail-parser knows is accepted too.
const BADCHARSET: &str = "[BADCHARSET (UTF-8 US-ASCII)] Unknown charset";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DateKind {
    Internal,
    Sent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DateCmp {
    Before,
    On,
    Since,
}

/// One search key. Text arguments are kept lowercased, as UTF-8.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Key {
    All,
    /// A sequence set, and its ranges once resolved against the view.
    Seq(String, Vec<(u32, u32)>),
    Uid(String, Vec<(u32, u32)>),
    /// A system flag set (true) or not set (false).
    Flag(Flags, bool),
    Keyword(String, bool),
    /// `\Recent`: no session gets it here (SELECT answers `0 RECENT`), so never true.
    Recent,
    Larger(u64),
    Smaller(u64),
    Date(DateKind, DateCmp, NaiveDate),
    /// Field name (lowercase) and value; an empty value matches the field's presence.
    Header(String, String),
    Body(String),
    Text(String),
    ModSeq(u64),
    Not(Box<Key>),
    Or(Box<Key>, Box<Key>),
    And(Vec<Key>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReturnOpt {
    Min,
    Max,
    Count,
    All,
    /// SEARCHRES (RFC 5182): keep the result for `$`.
    Save,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Program {
    /// `None`: a plain `* SEARCH` answer; `Some`: ESEARCH with these items.
    pub ret: Option<Vec<ReturnOpt>>,
    pub key: Key,
}

/// What a search needs from the message itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Need {
    Nothing,
    Headers,
    Body,
}

type Decoder = fn(&[u8]) -> String;

/// Why a program was refused: BAD (syntax) or NO (an unknown charset).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ParseError {
    Bad(String),
    BadCharset,
}

impl From<ParseError> for Reply {
    fn from(e: ParseError) -> Reply {
        match e {
            ParseError::Bad(m) => Reply::Bad(m),
            ParseError::BadCharset => Reply::No(BADCHARSET.into()),
        }
    }
}

fn bad<T>(m: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError::Bad(m.into()))
}

impl Program {
    /// `[RETURN (opts)] [CHARSET name] key...` (RFC 4731 §3, RFC 9051 §6.4.4).
    pub fn parse(args: &[Token]) -> Result<Program, ParseError> {
        let mut i = 0;
        let mut ret = None;
        if atom_is(args.first(), "RETURN") {
            let Some(Token::List(opts)) = args.get(1) else { return bad("Syntax: SEARCH RETURN (options) keys") };
            let mut v = Vec::new();
            for o in opts {
                let Token::Atom(a) = o else { return bad("Invalid RETURN option") };
                let opt = match a.to_ascii_uppercase().as_str() {
                    "MIN" => ReturnOpt::Min,
                    "MAX" => ReturnOpt::Max,
                    "COUNT" => ReturnOpt::Count,
                    "ALL" => ReturnOpt::All,
                    "SAVE" => ReturnOpt::Save,
                    _ => return bad(format!("Unknown RETURN option {a}")),
                };
                if !v.contains(&opt) {
                    v.push(opt);
                }
            }
            if v.is_empty() {
                v.push(ReturnOpt::All);
            }
            ret = Some(v);
            i = 2;
        }
        let mut decoder: Option<Decoder> = None;
        if atom_is(args.get(i), "CHARSET") {
            let Some(name) = args.get(i + 1).and_then(Token::astring) else {
                return bad("Syntax: SEARCH CHARSET name keys");
            };
            let upper = name.to_ascii_uppercase();
            if !matches!(upper.as_str(), "UTF-8" | "UTF8" | "US-ASCII" | "ASCII") {
                decoder = Some(
                    mail_parser::decoders::charsets::map::charset_decoder(name.as_bytes())
                        .ok_or(ParseError::BadCharset)?,
                );
            }
            i += 2;
        }
        let rest = &args[i..];
        if rest.is_empty() {
            return bad("Syntax: SEARCH needs at least one search key");
        }
        let mut p = KeyParser { toks: rest, pos: 0, decoder };
        let mut keys = Vec::new();
        while p.pos < rest.len() {
            keys.push(p.key(0)?);
        }
        let key = if keys.len() == 1 { keys.pop().expect("one key") } else { Key::And(keys) };
        Ok(Program { ret, key })
    }
}

fn atom_is(t: Option<&Token>, word: &str) -> bool {
    matches!(t, Some(Token::Atom(a)) if a.eq_ignore_ascii_case(word))
}

struct KeyParser<'a> {
    toks: &'a [Token],
    pos: usize,
    decoder: Option<Decoder>,
}

impl KeyParser<'_> {
    fn next(&mut self) -> Option<&Token> {
        let t = self.toks.get(self.pos)?;
        self.pos += 1;
        Some(t)
    }

    /// A string argument (astring), converted from the CHARSET to UTF-8 and lowercased.
    fn string(&mut self, key: &str) -> Result<String, ParseError> {
        let decoder = self.decoder;
        let bytes: &[u8] = match self.next() {
            Some(Token::Atom(a)) => a.as_bytes(),
            Some(Token::Str(s)) => s,
            Some(Token::Nil) => b"NIL",
            _ => return bad(format!("{key} needs a string argument")),
        };
        let text = match decoder {
            Some(d) => d(bytes),
            None => String::from_utf8_lossy(bytes).into_owned(),
        };
        Ok(text.to_lowercase())
    }

    fn atom(&mut self, key: &str) -> Result<String, ParseError> {
        match self.next() {
            Some(Token::Atom(a)) => Ok(a.clone()),
            _ => bad(format!("{key} needs an atom argument")),
        }
    }

    fn number(&mut self, key: &str) -> Result<u64, ParseError> {
        match self.next() {
            Some(Token::Atom(a)) if !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()) => {
                a.parse().or_else(|_| bad(format!("{key}: number too large")))
            }
            _ => bad(format!("{key} needs a number")),
        }
    }

    fn date(&mut self, key: &str) -> Result<NaiveDate, ParseError> {
        let text = match self.next() {
            Some(Token::Atom(a)) => a.clone(),
            Some(Token::Str(s)) => String::from_utf8_lossy(s).into_owned(),
            _ => return bad(format!("{key} needs a date")),
        };
        parse_date(&text).ok_or_else(|| ParseError::Bad(format!("{key}: invalid date {text}")))
    }

    fn set(&mut self, key: &str) -> Result<String, ParseError> {
        let s = self.atom(key)?;
        check_set(&s)?;
        Ok(s)
    }

    fn key(&mut self, depth: usize) -> Result<Key, ParseError> {
        if depth >= MAX_DEPTH {
            return bad("Search program nested too deeply");
        }
        let tok = match self.next() {
            Some(t) => t.clone(),
            None => return bad("Missing search key"),
        };
        let name = match tok {
            Token::List(items) => {
                if items.is_empty() {
                    return bad("Empty parenthesised search key");
                }
                let mut sub = KeyParser { toks: &items, pos: 0, decoder: self.decoder };
                let mut keys = Vec::new();
                while sub.pos < items.len() {
                    keys.push(sub.key(depth + 1)?);
                }
                return Ok(if keys.len() == 1 { keys.pop().expect("one key") } else { Key::And(keys) });
            }
            Token::Atom(a) => a,
            _ => return bad("Invalid search key"),
        };
        if name.starts_with(|c: char| c.is_ascii_digit() || c == '*' || c == '$') {
            check_set(&name)?;
            // The saved result holds messages, not numbers: it is matched by UID.
            if name == "$" {
                return Ok(Key::Uid(name, Vec::new()));
            }
            return Ok(Key::Seq(name, Vec::new()));
        }
        let upper = name.to_ascii_uppercase();
        let flag = |f: Flags, set: bool| Ok(Key::Flag(f, set));
        match upper.as_str() {
            "ALL" => Ok(Key::All),
            "ANSWERED" => flag(Flags::ANSWERED, true),
            "DELETED" => flag(Flags::DELETED, true),
            "DRAFT" => flag(Flags::DRAFT, true),
            "FLAGGED" => flag(Flags::FLAGGED, true),
            "SEEN" => flag(Flags::SEEN, true),
            "UNANSWERED" => flag(Flags::ANSWERED, false),
            "UNDELETED" => flag(Flags::DELETED, false),
            "UNDRAFT" => flag(Flags::DRAFT, false),
            "UNFLAGGED" => flag(Flags::FLAGGED, false),
            "UNSEEN" => flag(Flags::SEEN, false),
            "RECENT" => Ok(Key::Recent),
            "OLD" => Ok(Key::Not(Box::new(Key::Recent))),
            "NEW" => Ok(Key::And(vec![Key::Recent, Key::Flag(Flags::SEEN, false)])),
            "KEYWORD" | "UNKEYWORD" => {
                let kw = self.atom(&upper)?;
                let set = upper == "KEYWORD";
                Ok(match Flags::from_name(&kw) {
                    Some(f) => Key::Flag(f, set),
                    None => Key::Keyword(kw, set),
                })
            }
            "LARGER" => Ok(Key::Larger(self.number(&upper)?)),
            "SMALLER" => Ok(Key::Smaller(self.number(&upper)?)),
            "BEFORE" => Ok(Key::Date(DateKind::Internal, DateCmp::Before, self.date(&upper)?)),
            "ON" => Ok(Key::Date(DateKind::Internal, DateCmp::On, self.date(&upper)?)),
            "SINCE" => Ok(Key::Date(DateKind::Internal, DateCmp::Since, self.date(&upper)?)),
            "SENTBEFORE" => Ok(Key::Date(DateKind::Sent, DateCmp::Before, self.date(&upper)?)),
            "SENTON" => Ok(Key::Date(DateKind::Sent, DateCmp::On, self.date(&upper)?)),
            "SENTSINCE" => Ok(Key::Date(DateKind::Sent, DateCmp::Since, self.date(&upper)?)),
            "BCC" | "CC" | "FROM" | "SUBJECT" | "TO" => {
                Ok(Key::Header(upper.to_ascii_lowercase(), self.string(&upper)?))
            }
            "HEADER" => {
                let field = self.string(&upper)?;
                if field.is_empty() || !field.bytes().all(|b| b > b' ' && b < 0x7f && b != b':') {
                    return bad("HEADER needs a field name");
                }
                Ok(Key::Header(field, self.string(&upper)?))
            }
            "BODY" => Ok(Key::Body(self.string(&upper)?)),
            "TEXT" => Ok(Key::Text(self.string(&upper)?)),
            "UID" => Ok(Key::Uid(self.set(&upper)?, Vec::new())),
            "MODSEQ" => {
                // RFC 7162: MODSEQ [entry-name entry-type] value; the entry is accepted and
                // ignored (the message's modseq covers every flag).
                if matches!(self.toks.get(self.pos), Some(Token::Str(_))) {
                    self.pos += 1;
                    let t = self.atom(&upper)?.to_ascii_lowercase();
                    if !matches!(t.as_str(), "priv" | "shared" | "all") {
                        return bad("MODSEQ entry type must be priv, shared or all");
                    }
                }
                Ok(Key::ModSeq(self.number(&upper)?))
            }
            "NOT" => Ok(Key::Not(Box::new(self.key(depth + 1)?))),
            "OR" => {
                let a = self.key(depth + 1)?;
                let b = self.key(depth + 1)?;
                Ok(Key::Or(Box::new(a), Box::new(b)))
            }
            _ => bad(format!("Unknown search key {name}")),
        }
    }
}

fn check_set(s: &str) -> Result<(), ParseError> {
    // RFC 5182 §2.1: `$` stands alone; it is not combined with other sets.
    if s == "$" {
        return Ok(());
    }
    match parse_sequence_set(s, 1) {
        Some(_) => Ok(()),
        None => bad(format!("Invalid sequence set {s}")),
    }
}

/// RFC 9051 `date`: `d-Mon-yyyy` or `dd-Mon-yyyy` (the quotes are gone by now).
pub(super) fn parse_date(s: &str) -> Option<NaiveDate> {
    let mut parts = s.split('-');
    let (d, m, y) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || d.is_empty() || d.len() > 2 || y.len() != 4 {
        return None;
    }
    if !d.bytes().chain(y.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    let month = MONTHS.iter().position(|n| n.eq_ignore_ascii_case(m))? as u32 + 1;
    NaiveDate::from_ymd_opt(y.parse().ok()?, month, d.parse().ok()?)
}

impl Key {
    fn need(&self) -> Need {
        match self {
            Key::Header(..) => Need::Headers,
            Key::Date(DateKind::Sent, ..) => Need::Headers,
            Key::Body(_) | Key::Text(_) => Need::Body,
            Key::Not(k) => k.need(),
            Key::Or(a, b) => a.need().max(b.need()),
            Key::And(v) => v.iter().map(Key::need).max().unwrap_or(Need::Nothing),
            _ => Need::Nothing,
        }
    }

    /// The key with every MODSEQ value as this node's store modseq.
    fn local_modseqs(
        self,
        f: &impl Fn(u64) -> Result<super::condstore::Since, crate::store::StoreError>,
    ) -> Result<Key, crate::store::StoreError> {
        Ok(match self {
            Key::ModSeq(m) => Key::ModSeq(f(m)?.modseq),
            Key::Not(k) => Key::Not(Box::new(k.local_modseqs(f)?)),
            Key::Or(a, b) => Key::Or(Box::new(a.local_modseqs(f)?), Box::new(b.local_modseqs(f)?)),
            Key::And(v) => Key::And(v.into_iter().map(|k| k.local_modseqs(f)).collect::<Result<_, _>>()?),
            k => k,
        })
    }

    fn has_modseq(&self) -> bool {
        match self {
            Key::ModSeq(_) => true,
            Key::Not(k) => k.has_modseq(),
            Key::Or(a, b) => a.has_modseq() || b.has_modseq(),
            Key::And(v) => v.iter().any(Key::has_modseq),
            _ => false,
        }
    }

    /// Turns sequence sets into ranges, `*` being the last message (or UID) of the view.
    /// Gives `$` (SEARCHRES) the saved UIDs; after `resolve`.
    pub(super) fn resolve_saved(&mut self, saved: &[u32]) {
        match self {
            Key::Uid(s, r) if s == "$" => *r = saved.iter().map(|&u| (u, u)).collect(),
            Key::Not(k) => k.resolve_saved(saved),
            Key::Or(a, b) => {
                a.resolve_saved(saved);
                b.resolve_saved(saved);
            }
            Key::And(v) => v.iter_mut().for_each(|k| k.resolve_saved(saved)),
            _ => {}
        }
    }

    pub(super) fn resolve(&mut self, max_seq: u32, max_uid: u32) {
        match self {
            Key::Seq(s, r) => *r = parse_sequence_set(s, max_seq).unwrap_or_default(),
            Key::Uid(s, r) => *r = parse_sequence_set(s, max_uid).unwrap_or_default(),
            Key::Not(k) => k.resolve(max_seq, max_uid),
            Key::Or(a, b) => {
                a.resolve(max_seq, max_uid);
                b.resolve(max_seq, max_uid);
            }
            Key::And(v) => v.iter_mut().for_each(|k| k.resolve(max_seq, max_uid)),
            _ => {}
        }
    }

    /// Three-valued: `None` when the answer needs the message and `msg` is `None`.
    fn eval(&self, seq: u32, uid: u32, e: &Entry, msg: Option<&Searchable>) -> Option<bool> {
        Some(match self {
            Key::All => true,
            Key::Seq(_, r) => in_set(r, seq),
            Key::Uid(_, r) => in_set(r, uid),
            Key::Flag(f, set) => e.flags.contains(*f) == *set,
            Key::Keyword(k, set) => e.keywords.iter().any(|x| x.eq_ignore_ascii_case(k)) == *set,
            Key::Recent => false,
            Key::Larger(n) => e.size > *n,
            Key::Smaller(n) => e.size < *n,
            Key::ModSeq(n) => e.modseq >= *n,
            Key::Date(DateKind::Internal, cmp, d) => compare(internal_day(e), *cmp, *d),
            Key::Date(DateKind::Sent, cmp, d) => compare(msg?.sent.unwrap_or_else(|| internal_day(e)), *cmp, *d),
            Key::Header(name, value) => msg?.headers.iter().any(|(n, v)| n == name && v.contains(value.as_str())),
            Key::Body(s) => msg?.body.contains(s.as_str()),
            Key::Text(s) => {
                let m = msg?;
                m.body.contains(s.as_str()) || m.header_text.contains(s.as_str())
            }
            Key::Not(k) => !k.eval(seq, uid, e, msg)?,
            Key::Or(a, b) => match (a.eval(seq, uid, e, msg), b.eval(seq, uid, e, msg)) {
                (Some(true), _) | (_, Some(true)) => true,
                (Some(false), Some(false)) => false,
                _ => return None,
            },
            Key::And(v) => {
                let mut unknown = false;
                for k in v {
                    match k.eval(seq, uid, e, msg) {
                        Some(false) => return Some(false),
                        None => unknown = true,
                        Some(true) => {}
                    }
                }
                if unknown {
                    return None;
                }
                true
            }
        })
    }
}

fn compare(day: NaiveDate, cmp: DateCmp, d: NaiveDate) -> bool {
    match cmp {
        DateCmp::Before => day < d,
        DateCmp::On => day == d,
        DateCmp::Since => day >= d,
    }
}

/// The INTERNALDATE's day, in the time zone it was recorded with (as FETCH shows it).
fn internal_day(e: &Entry) -> NaiveDate {
    let offset =
        FixedOffset::east_opt(i32::from(e.tz_offset_minutes) * 60).unwrap_or(FixedOffset::east_opt(0).expect("zero"));
    match offset.timestamp_opt(e.internal_date, 0).single() {
        Some(t) => t.date_naive(),
        None => NaiveDate::default(),
    }
}

/// What header, body and text keys look at, lowercased.
#[derive(Default)]
struct Searchable {
    /// (field name, decoded value) of the top-level header.
    headers: Vec<(String, String)>,
    /// The same as `name: value` lines, for TEXT.
    header_text: String,
    /// The decoded text parts, nested messages (headers and text) included.
    body: String,
    /// The Date field's day (its own time zone), if it parses.
    sent: Option<NaiveDate>,
}

impl Searchable {
    fn build(raw: &[u8], need: Need) -> Searchable {
        let parser = MessageParser::new().default_header_text();
        let parsed = if need == Need::Body { parser.parse(raw) } else { parser.parse_headers(raw) };
        let Some(msg) = parsed else { return Searchable::default() };
        let headers = header_pairs(&msg);
        let mut s = Searchable {
            header_text: headers.iter().map(|(n, v)| format!("{n}: {v}\n")).collect(),
            headers,
            sent: msg.date().and_then(|d| NaiveDate::from_ymd_opt(d.year.into(), d.month.into(), d.day.into())),
            body: String::new(),
        };
        if need == Need::Body {
            let mut body = String::new();
            collect_text(&msg, &mut body, 0);
            s.body = body.to_lowercase();
        }
        s
    }
}

fn header_pairs(msg: &Message) -> Vec<(String, String)> {
    let raw = msg.raw_message();
    msg.headers()
        .iter()
        .map(|h| {
            let raw_value = raw
                .get(h.offset_start as usize..h.offset_end as usize)
                .map(|b| unfold(&String::from_utf8_lossy(b)))
                .unwrap_or_default();
            let value = match &h.value {
                // Decoded text where encoded words were present; otherwise the field as sent,
                // so that Message-ID searches keep their angle brackets.
                HeaderValue::Text(t) if raw_value.contains("=?") => t.to_string(),
                HeaderValue::TextList(l) if raw_value.contains("=?") => l.join(", "),
                HeaderValue::Address(a) if !matches!(h.name, HeaderName::Other(_)) => render_address(a),
                _ => raw_value,
            };
            (h.name.as_str().to_ascii_lowercase(), value.to_lowercase())
        })
        .collect()
}

fn unfold(s: &str) -> String {
    s.replace("\r\n", "").replace('\n', "").trim().to_string()
}

fn render_address(a: &Address) -> String {
    let one = |x: &mail_parser::Addr| match (&x.name, &x.address) {
        (Some(n), Some(ad)) => format!("{n} <{ad}>"),
        (Some(n), None) => n.to_string(),
        (None, Some(ad)) => ad.to_string(),
        (None, None) => String::new(),
    };
    match a {
        Address::List(l) => l.iter().map(one).collect::<Vec<_>>().join(", "),
        Address::Group(g) => g
            .iter()
            .map(|g| {
                let members = g.addresses.iter().map(one).collect::<Vec<_>>().join(", ");
                format!("{}: {members};", g.name.as_deref().unwrap_or(""))
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// Appends every text part (HTML as text) and nested message's header and text to `out`.
fn collect_text(msg: &Message, out: &mut String, depth: usize) {
    for part in &msg.parts {
        match &part.body {
            PartType::Text(t) => {
                out.push_str(t);
                out.push('\n');
            }
            PartType::Html(h) => {
                out.push_str(&mail_parser::decoders::html::html_to_text(h));
                out.push('\n');
            }
            PartType::Message(inner) if depth < MAX_MESSAGE_DEPTH => {
                for (n, v) in header_pairs(inner) {
                    out.push_str(&format!("{n}: {v}\n"));
                }
                collect_text(inner, out, depth + 1);
            }
            _ => {}
        }
    }
}

/// The stored message, or only as many chunks as hold its header when that is all `need` asks.
pub(super) fn read_message(
    store: &Store,
    blob: &[u8; 32],
    need: Need,
) -> Result<Option<Vec<u8>>, crate::store::StoreError> {
    if need == Need::Body {
        return store.read_blob_bytes(blob);
    }
    let Some(reader) = store.read_blob(blob)? else { return Ok(None) };
    let mut out = Vec::new();
    for chunk in reader {
        let start = out.len().saturating_sub(3);
        out.extend_from_slice(&chunk?);
        let tail = &out[start..];
        if tail.windows(4).any(|w| w == b"\r\n\r\n") || tail.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(Some(out))
}

/// The matching messages of the view as (sequence number, UID, modseq), ascending.
pub(super) fn evaluate(
    store: &Store,
    acct: u32,
    mbox: u32,
    view: &[u32],
    key: &Key,
) -> Result<Vec<(u32, u32, u64)>, crate::store::StoreError> {
    // RFC 7162 §3.1.5: MODSEQ compares with this node's counter; another node's value is 0
    // (`condstore::from_client`), so every message matches.
    let local;
    let key = if store.modseq_tag().is_some() && key.has_modseq() {
        local = key.clone().local_modseqs(&|m| super::condstore::from_client(store, acct, mbox, m))?;
        &local
    } else {
        key
    };
    let entries = store.entries(acct, mbox)?;
    let need = key.need();
    let mut out = Vec::new();
    let mut it = entries.iter().peekable();
    for (i, &uid) in view.iter().enumerate() {
        while it.peek().is_some_and(|(u, _)| *u < uid) {
            it.next();
        }
        // A message expunged by another session but not yet announced matches nothing.
        let Some((_, e)) = it.peek().filter(|(u, _)| *u == uid) else { continue };
        let seq = i as u32 + 1;
        let hit = match key.eval(seq, uid, e, None) {
            Some(b) => b,
            None => {
                let msg = match read_message(store, &e.blob, need)? {
                    Some(raw) => Searchable::build(&raw, need),
                    None => Searchable::default(),
                };
                key.eval(seq, uid, e, Some(&msg)).unwrap_or(false)
            }
        };
        if hit {
            out.push((seq, uid, super::condstore::shown(store, e.modseq)));
        }
    }
    Ok(out)
}

/// A compressed sequence set (`1:3,5`) of ascending numbers (RFC 4731 §3.1).
fn compress(nums: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < nums.len() {
        let start = nums[i];
        let mut end = start;
        while i + 1 < nums.len() && nums[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = nums[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// The response line for the matches of `prog`.
/// What `RETURN (SAVE)` keeps (RFC 5182 §2.4): with MIN and/or MAX beside it, only those
/// messages; otherwise every match. UIDs, sorted.
fn saved_result(opts: &[ReturnOpt], hits: &[(u32, u32, u64)]) -> Vec<u32> {
    let (min, max) = (opts.contains(&ReturnOpt::Min), opts.contains(&ReturnOpt::Max));
    if !min && !max {
        return hits.iter().map(|h| h.1).collect();
    }
    let mut v = Vec::new();
    if let (true, Some(h)) = (min, hits.first()) {
        v.push(h.1);
    }
    if let (true, Some(h)) = (max, hits.last()) {
        v.push(h.1);
    }
    v.dedup();
    v
}

fn render(prog: &Program, tag: &str, uid: bool, hits: &[(u32, u32, u64)]) -> String {
    let nums: Vec<u32> = hits.iter().map(|&(s, u, _)| if uid { u } else { s }).collect();
    let modseq = if prog.key.has_modseq() { hits.iter().map(|h| h.2).max() } else { None };
    match &prog.ret {
        None => {
            let mut line = String::from("* SEARCH");
            for n in &nums {
                line.push_str(&format!(" {n}"));
            }
            if let Some(m) = modseq {
                line.push_str(&format!(" (MODSEQ {m})"));
            }
            line
        }
        Some(opts) => {
            let mut line = format!("* ESEARCH (TAG {})", quote(tag));
            if uid {
                line.push_str(" UID");
            }
            for opt in [ReturnOpt::Min, ReturnOpt::Max, ReturnOpt::Count, ReturnOpt::All, ReturnOpt::Save] {
                if !opts.contains(&opt) {
                    continue;
                }
                let item = match opt {
                    ReturnOpt::Min => nums.first().map(|n| format!(" MIN {n}")),
                    ReturnOpt::Max => nums.last().map(|n| format!(" MAX {n}")),
                    ReturnOpt::Count => Some(format!(" COUNT {}", nums.len())),
                    ReturnOpt::All => (!nums.is_empty()).then(|| format!(" ALL {}", compress(&nums))),
                    ReturnOpt::Save => None,
                };
                line.push_str(&item.unwrap_or_default());
            }
            if let Some(m) = modseq {
                line.push_str(&format!(" MODSEQ {m}"));
            }
            line
        }
    }
}

/// SEARCH / UID SEARCH in the selected state.
#[allow(clippy::too_many_arguments)]
pub(super) async fn search(
    store: Arc<Store>,
    acct: u32,
    rev2: bool,
    sel: &mut Selected,
    args: &[Token],
    uid: bool,
    tag: &str,
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let parsed = Program::parse(args);
    let saving = |p: &Program| p.ret.as_ref().is_some_and(|o| o.contains(&ReturnOpt::Save));
    if let (Err(_), Some(Token::Atom(r)), Some(Token::List(o))) = (&parsed, args.first(), args.get(1)) {
        // RFC 5182 §2.1: a SEARCH ... SAVE that fails leaves the saved result empty.
        if r.eq_ignore_ascii_case("RETURN")
            && o.iter().any(|t| matches!(t, Token::Atom(a) if a.eq_ignore_ascii_case("SAVE")))
        {
            sel.saved.clear();
        }
    }
    let mut prog = parsed?;
    if rev2 && prog.ret.is_none() {
        // RFC 9051 §6.4.4: IMAP4rev2 answers every SEARCH with ESEARCH.
        prog.ret = Some(vec![ReturnOpt::All]);
    }
    let view = sel.uids.clone();
    prog.key.resolve(view.len() as u32, view.last().copied().unwrap_or(0));
    prog.key.resolve_saved(&sel.saved);
    let mbox = sel.mbox;
    let key = prog.key.clone();
    let hits = tokio::task::spawn_blocking(move || evaluate(&store, acct, mbox, &view, &key))
        .await
        .map_err(|e| {
            tracing::error!("imap search-task error={e}");
            Reply::No("[SERVERBUG] Internal error, try again later".into())
        })?
        .map_err(|e| {
            tracing::error!("imap store-error error={e}");
            Reply::No("[SERVERBUG] Internal error, try again later".into())
        })?;
    match prog.ret.as_deref() {
        Some(opts) if saving(&prog) => {
            sel.saved = saved_result(opts, &hits);
            // RFC 5182 §2.4: SAVE alone produces no ESEARCH response.
            if opts.len() > 1 {
                conn.write(format!("{}\r\n", render(&prog, tag, uid, &hits)).as_bytes());
            }
        }
        _ => conn.write(format!("{}\r\n", render(&prog, tag, uid, &hits)).as_bytes()),
    }
    Ok(Some(format!("{}SEARCH completed", if uid { "UID " } else { "" })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::parse::parse_request;

    fn prog(s: &str) -> Result<Program, ParseError> {
        let mut lits = Vec::new();
        match parse_request(format!("a SEARCH {s}").as_bytes(), &mut lits) {
            Ok(r) => Program::parse(&r.args),
            Err((_, m)) => Err(ParseError::Bad(m.into())),
        }
    }

    fn key(s: &str) -> Key {
        prog(s).unwrap().key
    }

    fn entry(flags: Flags, size: u64) -> Entry {
        Entry {
            blob: [0; 32],
            size,
            internal_date: 1_700_000_000, // 14-Nov-2023 22:13:20 UTC
            tz_offset_minutes: 0,
            flags,
            keywords: vec!["$Junk".into()],
            modseq: 7,
        }
    }

    #[test]
    fn keys() {
        assert_eq!(key("ALL"), Key::All);
        assert_eq!(key("unseen"), Key::Flag(Flags::SEEN, false));
        assert_eq!(key("1:3,5"), Key::Seq("1:3,5".into(), vec![]));
        assert_eq!(key("UID 2:*"), Key::Uid("2:*".into(), vec![]));
        assert_eq!(key("KEYWORD \\Seen"), Key::Flag(Flags::SEEN, true));
        assert_eq!(key("UNKEYWORD $Junk"), Key::Keyword("$Junk".into(), false));
        assert_eq!(key("SUBJECT \"Hello World\""), Key::Header("subject".into(), "hello world".into()));
        assert_eq!(key("HEADER X-Spam \"\""), Key::Header("x-spam".into(), String::new()));
        assert_eq!(
            key("SINCE 1-Feb-1994"),
            Key::Date(DateKind::Internal, DateCmp::Since, NaiveDate::from_ymd_opt(1994, 2, 1).unwrap())
        );
        assert_eq!(
            key("SENTON \"21-nov-2026\""),
            Key::Date(DateKind::Sent, DateCmp::On, NaiveDate::from_ymd_opt(2026, 11, 21).unwrap())
        );
        assert_eq!(
            key("OR SEEN NOT (FLAGGED LARGER 10)"),
            Key::Or(
                Box::new(Key::Flag(Flags::SEEN, true)),
                Box::new(Key::Not(Box::new(Key::And(vec![Key::Flag(Flags::FLAGGED, true), Key::Larger(10)]))))
            )
        );
        assert_eq!(key("SEEN DELETED"), Key::And(vec![Key::Flag(Flags::SEEN, true), Key::Flag(Flags::DELETED, true)]));
        assert_eq!(key("MODSEQ \"/flags/\\\\draft\" all 620162338"), Key::ModSeq(620162338));
        assert_eq!(key("MODSEQ 5"), Key::ModSeq(5));
        let p = prog("RETURN () ALL").unwrap();
        assert_eq!(p.ret, Some(vec![ReturnOpt::All]));
        let p = prog("RETURN (MIN COUNT) CHARSET UTF-8 TEXT x").unwrap();
        assert_eq!(p.ret, Some(vec![ReturnOpt::Min, ReturnOpt::Count]));
        assert_eq!(p.key, Key::Text("x".into()));
    }

    #[test]
    fn charsets() {
        let mut lits = vec![b"caf\xe9".to_vec()];
        let r = parse_request(b"a SEARCH CHARSET ISO-8859-1 BODY \x000", &mut lits).unwrap();
        assert_eq!(Program::parse(&r.args).unwrap().key, Key::Body("café".into()));
        assert_eq!(prog("CHARSET X-NOPE BODY x"), Err(ParseError::BadCharset));
        assert_eq!(prog("CHARSET us-ascii BODY X").unwrap().key, Key::Body("x".into()));
    }

    #[test]
    fn saved_results() {
        // RFC 5182: `$` alone, as a key or after UID, is the saved result, matched by UID.
        let mut k = key("$");
        k.resolve(10, 50);
        k.resolve_saved(&[3, 40]);
        assert_eq!(k, Key::Uid("$".into(), vec![(3, 3), (40, 40)]));
        let p = prog("RETURN (SAVE MIN) UID $").unwrap();
        assert_eq!(p.ret, Some(vec![ReturnOpt::Save, ReturnOpt::Min]));
        let hits = [(1, 3, 0), (2, 7, 0), (3, 40, 0)];
        assert_eq!(saved_result(&[ReturnOpt::Save], &hits), vec![3, 7, 40]);
        assert_eq!(saved_result(&[ReturnOpt::Save, ReturnOpt::Min, ReturnOpt::Max], &hits), vec![3, 40]);
        assert_eq!(saved_result(&[ReturnOpt::Max, ReturnOpt::Save], &hits), vec![40]);
        assert_eq!(saved_result(&[ReturnOpt::Save, ReturnOpt::Min], &[]), Vec::<u32>::new());
    }

    #[test]
    fn bad_programs_are_refused_not_panicked() {
        assert!(Program::parse(&[]).is_err());
        for bad in [
            "RETURN",
            "RETURN (FOO) ALL",
            "CHARSET",
            "NOSUCHKEY",
            "OR SEEN",
            "NOT",
            "LARGER",
            "LARGER x",
            "LARGER 99999999999999999999999",
            "BEFORE 32-Jan-2020",
            "BEFORE 1-Foo-2020",
            "SINCE 2020-01-01",
            "UID",
            "UID x",
            "UID $,1",
            "$:3",
            "0",
            "1,,2",
            "HEADER \"\" x",
            "()",
            "KEYWORD (x)",
            "MODSEQ \"/flags/x\" bogus 5",
        ] {
            assert!(matches!(prog(bad), Err(ParseError::Bad(_))), "{bad:?}");
        }
        let deep = format!("{}ALL", "NOT ".repeat(10_000));
        assert!(prog(&deep).is_err());
        let ors = format!("{}ALL{}", "OR ALL ".repeat(1000), "");
        assert!(prog(&ors).is_err());
    }

    #[test]
    fn evaluation_without_bodies() {
        let e = entry(Flags::SEEN.union(Flags::FLAGGED), 500);
        let ev = |s: &str| {
            let mut k = key(s);
            k.resolve(10, 40);
            k.eval(3, 30, &e, None)
        };
        assert_eq!(ev("ALL"), Some(true));
        assert_eq!(ev("SEEN FLAGGED UNDELETED"), Some(true));
        assert_eq!(ev("NEW"), Some(false));
        assert_eq!(ev("OLD"), Some(true));
        assert_eq!(ev("2:3"), Some(true));
        assert_eq!(ev("4:*"), Some(false));
        assert_eq!(ev("UID 30"), Some(true));
        assert_eq!(ev("UID *"), Some(false));
        assert_eq!(ev("LARGER 499 SMALLER 501"), Some(true));
        assert_eq!(ev("KEYWORD $junk"), Some(true));
        assert_eq!(ev("ON 14-Nov-2023"), Some(true));
        assert_eq!(ev("BEFORE 14-Nov-2023"), Some(false));
        assert_eq!(ev("SINCE 14-Nov-2023"), Some(true));
        assert_eq!(ev("MODSEQ 8"), Some(false));
        // A cheap key that fails decides without the body; one that passes does not.
        assert_eq!(ev("UNSEEN BODY x"), Some(false));
        assert_eq!(ev("SEEN BODY x"), None);
        assert_eq!(ev("OR SEEN BODY x"), Some(true));
    }

    #[test]
    fn decoded_text_matches() {
        let raw = b"From: =?ISO-8859-1?Q?Andr=E9?= <andre@example.test>\r\n\
Subject: =?UTF-8?B?R3LDvMOfZQ==?= aus Wien\r\n\
Date: Sat, 21 Nov 2026 10:00:00 +0100\r\n\
Message-ID: <abc@example.test>\r\n\
X-Empty:\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=b\r\n\
\r\n\
--b\r\n\
Content-Type: text/plain; charset=iso-8859-1\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Le caf=E9 est pr=EAt.\r\n\
--b\r\n\
Content-Type: application/octet-stream\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
c2VjcmV0d29yZA==\r\n\
--b--\r\n";
        let m = Searchable::build(raw, Need::Body);
        let e = entry(Flags::default(), 10);
        let ev = |s: &str| {
            let mut k = key(s);
            k.resolve(1, 1);
            k.eval(1, 1, &e, Some(&m)).unwrap()
        };
        assert!(ev("FROM \"andré\""));
        assert!(ev("FROM ANDRE@EXAMPLE"));
        assert!(ev("SUBJECT \"grüße\""));
        assert!(ev("HEADER Message-ID <abc@example.test>"));
        assert!(ev("HEADER x-empty \"\""));
        assert!(!ev("HEADER x-missing \"\""));
        assert!(ev("BODY \"CAFÉ EST\""));
        assert!(!ev("BODY secretword"));
        assert!(!ev("BODY c2VjcmV0d29yZA"));
        assert!(ev("TEXT wien"));
        assert!(ev("SENTON 21-Nov-2026"));
        assert!(!ev("SENTBEFORE 21-Nov-2026"));
    }

    #[test]
    fn responses() {
        assert_eq!(compress(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(compress(&[]), "");
        let hits = [(1, 10, 3), (2, 11, 9), (4, 20, 5)];
        let p = prog("ALL").unwrap();
        assert_eq!(render(&p, "a1", false, &hits), "* SEARCH 1 2 4");
        assert_eq!(render(&p, "a1", true, &[]), "* SEARCH");
        let p = prog("RETURN (MIN MAX COUNT ALL) ALL").unwrap();
        assert_eq!(render(&p, "a1", true, &hits), "* ESEARCH (TAG \"a1\") UID MIN 10 MAX 20 COUNT 3 ALL 10:11,20");
        assert_eq!(render(&p, "a1", false, &[]), "* ESEARCH (TAG \"a1\") COUNT 0");
        let p = prog("MODSEQ 1").unwrap();
        assert_eq!(render(&p, "a1", false, &hits), "* SEARCH 1 2 4 (MODSEQ 9)");
    }

    proptest::proptest! {
        /// Programs built from search words, sets and parentheses are parsed or refused, and
        /// evaluated (with and without a message) without panicking.
        #[test]
        fn random_programs_never_panic(words in proptest::collection::vec(0usize..24, 0..40), raw in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            const VOCAB: [&str; 24] = [
                "ALL", "NOT", "OR", "(", ")", "SEEN", "1:*", "*", "UID", "2,4:3", "BODY", "x", "\"\"",
                "HEADER", "SUBJECT", "LARGER", "10", "SINCE", "1-Jan-2020", "KEYWORD", "$j", "MODSEQ", "RETURN", "CHARSET",
            ];
            let text = words.iter().map(|&i| VOCAB[i]).collect::<Vec<_>>().join(" ");
            if let Ok(mut p) = prog(&text) {
                p.key.resolve(3, 9);
                let e = entry(Flags::SEEN, 100);
                let m = Searchable::build(&raw, Need::Body);
                let _ = p.key.eval(2, 5, &e, None);
                let _ = p.key.eval(2, 5, &e, Some(&m));
                let _ = render(&p, "t", true, &[(1, 2, 3)]);
            }
        }
    }
}
