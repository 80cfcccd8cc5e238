//! Mailbox commands (RFC 9051 §6.3): LIST/LSUB, STATUS, CREATE, DELETE, RENAME,
//! SUBSCRIBE/UNSUBSCRIBE.

use super::parse::Token;
use super::session::{no, Reply};
use crate::net::Conn;
use crate::store::{MailboxInfo, SpecialUse, Store};

/// LIST (with LIST-EXTENDED, RFC 5258: selection options, several patterns, return options;
/// CHILDREN, RFC 3348; SPECIAL-USE, RFC 6154; LIST-STATUS, RFC 5819) and LSUB.
pub(super) fn list(
    store: &Store,
    acct: u32,
    names: super::names::Names,
    args: &[Token],
    lsub: bool,
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let cmd = if lsub { "LSUB" } else { "LIST" };
    let syntax = || Reply::Bad(format!("Syntax: {cmd} [(options)] reference pattern [RETURN (options)]"));
    let mut rest = args;
    let mut sel = Selection::default();
    if let Some(Token::List(opts)) = rest.first() {
        if lsub {
            return Err(syntax());
        }
        sel = Selection::parse(opts)?;
        rest = &rest[1..];
    }
    let reference = rest.first().and_then(Token::astring).ok_or_else(syntax)?;
    let patterns: Vec<String> = match rest.get(1) {
        Some(Token::List(ps)) if !lsub && !ps.is_empty() => {
            ps.iter().map(Token::astring).collect::<Option<_>>().ok_or_else(syntax)?
        }
        Some(t) => vec![t.astring().ok_or_else(syntax)?],
        None => return Err(syntax()),
    };
    let ret = match &rest[2..] {
        [] => Return::default(),
        [Token::Atom(r), Token::List(opts)] if !lsub && r.eq_ignore_ascii_case("RETURN") => Return::parse(opts)?,
        _ => return Err(syntax()),
    };
    if patterns.iter().all(String::is_empty) && !lsub {
        // RFC 3501 §6.3.8: the hierarchy delimiter and root.
        conn.write(b"* LIST (\\Noselect) \"/\" \"\"\r\n");
        return Ok(Some("LIST completed".into()));
    }
    let full: Vec<String> = patterns.iter().filter(|p| !p.is_empty()).map(|p| format!("{reference}{p}")).collect();
    let boxes = store.list_mailboxes(acct).map_err(no)?;
    let show_subscribed = sel.subscribed || ret.subscribed;
    let matched: Vec<bool> = boxes.iter().map(|b| full.iter().any(|p| list_match(p, &b.mailbox.name))).collect();
    for (info, _) in boxes.iter().zip(&matched).filter(|(_, &hit)| hit) {
        let m = &info.mailbox;
        if sel.special_use && m.special_use.is_none() {
            continue;
        }
        // RFC 5258 §3.5: with RECURSIVEMATCH, a mailbox with a subscribed descendant that the
        // patterns do not list is listed too, with CHILDINFO, even when not subscribed itself.
        let prefix = format!("{}/", m.name);
        let child_subscribed = sel.subscribed
            && sel.recursive
            && boxes
                .iter()
                .zip(&matched)
                .any(|(c, &hit)| !hit && c.mailbox.subscribed && c.mailbox.name.starts_with(&prefix));
        if (lsub || sel.subscribed) && !m.subscribed && !child_subscribed {
            continue;
        }
        let mut attrs = mailbox_attributes(info, &boxes);
        if show_subscribed && m.subscribed {
            attrs.push_str(" \\Subscribed");
        }
        let extra = if child_subscribed { " (\"CHILDINFO\" (\"SUBSCRIBED\"))" } else { "" };
        conn.write(format!("* {cmd} ({attrs}) \"/\" {}{extra}\r\n", names.show(&m.name)).as_bytes());
        // RFC 5819: every mailbox here is selectable, so each gets its STATUS.
        if let Some(items) = &ret.status {
            conn.write(status_line(store, acct, info, items, names)?.as_bytes());
        }
    }
    Ok(Some(format!("{cmd} completed")))
}

/// LIST selection options (RFC 5258 §3.1, RFC 6154 §3).
#[derive(Default)]
struct Selection {
    subscribed: bool,
    recursive: bool,
    special_use: bool,
}

impl Selection {
    fn parse(opts: &[Token]) -> Result<Self, Reply> {
        let mut sel = Selection::default();
        for opt in opts {
            let Token::Atom(a) = opt else { return Err(Reply::Bad("Bad LIST selection option".into())) };
            match a.to_ascii_uppercase().as_str() {
                "SUBSCRIBED" => sel.subscribed = true,
                "RECURSIVEMATCH" => sel.recursive = true,
                "SPECIAL-USE" => sel.special_use = true,
                // No mailbox is remote here, so every mailbox is already listed.
                "REMOTE" => {}
                _ => return Err(Reply::Bad(format!("Unknown LIST selection option {a}"))),
            }
        }
        // RFC 5258 §3.1: RECURSIVEMATCH must come with an option it can apply to.
        if sel.recursive && !sel.subscribed && !sel.special_use {
            return Err(Reply::Bad("RECURSIVEMATCH needs another selection option".into()));
        }
        Ok(sel)
    }
}

