//! The attention half of one decoder layer for one token of a quantized model, in one call.
//!
//! Why here: one token of a small quantized model spends more time in Python and torch's per-op
//! overhead than in its products: a layer's attention half is about twenty small torch ops (norm,
//! three products, RoPE, the cache write, attention, the output product, the residual), each a
//! few microseconds of dispatch around work of a few microseconds. This runs the whole half
//! natively, on the quantized kernels (crate::quant) and decode attention (crate::attend):
//!
//! ```text
//! n = rms_norm(x, attn_norm)
//! q, k, v = Wq n (+ bq), Wk n (+ bk), Wv n (+ bv)      per head: q_norm, k_norm (OpenELM)
//! q, k = rope(q), rope(k)                               half-split pairs (i, i + hd/2)
//! cache[pos] = k, v;  a = attention(q, cache[..=pos])   grouped-query
//! x += Wo a (+ bo)
//! h = rms_norm(x, ffn_norm)                             the FFN's input, returned
//! ```
//!
//! Each step computes in float32 in the order the Python layers do (models/layers.py), so the two
//! paths agree to float32 rounding (the norms' sums are accumulated in float64 here).

use crate::attend::{attend_one, KvCache, Shape};
use crate::error::{Error, Result};
use crate::quant::{q_matvec, q_matvecs, QType};

/// One layer's weights for [`attn_step`]: the four projections as `kind` blocks (rows back to
/// back, each quantized along the model dimension), float32 norms and optional biases.
pub struct AttnLayer<'a> {
    pub kind: QType,
    pub dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub attn_norm: &'a [f32],
    pub ffn_norm: &'a [f32],
    /// (heads * hd, dim), (kv_heads * hd, dim) twice, (dim, heads * hd).
    pub q: &'a [u8],
    pub k: &'a [u8],
    pub v: &'a [u8],
    pub o: &'a [u8],
    /// Biases of q, k, v and o (attention_bias models), each as long as its product's rows.
    pub bias: [Option<&'a [f32]>; 4],
    /// RMSNorm weights over each head's `head_dim` values of q and k, before RoPE (OpenELM).
    pub q_norm: Option<&'a [f32]>,
    pub k_norm: Option<&'a [f32]>,
}

/// The token's place: its position, and RoPE's cos and sin rows for it (`head_dim` each), or
/// None for a model without rotary embeddings.
#[derive(Clone, Copy)]
pub struct Position<'a> {
    pub pos: usize,
    pub rope: Option<(&'a [f32], &'a [f32])>,
}

/// One layer's float32 KV cache: keys and values (kv_heads, capacity, head_dim) each.
pub struct KvMut<'a> {
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    pub capacity: usize,
}

impl AttnLayer<'_> {
    /// Checks every length against the shape, so the step itself cannot index out of bounds.
    pub fn check(&self) -> Result<()> {
        let (d, hq, hkv) = (self.dim, self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let rb = |cols: usize| self.kind.row_bytes(cols);
        let bad = |what: &str, got: usize, want: usize| {
            Error::invalid(format!("attention layer: {what} has {got} elements, expected {want}"))
        };
        if self.heads == 0
            || self.kv_heads == 0
            || self.heads % self.kv_heads != 0
            || self.head_dim == 0
            || self.head_dim % 2 != 0
            || self.dim == 0
        {
            return Err(Error::invalid(format!(
                "attention layer of width {}: {} query heads, {} KV heads of {} values (expected a width, \
                 whole groups, a positive even head size)",
                self.dim, self.heads, self.kv_heads, self.head_dim
            )));
        }
        for (what, got, want) in [
            ("q", self.q.len(), hq.checked_mul(rb(d)?)),
            ("k", self.k.len(), hkv.checked_mul(rb(d)?)),
            ("v", self.v.len(), hkv.checked_mul(rb(d)?)),
            ("o", self.o.len(), d.checked_mul(rb(hq)?)),
        ] {
            let want = want.ok_or_else(|| Error::invalid(format!("attention layer: {what} overflows")))?;
            if got != want {
                return Err(bad(what, got, want));
            }
        }
        for (what, n, want) in [("attn_norm", self.attn_norm.len(), d), ("ffn_norm", self.ffn_norm.len(), d)] {
            if n != want {
                return Err(bad(what, n, want));
            }
        }
        for (b, (what, want)) in self.bias.iter().zip([("q bias", hq), ("k bias", hkv), ("v bias", hkv), ("o bias", d)])
        {
            if let Some(b) = b.filter(|b| b.len() != want) {
                return Err(bad(what, b.len(), want));
            }
        }
        for (n, what) in [(self.q_norm, "q_norm"), (self.k_norm, "k_norm")] {
            if let Some(n) = n.filter(|n| n.len() != self.head_dim) {
                return Err(bad(what, n.len(), self.head_dim));
            }
        }
        Ok(())
    }
}

