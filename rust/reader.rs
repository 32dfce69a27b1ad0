//! `Reader`: one file, read with direct I/O, many requests in flight.
//!
//! Direct I/O (`O_DIRECT`) bypasses the page cache, as the paper does (F_NOCACHE / direct I/O):
//! the bytes we read are used once and copied into the neuron cache, and a page cache filling
//! with the model would steal the memory budget and make timings lie. A filesystem that refuses
//! `O_DIRECT` at open (EINVAL; ramfs, older tmpfs, some FUSE) gets buffered reads followed by
//! `posix_fadvise(DONTNEED)` on the range read, and the reader says so (`is_direct() == false`;
//! the Python binding warns). Direct reads need the file offset, the length and the destination
//! address 4 KiB aligned: a request that is not goes through the buffered descriptor, so every
//! request is served, only slower.
//!
//! Concurrency ([`Engine`]): io_uring driven by the calling thread for small batches
//! (reader/uring.rs), a persistent pool of threads doing blocking `pread`s for large ones
//! (reader/pool.rs, reader/pread.rs); reader/engine.rs picks one per batch. Where the kernel or
//! a seccomp filter refuses io_uring, `Engine::Auto` uses the threads only.
//!
//! A batch completes or fails as a whole: short reads are continued, EINTR is retried, and any
//! other failure (an I/O error, the end of the file before the request's end) makes the batch
//! call return that error, naming the file, the offset and the length. A region can be read
//! checked, each request hashed as it lands (reader/hashed.rs); reader/faults.rs is the
//! test-only hook that makes chosen reads fail, end, come back short or bring changed bytes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::aligned::{AlignedBuf, ALIGN};
use crate::error::{Error, Result};
use crate::stats::Stats;

mod engine;
#[doc(hidden)]
pub mod faults;
mod hashed;
mod pool;
mod pread;
mod uring;

use engine::Backend;
use hashed::Hashes;

/// Default number of reads in flight: where the disk profile's default table (fio random
/// direct reads on this project's reference machine) reaches the disk's throughput.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Upper bound on reads in flight (worker threads or ring entries) per reader.
pub const MAX_CONCURRENCY: usize = 1024;
/// Piece size for `read_region`: large enough for full bandwidth (1 MiB requests at 32 in
/// flight reach the disk's throughput in the default profile), small enough to spread a layer
/// over many reads in flight.
pub const REGION_PIECE: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct ReaderOptions {
    /// Reads in flight at once (1..=1024): pool threads, and io_uring's queue depth.
    pub concurrency: usize,
    /// Try `O_DIRECT` (falls back to buffered reads where the filesystem refuses it).
    pub direct: bool,
    pub engine: Engine,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions { concurrency: DEFAULT_CONCURRENCY, direct: true, engine: Engine::Auto }
    }
}

/// One read into a single destination slice: `len` bytes at `file_offset` to `dest[dest_offset..]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadOp {
    pub file_offset: u64,
    pub len: usize,
    pub dest_offset: usize,
}

/// One read to a raw destination (for callers that manage buffer lifetimes themselves, like the
/// Python binding with several `AlignedBuf`s, or a cache reading into its slot matrix).
#[derive(Debug, Clone, Copy)]
pub struct RawOp {
    pub file_offset: u64,
    pub len: usize,
    pub dest: *mut u8,
}

/// How a reader keeps many requests in flight.
///
/// Small batches (a layer's few dozen requests) are faster on io_uring: one system call submits
/// the first wave and no thread has to wake; large batches (a thousand requests or more) are as
/// fast or faster on the threads. `Auto` therefore uses io_uring for batches up to 4 x
/// concurrency requests and the pool for larger ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// io_uring for small batches and threads for large ones where the kernel allows io_uring
    /// (not disabled, not blocked by seccomp), else threads only.
    Auto,
    /// A persistent pool of `concurrency` threads, each doing blocking `pread`s.
    Threads,
    /// io_uring driven by the calling thread, `concurrency` reads in flight (error if unavailable).
    Uring,
}

/// The open file, shared by the reader and the batches in flight (pool workers hold an `Arc`).
struct Inner {
    path: PathBuf,
    direct: Option<File>,
    buffered: File,
    stats: Stats,
}

pub struct Reader {
    inner: Arc<Inner>,
    backend: Backend,
    concurrency: usize,
}

fn is_aligned(x: u64) -> bool {
    x % ALIGN as u64 == 0
}

impl Reader {
    /// Open `path` with the default options (O_DIRECT, 32 reads in flight, `Engine::Auto`).
    pub fn open(path: impl AsRef<Path>) -> Result<Reader> {
        Reader::open_with(path, ReaderOptions::default())
    }

