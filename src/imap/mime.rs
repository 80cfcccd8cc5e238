//! MIME-dependent IMAP FETCH items: ENVELOPE, BODY / BODYSTRUCTURE, BODY[section] and
//! BINARY[section] (RFC 3501 §6.4.5 and §7.4.2, RFC 9051 §7.5.2, RFC 3516).
//!
//! The message is split by a small MIME walker working on the raw bytes rather than by a
//! decoding parser: IMAP wants exact octet counts, line counts and byte ranges of the
//! message as stored, and raw (undecoded, merely unfolded) header values. The output
//! follows what Dovecot produces for the same input. Nothing here panics on any input.

use mail_parser::decoders::{base64::base64_decode, quoted_printable::quoted_printable_decode};
use std::fmt;

/// Deeper multipart / message/rfc822 nesting is treated as opaque leaves.
const MAX_DEPTH: usize = 64;
/// Upper bound on the MIME entities built for one message.
const MAX_PARTS: usize = 10_000;

/// ENVELOPE: `("date" "subject" (from) (sender) (reply-to) (to) (cc) (bcc) "in-reply-to" "message-id")`,
/// as text (8-bit bytes that are not UTF-8 become U+FFFD; `MimeMessage::envelope` has the bytes).
pub fn envelope(raw: &[u8]) -> String {
    String::from_utf8_lossy(&MimeMessage::parse(raw).envelope()).into_owned()
}

/// BODYSTRUCTURE (`extended = true`) or BODY (`extended = false`) of the whole message, as text.
pub fn body_structure(raw: &[u8], extended: bool) -> String {
    String::from_utf8_lossy(&MimeMessage::parse(raw).body_structure(extended)).into_owned()
}

/// The bytes of `BODY[section]` (RFC 3501 §6.4.5); a part that does not exist yields nothing.
pub fn section_bytes(raw: &[u8], section: &Section) -> Vec<u8> {
    MimeMessage::parse(raw).section_bytes(section)
}

/// `BINARY[part]` (RFC 3516): the part body with its Content-Transfer-Encoding removed.
/// `None` when the encoding is unknown or the body does not decode (`NO [UNKNOWN-CTE]`).
pub fn binary_bytes(raw: &[u8], part: &[u32]) -> Option<Vec<u8>> {
    MimeMessage::parse(raw).binary_bytes(part)
}

/// An IMAP nstring: `NIL`, a quoted string when safe (no CR, LF or NUL, at most 1000 bytes),
/// otherwise a literal `{n}\r\n...`. Invalid UTF-8 is replaced by U+FFFD.
pub fn imap_nstring(s: Option<&[u8]>) -> String {
    let Some(s) = s else { return "NIL".to_string() };
    let s = String::from_utf8_lossy(s);
    if s.len() > 1000 || s.bytes().any(|c| matches!(c, b'\r' | b'\n' | 0)) {
        return format!("{{{}}}\r\n{s}", s.len());
    }
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An ENVELOPE string as Dovecot writes it: a literal when the text has 8-bit bytes, `"` or
/// `\`, or came from a folded header line (`folded`), otherwise a quoted string.
/// The bytes are sent as they are, 8-bit ones included.
fn env_string(s: &[u8], folded: bool) -> Vec<u8> {
    if folded || s.iter().any(|&c| c >= 0x80 || matches!(c, b'"' | b'\\' | b'\r' | b'\n' | 0)) {
        return [format!("{{{}}}\r\n", s.len()).as_bytes(), s].concat();
    }
    q(s)
}

fn env_ns(v: Option<(Vec<u8>, bool)>) -> Vec<u8> {
    v.map_or_else(nil, |(v, folded)| env_string(&v, folded))
}

fn nil() -> Vec<u8> {
    b"NIL".to_vec()
}

/// `(a b c)`, or NIL for no items.
fn list(items: Vec<Vec<u8>>) -> Vec<u8> {
    if items.is_empty() {
        nil()
    } else {
        [&b"("[..], &items.join(&b' '), b")"].concat()
    }
}

fn q(s: &[u8]) -> Vec<u8> {
    imap_nstring(Some(s)).into_bytes()
}

fn ns(s: Option<Vec<u8>>) -> Vec<u8> {
    imap_nstring(s.as_deref()).into_bytes()
}

/// A message split into its MIME tree once, to answer several FETCH items from one parse.
pub struct MimeMessage<'a> {
    raw: &'a [u8],
    root: Part,
}

impl<'a> MimeMessage<'a> {
    pub fn parse(raw: &'a [u8]) -> Self {
        let root = Splitter { raw, budget: MAX_PARTS }.entity(0, raw.len(), false, 0);
        MimeMessage { raw, root }
    }

    pub fn envelope(&self) -> Vec<u8> {
        self.envelope_of(&self.root)
    }

    pub fn body_structure(&self, extended: bool) -> Vec<u8> {
        self.body_of(&self.root, extended)
    }

    pub fn section_bytes(&self, section: &Section) -> Vec<u8> {
        let raw = self.raw;
        if section.part.is_empty() {
            return match &section.text {
                None => raw.to_vec(),
                Some(text) => self.message_text(&self.root, text),
            };
        }
        let Some(p) = self.resolve(&section.part) else {
            return Vec::new();
        };
        match (&section.text, &p.kind) {
            (None, _) => raw[p.body..p.end].to_vec(),
            (Some(SectionText::Mime), _) => raw[p.start..p.body].to_vec(),
            // HEADER / TEXT / HEADER.FIELDS of a part only exist for message/rfc822.
            (Some(text), Kind::Message(inner)) => self.message_text(inner, text),
            (Some(_), _) => Vec::new(),
        }
    }

    pub fn binary_bytes(&self, part: &[u32]) -> Option<Vec<u8>> {
        self.binary(part).ok().map(|(bytes, _)| bytes)
    }

    /// `BINARY[part]` (RFC 3516 §4.2): the decoded bytes, and whether a base64 or
    /// quoted-printable body was decoded (Dovecot then answers with a literal8). A
    /// Content-Transfer-Encoding that is not one known token is `UnknownCte`; a body that does
    /// not decode, or differing duplicate Content-Transfer-Encoding headers, `Parse`.
    pub fn binary(&self, part: &[u32]) -> Result<(Vec<u8>, bool), BinaryError> {
        if part.is_empty() {
            return Ok((self.raw.to_vec(), false));
        }
        let Some(p) = self.resolve(part) else {
            return Ok((Vec::new(), false));
        };
        let body = &self.raw[p.body..p.end];
        let fields = self.fields(p);
        let mut ctes = fields.iter().filter(|f| f.name.eq_ignore_ascii_case(b"Content-Transfer-Encoding"));
        if let Some(first) = ctes.next() {
            if ctes.any(|f| !f.value.trim_ascii().eq_ignore_ascii_case(first.value.trim_ascii())) {
                return Err(BinaryError::Parse);
            }
        }
        let cte = match cte_token(&fields) {
            None => b"7bit".to_vec(),
            Some(None) => return Err(BinaryError::UnknownCte),
            Some(Some(token)) => token,
        };
        match cte.to_ascii_lowercase().as_slice() {
            b"7bit" | b"8bit" | b"binary" => Ok((body.to_vec(), false)),
            b"base64" => base64_decode(body).map(|b| (b, true)).ok_or(BinaryError::Parse),
            b"quoted-printable" => quoted_printable_decode(body).map(|b| (b, true)).ok_or(BinaryError::Parse),
            _ => Err(BinaryError::UnknownCte),
        }
    }

