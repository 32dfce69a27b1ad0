//! Unit and property tests of the neuron cache against a temp file of known bundle bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::planner::plan;
use crate::reader::ReaderOptions;

pub(super) const PAGE: u64 = 4096;
pub(super) const OFFSET: u64 = 2 * PAGE; // region start: not at 0, so offsets are really added

/// The byte at file position x: distinct-looking everywhere, so a wrong bundle never matches.
fn byte_at(x: u64) -> u8 {
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

pub(super) struct Store {
    pub(super) file: tempfile::NamedTempFile,
    pub(super) region: Region,
    pub(super) data: Vec<u8>,
}

impl Store {
    pub(super) fn new(n: u32, bb: u64) -> Store {
        let region = Region { offset: OFFSET, n_neurons: n, bundle_bytes: bb };
        let len = OFFSET + region.region_bytes().unwrap();
        let data: Vec<u8> = (0..len).map(byte_at).collect();
        // On the real disk (not tmpfs) so O_DIRECT is exercised where the filesystem allows it.
        let mut file = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        file.write_all(&data).unwrap();
        file.flush().unwrap();
        Store { file, region, data }
    }

    pub(super) fn bundle(&self, j: u32) -> &[u8] {
        let bb = self.region.bundle_bytes as usize;
        let s = OFFSET as usize + j as usize * bb;
        &self.data[s..s + bb]
    }

    pub(super) fn reader(&self) -> Arc<Reader> {
        Arc::new(
            Reader::open_with(self.file.path(), ReaderOptions { concurrency: 4, direct: true, ..Default::default() })
                .unwrap(),
        )
    }

    pub(super) fn cache(&self, capacity: usize, window: u32) -> NeuronCache {
        let opts = PlanOptions { concurrency: 4, ..Default::default() };
        NeuronCache::new(self.reader(), self.region, capacity, window, Profile::default(), opts, None).unwrap()
    }
}

/// Every structural invariant, and every ready row's bytes equal to the file's.
pub(super) fn check(c: &NeuronCache, s: &Store) {
    let n = c.region().n_neurons as usize;
    let bb = c.bundle_bytes();
    assert!(c.live() <= c.capacity());
    let mut seen = vec![false; n];
    let states = c.row_states();
    let slots = c.slots();
    for (row, &j) in c.slot_neurons().iter().enumerate() {
        assert!((j as usize) < n, "row {row} holds {j}");
        assert!(!seen[j as usize], "neuron {j} in two rows");
        seen[j as usize] = true;
        assert_eq!(c.row_of(j), Some(row));
        if row < c.ready_rows() {
            assert_eq!(states[row], READY);
            assert_eq!(&slots[row * bb..(row + 1) * bb], s.bundle(j), "row {row} (neuron {j})");
        }
    }
    for (j, &present) in seen.iter().enumerate() {
        assert_eq!(c.contains(j as u32), present, "index and rows disagree on neuron {j}");
    }
    assert!(states[c.live()..].iter().all(|&x| x == EMPTY));
    assert!(c.neuron_of[c.live()..].iter().all(|&x| x == ABSENT));
}

pub(super) fn live_set(c: &NeuronCache) -> Vec<u32> {
    let mut v = c.slot_neurons().to_vec();
    v.sort_unstable();
    v
}

#[test]
fn window_eviction() {
    let s = Store::new(64, 3456);
    let mut c = s.cache(64, 1);
    c.admit(&[1, 2, 3], 0).unwrap();
    let a = c.admit(&[3, 4], 1).unwrap();
    assert_eq!((a.hits, a.misses, a.evicted_window), (1, 1, 0));
    assert_eq!(live_set(&c), [1, 2, 3, 4]);
    let a = c.admit(&[4], 2).unwrap();
    // 1 and 2 were last wanted at 0 (age 2 > 1); 3 at 1 (age 1) stays.
    assert_eq!(a.evicted_window, 2);
    assert_eq!(live_set(&c), [3, 4]);
    check(&c, &s);
    // Window 0: only what is wanted now survives.
    c.set_window(0);
    c.admit(&[9], 3).unwrap();
    assert_eq!(live_set(&c), [9]);
    check(&c, &s);
}

#[test]
fn capacity_evicts_least_recently_wanted_first() {
    let s = Store::new(64, 4096);
    let mut c = s.cache(4, u32::MAX);
    for (step, j) in [0u32, 1, 2, 3].iter().enumerate() {
        c.admit(&[*j], step as u64).unwrap();
    }
    c.admit(&[0], 4).unwrap(); // 0 is now the most recent
    let a = c.admit(&[10, 11], 5).unwrap();
    assert_eq!((a.evicted_capacity, a.misses, a.overflow.len()), (2, 2, 0));
    assert_eq!(live_set(&c), [0, 3, 10, 11]);
    check(&c, &s);
    // Ties (same step) go by neuron id; only as many as needed.
    c.admit(&[20, 21, 22, 23], 6).unwrap();
    c.admit(&[23, 30], 7).unwrap();
    assert_eq!(live_set(&c), [21, 22, 23, 30]);
    let st = c.stats();
    assert_eq!((st.evicted_capacity, st.evicted_window), (7, 0));
    check(&c, &s);
}

#[test]
fn a_guess_makes_room_but_yields_to_the_true_set() {
    let s = Store::new(64, 4096);
    for window in [0u32, 3] {
        let mut c = s.cache(4, window);
        c.admit(&[0, 1, 2, 3], 1).unwrap();
        // The guess at step 2 may evict the step-1 neurons to make room...
        let g = c.begin_guess(&[4, 5, 6, 7], 2).unwrap();
        c.wait().unwrap();
        assert_eq!((g.misses, g.overflow.len()), (4, 0));
        assert_eq!(live_set(&c), [4, 5, 6, 7]);
        assert_eq!(c.last_wanted(4), Some(1)); // recorded as the token before's
                                               // ...and, wrong, yields to the true set checked at the same step (a plain `begin` for
                                               // the guess would have kept 4..7 as wanted now and overflowed all of 8..11).
        let a = c.admit(&[8, 9, 10, 11], 2).unwrap();
        assert_eq!((a.misses, a.overflow.len()), (4, 0));
        assert_eq!(live_set(&c), [8, 9, 10, 11]);
        check(&c, &s);
        // A right guess is a hit for the check; the window never drops a guess's own neurons.
        c.begin_guess(&[8, 9, 12], 3).unwrap();
        c.wait().unwrap();
        assert!(c.contains(8) && c.contains(9) && c.contains(12));
        let a = c.admit(&[8, 12], 3).unwrap();
        assert_eq!((a.hits, a.misses), (2, 0));
        check(&c, &s);
    }
}

#[test]
fn deletion_moves_the_last_row_into_the_hole() {
    let s = Store::new(32, 100);
    let mut c = s.cache(8, 0);
    c.admit(&(0..8).collect::<Vec<u32>>(), 0).unwrap();
    assert_eq!(c.slot_neurons(), [0, 1, 2, 3, 4, 5, 6, 7]);
    check(&c, &s);
    let a = c.admit(&[7, 1, 5], 1).unwrap();
    // Row 0 (0) <- 7; row 1 keeps 1; row 2 (2) <- 5 after 6 went from the end; 3 and 4 dropped.
    assert_eq!(c.slot_neurons(), [7, 1, 5]);
    assert_eq!((a.hits, a.evicted_window, a.ready_rows, a.total_rows), (3, 5, 3, 3));
    check(&c, &s);
}

#[test]
fn overflow_and_read_neurons() {
    let s = Store::new(50, 3456);
    let mut c = s.cache(3, 0);
    let a = c.admit(&[5, 1, 9, 2, 7, 1], 0).unwrap();
    assert_eq!(c.slot_neurons(), [1, 5, 9], "the first three fit, placed in store order");
    assert_eq!(a.overflow, [2, 7]);
    check(&c, &s);
    let bb = 3456;
    let mut dest = AlignedBuf::zeroed(3 * bb).unwrap();
    assert_eq!(c.read_neurons(&[7, 2, 7], &mut dest).unwrap(), 3);
    for (k, j) in [7u32, 2, 7].iter().enumerate() {
        assert_eq!(&dest[k * bb..(k + 1) * bb], s.bundle(*j));
    }
    assert!(matches!(c.read_neurons(&[1, 2, 3, 4], &mut dest), Err(Error::Invalid { .. })));
    assert!(matches!(c.read_neurons(&[50], &mut dest), Err(Error::Invalid { .. })));
    let st = c.stats();
    assert_eq!((st.misses, st.overflow), (3, 2));
}

#[test]
fn capacity_zero_overflows_everything() {
    let s = Store::new(20, 100);
    let mut c = s.cache(0, 3);
    assert_eq!(c.slots().len(), 0);
    let a = c.begin(&[3, 4, 3], 0).unwrap();
    c.wait().unwrap();
    assert_eq!((a.total_rows, a.overflow.clone()), (0, vec![3, 4]));
    assert_eq!(c.live(), 0);
    assert_eq!(c.stats().bytes_read, 0);
}

#[test]
fn duplicates_and_out_of_range() {
    let s = Store::new(16, 4096);
    let mut c = s.cache(16, 2);
    let a = c.admit(&[3, 3, 1, 3, 1], 0).unwrap();
    assert_eq!((a.hits, a.misses, a.bytes_useful), (0, 2, 2 * 4096));
    assert_eq!(c.slot_neurons(), [1, 3]);
    let before = (c.slot_neurons().to_vec(), c.stats());
    let e = c.admit(&[2, 16], 1).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }) && e.to_string().contains("16"), "{e}");
    assert!(c.begin(&[u32::MAX], 1).is_err());
    assert_eq!((c.slot_neurons().to_vec(), c.stats()), before, "a rejected call changes nothing");
    check(&c, &s);
}

