//! Delivery status notifications (bounces) for the outbound queue.
//!
//! A DSN is a `multipart/report; report-type=delivery-status` message (RFC 3462 §2, RFC 3464 §2) with
//! three parts: a text for the human, the machine-readable `message/delivery-status` fields, and the
//! original header section as `text/rfc822-headers` (RFC 3462 §3). The original body is never returned:
//! it may be large, and echoing it back turns the server into a reflector for spam sent with forged senders.
//!
//! Every value that comes from outside (remote replies, addresses, envelope ids) goes through [`field_value`]
//! or [`typed_value`] so that a hostile remote reply cannot inject header lines or extra DSN fields.

use chrono::{DateTime, Utc};
use mail_builder::headers::address::Address;
use mail_builder::headers::content_type::ContentType;
use mail_builder::headers::date::Date;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use mail_builder::mime::{BodyPart, MimePart};
use mail_builder::MessageBuilder;
use std::fmt::Write as _;

/// The most header bytes we echo back or inspect: enough for any honest message, bounded against abuse.
const MAX_HEADER_SECTION: usize = 64 * 1024;
/// RFC 5322 §2.1.1: a line must not exceed 998 characters (excluding CRLF).
const MAX_LINE: usize = 998;

/// RFC 3464 §2.3.3 action-value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
            Action::Expanded => "expanded",
        }
    }
}

/// Per-recipient facts (RFC 3464 §2.3). Addresses may be given bare (`bob@x`) or typed (`rfc822;bob@x`).
#[derive(Debug, Clone)]
pub struct RecipientStatus {
    pub final_recipient: String,
    pub original_recipient: Option<String>,
    pub action: Action,
    /// RFC 3463 enhanced status code, e.g. "5.1.1".
    pub status: String,
    /// Bare host (`mx.example.org`) or typed (`dns;mx.example.org`).
    pub remote_mta: Option<String>,
    /// The remote reply, e.g. "550 5.1.1 <bob@x>: user unknown"; emitted as "smtp; 550 5.1.1 ...".
    pub diagnostic: Option<String>,
    pub last_attempt: Option<DateTime<Utc>>,
    /// For delayed recipients: when the queue gives up.
    pub will_retry_until: Option<DateTime<Utc>>,
}

/// Everything needed to build one DSN for one original message.
#[derive(Debug, Clone)]
pub struct DsnRequest<'a> {
    /// Our hostname, reported as `Reporting-MTA: dns; host`.
    pub reporting_mta: &'a str,
    /// The original envelope sender: the DSN goes there.
    pub original_sender: &'a str,
    /// The ENVID parameter of MAIL FROM (RFC 3461 §4.4), already xtext.
    pub original_envelope_id: Option<&'a str>,
    pub arrival_date: DateTime<Utc>,
    pub recipients: &'a [RecipientStatus],
    /// The header section of the original message.
    pub original_headers: &'a [u8],
    /// The From address, e.g. `MAILER-DAEMON@host` (a full `Name <addr>` is accepted too).
    pub postmaster: &'a str,
}