    fn fields(&self, p: &Part) -> Vec<Field<'a>> {
        let raw: &'a [u8] = self.raw;
        scan_header(&raw[p.start..p.body]).0
    }

    /// Follows a part path per RFC 3501 §6.4.5: the parts of a multipart are numbered from
    /// 1, and a non-multipart message body is its own part 1.
    fn resolve(&self, path: &[u32]) -> Option<&Part> {
        fn body_part(msg: &Part, n: u32) -> Option<&Part> {
            match &msg.kind {
                Kind::Multipart(children) => children.get((n as usize).checked_sub(1)?),
                _ => (n == 1).then_some(msg),
            }
        }
        let (&first, rest) = path.split_first()?;
        let mut cur = body_part(&self.root, first)?;
        for &n in rest {
            cur = match &cur.kind {
                Kind::Multipart(children) => children.get((n as usize).checked_sub(1)?)?,
                Kind::Message(inner) => body_part(inner, n)?,
                Kind::Leaf => return None,
            };
        }
        Some(cur)
    }

    /// HEADER, HEADER.FIELDS[.NOT] or TEXT of a message entity.
    fn message_text(&self, msg: &Part, text: &SectionText) -> Vec<u8> {
        match text {
            SectionText::Header => self.raw[msg.start..msg.body].to_vec(),
            SectionText::Text => self.raw[msg.body..msg.end].to_vec(),
            SectionText::Mime => Vec::new(),
            SectionText::HeaderFields { not, fields } => {
                let mut out = Vec::new();
                for f in self.fields(msg) {
                    if fields.iter().any(|n| f.name.eq_ignore_ascii_case(n.as_bytes())) != *not {
                        out.extend_from_slice(f.full);
                    }
                }
                // The empty line that ends a header; like Dovecot, not after a last field that
                // ends the message without a line break.
                if out.last().is_none_or(|&c| c == b'\n') {
                    out.extend_from_slice(b"\r\n");
                }
                out
            }
        }
    }

    fn envelope_of(&self, p: &Part) -> Vec<u8> {
        let f = self.fields(p);
        let addresses = |name| header(&f, name).and_then(|v| address_list(&v));
        let from = addresses("From");
        let lists = [
            addresses("Sender").or_else(|| from.clone()),
            addresses("Reply-To").or_else(|| from.clone()),
            addresses("To"),
            addresses("Cc"),
            addresses("Bcc"),
        ];
        let text = |name| env_ns(header_folded(&f, name));
        let mut items = vec![text("Date"), text("Subject"), from.unwrap_or_else(nil)];
        items.extend(lists.into_iter().map(|l| l.unwrap_or_else(nil)));
        items.push(text("In-Reply-To"));
        items.push(text("Message-ID"));
        list(items)
    }

    fn body_of(&self, p: &Part, ext: bool) -> Vec<u8> {
        let f = self.fields(p);
        let mut items = Vec::new();
        if let Kind::Multipart(children) = &p.kind {
            items.push(children.iter().flat_map(|c| self.body_of(c, ext)).collect::<Vec<u8>>());
            items.push(q(&p.subtype));
            if ext {
                items.push(params_list(&p.params, false));
                items.extend(mime_ext(&f));
            }
            return list(items);
        }
        let is_msg = matches!(p.kind, Kind::Message(_));
        // A message/rfc822 we did not open (nested too deep) is announced as opaque data:
        // "message" "rfc822" would oblige us to send an envelope and a body.
        let (ctype, subtype): (&[u8], &[u8]) = if is_message(&p.ctype, &p.subtype) && !is_msg {
            (b"application", b"octet-stream")
        } else {
            (&p.ctype, &p.subtype)
        };
        let text = ctype.eq_ignore_ascii_case(b"text");
        let body = &self.raw[p.body..p.end];
        items.extend([
            q(ctype),
            q(subtype),
            params_list(&p.params, text),
            ns(header(&f, "Content-ID")),
            ns(header(&f, "Content-Description")),
            q(&encoding(&f)),
            body.len().to_string().into_bytes(),
        ]);
        if let Kind::Message(inner) = &p.kind {
            items.push(self.envelope_of(inner));
            items.push(self.body_of(inner, ext));
        }
        if text || is_msg {
            items.push(body.iter().filter(|&&c| c == b'\n').count().to_string().into_bytes());
        }
        if ext {
            items.push(ns(header(&f, "Content-MD5")));
            items.extend(mime_ext(&f));
        }
        list(items)
    }
}

/// `("name" "value" ...)` or NIL; text parts get a default charset, as Dovecot does.
fn params_list(params: &Params, text: bool) -> Vec<u8> {
    let mut items: Vec<Vec<u8>> = params.iter().map(|(n, v)| [q(n), q(v)].join(&b' ')).collect();
    if text && param(params, "charset").is_none() {
        items.push(b"\"charset\" \"us-ascii\"".to_vec());
    }
    list(items)
}

/// The extension fields shared by all parts: disposition, language, location.
fn mime_ext(f: &[Field<'_>]) -> [Vec<u8>; 3] {
    let disposition = header(f, "Content-Disposition")
        .and_then(|v| parse_mime_value(&v, false))
        .map_or_else(nil, |(kind, _, params)| list(vec![q(&kind), params_list(&params, false)]));
    let languages = header(f, "Content-Language").unwrap_or_default();
    let languages: Vec<Vec<u8>> = languages
        .split(|&c| c == b',')
        .filter_map(|item| {
            let mut cur = Cur::new(item);
            cur.cfws();
            let tag = cur.take_while(is_token);
            (!tag.is_empty()).then(|| q(tag))
        })
        .collect();
    [disposition, list(languages), ns(header(f, "Content-Location"))]
}

// ---------------------------------------------------------------------------------------
// Section specs
// ---------------------------------------------------------------------------------------

/// What follows the part number in a section spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectionText {
    Header,
    /// `HEADER.FIELDS (...)`, or `HEADER.FIELDS.NOT (...)` when `not`; names as given.
    HeaderFields {
        not: bool,
        fields: Vec<String>,
    },
    Text,
    Mime,
}

/// Why `BINARY[part]` cannot be served (RFC 3516 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryError {
    /// `NO [UNKNOWN-CTE]`.
    UnknownCte,
    /// `NO [PARSE]`: the body does not decode.
    Parse,
}

/// A parsed section spec: the text between the brackets of `BODY[...]` / `BINARY[...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Part numbers, e.g. `[1, 2]` for "1.2"; empty for the message itself.
    pub part: Vec<u32>,
    pub text: Option<SectionText>,
}

