//! Inbound verdicts on port 25: SPF (RFC 7208), DKIM verification (RFC 6376) and DMARC (RFC 7489)
//! recorded in one Authentication-Results field (RFC 8601), and the policy applied to them.
//!
//! The checks run on mail-auth with its own hickory resolver, built from the node's `[dns]`
//! settings (the same servers and per-question timeout as [`crate::dns::Resolver`]), so tests and
//! operators point both at one DNS.
//!
//! Policy (`[inbound]`, see `config::InboundSettings`):
//! - DMARC fails and the author domain says `p=reject` → `dmarc_reject` (550 5.7.1 by default);
//!   `p=quarantine` → `dmarc_quarantine` (Junk by default). A DMARC pass (via aligned SPF or DKIM)
//!   is never refused.
//! - SPF `fail` for the MAIL FROM domain → `spf_fail` (accept by default: DMARC decides, since
//!   plain forwarding breaks SPF).
//! - DNS trouble that leaves the outcome open is a tempfail (451 4.7.0) when `tempfail = true`
//!   (the default): DMARC temperror (its record lookup, or an aligned SPF/DKIM check that hit a
//!   DNS error), SPF temperror for the MAIL FROM domain unless DMARC passed anyway, and the whole
//!   check running past `[inbound] timeout`. NXDOMAIN and NODATA are not failures: they are the
//!   answer "no record" (SPF none, no DMARC policy), so a sender without records is accepted.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mail_auth::dmarc::Policy;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimOutput, DkimResult, DmarcResult, MessageAuthenticator, SpfResult,
};

use crate::config::{Config, InboundAction, InboundSettings};

/// What to do with a message after its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Accept,
    /// Deliver to the recipients' Junk mailbox (DMARC p=quarantine).
    Junk,
    /// Refuse at the end of DATA with this reply (code, enhanced status, text).
    Reject(u16, &'static str, String),
}

#[derive(Debug, Clone)]
pub struct Verdict {
    /// Header fields to put in front of the message (complete lines, CRLF).
    pub fields: Vec<u8>,
    pub action: Action,
}

/// The facts of the SMTP transaction the checks need.
pub struct Envelope<'a> {
    pub client_ip: IpAddr,
    pub helo: &'a str,
    /// Reverse path without brackets; "" for the null sender.
    pub mail_from: &'a str,
    /// This host's name, as `authserv-id`.
    pub hostname: &'a str,
    /// The session id, for the log line.
    pub sid: &'a str,
}

pub struct Verifier {
    auth: MessageAuthenticator,
    settings: InboundSettings,
}

impl Verifier {
    /// `None` when `[inbound] checks = false`.
    pub fn from_config(config: &Config, _resolver: &crate::dns::Resolver) -> anyhow::Result<Option<Verifier>> {
        if !config.inbound.checks {
            return Ok(None);
        }
        let auth = authenticator(&config.dns.nameservers, config.dns.timeout)?;
        Ok(Some(Verifier { auth, settings: config.inbound.clone() }))
    }

    /// Checks one complete message (trace fields included), within `[inbound] timeout`.
    pub async fn check(&self, envelope: &Envelope<'_>, message: &[u8]) -> Verdict {
        let started = Instant::now();
        match tokio::time::timeout(self.settings.timeout, self.evaluate(envelope, message)).await {
            Ok(verdict) => verdict,
            Err(_) => {
                let action = if self.settings.tempfail { "tempfail" } else { "accept" };
                tracing::warn!(
                    "{} verdict timeout from=<{}> ip={} after_ms={} action={action}",
                    envelope.sid,
                    envelope.mail_from,
                    envelope.client_ip,
                    started.elapsed().as_millis()
                );
                let fields = format!("Authentication-Results: {}; none (checks timed out)\r\n", envelope.hostname);
                Verdict { fields: fields.into_bytes(), action: self.tempfail_or_accept() }
            }
        }
    }

    fn tempfail_or_accept(&self) -> Action {
        if self.settings.tempfail {
            Action::Reject(451, "4.7.0", "Temporary DNS failure checking the sender, try again later".into())
        } else {
            Action::Accept
        }
    }