    pub fn open_with(path: impl AsRef<Path>, opts: ReaderOptions) -> Result<Reader> {
        let path = path.as_ref().to_path_buf();
        if opts.concurrency == 0 || opts.concurrency > MAX_CONCURRENCY {
            return Err(Error::invalid(format!(
                "concurrency = {} (expected 1..={MAX_CONCURRENCY} reads in flight)",
                opts.concurrency
            )));
        }
        let buffered = File::open(&path).map_err(|source| Error::Open { path: path.clone(), source })?;
        if !buffered.metadata().map(|m| m.is_file()).unwrap_or(false) {
            return Err(Error::Open {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let direct = if opts.direct {
            match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path) {
                Ok(f) => Some(f),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None, // filesystem refuses
                Err(source) => return Err(Error::Open { path, source }),
            }
        } else {
            None
        };
        let backend =
            Backend::new(opts.engine, opts.concurrency).map_err(|source| Error::Open { path: path.clone(), source })?;
        Ok(Reader {
            inner: Arc::new(Inner { path, direct, buffered, stats: Stats::default() }),
            backend,
            concurrency: opts.concurrency,
        })
    }

    /// The engine in use: `Auto` (io_uring and threads), `Threads` or `Uring`.
    pub fn engine(&self) -> Engine {
        self.backend.engine()
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether reads bypass the page cache (O_DIRECT accepted by the filesystem).
    pub fn is_direct(&self) -> bool {
        self.inner.direct.is_some()
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// The file's current size.
    pub fn file_len(&self) -> Result<u64> {
        self.inner.buffered.metadata().map(|m| m.len()).map_err(|source| Error::Read {
            path: self.inner.path.clone(),
            offset: 0,
            len: 0,
            source,
        })
    }

    /// Run `ops`, all writing into `dest`; return when every one has completed, or the first
    /// error. Destination ranges must lie inside `dest` and not overlap.
    pub fn read_into(&self, ops: &[ReadOp], dest: &mut [u8]) -> Result<()> {
        let mut ranges: Vec<(usize, usize)> = Vec::with_capacity(ops.len());
        for op in ops {
            let end = op.dest_offset.checked_add(op.len).filter(|&e| e <= dest.len()).ok_or_else(|| {
                Error::invalid(format!(
                    "read of {} bytes at offset {} into destination offset {} overflows the {}-byte destination",
                    op.len,
                    op.file_offset,
                    op.dest_offset,
                    dest.len()
                ))
            })?;
            ranges.push((op.dest_offset, end));
        }
        check_disjoint(&mut ranges)?;
        let base = dest.as_mut_ptr();
        let raw: Vec<RawOp> = ops
            .iter()
            // SAFETY: dest_offset + len <= dest.len() was checked above, so the pointer stays
            // inside (or one past) the destination slice.
            .map(|op| RawOp { file_offset: op.file_offset, len: op.len, dest: unsafe { base.add(op.dest_offset) } })
            .collect();
        // SAFETY: every destination range lies inside `dest` and they are pairwise disjoint; the
        // exclusive borrow of `dest` keeps the memory alive and unaliased until read_raw returns,
        // and read_raw returns only after every read has finished with it.
        unsafe { self.read_raw(&raw) }
    }

    /// Run `ops` against raw destinations.
    ///
    /// # Safety
    /// Each `dest .. dest + len` must be valid for writes, not overlap another op's range, and
    /// not be read or written by anyone else until this call returns.
    pub unsafe fn read_raw(&self, ops: &[RawOp]) -> Result<()> {
        // Longest requests first: the batch ends when its last request does, and small requests
        // issued last fill the workers evenly (LPT scheduling) instead of one big read straggling
        // alone at the end while the other workers idle.
        let mut ops = ops.to_vec();
        ops.sort_by_key(|op| std::cmp::Reverse(op.len));
        // SAFETY: forwarded from this function's contract.
        unsafe { self.run_batch(ops, None) }
    }

    /// Read `len` bytes at `offset` into a new aligned buffer, as ~1 MiB requests in parallel.
    pub fn read_region(&self, offset: u64, len: usize) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(len)?;
        self.read_into(&region_pieces(offset, len), buf.as_mut_slice())?;
        Ok(buf)
    }
}

/// `len` bytes at `offset` as `REGION_PIECE` requests, back to back from destination offset 0.
fn region_pieces(offset: u64, len: usize) -> Vec<ReadOp> {
    (0..len.div_ceil(REGION_PIECE))
        .map(|k| {
            let start = k * REGION_PIECE;
            ReadOp { file_offset: offset + start as u64, len: REGION_PIECE.min(len - start), dest_offset: start }
        })
        .collect()
}

/// Check that half-open ranges `[start, end)` (destination offsets or addresses) do not overlap.
pub fn check_disjoint(ranges: &mut [(usize, usize)]) -> Result<()> {
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 && w[1].0 < w[1].1 {
            return Err(Error::invalid(format!(
                "destination ranges [{}, {}) and [{}, {}) overlap",
                w[0].0, w[0].1, w[1].0, w[1].1
            )));
        }
    }
    Ok(())
}

impl Inner {
    fn eof(&self, op: RawOp, got: usize) -> Error {
        Error::Eof {
            path: self.path.clone(),
            offset: op.file_offset,
            len: op.len as u64,
            got: got as u64,
            file_len: self.buffered.metadata().ok().map(|m| m.len()),
        }
    }

    /// Tell the kernel we will not read these pages again (buffered fallback only), so a model
    /// streamed through the page cache does not fill memory with it.
    fn drop_cached(&self, offset: u64, len: u64) {
        // SAFETY: plain system call on a descriptor kept open by self; no memory is passed.
        unsafe {
            libc::posix_fadvise(
                self.buffered.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_faults;
