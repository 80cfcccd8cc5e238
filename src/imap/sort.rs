//! SORT and THREAD (RFC 5256), with their UID forms. The search program is parsed and evaluated
//! by the search module; only the header chunks of the matching messages are read. The base
//! subject (§2.1) is computed here, not with mail-parser's `thread_name`, which also strips
//! localised prefixes.

use std::collections::HashMap;
use std::sync::Arc;

use mail_parser::{Address, HeaderValue, MessageParser};

use super::parse::Token;
use super::search::{evaluate, read_message, Need, Program};
use super::session::{Reply, Selected};
use crate::net::Conn;
use crate::store::Store;

/// At most this many References entries are linked per message.
const MAX_REFERENCES: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Criterion {
    Arrival,
    Cc,
    Date,
    From,
    Size,
    Subject,
    To,
}

/// What SORT and THREAD look at for one matching message.
#[derive(Debug, Default, Clone)]
struct Info {
    seq: u32,
    uid: u32,
    internal: i64,
    size: u64,
    /// The Date field in UTC, or the internal date.
    sent: i64,
    /// Local parts of the first mailbox, ASCII-uppercased (i;ascii-casemap).
    from: String,
    to: String,
    cc: String,
    /// The base subject, ASCII-uppercased (i;ascii-casemap), and whether extracting it removed a
    /// reply or forward marker.
    subject: String,
    reply: bool,
    message_id: Option<String>,
    references: Vec<String>,
}

fn bad<T>(m: &str) -> Result<T, Reply> {
    Err(Reply::Bad(m.into()))
}

fn parse_criteria(t: Option<&Token>) -> Result<Vec<(Criterion, bool)>, Reply> {
    let Some(Token::List(items)) = t else { return bad("Syntax: SORT (criteria) charset search-keys") };
    let mut out = Vec::new();
    let mut reverse = false;
    for it in items {
        let Token::Atom(a) = it else { return bad("Invalid sort criterion") };
        let c = match a.to_ascii_uppercase().as_str() {
            "REVERSE" => {
                if reverse {
                    return bad("REVERSE REVERSE is not a sort criterion");
                }
                reverse = true;
                continue;
            }
            "ARRIVAL" => Criterion::Arrival,
            "CC" => Criterion::Cc,
            "DATE" => Criterion::Date,
            "FROM" => Criterion::From,
            "SIZE" => Criterion::Size,
            "SUBJECT" => Criterion::Subject,
            "TO" => Criterion::To,
            _ => return bad("Unknown sort criterion"),
        };
        out.push((c, reverse));
        reverse = false;
    }
    if out.is_empty() || reverse {
        return bad("Syntax: SORT needs at least one criterion");
    }
    Ok(out)
}

/// `charset search-keys`: the charset is mandatory here (RFC 5256 §3).
fn parse_program(args: &[Token]) -> Result<Program, Reply> {
    if args.len() < 2 || args[0].astring().is_none() || matches!(args[0], Token::List(_)) {
        return bad("Syntax: charset search-keys");
    }
    let mut toks = Vec::with_capacity(args.len() + 1);
    toks.push(Token::Atom("CHARSET".into()));
    toks.extend_from_slice(args);
    Ok(Program::parse(&toks)?)
}

fn local_part(a: Option<&Address>) -> String {
    let addr = a.and_then(Address::first).and_then(|x| x.address.as_deref()).unwrap_or("");
    let local = match addr.rfind('@') {
        Some(i) => &addr[..i],
        None => addr,
    };
    local.to_ascii_uppercase()
}

fn strip_brackets(s: &str) -> String {
    s.trim().trim_start_matches('<').trim_end_matches('>').to_string()
}