impl Section {
    /// Parses e.g. "", "HEADER", "1.2.MIME", "2.HEADER.FIELDS (From To)"; `None` on a syntax
    /// error. Keywords are case-insensitive; header field names are kept as given.
    pub fn parse(spec: &str) -> Option<Section> {
        let bytes = spec.as_bytes();
        let mut part = Vec::new();
        let mut i = 0;
        while bytes.get(i).is_some_and(u8::is_ascii_digit) {
            let start = i;
            while bytes.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            if bytes[start] == b'0' {
                return None;
            }
            part.push(spec[start..i].parse::<u32>().ok()?);
            match bytes.get(i) {
                None => return Some(Section { part, text: None }),
                Some(b'.') if i + 1 < bytes.len() => i += 1,
                _ => return None,
            }
        }
        let rest = &spec[i..];
        let text = if rest.is_empty() {
            return Some(Section { part, text: None });
        } else if rest.eq_ignore_ascii_case("HEADER") {
            SectionText::Header
        } else if rest.eq_ignore_ascii_case("TEXT") {
            SectionText::Text
        } else if rest.eq_ignore_ascii_case("MIME") && !part.is_empty() {
            SectionText::Mime
        } else if let Some(list) = strip_prefix_ci(rest, "HEADER.FIELDS.NOT ") {
            SectionText::HeaderFields { not: true, fields: parse_field_list(list)? }
        } else if let Some(list) = strip_prefix_ci(rest, "HEADER.FIELDS ") {
            SectionText::HeaderFields { not: false, fields: parse_field_list(list)? }
        } else {
            return None;
        };
        Some(Section { part, text: Some(text) })
    }
}

impl fmt::Display for Section {
    /// The canonical echo for the FETCH response, e.g. `1.HEADER.FIELDS (FROM TO)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items: Vec<String> = self.part.iter().map(u32::to_string).collect();
        items.extend(self.text.as_ref().map(|text| match text {
            SectionText::Header => "HEADER".to_string(),
            SectionText::Text => "TEXT".to_string(),
            SectionText::Mime => "MIME".to_string(),
            SectionText::HeaderFields { not, fields } => {
                let names: Vec<String> = fields
                    .iter()
                    .map(|name| {
                        let upper = name.to_ascii_uppercase();
                        let atom = !upper.is_empty() && upper.bytes().all(is_atom_char);
                        if atom {
                            upper
                        } else {
                            imap_nstring(Some(upper.as_bytes()))
                        }
                    })
                    .collect();
                format!("HEADER.FIELDS{} ({})", if *not { ".NOT" } else { "" }, names.join(" "))
            }
        }));
        f.write_str(&items.join("."))
    }
}

fn strip_prefix_ci<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

fn is_atom_char(c: u8) -> bool {
    (0x21..0x7f).contains(&c) && !b"(){%*\"\\]".contains(&c)
}

/// `(name name ...)`: atoms or quoted strings, at least one.
fn parse_field_list(list: &str) -> Option<Vec<String>> {
    let mut cur = Cur::new(list.strip_prefix('(')?.strip_suffix(')')?.as_bytes());
    let mut names = Vec::new();
    loop {
        cur.take_while(|c| c == b' ');
        names.push(match cur.peek() {
            None => break,
            Some(b'"') => cur.quoted(),
            Some(_) => cur.take_while(|c| c != b' ' && c != b'"').to_vec(),
        });
    }
    let bad = |n: &Vec<u8>| n.is_empty() || n.iter().any(|&c| c < 0x20 || c == b'(' || c == b')');
    if names.is_empty() || names.iter().any(bad) {
        return None;
    }
    names.into_iter().map(|n| String::from_utf8(n).ok()).collect()
}

// ---------------------------------------------------------------------------------------
// MIME tree
// ---------------------------------------------------------------------------------------

type Params = Vec<(Vec<u8>, Vec<u8>)>;

/// One MIME entity: header at `start..body` (blank line included), body at `body..end`.
struct Part {
    start: usize,
    body: usize,
    end: usize,
    ctype: Vec<u8>,
    subtype: Vec<u8>,
    params: Params,
    kind: Kind,
    /// The header ran to the end without an empty line.
    header_open: bool,
    /// A multipart's close delimiter line: where its text ends (before any line break).
    close_end: Option<usize>,
}

enum Kind {
    Leaf,
    Multipart(Vec<Part>),
    /// message/rfc822 (or message/global): the encapsulated message, spanning our body.
    Message(Box<Part>),
}

struct Splitter<'a> {
    raw: &'a [u8],
    budget: usize,
}

impl Splitter<'_> {
    fn entity(&mut self, start: usize, end: usize, digest: bool, depth: usize) -> Part {
        let raw = self.raw;
        self.budget = self.budget.saturating_sub(1);
        let (fields, header_len) = scan_header(&raw[start..end]);
        let body = start + header_len;
        let mut ct = header(&fields, "Content-Type").and_then(|v| parse_mime_value(&v, true));
        let boundary = ct.as_ref().and_then(|(_, _, p)| param(p, "boundary")).unwrap_or_default();
        let multipart = ct.as_ref().is_some_and(|(t, ..)| t.eq_ignore_ascii_case(b"multipart"));
        if multipart && (boundary.is_empty() || depth >= MAX_DEPTH) {
            ct = None; // a multipart we cannot split gets the default type (RFC 2045 §5.2)
        }
        let (ctype, subtype, params) = ct.unwrap_or_else(|| {
            let (t, s) = if digest { ("message", "rfc822") } else { ("text", "plain") };
            (t.into(), s.into(), Vec::new())
        });
        let header_open = body == end && !ends_with_empty_line(&raw[start..body]);
        let mut close_end = None;
        let kind = if ctype.eq_ignore_ascii_case(b"multipart") {
            let digest = subtype.eq_ignore_ascii_case(b"digest");
            let (ranges, close) = split_multipart(&raw[..end], body, &boundary, self.budget.max(1));
            close_end = close;
            let mut children = Vec::with_capacity(ranges.len());
            for (s, e, next) in ranges {
                let mut child = self.entity(s, e, digest, depth + 1);
                // Dovecot reads the line break before a delimiter as part of the delimiter
                // (RFC 2046 §5.1.1), unless the last line of the part already took it: the
                // close delimiter of a nested multipart, or the header of an enclosed message
                // that never ended. Then the part keeps that line break.
                if inner_close_end(&child) == Some(e) {
                    extend_to(&mut child, next);
                } else if matches!(&child.kind, Kind::Message(m) if m.header_open) {
                    child.end = next;
                }
                children.push(child);
            }
            if children.is_empty() {
                // Like Dovecot: a multipart without parts gets one empty text/plain part.
                children.push(self.entity(end, end, false, depth + 1));
            }
            Kind::Multipart(children)
        } else if is_message(&ctype, &subtype) && depth < MAX_DEPTH {
            // Even with a transfer encoding (which RFC 2046 §5.2.1 forbids), as Dovecot does:
            // the encoded text is then read as a header.
            Kind::Message(Box::new(self.entity(body, end, false, depth + 1)))
        } else {
            Kind::Leaf
        };
        Part { start, body, end, ctype, subtype, params, kind, header_open, close_end }
    }
}

fn ends_with_empty_line(header: &[u8]) -> bool {
    matches!(header, b"\n" | b"\r\n") || header.ends_with(b"\n\n") || header.ends_with(b"\n\r\n")
}

/// Where the close delimiter of the multipart that ends `p` (itself, or inside the message
/// it encloses) ends.
fn inner_close_end(p: &Part) -> Option<usize> {
    match &p.kind {
        Kind::Multipart(_) => p.close_end,
        Kind::Message(inner) => inner_close_end(inner),
        Kind::Leaf => None,
    }
}

fn extend_to(p: &mut Part, end: usize) {
    p.end = end;
    if let Kind::Message(inner) = &mut p.kind {
        extend_to(inner, end);
    }
}

