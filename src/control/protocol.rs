//! The control socket's wire format: one JSON request line from the client, then JSON response
//! lines from the server. A `queue_list` answer streams one `{"entry": …}` line per queue entry
//! and ends with a summary line; every other answer is a single line. The last line of every
//! answer carries `"ok"`.

use serde::{Deserialize, Serialize};

use crate::store::{QueueEntry, QueueRecipient};

/// Longest request line the server reads (bytes, newline included).
pub const MAX_REQUEST: usize = 64 * 1024;

/// One request: `{"cmd": "queue_show", "id": "00000000000000a1"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    QueueList,
    QueueShow {
        id: String,
    },
    /// `id: None` retries every entry that is not held.
    QueueRetry {
        id: Option<String>,
    },
    QueueRemove {
        id: String,
        #[serde(default)]
        bounce: bool,
    },
    QueueHold {
        id: String,
    },
    QueueRelease {
        id: String,
    },
    /// The counters `postern monitor` prints.
    Stats,
    /// `service` is "smtp" (every SMTP listener: 25, 587, 465).
    Pause {
        service: String,
    },
    Resume {
        service: String,
    },
    /// `postern sync status`: the replication peers of this node.
    SyncStatus,
}

/// Why a request failed, for the client's exit status and message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request line was not a request (bad JSON, unknown command, too long, bad id).
    BadRequest,
    /// The peer is neither root nor the server's own user.
    Forbidden,
    /// No queue entry has that id.
    NotFound,
    /// The store failed.
    Internal,
}

/// The last (or only) line of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    /// The entry shown, held, released or removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryView>,
    /// Entries listed or scheduled by `queue_retry`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// For `queue_remove` with `bounce`: whether a bounce was queued for the sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounced: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<crate::metrics::Snapshot>,
    /// For `pause`/`resume`: whether the service was paused before the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was_paused: Option<bool>,
    /// For `sync_status`: `None` when replication is off on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<crate::sync::SyncView>,
}

impl Response {
    pub fn ok() -> Response {
        Response {
            ok: true,
            error: None,
            kind: None,
            entry: None,
            count: None,
            bounced: None,
            stats: None,
            was_paused: None,
            sync: None,
        }
    }

    pub fn entry(entry: EntryView) -> Response {
        Response { entry: Some(entry), ..Response::ok() }
    }

    pub fn count(n: u64) -> Response {
        Response { count: Some(n), ..Response::ok() }
    }

    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response { ok: false, error: Some(message.into()), kind: Some(kind), ..Response::ok() }
    }
}

/// One line of a `queue_list` stream before the final `Response`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListLine {
    pub entry: EntryView,
}

/// A queue entry as the control socket shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryView {
    /// 16 hex digits.
    pub id: String,
    /// Reverse path without brackets; "" is the null sender.
    pub from: String,
    /// As stored: the wire form of a recipient is the store's own.
    pub recipients: Vec<QueueRecipient>,
    pub size: u64,
    pub eight_bit: bool,
    pub smtputf8: bool,
    pub origin: String,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds.
    pub next_attempt: i64,
    pub attempts: u32,
    pub held: bool,
    /// A delivery attempt is running right now.
    pub in_flight: bool,
    /// A delay warning was sent to the sender.
    pub warned: bool,
    pub last_error: Option<String>,
    /// The body's content hash (hex).
    pub body: String,
}

impl EntryView {
    pub fn new(e: &QueueEntry, in_flight: bool) -> EntryView {
        EntryView {
            id: crate::store::queue::format_id(e.id),
            from: e.from.clone(),
            recipients: e.recipients.clone(),
            size: e.size,
            eight_bit: e.eight_bit,
            smtputf8: e.smtputf8,
            origin: e.origin.clone(),
            created: e.created,
            next_attempt: e.next_attempt,
            attempts: e.attempts,
            held: e.held,
            in_flight,
            warned: e.warned,
            last_error: e.last_error.clone(),
            body: e.blob.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::QueueList,
            Request::QueueShow { id: "00000000000000a1".into() },
            Request::QueueRetry { id: None },
            Request::QueueRetry { id: Some("1".into()) },
            Request::QueueRemove { id: "1".into(), bounce: true },
            Request::QueueHold { id: "1".into() },
            Request::QueueRelease { id: "1".into() },
            Request::SyncStatus,
        ];
        for r in reqs {
            let text = serde_json::to_string(&r).unwrap();
            assert!(!text.contains('\n'));
            assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        }
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"queue_remove","id":"2"}"#).unwrap(),
            Request::QueueRemove { id: "2".into(), bounce: false }
        );
        for bad in ["", "{}", "[]", "null", r#"{"cmd":"rm -rf"}"#, r#"{"cmd":"queue_show"}"#] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
