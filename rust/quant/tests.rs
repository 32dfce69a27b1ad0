//! quant tests: the block layouts on hand-made blocks, the AVX2 kernels against the portable ones,
//! the products (matvec, the bundle FFN with its down scales) against a float64 sum over values
//! decoded here (both paths, one and two threads),
//! and bad arguments.

use super::*;
use proptest::prelude::*;

const KINDS: [QType; 3] = [QType::Q8_0, QType::Q4_0, QType::Q4_1];
const PATHS: [Simd; 2] = [Simd::Portable, Simd::Avx2];

/// f32 -> float16 bits for normal values, truncating (the tests only need some valid scale).
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    if x == 0.0 {
        return sign;
    }
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    sign | ((exp as u16) << 10) | ((b >> 13) & 0x3ff) as u16
}

pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [-1, 1).
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next() % 2048) as f32 / 1024.0 - 1.0
    }
}

/// `blocks` random blocks of `kind`: random quants, scales of magnitude 0.01 to 0.1, either sign.
pub(crate) fn random_blocks(kind: QType, blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks * kind.block_bytes());
    for _ in 0..blocks {
        let scale = |rng: &mut Rng| {
            let u = rng.unit();
            f16_bits((0.01 + 0.09 * u.abs()).copysign(u)).to_le_bytes()
        };
        out.extend_from_slice(&scale(rng));
        if kind == QType::Q4_1 {
            out.extend_from_slice(&scale(rng));
        }
        let quants = if kind == QType::Q8_0 { BLOCK } else { BLOCK / 2 };
        out.extend((0..quants).map(|_| rng.next() as u8));
    }
    out
}

/// `n` bundles in crate::quant::bundle's layout (random gate/up blocks, down integers and groups
/// below `groups`), each followed by `pad` bytes: (bytes, stride).
fn random_bundles(
    kind: QType,
    n: usize,
    gated: bool,
    dim: usize,
    groups: usize,
    pad: usize,
    rng: &mut Rng,
) -> (Vec<u8>, usize) {
    let lay = bundle::Layout::new(kind, dim, gated).unwrap();
    let mut out = vec![];
    for _ in 0..n {
        out.extend(random_blocks(kind, lay.rows * dim / BLOCK, rng));
        out.extend((0..lay.down).map(|_| rng.next() as u8));
        out.extend(((rng.next() % groups as u64) as u32).to_le_bytes());
        out.extend((0..pad).map(|_| rng.next() as u8));
    }
    (out, lay.bytes() + pad)
}

/// A layer's random down scales (magnitude 0.01 to 0.1, either sign), `groups` x `dim`, and
/// minimums for q4_1.
fn random_scales(kind: QType, groups: usize, dim: usize, rng: &mut Rng) -> (Vec<u16>, Option<Vec<u16>>) {
    let mut one = || {
        let u = rng.unit();
        f16_bits((0.01 + 0.09 * u.abs()).copysign(u))
    };
    let d: Vec<u16> = (0..groups * dim).map(|_| one()).collect();
    let m = (kind == QType::Q4_1).then(|| (0..groups * dim).map(|_| one()).collect());
    (d, m)
}

/// A down field's values, decoded here from the layout's definition (float64).
fn down_values(kind: QType, q: &[u8], d: &[u16], m: Option<&[u16]>) -> Vec<f64> {
    (0..d.len())
        .map(|r| {
            let raw = match kind {
                QType::Q8_0 => q[r] as i8 as f64,
                _ => {
                    let byte = q[r / 32 * 16 + r % 16];
                    let nib = if r % 32 < 16 { byte & 15 } else { byte >> 4 };
                    nib as f64 - if kind == QType::Q4_0 { 8.0 } else { 0.0 }
                }
            };
            crate::gemv::f16_to_f32(d[r]) as f64 * raw + m.map_or(0.0, |m| crate::gemv::f16_to_f32(m[r]) as f64)
        })
        .collect()
}

pub(crate) fn values(kind: QType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / kind.block_bytes() * BLOCK];
    q_dequantize_on(Simd::Portable, kind, bytes, &mut out).unwrap();
    out
}

fn dot64(a: &[f32], x: &[f32]) -> f64 {
    a.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// |got - want| within `tol` of the largest |want| (the output's scale), element by element.
fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * scale, "{what}: [{i}] got {g}, want {w} (scale {scale})");
    }
}

