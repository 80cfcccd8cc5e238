//! Inbound verdicts on port 25: SPF (RFC 7208), DKIM verification (RFC 6376) and DMARC (RFC 7489)
//! recorded in one Authentication-Results field (RFC 8601), and the policy applied to them.
//!
//! Being built (issue 5): today `Verifier::from_config` returns `None` and mail is accepted as is.

use std::net::IpAddr;

use crate::config::Config;

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
}

pub struct Verifier {}

impl Verifier {
    pub fn from_config(_config: &Config, _resolver: &crate::dns::Resolver) -> anyhow::Result<Option<Verifier>> {
        Ok(None)
    }

    /// Checks one complete message (trace fields included).
    pub async fn check(&self, _envelope: &Envelope<'_>, _message: &[u8]) -> Verdict {
        Verdict { fields: Vec::new(), action: Action::Accept }
    }
}