fn info_of(raw: &[u8], seq: u32, uid: u32, internal: i64, size: u64) -> Info {
    let mut i = Info { seq, uid, internal, size, sent: internal, ..Info::default() };
    let Some(msg) = MessageParser::new().parse_headers(raw) else {
        return i;
    };
    if let Some(d) = msg.date().filter(|d| d.is_valid()) {
        i.sent = d.to_timestamp();
    }
    i.from = local_part(msg.from());
    i.to = local_part(msg.to());
    i.cc = local_part(msg.cc());
    let (subject, reply) = base_subject(msg.subject().unwrap_or(""));
    i.subject = subject.to_ascii_uppercase();
    i.reply = reply;
    i.message_id = msg.message_id().map(strip_brackets).filter(|s| !s.is_empty());
    let ids = |v: &HeaderValue| -> Vec<String> {
        match v {
            HeaderValue::Text(t) => vec![strip_brackets(t)],
            HeaderValue::TextList(l) => l.iter().map(|t| strip_brackets(t)).collect(),
            _ => Vec::new(),
        }
    };
    let mut refs: Vec<String> = ids(msg.references()).into_iter().filter(|s| !s.is_empty()).collect();
    if refs.is_empty() {
        refs = ids(msg.in_reply_to()).into_iter().filter(|s| !s.is_empty()).take(1).collect();
    }
    if refs.len() > MAX_REFERENCES {
        refs.drain(..refs.len() - MAX_REFERENCES);
    }
    i.references = refs;
    i
}

/// Strips one leading `subj-blob` (`[...]` and trailing WSP), if there is one.
fn strip_blob(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('[')?;
    let end = rest.find(['[', ']'])?;
    if rest.as_bytes()[end] != b']' {
        return None;
    }
    Some(rest[end + 1..].trim_start_matches(' '))
}

/// Strips one leading `subj-refwd`: `("re" / "fw" ["d"]) *WSP [subj-blob] ":"`.
fn strip_refwd(s: &str) -> Option<&str> {
    let lower = s.get(..3).map(str::to_ascii_lowercase).unwrap_or_else(|| s.to_ascii_lowercase());
    let n = if lower.starts_with("fwd") {
        3
    } else if lower.starts_with("re") || lower.starts_with("fw") {
        2
    } else {
        return None;
    };
    let mut rest = s[n..].trim_start_matches(' ');
    if let Some(r) = strip_blob(rest) {
        rest = r;
    }
    rest.strip_prefix(':')
}

/// The base subject of RFC 5256 §2.1, and whether a reply or forward marker was removed.
pub(super) fn base_subject(subject: &str) -> (String, bool) {
    // (1) Encoded words are decoded by the parser; runs of white space become one space.
    let mut s = String::with_capacity(subject.len());
    for c in subject.chars() {
        let c = if matches!(c, '\t' | '\r' | '\n') { ' ' } else { c };
        if !(c == ' ' && s.ends_with(' ')) {
            s.push(c);
        }
    }
    let mut s = s.as_str();
    let mut reply = false;
    loop {
        // (2) Trailing "(fwd)" and white space.
        loop {
            let t = s.trim_end_matches(' ');
            if t.len() >= 5 && t.is_char_boundary(t.len() - 5) && t[t.len() - 5..].eq_ignore_ascii_case("(fwd)") {
                s = &t[..t.len() - 5];
                reply = true;
            } else {
                s = t;
                break;
            }
        }
        // (3) and (4): leading white space, subj-refwd (after blobs), and blobs that leave text.
        loop {
            let before = s.len();
            s = s.trim_start_matches(' ');
            let mut blobs = s;
            while let Some(r) = strip_blob(blobs) {
                blobs = r;
            }
            if let Some(r) = strip_refwd(blobs) {
                s = r;
                reply = true;
            } else if let Some(r) = strip_blob(s) {
                if !r.trim_start_matches(' ').is_empty() {
                    s = r;
                }
            }
            if s.len() == before {
                break;
            }
        }
        // (5) "[fwd:" subject "]".
        if s.len() >= 6 && s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("[fwd:")) && s.ends_with(']') {
            s = &s[5..s.len() - 1];
            reply = true;
            continue;
        }
        break;
    }
    (s.to_string(), reply)
}

fn sort_infos(infos: &mut [Info], criteria: &[(Criterion, bool)]) {
    infos.sort_by(|a, b| {
        for &(c, rev) in criteria {
            let o = match c {
                Criterion::Arrival => a.internal.cmp(&b.internal),
                Criterion::Cc => a.cc.cmp(&b.cc),
                Criterion::Date => a.sent.cmp(&b.sent),
                Criterion::From => a.from.cmp(&b.from),
                Criterion::Size => a.size.cmp(&b.size),
                Criterion::Subject => a.subject.cmp(&b.subject),
                Criterion::To => a.to.cmp(&b.to),
            };
            let o = if rev { o.reverse() } else { o };
            if o.is_ne() {
                return o;
            }
        }
        a.seq.cmp(&b.seq)
    });
}

