//! Planner tests: merging and bridging, unaligned bundles, whole-region plans, errors, gathers, and properties of plans over random profiles.

use super::*;
use proptest::prelude::*;

fn region(n: u32, bb: u64) -> Region {
    Region { offset: 7 * PAGE, n_neurons: n, bundle_bytes: bb }
}

fn sparse_opts(gap: u64) -> PlanOptions {
    PlanOptions { allow_whole: false, max_gap_bytes: Some(gap), ..Default::default() }
}

proptest! {
    #[test]
    fn pieces_are_priced_as_if_built(lens in proptest::collection::vec((0u64..40, 1u64..3000), 0..60),
                                     cap in 1u64..600, unit in 1u64..8, concurrency in 1u32..64) {
        let mut runs = Vec::new();
        let mut p = 0;
        for (gap, len) in lens {
            runs.push((p + gap, p + gap + len));
            p += gap + len;
        }
        let mut built = Vec::new();
        pieces(&runs, cap, unit, &mut built);
        let profile = Profile::default();
        let (want, got) = (cost(&profile, &built, concurrency), pieces_cost(&profile, &runs, cap, unit, concurrency));
        prop_assert!((want - got).abs() <= 1e-9 * want.max(1.0), "built {} priced {}", want, got);
        prop_assert!(built.iter().all(|&(a, b)| b > a && b - a <= cap));
        // pieces cover each run exactly; cut points fall on whole units whenever a unit fits
        let covered: u64 = built.iter().map(|&(a, b)| b - a).sum();
        prop_assert_eq!(covered, runs.iter().map(|&(a, b)| b - a).sum::<u64>());
        if unit <= cap {
            for &(p0, p1) in &runs {
                for &(a, b) in built.iter().filter(|&&(a, _)| a >= p0 && a < p1) {
                    prop_assert!((a - p0) % unit == 0 && (b == p1 || (b - p0) % unit == 0), "piece {a}..{b} of run {p0}..{p1}");
                }
            }
        }
    }
}

#[test]
fn merges_neighbours_and_bridges_small_gaps() {
    let r = region(1000, 4096);
    let p = plan(&[5, 3, 4, 4, 20], &r, &Profile::default(), &sparse_opts(0)).unwrap();
    assert_eq!(p.neurons, vec![3, 4, 5, 20]);
    assert_eq!(
        p.requests,
        vec![
            Request { offset: 7 * PAGE + 3 * PAGE, len: 3 * PAGE, dest_offset: 0 },
            Request { offset: 7 * PAGE + 20 * PAGE, len: PAGE, dest_offset: 3 * PAGE },
        ]
    );
    assert_eq!(p.landing, vec![0, PAGE, 2 * PAGE, 3 * PAGE]);
    assert_eq!(p.request_index, vec![0, 0, 0, 1]);
    // A 14-page gap is bridged with a 14-page allowance, not with 13.
    let p = plan(&[5, 20], &r, &Profile::default(), &sparse_opts(14 * PAGE)).unwrap();
    assert_eq!(p.requests.len(), 1);
    assert_eq!(p.landing, vec![0, 15 * PAGE]);
    let p = plan(&[5, 20], &r, &Profile::default(), &sparse_opts(13 * PAGE)).unwrap();
    assert_eq!(p.requests.len(), 2);
}

#[test]
fn unaligned_bundles_share_pages() {
    let r = region(100, 3456);
    let p = plan(&[0, 1], &r, &Profile::default(), &sparse_opts(0)).unwrap();
    // Bundles 0 and 1 span bytes [0, 6912): pages 0 and 1.
    assert_eq!(p.requests, vec![Request { offset: 7 * PAGE, len: 2 * PAGE, dest_offset: 0 }]);
    assert_eq!(p.landing, vec![0, 3456]);
    let p = plan(&[3], &r, &Profile::default(), &sparse_opts(0)).unwrap();
    // Bundle 3: bytes [10368, 13824): pages 2 and 3; lands at 10368 - 8192.
    assert_eq!(p.requests, vec![Request { offset: 9 * PAGE, len: 2 * PAGE, dest_offset: 0 }]);
    assert_eq!(p.landing, vec![2176]);
}

