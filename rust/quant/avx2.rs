//! The AVX2 + FMA + F16C kernels. Callers must have checked that the CPU has all three features
//! (crate::quant::Kernels); bounds come from `chunks_exact`, so only whole blocks are touched.
//!
//! q8_0's dot and every format's dequantize: a block's 32 integers (q, nibble - 8, nibble) are
//! widened in registers to four 8-lane float32 vectors, combined with x (dot) or nothing
//! (dequantize), and scaled once per block by its float16 `d` (and `m` for q4_1, through the
//! block's sum of x or an offset).
//!
//! q4_0 and q4_1 have their own dot (`dot_nibbles`), because there the expansion, not memory, is
//! the cost (the kernel is bound by vector instructions per block): the block's 16 bytes are
//! broadcast to both halves of a register and one byte shuffle puts 8 of them into the low bytes
//! of 8 int32 lanes; masking that with 0x0F gives 8 low nibbles and with 0xF0 the same bytes'
//! high nibbles times 16, so 32 values take two shuffles, four ANDs and four int -> float
//! conversions, with no widening shuffles, no subtraction of 8 and no shifts. dot needs two ANDs
//! fewer: with lo_j and hi_j value j's and j + 16's nibbles and b_j = lo_j + 16 hi_j the whole
//! byte, lo_j x_j + hi_j x_{j+16} = lo_j (x_j - x_{j+16} / 16) + b_j (x_{j+16} / 16), so it
//! converts the low nibbles and the whole bytes and multiplies them with x as
//! crate::quant::arrange lays it out once per call (each new term is at most the old one plus
//! 15/16 |x_{j+16}|, so no cancellation: the rounding stays float32's). The blocks' constant terms
//! (-8 d for q4_0, m for q4_1) go into one multiply-add per block: dot starts each block's sum
//! from arrange's -8 x sum (q4_0) or adds m times it (q4_1, as one multiply-add of [d, m] lane
//! pairs). A block's `d` (and `m`) take one 4-byte load and one 4-lane conversion (`dm`).
//!
//! The bundle FFN's down fields (crate::quant::bundle) are raw integers without scales:
//! `down_acc` expands them as above (int8 widened, or nibbles with the factor 16 folded into
//! h / 16) into one multiply-add a value, and `down_flush` applies a group's float16 scales.

use std::arch::x86_64::*;

use super::{QType, BLOCK};

const Q8_0: u8 = 0;
const Q4_0: u8 = 1;
const Q4_1: u8 = 2;

/// The float16 at bytes `at..at + 2` of `blk` as float32 (`at` 0 or 2; see `dm`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half(blk: &[u8], at: usize) -> f32 {
    let v = dm(blk);
    _mm_cvtss_f32(if at == 0 { v } else { _mm_movehdup_ps(v) })
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

/// out[j] = value_j over the whole blocks of `blocks` and 32-value chunks of `out`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dequantize(kind: QType, blocks: &[u8], out: &mut [f32]) {
    match kind {
        QType::Q8_0 => scale_into::<Q8_0>(1.0, blocks, out, kind.block_bytes()),
        QType::Q4_0 => scale_into::<Q4_0>(1.0, blocks, out, kind.block_bytes()),
        QType::Q4_1 => scale_into::<Q4_1>(1.0, blocks, out, kind.block_bytes()),
    }
}

/// y[j] = h * value_j, block by block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_into<const K: u8>(h: f32, row: &[u8], y: &mut [f32], bb: usize) {
    for (blk, yb) in row.chunks_exact(bb).zip(y.chunks_exact_mut(BLOCK)) {
        let q = ints::<K>(blk);
        let hd = _mm256_set1_ps(h * half(blk, 0));
        let hm = _mm256_set1_ps(if K == Q4_1 { h * half(blk, 2) } else { 0.0 });
        for (k, &qk) in q.iter().enumerate() {
            // SAFETY: yb holds 32 floats and 8k + 8 <= 32 (k < 4): an unaligned 8-lane store
            // inside it.
            unsafe { _mm256_storeu_ps(yb.as_mut_ptr().add(8 * k), _mm256_fmadd_ps(hd, qk, hm)) };
        }
    }
}

/// Floats per block of crate::quant::arrange's layout: 32 of x, then 8 of the block's sums.
pub(super) const ARRANGED: usize = 40;

