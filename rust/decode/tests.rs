//! attn_step against a float64 reference written out here from the dequantized weights.

use super::*;
use crate::quant::tests::{random_blocks, values, Rng};

const KINDS: [QType; 3] = [QType::Q8_0, QType::Q4_0, QType::Q4_1];

struct Case {
    kind: QType,
    dim: usize,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    w: [Vec<u8>; 4],
    norms: [Vec<f32>; 2],
    bias: [Option<Vec<f32>>; 4],
    qk_norm: [Option<Vec<f32>>; 2],
}

fn vec_of(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.unit()).collect()
}

impl Case {
    fn new(kind: QType, extras: bool, rng: &mut Rng) -> Case {
        let (dim, heads, kv_heads, hd) = (64, 4, 2, 16);
        let (hq, hkv) = (heads * hd, kv_heads * hd);
        let blocks = |rows: usize, cols: usize, rng: &mut Rng| random_blocks(kind, rows * cols / 32, rng);
        let w = [blocks(hq, dim, rng), blocks(hkv, dim, rng), blocks(hkv, dim, rng), blocks(dim, hq, rng)];
        let norms = [vec_of(dim, rng), vec_of(dim, rng)];
        let opt = |n: usize, rng: &mut Rng| extras.then(|| vec_of(n, rng));
        let bias = [opt(hq, rng), opt(hkv, rng), opt(hkv, rng), opt(dim, rng)];
        let qk_norm = [opt(hd, rng), opt(hd, rng)];
        Case { kind, dim, heads, kv_heads, hd, w, norms, bias, qk_norm }
    }

    fn layer(&self) -> AttnLayer<'_> {
        AttnLayer {
            kind: self.kind,
            dim: self.dim,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.hd,
            eps: 1e-5,
            attn_norm: &self.norms[0],
            ffn_norm: &self.norms[1],
            q: &self.w[0],
            k: &self.w[1],
            v: &self.w[2],
            o: &self.w[3],
            bias: [0, 1, 2, 3].map(|i| self.bias[i].as_deref()),
            q_norm: self.qk_norm[0].as_deref(),
            k_norm: self.qk_norm[1].as_deref(),
        }
    }
}

fn norm64(x: &[f64], w: &[f32]) -> Vec<f64> {
    let r = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + 1e-5).sqrt();
    x.iter().zip(w).map(|(v, &w)| v * r * w as f64).collect()
}

fn matvec64(kind: QType, w: &[u8], cols: usize, x: &[f64], b: Option<&Vec<f32>>) -> Vec<f64> {
    let vals = values(kind, w);
    let mut y: Vec<f64> = vals.chunks_exact(cols).map(|r| r.iter().zip(x).map(|(&a, b)| a as f64 * b).sum()).collect();
    if let Some(b) = b {
        y.iter_mut().zip(b).for_each(|(y, &b)| *y += b as f64);
    }
    y
}

fn rope64(x: &mut [f64], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let old = x.to_vec();
    for i in 0..half {
        x[i] = old[i] * cos[i] as f64 - old[i + half] * sin[i] as f64;
        x[i + half] = old[i + half] * cos[i + half] as f64 + old[i] * sin[i + half] as f64;
    }
}

/// (x after the step, h, k row, v row) in float64.
fn reference(
    c: &Case,
    x: &[f32],
    pos: usize,
    rope: (&[f32], &[f32]),
    kc: &[f32],
    vc: &[f32],
    cap: usize,
) -> [Vec<f64>; 4] {
    let hd = c.hd;
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let n = norm64(&x64, &c.norms[0]);
    let mut q = matvec64(c.kind, &c.w[0], c.dim, &n, c.bias[0].as_ref());
    let mut k = matvec64(c.kind, &c.w[1], c.dim, &n, c.bias[1].as_ref());
    let v = matvec64(c.kind, &c.w[2], c.dim, &n, c.bias[2].as_ref());
    for (y, nw) in [(&mut q, &c.qk_norm[0]), (&mut k, &c.qk_norm[1])] {
        for head in y.chunks_exact_mut(hd) {
            if let Some(nw) = nw {
                let normed = norm64(head, nw);
                head.copy_from_slice(&normed);
            }
            rope64(head, rope.0, rope.1);
        }
    }
    let group = c.heads / c.kv_heads;
    let mut a = vec![0f64; c.heads * hd];
    for h in 0..c.heads {
        let g = h / group;
        let key = |t: usize| -> Vec<f64> {
            if t == pos {
                k[g * hd..(g + 1) * hd].to_vec()
            } else {
                kc[(g * cap + t) * hd..][..hd].iter().map(|&v| v as f64).collect()
            }
        };
        let val = |t: usize| -> Vec<f64> {
            if t == pos {
                v[g * hd..(g + 1) * hd].to_vec()
            } else {
                vc[(g * cap + t) * hd..][..hd].iter().map(|&v| v as f64).collect()
            }
        };
        let qh = &q[h * hd..(h + 1) * hd];
        let s: Vec<f64> =
            (0..=pos).map(|t| key(t).iter().zip(qh).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()).collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for (t, et) in e.iter().enumerate() {
            for (o, vv) in a[h * hd..(h + 1) * hd].iter_mut().zip(val(t)) {
                *o += et / z * vv;
            }
        }
    }
    let o = matvec64(c.kind, &c.w[3], c.heads * hd, &a, c.bias[3].as_ref());
    let x2: Vec<f64> = x64.iter().zip(&o).map(|(a, b)| a + b).collect();
    let h = norm64(&x2, &c.norms[1]);
    [x2, h, k, v]
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= 2e-4 * scale, "{what}[{i}]: {g} vs {w} (scale {scale})");
    }
    assert_eq!(got.len(), want.len(), "{what}: length");
}

