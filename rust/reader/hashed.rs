//! Reads whose bytes are checked as they land: each request's CRC-32 is taken by whoever
//! completes it (a pool worker right after its `pread`s, or the io_uring thread at its
//! completion, while the batch's other reads are still in flight), then the per-request CRCs are
//! combined in order into the CRC-32 of the whole range (`crc32fast::Hasher::combine`). So a
//! region read whole is checked against its recorded CRC-32 on every read, for about the cost of
//! hashing it once spread over the reads, not a second pass after them.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::{region_pieces, RawOp, Reader};
use crate::error::{Error, Result};

/// Per-op hash lengths and results of one batch, indexed like the batch's (sorted) ops.
pub(super) struct Hashes {
    lens: Vec<usize>,
    crcs: Vec<AtomicU32>,
}

impl Hashes {
    /// Hash the first `lens[i]` bytes of op `i`, which has just completed.
    ///
    /// # Safety
    /// `op.dest .. op.dest + op.len` holds the op's bytes, read in full, and nobody writes it
    /// until the batch returns; `lens[i] <= op.len` (checked when the batch was built).
    pub(super) unsafe fn record(&self, i: usize, op: RawOp) {
        let n = self.lens[i].min(op.len);
        if n > 0 {
            // SAFETY: the caller's contract: n <= op.len bytes at op.dest, complete and unshared.
            let bytes = unsafe { std::slice::from_raw_parts(op.dest, n) };
            self.crcs[i].store(crc32fast::hash(bytes), Ordering::Relaxed);
        }
    }
}

impl Reader {
    /// Run `ops` as `read_raw` does, and return the CRC-32 of the first `hash_lens[i]` bytes of
    /// each op `i` (0 for an empty prefix), in the order of `ops`.
    ///
    /// # Safety
    /// As `read_raw`.
    pub unsafe fn read_raw_hashed(&self, ops: &[RawOp], hash_lens: &[usize]) -> Result<Vec<u32>> {
        if hash_lens.len() != ops.len() {
            return Err(Error::invalid(format!("{} hash lengths for {} reads", hash_lens.len(), ops.len())));
        }
        if let Some((op, n)) = ops.iter().zip(hash_lens).find(|(op, &n)| n > op.len) {
            return Err(Error::invalid(format!(
                "hash of {n} bytes over a read of {} bytes at offset {}",
                op.len, op.file_offset
            )));
        }
        // Longest first, as read_raw does; `order[k]` is the caller's index of sorted op k.
        let mut order: Vec<usize> = (0..ops.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(ops[i].len));
        let sorted: Vec<RawOp> = order.iter().map(|&i| ops[i]).collect();
        let hashes = Arc::new(Hashes {
            lens: order.iter().map(|&i| hash_lens[i]).collect(),
            crcs: (0..ops.len()).map(|_| AtomicU32::new(0)).collect(),
        });
        // SAFETY: forwarded from this function's contract.
        unsafe { self.run_batch(sorted, Some(hashes.clone())) }?;
        // The batch has returned: every record() happened-before (pool: the batch's completion
        // count and lock; io_uring: this thread).
        let mut out = vec![0u32; ops.len()];
        for (k, &i) in order.iter().enumerate() {
            out[i] = hashes.crcs[k].load(Ordering::Relaxed);
        }
        Ok(out)
    }

    /// Read `dest.len()` bytes at `offset` into `dest` as ~1 MiB requests in parallel and return
    /// the CRC-32 of the first `hash_len` bytes, hashed request by request as the reads complete.
    pub fn read_region_crc(&self, offset: u64, dest: &mut [u8], hash_len: usize) -> Result<u32> {
        let len = dest.len();
        // SAFETY: `dest` is valid for `len` bytes of writes and exclusively borrowed until this
        // returns.
        unsafe { self.read_region_crc_raw(offset, len, dest.as_mut_ptr(), hash_len) }
    }

    /// As `read_region_crc`, into `len` bytes at `dest`.
    ///
    /// # Safety
    /// `dest .. dest + len` must be valid for writes and not be read or written by anyone else
    /// until this call returns.
    pub unsafe fn read_region_crc_raw(&self, offset: u64, len: usize, dest: *mut u8, hash_len: usize) -> Result<u32> {
        if hash_len > len {
            return Err(Error::invalid(format!("hash of {hash_len} bytes over a region of {len} bytes")));
        }
        if offset.checked_add(len as u64).is_none() {
            return Err(Error::invalid(format!("region of {len} bytes at offset {offset} ends past 2^64")));
        }
        let pieces = region_pieces(offset, len);
        let lens: Vec<usize> = pieces.iter().map(|p| hash_len.saturating_sub(p.dest_offset).min(p.len)).collect();
        let ops: Vec<RawOp> = pieces
            .iter()
            // SAFETY: dest_offset + len <= len by construction: inside the caller's destination.
            .map(|p| RawOp { file_offset: p.file_offset, len: p.len, dest: unsafe { dest.add(p.dest_offset) } })
            .collect();
        // SAFETY: the pieces are disjoint parts of the caller's destination (its contract).
        let crcs = unsafe { self.read_raw_hashed(&ops, &lens) }?;
        Ok(combine(crcs.iter().zip(&lens).map(|(&c, &n)| (c, n as u64))))
    }

    /// Read a region as `read_region_crc` does and check it: `Error::Corrupt` naming the file,
    /// `what` (e.g. "layer 3's region") and `offset` unless the CRC-32 of its first `hash_len`
    /// bytes is `expect`.
    pub fn read_region_checked(
        &self,
        offset: u64,
        dest: &mut [u8],
        hash_len: usize,
        expect: u32,
        what: &str,
    ) -> Result<()> {
        let got = self.read_region_crc(offset, dest, hash_len)?;
        self.check_crc(offset, hash_len, got, expect, what)
    }

    /// `Error::Corrupt` for `hash_len` bytes at `offset` whose CRC-32 is `got`, not `expect`.
    pub fn check_crc(&self, offset: u64, hash_len: usize, got: u32, expect: u32, what: &str) -> Result<()> {
        if got == expect {
            return Ok(());
        }
        Err(Error::Corrupt {
            path: self.path().to_path_buf(),
            offset,
            what: format!(
                "checksum mismatch in {what} ({hash_len} payload bytes: crc32 {got:#010x}, expected {expect:#010x})"
            ),
        })
    }
}

/// The CRC-32 of consecutive blocks given each block's CRC-32 and length.
pub(super) fn combine(blocks: impl IntoIterator<Item = (u32, u64)>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (crc, len) in blocks {
        if len > 0 {
            h.combine(&crc32fast::Hasher::new_with_initial_len(crc, len));
        }
    }
    h.finalize()
}
