//! Decode kernels over GGML's 32-value block formats (q8_0, q4_0, q4_1): the matrix-vector
//! product of a resident quantized matrix (attention, the LM head), the FFN over quantized
//! bundle rows (`bundle`: gate/up rows in blocks, down columns as raw integers with the layer's
//! resident scales), and plain dequantization into float32 (prefill works on float32 blocks of
//! rows).
//!
//! Why here: a quantized store reads 2 to 3.5 times fewer bytes per neuron than float16, and the
//! bytes are only worth saving if they are decoded where they are used: each block is expanded
//! in registers and multiplied into `x` or accumulated into a float32 `y`, so no dequantized copy
//! of a row is ever written. Accumulation is in float32.
//!
//! Block layouts (little-endian, 32 values each; the `gguf` package's GGML_QUANT_SIZES):
//! - q8_0, 34 bytes: float16 `d`, 32 x int8 `q`; value `d * q`.
//! - q4_0, 18 bytes: float16 `d`, 16 bytes of nibbles; value j < 16 is byte j's low nibble,
//!   value j + 16 its high nibble; value `d * (nibble - 8)`.
//! - q4_1, 20 bytes: float16 `d`, float16 `m`, nibbles as q4_0; value `d * nibble + m`.
//!
//! The kernels run with AVX2 + FMA + F16C when the CPU has them (checked at run time), else as
//! portable Rust that is always compiled; set_portable forces the latter (tests compare both).
//! Dot products (matrix rows, bundles' gate/up rows) read x as `Xq` rounds it once per call:
//! int16 integers at a scale per 32-value block, each within 1/65534 of its block's largest
//! value. A block's product is then an exact integer sum (two multiply-add-pairs instructions
//! on AVX2, where expanding the block into float lanes took four conversions and four
//! multiply-adds: the kernel was bound by those, not by memory), scaled once by the block's `d`;
//! both paths compute the same integers, so they differ only in float32 accumulation order.
//! The down fields' accumulation (`down_acc`) and dequantization stay float32 throughout.
//! Threading is crate::gemv's: matrix rows in claimed chunks, bundles through split_rows, so
//! results do not depend on which thread took which part.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};
use crate::gemv::{claimed, RowsOut, SPLIT_MACS};

#[cfg(target_arch = "x86_64")]
mod avx2;
pub mod bundle;
mod scalar;
#[cfg(test)]
pub(crate) mod tests;

/// Values per block, in every format here.
pub const BLOCK: usize = 32;

/// A GGML block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    Q8_0,
    Q4_0,
    Q4_1,
}

impl QType {
    /// Bytes per block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q8_0 => 34,
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
        }
    }

    /// GGML's name: "q8_0", "q4_0", "q4_1".
    pub fn name(self) -> &'static str {
        match self {
            QType::Q8_0 => "q8_0",
            QType::Q4_0 => "q4_0",
            QType::Q4_1 => "q4_1",
        }
    }

    /// The format named `name` (GGML's lowercase names).
    pub fn parse(name: &str) -> Result<QType> {
        match name {
            "q8_0" => Ok(QType::Q8_0),
            "q4_0" => Ok(QType::Q4_0),
            "q4_1" => Ok(QType::Q4_1),
            _ => Err(Error::invalid(format!("unknown quantized type {name:?} (expected q8_0, q4_0 or q4_1)"))),
        }
    }

    /// Bytes holding `values` values: `Error::Invalid` unless `values` is a multiple of 32.
    pub fn row_bytes(self, values: usize) -> Result<usize> {
        if values % BLOCK != 0 {
            return Err(Error::invalid(format!(
                "{}: {values} values is not a whole number of {BLOCK}-value blocks",
                self.name()
            )));
        }
        Ok(values / BLOCK * self.block_bytes())
    }
}

/// Which kernels run: AVX2 + FMA + F16C, or the portable ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Portable,
    Avx2,
}

static PORTABLE: AtomicBool = AtomicBool::new(false);

/// Force the portable kernels (`true`) or let the CPU decide (`false`), process-wide; returns
/// the previous setting. For tests and comparisons: the results agree to rounding.
pub fn set_portable(on: bool) -> bool {
    PORTABLE.swap(on, Ordering::Relaxed)
}

