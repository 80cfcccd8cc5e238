//! The replication protocol between two nodes, as a state machine without I/O (plan §3.2–3.3).
//!
//! Each side of a connection both pushes its records and receives the peer's. The receiver says
//! where to start (`Vectors`, once per connection); the pusher pages records its vector for the
//! peer does not cover and keeps at most [`WINDOW`] batches unacknowledged; the receiver applies
//! a batch, makes it durable, and only then acks it with its new vector. A batch whose origin
//! runs would leave a hole in the receiver's per-origin prefix is refused with `Gap`, and the
//! pusher restarts from the receiver's vector. Records already held are skipped, so a resend
//! after a reconnect, a `Gap` or a crash is harmless (invariant I6).
//!
//! Sockets, TLS and timers live in `net`; this module only turns events into messages, so the
//! seeded simulation (`engine_tests`) runs it with a fault-injecting network and crashing nodes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use super::merge::{Guid, Op, Record, Snapshot};
use super::projection::Report;
use crate::store::VersionVector;

/// Unacknowledged batches per connection: bounds a peer's memory to about WINDOW × the frame limit.
pub const WINDOW: usize = 8;

/// Records per batch.
pub const BATCH: usize = 500;

/// A node's replicated state, as the engine needs it. Calls block (sled); the network layer runs
/// them off the async threads.
pub trait Replica {
    /// The accounts this node holds records for.
    fn accounts(&self) -> Vec<String>;
    fn vector(&self, account: &str) -> VersionVector;
    /// Durable records not covered by `after`, in (HLC, node) order, at most `limit`. Only
    /// durable ones: a record shipped and then lost in a crash could come back as another record
    /// with the same id.
    fn page(&self, account: &str, after: &VersionVector, limit: usize) -> Vec<Record>;
    /// Those of these bodies this node does not hold.
    fn missing_blobs(&self, hashes: &[Hash]) -> Vec<Hash>;
    fn read_blob(&self, hash: &Hash) -> Option<Vec<u8>>;
    /// Keeps a body a coming batch will reference. False when the bytes do not hash to `hash`.
    fn write_blob(&mut self, hash: &Hash, bytes: &[u8]) -> bool;
    /// Applies records in order, skipping those the account's vector already covers.
    fn apply(&mut self, account: &str, records: &[Record]);
    /// Makes everything applied so far durable; called before every ack.
    fn sync(&mut self);
    /// Per mailbox this node's UIDNEXT and the messages it holds back for renumbering
    /// (`projection::Report`), for the allocator.
    fn reports(&self, account: &str) -> BTreeMap<Guid, Report>;
    /// On the allocator only: numbers what is pending here or held back anywhere
    /// (`peer_reports`), by committing a `UidAssign`. False when there was nothing to number.
    fn allocate(&mut self, account: &str, peer_reports: &[&BTreeMap<Guid, Report>]) -> bool;
    /// A digest of the account's replicated state (`merge::View::digest`): equal on two nodes
    /// that hold the same records.
    fn digest(&self, account: &str) -> [u8; 32];
    /// Anti-entropy's local repair: brings what this node shows back in line with its records.
    /// True when something had drifted (and was fixed).
    fn repair(&mut self, account: &str) -> bool;
    /// What retention pruned into this node's base snapshot (its vector): a peer that does not
    /// hold all of it can no longer be sent those records, only the snapshot.
    fn horizon(&self, account: &str) -> VersionVector;
    /// The account's base snapshot (`merge::Snapshot`), postcard-encoded.
    fn snapshot(&self, account: &str) -> Vec<u8>;
    /// Joins a peer's snapshot into this node's state and shows the result, as `apply` does
    /// for records.
    fn install(&mut self, account: &str, snapshot: &Snapshot);
}

/// The bodies records name, in order, without repeats.
pub fn bodies(records: &[Record]) -> Vec<Hash> {
    let mut out: Vec<Hash> = Vec::new();
    for r in records {
        if let Op::Append { body, .. } | Op::Move { body, .. } = &r.op {
            if !out.contains(&body.blob) {
                out.push(body.blob);
            }
        }
    }
    out
}

/// A body's BLAKE3 hash: bodies travel once, by content.
pub type Hash = [u8; 32];

