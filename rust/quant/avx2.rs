//! The AVX2 + FMA + F16C kernels: a block's 32 integers (q, nibble - 8, nibble) are widened in
//! registers to four 8-lane float32 vectors, combined with x (dot), y (axpy) or nothing
//! (dequantize), and scaled once per block by its float16 `d` (and `m` for q4_1, through the
//! block's sum of x or a per-block offset). Callers must have checked that the CPU has all three
//! features (crate::quant::Kernels); bounds come from `chunks_exact`, so only whole blocks are
//! touched.

use std::arch::x86_64::*;

use super::{QType, BLOCK};

const Q8_0: u8 = 0;
const Q4_0: u8 = 1;
const Q4_1: u8 = 2;

/// The float16 at bytes `at..at + 2` of `blk` as float32 (F16C).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half(blk: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([blk[at], blk[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The low 8 bytes of `v` as signed integers, widened to 8 float32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// A block's 32 integer values (before `d` and `m`) as float32, values 8k..8k+8 in vector k.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ints<const K: u8>(blk: &[u8]) -> [__m256; 4] {
    if K == Q8_0 {
        let q = &blk[2..2 + BLOCK];
        let mut out = [_mm256_setzero_ps(); 4];
        for (k, o) in out.iter_mut().enumerate() {
            // SAFETY: q holds 32 bytes and 8k + 8 <= 32 (k < 4): an unaligned 8-byte load inside it.
            let v = unsafe { _mm_loadl_epi64(q.as_ptr().add(8 * k) as *const __m128i) };
            *o = widen(v);
        }
        return out;
    }
    let q = if K == Q4_1 { &blk[4..20] } else { &blk[2..18] };
    // SAFETY: q holds 16 bytes: one unaligned 16-byte load.
    let v = unsafe { _mm_loadu_si128(q.as_ptr() as *const __m128i) };
    let mask = _mm_set1_epi8(15);
    let (mut lo, mut hi) = (_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16(v, 4), mask));
    if K == Q4_0 {
        lo = _mm_sub_epi8(lo, _mm_set1_epi8(8));
        hi = _mm_sub_epi8(hi, _mm_set1_epi8(8));
    }
    [widen(lo), widen(_mm_srli_si128(lo, 8)), widen(hi), widen(_mm_srli_si128(hi, 8))]
}

/// The 32 float32 of `xb` (32 long) as four vectors.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32(xb: &[f32]) -> [__m256; 4] {
    let xb = &xb[..BLOCK];
    let mut out = [_mm256_setzero_ps(); 4];
    for (k, o) in out.iter_mut().enumerate() {
        // SAFETY: xb holds 32 floats and 8k + 8 <= 32 (k < 4): an unaligned 8-lane load inside it.
        *o = unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * k)) };
    }
    out
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// sum_j value_j * x[j] over the whole blocks of `row` and 32-value chunks of `x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(kind: QType, row: &[u8], x: &[f32]) -> f32 {
    match kind {
        QType::Q8_0 => dot_k::<Q8_0>(row, x, kind.block_bytes()),
        QType::Q4_0 => dot_k::<Q4_0>(row, x, kind.block_bytes()),
        QType::Q4_1 => dot_k::<Q4_1>(row, x, kind.block_bytes()),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k<const K: u8>(row: &[u8], x: &[f32], bb: usize) -> f32 {
    // Two accumulators, for even and odd blocks (and two more for q4_1's `m` terms), so that
    // consecutive blocks do not wait on one chain of dependent multiply-adds.
    let (mut a0, mut a1, mut m0, mut m1) =
        (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
    let pairs = row.chunks_exact(2 * bb).zip(x.chunks_exact(2 * BLOCK));
    for (blk2, xb2) in pairs {
        let (b0, b1) = blk2.split_at(bb);
        let (x0, x1) = xb2.split_at(BLOCK);
        block_dot::<K>(b0, x0, &mut a0, &mut m0);
        block_dot::<K>(b1, x1, &mut a1, &mut m1);
    }
    let whole = row.len() / (2 * bb) * 2;
    if let (Some(blk), Some(xb)) = (row.chunks_exact(bb).nth(whole), x.chunks_exact(BLOCK).nth(whole)) {
        block_dot::<K>(blk, xb, &mut a0, &mut m0);
    }
    hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(m0, m1)))
}

/// acc += d * (q . x) and, for q4_1, acc_m += m * sum(x), lane-wise, for one block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_dot<const K: u8>(blk: &[u8], xb: &[f32], acc: &mut __m256, acc_m: &mut __m256) {
    let q = ints::<K>(blk);
    let v = load32(xb);
    let s = _mm256_fmadd_ps(
        q[3],
        v[3],
        _mm256_fmadd_ps(q[2], v[2], _mm256_fmadd_ps(q[1], v[1], _mm256_mul_ps(q[0], v[0]))),
    );
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(half(blk, 0)), s, *acc);
    if K == Q4_1 {
        let sx = _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3]));
        *acc_m = _mm256_fmadd_ps(_mm256_set1_ps(half(blk, 2)), sx, *acc_m);
    }
}

/// y[j] += h * value_j over the whole blocks of `row` and 32-value chunks of `y`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn axpy(kind: QType, h: f32, row: &[u8], y: &mut [f32]) {
    match kind {
        QType::Q8_0 => scale_into::<Q8_0, true>(h, row, y, kind.block_bytes()),
        QType::Q4_0 => scale_into::<Q4_0, true>(h, row, y, kind.block_bytes()),
        QType::Q4_1 => scale_into::<Q4_1, true>(h, row, y, kind.block_bytes()),
    }
}

/// out[j] = value_j over the whole blocks of `blocks` and 32-value chunks of `out`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize(kind: QType, blocks: &[u8], out: &mut [f32]) {
    match kind {
        QType::Q8_0 => scale_into::<Q8_0, false>(1.0, blocks, out, kind.block_bytes()),
        QType::Q4_0 => scale_into::<Q4_0, false>(1.0, blocks, out, kind.block_bytes()),
        QType::Q4_1 => scale_into::<Q4_1, false>(1.0, blocks, out, kind.block_bytes()),
    }
}

/// y[j] = (ADD ? y[j] : 0) + h * value_j, block by block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_into<const K: u8, const ADD: bool>(h: f32, row: &[u8], y: &mut [f32], bb: usize) {
    for (blk, yb) in row.chunks_exact(bb).zip(y.chunks_exact_mut(BLOCK)) {
        let q = ints::<K>(blk);
        let hd = _mm256_set1_ps(h * half(blk, 0));
        let hm = _mm256_set1_ps(if K == Q4_1 { h * half(blk, 2) } else { 0.0 });
        for (k, &qk) in q.iter().enumerate() {
            // SAFETY: yb holds 32 floats and 8k + 8 <= 32 (k < 4): an unaligned 8-lane load and
            // store inside it.
            unsafe {
                let p = yb.as_mut_ptr().add(8 * k);
                let base = if ADD { _mm256_add_ps(_mm256_loadu_ps(p), hm) } else { hm };
                _mm256_storeu_ps(p, _mm256_fmadd_ps(hd, qk, base));
            }
        }
    }
}
