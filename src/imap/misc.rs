//! Small commands: ENABLE (RFC 5161), NAMESPACE (RFC 2342) and ID (RFC 2971).

use super::parse::Token;
use super::session::Reply;
use crate::net::Conn;

/// RFC 2971 §3.3: at most 30 field/value pairs, fields up to 30 octets, values up to 1024.
const ID_MAX_PAIRS: usize = 30;
const ID_MAX_FIELD: usize = 30;
const ID_MAX_VALUE: usize = 1024;

/// ENABLE: every argument must be an atom; none of the extensions that need enabling is
/// supported yet, so `* ENABLED` lists nothing.
pub(super) fn enable(args: &[Token], conn: &mut Conn) -> Result<Option<String>, Reply> {
    if args.is_empty() || !args.iter().all(|t| matches!(t, Token::Atom(_))) {
        return Err(Reply::Bad("Syntax: ENABLE capability ...".into()));
    }
    conn.write(b"* ENABLED\r\n");
    Ok(Some("ENABLE completed".into()))
}

/// NAMESPACE: one personal namespace with the delimiter LIST reports, no others.
pub(super) fn namespace(args: &[Token], conn: &mut Conn) -> Result<Option<String>, Reply> {
    if !args.is_empty() {
        return Err(Reply::Bad("NAMESPACE takes no arguments".into()));
    }
    conn.write(b"* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
    Ok(Some("NAMESPACE completed".into()))
}

/// ID: checks and logs the client's fields (bounded), and answers with the server's.
pub(super) fn id(sid: &str, args: &[Token], conn: &mut Conn) -> Result<Option<String>, Reply> {
    let bad = || Reply::Bad("Syntax: ID NIL or ID (\"field\" \"value\" ...)".into());
    let fields = match args {
        [Token::Nil] => Vec::new(),
        [Token::List(items)] => {
            if items.len() % 2 != 0 || items.len() > 2 * ID_MAX_PAIRS {
                return Err(bad());
            }
            let mut fields = Vec::new();
            for pair in items.chunks(2) {
                let Token::Str(field) = &pair[0] else { return Err(bad()) };
                let value = match &pair[1] {
                    Token::Str(v) => Some(v),
                    Token::Nil => None,
                    _ => return Err(bad()),
                };
                if field.len() > ID_MAX_FIELD || value.is_some_and(|v| v.len() > ID_MAX_VALUE) {
                    return Err(bad());
                }
                let value = value.map_or("NIL".into(), |v| printable(v, 64));
                fields.push(format!("{}={value}", printable(field, ID_MAX_FIELD)));
            }
            fields
        }
        _ => return Err(bad()),
    };
    tracing::info!("{sid} imap id client=\"{}\"", fields.join(" "));
    conn.write(format!("* ID (\"name\" \"Postern\" \"version\" \"{}\")\r\n", env!("CARGO_PKG_VERSION")).as_bytes());
    Ok(Some("ID completed".into()))
}

/// At most `max` bytes, with anything but printable ASCII (and `"`, `\`) replaced by `?`.
fn printable(s: &[u8], max: usize) -> String {
    s.iter()
        .take(max)
        .map(|&b| if (b' '..0x7f).contains(&b) && b != b'"' && b != b'\\' { b as char } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn printable_is_bounded_and_clean() {
        assert_eq!(printable(b"a\"b\r\n\xff", 10), "a?b???");
        assert_eq!(printable(&[b'x'; 100], 5), "xxxxx");
    }
}
