//! gemv tests: the float16 kernels against a plain float64 sum, float16 decoding, bad shapes, and the thread splits (bit-identical or deterministic).

use super::*;
use proptest::prelude::*;

fn f32_to_f16_bits(x: f32) -> u16 {
    // round-to-nearest via the exact f16 grid is not needed: tests pick exactly
    // representable values (small integers times powers of two).
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    if x == 0.0 {
        return sign;
    }
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    let frac = ((b >> 13) & 0x3ff) as u16;
    sign | ((exp as u16) << 10) | frac
}

#[test]
fn f16_conversion_special_values() {
    assert_eq!(f16_to_f32(0x3c00), 1.0);
    assert_eq!(f16_to_f32(0xc000), -2.0);
    assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    assert_eq!(f16_to_f32(0x7bff), 65504.0);
    assert!(f16_to_f32(0x7c00).is_infinite() && f16_to_f32(0x7e00).is_nan());
    assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
}

#[test]
fn rejects_short_rows() {
    let mut y = vec![0f32; 4];
    assert!(f16_rows_gemv(&[0u16; 7], 4, &[1.0, 1.0], &mut y, 1).is_err());
    assert!(f16_rows_gemv(&[0u16; 8], 3, &[1.0, 1.0], &mut y, 1).is_err());
    assert!(f16_rows_gemv(&[0u16; 8], 4, &[1.0, 1.0], &mut y, 1).is_ok());
}

proptest! {
    #[test]
    fn matches_a_plain_sum(n in 0usize..40, dim in 1usize..70, pad in 0usize..9, threads in 1usize..3,
                           seed in any::<u64>()) {
        let stride = dim + pad;
        let mut s = seed | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
        let vals: Vec<f32> = (0..n * stride).map(|_| ((next() % 64) as f32 - 32.0) / 8.0).collect();
        let rows: Vec<u16> = vals.iter().map(|&v| f32_to_f16_bits(v)).collect();
        let h: Vec<f32> = (0..n).map(|_| if next() % 3 == 0 { 0.0 } else { ((next() % 32) as f32 - 16.0) / 4.0 }).collect();
        let mut y = vec![f32::NAN; dim];
        f16_rows_gemv(&rows, stride, &h, &mut y, threads).unwrap();
        for d in 0..dim {
            let want: f32 = (0..n).map(|i| h[i] * vals[i * stride + d]).sum();
            prop_assert!((y[d] - want).abs() <= 1e-3 * (1.0 + want.abs()), "d {} got {} want {}", d, y[d], want);
        }
    }
}

proptest! {
    #[test]
    fn bundle_ffn_matches_a_plain_sum(n in 0usize..30, dim in 1usize..40, pad in 0usize..5, gated in any::<bool>(),
                                      with_bias in any::<bool>(), threads in 1usize..3, seed in any::<u64>()) {
        let fields = if gated { 3 } else { 2 };
        let stride = fields * dim + pad;
        let mut s = seed | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
        let vals: Vec<f32> = (0..n * stride).map(|_| ((next() % 64) as f32 - 32.0) / 32.0).collect();
        let rows: Vec<u16> = vals.iter().map(|&v| f32_to_f16_bits(v)).collect();
        let x: Vec<f32> = (0..dim).map(|_| ((next() % 16) as f32 - 8.0) / 8.0).collect();
        let bias: Vec<f32> = (0..n).map(|_| ((next() % 16) as f32 - 8.0) / 4.0).collect();
        let b = (with_bias && !gated).then_some(&bias[..]);
        let mut y = vec![f32::NAN; dim];
        f16_bundle_ffn(&rows, stride, n, gated, &x, b, &mut y, threads, None).unwrap();
        // the same sum over a picked subset (every third row, in reverse) equals the plain
        // sum over those rows
        let pick: Vec<u32> = (0..n as u32).rev().filter(|i| i % 3 != 1).collect();
        let mut yp = vec![f32::NAN; dim];
        f16_bundle_ffn(&rows, stride, n, gated, &x, b, &mut yp, threads, Some(&pick)).unwrap();
        let mut want = vec![0f64; dim];
        let mut want_p = vec![0f64; dim];
        for i in 0..n {
            let f = |k: usize| -> f64 { (0..dim).map(|d| vals[i * stride + k * dim + d] as f64 * x[d] as f64).sum() };
            let h = if gated {
                let (g, u) = (f(0), f(1));
                g / (1.0 + (-g).exp()) * u
            } else {
                (f(0) + b.map_or(0.0, |b| b[i] as f64)).max(0.0)
            };
            for d in 0..dim {
                let v = h * vals[i * stride + (fields - 1) * dim + d] as f64;
                want[d] += v;
                if i % 3 != 1 {
                    want_p[d] += v;
                }
            }
        }
        for d in 0..dim {
            prop_assert!((y[d] as f64 - want[d]).abs() <= 1e-3 * (1.0 + want[d].abs()), "d {} got {} want {}", d, y[d], want[d]);
            prop_assert!((yp[d] as f64 - want_p[d]).abs() <= 1e-3 * (1.0 + want_p[d].abs()), "picked d {} got {} want {}", d, yp[d], want_p[d]);
        }
    }
}

