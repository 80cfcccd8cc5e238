//! Group commit: many deliveries, one fsync. A caller asks for durability after its batch is
//! applied; at most one flush runs at a time, on tokio's blocking pool, and it covers every
//! request registered before it started. Callers that arrive during a flush wait for the next.
//!
//! sled's own `flush_async` is not used: it runs `flush` on sled's small I/O pool, and enough
//! concurrent callers fill that pool with threads waiting for writes that the same pool must
//! perform — the server stops (seen with 32 SMTP clients).
//!
//! sled's `flush` alone is not enough either: sled 0.34 makes its log "stable" with
//! `sync_file_range`, which flushes neither the drive's write cache nor file metadata, and it
//! never syncs the separate files it writes for large tree nodes (`blobs/`). So every flush is
//! followed by `barrier` below.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Makes everything sled wrote under `dir` durable: data, metadata and the device cache.
///
/// The store is opened with segments large enough that sled keeps every tree node in its log
/// file `db` (see `Store::open`), so one `fdatasync` of that file suffices. Should sled ever
/// have written node files into `blobs/` (a store made with other settings), the whole
/// directory is synced instead.
pub fn barrier(dir: &Path) -> std::io::Result<()> {
    let blobs = std::fs::read_dir(dir.join("blobs")).map(|mut d| d.next().is_some()).unwrap_or(false);
    if blobs {
        return sync_everything(dir);
    }
    std::fs::File::open(dir.join("db"))?.sync_data()
}

#[cfg(target_os = "linux")]
fn sync_everything(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let handle = std::fs::File::open(dir)?;
    // SAFETY: syncfs takes any open descriptor of the filesystem; `handle` outlives the call.
    if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Elsewhere (OpenBSD has no syncfs): fsync every file of the store and the directories.
#[cfg(not(target_os = "linux"))]
fn sync_everything(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            sync_everything(&path)?;
        } else {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

pub struct GroupCommit {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Number of durability requests so far (a request's number is its ticket).
    requested: Mutex<u64>,
    /// Highest ticket known durable; re-sent after every flush attempt to wake waiters.
    durable: watch::Sender<u64>,
    flushing: AtomicBool,
    /// The watermark of the last completed flush (see `sync`): every change record with an HLC
    /// at or below it is on disk.
    durable_hlc: AtomicU64,
}

impl GroupCommit {
    pub fn new(dir: &Path) -> Self {
        GroupCommit {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                requested: Mutex::new(0),
                durable: watch::channel(0).0,
                flushing: AtomicBool::new(false),
                durable_hlc: AtomicU64::new(0),
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The HLC below which every change record is durable; 0 until the first flush completes
    /// (after a restart nothing is assumed about what the previous run synced).
    pub fn durable_hlc(&self) -> u64 {
        self.inner.durable_hlc.load(Ordering::Acquire)
    }

    /// Records that a flush which started after `watermark()` returned `mark` has completed.
    pub fn flushed(&self, mark: u64) {
        self.inner.durable_hlc.fetch_max(mark, Ordering::AcqRel);
    }

    /// Returns once everything applied to `db` before this call is on disk.
    ///
    /// `watermark` is read just before a flush starts and must return an HLC such that every
    /// change record at or below it has been applied to `db` (the store reads its clock under the
    /// write lock, where records are both stamped and applied); after the flush it becomes
    /// `durable_hlc`, which replication uses to ship only records a crash cannot take back.
    ///
    /// Cancel-safe: the flush and its bookkeeping run to completion on the blocking pool even
    /// if the caller's future is dropped, so a cancelled caller never leaves the others waiting.
    pub async fn sync(&self, db: &sled::Db, watermark: impl Fn() -> u64) -> sled::Result<()> {
        let inner = &self.inner;
        let ticket = {
            let mut r = inner.requested.lock().expect("commit lock");
            *r += 1;
            *r
        };
        let mut rx = inner.durable.subscribe();
        loop {
            if *rx.borrow_and_update() >= ticket {
                return Ok(());
            }
            if !inner.flushing.swap(true, Ordering::AcqRel) {
                // Every ticket up to here belongs to a batch applied before this flush starts.
                let covers = *inner.requested.lock().expect("commit lock");
                let mark = watermark();
                let (db, shared) = (db.clone(), inner.clone());
                let result = tokio::task::spawn_blocking(move || {
                    let result = db.flush().and_then(|_| barrier(&shared.dir).map_err(sled::Error::Io));
                    if result.is_ok() {
                        shared.durable_hlc.fetch_max(mark, Ordering::AcqRel);
                    }
                    shared.flushing.store(false, Ordering::Release);
                    // On failure nothing advances; waking the others lets each retry and report.
                    shared.durable.send_modify(|d| {
                        if result.is_ok() {
                            *d = (*d).max(covers);
                        }
                    });
                    result
                })
                .await;
                match result {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => return Err(e),
                    Err(join) => return Err(sled::Error::Io(std::io::Error::other(join.to_string()))),
                }
            }
            if rx.changed().await.is_err() {
                return Err(sled::Error::ReportableBug("commit channel closed".into()));
            }
        }
    }
}
