//! Bounces and delay warnings: RFC 3464 DSNs from MAILER-DAEMON with the null reverse path,
//! routed to the original sender like any other message (into a local mailbox, or back into
//! the queue). Never a DSN about a DSN: a message with a null sender, or one that is itself an
//! automatic report, gets none (RFC 3464 §2, RFC 5321 §4.5.5).

use chrono::{DateTime, TimeZone, Utc};

use super::{Incoming, Queue};
use crate::dsn::{build_dsn, header_section, is_auto_response, Action, DsnRequest, RecipientStatus};
use crate::routing::Destination as Route;
use crate::smtp::address::Address;
use crate::store::{DeliveryTarget, QueueEntry, QueueRecipient, StoreError};

/// How much of the original we read to find its header section.
const HEADER_READ_LIMIT: usize = 128 * 1024;

pub(super) fn failed(r: &QueueRecipient, status: &str, diagnostic: &str, remote_mta: Option<&str>) -> RecipientStatus {
    RecipientStatus {
        final_recipient: r.address.clone(),
        original_recipient: r.original.clone(),
        action: Action::Failed,
        status: status.to_string(),
        remote_mta: remote_mta.map(str::to_string),
        diagnostic: Some(diagnostic.to_string()),
        last_attempt: Some(Utc::now()),
        will_retry_until: None,
    }
}

pub(super) fn delayed(r: &QueueRecipient, until: i64) -> RecipientStatus {
    RecipientStatus {
        final_recipient: r.address.clone(),
        original_recipient: r.original.clone(),
        action: Action::Delayed,
        status: "4.4.7".to_string(),
        remote_mta: None,
        diagnostic: r.last_error.clone(),
        last_attempt: Some(Utc::now()),
        will_retry_until: Utc.timestamp_opt(until, 0).single(),
    }
}

impl Queue {
    /// Sends the sender of `entry` a DSN about `recipients`. Returns once the DSN is stored
    /// durably, true, or was rightly not sent, false.
    pub(super) async fn bounce(&self, entry: &QueueEntry, recipients: &[RecipientStatus]) -> Result<bool, StoreError> {
        let id = entry.display_id();
        if recipients.is_empty() {
            return Ok(false);
        }
        if entry.from.is_empty() {
            tracing::info!("queue id={id} no bounce: the message is itself a bounce (null sender)");
            return Ok(false);
        }
        let headers = self.original_headers(entry)?;
        if is_auto_response(&headers) {
            tracing::info!("queue id={id} no bounce: the message is an automatic report");
            return Ok(false);
        }
        let postmaster = format!("MAILER-DAEMON@{}", self.hostname);
        let arrival: DateTime<Utc> = Utc.timestamp_opt(entry.created, 0).single().unwrap_or_else(Utc::now);
        let dsn = build_dsn(&DsnRequest {
            reporting_mta: &self.hostname,
            original_sender: &entry.from,
            original_envelope_id: None,
            arrival_date: arrival,
            recipients,
            original_headers: header_section(&headers),
            postmaster: &postmaster,
        });
        // Local copies get the trace fields a delivered message has; `attempt` strips the
        // Return-Path again when the DSN goes to another server.
        let trace = format!(
            "Return-Path: <>\r\nReceived: by {} (Postern) id {id};\r\n\t{}\r\n",
            self.hostname,
            Utc::now().format("%a, %d %b %Y %H:%M:%S +0000")
        );
        let signature = self.dkim.as_ref().map(|s| s.sign(&dsn)).unwrap_or_default();
        let mut writer = self.store.blob_writer()?;
        writer.write(trace.as_bytes())?;
        writer.write(&signature)?;
        writer.write(&dsn)?;
        let blob = writer.finish()?;
        let kind = if recipients.iter().any(|r| r.action == Action::Failed) { "bounce" } else { "delay-warning" };
        let (local, remote) = self.route_to_sender(&entry.from);
        let local_targets: Vec<_> = local.iter().map(|a| DeliveryTarget::inbox(a)).collect();
        let n_remote = remote.len();
        let incoming = Incoming {
            from: "",
            remote_from: None,
            local: local_targets,
            remote,
            smtputf8: false,
            origin: kind.to_string(),
        };
        let (stored, queued) = self.accept(blob, incoming).await?;
        crate::metrics::add(&crate::metrics::counters().relay_bounce, 1);
        let queued = queued.map(crate::store::queue::format_id).unwrap_or_else(|| "-".into());
        tracing::info!(
            "queue id={id} {kind} to=<{}> recipients={} local={} queued={queued} remote={n_remote}",
            entry.from,
            recipients.len(),
            stored.len()
        );
        Ok(true)
    }

    /// Where a DSN for `sender` goes: its mailboxes here, or the queue. A local address that no
    /// longer exists gets nothing (the DSN would bounce to no one).
    fn route_to_sender(&self, sender: &str) -> (Vec<String>, Vec<QueueRecipient>) {
        let Some((local, domain)) = sender.rsplit_once('@') else { return (Vec::new(), Vec::new()) };
        let address = Address::new(local, domain);
        // A backup keeps no mailboxes: a DSN for a sender of ours goes to the primaries.
        if self.cluster.role == crate::config::Role::Backup && self.router.resolve(&address).is_ok() {
            return (Vec::new(), vec![QueueRecipient::new(sender)]);
        }
        match self.router.resolve(&address) {
            Ok(dests) => {
                let mut mailboxes = Vec::new();
                let mut remote = Vec::new();
                for d in dests {
                    match d {
                        Route::Mailbox(u) => mailboxes.push(u),
                        Route::Forward(a) => {
                            let mut r = QueueRecipient::new(a);
                            r.original = Some(sender.to_string());
                            remote.push(r);
                        }
                        Route::Discard => {}
                    }
                }
                (mailboxes, remote)
            }
            Err(crate::routing::RouteError::ForeignDomain) => (Vec::new(), vec![QueueRecipient::new(sender)]),
            Err(crate::routing::RouteError::UnknownUser) => {
                tracing::warn!("queue bounce dropped: sender <{sender}> is in our domains but does not exist");
                (Vec::new(), Vec::new())
            }
        }
    }

    /// The start of the original message, enough for its header section.
    fn original_headers(&self, entry: &QueueEntry) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        if let Some(reader) = self.store.read_blob(&entry.blob)? {
            for chunk in reader {
                out.extend_from_slice(&chunk?);
                if out.len() > 12 && out[..12].eq_ignore_ascii_case(b"return-path:") {
                    // Our own delivery trace, not part of what the sender sent.
                    if let Some(end) = out.windows(2).position(|w| w == b"\r\n") {
                        out.drain(..end + 2);
                    }
                }
                if out.len() >= HEADER_READ_LIMIT || out.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
        Ok(out)
    }
}