#[test]
fn names_and_sizes() {
    for kind in KINDS {
        assert_eq!(QType::parse(kind.name()).unwrap(), kind);
    }
    assert_eq!([34, 18, 20], KINDS.map(|k| k.block_bytes()));
    assert!(QType::parse("q5_0").is_err());
    assert_eq!(QType::Q4_1.row_bytes(576).unwrap() * 3, 1_080);
    assert_eq!(QType::Q4_0.row_bytes(4096).unwrap() * 2, 4_608);
    assert_eq!(QType::Q8_0.row_bytes(4096).unwrap() * 2, 8_704);
    assert!(QType::Q8_0.row_bytes(33).is_err());
}

#[test]
fn block_layouts_on_hand_made_blocks() {
    let two = f16_bits(2.0).to_le_bytes();
    let half = f16_bits(0.5).to_le_bytes();
    // q8_0: d = 2, q = -16..16
    let mut b8 = two.to_vec();
    b8.extend((0..32).map(|j| (j as i8 - 16) as u8));
    // q4_0 / q4_1: byte j = (high j + 16 -> 15 - j % 16, low j -> j % 16)
    let nibbles: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let b40 = [&two[..], &nibbles].concat();
    let b41 = [&two[..], &half, &nibbles].concat();
    for simd in PATHS {
        let mut out = [0f32; 32];
        q_dequantize_on(simd, QType::Q8_0, &b8, &mut out).unwrap();
        assert!(out.iter().enumerate().all(|(j, &v)| v == 2.0 * (j as f32 - 16.0)), "{simd:?} {out:?}");
        let nib = |j: usize| if j < 16 { j as f32 } else { (31 - j) as f32 };
        q_dequantize_on(simd, QType::Q4_0, &b40, &mut out).unwrap();
        assert!(out.iter().enumerate().all(|(j, &v)| v == 2.0 * (nib(j) - 8.0)), "{simd:?} {out:?}");
        q_dequantize_on(simd, QType::Q4_1, &b41, &mut out).unwrap();
        assert!(out.iter().enumerate().all(|(j, &v)| v == 2.0 * nib(j) + 0.5), "{simd:?} {out:?}");
    }
}

#[test]
fn avx2_kernels_match_the_portable_ones() {
    let mut rng = Rng(7);
    for kind in KINDS {
        for blocks in [0, 1, 3, 18, 128] {
            let row = random_blocks(kind, blocks, &mut rng);
            let x: Vec<f32> = (0..blocks * BLOCK).map(|_| rng.unit()).collect();
            let (s, v) = (Kernels::new(kind, Simd::Portable), Kernels::new(kind, Simd::Avx2));
            let terms: f32 = values(kind, &row).iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
            let (ds, dv) = (s.dot(&row, &s.prepare(&x)), v.dot(&row, &v.prepare(&x)));
            assert!((ds - dv).abs() <= 1e-5 * (terms + 1e-6), "{kind:?} {blocks}: {ds} vs {dv}");
            // a down field's raw integers (the row's bytes after its first scale), then a flush
            let q = &row[..bundle::down_bytes(kind, x.len()).min(row.len())];
            let (d, m) = random_scales(kind, 1, x.len(), &mut rng);
            let (mut ys, mut yv) = (x.clone(), x.clone());
            for (k, y) in [(s, &mut ys), (v, &mut yv)] {
                let mut t = x.iter().map(|v| v * 0.5).collect::<Vec<_>>();
                k.down_acc(-0.75, q, &mut t);
                k.down_flush(&d, m.as_deref(), &t, 1.25, y);
            }
            for (a, b) in ys.iter().zip(&yv) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{kind:?} down {a} vs {b}");
            }
            let (mut os, mut ov) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            s.dequantize(&row, &mut os);
            v.dequantize(&row, &mut ov);
            for (a, b) in os.iter().zip(&ov) {
                assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-6), "{kind:?} dequantize {a} vs {b}");
            }
        }
    }
}

