//! Connection reuse: after a delivery, an open session to a destination waits here a few
//! seconds for the next message to the same destination (as Postfix's connection cache does),
//! so a burst of mail to one domain costs one TCP and TLS handshake per connection, not per
//! message. Bounded: at most `MAX_IDLE_PER_KEY` idle sessions per destination, each closed
//! after `IDLE_LIMIT` or `MAX_USES` messages.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::delivery::remote::SmtpClient;

const IDLE_LIMIT: Duration = Duration::from_secs(5);
const MAX_IDLE_PER_KEY: usize = 32;
/// Sessions are recycled now and then, so one long-lived connection does not carry every
/// message to a destination for hours (and a server's per-session limits are respected).
const MAX_USES: u32 = 1000;

pub(super) struct Pooled {
    pub client: SmtpClient,
    pub uses: u32,
}

#[derive(Default)]
pub(super) struct Pool {
    idle: Mutex<HashMap<String, Vec<(Pooled, Instant)>>>,
}

impl Pool {
    /// A session to `key` that is still fresh, if one waits.
    pub fn take(&self, key: &str) -> Option<Pooled> {
        let mut idle = self.idle.lock().expect("pool lock");
        let list = idle.get_mut(key)?;
        while let Some((pooled, since)) = list.pop() {
            if since.elapsed() < IDLE_LIMIT && pooled.client.usable() {
                return Some(pooled);
            }
            // Stale: dropping closes the socket; the server times it out like any lost client.
        }
        None
    }

    /// Offers a session back after a delivery; closes it (QUIT) if it cannot be kept.
    pub async fn put(&self, key: &str, mut pooled: Pooled) {
        pooled.uses += 1;
        if pooled.client.usable() && pooled.uses < MAX_USES {
            let mut idle = self.idle.lock().expect("pool lock");
            let list = idle.entry(key.to_string()).or_default();
            if list.len() < MAX_IDLE_PER_KEY {
                list.push((pooled, Instant::now()));
                return;
            }
        }
        pooled.client.quit().await;
    }

    /// Closes sessions idle for too long.
    pub async fn reap(&self) {
        let mut stale = Vec::new();
        {
            let mut idle = self.idle.lock().expect("pool lock");
            for list in idle.values_mut() {
                let (keep, old): (Vec<_>, Vec<_>) = list.drain(..).partition(|(_, since)| since.elapsed() < IDLE_LIMIT);
                *list = keep;
                stale.extend(old);
            }
            idle.retain(|_, list| !list.is_empty());
        }
        for (pooled, _) in stale {
            pooled.client.quit().await;
        }
    }
}
