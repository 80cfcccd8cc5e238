//! DKIM signing of mail that leaves the cluster (RFC 6376, RFC 8463).
//!
//! Being built (issue 5): today `Signer::from_config` finds no keys and nothing is signed.

use crate::config::Config;

/// The signing table: keys by domain, loaded once at start.
pub struct Signer {}

impl Signer {
    /// `None` when the config has no `[[dkim]]` keys.
    pub fn from_config(_config: &Config) -> anyhow::Result<Option<Signer>> {
        Ok(None)
    }

    /// `DKIM-Signature:` fields (complete lines, CRLF) for `message`, one per key of its From
    /// domain; empty when no key applies.
    pub fn sign(&self, _message: &[u8]) -> Vec<u8> {
        Vec::new()
    }
}
