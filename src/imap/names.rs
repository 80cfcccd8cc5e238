//! Mailbox names on the wire. The store keeps names in UTF-8. IMAP4rev1 clients send and expect
//! modified UTF-7 (RFC 3501 §5.1.3); clients that ENABLE UTF8=ACCEPT (RFC 6855 §3) or IMAP4rev2
//! (RFC 9051 §5.1) use UTF-8 itself. Conversion happens here, once at the edge, so a folder made
//! by one kind of client shows the same name to the other.

use super::parse::Token;
use super::session::{quote, Reply};

/// Modified BASE64: RFC 2045's alphabet with `,` for `/`, no padding.
const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,";

/// UTF-8 → modified UTF-7: printable ASCII stands for itself (`&` as `&-`); every other run of
/// characters becomes `&` + modified BASE64 of its UTF-16BE + `-`.
pub fn encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut run: Vec<u16> = Vec::new();
    let flush = |run: &mut Vec<u16>, out: &mut String| {
        if run.is_empty() {
            return;
        }
        let bytes: Vec<u8> = run.iter().flat_map(|u| u.to_be_bytes()).collect();
        out.push('&');
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out.push('-');
        run.clear();
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut run, &mut out);
            out.push(c);
            if c == '&' {
                out.push('-');
            }
        } else {
            let mut buf = [0u16; 2];
            run.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Modified UTF-7 → UTF-8; `None` for a name that is not valid modified UTF-7 (a bare `&`,
/// a bad BASE64 digit, broken UTF-16, or printable ASCII encoded, which RFC 3501 forbids).
pub fn decode(name: &str) -> Option<String> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let end = after.find('-')?;
        let encoded = &after[..end];
        rest = &after[end + 1..];
        if encoded.is_empty() {
            out.push('&');
            continue;
        }
        let mut bits = 0u32;
        let mut nbits = 0;
        let mut units = Vec::new();
        let mut byte_buf = Vec::new();
        for b in encoded.bytes() {
            let v = B64.iter().position(|&x| x == b)? as u32;
            bits = bits << 6 | v;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                byte_buf.push((bits >> nbits & 0xff) as u8);
            }
        }
        // Leftover bits are padding and must be zero (RFC 2152).
        if bits & ((1 << nbits) - 1) != 0 || byte_buf.len() % 2 != 0 {
            return None;
        }
        for pair in byte_buf.chunks(2) {
            units.push(u16::from_be_bytes([pair[0], pair[1]]));
        }
        let text = String::from_utf16(&units).ok()?;
        if text.chars().any(|c| (' '..='~').contains(&c)) {
            return None;
        }
        out.push_str(&text);
    }
    out.push_str(rest);
    Some(out)
}

/// How this session writes mailbox names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Names {
    /// UTF8=ACCEPT or IMAP4rev2 enabled: names are UTF-8 both ways.
    pub utf8: bool,
}

impl Names {
    /// A name from the client, in the store's UTF-8.
    pub fn read(self, name: &str) -> Result<String, Reply> {
        if self.utf8 {
            return Ok(name.to_string());
        }
        decode(name).ok_or_else(|| Reply::No("[CANNOT] Mailbox name is not valid modified UTF-7".into()))
    }

