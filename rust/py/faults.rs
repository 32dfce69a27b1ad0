//! Test-only: the reader's fault-injection hook (rust/reader/faults.rs) for Python's tests.
//! Private (underscore names); nothing in the package calls these.

use pyo3::prelude::*;

use crate::reader::faults::{self, Kind, Rule};

/// Make reads of files whose path ends with `file` that meet `[start, end)` fail ("eio",
/// "eintr"), end ("eof"), come back short ("short") or bring a changed byte ("flip"), after
/// `skip` such reads, `times` times (None: always). Returns the rule's index in `_faults_fired()`.
#[pyfunction]
#[pyo3(name = "_inject_fault", signature = (kind, file = "", start = 0, end = u64::MAX, skip = 0, times = Some(1)))]
pub fn inject_fault(kind: &str, file: &str, start: u64, end: u64, skip: u64, times: Option<u64>) -> PyResult<usize> {
    let rule = Rule { kind: Kind::parse(kind)?, file: file.to_string(), start, end, skip, times };
    Ok(faults::inject(rule)?)
}

/// Remove every fault rule; returns how many times each fired.
#[pyfunction]
#[pyo3(name = "_clear_faults")]
pub fn clear_faults() -> Vec<u64> {
    faults::clear()
}

/// How many times each installed fault rule has fired.
#[pyfunction]
#[pyo3(name = "_faults_fired")]
pub fn faults_fired() -> Vec<u64> {
    faults::fired()
}
