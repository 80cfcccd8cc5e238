use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::compress::Deflate;

/// A TCP stream, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// What is left after a failed TLS handshake consumed the socket.
    Closed,
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Ok(())),
        }
    }
}

/// What was negotiated, for logs and the Received header.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// The result of reading one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// The line without its CRLF (or bare LF).
    Ok(Vec<u8>),
    /// Longer than the limit: everything up to the next LF was read and dropped.
    TooLong,
    Eof,
}

const READ_SIZE: usize = 16 * 1024;

/// What ended a `Conn::fill_or`: bytes read (0 at end of stream), or the wake-up's output.
pub enum Filled<T> {
    Read(usize),
    Woken(T),
}

/// A buffered connection. Reads never buffer more than one line limit or one read block, so a
/// client cannot make the server hold unbounded input.
pub struct Conn {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    out: Vec<u8>,
    tls: Option<TlsInfo>,
    /// COMPRESS=DEFLATE (RFC 4978): `buf` then holds inflated input and `out` data still to be
    /// compressed. Boxed: the codec state is about 220 KiB and most sessions never use it.
    deflate: Option<Box<Deflate>>,
    /// Compressed output waiting to be written.
    zout: Vec<u8>,
}

impl Conn {
    pub fn new(stream: Stream) -> Self {
        let tls = match &stream {
            Stream::Tls(s) => Some(tls_info(s)),
            Stream::Plain(_) | Stream::Closed => None,
        };
        Conn {
            stream,
            buf: Vec::with_capacity(1024),
            start: 0,
            out: Vec::with_capacity(1024),
            tls,
            deflate: None,
            zout: Vec::new(),
        }
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// Bytes already received and not yet consumed (pipelined input).
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Reads more input into the buffer; 0 means end of stream.
    pub async fn fill(&mut self, timeout: Duration) -> io::Result<usize> {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > READ_SIZE {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.deflate.is_some() {
            return self.fill_inflated(timeout).await;
        }
        let len = self.buf.len();
        self.buf.resize(len + READ_SIZE, 0);
        let r = tokio::time::timeout(timeout, self.stream.read(&mut self.buf[len..])).await;
        let n = match r {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                self.buf.truncate(len);
                return Err(e);
            }
            Err(_) => {
                self.buf.truncate(len);
                return Err(io::Error::new(io::ErrorKind::TimedOut, "timeout"));
            }
        };
        self.buf.truncate(len + n);
        Ok(n)
    }

    /// `fill` that also ends, with `Filled::Woken`, as soon as `wake` completes (an IDLE session
    /// waiting for input or a mailbox change). Only for a connection without compression: the
    /// inflating path keeps state across reads, so it ignores `wake` and waits for input or the
    /// timeout. `wake` must be cancel-safe; the read is (tokio's `read` and rustls's), and the
    /// buffer is truncated back on every branch, so nothing is lost or invented either way.
    pub async fn fill_or<F: std::future::Future>(
        &mut self,
        timeout: Duration,
        wake: F,
    ) -> io::Result<Filled<F::Output>> {
        if self.deflate.is_some() {
            return self.fill(timeout).await.map(Filled::Read);
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > READ_SIZE {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let len = self.buf.len();
        self.buf.resize(len + READ_SIZE, 0);
        let read = tokio::time::timeout(timeout, self.stream.read(&mut self.buf[len..]));
        let r = tokio::select! {
            r = read => r,
            woken = wake => {
                self.buf.truncate(len);
                return Ok(Filled::Woken(woken));
            }
        };
        match r {
            Ok(Ok(n)) => {
                self.buf.truncate(len + n);
                Ok(Filled::Read(n))
            }
            Ok(Err(e)) => {
                self.buf.truncate(len);
                Err(e)
            }
            Err(_) => {
                self.buf.truncate(len);
                Err(io::Error::new(io::ErrorKind::TimedOut, "timeout"))
            }
        }
    }

    /// `fill` under compression: inflates what is pending, reading compressed input only when
    /// the inflater has used up the last read, until some plain bytes come out (a read may
    /// carry only part of a block, or only a sync-flush marker).
    async fn fill_inflated(&mut self, timeout: Duration) -> io::Result<usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        let Some(z) = self.deflate.as_mut() else { return Ok(0) };
        loop {
            let n = z.inflate(&mut self.buf, READ_SIZE)?;
            if n > 0 {
                return Ok(n);
            }
            if z.ended() {
                return Ok(0);
            }
            debug_assert!(z.wants_input());
            let raw = z.raw_buffer();
            let len = raw.len();
            raw.resize(len + READ_SIZE, 0);
            // Cancel-safe as the plain path: on timeout nothing was read.
            let r = tokio::time::timeout_at(deadline, self.stream.read(&mut raw[len..])).await;
            let n = match r {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    raw.truncate(len);
                    return Err(e);
                }
                Err(_) => {
                    raw.truncate(len);
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "timeout"));
                }
            };
            raw.truncate(len + n);
            if n == 0 {
                return Ok(0);
            }
        }
    }

    /// Switches both directions to raw DEFLATE (RFC 4978). The caller has flushed the tagged
    /// OK in the clear; input already buffered after the command line is compressed data.
    pub fn start_compress(&mut self) -> io::Result<()> {
        if self.deflate.is_some() {
            return Err(io::Error::other("compression is already active"));
        }
        self.deflate = Some(Box::new(Deflate::new(&self.buf[self.start..])));
        self.buf.clear();
        self.start = 0;
        Ok(())
    }

    pub fn compressed(&self) -> bool {
        self.deflate.is_some()
    }

    /// Reads one line of at most `max` bytes including the line ending.
    pub async fn read_line(&mut self, max: usize, timeout: Duration) -> io::Result<Line> {
        let mut discarding = false;
        loop {
            let avail = &self.buf[self.start..];
            if let Some(pos) = avail.iter().position(|&b| b == b'\n') {
                if discarding || pos + 1 > max {
                    self.consume(pos + 1);
                    return Ok(Line::TooLong);
                }
                let mut line = avail[..pos].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.consume(pos + 1);
                return Ok(Line::Ok(line));
            }
            if avail.len() >= max {
                discarding = true;
                let n = avail.len();
                self.consume(n);
            }
            if self.fill(timeout).await? == 0 {
                return Ok(if discarding { Line::TooLong } else { Line::Eof });
            }
        }
    }

    /// Queues output; it is sent at the next `flush`.
    pub fn write(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        if let Some(z) = self.deflate.as_mut() {
            // Sync flush at every flush: the client must be able to inflate each response as
            // soon as it arrives, not when the compressor's block fills.
            z.deflate(&self.out, true, &mut self.zout)?;
            self.out.clear();
            if !self.zout.is_empty() {
                self.stream.write_all(&self.zout).await?;
                self.zout.clear();
                // A large response grew it; an idle session should not keep that.
                if self.zout.capacity() > 64 * 1024 {
                    self.zout = Vec::new();
                }
            }
            return self.stream.flush().await;
        }
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        self.stream.flush().await
    }

    /// Writes large data directly (after what is queued), without copying it into the queue.
    pub async fn write_direct(&mut self, data: &[u8]) -> io::Result<()> {
        if let Some(z) = self.deflate.as_mut() {
            z.deflate(&self.out, false, &mut self.zout)?;
            self.out.clear();
            // In slices, so the compressed copy is never held whole; the sync flush comes with
            // the next `flush`.
            for chunk in data.chunks(super::compress::DEFLATE_SLICE) {
                z.deflate(chunk, false, &mut self.zout)?;
                if !self.zout.is_empty() {
                    self.stream.write_all(&self.zout).await?;
                    self.zout.clear();
                }
            }
            if !self.zout.is_empty() {
                self.stream.write_all(&self.zout).await?;
                self.zout.clear();
            }
            return Ok(());
        }
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        self.stream.write_all(data).await
    }

    /// Upgrades to TLS in place. Anything the client sent after the STARTTLS command in the
    /// clear is dropped: it must not run as if it had come over TLS (CVE-2011-0411, RFC 3207
    /// §4.2). After a failed handshake the connection is closed.
    pub async fn start_tls(&mut self, acceptor: &TlsAcceptor, timeout: Duration) -> io::Result<()> {
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Closed) else {
            return Err(io::Error::other("not a plain connection"));
        };
        self.buf.clear();
        self.start = 0;
        self.out.clear();
        let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout"))??;
        self.tls = Some(tls_info(&tls));
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// The session's keying material for cluster authentication (None in the clear).
    pub fn cluster_binding(&self) -> Option<crate::cluster::Binding> {
        match &self.stream {
            Stream::Tls(s) => crate::cluster::binding(s.get_ref().1),
            _ => None,
        }
    }

    pub async fn shutdown(&mut self) {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

pub fn tls_info(s: &TlsStream<TcpStream>) -> TlsInfo {
    describe_tls(s.get_ref().1)
}

/// Version and cipher names of a TLS connection, server or client side, as logs and Received
/// headers show them.
pub fn describe_tls<D>(conn: &rustls::ConnectionCommon<D>) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "unknown".to_string(),
    };
    let cipher = conn.negotiated_cipher_suite().and_then(|c| c.suite().as_str()).unwrap_or("unknown").to_string();
    TlsInfo { version, cipher }
}

/// Accepts an implicit-TLS connection (ports 465, 993).
pub async fn accept_tls(tcp: TcpStream, acceptor: &TlsAcceptor, timeout: Duration) -> io::Result<Conn> {
    let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout"))??;
    Ok(Conn::new(Stream::Tls(Box::new(tls))))
}
