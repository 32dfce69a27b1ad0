//! A cache's fills: one admission's reads (straight into rows or through staging), run on
//! the cache's fill thread or inline, and the plan -> reads translation (`fill_for`).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::Instant;

use super::{add, crc, ns_since, NeuronCache, Shared, ABSENT, EMPTY, READY};
use crate::aligned::AlignedBuf;
use crate::error::{Error, Result};
use crate::planner::Plan;
use crate::reader::RawOp;

/// Where one read of a fill lands.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Target {
    /// At this offset of the fill's staging buffer (then copied into rows).
    Staging(usize),
    /// Straight into rows starting at this one (page-multiple bundles read with no gap): rows of
    /// the slot matrix, or with external rows of the fill's landing buffer.
    Row(usize),
}

/// One read of a fill.
#[derive(Debug, Clone, Copy)]
pub(super) struct FillOp {
    offset: u64,
    len: usize,
    target: Target,
}

/// One admission's reads, handed to the filler.
pub(super) struct Fill {
    pub(super) epoch: u64,
    pub(super) ops: Vec<FillOp>,
    /// Staging bytes the `Target::Staging` reads need (0: none).
    pub(super) staging_bytes: usize,
    /// Rows this fill writes (holes left by evictions, then rows after the live block).
    pub(super) rows: Vec<usize>,
    /// Where each of `rows` lands: the same rows of the slot matrix, or with external rows the
    /// rows 0, 1, ... of a landing buffer of `landing_bytes` (0: none) handed to the owner.
    pub(super) dest_rows: Vec<usize>,
    pub(super) landing_bytes: usize,
    /// The neuron (store position) of each of `rows`, for the CRC checks.
    pub(super) neurons: Vec<u32>,
    pub(super) requests: usize,
    pub(super) buffer_bytes: u64,
    pub(super) useful_bytes: u64,
    /// (offset in staging, destination row) for every appended neuron read through staging.
    pub(super) copies: Vec<(usize, usize)>,
}

pub(super) struct FillResult {
    pub(super) epoch: u64,
    pub(super) error: Option<Error>,
    /// External rows: the landing buffer of a fill that succeeded, and the rows it is for.
    pub(super) landed: Option<(AlignedBuf, Vec<usize>)>,
}

pub(super) struct Filler {
    pub(super) jobs: Sender<Fill>,
    /// Only ever reached through `Mutex::get_mut` (the owner has `&mut self`): never locked.
    /// The Mutex makes the cache `Sync` (a channel receiver is not), which Python classes need.
    pub(super) results: Mutex<Receiver<FillResult>>,
}

