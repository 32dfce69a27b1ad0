//! Decode attention: one query position over a KV cache, read in the cache's own dtype.
//!
//! Why here: a decoder's KV cache is kept in the model's dtype (float16 for a float16 model);
//! torch on the CPU has no fast float16 attention, so the Python path upcast the whole cache to
//! float32 every token (and, for one token of a large model, ran it on one thread: see
//! python/llmflash/threads.py). This kernel reads each key and value row once, in float16 or
//! float32, accumulates in float32, and splits the KV heads between two threads when the work
//! pays for a thread.
//!
//! Layout (that of `KVCache` in python/llmflash/models/transformer.py): keys and values
//! (Hkv, capacity, hd) row-major, positions `0..len` filled; queries (Hq, hd) with Hq a multiple
//! of Hkv; query head h reads KV head h / (Hq / Hkv) (grouped-query attention).

use crate::error::{Error, Result};

/// Below this many multiply-adds one thread does the work (see crate::par for a join's cost).
const SPLIT_MACS: usize = 1 << 19;

/// One layer's keys and values: float16 bit patterns or float32, (Hkv, capacity, hd) each.
#[derive(Clone, Copy)]
pub enum KvCache<'a> {
    F16 { k: &'a [u16], v: &'a [u16] },
    F32 { k: &'a [f32], v: &'a [f32] },
}

impl KvCache<'_> {
    fn lens(&self) -> (usize, usize) {
        match self {
            KvCache::F16 { k, v } => (k.len(), v.len()),
            KvCache::F32 { k, v } => (k.len(), v.len()),
        }
    }
}

/// The shape of one decode attention call.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// Query heads (a multiple of `kv_heads`).
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Positions the cache has room for (its second dimension).
    pub capacity: usize,
    /// Positions attended to: `1..=capacity`.
    pub len: usize,
}

/// `out[h] = softmax(q[h] . K[g(h), :len] * scale) @ V[g(h), :len]` for every query head h, with
/// g(h) = h / (heads / kv_heads): q and out (heads * head_dim), the cache's k and v (kv_heads *
/// capacity * head_dim), row-major. `Error::Invalid` for shapes that do not fit the slices.
pub fn attend_one(q: &[f32], kv: KvCache, s: Shape, scale: f32, out: &mut [f32], threads: usize) -> Result<()> {
    let Shape { heads, kv_heads, head_dim: hd, capacity, len } = s;
    let cache = kv_heads.checked_mul(capacity).and_then(|n| n.checked_mul(hd));
    let (kn, vn) = kv.lens();
    let fits = kv_heads > 0
        && heads % kv_heads == 0
        && hd > 0
        && (1..=capacity).contains(&len)
        && q.len() == heads * hd
        && out.len() == heads * hd
        && cache.is_some_and(|n| n == kn && n == vn);
    if !fits {
        return Err(Error::invalid(format!(
            "attention over {len} of {capacity} positions with {heads} query and {kv_heads} KV heads of {hd}: \
             q has {}, out {}, keys {}, values {} values",
            q.len(),
            out.len(),
            kn,
            vn
        )));
    }
    let group = heads / kv_heads;
    // KV heads lo..hi into `out` (their query heads' outputs, (hi - lo) * group * hd values)
    let run = |lo: usize, hi: usize, out: &mut [f32]| {
        let mut scores = vec![0f32; len];
        for g in lo..hi {
            let rows = g * capacity * hd..(g * capacity + len) * hd; // this head's filled positions
            for j in 0..group {
                let h = g * group + j;
                let (qh, o) = (&q[h * hd..(h + 1) * hd], &mut out[(h - lo * group) * hd..(h + 1 - lo * group) * hd]);
                match kv {
                    KvCache::F16 { k, v } => head(&k[rows.clone()], &v[rows.clone()], qh, scale, &mut scores, o),
                    KvCache::F32 { k, v } => head(&k[rows.clone()], &v[rows.clone()], qh, scale, &mut scores, o),
                }
            }
        }
    };
    if threads < 2 || kv_heads < 2 || 2 * heads * len * hd < SPLIT_MACS {
        run(0, kv_heads, out);
    } else {
        let half = kv_heads / 2;
        let (first, second) = out.split_at_mut(half * group * hd);
        let run = &run;
        crate::par::join(|| run(0, half, first), move || run(half, kv_heads, second));
    }
    Ok(())
}