/// The kernels the public functions run now.
pub fn simd() -> Simd {
    if !PORTABLE.load(Ordering::Relaxed) && avx2_available() {
        Simd::Avx2
    } else {
        Simd::Portable
    }
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One format's kernels on one path; `Simd::Avx2` is only kept where the CPU has it, which the
/// AVX2 calls below rely on.
#[derive(Clone, Copy)]
pub(crate) struct Kernels {
    kind: QType,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    avx2: bool,
}

impl Kernels {
    pub(crate) fn new(kind: QType, simd: Simd) -> Kernels {
        Kernels { kind, avx2: simd == Simd::Avx2 && avx2_available() }
    }

    /// x as `dot` reads it: `Xq::new(x)`, built once per call and shared by every row.
    fn prepare(self, x: &[f32]) -> Xq {
        Xq::new(self.kind, x)
    }

    /// sum_j value_j * x[j] over the blocks of `row`, x as `prepare` rounded it (32 x the
    /// blocks of `row` values).
    fn dot(self, row: &[u8], xq: &Xq) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: `avx2` is set only when the CPU has AVX2, FMA and F16C (Kernels::new),
            // the one requirement of the #[target_feature] function beyond its bounds, which
            // it checks.
            return unsafe { avx2::dot(self.kind, row, xq) };
        }
        scalar::dot(self.kind, row, xq)
    }

    /// t[r] += h * q_r for a bundle's down field `q` (raw integers of the kind: int8, or
    /// nibbles in GGML's order; crate::quant::bundle), `t.len()` its rows.
    fn down_acc(self, h: f32, q: &[u8], t: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: as in `dot`: the CPU has AVX2, FMA and F16C.
            return unsafe { avx2::down_acc(self.kind, h, q, t) };
        }
        scalar::down_acc(self.kind, h, q, t)
    }

    /// y[r] += d[r] (t[r] + c hs) + m[r] hs (c = -8 for q4_0, else 0; `m` for q4_1 only), with
    /// `d` and `m` float16 bits: one group's down scales applied to its summed raw integers.
    fn down_flush(self, d: &[u16], m: Option<&[u16]>, t: &[f32], hs: f32, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: as in `dot`: the CPU has AVX2, FMA and F16C.
            return unsafe { avx2::down_flush(self.kind, d, m, t, hs, y) };
        }
        scalar::down_flush(self.kind, d, m, t, hs, y)
    }

    /// out[j] = value_j over the blocks of `blocks` (`out.len()` = 32 x blocks).
    fn dequantize(self, blocks: &[u8], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            // SAFETY: as in `dot`: the CPU has AVX2, FMA and F16C.
            return unsafe { avx2::dequantize(self.kind, blocks, out) };
        }
        scalar::dequantize(self.kind, blocks, out)
    }
}

/// Rows of q_matvec's output per claimed chunk (as gemv's MATVEC_CHUNK_ROWS).
const MATVEC_CHUNK_ROWS: usize = 64;

/// How far ahead of the row it computes q_matvec prefetches, in bytes (whole rows: at least
/// one). A quantized row is a few hundred bytes, and the kernel is fast enough that the hardware
/// prefetcher alone leaves it waiting on memory for a matrix out of cache (SmolLM2 q4_1 decode
/// without software prefetch takes 1.9x as long); 1.4 to 4 KiB ahead measured the same.
const MATVEC_AHEAD_BYTES: usize = 3072;

/// From this many multiply-adds a quantized product splits its rows between two threads: a
/// quantized product reads 4-8x fewer bytes per multiply-add than a float16 one (gemv's
/// SPLIT_MACS), so a smaller one pays for a join (a few microseconds, crate::par).
const Q_SPLIT_MACS: usize = SPLIT_MACS / 8;