/// LIST return options (RFC 5258 §3.2, RFC 5819). CHILDREN and SPECIAL-USE attributes are
/// always returned, so those options need no flag.
#[derive(Default)]
struct Return {
    subscribed: bool,
    status: Option<Vec<StatusItem>>,
}

impl Return {
    fn parse(opts: &[Token]) -> Result<Self, Reply> {
        let mut ret = Return::default();
        let mut it = opts.iter();
        while let Some(opt) = it.next() {
            let Token::Atom(a) = opt else { return Err(Reply::Bad("Bad LIST return option".into())) };
            match a.to_ascii_uppercase().as_str() {
                "SUBSCRIBED" => ret.subscribed = true,
                "CHILDREN" | "SPECIAL-USE" => {}
                "STATUS" => {
                    let Some(Token::List(items)) = it.next() else {
                        return Err(Reply::Bad("Syntax: RETURN (STATUS (items))".into()));
                    };
                    ret.status = Some(status_items(items)?);
                }
                _ => return Err(Reply::Bad(format!("Unknown LIST return option {a}"))),
            }
        }
        Ok(ret)
    }
}

#[derive(Clone, Copy)]
enum StatusItem {
    Messages,
    Recent,
    UidNext,
    UidValidity,
    Unseen,
    Size,
    /// RFC 7162 §3.1.2.
    HighestModSeq,
    /// RFC 9051 §6.3.11: messages with \Deleted.
    Deleted,
}

fn status_items(items: &[Token]) -> Result<Vec<StatusItem>, Reply> {
    items
        .iter()
        .map(|item| {
            let Token::Atom(a) = item else { return Err(Reply::Bad("Bad STATUS item".into())) };
            Ok(match a.to_ascii_uppercase().as_str() {
                "MESSAGES" => StatusItem::Messages,
                "RECENT" => StatusItem::Recent,
                "UIDNEXT" => StatusItem::UidNext,
                "UIDVALIDITY" => StatusItem::UidValidity,
                "UNSEEN" => StatusItem::Unseen,
                "SIZE" => StatusItem::Size,
                "HIGHESTMODSEQ" => StatusItem::HighestModSeq,
                "DELETED" => StatusItem::Deleted,
                _ => return Err(Reply::Bad(format!("Unknown STATUS item {a}"))),
            })
        })
        .collect()
}

/// `* STATUS name (items)`, with SIZE the total of the message sizes (RFC 8438).
fn status_line(
    store: &Store,
    acct: u32,
    info: &MailboxInfo,
    items: &[StatusItem],
    names: super::names::Names,
) -> Result<String, Reply> {
    let m = &info.mailbox;
    // The only item the mailbox record does not count: taken from the mailbox index.
    let deleted = if items.iter().any(|i| matches!(i, StatusItem::Deleted)) {
        store.deleted_uids(acct, info.id).map_err(no)?.len()
    } else {
        0
    };
    let out: Vec<String> = items
        .iter()
        .map(|item| match item {
            StatusItem::Messages => format!("MESSAGES {}", m.messages),
            StatusItem::Recent => "RECENT 0".to_string(),
            StatusItem::UidNext => format!("UIDNEXT {}", m.uidnext),
            StatusItem::UidValidity => format!("UIDVALIDITY {}", m.uidvalidity),
            StatusItem::Unseen => format!("UNSEEN {}", m.unseen),
            StatusItem::Size => format!("SIZE {}", m.size),
            StatusItem::HighestModSeq => format!("HIGHESTMODSEQ {}", super::condstore::highest(store, m)),
            StatusItem::Deleted => format!("DELETED {deleted}"),
        })
        .collect();
    Ok(format!("* STATUS {} ({})\r\n", names.show(&m.name), out.join(" ")))
}

pub(super) fn status(
    store: &Store,
    acct: u32,
    names: super::names::Names,
    args: &[Token],
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let (Some(name), Some(Token::List(items))) = (args.first().and_then(Token::astring), args.get(1)) else {
        return Err(Reply::Bad("Syntax: STATUS mailbox (items)".into()));
    };
    let items = status_items(items)?;
    let info = store
        .mailbox_by_name(acct, &name)
        .map_err(no)?
        .ok_or_else(|| Reply::No("[NONEXISTENT] No such mailbox".into()))?;
    conn.write(status_line(store, acct, &info, &items, names)?.as_bytes());
    Ok(Some("STATUS completed".into()))
}