/// Byte shuffles that put bytes 0..8 (`NIB_A`) or 8..16 (`NIB_B`) of a broadcast 16-byte block
/// into the low bytes of 8 int32 lanes, zeroing the rest (index -1).
#[rustfmt::skip]
const NIB_A: [i8; 32] = [
    0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
    4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1,
];
#[rustfmt::skip]
const NIB_B: [i8; 32] = [
    8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,
    12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1,
];

/// The float16s at bytes 0..2 (`d`) and 2..4 (`m` of q4_1, else two quant bytes) of `blk` as
/// float32 lanes 0 and 1: one 4-byte load and one 4-lane conversion.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dm(blk: &[u8]) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]])))
}

/// A q4 block's nibbles (16 bytes `q`) as float32: values 0..8, 8..16, then 16 x values
/// 16..24 and 24..32, or with `WHOLE` the whole bytes 0..8 and 8..16 (value j + 16 x value
/// j + 16) in place of the last two.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles<const WHOLE: bool>(q: &[u8]) -> [__m256; 4] {
    let q = &q[..16];
    // SAFETY: q holds 16 bytes: one unaligned 16-byte load; the shuffle tables hold 32 bytes each.
    let (v, ia, ib) = unsafe {
        (
            _mm256_broadcastsi128_si256(_mm_loadu_si128(q.as_ptr() as *const __m128i)),
            _mm256_loadu_si256(NIB_A.as_ptr() as *const __m256i),
            _mm256_loadu_si256(NIB_B.as_ptr() as *const __m256i),
        )
    };
    let (a, b) = (_mm256_shuffle_epi8(v, ia), _mm256_shuffle_epi8(v, ib));
    let (lo, hi) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(0xF0));
    let (a_hi, b_hi) = if WHOLE { (a, b) } else { (_mm256_and_si256(a, hi), _mm256_and_si256(b, hi)) };
    [
        _mm256_cvtepi32_ps(_mm256_and_si256(a, lo)),
        _mm256_cvtepi32_ps(_mm256_and_si256(b, lo)),
        _mm256_cvtepi32_ps(a_hi),
        _mm256_cvtepi32_ps(b_hi),
    ]
}

/// sum_j value_j * x[j] for q4_0 or q4_1 (`kind`), x given as crate::quant::arrange laid it out
/// for `kind` (`px`: ARRANGED floats a block).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_nibbles(kind: QType, row: &[u8], px: &[f32]) -> f32 {
    match kind {
        QType::Q4_1 => dot_nib::<Q4_1>(row, px, kind.block_bytes()),
        _ => dot_nib::<Q4_0>(row, px, kind.block_bytes()),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_nib<const K: u8>(row: &[u8], px: &[f32], bb: usize) -> f32 {
    // Two accumulators (and two for q4_1's `m` terms), for even and odd blocks, as dot_k.
    let (mut a0, mut a1, mut m0, mut m1) =
        (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
    let pairs = row.chunks_exact(2 * bb).zip(px.chunks_exact(2 * ARRANGED));
    for (blk2, xb2) in pairs {
        let (b0, b1) = blk2.split_at(bb);
        let (x0, x1) = xb2.split_at(ARRANGED);
        nib_dot::<K>(b0, x0, &mut a0, &mut m0);
        nib_dot::<K>(b1, x1, &mut a1, &mut m1);
    }
    let whole = row.len() / (2 * bb) * 2;
    if let (Some(blk), Some(xb)) = (row.chunks_exact(bb).nth(whole), px.chunks_exact(ARRANGED).nth(whole)) {
        nib_dot::<K>(blk, xb, &mut a0, &mut m0);
    }
    hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(m0, m1)))
}

