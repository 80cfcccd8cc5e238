//! FETCH of the items the store's mailbox index holds (UID, FLAGS, MODSEQ, INTERNALDATE, RFC822.SIZE):
//! what clients ask for every message when they open a big mailbox. Served from
//! `Store::with_view` without reading any `E` record from sled, and rendered straight into bytes;
//! the output is the same as `fetch::fetch` writes for these items.

use std::io::Write;

use chrono::{Datelike, FixedOffset, TimeZone, Timelike};

use super::fetch::FetchItem;
use crate::net::Conn;
use crate::store::{Store, StoreError, Summary};

/// Messages rendered per hold of the index's read lock (and per socket flush).
const BATCH: usize = 4096;

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// Whether every item asked for is one the index answers.
pub(super) fn applies(items: &[FetchItem]) -> bool {
    items.iter().all(|i| {
        matches!(i, FetchItem::Uid | FetchItem::Flags | FetchItem::ModSeq | FetchItem::InternalDate | FetchItem::Size)
    })
}

/// Writes the FETCH lines for `targets` (sequence number, UID); false when the mailbox is gone
/// (the caller's general path then answers as it always did). A UID no longer in the mailbox,
/// expunged by another session and not yet announced to this one, is skipped, as there.
pub(super) async fn fetch(
    store: &Store,
    acct: u32,
    mbox: u32,
    targets: &[(u32, u32)],
    items: &[FetchItem],
    uid_mode: bool,
    conn: &mut Conn,
) -> Result<bool, StoreError> {
    let with_uid = uid_mode || items.contains(&FetchItem::Uid);
    let with_flags = items.contains(&FetchItem::Flags);
    let with_modseq = items.contains(&FetchItem::ModSeq);
    let tag = store.modseq_tag();
    // The other items in the order asked, as `fetch::fetch` writes them.
    let rest: Vec<&FetchItem> =
        items.iter().filter(|i| matches!(i, FetchItem::InternalDate | FetchItem::Size)).collect();
    let mut out = Vec::with_capacity(64 * BATCH.min(targets.len()));
    for chunk in targets.chunks(BATCH) {
        let found = store.with_view(acct, mbox, |view| {
            for &(seq, uid) in chunk {
                if let Some(s) = view.get(uid) {
                    render(&mut out, seq, &s, [with_uid, with_flags, with_modseq], tag, &rest);
                }
            }
        })?;
        if found.is_none() {
            return Ok(false);
        }
        conn.write(&out);
        out.clear();
        if chunk.len() == BATCH {
            conn.flush().await.map_err(|e| StoreError::Sled(sled::Error::Io(e)))?;
        }
    }
    Ok(true)
}

/// `tag`: the node's modseq tag (`condstore::shown`).
fn render(
    out: &mut Vec<u8>,
    seq: u32,
    s: &Summary<'_>,
    [uid, flags, modseq]: [bool; 3],
    tag: Option<u8>,
    rest: &[&FetchItem],
) {
    // Writing into a Vec cannot fail.
    let _ = write!(out, "* {seq} FETCH (");
    let mut first = true;
    let mut sep = |out: &mut Vec<u8>| {
        if !std::mem::take(&mut first) {
            out.push(b' ');
        }
    };
    if uid {
        sep(out);
        let _ = write!(out, "UID {}", s.uid);
    }
    if flags {
        sep(out);
        out.extend_from_slice(b"FLAGS (");
        let mut space = false;
        let mut put = |out: &mut Vec<u8>, name: &[u8]| {
            if std::mem::replace(&mut space, true) {
                out.push(b' ');
            }
            out.extend_from_slice(name);
        };
        for name in s.flags.names() {
            put(out, name.as_bytes());
        }
        for name in s.keywords {
            put(out, name.as_bytes());
        }
        out.push(b')');
    }
    if modseq {
        // RFC 7162 §3.1.4.1
        sep(out);
        let _ = write!(out, "MODSEQ ({})", super::condstore::tagged(s.modseq, tag));
    }
    for item in rest {
        sep(out);
        match item {
            FetchItem::InternalDate => {
                out.extend_from_slice(b"INTERNALDATE \"");
                internal_date(out, s.internal_date, s.tz_offset_minutes);
                out.push(b'"');
            }
            _ => {
                let _ = write!(out, "RFC822.SIZE {}", s.size);
            }
        }
    }
    out.extend_from_slice(b")\r\n");
}

/// RFC 3501 date-time (`"%e-%b-%Y %H:%M:%S %z"`) without chrono's format parser, which is most of
/// the cost of a big `FETCH 1:* (INTERNALDATE)`; the same text as `fetch::internal_date`.
fn internal_date(out: &mut Vec<u8>, secs: i64, tz_minutes: i16) {
    let offset = FixedOffset::east_opt(i32::from(tz_minutes) * 60).unwrap_or(FixedOffset::east_opt(0).expect("zero"));
    let Some(t) = offset.timestamp_opt(secs, 0).single() else {
        out.extend_from_slice(b"01-Jan-1970 00:00:00 +0000");
        return;
    };
    if !(0..=9999).contains(&t.year()) {
        let _ = write!(out, "{}", t.format("%e-%b-%Y %H:%M:%S %z"));
        return;
    }
    let off = offset.local_minus_utc() / 60;
    let sign = if off < 0 { '-' } else { '+' };
    let _ = write!(
        out,
        "{:>2}-{}-{:04} {:02}:{:02}:{:02} {sign}{:02}{:02}",
        t.day(),
        MONTHS[t.month0() as usize],
        t.year(),
        t.hour(),
        t.minute(),
        t.second(),
        off.abs() / 60,
        off.abs() % 60
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_chrono() {
        for (secs, tz) in [(0, 0), (1_795_000_000, 60), (1_795_000_000, -330), (-86_400 * 400, 45), (951_782_400, -720)]
        {
            let mut out = Vec::new();
            internal_date(&mut out, secs, tz);
            let entry = crate::store::Entry {
                blob: [0; 32],
                size: 0,
                internal_date: secs,
                tz_offset_minutes: tz,
                flags: crate::store::Flags::default(),
                keywords: Vec::new(),
                modseq: 1,
            };
            assert_eq!(String::from_utf8(out).unwrap(), super::super::fetch::internal_date(&entry), "{secs} {tz}");
        }
    }
}