/// CREATE, DELETE, SUBSCRIBE and UNSUBSCRIBE.
pub(super) fn mailbox_op(store: &Store, acct: u32, cmd: &str, args: &[Token]) -> Result<Option<String>, Reply> {
    let name = args.first().and_then(Token::astring).ok_or_else(|| Reply::Bad(format!("Syntax: {cmd} mailbox")))?;
    match cmd {
        "CREATE" => {
            let special_use = create_params(&args[1..])?;
            // RFC 3501 §6.3.3: a trailing delimiter only says the name may have children,
            // and missing superior names are created too.
            let name = name.trim_end_matches('/');
            for (i, _) in name.match_indices('/') {
                if store.mailbox_id(acct, &name[..i]).map_err(no)?.is_none() {
                    store.create_mailbox(acct, &name[..i], None).map_err(no)?;
                }
            }
            store.create_mailbox(acct, name, special_use).map_err(no)?;
        }
        "DELETE" => store.delete_mailbox(acct, &name).map_err(no)?,
        "SUBSCRIBE" => store.set_subscribed(acct, &name, true).map_err(no)?,
        _ => store.set_subscribed(acct, &name, false).map_err(no)?,
    }
    Ok(Some(format!("{cmd} completed")))
}

/// CREATE parameters: `(USE (\Archive))` (CREATE-SPECIAL-USE, RFC 6154 §3). A mailbox holds
/// at most one special use.
fn create_params(args: &[Token]) -> Result<Option<SpecialUse>, Reply> {
    let params = match args {
        [] => return Ok(None),
        [Token::List(p)] => p,
        _ => return Err(Reply::Bad("Syntax: CREATE mailbox [(USE (attributes))]".into())),
    };
    let mut special_use = None;
    let mut it = params.iter();
    while let Some(p) = it.next() {
        let (Token::Atom(name), Some(Token::List(uses))) = (p, it.next()) else {
            return Err(Reply::Bad("Syntax: CREATE mailbox [(USE (attributes))]".into()));
        };
        if !name.eq_ignore_ascii_case("USE") {
            return Err(Reply::Bad(format!("Unknown CREATE parameter {name}")));
        }
        for u in uses {
            let attr = u.astring().unwrap_or_default();
            let Some(s) = SPECIAL_USES.iter().copied().find(|s| s.attribute().eq_ignore_ascii_case(&attr)) else {
                // The attribute is not echoed: a literal could carry CRLF into the reply.
                return Err(Reply::No("[USEATTR] Not a special use this server can give a mailbox".into()));
            };
            if special_use.is_some_and(|prev| prev != s) {
                return Err(Reply::No("[USEATTR] A mailbox can have only one special use here".into()));
            }
            special_use = Some(s);
        }
    }
    Ok(special_use)
}

/// The special uses CREATE accepts. `\All` and `\Flagged` name virtual views that the store
/// does not maintain, so a mailbox created with them would mislead clients.
const SPECIAL_USES: [SpecialUse; 5] =
    [SpecialUse::Sent, SpecialUse::Drafts, SpecialUse::Junk, SpecialUse::Trash, SpecialUse::Archive];

pub(super) fn rename(store: &Store, acct: u32, args: &[Token]) -> Result<Option<String>, Reply> {
    let (Some(from), Some(to)) = (args.first().and_then(Token::astring), args.get(1).and_then(Token::astring)) else {
        return Err(Reply::Bad("Syntax: RENAME from to".into()));
    };
    store.rename_mailbox(acct, &from, &to).map_err(no)?;
    Ok(Some("RENAME completed".into()))
}

/// RFC 3501 §6.3.8 wildcards: `*` matches anything, `%` anything but the delimiter. Matched by
/// dynamic programming over (pattern position, name position): O(pattern × name), however many
/// wildcards the client sends.
fn list_match(pattern: &str, name: &str) -> bool {
    let n: Vec<char> = name.chars().collect();
    let p: Vec<char> =
        if name == "INBOX" { pattern.to_ascii_uppercase().chars().collect() } else { pattern.chars().collect() };
    if p.len() > 256 {
        return false;
    }
    // m[j]: the pattern so far matches the first j characters of the name.
    let mut m = vec![false; n.len() + 1];
    m[0] = true;
    for &c in &p {
        let mut next = vec![false; n.len() + 1];
        for j in 0..=n.len() {
            next[j] = match c {
                '*' => m[j] || (j > 0 && next[j - 1]),
                '%' => m[j] || (j > 0 && next[j - 1] && n[j - 1] != '/'),
                c => j > 0 && m[j - 1] && n[j - 1] == c,
            };
        }
        m = next;
    }
    m[n.len()]
}

/// `\HasChildren` or `\HasNoChildren` (RFC 3348), and the special use (RFC 6154).
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
        assert!(list_match("%/%", "a/b"));
        assert!(!list_match("%/%", "a/b/c"));
        assert!(list_match("a*c", "a/b/c"));
        assert!(list_match("IN%", "INBOX"));
        assert!(!list_match("", "a"));
        assert!(list_match("%", ""));
    }

    #[test]
    fn many_wildcards_stay_fast() {
        let name = "a".repeat(512);
        let pattern = format!("{}b", "*a".repeat(120));
        let started = std::time::Instant::now();
        assert!(!list_match(&pattern, &name));
        assert!(list_match(&"%".repeat(200), &name));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