/// One node of a thread tree: a message (index into the infos) or a dummy.
#[derive(Debug, Default, Clone)]
struct Node {
    msg: Option<usize>,
    parent: Option<usize>,
    children: Vec<usize>,
}

/// A forest over the infos: the roots and the node arena.
struct Forest {
    nodes: Vec<Node>,
    roots: Vec<usize>,
}

impl Forest {
    fn new_node(&mut self, msg: Option<usize>) -> usize {
        self.nodes.push(Node { msg, ..Node::default() });
        self.nodes.len() - 1
    }

    /// Whether `a` is `b` or one of its ancestors.
    fn is_ancestor(&self, a: usize, b: usize) -> bool {
        let mut cur = Some(b);
        while let Some(c) = cur {
            if c == a {
                return true;
            }
            cur = self.nodes[c].parent;
        }
        false
    }

    fn unlink(&mut self, child: usize) {
        if let Some(p) = self.nodes[child].parent.take() {
            self.nodes[p].children.retain(|&c| c != child);
        }
    }

    fn link(&mut self, parent: usize, child: usize) {
        self.nodes[child].parent = Some(parent);
        self.nodes[parent].children.push(child);
    }

    /// The nodes below `roots` in post-order (children before parents), without recursion.
    fn post_order(&self, roots: &[usize]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stack: Vec<(usize, bool)> = roots.iter().rev().map(|&r| (r, false)).collect();
        while let Some((n, done)) = stack.pop() {
            if done {
                out.push(n);
            } else {
                stack.push((n, true));
                stack.extend(self.nodes[n].children.iter().rev().map(|&c| (c, false)));
            }
        }
        out
    }

    /// Sorts every set of siblings, roots included, by sent date (a dummy by its first
    /// child's), ties by sequence number.
    fn sort(&mut self, infos: &[Info]) {
        let key = |nodes: &[Node], n: usize| -> (i64, u32) {
            let mut cur = n;
            loop {
                if let Some(m) = nodes[cur].msg {
                    return (infos[m].sent, infos[m].seq);
                }
                match nodes[cur].children.first() {
                    Some(&c) => cur = c,
                    None => return (i64::MAX, u32::MAX),
                }
            }
        };
        for n in self.post_order(&self.roots.clone()) {
            let mut ch = std::mem::take(&mut self.nodes[n].children);
            ch.sort_by_key(|&c| key(&self.nodes, c));
            self.nodes[n].children = ch;
        }
        let mut roots = std::mem::take(&mut self.roots);
        roots.sort_by_key(|&c| key(&self.nodes, c));
        self.roots = roots;
    }

    /// `(1 2)(3 (4)(5))`, without recursion.
    fn render(&self, infos: &[Info], uid: bool) -> String {
        enum Step {
            Node(usize),
            Text(&'static str),
        }
        let mut out = String::new();
        let mut stack: Vec<Step> = Vec::new();
        for &r in self.roots.iter().rev() {
            stack.push(Step::Text(")"));
            stack.push(Step::Node(r));
            stack.push(Step::Text("("));
        }
        while let Some(step) = stack.pop() {
            let n = match step {
                Step::Text(t) => {
                    out.push_str(t);
                    continue;
                }
                Step::Node(n) => n,
            };
            let node = &self.nodes[n];
            if let Some(m) = node.msg {
                let i = &infos[m];
                out.push_str(&(if uid { i.uid } else { i.seq }).to_string());
            }
            match node.children.as_slice() {
                [] => {}
                [only] => {
                    if node.msg.is_some() {
                        stack.push(Step::Node(*only));
                        stack.push(Step::Text(" "));
                    } else {
                        stack.push(Step::Node(*only));
                    }
                }
                many => {
                    for &c in many.iter().rev() {
                        stack.push(Step::Text(")"));
                        stack.push(Step::Node(c));
                        stack.push(Step::Text("("));
                    }
                    if node.msg.is_some() {
                        stack.push(Step::Text(" "));
                    }
                }
            }
        }
        out
    }
}

/// THREAD=ORDEREDSUBJECT (RFC 5256 §3): messages grouped by base subject, each group's later
/// messages children of its first.
fn ordered_subject(infos: &[Info]) -> Forest {
    let mut order: Vec<usize> = (0..infos.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&infos[a], &infos[b]);
        a.subject.cmp(&b.subject).then(a.sent.cmp(&b.sent)).then(a.seq.cmp(&b.seq))
    });
    let mut f = Forest { nodes: Vec::new(), roots: Vec::new() };
    let mut current: Option<(usize, &str)> = None;
    for m in order {
        let n = f.new_node(Some(m));
        match current {
            Some((root, subj)) if subj == infos[m].subject => f.link(root, n),
            _ => {
                f.roots.push(n);
                current = Some((n, &infos[m].subject));
            }
        }
    }
    f.sort(infos);
    f
}

