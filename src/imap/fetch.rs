//! FETCH (RFC 3501 §6.4.5, §7.4.2): item parsing and rendering. A whole-body fetch streams the
//! stored chunks with periodic flushes, so memory per session stays bounded however large the
//! message; items that need MIME structure parse the message once per FETCH line.

use chrono::{FixedOffset, TimeZone};

use super::mime::{BinaryError, MimeMessage, Section};
use super::parse::Token;
use super::session::Selected;
use crate::net::Conn;
use crate::store::{Entry, FlagOp, Flags, Store, StoreError};

/// Output buffered before it is pushed to the socket during a large FETCH.
const FLUSH_AT: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum FetchItem {
    Uid,
    Flags,
    InternalDate,
    Size,
    Envelope,
    BodyStructure,
    /// BODY without a section: the non-extensible BODYSTRUCTURE.
    Body,
    Section(SectionItem),
    /// `BINARY.SIZE[part]` (RFC 3516 §4.2).
    BinarySize(Vec<u32>),
    /// `MODSEQ` (RFC 7162 §3.1.4).
    ModSeq,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct SectionItem {
    /// How the item is named in the response: `BODY[...]`, `BINARY[...]`, `RFC822`, `RFC822.HEADER`,
    /// `RFC822.TEXT`.
    label: Label,
    peek: bool,
    /// `None` for the whole message.
    section: Option<Section>,
    partial: Option<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Label {
    Body,
    Rfc822,
    Rfc822Header,
    Rfc822Text,
    /// `BINARY[part]`: `section` is always `Some`, with part numbers only.
    Binary,
}

impl FetchItem {
    /// A macro, one item, or a parenthesised list.
    pub fn parse_list(t: &Token) -> Result<Vec<FetchItem>, &'static str> {
        let atoms: Vec<&str> = match t {
            Token::Atom(a) => match a.to_ascii_uppercase().as_str() {
                "ALL" => {
                    return Ok(vec![FetchItem::Flags, FetchItem::InternalDate, FetchItem::Size, FetchItem::Envelope])
                }
                "FAST" => return Ok(vec![FetchItem::Flags, FetchItem::InternalDate, FetchItem::Size]),
                "FULL" => {
                    return Ok(vec![
                        FetchItem::Flags,
                        FetchItem::InternalDate,
                        FetchItem::Size,
                        FetchItem::Envelope,
                        FetchItem::Body,
                    ])
                }
                _ => vec![a.as_str()],
            },
            Token::List(items) => {
                let mut v = Vec::new();
                for i in items {
                    match i {
                        Token::Atom(a) => v.push(a.as_str()),
                        _ => return Err("Invalid FETCH item"),
                    }
                }
                v
            }
            _ => return Err("Invalid FETCH item"),
        };
        atoms.into_iter().map(FetchItem::parse_one).collect()
    }

    fn parse_one(atom: &str) -> Result<FetchItem, &'static str> {
        let upper = atom.to_ascii_uppercase();
        Ok(match upper.as_str() {
            "UID" => FetchItem::Uid,
            "FLAGS" => FetchItem::Flags,
            "INTERNALDATE" => FetchItem::InternalDate,
            "RFC822.SIZE" => FetchItem::Size,
            "ENVELOPE" => FetchItem::Envelope,
            "BODYSTRUCTURE" => FetchItem::BodyStructure,
            "BODY" => FetchItem::Body,
            "MODSEQ" => FetchItem::ModSeq,
            "RFC822" => {
                FetchItem::Section(SectionItem { label: Label::Rfc822, peek: false, section: None, partial: None })
            }
            "RFC822.HEADER" => FetchItem::Section(SectionItem {
                label: Label::Rfc822Header,
                peek: true,
                section: Some(Section::parse("HEADER").ok_or("Invalid section")?),
                partial: None,
            }),
            "RFC822.TEXT" => FetchItem::Section(SectionItem {
                label: Label::Rfc822Text,
                peek: false,
                section: Some(Section::parse("TEXT").ok_or("Invalid section")?),
                partial: None,
            }),
            _ if upper.starts_with("BINARY") => {
                let (label, peek, rest) = if upper.starts_with("BINARY.SIZE[") {
                    (None, true, &atom[11..])
                } else if upper.starts_with("BINARY.PEEK[") {
                    (Some(Label::Binary), true, &atom[11..])
                } else if upper.starts_with("BINARY[") {
                    (Some(Label::Binary), false, &atom[6..])
                } else {
                    return Err("Unknown FETCH item");
                };
                let close = rest.rfind(']').ok_or("Invalid section")?;
                let section = Section::parse(&rest[1..close]).ok_or("Invalid section")?;
                if section.text.is_some() {
                    return Err("Invalid BINARY section");
                }
                let partial = parse_partial(&rest[close + 1..])?;
                match label {
                    None if partial.is_none() => FetchItem::BinarySize(section.part),
                    None => return Err("Invalid BINARY.SIZE"),
                    Some(label) => FetchItem::Section(SectionItem { label, peek, section: Some(section), partial }),
                }
            }
            _ => {
                let (peek, rest) = if upper.starts_with("BODY.PEEK[") {
                    (true, &atom[9..])
                } else if upper.starts_with("BODY[") {
                    (false, &atom[4..])
                } else {
                    return Err("Unknown FETCH item");
                };
                let close = rest.rfind(']').ok_or("Invalid section")?;
                let spec = &rest[1..close];
                let section = if spec.is_empty() { None } else { Some(Section::parse(spec).ok_or("Invalid section")?) };
                let partial = parse_partial(&rest[close + 1..])?;
                FetchItem::Section(SectionItem { label: Label::Body, peek, section, partial })
            }
        })
    }

    fn needs_parse(&self) -> bool {
        match self {
            FetchItem::Envelope | FetchItem::BodyStructure | FetchItem::Body | FetchItem::BinarySize(_) => true,
            FetchItem::Section(s) => s.section.is_some(),
            _ => false,
        }
    }
}

