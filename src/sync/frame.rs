//! Frames on a replication link: a `u32` big-endian length, then that many bytes of a postcard
//! [`Frame`]. A length over the limit closes the connection before anything is allocated, so a
//! peer (or anyone before authentication, with a smaller limit) cannot make a node buffer more
//! than one frame's worth.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest frame on an authenticated link (docs/design/replication-plan.md §3.1).
pub const MAX_FRAME: usize = 1 << 20;

/// The largest frame before authentication: an `Auth` is a node name and 32 bytes.
pub const MAX_AUTH_FRAME: usize = 1024;

/// The link's protocol version, sent in [`Frame::Hello`].
pub const PROTO: u32 = 1;

/// New variants go at the end: postcard numbers them in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Client → server, first frame: `node` proves the cluster secret over this TLS session.
    Auth {
        node: String,
        mac: Vec<u8>,
    },
    /// Server → client: the server's own proof for that node and session.
    AuthOk {
        mac: Vec<u8>,
    },
    /// Both ways after authentication. `config_fp` is the SHA-256 of the parts of the config
    /// that must match (`super::fingerprint`); `hlc` is the sender's clock (milliseconds in the
    /// high 48 bits), to warn about skew.
    Hello {
        proto: u32,
        node: String,
        config_fp: [u8; 32],
        hlc: u64,
    },
    /// Liveness, both ways every few seconds; answered by `Pong` with the same value.
    Ping {
        hlc: u64,
    },
    Pong {
        hlc: u64,
    },
    /// Replication itself (`super::engine`), once HELLO has matched.
    Sync(super::engine::Msg),
}

#[derive(Debug)]
pub enum FrameError {
    Io(std::io::Error),
    /// The length prefix says more than the limit.
    TooLarge(usize),
    /// The bytes are not a frame of this protocol version.
    Garbage,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => f.write_str("connection closed"),
            FrameError::Io(e) => write!(f, "{e}"),
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes is over the limit"),
            FrameError::Garbage => f.write_str("undecodable frame"),
        }
    }
}

/// The frame with its length prefix.
pub fn encode(frame: &Frame) -> Vec<u8> {
    // Serializing our own enum into a Vec cannot fail.
    let body = postcard::to_allocvec(frame).unwrap_or_default();
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// A frame body (without the prefix); anything else, trailing bytes included, is garbage.
pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
    match postcard::take_from_bytes::<Frame>(body) {
        Ok((frame, [])) => Ok(frame),
        _ => Err(FrameError::Garbage),
    }
}

/// Reads one frame of at most `limit` bytes.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, limit: usize) -> Result<Frame, FrameError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await.map_err(FrameError::Io)?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > limit {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(FrameError::Io)?;
    decode(&body)
}

pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    w.write_all(&encode(frame)).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::Auth { node: "mail2".into(), mac: vec![7; 32] },
            Frame::AuthOk { mac: vec![1; 32] },
            Frame::Hello { proto: PROTO, node: "mail".into(), config_fp: [9; 32], hlc: u64::MAX },
            Frame::Ping { hlc: 1 },
            Frame::Pong { hlc: 0 },
        ]
    }

    async fn read_all(mut bytes: &[u8], limit: usize) -> Vec<Result<Frame, String>> {
        let mut out = Vec::new();
        loop {
            match read(&mut bytes, limit).await {
                Ok(f) => out.push(Ok(f)),
                Err(FrameError::Io(_)) if bytes.is_empty() => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn frames_round_trip_back_to_back() {
        let stream: Vec<u8> = frames().iter().flat_map(encode).collect();
        let got: Vec<Frame> = read_all(&stream, MAX_FRAME).await.into_iter().map(Result::unwrap).collect();
        assert_eq!(got, frames());
    }

    #[tokio::test]
    async fn truncated_input_is_an_error_at_every_cut() {
        let bytes = encode(&frames()[2]);
        for cut in 0..bytes.len() {
            let mut part = &bytes[..cut];
            assert!(read(&mut part, MAX_FRAME).await.is_err(), "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_reading_the_body() {
        let mut bytes: &[u8] = &[0x00, 0x10, 0x00, 0x01, 1, 2, 3];
        assert!(matches!(read(&mut bytes, MAX_FRAME).await, Err(FrameError::TooLarge(0x100001))));
        // Nothing of the body was consumed: the caller closes the connection.
        assert_eq!(bytes.len(), 3);
        let mut huge: &[u8] = &[0xff; 4];
        assert!(matches!(read(&mut huge, MAX_FRAME).await, Err(FrameError::TooLarge(_))));
        let auth = encode(&Frame::Auth { node: "x".repeat(2000), mac: vec![0; 32] });
        assert!(matches!(read(&mut auth.as_slice(), MAX_AUTH_FRAME).await, Err(FrameError::TooLarge(_))));
    }

    #[tokio::test]
    async fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        // An unknown variant, trailing bytes, an empty body, a string that is not UTF-8.
        for body in [&[9u8][..], &[3, 1, 0], &[], &[0, 2, 0xff, 0xfe, 0]] {
            assert!(matches!(decode(body), Err(FrameError::Garbage)), "{body:?}");
        }
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let body: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = decode(&body);
            let mut framed = (len as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(&body);
            let _ = read(&mut framed.as_slice(), MAX_FRAME).await;
        }
        // Valid frames with bytes flipped.
        for frame in frames() {
            let bytes = encode(&frame);
            for i in 4..bytes.len() {
                let mut bent = bytes.clone();
                bent[i] ^= 0x80;
                let _ = read(&mut bent.as_slice(), MAX_FRAME).await;
            }
        }
    }
}
