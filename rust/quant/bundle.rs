//! The FFN over a quantized store's bundles for one decode token (`q_bundle_ffn`), and the
//! bundles' float32 values for prefill and offline passes (`q_bundle_dequantize`).
//!
//! Bundle layout (llmflash.store.layout, format version 6), little-endian:
//! - `[gate,] up`: each `dim` values as dim/32 blocks of the kind (a neuron's row of
//!   gate_proj / up_proj quantized along the model dimension, as a GGUF file stores them);
//! - `down`: the neuron's column of down_proj as raw integers, without scales: q8_0 one int8 a
//!   row (`dim` bytes), q4_0 / q4_1 one nibble a row (`dim / 2` bytes; in each 32-row chunk byte
//!   k holds row k in its low nibble and row k + 16 in its high one, GGML's order);
//! - `group`: u32, the neuron's original id / 32.
//!
//! down_proj is quantized along its rows, in blocks of 32 neurons, exactly as a GGUF file holds
//! it, so a GGUF's own down blocks are kept without a second rounding (re-quantizing columns cost
//! SmolLM2's Q4_1 model 5% perplexity). A block's scale is shared by the 32 neurons of a group,
//! so it is not in the bundle but in the layer's resident `DownScales`: row r of group g has
//! scale `d[g][r]` (and minimum `m[g][r]`, q4_1). Down value of row r: q8_0 `d q`, q4_0
//! `d (q - 8)`, q4_1 `d q + m`. The group travels inside the bundle, so any reordering of
//! bundles (store order, cache slots) keeps each neuron's scales.
//!
//! The FFN, per thread range: pass 1 computes `h_i` from the gate/up blocks; pass 2 takes the
//! bundles with `h_i != 0` in group order and, per group, sums `h_i q_i` (raw integers) into one
//! dim-long buffer T and `H = sum h_i`, then adds `d (T + c H)` (c = -8 for q4_0, else 0) and
//! `m H` (q4_1) into y. Per neuron that is an unpack and one multiply-add a value; the scales are
//! read once per group and token.

use super::{prefetch, Kernels, QType, Simd, BLOCK};
use crate::error::{Error, Result};
use crate::gemv::split_rows;

/// A layer's down scales: `d` (groups x dim float16 bits, group-major) and, for q4_1 only, `m`
/// of the same shape.
#[derive(Clone, Copy, Debug)]
pub struct DownScales<'a> {
    pub d: &'a [u16],
    pub m: Option<&'a [u16]>,
}

/// The widest bundle accepted (far above any model's; keeps every size computation in range).
const MAX_DIM: usize = 1 << 24;

/// Bytes of a bundle's down field: `dim` raw integers of `kind`.
pub fn down_bytes(kind: QType, dim: usize) -> usize {
    if kind == QType::Q8_0 {
        dim
    } else {
        dim / 2
    }
}

/// Where a bundle's fields are, for one kind, width and gating.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// Bytes of one gate or up field.
    pub field: usize,
    /// Gate/up fields: 2 gated, 1 plain.
    pub rows: usize,
    /// Bytes of the down field.
    pub down: usize,
}

impl Layout {
    /// `Error::Invalid` unless `dim` is a positive multiple of 32.
    pub fn new(kind: QType, dim: usize, gated: bool) -> Result<Layout> {
        if dim == 0 || dim > MAX_DIM {
            return Err(Error::invalid(format!("{}: bundles of {dim} values (1 to {MAX_DIM})", kind.name())));
        }
        Ok(Layout { field: kind.row_bytes(dim)?, rows: if gated { 2 } else { 1 }, down: down_bytes(kind, dim) })
    }

    /// Bytes of one bundle, its group included.
    pub fn bytes(&self) -> usize {
        self.rows * self.field + self.down + 4
    }

    /// The bundle's group (bytes `bytes() - 4..bytes()` of `b`).
    fn group(&self, b: &[u8]) -> usize {
        let at = self.bytes() - 4;
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
    }
}

