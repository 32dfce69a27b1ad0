//! `QAttention`: one quantized layer's attention half for one decode token (crate::decode), its
//! weights held as the numpy arrays Python gave (no copy), and `QDecoder`, a whole token through
//! every layer. The calls run without the GIL on the arrays' memory: rust-numpy's borrow flags
//! keep other native calls from writing them meanwhile, not plain Python code in another thread
//! (FlashModel runs one forward pass at a time).

use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadwriteArray1, PyReadwriteArray3};
use numpy::{PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::decode::{attn_step, decode_layers, AttnLayer, FfnLayer, KvMut, Position};
use crate::error::Error;
use crate::quant::QType;

/// A layer's attention weights: q, k, v, o as (rows, row_bytes) uint8 arrays of `kind` blocks,
/// float32 norms, optional float32 biases (q, k, v, o) and per-head q/k norms. Checked once here
/// against the shape; `step` runs the layer for one token.
#[pyclass(frozen, name = "QAttention", module = "llmflash._native")]
pub struct PyQAttention {
    kind: QType,
    shape: [usize; 4], // dim, heads, kv_heads, head_dim
    eps: f32,
    w: [Py<PyArray2<u8>>; 4],
    norms: [Py<PyArray1<f32>>; 2],
    bias: [Option<Py<PyArray1<f32>>>; 4],
    qk_norm: [Option<Py<PyArray1<f32>>>; 2],
}

/// Readonly borrows of every array, alive while a step uses their slices.
struct Borrowed<'py> {
    w: [PyReadonlyArray2<'py, u8>; 4],
    norms: [PyReadonlyArray1<'py, f32>; 2],
    bias: [Option<PyReadonlyArray1<'py, f32>>; 4],
    qk_norm: [Option<PyReadonlyArray1<'py, f32>>; 2],
}

fn contiguous<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &'a numpy::PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|e| not_contiguous(what, e))
}

fn not_contiguous(what: &str, e: impl std::fmt::Display) -> PyErr {
    Error::invalid(format!("{what} must be one C-contiguous array ({e})")).into()
}

/// A readonly borrow of a weight, or InvalidArgumentError where the array is being written by
/// the same call (given as x or a cache too).
fn read<'py, T: numpy::Element, D: numpy::ndarray::Dimension>(
    a: &Py<numpy::PyArray<T, D>>,
    py: Python<'py>,
    what: &str,
) -> PyResult<numpy::PyReadonlyArray<'py, T, D>> {
    a.bind(py)
        .try_readonly()
        .map_err(|e| Error::invalid(format!("{what} is also an array this call writes ({e})")).into())
}

/// A layer's keys and values (`shape`: the layer's [dim, heads, kv_heads, head_dim]) as the
/// step writes them: both (kv_heads, capacity, head_dim), C-contiguous; else InvalidArgumentError
/// naming them (`layer`: "" or "layer i's ").
fn kv_mut<'a>(
    k: &'a mut PyReadwriteArray3<'_, f32>,
    v: &'a mut PyReadwriteArray3<'_, f32>,
    shape: [usize; 4],
    layer: &str,
) -> PyResult<KvMut<'a>> {
    let [_, _, kv_heads, head_dim] = shape;
    let ks = k.shape().to_vec();
    if ks.len() != 3 || ks[0] != kv_heads || ks[2] != head_dim {
        return Err(Error::invalid(format!(
            "{layer}keys has shape {ks:?}, expected ({kv_heads}, capacity, {head_dim})"
        ))
        .into());
    }
    if v.shape() != ks {
        return Err(Error::invalid(format!("{layer}keys {ks:?} and values {:?} differ in shape", v.shape())).into());
    }
    Ok(KvMut {
        capacity: ks[1],
        k: k.as_slice_mut().map_err(|e| not_contiguous("keys", e))?,
        v: v.as_slice_mut().map_err(|e| not_contiguous("values", e))?,
    })
}

/// RoPE's cos and sin rows for the token, or None for a model without rotary embeddings.
fn rope_rows<'a>(
    cos: &'a Option<PyReadonlyArray1<'_, f32>>,
    sin: &'a Option<PyReadonlyArray1<'_, f32>>,
) -> PyResult<Option<(&'a [f32], &'a [f32])>> {
    match (cos, sin) {
        (Some(c), Some(s)) => Ok(Some((contiguous(c, "cos")?, contiguous(s, "sin")?))),
        (None, None) => Ok(None),
        _ => Err(Error::invalid("cos and sin go together").into()),
    }
}