/// Build a complete RFC 5322 DSN (CRLF line ends).
///
/// The subject follows the worst outcome: any failure makes it a bounce, else any delay a delay warning,
/// else a success report. `Auto-Submitted: auto-replied` (RFC 3834 §5) lets other systems know not to
/// answer it, and the empty envelope sender the caller uses (RFC 5321 §4.5.5) stops loops at SMTP level.
pub fn build_dsn(req: &DsnRequest<'_>) -> Vec<u8> {
    let host = hostname(req.reporting_mta);
    let has = |a: Action| req.recipients.iter().any(|r| r.action == a);
    let subject = if has(Action::Failed) {
        "Undelivered Mail Returned to Sender"
    } else if has(Action::Delayed) {
        "Delayed Mail (still being retried)"
    } else {
        "Successful Mail Delivery Report"
    };
    let (from_name, from_addr) = split_mailbox(req.postmaster);
    let message_id = format!("{:x}.{:016x}@{}", Utc::now().timestamp(), rand::random::<u64>(), host);

    let text = MimePart::new("text/plain", human_text(req, &host));
    // Binary bodies + an explicit Content-Transfer-Encoding make mail-builder write the bytes verbatim
    // (no charset parameter, no re-encoding): the delivery-status fields must stay exactly as RFC 3464 lays them out.
    let status =
        MimePart::new("message/delivery-status", BodyPart::Binary(delivery_status(req, &host).into_bytes().into()))
            .header("Content-Transfer-Encoding", Raw::new("7bit"));
    let headers = rfc822_headers(req.original_headers);
    let cte = if headers.is_ascii() { "7bit" } else { "8bit" };
    let headers = MimePart::new("text/rfc822-headers", BodyPart::Binary(headers.into()))
        .header("Content-Transfer-Encoding", Raw::new(cte));
    let report = MimePart::new(
        ContentType::new("multipart/report").attribute("report-type", "delivery-status"),
        vec![text, status, headers],
    );

    MessageBuilder::new()
        .from(Address::new_address(Some(from_name), from_addr))
        .to(Address::new_address(None::<&str>, field_value(req.original_sender, 320)))
        .subject(subject)
        .date(Date::new(Utc::now().timestamp()))
        .message_id(MessageId::new(message_id))
        .header("Auto-Submitted", Raw::new("auto-replied"))
        .header("MIME-Version", Raw::new("1.0"))
        .body(report)
        .write_to_vec()
        .expect("writing to a Vec cannot fail")
}

/// The header section of `raw`, including the blank line that ends it.
///
/// Bounded to [`MAX_HEADER_SECTION`] bytes, cut at a line end (preferably one that does not split a folded
/// field), because the result is echoed in DSNs and scanned by [`is_auto_response`].
pub fn header_section(raw: &[u8]) -> &[u8] {
    // The first empty line (LF or CRLF) ends the section; only the bounded prefix is scanned.
    let mut end = raw.len();
    let mut line_start = 0;
    for (i, &b) in raw.iter().enumerate().take(MAX_HEADER_SECTION + 2) {
        if b == b'\n' {
            if matches!(&raw[line_start..i], b"" | b"\r") {
                end = i + 1;
                break;
            }
            line_start = i + 1;
        }
    }
    if end <= MAX_HEADER_SECTION {
        return &raw[..end];
    }
    let window = &raw[..MAX_HEADER_SECTION];
    let field_start =
        (0..window.len()).rev().find(|&i| window[i] == b'\n' && !matches!(raw.get(i + 1), Some(b' ' | b'\t')));
    match field_start.or_else(|| window.iter().rposition(|&b| b == b'\n')) {
        Some(i) => &raw[..=i],
        None => window,
    }
}

/// True when the message must not be answered with a DSN (RFC 3834 §2, RFC 3464 §2: never a bounce for a bounce):
/// it is itself a delivery report, or it carries `Auto-Submitted` with a value other than `no`.
/// The null reverse path is the caller's check, since it lives in the envelope.
pub fn is_auto_response(raw: &[u8]) -> bool {
    unfolded_fields(header_section(raw)).iter().any(|(name, value)| {
        if name.eq_ignore_ascii_case("auto-submitted") {
            let keyword = first_token(value);
            !keyword.is_empty() && !keyword.eq_ignore_ascii_case("no")
        } else if name.eq_ignore_ascii_case("content-type") {
            let mut params = value.split(';');
            let is_report = params.next().is_some_and(|t| first_token(t).eq_ignore_ascii_case("multipart/report"));
            is_report
                && params.filter_map(|p| p.split_once('=')).any(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("report-type")
                        && v.trim().trim_matches('"').eq_ignore_ascii_case("delivery-status")
                })
        } else {
            false
        }
    })
}

