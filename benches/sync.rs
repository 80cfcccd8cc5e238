//! Replication benchmark (issue 8), in process: two stores in temp dirs, A filled directly
//! through the `postern::store` API, B empty, connected by a pair of `sync::engine::Link`s over
//! `StoreReplica`s. Every message between them goes through `sync::frame::encode`/`decode`, as
//! on a real link, so the bytes counted are the bytes a socket would carry (without TLS).
//! - initial sync: B catches up with MESSAGES (default 100,000) messages of SIZE bytes (default
//!   10,240) in A's INBOX; prints messages/s, seconds, bytes moved, the time spent in each
//!   replica call (page, bodies, apply = write R + reconcile, fsync) and the peak RSS; then
//!   checks B's INBOX: the same UIDs as A, and a few bodies byte for byte;
//! - steady state: one thread delivers to A at RATE messages/s (default 200) for SECS seconds
//!   (default 20), each made durable before it counts as delivered (as SMTP's 250 waits), while
//!   the link pumps A → B every 200 ms as `sync::net` does; the lag of a message is from its
//!   delivery until B's INBOX shows it. Prints p50/p99/max;
//! - snapshot catch-up (BENCH_SNAPSHOT=0 skips it): A prunes its whole log into its base
//!   snapshot (retention), and a third, empty store C catches up from the snapshot and A's
//!   bodies; the same figures as the initial sync, prefixed `snapshot_sync`.
//!
//! The network layer (TLS, the blocking pool) is not measured here. Run: `cargo bench --bench
//! sync`; sizes from BENCH_MESSAGES, BENCH_SIZE, BENCH_RATE, BENCH_SECS, plus BENCH_DIR and
//! BENCH_KEEP=1. A quick run: `BENCH_MESSAGES=10000 BENCH_SECS=5 cargo bench --bench sync`.
//! See docs/benchmarks.md.

#[allow(dead_code)]
mod common;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use common::*;
use postern::store::{DeliveryTarget, Flags, MessageMeta, Store, VersionVector};
use postern::sync::engine::{Hash, Link, Msg, Replica};
use postern::sync::frame::{self, Frame};
use postern::sync::merge::{Guid, Record, Snapshot};
use postern::sync::projection::Report;
use postern::sync::replica::StoreReplica;

const USER: &str = "alice@example.test";
/// How often `sync::net` pumps the dialled connection.
const PUMP_INTERVAL: Duration = Duration::from_millis(200);

struct Opts {
    messages: u32,
    size: usize,
    rate: u32,
    secs: u64,
    dir: Option<PathBuf>,
    keep: bool,
    snapshot: bool,
}

fn parse_opts() -> Result<Option<Opts>> {
    Ok(Some(Opts {
        messages: env_or("BENCH_MESSAGES", 100_000)?,
        size: env_or("BENCH_SIZE", 10_240)?,
        rate: env_or::<u32>("BENCH_RATE", 200)?.max(1),
        secs: env_or("BENCH_SECS", 20)?,
        dir: std::env::var_os("BENCH_DIR").filter(|d| !d.is_empty()).map(PathBuf::from),
        keep: env_flag("BENCH_KEEP"),
        snapshot: env_or::<u32>("BENCH_SNAPSHOT", 1)? != 0,
    }))
}

// ---------------------------------------------------------------------------------------------
// Filling A

/// A unique message of about `size` bytes (distinct bodies: the store keeps one copy per hash).
fn message(n: u32, size: usize) -> Vec<u8> {
    let head = format!(
        "From: Sender {n} <sender{n}@peer.test>\r\nTo: Alice <{USER}>\r\nSubject: Sync benchmark {n}\r\n\
         Date: Sat, 21 Nov 2026 10:{:02}:{:02} +0000\r\nMessage-ID: <sync{n}@peer.test>\r\n\r\n",
        (n / 60) % 60,
        n % 60
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&payload(
        size.saturating_sub(out.len()).max(2),
        b"The quick brown fox jumps over the lazy dog. ",
    ));
    out
}

