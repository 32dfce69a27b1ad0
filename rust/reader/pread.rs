//! The thread engine's work: a batch of reads as a job for the worker pool (reader/pool.rs),
//! each read a loop of blocking `pread`s that continues short reads, retries EINTR and falls
//! back to the page cache for requests direct I/O cannot serve. The io_uring engine finishes
//! short or refused reads with the same loop (`Inner::read_from`).

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::pool::BatchJob;
use super::{faults, is_aligned, Hashes, Inner, RawOp};
use crate::aligned::ALIGN;
use crate::error::{Error, Result};

/// One batch on the pool: item i reads `ops[i]`; the first error stops the items not yet begun.
pub(super) struct ReadJob {
    inner: Arc<Inner>,
    ops: Vec<RawOp>,
    hashes: Option<Arc<Hashes>>,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl ReadJob {
    pub(super) fn new(inner: Arc<Inner>, ops: Vec<RawOp>, hashes: Option<Arc<Hashes>>) -> ReadJob {
        ReadJob { inner, ops, hashes, failed: AtomicBool::new(false), error: Mutex::new(None) }
    }

    /// The batch's first error, once the pool has run it.
    pub(super) fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
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
    pub(super) fn read_from(&self, op: RawOp, mut done: usize, mut buffered: bool) -> Result<()> {
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
}
