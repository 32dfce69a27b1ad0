//! The io_uring engine: the calling thread keeps up to `depth` reads in flight on one ring.
//!
//! Why: the model reads one batch per layer, and a layer's batch is small (a few dozen
//! requests, a few milliseconds). With the pread pool, every batch wakes its sleeping threads one
//! after another (slow on few cores) and the batch's tail drains with few reads in flight, so
//! per-layer batches stay below the disk's throughput. One io_uring_enter submits the whole
//! first wave at once and each completion is refilled by the same thread without a context
//! switch; the thread sleeps until the reads land.
//!
//! Safety of the destination buffers: every submitted read is waited for before `run` returns,
//! on success and on error alike (the kernel writes into them until its completion arrives).

use std::os::unix::io::AsRawFd;

use io_uring::{opcode, types, IoUring};

use super::faults::{self, Hit};
use super::{is_aligned, Hashes, Inner, RawOp};
use crate::aligned::ALIGN;
use crate::error::{Error, Result};

/// Largest single submission (the SQE length is 32 bits); longer ops complete synchronously.
const MAX_SQE_LEN: usize = 1 << 30;

pub(super) fn new_ring(depth: usize) -> std::io::Result<IoUring> {
    let entries = (depth.max(1) as u32).next_power_of_two();
    // COOP_TASKRUN: completions are posted when this thread next enters the kernel, not by
    // interrupting it (it only ever waits in io_uring_enter anyway). Kernels before 5.19 lack it.
    IoUring::builder().setup_coop_taskrun().build(entries).or_else(|_| IoUring::new(entries))
}

/// Run `ops` with up to `depth` in flight on `ring`; with `hashes`, hash each op as it completes
/// (while the others are still in flight).
///
/// # Safety
/// As `Reader::read_raw`: each op's destination is valid for writes, disjoint from the others,
/// and untouched by anyone else until this returns.
pub(super) unsafe fn run(
    ring: &mut IoUring,
    inner: &Inner,
    ops: &[RawOp],
    depth: usize,
    hashes: Option<&Hashes>,
) -> Result<()> {
    let n = ops.len();
    let depth = depth.min(ring.params().sq_entries() as usize).max(1);
    let (mut next, mut inflight) = (0usize, 0usize);
    let mut retry: Vec<usize> = Vec::new(); // ops to submit again (EINTR/EAGAIN)
    let mut first_err: Option<Error> = None;
    let mut enter_failures = 0u32;
    loop {
        // Fill the ring up to `depth` (unless the batch has failed: then only drain).
        if first_err.is_none() {
            let mut sq = ring.submission();
            while inflight < depth {
                let i = match retry.pop() {
                    Some(i) => i,
                    None if next < n => {
                        next += 1;
                        next - 1
                    }
                    None => break,
                };
                let op = ops[i];
                let fd = direct_for(inner, op).unwrap_or(&inner.buffered).as_raw_fd();
                let len = op.len.min(MAX_SQE_LEN) as u32;
                let e =
                    opcode::Read::new(types::Fd(fd), op.dest, len).offset(op.file_offset).build().user_data(i as u64);
                // SAFETY: the destination is valid for `len` bytes until this function returns
                // (caller's contract) and we return only after its completion is reaped; the
                // descriptor is kept open by `inner` for the whole call.
                if unsafe { sq.push(&e) }.is_err() {
                    retry.push(i); // ring full (cannot happen with depth <= sq_entries): next round
                    break;
                }
                inflight += 1;
            }
        }
        if inflight == 0 {
            break;
        }
        // Nothing left to submit: sleep until every read in flight is done (one wake-up, not one
        // per completion: the cores stay with the compute that overlaps these reads); else wake
        // at the first completion to refill the ring. Hashing wakes at each completion too, so
        // the hash of one read overlaps the reads still in flight.
        let queued = first_err.is_none() && (next < n || !retry.is_empty());
        let one = queued || (hashes.is_some() && first_err.is_none());
        match ring.submit_and_wait(if one { 1 } else { inflight }) {
            Ok(_) => enter_failures = 0,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)) => {}
            Err(e) => {
                // Submitted reads may still be writing into the buffers: keep waiting for them
                // (after a pause), never return early. Reaching this would be a kernel or ring bug.
                enter_failures += 1;
                if first_err.is_none() {
                    first_err = Some(Error::Read { path: inner.path.clone(), offset: 0, len: 0, source: e });
                }
                std::thread::sleep(std::time::Duration::from_millis(enter_failures.min(100) as u64));
            }
        }
        let done: Vec<(usize, i32)> = ring.completion().map(|c| (c.user_data() as usize, c.result())).collect();
        for (i, res) in done {
            inflight -= 1;
            let op = ops[i];
            let res = fault(inner, op, res);
            let mut ok = false;
            if res < 0 {
                match -res {
                    libc::EINTR | libc::EAGAIN => retry.push(i),
                    // Accepted O_DIRECT at open but refused this read: finish through the cache.
                    libc::EINVAL if inner.direct.is_some() => {
                        if let Err(e) = inner.read_from(op, 0, true) {
                            first_err.get_or_insert(e);
                        } else {
                            ok = true;
                        }
                    }
                    code => {
                        first_err.get_or_insert(Error::Read {
                            path: inner.path.clone(),
                            offset: op.file_offset,
                            len: op.len as u64,
                            source: std::io::Error::from_raw_os_error(code),
                        });
                    }
                }
            } else if res == 0 && op.len > 0 {
                first_err.get_or_insert(inner.eof(op, 0));
            } else if (res as usize) < op.len {
                // Short read (end of file, or an op longer than one SQE): finish it here.
                match inner.read_from(op, res as usize, false) {
                    Ok(()) => ok = true,
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            } else {
                if direct_for(inner, op).is_none() {
                    inner.drop_cached(op.file_offset, op.len as u64);
                }
                ok = true;
            }
            if ok {
                inner.stats.add_read(op.len as u64);
                if let (Some(h), None) = (hashes, &first_err) {
                    // SAFETY: op i has completed in full; nothing else writes its destination.
                    unsafe { h.record(i, op) };
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A completion's result after the test-only fault hook (reader/faults.rs): as if the kernel had
/// failed the read, ended it early or shortened it, or the bytes it brought had changed.
fn fault(inner: &Inner, op: RawOp, res: i32) -> i32 {
    let hit = faults::check(&inner.path, op.file_offset, op.len);
    match hit {
        None => res,
        Some(Hit::Fail(code)) => -code,
        Some(Hit::Eof) => 0,
        Some(Hit::Short) if res > 0 => res.min(faults::short_len(op.len) as i32),
        Some(Hit::Short) => res,
        Some(Hit::Flip(_)) => {
            if res > 0 {
                // SAFETY: the kernel has written `res` bytes at op.dest, which this batch owns.
                unsafe { faults::flip(hit, op.dest, res as usize) };
            }
            res
        }
    }
}

fn direct_for(inner: &Inner, op: RawOp) -> Option<&std::fs::File> {
    inner
        .direct
        .as_ref()
        .filter(|_| is_aligned(op.file_offset) && is_aligned(op.len as u64) && (op.dest as usize) % ALIGN == 0)
}