/// Body bytes per `Blob` message, well inside the frame limit.
pub const BLOB_CHUNK: usize = 256 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Receiver → pusher, first on each connection: what it holds, so the pusher starts there.
    Vectors { accounts: Vec<(String, VersionVector)> },
    /// `after` is the pusher's view of the receiver's vector for the origins in `records`.
    Batch { seq: u64, account: String, after: VersionVector, records: Vec<Record> },
    /// Sent once the batch is durable; `vector` is the receiver's whole vector for the account,
    /// `reports` its per-mailbox report for the allocator.
    Ack { seq: u64, account: String, vector: VersionVector, reports: BTreeMap<Guid, Report> },
    /// The batch would leave a hole; `vector` is where to restart.
    Gap { seq: u64, account: String, vector: VersionVector },
    /// Receiver → pusher: bodies the batch waiting to be applied names and the receiver lacks.
    Fetch { hashes: Vec<Hash> },
    /// Pusher → receiver: one chunk of a body; `last` ends it. An unknown body is sent empty
    /// with `missing`, and the receiver drops the connection's batch to retry later.
    Blob { hash: Hash, offset: u64, last: bool, missing: bool, bytes: Vec<u8> },
    /// Anti-entropy (plan §3.4), pusher → receiver once the peer holds everything it was sent:
    /// the pusher's vector and digest for one account.
    Digest { account: String, vector: VersionVector, digest: [u8; 32] },
    /// The receiver's verdict on a `Digest`.
    Audited { account: String, outcome: Audit },
    /// Pusher → receiver, when the receiver's vector does not reach the pusher's horizon
    /// (retention pruned records it lacks; plan §3.5): the pusher's base snapshot in chunks of
    /// at most [`BLOB_CHUNK`], `last` ending it. It takes a place in the window and is acked
    /// like a batch; the records after the horizon follow as batches.
    Snapshot { seq: u64, account: String, offset: u64, last: bool, bytes: Vec<u8> },
}

/// The largest snapshot a receiver buffers: about 150 bytes per message ever held, so this
/// bounds an account to millions of messages and a peer's memory to a known figure.
pub const MAX_SNAPSHOT: usize = 1 << 30;

/// The outcome of comparing one account on two nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Audit {
    /// Same records, same state.
    Equal,
    /// Same records, but what the receiver showed had drifted; a local repair made it equal.
    Repaired,
    /// Same records and still different states: a bug, logged as an anomaly.
    Differ,
    /// The vectors differ (records still in flight): compared again later.
    NotComparable,
}

/// The last anti-entropy round over one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditSummary {
    pub equal: u64,
    pub repaired: u64,
    pub differ: u64,
}

#[derive(Debug, Clone, Default)]
struct Outgoing {
    /// What the peer will hold once every batch in flight is applied.
    sent: VersionVector,
    /// What the peer has acknowledged as durable.
    acked: VersionVector,
}

/// A batch received and not yet applied, waiting for bodies or for the batches before it.
#[derive(Debug, Clone)]
struct Waiting {
    seq: u64,
    account: String,
    after: VersionVector,
    records: Vec<Record>,
    /// A snapshot instead of records: joined whatever the receiver holds, so never a gap.
    snapshot: Option<Box<Snapshot>>,
}

/// A snapshot being received.
#[derive(Debug, Clone)]
struct Incoming {
    seq: u64,
    account: String,
    bytes: Vec<u8>,
}

/// Bodies fetched at a time: bounds a receiver's buffers to this many message sizes.
const FETCH_AT_ONCE: usize = 16;

