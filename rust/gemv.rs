//! The decode product over bundle rows: `y = sum_i h[i] * down_i`, with `down_i` the float16
//! down-projection row stored inside neuron i's bundle (row-major, bundle-length row stride).
//!
//! Why here: torch's float16 matrix-vector kernel is several times slower for this "transposed"
//! layout than for the same bytes in the (D, n) layout, and it is most of a flash token's FFN
//! time. The rows are walked once,
//! each converted from float16 with F16C and accumulated with FMA into a float32 `y` that stays
//! in L1; rows whose `h` is 0 (ReLU's inactive neurons) are skipped without being read. Large
//! products split the rows into fixed ranges that two threads claim as they go (each range with
//! its own partial `y`, summed in range order at the end: split_rows).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};

/// Below this many multiply-adds one thread does the work (handing half to crate::par's helper
/// costs a few microseconds).
pub(crate) const SPLIT_MACS: usize = 2 << 20;

/// `y[d] = sum_i h[i] * f16(rows[i * stride + d])` for `i < h.len()`, `d < y.len()`.
///
/// `rows` holds float16 bit patterns; row i starts at element `i * stride` and needs
/// `y.len()` elements: `Error::Invalid` when the slice is too short for that.
pub fn f16_rows_gemv(rows: &[u16], stride: usize, h: &[f32], y: &mut [f32], threads: usize) -> Result<()> {
    let (n, dim) = (h.len(), y.len());
    check_rows(rows.len(), n, dim, stride)?;
    split_rows(n, n * dim, threads, y, |lo, hi, out| accumulate(&rows[lo * stride..], stride, &h[lo..hi], out));
    Ok(())
}

/// `n` rows of `dim` values, row i from element `i * stride`, fit in `len` elements, and rows do
/// not overlap (`dim <= stride`); nothing to check for no rows.
fn check_rows(len: usize, n: usize, dim: usize, stride: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let need = (n - 1).checked_mul(stride).and_then(|v| v.checked_add(dim));
    if !matches!(need, Some(need) if need <= len) {
        return Err(Error::invalid(format!(
            "{n} rows of {dim} values at stride {stride} need more than the {len} given"
        )));
    }
    if dim > stride {
        return Err(Error::invalid(format!("row length {dim} exceeds the stride {stride}")));
    }
    Ok(())
}

/// Zero `y`, then `run(lo, hi, out)` over rows `[0, n)`: in one piece, or for `work` multiply-adds
/// of at least SPLIT_MACS and `threads >= 2`, in SPLIT_CHUNKS fixed row ranges that two threads
/// claim as they go, each summed into its own `out`, then added into `y` in range order.
///
/// Claimed, not halved: a flash layer runs this while its reads land, and the disk's
/// completions are handled on one core (virtio-blk's interrupt and the block softirq), so a
/// fixed half split waited for the thread on that core. The ranges and the order of the final
/// sum are fixed, so the result does not depend on which thread took which range (a
/// timing-dependent summation order would change last bits from run to run, and top-k
/// selections turn those into different neurons).
pub(crate) fn split_rows(
    n: usize,
    work: usize,
    threads: usize,
    y: &mut [f32],
    run: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    y.iter_mut().for_each(|v| *v = 0.0);
    if threads < 2 || n < 2 || work < SPLIT_MACS {
        run(0, n, y);
        return;
    }
    let dim = y.len();
    let chunks = SPLIT_CHUNKS.min(n);
    let mut parts = vec![0f32; chunks * dim];
    let out = RowsOut(parts.as_mut_ptr());
    claimed(chunks, |c| {
        // SAFETY: `claimed` hands each range index to exactly one call, so the dim-long slices
        // written here are disjoint and inside `parts` (c < chunks); `parts` lives until after
        // `claimed` has ended both threads.
        run(c * n / chunks, (c + 1) * n / chunks, unsafe {
            std::slice::from_raw_parts_mut(out.ptr().add(c * dim), dim)
        });
    });
    for part in parts.chunks_exact(dim) {
        y.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
}

/// Row ranges of a split bundle product (split_rows): enough for one thread to take more than
/// half when the other is interrupted, few enough that the partial sums (8 x 16 KiB at
/// OPT-6.7B's width) and their reduction stay small.
const SPLIT_CHUNKS: usize = 8;

fn accumulate(rows: &[u16], stride: usize, h: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above), the only
            // requirement of a #[target_feature] function beyond its own bounds, which it checks.
            unsafe { accumulate_f16c(rows, stride, h, y) };
            return;
        }
    }
    accumulate_scalar(rows, stride, h, y);
}