    async fn evaluate(&self, env: &Envelope<'_>, message: &[u8]) -> Verdict {
        let started = Instant::now();
        let host = env.hostname;
        let parsed = AuthenticatedMessage::parse(message);
        let helo_params = mail_auth::spf::verify::SpfParameters::verify_ehlo(env.client_ip, env.helo, host);
        let spf_helo = self.auth.verify_spf(helo_params);
        let spf_mail = async {
            if env.mail_from.is_empty() {
                None
            } else {
                let p = mail_auth::spf::verify::SpfParameters::verify_mail_from(
                    env.client_ip,
                    env.helo,
                    host,
                    env.mail_from,
                );
                Some(self.auth.verify_spf(p).await)
            }
        };
        let dkim = async {
            match &parsed {
                Some(m) => self.auth.verify_dkim(m).await,
                None => Vec::new(),
            }
        };
        let (spf_helo, spf_mail, dkim) = tokio::join!(spf_helo, spf_mail, dkim);
        // RFC 7208 §2.4: for the null sender the HELO identity stands in for MAIL FROM.
        let spf = spf_mail.as_ref().unwrap_or(&spf_helo);
        let mail_domain = match env.mail_from.rsplit_once('@') {
            Some((_, d)) => d,
            None => env.helo,
        };
        let dmarc = match &parsed {
            Some(m) => Some(
                self.auth
                    .verify_dmarc(mail_auth::dmarc::verify::DmarcParameters::new(m, &dkim, mail_domain, spf))
                    .await,
            ),
            None => None,
        };

        // The field: SPF (MAIL FROM, then HELO), every DKIM signature, DMARC.
        let piece = |ar: AuthenticationResults<'_>| ar.to_string()[host.len()..].to_string();
        let mut results = String::new();
        if let Some(out) = &spf_mail {
            results.push_str(&piece(AuthenticationResults::new(host).with_spf_mailfrom_result(
                out,
                env.client_ip,
                env.mail_from,
                env.helo,
            )));
        }
        results.push_str(&piece(AuthenticationResults::new(host).with_spf_ehlo_result(
            &spf_helo,
            env.client_ip,
            env.helo,
        )));
        let header_from = parsed.as_ref().and_then(|m| m.from.first().cloned()).unwrap_or_default();
        if dkim.is_empty() {
            results.push_str(";\r\n\tdkim=none");
        } else {
            results.push_str(&piece(AuthenticationResults::new(host).with_dkim_results(&dkim, &header_from)));
        }
        match &dmarc {
            Some(d) if !d.domain().is_empty() => {
                results.push_str(&piece(AuthenticationResults::new(host).with_dmarc_result(d)));
            }
            _ => results.push_str(";\r\n\tdmarc=none"),
        }
        let fields = format!("Authentication-Results: {host}{results}\r\n").into_bytes();

        // The policy.
        let dmarc_result = dmarc.as_ref().map_or(DmarcResult::None, |d| d.result());
        let dmarc_domain = dmarc.as_ref().map_or("", |d| d.domain());
        let policy = dmarc.as_ref().map_or(Policy::None, |d| d.policy());
        let why;
        let action = match &dmarc_result {
            DmarcResult::Fail(_) if policy == Policy::Reject => {
                why = "dmarc-reject";
                self.settings.dmarc_reject
            }
            DmarcResult::Fail(_) if policy == Policy::Quarantine => {
                why = "dmarc-quarantine";
                self.settings.dmarc_quarantine
            }
            _ => {
                why = "none";
                InboundAction::Accept
            }
        };
        let (action, mut why) = if spf.result() == SpfResult::Fail
            && !matches!(dmarc_result, DmarcResult::Pass)
            && harder(self.settings.spf_fail, action)
        {
            (self.settings.spf_fail, "spf-fail")
        } else {
            (action, why)
        };
        let temp = matches!(dmarc_result, DmarcResult::TempError(_))
            || (spf.result() == SpfResult::TempError && !matches!(dmarc_result, DmarcResult::Pass));
        let action = match action {
            InboundAction::Reject if why == "spf-fail" => Action::Reject(
                550,
                "5.7.23",
                format!("SPF check failed: {mail_domain} does not designate {} as permitted sender", env.client_ip),
            ),
            InboundAction::Reject => Action::Reject(
                550,
                "5.7.1",
                format!("Rejected by the DMARC policy of {dmarc_domain}: message not authenticated"),
            ),
            _ if temp && self.settings.tempfail => {
                why = "temperror";
                self.tempfail_or_accept()
            }
            InboundAction::Junk => Action::Junk,
            InboundAction::Accept => Action::Accept,
        };
        tracing::info!(
            "{} verdict from=<{}> ip={} helo={} spf={} helo_spf={} dkim={} dmarc={} from_domain={} policy={} action={} reason={} ms={}",
            env.sid,
            env.mail_from,
            env.client_ip,
            env.helo,
            spf_name(spf.result()),
            spf_name(spf_helo.result()),
            dkim_summary(&dkim),
            dmarc_name(&dmarc_result),
            if dmarc_domain.is_empty() { "-" } else { dmarc_domain },
            policy_name(policy),
            action_name(&action),
            why,
            started.elapsed().as_millis()
        );
        Verdict { fields, action }
    }
}