#[test]
fn whole_region_when_dense_and_small() {
    // SmolLM2's float16 bundles (3,456 bytes) and a dense wanted set. Half the neurons at
    // random: bridging merges everything, so the sparse plan is the whole region already.
    let r = region(1536, 3456);
    let half: Vec<u32> = (0..1536u32).filter(|j| (j.wrapping_mul(2654435761) >> 7) % 2 == 0).collect();
    let p = plan(&half, &r, &Profile::default(), &PlanOptions::default()).unwrap();
    assert_eq!(p.buffer_bytes, r.region_bytes().unwrap());
    assert!(p.est_seconds <= p.est_whole_seconds && p.est_seconds <= p.est_sparse_seconds);
    // Every 4th neuron without bridging: 384 small requests cost more than reading it all.
    let p = plan(
        &(0..1536).step_by(4).collect::<Vec<u32>>(),
        &r,
        &Profile::default(),
        &PlanOptions { max_gap_bytes: Some(0), ..Default::default() },
    )
    .unwrap();
    assert!(p.whole_region, "{p:?}");
    assert!(p.est_seconds < p.est_sparse_seconds);
    // one span from neuron 0's first page to neuron 1532's last: 1294 of the region's 1296 pages
    assert_eq!(p.buffer_bytes, (1533u64 * 3456).div_ceil(PAGE) * PAGE);
    assert!(p.requests.iter().all(|q| q.len <= 1 << 20));
    // Sparse wanted sets at the paper's bundle size stay sparse.
    let r = region(16384, 16384);
    let wanted: Vec<u32> = (0..16384).step_by(40).collect();
    let p = plan(&wanted, &r, &Profile::default(), &PlanOptions::default()).unwrap();
    assert!(!p.whole_region);
    assert!(p.est_seconds < p.est_whole_seconds);
}

#[test]
fn one_span_leaves_out_what_lies_beyond_the_wanted_neurons() {
    // A placed layer: the wanted neurons all in the first 900 of 1536 (the pinned hot ones, never
    // wanted, at the end), dense enough that one span beats many requests; the span stops at
    // the last wanted bundle instead of reading the whole region.
    let r = region(1536, 1012);
    let wanted: Vec<u32> = (3..900).step_by(8).collect();
    let p =
        plan(&wanted, &r, &Profile::default(), &PlanOptions { max_gap_bytes: Some(0), ..Default::default() }).unwrap();
    assert!(p.whole_region, "{p:?}");
    let (a, b) = (3 * 1012 / PAGE, (900 * 1012u64).div_ceil(PAGE)); // 899 is the last wanted
    assert_eq!(p.requests[0].offset, r.offset + a * PAGE);
    assert_eq!(p.buffer_bytes, (b - a) * PAGE);
    assert!(p.buffer_bytes < r.region_bytes().unwrap() * 6 / 10);
}

#[test]
fn errors() {
    let prof = Profile::default();
    let o = PlanOptions::default();
    assert!(matches!(plan(&[10], &region(10, 100), &prof, &o), Err(Error::Invalid { .. })));
    let bad = Region { offset: 100, n_neurons: 10, bundle_bytes: 100 };
    assert!(matches!(plan(&[1], &bad, &prof, &o), Err(Error::Layout { .. })));
    let bad = Region { offset: 0, n_neurons: 10, bundle_bytes: 0 };
    assert!(matches!(plan(&[1], &bad, &prof, &o), Err(Error::Layout { .. })));
    let bad = Region { offset: 0, n_neurons: u32::MAX, bundle_bytes: u64::MAX / 2 };
    assert!(matches!(plan(&[1], &bad, &prof, &o), Err(Error::Layout { .. })));
    let o2 = PlanOptions { max_request_bytes: 100, ..o };
    assert!(matches!(plan(&[1], &region(10, 100), &prof, &o2), Err(Error::Invalid { .. })));
    let empty = plan(&[], &region(10, 100), &prof, &o).unwrap();
    assert!(empty.requests.is_empty() && empty.buffer_bytes == 0 && !empty.whole_region);
}

#[test]
fn gather_copies_rows() {
    let r = Region { offset: 0, n_neurons: 50, bundle_bytes: 1000 };
    let p = plan(&[7, 3, 49], &r, &Profile::default(), &sparse_opts(0)).unwrap();
    let file: Vec<u8> = (0..r.region_bytes().unwrap()).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; p.buffer_bytes as usize];
    for q in &p.requests {
        buf[q.dest_offset as usize..(q.dest_offset + q.len) as usize]
            .copy_from_slice(&file[q.offset as usize..(q.offset + q.len) as usize]);
    }
    let mut out = vec![0u8; 3000];
    p.gather(&buf, &mut out).unwrap();
    for (k, &j) in p.neurons.iter().enumerate() {
        assert_eq!(&out[k * 1000..(k + 1) * 1000], &file[j as usize * 1000..(j as usize + 1) * 1000]);
    }
}

