//! Overflow streaming: bundles read past the cache into a caller's buffer (neurons wanted
//! beyond a layer's capacity), planned and coalesced like a fill but never touching the rows.
//!
//! `OverflowReader` does it with what it shares with its cache (the reader, staging buffers,
//! CRC table and counters) and nothing the cache mutates, so it can run on another thread while
//! the owner admits, waits for fills and computes: flash starts a token's overflow reads as soon
//! as it knows them, beside the fill, instead of after the cached rows are computed.

use std::sync::Arc;
use std::time::Instant;

use super::counters::{add, ns_since};
use super::{crc, NeuronCache, Shared};
use crate::error::{Error, Result};
use crate::planner::{plan, PlanOptions, Region};
use crate::profile::Profile;
use crate::reader::RawOp;

/// A handle that reads one cache's bundles past its rows (see the module comment); cheap to
/// clone, `Send + Sync`.
#[derive(Clone)]
pub struct OverflowReader {
    shared: Arc<Shared>,
    region: Region,
    profile: Profile,
    opts: PlanOptions,
}

impl NeuronCache {
    /// This cache's overflow reader (its planner settings as they are now).
    pub fn overflow_reader(&self) -> OverflowReader {
        OverflowReader {
            shared: Arc::clone(&self.shared),
            region: self.region,
            profile: self.profile.clone(),
            opts: self.opts,
        }
    }

    /// `OverflowReader::read_neurons` on this cache's reader.
    pub fn read_neurons(&self, wanted: &[u32], dest: &mut [u8]) -> Result<usize> {
        self.overflow_reader().read_neurons(wanted, dest)
    }

    /// `OverflowReader::read_neurons_raw` on this cache's reader.
    ///
    /// # Safety
    /// As `OverflowReader::read_neurons_raw`.
    pub unsafe fn read_neurons_raw(&self, wanted: &[u32], dest: *mut u8, dest_len: usize) -> Result<usize> {
        // SAFETY: the caller upholds read_neurons_raw's contract, passed on unchanged.
        unsafe { self.overflow_reader().read_neurons_raw(wanted, dest, dest_len) }
    }
}

impl OverflowReader {
    /// The cache's slot matrix (a destination must never be it).
    pub fn slots(&self) -> &Arc<crate::aligned::AlignedBuf> {
        &self.shared.slots
    }

    /// The layer's region.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Read the bundles of `wanted` (duplicates allowed) into `dest`, packed: row k (bytes
    /// `[k*bb, (k+1)*bb)`) = bundle `wanted[k]`. Returns `wanted.len()`. Does not touch the
    /// cache's rows; may run while a fill is pending and while the cache admits (overflow
    /// streaming). With a CRC table (`set_bundle_crcs`) every bundle is checked before any is
    /// copied out: a mismatch is `Error::Corrupt` and leaves `dest` untouched.
    pub fn read_neurons(&self, wanted: &[u32], dest: &mut [u8]) -> Result<usize> {
        // SAFETY: `dest` is an exclusive borrow of dest.len() writable bytes, alive for the call.
        unsafe { self.read_neurons_raw(wanted, dest.as_mut_ptr(), dest.len()) }
    }

    /// `read_neurons` into raw memory.
    ///
    /// # Safety
    /// `dest .. dest + dest_len` must be valid for writes and not accessed by anyone else until
    /// this call returns.
    pub unsafe fn read_neurons_raw(&self, wanted: &[u32], dest: *mut u8, dest_len: usize) -> Result<usize> {
        let n = self.region.n_neurons;
        if let Some(&bad) = wanted.iter().find(|&&j| j >= n) {
            return Err(Error::invalid(format!(
                "neuron {bad} is out of range: the layer has {n} neurons (ids 0..{n})"
            )));
        }
        let bb = self.shared.bundle_bytes;
        let need = wanted.len().checked_mul(bb).filter(|&b| b <= dest_len).ok_or_else(|| {
            Error::invalid(format!(
                "destination of {dest_len} bytes cannot hold {} bundles of {bb} bytes",
                wanted.len()
            ))
        })?;
        if need == 0 {
            return Ok(0);
        }
        let p = plan(wanted, &self.region, &self.profile, &self.opts)?;
        let staging = self.shared.staging.take(p.buffer_bytes as usize)?;
        let base = staging.as_mut_ptr();
        let ops: Vec<RawOp> = p
            .requests
            .iter()
            .map(|r| RawOp {
                file_offset: r.offset,
                len: r.len as usize,
                // SAFETY: requests lie back to back in [0, buffer_bytes) and staging is that large.
                dest: unsafe { base.add(r.dest_offset as usize) },
            })
            .collect();
        let t0 = Instant::now();
        // SAFETY: disjoint ranges of `staging`, owned here and alive until read_raw returns.
        let r = unsafe { self.shared.reader.read_raw(&ops) };
        add(&self.shared.counters.io_ns, ns_since(t0));
        if let Err(e) = r {
            self.shared.staging.give(staging);
            return Err(e);
        }
        let t1 = Instant::now();
        if let Some(table) = self.shared.crcs.get() {
            let t2 = Instant::now();
            // A bundle landing outside the buffer is reported by the copy loop below.
            let bad = p.neurons.iter().zip(&p.landing).find_map(|(&j, &at)| {
                let bytes = staging.get(at as usize..(at as usize).checked_add(bb)?)?;
                crc::mismatch(&self.shared, table, j, bytes)
            });
            crc::count(&self.shared, t2);
            if let Some(e) = bad {
                add(&self.shared.counters.mgmt_ns, ns_since(t1));
                self.shared.staging.give(staging);
                return Err(e);
            }
        }
        for (k, j) in wanted.iter().enumerate() {
            // Every wanted id is in the plan (it plans exactly these ids).
            let Ok(i) = p.neurons.binary_search(j) else { continue };
            let at = p.landing[i] as usize;
            if at + bb > staging.len() {
                self.shared.staging.give(staging);
                return Err(Error::invalid(format!(
                    "plan lands neuron {j} at {at}, outside its {} bytes",
                    p.buffer_bytes
                )));
            }
            // SAFETY: `at + bb <= staging.len()` (checked) and `(k+1)*bb <= need <= dest_len`;
            // the caller guarantees dest is ours; staging is a different allocation.
            unsafe { std::ptr::copy_nonoverlapping(staging.as_ptr().add(at), dest.add(k * bb), bb) };
        }
        add(&self.shared.counters.mgmt_ns, ns_since(t1));
        self.shared.staging.give(staging);
        add(&self.shared.counters.bytes_read, p.buffer_bytes);
        add(&self.shared.counters.bytes_useful, p.useful_bytes);
        add(&self.shared.counters.requests, p.requests.len() as u64);
        self.shared.reader.stats().add_useful(p.useful_bytes);
        Ok(wanted.len())
    }
}
