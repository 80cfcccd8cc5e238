//! The client side of the control socket (synchronous: the CLI needs no runtime for it) and
//! the text the `postern queue` commands print.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{EntryView, ListLine, Request, Response};

/// `postern monitor`: the header, then one line per `interval` with the change of each counter
/// since the line before (gauges as they are), as `smtpctl monitor` prints them; the header
/// again every 25 lines. Stops after `count` lines, or when the node goes away.
pub fn monitor(path: &Path, node: &str, count: Option<u64>, interval: Duration) -> Result<(), String> {
    let stats = || -> Result<crate::metrics::Snapshot, String> {
        let answer = call(path, node, &Request::Stats, |_| {})?;
        match (answer.ok, answer.stats) {
            (true, Some(s)) => Ok(s),
            _ => Err(answer.error.unwrap_or_else(|| "the node sent no counters".into())),
        }
    };
    let mut before = stats()?;
    let mut out = std::io::stdout().lock();
    let mut printed = 0u64;
    while count.is_none_or(|c| printed < c) {
        if printed.is_multiple_of(25) {
            writeln!(out, "{}", crate::metrics::MONITOR_HEADER).map_err(|e| e.to_string())?;
        }
        std::thread::sleep(interval);
        let now = stats()?;
        writeln!(out, "{}", crate::metrics::monitor_line(&before, &now)).map_err(|e| e.to_string())?;
        out.flush().map_err(|e| e.to_string())?;
        before = now;
        printed += 1;
    }
    Ok(())
}

/// How long the client waits for the next line of an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest answer line the client accepts (an entry with many recipients and errors).
const MAX_LINE: u64 = 16 << 20;

/// Sends `request` to the socket at `path` and returns the final answer line; each entry of a
/// `queue_list` stream goes to `on_entry` as it arrives. `node` names the node in messages.
/// The error is the message to print: the node is not running, the socket refused us, or the
/// answer was cut short.
pub fn call(
    path: &Path,
    node: &str,
    request: &Request,
    mut on_entry: impl FnMut(EntryView),
) -> Result<Response, String> {
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("node {node} is not running (no control socket at {})", path.display())
        }
        std::io::ErrorKind::ConnectionRefused => {
            format!("node {node} is not running (nothing answers on the control socket {})", path.display())
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on the control socket {}: run this as root or as the user postern runs as",
            path.display()
        ),
        _ => format!("cannot connect to the control socket {}: {e}", path.display()),
    })?;
    let lost = |e: std::io::Error| format!("control socket {}: {e}", path.display());
    stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(lost)?;
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    // A server that refuses us answers and closes without reading: read its answer even when
    // the write failed.
    let sent = (&stream).write_all(&line);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reader = BufReader::new(std::io::Read::take(&stream, u64::MAX));
    loop {
        let mut buf = Vec::new();
        reader.get_mut().set_limit(MAX_LINE);
        let n = reader.read_until(b'\n', &mut buf).map_err(lost)?;
        if n == 0 {
            if let Err(e) = sent {
                return Err(lost(e));
            }
        }
        if n == 0 || buf.last() != Some(&b'\n') {
            return Err(format!("node {node} closed the control connection before answering"));
        }
        let value: serde_json::Value =
            serde_json::from_slice(&buf).map_err(|e| format!("unreadable answer from node {node}: {e}"))?;
        if value.get("ok").is_some() {
            return serde_json::from_value(value).map_err(|e| format!("unreadable answer from node {node}: {e}"));
        }
        let entry: ListLine =
            serde_json::from_value(value).map_err(|e| format!("unreadable answer from node {node}: {e}"))?;
        on_entry(entry.entry);
    }
}

