//! `plan()` and `Plan` for Python: the read planner's input from numpy arrays or sequences,
//! its landing map out as numpy int64 arrays (ready for numpy/torch indexing).

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;

use super::buffer::PyAlignedBuf;
use super::profile::PyProfile;
use crate::aligned::AlignedBuf;
use crate::error::Error;
use crate::planner::{plan as plan_reads, Plan, PlanOptions, Region};
use crate::profile::Profile;

/// Neuron ids as numpy arrays of the common integer types (read without a copy per element), or
/// any sequence of ints.
#[derive(FromPyObject)]
pub(crate) enum Wanted<'py> {
    I64(PyReadonlyArray1<'py, i64>),
    I32(PyReadonlyArray1<'py, i32>),
    U32(PyReadonlyArray1<'py, u32>),
    U64(PyReadonlyArray1<'py, u64>),
    Seq(Vec<i64>),
}

fn to_ids<T: Copy + TryInto<u32> + std::fmt::Display>(it: impl Iterator<Item = T>, n: u32) -> Result<Vec<u32>, Error> {
    it.map(|x| {
        x.try_into()
            .map_err(|_| Error::invalid(format!("neuron {x} is out of range: the layer has {n} neurons (ids 0..{n})")))
    })
    .collect()
}

impl Wanted<'_> {
    pub(crate) fn ids(&self, n: u32) -> Result<Vec<u32>, Error> {
        match self {
            Wanted::I64(a) => to_ids(a.as_array().iter().copied(), n),
            Wanted::I32(a) => to_ids(a.as_array().iter().copied(), n),
            Wanted::U32(a) => Ok(a.as_array().to_vec()),
            Wanted::U64(a) => to_ids(a.as_array().iter().copied(), n),
            Wanted::Seq(v) => to_ids(v.iter().copied(), n),
        }
    }
}

#[pyclass(frozen, name = "Plan", module = "llmflash._native")]
pub struct PyPlan {
    pub(crate) plan: Plan,
}

/// Plan the reads of `wanted` neurons (store positions; any order, duplicates allowed) from a
/// layer region of `n_neurons` bundles of `bundle_bytes` starting at `region_offset`.
#[pyfunction]
#[pyo3(signature = (wanted, bundle_bytes, region_offset, n_neurons, profile = None,
                    max_request_bytes = 1 << 20, concurrency = 32, allow_whole = true, max_gap_bytes = None))]
#[allow(clippy::too_many_arguments)]
pub fn plan(
    wanted: &Bound<'_, PyAny>,
    bundle_bytes: u64,
    region_offset: u64,
    n_neurons: u32,
    profile: Option<PyRef<'_, PyProfile>>,
    max_request_bytes: u64,
    concurrency: u32,
    allow_whole: bool,
    max_gap_bytes: Option<u64>,
) -> PyResult<PyPlan> {
    let ids = match wanted.extract::<Wanted<'_>>() {
        Ok(w) => w.ids(n_neurons)?,
        Err(_) => as_int64_array(wanted)?.ids(n_neurons)?, // torch tensors, other array-likes
    };
    let region = Region { offset: region_offset, n_neurons, bundle_bytes };
    let opts = PlanOptions { max_request_bytes, concurrency, allow_whole, max_gap_bytes };
    let default;
    let profile = match &profile {
        Some(p) => &p.profile,
        None => {
            default = Profile::default();
            &default
        }
    };
    Ok(PyPlan { plan: plan_reads(&ids, &region, profile, &opts)? })
}

/// `numpy.asarray(x)` for anything array-like with an integer dtype, as a 1-D int64 array.
pub(crate) fn as_int64_array<'py>(x: &Bound<'py, PyAny>) -> PyResult<Wanted<'py>> {
    let arr = x.py().import("numpy")?.call_method1("asarray", (x,))?;
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    let ndim: usize = arr.getattr("ndim")?.extract()?;
    if !(kind == "i" || kind == "u") || ndim != 1 {
        return Err(PyTypeError::new_err(format!(
            "wanted must be a 1-D sequence or array of integer neuron ids, got {}-D of dtype kind {kind:?}",
            ndim
        )));
    }
    Ok(Wanted::I64(arr.call_method1("astype", ("int64",))?.extract()?))
}