/// In place: `x = exp(x - max) / sum`, as torch.softmax computes it in float32.
fn softmax(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// A cache element: float16 bits or float32.
trait Elem: Copy {
    fn get(self) -> f32;
    /// Eight elements from `p` as float32 lanes.
    ///
    /// # Safety
    /// Eight elements from `p` are readable, and the CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for u16 {
    fn get(self) -> f32 {
        crate::gemv::f16_to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable elements (an unaligned load) and F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

impl Elem for f32 {
    fn get(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable elements (an unaligned load) and AVX.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

/// One query head over its KV head's filled rows: `k`, `v` (len * hd), `q`, `out` (hd),
/// `scores` (len) scratch.
fn head<K: Elem, V: Elem>(k: &[K], v: &[V], q: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked just above); head_avx2 checks
            // its own bounds.
            unsafe { head_avx2(k, v, q, scale, scores, out) };
            return;
        }
    }
    let hd = q.len();
    for (p, s) in scores.iter_mut().enumerate() {
        *s = k[p * hd..(p + 1) * hd].iter().zip(q).map(|(&a, &b)| a.get() * b).sum::<f32>() * scale;
    }
    softmax(scores);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (p, &w) in scores.iter().enumerate() {
        v[p * hd..(p + 1) * hd].iter().zip(out.iter_mut()).for_each(|(&a, o)| *o += w * a.get());
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn head_avx2<K: Elem, V: Elem>(k: &[K], v: &[V], q: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (hd, len) = (q.len(), scores.len());
    assert!(k.len() >= len * hd && v.len() >= len * hd && out.len() == hd);
    let body = hd - hd % 8;
    // four key rows at a time: four independent FMA chains
    let mut p = 0;
    while p < len {
        let n = (len - p).min(4);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut d = 0;
        while d < body {
            // SAFETY: d + 8 <= body <= hd = q.len(), and row p + i < len has hd elements from
            // (p + i) * hd inside k (asserted above): every 8-lane read is in bounds.
            unsafe {
                let x = _mm256_loadu_ps(q.as_ptr().add(d));
                for (i, a) in acc.iter_mut().enumerate().take(n) {
                    *a = _mm256_fmadd_ps(K::load8(k.as_ptr().add((p + i) * hd + d)), x, *a);
                }
            }
            d += 8;
        }
        for (i, a) in acc.iter().enumerate().take(n) {
            let tail: f32 = (body..hd).map(|d| k[(p + i) * hd + d].get() * q[d]).sum();
            scores[p + i] = (hsum(*a) + tail) * scale;
        }
        p += n;
    }
    softmax(scores);
    out.iter_mut().for_each(|o| *o = 0.0);
    // four value rows per pass over `out`: a quarter of the loads and stores of the accumulator
    let mut p = 0;
    while p + 4 <= len {
        let r = |i: usize| &v[(p + i) * hd..(p + i + 1) * hd];
        let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
        let w = |i: usize| _mm256_set1_ps(scores[p + i]);
        let (w0, w1, w2, w3) = (w(0), w(1), w(2), w(3));
        let mut d = 0;
        while d < body {
            // SAFETY: d + 8 <= body <= hd = each row's length = out.len(): every 8-lane access is
            // in bounds (unaligned loads and stores).
            unsafe {
                let mut o = _mm256_loadu_ps(out.as_ptr().add(d));
                o = _mm256_fmadd_ps(w0, V::load8(r0.as_ptr().add(d)), o);
                o = _mm256_fmadd_ps(w1, V::load8(r1.as_ptr().add(d)), o);
                o = _mm256_fmadd_ps(w2, V::load8(r2.as_ptr().add(d)), o);
                o = _mm256_fmadd_ps(w3, V::load8(r3.as_ptr().add(d)), o);
                _mm256_storeu_ps(out.as_mut_ptr().add(d), o);
            }
            d += 8;
        }
        for d in body..hd {
            out[d] += scores[p] * r0[d].get()
                + scores[p + 1] * r1[d].get()
                + scores[p + 2] * r2[d].get()
                + scores[p + 3] * r3[d].get();
        }
        p += 4;
    }
    for p in p..len {
        let (row, w) = (&v[p * hd..(p + 1) * hd], scores[p]);
        row.iter().zip(out.iter_mut()).for_each(|(&a, o)| *o += w * a.get());
    }
}

/// The eight lanes' sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook computation in f64 (repeat the KV heads, then softmax(q k^T) v).
    fn reference(q: &[f32], k: &[f32], v: &[f32], s: Shape, scale: f32) -> Vec<f64> {
        let (hd, group) = (s.head_dim, s.heads / s.kv_heads);
        let mut out = vec![0f64; s.heads * hd];
        for h in 0..s.heads {
            let row = |p: usize| (h / group * s.capacity + p) * hd;
            let sc: Vec<f64> = (0..s.len)
                .map(|p| (0..hd).map(|d| q[h * hd + d] as f64 * k[row(p) + d] as f64).sum::<f64>() * scale as f64)
                .collect();
            let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for p in 0..s.len {
                for d in 0..hd {
                    out[h * hd + d] += e[p] / z * v[row(p) + d] as f64;
                }
            }
        }
        out
    }

    fn f16_bits(x: f32) -> u16 {
        // exact for the values used (multiples of 1/8 in [-4, 4])
        let b = x.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        if x == 0.0 {
            return sign;
        }
        let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
        sign | ((exp as u16) << 10) | ((b >> 13) & 0x3ff) as u16
    }

    proptest! {
        #[test]
        fn matches_the_textbook_computation(kv_heads in 1usize..5, group in 1usize..4, hd in 1usize..40,
                                            capacity in 1usize..50, len_frac in 0.0f64..1.0, half in any::<bool>(),
                                            threads in 1usize..3, seed in any::<u64>()) {
            let len = 1 + ((capacity - 1) as f64 * len_frac) as usize;
            let s = Shape { heads: kv_heads * group, kv_heads, head_dim: hd, capacity, len };
            let mut r = seed | 1;
            let mut next = || { r ^= r << 13; r ^= r >> 7; r ^= r << 17; ((r % 65) as f32 - 32.0) / 8.0 };
            let q: Vec<f32> = (0..s.heads * hd).map(|_| next()).collect();
            let n = kv_heads * capacity * hd;
            let k: Vec<f32> = (0..n).map(|_| next()).collect();
            let v: Vec<f32> = (0..n).map(|_| next()).collect();
            let (kb, vb): (Vec<u16>, Vec<u16>) = (k.iter().map(|&x| f16_bits(x)).collect(), v.iter().map(|&x| f16_bits(x)).collect());
            prop_assert!(kb.iter().zip(&k).all(|(&b, &x)| crate::gemv::f16_to_f32(b) == x));
            let kv = if half { KvCache::F16 { k: &kb, v: &vb } } else { KvCache::F32 { k: &k, v: &v } };
            let scale = 1.0 / (hd as f32).sqrt();
            let mut out = vec![f32::NAN; s.heads * hd];
            attend_one(&q, kv, s, scale, &mut out, threads).unwrap();
            let want = reference(&q, &k, &v, s, scale);
            for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
                prop_assert!((o as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{} got {} want {}", i, o, w);
            }
        }
    }

    #[test]
    fn two_threads_equal_one() {
        let s = Shape { heads: 32, kv_heads: 32, head_dim: 128, capacity: 300, len: 257 };
        let n = s.kv_heads * s.capacity * s.head_dim;
        let k: Vec<u16> = (0..n).map(|i| f16_bits(((i % 17) as f32 - 8.0) / 8.0)).collect();
        let v: Vec<u16> = (0..n).map(|i| f16_bits(((i % 13) as f32 - 6.0) / 8.0)).collect();
        let q: Vec<f32> = (0..s.heads * s.head_dim).map(|i| ((i % 7) as f32 - 3.0) / 16.0).collect();
        let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
        attend_one(&q, KvCache::F16 { k: &k, v: &v }, s, 0.1, &mut a, 1).unwrap();
        attend_one(&q, KvCache::F16 { k: &k, v: &v }, s, 0.1, &mut b, 2).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_shapes_that_do_not_fit() {
        let s = Shape { heads: 4, kv_heads: 2, head_dim: 2, capacity: 3, len: 3 };
        let (q, kv) = (vec![0f32; 8], vec![0f32; 12]);
        let mut out = vec![0f32; 8];
        assert!(attend_one(&q, KvCache::F32 { k: &kv, v: &kv }, s, 1.0, &mut out, 1).is_ok());
        for bad in [
            Shape { len: 0, ..s },
            Shape { len: 4, ..s },
            Shape { heads: 3, ..s },
            Shape { kv_heads: 0, ..s },
            Shape { capacity: 4, len: 1, ..s },
        ] {
            assert!(attend_one(&q, KvCache::F32 { k: &kv, v: &kv }, bad, 1.0, &mut out, 1).is_err(), "{bad:?}");
        }
        let e = attend_one(&q, KvCache::F32 { k: &kv, v: &kv[..11] }, s, 1.0, &mut out, 1).unwrap_err();
        assert!(e.to_string().contains("values 11 values"), "{e}");
    }
}