/// THREAD=REFERENCES (RFC 5256 §3).
fn references(infos: &[Info]) -> Forest {
    let mut f = Forest { nodes: Vec::new(), roots: Vec::new() };
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    // (1) Link messages and their references.
    for (m, info) in infos.iter().enumerate() {
        let own = match info.message_id.as_deref() {
            Some(id) => match by_id.get(id) {
                Some(&n) if f.nodes[n].msg.is_none() => {
                    f.nodes[n].msg = Some(m);
                    n
                }
                // A duplicate Message-ID: this message gets a container of its own.
                Some(_) => f.new_node(Some(m)),
                None => {
                    let n = f.new_node(Some(m));
                    by_id.insert(id, n);
                    n
                }
            },
            None => f.new_node(Some(m)),
        };
        let mut prev: Option<usize> = None;
        for r in &info.references {
            let n = match by_id.get(r.as_str()) {
                Some(&n) => n,
                None => {
                    let n = f.new_node(None);
                    by_id.insert(r, n);
                    n
                }
            };
            if let Some(p) = prev {
                if f.nodes[n].parent.is_none() && !f.is_ancestor(n, p) {
                    f.link(p, n);
                }
            }
            prev = Some(n);
        }
        // The message's parent is the last reference, unless that would make a loop.
        if let Some(p) = prev {
            if f.nodes[own].parent != Some(p) && !f.is_ancestor(own, p) {
                f.unlink(own);
                f.link(p, own);
            }
        } else {
            f.unlink(own);
        }
    }
    drop(by_id);
    // (2) The root set.
    let all_roots: Vec<usize> = (0..f.nodes.len()).filter(|&n| f.nodes[n].parent.is_none()).collect();
    // (4) Prune dummies: empty ones go, others give their children to their parent, except
    // at the root where a dummy with several children stays.
    for n in f.post_order(&all_roots) {
        let old = std::mem::take(&mut f.nodes[n].children);
        let mut new = Vec::with_capacity(old.len());
        for c in old {
            if f.nodes[c].msg.is_some() {
                new.push(c);
            } else {
                new.extend(std::mem::take(&mut f.nodes[c].children));
            }
        }
        for &c in &new {
            f.nodes[c].parent = Some(n);
        }
        f.nodes[n].children = new;
    }
    for r in all_roots {
        if f.nodes[r].msg.is_some() {
            f.roots.push(r);
            continue;
        }
        match f.nodes[r].children.len() {
            0 => {}
            1 => {
                let c = f.nodes[r].children[0];
                f.nodes[c].parent = None;
                f.roots.push(c);
            }
            _ => f.roots.push(r),
        }
    }
    // (5) Group the root set by base subject.
    let first_msg = |f: &Forest, n: usize| -> Option<usize> {
        match f.nodes[n].msg {
            Some(m) => Some(m),
            None => f.nodes[n]
                .children
                .iter()
                .filter_map(|&c| f.nodes[c].msg)
                .min_by_key(|&m| (infos[m].sent, infos[m].seq)),
        }
    };
    let mut table: HashMap<&str, usize> = HashMap::new();
    for &r in &f.roots {
        let Some(m) = first_msg(&f, r) else { continue };
        let subj = infos[m].subject.as_str();
        if subj.is_empty() {
            continue;
        }
        match table.get(subj) {
            None => {
                table.insert(subj, r);
            }
            Some(&old) => {
                let old_dummy = f.nodes[old].msg.is_none();
                let this_dummy = f.nodes[r].msg.is_none();
                let old_reply = f.nodes[old].msg.is_some_and(|m| infos[m].reply);
                let this_reply = f.nodes[r].msg.is_some_and(|m| infos[m].reply);
                if (!old_dummy && this_dummy) || (old_reply && !this_dummy && !this_reply) {
                    table.insert(subj, r);
                }
            }
        }
    }
    let snapshot = f.roots.clone();
    for r in snapshot {
        if f.nodes[r].parent.is_some() {
            continue;
        }
        let Some(m) = first_msg(&f, r) else { continue };
        let subj = infos[m].subject.as_str();
        let Some(&t) = table.get(subj) else { continue };
        if t == r {
            continue;
        }
        let t_dummy = f.nodes[t].msg.is_none();
        let r_dummy = f.nodes[r].msg.is_none();
        let t_reply = f.nodes[t].msg.is_some_and(|m| infos[m].reply);
        let r_reply = f.nodes[r].msg.is_some_and(|m| infos[m].reply);
        if t_dummy && r_dummy {
            for c in std::mem::take(&mut f.nodes[r].children) {
                f.link(t, c);
            }
        } else if t_dummy || (!r_dummy && r_reply && !t_reply) {
            f.link(t, r);
        } else {
            // A new dummy takes the table root's place, with both below it.
            let d = f.new_node(None);
            if let Some(p) = f.roots.iter().position(|&k| k == t) {
                f.roots[p] = d;
            }
            f.link(d, t);
            f.link(d, r);
            table.insert(subj, d);
        }
    }
    let roots = std::mem::take(&mut f.roots);
    f.roots = roots
        .into_iter()
        .filter(|&r| f.nodes[r].parent.is_none() && (f.nodes[r].msg.is_some() || !f.nodes[r].children.is_empty()))
        .collect();
    // (6) Sort every level by sent date.
    f.sort(infos);
    f
}

