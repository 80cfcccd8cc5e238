//! The `[nodes.NAME]` tables: each machine's hostname, role, data directory, listeners, control
//! socket, certificate and queue schedule, and the rules a backup node must keep.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;

use super::load::{read_host_port, read_tls, Ctx, Entry};
use super::model::{Listen, Node, NodeQueue, Role};
use super::values::normalize_domain;

const NODE_KEYS: &[&str] =
    &["hostname", "role", "data_dir", "listen", "control_socket", "sync_address", "tls", "queue"];
/// What a backup MX does not serve: it has no mailboxes and no users logging in.
const NOT_ON_BACKUP: &[&str] = &["submission", "submissions", "imap", "imaps", "sync"];
const LISTEN_KEYS: &[&str] =
    &["smtp", "submission", "submissions", "imap", "imaps", "http", "https", "sync", "metrics"];
const DEFAULT_DATA_DIR: &str = "/var/lib/postern";

pub(super) fn read_nodes(cx: &mut Ctx<'_>, e: Option<Entry<'_>>) -> Option<BTreeMap<String, Node>> {
    const NEED_ONE: &str = "at least one `[nodes.NAME]` table is required";
    let Some(e) = e else {
        cx.error("nodes", None, NEED_ONE);
        return None;
    };
    let f = cx.table(&e)?;
    let entries = f.entries();
    if entries.is_empty() {
        cx.at(&e, NEED_ONE);
        return None;
    }
    let mut nodes = BTreeMap::new();
    let mut complete = true;
    // hostname -> node name, to say which node already has it.
    let mut hostnames: HashMap<String, &str> = HashMap::new();
    for entry in entries {
        let (node, hostname) = read_node(cx, &entry);
        if let Some((hostname, hostname_entry)) = hostname {
            if let Some(other) = hostnames.insert(hostname.clone(), entry.name) {
                cx.at(&hostname_entry, format!("hostname `{hostname}` is already used by node `{other}`"));
                complete = false;
            }
        }
        match node {
            Some(node) => {
                nodes.insert(node.name.clone(), node);
            }
            None => complete = false,
        }
    }
    complete.then_some(nodes)
}

/// Also hands back the hostname with its entry, even when the rest of the node was refused, so
/// the duplicate-hostname check can still run and point at it.
fn read_node<'d>(cx: &mut Ctx<'_>, e: &Entry<'d>) -> (Option<Node>, Option<(String, Entry<'d>)>) {
    let Some(mut f) = cx.table(e) else {
        return (None, None);
    };
    cx.check_keys(&mut f, NODE_KEYS);
    let hostname_entry = cx.require(&f, "hostname");
    let hostname = hostname_entry.as_ref().and_then(|h| {
        let text = cx.string(h)?;
        normalize_domain(text).map_err(|m| cx.at(h, m)).ok()
    });
    let role = f.get("role").map_or(Some(Role::Primary), |r| match cx.string(&r)? {
        "primary" => Some(Role::Primary),
        "backup" => Some(Role::Backup),
        _ => {
            cx.at(&r, "expected \"primary\" or \"backup\"");
            None
        }
    });
    let data_dir = f.get("data_dir").map_or(Some(PathBuf::from(DEFAULT_DATA_DIR)), |d| cx.path(&d));
    let listen = f.get("listen").map_or(Some(Listen::default()), |l| read_listen(cx, &l));
    let control_socket = f.get("control_socket").map_or(Some(None), |c| cx.path(&c).map(Some));
    let sync_address = f.get("sync_address").map_or(Some(None), |s| read_host_port(cx, &s).map(Some));
    let tls = f.get("tls").map_or(Some(None), |t| read_tls(cx, &t).map(Some));
    let queue = f.get("queue").map_or(Some(NodeQueue::default()), |q| super::outbound::read_node_queue(cx, &q));
    let mut listen = listen;
    if let (Some(Role::Backup), Some(l), Some(entry)) = (role, &listen, f.get("listen")) {
        let slots = [&l.submission, &l.submissions, &l.imap, &l.imaps, &l.sync];
        let served: Vec<&str> =
            NOT_ON_BACKUP.iter().zip(slots).filter(|(_, addrs)| !addrs.is_empty()).map(|(name, _)| *name).collect();
        if !served.is_empty() {
            cx.at(
                &entry,
                format!(
                    "a backup node serves SMTP on port 25 only (it keeps no mailboxes); remove listen.{}",
                    served.join(", listen.")
                ),
            );
            listen = None;
        }
    }
    let located = hostname.clone().zip(hostname_entry);
    let node = (|| {
        Some(Node {
            name: e.name.to_string(),
            hostname: hostname?,
            role: role?,
            data_dir: data_dir?,
            listen: listen?,
            control_socket: control_socket?,
            sync_address: sync_address?,
            tls: tls?,
            queue: queue?,
        })
    })();
    (node, located)
}

fn listen_slot<'l>(listen: &'l mut Listen, key: &str) -> Option<&'l mut Vec<SocketAddr>> {
    Some(match key {
        "smtp" => &mut listen.smtp,
        "submission" => &mut listen.submission,
        "submissions" => &mut listen.submissions,
        "imap" => &mut listen.imap,
        "imaps" => &mut listen.imaps,
        "http" => &mut listen.http,
        "https" => &mut listen.https,
        "sync" => &mut listen.sync,
        "metrics" => &mut listen.metrics,
        _ => return None,
    })
}

fn read_listen(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<Listen> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, LISTEN_KEYS);
    let mut listen = Listen::default();
    let mut ok = true;
    // Two listeners on one address would fail at bind time with a less helpful message; port 0
    // asks the kernel for a fresh port each time, so it never collides.
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    for protocol in f.entries() {
        let Some(slot) = listen_slot(&mut listen, protocol.name) else {
            continue;
        };
        for element in cx.one_or_many(&protocol) {
            let Some(text) = cx.string(&element) else {
                ok = false;
                continue;
            };
            let Ok(addr) = text.parse::<SocketAddr>() else {
                cx.at(
                    &element,
                    format!("`{text}` is not an IP address with a port, e.g. \"0.0.0.0:25\" or \"[::]:25\""),
                );
                ok = false;
                continue;
            };
            if addr.port() != 0 {
                if let Some(other) = seen.insert(addr, element.path.clone()) {
                    cx.at(&element, format!("`{addr}` is already used by `{other}`"));
                    ok = false;
                }
            }
            slot.push(addr);
        }
    }
    ok.then_some(listen)
}
