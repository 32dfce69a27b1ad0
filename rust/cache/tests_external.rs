//! External rows (`NeuronCache::new_external`): a cache that keeps only the index, run in
//! lockstep with an ordinary one over the same admissions. A mirror of the caller's rows, kept
//! with nothing but `Admission::moves` and `take_landed`, must equal the ordinary cache's slot
//! matrix row for row, and every row the file's bundle.

use proptest::prelude::*;

use super::tests::{check, Store, OFFSET};
use super::*;
use crate::error::Error;
use crate::staging::StagingPool;

fn external(s: &Store, capacity: usize, window: u32) -> NeuronCache {
    let opts = PlanOptions { concurrency: 4, ..Default::default() };
    NeuronCache::new_external(s.reader(), s.region, capacity, window, Profile::default(), opts, None).unwrap()
}

/// The caller's side: apply an admission's moves, then its landed bundles after the wait.
struct Mirror {
    rows: Vec<u8>,
    bb: usize,
}

impl Mirror {
    fn moves(&mut self, a: &Admission) {
        let dsts: Vec<u32> = a.moves.iter().map(|m| m.0).collect();
        for (i, &(dst, src)) in a.moves.iter().enumerate() {
            assert!(!dsts[..i].contains(&src), "move {i} reads row {src}, written by an earlier move");
            let (d, s) = (dst as usize * self.bb, src as usize * self.bb);
            self.rows.copy_within(s..s + self.bb, d);
        }
    }

    fn land(&mut self, a: &Admission, c: &mut NeuronCache) {
        let landed = c.take_landed();
        if a.misses == 0 {
            assert!(landed.is_none());
            return;
        }
        let buf = landed.expect("a fill's bundles");
        assert!(buf.len() >= a.misses * self.bb);
        for (k, &row) in a.filled_rows.iter().enumerate() {
            let r = row as usize * self.bb;
            self.rows[r..r + self.bb].copy_from_slice(&buf[k * self.bb..(k + 1) * self.bb]);
        }
    }
}

fn same_rows(ext: &NeuronCache, m: &Mirror, int: &NeuronCache, s: &Store) {
    assert_eq!(ext.slot_neurons(), int.slot_neurons());
    let live = int.live() * m.bb;
    assert_eq!(&m.rows[..live], &int.slots()[..live]);
    for (row, &j) in ext.slot_neurons().iter().enumerate() {
        assert_eq!(&m.rows[row * m.bb..(row + 1) * m.bb], s.bundle(j), "row {row} (neuron {j})");
    }
}

/// Every live row of the mirror holds its neuron's bundle.
fn mirror_holds(ext: &NeuronCache, m: &Mirror, s: &Store) {
    for (row, &j) in ext.slot_neurons().iter().enumerate() {
        assert_eq!(&m.rows[row * m.bb..(row + 1) * m.bb], s.bundle(j), "row {row} (neuron {j})");
    }
}

#[test]
fn bundles_not_taken_are_dropped_by_the_next_admission() {
    let s = Store::new(64, 3456);
    let pool = Arc::new(StagingPool::new(4));
    let opts = PlanOptions { concurrency: 4, ..Default::default() };
    let mut c =
        NeuronCache::new_external(s.reader(), s.region, 32, 2, Profile::default(), opts, Some(pool.clone())).unwrap();
    assert!(c.is_external() && c.ready_bytes().is_empty());
    let a = c.begin(&[1, 2, 3], 0).unwrap();
    c.wait().unwrap();
    assert_eq!(a.misses, 3);
    let buf = c.landed().unwrap();
    for (k, j) in [1u32, 2, 3].iter().enumerate() {
        assert_eq!(&buf[k * 3456..(k + 1) * 3456], s.bundle(*j));
    }
    // Looked at, never taken: the next admission drops 1, 2, 3 and reads 1 again with 4.
    let b = c.begin(&[1, 4], 1).unwrap();
    c.wait().unwrap();
    assert_eq!((b.hits, b.misses, c.live()), (0, 2, 2));
    assert!(!c.contains(2) && !c.contains(3));
    drop(buf);
    let held = pool.held_bytes();
    let taken = c.take_landed().unwrap();
    assert!(c.take_landed().is_none() && c.contains(1) && c.contains(4));
    // A taken buffer goes back to the pool at the next admission, once nobody holds it.
    c.admit(&[1], 2).unwrap();
    assert_eq!(pool.held_bytes(), held);
    drop(taken);
    c.admit(&[4], 3).unwrap();
    assert!(pool.held_bytes() > held);
}