/// Header fields as (name, unfolded value) pairs; lines that are not fields are ignored.
fn unfolded_fields(section: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(section);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.split('\n').map(|l| l.trim_end_matches('\r')) {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            fields.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    fields
}

/// The leading token of a structured value, ignoring whitespace, comments and parameters.
fn first_token(value: &str) -> &str {
    let value = value.trim_start();
    let end = value.find([';', '(', ' ', '\t']).unwrap_or(value.len());
    &value[..end]
}

/// RFC 3464 §2.2 per-message fields, then one blank-line separated group per recipient (§2.3).
fn delivery_status(req: &DsnRequest<'_>, host: &str) -> String {
    let mut out = String::new();
    let line = |out: &mut String, name: &str, value: &str| {
        let room = MAX_LINE.saturating_sub(name.len() + 2);
        let _ = write!(out, "{name}: {}\r\n", truncate(value, room));
    };
    if let Some(envid) = req.original_envelope_id {
        line(&mut out, "Original-Envelope-Id", &field_value(envid, MAX_LINE));
    }
    line(&mut out, "Reporting-MTA", &format!("dns; {host}"));
    line(&mut out, "Arrival-Date", &req.arrival_date.to_rfc2822());
    for r in req.recipients {
        out.push_str("\r\n");
        if let Some(orig) = &r.original_recipient {
            line(&mut out, "Original-Recipient", &typed_address(orig));
        }
        line(&mut out, "Final-Recipient", &typed_address(&r.final_recipient));
        line(&mut out, "Action", r.action.as_str());
        line(&mut out, "Status", &status_code(r));
        if let Some(mta) = &r.remote_mta {
            line(&mut out, "Remote-MTA", &typed_value(mta, "dns"));
        }
        if let Some(diag) = &r.diagnostic {
            line(&mut out, "Diagnostic-Code", &typed_value(diag, "smtp"));
        }
        if let Some(t) = r.last_attempt {
            line(&mut out, "Last-Attempt-Date", &t.to_rfc2822());
        }
        if let Some(t) = r.will_retry_until.filter(|_| r.action == Action::Delayed) {
            line(&mut out, "Will-Retry-Until", &t.to_rfc2822());
        }
    }
    out
}

/// The status if it is a well-formed RFC 3463 code, else a generic one matching the action (§2.3.4 requires it).
fn status_code(r: &RecipientStatus) -> String {
    let parts: Vec<&str> = r.status.trim().split('.').collect();
    let ok = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..].iter().all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        return r.status.trim().to_string();
    }
    match r.action {
        Action::Failed => "5.0.0",
        Action::Delayed => "4.0.0",
        _ => "2.0.0",
    }
    .to_string()
}

/// A recipient as `type; address`. Non-ASCII addresses (SMTPUTF8) become the `utf-8` address type with
/// `\x{HEX}` escapes (RFC 6533 §3), which keeps the delivery-status body 7-bit.
fn typed_address(value: &str) -> String {
    let (kind, addr) = split_type(value).unwrap_or(("rfc822", value.trim()));
    if addr.is_ascii() {
        return format!("{kind}; {}", field_value(addr, MAX_LINE));
    }
    let mut escaped = String::new();
    for c in addr.chars().filter(|c| !c.is_control()) {
        if c.is_ascii() && c != '\\' && c != '+' && c != '=' {
            escaped.push(c);
        } else {
            let _ = write!(escaped, "\\x{{{:X}}}", u32::from(c));
        }
    }
    format!("utf-8; {escaped}")
}

/// `type; value` for RFC 3464 typed fields (Remote-MTA, Diagnostic-Code), adding `default` when untyped.
fn typed_value(value: &str, default: &str) -> String {
    let clean = field_value(value, MAX_LINE);
    match split_type(&clean) {
        Some((kind, rest)) => format!("{kind}; {rest}"),
        None => format!("{default}; {clean}"),
    }
}

/// Split `type;rest` when the prefix is an atom starting with a letter ("550 5.1.1 a; b" and "550;x" stay untyped).
fn split_type(value: &str) -> Option<(&str, &str)> {
    let (kind, rest) = value.trim().split_once(';')?;
    let atom = kind.starts_with(|c: char| c.is_ascii_alphabetic())
        && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    atom.then(|| (kind, rest.trim()))
}