/// Asks the CPU to bring `b` into cache (a hint: nothing is read architecturally).
#[inline]
pub(crate) fn prefetch(b: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for at in (0..b.len()).step_by(64) {
        // SAFETY: a prefetch reads nothing architecturally and cannot fault; the address is
        // inside `b`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(b.as_ptr().add(at) as *const i8)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = b;
}

/// `y = W x` for `W` a row-major quantized matrix of `rows` rows of `cols` values (each row
/// cols / 32 blocks back to back, rows back to back: `w.len()` = rows x row bytes exactly),
/// `x.len() == cols`, `y.len() == rows`. Large products split the rows between two threads in
/// claimed chunks; each row is computed whole by one thread, so the result does not depend on
/// the split.
pub fn q_matvec(
    kind: QType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
    threads: usize,
) -> Result<()> {
    q_matvec_on(simd(), kind, w, rows, cols, x, y, threads)
}

/// `y_i = W_i x` for several matrices of `cols` columns sharing one x (`mats`: each W with its
/// rows and y, as q_matvec takes them): x is rounded once for all of them (a layer's q, k and v).
pub fn q_matvecs(
    kind: QType,
    mats: &mut [(&[u8], usize, &mut [f32])],
    cols: usize,
    x: &[f32],
    threads: usize,
) -> Result<()> {
    for (w, rows, y) in mats.iter() {
        check_matvec(kind, w, *rows, cols, x, y)?;
    }
    let k = Kernels::new(kind, simd());
    let px = k.prepare(x);
    for (w, rows, y) in mats.iter_mut() {
        matvec_prepared(k, w, *rows, cols, &px, y, threads);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn q_matvec_on(
    simd: Simd,
    kind: QType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
    threads: usize,
) -> Result<()> {
    check_matvec(kind, w, rows, cols, x, y)?;
    let k = Kernels::new(kind, simd);
    matvec_prepared(k, w, rows, cols, &k.prepare(x), y, threads);
    Ok(())
}

/// The lengths q_matvec requires, as an InvalidArgumentError naming them.
fn check_matvec(kind: QType, w: &[u8], rows: usize, cols: usize, x: &[f32], y: &[f32]) -> Result<()> {
    let row_bytes = kind.row_bytes(cols)?;
    if x.len() != cols || y.len() != rows {
        return Err(Error::invalid(format!(
            "{} matvec: a {rows} x {cols} matrix times x of {} values into y of {}",
            kind.name(),
            x.len(),
            y.len()
        )));
    }
    if rows.checked_mul(row_bytes) != Some(w.len()) {
        return Err(Error::invalid(format!(
            "{} matvec: {rows} rows of {cols} values take {row_bytes} bytes each, not the {} given in all",
            kind.name(),
            w.len()
        )));
    }
    Ok(())
}

/// q_matvec's product once its lengths are checked (check_matvec) and x rounded (`px`).
fn matvec_prepared(k: Kernels, w: &[u8], rows: usize, cols: usize, px: &Xq, y: &mut [f32], threads: usize) {
    let row_bytes = w.len() / rows.max(1);
    let ahead = MATVEC_AHEAD_BYTES.div_ceil(row_bytes.max(1));
    let run = |lo: usize, out: &mut [f32]| {
        for (o, v) in out.iter_mut().enumerate() {
            let r = lo + o;
            if r + ahead < rows {
                prefetch(&w[(r + ahead) * row_bytes..][..row_bytes]);
            }
            *v = k.dot(&w[r * row_bytes..][..row_bytes], px);
        }
    };
    if threads < 2 || rows < 2 || rows * cols < Q_SPLIT_MACS {
        run(0, y);
        return;
    }
    let out = RowsOut(y.as_mut_ptr());
    claimed(rows.div_ceil(MATVEC_CHUNK_ROWS), |c| {
        let lo = c * MATVEC_CHUNK_ROWS;
        let hi = (lo + MATVEC_CHUNK_ROWS).min(rows);
        // SAFETY: `claimed` hands each chunk index to exactly one call, so the ranges [lo, hi)
        // written here are disjoint and inside y (hi <= rows = y.len(), checked by
        // check_matvec); y is borrowed mutably by this function, which returns only after
        // `claimed` has ended both threads.
        run(lo, unsafe { std::slice::from_raw_parts_mut(out.ptr().add(lo), hi - lo) });
    });
}

/// The largest |x_int| of `Xq`: int16's range less one, so that negation cannot overflow.
const XQ_MAX: f32 = 32767.0;

/// x rounded for the dot products, once per call: each 32-value block `b` as int16 integers
/// `xi = round(x / s_b)` at its own scale `s_b = max |x| / 32767`, so each value is off by at
/// most 1/65534 of its block's largest (finer than float16's 1/2048 of itself for every value
/// within 1/32 of the block's largest). A row's block then takes an exact integer dot product
/// sum_j q_j xi_j, scaled once: `d s_b` for it and, for the constant terms, `c_b` (q4_0: the
/// nibbles' -8 as `-8 s_b sum xi`; q4_1: `m` times `s_b sum xi`; q8_0: 0). A block holding a
/// value that is not finite gets s_b = NaN, so every product with it is NaN, as in float.
pub(crate) struct Xq {
    xi: Vec<i16>,
    /// [s_b, c_b] per block; c_b as above without the row's d (q4_0) or m (q4_1).
    sc: Vec<[f32; 2]>,
}

impl Xq {
    fn new(kind: QType, x: &[f32]) -> Xq {
        let blocks = x.len() / BLOCK;
        let mut xi = Vec::with_capacity(blocks * BLOCK);
        let mut sc = Vec::with_capacity(blocks);
        for xb in x.chunks_exact(BLOCK) {
            let finite = xb.iter().all(|v| v.is_finite());
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            if !finite || amax == 0.0 {
                xi.extend([0i16; BLOCK]);
                sc.push(if finite { [0.0, 0.0] } else { [f32::NAN, f32::NAN] });
                continue;
            }
            // v / amax first (in [-1, 1]): 32767 / amax overflows for a block below about 1e-34
            let mut sum = 0i32;
            for &v in xb {
                let q = (v / amax * XQ_MAX).round().clamp(-XQ_MAX, XQ_MAX) as i16;
                sum += q as i32;
                xi.push(q);
            }
            let s = amax / XQ_MAX;
            let c = match kind {
                QType::Q8_0 => 0.0,
                QType::Q4_0 => -8.0 * s * sum as f32,
                QType::Q4_1 => s * sum as f32,
            };
            sc.push([s, c]);
        }
        Xq { xi, sc }
    }
}

/// `out` = the values of `blocks` (`blocks.len()` = out.len() / 32 blocks of `kind` exactly).
pub fn q_dequantize(kind: QType, blocks: &[u8], out: &mut [f32]) -> Result<()> {
    q_dequantize_on(simd(), kind, blocks, out)
}

pub(crate) fn q_dequantize_on(simd: Simd, kind: QType, blocks: &[u8], out: &mut [f32]) -> Result<()> {
    let need = kind.row_bytes(out.len())?;
    if blocks.len() != need {
        return Err(Error::invalid(format!(
            "{}: {} values take {need} bytes, not {}",
            kind.name(),
            out.len(),
            blocks.len()
        )));
    }
    Kernels::new(kind, simd).dequantize(blocks, out);
    Ok(())
}