#[test]
fn matvec_matches_a_float64_sum_on_both_paths_and_splits() {
    let mut rng = Rng(11);
    // 1024 x 2048 reaches SPLIT_MACS, so two threads split it.
    for (rows, cols) in [(1, 32), (7, 96), (37, 576), (1024, 2048)] {
        for kind in KINDS {
            let w = random_blocks(kind, rows * cols / BLOCK, &mut rng);
            let x: Vec<f32> = (0..cols).map(|_| rng.unit()).collect();
            let vals = values(kind, &w);
            let want: Vec<f64> = vals.chunks_exact(cols).map(|r| dot64(r, &x)).collect();
            let mut first: Option<Vec<f32>> = None;
            for simd in PATHS {
                for threads in [1, 2] {
                    let mut y = vec![f32::NAN; rows];
                    q_matvec_on(simd, kind, &w, rows, cols, &x, &mut y, threads).unwrap();
                    assert_close(&y, &want, 1e-4, &format!("{kind:?} {rows}x{cols} {simd:?} t{threads}"));
                    if simd == Simd::Avx2 || !avx2_available() {
                        // one path's results do not depend on the thread split
                        match &first {
                            Some(f) => assert_eq!(f, &y, "{kind:?} {rows}x{cols} split"),
                            None => first = Some(y),
                        }
                    }
                }
            }
        }
    }
}

/// A bundle's float64 values, fields `[gate,] up, down` (float64 sums over the blocks'
/// dequantized values and `down_values`).
fn bundle_values(kind: QType, b: &[u8], gated: bool, dim: usize, d: &[u16], m: Option<&[u16]>) -> Vec<Vec<f64>> {
    let lay = bundle::Layout::new(kind, dim, gated).unwrap();
    let mut out: Vec<Vec<f64>> = (0..lay.rows)
        .map(|f| values(kind, &b[f * lay.field..][..lay.field]).iter().map(|&v| v as f64).collect())
        .collect();
    let at = lay.bytes() - 4;
    let g = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
    let rows = g * dim..(g + 1) * dim;
    out.push(down_values(kind, &b[lay.rows * lay.field..][..lay.down], &d[rows.clone()], m.map(|m| &m[rows])));
    out
}

/// The bundle FFN by float64 sums over `bundle_values`, and the size float32 rounding scales
/// with: the largest sum_i m_i |down_i[r]|, m_i the size of h_i's terms (its dot products'
/// terms, not their sums): results are accurate relative to that, not to themselves when terms
/// cancel.
#[allow(clippy::too_many_arguments)]
fn ffn_reference(
    kind: QType,
    bundles: &[u8],
    stride: usize,
    gated: bool,
    x: &[f32],
    bias: Option<&[f32]>,
    sc: (&[u16], Option<&[u16]>),
    rows: &[usize],
) -> (Vec<f64>, f64) {
    let dim = x.len();
    let dot = |a: &[f64]| a.iter().zip(x).map(|(&a, &b)| a * b as f64).sum::<f64>();
    let abs_dot = |a: &[f64]| a.iter().zip(x).map(|(&a, &b)| (a * b as f64).abs()).sum::<f64>();
    let mut y = vec![0f64; dim];
    let mut mag = vec![0f64; dim];
    for &i in rows {
        let f = bundle_values(kind, &bundles[i * stride..], gated, dim, sc.0, sc.1);
        // h, and the size of what its rounding scales with (the dots' terms, not their sums)
        let (h, hm) = if gated {
            let (g, u) = (dot(&f[0]), dot(&f[1]));
            let s = g / (1.0 + (-g).exp());
            (s * u, s.abs() * abs_dot(&f[1]) + 1.1 * u.abs() * abs_dot(&f[0]))
        } else {
            let b = bias.map_or(0.0, |b| b[i] as f64);
            let u = dot(&f[0]) + b;
            (u.max(0.0), abs_dot(&f[0]) + b.abs())
        };
        y.iter_mut().zip(&f[f.len() - 1]).for_each(|(a, &d)| *a += h * d);
        mag.iter_mut().zip(&f[f.len() - 1]).for_each(|(a, &d)| *a += hm * d.abs());
    }
    (y, mag.iter().fold(0f64, |m, &v| m.max(v)))
}

/// |got - want| within `tol` of `scale` (and of the largest |want|), element by element.
fn assert_near(got: &[f32], want: &[f64], scale: f64, tol: f64, what: &str) {
    let s = want.iter().fold(scale.max(1e-6), |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * s, "{what}: [{i}] got {g}, want {w} (scale {s})");
    }
}