/// One-line, printable ASCII, at most `max` bytes: CR/LF/controls become spaces and runs of white space collapse
/// (a multi-line SMTP reply reads as one line), non-ASCII becomes '?'. This is what makes remote text safe to put
/// in a header or a DSN field.
fn field_value(value: &str, max: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max));
    for c in value.chars() {
        let c = if c.is_ascii_graphic() {
            c
        } else if c.is_whitespace() || c.is_control() {
            ' '
        } else {
            '?'
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.len() >= max {
            break;
        }
        out.push(c);
    }
    out.trim_end().to_string()
}

fn truncate(value: &str, max: usize) -> &str {
    let mut end = value.len().min(max);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}

/// Our own hostname reduced to hostname characters, since it lands in Message-ID and Reporting-MTA.
fn hostname(name: &str) -> String {
    let h: String =
        name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':')).collect();
    if h.is_empty() {
        "localhost".to_string()
    } else {
        h
    }
}

/// `Name <addr>` or a bare address → (display name, address); the display name defaults to "Mail Delivery System".
fn split_mailbox(value: &str) -> (String, String) {
    let value = field_value(value, 320);
    match (value.find('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => {
            let name = value[..open].trim().trim_matches('"').trim();
            let name = if name.is_empty() { "Mail Delivery System" } else { name };
            (name.to_string(), value[open + 1..close].trim().to_string())
        }
        _ => ("Mail Delivery System".to_string(), value),
    }
}

