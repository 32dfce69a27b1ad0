//! `Reader`: one file, read with direct I/O by a persistent pool of `pread` workers.
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
//! Concurrency: threads + `pread`, not io_uring. DESIGN §3 measured io_uring at queue depth 128
//! giving about the same throughput as 32 psync threads on this disk; threads need no extra
//! crate, work on every kernel and container (io_uring is often disabled by seccomp), and the
//! measured engine/fio ratio in benches/README.md shows they reach the disk's limit.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::aligned::{AlignedBuf, ALIGN};
use crate::error::{Error, Result};
use crate::planner::Plan;
use crate::pool::{BatchJob, Pool};
use crate::stats::Stats;

#[doc(hidden)]
pub mod faults;
mod hashed;
pub(crate) use hashed::Hashes;

/// Default number of reads in flight: where DESIGN §3's table saturates the disk.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Upper bound on worker threads per reader.
pub const MAX_CONCURRENCY: usize = 1024;
/// Piece size for `read_region`: large enough for full bandwidth (DESIGN §3: 1 MiB requests
/// reach 2 GB/s at 32 threads), small enough to spread a layer over many workers.
pub const REGION_PIECE: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct ReaderOptions {
    /// Worker threads, i.e. reads in flight at once (1..=1024).
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

pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    pub(crate) direct: Option<File>,
    pub(crate) buffered: File,
    pub(crate) stats: Stats,
}

/// How a reader keeps many requests in flight.
///
/// Measured here (benches/README.md; batches timed in alternation, same plans, 32 in flight):
/// layer batches of ~57 requests (SmolLM2 bundles, 10% wanted) took 7-9% less time on io_uring
/// than on the thread pool (no 32-thread wake-up per batch); batches of ~1,300 requests (16 KiB
/// bundles) were equal or up to 5% faster on threads. `Auto` therefore uses io_uring for
/// batches up to 4 x concurrency requests and the pool for larger ones.
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

/// Rings are reused across batches; concurrent batches (several calling threads) each take
/// their own ring, so each has `concurrency` reads in flight.
struct Backend {
    pool: Option<Pool>,
    rings: Option<Mutex<Vec<io_uring::IoUring>>>,
}

/// Batches up to this many times the concurrency go to io_uring under `Engine::Auto`.
const URING_MAX_WAVES: usize = 4;

pub struct Reader {
    inner: Arc<Inner>,
    backend: Backend,
    concurrency: usize,
}

fn is_aligned(x: u64) -> bool {
    x % ALIGN as u64 == 0
}

impl Reader {
    /// Open `path` with the default options (O_DIRECT, 32 reads in flight).
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
        let ring = match opts.engine {
            Engine::Threads => None,
            Engine::Auto => crate::uring::new_ring(opts.concurrency).ok(),
            Engine::Uring => Some(
                crate::uring::new_ring(opts.concurrency)
                    .map_err(|source| Error::Open { path: path.clone(), source })?,
            ),
        };
        let pool = if opts.engine == Engine::Uring {
            None
        } else {
            Some(
                Pool::new(opts.concurrency, "llmflash-io")
                    .map_err(|source| Error::Open { path: path.clone(), source })?,
            )
        };
        let backend = Backend { pool, rings: ring.map(|r| Mutex::new(vec![r])) };
        Ok(Reader {
            inner: Arc::new(Inner { path, direct, buffered, stats: Stats::default() }),
            backend,
            concurrency: opts.concurrency,
        })
    }

    /// The engine in use: `Auto` (io_uring and threads), `Threads` or `Uring`.
    pub fn engine(&self) -> Engine {
        match (&self.backend.pool, &self.backend.rings) {
            (Some(_), Some(_)) => Engine::Auto,
            (Some(_), None) => Engine::Threads,
            _ => Engine::Uring,
        }
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
        // and read_raw returns only after every worker has finished with it.
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

    /// Run `ops` (longest first) on the engine; with `hashes`, each op's CRC-32 is taken as it
    /// completes (`hashes` is indexed like `ops`).
    ///
    /// # Safety
    /// As `read_raw`.
    pub(crate) unsafe fn run_batch(&self, ops: Vec<RawOp>, hashes: Option<Arc<Hashes>>) -> Result<()> {
        let t0 = Instant::now();
        for op in &ops {
            if op.file_offset.checked_add(op.len as u64).is_none() {
                return Err(Error::invalid(format!(
                    "read of {} bytes at offset {} overflows a 64-bit file offset",
                    op.len, op.file_offset
                )));
            }
        }
        let use_ring = ops.len() <= URING_MAX_WAVES * self.concurrency;
        let result = match (&self.backend.pool, &self.backend.rings) {
            (_, Some(rings)) if use_ring || self.backend.pool.is_none() => {
                let ring = rings.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let mut ring = match ring {
                    Some(r) => r,
                    None => crate::uring::new_ring(self.concurrency).map_err(|source| Error::Read {
                        path: self.inner.path.clone(),
                        offset: ops.first().map_or(0, |o| o.file_offset),
                        len: 0,
                        source,
                    })?,
                };
                // SAFETY: forwarded from this function's contract.
                let r = unsafe { crate::uring::run(&mut ring, &self.inner, &ops, self.concurrency, hashes.as_deref()) };
                rings.lock().unwrap_or_else(|e| e.into_inner()).push(ring);
                r
            }
            (Some(pool), _) => {
                let job = Arc::new(ReadJob {
                    inner: self.inner.clone(),
                    ops,
                    hashes,
                    failed: AtomicBool::new(false),
                    error: Mutex::new(None),
                });
                pool.run(job.clone());
                let err = job.error.lock().unwrap_or_else(|e| e.into_inner()).take();
                err.map_or(Ok(()), Err)
            }
            (None, _) => Err(Error::invalid("this reader has no I/O engine")), // not constructible
        };
        self.inner.stats.add_batch(t0.elapsed().as_nanos() as u64);
        result
    }

    /// Read `len` bytes at `offset` into a new aligned buffer, as ~1 MiB requests in parallel.
    pub fn read_region(&self, offset: u64, len: usize) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(len)?;
        let pieces = len.div_ceil(REGION_PIECE);
        let ops: Vec<ReadOp> = (0..pieces)
            .map(|i| {
                let start = i * REGION_PIECE;
                ReadOp { file_offset: offset + start as u64, len: REGION_PIECE.min(len - start), dest_offset: start }
            })
            .collect();
        self.read_into(&ops, buf.as_mut_slice())?;
        Ok(buf)
    }

    /// Read a plan's requests into a new buffer of `plan.buffer_bytes` (requests back to back,
    /// at their `dest_offset`s); counts the plan's useful bytes in the stats.
    pub fn read_plan(&self, plan: &Plan) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::zeroed(plan.buffer_bytes as usize)?;
        self.read_plan_into(plan, buf.as_mut_slice())?;
        Ok(buf)
    }

    /// As `read_plan`, into a caller's destination of at least `plan.buffer_bytes` bytes
    /// (4 KiB aligned for direct I/O, e.g. an `AlignedBuf`; otherwise reads go buffered).
    pub fn read_plan_into(&self, plan: &Plan, dest: &mut [u8]) -> Result<()> {
        self.read_into(&plan.read_ops(), dest)?;
        self.inner.stats.add_useful(plan.useful_bytes);
        Ok(())
    }
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

