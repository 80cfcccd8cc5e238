//! Replication between primaries (issue 8; `docs/design/replication-plan.md`).
//!
//! `merge` is the reference semantics of replicated mailbox state (pure, no I/O). Other
//! submodules (the link, frames, status) are added beside it.

pub mod durable;
pub mod engine;
pub mod merge;
pub mod projection;
pub mod replica;
pub mod retention;
#[cfg(test)]
mod testkit;

// The authenticated link (slice 3): frames, the listener and dialler, the peer table.
mod fingerprint;
pub mod frame;
pub mod net;
pub mod status;

pub use fingerprint::fingerprint;
pub use status::{SyncStatus, SyncView};

/// Lowercase hex, for fingerprints in logs and `postern sync status`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