/// "45s", "3m", "2h", "4d" (rounded down; negative counts as 0).
pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `postern sync status`: one line per peer, then this node's allocator order and fingerprint.
/// LAG is the records this node holds that the peer has not durably acknowledged (`?` until the
/// peer said what it holds since this node started), OLDEST the age of the oldest of them;
/// UNDER-REPL counts this node's deliveries answered without any peer's ack that no peer has
/// acknowledged since (node-wide, so the same on every row). Anti-entropy is not built: `-`.
pub fn sync_status(view: &crate::sync::SyncView, now: i64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let width = view.peers.iter().map(|p| p.peer.len()).max().unwrap_or(0).max(4);
    let mut row = |cells: [&str; 8]| {
        let [peer, state, since, config, lag, oldest, under, anti_entropy] = cells;
        let _ = writeln!(
            out,
            "{peer:<width$}  {state:<15}  {since:>6}  {config:<8}  {lag:>7}  {oldest:>6}  {under:>10}  {anti_entropy}"
        );
    };
    row(["PEER", "STATE", "SINCE", "CONFIG", "LAG", "OLDEST", "UNDER-REPL", "LAST-ANTI-ENTROPY"]);
    let under = view.under_replicated.to_string();
    for p in &view.peers {
        let config = match p.config_match {
            Some(true) => "match",
            Some(false) => "MISMATCH",
            None => "unknown",
        };
        let lag = match p.lag_changes {
            None => "?".to_string(),
            Some(n) if p.lag_capped => format!(">={n}"),
            Some(n) => n.to_string(),
        };
        let oldest = match (p.lag_changes, p.lag_seconds) {
            (Some(n), Some(s)) if n > 0 => human_duration(s as i64),
            (Some(_), _) => "-".to_string(),
            (None, _) => "?".to_string(),
        };
        let anti_entropy = match &p.anti_entropy {
            None => "-".to_string(),
            Some((at, a)) => {
                // One word, so scripts can split the row: `ok/3m`, `2repaired/3m`, `1DIFFER/3m`.
                let verdict = match (a.differ, a.repaired) {
                    (0, 0) => "ok".to_string(),
                    (0, r) => format!("{r}repaired"),
                    (d, _) => format!("{d}DIFFER"),
                };
                format!("{verdict}/{}", human_duration(now - at))
            }
        };
        row([&p.peer, p.state.as_str(), &human_duration(now - p.since), config, &lag, &oldest, &under, &anti_entropy]);
    }
    let fp = |hex: &str| hex.get(..16).unwrap_or(hex).to_string();
    let _ = writeln!(out, "node {}  config fingerprint {}", view.node, fp(&view.config_fingerprint));
    let _ = writeln!(out, "allocator order: {}", view.order.join(", "));
    for p in view.peers.iter().filter(|p| p.config_match == Some(false)) {
        let theirs = p.peer_fingerprint.as_deref().map_or_else(|| "?".to_string(), fp);
        let _ = writeln!(out, "{}: config fingerprint {theirs} differs: make the config files identical", p.peer);
    }
    for p in view.peers.iter().filter(|p| p.state != crate::sync::status::PeerState::Connected) {
        if let Some(e) = &p.last_error {
            let _ = writeln!(out, "{}: last error: {e}", p.peer);
        }
    }
    out
}

/// Whether `postern sync status` exits 0: every peer connected, and none lagging by
/// [`HEALTHY_LAG_SECONDS`] or more (plan §5).
pub fn sync_healthy(view: &crate::sync::SyncView) -> bool {
    view.peers.iter().all(|p| {
        p.state == crate::sync::status::PeerState::Connected && p.lag_seconds.is_none_or(|s| s < HEALTHY_LAG_SECONDS)
    })
}

/// A connected peer further behind than this makes `postern sync status` exit 1.
pub const HEALTHY_LAG_SECONDS: u64 = 10;

/// The `queue list` header, aligned with [`list_line`].
pub fn list_header() -> String {
    format!(
        "{:<16} {:<30} {:<30} {:>8} {:>4} {:>8} {:<7} {}",
        "ID", "SENDER", "RECIPIENTS", "SIZE", "AGE", "ATTEMPTS", "NEXT", "LAST-ERROR"
    )
}

/// One `queue list` line: id, sender (`<>` for the null sender), recipients (comma-separated),
/// size in bytes, age, attempts, next try (`now`, `in4m`, `held`, `active` while a delivery
/// runs) and the last error, shortened (`-` when none). Every column but the last is one
/// whitespace-free token.
pub fn list_line(e: &EntryView, now: i64) -> String {
    let sender = if e.from.is_empty() { "<>".to_string() } else { token(&e.from) };
    let recipients = if e.recipients.is_empty() {
        "-".to_string()
    } else {
        e.recipients.iter().map(|r| token(&r.address)).collect::<Vec<_>>().join(",")
    };
    let error = e.last_error.as_deref().or_else(|| e.recipients.iter().find_map(|r| r.last_error.as_deref()));
    format!(
        "{:<16} {:<30} {:<30} {:>8} {:>4} {:>8} {:<7} {}",
        e.id,
        sender,
        recipients,
        e.size,
        human_duration(now - e.created),
        e.attempts,
        next_try(e, now),
        error.map_or("-".to_string(), |t| shorten(t, 80))
    )
}