/// `<origin.count>` after a section, or nothing.
fn parse_partial(s: &str) -> Result<Option<(u64, u64)>, &'static str> {
    if s.is_empty() {
        return Ok(None);
    }
    let inner = s.strip_prefix('<').and_then(|s| s.strip_suffix('>')).ok_or("Invalid partial")?;
    let (a, b) = inner.split_once('.').ok_or("Invalid partial")?;
    let origin = a.parse().map_err(|_| "Invalid partial")?;
    let count: u64 = b.parse().map_err(|_| "Invalid partial")?;
    if count == 0 {
        return Err("Invalid partial");
    }
    Ok(Some((origin, count)))
}

pub(super) fn flag_list(e: &Entry) -> String {
    let mut v: Vec<&str> = e.flags.names().collect();
    v.extend(e.keywords.iter().map(String::as_str));
    v.join(" ")
}

/// RFC 3501 date-time: `"21-Nov-2026 15:40:00 +0000"`.
pub(super) fn internal_date(e: &Entry) -> String {
    let offset =
        FixedOffset::east_opt(i32::from(e.tz_offset_minutes) * 60).unwrap_or(FixedOffset::east_opt(0).expect("zero"));
    match offset.timestamp_opt(e.internal_date, 0).single() {
        Some(t) => t.format("%e-%b-%Y %H:%M:%S %z").to_string(),
        None => "01-Jan-1970 00:00:00 +0000".to_string(),
    }
}

fn literal_header(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(format!("{{{len}}}\r\n").as_bytes());
}

/// The tagged NO for a BINARY part that cannot be decoded (RFC 3516 §4.3, Dovecot's texts).
fn binary_error(e: BinaryError) -> StoreError {
    StoreError::Invalid(match e {
        BinaryError::UnknownCte => "[UNKNOWN-CTE] Unknown Content-Transfer-Encoding.",
        BinaryError::Parse => "[PARSE] Invalid data in MIME part.",
    })
}

/// Ends a FETCH response cut short by a BINARY error, as Dovecot does: the items written so
/// far (at least the UID in a UID FETCH) are sent before the tagged NO; with no item yet, no
/// line (an empty `FETCH ()` is not valid syntax).
fn abort_line(mut out: Vec<u8>, e: BinaryError, conn: &mut Conn) -> StoreError {
    if !out.ends_with(b"(") {
        out.extend_from_slice(b")\r\n");
        conn.write(&out);
    }
    binary_error(e)
}

