//! The config fingerprint two nodes compare in HELLO: SHA-256 over a canonical encoding of the
//! parts of the shared file that decide *what* is replicated and *where mail lands*. Nodes that
//! disagree there would replicate into accounts the other does not have, or route one address
//! to two different mailboxes, so they refuse to sync until the files agree.
//!
//! In: the cluster domains and the subaddress separator; every user's address and quota; every
//! alias with its targets; every primary with its sync address; `[sync] peers` and the resolved
//! UID allocator order.
//!
//! Out, on purpose: password hashes (changing a password is done one node at a time and must not
//! cut replication meanwhile; a password is not replicated state), per-user submission limits
//! and `send_as`, certificates, listen addresses other than the dialled sync address, timeouts,
//! DKIM, SRS and everything per node. Those may differ for a while without harm.

use ring::digest;
use serde::Serialize;

use crate::config::{AliasTarget, Config};

/// Bump when the encoding changes, so old and new nodes see a mismatch rather than a false match.
const VERSION: u32 = 1;

#[derive(Serialize)]
struct Canonical<'a> {
    version: u32,
    domains: Vec<&'a str>,
    subaddress_separator: Option<char>,
    users: Vec<(&'a str, Option<u64>)>,
    aliases: Vec<(&'a str, Vec<String>)>,
    primaries: Vec<(&'a str, Option<String>)>,
    peers: Option<Vec<&'a str>>,
    order: Vec<String>,
}

pub fn fingerprint(config: &Config) -> [u8; 32] {
    let mut domains: Vec<&str> = config.cluster.domains.iter().map(String::as_str).collect();
    domains.sort_unstable();
    let target = |t: &AliasTarget| match t {
        AliasTarget::Address(a) => a.clone(),
        AliasTarget::Domain(d) => format!("@{d}"),
        AliasTarget::Discard => "/dev/null".to_string(),
    };
    let peers = config.sync.as_ref().and_then(|s| s.peers.as_ref()).map(|p| {
        let mut p: Vec<&str> = p.iter().map(String::as_str).collect();
        p.sort_unstable();
        p
    });
    // BTreeMaps iterate sorted, so users, aliases and nodes are in a canonical order already.
    let canonical = Canonical {
        version: VERSION,
        domains,
        subaddress_separator: config.cluster.subaddress_separator,
        users: config.users.values().map(|u| (u.address.as_str(), u.quota)).collect(),
        aliases: config.aliases.iter().map(|(k, v)| (k.as_str(), v.iter().map(target).collect())).collect(),
        primaries: config.primaries().map(|n| (n.name.as_str(), config.sync_address(n))).collect(),
        peers,
        order: config.sync_order(),
    };
    let bytes = postcard::to_allocvec(&canonical).unwrap_or_default();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, &bytes).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";
    const OTHER_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$b3RoZXJzYWx0$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

    fn config(extra_user: &str, hash: &str, limits: &str) -> Config {
        let text = format!(
            "[cluster]\ndomains = [\"example.org\", \"example.net\"]\n\
             [nodes.a]\nhostname = \"a.example.org\"\nlisten.sync = \"0.0.0.0:7890\"\n\
             [nodes.b]\nhostname = \"b.example.org\"\nlisten.sync = \"0.0.0.0:7890\"\n\
             [users.\"alice@example.org\"]\npassword = \"{hash}\"\n{limits}\n{extra_user}\n\
             [aliases]\n\"postmaster@example.org\" = \"alice@example.org\"\n"
        );
        crate::config::load_str(&text, std::path::Path::new("/x/postern.toml")).unwrap()
    }

    fn fp(extra_user: &str, hash: &str, limits: &str, order: &str) -> [u8; 32] {
        let mut config = config(extra_user, hash, limits);
        if !order.is_empty() {
            let order = vec![order.to_string()];
            config.sync = Some(crate::config::SyncSettings { order, ..Default::default() });
        }
        fingerprint(&config)
    }

    #[test]
    fn what_must_match_changes_it_and_nothing_else_does() {
        let base = fp("", HASH, "", "");
        assert_eq!(base, fp("", HASH, "", ""), "deterministic");
        // A password or a submission limit may differ while a change is rolled out.
        assert_eq!(base, fp("", OTHER_HASH, "max_recipients = 3", ""));
        // A user, a quota or the allocator order may not.
        let bob = format!("[users.\"bob@example.org\"]\npassword = \"{HASH}\"");
        assert_ne!(base, fp(&bob, HASH, "", ""));
        assert_ne!(base, fp("", HASH, "quota = \"1GB\"", ""));
        assert_ne!(base, fp("", HASH, "", "b"));
    }
}
