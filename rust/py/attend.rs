//! `attend_one(q, k, v, length, scale)`: decode attention over a KV cache in its own dtype
//! (crate::attend).

use numpy::{PyArray1, PyReadonlyArray2, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::attend::{KvCache, Shape};
use crate::error::Error;

/// A KV cache array: float16 bit patterns (an int16 view) or float32, (Hkv, capacity, hd).
#[derive(FromPyObject)]
pub enum KvArray<'py> {
    F16(PyReadonlyArray3<'py, i16>),
    F32(PyReadonlyArray3<'py, f32>),
}

impl KvArray<'_> {
    fn shape(&self) -> [usize; 3] {
        let s = match self {
            KvArray::F16(a) => a.shape(),
            KvArray::F32(a) => a.shape(),
        };
        [s[0], s[1], s[2]]
    }
}

/// The array's elements as one slice: C-contiguous only (a cache tensor is).
fn slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray3<'_, T>, what: &str) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|e| Error::invalid(format!("the {what} must be one C-contiguous array ({e})")).into())
}

fn u16_bits(a: &[i16]) -> &[u16] {
    // SAFETY: i16 and u16 have the same size and alignment and every bit pattern is valid for
    // both; the new slice covers the same memory for the same lifetime.
    unsafe { std::slice::from_raw_parts(a.as_ptr() as *const u16, a.len()) }
}

/// One query position's attention: `q` (Hq, hd) float32; `k`, `v` (Hkv, capacity, hd) float16
/// bits (int16 view) or float32, C-contiguous, positions `0..length` filled. Query head h reads
/// KV head h // (Hq // Hkv). Returns (Hq * hd,) float32. Without the GIL, on up to `threads`
/// threads.
#[pyfunction]
#[pyo3(signature = (q, k, v, length, scale, threads = 2))]
pub fn attend_one<'py>(
    py: Python<'py>,
    q: PyReadonlyArray2<'py, f32>,
    k: KvArray<'py>,
    v: KvArray<'py>,
    length: usize,
    scale: f32,
    threads: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let ([kv_heads, capacity, hd], vs) = (k.shape(), v.shape());
    if vs != [kv_heads, capacity, hd] || q.shape()[1] != hd {
        return Err(Error::invalid(format!(
            "queries {:?}, keys {:?} and values {vs:?} do not agree",
            q.shape(),
            [kv_heads, capacity, hd]
        ))
        .into());
    }
    let kv = match (&k, &v) {
        (KvArray::F16(k), KvArray::F16(v)) => {
            KvCache::F16 { k: u16_bits(slice(k, "keys")?), v: u16_bits(slice(v, "values")?) }
        }
        (KvArray::F32(k), KvArray::F32(v)) => KvCache::F32 { k: slice(k, "keys")?, v: slice(v, "values")? },
        _ => return Err(Error::invalid("keys and values must have the same dtype").into()),
    };
    let heads = q.shape()[0];
    let q = q.as_slice().map_err(|e| Error::invalid(format!("the queries must be one C-contiguous array ({e})")))?;
    let shape = Shape { heads, kv_heads, head_dim: hd, capacity, len: length };
    let mut out = vec![0f32; q.len()];
    py.detach(|| crate::attend::attend_one(q, kv, shape, scale, &mut out, threads))?;
    Ok(PyArray1::from_vec(py, out))
}
