//! Decode kernels over GGML's 32-value block formats (q8_0, q4_0, q4_1): the matrix-vector
//! product of a resident quantized matrix (attention, the LM head), the FFN over quantized
//! bundle rows (`bundle`: gate/up rows in blocks, down columns as raw integers with the layer's
//! resident scales), and plain dequantization into float32 (prefill works on float32 blocks of
//! rows).
//!
//! Why here: a quantized store reads 2 to 3.5 times fewer bytes per neuron than float16, and the
//! bytes are only worth saving if they are decoded where they are used: each block is expanded
//! in registers and multiplied into a float32 `x` (never quantized itself) or accumulated into a
//! float32 `y`, so no dequantized copy of a row is ever written. Accumulation is in float32.
//!
//! Block layouts (little-endian, 32 values each; the `gguf` package's GGML_QUANT_SIZES):
//! - q8_0, 34 bytes: float16 `d`, 32 x int8 `q`; value `d * q`.
//! - q4_0, 18 bytes: float16 `d`, 16 bytes of nibbles; value j < 16 is byte j's low nibble,
//!   value j + 16 its high nibble; value `d * (nibble - 8)`.
//! - q4_1, 20 bytes: float16 `d`, float16 `m`, nibbles as q4_0; value `d * nibble + m`.
//!
//! The kernels run with AVX2 + FMA + F16C when the CPU has them (checked at run time), else as
//! portable Rust that is always compiled; set_portable forces the latter (tests compare both). On
//! the AVX2 path q4_0 and q4_1, whose cost is expanding nibbles rather than reading bytes, read x
//! as `arrange` lays it out once per call (each block's 32 values recombined to pair with low
//! nibbles and whole bytes, and the block's sums of x), so a block expands with two byte shuffles
//! and masks into float lanes that pair with x as they come, and the -8 (q4_0) and `m` (q4_1) terms
//! cost one multiply-add a block through those sums. x itself stays float32: results agree with the portable path to
//! float32 rounding. Threading is crate::gemv's: matrix rows in claimed chunks, bundles through
//! split_rows, so results do not depend on which thread took which part.

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

    /// Whether this runs the AVX2 nibble kernels (q4_0, q4_1), which read x as `arrange` lays it
    /// out.
    fn nibbles(self) -> bool {
        self.avx2 && self.kind != QType::Q8_0
    }

    /// x as `dot` reads it for one call: `arrange(kind, x)` for the nibble kernels, else empty
    /// (the others read x itself).
    fn prepare(self, x: &[f32]) -> Vec<f32> {
        if self.nibbles() {
            arrange(self.kind, x)
        } else {
            Vec::new()
        }
    }

    /// sum_j value_j * x[j] over the blocks of `row` (`x.len()` = 32 x blocks; `px` =
    /// `self.prepare(x)`).
    fn dot(self, row: &[u8], x: &[f32], px: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if self.avx2 {
            if self.nibbles() {
                // SAFETY: `avx2` is set only when the CPU has AVX2, FMA and F16C (Kernels::new),
                // the one requirement of the #[target_feature] function beyond its bounds, which
                // it checks.
                return unsafe { avx2::dot_nibbles(self.kind, row, px) };
            }
            // SAFETY: as above: the CPU has AVX2, FMA and F16C.
            return unsafe { avx2::dot(self.kind, row, x) };
        }
        scalar::dot(self.kind, row, x)
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

/// Rows q_matvec prefetches ahead of the one it computes. A quantized row is a few hundred
/// bytes, and the kernel is fast enough that the hardware prefetcher alone leaves it waiting on
/// memory for a matrix out of cache (SmolLM2's fused gate/up q4_1 matrix, 1.1 MB: 0.30 ms a
/// product out of cache against 0.12 in cache).
const MATVEC_AHEAD: usize = 4;

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
    let k = Kernels::new(kind, simd);
    let px = k.prepare(x);
    let run = |lo: usize, out: &mut [f32]| {
        for (o, v) in out.iter_mut().enumerate() {
            let r = lo + o;
            if r + MATVEC_AHEAD < rows {
                prefetch(&w[(r + MATVEC_AHEAD) * row_bytes..][..row_bytes]);
            }
            *v = k.dot(&w[r * row_bytes..][..row_bytes], x, &px);
        }
    };
    if threads < 2 || rows < 2 || rows * cols < Q_SPLIT_MACS {
        run(0, y);
        return Ok(());
    }
    let out = RowsOut(y.as_mut_ptr());
    claimed(rows.div_ceil(MATVEC_CHUNK_ROWS), |c| {
        let lo = c * MATVEC_CHUNK_ROWS;
        let hi = (lo + MATVEC_CHUNK_ROWS).min(rows);
        // SAFETY: `claimed` hands each chunk index to exactly one call, so the ranges [lo, hi)
        // written here are disjoint and inside y (hi <= rows = y.len()); y is borrowed mutably by
        // this function, which returns only after `claimed` has ended both threads.
        run(lo, unsafe { std::slice::from_raw_parts_mut(out.ptr().add(lo), hi - lo) });
    });
    Ok(())
}

/// x laid out for the AVX2 nibble kernels' dot (crate::quant::avx2), block by block: for
/// j < 16, x[j] - x[16 + j] / 16 (the factor of the low nibble), then x[16 + j] / 16 (of the
/// whole byte; exact, a power of two), then 8 lanes whose sum is the block's sum of x: for q4_0, lane l holds -8 (x[l] + x[8 + l] + x[16 + l] + x[24 + l]);
/// for q4_1 the even lanes hold 0 and odd lane l those sums of lanes l - 1 and l (the kernel
/// multiplies them by [d, m] pairs). Built once per call and shared by every row.
fn arrange(kind: QType, x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / BLOCK * (BLOCK + 8));
    for xb in x.chunks_exact(BLOCK) {
        out.extend((0..16).map(|j| xb[j] - xb[16 + j] / 16.0));
        out.extend(xb[16..].iter().map(|v| v / 16.0));
        let lane = |l: usize| xb[l] + xb[8 + l] + xb[16 + l] + xb[24 + l];
        if kind == QType::Q4_0 {
            out.extend((0..8).map(|l| -8.0 * lane(l)));
        } else {
            out.extend((0..8).map(|l| if l % 2 == 1 { lane(l - 1) + lane(l) } else { 0.0 }));
        }
    }
    out
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