fn i64_array<'py>(py: Python<'py>, it: impl Iterator<Item = u64>) -> Bound<'py, PyArray1<i64>> {
    PyArray1::from_vec(py, it.map(|x| x as i64).collect())
}

#[pymethods]
impl PyPlan {
    /// Aligned read requests: [(file_offset, length, dest_offset)], in file order.
    #[getter]
    fn requests(&self) -> Vec<(u64, u64, u64)> {
        self.plan.requests.iter().map(|r| (r.offset, r.len, r.dest_offset)).collect()
    }

    /// The unique wanted neurons, sorted (int64).
    #[getter]
    fn neurons<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_array(py, self.plan.neurons.iter().map(|&x| x as u64))
    }

    /// For each of `neurons`: the offset of its bundle in the plan's buffer (int64).
    #[getter]
    fn landing<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_array(py, self.plan.landing.iter().copied())
    }

    /// For each of `neurons`: the request holding its bundle's first byte (int64).
    #[getter]
    fn request_index<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        i64_array(py, self.plan.request_index.iter().map(|&x| x as u64))
    }

    /// For each of `neurons`: the offset of its bundle within its request (int64).
    #[getter]
    fn offset_in_request<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<i64>> {
        let p = &self.plan;
        i64_array(py, p.landing.iter().zip(&p.request_index).map(|(&at, &r)| at - p.requests[r as usize].dest_offset))
    }

    #[getter]
    fn buffer_bytes(&self) -> u64 {
        self.plan.buffer_bytes
    }

    #[getter]
    fn useful_bytes(&self) -> u64 {
        self.plan.useful_bytes
    }

    #[getter]
    fn max_gap_bytes(&self) -> u64 {
        self.plan.max_gap_bytes
    }

    #[getter]
    fn whole_region(&self) -> bool {
        self.plan.whole_region
    }

    #[getter]
    fn est_seconds(&self) -> f64 {
        self.plan.est_seconds
    }

    #[getter]
    fn est_sparse_seconds(&self) -> f64 {
        self.plan.est_sparse_seconds
    }

    #[getter]
    fn est_whole_seconds(&self) -> f64 {
        self.plan.est_whole_seconds
    }

    #[getter]
    fn bundle_bytes(&self) -> u64 {
        self.plan.region.bundle_bytes
    }

    #[getter]
    fn region_offset(&self) -> u64 {
        self.plan.region.offset
    }

    #[getter]
    fn n_neurons(&self) -> u32 {
        self.plan.region.n_neurons
    }

    /// Number of requests.
    fn __len__(&self) -> usize {
        self.plan.requests.len()
    }

    /// Copy the wanted bundles out of `buf` (filled by Reader.read_plan) into a new AlignedBuf
    /// of len(neurons) rows of bundle_bytes, row k = neurons[k].
    fn gather(&self, py: Python<'_>, buf: &Bound<'_, PyAlignedBuf>) -> PyResult<PyAlignedBuf> {
        let src = &buf.get().buf;
        let mut out = AlignedBuf::zeroed(self.plan.useful_bytes as usize)?;
        let plan = &self.plan;
        // The source is read through a shared slice: Python may view it too, and nothing
        // writes to it during this copy unless the caller races a read into the same buffer.
        py.detach(|| plan.gather(src.as_slice(), out.as_mut_slice()))?;
        Ok(PyAlignedBuf::from_buf(out))
    }

    fn __repr__(&self) -> String {
        let p = &self.plan;
        format!(
            "Plan({} neurons, {} requests, {} bytes ({} useful), whole_region={}, max_gap_bytes={}, est {:.3} ms)",
            p.neurons.len(),
            p.requests.len(),
            p.buffer_bytes,
            p.useful_bytes,
            if p.whole_region { "True" } else { "False" },
            p.max_gap_bytes,
            p.est_seconds * 1e3
        )
    }
}
