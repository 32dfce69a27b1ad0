//! The per-layer neuron cache: the paper's sliding window (§3.1) and its DRAM management (§3.3).
//!
//! A cache holds up to `capacity` bundles of one layer's FFN region in a preallocated slot
//! matrix (one 4 KiB-aligned allocation, row k = bytes `[k*bb, (k+1)*bb)`), an index
//! neuron -> row, the row's neuron, and the step (token) at which each neuron was last wanted.
//! Each step, `begin(wanted, step)`:
//! 1. marks every wanted neuron as wanted at `step`;
//! 2. evicts every live neuron not wanted in the last `window` steps (`step - last > window`);
//! 3. when the missing neurons do not fit, evicts live neurons not wanted at this step, least
//!    recently wanted first (ties: lower neuron id first), only as many as needed;
//! 4. places the missing neurons that fit (chosen in the caller's order, so the caller may
//!    sort them by priority; placed in store order) into the rows that steps 2-3 emptied, then
//!    after the live rows, and returns the rest as `overflow` for the caller to stream itself;
//! 5. plans the appended neurons' reads (the planner picks exact bundles, bridged runs or the
//!    one span by the disk profile) and starts them in the background.
//!
//! Live rows are always the contiguous block `[0, live)`, so the FFN runs on one matrix view
//! with no gather (the paper's Figure 7). The paper deletes by moving the last live row into each
//! hole and appends insertions (the default). With `set_fill_holes(true)` an insertion first takes
//! a hole (no copy), and only the holes left over when fewer neurons arrive than left are closed
//! by moving the last live row in (one bundle copy each; rows evicted from the end cost none). At
//! OPT-6.7B's steady state (as many neurons in as out) that removes nearly all of the ~200
//! MB/token of moves, and the reads start without waiting for them; the new rows then lie
//! between live ones, listed in `Admission::filled_rows`, which compute overlapping the reads skips.
//!
//! Concurrency and memory ordering (who may touch which row when). Three parties use a cache:
//! the *owner* (the thread calling begin/wait/admit; they take `&mut self`, so one at a time),
//! the *filler* (one thread per cache, started by the first background admission, which runs
//! the fill's batch on the reader, io_uring on the filler itself or the pread pool's workers,
//! then copies staged bundles into rows), and *compute* (Python reading the slot matrix through
//! a zero-copy view). For the admission with epoch `e`:
//! - rows `[0, ready)` belong to the owner and compute. Only `begin` writes them (eviction moves),
//!   and `begin` first settles the pending fill, so no fill is running when rows move. Compute
//!   may read them until the next `begin` on this cache: the filler never writes below `ready`
//!   (`ready` is the first row the fill writes).
//! - rows `[ready, total)`: the fill's rows (holes and appended rows) belong to fill `e` from
//!   the moment `begin` sends it to the filler until the owner receives its result (`wait`, or
//!   the next `begin`); live rows between them are the owner's. Compute must not read any of
//!   them before `wait` returns.
//! - rows `[total, capacity)` are unused (state EMPTY, neuron ABSENT).
//!
//! Publication: every write of a read into the staging buffer happens-before `Reader::read_raw`
//! returns in the filler (with the thread pool, the per-batch counter is decremented with AcqRel
//! and read with Acquire; with io_uring, the filler reaps each completion itself). The filler then
//! copies each bundle into its row and stores `state[row] = READY` (Release), stores
//! `done_epoch = e` (Release), and sends the result on a channel. The owner's `recv` (like an
//! Acquire load of `state`/`done_epoch`, used by `is_ready`) synchronises-with those stores, so
//! every byte of the new rows is visible to the owner, and to Python code it runs afterwards,
//! before `wait` returns. In the other direction, the owner's last writes to the rows being
//! refilled (eviction moves, EMPTY/FILLING state stores, Relaxed) happen-before its channel send of
//! the fill, which the filler's `recv` acquires. Layers never share rows, so layer A's fill runs on
//! the reader while compute reads layer B's matrix with no synchronisation at all. No lock guards
//! slot data; the locks that exist (the pread pool's queue or the reader's spare rings, the
//! channels' wake-up, the staging pool) are taken a few times per fill, never per row, and never
//! while bundle bytes move. (The result receiver sits in a Mutex only to make the cache `Sync`; the
//! owner reaches it through `Mutex::get_mut`, which never locks.)
//!
//! Staging: when bundles are whole pages (OPT-6.7B: 16 KiB), a request that holds only wanted
//! bundles reads straight into its rows (no copy). Other reads land in a staging buffer (direct I/O
//! reads whole pages, and sub-page bundles or bridged gaps are not rows), taken from a
//! [`StagingPool`] shared by all caches so that transient memory is bounded by the reads in flight,
//! not by the number of layers (30 layers each keeping a whole-region buffer would hold the entire
//! FFN in DRAM and defeat the memory budget).
//!
//! External rows (`new_external`, for a slot matrix the caller keeps elsewhere, such as GPU
//! memory): the cache keeps only its index and bookkeeping. Eviction moves are not done but
//! listed in `Admission::moves` (`rows[dst] = rows[src]`, to apply in order before the rows are
//! used), and each fill lands in a buffer of its own (from the staging pool, and back to it once
//! the owner lets go: row k is the bundle of `filled_rows[k]`) that the owner reads with `landed`
//! after `wait`, copies into its rows, then marks taken with `take_landed`. Bundles not taken by
//! the next admission never reached the caller's rows: that admission drops their neurons, as
//! for a failed fill, so the caller's rows never silently miss a fill.
//!
//! Checksums (cache/crc.rs): given a table of one CRC-32 per bundle (`set_bundle_crcs`, once, with
//! no fill pending), every bundle read is checked before it counts: a fill hashes its rows after
//! the reads and staging copies and before any row is marked READY (a mismatch fails the fill
//! like an I/O error, with `Error::Corrupt`), and `read_neurons` checks before copying out. The
//! table sits in `Shared` in a `OnceLock` (set by the owner before it sends the fill that uses
//! it; the filler's `get` is one Acquire load per fill, no lock). Without a table nothing is hashed.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::aligned::AlignedBuf;
use crate::error::{Error, Result};
use crate::planner::{PlanOptions, Region};
use crate::profile::Profile;
use crate::reader::Reader;
pub use crate::staging::StagingPool;

