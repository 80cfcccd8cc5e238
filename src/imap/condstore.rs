//! CONDSTORE and QRESYNC (RFC 7162): the session's enabled state, the parsing of the SELECT
//! parameters and the FETCH/STORE modifiers, and the responses that only these extensions send
//! (HIGHESTMODSEQ, VANISHED, the QRESYNC resynchronisation of SELECT). The store keeps a modseq
//! on every entry and a log of expunges, so every mailbox has modseqs (no NOMODSEQ) and
//! VANISHED (EARLIER) is exact rather than derived from the client's sequence match data.
//!
//! Replication (docs/design/replication-plan.md §2.5): modseqs are per node counters, so a value
//! one node showed says nothing about another node's counter. A replicating node shows
//! `counter << 4 | tag` with its own tag (`Store::modseq_tag`); a client value carrying another
//! tag (a client that failed over) is taken as 0: a full flag resync, every message MODIFIED,
//! and VANISHED (EARLIER) for every UID below UIDNEXT that is gone. A single node (no tag) shows
//! its counter unchanged. The shift only raises values, so HIGHESTMODSEQ does not go down when a
//! node starts replicating (RFC 7162 §3.1.2.1); and a node that stops replicating keeps its last
//! tag (saved in the store, `Store::adopt_modseq_tag`), so it does not go down then either.

use super::fetch::{flag_list, FetchItem};
use super::parse::{in_set, parse_sequence_set, Token};
use super::session::Selected;
use crate::config::{Config, Node, Role};
use crate::net::Conn;
use crate::store::{Entry, Mailbox, Store, StoreError};

/// Largest mod-sequence value (RFC 7162 §7: a positive unsigned 63-bit integer).
const MAX_MODSEQ: u64 = i64::MAX as u64;

/// What this connection has turned on. Once on, it stays on for the rest of the connection
/// (RFC 7162 §3.1, RFC 5161 §3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Enabled {
    pub condstore: bool,
    pub qresync: bool,
}

/// The QRESYNC select parameter (RFC 7162 §3.2.5).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Qresync {
    pub uidvalidity: u32,
    pub modseq: u64,
    /// The UIDs the client knows; `None` when omitted (every UID).
    pub known: Option<Vec<(u32, u32)>>,
}

#[derive(Debug, Default, PartialEq)]
pub(super) struct SelectParams {
    pub condstore: bool,
    pub qresync: Option<Qresync>,
}

#[derive(Debug, Default, PartialEq)]
pub(super) struct FetchModifiers {
    pub changed_since: Option<u64>,
    pub vanished: bool,
}

fn atom(t: Option<&Token>) -> Option<&str> {
    match t {
        Some(Token::Atom(a)) => Some(a),
        _ => None,
    }
}

fn modseq(t: Option<&Token>) -> Option<u64> {
    let a = atom(t)?;
    if a.is_empty() || !a.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    a.parse().ok().filter(|&n| n <= MAX_MODSEQ)
}

fn uid_set(t: Option<&Token>) -> Option<Vec<(u32, u32)>> {
    parse_sequence_set(atom(t)?, u32::MAX)
}

/// The parameters after the mailbox name of SELECT/EXAMINE: `(CONDSTORE)` or
/// `(QRESYNC (uidvalidity modseq [known-uids] [(known-seqs known-uids)]))` (RFC 7162 §3.2.5,
/// RFC 4466 §2.1).
pub(super) fn select_params(args: &[Token]) -> Result<SelectParams, &'static str> {
    let mut out = SelectParams::default();
    let params = match args {
        [] => return Ok(out),
        [Token::List(p)] if !p.is_empty() => p,
        _ => return Err("Syntax: SELECT mailbox [(parameters)]"),
    };
    let mut i = 0;
    while i < params.len() {
        match atom(params.get(i)).map(str::to_ascii_uppercase).as_deref() {
            Some("CONDSTORE") => out.condstore = true,
            Some("QRESYNC") if out.qresync.is_none() => {
                i += 1;
                let bad = "Syntax: QRESYNC (uidvalidity modseq [known-uids] [(known-seqs known-uids)])";
                let Some(Token::List(q)) = params.get(i) else { return Err(bad) };
                let uidvalidity = atom(q.first())
                    .filter(|a| a.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|a| a.parse::<u32>().ok())
                    .filter(|&n| n > 0)
                    .ok_or(bad)?;
                let modseq = modseq(q.get(1)).ok_or(bad)?;
                let mut rest = &q[2..];
                let mut known = None;
                if let [t @ Token::Atom(_), ..] = rest {
                    known = Some(uid_set(Some(t)).ok_or(bad)?);
                    rest = &rest[1..];
                }
                // The sequence match data only helps a server that has forgotten expunges; this
                // one logs them all, so it is checked and not used.
                if let [Token::List(m), ..] = rest {
                    let [seqs, uids] = &m[..] else { return Err(bad) };
                    uid_set(Some(seqs)).ok_or(bad)?;
                    uid_set(Some(uids)).ok_or(bad)?;
                    rest = &rest[1..];
                }
                if !rest.is_empty() {
                    return Err(bad);
                }
                out.qresync = Some(Qresync { uidvalidity, modseq, known });
            }
            _ => return Err("Unknown or repeated SELECT parameter"),
        }
        i += 1;
    }
    Ok(out)
}

