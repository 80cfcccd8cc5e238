//! The `[outbound]` table (how mail leaves: retries, limits, smarthost, routes) and the
//! `[submission]` table (limits for authenticated senders).

use std::collections::BTreeMap;
use std::time::Duration;

use super::load::{apply, Ctx, Entry};
use super::model::{NodeQueue, OutboundSettings, RelayRoute, RelayTls, Secret, SubmissionSettings};
use super::values::normalize_domain;

const OUTBOUND_KEYS: &[&str] = &[
    "mx_port",
    "relay",
    "relay_password_file",
    "routes",
    "retry_initial",
    "retry_max",
    "lifetime",
    "delay_warning",
    "max_connections",
    "max_connections_per_domain",
    "connect_timeout",
    "ca_file",
];

pub(super) fn read_outbound(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<OutboundSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, OUTBOUND_KEYS);
    let mut out = OutboundSettings::default();
    let mut ok = true;
    if let Some(p) = f.get("mx_port") {
        match p.raw.value().and_then(|v| v.as_integer()).map(u16::try_from) {
            Some(Ok(port)) if port != 0 => out.mx_port = port,
            _ => {
                cx.at(&p, "expected a port number from 1 to 65535");
                ok = false;
            }
        }
    }
    let password = match f.get("relay_password_file") {
        Some(p) => match cx.path(&p) {
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(text) if !text.lines().next().unwrap_or("").is_empty() => {
                    Some((Secret(text.lines().next().unwrap_or("").to_string()), p))
                }
                Ok(_) => {
                    cx.at(&p, format!("{} is empty; its first line is the relay password", path.display()));
                    ok = false;
                    None
                }
                Err(err) => {
                    cx.at(&p, format!("cannot read {}: {err}", path.display()));
                    ok = false;
                    None
                }
            },
            None => {
                ok = false;
                None
            }
        },
        None => None,
    };
    match f.get("relay") {
        Some(r) => match cx.string(&r).map(parse_relay) {
            Some(Ok(mut route)) => {
                match (&route.user, password) {
                    (Some(_), Some((secret, _))) => route.password = Some(secret),
                    (Some(_), None) => {
                        cx.at(&r, "the relay names a user: set `relay_password_file` to the file with its password");
                        ok = false;
                    }
                    (None, Some((_, p))) => {
                        cx.at(&p, "a password needs a user in `relay`, as in \"smtps://user@relay.example:465\"");
                        ok = false;
                    }
                    (None, None) => {}
                }
                out.relay = Some(route);
            }
            Some(Err(message)) => {
                cx.at(&r, message);
                ok = false;
            }
            None => ok = false,
        },
        None => {
            if let Some((_, p)) = password {
                cx.at(&p, "`relay_password_file` without `relay`");
                ok = false;
            }
        }
    }
    if let Some(r) = f.get("routes") {
        match read_routes(cx, &r) {
            Some(routes) => out.routes = routes,
            None => ok = false,
        }
    }
    let one_second = Duration::from_secs(1);
    apply(f.get("retry_initial").map(|v| cx.duration(&v, one_second, "")), &mut out.retry_initial, &mut ok);
    apply(f.get("retry_max").map(|v| cx.duration(&v, one_second, "")), &mut out.retry_max, &mut ok);
    apply(f.get("lifetime").map(|v| cx.duration(&v, one_second, "")), &mut out.lifetime, &mut ok);
    apply(f.get("connect_timeout").map(|v| cx.duration(&v, one_second, "")), &mut out.connect_timeout, &mut ok);
    if let Some(w) = f.get("delay_warning") {
        if w.raw.value().and_then(|v| v.as_str()) == Some("off") {
            out.delay_warning = None;
        } else {
            match cx.duration(&w, one_second, "") {
                Some(d) => out.delay_warning = Some(d),
                None => ok = false,
            }
        }
    }
    apply(f.get("max_connections").map(|v| cx.count(&v, 1)), &mut out.max_connections, &mut ok);
    let per_domain = f.get("max_connections_per_domain").map(|v| cx.count(&v, 1));
    apply(per_domain, &mut out.max_connections_per_domain, &mut ok);
    if let Some(c) = f.get("ca_file") {
        match cx.path(&c) {
            Some(path) if path.is_file() => out.ca_file = Some(path),
            Some(path) => {
                cx.at(&c, format!("CA file {} does not exist", path.display()));
                ok = false;
            }
            None => ok = false,
        }
    }
    if out.retry_max < out.retry_initial {
        cx.error("outbound.retry_max", None, "must not be shorter than `retry_initial`");
        ok = false;
    }
    ok.then_some(out)
}

