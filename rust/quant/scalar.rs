//! The portable kernels: each block decoded into 32 float32 values, then used. Always compiled;
//! the reference the AVX2 kernels are tested against.

use super::{QType, Xq, BLOCK};
use crate::gemv::f16_to_f32;

/// The float16 at bytes `at..at + 2` of `b`.
fn half(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The 32 values of one block (`blk.len()` = the kind's block bytes).
pub(super) fn decode(kind: QType, blk: &[u8]) -> [f32; BLOCK] {
    let mut v = [0f32; BLOCK];
    let d = half(blk, 0);
    match kind {
        QType::Q8_0 => {
            for (o, &q) in v.iter_mut().zip(&blk[2..2 + BLOCK]) {
                *o = d * (q as i8) as f32;
            }
        }
        QType::Q4_0 | QType::Q4_1 => {
            let (m, qs, offset) = match kind {
                QType::Q4_1 => (half(blk, 2), &blk[4..20], 0.0),
                _ => (0.0, &blk[2..18], 8.0),
            };
            for (j, &q) in qs.iter().enumerate() {
                v[j] = d * ((q & 15) as f32 - offset) + m;
                v[j + 16] = d * ((q >> 4) as f32 - offset) + m;
            }
        }
    }
    v
}

/// sum_j value_j * x[j], x as `xq` rounded it: per block the exact integer sum of q_j xi_j (q
/// the raw integers: int8, or nibbles 0..15), then `d (s isum + c)`, or `d s isum + m c` for
/// q4_1 (`c` as Xq holds it), as the AVX2 kernel does.
pub(super) fn dot(kind: QType, row: &[u8], xq: &Xq) -> f32 {
    let mut sum = 0f32;
    let blocks = row.chunks_exact(kind.block_bytes()).zip(xq.xi.chunks_exact(BLOCK)).zip(&xq.sc);
    for ((blk, xb), &[s, c]) in blocks {
        let d = half(blk, 0);
        let isum: i32 = match kind {
            QType::Q8_0 => blk[2..2 + BLOCK].iter().zip(xb).map(|(&q, &x)| (q as i8) as i32 * x as i32).sum(),
            QType::Q4_0 | QType::Q4_1 => {
                let qs = if kind == QType::Q4_1 { &blk[4..20] } else { &blk[2..18] };
                let (lo, hi) = xb.split_at(16);
                qs.iter()
                    .zip(lo.iter().zip(hi))
                    .map(|(&q, (&l, &h))| (q & 15) as i32 * l as i32 + (q >> 4) as i32 * h as i32)
                    .sum()
            }
        };
        sum += match kind {
            QType::Q8_0 | QType::Q4_0 => d * s * isum as f32 + d * c,
            QType::Q4_1 => d * s * isum as f32 + half(blk, 2) * c,
        };
    }
    sum
}

/// t[r] += h * q_r over a down field's raw integers (int8, or nibbles in GGML's order).
pub(super) fn down_acc(kind: QType, h: f32, q: &[u8], t: &mut [f32]) {
    if kind == QType::Q8_0 {
        for (o, &v) in t.iter_mut().zip(q) {
            *o += h * (v as i8) as f32;
        }
        return;
    }
    for (qc, tc) in q.chunks_exact(BLOCK / 2).zip(t.chunks_exact_mut(BLOCK)) {
        for (j, &v) in qc.iter().enumerate() {
            tc[j] += h * (v & 15) as f32;
            tc[j + 16] += h * (v >> 4) as f32;
        }
    }
}

/// y[r] += d[r] (t[r] + c hs) + m[r] hs (c = -8 for q4_0, else 0; `m` for q4_1).
pub(super) fn down_flush(kind: QType, d: &[u16], m: Option<&[u16]>, t: &[f32], hs: f32, y: &mut [f32]) {
    let c = if kind == QType::Q4_0 { -8.0 * hs } else { 0.0 };
    for (r, o) in y.iter_mut().enumerate() {
        *o += f16_to_f32(d[r]) * (t[r] + c) + m.map_or(0.0, |m| f16_to_f32(m[r]) * hs);
    }
}

pub(super) fn dequantize(kind: QType, blocks: &[u8], out: &mut [f32]) {
    for (blk, ob) in blocks.chunks_exact(kind.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
        ob.copy_from_slice(&decode(kind, blk));
    }
}