fn accumulate_scalar(rows: &[u16], stride: usize, h: &[f32], y: &mut [f32]) {
    for (i, &hi) in h.iter().enumerate() {
        if hi == 0.0 {
            continue;
        }
        let row = &rows[i * stride..i * stride + y.len()];
        for (acc, &bits) in y.iter_mut().zip(row) {
            *acc += hi * f16_to_f32(bits);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn accumulate_f16c(rows: &[u16], stride: usize, h: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let dim = y.len();
    let body = dim - dim % 8;
    for (i, &hi) in h.iter().enumerate() {
        if hi == 0.0 {
            continue;
        }
        let row = &rows[i * stride..i * stride + dim]; // bounds-checked slice
        let hv = _mm256_set1_ps(hi);
        let mut d = 0;
        while d < body {
            // SAFETY: d + 8 <= body <= dim = row.len() = y.len(), so both 8-lane accesses stay
            // inside their slices; unaligned loads and stores are used, so no alignment is assumed.
            unsafe {
                let r = _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(d) as *const __m128i));
                let acc = _mm256_loadu_ps(y.as_ptr().add(d));
                _mm256_storeu_ps(y.as_mut_ptr().add(d), _mm256_fmadd_ps(hv, r, acc));
            }
            d += 8;
        }
        for k in body..dim {
            y[k] += hi * f16_to_f32(row[k]);
        }
    }
}

/// A whole FFN over bundle rows for one token, in one pass over each bundle:
/// `h_i = relu(up_i . x + bias_i)` (plain) or `silu(gate_i . x) * (up_i . x)` (gated), then
/// `y += h_i * down_i`, skipping the down row where `h_i == 0`. Row i holds, from element
/// `i * stride`, `[gate_i,] up_i, down_i`, each `x.len()` float16 values.
///
/// `pick`: the rows to compute (each `< n`, bias indexed by row), or every row `0..n`: a flash
/// layer computing only this token's wanted neurons among its live rows reads no other bundle.
#[allow(clippy::too_many_arguments)]
pub fn f16_bundle_ffn(
    rows: &[u16],
    stride: usize,
    n: usize,
    gated: bool,
    x: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    threads: usize,
    pick: Option<&[u32]>,
) -> Result<()> {
    let dim = x.len();
    let fields = if gated { 3 } else { 2 };
    if y.len() != dim || bias.is_some_and(|b| b.len() != n) || gated && bias.is_some() {
        return Err(Error::invalid(format!(
            "bundle FFN: x has {dim} values, y {}, bias {:?} for {n} rows (gated {gated})",
            y.len(),
            bias.map(|b| b.len())
        )));
    }
    if n > 0 {
        let need = (n - 1).checked_mul(stride).and_then(|v| v.checked_add(fields * dim));
        match need {
            Some(need) if need <= rows.len() && fields * dim <= stride => {}
            _ => {
                return Err(Error::invalid(format!(
                    "{n} bundles of {fields} x {dim} values at stride {stride} need more than the {} given",
                    rows.len()
                )))
            }
        }
    }
    if let Some(bad) = pick.and_then(|p| p.iter().find(|&&i| i as usize >= n)) {
        return Err(Error::invalid(format!("bundle FFN: picked row {bad} of {n}")));
    }
    let count = pick.map_or(n, |p| p.len());
    let run = |lo: usize, hi: usize, out: &mut [f32]| {
        for k in lo..hi {
            let i = pick.map_or(k, |p| p[k] as usize);
            let b = &rows[i * stride..i * stride + fields * dim];
            let (gate, rest) = if gated { b.split_at(dim) } else { (&b[..0], b) };
            let (up, down) = rest.split_at(dim);
            let u = dot(up, x);
            let h = if gated {
                let g = dot(gate, x);
                g / (1.0 + (-g).exp()) * u
            } else {
                (u + bias.map_or(0.0, |b| b[i])).max(0.0)
            };
            if h != 0.0 {
                axpy(h, down, out);
            }
        }
    };
    split_rows(count, count * dim * fields, threads, y, run);
    Ok(())
}

/// `y[o] = sum_d f16(w[o * stride + d]) * x[d]` for `o < y.len()`, `d < x.len()`: a float16
/// weight matrix (out, in) times one activation vector, the decode product of every projection
/// (q, k, v, o, the LM head). Memory-bound: rows are read once, four at a time (four streams for
/// the prefetchers) with F16C + FMA; large products split the output rows between two threads
/// (in chunks each thread claims as it goes).
/// Somewhat faster than torch's float16 linear for one row (OPT-6.7B's q/k/v and o shapes).
pub fn f16_matvec(w: &[u16], stride: usize, x: &[f32], y: &mut [f32], threads: usize) -> Result<()> {
    let (n, dim) = (y.len(), x.len());
    check_rows(w.len(), n, dim, stride)?;
    let run = |lo: usize, out: &mut [f32]| {
        let mut o = 0;
        while o + 4 <= out.len() {
            let row = |k: usize| &w[(lo + o + k) * stride..][..dim];
            out[o..o + 4].copy_from_slice(&dot4([row(0), row(1), row(2), row(3)], x));
            o += 4;
        }
        for (k, v) in out.iter_mut().enumerate().skip(o) {
            *v = dot(&w[(lo + k) * stride..][..dim], x);
        }
    };
    if threads < 2 || n < 4 || n * dim < SPLIT_MACS {
        run(0, y);
        return Ok(());
    }
    // Both threads claim chunks of MATVEC_CHUNK_ROWS rows from one counter, not a half each:
    // the disk's completions are handled on one core (virtio-blk's interrupt and the block
    // softirq, /proc/interrupts), so while a flash layer's reads land, a fixed half split waits
    // at every join for the thread on that core. Each output row is still computed whole by one
    // thread, in the same 4-row groups as on one thread (chunks start at multiples of 4), so
    // the result does not depend on which thread took which chunk.
    let out = RowsOut(y.as_mut_ptr());
    claimed(n.div_ceil(MATVEC_CHUNK_ROWS), |c| {
        let lo = c * MATVEC_CHUNK_ROWS;
        let hi = (lo + MATVEC_CHUNK_ROWS).min(n);
        // SAFETY: `claimed` hands each chunk index to exactly one call, so the ranges [lo, hi)
        // written here are disjoint and inside y (hi <= n = y.len()); y is borrowed mutably by
        // this function, which returns only after `claimed` has ended both threads.
        run(lo, unsafe { std::slice::from_raw_parts_mut(out.ptr().add(lo), hi - lo) });
    });
    Ok(())
}

/// Rows of f16_matvec's output per claimed chunk (a multiple of 4: 64 rows of 4,096 float16
/// weights = 512 KiB read; OPT-6.7B's fused q/k/v product is 192 chunks).
const MATVEC_CHUNK_ROWS: usize = 64;

/// `job(c)` for every `c < chunks`, on this thread and crate::par's helper, each claiming the
/// next unclaimed index from one counter: a thread slowed by interrupts simply takes fewer.
pub(crate) fn claimed(chunks: usize, job: impl Fn(usize) + Sync) {
    let next = AtomicUsize::new(0);
    let work = || loop {
        let c = next.fetch_add(1, Ordering::Relaxed);
        if c >= chunks {
            break;
        }
        job(c);
    };
    crate::par::join(work, work);
}

/// An output written by both threads in disjoint chunks (f16_matvec, split_rows, crate::quant).
pub(crate) struct RowsOut(pub(crate) *mut f32);

impl RowsOut {
    pub(crate) fn ptr(&self) -> *mut f32 {
        self.0
    }
}

// SAFETY: the pointer is only used to build slices of disjoint chunks, each claimed by one
// thread (f16_matvec, split_rows), while the buffer is mutably borrowed or owned by the call
// that runs the join.
unsafe impl Sync for RowsOut {}

/// Four rows' dot products with x, read side by side (four streams).
fn dot4(r: [&[u16]; 4], x: &[f32]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
            return unsafe { dot4_f16c(r, x) };
        }
    }
    r.map(|a| dot(a, x))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_f16c(r: [&[u16]; 4], x: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = r.iter().map(|a| a.len()).min().unwrap_or(0).min(x.len());
    let body = n - n % 8;
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut d = 0;
    while d < body {
        // SAFETY: d + 8 <= body <= n <= every length: each 8-lane read is in bounds (unaligned loads).
        unsafe {
            let xv = _mm256_loadu_ps(x.as_ptr().add(d));
            for k in 0..4 {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(r[k].as_ptr().add(d) as *const __m128i));
                acc[k] = _mm256_fmadd_ps(v, xv, acc[k]);
            }
        }
        d += 8;
    }
    let mut out = [0f32; 4];
    for k in 0..4 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 f32: an unaligned 8-lane store fits exactly.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[k]) };
        out[k] = lanes.iter().sum::<f32>() + (body..n).map(|j| f16_to_f32(r[k][j]) * x[j]).sum::<f32>();
    }
    out
}