pub use counters::CacheStats;
use counters::{add, ns_since, Counters};
pub use crc::combine_groups;
use fill::{FillResult, Filler};
pub use overflow::OverflowReader;

/// `slot_of[neuron]` for a neuron that is not in the cache.
pub const ABSENT: u32 = u32::MAX;
/// Row states (`row_states`).
pub const EMPTY: u8 = 0;
pub const FILLING: u8 = 1;
pub const READY: u8 = 2;

/// What one `begin` did.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// Serial number of this admission (1, 2, ... per cache).
    pub epoch: u64,
    /// Rows `[0, ready_rows)` are filled now and do not move until the next `begin`.
    pub ready_rows: usize,
    /// Rows `[ready_rows, total_rows)` hold the new neurons (being filled) and possibly live
    /// ones between them; all are valid once `wait` returns Ok.
    pub total_rows: usize,
    /// Unique wanted neurons already live (no read needed).
    pub hits: usize,
    /// Unique wanted neurons read into rows now (in holes left by evictions, then appended).
    pub misses: usize,
    /// Unique wanted neurons that did not fit, in the caller's order (store positions): the
    /// caller streams them itself (`read_neurons`).
    pub overflow: Vec<u32>,
    /// External rows only: the eviction moves `(dst, src)` since the last admission returned,
    /// in order (`rows[dst] = rows[src]`), to apply to the caller's rows before using them.
    /// Moves made by one admission never read a row an earlier one of them wrote, nor write a
    /// row twice; moves left by a failed admission come first, and across the two both can
    /// happen, so apply them in order (or batched only when no row is both read and written).
    pub moves: Vec<(u32, u32)>,
    /// The rows this admission's fill writes, ascending (`misses` of them, in
    /// `[ready_rows, total_rows)`): with `fill_holes` they lie between live rows, so compute that
    /// overlaps the reads takes every row below `total_rows` but these.
    pub filled_rows: Vec<u32>,
    /// Neurons evicted because they fell out of the window / to make room.
    pub evicted_window: usize,
    pub evicted_capacity: usize,
    /// The plan for the appended neurons: bytes read (requests, bridged gaps, page padding),
    /// bytes of wanted bundles, requests, whether it reads one span (first to last wanted page), its estimate.
    pub bytes_read: u64,
    pub bytes_useful: u64,
    pub requests: usize,
    pub whole_region: bool,
    pub est_seconds: f64,
}

