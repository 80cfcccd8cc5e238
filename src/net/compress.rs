//! Raw DEFLATE (RFC 1951, no zlib header) in both directions of a connection, for IMAP
//! COMPRESS=DEFLATE (RFC 4978). Level 1: level 6 costs ten times the CPU for a 20% smaller
//! stream (docs/design/imap-plan.md §3), and the server answers big FETCHes under a time budget.
//!
//! Memory stays bounded whatever the peer sends: compressed input is read only once the previous
//! read has been inflated entirely, and one inflate call produces at most the output room the
//! caller gives, so a small "zip bomb" expands a block at a time under the same line and literal
//! limits as uncompressed input.

use std::io;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Input is compressed in slices of this size, so that the compressed copy of a large response
/// is written out piece by piece rather than held whole.
pub(super) const DEFLATE_SLICE: usize = 64 * 1024;

pub(super) struct Deflate {
    out: Compress,
    input: Decompress,
    /// Compressed bytes received and not yet inflated.
    raw: Vec<u8>,
    raw_start: usize,
    /// Data went into the compressor since the last sync flush.
    dirty: bool,
    /// The peer ended its deflate stream (a final block): nothing more can follow.
    ended: bool,
}

fn corrupt<E: std::fmt::Display>(e: E) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("deflate: {e}"))
}

impl Deflate {
    /// `pending` is input that arrived after the command that switched compression on: it is
    /// already compressed (RFC 4978 §4, the same pitfall as STARTTLS pipelining).
    pub(super) fn new(pending: &[u8]) -> Self {
        Deflate {
            out: Compress::new(Compression::new(1), false),
            input: Decompress::new(false),
            raw: pending.to_vec(),
            raw_start: 0,
            dirty: false,
            ended: false,
        }
    }

    pub(super) fn ended(&self) -> bool {
        self.ended
    }

    /// True when every compressed byte received has gone through the inflater, so reading
    /// more from the socket keeps `raw` within one read block.
    pub(super) fn wants_input(&self) -> bool {
        self.raw_start == self.raw.len()
    }

    /// Appends compressed bytes read from the socket.
    pub(super) fn raw_buffer(&mut self) -> &mut Vec<u8> {
        if self.raw_start == self.raw.len() {
            self.raw.clear();
            self.raw_start = 0;
        }
        &mut self.raw
    }

    /// Inflates buffered input, appending at most `max` bytes to `buf`; returns how many.
    pub(super) fn inflate(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        let len = buf.len();
        buf.resize(len + max, 0);
        let mut produced = 0;
        while produced < max && !self.ended {
            let (in0, out0) = (self.input.total_in(), self.input.total_out());
            let status = self.input.decompress(
                &self.raw[self.raw_start..],
                &mut buf[len + produced..len + max],
                FlushDecompress::None,
            );
            let status = match status {
                Ok(s) => s,
                Err(e) => {
                    buf.truncate(len + produced);
                    return Err(corrupt(e));
                }
            };
            let used = (self.input.total_in() - in0) as usize;
            let made = (self.input.total_out() - out0) as usize;
            self.raw_start += used;
            produced += made;
            if status == Status::StreamEnd {
                self.ended = true;
            }
            if used == 0 && made == 0 {
                break;
            }
        }
        buf.truncate(len + produced);
        if self.ended && !self.wants_input() {
            // RFC 4978 §4 has no way to stop compressing; bytes after a final block are garbage.
            return Err(corrupt("data after the end of the stream"));
        }
        if produced == 0 && !self.wants_input() && !self.ended {
            // Input left, room to write, and still no progress: the inflater is stuck.
            return Err(corrupt("no progress"));
        }
        Ok(produced)
    }

    /// Compresses `data` onto `dst`. With `sync`, ends with a sync flush (Z_SYNC_FLUSH: an
    /// empty stored block) so the peer can inflate everything sent so far; a sync flush with
    /// nothing new since the last one writes nothing.
    pub(super) fn deflate(&mut self, data: &[u8], sync: bool, dst: &mut Vec<u8>) -> io::Result<()> {
        if !data.is_empty() {
            self.dirty = true;
        }
        let sync = sync && self.dirty;
        let mode = if sync { FlushCompress::Sync } else { FlushCompress::None };
        let mut input = data;
        loop {
            dst.reserve(input.len().min(DEFLATE_SLICE) / 2 + 1024);
            let room = dst.capacity() - dst.len();
            let (in0, len0) = (self.out.total_in(), dst.len());
            self.out.compress_vec(input, dst, mode).map_err(corrupt)?;
            input = &input[(self.out.total_in() - in0) as usize..];
            let wrote = dst.len() - len0;
            // Done when all input is taken and, for a sync flush, the output was not cut short
            // by the room given (zlib's "avail_out != 0" rule).
            if input.is_empty() && (!sync || wrote < room) {
                break;
            }
        }
        if sync {
            self.dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflate_all(d: &mut Deflate) -> Vec<u8> {
        let mut buf = Vec::new();
        loop {
            let n = d.inflate(&mut buf, 1000).unwrap();
            if n == 0 {
                return buf;
            }
        }
    }

    #[test]
    fn round_trip_with_sync_flushes() {
        let mut tx = Deflate::new(b"");
        let mut wire = Vec::new();
        tx.deflate(b"* OK first\r\n", true, &mut wire).unwrap();
        let first = wire.len();
        // A flush with nothing new adds nothing (IDLE flushes every 200 ms).
        tx.deflate(b"", true, &mut wire).unwrap();
        assert_eq!(wire.len(), first);
        // Sync flush ends on the empty stored block 00 00 ff ff.
        assert_eq!(&wire[first - 4..], &[0, 0, 0xff, 0xff]);
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        tx.deflate(&big, true, &mut wire).unwrap();

        let mut rx = Deflate::new(&wire[..first]);
        assert_eq!(inflate_all(&mut rx), b"* OK first\r\n");
        rx.raw_buffer().extend_from_slice(&wire[first..]);
        assert_eq!(inflate_all(&mut rx), big);
    }

    #[test]
    fn bomb_is_inflated_a_bounded_piece_at_a_time() {
        let mut tx = Deflate::new(b"");
        let mut wire = Vec::new();
        tx.deflate(&vec![b'a'; 50 << 20], true, &mut wire).unwrap();
        assert!(wire.len() < 300_000, "{}", wire.len());
        let mut rx = Deflate::new(&wire);
        let mut buf = Vec::new();
        let mut total = 0;
        loop {
            buf.clear();
            let n = rx.inflate(&mut buf, 16 * 1024).unwrap();
            assert!(buf.len() <= 16 * 1024);
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 50 << 20);
    }

    #[test]
    fn garbage_is_an_error() {
        let mut rx = Deflate::new(&[0xff; 64]);
        assert!(rx.inflate(&mut Vec::new(), 1000).is_err());
    }
}