/// One connection's worth of protocol state for one peer.
#[derive(Debug, Clone, Default)]
pub struct Link {
    /// `None` until the peer's `Vectors` arrive on this connection.
    out: Option<BTreeMap<String, Outgoing>>,
    in_flight: VecDeque<u64>,
    next_seq: u64,
    /// Received batches in order; the first may be waiting for bodies.
    waiting: VecDeque<Waiting>,
    /// Bodies the first waiting batch still needs, and the one being received.
    fetching: Vec<Hash>,
    receiving: Option<(Hash, Vec<u8>)>,
    snapshot: Option<Incoming>,
    /// Bodies the first waiting batch still has to fetch after those in `fetching`.
    to_fetch: Option<Vec<Hash>>,
    /// Outlives connections: what the peer has acknowledged, for lag and durable acks, and
    /// what it last reported for the allocator.
    acked: BTreeMap<String, VersionVector>,
    reports: BTreeMap<String, BTreeMap<Guid, Report>>,
    /// Accounts to compare with the peer once it holds everything sent: all of them on each
    /// connection, and again on every `audit_all` (the daily pass).
    audit_due: BTreeSet<String>,
    /// Anti-entropy results since the last `audit_all`, kept across connections.
    audits: AuditSummary,
}

/// The peer broke the protocol; the connection must be closed.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolError(pub String);

impl Link {
    /// A new connection: tell the peer where to start.
    pub fn connected(&mut self, replica: &impl Replica) -> Vec<Msg> {
        self.disconnected();
        let accounts = replica.accounts().into_iter().map(|a| (a.clone(), replica.vector(&a))).collect();
        vec![Msg::Vectors { accounts }]
    }

    /// The connection is gone; whatever was in flight is resent from the peer's vectors next time.
    pub fn disconnected(&mut self) {
        self.out = None;
        self.in_flight.clear();
        self.waiting.clear();
        self.fetching.clear();
        self.receiving = None;
        self.snapshot = None;
        self.to_fetch = None;
    }

    /// What the peer has durably acknowledged for `account`.
    pub fn acked(&self, account: &str) -> Option<&VersionVector> {
        self.acked.get(account)
    }

    /// The peer's last report for `account` (allocator input).
    pub fn peer_reports(&self, account: &str) -> Option<&BTreeMap<Guid, Report>> {
        self.reports.get(account)
    }

    /// Schedules a comparison of every account (the periodic anti-entropy pass) and starts a new
    /// summary.
    pub fn audit_all(&mut self, replica: &impl Replica) {
        self.audit_due.extend(replica.accounts());
        self.audits = AuditSummary::default();
    }

    /// What the anti-entropy comparisons found since the last `audit_all`.
    pub fn audits(&self) -> &AuditSummary {
        &self.audits
    }

