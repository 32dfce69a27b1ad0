//! `f16_rows_gemv(rows, h)`: the decode product over float16 bundle rows (crate::gemv).

use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::error::Error;

/// y (D,) float32 = sum_i h[i] * rows[i] for `rows` an (n, D) array of float16 bit patterns
/// (int16/uint16 view; any row stride, unit column stride: e.g. the down rows of a cache's
/// bundle matrix) and `h` (n,) float32. Runs without the GIL, on up to `threads` threads.
#[pyfunction]
#[pyo3(signature = (rows, h, threads = 2))]
pub fn f16_rows_gemv<'py>(
    py: Python<'py>,
    rows: PyReadonlyArray2<'py, i16>,
    h: PyReadonlyArray1<'py, f32>,
    threads: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let (n, dim) = (rows.shape()[0], rows.shape()[1]);
    if n != h.len() {
        return Err(Error::invalid(format!("{n} rows but {} activations", h.len())).into());
    }
    if n == 0 || dim == 0 {
        return Ok(PyArray1::from_vec(py, vec![0f32; dim]));
    }
    // numpy allows odd byte strides and unaligned data; rust-numpy would truncate the former to
    // whole elements, and a &[u16] needs the latter aligned.
    let byte_strides = rows.strides();
    if !rows.is_aligned() || byte_strides.iter().any(|s| s % 2 != 0) {
        return Err(Error::invalid(format!("rows must be aligned 2-byte elements (byte strides {byte_strides:?})")).into());
    }
    let view = rows.as_array();
    let strides = view.strides();
    if dim > 1 && strides[1] != 1 || (n > 1 && (strides[0] < 0 || (strides[0] as usize) < dim)) {
        return Err(Error::invalid(format!(
            "rows must be row-major with unit column stride and rows that do not overlap (strides {strides:?})"
        ))
        .into());
    }
    let stride = if n > 1 { strides[0] as usize } else { dim };
    let len = (n - 1) * stride + dim;
    // n, dim >= 1 and the strides are non-negative whole elements (checked above), so numpy's
    // own bounds put the last row's end at element (n-1)*stride + dim inside the buffer.
    // SAFETY: that many aligned (checked) 2-byte elements exist; i16 and u16 share size and
    // alignment; the PyReadonlyArray borrow keeps the buffer alive and unwritten for the call.
    let bits: &[u16] = unsafe { std::slice::from_raw_parts(view.as_ptr() as *const u16, len) };
    let h = h.as_slice()?;
    let mut y = vec![0f32; dim];
    py.detach(|| crate::gemv::f16_rows_gemv(bits, stride, h, &mut y, threads))?;
    Ok(PyArray1::from_vec(py, y))
}