/// What the owner and the filler share.
struct Shared {
    reader: Arc<Reader>,
    staging: Arc<StagingPool>,
    slots: Arc<AlignedBuf>,
    bundle_bytes: usize,
    /// The region's file offset (bundle j starts at `region_offset + j * bundle_bytes`).
    region_offset: u64,
    /// One CRC-32 per bundle (store position), once `set_bundle_crcs` gave it; never replaced.
    crcs: OnceLock<Box<[u32]>>,
    /// The rows live in the caller's memory (`new_external`): `slots` is empty, fills land in
    /// a buffer of their own.
    external: bool,
    state: Box<[AtomicU8]>,
    /// Epoch of the last fill that finished (successfully or not).
    done_epoch: AtomicU64,
    counters: Counters,
}

pub struct NeuronCache {
    shared: Arc<Shared>,
    region: Region,
    capacity: usize,
    window: u32,
    profile: Profile,
    opts: PlanOptions,
    slot_of: Vec<u32>,
    neuron_of: Vec<u32>,
    last_wanted: Vec<u64>,
    /// Per neuron: the serial of the last `begin` that listed it (deduplication).
    seen: Vec<u64>,
    /// Per neuron: chosen for capacity eviction (only during `begin`).
    doomed: Vec<bool>,
    serial: u64,
    live: usize,
    ready: usize,
    /// Epoch of the fill in flight, if any.
    pending: Option<u64>,
    filler: Option<Filler>,
    /// The filler could not be started: fills run inline (begin then blocks).
    inline_only: bool,
    /// New neurons take the rows evictions emptied (see the module comment); false: the paper's
    /// scheme, every hole closed by a move and new neurons appended.
    fill_holes: bool,
    /// External rows: moves not yet returned in an admission, and the last fill's bundles.
    moves: Vec<(u32, u32)>,
    /// The last fill's bundles and the rows they belong in, until the owner takes them.
    landed: Option<(Arc<AlignedBuf>, Vec<usize>)>,
    /// The last landing buffer taken: back to the staging pool at the next admission once the
    /// owner holds no reference to it.
    spent: Option<Arc<AlignedBuf>>,
}

impl NeuronCache {
    /// A cache of `capacity` rows (0..=n_neurons) for one layer `region` read through `reader`.
    /// `opts` are the planner's options (concurrency: the reader's, normally); staging buffers
    /// come from `staging` (None: the process-wide pool).
    pub fn new(
        reader: Arc<Reader>,
        region: Region,
        capacity: usize,
        window: u32,
        profile: Profile,
        opts: PlanOptions,
        staging: Option<Arc<StagingPool>>,
    ) -> Result<NeuronCache> {
        Self::build(reader, region, capacity, window, profile, opts, staging, false)
    }