/// acc += d * (nibbles . x - 8 sum x) for q4_0, or acc += d * (nibbles . x) and
/// acc_m += m * sum x for q4_1, lane-wise, for one block and its ARRANGED floats `xb` (the low
/// nibbles and whole bytes times arrange's two halves; see the module docs).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nib_dot<const K: u8>(blk: &[u8], xb: &[f32], acc: &mut __m256, acc_m: &mut __m256) {
    let q = nibbles::<true>(if K == Q4_1 { &blk[4..20] } else { &blk[2..18] });
    let xb = &xb[..ARRANGED];
    // SAFETY: xb holds 40 floats and 8k + 8 <= 40 (k <= 4): unaligned 8-lane loads inside it.
    let v = |k: usize| unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * k)) };
    let (sums, dm) = (v(4), dm(blk));
    let s0 = if K == Q4_0 { _mm256_fmadd_ps(q[0], v(0), sums) } else { _mm256_mul_ps(q[0], v(0)) };
    let s1 = _mm256_mul_ps(q[1], v(1));
    let s0 = _mm256_fmadd_ps(q[2], v(2), s0);
    let s1 = _mm256_fmadd_ps(q[3], v(3), s1);
    *acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), _mm256_add_ps(s0, s1), *acc);
    if K == Q4_1 {
        // [d, m] in every pair of lanes times arrange's sums, which are 0 in the even lanes.
        let dm4 = _mm256_castpd_ps(_mm256_broadcastsd_pd(_mm_castps_pd(dm)));
        *acc_m = _mm256_fmadd_ps(dm4, sums, *acc_m);
    }
}

/// t[r] += h * q_r over a down field's raw integers `q` (crate::quant::bundle): int8 (q8_0), or
/// nibbles in GGML's order (q4_0, q4_1; expanded as `nibbles`, the high ones times 16, which
/// h / 16 undoes exactly).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn down_acc(kind: QType, h: f32, q: &[u8], t: &mut [f32]) {
    let h1 = _mm256_set1_ps(h);
    if kind == QType::Q8_0 {
        for (qc, tc) in q.chunks_exact(8).zip(t.chunks_exact_mut(8)) {
            // SAFETY: qc holds 8 bytes and tc 8 floats: an unaligned 8-byte load, an 8-lane load
            // and store, each inside its chunk.
            unsafe {
                let v = widen(_mm_loadl_epi64(qc.as_ptr() as *const __m128i));
                _mm256_storeu_ps(tc.as_mut_ptr(), _mm256_fmadd_ps(h1, v, _mm256_loadu_ps(tc.as_ptr())));
            }
        }
        return;
    }
    let h16 = _mm256_set1_ps(h / 16.0);
    let scale = [h1, h1, h16, h16];
    for (qc, tc) in q.chunks_exact(BLOCK / 2).zip(t.chunks_exact_mut(BLOCK)) {
        let v = nibbles::<false>(qc);
        for k in 0..4 {
            // SAFETY: tc holds 32 floats and 8k + 8 <= 32 (k < 4): an unaligned 8-lane load and
            // store inside it.
            unsafe {
                let p = tc.as_mut_ptr().add(8 * k);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(scale[k], v[k], _mm256_loadu_ps(p)));
            }
        }
    }
}

/// y[r] += d[r] (t[r] + c hs) + m[r] hs (c = -8 for q4_0, else 0; `m` for q4_1), `d` and `m`
/// float16 bits, 8 rows at a time (rows come in multiples of 32).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn down_flush(kind: QType, d: &[u16], m: Option<&[u16]>, t: &[f32], hs: f32, y: &mut [f32]) {
    let c = _mm256_set1_ps(if kind == QType::Q4_0 { -8.0 * hs } else { 0.0 });
    let hv = _mm256_set1_ps(hs);
    let halves = |s: &[u16]| {
        let s = &s[..8];
        // SAFETY: s holds 8 float16 (checked just above): one unaligned 16-byte load inside it.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr() as *const __m128i)) }
    };
    let rows = d.chunks_exact(8).zip(t.chunks_exact(8)).zip(y.chunks_exact_mut(8)).enumerate();
    for (r, ((dc, tc), yc)) in rows {
        // SAFETY: tc and yc hold 8 floats each: unaligned 8-lane loads and a store inside them.
        unsafe {
            let mut acc = _mm256_fmadd_ps(
                halves(dc),
                _mm256_add_ps(_mm256_loadu_ps(tc.as_ptr()), c),
                _mm256_loadu_ps(yc.as_ptr()),
            );
            if let Some(m) = m {
                acc = _mm256_fmadd_ps(halves(&m[8 * r..][..8]), hv, acc);
            }
            _mm256_storeu_ps(yc.as_mut_ptr(), acc);
        }
    }
}
