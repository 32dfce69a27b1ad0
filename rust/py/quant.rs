//! `q_matvec`, `q_bundle_ffn`, `q_bundle_dequantize`, `q_dequantize`: decode kernels over GGML block formats
//! (crate::quant), and the switch that forces their portable path.

use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::error::Error;
use crate::quant::bundle::{self, DownScales, Layout};
use crate::quant::{self, QType};

/// The elements of a 1-D array as one slice, or InvalidArgumentError naming `what`.
fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray1<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|e| Error::invalid(format!("{what} must be one contiguous array ({e})")).into())
}

/// y (rows,) float32 = W @ x for `w` a (rows, row_bytes) uint8 C-contiguous array of `kind`
/// blocks ("q8_0", "q4_0", "q4_1"; row_bytes = x.len() / 32 blocks) and `x` (cols,) float32.
/// Without the GIL, on up to `threads` threads.
#[pyfunction]
#[pyo3(signature = (kind, w, x, threads = 2))]
pub fn q_matvec<'py>(
    py: Python<'py>,
    kind: &str,
    w: PyReadonlyArray2<'py, u8>,
    x: PyReadonlyArray1<'py, f32>,
    threads: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let kind = QType::parse(kind)?;
    let (rows, width) = (w.shape()[0], w.shape()[1]);
    let x = slice(&x, "x")?;
    let cols = x.len();
    let row_bytes = kind.row_bytes(cols)?;
    if width != row_bytes {
        return Err(Error::invalid(format!(
            "{}: rows of {width} bytes for x of {cols} values (expected {row_bytes} bytes a row)",
            kind.name()
        ))
        .into());
    }
    let bytes = w.as_slice().map_err(|e| Error::invalid(format!("w must be one C-contiguous array ({e})")))?;
    let mut y = vec![0f32; rows];
    py.detach(|| quant::q_matvec(kind, bytes, rows, cols, x, &mut y, threads))?;
    Ok(PyArray1::from_vec(py, y))
}

/// The bytes of a (n, width) uint8 array with unit column stride as one slice, and its row
/// stride in bytes.
fn row_bytes<'a>(rows: &'a PyReadonlyArray2<'_, u8>) -> PyResult<(&'a [u8], usize)> {
    let (n, width) = (rows.shape()[0], rows.shape()[1]);
    if n == 0 || width == 0 {
        return Ok((&[], width));
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
    // SAFETY: n, width >= 1 and the strides are non-negative (checked above), so numpy's own
    // bounds put the last row's end at byte (n-1)*stride + width inside the buffer; bytes need no
    // alignment; the PyReadonlyArray borrow keeps the buffer alive and unwritten while 'a lives.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(view.as_ptr(), len) };
    Ok((bytes, stride))
}

/// A layer's down scales from (groups, dim) uint16 arrays of float16 bits (C-contiguous).
fn scales<'a>(
    d: &'a PyReadonlyArray2<'_, u16>,
    m: Option<&'a PyReadonlyArray2<'_, u16>>,
    dim: usize,
) -> PyResult<DownScales<'a>> {
    let flat = |a: &'a PyReadonlyArray2<'_, u16>, what: &str| -> PyResult<&'a [u16]> {
        if a.shape()[1] != dim {
            return Err(Error::invalid(format!("{what} has rows of {}, expected {dim}", a.shape()[1])).into());
        }
        a.as_slice().map_err(|e| Error::invalid(format!("{what} must be one C-contiguous array ({e})")).into())
    };
    Ok(DownScales { d: flat(d, "down_scale")?, m: m.map(|m| flat(m, "down_min")).transpose()? })
}

