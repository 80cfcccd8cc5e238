//! Message submission (RFC 6409) policy: who may send as which address, per-user sending rate,
//! and completing the header section (Date, Message-ID; RFC 6409 §8).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth::AuthLimiter;
use crate::config::{Config, SubmissionSettings, User};
use crate::routing::{Destination, Router};
use crate::smtp::address::parse_mailbox;

/// What submission sessions share: the users, their sender addresses and the limits.
pub struct SubmissionContext {
    pub settings: SubmissionSettings,
    pub users: BTreeMap<String, User>,
    /// Per user: the exact-address aliases that deliver to them.
    pub aliases: BTreeMap<String, Vec<String>>,
    pub separator: Option<char>,
    /// Failed AUTH attempts (shared with other protocols).
    pub auth_limiter: Arc<AuthLimiter>,
    pub rate: SendRate,
}

impl SubmissionContext {
    pub fn new(config: &Config, router: &Router, auth_limiter: Arc<AuthLimiter>) -> Self {
        let mut aliases: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for source in config.aliases.keys().filter(|s| !s.starts_with('@')) {
            let Ok(addr) = parse_mailbox(source) else { continue };
            let Ok(dests) = router.resolve(&addr) else { continue };
            for d in dests {
                if let Destination::Mailbox(user) = d {
                    aliases.entry(user).or_default().push(source.clone());
                }
            }
        }
        SubmissionContext {
            settings: config.submission.clone(),
            users: config.users.clone(),
            aliases,
            separator: config.cluster.subaddress_separator,
            auth_limiter,
            rate: SendRate::default(),
        }
    }

    pub fn max_recipients(&self, user: &str) -> usize {
        self.users.get(user).and_then(|u| u.max_recipients).unwrap_or(self.settings.max_recipients)
    }

    pub fn max_messages_per_hour(&self, user: &str) -> usize {
        self.users.get(user).and_then(|u| u.max_messages_per_hour).unwrap_or(self.settings.max_messages_per_hour)
    }

    pub fn save_sent(&self, user: &str) -> bool {
        self.users.get(user).and_then(|u| u.save_sent).unwrap_or(self.settings.save_sent)
    }

    /// Whether `user` may use `address` as envelope sender or in From:.
    pub fn may_send_as(&self, user: &str, address: &str) -> bool {
        let send_as = self.users.get(user).map(|u| u.send_as.as_slice()).unwrap_or(&[]);
        let aliases = self.aliases.get(user).map(|a| a.as_slice()).unwrap_or(&[]);
        sender_allowed(address, user, send_as, aliases, self.separator)
    }
}

/// The sender policy. `user` is the authenticated (lowercase) address; `send_as` holds extra
/// addresses or `@domain` entries; `aliases` the exact-address aliases that deliver to the user.
/// Comparison is case-insensitive, and `local+tag@domain` counts as `local@domain` when
/// `separator` is set.
pub fn sender_allowed(
    address: &str,
    user: &str,
    send_as: &[String],
    aliases: &[String],
    separator: Option<char>,
) -> bool {
    let address = address.to_lowercase();
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    if local.is_empty() || domain.is_empty() {
        return false;
    }
    let mut candidates = vec![address.clone()];
    if let Some(sep) = separator {
        if let Some((base, _)) = local.split_once(sep) {
            if !base.is_empty() {
                candidates.push(format!("{base}@{domain}"));
            }
        }
    }
    let exact = |a: &str| candidates.iter().any(|c| c.eq_ignore_ascii_case(a));
    if exact(user) || aliases.iter().any(|a| exact(a)) {
        return true;
    }
    send_as.iter().any(|s| match s.strip_prefix('@') {
        Some(d) => d.eq_ignore_ascii_case(domain),
        None => exact(s),
    })
}

/// Messages accepted per user in the last hour (a sliding window). One entry per user that sent
/// recently, each at most its limit long: bounded by the configured users.
#[derive(Default)]
pub struct SendRate {
    sent: Mutex<HashMap<String, VecDeque<Instant>>>,
}

const HOUR: Duration = Duration::from_secs(3600);

impl SendRate {
    /// True while `user` has sent fewer than `limit` messages in the last hour.
    pub fn allowed(&self, user: &str, limit: usize) -> bool {
        self.allowed_at(user, limit, Instant::now())
    }

    fn allowed_at(&self, user: &str, limit: usize, now: Instant) -> bool {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let Some(q) = sent.get_mut(user) else { return limit > 0 };
        while q.front().is_some_and(|t| now.duration_since(*t) >= HOUR) {
            q.pop_front();
        }
        if q.is_empty() {
            sent.remove(user);
            return limit > 0;
        }
        q.len() < limit
    }

    /// Counts one accepted message.
    pub fn record(&self, user: &str, limit: usize) {
        self.record_at(user, limit, Instant::now());
    }