/// Checks shared by both entry points; returns the layout and the number of groups.
#[allow(clippy::too_many_arguments)]
fn check(
    what: &str,
    kind: QType,
    bundles: &[u8],
    stride: usize,
    n: usize,
    gated: bool,
    dim: usize,
    scales: DownScales,
    pick: Option<&[u32]>,
) -> Result<(Layout, usize)> {
    let lay = Layout::new(kind, dim, gated)?;
    let size = lay.bytes();
    let name = kind.name();
    if n > 0 {
        let need = (n - 1).checked_mul(stride).and_then(|v| v.checked_add(size));
        if !matches!(need, Some(need) if need <= bundles.len() && size <= stride) {
            return Err(Error::invalid(format!(
                "{name} {what}: {n} bundles of {size} bytes ({dim} values, gated {gated}) at stride {stride} \
                 need more than the {} given",
                bundles.len()
            )));
        }
    }
    if scales.d.len() % dim != 0 {
        return Err(Error::invalid(format!(
            "{name} {what}: {} down scales are not whole rows of {dim}",
            scales.d.len()
        )));
    }
    match (kind == QType::Q4_1, scales.m) {
        (true, Some(m)) if m.len() == scales.d.len() => {}
        (false, None) => {}
        (_, m) => {
            return Err(Error::invalid(format!(
                "{name} {what}: down minimums {:?} for {} scales (q4_1 has one per scale, the others none)",
                m.map(|m| m.len()),
                scales.d.len()
            )))
        }
    }
    let groups = scales.d.len() / dim;
    let count = pick.map_or(n, |p| p.len());
    for j in 0..count {
        let i = pick.map_or(j, |p| p[j] as usize);
        if i >= n {
            return Err(Error::invalid(format!("{name} {what}: picked bundle {i} of {n}")));
        }
        let g = lay.group(&bundles[i * stride..][..size]);
        if g >= groups {
            return Err(Error::invalid(format!(
                "{name} {what}: bundle {i} names down group {g}, but the layer has {groups}"
            )));
        }
    }
    Ok((lay, groups))
}

