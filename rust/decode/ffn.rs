//! The FFN half of one decoder layer for one token of a quantized gated (SwiGLU) model, and a
//! whole token through every layer (attention half, then this), in one call: `decode_layers`.
//!
//! ```text
//! g, u = W1 h          W1: the gate rows, then the up rows (2n, dim)
//! x += W2 (silu(g) * u)   W2: (dim, n)
//! ```

use super::{attn_step, AttnLayer, KvMut, Position};
use crate::error::{Error, Result};
use crate::quant::{q_matvec, QType};

/// One layer's FFN weights: `w1` (2n, dim) gate rows then up rows and `w2` (dim, n), in `kind`
/// blocks along their rows.
pub struct FfnLayer<'a> {
    pub kind: QType,
    pub n: usize,
    pub w1: &'a [u8],
    pub w2: &'a [u8],
}

impl FfnLayer<'_> {
    /// Checks both matrices' lengths against (n, dim).
    pub fn check(&self, dim: usize) -> Result<()> {
        let w1 = self.kind.row_bytes(dim)?.checked_mul(2 * self.n);
        let w2 = self.kind.row_bytes(self.n)?.checked_mul(dim);
        if w1 != Some(self.w1.len()) || w2 != Some(self.w2.len()) {
            return Err(Error::invalid(format!(
                "FFN layer of {} neurons and width {dim}: w1 has {} bytes (expected {w1:?}), w2 {} (expected {w2:?})",
                self.n,
                self.w1.len(),
                self.w2.len()
            )));
        }
        Ok(())
    }
}

/// x += W2 (silu(g) * u), (g, u) = W1 h; products on up to `threads` threads.
pub fn ffn_step(f: &FfnLayer, h: &[f32], x: &mut [f32], threads: usize) -> Result<()> {
    let dim = x.len();
    f.check(dim)?;
    if h.len() != dim {
        return Err(Error::invalid(format!("FFN step: h has {} values, x {dim}", h.len())));
    }
    let mut gu = vec![0f32; 2 * f.n];
    q_matvec(f.kind, f.w1, 2 * f.n, dim, h, &mut gu, threads)?;
    let (g, u) = gu.split_at(f.n);
    // silu(g) = g * sigmoid(g), as torch computes it
    let a: Vec<f32> = g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
    let mut y = vec![0f32; dim];
    q_matvec(f.kind, f.w2, dim, f.n, &a, &mut y, threads)?;
    x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
    Ok(())
}

/// One token through every layer: for each, the attention half (`attn_step`, writing the
/// token's keys and values into `kv[i]` at `at.pos`) then the FFN half. `x` (dim) is the
/// residual stream, updated in place. Every layer's shapes are checked first, so an error leaves
/// `x` and the caches as they were.
pub fn decode_layers(
    attn: &[AttnLayer],
    ffn: &[FfnLayer],
    x: &mut [f32],
    at: Position,
    kv: Vec<KvMut>,
    threads: usize,
) -> Result<()> {
    if attn.len() != ffn.len() || attn.len() != kv.len() {
        return Err(Error::invalid(format!(
            "decode: {} attention layers, {} FFN layers, {} KV caches",
            attn.len(),
            ffn.len(),
            kv.len()
        )));
    }
    // every layer checked before the first changes x or a cache
    for (i, ((a, f), kv)) in attn.iter().zip(ffn).zip(&kv).enumerate() {
        a.check_step(x.len(), x.len(), at, kv)
            .and_then(|_| f.check(a.dim))
            .map_err(|e| Error::invalid(format!("layer {i}: {e}")))?;
    }
    let mut h = vec![0f32; x.len()];
    for ((a, f), kv) in attn.iter().zip(ffn).zip(kv) {
        attn_step(a, x, at, kv, threads, &mut h)?;
        ffn_step(f, &h, x, threads)?;
    }
    Ok(())
}