/// `(CHANGEDSINCE modseq [VANISHED])` after the FETCH items (RFC 7162 §3.1.4.1, §3.2.6).
pub(super) fn fetch_modifiers(t: Option<&Token>) -> Result<FetchModifiers, &'static str> {
    let mut out = FetchModifiers::default();
    let Some(t) = t else { return Ok(out) };
    let Token::List(mods) = t else { return Err("Syntax: FETCH set items [(modifiers)]") };
    if mods.is_empty() {
        return Err("Syntax: FETCH set items [(modifiers)]");
    }
    let mut i = 0;
    while i < mods.len() {
        match atom(mods.get(i)).map(str::to_ascii_uppercase).as_deref() {
            Some("CHANGEDSINCE") if out.changed_since.is_none() => {
                i += 1;
                out.changed_since = Some(modseq(mods.get(i)).ok_or("CHANGEDSINCE needs a mod-sequence")?);
            }
            Some("VANISHED") if !out.vanished => out.vanished = true,
            _ => return Err("Unknown or repeated FETCH modifier"),
        }
        i += 1;
    }
    Ok(out)
}

/// STORE arguments with an optional `(UNCHANGEDSINCE modseq)` after the set (RFC 7162 §3.1.3):
/// the arguments without it, and its value.
pub(super) fn store_modifiers(args: &[Token]) -> Result<(Vec<Token>, Option<u64>), &'static str> {
    let [set, Token::List(mods), rest @ ..] = args else { return Ok((args.to_vec(), None)) };
    let bad = "Syntax: STORE set (UNCHANGEDSINCE modseq) [+|-]FLAGS[.SILENT] (flags)";
    let [name, value] = &mods[..] else { return Err(bad) };
    if !atom(Some(name)).is_some_and(|n| n.eq_ignore_ascii_case("UNCHANGEDSINCE")) {
        return Err(bad);
    }
    let n = modseq(Some(value)).ok_or(bad)?;
    let mut out = vec![set.clone()];
    out.extend(rest.iter().cloned());
    Ok((out, Some(n)))
}

/// Whether an argument (at any depth) is the atom `word`: `SEARCH MODSEQ` and
/// `STATUS (HIGHESTMODSEQ)` are CONDSTORE-enabling (RFC 7162 §3.1).
pub(super) fn mentions(args: &[Token], word: &str) -> bool {
    args.iter().any(|t| match t {
        Token::Atom(a) => a.eq_ignore_ascii_case(word),
        Token::List(l) => mentions(l, word),
        _ => false,
    })
}

/// The modseq tag of a primary that replicates: its place in `[sync] order`, 1..=15 (plan §2.5;
/// the order lists every primary once, and the same config on every node gives each a distinct
/// tag). 0 for a node that does not replicate. A 16th primary would share tag 1 with the first:
/// its clients could then miss changes on failover between those two.
pub(super) fn node_tag(config: &Config, node: &Node) -> u8 {
    if config.sync.is_none() || node.role != Role::Primary {
        return 0;
    }
    let pos = config.sync_order().iter().position(|n| *n == node.name).unwrap_or(0);
    (pos % 15) as u8 + 1
}

/// A store modseq as clients see it (module doc).
pub(super) fn shown(store: &Store, m: u64) -> u64 {
    tagged(m, store.modseq_tag())
}

