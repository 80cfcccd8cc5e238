//! The retention pass (plan §3.5): every so often, each account's replication records older
//! than `[sync] retention` are folded into its base snapshot (`Store::prune_replicated`). A peer
//! away for longer than that is sent the snapshot when it returns (`engine::Msg::Snapshot`).
//!
//! Retention bounds the log by time, not by what peers acknowledged: a node that never comes
//! back must not make the others keep every flag change forever.

use std::sync::Arc;
use std::time::Duration;

use crate::store::{Store, PRUNE_AT_ONCE};

/// How often the pass runs: often enough that the log holds little more than `retention`, and
/// at least every second for the short retentions tests use.
pub fn interval(retention: Duration) -> Duration {
    (retention / 24).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// The HLC below which records are pruned, `retention` before `now_ms`.
pub fn horizon(now_ms: u64, retention: Duration) -> u64 {
    now_ms.saturating_sub(retention.as_millis() as u64) << 16
}

/// One pass over every account; returns how many records were pruned.
pub fn prune_all(store: &Store, retention: Duration) -> crate::store::Result<usize> {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let before = horizon(now_ms, retention);
    // Only durable records are pruned; a flag change is not flushed on its own, and with no
    // peer connected nothing else flushes it.
    store.make_durable()?;
    let mut total = 0;
    for address in store.account_addresses()? {
        let Some(acct) = store.account_id(&address)? else { continue };
        loop {
            let n = store.prune_replicated(acct, before)?;
            total += n;
            if n < PRUNE_AT_ONCE {
                break;
            }
        }
    }
    Ok(total)
}

/// Runs the pass for as long as the node runs.
pub async fn run(store: Arc<Store>, retention: Duration) {
    let every = interval(retention);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || prune_all(&s, retention)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!("sync retention pruned={n} records older than {}s", retention.as_secs()),
            Ok(Err(e)) => tracing::warn!("sync retention error={e}"),
            Err(e) => tracing::warn!("sync retention task error={e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pass_runs_often_enough_and_the_horizon_is_in_hlc_form() {
        assert_eq!(interval(Duration::from_secs(30 * 86400)), Duration::from_secs(3600));
        assert_eq!(interval(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(interval(Duration::from_secs(24 * 3600)), Duration::from_secs(3600));
        assert_eq!(interval(Duration::from_secs(2400)), Duration::from_secs(100));
        assert_eq!(horizon(10_000, Duration::from_secs(2)), 8_000 << 16);
        assert_eq!(horizon(1_000, Duration::from_secs(2)), 0);
    }
}