#[test]
fn bundle_ffn_matches_a_float64_sum_on_both_paths_and_splits() {
    let mut rng = Rng(5);
    // (n, dim, groups, pad): the last reaches SPLIT_MACS for both layouts.
    for (n, dim, groups, pad) in [(1, 32, 1, 0), (9, 64, 3, 3), (40, 576, 2, 0), (1024, 1024, 32, 16)] {
        for kind in KINDS {
            for gated in [false, true] {
                let (bundles, stride) = random_bundles(kind, n, gated, dim, groups, pad, &mut rng);
                let (d, m) = random_scales(kind, groups, dim, &mut rng);
                let sc = bundle::DownScales { d: &d, m: m.as_deref() };
                let x: Vec<f32> = (0..dim).map(|_| rng.unit()).collect();
                let bias: Option<Vec<f32>> = (!gated).then(|| (0..n).map(|_| 0.2 * rng.unit()).collect());
                let pick: Vec<u32> = (0..n as u32).rev().step_by(3).collect();
                for (p, rows) in
                    [(None, (0..n).collect::<Vec<_>>()), (Some(&pick[..]), pick.iter().map(|&i| i as usize).collect())]
                {
                    let (want, mag) =
                        ffn_reference(kind, &bundles, stride, gated, &x, bias.as_deref(), (&d, m.as_deref()), &rows);
                    let mut first: Option<Vec<f32>> = None;
                    for simd in PATHS {
                        for threads in [1, 2] {
                            let mut y = vec![f32::NAN; dim];
                            let what =
                                format!("{kind:?} n{n} D{dim} gated {gated} pick {} {simd:?} t{threads}", p.is_some());
                            bundle::q_bundle_ffn_on(
                                simd,
                                kind,
                                &bundles,
                                stride,
                                n,
                                gated,
                                &x,
                                bias.as_deref(),
                                sc,
                                &mut y,
                                threads,
                                p,
                            )
                            .unwrap();
                            assert_near(&y, &want, mag, 1e-4, &what);
                            if threads == 2 && (simd == Simd::Avx2 || !avx2_available()) {
                                match &first {
                                    Some(f) => assert_eq!(f, &y, "{what}: two runs differ"),
                                    None => first = Some(y),
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bundle_dequantize_matches_the_layout() {
    let mut rng = Rng(11);
    for kind in KINDS {
        for gated in [false, true] {
            let (n, dim, groups) = (7, 96, 4);
            let (bundles, stride) = random_bundles(kind, n, gated, dim, groups, 5, &mut rng);
            let (d, m) = random_scales(kind, groups, dim, &mut rng);
            let fields = if gated { 3 } else { 2 };
            let mut out = vec![f32::NAN; n * fields * dim];
            let sc = bundle::DownScales { d: &d, m: m.as_deref() };
            bundle::q_bundle_dequantize(kind, &bundles, stride, n, gated, dim, sc, &mut out).unwrap();
            let want: Vec<f64> = (0..n)
                .flat_map(|i| bundle_values(kind, &bundles[i * stride..], gated, dim, &d, m.as_deref()).concat())
                .collect();
            for (j, (&g, &w)) in out.iter().zip(&want).enumerate() {
                assert!((g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()), "{kind:?} gated {gated} value {j}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn empty_inputs() {
    for kind in KINDS {
        let mut y: Vec<f32> = vec![];
        q_matvec(kind, &[], 0, 64, &[0.5; 64], &mut y, 2).unwrap();
        let (d, m) = random_scales(kind, 1, 64, &mut Rng(3));
        let sc = bundle::DownScales { d: &d, m: m.as_deref() };
        let mut y = vec![f32::NAN; 64];
        bundle::q_bundle_ffn(kind, &[], 0, 0, true, &[0.5; 64], None, sc, &mut y, 2, None).unwrap();
        assert!(y.iter().all(|&v| v == 0.0));
        let (row, stride) = random_bundles(kind, 1, false, 64, 1, 0, &mut Rng(3));
        let mut y = vec![f32::NAN; 64];
        bundle::q_bundle_ffn(kind, &row, stride, 1, false, &[0.5; 64], None, sc, &mut y, 2, Some(&[])).unwrap();
        assert!(y.iter().all(|&v| v == 0.0));
        q_dequantize(kind, &[], &mut []).unwrap();
    }
}

fn message(r: Result<()>) -> String {
    match r {
        Err(Error::Invalid { what }) => what,
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

#[test]
fn rejects_bad_arguments() {
    let k = QType::Q4_0;
    let w = vec![0u8; 2 * 36];
    let x = [0.5f32; 64];
    let mut y = [0f32; 2];
    assert!(message(q_matvec(k, &w, 2, 60, &x[..60], &mut y, 1)).contains("whole number"));
    assert!(message(q_matvec(k, &w, 2, 64, &x[..32], &mut y, 1)).contains("x of 32"));
    assert!(message(q_matvec(k, &w, 3, 64, &x, &mut [0f32; 3], 1)).contains("72 given"));
    assert!(message(q_matvec(k, &w[..71], 2, 64, &x, &mut y, 1)).contains("71 given"));
    assert!(q_matvec(k, &w, 2, 64, &x, &mut y, 1).is_ok());

    // q4_0 plain bundles of 64 values: 36 B up, 32 B down, 4 B group = 72 B.
    let b = vec![0u8; 3 * 72];
    let mut y = [0f32; 64];
    let d = vec![0u16; 2 * 64];
    let sc = bundle::DownScales { d: &d, m: None };
    let ffn = |b: &[u8], stride, n, gated, bias: Option<&[f32]>, y: &mut [f32], pick: Option<&[u32]>| {
        message(bundle::q_bundle_ffn(k, b, stride, n, gated, &x, bias, sc, y, 1, pick))
    };
    assert!(ffn(&b, 72, 3, false, None, &mut y, Some(&[0, 3])).contains("picked bundle 3 of 3"));
    assert!(ffn(&b, 72, 3, true, None, &mut y, None).contains("need more"));
    assert!(ffn(&b, 60, 3, false, None, &mut y, None).contains("at stride 60"));
    assert!(ffn(&b[..215], 72, 3, false, None, &mut y, None).contains("215 given"));
    assert!(ffn(&b, 72, 3, false, Some(&[0.0; 2]), &mut y, None).contains("bias Some(2)"));
    assert!(ffn(&b, 108, 2, true, Some(&[0.0; 2]), &mut y, None).contains("gated true"));
    assert!(ffn(&b, 72, 3, false, None, &mut y[..32], None).contains("y 32"));
    let ok = |sc| bundle::q_bundle_ffn(k, &b, 72, 3, false, &x, Some(&[0.0; 3]), sc, &mut [0f32; 64], 1, Some(&[2, 0]));
    assert!(ok(sc).is_ok());
    assert!(message(ok(bundle::DownScales { d: &d[..100], m: None })).contains("not whole rows of 64"));
    assert!(message(ok(bundle::DownScales { d: &d, m: Some(&d) })).contains("down minimums Some(128)"));
    let mut far = b.clone();
    far[72 + 68..72 + 72].copy_from_slice(&2u32.to_le_bytes()); // bundle 1 names group 2 of 2
    assert!(message(bundle::q_bundle_ffn(k, &far, 72, 3, false, &x, None, sc, &mut y, 1, None))
        .contains("bundle 1 names down group 2, but the layer has 2"));
    let q41 = bundle::DownScales { d: &d, m: None };
    let b41 = vec![0u8; 3 * 76];
    assert!(message(bundle::q_bundle_ffn(QType::Q4_1, &b41, 76, 3, false, &x, None, q41, &mut y, 1, None))
        .contains("down minimums None"));
    assert!(message(bundle::q_bundle_ffn(k, &b, 72, 3, false, &x[..40], None, sc, &mut y[..40], 1, None))
        .contains("whole number"));
    let mut out = vec![0f32; 3 * 2 * 64];
    assert!(bundle::q_bundle_dequantize(k, &b, 72, 3, false, 64, sc, &mut out).is_ok());
    assert!(message(bundle::q_bundle_dequantize(k, &b, 72, 3, false, 64, sc, &mut out[1..])).contains("into 383"));

    assert!(message(q_dequantize(k, &w[..35], &mut [0f32; 32])).contains("not 35"));
    assert!(message(q_dequantize(k, &w, &mut [0f32; 48])).contains("whole number"));
}

#[test]
fn portable_switch() {
    // The only test that touches the process-wide switch (the others choose a path per call).
    let before = set_portable(true);
    assert_eq!(simd(), Simd::Portable);
    set_portable(false);
    assert_eq!(simd() == Simd::Avx2, avx2_available());
    set_portable(before);
}

proptest! {
    #[test]
    fn both_paths_agree_on_any_shape(kind in 0usize..3, n in 0usize..12, blocks in 1usize..6, pad in 0usize..40,
                                     groups in 1usize..4, gated in any::<bool>(), seed in any::<u64>()) {
        let kind = KINDS[kind];
        let mut rng = Rng(seed | 1);
        let dim = blocks * BLOCK;
        let (bundles, stride) = random_bundles(kind, n, gated, dim, groups, pad, &mut rng);
        let (d, m) = random_scales(kind, groups, dim, &mut rng);
        let x: Vec<f32> = (0..dim).map(|_| rng.unit()).collect();
        let rows: Vec<usize> = (0..n).collect();
        let (want, mag) = ffn_reference(kind, &bundles, stride, gated, &x, None, (&d, m.as_deref()), &rows);
        for simd in PATHS {
            let mut y = vec![f32::NAN; dim];
            let sc = bundle::DownScales { d: &d, m: m.as_deref() };
            bundle::q_bundle_ffn_on(simd, kind, &bundles, stride, n, gated, &x, None, sc, &mut y, 1, None).unwrap();
            assert_near(&y, &want, mag, 1e-4, &format!("{kind:?} {simd:?}"));
        }
    }
}

#[test]
fn rounded_x_keeps_non_finite_values_and_zero_blocks() {
    let mut rng = Rng(23);
    for kind in KINDS {
        let row = random_blocks(kind, 3, &mut rng);
        let mut x: Vec<f32> = (0..96).map(|_| rng.unit()).collect();
        x[32..64].iter_mut().for_each(|v| *v = 0.0); // a zero block: scale 0, no NaN from 0/0
        for simd in PATHS {
            let k = Kernels::new(kind, simd);
            let want: f64 = values(kind, &row).iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let got = k.dot(&row, &k.prepare(&x)) as f64;
            let terms: f64 = values(kind, &row).iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
            assert!((got - want).abs() <= 1e-4 * terms, "{kind:?} {simd:?}: {got} vs {want}");
            for bad in [f32::NAN, f32::INFINITY] {
                let mut xb = x.clone();
                xb[70] = bad;
                assert!(k.dot(&row, &k.prepare(&xb)).is_nan(), "{kind:?} {simd:?}: {bad} in x");
            }
        }
    }
}

#[test]
fn rounded_x_is_within_its_bound_beside_an_outlier() {
    // a block with one value 1000x the others: each value is off by at most 1/65534 of the
    // block's largest, so the product is off by at most sum_j |w_j| amax / 65534
    let mut rng = Rng(29);
    for kind in KINDS {
        let row = random_blocks(kind, 4, &mut rng);
        let mut x: Vec<f32> = (0..128).map(|_| 0.01 * rng.unit()).collect();
        x[5] = 10.0;
        let vals = values(kind, &row);
        let want: f64 = vals.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let bound: f64 = vals
            .chunks_exact(BLOCK)
            .zip(x.chunks_exact(BLOCK))
            .map(|(w, xb)| {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                w.iter().map(|&v| (v as f64).abs()).sum::<f64>() * amax / 65534.0
            })
            .sum();
        for simd in PATHS {
            let k = Kernels::new(kind, simd);
            let got = k.dot(&row, &k.prepare(&x)) as f64;
            assert!((got - want).abs() <= bound * 1.01 + 1e-5 * want.abs(), "{kind:?} {simd:?}: {got} vs {want}");
        }
    }
}

#[test]
fn rounded_x_keeps_tiny_blocks() {
    // a block whose largest value is far below 1e-34 (32767 / amax would overflow): still
    // within its bound, not reduced to signs
    let mut rng = Rng(31);
    for kind in KINDS {
        let row = random_blocks(kind, 1, &mut rng);
        let x: Vec<f32> = (0..32).map(|_| 1e-36 * rng.unit()).collect();
        let vals = values(kind, &row);
        let want: f64 = vals.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
        let terms: f64 = vals.iter().zip(&x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
        for simd in PATHS {
            let k = Kernels::new(kind, simd);
            let got = k.dot(&row, &k.prepare(&x)) as f64;
            assert!((got - want).abs() <= 1e-3 * terms, "{kind:?} {simd:?}: {got} vs {want}");
        }
    }
}