/// Ranges of the parts of the multipart body starting at `start` in `data`, as (start, end,
/// where the next delimiter line starts), and where the close delimiter's text ends. A part
/// ends before the line break preceding the next delimiter line (RFC 2046 §5.1.1); after a
/// missing close delimiter the last part runs to the end.
fn split_multipart(
    data: &[u8],
    start: usize,
    boundary: &[u8],
    max: usize,
) -> (Vec<(usize, usize, usize)>, Option<usize>) {
    let mut delims = Vec::new(); // (line start, next line start, is close delimiter)
    let mut pos = start;
    while pos < data.len() {
        let next = next_line(data, pos);
        if let Some(close) = delimiter(&data[pos..next], boundary) {
            delims.push((pos, next, close));
            if close || delims.len() > max {
                break;
            }
        }
        pos = next;
    }
    let mut parts = Vec::new();
    for (i, &(_, part_start, close)) in delims.iter().enumerate() {
        if close || parts.len() >= max {
            break;
        }
        let next = delims.get(i + 1).map_or(data.len(), |&(d, ..)| d);
        let part_end = match delims.get(i + 1) {
            Some(&(d, ..)) if d >= part_start + 2 && &data[d - 2..d] == b"\r\n" => d - 2,
            Some(&(d, ..)) if d > part_start && data[d - 1] == b'\n' => d - 1,
            Some(&(d, ..)) => d,
            None => data.len(),
        };
        parts.push((part_start, part_end, next));
    }
    let close_end = delims.iter().find(|d| d.2).map(|&(s, e, _)| s + trim_eol(&data[s..e]).len());
    (parts, close_end)
}

/// `Some(is_close)` if `line` is `--boundary` or `--boundary--`, plus optional white space.
fn delimiter(line: &[u8], boundary: &[u8]) -> Option<bool> {
    let rest = line.strip_prefix(b"--")?.strip_prefix(boundary)?;
    let (close, rest) = rest.strip_prefix(b"--").map_or((false, rest), |r| (true, r));
    rest.iter().all(|c| matches!(c, b' ' | b'\t' | b'\r' | b'\n')).then_some(close)
}

fn is_message(ctype: &[u8], subtype: &[u8]) -> bool {
    ctype.eq_ignore_ascii_case(b"message")
        && (subtype.eq_ignore_ascii_case(b"rfc822") || subtype.eq_ignore_ascii_case(b"global"))
}

/// Content-Transfer-Encoding as written; "7bit" when absent or not a single token.
fn encoding(fields: &[Field<'_>]) -> Vec<u8> {
    cte_token(fields).flatten().unwrap_or_else(|| b"7bit".to_vec())
}

/// The Content-Transfer-Encoding token: `None` without the header, `Some(None)` when its value
/// is not a single token.
fn cte_token(fields: &[Field<'_>]) -> Option<Option<Vec<u8>>> {
    header(fields, "Content-Transfer-Encoding").map(|v| {
        let mut cur = Cur::new(&v);
        cur.cfws();
        let token = cur.take_while(is_token).to_vec();
        cur.cfws();
        (!token.is_empty() && cur.peek().is_none()).then_some(token)
    })
}

fn param(params: &Params, name: &str) -> Option<Vec<u8>> {
    params.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v.clone())
}

// ---------------------------------------------------------------------------------------
// Header fields
// ---------------------------------------------------------------------------------------

struct Field<'a> {
    name: &'a [u8],
    /// Raw value after the colon, folding intact, without the final line break.
    value: &'a [u8],
    /// The whole field including its final line break.
    full: &'a [u8],
}

fn next_line(d: &[u8], pos: usize) -> usize {
    d[pos..].iter().position(|&c| c == b'\n').map_or(d.len(), |i| pos + i + 1)
}

fn trim_eol(s: &[u8]) -> &[u8] {
    let s = s.strip_suffix(b"\n").unwrap_or(s);
    s.strip_suffix(b"\r").unwrap_or(s)
}

/// Splits the header off an entity: its fields, and where the body starts (after the blank
/// line, or at the end when there is none).
fn scan_header(d: &[u8]) -> (Vec<Field<'_>>, usize) {
    let mut spans: Vec<(usize, usize, usize)> = Vec::new(); // (start, colon, end)
    let mut pos = 0;
    let body = loop {
        if pos >= d.len() {
            break d.len();
        }
        let next = next_line(d, pos);
        let content = trim_eol(&d[pos..next]);
        if content.is_empty() {
            break next;
        }
        match spans.last_mut() {
            Some(last) if matches!(content[0], b' ' | b'\t') => last.2 = next,
            // Like Dovecot, a line that is not a field (no colon, spaces in the name, an empty
            // name) does not end the header: only the empty line does. It is kept as a field
            // named by the whole line, so HEADER and HEADER.FIELDS.NOT return it verbatim.
            _ => {
                let colon = content.iter().position(|&c| c == b':').unwrap_or(content.len());
                spans.push((pos, pos + colon, next));
            }
        }
        pos = next;
    };
    let field = |(s, colon, e): (usize, usize, usize)| Field {
        name: d[s..colon].trim_ascii_end(),
        value: trim_eol(d.get(colon + 1..e).unwrap_or_default()),
        full: &d[s..e],
    };
    (spans.into_iter().map(field).collect(), body)
}