/// Reads the header of every message of the view that `prog` matches.
fn collect(store: &Store, acct: u32, mbox: u32, view: &[u32], prog: &Program) -> Result<Vec<Info>, Reply> {
    let internal = |e: crate::store::StoreError| {
        tracing::error!("imap store-error error={e}");
        Reply::No("[SERVERBUG] Internal error, try again later".into())
    };
    let hits = evaluate(store, acct, mbox, view, &prog.key).map_err(internal)?;
    let entries = store.entries(acct, mbox).map_err(internal)?;
    let mut out = Vec::with_capacity(hits.len());
    for (seq, uid, _) in hits {
        let Ok(i) = entries.binary_search_by_key(&uid, |(u, _)| *u) else { continue };
        let e = &entries[i].1;
        let raw = read_message(store, &e.blob, Need::Headers).map_err(internal)?.unwrap_or_default();
        out.push(info_of(&raw, seq, uid, e.internal_date, e.size));
    }
    Ok(out)
}

async fn run(store: Arc<Store>, acct: u32, sel: &Selected, mut prog: Program) -> Result<Vec<Info>, Reply> {
    let view = sel.uids.clone();
    prog.key.resolve(view.len() as u32, view.last().copied().unwrap_or(0));
    prog.key.resolve_saved(&sel.saved);
    let mbox = sel.mbox;
    tokio::task::spawn_blocking(move || collect(&store, acct, mbox, &view, &prog)).await.map_err(|e| {
        tracing::error!("imap sort-task error={e}");
        Reply::No("[SERVERBUG] Internal error, try again later".into())
    })?
}

/// SORT or THREAD (`name`), or their UID forms, in the selected state.
pub(super) async fn run_command(
    name: &str,
    store: Arc<Store>,
    acct: u32,
    sel: &Selected,
    args: &[Token],
    uid: bool,
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    if name == "SORT" {
        sort(store, acct, sel, args, uid, conn).await
    } else {
        thread(store, acct, sel, args, uid, conn).await
    }
}

