//! `OverflowReader` for Python: reads one layer's bundles past its cache's rows, from any thread
//! (rust/cache/overflow.rs). Flash starts a token's overflow reads on a worker thread as soon as
//! the admission names them, while the owner thread waits for the fill and computes; the cache
//! itself would refuse a second thread ("Already borrowed") while its owner calls wait().

use pyo3::prelude::*;

use super::buffer::PyAlignedBuf;
use super::cache::{ids, Dest};
use crate::cache::OverflowReader;
use crate::error::Error;

#[pyclass(frozen, name = "OverflowReader", module = "llmflash._native")]
pub struct PyOverflowReader {
    pub(super) reader: OverflowReader,
}

/// Read the bundles of `wanted` into `out` through `reader` (see PyOverflowReader.read).
pub(super) fn read_into(
    py: Python<'_>,
    reader: &OverflowReader,
    wanted: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAlignedBuf>,
) -> PyResult<usize> {
    let ids = ids(wanted, reader.region().n_neurons)?;
    let buf = &out.get().buf;
    if std::sync::Arc::ptr_eq(buf, reader.slots()) {
        return Err(Error::invalid("read_neurons cannot write into the cache's own slot matrix").into());
    }
    let (dest, len) = (Dest(buf.as_mut_ptr()), buf.len());
    // Python code may touch `out` meanwhile, as with any buffer handed to an I/O call.
    // SAFETY: `out`, held until this returns, keeps the destination alive (nothing frees or
    // moves it); it is not the slot matrix (checked) nor a staging buffer.
    let n = py.detach(move || unsafe { reader.read_neurons_raw(&ids, dest.get(), len) })?;
    Ok(n)
}

#[pymethods]
impl PyOverflowReader {
    /// Read the bundles of `wanted` (store positions, duplicates allowed) into `out`, packed:
    /// row k = wanted[k]; `out` (a reusable scratch AlignedBuf) must hold len(wanted) rows and
    /// must not be the cache's slot matrix. Returns len(wanted). GIL released; safe beside the
    /// cache's own calls on another thread (it shares the reader, CRC table and counters, and
    /// touches no row). A bundle that fails its CRC check is a StoreError, `out` untouched.
    fn read(&self, py: Python<'_>, wanted: &Bound<'_, PyAny>, out: &Bound<'_, PyAlignedBuf>) -> PyResult<usize> {
        read_into(py, &self.reader, wanted, out)
    }

    fn __repr__(&self) -> String {
        let r = self.reader.region();
        format!("OverflowReader({} neurons of {} bytes at offset {})", r.n_neurons, r.bundle_bytes, r.offset)
    }
}