const NODE_QUEUE_KEYS: &[&str] = &["retry_initial", "retry_max", "lifetime", "delay_warning", "run_interval"];

/// `[nodes.NAME.queue]`: the node's own schedule (a backup MX keeps mail longer, retries more
/// often and warns nobody).
pub(super) fn read_node_queue(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<NodeQueue> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, NODE_QUEUE_KEYS);
    let mut q = NodeQueue::default();
    let mut ok = true;
    let one_second = Duration::from_secs(1);
    let mut read = |cx: &mut Ctx<'_>, key: &str, slot: &mut Option<Duration>| {
        if let Some(v) = f.get(key) {
            match cx.duration(&v, one_second, "") {
                Some(d) => *slot = Some(d),
                None => ok = false,
            }
        }
    };
    read(cx, "retry_initial", &mut q.retry_initial);
    read(cx, "retry_max", &mut q.retry_max);
    read(cx, "lifetime", &mut q.lifetime);
    read(cx, "run_interval", &mut q.run_interval);
    if let Some(w) = f.get("delay_warning") {
        if w.raw.value().and_then(|v| v.as_str()) == Some("off") {
            q.delay_warning = Some(None);
        } else {
            match cx.duration(&w, one_second, "") {
                Some(d) => q.delay_warning = Some(Some(d)),
                None => ok = false,
            }
        }
    }
    if let (Some(initial), Some(max), Some(entry)) = (q.retry_initial, q.retry_max, f.get("retry_max")) {
        if max < initial {
            cx.at(&entry, "must not be shorter than `retry_initial`");
            ok = false;
        }
    }
    ok.then_some(q)
}

fn read_routes(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<BTreeMap<String, RelayRoute>> {
    let f = cx.table(e)?;
    let mut routes = BTreeMap::new();
    let mut ok = true;
    for entry in f.entries() {
        let domain = match normalize_domain(entry.name) {
            Ok(d) => d,
            Err(message) => {
                cx.at_key(&entry, message);
                ok = false;
                continue;
            }
        };
        match cx.string(&entry).map(parse_relay) {
            Some(Ok(route)) if route.user.is_some() => {
                cx.at(&entry, "routes carry no credentials; use `relay` with `relay_password_file` for that");
                ok = false;
            }
            Some(Ok(route)) => {
                routes.insert(domain, route);
            }
            Some(Err(message)) => {
                cx.at(&entry, message);
                ok = false;
            }
            None => ok = false,
        }
    }
    ok.then_some(routes)
}

/// `smtps://[user@]host[:port]` (implicit TLS, default port 465) or `smtp://[user@]host[:port]`
/// (STARTTLS: required when there is a user, opportunistic otherwise; port 587 with a user,
/// else 25).
pub(crate) fn parse_relay(text: &str) -> Result<RelayRoute, String> {
    let syntax = || {
        format!("`{text}` is not a relay URL like \"smtps://user@relay.example:465\" or \"smtp://relay.example:587\"")
    };
    let (scheme, rest) = text.split_once("://").ok_or_else(syntax)?;
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
        Some(_) => return Err(syntax()),
        None => (None, rest),
    };
    let hostport = hostport.trim_end_matches('/');
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(syntax)?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() || host.contains('/') {
        return Err(syntax());
    }
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "smtps" => RelayTls::Implicit,
        "smtp" if user.is_some() => RelayTls::StartTlsRequired,
        "smtp" => RelayTls::Opportunistic,
        _ => return Err(format!("`{text}`: the scheme must be smtps:// (port 465) or smtp:// (STARTTLS)")),
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(syntax)?,
        None => match tls {
            RelayTls::Implicit => 465,
            _ if user.is_some() => 587,
            _ => 25,
        },
    };
    Ok(RelayRoute { url: text.to_string(), host: host.to_ascii_lowercase(), port, tls, user, password: None })
}

const SUBMISSION_KEYS: &[&str] = &[
    "max_messages_per_hour",
    "max_recipients",
    "save_sent",
    "auth_failures_per_ip",
    "auth_failures_per_user",
    "auth_failure_window",
];