fn profiles() -> impl Strategy<Value = Profile> {
    prop_oneof![
        Just(Profile::default()),
        // Flat (no per-request overhead) and steep (small requests very costly) disks.
        Just(
            Profile::new(
                vec![4096, 1 << 20],
                vec![1, 32],
                vec![vec![100.0, 100.0], vec![25600.0, 25600.0]],
                String::new()
            )
            .unwrap()
        ),
        Just(Profile::new(vec![4096, 1 << 20], vec![1], vec![vec![10.0], vec![3000.0]], String::new()).unwrap()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn plan_properties(
        n in 1u32..3000,
        bb in prop_oneof![1u64..64, Just(3456u64), Just(4096u64), Just(16384u64), 1u64..20000],
        picks in proptest::collection::vec(any::<u32>(), 0..400),
        offset_pages in 0u64..1000,
        max_pages in 1u64..300,
        gap in prop_oneof![Just(None), (0u64..40).prop_map(|g| Some(g * 4096 + 17))],
        allow_whole in any::<bool>(),
        conc in 1u32..64,
        profile in profiles(),
    ) {
        let region = Region { offset: offset_pages * PAGE, n_neurons: n, bundle_bytes: bb };
        let wanted: Vec<u32> = picks.iter().map(|&x| x % n).collect();
        let opts = PlanOptions { max_request_bytes: max_pages * PAGE + 5, concurrency: conc, allow_whole, max_gap_bytes: gap };
        let p = plan(&wanted, &region, &profile, &opts).unwrap();

        // Each wanted neuron exactly once, sorted.
        let mut want = wanted.clone();
        want.sort_unstable();
        want.dedup();
        prop_assert_eq!(&p.neurons, &want);
        prop_assert_eq!(p.landing.len(), want.len());
        prop_assert_eq!(p.useful_bytes, want.len() as u64 * bb);

        // Requests: aligned, inside the region, in order, non-overlapping, within max size,
        // destinations back to back.
        let (lo, hi) = (region.offset, region.offset + region.region_bytes().unwrap());
        let mut dest = 0;
        let mut prev_end = lo;
        for q in &p.requests {
            prop_assert!(q.offset % PAGE == 0 && q.len % PAGE == 0 && q.len > 0);
            prop_assert!(q.offset >= prev_end && q.offset + q.len <= hi);
            prop_assert!(q.len <= max_pages * PAGE);
            prop_assert_eq!(q.dest_offset, dest);
            dest += q.len;
            prev_end = q.offset + q.len;
        }
        prop_assert_eq!(p.buffer_bytes, dest);
        prop_assert!(p.est_seconds <= p.est_sparse_seconds + 1e-15);
        if !allow_whole { prop_assert!(!p.whole_region); }

        // Every byte of every wanted bundle arrives where `landing` says: map buffer
        // positions back to file positions through the requests.
        let mut file_at = vec![0u64; p.buffer_bytes as usize / PAGE as usize]; // page -> file offset
        for q in &p.requests {
            for k in 0..q.len / PAGE {
                file_at[((q.dest_offset / PAGE) + k) as usize] = q.offset + k * PAGE;
            }
        }
        for (k, (&j, &at)) in p.neurons.iter().zip(&p.landing).enumerate() {
            prop_assert!(at + bb <= p.buffer_bytes);
            let r = p.request_index[k] as usize;
            let q = p.requests[r];
            prop_assert!(at >= q.dest_offset && at < q.dest_offset + q.len);
            for t in [0, bb / 2, bb - 1] {
                let d = at + t;
                let f = file_at[(d / PAGE) as usize] + d % PAGE;
                prop_assert_eq!(f, lo + j as u64 * bb + t);
            }
        }

        // Sparse plans read no unwanted page except inside bridged gaps of at most
        // max_gap_bytes, and no run of unwanted pages at a request's ends.
        if !p.whole_region {
            let gap_pages = p.max_gap_bytes / PAGE;
            let mut wanted_page = std::collections::HashSet::new();
            for &j in &p.neurons {
                let s = j as u64 * bb;
                for pg in s / PAGE..(s + bb).div_ceil(PAGE) { wanted_page.insert(pg); }
            }
            let mut pages: Vec<u64> = p.requests.iter().flat_map(|q| {
                let a = (q.offset - lo) / PAGE;
                a..a + q.len / PAGE
            }).collect();
            pages.sort_unstable();
            let (mut run, mut prev) = (0u64, None::<u64>);
            for &pg in &pages {
                if prev.map_or(true, |p| pg != p + 1) {
                    // A request run starts here: nothing unwanted before or after a true gap.
                    prop_assert_eq!(run, 0, "unwanted pages at the end of a run");
                    prop_assert!(wanted_page.contains(&pg), "unwanted page {} starts a run", pg);
                }
                if wanted_page.contains(&pg) {
                    prop_assert!(run <= gap_pages, "bridged {} pages, allowed {}", run, gap_pages);
                    run = 0;
                } else {
                    run += 1;
                }
                prev = Some(pg);
            }
            prop_assert_eq!(run, 0, "trailing unwanted pages");
            prop_assert_eq!(pages.len() as u64, p.buffer_bytes / PAGE);
        } else {
            // one span: every page from the first wanted bundle's to the last's
            let (first, last) = (want[0] as u64, *want.last().unwrap() as u64);
            let span = (last + 1) * bb;
            prop_assert_eq!(p.buffer_bytes, span.div_ceil(PAGE) * PAGE - first * bb / PAGE * PAGE);
            prop_assert_eq!(p.requests[0].offset, lo + first * bb / PAGE * PAGE);
            prop_assert!(p.est_whole_seconds < p.est_sparse_seconds);
        }
    }
}