#[test]
fn attn_step_matches_a_float64_reference() {
    let mut rng = Rng(0x9E3779B97F4A7C15);
    for kind in KINDS {
        for extras in [false, true] {
            for threads in [1, 2] {
                let c = Case::new(kind, extras, &mut rng);
                let (cap, pos) = (8, 5);
                let n_cache = c.kv_heads * cap * c.hd;
                let (mut kc, mut vc) = (vec_of(n_cache, &mut rng), vec_of(n_cache, &mut rng));
                let (cos, sin) = (vec_of(c.hd, &mut rng), vec_of(c.hd, &mut rng));
                let x0 = vec_of(c.dim, &mut rng);
                let want = reference(&c, &x0, pos, (&cos, &sin), &kc, &vc, cap);
                let (mut x, mut h) = (x0.clone(), vec![0f32; c.dim]);
                let at = Position { pos, rope: Some((&cos, &sin)) };
                attn_step(&c.layer(), &mut x, at, KvMut { k: &mut kc, v: &mut vc, capacity: cap }, threads, &mut h)
                    .unwrap();
                let what = format!("{} extras={extras} threads={threads}", kind.name());
                assert_close(&x, &want[0], &format!("{what} x"));
                assert_close(&h, &want[1], &format!("{what} h"));
                for g in 0..c.kv_heads {
                    let row = (g * cap + pos) * c.hd..(g * cap + pos + 1) * c.hd;
                    assert_close(&kc[row.clone()], &want[2][g * c.hd..(g + 1) * c.hd], &format!("{what} k"));
                    assert_close(&vc[row], &want[3][g * c.hd..(g + 1) * c.hd], &format!("{what} v"));
                }
            }
        }
    }
}

#[test]
fn attn_step_rejects_shapes_that_do_not_fit() {
    let mut rng = Rng(7);
    let c = Case::new(QType::Q8_0, false, &mut rng);
    let (cap, n) = (4, c.kv_heads * 4 * c.hd);
    let run = |layer: &AttnLayer, x_len: usize, pos: usize, cache: usize| {
        let (mut k, mut v) = (vec![0f32; cache], vec![0f32; cache]);
        let (mut x, mut h) = (vec![0f32; x_len], vec![0f32; c.dim]);
        let at = Position { pos, rope: None };
        match attn_step(layer, &mut x, at, KvMut { k: &mut k, v: &mut v, capacity: cap }, 1, &mut h) {
            Err(Error::Invalid { what }) => what,
            other => panic!("expected Invalid, got {other:?}"),
        }
    };
    assert!(run(&c.layer(), c.dim + 1, 0, n).contains("x 65"));
    assert!(run(&c.layer(), c.dim, cap, n).contains("position 4"));
    assert!(run(&c.layer(), c.dim, 0, n - 1).contains("key"));
    let mut short = c.layer();
    short.o = &c.w[3][1..];
    assert!(run(&short, c.dim, 0, n).contains("o has"));
    let mut odd = c.layer();
    odd.kv_heads = 3;
    assert!(run(&odd, c.dim, 0, n).contains("whole groups"));
    let bias = vec![0f32; 3];
    let mut b = c.layer();
    b.bias[1] = Some(&bias);
    assert!(run(&b, c.dim, 0, n).contains("k bias"));
}
