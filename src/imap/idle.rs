//! IDLE (RFC 2177, RFC 9051 §6.3.13): untagged updates pushed as the selected mailbox changes,
//! until the client sends `DONE`.

use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::broadcast::Receiver;

use super::session::Reply;
use crate::net::{Conn, Filled};
use crate::store::{MailboxEvent, StoreError};

/// How often an idling session looks at the store's change notifications when it cannot be
/// woken by them (under COMPRESS, whose reads cannot be interrupted): a change is announced well
/// within a second of its commit.
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
    // The store's notifications ended (it is shutting down): poll instead.
    let mut closed = false;
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
        // Woken by the notification itself where the connection allows it (a change reaches
        // every idler within a millisecond or so), else by polling every POLL.
        let poll = conn.compressed() || closed;
        let wait = if poll { POLL.min(left) } else { left };
        let wake = async {
            if poll {
                std::future::pending().await
            } else {
                events.recv().await
            }
        };
        match conn.fill_or(wait, wake).await {
            Ok(Filled::Read(0)) => return Err(Reply::Close("disconnected")),
            Ok(Filled::Read(_)) => {}
            Ok(Filled::Woken(Ok(ev))) => check |= watched == Some((ev.account, ev.mailbox)),
            Ok(Filled::Woken(Err(RecvError::Lagged(_)))) => check |= watched.is_some(),
            Ok(Filled::Woken(Err(RecvError::Closed))) => closed = true,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Stream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (Conn, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Conn::new(Stream::Plain(server)), client)
    }

    async fn read_all(mut client: tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn idle_ends_with_bye_at_the_timeout() {
        let (mut conn, client) = pair().await;
        let (_tx, mut rx) = tokio::sync::broadcast::channel(4);
        let started = Instant::now();
        let r = idle(&mut conn, &mut rx, Some((1, 2)), Duration::from_millis(500), |_| Ok(true)).await;
        assert!(matches!(r, Err(Reply::Close("timeout"))));
        assert!(started.elapsed() >= Duration::from_millis(500));
        conn.shutdown().await;
        assert_eq!(read_all(client).await, "* BYE Autologout; idle for too long\r\n");
    }

    #[tokio::test]
    async fn a_change_wakes_the_session_at_once_and_split_input_survives() {
        let (mut conn, mut client) = pair().await;
        let (tx, mut rx) = tokio::sync::broadcast::channel(4);
        let sent = std::sync::Arc::new(std::sync::Mutex::new(None));
        let at = sent.clone();
        let feeder = tokio::spawn(async move {
            // Half of DONE, a wake-up in the middle, then the rest: no byte may be lost.
            client.write_all(b"DO").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            *at.lock().unwrap() = Some(Instant::now());
            tx.send(MailboxEvent { account: 1, mailbox: 2 }).unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            client.write_all(b"NE\r\n").await.unwrap();
            client
        });
        let mut woken = Vec::new();
        let r = idle(&mut conn, &mut rx, Some((1, 2)), Duration::from_secs(5), |_| {
            woken.push(Instant::now());
            Ok(true)
        })
        .await;
        assert!(matches!(r, Ok(Some(_))));
        assert_eq!(woken.len(), 2);
        let delay = woken[1] - sent.lock().unwrap().expect("sent");
        // Well under POLL: the notification itself ends the wait.
        assert!(delay < Duration::from_millis(100), "{delay:?}");
        drop(feeder.await.unwrap());
    }

    #[tokio::test]
    async fn events_of_the_watched_mailbox_refresh_then_done_ends() {
        let (mut conn, mut client) = pair().await;
        let (tx, mut rx) = tokio::sync::broadcast::channel(4);
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(MailboxEvent { account: 1, mailbox: 3 }).unwrap();
            tx.send(MailboxEvent { account: 1, mailbox: 2 }).unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            client.write_all(b"done\r\n").await.unwrap();
            client
        });
        let mut calls = 0;
        let r = idle(&mut conn, &mut rx, Some((1, 2)), Duration::from_secs(5), |c| {
            calls += 1;
            c.write(b"* 1 EXISTS\r\n");
            Ok(true)
        })
        .await;
        assert!(matches!(r, Ok(Some(_))));
        // Once on entry, once for the event of mailbox 2 (not for mailbox 3).
        assert_eq!(calls, 2);
        let client = feeder.await.unwrap();
        conn.shutdown().await;
        assert_eq!(read_all(client).await, "* 1 EXISTS\r\n* 1 EXISTS\r\n");
    }

    #[tokio::test]
    async fn anything_but_done_is_bad_and_a_deleted_mailbox_is_bye() {
        let (mut conn, mut client) = pair().await;
        let (_tx, mut rx) = tokio::sync::broadcast::channel(4);
        client.write_all(b"a2 NOOP\r\n").await.unwrap();
        let r = idle(&mut conn, &mut rx, None, Duration::from_secs(5), |_| Ok(true)).await;
        assert!(matches!(r, Err(Reply::Bad(_))));
        let r = idle(&mut conn, &mut rx, Some((1, 2)), Duration::from_secs(5), |_| Ok(false)).await;
        assert!(matches!(r, Err(Reply::Close("mailbox-deleted"))));
    }
}