    /// A stored name for the client, as an IMAP string.
    pub fn show(self, name: &str) -> String {
        if self.utf8 && !name.is_ascii() && !name.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
            // RFC 6855 §3 / RFC 9051 §4.3: UTF-8 in a quoted string once UTF-8 is enabled.
            return format!("\"{name}\"");
        }
        quote(&if self.utf8 { name.to_string() } else { encode(name) })
    }

    /// Rewrites the mailbox-name arguments of `cmd` (LIST patterns included) to UTF-8 before
    /// the command runs. Arguments that are not strings are left for the command's own syntax
    /// check to refuse.
    pub fn decode_args(self, cmd: &str, args: &mut [Token]) -> Result<(), Reply> {
        if self.utf8 {
            return Ok(());
        }
        let positions: &[usize] = match cmd {
            "SELECT" | "EXAMINE" | "CREATE" | "DELETE" | "SUBSCRIBE" | "UNSUBSCRIBE" | "STATUS" | "APPEND"
            | "GETQUOTAROOT" => &[0],
            "RENAME" => &[0, 1],
            "COPY" | "MOVE" => &[1],
            "UID"
                if args.first().is_some_and(
                    |a| matches!(a, Token::Atom(s) if s.eq_ignore_ascii_case("COPY") || s.eq_ignore_ascii_case("MOVE")),
                ) =>
            {
                &[2]
            }
            "LIST" | "LSUB" => {
                // RFC 5258: LIST [(selection options)] reference patterns [RETURN (...)].
                let skip = usize::from(matches!(args.first(), Some(Token::List(_))));
                for i in [skip, skip + 1] {
                    match args.get_mut(i) {
                        Some(Token::List(patterns)) if i == skip + 1 => {
                            for p in patterns.iter_mut() {
                                self.decode_token(p)?;
                            }
                        }
                        Some(t) => self.decode_token(t)?,
                        None => {}
                    }
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        for &i in positions {
            if let Some(t) = args.get_mut(i) {
                self.decode_token(t)?;
            }
        }
        Ok(())
    }

    fn decode_token(self, t: &mut Token) -> Result<(), Reply> {
        let Some(text) = t.astring() else { return Ok(()) };
        if !text.contains('&') {
            return Ok(());
        }
        *t = Token::Str(self.read(&text)?.into_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3501_examples_and_round_trips() {
        // RFC 3501 §5.1.3's example and RFC 2152-style cases.
        assert_eq!(encode("~peter/mail/台北/日本語"), "~peter/mail/&U,BTFw-/&ZeVnLIqe-");
        assert_eq!(decode("~peter/mail/&U,BTFw-/&ZeVnLIqe-").unwrap(), "~peter/mail/台北/日本語");
        assert_eq!(encode("Entwürfe"), "Entw&APw-rfe");
        assert_eq!(encode("Tom & Jerry"), "Tom &- Jerry");
        assert_eq!(decode("Tom &- Jerry").unwrap(), "Tom & Jerry");
        for name in ["INBOX", "Gelöschte Elemente", "😀 emoji/子", "a&b&c", "Ünï/çödé", "\u{7f}x", ""] {
            assert_eq!(decode(&encode(name)).as_deref(), Some(name), "{name}");
        }
    }

    #[test]
    fn invalid_utf7_is_refused() {
        for bad in ["&", "a&b", "&Jjo!-", "&AGE-", "&U,BTF-", "&2D3-"] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn wire_forms() {
        let rev1 = Names::default();
        let utf8 = Names { utf8: true };
        assert_eq!(rev1.show("Entwürfe"), "\"Entw&APw-rfe\"");
        assert_eq!(utf8.show("Entwürfe"), "\"Entwürfe\"");
        assert_eq!(utf8.read("Entw&APw-rfe").ok().unwrap(), "Entw&APw-rfe");
        assert_eq!(rev1.read("Entw&APw-rfe").ok().unwrap(), "Entwürfe");
        let mut args = vec![Token::Atom("1:2".into()), Token::Atom("Entw&APw-rfe".into())];
        rev1.decode_args("COPY", &mut args).ok().unwrap();
        assert_eq!(args[1].astring().unwrap(), "Entwürfe");
        let mut args =
            vec![Token::List(vec![]), Token::Str(b"".to_vec()), Token::List(vec![Token::Atom("&AOk-*".into())])];
        rev1.decode_args("LIST", &mut args).ok().unwrap();
        let Token::List(p) = &args[2] else { panic!() };
        assert_eq!(p[0].astring().unwrap(), "é*");
    }
}
