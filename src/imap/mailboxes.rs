//! Mailbox commands (RFC 9051 §6.3): LIST/LSUB, STATUS, CREATE, DELETE, RENAME,
//! SUBSCRIBE/UNSUBSCRIBE.

use super::parse::Token;
use super::session::{no, quote, Reply};
use crate::net::Conn;
use crate::store::{MailboxInfo, SpecialUse, Store};

pub(super) fn list(
    store: &Store,
    acct: u32,
    args: &[Token],
    lsub: bool,
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let cmd = if lsub { "LSUB" } else { "LIST" };
    let (Some(reference), Some(pattern)) =
        (args.first().and_then(Token::astring), args.get(1).and_then(Token::astring))
    else {
        return Err(Reply::Bad(format!("Syntax: {cmd} reference pattern")));
    };
    if args.len() != 2 {
        return Err(Reply::Bad(format!("{cmd} extensions are not supported")));
    }
    if pattern.is_empty() && !lsub {
        // RFC 3501 §6.3.8: the hierarchy delimiter and root.
        conn.write(b"* LIST (\\Noselect) \"/\" \"\"\r\n");
        return Ok(Some("LIST completed".into()));
    }
    let full = format!("{reference}{pattern}");
    let boxes = store.list_mailboxes(acct).map_err(no)?;
    for info in &boxes {
        let name = &info.mailbox.name;
        if !list_match(&full, name) || (lsub && !info.mailbox.subscribed) {
            continue;
        }
        let attrs = mailbox_attributes(info, &boxes);
        conn.write(format!("* {cmd} ({attrs}) \"/\" {}\r\n", quote(name)).as_bytes());
    }
    Ok(Some(format!("{cmd} completed")))
}

pub(super) fn status(store: &Store, acct: u32, args: &[Token], conn: &mut Conn) -> Result<Option<String>, Reply> {
    let (Some(name), Some(Token::List(items))) = (args.first().and_then(Token::astring), args.get(1)) else {
        return Err(Reply::Bad("Syntax: STATUS mailbox (items)".into()));
    };
    let info = store
        .mailbox_by_name(acct, &name)
        .map_err(no)?
        .ok_or_else(|| Reply::No("[NONEXISTENT] No such mailbox".into()))?;
    let m = &info.mailbox;
    let mut out = Vec::new();
    for item in items {
        let Token::Atom(a) = item else { return Err(Reply::Bad("Bad STATUS item".into())) };
        let value = match a.to_ascii_uppercase().as_str() {
            "MESSAGES" => m.messages as u64,
            "RECENT" => 0,
            "UIDNEXT" => m.uidnext as u64,
            "UIDVALIDITY" => m.uidvalidity as u64,
            "UNSEEN" => m.unseen as u64,
            "SIZE" => m.size,
            _ => return Err(Reply::Bad(format!("Unknown STATUS item {a}"))),
        };
        out.push(format!("{} {value}", a.to_ascii_uppercase()));
    }
    conn.write(format!("* STATUS {} ({})\r\n", quote(&m.name), out.join(" ")).as_bytes());
    Ok(Some("STATUS completed".into()))
}

/// CREATE, DELETE, SUBSCRIBE and UNSUBSCRIBE.
pub(super) fn mailbox_op(store: &Store, acct: u32, cmd: &str, args: &[Token]) -> Result<Option<String>, Reply> {
    let name = args.first().and_then(Token::astring).ok_or_else(|| Reply::Bad(format!("Syntax: {cmd} mailbox")))?;
    match cmd {
        "CREATE" => {
            // RFC 3501 §6.3.3: a trailing delimiter only says the name may have children,
            // and missing superior names are created too.
            let name = name.trim_end_matches('/');
            for (i, _) in name.match_indices('/') {
                if store.mailbox_id(acct, &name[..i]).map_err(no)?.is_none() {
                    store.create_mailbox(acct, &name[..i], None).map_err(no)?;
                }
            }
            store.create_mailbox(acct, name, None).map_err(no)?;
        }
        "DELETE" => store.delete_mailbox(acct, &name).map_err(no)?,
        "SUBSCRIBE" => store.set_subscribed(acct, &name, true).map_err(no)?,
        _ => store.set_subscribed(acct, &name, false).map_err(no)?,
    }
    Ok(Some(format!("{cmd} completed")))
}

pub(super) fn rename(store: &Store, acct: u32, args: &[Token]) -> Result<Option<String>, Reply> {
    let (Some(from), Some(to)) = (args.first().and_then(Token::astring), args.get(1).and_then(Token::astring)) else {
        return Err(Reply::Bad("Syntax: RENAME from to".into()));
    };
    store.rename_mailbox(acct, &from, &to).map_err(no)?;
    Ok(Some("RENAME completed".into()))
}

/// RFC 3501 §6.3.8 wildcards: `*` matches anything, `%` anything but the delimiter.
fn list_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('%') => (0..=n.len()).take_while(|&i| i == 0 || n[i - 1] != '/').any(|i| go(&p[1..], &n[i..])),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    if p.len() > 256 {
        return false;
    }
    if name == "INBOX" {
        let upper: Vec<char> = pattern.to_ascii_uppercase().chars().collect();
        return go(&upper, &n);
    }
    go(&p, &n)
}

fn mailbox_attributes(info: &MailboxInfo, all: &[MailboxInfo]) -> String {
    let prefix = format!("{}/", info.mailbox.name);
    let children = all.iter().any(|m| m.mailbox.name.starts_with(&prefix));
    let mut attrs = vec![if children { "\\HasChildren" } else { "\\HasNoChildren" }];
    if let Some(s) = info.mailbox.special_use {
        attrs.push(SpecialUse::attribute(s));
    }
    attrs.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_patterns() {
        assert!(list_match("*", "a/b"));
        assert!(list_match("%", "a"));
        assert!(!list_match("%", "a/b"));
        assert!(list_match("a/%", "a/b"));
        assert!(list_match("inbox", "INBOX"));
        assert!(!list_match("Sent", "Sent/x"));
    }
}