/// The first field called `name`, unfolded and trimmed.
fn header(fields: &[Field<'_>], name: &str) -> Option<Vec<u8>> {
    header_folded(fields, name).map(|(v, _)| v)
}

/// `header`, and whether the field was folded. Unfolding removes CR and LF and, like Dovecot,
/// turns the white space character that starts a continuation line (a tab too) into a space.
fn header_folded(fields: &[Field<'_>], name: &str) -> Option<(Vec<u8>, bool)> {
    let f = fields.iter().find(|f| f.name.eq_ignore_ascii_case(name.as_bytes()))?;
    let mut unfolded = Vec::with_capacity(f.value.len());
    let mut after_lf = false;
    for &c in f.value {
        match c {
            b'\r' => {}
            b'\n' => after_lf = true,
            b'\t' if std::mem::take(&mut after_lf) => unfolded.push(b' '),
            _ => {
                after_lf = false;
                unfolded.push(c);
            }
        }
    }
    Some((unfolded.trim_ascii().to_vec(), f.value.contains(&b'\n')))
}

/// A cursor over a structured header value.
struct Cur<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cur<'a> {
    fn new(s: &'a [u8]) -> Self {
        Cur { s, i: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn take_while(&mut self, f: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.i;
        while self.peek().is_some_and(&f) {
            self.i += 1;
        }
        &self.s[start..self.i]
    }

    /// Skips white space and comments.
    fn cfws(&mut self) {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r' | b'\n') => self.i += 1,
                Some(b'(') => {
                    self.comment();
                }
                _ => return,
            }
        }
    }

    /// Reads a (nested) comment starting at `(`; returns its unescaped text.
    fn comment(&mut self) -> Vec<u8> {
        let (mut depth, mut out) = (0usize, Vec::new());
        while let Some(c) = self.next() {
            match c {
                b'\\' => out.extend(self.next()),
                b'(' if depth == 0 => depth = 1,
                b'(' => {
                    depth += 1;
                    out.push(c);
                }
                b')' if depth <= 1 => break,
                b')' => {
                    depth -= 1;
                    out.push(c);
                }
                _ => out.push(c),
            }
        }
        out
    }

    /// Reads a quoted string starting at `"`; returns its unescaped content.
    fn quoted(&mut self) -> Vec<u8> {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(c) = self.next() {
            match c {
                b'\\' => out.extend(self.next()),
                b'"' => break,
                _ => out.push(c),
            }
        }
        out
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }
}

fn is_token(c: u8) -> bool {
    c > b' ' && c < 0x7f && !b"()<>@,;:\\\"/[]?=".contains(&c)
}

/// Parses `type/subtype; name=value; ...` (`type; name=value; ...` without `with_subtype`).
fn parse_mime_value(v: &[u8], with_subtype: bool) -> Option<(Vec<u8>, Vec<u8>, Params)> {
    let mut cur = Cur::new(v);
    cur.cfws();
    let main = cur.take_while(is_token).to_vec();
    let mut sub = Vec::new();
    if with_subtype {
        cur.cfws();
        // Like Dovecot, a type without a subtype (`Content-Type: text`) has an empty subtype.
        if cur.peek() == Some(b'/') {
            cur.i += 1;
            cur.cfws();
            sub = cur.take_while(is_token).to_vec();
            if sub.is_empty() {
                return None;
            }
        }
    }
    if main.is_empty() {
        return None;
    }
    let mut params = Params::new();
    loop {
        cur.cfws();
        match cur.peek() {
            None => break,
            Some(b';') => cur.i += 1,
            Some(_) => {
                cur.take_while(|c| c != b';'); // junk
                continue;
            }
        }
        cur.cfws();
        let name = cur.take_while(is_token).to_vec();
        cur.cfws();
        if name.is_empty() || cur.peek() != Some(b'=') {
            continue;
        }
        cur.i += 1;
        cur.cfws();
        let value = match cur.peek() {
            Some(b'"') => cur.quoted(),
            _ => cur.take_while(|c| !matches!(c, b';' | b' ' | b'\t')).to_vec(),
        };
        params.push((name, value));
    }
    Some((main, sub, rfc2231_join(params)))
}

/// RFC 2231 §3 continuations joined as Dovecot does: parameters without `*` keep their order
/// and come first; then the starred ones sorted by name and section number, `name*0`,
/// `name*1`... joined into `name` (`name*` when the first section is extended, `name*0*`).
/// Values are not decoded: `name*=UTF-8''...` is passed through as is.
fn rfc2231_join(params: Params) -> Params {
    let (plain, starred): (Params, Params) = params.into_iter().partition(|(n, _)| !n.contains(&b'*'));
    if starred.is_empty() {
        return plain;
    }
    // (key, section, extended, value); a bare `key*` has no section.
    type Section2231 = (Vec<u8>, Option<u32>, bool, Vec<u8>);
    let mut parts: Vec<Section2231> = starred
        .into_iter()
        .map(|(name, value)| {
            let star = name.iter().position(|&c| c == b'*').unwrap_or(name.len());
            let (key, rest) = (name[..star].to_vec(), &name[star + 1..]);
            let extended = rest.ends_with(b"*") || rest.is_empty();
            let digits = rest.strip_suffix(b"*").unwrap_or(rest);
            let section = std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok());
            match section {
                Some(n) if !digits.is_empty() => (key, Some(n), extended, value),
                // `key*` or something unparsable: kept whole, under its own name.
                _ if rest.is_empty() => (key, None, true, value),
                _ => (name.clone(), None, false, value),
            }
        })
        .collect();
    parts.sort_by(|a, b| a.0.to_ascii_lowercase().cmp(&b.0.to_ascii_lowercase()).then(a.1.cmp(&b.1)));
    let mut out = plain;
    let mut i = 0;
    while i < parts.len() {
        let (key, section, extended, value) = &parts[i];
        let mut name = key.clone();
        if *extended {
            name.push(b'*');
        }
        let mut value = value.clone();
        i += 1;
        if section.is_some() {
            while i < parts.len() && parts[i].0.eq_ignore_ascii_case(key) && parts[i].1.is_some() {
                value.extend_from_slice(&parts[i].3);
                i += 1;
            }
        }
        out.push((name, value));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------

enum Tok {
    /// An atom (dots included), the content of a quoted string, or a domain literal.
    Word(Vec<u8>),
    Special(u8),
    Comment(Vec<u8>),
}

fn tokenize(v: &[u8]) -> Vec<Tok> {
    let mut cur = Cur::new(v);
    let mut toks = Vec::new();
    while let Some(c) = cur.peek() {
        toks.push(match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                cur.i += 1;
                continue;
            }
            b'(' => Tok::Comment(cur.comment().trim_ascii().to_vec()),
            b'"' => Tok::Word(cur.quoted()),
            b'[' => {
                let start = cur.i;
                cur.take_while(|c| c != b']');
                cur.next();
                Tok::Word(v[start..cur.i].to_vec())
            }
            b'<' | b'>' | b'@' | b',' | b';' | b':' | b')' | b']' => {
                cur.i += 1;
                Tok::Special(c)
            }
            _ => Tok::Word(cur.take_while(|c| !b" \t\r\n()<>@,;:\"[]".contains(&c)).to_vec()),
        });
    }
    toks
}

/// `((name adl mailbox host)...)` with RFC 3501 group markers; `None` for an empty list.
/// Lenient like Dovecot's parser: whatever the syntax, something sensible comes out.
fn address_list(value: &[u8]) -> Option<Vec<u8>> {
    const GROUP_END: &[u8] = b"(NIL NIL NIL NIL)";
    let (mut out, mut seg) = (Vec::new(), Vec::new());
    let (mut in_group, mut in_angle) = (false, false);
    for tok in tokenize(value) {
        match tok {
            Tok::Special(b',') if !in_angle => out.extend(mailbox(&mut seg)),
            Tok::Special(b';') if in_group => {
                out.extend(mailbox(&mut seg));
                out.extend_from_slice(GROUP_END);
                (in_group, in_angle) = (false, false);
            }
            Tok::Special(b':') if !in_group && !in_angle => {
                out.extend(list(vec![nil(), nil(), env_string(&words(&seg).join(&b' '), false), nil()]));
                seg.clear();
                in_group = true;
            }
            tok => {
                match tok {
                    Tok::Special(b'<') => in_angle = true,
                    Tok::Special(b'>') => in_angle = false,
                    _ => {}
                }
                seg.push(tok);
            }
        }
    }
    out.extend(mailbox(&mut seg));
    if in_group {
        out.extend_from_slice(GROUP_END);
    }
    (!out.is_empty()).then(|| [&b"("[..], &out, b")"].concat())
}

fn words(toks: &[Tok]) -> Vec<&[u8]> {
    toks.iter()
        .filter_map(|t| match t {
            Tok::Word(w) => Some(&w[..]),
            _ => None,
        })
        .collect()
}

