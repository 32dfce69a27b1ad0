//! Per-bundle CRC-32 checks (zlib's / IEEE CRC-32, as Python's `zlib.crc32`): a cache given its
//! layer's table checks every bundle it reads (fills and `read_neurons`) against it, so a corrupt
//! ffn.bin is an `Error::Corrupt` instead of silently wrong weights. See the module comment of
//! cache.rs for where the checks run.

use std::time::Instant;

use super::counters::{add, ns_since};
use super::{NeuronCache, Shared};
use crate::error::{Error, Result};

/// The error for bundle `neuron` whose bytes are not the ones recorded, or None if they are.
pub(super) fn mismatch(shared: &Shared, table: &[u32], neuron: u32, bytes: &[u8]) -> Option<Error> {
    let want = *table.get(neuron as usize)?;
    let got = crc32fast::hash(bytes);
    if got == want {
        return None;
    }
    Some(Error::Corrupt {
        path: shared.reader.path().to_path_buf(),
        offset: shared.region_offset + neuron as u64 * shared.bundle_bytes as u64,
        what: format!(
            "checksum mismatch in bundle {neuron} ({} bytes: crc32 {got:#010x}, expected {want:#010x})",
            bytes.len()
        ),
    })
}

/// The CRC-32s of runs of `group` consecutive bundles of `bundle_bytes` bytes each, from the
/// bundles' own CRCs (zlib's crc32_combine, no data read): the table of a cache whose unit is
/// such a run (a mixture-of-experts layer's expert: its neurons' bundles back to back).
pub fn combine_groups(crcs: &[u32], group: usize, bundle_bytes: u64) -> Result<Vec<u32>> {
    if group == 0 || crcs.len() % group != 0 {
        return Err(Error::invalid(format!("{} bundle CRCs do not split into runs of {group}", crcs.len())));
    }
    Ok(crcs
        .chunks(group)
        .map(|run| {
            let mut h = crc32fast::Hasher::new_with_initial_len(run[0], bundle_bytes);
            for &c in &run[1..] {
                h.combine(&crc32fast::Hasher::new_with_initial_len(c, bundle_bytes));
            }
            h.finalize()
        })
        .collect())
}

/// Count the time since `t0` as CRC work (callers count it in `mgmt_ns` too: crc_ns is a part).
pub(super) fn count(shared: &Shared, t0: Instant) {
    add(&shared.counters.crc_ns, ns_since(t0));
}

impl NeuronCache {
    /// Give the cache its layer's table: `crcs[j]` = CRC-32 of bundle `j` (store position), the
    /// `bundle_bytes` bytes at `region offset + j * bundle_bytes`; `n_neurons` entries. From then
    /// on every bundle read is checked (see the module comment of cache.rs).
    ///
    /// Set once: setting the same table again does nothing; a different one, or a table while a
    /// fill is pending (`wait` first), is `Error::Invalid`. Rows already live are checked now:
    /// those that do not match are evicted (the block stays contiguous) and the first mismatch is
    /// returned as `Error::Corrupt`; the table is set either way.
    pub fn set_bundle_crcs(&mut self, crcs: Vec<u32>) -> Result<()> {
        let n = self.region.n_neurons as usize;
        if crcs.len() != n {
            return Err(Error::invalid(format!(
                "bundle CRC table of {} entries for a layer of {n} neurons (expected {n})",
                crcs.len()
            )));
        }
        if let Some(old) = self.shared.crcs.get() {
            if **old == *crcs {
                return Ok(());
            }
            return Err(Error::invalid("this cache already has a different bundle CRC table (it is set once)"));
        }
        if self.pending.is_some() {
            return Err(Error::invalid("cannot set bundle CRCs while a fill is pending: wait() first"));
        }
        // Unset until now (checked above; `&mut self` excludes another setter): cannot fail.
        let _ = self.shared.crcs.set(crcs.into_boxed_slice());
        self.check_live()
    }

    /// Whether a bundle CRC table was set.
    pub fn has_bundle_crcs(&self) -> bool {
        self.shared.crcs.get().is_some()
    }

    /// Check every live row against the table; evict those that differ. No fill is pending, so
    /// rows `[0, live)` are ready and the owner's (`ready == live`).
    fn check_live(&mut self) -> Result<()> {
        let Some(table) = self.shared.crcs.get() else { return Ok(()) };
        if self.shared.external {
            return Ok(()); // the rows are the caller's: nothing here to check
        }
        let t0 = Instant::now();
        let bb = self.shared.bundle_bytes;
        let bytes = self.ready_bytes();
        let mut first = None;
        let mut bad = Vec::new();
        for (row, &j) in self.neuron_of[..self.ready].iter().enumerate() {
            if let Some(e) = mismatch(&self.shared, table, j, &bytes[row * bb..(row + 1) * bb]) {
                first.get_or_insert(e);
                bad.push(row);
            }
        }
        count(&self.shared, t0);
        for &row in &bad {
            self.unindex(row);
        }
        self.close_holes(&bad);
        self.ready = self.live;
        add(&self.shared.counters.mgmt_ns, ns_since(t0));
        first.map_or(Ok(()), Err)
    }
}
