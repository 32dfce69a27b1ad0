//! Which engine runs a batch: the io_uring rings and the `pread` pool a reader owns, and the
//! per-batch choice between them (`Engine::Auto`: io_uring for batches up to `URING_MAX_WAVES`
//! x concurrency requests, the pool for larger ones).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use io_uring::IoUring;

use super::pool::Pool;
use super::pread::ReadJob;
use super::{uring, Engine, Hashes, RawOp, Reader};
use crate::error::{Error, Result};

/// Batches up to this many times the concurrency go to io_uring under `Engine::Auto`.
const URING_MAX_WAVES: usize = 4;

/// A reader's engines. Rings are reused across batches; concurrent batches (several calling
/// threads) each take their own ring, so each has `concurrency` reads in flight.
pub(super) struct Backend {
    pool: Option<Pool>,
    rings: Option<Mutex<Vec<IoUring>>>,
}

impl Backend {
    /// The engines for `engine`: `Auto` gets a ring only where the kernel allows one.
    pub(super) fn new(engine: Engine, concurrency: usize) -> std::io::Result<Backend> {
        let ring = match engine {
            Engine::Threads => None,
            Engine::Auto => uring::new_ring(concurrency).ok(),
            Engine::Uring => Some(uring::new_ring(concurrency)?),
        };
        let pool = if engine == Engine::Uring { None } else { Some(Pool::new(concurrency, "llmflash-io")?) };
        Ok(Backend { pool, rings: ring.map(|r| Mutex::new(vec![r])) })
    }

    pub(super) fn engine(&self) -> Engine {
        match (&self.pool, &self.rings) {
            (Some(_), Some(_)) => Engine::Auto,
            (Some(_), None) => Engine::Threads,
            _ => Engine::Uring,
        }
    }
}

impl Reader {
    /// Run `ops` (longest first) on the engine; with `hashes`, each op's CRC-32 is taken as it
    /// completes (`hashes` is indexed like `ops`).
    ///
    /// # Safety
    /// As `read_raw`.
    pub(super) unsafe fn run_batch(&self, ops: Vec<RawOp>, hashes: Option<Arc<Hashes>>) -> Result<()> {
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
                // SAFETY: forwarded from this function's contract.
                unsafe { self.run_on_ring(rings, &ops, hashes.as_deref()) }
            }
            (Some(pool), _) => {
                let job = Arc::new(ReadJob::new(self.inner.clone(), ops, hashes));
                pool.run(job.clone());
                job.take_error().map_or(Ok(()), Err)
            }
            (None, _) => Err(Error::invalid("this reader has no I/O engine")), // not constructible
        };
        self.inner.stats.add_batch(t0.elapsed().as_nanos() as u64);
        result
    }

    /// Run `ops` on a ring taken from `rings` (a new one when all are in use), then put it back.
    ///
    /// # Safety
    /// As `read_raw`.
    unsafe fn run_on_ring(&self, rings: &Mutex<Vec<IoUring>>, ops: &[RawOp], hashes: Option<&Hashes>) -> Result<()> {
        let ring = rings.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut ring = match ring {
            Some(r) => r,
            None => uring::new_ring(self.concurrency).map_err(|source| Error::Read {
                path: self.inner.path.clone(),
                offset: ops.first().map_or(0, |o| o.file_offset),
                len: 0,
                source,
            })?,
        };
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { uring::run(&mut ring, &self.inner, ops, self.concurrency, hashes) };
        rings.lock().unwrap_or_else(|e| e.into_inner()).push(ring);
        r
    }
}
