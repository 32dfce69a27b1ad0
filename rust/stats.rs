//! I/O counters, updated with relaxed atomics by whichever thread completes a read (a pool
//! worker, or the thread driving io_uring); they are statistics: no other memory is ordered by them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct Stats {
    bytes_read: AtomicU64,
    bytes_useful: AtomicU64,
    requests: AtomicU64,
    batches: AtomicU64,
    io_ns: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Bytes read from the disk (every request, padding and bridged gaps included).
    pub bytes_read: u64,
    /// Bytes of wanted bundles among them (reported by whoever planned the reads).
    pub bytes_useful: u64,
    /// Read requests completed (one request may take several `pread` calls).
    pub requests: u64,
    /// Batch calls completed.
    pub batches: u64,
    /// Wall-clock nanoseconds spent in batch calls, summed over batches (concurrent batches
    /// from several threads each count their own time).
    pub io_ns: u64,
}

impl Stats {
    pub fn add_read(&self, bytes: u64) {
        self.bytes_read.fetch_add(bytes, Relaxed);
        self.requests.fetch_add(1, Relaxed);
    }

    pub fn add_useful(&self, bytes: u64) {
        self.bytes_useful.fetch_add(bytes, Relaxed);
    }

    pub fn add_batch(&self, ns: u64) {
        self.batches.fetch_add(1, Relaxed);
        self.io_ns.fetch_add(ns, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_useful: self.bytes_useful.load(Relaxed),
            requests: self.requests.load(Relaxed),
            batches: self.batches.load(Relaxed),
            io_ns: self.io_ns.load(Relaxed),
        }
    }

    pub fn reset(&self) {
        for c in [&self.bytes_read, &self.bytes_useful, &self.requests, &self.batches, &self.io_ns] {
            c.store(0, Relaxed);
        }
    }
}

impl StatsSnapshot {
    /// (name, value) pairs, in a fixed order (the Python dict's keys).
    pub fn fields(&self) -> [(&'static str, u64); 5] {
        [
            ("bytes_read", self.bytes_read),
            ("bytes_useful", self.bytes_useful),
            ("requests", self.requests),
            ("batches", self.batches),
            ("io_ns", self.io_ns),
        ]
    }
}
