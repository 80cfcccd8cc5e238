//! The server side of the control socket.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::protocol::{EntryView, ErrorKind, ListLine, Request, Response, MAX_REQUEST};
use crate::queue::Queue;
use crate::store::queue::parse_id;
use crate::sync::durable::Replication;

/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write of the answer may block on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// Queue entries read from the store per page of a `queue_list` answer.
const PAGE: usize = 256;

/// A bound control socket; the socket file is removed when this (or the task serving it) is
/// dropped.
pub struct ControlSocket {
    listener: UnixListener,
    file: SocketFile,
}

struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if is_socket(&self.0) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).map(|m| m.file_type().is_socket()).unwrap_or(false)
}

impl ControlSocket {
    /// Binds `path` with mode 0600, creating its directory (mode 0700) when missing. A socket
    /// file left by a node that is gone is replaced; one a live node answers on, or a file that
    /// is not a socket, is an error.
    pub fn bind(path: &Path) -> Result<ControlSocket> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("creating the control socket's directory {}", dir.display()))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    bail!("control socket {}: another postern node is running with it", path.display());
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale control socket {}", path.display()))?;
            }
            Ok(_) => bail!("control socket {}: the file exists and is not a socket", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("control socket {}", path.display())),
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding the control socket {}", path.display()))?;
        let file = SocketFile(path.to_path_buf());
        // Only the owner may connect; peers are also checked by uid on every connection, which
        // covers the instant between bind and chmod.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting the mode of the control socket {}", path.display()))?;
        Ok(ControlSocket { listener, file })
    }

    pub fn path(&self) -> &Path {
        &self.file.0
    }

    /// Accepts connections until the task is dropped.
    /// `sync` is the node's replication state (`None`: replication is off on this node).
    pub async fn serve(self, queue: Arc<Queue>, paused: Arc<AtomicBool>, sync: Option<Arc<Replication>>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        // SAFETY: geteuid has no preconditions and cannot fail.
        let own_uid = unsafe { libc::geteuid() };
        let _file = self.file;
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("control accept failed error={e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (queue, paused, sync) = (queue.clone(), paused.clone(), sync.clone());
            tokio::spawn(async move {
                handle(stream, queue, paused, sync, own_uid).await;
                drop(permit);
            });
        }
    }
}

async fn handle(
    stream: UnixStream,
    queue: Arc<Queue>,
    paused: Arc<AtomicBool>,
    sync: Option<Arc<Replication>>,
    own_uid: u32,
) {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let (read, write) = stream.into_split();
    let mut input = BufReader::new(read);
    let mut out = BufWriter::new(write);
    if !matches!(uid, Some(u) if u == 0 || u == own_uid) {
        tracing::warn!("control connection refused uid={uid:?}");
        let msg = format!(
            "permission denied: uid {} is neither root nor the server's user (uid {own_uid})",
            uid.map_or("unknown".to_string(), |u| u.to_string())
        );
        let _ = finish(&mut out, &Response::error(ErrorKind::Forbidden, msg)).await;
        drain(&mut input).await;
        return;
    }
    let request = match read_request(&mut input).await {
        Ok(r) => r,
        Err(msg) => {
            let _ = finish(&mut out, &Response::error(ErrorKind::BadRequest, msg)).await;
            drain(&mut input).await;
            return;
        }
    };
    tracing::info!("control request uid={} request={request:?}", uid.unwrap_or(0));
    if request == Request::SyncStatus {
        // The lag figures read the store: off the async threads.
        let view = match sync {
            Some(s) => tokio::task::spawn_blocking(move || s.view()).await.ok(),
            None => None,
        };
        let answer = Response { sync: view, ..Response::ok() };
        let _ = finish(&mut out, &answer).await;
        return;
    }
    let response = match execute(request, &queue, &paused, &mut out).await {
        Ok(r) => r,
        Err(Failure::Write) => return,
        Err(Failure::Store(e)) => {
            tracing::error!("control request failed error={e}");
            Response::error(ErrorKind::Internal, format!("store error: {e}"))
        }
    };
    let _ = finish(&mut out, &response).await;
}

/// Reads one request line (bounded in size and time).
async fn read_request<R: AsyncBufRead + Unpin>(input: &mut R) -> Result<Request, String> {
    let mut reader = input.take(MAX_REQUEST as u64 + 1);
    let mut line = Vec::new();
    match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => return Err("bad request: no request line within the time limit".into()),
        Ok(Err(e)) => return Err(format!("bad request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_REQUEST || (line.len() == MAX_REQUEST && line.last() != Some(&b'\n')) {
        return Err(format!("bad request: longer than {MAX_REQUEST} bytes"));
    }
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err("bad request: empty request".into());
    }
    serde_json::from_slice(&line).map_err(|e| format!("bad request: {e}"))
}

/// Reads and drops what the client still sends (within limits) after an error answer: closing a
/// Unix socket with unread input resets the connection, and the client could lose the answer.
async fn drain<R: AsyncBufRead + Unpin>(input: &mut R) {
    let mut rest = input.take(1 << 20);
    let _ = tokio::time::timeout(Duration::from_secs(1), tokio::io::copy(&mut rest, &mut tokio::io::sink())).await;
}

