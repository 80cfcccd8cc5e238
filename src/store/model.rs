//! Values stored in the `meta` tree (postcard-encoded). Field order is part of the on-disk format,
//! and the records cannot grow: postcard is not self-describing, so a record written before a
//! field was appended fails to decode (`DeserializeUnexpectedEnd`), `#[serde(default)]` or not,
//! and inside an enum, a tuple or a `Vec` the new field takes the next value's bytes
//! (`tests::postcard_does_not_default_appended_fields`). New per-record data goes into a separate
//! key (as the mailbox GUIDs do), or a migration at open rewrites every record; new `Change`
//! variants may be appended at the end of the enum, since old records never name them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// IMAP system flags as a bit set; keywords are kept as strings beside it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flags(pub u8);

impl Flags {
    pub const SEEN: Flags = Flags(1);
    pub const ANSWERED: Flags = Flags(2);
    pub const FLAGGED: Flags = Flags(4);
    pub const DELETED: Flags = Flags(8);
    pub const DRAFT: Flags = Flags(16);

    pub const ALL: [(Flags, &'static str); 5] = [
        (Flags::SEEN, "\\Seen"),
        (Flags::ANSWERED, "\\Answered"),
        (Flags::FLAGGED, "\\Flagged"),
        (Flags::DELETED, "\\Deleted"),
        (Flags::DRAFT, "\\Draft"),
    ];

    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    pub fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
    pub fn minus(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }
    /// Parses a system flag name, case-insensitively (RFC 3501 §2.3.2).
    pub fn from_name(name: &str) -> Option<Flags> {
        Flags::ALL.iter().find(|(_, n)| n.eq_ignore_ascii_case(name)).map(|(f, _)| *f)
    }
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Flags::ALL.into_iter().filter(move |(f, _)| self.contains(*f)).map(|(_, n)| n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpecialUse {
    Sent,
    Drafts,
    Junk,
    Trash,
    Archive,
    All,
    Flagged,
}

impl SpecialUse {
    /// RFC 6154 attribute name.
    pub fn attribute(self) -> &'static str {
        match self {
            SpecialUse::Sent => "\\Sent",
            SpecialUse::Drafts => "\\Drafts",
            SpecialUse::Junk => "\\Junk",
            SpecialUse::Trash => "\\Trash",
            SpecialUse::Archive => "\\Archive",
            SpecialUse::All => "\\All",
            SpecialUse::Flagged => "\\Flagged",
        }
    }
}

/// The mailboxes every account gets on first use, with their RFC 6154 attributes.
pub const DEFAULT_MAILBOXES: [(&str, Option<SpecialUse>); 6] = [
    ("INBOX", None),
    ("Sent", Some(SpecialUse::Sent)),
    ("Drafts", Some(SpecialUse::Drafts)),
    ("Junk", Some(SpecialUse::Junk)),
    ("Trash", Some(SpecialUse::Trash)),
    ("Archive", Some(SpecialUse::Archive)),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub address: String,
    pub next_mailbox_id: u32,
    /// Account-wide modification counter: every mutation takes the next value, so each
    /// mailbox's HIGHESTMODSEQ strictly increases and CONDSTORE values compare across mailboxes.
    pub modseq: u64,
    /// The last UIDVALIDITY handed out, so a deleted and recreated mailbox never reuses one.
    pub last_uidvalidity: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mailbox {
    pub name: String,
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub highest_modseq: u64,
    pub special_use: Option<SpecialUse>,
    pub subscribed: bool,
    pub messages: u32,
    pub unseen: u32,
    pub size: u64,
}

/// One message in one mailbox. The body lives once in the blob store, shared by every entry
/// (in any mailbox of any account) that has the same content hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub blob: [u8; 32],
    pub size: u64,
    /// Seconds since the Unix epoch (UTC) plus the sender's offset in minutes, for INTERNALDATE.
    pub internal_date: i64,
    pub tz_offset_minutes: i16,
    pub flags: Flags,
    pub keywords: Vec<String>,
    pub modseq: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BlobMeta {
    pub id: u64,
    pub size: u64,
    pub chunks: u32,
    /// Number of entries that reference this body; at zero the body is deleted.
    pub refs: u64,
}

/// A cluster-unique change id: a hybrid logical clock value and the node that made the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChangeId {
    pub hlc: u64,
    pub node: u32,
}

/// Per origin node, the highest HLC of that node's change records held for an account. Records of
/// one origin are stored (and later shipped) in HLC order, so the vector says exactly which
/// records a store has: `covers(id)` for every record it holds, and for none it lacks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(pub BTreeMap<u32, u64>);

impl VersionVector {
    /// The highest HLC held from `node`; 0 (nothing) for a node never heard of.
    pub fn get(&self, node: u32) -> u64 {
        self.0.get(&node).copied().unwrap_or(0)
    }

    pub fn covers(&self, id: ChangeId) -> bool {
        id.hlc <= self.get(id.node)
    }

    /// Counts `id` as held; never moves an origin backwards.
    pub fn advance(&mut self, id: ChangeId) {
        let hlc = self.0.entry(id.node).or_insert(0);
        *hlc = (*hlc).max(id.hlc);
    }

    /// (node, hlc) in node order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.0.iter().map(|(n, h)| (*n, *h))
    }

    /// Holds what either holds (per origin the larger prefix).
    pub fn join(&mut self, other: &VersionVector) {
        for (node, hlc) in other.iter() {
            self.advance(ChangeId { hlc, node });
        }
    }

    /// Whether every record `other` holds is held here.
    pub fn includes(&self, other: &VersionVector) -> bool {
        other.iter().all(|(node, hlc)| hlc <= self.get(node))
    }
}

/// One entry of an account's change log: what replication ships to peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub id: ChangeId,
    pub modseq: u64,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    MailboxCreate { mailbox: u32, name: String, uidvalidity: u32, special_use: Option<SpecialUse> },
    MailboxRename { mailbox: u32, from: String, to: String },
    MailboxDelete { mailbox: u32, name: String, uidvalidity: u32 },
    Subscribe { mailbox: u32, subscribed: bool },
    Append { mailbox: u32, uid: u32, entry: Entry },
    Flags { mailbox: u32, uid: u32, flags: Flags, keywords: Vec<String> },
    Expunge { mailbox: u32, uids: Vec<u32> },
}
