//! The Sender Rewriting Scheme for forwarded mail (the SRS0/SRS1 format of libsrs2 and postsrsd).
//!
//! Being built (issue 5): today `Srs::from_config` returns `None` and senders are not rewritten.

use crate::config::Config;

pub struct Srs {}

impl Srs {
    pub fn from_config(_config: &Config) -> anyhow::Result<Option<Srs>> {
        Ok(None)
    }

    /// The envelope sender for mail from `sender` forwarded outside the cluster.
    pub fn forward(&self, sender: &str) -> String {
        sender.to_string()
    }
}
