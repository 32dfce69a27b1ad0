//! `f16_rows_gemv(rows, h)` and `f16_bundle_ffn(rows, x, ...)`: decode products over float16
//! bundle rows (crate::gemv).

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
    let (bits, stride) = row_slice(&rows)?;
    let h = h.as_slice()?;
    let mut y = vec![0f32; dim];
    py.detach(|| crate::gemv::f16_rows_gemv(bits, stride, h, &mut y, threads))?;
    Ok(PyArray1::from_vec(py, y))
}

/// The (n, width) float16 rows of `rows` as one slice and its row stride (elements), checked:
/// aligned 2-byte elements, unit column stride, non-negative row stride of at least `width`.
fn row_slice<'a>(rows: &'a PyReadonlyArray2<'_, i16>) -> PyResult<(&'a [u16], usize)> {
    let (n, width) = (rows.shape()[0], rows.shape()[1]);
    if n == 0 || width == 0 {
        return Ok((&[], width));
    }
    // numpy allows odd byte strides and unaligned data; rust-numpy would truncate the former to
    // whole elements, and a &[u16] needs the latter aligned.
    let byte_strides = rows.strides();
    if !rows.is_aligned() || byte_strides.iter().any(|s| s % 2 != 0) {
        return Err(
            Error::invalid(format!("rows must be aligned 2-byte elements (byte strides {byte_strides:?})")).into()
        );
    }
    let view = rows.as_array();
    let strides = view.strides();
    if width > 1 && strides[1] != 1 || (n > 1 && (strides[0] < 0 || (strides[0] as usize) < width)) {
        return Err(Error::invalid(format!(
            "rows must be row-major with unit column stride and rows that do not overlap (strides {strides:?})"
        ))
        .into());
    }
    let stride = if n > 1 { strides[0] as usize } else { width };
    let len = (n - 1) * stride + width;
    // n, width >= 1 and the strides are non-negative whole elements (checked above), so numpy's
    // own bounds put the last row's end at element (n-1)*stride + width inside the buffer.
    // SAFETY: that many aligned (checked) 2-byte elements exist; i16 and u16 share size and
    // alignment; the PyReadonlyArray borrow keeps the buffer alive and unwritten while 'a lives.
    let bits: &[u16] = unsafe { std::slice::from_raw_parts(view.as_ptr() as *const u16, len) };
    Ok((bits, stride))
}

/// One decode token's FFN over float16 bundle rows `rows` (n, >= fields * D; int16 view):
/// relu(up . x + bias) (plain; bias (n,) float32 or None) or silu(gate . x) * (up . x) (gated),
/// times the down rows, summed: (D,) float32. One pass per bundle; down rows of inactive
/// neurons are not read. `pick` (k,) uint32: only these rows (bias still indexed by row).
/// Without the GIL, on up to `threads` threads.
#[pyfunction]
#[pyo3(signature = (rows, x, gated, bias = None, threads = 2, pick = None))]
pub fn f16_bundle_ffn<'py>(
    py: Python<'py>,
    rows: PyReadonlyArray2<'py, i16>,
    x: PyReadonlyArray1<'py, f32>,
    gated: bool,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    threads: usize,
    pick: Option<PyReadonlyArray1<'py, u32>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let n = rows.shape()[0];
    let x = x.as_slice()?;
    let fields = if gated { 3 } else { 2 };
    if rows.shape()[1] < fields * x.len() {
        return Err(Error::invalid(format!(
            "rows of {} values cannot hold {fields} fields of {}",
            rows.shape()[1],
            x.len()
        ))
        .into());
    }
    let (bits, stride) = row_slice(&rows)?;
    let bias = bias.as_ref().map(|b| b.as_slice()).transpose()?;
    let pick = pick.as_ref().map(|p| p.as_slice()).transpose()?;
    let mut y = vec![0f32; x.len()];
    py.detach(|| crate::gemv::f16_bundle_ffn(bits, stride, n, gated, x, bias, &mut y, threads, pick))?;
    Ok(PyArray1::from_vec(py, y))
}

/// y (out,) float32 = w @ x for `w` an (out, in) array of float16 bit patterns (int16 view; any
/// row stride, unit column stride) and `x` (in,) float32: the decode product of a projection.
/// Without the GIL, on up to `threads` threads.
#[pyfunction]
#[pyo3(signature = (w, x, threads = 2))]
pub fn f16_matvec<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, i16>,
    x: PyReadonlyArray1<'py, f32>,
    threads: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let (n, dim) = (w.shape()[0], w.shape()[1]);
    let x = x.as_slice()?;
    if dim != x.len() {
        return Err(Error::invalid(format!("a matrix of {dim} columns times a vector of {}", x.len())).into());
    }
    let mut y = vec![0f32; n];
    if n == 0 || dim == 0 {
        return Ok(PyArray1::from_vec(py, y));
    }
    let (bits, stride) = row_slice(&w)?;
    py.detach(|| crate::gemv::f16_matvec(bits, stride, x, &mut y, threads))?;
    Ok(PyArray1::from_vec(py, y))
}