/// `shown` with the tag at hand (`Store::modseq_tag`).
pub(super) fn tagged(m: u64, tag: Option<u8>) -> u64 {
    tag.map_or(m, |t| (m << 4) | u64::from(t))
}

/// A modseq a client sent (CHANGEDSINCE, UNCHANGEDSINCE, QRESYNC, SEARCH MODSEQ) as a store
/// modseq of `mbox`, and whether it was foreign. Foreign: another node's tag, or above anything
/// this node showed for the mailbox (a value from before the tags, made by another node).
/// RFC 7162 §3.1: the server must not miss a change the client has not seen; 0 reports all.
pub(super) fn from_client(store: &Store, acct: u32, mbox: u32, m: u64) -> Result<Since, StoreError> {
    let Some(tag) = store.modseq_tag() else { return Ok(Since { modseq: m, foreign: None }) };
    let Some(mailbox) = store.mailbox(acct, mbox)? else { return Ok(Since { modseq: m >> 4, foreign: None }) };
    if m & 15 == u64::from(tag) && m >> 4 <= mailbox.highest_modseq {
        Ok(Since { modseq: m >> 4, foreign: None })
    } else {
        Ok(Since { modseq: 0, foreign: Some(mailbox.uidnext) })
    }
}

/// A client's modseq translated by `from_client`.
pub(super) struct Since {
    pub modseq: u64,
    /// UIDNEXT of the mailbox when the client's value was foreign.
    pub foreign: Option<u32>,
}

/// The UIDs the client may know (`wanted`) that are gone since `since`. For a foreign modseq the
/// expunge log cannot say which of them the client saw go, so: every UID below UIDNEXT that is
/// not in the mailbox (RFC 7162 §3.2.10 lets VANISHED (EARLIER) name UIDs the client never saw).
fn gone_since(
    store: &Store,
    acct: u32,
    mbox: u32,
    since: &Since,
    wanted: impl Fn(u32) -> bool,
) -> Result<Vec<u32>, StoreError> {
    match since.foreign {
        None => Ok(store.expunged_since(acct, mbox, since.modseq)?.into_iter().filter(|&u| wanted(u)).collect()),
        Some(uidnext) => {
            let present = store.uids(acct, mbox)?;
            Ok((1..uidnext).filter(|&u| wanted(u) && present.binary_search(&u).is_err()).collect())
        }
    }
}

/// HIGHESTMODSEQ of a mailbox as clients see it: a mod-sequence is positive (RFC 7162 §7), and
/// a mailbox created before anything else happened in its account still has 0.
pub(super) fn highest(store: &Store, m: &Mailbox) -> u64 {
    shown(store, m.highest_modseq.max(1))
}

/// ` MODSEQ (n)` for a FETCH response when CONDSTORE is on (RFC 7162 §3.1.4: flag changes,
/// solicited or not, carry the new mod-sequence), else nothing.
pub(super) fn modseq_item(store: &Store, ext: Enabled, e: &Entry) -> String {
    if ext.condstore {
        format!(" MODSEQ ({})", shown(store, e.modseq))
    } else {
        String::new()
    }
}

/// `* VANISHED [(EARLIER) ]uids` with the UIDs as a compact set (RFC 7162 §3.2.10).
pub(super) fn vanished_line(uids: &[u32], earlier: bool) -> String {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let set = super::copy::uid_set(&sorted);
    format!("* VANISHED {}{set}\r\n", if earlier { "(EARLIER) " } else { "" })
}

/// The QRESYNC part of a SELECT whose UIDVALIDITY matched (RFC 7162 §3.2.5.2): VANISHED
/// (EARLIER) for the known UIDs expunged since the client's modseq, then a FETCH with UID,
/// FLAGS and MODSEQ for every message changed since it.
pub(super) fn resync(store: &Store, acct: u32, sel: &Selected, q: &Qresync, conn: &mut Conn) -> Result<(), StoreError> {
    let known = |u: u32| q.known.as_ref().is_none_or(|k| in_set(k, u));
    let since = from_client(store, acct, sel.mbox, q.modseq)?;
    let gone = gone_since(store, acct, sel.mbox, &since, known)?;
    if !gone.is_empty() {
        conn.write(vanished_line(&gone, true).as_bytes());
    }
    for uid in store.changed_since(acct, sel.mbox, since.modseq)? {
        if !known(uid) {
            continue;
        }
        let Ok(pos) = sel.uids.binary_search(&uid) else { continue };
        if let Some(e) = store.entry(acct, sel.mbox, uid)? {
            conn.write(
                format!(
                    "* {} FETCH (UID {uid} FLAGS ({}) MODSEQ ({}))\r\n",
                    pos + 1,
                    flag_list(&e),
                    shown(store, e.modseq)
                )
                .as_bytes(),
            );
        }
    }
    Ok(())
}

