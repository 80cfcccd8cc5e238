//! IDLE (RFC 2177, RFC 9051 §6.3.13): untagged updates pushed as the selected mailbox changes,
//! until the client sends `DONE`.

use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::broadcast::Receiver;

use super::session::Reply;
use crate::net::Conn;
use crate::store::{MailboxEvent, StoreError};

/// How often an idling session looks at the store's change notifications. Reading the socket
/// cannot be cancelled safely (`Conn::fill` is not cancel-safe), so the wait is a read with this
/// timeout: a change is announced well within a second of its commit.
const POLL: Duration = Duration::from_millis(200);
/// Longest line accepted while idling (`DONE`, or a mistake that gets BAD).
const MAX_IDLE_LINE: usize = 1024;

/// Runs an IDLE after `+ idling` was queued. `watched` is the (account, mailbox) selected, if
/// any; `refresh` writes the untagged updates and returns false when the mailbox is gone.
pub(super) async fn idle(
    conn: &mut Conn,
    events: &mut Receiver<MailboxEvent>,
    watched: Option<(u32, u32)>,
    timeout: Duration,
    mut refresh: impl FnMut(&mut Conn) -> Result<bool, StoreError>,
) -> Result<Option<String>, Reply> {
    let started = Instant::now();
    let mut check = watched.is_some();
    loop {
        if check {
            check = false;
            match refresh(conn) {
                Ok(true) => {}
                Ok(false) => {
                    conn.write(b"* BYE Selected mailbox was deleted, have to disconnect\r\n");
                    return Err(Reply::Close("mailbox-deleted"));
                }
                Err(e) => tracing::error!("imap idle store-error error={e}"),
            }
        }
        if conn.flush().await.is_err() {
            return Err(Reply::Close("io-error"));
        }
        if let Some(pos) = conn.buffered().iter().position(|&b| b == b'\n') {
            let line = &conn.buffered()[..pos];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let done = line.eq_ignore_ascii_case(b"DONE");
            conn.consume(pos + 1);
            return if done { Ok(Some("IDLE terminated".into())) } else { Err(Reply::Bad("Expected DONE".into())) };
        }
        if conn.buffered().len() > MAX_IDLE_LINE {
            let n = conn.buffered().len();
            conn.consume(n);
            return Err(Reply::Bad("Expected DONE".into()));
        }
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            // RFC 9051 §5.4: the inactivity timer runs during IDLE too.
            conn.write(b"* BYE Autologout; idle for too long\r\n");
            return Err(Reply::Close("timeout"));
        }
        match conn.fill(POLL.min(left)).await {
            Ok(0) => return Err(Reply::Close("disconnected")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Err(Reply::Close("io-error")),
        }
        loop {
            match events.try_recv() {
                Ok(ev) => check |= watched == Some((ev.account, ev.mailbox)),
                // Missed notifications: look anyway.
                Err(TryRecvError::Lagged(_)) => check |= watched.is_some(),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
    }
}