/// One decode token's FFN over quantized bundles `rows` (n, >= bundle bytes) uint8 (any row
/// stride, unit column stride), laid out as crate::quant::bundle documents (gated:
/// silu(gate . x) * (up . x); plain: relu(up . x + bias), bias (n,) float32 or None), with the
/// layer's down scales `down_scale` (and `down_min`, q4_1) (groups, dim) uint16 float16 bits:
/// (D,) float32. `pick` (k,) uint32: only these bundles (bias still indexed by bundle). Without
/// the GIL, on up to `threads` threads.
#[pyfunction]
#[pyo3(signature = (kind, rows, x, gated, down_scale, down_min = None, bias = None, threads = 2, pick = None))]
#[allow(clippy::too_many_arguments)]
pub fn q_bundle_ffn<'py>(
    py: Python<'py>,
    kind: &str,
    rows: PyReadonlyArray2<'py, u8>,
    x: PyReadonlyArray1<'py, f32>,
    gated: bool,
    down_scale: PyReadonlyArray2<'py, u16>,
    down_min: Option<PyReadonlyArray2<'py, u16>>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    threads: usize,
    pick: Option<PyReadonlyArray1<'py, u32>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let kind = QType::parse(kind)?;
    let n = rows.shape()[0];
    let x = slice(&x, "x")?;
    let size = Layout::new(kind, x.len(), gated)?.bytes();
    if n > 0 && rows.shape()[1] < size {
        return Err(Error::invalid(format!(
            "{}: rows of {} bytes cannot hold a bundle of {} values ({size} bytes)",
            kind.name(),
            rows.shape()[1],
            x.len()
        ))
        .into());
    }
    let (bytes, stride) = row_bytes(&rows)?;
    let sc = scales(&down_scale, down_min.as_ref(), x.len())?;
    let bias = bias.as_ref().map(|b| slice(b, "bias")).transpose()?;
    let pick = pick.as_ref().map(|p| slice(p, "pick")).transpose()?;
    let mut y = vec![0f32; x.len()];
    py.detach(|| bundle::q_bundle_ffn(kind, bytes, stride, n, gated, x, bias, sc, &mut y, threads, pick))?;
    Ok(PyArray1::from_vec(py, y))
}

/// The float32 values of quantized bundles `rows` (n, >= bundle bytes) uint8 (as q_bundle_ffn)
/// of width `dim`: (n * fields * dim,) float32, bundle i's `[gate,] up, down` in turn.
#[pyfunction]
#[pyo3(signature = (kind, rows, dim, gated, down_scale, down_min = None))]
pub fn q_bundle_dequantize<'py>(
    py: Python<'py>,
    kind: &str,
    rows: PyReadonlyArray2<'py, u8>,
    dim: usize,
    gated: bool,
    down_scale: PyReadonlyArray2<'py, u16>,
    down_min: Option<PyReadonlyArray2<'py, u16>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let kind = QType::parse(kind)?;
    let n = rows.shape()[0];
    let size = Layout::new(kind, dim, gated)?.bytes();
    if n > 0 && rows.shape()[1] < size {
        return Err(Error::invalid(format!(
            "{}: rows of {} bytes cannot hold a bundle of {dim} values ({size} bytes)",
            kind.name(),
            rows.shape()[1]
        ))
        .into());
    }
    let (bytes, stride) = row_bytes(&rows)?;
    let sc = scales(&down_scale, down_min.as_ref(), dim)?;
    let fields = if gated { 3 } else { 2 };
    // Checked before allocating: n rows of an existing array bound the size.
    let mut out = vec![0f32; n * fields * dim];
    py.detach(|| bundle::q_bundle_dequantize(kind, bytes, stride, n, gated, dim, sc, &mut out))?;
    Ok(PyArray1::from_vec(py, out))
}

/// The `n_values` values (a multiple of 32) of `blocks`, a 1-D uint8 array of exactly
/// n_values / 32 blocks of `kind`, as float32.
#[pyfunction]
pub fn q_dequantize<'py>(
    py: Python<'py>,
    kind: &str,
    blocks: PyReadonlyArray1<'py, u8>,
    n_values: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let kind = QType::parse(kind)?;
    let bytes = slice(&blocks, "blocks")?;
    // Checked before allocating: a huge n_values is an error, not an aborted allocation.
    let need = kind.row_bytes(n_values)?;
    if bytes.len() != need {
        return Err(Error::invalid(format!(
            "{}: {n_values} values take {need} bytes, not {}",
            kind.name(),
            bytes.len()
        ))
        .into());
    }
    let mut out = vec![0f32; n_values];
    py.detach(|| quant::q_dequantize(kind, bytes, &mut out))?;
    Ok(PyArray1::from_vec(py, out))
}

/// Force the quantized kernels' portable path (True) or let the CPU decide (False),
/// process-wide; returns the previous setting.
#[pyfunction]
pub fn q_set_portable(on: bool) -> bool {
    quant::set_portable(on)
}

/// The path the quantized kernels take now: "avx2" or "portable".
#[pyfunction]
pub fn q_simd() -> &'static str {
    match quant::simd() {
        quant::Simd::Avx2 => "avx2",
        quant::Simd::Portable => "portable",
    }
}