    fn record_at(&self, user: &str, limit: usize, now: Instant) {
        let mut sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        let q = sent.entry(user.to_string()).or_default();
        q.push_back(now);
        while q.len() > limit.max(1) {
            q.pop_front();
        }
    }
}

/// The header section is held back at most this long to complete it; past it the message
/// passes through unchanged.
pub const MAX_HEADER_SECTION: usize = 256 * 1024;

/// Holds back the start of a submitted message until the end of its header section, then
/// releases it with `Date:` and `Message-ID:` added when missing.
pub struct HeaderBuffer {
    buf: Vec<u8>,
    passing: bool,
    hostname: String,
    /// Every address of every From: field, once the header section was seen.
    pub from: Vec<String>,
    /// A From: field whose addresses could not be read (empty or unparsable).
    pub from_unreadable: bool,
    /// The header section was larger than `MAX_HEADER_SECTION`: not completed.
    pub overflow: bool,
}

impl HeaderBuffer {
    pub fn new(hostname: &str) -> Self {
        HeaderBuffer {
            buf: Vec::new(),
            passing: false,
            hostname: hostname.to_string(),
            from: Vec::new(),
            from_unreadable: false,
            overflow: false,
        }
    }

    /// Takes message bytes in order; returns what may be written now.
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.passing {
            return data.to_vec();
        }
        let scan_from = self.buf.len().saturating_sub(3);
        self.buf.extend_from_slice(data);
        let end = if self.buf.starts_with(b"\r\n") {
            Some(0)
        } else {
            find(&self.buf[scan_from..], b"\r\n\r\n").map(|i| scan_from + i + 2)
        };
        if let Some(end) = end {
            let rest = self.buf.split_off(end);
            let header = std::mem::take(&mut self.buf);
            let mut out = self.complete(&header);
            out.extend_from_slice(&rest);
            self.passing = true;
            return out;
        }
        if self.buf.len() > MAX_HEADER_SECTION {
            self.overflow = true;
            self.passing = true;
            let buf = std::mem::take(&mut self.buf);
            self.inspect(&buf);
            return buf;
        }
        Vec::new()
    }

    /// The end of the message: whatever is still held back (a message of header fields only).
    pub fn finish(&mut self) -> Vec<u8> {
        if self.passing {
            return Vec::new();
        }
        self.passing = true;
        let mut buf = std::mem::take(&mut self.buf);
        if !buf.is_empty() && !buf.ends_with(b"\n") {
            buf.extend_from_slice(b"\r\n");
        }
        self.complete(&buf)
    }

    /// Records the From: addresses; returns which of Date / Message-ID are present.
    fn inspect(&mut self, header: &[u8]) -> (bool, bool) {
        let (mut date, mut msgid) = (false, false);
        for field in fields(header) {
            let name = field.split(|&b| b == b':').next().unwrap_or_default();
            let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
            match name.as_str() {
                "date" => date = true,
                "message-id" => msgid = true,
                "from" => {
                    let mut raw = field.to_vec();
                    raw.extend_from_slice(b"\r\n");
                    let parsed = mail_parser::MessageParser::default().parse_headers(&raw);
                    let addrs: Vec<String> = parsed
                        .as_ref()
                        .and_then(|m| m.from())
                        .map(|a| a.iter().filter_map(|a| a.address().map(|s| s.to_string())).collect())
                        .unwrap_or_default();
                    if addrs.is_empty() {
                        self.from_unreadable = true;
                    }
                    self.from.extend(addrs);
                }
                _ => {}
            }
        }
        (date, msgid)
    }

    /// The header section (ending in CRLF, without the empty line) with the missing fields.
    fn complete(&mut self, header: &[u8]) -> Vec<u8> {
        let (date, msgid) = self.inspect(header);
        let mut out = header.to_vec();
        if !date {
            let now = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S +0000");
            out.extend_from_slice(format!("Date: {now}\r\n").as_bytes());
        }
        if !msgid {
            let id = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
            out.extend_from_slice(format!("Message-ID: <{id}@{}>\r\n", self.hostname).as_bytes());
        }
        out
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Header fields with their continuation lines, without the final CRLF.
fn fields(header: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    let mut start: Option<usize> = None;
    let mut pos = 0;
    for line in header.split_inclusive(|&b| b == b'\n') {
        let folded = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if !folded {
            if let Some(s) = start {
                out.push(trim_crlf(&header[s..pos]));
            }
            start = Some(pos);
        }
        pos += line.len();
    }
    if let Some(s) = start {
        out.push(trim_crlf(&header[s..pos]));
    }
    out.into_iter().filter(|f| !f.is_empty()).collect()
}

fn trim_crlf(mut s: &[u8]) -> &[u8] {
    while let Some((&last, rest)) = s.split_last() {
        if last == b'\n' || last == b'\r' {
            s = rest;
        } else {
            break;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(addr: &str) -> bool {
        let send_as = vec!["shared@example.org".to_string(), "@other.example".to_string()];
        let aliases = vec!["postmaster@example.org".to_string()];
        sender_allowed(addr, "alice@example.org", &send_as, &aliases, Some('+'))
    }

    #[test]
    fn sender_policy() {
        assert!(allowed("alice@example.org"));
        assert!(allowed("Alice@Example.ORG"));
        assert!(allowed("alice+lists@example.org"));
        assert!(allowed("postmaster@example.org"));
        assert!(allowed("PostMaster+x@example.org"));
        assert!(allowed("shared@example.org"));
        assert!(allowed("anyone@other.example"));
        assert!(allowed("anyone@OTHER.example"));
        assert!(!allowed("bob@example.org"));
        assert!(!allowed("alice@example.net"));
        assert!(!allowed("alicex@example.org"));
        assert!(!allowed("x@sub.other.example"));
        assert!(!allowed("+tag@example.org"));
        assert!(!allowed("alice"));
        assert!(!allowed(""));
        assert!(!sender_allowed("alice+x@example.org", "alice@example.org", &[], &[], None));
        assert!(sender_allowed("alice-x@example.org", "alice@example.org", &[], &[], Some('-')));
    }

    #[test]
    fn send_rate_window() {
        let r = SendRate::default();
        let t = Instant::now();
        assert!(r.allowed_at("a", 2, t));
        r.record_at("a", 2, t);
        assert!(r.allowed_at("a", 2, t));
        r.record_at("a", 2, t + Duration::from_secs(10));
        assert!(!r.allowed_at("a", 2, t + Duration::from_secs(20)));
        assert!(r.allowed_at("b", 2, t));
        assert!(r.allowed_at("a", 2, t + HOUR + Duration::from_secs(1)));
        assert!(r.allowed_at("a", 2, t + HOUR * 2));
        assert!(r.sent.lock().unwrap().is_empty());
        for i in 0..10 {
            r.record_at("c", 3, t + Duration::from_secs(i));
        }
        assert_eq!(r.sent.lock().unwrap()["c"].len(), 3);
    }

    fn run(chunks: &[&[u8]]) -> (String, HeaderBuffer) {
        let mut h = HeaderBuffer::new("mail.example.org");
        let mut out = Vec::new();
        for c in chunks {
            out.extend(h.feed(c));
        }
        out.extend(h.finish());
        (String::from_utf8(out).unwrap(), h)
    }

    #[test]
    fn adds_missing_fields() {
        let (out, h) = run(&[b"From: Alice <alice@example.org>\r\nSubj", b"ect: hi\r\n\r", b"\nbody\r\n\r\nmore\r\n"]);
        assert!(out.starts_with("From: Alice <alice@example.org>\r\nSubject: hi\r\nDate: "), "{out}");
        assert!(out.contains("\r\nMessage-ID: <"), "{out}");
        assert!(out.contains("@mail.example.org>\r\n\r\nbody\r\n\r\nmore\r\n"), "{out}");
        assert_eq!(h.from, vec!["alice@example.org"]);
        assert!(!h.from_unreadable);
    }

    #[test]
    fn keeps_present_fields() {
        let msg = "from: a@example.org, \"B\" <b@example.org>\r\nDATE: Sat, 21 Nov 2026 10:00:00 +0000\r\n\
                   Message-Id:\r\n <x@y>\r\n\r\nbody\r\n";
        let (out, h) = run(&[msg.as_bytes()]);
        assert_eq!(out, msg);
        assert_eq!(h.from, vec!["a@example.org", "b@example.org"]);
    }

    #[test]
    fn headers_only_and_empty() {
        let (out, _) = run(&[b"Subject: x"]);
        assert!(out.starts_with("Subject: x\r\nDate: "), "{out}");
        assert!(out.ends_with(">\r\n"));
        let (out, _) = run(&[b"\r\nbody\r\n"]);
        assert!(out.starts_with("Date: "), "{out}");
        assert!(out.ends_with(">\r\n\r\nbody\r\n"), "{out}");
    }

    #[test]
    fn unreadable_and_oversized() {
        let (_, h) = run(&[b"From: nobody\r\n\r\n"]);
        assert!(h.from_unreadable);
        let big = format!("From: a@example.org\r\nX-Big: {}\r\n", "x".repeat(MAX_HEADER_SECTION));
        let (out, h) = run(&[big.as_bytes(), b"\r\nbody\r\n"]);
        assert!(h.overflow);
        assert_eq!(out, format!("{big}\r\nbody\r\n"));
        assert_eq!(h.from, vec!["a@example.org"]);
    }
}