#[test]
fn never_reread_when_everything_fits() {
    let s = Store::new(200, 3456);
    let mut c = s.cache(200, u32::MAX);
    let mut admitted = std::collections::BTreeSet::new();
    for step in 0..30u64 {
        let wanted: Vec<u32> = (0..40).map(|i| ((step * 7 + i * 13) % 200) as u32).collect();
        let before = c.stats().bytes_useful;
        let fresh = wanted.iter().filter(|j| admitted.insert(**j)).count();
        let a = c.admit(&wanted, step).unwrap();
        assert_eq!(a.misses, fresh);
        assert_eq!(c.stats().bytes_useful - before, fresh as u64 * 3456);
        check(&c, &s);
    }
    assert_eq!(c.stats().evicted_window + c.stats().evicted_capacity, 0);
}

#[test]
fn io_error_leaves_no_neuron_presented_as_filled() {
    let s = Store::new(64, 3456);
    let mut c = s.cache(64, 100);
    c.admit(&[0, 1, 2], 0).unwrap();
    // Truncate the file in the middle of the region: bundles past ~20 cannot be read.
    s.file.as_file().set_len(OFFSET + 20 * 3456).unwrap();
    for background in [true, false] {
        let e = if background {
            let a = c.begin(&[1, 40, 50], 1).unwrap();
            assert_eq!((a.ready_rows, a.total_rows), (3, 5));
            assert!(c.contains(40)); // being filled
            c.wait().unwrap_err()
        } else {
            c.admit(&[1, 40, 50], 1).unwrap_err()
        };
        assert!(matches!(e, Error::Eof { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&s.file.path().display().to_string()) && msg.contains("offset"), "{msg}");
        assert!(!c.contains(40) && !c.contains(50));
        assert_eq!((c.live(), c.ready_rows(), c.is_pending()), (3, 3, false));
        check(&c, &s);
    }
    assert_eq!(c.stats().failed_fills, 2);
    // An unwaited failure surfaces at the next begin, which then changes nothing.
    c.begin(&[45], 2).unwrap();
    assert!(c.begin(&[3], 2).is_err());
    assert!(!c.contains(45) && !c.contains(3));
    // Readable neurons still come in.
    c.admit(&[3], 2).unwrap();
    check(&c, &s);
}

#[test]
fn background_fill_beside_compute_on_another_layer() {
    let s = Store::new(512, 3456);
    let reader = s.reader();
    let opts = PlanOptions { concurrency: 4, ..Default::default() };
    let mk = |cap| NeuronCache::new(reader.clone(), s.region, cap, 2, Profile::default(), opts, None).unwrap();
    let (mut a, mut b) = (mk(300), mk(300));
    b.admit(&(0..256).collect::<Vec<u32>>(), 0).unwrap();
    for step in 1..40u64 {
        let wanted: Vec<u32> = (0..120).map(|i| ((step * 37 + i * 11) % 512) as u32).collect();
        let adm = a.begin(&wanted, step).unwrap();
        // "Compute" on b's ready rows while a's fill runs in the pool.
        let bb = 3456;
        let rows = b.ready_rows();
        let sum: u64 = b.ready_bytes()[..rows * bb].iter().map(|&x| x as u64).sum();
        assert!(sum > 0);
        a.wait().unwrap();
        assert_eq!(a.ready_rows(), adm.total_rows);
        check(&a, &s);
        std::mem::swap(&mut a, &mut b);
    }
}

#[test]
fn bad_construction() {
    let s = Store::new(8, 100);
    let o = PlanOptions::default();
    assert!(matches!(
        NeuronCache::new(s.reader(), s.region, 9, 1, Profile::default(), o, None),
        Err(Error::Invalid { .. })
    ));
    let bad = Region { offset: 100, ..s.region };
    assert!(matches!(NeuronCache::new(s.reader(), bad, 1, 1, Profile::default(), o, None), Err(Error::Layout { .. })));
    let o2 = PlanOptions { concurrency: 0, ..o };
    assert!(NeuronCache::new(s.reader(), s.region, 1, 1, Profile::default(), o2, None).is_err());
}

/// The cache's rules, restated on a map neuron -> last wanted step.
#[derive(Default)]
struct Model {
    live: BTreeMap<u32, u64>,
}

impl Model {
    /// Returns (hits, appended, overflow, evicted_window, evicted_capacity).
    fn step(
        &mut self,
        wanted: &[u32],
        step: u64,
        window: u32,
        cap: usize,
    ) -> (usize, Vec<u32>, Vec<u32>, usize, usize) {
        let mut unique = Vec::new();
        for &j in wanted {
            if !unique.contains(&j) {
                unique.push(j);
            }
        }
        for &j in &unique {
            if let Some(t) = self.live.get_mut(&j) {
                *t = step;
            }
        }
        let before = self.live.len();
        self.live.retain(|_, &mut t| step.saturating_sub(t) <= window as u64);
        let ew = before - self.live.len();
        let missing: Vec<u32> = unique.iter().copied().filter(|j| !self.live.contains_key(j)).collect();
        let hits = unique.len() - missing.len();
        let mut ec = 0;
        if self.live.len() + missing.len() > cap {
            let need = self.live.len() + missing.len() - cap;
            let mut cand: Vec<(u64, u32)> =
                self.live.iter().filter(|(_, &t)| t < step).map(|(&j, &t)| (t, j)).collect();
            cand.sort_unstable();
            for &(_, j) in cand.iter().take(need) {
                self.live.remove(&j);
                ec += 1;
            }
        }
        let m = missing.len().min(cap - self.live.len());
        for &j in &missing[..m] {
            self.live.insert(j, step);
        }
        (hits, missing[..m].to_vec(), missing[m..].to_vec(), ew, ec)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_sequences_follow_the_rules(
        n in 1u32..160,
        bb in prop_oneof![Just(100u64), Just(3456), Just(4096), Just(8192), Just(16384), 1u64..9000],
        cap_frac in 0.0f64..=1.0,
        window in prop_oneof![Just(0u32), 1u32..5, Just(u32::MAX)],
        fill_holes in any::<bool>(),
        steps in proptest::collection::vec((proptest::collection::vec(any::<u32>(), 0..40), any::<bool>(), 0u64..3), 1..12),
    ) {
        let s = Store::new(n, bb);
        let cap = ((n as f64) * cap_frac) as usize;
        let mut c = s.cache(cap, window);
        c.set_fill_holes(fill_holes);
        let mut model = Model::default();
        let mut step = 0u64;
        for (picks, background, dt) in steps {
            step += dt;
            let wanted: Vec<u32> = picks.iter().map(|x| x % n).collect();
            let before = c.stats();
            let a = if background {
                let a = c.begin(&wanted, step).unwrap();
                check_rows(&c, &s, a.ready_rows);
                c.wait().unwrap();
                a
            } else {
                c.admit(&wanted, step).unwrap()
            };
            let (hits, appended, overflow, ew, ec) = model.step(&wanted, step, window, cap);
            prop_assert_eq!(a.hits, hits);
            // New neurons land at or after ready_rows (in holes, then after the block), in store
            // order (so neighbouring bundles can share a request); ready_rows is the first of them.
            let mut new_rows: Vec<(usize, u32)> = appended.iter().map(|&j| (c.row_of(j).unwrap(), j)).collect();
            new_rows.sort_unstable();
            prop_assert!(new_rows.iter().all(|&(r, _)| r >= a.ready_rows && r < a.total_rows));
            prop_assert!(new_rows.windows(2).all(|w| w[0].1 < w[1].1), "rows in store order");
            if let Some(&(r, _)) = new_rows.first() {
                prop_assert_eq!(r, a.ready_rows);
            }
            prop_assert_eq!(a.total_rows, c.live());
            prop_assert_eq!(&a.overflow, &overflow);
            prop_assert_eq!((a.evicted_window, a.evicted_capacity), (ew, ec));
            prop_assert_eq!(live_set(&c), model.live.keys().copied().collect::<Vec<u32>>());
            check(&c, &s);
            // Bytes read = the plan of the appended neurons, nothing more.
            let p = plan(&appended, &s.region, &Profile::default(), &PlanOptions { concurrency: 4, ..Default::default() }).unwrap();
            let after = c.stats();
            prop_assert_eq!(after.bytes_read - before.bytes_read, p.buffer_bytes);
            prop_assert_eq!(after.bytes_useful - before.bytes_useful, appended.len() as u64 * bb);
            prop_assert_eq!(after.requests - before.requests, p.requests.len() as u64);
            prop_assert_eq!(a.bytes_read, p.buffer_bytes);
            // Page-multiple bundles read straight into rows unless a request bridges a gap;
            // other bundles always go through staging.
            let direct = after.bytes_direct - before.bytes_direct;
            if bb % PAGE != 0 {
                prop_assert_eq!(direct, 0);
            } else if p.buffer_bytes == p.useful_bytes && new_rows.windows(2).all(|w| w[1].0 == w[0].0 + 1) {
                prop_assert_eq!(direct, p.buffer_bytes); // no gap, rows side by side: all direct
            } else {
                prop_assert!(direct <= p.buffer_bytes);
            }
            // Overflow streams through read_neurons with the file's bytes.
            if !overflow.is_empty() {
                let mut dest = vec![0u8; overflow.len() * bb as usize];
                c.read_neurons(&overflow, &mut dest).unwrap();
                for (k, &j) in overflow.iter().enumerate() {
                    prop_assert_eq!(&dest[k * bb as usize..(k + 1) * bb as usize], s.bundle(j));
                }
            }
        }
    }
}

/// While a fill is pending: rows below `ready` are intact, the rest FILLING or READY.
fn check_rows(c: &NeuronCache, s: &Store, ready: usize) {
    let bb = c.bundle_bytes();
    let states = c.row_states();
    for (row, &j) in c.slot_neurons().iter().enumerate() {
        if row < ready {
            assert_eq!(&c.ready_bytes()[row * bb..(row + 1) * bb], s.bundle(j));
        } else {
            assert!(states[row] == FILLING || states[row] == READY);
        }
    }
}

#[test]
fn a_cache_can_move_between_threads_and_be_shared() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<NeuronCache>();
    send_sync::<super::OverflowReader>();
}

#[test]
fn overflow_reads_on_another_thread_while_the_owner_admits_and_fills() {
    // What flash does each token: the overflow's first chunk read by a worker thread while the
    // owner begins, waits for and checks fills of the same layer.
    let s = Store::new(400, 3456);
    let mut c = s.cache(40, 1);
    let bb = 3456;
    let r = c.overflow_reader();
    for step in 0..20u64 {
        let wanted: Vec<u32> = (0..120).map(|k| (k * 7 + step as u32 * 13) % 400).collect();
        let a = c.begin(&wanted, step).unwrap();
        let overflow = a.overflow.clone();
        let mut dest = AlignedBuf::zeroed(overflow.len().max(1) * bb).unwrap();
        std::thread::scope(|sc| {
            let reading = sc.spawn(|| r.read_neurons(&overflow, &mut dest).unwrap());
            c.wait().unwrap();
            check(&c, &s);
            assert_eq!(reading.join().unwrap(), overflow.len());
        });
        for (k, &j) in overflow.iter().enumerate() {
            assert_eq!(&dest[k * bb..(k + 1) * bb], s.bundle(j));
        }
    }
    assert!(c.stats().overflow > 0);
}

#[test]
fn page_bundles_read_straight_into_rows() {
    let s = Store::new(32, 2 * PAGE);
    let mut c = s.cache(32, 4);
    c.admit(&[9, 1, 2, 3, 20], 0).unwrap();
    assert_eq!(c.slot_neurons(), [1, 2, 3, 9, 20]);
    let st = c.stats();
    assert_eq!((st.bytes_direct, st.bytes_read), (5 * 2 * PAGE, 5 * 2 * PAGE));
    check(&c, &s);
}

#[test]
fn bundles_split_across_requests_are_staged_whole() {
    // 3456-byte bundles in requests capped at one page: a bundle runs on into the next request.
    let s = Store::new(40, 3456);
    let opts = PlanOptions { concurrency: 4, max_request_bytes: PAGE, ..Default::default() };
    let mut c = NeuronCache::new(s.reader(), s.region, 40, 2, Profile::default(), opts, None).unwrap();
    let wanted: Vec<u32> = (0..40).step_by(3).chain(10..20).collect();
    c.admit(&wanted, 0).unwrap();
    assert_eq!(c.stats().bytes_direct, 0);
    check(&c, &s);
}