/// Run a fill: read its plan (into rows directly where it can, else into staging), copy each
/// staged bundle into its row, check the rows against the CRC table (if any), then mark them READY.
/// With external rows, "rows" are those of a landing buffer, returned in the result.
pub(super) fn run_fill(shared: &Shared, fill: Fill) -> FillResult {
    let epoch = fill.epoch;
    let finish = |error: Option<Error>, landed: Option<(AlignedBuf, Vec<usize>)>| {
        if error.is_some() {
            add(&shared.counters.failed_fills, 1);
        }
        shared.done_epoch.store(epoch, Ordering::Release);
        FillResult { epoch, error, landed }
    };
    let take = |len: usize| if len > 0 { shared.staging.take(len).map(Some) } else { Ok(None) };
    let staging = match take(fill.staging_bytes) {
        Ok(b) => b,
        Err(e) => return finish(Some(e), None),
    };
    let landing = match take(fill.landing_bytes) {
        Ok(b) => b,
        Err(e) => {
            if let Some(b) = staging {
                shared.staging.give(b);
            }
            return finish(Some(e), None);
        }
    };
    let give_back = |staging: Option<AlignedBuf>, landing: Option<AlignedBuf>| {
        for b in [staging, landing].into_iter().flatten() {
            shared.staging.give(b);
        }
    };
    let bb = shared.bundle_bytes;
    // The fill's destination rows: the landing buffer's (external rows), else the slot matrix's.
    let rows = landing.as_ref().map_or_else(|| shared.slots.as_mut_ptr(), |b| b.as_mut_ptr());
    let ops: Vec<RawOp> = fill
        .ops
        .iter()
        .map(|op| {
            let dest = match (op.target, &staging) {
                // SAFETY: `begin` placed staged reads back to back in [0, staging_bytes), and
                // staging holds at least staging_bytes: the pointer stays inside the allocation.
                (Target::Staging(at), Some(b)) => unsafe { b.as_mut_ptr().add(at) },
                // SAFETY: `begin` checked that the request's rows are consecutive and below
                // capacity, so row*bb + len <= capacity*bb, the size of the slot matrix (kept
                // alive by `shared`); external rows are below the fill's n = landing_bytes / bb,
                // the landing buffer's size: the pointer stays inside either.
                (Target::Row(row), _) => unsafe { rows.add(row * bb) },
                (Target::Staging(_), None) => std::ptr::null_mut(), // unreachable: staging_bytes > 0
            };
            RawOp { file_offset: op.offset, len: op.len, dest }
        })
        .collect();
    if ops.iter().any(|o| o.dest.is_null()) {
        give_back(staging, landing);
        return finish(Some(Error::invalid("cache fill staged a read without a staging buffer")), None);
    }
    let t0 = Instant::now();
    // Staged destinations are distinct ranges of `staging` (ours, from the pool); direct ones are
    // distinct rows (`fill.dest_rows`) of the landing buffer (ours) or of the slot matrix, those
    // rows (`fill.rows`) this fill's until the owner receives its result (module doc).
    // SAFETY: so the destinations are disjoint and nobody else touches them, and both stay alive
    // until read_raw returns, after every worker has finished writing.
    let r = unsafe { shared.reader.read_raw(&ops) };
    add(&shared.counters.io_ns, ns_since(t0));
    if let Err(e) = r {
        give_back(staging, landing);
        return finish(Some(e), None);
    }
    let t1 = Instant::now();
    if let Some(b) = &staging {
        for &(at, row) in &fill.copies {
            // `begin` checked at + bb <= staging_bytes <= staging.len() and row < capacity (or <
            // n, the landing buffer's rows); the row is this fill's until the owner receives its
            // result (module comment).
            // SAFETY: so both ranges are in bounds, distinct allocations, alive and untouched by others.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr().add(at), rows.add(row * bb), bb) };
        }
    }
    if let Some(table) = shared.crcs.get() {
        let t2 = Instant::now();
        let bad = fill.dest_rows.iter().zip(&fill.neurons).find_map(|(&row, &j)| {
            // `fill_for` checked row < capacity (landing rows: < n); the row is this fill's
            // (module comment), its reads and copies finished above on this thread or before
            // read_raw returned.
            // SAFETY: so the range is inside the live slot matrix and nobody writes it meanwhile.
            let bytes = unsafe { std::slice::from_raw_parts(rows.add(row * bb), bb) };
            crc::mismatch(shared, table, j, bytes)
        });
        crc::count(shared, t2);
        if let Some(e) = bad {
            add(&shared.counters.mgmt_ns, ns_since(t1));
            give_back(staging, landing);
            return finish(Some(e), None);
        }
    }
    for &row in &fill.rows {
        shared.state[row].store(READY, Ordering::Release);
    }
    add(&shared.counters.mgmt_ns, ns_since(t1));
    give_back(staging, None);
    add(&shared.counters.bytes_read, fill.buffer_bytes);
    add(&shared.counters.bytes_useful, fill.useful_bytes);
    let direct: usize = fill.ops.iter().filter(|o| matches!(o.target, Target::Row(_))).map(|o| o.len).sum();
    add(&shared.counters.bytes_direct, direct as u64);
    add(&shared.counters.requests, fill.requests as u64);
    shared.reader.stats().add_useful(fill.useful_bytes);
    finish(None, landing.map(|b| (b, fill.rows)))
}

impl NeuronCache {
    pub(super) fn filler_died(&self) -> Error {
        Error::Read {
            path: self.shared.reader.path().to_path_buf(),
            offset: self.region.offset,
            len: 0,
            source: std::io::Error::other("the cache's fill thread stopped"),
        }
    }

    /// Finish the pending admission: on success its rows become ready; on failure they go.
    pub(super) fn settle(&mut self, error: Option<Error>) -> Result<()> {
        self.pending = None;
        match error {
            None => {
                self.ready = self.live;
                Ok(())
            }
            Some(e) => {
                for row in self.ready..self.live {
                    let j = self.neuron_of[row];
                    self.slot_of[j as usize] = ABSENT;
                    self.neuron_of[row] = ABSENT;
                    self.shared.state[row].store(EMPTY, Ordering::Relaxed);
                }
                self.live = self.ready;
                Err(e)
            }
        }
    }