struct ReadJob {
    inner: Arc<Inner>,
    ops: Vec<RawOp>,
    hashes: Option<Arc<Hashes>>,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
}

// SAFETY: the raw destination pointers are only written through, by one worker per op, and
// `Reader::read_raw`'s contract keeps them valid and unshared until the batch has finished
// (`Pool::run` returns only after every op ran); the rest of ReadJob is Send + Sync.
unsafe impl Send for ReadJob {}
// SAFETY: as for Send.
unsafe impl Sync for ReadJob {}

impl BatchJob for ReadJob {
    fn len(&self) -> usize {
        self.ops.len()
    }

    fn run(&self, i: usize) {
        if self.failed.load(Ordering::Relaxed) {
            return; // the batch has failed already: do not spend the disk on it
        }
        let op = self.ops[i];
        match self.inner.read_one(op) {
            Ok(()) => {
                self.inner.stats.add_read(op.len as u64);
                if let Some(h) = &self.hashes {
                    // SAFETY: op i has just been read in full, by this worker only.
                    unsafe { h.record(i, op) };
                }
            }
            Err(e) => {
                self.failed.store(true, Ordering::Relaxed);
                let mut slot = self.error.lock().unwrap_or_else(|e| e.into_inner());
                if slot.is_none() {
                    *slot = Some(e);
                }
            }
        }
    }
}

impl Inner {
    /// One request: loop over `pread` until `len` bytes are in, or fail.
    fn read_one(&self, op: RawOp) -> Result<()> {
        self.read_from(op, 0, false)
    }

    /// Finish `op` from byte `done` with blocking `pread`s (through the page cache if `buffered`
    /// or where the remaining range is not aligned for direct I/O).
    pub(crate) fn read_from(&self, op: RawOp, mut done: usize, mut buffered: bool) -> Result<()> {
        let mut used_buffered = false;
        while done < op.len {
            let off = op.file_offset + done as u64;
            let mut want = op.len - done;
            // SAFETY: the caller of read_raw guarantees dest..dest+len is writable and ours.
            let dst = unsafe { op.dest.add(done) };
            let fault = faults::check(&self.path, off, want);
            if fault == Some(faults::Hit::Short) {
                want = faults::short_len(want);
            }
            let aligned = is_aligned(off) && is_aligned(want as u64) && (dst as usize) % ALIGN == 0;
            let file = match &self.direct {
                Some(f) if aligned && !buffered => f,
                _ => {
                    used_buffered = true;
                    &self.buffered
                }
            };
            let r = match fault {
                Some(faults::Hit::Fail(code)) => Err(std::io::Error::from_raw_os_error(code)),
                Some(faults::Hit::Eof) => Ok(0),
                // SAFETY: dst is valid for `want` bytes of writes (see above); the file descriptor
                // is kept open by `self` (an Arc held by the job for the whole batch).
                _ => match unsafe { libc::pread(file.as_raw_fd(), dst.cast(), want, off as libc::off_t) } {
                    r if r < 0 => Err(std::io::Error::last_os_error()),
                    r => Ok(r as usize),
                },
            };
            let got = match r {
                Ok(got) => {
                    // SAFETY: the read just wrote `got` bytes at dst, inside this op's destination.
                    unsafe { faults::flip(fault, dst, got) };
                    got
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                    // A filesystem that accepted O_DIRECT at open but refuses this read (block
                    // size over 4 KiB, some FUSE): serve the rest through the page cache.
                    Some(libc::EINVAL) if self.direct.is_some() && !buffered => {
                        buffered = true;
                        continue;
                    }
                    _ => {
                        return Err(Error::Read {
                            path: self.path.clone(),
                            offset: op.file_offset,
                            len: op.len as u64,
                            source: e,
                        })
                    }
                },
            };
            if got == 0 {
                return Err(self.eof(op, done));
            }
            done += got;
        }
        if used_buffered {
            self.drop_cached(op.file_offset, op.len as u64);
        }
        Ok(())
    }

    pub(crate) fn eof(&self, op: RawOp, got: usize) -> Error {
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
    pub(crate) fn drop_cached(&self, offset: u64, len: u64) {
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
