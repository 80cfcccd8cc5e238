//! Message bodies: written in fixed-size chunks while they arrive and read back one chunk at a
//! time, so a 50 MB message never sits whole in a session's memory. A body is named by its
//! BLAKE3 hash; `Store::commit_*` decides, under the write lock, whether the hash already exists
//! (then the new chunks are dropped and the old body gains a reference).

use super::{keys, Result, Store};

/// Removes every chunk of a body (ids are never reused, so the range is exact).
pub(super) fn remove_chunks(chunks: &sled::Tree, id: u64) -> Result<()> {
    let keys: Vec<_> = chunks.range(keys::chunk(id, 0)..keys::chunk(id + 1, 0)).keys().collect::<sled::Result<_>>()?;
    for k in keys {
        chunks.remove(k)?;
    }
    Ok(())
}

/// Where fields go that belong at the top: after a leading `Return-Path:` line, else at 0.
fn after_return_path(data: &[u8]) -> usize {
    if data.len() >= 12 && data[..12].eq_ignore_ascii_case(b"return-path:") {
        if let Some(end) = data.windows(2).position(|w| w == b"\r\n") {
            return end + 2;
        }
    }
    0
}

/// Chunk size: big enough that a typical message is one chunk, small enough to bound memory.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// A body being written. Dropping it without `finish` removes what was written.
pub struct BlobWriter {
    meta: sled::Tree,
    chunks_tree: sled::Tree,
    id: u64,
    buf: Vec<u8>,
    chunks: u32,
    size: u64,
    hasher: blake3::Hasher,
    eight_bit: bool,
    marked: bool,
    done: bool,
}

/// A complete body whose chunks are written but not yet referenced by any entry.
#[derive(Debug)]
pub struct PendingBlob {
    pub(super) id: u64,
    pub hash: [u8; 32],
    pub size: u64,
    /// Some byte has the high bit set: sending it on needs BODY=8BITMIME (RFC 6152).
    pub eight_bit: bool,
    pub(super) chunks: u32,
}

impl BlobWriter {
    pub(super) fn new(store: &Store) -> Result<Self> {
        Ok(BlobWriter {
            meta: store.meta.clone(),
            chunks_tree: store.chunks.clone(),
            id: store.db.generate_id()?,
            buf: Vec::new(),
            chunks: 0,
            size: 0,
            hasher: blake3::Hasher::new(),
            eight_bit: false,
            marked: false,
            done: false,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Everything written so far, in order: for checks that need the whole message before it is
    /// committed (DKIM signing and verification). Bounded by the message size limit.
    pub fn contents(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.size as usize);
        for chunk in self.chunks_tree.range(keys::chunk(self.id, 0)..keys::chunk(self.id, self.chunks)).values() {
            out.extend_from_slice(&chunk?);
        }
        out.extend_from_slice(&self.buf);
        Ok(out)
    }

    /// Puts `fields` (complete header lines) at the top of what was written, below a leading
    /// `Return-Path:` line (which stays first: delivery strips it before relaying). Free while
    /// the message is still in the first chunk, which is most mail; a longer one is copied
    /// behind them into a new body, since stored chunks are never rewritten in place.
    pub fn prepend(mut self, store: &Store, fields: &[u8]) -> Result<BlobWriter> {
        if fields.is_empty() {
            return Ok(self);
        }
        if self.chunks == 0 {
            let buf = std::mem::take(&mut self.buf);
            self.size = 0;
            self.hasher = blake3::Hasher::new();
            self.eight_bit = false;
            let at = after_return_path(&buf);
            self.write(&buf[..at])?;
            self.write(fields)?;
            self.write(&buf[at..])?;
            return Ok(self);
        }
        let mut fresh = BlobWriter::new(store)?;
        let mut first = true;
        for chunk in self.chunks_tree.range(keys::chunk(self.id, 0)..keys::chunk(self.id, self.chunks)).values() {
            let chunk = chunk?;
            let at = if std::mem::take(&mut first) { after_return_path(&chunk) } else { 0 };
            fresh.write(&chunk[..at])?;
            if at > 0 || fresh.size == 0 {
                fresh.write(fields)?;
            }
            fresh.write(&chunk[at..])?;
        }
        fresh.write(&self.buf)?;
        // Dropping `self` removes its chunks.
        Ok(fresh)
    }

    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        self.size += data.len() as u64;
        self.hasher.update(data);
        self.eight_bit = self.eight_bit || !data.is_ascii();
        while !data.is_empty() {
            let room = CHUNK_SIZE - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == CHUNK_SIZE {
                self.flush_chunk()?;
            }
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> Result<()> {
        if !self.marked {
            // The marker lets recovery find chunks of a body that never got committed.
            self.meta.insert(keys::pending_blob(self.id), &[])?;
            self.marked = true;
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK_SIZE));
        self.chunks_tree.insert(keys::chunk(self.id, self.chunks), chunk)?;
        self.chunks += 1;
        Ok(())
    }

    /// Leaves the written chunks in place as a crash would (for recovery tests).
    #[cfg(test)]
    pub(crate) fn abandon(mut self) {
        self.done = true;
    }

    pub fn finish(mut self) -> Result<PendingBlob> {
        if !self.buf.is_empty() || self.chunks == 0 {
            self.flush_chunk()?;
        }
        self.done = true;
        Ok(PendingBlob {
            id: self.id,
            hash: *self.hasher.finalize().as_bytes(),
            size: self.size,
            eight_bit: self.eight_bit,
            chunks: self.chunks,
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.done && self.marked {
            // Best effort: recovery at the next start removes whatever this leaves behind.
            let _ = remove_chunks(&self.chunks_tree, self.id);
            let _ = self.meta.remove(keys::pending_blob(self.id));
        }
    }
}

/// Reads a body chunk by chunk.
pub struct BlobReader {
    iter: sled::Iter,
}

impl BlobReader {
    pub(super) fn new(store: &Store, id: u64) -> Self {
        BlobReader { iter: store.chunks.range(keys::chunk(id, 0)..keys::chunk(id + 1, 0)) }
    }
}

impl Iterator for BlobReader {
    type Item = Result<sled::IVec>;
    fn next(&mut self) -> Option<Self::Item> {
        self.iter.next().map(|r| r.map(|(_, v)| v).map_err(Into::into))
    }
}