/// The original header lines, CRLF-terminated, without the blank line that ended them (RFC 3462 §3).
fn rfc822_headers(original: &[u8]) -> Vec<u8> {
    let section = header_section(original);
    let mut out = Vec::with_capacity(section.len() + 64);
    for line in section.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        // A lone CR inside a line would be a line break to some readers; neutralize it.
        out.extend(line.iter().map(|&b| if b == b'\r' || b == 0 { b' ' } else { b }));
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The human-readable part (RFC 3462 §2 first part): what happened to each recipient, in plain words.
fn human_text(req: &DsnRequest<'_>, host: &str) -> String {
    let mut out = format!("This is the mail delivery system at {host}.\r\n");
    // Short lines keep the part 7-bit and readable; long remote replies may still make mail-builder pick QP.
    let groups: [(Action, &str); 5] = [
        (
            Action::Failed,
            "Your message could not be delivered to the recipients below.\r\n\
             This is a permanent error; the message will not be retried.",
        ),
        (
            Action::Delayed,
            "Your message has not been delivered yet to the recipients below.\r\n\
             The mail system will keep trying; you do not need to send it again.",
        ),
        (Action::Delivered, "Your message was delivered to the recipients below."),
        (
            Action::Relayed,
            "Your message was passed on to a system that does not report delivery,\r\n\
             so this is the last report for the recipients below.",
        ),
        (
            Action::Expanded,
            "Your message was delivered to the addresses below,\r\n\
             which forwarded it on to further recipients.",
        ),
    ];
    for (action, intro) in groups {
        let recipients: Vec<&RecipientStatus> = req.recipients.iter().filter(|r| r.action == action).collect();
        if recipients.is_empty() {
            continue;
        }
        let _ = write!(out, "\r\n{intro}\r\n");
        for r in recipients {
            let addr = split_type(&r.final_recipient).map_or(r.final_recipient.as_str(), |(_, a)| a);
            let status = status_code(r);
            let _ = write!(out, "\r\n  <{}>: {} (status {status})\r\n", field_value(addr, 320), explain(&status));
            if let Some(diag) = &r.diagnostic {
                let server = r.remote_mta.as_deref().map_or("The remote server".to_string(), |m| {
                    format!("The remote server {}", field_value(split_type(m).map_or(m, |(_, h)| h), 255))
                });
                let _ = write!(out, "    {server} said:\r\n");
                wrap(&mut out, &field_value(diag, 700), "      ");
            }
            if let Some(until) = r.will_retry_until.filter(|_| action == Action::Delayed) {
                let _ = write!(out, "    Delivery will be attempted until {}.\r\n", until.to_rfc2822());
            }
        }
    }
    out
}

/// Word-wrap `text` at 76 columns with `indent`, so the text part usually stays 7bit instead of quoted-printable.
fn wrap(out: &mut String, text: &str, indent: &str) {
    let mut width = 0;
    for word in text.split(' ') {
        if width > 0 && width + 1 + word.len() > 76 {
            out.push_str("\r\n");
            width = 0;
        }
        let sep = if width == 0 { indent } else { " " };
        out.push_str(sep);
        out.push_str(word);
        width += sep.len() + word.len();
    }
    out.push_str("\r\n");
}

/// Plain-words meaning of the common RFC 3463 codes; the class alone for the rest.
fn explain(status: &str) -> &'static str {
    let detail = status.split_once('.').map_or("", |(_, d)| d);
    match detail {
        "1.1" => "the mailbox does not exist",
        "1.2" => "the destination domain does not exist or does not accept mail",
        "2.1" => "the mailbox is disabled",
        "2.2" => "the mailbox is full",
        "3.4" | "2.3" => "the message is too large",
        "4.1" | "4.2" => "the receiving server did not answer or dropped the connection",
        "4.4" => "no mail server could be found for the domain",
        "4.7" => "the message stayed in the queue for too long",
        "7.1" => "the receiving server refused the message by policy",
        _ if status.starts_with('2') => "delivered",
        _ if status.starts_with('4') => "a temporary problem",
        _ => "a permanent problem",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use mail_parser::{MessageParser, MimeHeaders};

    const ORIGINAL: &[u8] = b"From: Alice <alice@example.test>\r\nTo: bob@example.net\r\nSubject: lunch\r\n\
Message-ID: <m1@example.test>\r\n\r\nSECRET BODY LINE\r\n";

    fn when(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, h, 0, 0).unwrap()
    }

    fn rcpt(action: Action, status: &str, diagnostic: &str) -> RecipientStatus {
        RecipientStatus {
            final_recipient: "rfc822;bob@example.net".into(),
            original_recipient: None,
            action,
            status: status.into(),
            remote_mta: Some("dns;mx.example.net".into()),
            diagnostic: Some(diagnostic.into()),
            last_attempt: Some(when(12)),
            will_retry_until: Some(when(20)),
        }
    }

    fn build(recipients: &[RecipientStatus]) -> Vec<u8> {
        build_dsn(&DsnRequest {
            reporting_mta: "mx.example.test",
            original_sender: "alice@example.test",
            original_envelope_id: Some("QQ314159"),
            arrival_date: when(10),
            recipients,
            original_headers: header_section(ORIGINAL),
            postmaster: "MAILER-DAEMON@mx.example.test",
        })
    }

    /// The three report parts as (content type, text), checking the top-level structure on the way.
    fn parts(raw: &[u8]) -> Vec<(String, String)> {
        let msg = MessageParser::default().parse(raw).expect("parses");
        let ct = msg.content_type().expect("content type");
        assert_eq!((ct.ctype(), ct.subtype()), ("multipart", Some("report")));
        assert_eq!(ct.attribute("report-type"), Some("delivery-status"));
        let ids = msg.parts[0].sub_parts().expect("multipart").to_vec();
        ids.iter()
            .map(|&id| {
                let p = &msg.parts[id as usize];
                let ct = p.content_type().expect("part content type");
                let full = format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""));
                (full, String::from_utf8_lossy(p.contents()).into_owned())
            })
            .collect()
    }

    #[test]
    fn failed_dsn_structure_and_fields() {
        let raw = build(&[rcpt(Action::Failed, "5.1.1", "550 5.1.1 <bob@example.net>: user unknown")]);
        assert!(raw.windows(2).all(|w| w[1] != b'\n' || w[0] == b'\r'), "bare LF in output");
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("Subject: Undelivered Mail Returned to Sender\r\n"));
        assert!(text.contains("Auto-Submitted: auto-replied\r\n"));
        assert!(text.contains("MIME-Version: 1.0\r\n"));
        assert!(text.contains("@mx.example.test>"), "Message-ID uses the reporting MTA");
        assert!(text.contains("MAILER-DAEMON@mx.example.test"));
        let msg = MessageParser::default().parse(&raw).unwrap();
        assert_eq!(msg.to().and_then(|a| a.first()).and_then(|a| a.address()), Some("alice@example.test"));

        let parts = parts(&raw);
        let types: Vec<&str> = parts.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(types, ["text/plain", "message/delivery-status", "text/rfc822-headers"]);
        assert!(parts[0].1.contains("bob@example.net") && parts[0].1.contains("does not exist"), "{}", parts[0].1);
        let ds = &parts[1].1;
        for want in [
            "Original-Envelope-Id: QQ314159\r\n",
            "Reporting-MTA: dns; mx.example.test\r\n",
            "Arrival-Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n",
            "\r\n\r\nFinal-Recipient: rfc822; bob@example.net\r\n",
            "Action: failed\r\n",
            "Status: 5.1.1\r\n",
            "Remote-MTA: dns; mx.example.net\r\n",
            "Diagnostic-Code: smtp; 550 5.1.1 <bob@example.net>: user unknown\r\n",
            "Last-Attempt-Date: Sat, 21 Nov 2026 12:00:00 +0000\r\n",
        ] {
            assert!(ds.contains(want), "missing {want:?} in {ds}");
        }
        assert!(!ds.contains("Will-Retry-Until"), "only for delayed recipients");
        assert!(parts[2].1.contains("Subject: lunch\r\n") && parts[2].1.contains("Message-ID: <m1@example.test>"));
        assert!(!text.contains("SECRET BODY"), "the original body must not be returned");
    }

    #[test]
    fn delayed_and_success_subjects() {
        let raw = build(&[rcpt(Action::Delayed, "4.4.1", "421 try later")]);
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("Subject: Delayed Mail (still being retried)"));
        let ds = &parts(&raw)[1].1;
        assert!(ds.contains("Action: delayed\r\n") && ds.contains("Status: 4.4.1\r\n"));
        assert!(ds.contains("Will-Retry-Until: Sat, 21 Nov 2026 20:00:00 +0000\r\n"), "{ds}");

        let raw = build(&[rcpt(Action::Delivered, "2.0.0", "250 ok")]);
        assert!(String::from_utf8_lossy(&raw).contains("Subject: Successful Mail Delivery Report"));
        // Failure wins over delay in the subject; each recipient gets its own group.
        let raw = build(&[rcpt(Action::Delayed, "4.4.1", "x"), rcpt(Action::Failed, "5.2.2", "552 full")]);
        assert!(String::from_utf8_lossy(&raw).contains("Subject: Undelivered Mail Returned to Sender"));
        assert_eq!(parts(&raw)[1].1.matches("Final-Recipient:").count(), 2);
    }

    #[test]
    fn hostile_values_are_flattened() {
        let mut r = rcpt(Action::Failed, "5.1.1\r\nX-Evil: 1", "550 no\r\nX-Injected: yes\r\n\r\nAction: delivered");
        r.final_recipient = "bob@example.net\r\nX-Also: evil".into();
        r.diagnostic = Some(format!("{} {}", r.diagnostic.unwrap(), "z".repeat(5000)));
        let raw = build(&[r]);
        let text = String::from_utf8_lossy(&raw);
        assert!(!text.contains("\r\nX-Injected") && !text.contains("\r\nX-Evil") && !text.contains("\r\nX-Also"));
        let ds = &parts(&raw)[1].1;
        assert!(ds.contains("Diagnostic-Code: smtp; 550 no X-Injected: yes Action: delivered zzz"), "{ds}");
        assert!(ds.contains("Status: 5.0.0\r\n"), "malformed status replaced: {ds}");
        assert_eq!(ds.matches("\r\nAction:").count(), 1, "no injected field line");
        assert!(ds.split("\r\n").all(|l| l.len() <= MAX_LINE));
        assert!(text.split("\r\n").all(|l| l.len() <= MAX_LINE));
    }

    #[test]
    fn non_ascii_recipient_uses_utf8_type() {
        let mut r = rcpt(Action::Failed, "5.1.1", "550 nö");
        r.final_recipient = "jörg@example.net".into();
        let ds = &parts(&build(&[r]))[1].1;
        assert!(ds.contains("Final-Recipient: utf-8; j\\x{F6}rg@example.net\r\n"), "{ds}");
        assert!(ds.contains("Diagnostic-Code: smtp; 550 n?\r\n"), "{ds}");
        assert!(ds.is_ascii());
    }

    #[test]
    fn auto_response_detection() {
        let dsn = build(&[rcpt(Action::Failed, "5.1.1", "550 unknown")]);
        assert!(is_auto_response(&dsn), "never a bounce for a bounce");
        assert!(is_auto_response(b"From: a@b\r\nAuto-Submitted: auto-replied\r\n\r\nhi\r\n"));
        assert!(is_auto_response(b"From: a@b\r\nauto-submitted:\r\n  Auto-Generated (vacation)\r\n\r\nhi\r\n"));
        assert!(is_auto_response(
            b"Content-Type: multipart/report;\r\n\treport-type=\"delivery-status\"; boundary=x\r\n\r\n"
        ));
        assert!(!is_auto_response(ORIGINAL));
        assert!(!is_auto_response(b"From: a@b\r\nAuto-Submitted: no\r\n\r\nhi\r\n"));
        assert!(!is_auto_response(b"Content-Type: multipart/report; report-type=disposition-notification\r\n\r\n"));
        // Header-looking lines in the body do not count.
        assert!(!is_auto_response(b"From: a@b\r\n\r\nAuto-Submitted: auto-replied\r\n"));
    }

    #[test]
    fn header_section_bounds() {
        assert_eq!(header_section(ORIGINAL), &ORIGINAL[..ORIGINAL.len() - "SECRET BODY LINE\r\n".len()]);
        assert_eq!(header_section(b"A: 1\nB: 2\n\nbody"), b"A: 1\nB: 2\n\n");
        assert_eq!(header_section(b"A: 1\r\n"), b"A: 1\r\n");
        assert_eq!(header_section(b"\r\nbody"), b"\r\n");
        assert_eq!(header_section(b""), b"");
        let mut big = Vec::new();
        while big.len() < 100_000 {
            big.extend_from_slice(
                b"X-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\r\n",
            );
        }
        big.extend_from_slice(b"\r\nbody");
        let cut = header_section(&big);
        assert!(cut.len() <= MAX_HEADER_SECTION && cut.len() > MAX_HEADER_SECTION - 200);
        assert!(cut.ends_with(b"bbb\r\n"), "cut after a whole folded field");
        let no_newline = vec![b'a'; 70_000];
        assert_eq!(header_section(&no_newline).len(), MAX_HEADER_SECTION);
    }

    #[test]
    fn python_email_package_agrees() {
        let python = std::path::Path::new("/usr/bin/python3");
        if !python.exists() {
            eprintln!("skipping: /usr/bin/python3 not found");
            return;
        }
        let raw = build(&[rcpt(Action::Failed, "5.1.1", "550 5.1.1 user unknown")]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dsn.eml");
        std::fs::write(&path, &raw).unwrap();
        let script = r#"
import email, sys
m = email.message_from_bytes(open(sys.argv[1], 'rb').read())
assert m.get_content_type() == 'multipart/report', m.get_content_type()
assert m.get_param('report-type') == 'delivery-status'
assert m.is_multipart()
types = [p.get_content_type() for p in m.get_payload()]
assert types == ['text/plain', 'message/delivery-status', 'text/rfc822-headers'], types
ds = m.get_payload()[1].get_payload()
per_message = ds[0]
per_rcpt = ds[1]
assert per_message['Reporting-MTA'] == 'dns; mx.example.test', per_message['Reporting-MTA']
assert per_rcpt['Action'] == 'failed' and per_rcpt['Status'] == '5.1.1', dict(per_rcpt)
assert per_rcpt['Final-Recipient'] == 'rfc822; bob@example.net'
print('ok')
"#;
        let out = std::process::Command::new(python).arg("-c").arg(script).arg(&path).output().unwrap();
        assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    }
}