fn open(dir: &Path, node: &str) -> Result<Arc<Store>> {
    Ok(Arc::new(Store::open(dir, node, 64 << 20).with_context(|| format!("opening {}", dir.display()))?))
}

/// `count` messages into A's INBOX, 1,000 per sled batch; every 10th is \Seen.
fn fill(store: &Store, count: u32, size: usize) -> Result<()> {
    let acct = store.ensure_account(USER)?;
    let mbox = store.mailbox_id(acct, "INBOX")?.ok_or_else(|| anyhow!("no INBOX"))?;
    let mut n = 0;
    while n < count {
        let end = (n + 1000).min(count);
        let mut items = Vec::with_capacity((end - n) as usize);
        for i in n..end {
            let mut w = store.blob_writer()?;
            w.write(&message(i + 1, size))?;
            let flags = if i % 10 == 0 { Flags::SEEN } else { Flags::default() };
            let meta =
                MessageMeta { flags, keywords: &[], internal_date: 1_795_000_000 + i64::from(i), tz_offset_minutes: 0 };
            items.push((w.finish()?, meta));
        }
        store.append_messages(acct, mbox, items)?;
        n = end;
    }
    store.sync_blocking()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A replica that times each call

#[derive(Default, Clone)]
struct Phases(BTreeMap<&'static str, (Duration, u64)>);

impl Phases {
    fn add(&mut self, name: &'static str, d: Duration) {
        let e = self.0.entry(name).or_default();
        e.0 += d;
        e.1 += 1;
    }
}

/// `StoreReplica` with the time of every call summed per method.
struct Timed {
    inner: StoreReplica,
    phases: Mutex<Phases>,
}

impl Timed {
    fn new(store: Arc<Store>) -> Self {
        Timed { inner: StoreReplica::new(store), phases: Mutex::default() }
    }

    fn time<T>(&self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.phases.lock().expect("phases").add(name, start.elapsed());
        out
    }

    fn take(&self) -> Phases {
        std::mem::take(&mut self.phases.lock().expect("phases"))
    }
}

impl Replica for Timed {
    fn accounts(&self) -> Vec<String> {
        self.time("accounts", || self.inner.accounts())
    }
    fn vector(&self, account: &str) -> VersionVector {
        self.time("vector", || self.inner.vector(account))
    }
    fn page(&self, account: &str, after: &VersionVector, limit: usize) -> Vec<Record> {
        self.time("page", || self.inner.page(account, after, limit))
    }
    fn missing_blobs(&self, hashes: &[Hash]) -> Vec<Hash> {
        self.time("missing_blobs", || self.inner.missing_blobs(hashes))
    }
    fn read_blob(&self, hash: &Hash) -> Option<Vec<u8>> {
        self.time("read_blob", || self.inner.read_blob(hash))
    }
    fn write_blob(&mut self, hash: &Hash, bytes: &[u8]) -> bool {
        let start = Instant::now();
        let ok = self.inner.write_blob(hash, bytes);
        self.phases.get_mut().expect("phases").add("write_blob", start.elapsed());
        ok
    }
    fn apply(&mut self, account: &str, records: &[Record]) {
        let start = Instant::now();
        self.inner.apply(account, records);
        self.phases.get_mut().expect("phases").add("apply", start.elapsed());
    }
    fn sync(&mut self) {
        let start = Instant::now();
        self.inner.sync();
        self.phases.get_mut().expect("phases").add("sync", start.elapsed());
    }
    fn reports(&self, account: &str) -> BTreeMap<Guid, Report> {
        self.time("reports", || self.inner.reports(account))
    }
    fn allocate(&mut self, account: &str, peer_reports: &[&BTreeMap<Guid, Report>]) -> bool {
        let start = Instant::now();
        let ok = self.inner.allocate(account, peer_reports);
        self.phases.get_mut().expect("phases").add("allocate", start.elapsed());
        ok
    }
    fn digest(&self, account: &str) -> [u8; 32] {
        self.time("digest", || self.inner.digest(account))
    }
    fn repair(&mut self, account: &str) -> bool {
        let start = Instant::now();
        let ok = self.inner.repair(account);
        self.phases.get_mut().expect("phases").add("repair", start.elapsed());
        ok
    }
    fn horizon(&self, account: &str) -> VersionVector {
        self.time("horizon", || self.inner.horizon(account))
    }
    fn snapshot(&self, account: &str) -> Vec<u8> {
        self.time("snapshot", || self.inner.snapshot(account))
    }
    fn install(&mut self, account: &str, snapshot: &Snapshot) {
        let start = Instant::now();
        self.inner.install(account, snapshot);
        self.phases.get_mut().expect("phases").add("install", start.elapsed());
    }
}

// ---------------------------------------------------------------------------------------------
// The link, in memory

/// One direction's traffic: A's link pushes, B's link receives (the dialled connection in
/// `sync::net`); both ends of the one connection are modelled, as `net` runs one per direction.
struct Wire {
    la: Link,
    lb: Link,
    to_a: VecDeque<Msg>,
    to_b: VecDeque<Msg>,
    bytes: u64,
    frames: u64,
    largest: usize,
}

impl Wire {
    /// B says where to start (it is the receiving end of the connection A dialled).
    fn connect(b: &Timed) -> Wire {
        let mut lb = Link::default();
        let to_a = lb.connected(b).into();
        Wire { la: Link::default(), lb, to_a, to_b: VecDeque::new(), bytes: 0, frames: 0, largest: 0 }
    }

    /// Through the frame codec, as a socket would carry it.
    fn carry(&mut self, msg: Msg) -> Result<Msg> {
        let bytes = frame::encode(&Frame::Sync(msg));
        if bytes.len() - 4 > frame::MAX_FRAME {
            bail!("a frame of {} bytes is over the limit", bytes.len());
        }
        self.bytes += bytes.len() as u64;
        self.frames += 1;
        self.largest = self.largest.max(bytes.len());
        match frame::decode(&bytes[4..]) {
            Ok(Frame::Sync(m)) => Ok(m),
            _ => bail!("a frame did not decode"),
        }
    }

    /// Delivers messages both ways until none is left; with `pump`, A first pages what B lacks
    /// (after flushing, as `net`'s timer does). A is the allocator (first in `[sync] order`).
    /// `applied` runs after each batch B acknowledges.
    fn run(&mut self, a: &mut Timed, b: &mut Timed, pump: bool, applied: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        if pump {
            a.inner.store().make_durable()?;
            let msgs = self.la.pump(a);
            self.to_b.extend(msgs);
        }
        loop {
            if let Some(m) = self.to_b.pop_front() {
                let m = self.carry(m)?;
                let out = self.lb.handle(m, b).map_err(|e| anyhow!("B: protocol error {}", e.0))?;
                let acked = out.iter().any(|m| matches!(m, Msg::Ack { .. }));
                self.to_a.extend(out);
                if acked {
                    applied()?;
                }
                continue;
            }
            if let Some(m) = self.to_a.pop_front() {
                let m = self.carry(m)?;
                let ack = match &m {
                    Msg::Ack { account, .. } => Some(account.clone()),
                    _ => None,
                };
                let out = self.la.handle(m, a).map_err(|e| anyhow!("A: protocol error {}", e.0))?;
                self.to_b.extend(out);
                // As `net::on_sync`: the allocator looks only when the peer reports held messages.
                if let Some(account) = ack {
                    if let Some(r) = self.la.peer_reports(&account).cloned() {
                        if r.values().any(|x| !x.held.is_empty()) {
                            a.allocate(&account, &[&r]);
                        }
                    }
                }
                continue;
            }
            return Ok(());
        }
    }
}

fn inbox(store: &Store) -> Result<(u32, u32)> {
    let acct = store.account_id(USER)?.ok_or_else(|| anyhow!("no account"))?;
    let mbox = store.mailbox_id(acct, "INBOX")?.ok_or_else(|| anyhow!("no INBOX"))?;
    Ok((acct, mbox))
}

fn print_phases(out: &mut Vec<String>, side: &str, p: &Phases) {
    for (name, (d, n)) in &p.0 {
        if d.as_millis() == 0 {
            continue;
        }
        out.push(format!("  {side}.{name}: calls={n} total_s={:.2}", d.as_secs_f64()));
    }
}

// ---------------------------------------------------------------------------------------------
// Initial sync

/// B catches up with A from nothing; `label` prefixes the figures (`initial_sync`, or
/// `snapshot_sync` when A has pruned its log and B gets A's snapshot).
fn initial(a: &mut Timed, b: &mut Timed, o: &Opts, label: &str, out: &mut Vec<String>) -> Result<Wire> {
    let mut wire = Wire::connect(b);
    let start = Instant::now();
    let cpu0 = proc_cpu(std::process::id());
    reset_peak_rss(std::process::id());
    // The pushing side answers B's `Vectors` with its first batches, then acks drive it; a
    // timer pump picks up whatever a quiet moment leaves.
    wire.run(a, b, false, &mut || Ok(()))?;
    loop {
        let before = wire.frames;
        wire.run(a, b, true, &mut || Ok(()))?;
        if wire.frames == before {
            break;
        }
    }
    let took = start.elapsed();
    let cpu = proc_cpu(std::process::id()).zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    let (aa, am) = inbox(a.inner.store())?;
    let (ba, bm) = inbox(b.inner.store())?;
    let uids_a = a.inner.store().uids(aa, am)?;
    let uids_b = b.inner.store().uids(ba, bm)?;
    out.push(format!("{label}_messages={}", uids_b.len()));
    out.push(format!("{label}_s={:.1}", took.as_secs_f64()));
    out.push(format!("{label}_msgs_per_s={}", rate(uids_b.len() as u64, took)));
    out.push(format!("{label}_bytes={} frames={} largest_frame={}", wire.bytes, wire.frames, wire.largest));
    out.push(format!("{label}_mib_per_s={:.1}", wire.bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()));
    out.push(format!("{label}_cpu_s={}", cpu.map(|c| format!("{:.1}", c.as_secs_f64())).unwrap_or("n/a".into())));
    out.push(format!("{label}_peak_rss_mib={}", mib(proc_status_kib(std::process::id(), "VmHWM"))));
    out.push(format!("loadavg_1m_after_initial={}", loadavg()));
    out.push(format!("{label}_time_per_replica_call:"));
    print_phases(out, "A", &a.take());
    print_phases(out, "B", &b.take());
    // B shows A's INBOX: the same UIDs, the same bodies.
    if uids_a.len() < o.messages as usize {
        bail!("A's INBOX has {} messages, not {}", uids_a.len(), o.messages);
    }
    if uids_a != uids_b {
        bail!("B's INBOX UIDs differ from A's ({} vs {} messages)", uids_b.len(), uids_a.len());
    }
    let (ea, eb) = (a.inner.store().entries(aa, am)?, b.inner.store().entries(ba, bm)?);
    let (ea, eb): (HashMap<u32, _>, HashMap<u32, _>) = (ea.into_iter().collect(), eb.into_iter().collect());
    let n = uids_a.len();
    for i in [0, 1, n / 3, n / 2, n - 2, n - 1] {
        let uid = uids_a[i.min(n - 1)];
        let (x, y) = (&ea[&uid], &eb[&uid]);
        let bx = a.inner.store().read_blob_bytes(&x.blob)?.ok_or_else(|| anyhow!("A lacks body {uid}"))?;
        let by = b.inner.store().read_blob_bytes(&y.blob)?.ok_or_else(|| anyhow!("B lacks body {uid}"))?;
        if bx != by || x.flags != y.flags || x.internal_date != y.internal_date {
            bail!("UID {uid} differs between A and B");
        }
    }
    out.push(format!("{label}_checked=uids_equal,6_bodies_equal"));
    Ok(wire)
}

// ---------------------------------------------------------------------------------------------
// Steady state

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn steady(a: &mut Timed, b: &mut Timed, wire: &mut Wire, o: &Opts, out: &mut Vec<String>) -> Result<()> {
    let store_a = a.inner.store().clone();
    let (ba, bm) = inbox(b.inner.store())?;
    let delivered: Arc<Mutex<HashMap<u32, Instant>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let total = o.rate as u64 * o.secs;
    let interval = Duration::from_secs_f64(1.0 / f64::from(o.rate));
    let deliverer = {
        let (store, delivered, done) = (store_a.clone(), delivered.clone(), done.clone());
        let size = o.size;
        let base = o.messages;
        std::thread::spawn(move || -> Result<Duration> {
            let start = Instant::now();
            for i in 0..total {
                let due = start + interval * i as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let mut w = store.blob_writer()?;
                w.write(&message(base + 1 + i as u32, size))?;
                let target = DeliveryTarget::inbox(USER);
                let stored = store.commit_message(w.finish()?, &[target], Flags::default(), &[], 1_795_100_000, 0)?;
                // SMTP answers 250 once the message is durable.
                store.sync_blocking()?;
                delivered.lock().expect("delivered").insert(stored[0].uid, Instant::now());
            }
            done.store(true, Ordering::SeqCst);
            Ok(start.elapsed())
        })
    };
    let mut seen: HashMap<u32, Instant> = HashMap::new();
    let mut known: std::collections::HashSet<u32> = b.inner.store().uids(ba, bm)?.into_iter().collect();
    let mut pumps = 0u64;
    let mut batches = 0u64;
    let mut pump_time = Duration::ZERO;
    let mut worst_pump = Duration::ZERO;
    let start = Instant::now();
    let bytes0 = wire.bytes;
    loop {
        let tick = Instant::now();
        let finished = done.load(Ordering::SeqCst);
        let store_b = b.inner.store().clone();
        let mut observe = || -> Result<()> {
            let now = Instant::now();
            batches += 1;
            for uid in store_b.uids(ba, bm)? {
                if known.insert(uid) {
                    seen.insert(uid, now);
                }
            }
            Ok(())
        };
        wire.run(a, b, true, &mut observe)?;
        let now = Instant::now();
        let took = now - tick;
        pumps += 1;
        pump_time += took;
        worst_pump = worst_pump.max(took);
        if finished && seen.len() as u64 >= total {
            break;
        }
        if finished && start.elapsed() > Duration::from_secs(o.secs + 120) {
            bail!("B shows {} of {total} messages two minutes after the last delivery", seen.len());
        }
        if let Some(wait) = PUMP_INTERVAL.checked_sub(tick.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let deliver_s = deliverer.join().map_err(|_| anyhow!("the delivery thread panicked"))??;
    let delivered = delivered.lock().expect("delivered");
    let mut lags: Vec<Duration> = Vec::new();
    for (uid, at) in delivered.iter() {
        let shown = seen.get(uid).ok_or_else(|| anyhow!("UID {uid} delivered to A never showed on B"))?;
        lags.push(shown.saturating_duration_since(*at));
    }
    lags.sort();
    out.push(format!(
        "steady_deliveries={} target_rate={} achieved_rate={}",
        delivered.len(),
        o.rate,
        rate(delivered.len() as u64, deliver_s)
    ));
    out.push(format!(
        "steady_lag_ms p50={} p99={} max={}",
        percentile(&lags, 0.5).as_millis(),
        percentile(&lags, 0.99).as_millis(),
        lags.last().copied().unwrap_or_default().as_millis()
    ));
    out.push(format!(
        "steady_pumps={pumps} batches_applied={batches} pump_mean_ms={:.1} pump_max_ms={} bytes={}",
        pump_time.as_secs_f64() * 1000.0 / pumps.max(1) as f64,
        worst_pump.as_millis(),
        wire.bytes - bytes0
    ));
    out.push(format!("loadavg_1m_after_steady={}", loadavg()));
    out.push("steady_time_per_replica_call:".into());
    print_phases(out, "A", &a.take());
    print_phases(out, "B", &b.take());
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn bench(o: &Opts, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let start = Instant::now();
    let store_a = open(&dir.join("a"), "node-a")?;
    fill(&store_a, o.messages, o.size).context("filling A")?;
    out.push(format!("populate_s={:.1}", start.elapsed().as_secs_f64()));
    out.push(format!("a_store_mib={:.0}", dir_bytes(&dir.join("a")) as f64 / (1 << 20) as f64));
    out.push(format!("loadavg_1m_before_sync={}", loadavg()));
    eprintln!("# A filled in {:.1} s", start.elapsed().as_secs_f64());
    let mut a = Timed::new(store_a);
    let mut b = Timed::new(open(&dir.join("b"), "node-b")?);
    let mut wire = initial(&mut a, &mut b, o, "initial_sync", out)?;
    out.push(format!("b_store_mib={:.0}", dir_bytes(&dir.join("b")) as f64 / (1 << 20) as f64));
    eprintln!("# initial sync done");
    if o.secs > 0 {
        steady(&mut a, &mut b, &mut wire, o, out)?;
    }
    if o.snapshot {
        // Retention: A folds its whole log into its base snapshot; a new node C is then sent
        // the snapshot (and fetches every body) instead of the records.
        a.inner.store().sync_blocking()?;
        let start = Instant::now();
        let acct = a.inner.store().account_id(USER)?.ok_or_else(|| anyhow!("no account on A"))?;
        let mut pruned = 0;
        loop {
            let n = a.inner.store().prune_replicated(acct, u64::MAX)?;
            pruned += n;
            if n == 0 {
                break;
            }
        }
        out.push(format!("prune_records={pruned} prune_s={:.1}", start.elapsed().as_secs_f64()));
        let snapshot = a.inner.snapshot(USER).len();
        out.push(format!("snapshot_bytes={snapshot} per_message={}", snapshot / o.messages.max(1) as usize));
        let mut c = Timed::new(open(&dir.join("c"), "node-c")?);
        initial(&mut a, &mut c, o, "snapshot_sync", out)?;
        eprintln!("# snapshot sync done");
    }
    Ok(())
}

async fn run(o: Opts) -> Result<()> {
    let base = bench_base(&o.dir, "postern-sync-bench-")?;
    let mut out = vec![
        "bench=sync".to_string(),
        format!("date={}", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ")),
        format!("host_cpu={}", cpu_model()),
        format!("loadavg_1m_at_start={}", loadavg()),
        format!("messages={} size={} rate={} secs={}", o.messages, o.size, o.rate, o.secs),
    ];
    let dir = base.path().to_path_buf();
    let (result, out) = tokio::task::spawn_blocking(move || {
        let r = bench(&o, &dir, &mut out);
        (r.map(|_| o), out)
    })
    .await?;
    match result {
        Ok(o) => finish("postern sync benchmark", &out, base, o.keep, "both stores", None),
        Err(e) => finish("postern sync benchmark", &out, base, false, "both stores", Some(e)),
    }
}

fn main() -> ExitCode {
    // The malloc settings `postern` itself runs with (server::tune_allocator), so the peak RSS
    // figures are the server's rather than glibc defaults'.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
    bench_main(parse_opts, |o| Duration::from_secs(3600 + o.secs), run)
}
