//! `Profile` and the disk measurement functions for Python (measurements release the GIL).

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::profile::{self, Profile};

#[pyclass(frozen, name = "Profile", module = "llmflash._native")]
pub struct PyProfile {
    pub(crate) profile: Profile,
}

#[pymethods]
impl PyProfile {
    /// A profile from a table: mbps[i][j] is MB/s at sizes[i] bytes and concurrencies[j].
    #[new]
    #[pyo3(signature = (sizes, concurrencies, mbps, source = String::new()))]
    fn new(sizes: Vec<u64>, concurrencies: Vec<u32>, mbps: Vec<Vec<f64>>, source: String) -> PyResult<PyProfile> {
        Ok(PyProfile { profile: Profile::new(sizes, concurrencies, mbps, source)? })
    }

    /// The built-in table: fio random direct reads on this project's reference machine.
    #[staticmethod]
    fn default() -> PyProfile {
        PyProfile { profile: Profile::default() }
    }

    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<PyProfile> {
        Ok(PyProfile { profile: Profile::load(path)? })
    }

    #[staticmethod]
    fn from_json(text: &str) -> PyResult<PyProfile> {
        Ok(PyProfile { profile: Profile::from_json(text)? })
    }

    fn to_json(&self) -> String {
        self.profile.to_json()
    }

    /// Write the profile as JSON (atomically).
    fn save(&self, path: PathBuf) -> PyResult<()> {
        Ok(self.profile.save(path)?)
    }

    #[getter]
    fn sizes(&self) -> Vec<u64> {
        self.profile.sizes.clone()
    }

    #[getter]
    fn concurrencies(&self) -> Vec<u32> {
        self.profile.concurrencies.clone()
    }

    #[getter]
    fn mbps(&self) -> Vec<Vec<f64>> {
        self.profile.mbps.clone()
    }

    #[getter]
    fn source(&self) -> String {
        self.profile.source.clone()
    }

    /// Interpolated aggregate MB/s for requests of `size` bytes with `concurrency` in flight.
    fn throughput_mbps(&self, size: u64, concurrency: u32) -> f64 {
        self.profile.throughput_mbps(size, concurrency)
    }

    /// Seconds of batch time one request of `size` bytes costs with `concurrency` in flight.
    fn request_seconds(&self, size: u64, concurrency: u32) -> f64 {
        self.profile.request_seconds(size, concurrency)
    }

    /// Widest gap (bytes) worth reading through instead of issuing another request.
    #[pyo3(signature = (concurrency = 32))]
    fn bridge_gap_bytes(&self, concurrency: u32) -> u64 {
        self.profile.bridge_gap_bytes(concurrency)
    }

    fn __eq__(&self, other: PyRef<'_, PyProfile>) -> bool {
        self.profile == other.profile
    }

    fn __repr__(&self) -> String {
        format!(
            "Profile(sizes={:?}, concurrencies={:?}, source={:?})",
            self.profile.sizes, self.profile.concurrencies, self.profile.source
        )
    }
}

/// MB/s of random O_DIRECT reads of `size` bytes with `concurrency` threads over `path` for
/// `seconds` (the GIL is released meanwhile).
#[pyfunction]
pub fn measure_point(py: Python<'_>, path: PathBuf, size: u64, concurrency: u32, seconds: f64) -> PyResult<f64> {
    Ok(py.detach(|| profile::measure_point(&path, size, concurrency, seconds))?)
}

/// Measure every (size, concurrency) point over `path`; returns the Profile.
#[pyfunction]
pub fn measure(
    py: Python<'_>,
    path: PathBuf,
    sizes: Vec<u64>,
    concurrencies: Vec<u32>,
    seconds_per_point: f64,
) -> PyResult<PyProfile> {
    let p = py.detach(|| profile::measure(&path, &sizes, &concurrencies, seconds_per_point, |_, _| {}))?;
    Ok(PyProfile { profile: p })
}
