//! The `[sync]` table: replication between the primaries (docs/replication.md).
//!
//! Its presence turns replication on, so the checks that a cluster can actually form are made
//! here, at load time, and not by the first connection attempt: every primary must be reachable
//! (`listen.sync` plus a dialable address), node-to-node traffic must be authenticated (the
//! cluster secret), and node ids, which tag every change in the replicated log, must differ.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::load::{apply, join_key, Ctx, Entry};
use super::model::{Cluster, Node, Role, SyncSettings};

const SYNC_KEYS: &[&str] = &["peers", "order", "ack_timeout", "retention", "anti_entropy_interval"];

/// The modseq of a replicated mailbox carries the originating node in 4 bits, one value of
/// which is reserved for "local": 15 primaries at most (docs/design/replication-plan.md §2.5).
pub const MAX_PRIMARIES: usize = 15;

/// Reads `[sync]` and checks the cluster around it. `nodes_entry` and `cluster_entry` locate
/// errors about nodes and the secret; `nodes`/`cluster` are `None` when they failed to load
/// (then only the table's own keys are checked, so one mistake is not reported twice).
pub(super) fn read_sync(
    cx: &mut Ctx<'_>,
    e: &Entry<'_>,
    nodes: Option<&BTreeMap<String, Node>>,
    nodes_entry: Option<&Entry<'_>>,
    cluster: Option<&Cluster>,
    cluster_entry: Option<&Entry<'_>>,
) -> Option<SyncSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, SYNC_KEYS);
    let mut ok = true;
    let mut settings = SyncSettings::default();
    let peers = f.get("peers").map(|p| primary_list(cx, &p, nodes));
    match peers {
        Some(Some(list)) => settings.peers = Some(list),
        Some(None) => ok = false,
        None => {}
    }
    let order = f.get("order").map(|o| primary_list(cx, &o, nodes));
    match order {
        Some(Some(list)) => settings.order = list,
        Some(None) => ok = false,
        None => {}
    }
    let ms = Duration::from_millis(1);
    let secs = Duration::from_secs(1);
    apply(f.get("ack_timeout").map(|v| cx.duration(&v, ms, "")), &mut settings.ack_timeout, &mut ok);
    apply(f.get("retention").map(|v| cx.duration(&v, secs, "")), &mut settings.retention, &mut ok);
    let interval = f.get("anti_entropy_interval").map(|v| cx.duration(&v, secs, ""));
    apply(interval, &mut settings.anti_entropy_interval, &mut ok);

    // A cluster with a backup node has been told already (load.rs checks the relay hop).
    let has_backup = nodes.is_some_and(|n| n.values().any(|n| n.role == Role::Backup));
    if let Some(cluster) = cluster {
        if cluster.secret.is_none() && !has_backup {
            let span = cluster_entry.and_then(|c| c.span.clone());
            cx.error(
                "cluster.secret_file",
                span.as_ref(),
                "required when `[sync]` is present: it authenticates the replication links between primaries",
            );
            ok = false;
        }
    }
    if let Some(nodes) = nodes {
        ok &= check_nodes(cx, e, nodes, nodes_entry);
    }
    ok.then_some(settings)
}

/// A list of distinct primary names (`peers`, `order`).
fn primary_list(cx: &mut Ctx<'_>, e: &Entry<'_>, nodes: Option<&BTreeMap<String, Node>>) -> Option<Vec<String>> {
    if !matches!(e.raw.value(), Some(toml_edit::Value::Array(_))) {
        cx.wrong_type(e, "an array of node names");
        return None;
    }
    let mut names: Vec<String> = Vec::new();
    let mut ok = true;
    for element in cx.one_or_many(e) {
        let Some(name) = cx.string(&element) else {
            ok = false;
            continue;
        };
        if names.iter().any(|n| n == name) {
            cx.at(&element, format!("`{name}` is listed twice"));
            ok = false;
            continue;
        }
        if let Some(nodes) = nodes {
            match nodes.get(name) {
                None => {
                    let known: Vec<&str> = nodes.keys().map(String::as_str).collect();
                    cx.at(&element, format!("no node named `{name}`; nodes: {}", known.join(", ")));
                    ok = false;
                    continue;
                }
                Some(n) if n.role != Role::Primary => {
                    cx.at(&element, format!("`{name}` is a backup node: only primaries hold mailboxes and sync"));
                    ok = false;
                    continue;
                }
                Some(_) => {}
            }
        }
        names.push(name.to_string());
    }
    ok.then_some(names)
}

