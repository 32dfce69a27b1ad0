//! The portable kernels: each block decoded into 32 float32 values, then used. Always compiled;
//! the reference the AVX2 kernels are tested against.

use super::{QType, BLOCK};
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

pub(super) fn dot(kind: QType, row: &[u8], x: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (blk, xb) in row.chunks_exact(kind.block_bytes()).zip(x.chunks_exact(BLOCK)) {
        sum += decode(kind, blk).iter().zip(xb).map(|(a, b)| a * b).sum::<f32>();
    }
    sum
}

pub(super) fn axpy(kind: QType, h: f32, row: &[u8], y: &mut [f32]) {
    for (blk, yb) in row.chunks_exact(kind.block_bytes()).zip(y.chunks_exact_mut(BLOCK)) {
        for (acc, v) in yb.iter_mut().zip(decode(kind, blk)) {
            *acc += h * v;
        }
    }
}

pub(super) fn dequantize(kind: QType, blocks: &[u8], out: &mut [f32]) {
    for (blk, ob) in blocks.chunks_exact(kind.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
        ob.copy_from_slice(&decode(kind, blk));
    }
}