enum Failure {
    /// The client went away (or stopped reading) in the middle of an answer.
    Write,
    Store(crate::store::StoreError),
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Failure::Store(e)
    }
}

fn not_found(id: u64) -> Response {
    Response::error(ErrorKind::NotFound, format!("no queue entry {}", crate::store::queue::format_id(id)))
}

/// The counters with the queue figures that need the store (a key scan: fine once a second).
pub fn snapshot(queue: &Queue, paused: &AtomicBool) -> crate::metrics::Snapshot {
    let mut s = crate::metrics::Snapshot::now();
    s.queue_messages = queue.store().queue_len().unwrap_or(0) as u64;
    let now = chrono::Utc::now().timestamp();
    if let Ok(Some(oldest)) = queue.store().queue_list(None, 1).map(|page| page.into_iter().next()) {
        s.queue_oldest_age = (now - oldest.created).max(0) as u64;
    }
    s.smtp_paused = paused.load(Ordering::Relaxed);
    s
}

async fn execute<W: AsyncWrite + Unpin>(
    request: Request,
    queue: &Queue,
    paused: &AtomicBool,
    out: &mut W,
) -> Result<Response, Failure> {
    let in_flight = |id| queue.in_flight().contains(&id);
    let view = |e: &crate::store::QueueEntry| Response::entry(EntryView::new(e, in_flight(e.id)));
    let id = match &request {
        Request::QueueList | Request::QueueRetry { id: None } | Request::SyncStatus => None,
        Request::Stats => return Ok(Response { stats: Some(snapshot(queue, paused)), ..Response::ok() }),
        Request::Pause { service } | Request::Resume { service } if service != "smtp" => {
            let msg = format!("cannot pause or resume {service:?}: the only service is \"smtp\"");
            return Ok(Response::error(ErrorKind::BadRequest, msg));
        }
        Request::Pause { .. } | Request::Resume { .. } => {
            let pause = matches!(request, Request::Pause { .. });
            let was = paused.swap(pause, Ordering::SeqCst);
            tracing::info!(
                "smtp {} (was {})",
                if pause { "paused" } else { "resumed" },
                if was { "paused" } else { "running" }
            );
            return Ok(Response { was_paused: Some(was), ..Response::ok() });
        }
        Request::QueueShow { id }
        | Request::QueueRetry { id: Some(id) }
        | Request::QueueRemove { id, .. }
        | Request::QueueHold { id }
        | Request::QueueRelease { id } => match parse_id(id) {
            Some(id) => Some(id),
            None => {
                let msg = format!("bad queue id {id:?}: expected hex digits");
                return Ok(Response::error(ErrorKind::BadRequest, msg));
            }
        },
    };
    let id = id.unwrap_or(0);
    Ok(match request {
        Request::QueueList => {
            let busy = queue.in_flight();
            let mut after = None;
            let mut count = 0u64;
            loop {
                let page = queue.store().queue_list(after, PAGE)?;
                let Some(last) = page.last() else { break };
                after = Some(last.id);
                for e in &page {
                    let line = ListLine { entry: EntryView::new(e, busy.contains(&e.id)) };
                    write_line(out, &line).await?;
                    count += 1;
                }
                timed(out.flush()).await?;
            }
            Response::count(count)
        }
        Request::QueueShow { .. } => match queue.store().queue_get(id)? {
            Some(e) => view(&e),
            None => not_found(id),
        },
        Request::QueueRetry { id: None } => Response::count(queue.retry(None)? as u64),
        // The entry comes back so that the client can say when a held entry stays held.
        Request::QueueRetry { .. } => match queue.retry(Some(id))? {
            0 => not_found(id),
            n => match queue.store().queue_get(id)? {
                Some(e) => Response { count: Some(n as u64), ..view(&e) },
                None => Response::count(n as u64),
            },
        },
        Request::QueueHold { .. } => queue.hold(id, true)?.map_or_else(|| not_found(id), |e| view(&e)),
        Request::QueueRelease { .. } => queue.hold(id, false)?.map_or_else(|| not_found(id), |e| view(&e)),
        Request::QueueRemove { bounce, .. } => match queue.remove(id, bounce).await? {
            Some((e, bounced)) => Response { bounced: Some(bounced), ..view(&e) },
            None => not_found(id),
        },
        // Answered before the id is parsed (`sync_status` before `execute`).
        Request::Stats | Request::Pause { .. } | Request::Resume { .. } | Request::SyncStatus => Response::ok(),
    })
}

async fn timed<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T, Failure> {
    match tokio::time::timeout(WRITE_TIMEOUT, f).await {
        Ok(Ok(x)) => Ok(x),
        _ => Err(Failure::Write),
    }
}

async fn write_line<W: AsyncWrite + Unpin, T: serde::Serialize>(out: &mut W, value: &T) -> Result<(), Failure> {
    let mut line = serde_json::to_vec(value).map_err(|_| Failure::Write)?;
    line.push(b'\n');
    timed(out.write_all(&line)).await
}

async fn finish<W: AsyncWrite + Unpin>(out: &mut W, response: &Response) -> Result<(), Failure> {
    write_line(out, response).await?;
    timed(out.flush()).await?;
    timed(out.shutdown()).await
}