    /// `new` for rows kept by the caller (the module comment's "External rows"): no slot matrix
    /// is allocated; moves come in `Admission::moves` and each fill's bundles from `take_landed`.
    pub fn new_external(
        reader: Arc<Reader>,
        region: Region,
        capacity: usize,
        window: u32,
        profile: Profile,
        opts: PlanOptions,
        staging: Option<Arc<StagingPool>>,
    ) -> Result<NeuronCache> {
        Self::build(reader, region, capacity, window, profile, opts, staging, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        reader: Arc<Reader>,
        region: Region,
        capacity: usize,
        window: u32,
        profile: Profile,
        opts: PlanOptions,
        staging: Option<Arc<StagingPool>>,
        external: bool,
    ) -> Result<NeuronCache> {
        region.validate()?;
        let n = region.n_neurons as usize;
        if capacity > n {
            return Err(Error::invalid(format!(
                "cache capacity {capacity} exceeds the layer's {n} neurons (expected 0..={n} rows)"
            )));
        }
        if opts.max_request_bytes < crate::aligned::ALIGN as u64 || opts.concurrency == 0 {
            return Err(Error::invalid(format!(
                "plan options max_request_bytes = {}, concurrency = {} (expected >= 4096 and >= 1)",
                opts.max_request_bytes, opts.concurrency
            )));
        }
        let bb = usize::try_from(region.bundle_bytes)
            .map_err(|_| Error::layout(format!("bundle of {} bytes does not fit in memory", region.bundle_bytes)))?;
        let bytes = capacity.checked_mul(bb).ok_or(Error::Alloc { bytes: u64::MAX })?;
        let slots = Arc::new(AlignedBuf::zeroed(if external { 0 } else { bytes })?);
        let state = (0..capacity).map(|_| AtomicU8::new(EMPTY)).collect();
        let shared = Arc::new(Shared {
            reader,
            staging: staging.unwrap_or_else(StagingPool::global),
            slots,
            bundle_bytes: bb,
            region_offset: region.offset,
            crcs: OnceLock::new(),
            external,
            state,
            done_epoch: AtomicU64::new(0),
            counters: Counters::default(),
        });
        Ok(NeuronCache {
            shared,
            region,
            capacity,
            window,
            profile,
            opts,
            slot_of: vec![ABSENT; n],
            neuron_of: vec![ABSENT; capacity],
            last_wanted: vec![0; n],
            seen: vec![0; n],
            doomed: vec![false; n],
            serial: 0,
            live: 0,
            ready: 0,
            pending: None,
            filler: None,
            inline_only: false,
            fill_holes: false,
            moves: Vec::new(),
            landed: None,
            spent: None,
        })
    }

    /// Whether the rows live in the caller's memory (`new_external`).
    pub fn is_external(&self) -> bool {
        self.shared.external
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn window(&self) -> u32 {
        self.window
    }

    /// Change the window; applies from the next `begin`.
    pub fn set_window(&mut self, window: u32) {
        self.window = window;
    }

    pub fn fill_holes(&self) -> bool {
        self.fill_holes
    }

    /// Let new neurons take the rows evictions emptied (no move for them) instead of closing
    /// every hole with a move and appending. Then `ready_rows` is the lowest such hole and the
    /// rows being filled are `Admission::filled_rows`: compute that overlaps the reads takes the
    /// live rows below `total_rows` but those (llmflash's FlashFFN does, by default).
    pub fn set_fill_holes(&mut self, on: bool) {
        self.fill_holes = on;
    }

    pub fn bundle_bytes(&self) -> usize {
        self.shared.bundle_bytes
    }

    pub fn reader(&self) -> &Arc<Reader> {
        &self.shared.reader
    }

    /// Rows in use: `[0, live)`, ready or being filled by the pending admission.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Rows filled and stable until the next `begin`: `[0, ready_rows)`. Equals `live` once the
    /// pending admission has been waited for.
    pub fn ready_rows(&self) -> usize {
        self.ready
    }

    /// An admission's fill is in flight (not yet waited for).
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The pending fill has finished (wait would not block). True when none is pending.
    pub fn is_ready(&self) -> bool {
        match self.pending {
            None => true,
            Some(e) => self.shared.done_epoch.load(Ordering::Acquire) >= e,
        }
    }

    /// The slot matrix (`capacity * bundle_bytes` bytes), shared: Python views hold a clone.
    pub fn slots(&self) -> &Arc<AlignedBuf> {
        &self.shared.slots
    }

    /// The bytes of rows `[0, ready_rows)`: stable while borrowed (only `begin` moves them).
    pub fn ready_bytes(&self) -> &[u8] {
        if self.shared.external {
            return &[]; // the rows are the caller's
        }
        // The filler writes only rows at or past `ready`; rows move only in `begin` (`&mut self`).
        // SAFETY: ready * bb <= slots.len(), nothing writes these bytes while this borrow lives,
        // and `self.shared` keeps the allocation alive.
        unsafe { std::slice::from_raw_parts(self.shared.slots.as_ptr(), self.ready * self.shared.bundle_bytes) }
    }

    /// `slot -> neuron` for rows `[0, live)`.
    pub fn slot_neurons(&self) -> &[u32] {
        &self.neuron_of[..self.live]
    }

    /// The row holding `neuron`, if it is live (ready, or being filled by the pending fill).
    pub fn row_of(&self, neuron: u32) -> Option<usize> {
        match self.slot_of.get(neuron as usize) {
            Some(&r) if r != ABSENT => Some(r as usize),
            _ => None,
        }
    }

    pub fn contains(&self, neuron: u32) -> bool {
        self.row_of(neuron).is_some()
    }

    /// The step at which `neuron` was last wanted (0 if never; meaningful only for live ones).
    pub fn last_wanted(&self, neuron: u32) -> Option<u64> {
        self.last_wanted.get(neuron as usize).copied()
    }

    /// Each row's state (EMPTY, FILLING, READY), loaded with Acquire.
    pub fn row_states(&self) -> Vec<u8> {
        self.shared.state.iter().map(|s| s.load(Ordering::Acquire)).collect()
    }

    pub fn stats(&self) -> CacheStats {
        self.shared.counters.snapshot()
    }

    pub fn reset_stats(&self) {
        self.shared.counters.reset()
    }

    fn check_ids(&self, wanted: &[u32]) -> Result<()> {
        let n = self.region.n_neurons;
        match wanted.iter().find(|&&j| j >= n) {
            Some(&bad) => {
                Err(Error::invalid(format!("neuron {bad} is out of range: the layer has {n} neurons (ids 0..{n})")))
            }
            None => Ok(()),
        }
    }

    /// Admit `wanted` (store positions; any order, duplicates allowed) at `step` and start
    /// reading the missing ones in the background; see the module comment. Steps should not
    /// decrease (a neuron's age is `step - last_wanted`, saturating at 0).
    ///
    /// A pending fill is settled first; if it failed and its error was not yet returned by
    /// `wait`, that error is returned now (the cache is consistent, this admission not done).
    pub fn begin(&mut self, wanted: &[u32], step: u64) -> Result<Admission> {
        self.begin_inner(wanted, step, step, true)
    }

    /// `begin` for a guess (lookahead): the same evictions and reads at `step`, but the guessed
    /// neurons are recorded as last wanted at `step - 1`, as if the token before had wanted
    /// them. The check that follows at `step` (a `begin` with the true set) may then evict the
    /// guess's wrong neurons for capacity, and the window ages them like any other, while the
    /// guess itself could still make room by evicting the token before's neurons.
    pub fn begin_guess(&mut self, wanted: &[u32], step: u64) -> Result<Admission> {
        self.begin_inner(wanted, step, step.saturating_sub(1), true)
    }

    /// `begin` then `wait`, reading on the calling thread (no thread hand-off).
    pub fn admit(&mut self, wanted: &[u32], step: u64) -> Result<Admission> {
        self.begin_inner(wanted, step, step, false)
    }

    /// Block until the pending fill (if any) is done. On an I/O error or a checksum mismatch
    /// (`Error::Corrupt`) the fill's neurons are removed from the cache (rows `[ready, total)` are
    /// dropped: the fill's and any live rows between them; nothing is presented as filled) and the
    /// error, naming the file and offset, is returned.
    pub fn wait(&mut self) -> Result<()> {
        let Some(epoch) = self.pending else { return Ok(()) };
        let t0 = Instant::now();
        let result = match &mut self.filler {
            Some(f) => f.results.get_mut().unwrap_or_else(|e| e.into_inner()).recv().unwrap_or_else(|_| FillResult {
                epoch,
                error: Some(self.filler_died()),
                landed: None,
            }),
            None => FillResult { epoch, error: Some(self.filler_died()), landed: None },
        };
        add(&self.shared.counters.wait_ns, ns_since(t0));
        if result.epoch != epoch {
            // Cannot happen (one fill in flight per cache); fail closed rather than trust rows.
            return self.settle(Some(Error::invalid(format!(
                "cache fill result for epoch {} while waiting for {epoch}",
                result.epoch
            ))));
        }
        self.land(result.landed);
        self.settle(result.error)
    }
}

impl Drop for NeuronCache {
    fn drop(&mut self) {
        // Dropping the filler's channels ends its thread after any fill in flight; that fill
        // writes into the slot matrix it keeps alive through its own Arc<Shared>.
        self.filler = None;
    }
}

mod admit;
mod counters;
mod crc;
mod evict;
mod fill;
mod landed;
mod overflow;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_crc;
#[cfg(test)]
mod tests_external;
