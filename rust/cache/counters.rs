//! A cache's counters: relaxed atomics updated by the owner and the filler, and the copy
//! `NeuronCache::stats` returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counters, updated with relaxed atomics (statistics: no other memory is ordered by them).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) admissions: AtomicU64,
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) overflow: AtomicU64,
    pub(super) evicted_window: AtomicU64,
    pub(super) evicted_capacity: AtomicU64,
    pub(super) bytes_read: AtomicU64,
    pub(super) bytes_useful: AtomicU64,
    pub(super) bytes_direct: AtomicU64,
    pub(super) requests: AtomicU64,
    pub(super) failed_fills: AtomicU64,
    pub(super) io_ns: AtomicU64,
    pub(super) wait_ns: AtomicU64,
    pub(super) mgmt_ns: AtomicU64,
    pub(super) crc_ns: AtomicU64,
}

/// A copy of a cache's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// `begin` calls.
    pub admissions: u64,
    /// Unique wanted neurons found live / appended (read) / returned as overflow.
    pub hits: u64,
    pub misses: u64,
    pub overflow: u64,
    /// Neurons evicted by the window / for capacity.
    pub evicted_window: u64,
    pub evicted_capacity: u64,
    /// Bytes read from disk for this layer (fills and `read_neurons`), of which wanted bundles.
    pub bytes_read: u64,
    pub bytes_useful: u64,
    /// Of bytes_read, those read straight into rows (no staging copy).
    pub bytes_direct: u64,
    /// Read requests issued.
    pub requests: u64,
    /// Fills that failed (their neurons were dropped from the index).
    pub failed_fills: u64,
    /// Wall time of read batches (device time, possibly overlapped with compute).
    pub io_ns: u64,
    /// Time the owner spent blocked waiting for fills (the I/O that was not overlapped).
    pub wait_ns: u64,
    /// Memory management: eviction moves, index updates, staging -> row copies, CRC checks.
    pub mgmt_ns: u64,
    /// Of mgmt_ns, the CRC-32 checks of bundles read (0 without a table: `set_bundle_crcs`).
    pub crc_ns: u64,
}

impl CacheStats {
    /// (name, value) pairs in a fixed order (the Python dict's keys).
    pub fn fields(&self) -> [(&'static str, u64); 15] {
        [
            ("admissions", self.admissions),
            ("hits", self.hits),
            ("misses", self.misses),
            ("overflow", self.overflow),
            ("evicted_window", self.evicted_window),
            ("evicted_capacity", self.evicted_capacity),
            ("bytes_read", self.bytes_read),
            ("bytes_useful", self.bytes_useful),
            ("bytes_direct", self.bytes_direct),
            ("requests", self.requests),
            ("failed_fills", self.failed_fills),
            ("io_ns", self.io_ns),
            ("wait_ns", self.wait_ns),
            ("mgmt_ns", self.mgmt_ns),
            ("crc_ns", self.crc_ns),
        ]
    }
}

pub(super) fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

pub(super) fn ns_since(t: Instant) -> u64 {
    t.elapsed().as_nanos().min(u64::MAX as u128) as u64
}

impl Counters {
    /// The counters now, as `NeuronCache::stats` returns them.
    pub(super) fn snapshot(&self) -> CacheStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            admissions: l(&self.admissions),
            hits: l(&self.hits),
            misses: l(&self.misses),
            overflow: l(&self.overflow),
            evicted_window: l(&self.evicted_window),
            evicted_capacity: l(&self.evicted_capacity),
            bytes_read: l(&self.bytes_read),
            bytes_useful: l(&self.bytes_useful),
            bytes_direct: l(&self.bytes_direct),
            requests: l(&self.requests),
            failed_fills: l(&self.failed_fills),
            io_ns: l(&self.io_ns),
            wait_ns: l(&self.wait_ns),
            mgmt_ns: l(&self.mgmt_ns),
            crc_ns: l(&self.crc_ns),
        }
    }

    /// Every counter back to 0.
    pub(super) fn reset(&self) {
        for a in [
            &self.admissions,
            &self.hits,
            &self.misses,
            &self.overflow,
            &self.evicted_window,
            &self.evicted_capacity,
            &self.bytes_read,
            &self.bytes_useful,
            &self.bytes_direct,
            &self.requests,
            &self.failed_fills,
            &self.io_ns,
            &self.wait_ns,
            &self.mgmt_ns,
            &self.crc_ns,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }
}
