//! `AlignedBuf` for Python: a 4 KiB-aligned, Rust-owned byte buffer exported through the buffer
//! protocol, so `np.asarray(buf)`, `memoryview(buf)` and `torch.frombuffer(buf, dtype=...)` view
//! it without copying. Each view holds a reference to this object (the buffer protocol's
//! `view.obj`; torch keeps one for the tensor's lifetime), so the memory outlives the Python
//! name that created it for exactly as long as something still views it.

use std::ffi::c_int;
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;

use crate::aligned::AlignedBuf;

#[pyclass(frozen, weakref, name = "AlignedBuf", module = "llmflash._native")]
pub struct PyAlignedBuf {
    /// Shared with Rust owners that outlive or precede the Python object (a neuron cache's slot
    /// matrix): the allocation is freed when the last of them goes.
    pub(crate) buf: Arc<AlignedBuf>,
}

impl PyAlignedBuf {
    pub(crate) fn from_buf(buf: AlignedBuf) -> PyAlignedBuf {
        PyAlignedBuf { buf: Arc::new(buf) }
    }

    pub(crate) fn shared(buf: Arc<AlignedBuf>) -> PyAlignedBuf {
        PyAlignedBuf { buf }
    }
}

#[pymethods]
impl PyAlignedBuf {
    /// A zeroed buffer of `length` bytes, its start 4096-byte aligned.
    #[new]
    fn new(py: Python<'_>, length: usize) -> PyResult<PyAlignedBuf> {
        Ok(PyAlignedBuf::from_buf(py.detach(|| AlignedBuf::zeroed(length))?))
    }

    /// The address of the first byte (equal to a zero-copy tensor's `data_ptr()`).
    #[getter]
    fn address(&self) -> usize {
        self.buf.as_ptr() as usize
    }

    /// Bytes allocated (the length rounded up to 4096).
    #[getter]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn __len__(&self) -> usize {
        self.buf.len()
    }

    fn __repr__(&self) -> String {
        format!("AlignedBuf(len={}, address={:#x})", self.buf.len(), self.buf.as_ptr() as usize)
    }

    /// Writable, C-contiguous, unsigned bytes ("B").
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let (ptr, len) = (slf.get().buf.as_mut_ptr(), slf.get().buf.len());
        // PyBuffer_FillInfo stores a new reference to `slf` in view.obj; the format pointer it
        // sets is a static string (nothing to free).
        // SAFETY: `view` is the interpreter's Py_buffer; view.obj keeps this object and its Arc on
        // the AlignedBuf (never moved or resized) alive until the consumer releases the view.
        let r = unsafe { ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast(), len as ffi::Py_ssize_t, 0, flags) };
        if r != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        // Nothing to release: the view owns only its reference to self (dropped by Python).
    }
}
