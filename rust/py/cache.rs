//! `NeuronCache` and `Admission` for Python: one cache per FFN layer (rust/cache.rs). Every call
//! that can block (begin settles a pending fill, wait, admit, read_neurons) releases the GIL.
//! The slot matrix is exported as an `AlignedBuf` sharing the cache's allocation, so
//! `torch.frombuffer(cache.slots, dtype=...)` views the rows without copying.

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::buffer::PyAlignedBuf;
use super::overflow::{read_into, PyOverflowReader};
use super::planner::{as_int64_array, Wanted};
use super::profile::PyProfile;
use super::reader::PyReader;
use crate::cache::{Admission, NeuronCache};
use crate::error::Error;
use crate::planner::{PlanOptions, Region};

/// Neuron ids from a numpy array, a torch tensor or any sequence of ints.
pub(super) fn ids(wanted: &Bound<'_, PyAny>, n: u32) -> PyResult<Vec<u32>> {
    Ok(match wanted.extract::<Wanted<'_>>() {
        Ok(w) => w.ids(n)?,
        Err(_) => as_int64_array(wanted)?.ids(n)?,
    })
}

/// A bundle CRC table: a 1-D numpy uint32 array, or any sequence of ints in [0, 2**32).
fn crc_table(x: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if let Ok(a) = x.extract::<PyReadonlyArray1<'_, u32>>() {
        return Ok(a.as_array().to_vec());
    }
    if x.is_instance(&x.py().import("numpy")?.getattr("ndarray")?)? {
        let dtype = x.getattr("dtype")?.str()?.to_string();
        let ndim: usize = x.getattr("ndim")?.extract()?;
        return Err(
            Error::invalid(format!("bundle CRCs must be a 1-D uint32 array, got a {ndim}-D {dtype} array")).into()
        );
    }
    let v: Vec<i64> = x
        .extract()
        .map_err(|_| Error::invalid("bundle CRCs must be a 1-D numpy uint32 array or a sequence of ints"))?;
    let crcs = v.iter().map(|&c| u32::try_from(c).map_err(|_| c)).collect::<Result<Vec<u32>, i64>>();
    Ok(crcs.map_err(|c| Error::invalid(format!("bundle CRC {c} is outside [0, 2**32)")))?)
}

/// The CRC-32s of runs of `group` consecutive bundles (bundle_bytes each) from the bundles' own
/// CRCs (crcs: 1-D uint32): the table of a cache whose unit is such a run, a mixture of experts'
/// expert. zlib.crc32 of a run's bytes equals its entry.
#[pyfunction]
pub(super) fn combine_crcs<'py>(
    py: Python<'py>,
    crcs: &Bound<'py, PyAny>,
    group: usize,
    bundle_bytes: u64,
) -> PyResult<Bound<'py, PyArray1<u32>>> {
    let table = crc_table(crcs)?;
    Ok(PyArray1::from_vec(py, crate::cache::combine_groups(&table, group, bundle_bytes)?))
}

fn i64_array<'py>(py: Python<'py>, it: impl Iterator<Item = i64>) -> Bound<'py, PyArray1<i64>> {
    PyArray1::from_vec(py, it.collect())
}

/// What one `NeuronCache.begin` did (see NeuronCache.begin).
#[pyclass(frozen, name = "Admission", module = "llmflash._native")]
pub struct PyAdmission {
    adm: Admission,
}

#[pymethods]
impl PyAdmission {
    #[getter]
    fn epoch(&self) -> u64 {
        self.adm.epoch
    }

    /// Rows [0, ready_rows) are valid now and do not move until the next begin().
    #[getter]
    fn ready_rows(&self) -> usize {
        self.adm.ready_rows
    }

    /// Rows [ready_rows, total_rows) are valid once wait() has returned.
    #[getter]
    fn total_rows(&self) -> usize {
        self.adm.total_rows
    }

    #[getter]
    fn hits(&self) -> usize {
        self.adm.hits
    }

    /// Neurons read into rows by this admission (unique wanted neurons that were missing and fit).
    #[getter]
    fn misses(&self) -> usize {
        self.adm.misses
    }