proptest! {
    #[test]
    fn matvec_matches_a_plain_sum(n in 0usize..40, dim in 1usize..70, pad in 0usize..9, threads in 1usize..3,
                                  seed in any::<u64>()) {
        let stride = dim + pad;
        let mut s = seed | 1;
        let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
        let vals: Vec<f32> = (0..n * stride).map(|_| ((next() % 64) as f32 - 32.0) / 8.0).collect();
        let w: Vec<u16> = vals.iter().map(|&v| f32_to_f16_bits(v)).collect();
        let x: Vec<f32> = (0..dim).map(|_| ((next() % 32) as f32 - 16.0) / 4.0).collect();
        let mut y = vec![f32::NAN; n];
        f16_matvec(&w, stride, &x, &mut y, threads).unwrap();
        for o in 0..n {
            let want: f32 = (0..dim).map(|d| vals[o * stride + d] * x[d]).sum();
            prop_assert!((y[o] - want).abs() <= 1e-3 * (1.0 + want.abs()), "row {} got {} want {}", o, y[o], want);
        }
    }
}

/// A value in +-[0.25, 0.95] that is not a short binary fraction, so that sums of products
/// of them round: any change of summation order shows in the last bits.
fn inexact(k: usize, step: f32) -> f32 {
    let v = 0.25 + 0.7 * ((k as f32) * step).sin().abs();
    if k % 3 == 0 {
        -v
    } else {
        v
    }
}

#[test]
fn matvec_on_two_threads_is_bit_identical_to_one() {
    // inexact values: any change of summation order would show in the last bits
    let (n, dim) = (1031, 4096 + 13);
    let w: Vec<u16> = (0..n * dim).map(|k| f32_to_f16_bits(inexact(k, 0.618))).collect();
    let x: Vec<f32> = (0..dim).map(|d| ((d as f32) * 1.414).cos()).collect();
    let one = {
        let mut y = vec![0f32; n];
        f16_matvec(&w, dim, &x, &mut y, 1).unwrap();
        y
    };
    for _ in 0..20 {
        let mut y = vec![f32::NAN; n];
        f16_matvec(&w, dim, &x, &mut y, 2).unwrap();
        assert!(y.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn matvec_split_between_threads_equals_one_thread() {
    let (n, dim) = (1027, 4099); // odd sizes: a row tail, a 4-row tail, an uneven split
    let w: Vec<u16> = (0..n * dim).map(|k| f32_to_f16_bits(((k % 11) as f32 - 5.0) / 4.0)).collect();
    let x: Vec<f32> = (0..dim).map(|d| ((d % 5) as f32 - 2.0) / 2.0).collect();
    let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
    f16_matvec(&w, dim, &x, &mut a, 1).unwrap();
    f16_matvec(&w, dim, &x, &mut b, 2).unwrap();
    assert_eq!(a, b);
    assert!(f16_matvec(&w[..n * dim - 1], dim, &x, &mut a, 1).is_err());
}

#[test]
fn rejects_a_picked_row_out_of_range() {
    let mut y = vec![0f32; 2];
    let rows = [0u16; 8];
    let e = f16_bundle_ffn(&rows, 4, 2, false, &[1.0, 1.0], None, &mut y, 1, Some(&[0, 2])).unwrap_err();
    assert!(e.to_string().contains("picked row 2 of 2"), "{e}");
}

#[test]
fn bundle_ffn_on_two_threads_is_deterministic() {
    // inexact values; the ranges and the final sum's order are fixed, whichever thread runs them
    let (n, dim) = (1500, 1024);
    let rows: Vec<u16> = (0..n * 2 * dim).map(|k| f32_to_f16_bits(inexact(k, 0.377) / 8.0)).collect();
    let x: Vec<f32> = (0..dim).map(|d| ((d as f32) * 0.91).cos()).collect();
    let run = |threads| {
        let mut y = vec![f32::NAN; dim];
        f16_bundle_ffn(&rows, 2 * dim, n, false, &x, None, &mut y, threads, None).unwrap();
        y
    };
    let (one, first) = (run(1), run(2));
    for (a, b) in one.iter().zip(&first) {
        assert!((a - b).abs() <= 1e-3 * (1.0 + a.abs()), "{a} vs {b}");
    }
    for _ in 0..20 {
        assert!(run(2).iter().zip(&first).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
fn two_threads_equal_one() {
    let (n, dim) = (3000, 1024);
    let rows: Vec<u16> = (0..n * dim).map(|k| f32_to_f16_bits(((k % 13) as f32 - 6.0) / 4.0)).collect();
    let h: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) / 2.0).collect();
    let (mut a, mut b) = (vec![0f32; dim], vec![0f32; dim]);
    f16_rows_gemv(&rows, dim, &h, &mut a, 1).unwrap();
    f16_rows_gemv(&rows, dim, &h, &mut b, 2).unwrap();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-3 * (1.0 + x.abs()));
    }
}