/// Cluster-wide rules that only matter once replication is on.
fn check_nodes(
    cx: &mut Ctx<'_>,
    sync: &Entry<'_>,
    nodes: &BTreeMap<String, Node>,
    nodes_entry: Option<&Entry<'_>>,
) -> bool {
    let node_fields = nodes_entry.and_then(|n| cx.fields_of(n));
    let span_of = |name: &str| node_fields.as_ref().and_then(|f| f.get(name)).and_then(|n| n.span);
    let mut ok = true;
    let primaries: Vec<&Node> = nodes.values().filter(|n| n.role == Role::Primary).collect();
    if primaries.len() > MAX_PRIMARIES {
        cx.at(
            sync,
            format!(
                "{} primaries: replication supports at most {MAX_PRIMARIES} (the modseq's node tag)",
                primaries.len()
            ),
        );
        ok = false;
    }
    for node in &primaries {
        let key = join_key(&join_key("nodes", &node.name), "listen");
        let span = span_of(&node.name);
        match node.listen.sync.first() {
            None => {
                cx.error(
                    &join_key(&key, "sync"),
                    span.as_ref(),
                    "required when `[sync]` is present: every primary listens for its peers (e.g. \"0.0.0.0:7890\")",
                );
                ok = false;
            }
            Some(addr) if addr.port() == 0 && node.sync_address.is_none() => {
                cx.error(
                    &join_key(&join_key("nodes", &node.name), "sync_address"),
                    span.as_ref(),
                    "required when listen.sync has port 0: peers cannot dial a port chosen at start",
                );
                ok = false;
            }
            Some(_) => {}
        }
    }
    // Every node's change ids carry `node_id(name)`: two nodes with one id would see each
    // other's changes as their own.
    let mut ids: HashMap<u32, &str> = HashMap::new();
    for node in nodes.values() {
        if let Some(other) = ids.insert(crate::store::node_id(&node.name), &node.name) {
            let span = span_of(&node.name);
            cx.error(
                &join_key("nodes", &node.name),
                span.as_ref(),
                format!("node `{}` has the same node id (a hash of the name) as `{other}`: rename one", node.name),
            );
            ok = false;
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::super::load::testing::*;
    use super::super::model::SyncSettings;
    use std::time::Duration;

    /// A cluster of two primaries and a backup with the secret; `sync` is appended as the
    /// `[sync]` table's body. Returns the file text and the temp dir holding the secret.
    fn cluster(secret: bool, b_listen: &str, sync: &str) -> (String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cluster.key");
        std::fs::write(&key, "a cluster secret of some length\n").unwrap();
        let secret_line =
            if secret { format!("secret_file = {:?}\n", key.display().to_string()) } else { String::new() };
        let text = format!(
            "[cluster]\ndomains = [\"example.org\"]\n{secret_line}\
             [nodes.a]\nhostname = \"a.example.org\"\nlisten.sync = [\"0.0.0.0:7890\"]\n\
             [nodes.b]\nhostname = \"b.example.org\"\n{b_listen}\n\
             [nodes.mx]\nhostname = \"mx.example.org\"\nrole = \"backup\"\n\
             [sync]\n{sync}"
        );
        (text, dir)
    }

    const B_OK: &str = "listen.sync = [\"0.0.0.0:7890\"]";

    #[test]
    fn defaults_and_values_load() {
        let (text, _dir) = cluster(true, B_OK, "");
        let config = load(&text).unwrap();
        let sync = config.sync.clone().unwrap();
        assert_eq!(sync.peers, None);
        assert_eq!(sync.order, Vec::<String>::new());
        assert_eq!(sync.ack_timeout, Duration::from_secs(2));
        assert_eq!(sync.retention, Duration::from_secs(30 * 86400));
        assert_eq!(sync.anti_entropy_interval, Duration::from_secs(86400));
        assert_eq!(config.sync_peers("a"), ["b"]);
        assert_eq!(config.sync_order(), ["a", "b"]);
        assert_eq!(config.sync_address(&config.nodes["b"]).as_deref(), Some("b.example.org:7890"));

        let body = "peers = [\"a\", \"b\"]\norder = [\"b\"]\nack_timeout = \"500ms\"\nretention = \"7d\"\n\
                    anti_entropy_interval = \"1h\"\n";
        let (text, _dir) = cluster(true, &format!("{B_OK}\nsync_address = \"10.0.0.2:7000\""), body);
        let config = load(&text).unwrap();
        let sync = config.sync.clone().unwrap();
        assert_eq!(sync.ack_timeout, Duration::from_millis(500));
        assert_eq!(sync.retention, Duration::from_secs(7 * 86400));
        assert_eq!(config.sync_peers("b"), ["a"]);
        assert_eq!(config.sync_order(), ["b", "a"]);
        assert_eq!(config.sync_address(&config.nodes["b"]).as_deref(), Some("10.0.0.2:7000"));
        // Without `[sync]` nothing of this is required.
        assert!(load(&base("")).unwrap().sync.is_none());
        assert_eq!(SyncSettings::default().ack_timeout, Duration::from_secs(2));
    }

    #[test]
    fn peers_and_order_name_primaries_only() {
        let (text, _dir) = cluster(true, B_OK, "peers = [\"a\", \"c\"]\n");
        only_error(&text, 14, "sync.peers[1]", "no node named `c`");
        let (text, _dir) = cluster(true, B_OK, "order = [\"mx\"]\n");
        only_error(&text, 14, "sync.order[0]", "`mx` is a backup node");
        let (text, _dir) = cluster(true, B_OK, "order = [\"a\", \"a\"]\n");
        only_error(&text, 14, "sync.order[1]", "listed twice");
        let (text, _dir) = cluster(true, B_OK, "peers = \"a\"\n");
        only_error(&text, 14, "sync.peers", "expected an array of node names");
    }

    #[test]
    fn durations_are_checked() {
        let (text, _dir) = cluster(true, B_OK, "ack_timeout = \"soon\"\n");
        only_error(&text, 14, "sync.ack_timeout", "");
        let (text, _dir) = cluster(true, B_OK, "retention = \"0s\"\n");
        only_error(&text, 14, "sync.retention", "at least 1s");
        let (text, _dir) = cluster(true, B_OK, "anti_entropy_interval = true\n");
        only_error(&text, 14, "sync.anti_entropy_interval", "expected a duration");
        let (text, _dir) = cluster(true, B_OK, "peer = []\n");
        only_error(&text, 14, "sync.peer", "did you mean `peers`");
    }

    #[test]
    fn the_secret_is_required() {
        let (text, _dir) = cluster(false, B_OK, "");
        let no_backup = text.replace("[nodes.mx]\nhostname = \"mx.example.org\"\nrole = \"backup\"\n", "");
        only_error(&no_backup, 1, "cluster.secret_file", "required when `[sync]` is present");
        // With a backup the same key is reported once, for the relay hop.
        only_error(&text, 1, "cluster.secret_file", "backup");
    }

    #[test]
    fn every_primary_listens_and_is_dialable() {
        let (text, _dir) = cluster(true, "", "");
        only_error(&text, 7, "nodes.b.listen.sync", "every primary listens");
        let (text, _dir) = cluster(true, "listen.sync = [\"127.0.0.1:0\"]", "");
        only_error(&text, 7, "nodes.b.sync_address", "port 0");
        let (text, _dir) = cluster(true, "listen.sync = [\"127.0.0.1:0\"]\nsync_address = \"127.0.0.1:7000\"", "");
        load(&text).unwrap();
    }

    #[test]
    fn at_most_fifteen_primaries() {
        let (mut text, _dir) = cluster(true, B_OK, "");
        for i in 0..14 {
            text.push_str(&format!("[nodes.p{i}]\nhostname = \"p{i}.example.org\"\nlisten.sync = \"0.0.0.0:7890\"\n"));
        }
        only_error(&text, 13, "sync", "16 primaries");
    }

    #[test]
    fn node_ids_must_differ() {
        // FNV-1a("ne3zx") == FNV-1a("n3pad"), found by brute force.
        assert_eq!(crate::store::node_id("ne3zx"), crate::store::node_id("n3pad"));
        let (mut text, _dir) = cluster(true, B_OK, "");
        text.push_str("[nodes.ne3zx]\nhostname = \"c.example.org\"\nrole = \"backup\"\n");
        text.push_str("[nodes.n3pad]\nhostname = \"d.example.org\"\nrole = \"backup\"\n");
        let error = only_error(&text, 14, "nodes.ne3zx", "same node id");
        assert!(error.message.contains("`n3pad`"), "{error}");
    }
}