pub(super) async fn fetch(
    store: &Store,
    acct: u32,
    sel: &mut Selected,
    targets: &[(u32, u32)],
    items: &[FetchItem],
    uid_mode: bool,
    conn: &mut Conn,
) -> Result<(), StoreError> {
    if super::fastfetch::applies(items)
        && super::fastfetch::fetch(store, acct, sel.mbox, targets, items, uid_mode, conn).await?
    {
        return Ok(());
    }
    let sets_seen = !sel.read_only && items.iter().any(|i| matches!(i, FetchItem::Section(s) if !s.peek));
    // Entries that just gained \Seen, by UID (looked up once per message below).
    let mut seen_now: std::collections::HashMap<u32, Entry> = std::collections::HashMap::new();
    if sets_seen {
        let uids: Vec<u32> = targets.iter().map(|&(_, u)| u).collect();
        seen_now = store.store_flags(acct, sel.mbox, &uids, FlagOp::Add, Flags::SEEN, &[])?.into_iter().collect();
        sel.answered.extend(seen_now.iter().map(|(u, e)| (*u, e.modseq)));
    }
    let wants_flags = items.contains(&FetchItem::Flags);
    let needs_parse = items.iter().any(FetchItem::needs_parse);
    for &(seq, uid) in targets {
        let (entry, newly_seen) = match seen_now.remove(&uid) {
            Some(e) => (e, true),
            None => match store.entry(acct, sel.mbox, uid)? {
                Some(e) => (e, false),
                // Expunged by another session and not yet announced to this one.
                None => continue,
            },
        };
        let raw = if needs_parse { store.read_blob_bytes(&entry.blob)? } else { None };
        let parsed = raw.as_deref().map(MimeMessage::parse);
        let mut out = format!("* {seq} FETCH (").into_bytes();
        let mut first = true;
        let mut sep = |out: &mut Vec<u8>| {
            if !std::mem::take(&mut first) {
                out.push(b' ');
            }
        };
        let wants_flags = wants_flags || newly_seen;
        if uid_mode || items.contains(&FetchItem::Uid) {
            sep(&mut out);
            out.extend_from_slice(format!("UID {uid}").as_bytes());
        }
        if wants_flags {
            sep(&mut out);
            out.extend_from_slice(format!("FLAGS ({})", flag_list(&entry)).as_bytes());
        }
        // RFC 7162 §3.1.4: with CONDSTORE on, the implicit \Seen change carries its modseq too.
        if items.contains(&FetchItem::ModSeq) || (newly_seen && sel.ext.condstore) {
            sep(&mut out);
            out.extend_from_slice(format!("MODSEQ ({})", super::condstore::shown(store, entry.modseq)).as_bytes());
        }
        for item in items {
            match item {
                FetchItem::Uid | FetchItem::Flags | FetchItem::ModSeq => {}
                FetchItem::InternalDate => {
                    sep(&mut out);
                    out.extend_from_slice(format!("INTERNALDATE \"{}\"", internal_date(&entry)).as_bytes());
                }
                FetchItem::Size => {
                    sep(&mut out);
                    out.extend_from_slice(format!("RFC822.SIZE {}", entry.size).as_bytes());
                }
                FetchItem::Envelope => {
                    sep(&mut out);
                    out.extend_from_slice(b"ENVELOPE ");
                    out.extend(parsed.as_ref().map_or_else(|| b"NIL".to_vec(), |m| m.envelope()));
                }
                FetchItem::BodyStructure | FetchItem::Body => {
                    sep(&mut out);
                    let ext = *item == FetchItem::BodyStructure;
                    out.extend_from_slice(if ext { b"BODYSTRUCTURE " } else { b"BODY " });
                    out.extend(parsed.as_ref().map_or_else(|| b"NIL".to_vec(), |m| m.body_structure(ext)));
                }
                FetchItem::BinarySize(part) => {
                    let size = match parsed.as_ref().map(|m| m.binary(part)) {
                        Some(Ok((bytes, _))) => bytes.len(),
                        Some(Err(e)) => return Err(abort_line(out, e, conn)),
                        None => 0,
                    };
                    sep(&mut out);
                    let spec: Vec<String> = part.iter().map(u32::to_string).collect();
                    out.extend_from_slice(format!("BINARY.SIZE[{}] {size}", spec.join(".")).as_bytes());
                }
                FetchItem::Section(s) if s.label == Label::Binary => {
                    let part = s.section.as_ref().map(|x| x.part.as_slice()).unwrap_or_default();
                    let (bytes, decoded) = match parsed.as_ref().map(|m| m.binary(part)) {
                        Some(Ok(b)) => b,
                        Some(Err(e)) => return Err(abort_line(out, e, conn)),
                        None => (Vec::new(), false),
                    };
                    let bytes = apply_partial(&bytes, s.partial);
                    sep(&mut out);
                    out.extend_from_slice(section_label(s).as_bytes());
                    // RFC 3516 §4.2: literal8 when the content has NUL; Dovecot also uses it for any
                    // decoded base64 / quoted-printable content.
                    let tilde = if decoded || bytes.contains(&0) { "~" } else { "" };
                    out.extend_from_slice(format!(" {tilde}{{{}}}\r\n", bytes.len()).as_bytes());
                    out.extend_from_slice(bytes);
                }
                FetchItem::Section(s) => {
                    sep(&mut out);
                    out.extend_from_slice(section_label(s).as_bytes());
                    out.push(b' ');
                    match (&s.section, &parsed) {
                        (Some(section), Some(m)) => {
                            let bytes = m.section_bytes(section);
                            let bytes = apply_partial(&bytes, s.partial);
                            literal_header(&mut out, bytes.len());
                            out.extend_from_slice(bytes);
                        }
                        (None, _) => {
                            out = stream_body(store, &entry, s.partial, out, conn).await?;
                        }
                        (Some(_), None) => out.extend_from_slice(b"NIL"),
                    }
                }
            }
            if out.len() >= FLUSH_AT {
                conn.write(&out);
                out.clear();
                conn.flush().await.map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
            }
        }
        out.extend_from_slice(b")\r\n");
        conn.write(&out);
        if out.len() >= FLUSH_AT / 4 {
            conn.flush().await.map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        }
    }
    Ok(())
}