/// A whole FFN over quantized bundles for one token: `h_i = relu(up_i . x + bias_i)` (plain) or
/// `silu(gate_i . x) * (up_i . x)` (gated), then `y = sum_i h_i down_i`, skipping bundles with
/// `h_i == 0`. Bundle i starts at byte `i * stride` (module docs: layout); `x.len()` is the
/// model width; `pick`: the bundles to compute (each `< n`, bias indexed by bundle), or all.
#[allow(clippy::too_many_arguments)]
pub fn q_bundle_ffn(
    kind: QType,
    bundles: &[u8],
    stride: usize,
    n: usize,
    gated: bool,
    x: &[f32],
    bias: Option<&[f32]>,
    scales: DownScales,
    y: &mut [f32],
    threads: usize,
    pick: Option<&[u32]>,
) -> Result<()> {
    q_bundle_ffn_on(super::simd(), kind, bundles, stride, n, gated, x, bias, scales, y, threads, pick)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn q_bundle_ffn_on(
    simd: Simd,
    kind: QType,
    bundles: &[u8],
    stride: usize,
    n: usize,
    gated: bool,
    x: &[f32],
    bias: Option<&[f32]>,
    scales: DownScales,
    y: &mut [f32],
    threads: usize,
    pick: Option<&[u32]>,
) -> Result<()> {
    let dim = x.len();
    if y.len() != dim || bias.is_some_and(|b| b.len() != n) || gated && bias.is_some() {
        return Err(Error::invalid(format!(
            "{} bundle FFN: x has {dim} values, y {}, bias {:?} for {n} bundles (gated {gated})",
            kind.name(),
            y.len(),
            bias.map(|b| b.len())
        )));
    }
    let (lay, _) = check("bundle FFN", kind, bundles, stride, n, gated, dim, scales, pick)?;
    let size = lay.bytes();
    let k = Kernels::new(kind, simd);
    let count = pick.map_or(n, |p| p.len());
    let px = k.prepare(x);
    let run = |lo: usize, hi: usize, out: &mut [f32]| {
        // pass 1: h per bundle; (group << 32 | j, h) for the nonzero ones
        let mut live: Vec<(u64, f32)> = Vec::with_capacity(hi - lo);
        for j in lo..hi {
            let i = pick.map_or(j, |p| p[j] as usize);
            if j + AHEAD < hi {
                prefetch(&bundles[pick.map_or(j + AHEAD, |p| p[j + AHEAD] as usize) * stride..][..size]);
            }
            let b = &bundles[i * stride..][..size];
            let u = k.dot(&b[(lay.rows - 1) * lay.field..][..lay.field], &px);
            let h = if gated {
                let g = k.dot(&b[..lay.field], &px);
                g / (1.0 + (-g).exp()) * u
            } else {
                (u + bias.map_or(0.0, |b| b[i])).max(0.0)
            };
            if h != 0.0 {
                live.push(((lay.group(b) as u64) << 32 | j as u64, h));
            }
        }
        // pass 2: per group (over the whole range, whatever the bundles' order), T = sum h q,
        // H = sum h, then y += d (T + c H) (+ m H)
        live.sort_unstable_by_key(|e| e.0);
        let mut t = vec![0f32; dim];
        for same in live.chunk_by(|a, b| a.0 >> 32 == b.0 >> 32) {
            let g = (same[0].0 >> 32) as usize;
            t.fill(0.0);
            let mut hs = 0f32;
            for &(key, h) in same {
                let i = pick.map_or(key as u32 as usize, |p| p[key as u32 as usize] as usize);
                k.down_acc(h, &bundles[i * stride + lay.rows * lay.field..][..lay.down], &mut t);
                hs += h;
            }
            let rows = g * dim..(g + 1) * dim;
            k.down_flush(&scales.d[rows.clone()], scales.m.map(|m| &m[rows]), &t, hs, out);
        }
    };
    split_rows(count, count * dim * (lay.rows + 1), threads, y, run);
    Ok(())
}

/// The float32 values of `n` bundles (module docs: layout), bundle i's fields `[gate,] up, down`
/// at `out[(i * fields + f) * dim..][..dim]` (`out.len()` = n x fields x dim, fields = 3 gated,
/// else 2).
#[allow(clippy::too_many_arguments)]
pub fn q_bundle_dequantize(
    kind: QType,
    bundles: &[u8],
    stride: usize,
    n: usize,
    gated: bool,
    dim: usize,
    scales: DownScales,
    out: &mut [f32],
) -> Result<()> {
    let (lay, _) = check("bundle dequantize", kind, bundles, stride, n, gated, dim, scales, None)?;
    let fields = lay.rows + 1;
    if Some(out.len()) != n.checked_mul(fields * dim) {
        return Err(Error::invalid(format!(
            "{} bundle dequantize: {n} bundles of {fields} x {dim} values into {} floats",
            kind.name(),
            out.len()
        )));
    }
    let k = Kernels::new(kind, super::simd());
    let mut t = vec![0f32; dim];
    for (i, o) in out.chunks_exact_mut(fields * dim).enumerate() {
        let b = &bundles[i * stride..][..lay.bytes()];
        for f in 0..lay.rows {
            k.dequantize(&b[f * lay.field..][..lay.field], &mut o[f * dim..][..dim]);
        }
        let g = lay.group(b);
        t.fill(0.0);
        k.down_acc(1.0, &b[lay.rows * lay.field..][..lay.down], &mut t);
        let down = &mut o[lay.rows * dim..];
        down.fill(0.0);
        let rows = g * dim..(g + 1) * dim;
        k.down_flush(&scales.d[rows.clone()], scales.m.map(|m| &m[rows]), &t, 1.0, down);
    }
    Ok(())
}

const _: () = assert!(BLOCK == 32);

/// Bundles ahead whose bytes pass 1 asks the CPU to fetch: a bundle is a few short runs of
/// blocks, too short for the hardware prefetcher to stream (the q8_0 FFN out of cache ran at
/// 3.7 GB/s without it).
const AHEAD: usize = 8;