/// SORT / UID SORT in the selected state.
async fn sort(
    store: Arc<Store>,
    acct: u32,
    sel: &Selected,
    args: &[Token],
    uid: bool,
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let criteria = parse_criteria(args.first())?;
    let prog = parse_program(&args[1..])?;
    let mut infos = run(store, acct, sel, prog).await?;
    sort_infos(&mut infos, &criteria);
    let mut line = String::from("* SORT");
    for i in &infos {
        line.push_str(&format!(" {}", if uid { i.uid } else { i.seq }));
    }
    conn.write(format!("{line}\r\n").as_bytes());
    Ok(Some(format!("{}SORT completed", if uid { "UID " } else { "" })))
}

/// THREAD / UID THREAD in the selected state.
async fn thread(
    store: Arc<Store>,
    acct: u32,
    sel: &Selected,
    args: &[Token],
    uid: bool,
    conn: &mut Conn,
) -> Result<Option<String>, Reply> {
    let refs = match args.first() {
        Some(Token::Atom(a)) if a.eq_ignore_ascii_case("ORDEREDSUBJECT") => false,
        Some(Token::Atom(a)) if a.eq_ignore_ascii_case("REFERENCES") => true,
        _ => return bad("Syntax: THREAD ORDEREDSUBJECT|REFERENCES charset search-keys"),
    };
    let prog = parse_program(&args[1..])?;
    let mut infos = run(store, acct, sel, prog).await?;
    infos.sort_by_key(|i| i.seq);
    let forest = if refs { references(&infos) } else { ordered_subject(&infos) };
    let body = forest.render(&infos, uid);
    conn.write(if body.is_empty() { "* THREAD\r\n".to_string() } else { format!("* THREAD {body}\r\n") }.as_bytes());
    Ok(Some(format!("{}THREAD completed", if uid { "UID " } else { "" })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_subjects() {
        let b = |s: &str| base_subject(s);
        assert_eq!(b("Re: [PATCH] Fwd: subj (fwd)"), ("subj".into(), true));
        assert_eq!(b("subj"), ("subj".into(), false));
        assert_eq!(b("Re[2]: subj"), ("subj".into(), true));
        assert_eq!(b("RE:   re: Fw: FWD [x]: subj"), ("subj".into(), true));
        assert_eq!(b("[list] subj"), ("subj".into(), false));
        assert_eq!(b("[list] [tag]"), ("[tag]".into(), false));
        assert_eq!(b("[only]"), ("[only]".into(), false));
        assert_eq!(b("[fwd: Re: subj]"), ("subj".into(), true));
        assert_eq!(b("[Fwd: [fwd: subj] ]"), ("subj".into(), true));
        assert_eq!(b("  a\t\r\n  b  (FWD)(fwd)  "), ("a b".into(), true));
        assert_eq!(b("Re subj"), ("Re subj".into(), false));
        assert_eq!(b("Ré: x"), ("Ré: x".into(), false));
        assert_eq!(b("AW: subj"), ("AW: subj".into(), false));
        assert_eq!(b(""), (String::new(), false));
        assert_eq!(b("Re:"), (String::new(), true));
        assert_eq!(b("[unclosed subj"), ("[unclosed subj".into(), false));
        // Encoded words are decoded before extraction.
        let raw = b"Subject: =?UTF-8?Q?Re=3A_=5Bliste=5D_Gr=C3=BC=C3=9Fe?=\r\n\r\n";
        let i = info_of(raw, 1, 1, 0, 0);
        assert_eq!((i.subject.as_str(), i.reply), ("GRüßE", true));
    }

    fn msg(seq: u32, sent: i64, subject: &str, id: Option<&str>, refs: &[&str]) -> Info {
        let (subject, reply) = base_subject(subject);
        Info {
            seq,
            uid: seq + 100,
            sent,
            subject: subject.to_ascii_uppercase(),
            reply,
            message_id: id.map(str::to_string),
            references: refs.iter().map(|s| s.to_string()).collect(),
            ..Info::default()
        }
    }

    #[test]
    fn thread_references_with_a_missing_parent() {
        let infos = vec![
            msg(1, 10, "hello", Some("a"), &[]),
            msg(2, 20, "Re: hello", Some("b"), &["a"]),
            // Its parent "x" is not in the mailbox: 3 and 4 become siblings under a dummy.
            msg(3, 30, "Re: other", Some("c"), &["x"]),
            msg(4, 40, "Re: other", Some("d"), &["x"]),
            msg(5, 50, "Re: hello", Some("e"), &["a", "b"]),
            msg(6, 60, "Re: hello", Some("f"), &["a"]),
            // No references, same base subject as 1 but a reply: a child of 1.
            msg(7, 5, "Re: hello", Some("g"), &[]),
            msg(8, 1, "lonely", None, &["nosuch"]),
        ];
        let f = references(&infos);
        assert_eq!(f.render(&infos, false), "(8)(1 (7)(2 5)(6))((3)(4))");
        assert_eq!(f.render(&infos, true), "(108)(101 (107)(102 105)(106))((103)(104))");
        let f = ordered_subject(&infos);
        assert_eq!(f.render(&infos, false), "(8)(7 (1)(2)(5)(6))(3 4)");
    }

    #[test]
    fn thread_references_loops_and_duplicates() {
        let infos = vec![
            msg(1, 10, "a", Some("a"), &["b"]),
            msg(2, 20, "b", Some("b"), &["a"]),
            msg(3, 30, "c", Some("a"), &[]),
            msg(4, 40, "d", Some("d"), &["d"]),
        ];
        let f = references(&infos);
        let out = f.render(&infos, false);
        for n in ["1", "2", "3", "4"] {
            assert_eq!(out.matches(n).count(), 1, "{out}");
        }
    }

    #[test]
    fn deep_chains_do_not_recurse() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("m{i}")).collect();
        let infos: Vec<Info> = (0..20_000)
            .map(|i| {
                let refs: Vec<&str> = if i > 0 { vec![ids[i - 1].as_str()] } else { vec![] };
                msg(i as u32 + 1, i as i64, "s", Some(&ids[i]), &refs)
            })
            .collect();
        let out = references(&infos).render(&infos, false);
        assert!(out.starts_with("(1 2 3 "));
    }

    #[test]
    fn sort_order() {
        let mut a = msg(1, 30, "b", None, &[]);
        a.size = 5;
        a.from = "ZED".into();
        let mut b = msg(2, 10, "Re: B", None, &[]);
        b.size = 5;
        b.from = "ADA".into();
        let mut c = msg(3, 20, "a", None, &[]);
        c.size = 1;
        let mut v = vec![a, b, c];
        let seqs = |v: &[Info]| v.iter().map(|i| i.seq).collect::<Vec<_>>();
        sort_infos(&mut v, &[(Criterion::Date, false)]);
        assert_eq!(seqs(&v), [2, 3, 1]);
        sort_infos(&mut v, &[(Criterion::Subject, false)]);
        assert_eq!(seqs(&v), [3, 1, 2]);
        sort_infos(&mut v, &[(Criterion::Size, true), (Criterion::From, false)]);
        assert_eq!(seqs(&v), [2, 1, 3]);
        sort_infos(&mut v, &[(Criterion::From, false)]);
        assert_eq!(seqs(&v), [3, 2, 1]);
    }

    #[test]
    fn parsing() {
        use crate::imap::parse::parse_request;
        let args = |s: &str| parse_request(format!("a SORT {s}").as_bytes(), &mut Vec::new()).unwrap().args;
        assert!(parse_criteria(args("(REVERSE DATE SUBJECT) UTF-8 ALL").first()).is_ok());
        for bad in
            ["() UTF-8 ALL", "(REVERSE) UTF-8 ALL", "(FOO) UTF-8 ALL", "DATE UTF-8 ALL", "(REVERSE REVERSE DATE) x"]
        {
            assert!(parse_criteria(args(bad).first()).is_err(), "{bad}");
        }
        assert!(parse_program(&args("UTF-8 ALL")).is_ok());
        assert!(parse_program(&args("UTF-8")).is_err());
        assert!(parse_program(&args("ALL")).is_err());
        assert!(matches!(parse_program(&args("X-NOPE ALL")), Err(Reply::No(_))));
    }
}