impl AttnLayer<'_> {
    /// `check`, and the lengths of one step's vectors, position and cache against the shape.
    pub fn check_step(&self, x: usize, h: usize, at: Position, kv: &KvMut) -> Result<()> {
        self.check()?;
        let (d, hd) = (self.dim, self.head_dim);
        let cache = self.kv_heads.checked_mul(kv.capacity).and_then(|n| n.checked_mul(hd));
        if x != d || h != d || cache != Some(kv.k.len()) || cache != Some(kv.v.len()) || at.pos >= kv.capacity {
            return Err(Error::invalid(format!(
                "attention step: x {x} and h {h} values for a model of {d}, position {} in a cache of {} positions \
                 ({} key and {} value elements for {} KV heads of {hd})",
                at.pos,
                kv.capacity,
                kv.k.len(),
                kv.v.len(),
                self.kv_heads
            )));
        }
        if let Some((c, s)) = at.rope.filter(|(c, s)| c.len() != hd || s.len() != hd) {
            return Err(Error::invalid(format!("rope rows of {} and {} values for heads of {hd}", c.len(), s.len())));
        }
        Ok(())
    }
}

/// The attention half of layer `w` for one token: `x` (dim) gains the attention's output in
/// place, the cache gets the token's keys and values at `at.pos`, and `h` (dim) receives the
/// FFN's input, rms_norm(x, ffn_norm). Products on up to `threads` threads.
pub fn attn_step(w: &AttnLayer, x: &mut [f32], at: Position, kv: KvMut, threads: usize, h: &mut [f32]) -> Result<()> {
    w.check_step(x.len(), h.len(), at, &kv)?;
    let (d, hd) = (w.dim, w.head_dim);
    let (hq, hkv) = (w.heads * hd, w.kv_heads * hd);
    let mut n = vec![0f32; d];
    rms_norm(x, w.attn_norm, w.eps, &mut n);
    let (mut q, mut k, mut v) = (vec![0f32; hq], vec![0f32; hkv], vec![0f32; hkv]);
    q_matvecs(w.kind, &mut [(w.q, hq, &mut q), (w.k, hkv, &mut k), (w.v, hkv, &mut v)], d, &n, threads)?;
    for (y, b) in [(&mut q, w.bias[0]), (&mut k, w.bias[1]), (&mut v, w.bias[2])] {
        add(y, b);
    }
    for (y, norm) in [(&mut q, w.q_norm), (&mut k, w.k_norm)] {
        if let Some(nw) = norm {
            for head in y.chunks_exact_mut(hd) {
                let x0 = head.to_vec();
                rms_norm(&x0, nw, w.eps, head);
            }
        }
        if let Some((cos, sin)) = at.rope {
            y.chunks_exact_mut(hd).for_each(|head| rope(head, cos, sin));
        }
    }
    for g in 0..w.kv_heads {
        let at_row = (g * kv.capacity + at.pos) * hd;
        kv.k[at_row..at_row + hd].copy_from_slice(&k[g * hd..(g + 1) * hd]);
        kv.v[at_row..at_row + hd].copy_from_slice(&v[g * hd..(g + 1) * hd]);
    }
    let shape = Shape { heads: w.heads, kv_heads: w.kv_heads, head_dim: hd, capacity: kv.capacity, len: at.pos + 1 };
    let mut a = vec![0f32; hq];
    attend_one(&q, KvCache::F32 { k: kv.k, v: kv.v }, shape, (hd as f32).powf(-0.5), &mut a, threads)?;
    let mut o = vec![0f32; d];
    q_matvec(w.kind, w.o, d, hq, &a, &mut o, threads)?;
    add(&mut o, w.bias[3]);
    x.iter_mut().zip(&o).for_each(|(xi, oi)| *xi += oi);
    rms_norm(x, w.ffn_norm, w.eps, h);
    Ok(())
}

fn add(y: &mut [f32], b: Option<&[f32]>) {
    if let Some(b) = b {
        y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
    }
}

/// out = x * rsqrt(mean(x^2) + eps) * w, as models/layers.rms_norm (its float32 mean rounded from
/// a float64 sum here).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let r = 1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt();
    for ((o, &v), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = v * r * wi;
    }
}

/// One head rotated in place: pairs (i, i + hd/2) by the position's angles, as
/// models/layers.apply_rope: x * cos + rotate_half(x) * sin.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] + -b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

mod ffn;
pub use ffn::{decode_layers, ffn_step, FfnLayer};

#[cfg(test)]
mod tests;