#[test]
fn a_failed_fill_keeps_the_moves_of_its_admission() {
    let s = Store::new(16, 4096);
    let mut crcs: Vec<u32> = (0..16).map(|j| crc32fast::hash(s.bundle(j))).collect();
    crcs[9] ^= 1;
    for background in [false, true] {
        let mut c = external(&s, 16, 1);
        c.set_bundle_crcs(crcs.clone()).unwrap();
        let mut m = Mirror { rows: vec![0; 16 * 4096], bb: 4096 };
        let a = c.admit(&[1, 2, 3, 4], 0).unwrap();
        m.land(&a, &mut c);
        let a = c.admit(&[1, 4], 1).unwrap();
        m.land(&a, &mut c);
        // Step 2: the window evicts 2 and 3 (rows 1, 2); 4 moves from row 3 to row 1; bundle 9 fails.
        if background {
            let a = c.begin(&[5, 9], 2).unwrap();
            m.moves(&a); // returned with the admission whose fill then fails
            assert!(matches!(c.wait(), Err(Error::Corrupt { .. })));
        } else {
            assert!(matches!(c.admit(&[5, 9], 2), Err(Error::Corrupt { .. })));
        }
        assert_eq!(c.slot_neurons()[..], [1, 4]);
        let a = c.admit(&[6], 2).unwrap();
        assert_eq!(a.moves.contains(&(1, 3)), !background, "{:?}", a.moves);
        m.moves(&a);
        m.land(&a, &mut c);
        mirror_holds(&c, &m, &s);
    }
}

#[test]
fn bundle_crcs_are_checked_where_the_bundles_land() {
    let s = Store::new(16, 4096);
    let mut crcs: Vec<u32> = (0..16).map(|j| crc32fast::hash(s.bundle(j))).collect();
    crcs[5] ^= 1;
    let mut c = external(&s, 16, 4);
    c.set_bundle_crcs(crcs).unwrap();
    c.admit(&[1, 2], 0).unwrap();
    assert!(c.take_landed().is_some());
    assert!(matches!(c.admit(&[5, 6], 1), Err(Error::Corrupt { .. })));
    assert!(c.take_landed().is_none() && !c.contains(5) && !c.contains(6));
    assert_eq!(s.region.offset, OFFSET);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn lockstep_with_an_ordinary_cache(
        n in 1u32..120,
        bb in prop_oneof![Just(3456u64), Just(4096), Just(8192), 1u64..9000],
        cap_frac in 0.0f64..=1.0,
        window in prop_oneof![Just(0u32), 1u32..4, Just(u32::MAX)],
        fill_holes in any::<bool>(),
        steps in proptest::collection::vec((proptest::collection::vec(any::<u32>(), 0..40), any::<bool>(), 0u64..3), 1..12),
    ) {
        let s = Store::new(n, bb);
        let cap = ((n as f64) * cap_frac) as usize;
        let (mut int, mut ext) = (s.cache(cap, window), external(&s, cap, window));
        int.set_fill_holes(fill_holes);
        ext.set_fill_holes(fill_holes);
        let mut m = Mirror { rows: vec![0; cap * bb as usize], bb: bb as usize };
        let mut step = 0u64;
        for (picks, background, dt) in steps {
            step += dt;
            let wanted: Vec<u32> = picks.iter().map(|x| x % n).collect();
            let (a, b) = if background {
                let (a, b) = (int.begin(&wanted, step).unwrap(), ext.begin(&wanted, step).unwrap());
                m.moves(&b);
                int.wait().unwrap();
                ext.wait().unwrap();
                (a, b)
            } else {
                let (a, b) = (int.admit(&wanted, step).unwrap(), ext.admit(&wanted, step).unwrap());
                m.moves(&b);
                (a, b)
            };
            prop_assert!(a.moves.is_empty());
            prop_assert_eq!((a.hits, a.misses, &a.filled_rows, &a.overflow), (b.hits, b.misses, &b.filled_rows, &b.overflow));
            m.land(&b, &mut ext);
            check(&int, &s);
            same_rows(&ext, &m, &int, &s);
        }
    }
}