    /// The reads of plan `p` for rows `[first_row, first_row + p.neurons.len())` (neuron
    /// `p.neurons[k]` -> row `first_row + k`), bounds-checked. When bundles are whole pages,
    /// a request that holds only wanted bundles (no bridged gap) reads straight into its rows;
    /// every other request (sub-page bundles, bridged gaps, the whole region) lands in staging
    /// and its wanted bundles are copied into their rows.
    pub(super) fn fill_for(&self, epoch: u64, p: &Plan, rows: &[usize]) -> Result<Fill> {
        let bb = self.shared.bundle_bytes as u64;
        let n = p.neurons.len();
        if rows.len() != n
            || rows.iter().any(|&r| r >= self.capacity)
            || p.landing.len() != n
            || p.request_index.len() != n
        {
            return Err(Error::invalid(format!(
                "plan of {n} neurons does not fit {} rows of {}",
                rows.len(),
                self.capacity
            )));
        }
        // Where the rows land: the slot matrix's rows, or with external rows 0..n of a landing
        // buffer (aligned like the slot matrix, so whole-page bundles are read straight in too).
        let external = self.shared.external;
        let dest: Vec<usize> = if external { (0..n).collect() } else { rows.to_vec() };
        let align = crate::aligned::ALIGN as u64;
        let pages = bb % align == 0 && self.region.offset % align == 0;
        let mut ops = Vec::with_capacity(p.requests.len());
        let mut copies = Vec::new();
        let mut staged = 0u64;
        let mut k = 0;
        for (q, r) in p.requests.iter().enumerate() {
            let k0 = k;
            while k < p.neurons.len() && p.request_index[k] as usize == q {
                k += 1;
            }
            let group = &p.neurons[k0..k];
            let first = group.first().map(|&j| self.region.offset + j as u64 * bb);
            let direct = pages
                && first == Some(r.offset)
                && r.len == group.len() as u64 * bb
                && group.last().map(|&l| (l - group[0]) as usize + 1) == Some(group.len())
                && dest[k0..k].windows(2).all(|w| w[1] == w[0] + 1);
            if direct {
                ops.push(FillOp { offset: r.offset, len: r.len as usize, target: Target::Row(dest[k0]) });
                continue;
            }
            ops.push(FillOp { offset: r.offset, len: r.len as usize, target: Target::Staging(staged as usize) });
            // A bundle may run on into the next request (a run split at max_request_bytes); that
            // one starts mid-bundle, so it is staged too, right after this one.
            for ((&landing, &row), &neuron) in p.landing[k0..k].iter().zip(&dest[k0..k]).zip(&p.neurons[k0..k]) {
                match landing.checked_sub(r.dest_offset) {
                    Some(d) => copies.push((d + staged, row)),
                    None => return Err(Error::invalid(format!("plan lands neuron {neuron} before request {q}"))),
                }
            }
            staged += r.len;
        }
        if k != p.neurons.len() {
            return Err(Error::invalid(format!("plan places {} of {} neurons in its requests", k, p.neurons.len())));
        }
        if let Some(&(at, _)) = copies.iter().find(|&&(at, _)| at + bb > staged) {
            return Err(Error::invalid(format!("plan lands a bundle at {at}, outside its {staged} staged bytes")));
        }
        let copies = copies.into_iter().map(|(at, row)| (at as usize, row)).collect();
        Ok(Fill {
            epoch,
            ops,
            staging_bytes: staged as usize,
            rows: rows.to_vec(),
            dest_rows: dest,
            landing_bytes: if external { n * self.shared.bundle_bytes } else { 0 },
            neurons: p.neurons.clone(),
            requests: p.requests.len(),
            buffer_bytes: p.buffer_bytes,
            useful_bytes: p.useful_bytes,
            copies,
        })
    }

    /// Start the fill thread once; false if fills must run inline.
    pub(super) fn start_filler(&mut self) -> bool {
        if self.filler.is_some() {
            return true;
        }
        if self.inline_only {
            return false;
        }
        let (jobs, job_rx) = channel::<Fill>();
        let (res_tx, results) = channel::<FillResult>();
        let shared = self.shared.clone();
        let spawned =
            std::thread::Builder::new().name("llmflash-cache-fill".into()).stack_size(256 << 10).spawn(move || {
                // Ends when the cache (the job sender) is dropped. The slot matrix stays alive
                // through `shared` while a last fill finishes, so dropping a cache never waits.
                for fill in job_rx {
                    if res_tx.send(run_fill(&shared, fill)).is_err() {
                        break;
                    }
                }
            });
        match spawned {
            Ok(_) => {
                self.filler = Some(Filler { jobs, results: Mutex::new(results) });
                true
            }
            Err(_) => {
                self.inline_only = true; // no thread to be had: reads run in begin (correct, slower)
                false
            }
        }
    }
}