impl PyQAttention {
    fn borrow<'py>(&self, py: Python<'py>) -> PyResult<Borrowed<'py>> {
        let names = ["q", "k", "v", "o"];
        let opt = |a: &Option<Py<PyArray1<f32>>>, what: &str| a.as_ref().map(|a| read(a, py, what)).transpose();
        let [q, k, v, o] = [0, 1, 2, 3].map(|i| read(&self.w[i], py, names[i]));
        let [an, fnorm] = [0, 1].map(|i| read(&self.norms[i], py, ["attn_norm", "ffn_norm"][i]));
        let [b0, b1, b2, b3] = [0, 1, 2, 3].map(|i| opt(&self.bias[i], "a bias"));
        let [qn, kn] = [0, 1].map(|i| opt(&self.qk_norm[i], ["q_norm", "k_norm"][i]));
        Ok(Borrowed { w: [q?, k?, v?, o?], norms: [an?, fnorm?], bias: [b0?, b1?, b2?, b3?], qk_norm: [qn?, kn?] })
    }

    fn layer<'a>(&self, b: &'a Borrowed<'_>) -> PyResult<AttnLayer<'a>> {
        let names = ["q", "k", "v", "o"];
        let mut w: [&[u8]; 4] = [&[]; 4];
        for i in 0..4 {
            w[i] = contiguous(&b.w[i], names[i])?;
        }
        let mut bias: [Option<&[f32]>; 4] = [None; 4];
        for (slot, given) in bias.iter_mut().zip(&b.bias) {
            *slot = given.as_ref().map(|a| contiguous(a, "a bias")).transpose()?;
        }
        let [dim, heads, kv_heads, head_dim] = self.shape;
        Ok(AttnLayer {
            kind: self.kind,
            dim,
            heads,
            kv_heads,
            head_dim,
            eps: self.eps,
            attn_norm: contiguous(&b.norms[0], "attn_norm")?,
            ffn_norm: contiguous(&b.norms[1], "ffn_norm")?,
            q: w[0],
            k: w[1],
            v: w[2],
            o: w[3],
            bias,
            q_norm: b.qk_norm[0].as_ref().map(|a| contiguous(a, "q_norm")).transpose()?,
            k_norm: b.qk_norm[1].as_ref().map(|a| contiguous(a, "k_norm")).transpose()?,
        })
    }
}

#[pymethods]
impl PyQAttention {
    #[new]
    #[pyo3(signature = (kind, q, k, v, o, attn_norm, ffn_norm, heads, kv_heads, head_dim, eps, bias = None, qk_norm = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        kind: &str,
        q: Py<PyArray2<u8>>,
        k: Py<PyArray2<u8>>,
        v: Py<PyArray2<u8>>,
        o: Py<PyArray2<u8>>,
        attn_norm: Py<PyArray1<f32>>,
        ffn_norm: Py<PyArray1<f32>>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        eps: f32,
        bias: Option<[Option<Py<PyArray1<f32>>>; 4]>,
        qk_norm: Option<[Option<Py<PyArray1<f32>>>; 2]>,
    ) -> PyResult<Self> {
        let dim = attn_norm.bind(py).len();
        let this = PyQAttention {
            kind: QType::parse(kind)?,
            shape: [dim, heads, kv_heads, head_dim],
            eps,
            w: [q, k, v, o],
            norms: [attn_norm, ffn_norm],
            bias: bias.unwrap_or_default(),
            qk_norm: qk_norm.unwrap_or_default(),
        };
        let b = this.borrow(py)?;
        this.layer(&b)?.check()?;
        drop(b);
        Ok(this)
    }

    /// One token through the layer's attention half: `x` (dim,) float32 gains the attention's
    /// output in place; the token's keys and values go into `k`, `v` ((kv_heads, capacity,
    /// head_dim) float32, C-contiguous) at `pos`; `cos`, `sin` (head_dim,) are RoPE's rows for
    /// `pos` (None: no rotary embeddings). Returns the FFN's input rms_norm(x, ffn_norm).
    /// Without the GIL, products on up to `threads` threads.
    #[pyo3(signature = (x, pos, k, v, cos = None, sin = None, threads = 1))]
    #[allow(clippy::too_many_arguments)]
    fn step<'py>(
        &self,
        py: Python<'py>,
        mut x: PyReadwriteArray1<'py, f32>,
        pos: usize,
        mut k: PyReadwriteArray3<'py, f32>,
        mut v: PyReadwriteArray3<'py, f32>,
        cos: Option<PyReadonlyArray1<'py, f32>>,
        sin: Option<PyReadonlyArray1<'py, f32>>,
        threads: usize,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let b = self.borrow(py)?;
        let layer = self.layer(&b)?;
        let kv = kv_mut(&mut k, &mut v, self.shape, "")?;
        let rope = rope_rows(&cos, &sin)?;
        let x = x.as_slice_mut().map_err(|e| not_contiguous("x", e))?;
        let mut h = vec![0f32; x.len()];
        py.detach(|| attn_step(&layer, x, Position { pos, rope }, kv, threads, &mut h))?;
        Ok(PyArray1::from_vec(py, h))
    }
}