/// One `(name adl mailbox host)` from the tokens of a mailbox; empty if there are none.
fn mailbox(seg: &mut Vec<Tok>) -> Vec<u8> {
    let mut toks = std::mem::take(seg);
    // "user@host (Real Name)": an addr-spec is named by its comment.
    let mut name = toks.iter().rev().find_map(|t| match t {
        Tok::Comment(c) => Some(c.clone()),
        _ => None,
    });
    toks.retain(|t| !matches!(t, Tok::Comment(_)));
    if toks.is_empty() {
        return Vec::new();
    }
    let is = |c: u8| move |t: &Tok| matches!(t, Tok::Special(s) if *s == c);
    let mut addr = &toks[..];
    if let Some(lt) = toks.iter().position(is(b'<')) {
        name = Some(words(&toks[..lt]).join(&b' ')).filter(|n| !n.is_empty());
        addr = &toks[lt + 1..];
        addr = &addr[..addr.iter().position(is(b'>')).unwrap_or(addr.len())];
    }
    let mut adl = None;
    if let (Some(true), Some(colon)) = (addr.first().map(is(b'@')), addr.iter().position(is(b':'))) {
        let text = |t: &Tok| match t {
            Tok::Word(w) => w.clone(),
            Tok::Special(c) => vec![*c],
            Tok::Comment(_) => Vec::new(),
        };
        adl = Some(addr[..colon].iter().flat_map(text).collect::<Vec<u8>>());
        addr = &addr[colon + 1..];
    }
    let at = addr.iter().position(is(b'@')).unwrap_or(addr.len());
    let or = |v: Vec<u8>, missing: &[u8]| if v.is_empty() { missing.to_vec() } else { v };
    // Like Dovecot, never let a broken address pass for a group marker.
    let mailbox = or(words(&addr[..at]).concat(), b"MISSING_MAILBOX");
    let host = or(words(addr.get(at + 1..).unwrap_or_default()).concat(), b"MISSING_DOMAIN");
    let s = |v: &[u8]| env_string(v, false);
    list(vec![name.as_deref().map_or_else(nil, s), adl.as_deref().map_or_else(nil, s), s(&mailbox), s(&host)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test messages are written with LF; stored messages use CRLF.
    fn crlf(s: &str) -> Vec<u8> {
        s.replace('\n', "\r\n").into_bytes()
    }

    fn section(raw: &[u8], spec: &str) -> String {
        String::from_utf8(section_bytes(raw, &Section::parse(spec).unwrap())).unwrap()
    }

    const PLAIN: &str = "From: \"Doe, John\" <john@example.com>
To: Jane Roe <jane@example.org>, bob@example.net
Cc: =?utf-8?q?J=C3=B6rg?= <jorg@example.de>
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from
 the team
Date: Mon, 7 Feb 1994 21:52:25 -0800
Message-ID: <B27397-0100000@example.com>
Content-Type: text/plain; charset=utf-8

Hello Jane,
this is a test.
";

    const ALTERNATIVE: &str = "From: Alice <alice@example.com>
Subject: alt
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary=\"b1\"

This is a MIME message.
--b1
Content-Type: text/plain; charset=us-ascii

Plain body
second line
--b1
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: quoted-printable

<p>HTML =C3=A9</p>
--b1--
";

    const MIXED: &str = "From: bob@example.net
To: alice@example.com
Subject: report
Content-Type: multipart/mixed; boundary=\"==mix==\"

--==mix==
Content-Type: text/plain

See attached.

--==mix==
Content-Type: application/pdf; name=\"report.pdf\"
Content-Transfer-Encoding: base64
Content-Disposition: attachment; filename=\"report.pdf\"

JVBERi0xLjQK
--==mix==--
";

    const NESTED: &str = "From: erin@example.com
To: frank@example.com
Subject: sections
Content-Type: multipart/mixed; boundary=A

--A
Content-Type: text/plain

part one
--A
Content-Type: multipart/mixed; boundary=B

--B
Content-Type: message/rfc822

From: grace@example.com
Subject: deep
Content-Type: multipart/alternative; boundary=C

--C
Content-Type: text/plain

deep text
--C
Content-Type: text/html

<b>deep</b>
--C--
--B--
--A--
";

    #[test]
    fn plain_text_message() {
        let raw = crlf(PLAIN);
        assert_eq!(
            envelope(&raw),
            // A folded Subject is sent as a literal, as Dovecot does.
            "(\"Mon, 7 Feb 1994 21:52:25 -0800\" {41}\r\n=?utf-8?q?Gr=C3=BC=C3=9Fe?= from the team ".to_string()
                + r#"(("Doe, John" NIL "john" "example.com")) (("Doe, John" NIL "john" "example.com")) (("Doe, John" NIL "john" "example.com")) (("Jane Roe" NIL "jane" "example.org")(NIL NIL "bob" "example.net")) (("=?utf-8?q?J=C3=B6rg?=" NIL "jorg" "example.de")) NIL NIL "<B27397-0100000@example.com>")"#
        );
        assert_eq!(
            body_structure(&raw, true),
            r#"("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 30 2 NIL NIL NIL NIL)"#
        );
        assert_eq!(body_structure(&raw, false), r#"("text" "plain" ("charset" "utf-8") NIL NIL "7bit" 30 2)"#);
        // A non-multipart message is its own part 1; 1.MIME is then the message header.
        assert_eq!(section(&raw, "1"), "Hello Jane,\r\nthis is a test.\r\n");
        assert_eq!(section(&raw, "TEXT"), section(&raw, "1"));
        assert_eq!(section(&raw, "1.MIME"), section(&raw, "HEADER"));
        assert_eq!(section(&raw, "2"), "");
        assert_eq!(section(&raw, "1.1"), "");
        assert_eq!(binary_bytes(&raw, &[1]).unwrap(), b"Hello Jane,\r\nthis is a test.\r\n");
    }

    #[test]
    fn multipart_alternative() {
        let raw = crlf(ALTERNATIVE);
        assert_eq!(
            body_structure(&raw, true),
            r#"(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 23 1 NIL NIL NIL NIL)("text" "html" ("charset" "utf-8") NIL NIL "quoted-printable" 18 0 NIL NIL NIL NIL) "alternative" ("boundary" "b1") NIL NIL NIL)"#
        );
        assert_eq!(
            body_structure(&raw, false),
            r#"(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 23 1)("text" "html" ("charset" "utf-8") NIL NIL "quoted-printable" 18 0) "alternative")"#
        );
        assert_eq!(section(&raw, "1"), "Plain body\r\nsecond line");
        assert_eq!(binary_bytes(&raw, &[2]).unwrap(), "<p>HTML é</p>".as_bytes());
    }

    #[test]
    fn multipart_mixed_with_attachment() {
        let raw = crlf(MIXED);
        assert_eq!(
            body_structure(&raw, true),
            r#"(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 15 1 NIL NIL NIL NIL)("application" "pdf" ("name" "report.pdf") NIL NIL "base64" 12 NIL ("attachment" ("filename" "report.pdf")) NIL NIL) "mixed" ("boundary" "==mix==") NIL NIL NIL)"#
        );
        assert_eq!(section(&raw, "2"), "JVBERi0xLjQK");
        assert_eq!(binary_bytes(&raw, &[2]).unwrap(), b"%PDF-1.4\n");
        assert_eq!(binary_bytes(&raw, &[3]).unwrap(), b"");
    }

    #[test]
    fn nested_message_rfc822() {
        let raw = crlf(NESTED);
        // "--C--" is directly followed by "--B--": like Dovecot, message 2.1 keeps the line
        // break after its close delimiter (187 octets, 13 lines).
        let inner_env = r#"(NIL "deep" ((NIL NIL "grace" "example.com")) ((NIL NIL "grace" "example.com")) ((NIL NIL "grace" "example.com")) NIL NIL NIL NIL NIL)"#;
        assert_eq!(
            body_structure(&raw, true),
            format!(
                r#"(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 0 NIL NIL NIL NIL)(("message" "rfc822" NIL NIL NIL "7bit" 187 {inner_env} (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 9 0 NIL NIL NIL NIL)("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 11 0 NIL NIL NIL NIL) "alternative" ("boundary" "C") NIL NIL NIL) 13 NIL NIL NIL NIL) "mixed" ("boundary" "B") NIL NIL NIL) "mixed" ("boundary" "A") NIL NIL NIL)"#
            )
        );
        assert_eq!(
            body_structure(&raw, false),
            format!(
                r#"(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 8 0)(("message" "rfc822" NIL NIL NIL "7bit" 187 {inner_env} (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 9 0)("text" "html" ("charset" "us-ascii") NIL NIL "7bit" 11 0) "alternative") 13) "mixed") "mixed")"#
            )
        );
    }

    #[test]
    fn sections() {
        let raw = crlf(NESTED);
        let header = "From: erin@example.com\r\nTo: frank@example.com\r\nSubject: sections\r\n\
                      Content-Type: multipart/mixed; boundary=A\r\n\r\n";
        assert_eq!(section(&raw, ""), NESTED.replace('\n', "\r\n"));
        assert_eq!(section(&raw, "HEADER"), header);
        assert_eq!(section(&raw, "TEXT"), NESTED.replace('\n', "\r\n")[header.len()..]);
        assert_eq!(section(&raw, "1"), "part one");
        assert_eq!(section(&raw, "1.MIME"), "Content-Type: text/plain\r\n\r\n");
        assert_eq!(section(&raw, "2.1.MIME"), "Content-Type: message/rfc822\r\n\r\n");
        let inner_header = "From: grace@example.com\r\nSubject: deep\r\n\
                            Content-Type: multipart/alternative; boundary=C\r\n\r\n";
        assert_eq!(section(&raw, "2.1.HEADER"), inner_header);
        assert_eq!(section(&raw, "2.1.header.fields (subject)"), "Subject: deep\r\n\r\n");
        let inner_text = "--C\r\nContent-Type: text/plain\r\n\r\ndeep text\r\n--C\r\n\
                          Content-Type: text/html\r\n\r\n<b>deep</b>\r\n--C--\r\n";
        assert_eq!(section(&raw, "2.1.TEXT"), inner_text);
        assert_eq!(section(&raw, "2.1"), format!("{inner_header}{inner_text}"));
        assert_eq!(section(&raw, "2.1.2"), "<b>deep</b>");
        assert_eq!(section(&raw, "2.1.1.MIME"), "Content-Type: text/plain\r\n\r\n");
        assert_eq!(
            section(&raw, "HEADER.FIELDS (Subject From)"),
            "From: erin@example.com\r\nSubject: sections\r\n\r\n"
        );
        assert_eq!(
            section(&raw, "HEADER.FIELDS.NOT (Subject)"),
            "From: erin@example.com\r\nTo: frank@example.com\r\nContent-Type: multipart/mixed; boundary=A\r\n\r\n"
        );
        assert_eq!(section(&raw, "HEADER.FIELDS (X-Missing)"), "\r\n");
        // Missing parts, and HEADER/TEXT of parts that are not messages, are empty.
        for spec in ["3", "1.1", "2.2", "2.1.3", "1.HEADER", "2.TEXT", "2.1.1.TEXT"] {
            assert_eq!(section(&raw, spec), "", "{spec}");
        }
    }

    #[test]
    fn groups_in_address_lists() {
        let raw = crlf(
            "From: Boss <boss@example.com>\nTo: Team: ann@example.com, \"Ben B.\" <ben@example.com>;,\n \
             undisclosed-recipients:;\nCc: <@relay.example:carl@example.com>, dora (Dora D.)\n\
             Subject: groups\n\nbody\n",
        );
        assert_eq!(
            envelope(&raw),
            r#"(NIL "groups" (("Boss" NIL "boss" "example.com")) (("Boss" NIL "boss" "example.com")) (("Boss" NIL "boss" "example.com")) ((NIL NIL "Team" NIL)(NIL NIL "ann" "example.com")("Ben B." NIL "ben" "example.com")(NIL NIL NIL NIL)(NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) ((NIL "@relay.example" "carl" "example.com")("Dora D." NIL "dora" "MISSING_DOMAIN")) NIL NIL NIL)"#
        );
    }

    #[test]
    fn malformed_mime() {
        // Missing close delimiter: the last part runs to the end.
        let raw =
            crlf("Content-Type: multipart/mixed; boundary=zz\n\n--zz\nContent-Type: text/plain\n\nunterminated\n");
        assert_eq!(
            body_structure(&raw, false),
            r#"(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 1) "mixed")"#
        );
        // No blank line after the header: like Dovecot, a line that is not a field does not end
        // the header, only an empty line does.
        let raw = crlf("Subject: x\nhello world\n");
        assert_eq!(body_structure(&raw, false), r#"("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)"#);
        assert_eq!(section(&raw, "HEADER"), "Subject: x\r\nhello world\r\n");
        // Unusable Content-Type, and a multipart without boundary: text/plain.
        for ct in ["/", "text/", "multipart/mixed", "multipart/mixed; boundary=\"\""] {
            let raw = crlf(&format!("Content-Type: {ct}\n\nabc"));
            assert_eq!(body_structure(&raw, false), r#"("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 0)"#);
        }
        // A type without subtype keeps an empty subtype, as in Dovecot.
        let raw = crlf("Content-Type: text\n\nabc");
        assert_eq!(body_structure(&raw, false), r#"("text" "" ("charset" "us-ascii") NIL NIL "7bit" 3 0)"#);
        // An encoded message/rfc822 is still parsed, as Dovecot does: its text is read as a
        // header that never ends (hence no envelope and an empty body), and the line break
        // before the next delimiter stays in the part. A digest part defaults to
        // message/rfc822.
        let raw = crlf(
            "Content-Type: multipart/digest; boundary=d\n\n--d\nContent-Type: message/rfc822\n\
             Content-Transfer-Encoding: base64\n\nRnJvbTogYUBiDQoNCmhp\n--d\n\nFrom: x@y\nSubject: d1\n\none\n--d--\n",
        );
        assert_eq!(
            body_structure(&raw, false),
            r#"(("message" "rfc822" NIL NIL NIL "base64" 22 (NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) 1)("message" "rfc822" NIL NIL NIL "7bit" 29 (NIL "d1" ((NIL NIL "x" "y")) ((NIL NIL "x" "y")) ((NIL NIL "x" "y")) NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 0) 3) "digest")"#
        );
        assert_eq!(binary_bytes(&raw, &[1]).unwrap(), b"From: a@b\r\n\r\nhi");
        let raw = crlf("Content-Transfer-Encoding: x-uuencode\n\nbegin");
        assert_eq!(binary_bytes(&raw, &[1]), None);
        // BINARY errors (RFC 3516 §4.3): a CTE that is not one token, a body that does not
        // decode, differing duplicate CTE headers; decoding is reported for the literal8.
        let raw = crlf("Content-Transfer-Encoding: bogus with spaces\n\nx");
        assert_eq!(MimeMessage::parse(&raw).binary(&[1]), Err(BinaryError::UnknownCte));
        let raw = crlf("Content-Transfer-Encoding: base64\n\n<p>not base64</p>");
        assert_eq!(MimeMessage::parse(&raw).binary(&[1]), Err(BinaryError::Parse));
        let raw = crlf("Content-Transfer-Encoding: 7bit\nContent-Transfer-Encoding: base64\n\nx");
        assert_eq!(MimeMessage::parse(&raw).binary(&[1]), Err(BinaryError::Parse));
        let raw = crlf("Content-Transfer-Encoding: BASE64\n\nAGhp");
        assert_eq!(MimeMessage::parse(&raw).binary(&[1]), Ok((b"\0hi".to_vec(), true)));
        let raw = crlf("\nplain");
        assert_eq!(MimeMessage::parse(&raw).binary(&[1]), Ok((b"plain".to_vec(), false)));
        // Empty input.
        assert_eq!(envelope(b""), "(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)");
        assert_eq!(body_structure(b"", false), r#"("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)"#);
    }

    #[test]
    fn dovecot_quirks() {
        // RFC 2231: continuations joined, charset form passed through, starred ones last.
        let raw = crlf(
            "Content-Type: application/pdf; name*=UTF-8''a%20b.pdf\nContent-Disposition: attachment;\n \
             filename*1=\" two\"; size=3; filename*0=\"one\"\n\nabc",
        );
        assert_eq!(
            body_structure(&raw, true),
            r#"("application" "pdf" ("name*" "UTF-8''a%20b.pdf") NIL NIL "7bit" 3 NIL ("attachment" ("size" "3" "filename" "one two")) NIL NIL)"#
        );
        // ENVELOPE strings with quotes or 8-bit bytes are literals, the bytes as they are.
        let raw = b"From: \"A \\\"B\\\"\" <a@example.com>\r\nSubject: caf\xe9\r\n\r\n".to_vec();
        let env = MimeMessage::parse(&raw).envelope();
        assert!(env.starts_with(b"(NIL {4}\r\ncaf\xe9 (({5}\r\nA \"B\" NIL \"a\" \"example.com\"))"), "{env:?}");
        // HEADER.FIELDS of a header that ends the message without a line break.
        let raw = b"Subject: s\r\nTo: t@example.com".to_vec();
        assert_eq!(section(&raw, "HEADER.FIELDS (Subject)"), "Subject: s\r\n\r\n");
        assert_eq!(section(&raw, "HEADER.FIELDS (To)"), "To: t@example.com");
    }

    #[test]
    fn section_parsing() {
        let echo = |s: &str| Section::parse(s).map(|s| s.to_string());
        assert_eq!(Section::parse(""), Some(Section { part: vec![], text: None }));
        assert_eq!(
            Section::parse("2.header.fields (From to)"),
            Some(Section {
                part: vec![2],
                text: Some(SectionText::HeaderFields { not: false, fields: vec!["From".into(), "to".into()] })
            })
        );
        assert_eq!(echo("2.header.fields (From to)").unwrap(), "2.HEADER.FIELDS (FROM TO)");
        assert_eq!(echo("HEADER.FIELDS.NOT (Received)").unwrap(), "HEADER.FIELDS.NOT (RECEIVED)");
        assert_eq!(echo("header.fields (\"X Odd\")").unwrap(), "HEADER.FIELDS (\"X ODD\")");
        assert_eq!(echo("1.2.mime").unwrap(), "1.2.MIME");
        assert_eq!(echo("3.1.Text").unwrap(), "3.1.TEXT");
        assert_eq!(echo("header").unwrap(), "HEADER");
        assert_eq!(echo("12").unwrap(), "12");
        for bad in [
            "MIME",
            "0",
            "01",
            "1.",
            "1..2",
            ".1",
            "1.FOO",
            "TEXT.1",
            "1 ",
            " HEADER",
            "HEADER.FIELDS",
            "HEADER.FIELDS ()",
            "HEADER.FIELDS (From",
            "HEADER.FIELDS From",
            "99999999999",
        ] {
            assert_eq!(Section::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn nstring_quoting() {
        assert_eq!(imap_nstring(None), "NIL");
        assert_eq!(imap_nstring(Some(b"")), "\"\"");
        assert_eq!(imap_nstring(Some(br#"a"b\c"#)), r#""a\"b\\c""#);
        assert_eq!(imap_nstring(Some("é".as_bytes())), "\"é\"");
        assert_eq!(imap_nstring(Some(b"two\r\nlines")), "{10}\r\ntwo\r\nlines");
        assert_eq!(imap_nstring(Some(b"nul\0")), "{4}\r\nnul\0");
        assert_eq!(imap_nstring(Some(&[b'x'; 1000])), format!("\"{}\"", "x".repeat(1000)));
        assert_eq!(imap_nstring(Some(&[b'x'; 1001])), format!("{{1001}}\r\n{}", "x".repeat(1001)));
    }

    fn exercise(raw: &[u8]) {
        let msg = MimeMessage::parse(raw);
        let _ = (msg.envelope(), msg.body_structure(true), msg.body_structure(false));
        for spec in ["", "HEADER", "TEXT", "1", "2", "1.MIME", "2.1", "2.1.HEADER", "2.1.TEXT", "2.1.2.MIME"] {
            let _ = msg.section_bytes(&Section::parse(spec).unwrap());
        }
        let _ = msg.section_bytes(&Section::parse("HEADER.FIELDS (From Subject)").unwrap());
        let _ = msg.section_bytes(&Section::parse("2.1.HEADER.FIELDS.NOT (From)").unwrap());
        for part in [&[][..], &[1], &[2], &[2, 1], &[2, 1, 1]] {
            let _ = msg.binary_bytes(part);
        }
    }

    #[test]
    fn never_panics() {
        let samples: Vec<Vec<u8>> = [PLAIN, ALTERNATIVE, MIXED, NESTED].iter().map(|m| crlf(m)).collect();
        for raw in &samples {
            for len in 0..=raw.len() {
                exercise(&raw[..len]);
                exercise(&raw[len..]);
            }
        }
        let noise = b"\r\n\r\n\t \"\\()<>@,;:=-./[]?*%{}\0\xff\xc3Aa1";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..3000 {
            let mut raw = samples[rand(samples.len())].clone();
            for _ in 0..1 + rand(8) {
                let at = rand(raw.len() + 1);
                match rand(3) {
                    0 if at < raw.len() => raw[at] = noise[rand(noise.len())],
                    1 if at < raw.len() => drop(raw.remove(at)),
                    _ => raw.insert(at, noise[rand(noise.len())]),
                }
            }
            exercise(&raw);
            let spec: String = (0..rand(12)).map(|_| noise[rand(noise.len())] as char).collect();
            let _ = Section::parse(&spec).map(|s| s.to_string());
            let _ = Section::parse(&format!("1.HEADER.FIELDS ({spec})")).map(|s| s.to_string());
        }
        // Deep nesting and huge part counts stay bounded.
        let mut deep = Vec::new();
        for i in 0..2000 {
            deep.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n").as_bytes(),
            );
        }
        exercise(&deep);
        exercise(&b"Content-Type: message/rfc822\r\n\r\n".repeat(2000));
        let mut many = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n".to_vec();
        many.extend(b"--x\r\n".repeat(50_000));
        let parts = body_structure(&many, false).matches("(\"text\"").count();
        assert!(parts < MAX_PARTS, "{parts}");
    }
}
