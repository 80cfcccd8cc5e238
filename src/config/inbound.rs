//! The `[inbound]` table: the checks made on mail arriving on port 25 (SPF, DKIM, DMARC) and what
//! the node does with their outcome.

use std::time::Duration;

use super::load::{apply, Ctx, Entry};

/// What to do with a message whose checks came out a certain way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundAction {
    /// Deliver to the inbox as usual (the Authentication-Results field still tells).
    Accept,
    /// Deliver to the recipients' Junk mailbox.
    Junk,
    /// Refuse at the end of DATA with 550 5.7.1.
    Reject,
}

impl InboundAction {
    pub fn name(self) -> &'static str {
        match self {
            InboundAction::Accept => "accept",
            InboundAction::Junk => "junk",
            InboundAction::Reject => "reject",
        }
    }
}

/// `[inbound]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundSettings {
    /// Run SPF, DKIM and DMARC on port 25 at all.
    pub checks: bool,
    /// DMARC fails and the author domain publishes `p=reject`.
    pub dmarc_reject: InboundAction,
    /// DMARC fails and the author domain publishes `p=quarantine`.
    pub dmarc_quarantine: InboundAction,
    /// SPF for the MAIL FROM domain is `fail` (whatever DMARC says; DMARC's verdict wins if harsher).
    pub spf_fail: InboundAction,
    /// A DNS failure that leaves the verdict open (SPF temperror for the sender, DMARC temperror,
    /// the check running out of time): `true` answers 451 4.7.0, `false` accepts.
    pub tempfail: bool,
    /// Bound on the whole check of one message.
    pub timeout: Duration,
}

impl Default for InboundSettings {
    fn default() -> Self {
        InboundSettings {
            checks: true,
            dmarc_reject: InboundAction::Reject,
            dmarc_quarantine: InboundAction::Junk,
            spf_fail: InboundAction::Accept,
            tempfail: true,
            timeout: Duration::from_secs(20),
        }
    }
}

const INBOUND_KEYS: &[&str] = &["checks", "dmarc_reject", "dmarc_quarantine", "spf_fail", "tempfail", "timeout"];

pub(super) fn read_inbound(cx: &mut Ctx<'_>, e: &Entry<'_>) -> Option<InboundSettings> {
    let mut f = cx.table(e)?;
    cx.check_keys(&mut f, INBOUND_KEYS);
    let mut out = InboundSettings::default();
    let mut ok = true;
    apply(f.get("checks").map(|v| super::outbound::boolean(cx, &v)), &mut out.checks, &mut ok);
    apply(f.get("tempfail").map(|v| super::outbound::boolean(cx, &v)), &mut out.tempfail, &mut ok);
    let all = &[InboundAction::Reject, InboundAction::Junk, InboundAction::Accept][..];
    apply(f.get("dmarc_reject").map(|v| action(cx, &v, all)), &mut out.dmarc_reject, &mut ok);
    apply(f.get("spf_fail").map(|v| action(cx, &v, all)), &mut out.spf_fail, &mut ok);
    let lenient = &[InboundAction::Junk, InboundAction::Accept][..];
    apply(f.get("dmarc_quarantine").map(|v| action(cx, &v, lenient)), &mut out.dmarc_quarantine, &mut ok);
    let min = Duration::from_millis(100);
    apply(f.get("timeout").map(|v| cx.duration(&v, min, "")), &mut out.timeout, &mut ok);
    ok.then_some(out)
}

fn action(cx: &mut Ctx<'_>, e: &Entry<'_>, allowed: &[InboundAction]) -> Option<InboundAction> {
    let text = cx.string(e)?;
    let found = allowed.iter().copied().find(|a| a.name() == text);
    if found.is_none() {
        let names: Vec<String> = allowed.iter().map(|a| format!("\"{}\"", a.name())).collect();
        cx.at(e, format!("expected one of {}", names.join(", ")));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::testing::{base, load, only_error};

    #[test]
    fn defaults_and_values() {
        let c = load(&base("")).unwrap();
        assert_eq!(c.inbound, InboundSettings::default());
        let text = base(
            "[inbound]\nchecks = false\ndmarc_reject = \"junk\"\ndmarc_quarantine = \"accept\"\n\
             spf_fail = \"reject\"\ntempfail = false\ntimeout = \"5s\"\n",
        );
        let c = load(&text).unwrap().inbound;
        assert!(!c.checks && !c.tempfail);
        assert_eq!(c.dmarc_reject, InboundAction::Junk);
        assert_eq!(c.dmarc_quarantine, InboundAction::Accept);
        assert_eq!(c.spf_fail, InboundAction::Reject);
        assert_eq!(c.timeout, Duration::from_secs(5));
    }

    #[test]
    fn errors_name_the_key() {
        only_error(&base("[inbound]\ndmarc_quarantine = \"reject\"\n"), 8, "inbound.dmarc_quarantine", "\"junk\"");
        only_error(&base("[inbound]\nchecks = \"yes\"\n"), 8, "inbound.checks", "true or false");
        only_error(&base("[inbound]\nspf = \"reject\"\n"), 8, "inbound.spf", "");
    }
}
