//! `Reader` for Python: batch reads into `AlignedBuf`s with the GIL released for the whole
//! batch, and the I/O counters as a dict.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyRuntimeWarning;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::buffer::PyAlignedBuf;
use super::planner::PyPlan;
use crate::error::Error;
use crate::reader::{check_disjoint, Engine, RawOp, Reader, ReaderOptions};

#[pyclass(frozen, name = "Reader", module = "llmflash._native")]
pub struct PyReader {
    /// Shared with the neuron caches built on this reader (rust/py/cache.rs).
    pub(crate) reader: Arc<Reader>,
}

/// Raw operations carried across `py.detach` (raw pointers are not Send).
struct Ops(Vec<RawOp>);
// SAFETY: the pointers target AlignedBuf allocations kept alive by Python references that the
// calling function holds (on its stack) until the detached read has returned.
unsafe impl Send for Ops {}

impl Ops {
    fn get(&self) -> &[RawOp] {
        &self.0
    }
}

/// A destination address carried across `py.detach`.
struct Dest(*mut u8);
// SAFETY: the address targets an AlignedBuf kept alive by a Python reference that the calling
// function holds until the detached read has returned.
unsafe impl Send for Dest {}

impl Dest {
    fn get(&self) -> *mut u8 {
        self.0
    }
}

impl PyReader {
    /// Read `ops` with the GIL released. The caller holds references to every destination.
    fn run(&self, py: Python<'_>, ops: Ops) -> PyResult<()> {
        let reader = &self.reader;
        // Python code may read those buffers meanwhile (as with any I/O into a numpy array).
        // SAFETY: each destination lies inside an AlignedBuf the caller keeps alive across this
        // call (nothing frees or moves it), and the ranges were checked disjoint.
        py.detach(move || unsafe { reader.read_raw(ops.get()) })?;
        Ok(())
    }
}

#[pymethods]
impl PyReader {
    /// Open `path` for reading with O_DIRECT (falls back to buffered reads, with a
    /// RuntimeWarning, where the filesystem refuses it) and `concurrency` reads in flight.
    /// `engine`: "auto" (io_uring where the kernel allows it, else threads), "threads" or
    /// "io_uring".
    #[new]
    #[pyo3(signature = (path, concurrency = crate::reader::DEFAULT_CONCURRENCY, direct = true, engine = "auto"))]
    fn new(py: Python<'_>, path: PathBuf, concurrency: usize, direct: bool, engine: &str) -> PyResult<PyReader> {
        let engine = match engine {
            "auto" => Engine::Auto,
            "threads" => Engine::Threads,
            "io_uring" => Engine::Uring,
            other => {
                return Err(Error::invalid(format!(
                    "engine = {other:?} (expected \"auto\", \"threads\" or \"io_uring\")"
                ))
                .into())
            }
        };
        let reader = py.detach(|| Reader::open_with(&path, ReaderOptions { concurrency, direct, engine }))?;
        if direct && !reader.is_direct() {
            let msg = std::ffi::CString::new(format!(
                "{}: the filesystem refuses O_DIRECT; reading through the page cache (with \
                 posix_fadvise DONTNEED) instead, so reads are slower and timings not those of the disk",
                path.display()
            ))
            .unwrap_or_default();
            PyErr::warn(py, &py.get_type::<PyRuntimeWarning>(), &msg, 1)?;
        }
        Ok(PyReader { reader: Arc::new(reader) })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.reader.path().to_path_buf()
    }

    /// True when reads bypass the page cache (O_DIRECT).
    #[getter]
    fn direct(&self) -> bool {
        self.reader.is_direct()
    }

