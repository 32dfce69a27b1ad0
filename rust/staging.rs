//! `StagingPool`: reusable 4 KiB-aligned buffers that reads land in before their bundles are
//! copied to where they belong (a cache's rows, a caller's scratch). Direct I/O reads whole
//! pages and bundles are not page-sized, so reads need a staging area; sharing one pool among
//! all caches bounds that transient memory by the reads in flight, not by the number of layers
//! (30 caches each keeping a whole-region buffer would hold the entire FFN in DRAM and defeat
//! the memory budget). The lock is taken twice per batch, never while bytes move.

use std::sync::{Arc, Mutex, OnceLock};

use crate::aligned::AlignedBuf;
use crate::error::{Error, Result};

/// Reusable staging buffers shared by caches: at most `max_buffers` are kept between fills.
pub struct StagingPool {
    free: Mutex<Vec<AlignedBuf>>,
    max_buffers: usize,
}

/// Staging lengths are rounded up to this, so a buffer serves plans of similar sizes.
const STAGING_GRAIN: usize = 256 << 10;

impl StagingPool {
    pub fn new(max_buffers: usize) -> StagingPool {
        StagingPool { free: Mutex::new(Vec::new()), max_buffers }
    }

    /// The process-wide pool used by caches built without one (keeps up to 4 buffers: enough
    /// for a prefetching strategy with a fill in flight and an overflow read beside it).
    pub fn global() -> Arc<StagingPool> {
        static GLOBAL: OnceLock<Arc<StagingPool>> = OnceLock::new();
        GLOBAL.get_or_init(|| Arc::new(StagingPool::new(4))).clone()
    }

    /// A buffer of at least `len` bytes (contents unspecified).
    pub fn take(&self, len: usize) -> Result<AlignedBuf> {
        {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            // The smallest kept buffer that is large enough.
            let best = (0..free.len()).filter(|&i| free[i].len() >= len).min_by_key(|&i| free[i].len());
            if let Some(i) = best {
                return Ok(free.swap_remove(i));
            }
        }
        let grain = len.checked_next_multiple_of(STAGING_GRAIN).ok_or(Error::Alloc { bytes: len as u64 })?;
        AlignedBuf::zeroed(grain)
    }

    /// Return a buffer; the smallest is dropped when more than `max_buffers` would be kept.
    pub fn give(&self, buf: AlignedBuf) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(buf);
        if free.len() > self.max_buffers {
            if let Some(i) = (0..free.len()).min_by_key(|&i| free[i].len()) {
                let small = free.swap_remove(i);
                drop(free);
                drop(small); // freed outside the lock
            }
        }
    }

    /// Bytes held by kept buffers.
    pub fn held_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|b| b.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_max_buffers_the_largest() {
        let pool = StagingPool::new(2);
        let sizes = [10usize, 300_000, 5000, 1 << 20];
        let bufs: Vec<AlignedBuf> = sizes.iter().map(|&n| pool.take(n).unwrap()).collect();
        assert!(bufs.iter().zip(sizes).all(|(b, n)| b.len() >= n && b.len() % STAGING_GRAIN == 0));
        for b in bufs {
            pool.give(b);
        }
        assert_eq!(pool.free.lock().unwrap().len(), 2);
        // A request is served by the smallest kept buffer that is large enough.
        let b = pool.take(600_000).unwrap();
        assert!(b.len() >= 1 << 20);
        assert_eq!(pool.held_bytes(), STAGING_GRAIN * 2);
        assert!(pool.take(usize::MAX - 5).is_err());
    }
}
