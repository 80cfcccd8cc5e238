//! Group commit: many deliveries, one fsync. A caller asks for durability after its batch is
//! applied; at most one flush runs at a time, on tokio's blocking pool, and it covers every
//! request registered before it started. Callers that arrive during a flush wait for the next.
//!
//! sled's own `flush_async` is not used: it runs `flush` on sled's small I/O pool, and enough
//! concurrent callers fill that pool with threads waiting for writes that the same pool must
//! perform — the server stops (seen with 32 SMTP clients).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::sync::watch;

pub struct GroupCommit {
    /// Number of durability requests so far (a request's number is its ticket).
    requested: Mutex<u64>,
    /// Highest ticket known durable; bumped (or re-sent) after every flush attempt.
    durable: watch::Sender<u64>,
    flushing: AtomicBool,
}

impl GroupCommit {
    pub fn new() -> Self {
        GroupCommit { requested: Mutex::new(0), durable: watch::channel(0).0, flushing: AtomicBool::new(false) }
    }

    /// Returns once everything applied to `db` before this call is on disk.
    pub async fn sync(&self, db: &sled::Db) -> sled::Result<()> {
        let ticket = {
            let mut r = self.requested.lock().expect("commit lock");
            *r += 1;
            *r
        };
        let mut rx = self.durable.subscribe();
        loop {
            if *rx.borrow_and_update() >= ticket {
                return Ok(());
            }
            if !self.flushing.swap(true, Ordering::AcqRel) {
                // Every ticket up to here belongs to a batch applied before this flush starts.
                let covers = *self.requested.lock().expect("commit lock");
                let db = db.clone();
                let result = tokio::task::spawn_blocking(move || db.flush()).await;
                self.flushing.store(false, Ordering::Release);
                match result {
                    Ok(Ok(_)) => {
                        self.durable.send_modify(|d| *d = (*d).max(covers));
                    }
                    Ok(Err(e)) => {
                        // Wake the others: each retries (and reports its own error if it fails).
                        self.durable.send_modify(|_| {});
                        return Err(e);
                    }
                    Err(join) => {
                        self.durable.send_modify(|_| {});
                        return Err(sled::Error::Io(std::io::Error::other(join.to_string())));
                    }
                }
                continue;
            }
            if rx.changed().await.is_err() {
                return Err(sled::Error::ReportableBug("commit channel closed".into()));
            }
        }
    }
}