    /// "auto" (io_uring for batches up to 4 x concurrency requests, threads for larger ones),
    /// "threads" or "io_uring": what is in use (auto without io_uring support is "threads").
    #[getter]
    fn engine(&self) -> &'static str {
        match self.reader.engine() {
            Engine::Auto => "auto",
            Engine::Uring => "io_uring",
            Engine::Threads => "threads",
        }
    }

    #[getter]
    fn concurrency(&self) -> usize {
        self.reader.concurrency()
    }

    /// The file's current size in bytes.
    fn file_size(&self) -> PyResult<u64> {
        Ok(self.reader.file_len()?)
    }

    /// Run a batch of reads `(file_offset, length, dest, dest_offset)`; returns when all are
    /// done (GIL released), or raises FlashIOError for the first that failed.
    fn read(&self, py: Python<'_>, requests: Vec<(u64, usize, Bound<'_, PyAlignedBuf>, usize)>) -> PyResult<()> {
        let mut ops = Vec::with_capacity(requests.len());
        let mut ranges = Vec::with_capacity(requests.len());
        for (i, (file_offset, len, buf, dest_offset)) in requests.iter().enumerate() {
            let b = &buf.get().buf;
            if dest_offset.checked_add(*len).map_or(true, |end| end > b.len()) {
                return Err(Error::invalid(format!(
                    "request {i}: {len} bytes at destination offset {dest_offset} overflow the {}-byte buffer",
                    b.len()
                ))
                .into());
            }
            let start = b.as_ptr() as usize + dest_offset;
            ranges.push((start, start + len));
            // SAFETY: dest_offset + len <= b.len() (checked above): the pointer stays in bounds.
            ops.push(RawOp { file_offset: *file_offset, len: *len, dest: unsafe { b.as_mut_ptr().add(*dest_offset) } });
        }
        // Disjoint destination memory, across all buffers (distinct allocations never overlap).
        check_disjoint(&mut ranges)?;
        self.run(py, Ops(ops))
        // `requests` (holding every destination) is dropped only after the read returned.
    }

    /// Read `length` bytes at `offset` into a new AlignedBuf, in ~1 MiB requests in parallel.
    fn read_region(&self, py: Python<'_>, offset: u64, length: usize) -> PyResult<PyAlignedBuf> {
        let reader = &self.reader;
        let buf = py.detach(move || reader.read_region(offset, length))?;
        Ok(PyAlignedBuf::from_buf(buf))
    }

    /// Read `length` bytes at `offset` into `out[:length]` as ~1 MiB requests in parallel (GIL
    /// released), hashing each request's bytes as it completes; StoreError naming the file, `what`
    /// and `offset` unless the CRC-32 of the first `crc_bytes` bytes is `crc32`.
    #[pyo3(signature = (offset, length, out, crc_bytes, crc32, what = "region"))]
    #[allow(clippy::too_many_arguments)]
    fn read_region_checked(
        &self,
        py: Python<'_>,
        offset: u64,
        length: usize,
        out: Bound<'_, PyAlignedBuf>,
        crc_bytes: usize,
        crc32: u32,
        what: &str,
    ) -> PyResult<()> {
        let b = &out.get().buf;
        if length > b.len() {
            return Err(
                Error::invalid(format!("region of {length} bytes does not fit the {}-byte buffer", b.len())).into()
            );
        }
        let dest = Dest(b.as_mut_ptr());
        let reader = &self.reader;
        // Python code may read the buffer meanwhile (as with any I/O into a numpy array).
        // SAFETY: `out` (held on this stack frame) keeps the buffer alive across the call and
        // length <= its size (checked above).
        let got = py.detach(move || unsafe { reader.read_region_crc_raw(offset, length, dest.get(), crc_bytes) })?;
        Ok(self.reader.check_crc(offset, crc_bytes, got, crc32, what)?)
    }

    /// Read a plan's requests into `out` (an AlignedBuf of at least plan.buffer_bytes) or a new
    /// buffer, which is returned. Bundle k of plan.neurons then starts at plan.landing[k].
    #[pyo3(signature = (plan, out = None))]
    fn read_plan<'py>(
        &self,
        py: Python<'py>,
        plan: &Bound<'py, PyPlan>,
        out: Option<Bound<'py, PyAlignedBuf>>,
    ) -> PyResult<Bound<'py, PyAlignedBuf>> {
        let plan = &plan.get().plan;
        let out = match out {
            Some(b) => {
                if (b.get().buf.len() as u64) < plan.buffer_bytes {
                    return Err(Error::invalid(format!(
                        "output buffer of {} bytes is smaller than the plan's {}",
                        b.get().buf.len(),
                        plan.buffer_bytes
                    ))
                    .into());
                }
                b
            }
            None => {
                Bound::new(py, PyAlignedBuf::from_buf(crate::aligned::AlignedBuf::zeroed(plan.buffer_bytes as usize)?))?
            }
        };
        let base = out.get().buf.as_mut_ptr();
        let ops = plan
            .requests
            .iter()
            .map(|r| RawOp {
                file_offset: r.offset,
                len: r.len as usize,
                // SAFETY: requests lie back to back inside [0, buffer_bytes), checked above to fit.
                dest: unsafe { base.add(r.dest_offset as usize) },
            })
            .collect();
        self.run(py, Ops(ops))?;
        self.reader.stats().add_useful(plan.useful_bytes);
        Ok(out)
    }

    /// Counters since open or the last reset: bytes_read, bytes_useful, requests, batches, io_ns.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.reader.stats().snapshot().fields() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    fn reset_stats(&self) {
        self.reader.stats().reset();
    }

    fn __repr__(&self) -> String {
        format!(
            "Reader({:?}, concurrency={}, engine={:?}, direct={})",
            self.reader.path().display().to_string(),
            self.reader.concurrency(),
            self.engine(),
            if self.reader.is_direct() { "True" } else { "False" }
        )
    }
}
