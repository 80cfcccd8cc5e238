//! The outbound queue: messages waiting to leave the node (submissions, forwards, bounces).
//!
//! An entry names its body by hash and holds one reference to it, exactly like a mailbox entry,
//! so a message for several remote recipients (or for local and remote ones) is stored once.
//! A second index, `T | due | id`, orders entries by their next attempt: the scheduler reads
//! only its head, never the whole queue. Held entries have no `T` key.

use serde::{Deserialize, Serialize};

use super::{decode, encode, keys, PendingBlob, Result, Store};

/// What the session hands to the store for a new queue entry.
#[derive(Debug, Clone)]
pub struct NewQueued {
    /// Reverse path without brackets; "" is the null sender (bounces).
    pub from: String,
    pub recipients: Vec<QueueRecipient>,
    pub smtputf8: bool,
    /// Who or what put it there, for `queue list` and the logs: "submission alice@example.org",
    /// "forward", "bounce", "relay".
    pub origin: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRecipient {
    pub address: String,
    /// The address the sender used, when routing changed it (an alias forwarded outside):
    /// reported as Original-Recipient in DSNs (RFC 3464 §2.3.1).
    pub original: Option<String>,
    /// The last temporary failure for this recipient.
    pub last_error: Option<String>,
}

impl QueueRecipient {
    pub fn new(address: impl Into<String>) -> Self {
        QueueRecipient { address: address.into(), original: None, last_error: None }
    }

    pub fn domain(&self) -> &str {
        self.address.rsplit_once('@').map_or("", |(_, d)| d)
    }
}

/// One queued message with the recipients still to be delivered (delivered and bounced ones are
/// removed as they finish).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: u64,
    pub from: String,
    pub recipients: Vec<QueueRecipient>,
    pub blob: [u8; 32],
    pub size: u64,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub origin: String,
    /// Seconds since the epoch.
    pub created: i64,
    pub next_attempt: i64,
    pub attempts: u32,
    pub held: bool,
    /// A delay warning went to the sender already.
    pub warned: bool,
    pub last_error: Option<String>,
}

impl QueueEntry {
    pub(super) fn new(id: u64, q: NewQueued, blob: &PendingBlob) -> Self {
        let now = chrono::Utc::now().timestamp();
        QueueEntry {
            id,
            from: q.from,
            recipients: q.recipients,
            blob: blob.hash,
            size: blob.size,
            eight_bit: blob.eight_bit,
            smtputf8: q.smtputf8,
            origin: q.origin,
            created: now,
            next_attempt: now,
            attempts: 0,
            held: false,
            warned: false,
            last_error: None,
        }
    }

    /// The id as operators see it (like OpenSMTPD's envelope ids): 16 hex digits.
    pub fn display_id(&self) -> String {
        format_id(self.id)
    }
}

pub fn format_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Accepts what `format_id` prints (leading zeros optional).
pub fn parse_id(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim(), 16).ok()
}

/// Writes a new entry into a commit batch (the caller counted its body reference).
pub(super) fn insert(batch: &mut sled::Batch, entry: &QueueEntry) {
    batch.insert(&keys::queue(entry.id), encode(entry));
    if !entry.held {
        batch.insert(&keys::queue_due(entry.next_attempt, entry.id), &[]);
    }
}

impl Store {
    pub fn queue_get(&self, id: u64) -> Result<Option<QueueEntry>> {
        self.meta.get(keys::queue(id))?.map(|v| decode(&v)).transpose()
    }

    /// Entries in id (= arrival) order, `limit` at a time, starting after `after`.
    pub fn queue_list(&self, after: Option<u64>, limit: usize) -> Result<Vec<QueueEntry>> {
        let start = match after {
            Some(id) if id == u64::MAX => return Ok(Vec::new()),
            Some(id) => keys::queue(id + 1).to_vec(),
            None => keys::queue(0).to_vec(),
        };
        self.meta
            .range(start..keys::prefix_end(&[keys::QUEUE]))
            .values()
            .take(limit)
            .map(|v| v.map_err(Into::into).and_then(|v| decode(&v)))
            .collect()
    }

