//! Small commands: ENABLE (RFC 5161), NAMESPACE (RFC 2342) and ID (RFC 2971), RENAME INBOX, and
//! the checks every command goes through first (known name, argument count, tag characters).

use super::parse::Token;
use super::session::{no, Reply};
use crate::net::Conn;
use crate::store::{Store, StoreError};

/// Every command the server knows; anything else is `BAD Unknown command` in every state. A
/// new command must be added here.
const KNOWN: &[&str] = &[
    "CAPABILITY",
    "NOOP",
    "LOGOUT",
    "STARTTLS",
    "AUTHENTICATE",
    "LOGIN",
    "ID",
    "ENABLE",
    "SELECT",
    "EXAMINE",
    "CREATE",
    "DELETE",
    "RENAME",
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST",
    "LSUB",
    "NAMESPACE",
    "STATUS",
    "APPEND",
    "IDLE",
    "CHECK",
    "CLOSE",
    "UNSELECT",
    "EXPUNGE",
    "SEARCH",
    "SORT",
    "THREAD",
    "FETCH",
    "STORE",
    "COPY",
    "MOVE",
    "UID",
    "GETQUOTA",
    "GETQUOTAROOT",
    "SETQUOTA",
    "COMPRESS",
];

/// Commands whose grammar has no arguments (RFC 9051 §9).
const NO_ARGUMENTS: &[&str] =
    &["CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "NAMESPACE", "IDLE", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE"];

/// RFC 9051 §9: `tag = 1*<any ASTRING-CHAR except "+">`, so no atom-specials but `]`.
pub(super) fn valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.bytes().all(|b| (0x21..0x7f).contains(&b) && !b"(){%*\\\"+".contains(&b))
}

/// The reply to a command that fails before it runs: unknown, wrong argument count, or CHECK
/// outside the selected state.
pub(super) fn precheck(name: &str, args: &[Token], selected: bool) -> Option<Reply> {
    if !KNOWN.contains(&name) {
        let shown: String = name.chars().take(64).collect();
        return Some(Reply::Bad(format!("Unknown command {shown}")));
    }
    if NO_ARGUMENTS.contains(&name) && !args.is_empty() {
        return Some(Reply::Bad(format!("{name} takes no arguments")));
    }
    // RFC 4466 §2.1: one parenthesised list of parameters may follow (CONDSTORE, QRESYNC).
    if matches!(name, "SELECT" | "EXAMINE")
        && (args.len() > 2 || args.get(1).is_some_and(|a| !matches!(a, Token::List(_))))
    {
        return Some(Reply::Bad(format!("Syntax: {name} mailbox [(parameters)]")));
    }
    if name == "CHECK" && !selected {
        return Some(Reply::Bad("CHECK needs a selected mailbox".into()));
    }
    None
}

/// The sequence number of the first message without `\Seen`, for `OK [UNSEEN n]` (RFC 3501
/// §6.3.1).
pub(super) fn first_unseen(store: &Store, acct: u32, mbox: u32) -> Result<Option<usize>, StoreError> {
    store.first_unseen(acct, mbox)
}

/// RENAME INBOX (RFC 9051 §6.3.6): a new mailbox gets every message of INBOX, which stays, empty.
pub(super) fn rename_inbox(store: &Store, acct: u32, args: &[Token]) -> Result<Option<String>, Reply> {
    let [_, to] = args else { return Err(Reply::Bad("Syntax: RENAME from to".into())) };
    let to = to.astring().ok_or_else(|| Reply::Bad("Syntax: RENAME from to".into()))?;
    let inbox = store.mailbox_id(acct, "INBOX").map_err(no)?.ok_or_else(|| no(StoreError::NoSuchMailbox))?;
    let target = store.create_mailbox(acct, &to, None).map_err(no)?;
    let uids = store.uids(acct, inbox).map_err(no)?;
    if !uids.is_empty() {
        store.move_messages(acct, inbox, &uids, target).map_err(no)?;
    }
    Ok(Some("RENAME completed".into()))
}

/// RFC 2971 §3.3: at most 30 field/value pairs, fields up to 30 octets, values up to 1024.
const ID_MAX_PAIRS: usize = 30;
const ID_MAX_FIELD: usize = 30;
const ID_MAX_VALUE: usize = 1024;

/// ENABLE: every argument must be an atom; `* ENABLED` lists those of CONDSTORE and QRESYNC
/// asked for (RFC 7162 §3.2.3: QRESYNC turns CONDSTORE on too), and nothing else.
pub(super) fn enable(
    args: &[Token],
    ext: &mut super::condstore::Enabled,
    names: &mut super::names::Names,
    rev2: &mut bool,
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    if args.is_empty() || !args.iter().all(|t| matches!(t, Token::Atom(_))) {
        return Err(Reply::Bad("Syntax: ENABLE capability ...".into()));
    }
    let mut line = String::from("* ENABLED");
    for name in ["CONDSTORE", "QRESYNC"] {
        if args.iter().any(|t| matches!(t, Token::Atom(a) if a.eq_ignore_ascii_case(name))) {
            ext.condstore = true;
            ext.qresync |= name == "QRESYNC";
            line.push(' ');
            line.push_str(name);
        }
    }
    // RFC 6855 §3 and RFC 9051 §6.3.1: both make mailbox names UTF-8 from here on.
    for name in ["UTF8=ACCEPT", "IMAP4rev2"] {
        if args.iter().any(|t| matches!(t, Token::Atom(a) if a.eq_ignore_ascii_case(name))) {
            names.utf8 = true;
            *rev2 |= name == "IMAP4rev2";
            line.push(' ');
            line.push_str(name);
        }
    }
    line.push_str("\r\n");
    conn.write(line.as_bytes());
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
    use super::{printable, valid_tag};

    #[test]
    fn tags() {
        assert!(valid_tag("a1"));
        assert!(valid_tag("A.b]"));
        for t in ["", "a%", "a\\", "a*", "+", "a+b", "a(", "a\"", "a{"] {
            assert!(!valid_tag(t), "{t}");
        }
    }

    #[test]
    fn printable_is_bounded_and_clean() {
        assert_eq!(printable(b"a\"b\r\n\xff", 10), "a?b???");
        assert_eq!(printable(&[b'x'; 100], 5), "xxxxx");
    }
}