/// A whole quantized gated model's layers for one decode token: each layer's QAttention, then
/// its FFN `w1` (2n, row bytes) gate rows then up rows and `w2` (dim, row bytes), `kind` blocks.
/// Checked once here; `run` takes a token through every layer in one call.
#[pyclass(frozen, name = "QDecoder", module = "llmflash._native")]
pub struct PyQDecoder {
    kind: QType,
    attn: Vec<Py<PyQAttention>>,
    w1: Vec<Py<PyArray2<u8>>>,
    w2: Vec<Py<PyArray2<u8>>>,
}

impl PyQDecoder {
    fn ffn<'a>(
        &self,
        i: usize,
        w1: &'a PyReadonlyArray2<'_, u8>,
        w2: &'a PyReadonlyArray2<'_, u8>,
    ) -> PyResult<FfnLayer<'a>> {
        Ok(FfnLayer {
            kind: self.kind,
            n: w1.shape()[0] / 2,
            w1: contiguous(w1, &format!("layer {i}'s w1"))?,
            w2: contiguous(w2, &format!("layer {i}'s w2"))?,
        })
    }
}

#[pymethods]
impl PyQDecoder {
    #[new]
    fn new(
        py: Python<'_>,
        kind: &str,
        attn: Vec<Py<PyQAttention>>,
        w1: Vec<Py<PyArray2<u8>>>,
        w2: Vec<Py<PyArray2<u8>>>,
    ) -> PyResult<Self> {
        if attn.len() != w1.len() || attn.len() != w2.len() {
            return Err(Error::invalid(format!(
                "decoder: {} attention layers, {} w1 and {} w2 matrices",
                attn.len(),
                w1.len(),
                w2.len()
            ))
            .into());
        }
        let this = PyQDecoder { kind: QType::parse(kind)?, attn, w1, w2 };
        for i in 0..this.attn.len() {
            let (a, b) = (read(&this.w1[i], py, "w1")?, read(&this.w2[i], py, "w2")?);
            if a.shape()[0] % 2 != 0 {
                return Err(
                    Error::invalid(format!("layer {i}'s w1 has {} rows, not gate and up rows", a.shape()[0])).into()
                );
            }
            let dim = this.attn[i].get().shape[0];
            this.ffn(i, &a, &b)?.check(dim).map_err(|e| Error::invalid(format!("layer {i}: {e}")))?;
        }
        Ok(this)
    }

    /// One token through every layer: `x` (dim,) float32, the residual stream, updated in
    /// place; `k[i]`, `v[i]` layer i's cache as QAttention.step takes it; `cos`, `sin` RoPE's
    /// rows for `pos` (None: no rotary embeddings). Without the GIL, products on up to
    /// `threads` threads.
    #[pyo3(signature = (x, pos, k, v, cos = None, sin = None, threads = 1))]
    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        mut x: PyReadwriteArray1<'py, f32>,
        pos: usize,
        mut k: Vec<PyReadwriteArray3<'py, f32>>,
        mut v: Vec<PyReadwriteArray3<'py, f32>>,
        cos: Option<PyReadonlyArray1<'py, f32>>,
        sin: Option<PyReadonlyArray1<'py, f32>>,
        threads: usize,
    ) -> PyResult<()> {
        let layers = self.attn.len();
        if k.len() != layers || v.len() != layers {
            return Err(Error::invalid(format!(
                "decoder of {layers} layers given {} key and {} value caches",
                k.len(),
                v.len()
            ))
            .into());
        }
        let borrowed = self.attn.iter().map(|a| a.get().borrow(py)).collect::<PyResult<Vec<_>>>()?;
        let mats = (0..layers)
            .map(|i| Ok((read(&self.w1[i], py, "w1")?, read(&self.w2[i], py, "w2")?)))
            .collect::<PyResult<Vec<_>>>()?;
        let mut attn = Vec::with_capacity(layers);
        let mut ffn = Vec::with_capacity(layers);
        for i in 0..layers {
            attn.push(self.attn[i].get().layer(&borrowed[i])?);
            ffn.push(self.ffn(i, &mats[i].0, &mats[i].1)?);
        }
        let rope = rope_rows(&cos, &sin)?;
        let mut kv = Vec::with_capacity(layers);
        for (i, (kc, vc)) in k.iter_mut().zip(v.iter_mut()).enumerate() {
            kv.push(kv_mut(kc, vc, self.attn[i].get().shape, &format!("layer {i}'s "))?);
        }
        let x = x.as_slice_mut().map_err(|e| not_contiguous("x", e))?;
        py.detach(|| decode_layers(&attn, &ffn, x, Position { pos, rope }, kv, threads))?;
        Ok(())
    }
}