    /// Number of entries (a scan of the keys: for commands and monitors, not hot paths).
    pub fn queue_len(&self) -> Result<usize> {
        let mut n = 0;
        for k in self.meta.scan_prefix([keys::QUEUE]).keys() {
            k?;
            n += 1;
        }
        Ok(n)
    }

    /// Up to `limit` entries due at `now` or earlier, earliest first, leaving out those `skip`
    /// says are taken (being delivered right now).
    pub fn queue_due(&self, now: i64, limit: usize, skip: impl Fn(u64) -> bool) -> Result<Vec<QueueEntry>> {
        let mut out = Vec::new();
        let end = keys::queue_due(now.saturating_add(1), 0);
        for key in self.meta.range(keys::queue_due(0, 0)..end).keys() {
            let (_, id) = keys::queue_due_parts(&key?);
            if skip(id) {
                continue;
            }
            if let Some(entry) = self.queue_get(id)? {
                out.push(entry);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// When the earliest entry that `skip` does not exclude is due, if any is.
    pub fn queue_next_due(&self, skip: impl Fn(u64) -> bool) -> Result<Option<i64>> {
        for key in self.meta.scan_prefix([keys::QUEUE_DUE]).keys() {
            let (due, id) = keys::queue_due_parts(&key?);
            if !skip(id) {
                return Ok(Some(due));
            }
        }
        Ok(None)
    }

    /// Writes back an entry after a delivery attempt. An entry without recipients left is
    /// removed (and its body reference released). Returns false when the entry was removed
    /// meanwhile (by `queue remove`): it stays removed. A hold placed meanwhile is kept.
    pub fn queue_update(&self, entry: &QueueEntry) -> Result<bool> {
        let _guard = self.write.lock().expect("store lock");
        let Some(current) = self.queue_get(entry.id)? else { return Ok(false) };
        let mut batch = sled::Batch::default();
        batch.remove(&keys::queue_due(current.next_attempt, current.id));
        let mut dead = Vec::new();
        if entry.recipients.is_empty() {
            batch.remove(&keys::queue(entry.id));
            self.release_blobs(&mut batch, &[entry.blob], &mut dead)?;
        } else {
            let mut entry = entry.clone();
            entry.held = current.held;
            insert(&mut batch, &entry);
        }
        self.apply(batch)?;
        drop(_guard);
        self.drop_dead_blobs(&dead)?;
        Ok(true)
    }

    /// Removes an entry whatever its state; returns it (for a bounce) if it existed.
    pub fn queue_remove(&self, id: u64) -> Result<Option<QueueEntry>> {
        let _guard = self.write.lock().expect("store lock");
        let Some(entry) = self.queue_get(id)? else { return Ok(None) };
        let mut batch = sled::Batch::default();
        batch.remove(&keys::queue_due(entry.next_attempt, id));
        batch.remove(&keys::queue(id));
        let mut dead = Vec::new();
        self.release_blobs(&mut batch, &[entry.blob], &mut dead)?;
        self.apply(batch)?;
        drop(_guard);
        self.drop_dead_blobs(&dead)?;
        Ok(Some(entry))
    }

    /// Holds (no delivery attempts until released) or releases an entry; a released entry is
    /// due at `now`. Returns the entry as changed, `None` if there is no such entry.
    pub fn queue_set_held(&self, id: u64, held: bool, now: i64) -> Result<Option<QueueEntry>> {
        self.queue_modify(id, |e| {
            if e.held != held {
                e.held = held;
                if !held {
                    e.next_attempt = now;
                }
            }
        })
    }

    /// Makes an entry due at `now` (a held entry stays held).
    pub fn queue_schedule_now(&self, id: u64, now: i64) -> Result<Option<QueueEntry>> {
        self.queue_modify(id, |e| e.next_attempt = e.next_attempt.min(now))
    }

    fn queue_modify(&self, id: u64, change: impl FnOnce(&mut QueueEntry)) -> Result<Option<QueueEntry>> {
        let _guard = self.write.lock().expect("store lock");
        let Some(mut entry) = self.queue_get(id)? else { return Ok(None) };
        let mut batch = sled::Batch::default();
        batch.remove(&keys::queue_due(entry.next_attempt, id));
        change(&mut entry);
        insert(&mut batch, &entry);
        self.apply(batch)?;
        Ok(Some(entry))
    }
}