/// FETCH with CHANGEDSINCE: keeps the targets changed since the modseq and asks for MODSEQ
/// (RFC 7162 §3.1.4.1); with VANISHED (UID FETCH only, §3.2.6) first reports the UIDs of the set
/// expunged since then.
#[allow(clippy::too_many_arguments)]
pub(super) fn changed_since(
    store: &Store,
    acct: u32,
    sel: &Selected,
    set: &str,
    mods: &FetchModifiers,
    targets: &mut Vec<(u32, u32)>,
    items: &mut Vec<FetchItem>,
    conn: &mut Conn,
) -> Result<(), StoreError> {
    let Some(since) = mods.changed_since else { return Ok(()) };
    let since = from_client(store, acct, sel.mbox, since)?;
    if mods.vanished {
        // `*` stands for every UID here: expunged UIDs may be above the largest one left.
        let ranges = parse_sequence_set(set, u32::MAX).unwrap_or_default();
        let gone = gone_since(store, acct, sel.mbox, &since, |u| in_set(&ranges, u))?;
        if !gone.is_empty() {
            conn.write(vanished_line(&gone, true).as_bytes());
        }
    }
    let changed = store.changed_since(acct, sel.mbox, since.modseq)?;
    targets.retain(|(_, u)| changed.binary_search(u).is_ok());
    if !items.contains(&FetchItem::ModSeq) {
        items.push(FetchItem::ModSeq);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<Token> {
        super::super::parse::parse_request(format!("t X {s}").as_bytes(), &mut Vec::new()).unwrap().args
    }

    #[test]
    fn select_parameters() {
        assert_eq!(select_params(&[]).unwrap(), SelectParams::default());
        assert!(select_params(&toks("(condstore)")).unwrap().condstore);
        let p = select_params(&toks("(QRESYNC (67890007 20050715194045000 41,43:211,214:541))")).unwrap();
        let q = p.qresync.unwrap();
        assert_eq!((q.uidvalidity, q.modseq), (67890007, 20050715194045000));
        assert_eq!(q.known, Some(vec![(41, 41), (43, 211), (214, 541)]));
        let p = select_params(&toks("(QRESYNC (67890007 90060115194045000 1:29 (1:3,5 2:4,9)))")).unwrap();
        assert!(p.qresync.is_some());
        let p = select_params(&toks("(QRESYNC (1 0 (1 2)) CONDSTORE)")).unwrap();
        assert!(p.condstore && p.qresync.unwrap().known.is_none());
        for bad in [
            "()",
            "(BOGUS)",
            "CONDSTORE",
            "(QRESYNC)",
            "(QRESYNC (0 5))",
            "(QRESYNC (1))",
            "(QRESYNC (1 x))",
            "(QRESYNC (1 9223372036854775808))",
            "(QRESYNC (1 5 1:x))",
            "(QRESYNC (1 5 1 (1)))",
            "(QRESYNC (1 5 1 (1 2) extra))",
            "(QRESYNC (1 5) QRESYNC (1 5))",
        ] {
            assert!(select_params(&toks(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn fetch_and_store_modifiers() {
        let t = toks("(CHANGEDSINCE 12 VANISHED)");
        assert_eq!(fetch_modifiers(t.first()).unwrap(), FetchModifiers { changed_since: Some(12), vanished: true });
        assert_eq!(fetch_modifiers(None).unwrap(), FetchModifiers::default());
        for bad in ["()", "(CHANGEDSINCE)", "(CHANGEDSINCE -1)", "(VANISHED VANISHED)", "(FOO 1)", "x"] {
            assert!(fetch_modifiers(toks(bad).first()).is_err(), "{bad}");
        }
        let (args, n) = store_modifiers(&toks("1:3 (UNCHANGEDSINCE 0) +FLAGS (\\Seen)")).unwrap();
        assert_eq!((args.len(), n), (3, Some(0)));
        let (args, n) = store_modifiers(&toks("1 FLAGS x")).unwrap();
        assert_eq!((args.len(), n), (3, None));
        assert!(store_modifiers(&toks("1 (CHANGEDSINCE 3) FLAGS x")).is_err());
        assert!(store_modifiers(&toks("1 (UNCHANGEDSINCE) FLAGS x")).is_err());
    }

    /// plan §2.5: a replicating node tags what it shows and takes another node's value as 0; a
    /// single node shows and takes its counter as it is.
    #[test]
    fn modseq_tags() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "t", 1 << 20).unwrap();
        let acct = store.ensure_account("a@example.test").unwrap();
        let inbox = store.mailbox_by_name(acct, "INBOX").unwrap().unwrap();
        let h = inbox.mailbox.highest_modseq;
        assert!(h > 0);
        let take = |m| from_client(&store, acct, inbox.id, m).unwrap();
        assert_eq!((shown(&store, h), take(h).modseq, take(h).foreign), (h, h, None));
        assert_eq!(take(h + 100).modseq, h + 100, "a single node compares every value");

        store.set_modseq_tag(3);
        assert_eq!(shown(&store, h), (h << 4) | 3);
        assert_eq!(highest(&store, &inbox.mailbox), (h << 4) | 3);
        let own = take((h << 4) | 3);
        assert_eq!((own.modseq, own.foreign), (h, None));
        assert_eq!(take(3).modseq, 0, "this node's 0");
        for foreign in [(h << 4) | 2, (h << 4) | 15, (h << 4) | 1, ((h + 1) << 4) | 3] {
            let since = take(foreign);
            assert_eq!((since.modseq, since.foreign), (0, Some(inbox.mailbox.uidnext)), "{foreign}");
        }
    }

    /// A store keeps the tag it showed values with once `[sync]` is gone (values never shrink), and
    /// takes a new configured tag (values with the old one are then foreign: one full resync).
    #[test]
    fn modseq_tag_outlives_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (acct, h) = {
            let store = Store::open(dir.path(), "t", 1 << 20).unwrap();
            assert_eq!(store.adopt_modseq_tag(0).unwrap(), 0, "never replicated: no tag");
            assert_eq!(store.modseq_tag(), None);
            let acct = store.ensure_account("a@example.test").unwrap();
            let inbox = store.mailbox_by_name(acct, "INBOX").unwrap().unwrap();
            assert_eq!(shown(&store, inbox.mailbox.highest_modseq), inbox.mailbox.highest_modseq);
            assert_eq!(store.adopt_modseq_tag(3).unwrap(), 3);
            (acct, highest(&store, &inbox.mailbox))
        };
        assert_eq!(h & 15, 3);
        // Restarted without `[sync]`: the same tag, the same values.
        let store = Store::open(dir.path(), "t", 1 << 20).unwrap();
        assert_eq!(store.adopt_modseq_tag(0).unwrap(), 3);
        let inbox = store.mailbox_by_name(acct, "INBOX").unwrap().unwrap();
        assert_eq!(highest(&store, &inbox.mailbox), h);
        let own = from_client(&store, acct, inbox.id, h).unwrap();
        assert_eq!((own.modseq, own.foreign), (h >> 4, None));
        let other = from_client(&store, acct, inbox.id, (h & !15) | 2).unwrap();
        assert_eq!((other.modseq, other.foreign), (0, Some(inbox.mailbox.uidnext)), "another tag is foreign");
        // A reordered `[sync] order`: the new tag is taken and kept; the old one is now foreign.
        assert_eq!(store.adopt_modseq_tag(5).unwrap(), 5);
        assert_eq!(from_client(&store, acct, inbox.id, h).unwrap().foreign, Some(inbox.mailbox.uidnext));
        drop(store);
        let store = Store::open(dir.path(), "t", 1 << 20).unwrap();
        assert_eq!(store.adopt_modseq_tag(0).unwrap(), 5);
        assert_eq!(store.modseq_tag(), Some(5));
    }

    #[test]
    fn vanished_sets() {
        assert_eq!(vanished_line(&[5, 1, 2, 3, 3], false), "* VANISHED 1:3,5\r\n");
        assert_eq!(vanished_line(&[7], true), "* VANISHED (EARLIER) 7\r\n");
        assert!(mentions(&toks("UID 1 (MODSEQ 5)"), "modseq"));
        assert!(!mentions(&toks("SUBJECT \"MODSEQ\""), "MODSEQ"));
    }
}