/// True when `a` is harsher than `b`.
fn harder(a: InboundAction, b: InboundAction) -> bool {
    let rank = |x| match x {
        InboundAction::Accept => 0,
        InboundAction::Junk => 1,
        InboundAction::Reject => 2,
    };
    rank(a) > rank(b)
}

fn spf_name(r: SpfResult) -> &'static str {
    match r {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dmarc_name(r: &DmarcResult) -> &'static str {
    match r {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail(_) => "fail",
        DmarcResult::TempError(_) => "temperror",
        DmarcResult::PermError(_) => "permerror",
        DmarcResult::None => "none",
    }
}

fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::Reject => "reject",
        Policy::Quarantine => "quarantine",
        Policy::None | Policy::Unspecified => "none",
    }
}

fn action_name(a: &Action) -> String {
    match a {
        Action::Accept => "accept".into(),
        Action::Junk => "junk".into(),
        Action::Reject(code, _, _) => format!("reject-{code}"),
    }
}

/// `pass:d=example.org,fail:d=other.example` or `none`.
fn dkim_summary(outputs: &[DkimOutput<'_>]) -> String {
    if outputs.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = outputs
        .iter()
        .map(|o| {
            let r = match o.result() {
                DkimResult::Pass => "pass",
                DkimResult::Neutral(_) => "neutral",
                DkimResult::Fail(_) => "fail",
                DkimResult::PermError(_) => "permerror",
                DkimResult::TempError(_) => "temperror",
                DkimResult::None => "none",
            };
            match o.signature() {
                Some(s) => format!("{r}:d={}", s.d),
                None => r.to_string(),
            }
        })
        .collect();
    parts.join(",")
}

/// mail-auth's resolver, set up exactly as ours ([`crate::dns::hickory_resolver`]).
fn authenticator(nameservers: &[SocketAddr], timeout: Duration) -> anyhow::Result<MessageAuthenticator> {
    let resolver = crate::dns::hickory_resolver(nameservers, timeout)
        .map_err(|e| anyhow::anyhow!("resolver for inbound checks: {e}"))?;
    Ok(MessageAuthenticator(resolver))
}

/// The message without the `Authentication-Results` fields that claim one of `authserv_ids` (ours): a
/// sender must not be able to pass off its own verdict as ours (RFC 8601 §5). `None` when there
/// are none, which is nearly always. Only the header section is looked at.
pub fn strip_forged<S: AsRef<str>>(message: &[u8], authserv_ids: &[S]) -> Option<Vec<u8>> {
    let header_end = find_header_end(message);
    let mut fields: Vec<(usize, usize)> = Vec::new(); // [start, end) of each field with its folds
    let mut pos = 0;
    while pos < header_end {
        let mut end = next_line(message, pos);
        while end < header_end && matches!(message.get(end), Some(b' ' | b'\t')) {
            end = next_line(message, end);
        }
        fields.push((pos, end));
        pos = end;
    }
    let mut out: Option<Vec<u8>> = None;
    for (i, &(start, end)) in fields.iter().enumerate() {
        let forged = authserv_ids.iter().any(|id| is_ours(&message[start..end], id.as_ref()));
        if forged && out.is_none() {
            let mut v = Vec::with_capacity(message.len());
            v.extend_from_slice(&message[..start]);
            out = Some(v);
        } else if !forged {
            if let Some(v) = &mut out {
                v.extend_from_slice(&message[start..end]);
            }
        }
        if i + 1 == fields.len() {
            if let Some(v) = &mut out {
                v.extend_from_slice(&message[end..]);
            }
        }
    }
    out
}

/// Offset just after the trace fields this node put in front of the message: any leading
/// `Return-Path` fields and the first `Received` field (with its continuation lines); 0 if the
/// message does not start that way.
pub fn trace_end(message: &[u8]) -> usize {
    let header_end = find_header_end(message);
    let mut pos = 0;
    let field_end = |pos: usize| {
        let mut end = next_line(message, pos);
        while end < header_end && matches!(message.get(end), Some(b' ' | b'\t')) {
            end = next_line(message, end);
        }
        end
    };
    let named = |pos: usize, name: &[u8]| {
        message.len() >= pos + name.len() && message[pos..pos + name.len()].eq_ignore_ascii_case(name)
    };
    while pos < header_end && named(pos, b"return-path:") {
        pos = field_end(pos);
    }
    if pos < header_end && named(pos, b"received:") {
        return field_end(pos);
    }
    pos
}

/// Offset of the blank line ending the header section (or the end of the message).
fn find_header_end(m: &[u8]) -> usize {
    let mut pos = 0;
    while pos < m.len() {
        if m[pos] == b'\n' || (m[pos] == b'\r' && m.get(pos + 1) == Some(&b'\n')) {
            return pos;
        }
        pos = next_line(m, pos);
    }
    m.len()
}

fn next_line(m: &[u8], pos: usize) -> usize {
    match m[pos..].iter().position(|&b| b == b'\n') {
        Some(i) => pos + i + 1,
        None => m.len(),
    }
}

fn is_ours(field: &[u8], authserv_id: &str) -> bool {
    let Some(colon) = field.iter().position(|&b| b == b':') else { return false };
    if !field[..colon].trim_ascii().eq_ignore_ascii_case(b"authentication-results") {
        return false;
    }
    let value = String::from_utf8_lossy(&field[colon + 1..]);
    let value = strip_comments(&value);
    let id = value.split(';').next().unwrap_or("").split_whitespace().next().unwrap_or("");
    let id = id.trim_matches('"').trim_end_matches('.');
    id.eq_ignore_ascii_case(authserv_id.trim_end_matches('.'))
}

/// Removes (possibly nested) comments, as CFWS may surround the authserv-id.
fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '(' => depth += 1,
            ')' if depth > 0 => {
                depth -= 1;
                out.push(' ');
            }
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_our_authentication_results() {
        let m = b"Received: from x\r\nAuthentication-Results: mx.example.test;\r\n dkim=pass\r\n\
                  Authentication-Results: other.example; spf=pass\r\nauthentication-results: (c) MX.Example.Test 1; none\r\n\
                  Subject: hi\r\n\r\nAuthentication-Results: mx.example.test; body\r\n";
        let out = strip_forged(m, &["mx.example.test"]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Received: from x\r\nAuthentication-Results: other.example; spf=pass\r\nSubject: hi\r\n\r\n\
             Authentication-Results: mx.example.test; body\r\n"
        );
        assert!(strip_forged(b"Subject: x\r\n\r\nbody\r\n", &["mx.example.test"]).is_none());
        assert!(
            strip_forged(b"Authentication-Results: mx.example.test.evil; x\r\n\r\n", &["mx.example.test"]).is_none()
        );
        let last =
            strip_forged(b"A: b\r\nAuthentication-Results: mx.example.test; x\r\n", &["mx.example.test"]).unwrap();
        assert_eq!(last, b"A: b\r\n");
    }

    #[test]
    fn trace_end_is_after_our_received_field() {
        let m = b"Received: from a\r\n\tby b; date\r\nReceived: from c\r\nSubject: x\r\n\r\nbody\r\n";
        assert_eq!(&m[..trace_end(m)], b"Received: from a\r\n\tby b; date\r\n");
        assert_eq!(trace_end(b"Subject: x\r\n\r\nReceived: y\r\n"), 0);
        let r = b"Return-Path: <a@b>\r\nReceived: x\r\nFrom: y\r\n\r\n";
        assert_eq!(&r[..trace_end(r)], b"Return-Path: <a@b>\r\nReceived: x\r\n");
    }
}