    /// Batches sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn handle(&mut self, msg: Msg, replica: &mut impl Replica) -> Result<Vec<Msg>, ProtocolError> {
        Ok(match msg {
            Msg::Vectors { accounts } => {
                let mut out = BTreeMap::new();
                for (account, vector) in accounts {
                    self.acked.insert(account.clone(), vector.clone());
                    out.insert(account, Outgoing { sent: vector.clone(), acked: vector });
                }
                self.out = Some(out);
                self.audit_due.extend(replica.accounts());
                self.pump(replica)
            }
            Msg::Batch { seq, account, after, records } => {
                if self.waiting.len() > WINDOW {
                    return Err(ProtocolError("more batches than the window allows".into()));
                }
                self.waiting.push_back(Waiting { seq, account, after, records, snapshot: None });
                if self.waiting.len() == 1 {
                    self.advance(replica)
                } else {
                    Vec::new()
                }
            }
            Msg::Snapshot { seq, account, offset, last, bytes } => {
                if self.waiting.len() > WINDOW {
                    return Err(ProtocolError("more batches than the window allows".into()));
                }
                let incoming =
                    self.snapshot.get_or_insert_with(|| Incoming { seq, account: account.clone(), bytes: Vec::new() });
                if incoming.seq != seq || incoming.account != account || offset != incoming.bytes.len() as u64 {
                    return Err(ProtocolError("a snapshot chunk out of order".into()));
                }
                if incoming.bytes.len() + bytes.len() > MAX_SNAPSHOT {
                    return Err(ProtocolError("a snapshot larger than the limit".into()));
                }
                incoming.bytes.extend_from_slice(&bytes);
                if !last {
                    return Ok(Vec::new());
                }
                let Some(Incoming { bytes, .. }) = self.snapshot.take() else { return Ok(Vec::new()) };
                let snapshot: Snapshot = postcard::from_bytes(&bytes)
                    .map_err(|e| ProtocolError(format!("a snapshot that does not decode: {e}")))?;
                let after = VersionVector::default();
                let snapshot = Some(Box::new(snapshot));
                self.waiting.push_back(Waiting { seq, account, after, records: Vec::new(), snapshot });
                if self.waiting.len() == 1 {
                    self.advance(replica)
                } else {
                    Vec::new()
                }
            }
            Msg::Ack { seq, account, vector, reports } => {
                self.in_flight.retain(|&s| s != seq);
                if let Some(o) = self.out.as_mut().and_then(|out| out.get_mut(&account)) {
                    o.acked = vector.clone();
                }
                self.acked.insert(account.clone(), vector);
                self.reports.insert(account, reports);
                self.pump(replica)
            }
            Msg::Gap { seq, account, vector } => {
                self.in_flight.retain(|&s| s != seq);
                if let Some(o) = self.out.as_mut().and_then(|out| out.get_mut(&account)) {
                    o.sent = vector.clone();
                    o.acked = vector;
                }
                self.pump(replica)
            }
            Msg::Digest { account, vector, digest } => {
                let outcome = if replica.vector(&account) != vector {
                    Audit::NotComparable
                } else if replica.digest(&account) == digest {
                    Audit::Equal
                } else if replica.repair(&account) && replica.digest(&account) == digest {
                    tracing::warn!("sync anti-entropy account={account}: what this node showed had drifted; repaired");
                    Audit::Repaired
                } else {
                    tracing::error!(
                        "sync anti-entropy anomaly account={account}: same records as the peer, different state"
                    );
                    Audit::Differ
                };
                vec![Msg::Audited { account, outcome }]
            }
            Msg::Audited { account, outcome } => {
                match outcome {
                    Audit::Equal => self.audits.equal += 1,
                    Audit::Repaired => self.audits.repaired += 1,
                    Audit::Differ => self.audits.differ += 1,
                    Audit::NotComparable => {
                        self.audit_due.insert(account);
                    }
                }
                Vec::new()
            }
            Msg::Fetch { hashes } => {
                if hashes.len() > FETCH_AT_ONCE {
                    return Err(ProtocolError("too many bodies asked at once".into()));
                }
                let mut msgs = Vec::new();
                for hash in hashes {
                    let Some(bytes) = replica.read_blob(&hash) else {
                        msgs.push(Msg::Blob { hash, offset: 0, last: true, missing: true, bytes: Vec::new() });
                        continue;
                    };
                    let mut offset = 0;
                    loop {
                        let end = (offset + BLOB_CHUNK).min(bytes.len());
                        let last = end == bytes.len();
                        let chunk = bytes[offset..end].to_vec();
                        msgs.push(Msg::Blob { hash, offset: offset as u64, last, missing: false, bytes: chunk });
                        if last {
                            break;
                        }
                        offset = end;
                    }
                }
                msgs
            }
            Msg::Blob { hash, offset, last, missing, bytes } => {
                if self.fetching.first() != Some(&hash) {
                    return Err(ProtocolError("a body that was not asked for".into()));
                }
                let (_, buf) = self.receiving.get_or_insert_with(|| (hash, Vec::new()));
                if offset != buf.len() as u64 {
                    return Err(ProtocolError("a body chunk out of order".into()));
                }
                buf.extend_from_slice(&bytes);
                if !last {
                    return Ok(Vec::new());
                }
                let (_, body) = self.receiving.take().unwrap_or((hash, Vec::new()));
                // A body the pusher no longer has belongs to a message it has since expunged;
                // the batch is applied anyway and the store leaves that message unshown until
                // the expunge arrives.
                if !missing && !replica.write_blob(&hash, &body) {
                    return Err(ProtocolError("a body that does not match its hash".into()));
                }
                self.fetching.remove(0);
                if self.fetching.is_empty() {
                    self.advance(replica)
                } else {
                    Vec::new()
                }
            }
        })
    }

    /// Applies waiting batches in order until one needs bodies: checks the per-origin prefix,
    /// fetches what is missing, applies, makes durable, acks.
    fn advance(&mut self, replica: &mut impl Replica) -> Vec<Msg> {
        let mut msgs = Vec::new();
        while let Some(w) = self.waiting.front() {
            let held = replica.vector(&w.account);
            // Per origin the records must continue the prefix the receiver holds.
            if w.records.iter().any(|r| held.get(r.id.node) < w.after.get(r.id.node)) {
                msgs.push(Msg::Gap { seq: w.seq, account: w.account.clone(), vector: held });
                self.waiting.pop_front();
                self.to_fetch = None;
                continue;
            }
            if !self.fetching.is_empty() {
                return msgs;
            }
            // The batch's missing bodies are listed once, then fetched a few at a time.
            let to_fetch = self.to_fetch.get_or_insert_with(|| {
                // A snapshot's shown messages need their bodies like a batch's new ones.
                let wanted = match &w.snapshot {
                    Some(s) => s.state.view().live_bodies(),
                    None => bodies(&w.records),
                };
                let mut missing = replica.missing_blobs(&wanted);
                missing.sort();
                missing.dedup();
                missing
            });
            if !to_fetch.is_empty() {
                let next: Vec<Hash> = to_fetch.drain(..to_fetch.len().min(FETCH_AT_ONCE)).collect();
                self.fetching = next.clone();
                msgs.push(Msg::Fetch { hashes: next });
                return msgs;
            }
            let Some(w) = self.waiting.pop_front() else { break };
            self.to_fetch = None;
            match &w.snapshot {
                Some(snapshot) => replica.install(&w.account, snapshot),
                None => replica.apply(&w.account, &w.records),
            }
            replica.sync();
            let vector = replica.vector(&w.account);
            let reports = replica.reports(&w.account);
            msgs.push(Msg::Ack { seq: w.seq, account: w.account, vector, reports });
        }
        msgs
    }

    /// Sends what the peer lacks, within the window. Called after local commits, on acks, and
    /// on a timer.
    pub fn pump(&mut self, replica: &impl Replica) -> Vec<Msg> {
        let Some(out) = self.out.as_mut() else { return Vec::new() };
        let mut msgs = Vec::new();
        for account in replica.accounts() {
            // An account new on this connection is compared once the peer holds it.
            let o = out.entry(account.clone()).or_insert_with(|| {
                self.audit_due.insert(account.clone());
                Outgoing::default()
            });
            let horizon = replica.horizon(&account);
            if !o.sent.includes(&horizon) && self.in_flight.len() < WINDOW {
                // Retention pruned records the peer lacks: it gets the base snapshot, then the
                // records after it (plan §3.5).
                let seq = self.next_seq;
                self.next_seq += 1;
                self.in_flight.push_back(seq);
                let bytes = replica.snapshot(&account);
                let mut offset = 0;
                loop {
                    let end = (offset + BLOB_CHUNK).min(bytes.len());
                    let last = end == bytes.len();
                    let chunk = bytes[offset..end].to_vec();
                    msgs.push(Msg::Snapshot {
                        seq,
                        account: account.clone(),
                        offset: offset as u64,
                        last,
                        bytes: chunk,
                    });
                    if last {
                        break;
                    }
                    offset = end;
                }
                o.sent.join(&horizon);
            }
            while self.in_flight.len() < WINDOW {
                let records = replica.page(&account, &o.sent, BATCH);
                if records.is_empty() {
                    break;
                }
                let mut after = VersionVector::default();
                for r in &records {
                    let node = r.id.node;
                    if after.get(node) == 0 && o.sent.get(node) > 0 {
                        after.advance(crate::store::ChangeId { hlc: o.sent.get(node), node });
                    }
                }
                for r in &records {
                    o.sent.advance(r.id);
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                self.in_flight.push_back(seq);
                msgs.push(Msg::Batch { seq, account: account.clone(), after, records });
            }
        }
        // Anti-entropy only once the peer holds everything sent: with records in flight the
        // states would differ for no fault.
        if self.in_flight.is_empty() && !self.audit_due.is_empty() {
            for account in std::mem::take(&mut self.audit_due) {
                let vector = replica.vector(&account);
                if out.get(&account).is_some_and(|o| o.acked == vector) {
                    msgs.push(Msg::Digest { account: account.clone(), digest: replica.digest(&account), vector });
                } else {
                    self.audit_due.insert(account);
                }
            }
        }
        msgs
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
