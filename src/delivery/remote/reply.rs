//! Parsing what a remote SMTP server says: multi-line replies (RFC 5321 §4.2.1), RFC 3463
//! enhanced status codes, and the EHLO keywords (RFC 5321 §4.1.1.1). Everything here treats
//! the server as untrusted: bounded lines and line counts, no panics on any byte sequence.

use std::fmt;

/// Longest reply line we accept, CRLF included. RFC 5321 §4.5.3.1.5 sets 512; real servers
/// exceed it with long texts, so allow some slack but keep a bound.
pub const MAX_LINE: usize = 4096;
/// Most lines in one reply. A long EHLO list has ~20; a server streaming continuation lines
/// forever must not make us buffer forever.
pub const MAX_LINES: usize = 128;

/// One reply from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// RFC 3463 `class.subject.detail`, when the first line starts with one whose class agrees
    /// with the code.
    pub enhanced: Option<String>,
    /// Each line's text, without the code and without a repeated enhanced code.
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// Parses complete reply lines (without CRLF). `None` when they do not form one valid reply.
    pub fn parse(raw: &[Vec<u8>]) -> Option<Reply> {
        let mut code = 0;
        let mut texts = Vec::with_capacity(raw.len());
        for (i, line) in raw.iter().enumerate() {
            let (c, last, text) = parse_line(line)?;
            if last != (i + 1 == raw.len()) {
                return None;
            }
            // RFC 5321 §4.2.1 says all lines carry the same code; the last line decides if not.
            code = c;
            texts.push(text);
        }
        if texts.is_empty() {
            return None;
        }
        let enhanced = enhanced_code(&texts[0], code);
        if let Some(e) = &enhanced {
            for t in &mut texts {
                if let Some(rest) = t.strip_prefix(e.as_str()) {
                    if rest.is_empty() || rest.starts_with(' ') {
                        *t = rest.trim_start().to_string();
                    }
                }
            }
        }
        Some(Reply { code, enhanced, lines: texts })
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = &self.enhanced {
            write!(f, " {e}")?;
        }
        if !self.lines.is_empty() {
            write!(f, " {}", self.lines.join(" / "))?;
        }
        Ok(())
    }
}

/// Splits `250-text` / `250 text` / `250`. Returns (code, is_last, text).
pub(super) fn parse_line(line: &[u8]) -> Option<(u16, bool, String)> {
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = u16::from(line[0] - b'0') * 100 + u16::from(line[1] - b'0') * 10 + u16::from(line[2] - b'0');
    // RFC 5321 §4.2: first digit 2..5 (1yz is never used by SMTP), second 0..5.
    if !(200..600).contains(&code) || line[1] > b'5' {
        return None;
    }
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return None,
    };
    let text: String = String::from_utf8_lossy(text).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    Some((code, last, text))
}

fn enhanced_code(text: &str, code: u16) -> Option<String> {
    let token = text.split(' ').next()?;
    let parts: Vec<&str> = token.split('.').collect();
    let ok = parts.len() == 3
        && parts.iter().all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        && parts[0].len() == 1
        && u16::from(parts[0].as_bytes()[0] - b'0') == code / 100;
    ok.then(|| token.to_string())
}

/// What the server announced in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// False after a HELO fallback: no extension may be used then.
    pub esmtp: bool,
    pub pipelining: bool,
    pub chunking: bool,
    pub starttls: bool,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub enhanced_status_codes: bool,
    /// `Some(0)` means SIZE without a fixed limit (RFC 1870 §4).
    pub size: Option<u64>,
    /// SASL mechanisms, upper case.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Reads the keywords of an EHLO reply (every line after the first).
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities { esmtp: true, ..Capabilities::default() };
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else { continue };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "CHUNKING" => caps.chunking = true,
                "STARTTLS" => caps.starttls = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                // An unparsable limit is treated as "no fixed limit": the server still checks.
                "SIZE" => caps.size = Some(words.next().and_then(|w| w.parse().ok()).unwrap_or(0)),
                "AUTH" => caps.auth.extend(words.map(|w| w.to_ascii_uppercase())),
                _ => {}
            }
        }
        caps
    }

    /// The server's fixed size limit, if it announced one.
    pub fn size_limit(&self) -> Option<u64> {
        self.size.filter(|&s| s > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &[&str]) -> Vec<Vec<u8>> {
        s.iter().map(|l| l.as_bytes().to_vec()).collect()
    }

    #[test]
    fn multi_line_and_enhanced() {
        let r = Reply::parse(&lines(&["550-5.1.1 No such user", "550 5.1.1 here"])).unwrap();
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(r.lines, vec!["No such user", "here"]);
        assert!(r.is_permanent());
        let r = Reply::parse(&lines(&["250"])).unwrap();
        assert_eq!((r.code, r.enhanced.clone()), (250, None));
        // Class disagreeing with the code is not an enhanced code.
        let r = Reply::parse(&lines(&["451 5.1.1 odd"])).unwrap();
        assert_eq!(r.enhanced, None);
    }

    #[test]
    fn malformed() {
        for bad in [&["25"][..], &["abc ok"], &["250x"], &["250-a"], &["250 a", "250 b"], &["150 x"], &["290 x"]] {
            assert_eq!(Reply::parse(&lines(bad)), None, "{bad:?}");
        }
        assert_eq!(Reply::parse(&[]), None);
        assert!(parse_line(&[0xff, 0xfe, 0x00]).is_none());
        assert!(parse_line(b"250 \xff\x00").is_some());
    }

    #[test]
    fn ehlo_keywords() {
        let r = Reply::parse(&lines(&[
            "250-mx Hello",
            "250-PIPELINING",
            "250-SIZE 1000",
            "250-8bitmime",
            "250-AUTH PLAIN login",
            "250-STARTTLS",
            "250 SMTPUTF8",
        ]))
        .unwrap();
        let c = Capabilities::from_ehlo(&r);
        assert!(c.pipelining && c.eight_bit_mime && c.starttls && c.smtputf8 && !c.chunking);
        assert_eq!(c.size_limit(), Some(1000));
        assert_eq!(c.auth, vec!["PLAIN", "LOGIN"]);
    }
}