    /// Wanted neurons that did not fit (store positions, int64, the caller's order).
    #[getter]
    fn overflow<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_array(py, self.adm.overflow.iter().map(|&j| j as i64))
    }

    /// The rows being filled (int64, ascending, within [ready_rows, total_rows)); with
    /// fill_holes they lie between live rows: compute before wait() takes the others.
    #[getter]
    fn filled_rows<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_array(py, self.adm.filled_rows.iter().map(|&r| r as i64))
    }

    /// External rows: the eviction moves to apply to the caller's rows, in order, before using
    /// them: (dst, src) int64 arrays, rows[dst[i]] = rows[src[i]] (empty otherwise).
    #[getter]
    fn moves<'py>(&self, py: Python<'py>) -> (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>) {
        let m = &self.adm.moves;
        (i64_array(py, m.iter().map(|&(d, _)| d as i64)), i64_array(py, m.iter().map(|&(_, s)| s as i64)))
    }

    #[getter]
    fn evicted_window(&self) -> usize {
        self.adm.evicted_window
    }

    #[getter]
    fn evicted_capacity(&self) -> usize {
        self.adm.evicted_capacity
    }

    /// The fill's plan: bytes it reads (requests, with bridged gaps and page padding)...
    #[getter]
    fn bytes_read(&self) -> u64 {
        self.adm.bytes_read
    }

    /// ...of which bytes of appended bundles (misses * bundle_bytes).
    #[getter]
    fn bytes_useful(&self) -> u64 {
        self.adm.bytes_useful
    }

    #[getter]
    fn requests(&self) -> usize {
        self.adm.requests
    }

    #[getter]
    fn whole_region(&self) -> bool {
        self.adm.whole_region
    }

    #[getter]
    fn est_seconds(&self) -> f64 {
        self.adm.est_seconds
    }

    fn __repr__(&self) -> String {
        let a = &self.adm;
        format!(
            "Admission(epoch={}, ready_rows={}, total_rows={}, hits={}, overflow={}, evicted_window={}, \
             evicted_capacity={}, bytes_read={}, requests={})",
            a.epoch,
            a.ready_rows,
            a.total_rows,
            a.hits,
            a.overflow.len(),
            a.evicted_window,
            a.evicted_capacity,
            a.bytes_read,
            a.requests
        )
    }
}

/// The neuron cache of one FFN layer. Methods that change it take the object mutably: call them
/// from one thread at a time (another thread gets RuntimeError "Already borrowed").
#[pyclass(name = "NeuronCache", module = "llmflash._native")]
pub struct PyNeuronCache {
    cache: NeuronCache,
    slots: Py<PyAlignedBuf>,
}

impl PyNeuronCache {
    /// `wanted` as checked store positions, then one admission `f` on the cache without the GIL.
    fn admission(
        &mut self,
        py: Python<'_>,
        wanted: &Bound<'_, PyAny>,
        f: impl FnOnce(&mut NeuronCache, &[u32]) -> crate::error::Result<Admission> + Send,
    ) -> PyResult<PyAdmission> {
        let ids = ids(wanted, self.cache.region().n_neurons)?;
        let cache = &mut self.cache;
        let adm = py.detach(move || f(cache, &ids))?;
        Ok(PyAdmission { adm })
    }
}

