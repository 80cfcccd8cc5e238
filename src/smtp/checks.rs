//! Work on a complete message before it is committed, for header fields that depend on all of
//! it: the inbound verdict on port 25 (Authentication-Results, and the policy that may refuse
//! the message or send it to Junk) and DKIM signatures on mail submitted for sending.

use std::net::IpAddr;

use super::reply::Reply;
use super::{Mode, SmtpContext};
use crate::store::BlobWriter;

/// Where local copies go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    Inbox,
    Junk,
}

impl Placement {
    pub(super) fn mailbox(self) -> &'static str {
        match self {
            Placement::Inbox => "INBOX",
            Placement::Junk => "Junk",
        }
    }
}

/// What the session knows about the transaction.
pub(super) struct Facts<'a> {
    pub mode: Mode,
    pub client_ip: IpAddr,
    pub helo: &'a str,
    /// Reverse path without brackets.
    pub mail_from: &'a str,
    pub sid: &'a str,
    /// A cluster node that authenticated its relay hop: it ran the border checks already.
    pub peer_node: Option<&'a str>,
}

/// Adds the fields in front of the message; `Err` is the reply that refuses it.
pub(super) async fn before_commit(
    ctx: &SmtpContext,
    writer: BlobWriter,
    facts: &Facts<'_>,
) -> Result<(BlobWriter, Placement), Reply> {
    let store = ctx.queue.store();
    let local_error = |e: crate::store::StoreError| {
        tracing::error!("{} smtp store-error error={e}", facts.sid);
        Reply::new(451, "4.3.0", "Local error in processing, try again later")
    };
    match facts.mode {
        Mode::Mx => {
            // Our backup checked this message at the border and wrote its verdict; SPF would
            // now judge the backup's address, not the sender's. Its fields are kept as they are.
            if let Some(node) = facts.peer_node {
                tracing::info!("{} verdict skipped: relayed by cluster node {node}", facts.sid);
                return Ok((writer, Placement::Inbox));
            }
            let Some(verifier) = &ctx.verifier else { return Ok((writer, Placement::Inbox)) };
            let message = writer.contents().map_err(local_error)?;
            // A sender's `Authentication-Results: <a node of ours>` is a forgery (RFC 8601 §5):
            // dropped.
            let filtered = crate::verdict::strip_forged(&message, &ctx.authserv_ids);
            if filtered.is_some() {
                tracing::info!("{} verdict removed-forged-authentication-results", facts.sid);
            }
            let checked: &[u8] = filtered.as_deref().unwrap_or(&message);
            let envelope = crate::verdict::Envelope {
                client_ip: facts.client_ip,
                helo: facts.helo,
                mail_from: facts.mail_from,
                hostname: &ctx.hostname,
                sid: facts.sid,
            };
            let verdict = verifier.check(&envelope, checked).await;
            let placement = match verdict.action {
                crate::verdict::Action::Accept => Placement::Inbox,
                crate::verdict::Action::Junk => Placement::Junk,
                crate::verdict::Action::Reject(code, status, text) => return Err(Reply::new(code, status, text)),
            };
            if verdict.fields.is_empty() && filtered.is_none() {
                return Ok((writer, placement));
            }
            // Our field goes right below our own Received field, above everything the sender wrote.
            let split = crate::verdict::trace_end(checked);
            let mut fresh = store.blob_writer().map_err(local_error)?;
            fresh.write(&checked[..split]).map_err(local_error)?;
            fresh.write(&verdict.fields).map_err(local_error)?;
            fresh.write(&checked[split..]).map_err(local_error)?;
            drop(writer); // removes whatever chunks it had stored
            Ok((fresh, placement))
        }
        Mode::Submission | Mode::Submissions => {
            let Some(signer) = &ctx.dkim else { return Ok((writer, Placement::Inbox)) };
            let message = writer.contents().map_err(local_error)?;
            let fields = signer.sign(&message);
            drop(message);
            Ok((writer.prepend(store, &fields).map_err(local_error)?, Placement::Inbox))
        }
    }
}
