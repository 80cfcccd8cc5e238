//! `postern check-config` output: the effective settings of one node, defaults filled in, and
//! never a password hash or secret.

use std::fmt::Write;

use super::{format_duration, format_size, AliasTarget, Config, Node};

pub fn describe(config: &Config, node: &Node) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "config      {}", config.path.display());
    let _ = writeln!(s, "node        {} ({})", node.name, node.role.as_str());
    let _ = writeln!(s, "hostname    {}", node.hostname);
    let _ = writeln!(s, "data_dir    {}", node.data_dir.display());
    let _ = writeln!(s, "domains     {}", config.cluster.domains.join(", "));
    let sep = config.cluster.subaddress_separator.map(|c| c.to_string()).unwrap_or_else(|| "off".into());
    let _ = writeln!(s, "subaddress  {sep}");
    // Whether node-to-node authentication is possible; the secret itself stays in its file.
    let secret = if config.cluster.secret.is_some() { "set" } else { "none" };
    let _ = writeln!(s, "cluster     secret={secret} nodes={}", config.nodes.len());
    match &config.sync {
        Some(sync) if node.role == super::Role::Primary => {
            let peers = config.sync_peers(&node.name);
            let _ = writeln!(
                s,
                "sync        peers={} order={} ack_timeout={} retention={} anti_entropy_interval={}",
                if peers.is_empty() { "none".to_string() } else { peers.join(",") },
                config.sync_order().join(","),
                format_duration(sync.ack_timeout),
                format_duration(sync.retention),
                format_duration(sync.anti_entropy_interval)
            );
        }
        Some(_) => {
            let _ = writeln!(s, "sync        off on a backup node");
        }
        None => {
            let _ = writeln!(s, "sync        off");
        }
    }
    let listen = &node.listen;
    for (name, addrs) in [
        ("smtp", &listen.smtp),
        ("submission", &listen.submission),
        ("submissions", &listen.submissions),
        ("imap", &listen.imap),
        ("imaps", &listen.imaps),
        ("http", &listen.http),
        ("https", &listen.https),
        ("sync", &listen.sync),
        ("metrics", &listen.metrics),
    ] {
        if !addrs.is_empty() {
            let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(s, "listen      {name:<12}{}", list.join(" "));
        }
    }
    match config.tls_for(node) {
        Some(t) => {
            let _ = writeln!(s, "tls         cert={} key={}", t.cert.display(), t.key.display());
        }
        None => {
            let _ = writeln!(s, "tls         self-signed (generated under data_dir/tls)");
        }
    }
    let m = &config.smtp;
    let _ = writeln!(
        s,
        "smtp        max_message_size={} max_recipients={} max_connections={} max_connections_per_ip={} command_timeout={} data_timeout={} max_errors={}",
        format_size(m.max_message_size),
        m.max_recipients,
        m.max_connections,
        m.max_connections_per_ip,
        format_duration(m.command_timeout),
        format_duration(m.data_timeout),
        m.max_errors
    );
    let _ = writeln!(
        s,
        "imap        idle_timeout={} max_connections_per_ip={} plaintext_on_loopback={}",
        format_duration(config.imap.idle_timeout),
        config.imap.max_connections_per_ip,
        config.imap.plaintext_on_loopback
    );
    let _ = writeln!(s, "store       cache_size={}", format_size(config.store.cache_size));
    // This node's schedule: [outbound] or the backup policy, under its own [nodes.NAME.queue].
    let o = &config.outbound_for(node);
    let via = match &o.relay {
        // The URL as written carries at most a user name; the password stays in its file.
        Some(r) => format!("relay={}", r.url),
        None => format!("mx port={}", o.mx_port),
    };
    let warning = o.delay_warning.map(format_duration).unwrap_or_else(|| "off".into());
    let _ = writeln!(
        s,
        "outbound    {via} retry={}..{} lifetime={} delay_warning={warning} max_connections={} max_connections_per_domain={}",
        format_duration(o.retry_initial),
        format_duration(o.retry_max),
        format_duration(o.lifetime),
        o.max_connections,
        o.max_connections_per_domain
    );
    if let Some(every) = o.run_interval {
        let _ = writeln!(s, "  queue run every {}", format_duration(every));
    }
    for (domain, route) in &o.routes {
        let _ = writeln!(s, "  route {domain} -> {}", route.url);
    }
    let b = &config.submission;
    let _ = writeln!(
        s,
        "submission  max_messages_per_hour={} max_recipients={} save_sent={} auth_failures_per_ip={} auth_failures_per_user={} auth_failure_window={}",
        b.max_messages_per_hour,
        b.max_recipients,
        b.save_sent,
        b.auth_failures_per_ip,
        b.auth_failures_per_user,
        format_duration(b.auth_failure_window)
    );
    let i = &config.inbound;
    let _ = writeln!(
        s,
        "inbound     checks={} dmarc_reject={} dmarc_quarantine={} spf_fail={} tempfail={} timeout={}",
        i.checks,
        i.dmarc_reject.name(),
        i.dmarc_quarantine.name(),
        i.spf_fail.name(),
        i.tempfail,
        format_duration(i.timeout)
    );
    for k in &config.dkim {
        let domain = if k.wildcard { format!("*.{}", k.domain) } else { k.domain.clone() };
        let algorithm = match k.algorithm {
            super::DkimAlgorithm::Ed25519 => "ed25519",
            super::DkimAlgorithm::RsaSha256 => "rsa-sha256",
        };
        let _ =
            writeln!(s, "dkim        {domain} selector={} algorithm={algorithm} key={}", k.selector, k.key.display());
    }
    if let Some(srs) = &config.srs {
        // The secrets stay in their file: only how many there are.
        let _ = writeln!(
            s,
            "srs         domain={} secrets={} max_age={}",
            srs.domain,
            srs.secrets.len(),
            format_duration(srs.max_age)
        );
    }
    let _ = writeln!(s, "users       {}", config.users.len());
    for (u, user) in &config.users {
        match user.send_as.is_empty() {
            true => {
                let _ = writeln!(s, "  {u}");
            }
            false => {
                let _ = writeln!(s, "  {u} (may also send as {})", user.send_as.join(", "));
            }
        }
    }
    let _ = writeln!(s, "aliases     {}", config.aliases.len());
    for (from, targets) in &config.aliases {
        let t: Vec<String> = targets
            .iter()
            .map(|t| match t {
                AliasTarget::Address(a) => a.clone(),
                AliasTarget::Domain(d) => format!("@{d}"),
                AliasTarget::Discard => "/dev/null".into(),
            })
            .collect();
        let _ = writeln!(s, "  {from} -> {}", t.join(", "));
    }
    s
}