#[pymethods]
impl PyNeuronCache {
    /// A cache of `capacity` rows (0..=n_neurons) over the layer region of `n_neurons` bundles
    /// of `bundle_bytes` at `region_offset` in `reader`'s file. Neurons not wanted in the last
    /// `window` steps are evicted. Plan options as for plan(); concurrency defaults to the
    /// reader's.
    #[new]
    #[pyo3(signature = (reader, region_offset, n_neurons, bundle_bytes, capacity, window, profile = None,
                        max_request_bytes = 1 << 20, concurrency = None, allow_whole = true, max_gap_bytes = None,
                        external_rows = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        reader: PyRef<'_, PyReader>,
        region_offset: u64,
        n_neurons: u32,
        bundle_bytes: u64,
        capacity: usize,
        window: u32,
        profile: Option<PyRef<'_, PyProfile>>,
        max_request_bytes: u64,
        concurrency: Option<u32>,
        allow_whole: bool,
        max_gap_bytes: Option<u64>,
        external_rows: bool,
    ) -> PyResult<PyNeuronCache> {
        let reader = reader.reader.clone();
        let concurrency = concurrency.unwrap_or(reader.concurrency().min(u32::MAX as usize) as u32);
        let opts = PlanOptions { max_request_bytes, concurrency, allow_whole, max_gap_bytes };
        let profile = profile.map(|p| p.profile.clone()).unwrap_or_default();
        let region = Region { offset: region_offset, n_neurons, bundle_bytes };
        // Allocating (and zeroing) the slot matrix can take a while: without the GIL.
        let cache = py.detach(move || {
            if external_rows {
                NeuronCache::new_external(reader, region, capacity, window, profile, opts, None)
            } else {
                NeuronCache::new(reader, region, capacity, window, profile, opts, None)
            }
        })?;
        let slots = Py::new(py, PyAlignedBuf::shared(cache.slots().clone()))?;
        Ok(PyNeuronCache { cache, slots })
    }

    /// Admit `wanted` (store positions: numpy ints, torch tensor or sequence; any order,
    /// duplicates allowed) at `step` (the token index; should not decrease): evict by window,
    /// then by capacity (least recently wanted first, never a neuron wanted now), append the
    /// missing neurons that fit and start reading them in the background. Rows
    /// [0, ready_rows) may be used at once; [ready_rows, total_rows) after wait(). A failure
    /// of an earlier fill that was never waited for is raised here.
    fn begin(&mut self, py: Python<'_>, wanted: &Bound<'_, PyAny>, step: u64) -> PyResult<PyAdmission> {
        self.admission(py, wanted, move |c, ids| c.begin(ids, step))
    }

    /// begin() for a lookahead guess: the guessed neurons count as wanted at `step - 1`, so the
    /// check with the true set at `step` can evict the wrong ones for capacity.
    fn begin_guess(&mut self, py: Python<'_>, wanted: &Bound<'_, PyAny>, step: u64) -> PyResult<PyAdmission> {
        self.admission(py, wanted, move |c, ids| c.begin_guess(ids, step))
    }

    /// Block (GIL released) until the pending fill is done. On FlashIOError (or StoreError: a
    /// bundle failed its CRC check), the fill's neurons have been removed: nothing unread or
    /// corrupt is presented as filled.
    fn wait(&mut self, py: Python<'_>) -> PyResult<()> {
        let cache = &mut self.cache;
        py.detach(move || cache.wait())?;
        Ok(())
    }

    /// begin() + wait(), reading on the calling thread (GIL released).
    fn admit(&mut self, py: Python<'_>, wanted: &Bound<'_, PyAny>, step: u64) -> PyResult<PyAdmission> {
        self.admission(py, wanted, move |c, ids| c.admit(ids, step))
    }

    /// Read bundles of `wanted` (duplicates allowed) into `out`, packed: row k = wanted[k].
    /// For the overflow; `out` (a reusable scratch AlignedBuf) must hold len(wanted) rows and
    /// must not be this cache's slot matrix. Returns len(wanted). GIL released.
    fn read_neurons(
        &self,
        py: Python<'_>,
        wanted: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAlignedBuf>,
    ) -> PyResult<usize> {
        read_into(py, &self.cache.overflow_reader(), wanted, out)
    }

    /// An OverflowReader of this cache: read_neurons() for another thread, which may run it
    /// while this one calls begin(), wait() or admit() (this object refuses a second thread).
    fn overflow_reader(&self) -> PyOverflowReader {
        PyOverflowReader { reader: self.cache.overflow_reader() }
    }

    /// Check every bundle read from now on against `crcs` (a 1-D numpy uint32 array or a sequence
    /// of ints, n_neurons entries): crcs[j] = zlib.crc32 of bundle j's bundle_bytes bytes at
    /// region_offset + j * bundle_bytes. A mismatch is a StoreError naming the file, bundle and
    /// offset (from wait()/admit()/begin(), the fill's neurons removed; from read_neurons()). Set
    /// once (the same table again is a no-op; another, or one while a fill is pending, is
    /// InvalidArgumentError); live rows are checked at once: those that differ are evicted and
    /// the first is raised as StoreError (the table is set anyway).
    fn set_bundle_crcs(&mut self, py: Python<'_>, crcs: &Bound<'_, PyAny>) -> PyResult<()> {
        let crcs = crc_table(crcs)?;
        let cache = &mut self.cache;
        py.detach(move || cache.set_bundle_crcs(crcs))?;
        Ok(())
    }

    /// Whether set_bundle_crcs() gave this cache a table (every bundle read is then checked).
    #[getter]
    fn has_bundle_crcs(&self) -> bool {
        self.cache.has_bundle_crcs()
    }

    /// The rows live in the caller's memory (external_rows=True): moves come in Admission.moves
    /// and each fill's bundles from take_landed(); `slots` is empty.
    #[getter]
    fn external_rows(&self) -> bool {
        self.cache.is_external()
    }

    /// External rows: the last finished fill's bundles as an AlignedBuf, row k (bundle_bytes
    /// each) for the admission's filled_rows[k]; None when there is none or it was taken. Read
    /// it after wait() (or admit()), copy the bundles into their rows, then take_landed().
    fn landed(&self) -> Option<PyAlignedBuf> {
        self.cache.landed().map(PyAlignedBuf::shared)
    }

    /// landed(), marking the bundles taken (their neurons stay cached). Bundles not taken by the
    /// next admission never reached their rows: that admission drops their neurons (read again
    /// when wanted). The buffer goes back to the staging pool once nothing views it.
    fn take_landed(&mut self) -> Option<PyAlignedBuf> {
        self.cache.take_landed().map(PyAlignedBuf::shared)
    }

    /// The slot matrix: capacity * bundle_bytes bytes, row k = bytes [k*bb, (k+1)*bb). Always
    /// the same AlignedBuf (zero-copy views keep the cache's memory alive).
    #[getter]
    fn slots(&self, py: Python<'_>) -> Py<PyAlignedBuf> {
        self.slots.clone_ref(py)
    }

    /// Rows in use, [0, live): ready, or being filled by the pending admission.
    #[getter]
    fn live(&self) -> usize {
        self.cache.live()
    }

    #[getter]
    fn ready_rows(&self) -> usize {
        self.cache.ready_rows()
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    #[getter]
    fn window(&self) -> u32 {
        self.cache.window()
    }

    #[setter]
    fn set_window(&mut self, window: u32) {
        self.cache.set_window(window);
    }

    /// New neurons take the rows evictions emptied (no move) instead of the paper's
    /// move-then-append; then ready_rows is the lowest such row and Admission.filled_rows lists
    /// the rows being filled (compute before wait() takes the others).
    #[getter]
    fn fill_holes(&self) -> bool {
        self.cache.fill_holes()
    }

    #[setter]
    fn set_fill_holes(&mut self, on: bool) {
        self.cache.set_fill_holes(on);
    }

    #[getter]
    fn n_neurons(&self) -> u32 {
        self.cache.region().n_neurons
    }

    #[getter]
    fn bundle_bytes(&self) -> usize {
        self.cache.bundle_bytes()
    }

    #[getter]
    fn region_offset(&self) -> u64 {
        self.cache.region().offset
    }

    /// A fill has been started and not yet waited for.
    #[getter]
    fn pending(&self) -> bool {
        self.cache.is_pending()
    }

    /// The pending fill (if any) has finished: wait() would not block.
    fn is_ready(&self) -> bool {
        self.cache.is_ready()
    }

    /// slot -> neuron (store position) for rows [0, live), int64 copy.
    fn slot_neurons<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_array(py, self.cache.slot_neurons().iter().map(|&j| j as i64))
    }

    /// For each id: its row, or -1 if it is not live (int64).
    fn rows_of<'py>(&self, py: Python<'py>, wanted: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let ids = ids(wanted, self.cache.region().n_neurons)?;
        Ok(i64_array(py, ids.iter().map(|&j| self.cache.row_of(j).map_or(-1, |r| r as i64))))
    }

    /// Whether `neuron` is live (ready, or being filled by the pending admission).
    fn contains(&self, neuron: i64) -> bool {
        u32::try_from(neuron).is_ok_and(|j| self.cache.contains(j))
    }

    fn __contains__(&self, neuron: i64) -> bool {
        self.contains(neuron)
    }

    fn __len__(&self) -> usize {
        self.cache.live()
    }

    /// Each row's state: 0 empty, 1 filling, 2 ready (uint8 copy, capacity entries).
    fn row_states<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u8>> {
        PyArray1::from_vec(py, self.cache.row_states())
    }

    /// Counters: admissions, hits, misses, overflow, evicted_window, evicted_capacity,
    /// bytes_read, bytes_useful, bytes_direct, requests, failed_fills, io_ns, wait_ns, mgmt_ns,
    /// crc_ns (the part of mgmt_ns spent on CRC checks).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.cache.stats().fields() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn reset_stats(&self) {
        self.cache.reset_stats();
    }

    fn __repr__(&self) -> String {
        let c = &self.cache;
        format!(
            "NeuronCache(live={}, capacity={}, window={}, n_neurons={}, bundle_bytes={}, pending={})",
            c.live(),
            c.capacity(),
            c.window(),
            c.region().n_neurons,
            c.bundle_bytes(),
            if c.is_pending() { "True" } else { "False" }
        )
    }
}

/// A destination pointer carried across `py.detach` (raw pointers are not Send).
pub(super) struct Dest(pub(super) *mut u8);
// SAFETY: the pointer targets an AlignedBuf kept alive by a Python reference that the calling
// function holds until the detached call has returned.
unsafe impl Send for Dest {}

impl Dest {
    pub(super) fn get(&self) -> *mut u8 {
        self.0
    }
}