fn next_try(e: &EntryView, now: i64) -> String {
    if e.held {
        "held".into()
    } else if e.in_flight {
        "active".into()
    } else if e.next_attempt <= now {
        "now".into()
    } else {
        format!("in{}", human_duration(e.next_attempt - now))
    }
}

/// An address as one token: white space and control characters become `\xNN`.
fn token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_whitespace() || c.is_control() {
            for b in c.to_string().bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One line, runs of white space collapsed, at most `max` characters (ending in "...").
pub fn shorten(text: &str, max: usize) -> String {
    let flat = text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if flat.chars().count() <= max {
        flat
    } else {
        let cut: String = flat.chars().take(max.saturating_sub(3)).collect();
        format!("{}...", cut.trim_end())
    }
}

fn timestamp(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map_or_else(|| secs.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Every field of an entry, one `name: value` per line; each recipient on a `recipient:` line
/// followed by its indented `original:` and `last-error:` lines.
pub fn show(e: &EntryView, now: i64) -> String {
    let mut s = String::new();
    let mut put = |k: &str, v: String| s.push_str(&format!("{k}: {v}\n"));
    put("id", e.id.clone());
    put("sender", if e.from.is_empty() { "<>".into() } else { format!("<{}>", e.from) });
    put("origin", e.origin.clone());
    put("created", format!("{} ({} ago)", timestamp(e.created), human_duration(now - e.created)));
    put("size", e.size.to_string());
    put("8bit", yes(e.eight_bit).into());
    put("smtputf8", yes(e.smtputf8).into());
    put("attempts", e.attempts.to_string());
    let next = match next_try(e, now) {
        n if n.starts_with("in") => format!("{} (in {})", timestamp(e.next_attempt), &n[2..]),
        n => format!("{} ({n})", timestamp(e.next_attempt)),
    };
    put("next-attempt", next);
    put("held", yes(e.held).into());
    put("active", yes(e.in_flight).into());
    put("delay-warning-sent", yes(e.warned).into());
    put("last-error", e.last_error.clone().unwrap_or_else(|| "-".into()));
    put("body", e.body.clone());
    for r in &e.recipients {
        s.push_str(&format!("recipient: <{}>\n", r.address));
        if let Some(o) = &r.original {
            s.push_str(&format!("  original: <{o}>\n"));
        }
        s.push_str(&format!("  last-error: {}\n", r.last_error.as_deref().unwrap_or("-")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::QueueRecipient;

    fn entry() -> EntryView {
        EntryView {
            id: "00000000000000a1".into(),
            from: "".into(),
            recipients: vec![
                QueueRecipient { address: "a@x.example".into(), original: None, last_error: None },
                QueueRecipient { address: "b c@x.example".into(), original: Some("f@y".into()), last_error: None },
            ],
            size: 1234,
            eight_bit: false,
            smtputf8: false,
            origin: "forward".into(),
            created: 1000,
            next_attempt: 1000 + 3600,
            attempts: 2,
            held: false,
            in_flight: false,
            warned: false,
            last_error: Some("connection\r\nrefused".into()),
            body: "ab".into(),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(-5), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(180), "3m");
        assert_eq!(human_duration(7200), "2h");
        assert_eq!(human_duration(4 * 86400 + 5), "4d");
    }

    #[test]
    fn list_columns() {
        let mut e = entry();
        let line = list_line(&e, 1000 + 240);
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[..7], ["00000000000000a1", "<>", "a@x.example,b\\x20c@x.example", "1234", "4m", "2", "in56m"]);
        assert_eq!(cols[7..].join(" "), "connection refused");
        assert_eq!(list_header().split_whitespace().count(), 8);
        e.held = true;
        assert!(list_line(&e, 0).contains(" held "));
        e.held = false;
        assert!(list_line(&e, 99999).contains(" now "));
        assert_eq!(shorten(&"x".repeat(100), 10), "xxxxxxx...");
    }

    #[test]
    fn show_has_every_field() {
        let text = show(&entry(), 1100);
        for k in [
            "id:",
            "sender: <>",
            "origin: forward",
            "size: 1234",
            "attempts: 2",
            "recipient: <b c@x.example>",
            "  original: <f@y>",
            "body: ab",
        ] {
            assert!(text.contains(k), "{k} in {text}");
        }
    }
}
