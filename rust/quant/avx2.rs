//! The AVX2 + FMA + F16C kernels. Callers must have checked that the CPU has all three features
//! (crate::quant::Kernels); bounds come from `chunks_exact`, so only whole blocks are touched.
//!
//! dot: x comes rounded to int16 per block (crate::quant::Xq), so a block's product is integer
//! arithmetic: its 32 weights are widened to int16 lanes (q8_0: two sign extensions; q4: one
//! zero extension of the 16 bytes, then `& 15` gives values 0..16 and `>> 4` values 16..32, in
//! the lanes that pair with x's two halves), two multiply-add-pairs give 8 int32 partial sums,
//! and one conversion and one multiply-add scale them by `d s_b`. The block's constant term
//! (q4_0's -8, q4_1's `m`) is one scalar lane: [d, m] (or d broadcast) times [s_b, c_b] gives
//! both factors in one multiply. A block's `d` (and `m`) take one 4-byte load and one 4-lane
//! conversion (`dm`).
//!
//! dequantize: a block's 32 integers (q, nibble - 8, nibble) are widened to four 8-lane float32
//! vectors and scaled by `d` (and offset by `m`).
//!
//! The bundle FFN's down fields (crate::quant::bundle) are raw integers without scales:
//! `down_acc` expands them as above (int8 widened, or nibbles with the factor 16 folded into
//! h / 16) into one multiply-add a value, and `down_flush` applies a group's float16 scales.

use std::arch::x86_64::*;

use super::{QType, Xq, BLOCK};

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

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// sum_j value_j * x[j] over the whole blocks of `row`, x as `xq` rounded it
/// (crate::quant::Xq): per block the integers' exact sum times `d s_b`, plus `d c_b` (q8_0,
/// q4_0) or `m c_b` (q4_1).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot(kind: QType, row: &[u8], xq: &Xq) -> f32 {
    match kind {
        QType::Q8_0 => dot_k::<Q8_0>(row, xq, kind.block_bytes()),
        QType::Q4_0 => dot_k::<Q4_0>(row, xq, kind.block_bytes()),
        QType::Q4_1 => dot_k::<Q4_1>(row, xq, kind.block_bytes()),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_k<const K: u8>(row: &[u8], xq: &Xq, bb: usize) -> f32 {
    // Two accumulators, for even and odd blocks, so that consecutive blocks do not wait on one
    // chain of dependent multiply-adds; the constant terms add up in lane 1 of `c`.
    let (mut a0, mut a1, mut c) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm_setzero_ps());
    let blocks = row.len() / bb;
    let pairs = row.chunks_exact(2 * bb).zip(xq.xi.chunks_exact(2 * BLOCK)).zip(xq.sc.chunks_exact(2));
    for ((blk2, xb2), sc2) in pairs {
        let (b0, b1) = blk2.split_at(bb);
        let (x0, x1) = xb2.split_at(BLOCK);
        block_dot::<K>(b0, x0, &sc2[0], &mut a0, &mut c);
        block_dot::<K>(b1, x1, &sc2[1], &mut a1, &mut c);
    }
    if blocks % 2 == 1 {
        let last = blocks - 1;
        if let (Some(xb), Some(sc)) = (xq.xi.chunks_exact(BLOCK).nth(last), xq.sc.get(last)) {
            block_dot::<K>(&row[last * bb..][..bb], xb, sc, &mut a0, &mut c);
        }
    }
    hsum(_mm256_add_ps(a0, a1)) + _mm_cvtss_f32(_mm_movehdup_ps(c))
}

/// acc += d s_b (q . xi) lane-wise and c[1] += d c_b (q4_1: m c_b), for one block, its 32
/// rounded values `xb` and their [s_b, c_b].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_dot<const K: u8>(blk: &[u8], xb: &[i16], sc: &[f32; 2], acc: &mut __m256, c: &mut __m128) {
    let xb = &xb[..BLOCK];
    // SAFETY: xb holds 32 int16 (64 bytes): two unaligned 32-byte loads inside it; sc is 8 bytes:
    // one unaligned 8-byte load.
    let (x0, x1, scv) = unsafe {
        (
            _mm256_loadu_si256(xb.as_ptr() as *const __m256i),
            _mm256_loadu_si256(xb.as_ptr().add(16) as *const __m256i),
            _mm_castsi128_ps(_mm_loadl_epi64(sc.as_ptr() as *const __m128i)),
        )
    };
    let p = if K == Q8_0 {
        let q = &blk[2..2 + BLOCK];
        // SAFETY: q holds 32 bytes: two unaligned 16-byte loads inside it.
        let (w0, w1) = unsafe {
            (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr() as *const __m128i)),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(q.as_ptr().add(16) as *const __m128i)),
            )
        };
        _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1))
    } else {
        let q = if K == Q4_1 { &blk[4..20] } else { &blk[2..18] };
        // SAFETY: q holds 16 bytes: one unaligned 16-byte load.
        let w = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(q.as_ptr() as *const __m128i) });
        let (lo, hi) = (_mm256_and_si256(w, _mm256_set1_epi16(15)), _mm256_srli_epi16(w, 4));
        _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1))
    };
    // [d s_b, d c_b] or, for q4_1, [d s_b, m c_b]
    let dm = dm(blk);
    let f = _mm_mul_ps(if K == Q4_1 { dm } else { _mm_broadcastss_ps(dm) }, scv);
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcastss_ps(f), *acc);
    if K != Q8_0 {
        *c = _mm_add_ps(*c, f);
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
/// 16..24 and 24..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(q: &[u8]) -> [__m256; 4] {
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
    let (a_hi, b_hi) = (_mm256_and_si256(a, hi), _mm256_and_si256(b, hi));
    [
        _mm256_cvtepi32_ps(_mm256_and_si256(a, lo)),
        _mm256_cvtepi32_ps(_mm256_and_si256(b, lo)),
        _mm256_cvtepi32_ps(a_hi),
        _mm256_cvtepi32_ps(b_hi),
    ]
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
        let v = nibbles(qc);
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