fn section_label(s: &SectionItem) -> String {
    match s.label {
        Label::Rfc822 => "RFC822".into(),
        Label::Rfc822Header => "RFC822.HEADER".into(),
        Label::Rfc822Text => "RFC822.TEXT".into(),
        Label::Body | Label::Binary => {
            let name = if s.label == Label::Body { "BODY" } else { "BINARY" };
            let spec = s.section.as_ref().map(|x| x.to_string()).unwrap_or_default();
            match s.partial {
                Some((origin, _)) => format!("{name}[{spec}]<{origin}>"),
                None => format!("{name}[{spec}]"),
            }
        }
    }
}

fn apply_partial(bytes: &[u8], partial: Option<(u64, u64)>) -> &[u8] {
    match partial {
        None => bytes,
        Some((origin, count)) => {
            let start = (origin as usize).min(bytes.len());
            let end = start.saturating_add(count as usize).min(bytes.len());
            &bytes[start..end]
        }
    }
}

/// Writes the whole body (or a byte range of it) as a literal, chunk by chunk.
async fn stream_body(
    store: &Store,
    entry: &Entry,
    partial: Option<(u64, u64)>,
    mut out: Vec<u8>,
    conn: &mut Conn,
) -> Result<Vec<u8>, StoreError> {
    let (start, end) = match partial {
        None => (0, entry.size),
        Some((origin, count)) => (origin.min(entry.size), origin.saturating_add(count).min(entry.size)),
    };
    literal_header(&mut out, (end - start) as usize);
    let Some(reader) = store.read_blob(&entry.blob)? else {
        return Err(StoreError::Invalid("message body missing"));
    };
    let mut pos = 0u64;
    for chunk in reader {
        let chunk = chunk?;
        let (c_start, c_end) = (pos, pos + chunk.len() as u64);
        pos = c_end;
        if c_end <= start || c_start >= end {
            continue;
        }
        let from = (start.max(c_start) - c_start) as usize;
        let to = (end.min(c_end) - c_start) as usize;
        out.extend_from_slice(&chunk[from..to]);
        if out.len() >= FLUSH_AT {
            conn.write(&out);
            out.clear();
            conn.flush().await.map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items() {
        let t = Token::List(vec![
            Token::Atom("UID".into()),
            Token::Atom("BODY.PEEK[HEADER.FIELDS (From)]<0.10>".into()),
            Token::Atom("rfc822.size".into()),
        ]);
        let items = FetchItem::parse_list(&t).unwrap();
        assert_eq!(items.len(), 3);
        let FetchItem::Section(s) = &items[1] else { panic!() };
        assert!(s.peek);
        assert_eq!(s.partial, Some((0, 10)));
        assert_eq!(section_label(s), "BODY[HEADER.FIELDS (FROM)]<0>");
        assert!(FetchItem::parse_list(&Token::Atom("BODY[".into())).is_err());
        assert!(FetchItem::parse_list(&Token::Atom("BODY[]<1.0>".into())).is_err());
        assert!(FetchItem::parse_list(&Token::Atom("XYZZY".into())).is_err());
        assert_eq!(FetchItem::parse_list(&Token::Atom("fast".into())).unwrap().len(), 3);
    }
}
