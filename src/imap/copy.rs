//! COPY and MOVE (RFC 9051 §6.4.7, §6.4.8; RFC 6851) with COPYUID (RFC 4315), and UID EXPUNGE
//! (RFC 4315 §2.1). The store does the work in one batch (`copy_messages`, `move_messages`);
//! other sessions learn about it through the store's change notification, like STORE/EXPUNGE.

use super::parse::Token;
use super::session::{no, resolve_set, Reply, Selected};
use crate::net::Conn;
use crate::store::{Flags, Store, StoreError};

/// COPY/MOVE set mailbox (`uid`: the set holds UIDs).
pub(super) fn copy(
    ctx: &super::ImapContext,
    acct: u32,
    sel: &mut Selected,
    args: &[Token],
    uid: bool,
    mv: bool,
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let store = &ctx.store;
    let cmd = match (uid, mv) {
        (false, false) => "COPY",
        (false, true) => "MOVE",
        (true, false) => "UID COPY",
        (true, true) => "UID MOVE",
    };
    let (Some(Token::Atom(set)), Some(name), 2) = (args.first(), args.get(1).and_then(Token::astring), args.len())
    else {
        return Err(Reply::Bad(format!("Syntax: {cmd} set mailbox")));
    };
    if mv && sel.read_only {
        return Err(Reply::No("[READ-ONLY] Mailbox is read-only".into()));
    }
    let targets = resolve_set(sel, set, uid)?;
    let to = store.mailbox_by_name(acct, &name).map_err(no)?.ok_or_else(trycreate)?;
    let uids: Vec<u32> = targets.iter().map(|&(_, u)| u).collect();
    if !mv {
        // A MOVE within the account leaves its usage unchanged; a COPY adds every copy.
        let mut adding = 0u64;
        for &u in &uids {
            adding += store.entry(acct, sel.mbox, u).map_err(no)?.map_or(0, |e| e.size);
        }
        super::quota::check(ctx, acct, adding)?;
    }
    let result = if mv {
        store.move_messages(acct, sel.mbox, &uids, to.id)
    } else {
        store.copy_messages(acct, sel.mbox, &uids, to.id)
    };
    let pairs = result.map_err(|e| match e {
        StoreError::NoSuchMailbox => trycreate(),
        e => no(e),
    })?;
    if pairs.is_empty() {
        return Ok(Some(format!("No messages {cmd} completed")));
    }
    let src: Vec<u32> = pairs.iter().map(|p| p.0).collect();
    let dst: Vec<u32> = pairs.iter().map(|p| p.1).collect();
    let code = format!("[COPYUID {} {} {}]", to.mailbox.uidvalidity, uid_set(&src), uid_set(&dst));
    if !mv {
        return Ok(Some(format!("{code} {cmd} completed")));
    }
    // RFC 6851 §4.3: COPYUID in an untagged OK before the EXPUNGE responses. The messages are
    // numbered as they are after each earlier EXPUNGE.
    conn.write(format!("* OK {code} Moved\r\n").as_bytes());
    announce_expunged(sel, &src, conn);
    Ok(Some(format!("{cmd} completed")))
}

/// UID EXPUNGE set: removes the messages of the set that have `\Deleted`.
pub(super) fn uid_expunge(
    store: &Store,
    acct: u32,
    sel: &mut Selected,
    args: &[Token],
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let [Token::Atom(set)] = args else { return Err(Reply::Bad("Syntax: UID EXPUNGE set".into())) };
    if sel.read_only {
        return Err(Reply::No("[READ-ONLY] Mailbox is read-only".into()));
    }
    let targets = resolve_set(sel, set, true)?;
    let mut deleted = Vec::new();
    for (_, u) in targets {
        if store.entry(acct, sel.mbox, u).map_err(no)?.is_some_and(|e| e.flags.contains(Flags::DELETED)) {
            deleted.push(u);
        }
    }
    let removed = store.expunge(acct, sel.mbox, &deleted).map_err(no)?;
    announce_expunged(sel, &removed, conn);
    Ok(Some("UID EXPUNGE completed".into()))
}

/// `* n EXPUNGE` for each of `uids` this session still shows (with QRESYNC one `* VANISHED`,
/// RFC 7162 §3.2.10), and drops them from its view.
fn announce_expunged(sel: &mut Selected, uids: &[u32], conn: &mut Conn) {
    let mut vanished = Vec::new();
    for &u in uids {
        if let Ok(pos) = sel.uids.binary_search(&u) {
            sel.uids.remove(pos);
            if sel.ext.qresync {
                vanished.push(u);
            } else {
                conn.write(format!("* {} EXPUNGE\r\n", pos + 1).as_bytes());
            }
        }
    }
    if !vanished.is_empty() {
        conn.write(super::condstore::vanished_line(&vanished, false).as_bytes());
    }
}

fn trycreate() -> Reply {
    Reply::No("[TRYCREATE] No such mailbox".into())
}

/// A UID list as an IMAP sequence set, keeping its order: runs of consecutive UIDs become
/// `a:b` (COPYUID pairs source and destination sets by position).
pub(super) fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut j = i;
        while j + 1 < uids.len() && uids[j + 1] == uids[j].wrapping_add(1) {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if j > i {
            out.push_str(&format!("{start}:{}", uids[j]));
        } else {
            out.push_str(&start.to_string());
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::uid_set;

    #[test]
    fn uid_sets() {
        assert_eq!(uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(uid_set(&[4]), "4");
        assert_eq!(uid_set(&[]), "");
    }
}