/// sum_d f16(a[d]) * x[d]
pub(crate) fn dot(a: &[u16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above).
            return unsafe { dot_f16c(a, x) };
        }
    }
    a.iter().zip(x).map(|(&b, &v)| f16_to_f32(b) * v).sum()
}

/// y += h * f16(a)
pub(crate) fn axpy(h: f32, a: &[u16], y: &mut [f32]) {
    accumulate(a, a.len(), &[h], y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16c(a: &[u16], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(x.len());
    let body = n - n % 16;
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut d = 0;
    while d < body {
        // SAFETY: d + 16 <= body <= n <= both lengths: every lane read is in bounds (unaligned loads).
        unsafe {
            let a0 = _mm256_cvtph_ps(_mm_loadu_si128(a.as_ptr().add(d) as *const __m128i));
            let a1 = _mm256_cvtph_ps(_mm_loadu_si128(a.as_ptr().add(d + 8) as *const __m128i));
            acc0 = _mm256_fmadd_ps(a0, _mm256_loadu_ps(x.as_ptr().add(d)), acc0);
            acc1 = _mm256_fmadd_ps(a1, _mm256_loadu_ps(x.as_ptr().add(d + 8)), acc1);
        }
        d += 16;
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 f32: an unaligned 8-lane store fits exactly.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc0, acc1)) };
    let mut sum: f32 = lanes.iter().sum();
    for k in body..n {
        sum += f16_to_f32(a[k]) * x[k];
    }
    sum
}

/// IEEE binary16 bits -> f32 (subnormals, infinities and NaN included).
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let frac = (bits & 0x3ff) as u32;
    let v = match exp {
        0 if frac == 0 => sign,
        0 => {
            // subnormal: frac * 2^-24
            let f = frac as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -f } else { f };
        }
        31 => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(v)
}

#[cfg(test)]
mod tests;