pub(super) fn read_submission(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<SubmissionSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, SUBMISSION_KEYS);
    let mut s = SubmissionSettings::default();
    let mut ok = true;
    apply(f.get("max_messages_per_hour").map(|v| cx.count(&v, 1)), &mut s.max_messages_per_hour, &mut ok);
    apply(f.get("max_recipients").map(|v| cx.count(&v, 1)), &mut s.max_recipients, &mut ok);
    apply(f.get("save_sent").map(|v| boolean(cx, &v)), &mut s.save_sent, &mut ok);
    apply(f.get("auth_failures_per_ip").map(|v| cx.count(&v, 1)), &mut s.auth_failures_per_ip, &mut ok);
    apply(f.get("auth_failures_per_user").map(|v| cx.count(&v, 1)), &mut s.auth_failures_per_user, &mut ok);
    let window = f.get("auth_failure_window").map(|v| cx.duration(&v, Duration::from_secs(1), ""));
    apply(window, &mut s.auth_failure_window, &mut ok);
    ok.then_some(s)
}

pub(super) fn boolean(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<bool> {
    let found = e.raw.value().and_then(|v| v.as_bool());
    if found.is_none() {
        cx.wrong_type(e, "true or false");
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::testing::{base, load, only_error};

    #[test]
    fn relay_urls() {
        let r = parse_relay("smtps://me@relay.example:465").unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.tls, r.user.as_deref()),
            ("relay.example", 465, RelayTls::Implicit, Some("me"))
        );
        let r = parse_relay("smtp://me@Relay.Example").unwrap();
        assert_eq!((r.host.as_str(), r.port, r.tls), ("relay.example", 587, RelayTls::StartTlsRequired));
        let r = parse_relay("smtp://[::1]:2525").unwrap();
        assert_eq!((r.host.as_str(), r.port, r.tls), ("::1", 2525, RelayTls::Opportunistic));
        let r = parse_relay("smtp://mx.internal").unwrap();
        assert_eq!(r.port, 25);
        assert!(parse_relay("http://x").is_err());
        assert!(parse_relay("relay.example:25").is_err());
        assert!(parse_relay("smtp://x:0").is_err());
        assert!(parse_relay("smtp://@x").is_err());
    }

    #[test]
    fn outbound_section() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("relay.pass");
        std::fs::write(&pass, "s3cret\n").unwrap();
        let text = base(&format!(
            "[outbound]\nmx_port = 2525\nrelay = \"smtps://me@relay.example:465\"\nrelay_password_file = {:?}\n\
             retry_initial = \"1s\"\nretry_max = \"10s\"\nlifetime = \"1h\"\ndelay_warning = \"off\"\n\
             [outbound.routes]\n\"example.com\" = \"smtp://10.0.0.1:25\"\n",
            pass.display().to_string()
        ));
        let c = load(&text).unwrap();
        let o = &c.outbound;
        assert_eq!(o.mx_port, 2525);
        assert_eq!(o.relay.as_ref().unwrap().password.as_ref().unwrap().0, "s3cret");
        assert_eq!(o.delay_warning, None);
        assert_eq!(o.retry_max, Duration::from_secs(10));
        assert_eq!(o.routes["example.com"].host, "10.0.0.1");
        let d = load(&base("")).unwrap().outbound;
        assert_eq!((d.retry_initial.as_secs(), d.retry_max.as_secs(), d.lifetime.as_secs()), (300, 3600, 5 * 86400));
        assert_eq!(d.delay_warning, Some(Duration::from_secs(4 * 3600)));

        only_error(
            &base("[outbound]\nrelay = \"smtps://me@relay.example\"\n"),
            8,
            "outbound.relay",
            "relay_password_file",
        );
        only_error(&base("[outbound]\nmx_port = 0\n"), 8, "outbound.mx_port", "port number");
        only_error(&base("[outbound]\nrelay = \"ftp://x\"\n"), 8, "outbound.relay", "scheme");
        only_error(
            &base("[outbound]\nrelay_password_file = \"/nonexistent/x\"\n"),
            8,
            "outbound.relay_password_file",
            "cannot read",
        );
        only_error(&base("[outbound]\nretry_initial = \"2h\"\n"), 0, "outbound.retry_max", "retry_initial");
        only_error(
            &base("[outbound.routes]\n\"example.com\" = \"smtp://u@x\"\n"),
            8,
            "outbound.routes.\"example.com\"",
            "credentials",
        );
    }

    #[test]
    fn submission_section() {
        let c = load(&base("[submission]\nmax_messages_per_hour = 10\nsave_sent = true\n")).unwrap();
        assert_eq!(c.submission.max_messages_per_hour, 10);
        assert!(c.submission.save_sent);
        only_error(&base("[submission]\nsave_sent = 1\n"), 8, "submission.save_sent", "true or false");
    }
}
