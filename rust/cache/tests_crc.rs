//! The per-bundle CRC-32 checks (cache/crc.rs) against a temp file of known bundle bytes, one
//! byte of which is flipped: fills through rows and through staging, overflow reads, the table.

use std::os::unix::fs::FileExt;

use super::tests::{check, live_set, Store, OFFSET, PAGE};
use super::*;

/// The right table: zlib's CRC-32 of each bundle as the store wrote it.
fn table(s: &Store) -> Vec<u32> {
    (0..s.region.n_neurons).map(|j| crc32fast::hash(s.bundle(j))).collect()
}

/// Flip one byte in the middle of bundle `j` in the file (`s.data` keeps the right bytes).
fn corrupt(s: &Store, j: u32) {
    let bb = s.region.bundle_bytes;
    let pos = OFFSET + j as u64 * bb + bb / 2;
    let f = s.file.as_file();
    f.write_at(&[!s.data[pos as usize]], pos).unwrap();
    f.sync_data().unwrap();
}

/// A cache with a window of 1 whose plans never read the whole region.
fn cache_with(s: &Store, capacity: usize, max_gap_bytes: Option<u64>) -> NeuronCache {
    let opts = PlanOptions { concurrency: 4, allow_whole: false, max_gap_bytes, ..Default::default() };
    NeuronCache::new(s.reader(), s.region, capacity, 1, Profile::default(), opts, None).unwrap()
}

fn assert_corrupt(e: &Error, s: &Store, j: u32) {
    let at = OFFSET + j as u64 * s.region.bundle_bytes;
    match e {
        Error::Corrupt { path, offset, .. } => assert_eq!((path.as_path(), *offset), (s.file.path(), at)),
        _ => panic!("expected a checksum mismatch in bundle {j}, got {e:?}"),
    }
    let msg = e.to_string();
    let path = s.file.path().display().to_string();
    assert!(msg.starts_with(&path) && msg.contains(&format!("bundle {j} ")), "{msg}");
    assert!(msg.contains(&format!("offset {at}")) && msg.contains("corrupt"), "{msg}");
}

/// A fill that reads corrupt bundle 40 (with 39 and 41) fails, in the background and inline,
/// appended or into holes; `direct`: the first fill's reads go straight into rows.
fn a_corrupt_bundle_fails_its_fill(bb: u64, max_gap_bytes: Option<u64>, direct: bool) {
    for fill_holes in [false, true] {
        for background in [false, true] {
            let s = Store::new(64, bb);
            let mut c = cache_with(&s, 16, max_gap_bytes);
            c.set_fill_holes(fill_holes);
            c.admit(&[1], 0).unwrap();
            let before = c.stats();
            assert_eq!(before.crc_ns, 0, "no table, no CRC work");
            c.set_bundle_crcs(table(&s)).unwrap(); // checks the live row of 1
            assert!(c.has_bundle_crcs());
            c.admit(&[0, 2, 4, 6, 8, 10], 0).unwrap();
            check(&c, &s);
            let st = c.stats();
            let read_direct = st.bytes_direct > before.bytes_direct;
            assert_eq!(read_direct, direct, "bb {bb}, gap {max_gap_bytes:?}: {st:?}");
            assert!(st.crc_ns > 0 && st.crc_ns <= st.mgmt_ns, "{st:?}");

            corrupt(&s, 40);
            // At step 2, 1, 2, 6, 8 and 10 fall out of the window: holes for 39..=41 with fill_holes.
            let wanted = [0, 4, 39, 40, 41];
            let e = if background {
                let a = c.begin(&wanted, 2).unwrap();
                assert!(c.contains(40) && a.misses == 3);
                c.wait().unwrap_err()
            } else {
                c.admit(&wanted, 2).unwrap_err()
            };
            assert_corrupt(&e, &s, 40);
            assert!(!c.contains(39) && !c.contains(40) && !c.contains(41));
            if !fill_holes {
                // (Into holes, the fill spans rows 0..5, and the live rows between its go too.)
                assert_eq!(live_set(&c), [0, 4]);
            }
            assert_eq!((c.is_pending(), c.ready_rows()), (false, c.live()));
            assert!(c.row_states()[..c.live()].iter().all(|&x| x == READY));
            check(&c, &s);
            assert_eq!(c.stats().failed_fills, 1);

            // Other neurons still come in; the corrupt one fails whenever it is read.
            c.admit(&[4, 39, 41, 50], 3).unwrap();
            check(&c, &s);
            assert_corrupt(&c.admit(&[40, 60], 3).unwrap_err(), &s, 40);
            assert!(!c.contains(40) && !c.contains(60) && c.contains(39) && c.contains(41));
            check(&c, &s);
            assert_eq!(c.stats().failed_fills, 2);

            // Overflow reads: checked the same way, `dest` untouched on a mismatch.
            let bbu = bb as usize;
            let mut dest = vec![0xAAu8; 3 * bbu];
            assert_eq!(c.read_neurons(&[41, 39, 41], &mut dest).unwrap(), 3);
            for (k, j) in [41u32, 39, 41].into_iter().enumerate() {
                assert_eq!(&dest[k * bbu..(k + 1) * bbu], s.bundle(j));
            }
            dest.fill(0xAA);
            assert_corrupt(&c.read_neurons(&[39, 40], &mut dest).unwrap_err(), &s, 40);
            assert!(dest.iter().all(|&x| x == 0xAA));
            check(&c, &s);
        }
    }
}

#[test]
fn crc_page_bundles_read_straight_into_rows() {
    a_corrupt_bundle_fails_its_fill(PAGE, Some(0), true);
    a_corrupt_bundle_fails_its_fill(4 * PAGE, Some(0), true);
}

#[test]
fn crc_page_bundles_with_bridged_gaps_are_staged() {
    a_corrupt_bundle_fails_its_fill(PAGE, Some(PAGE), false);
}

#[test]
fn crc_sub_page_bundles_are_staged() {
    a_corrupt_bundle_fails_its_fill(3456, None, false);
}

#[test]
fn set_bundle_crcs_rules() {
    let s = Store::new(32, 3456);
    let mut c = s.cache(8, 10);
    assert!(!c.has_bundle_crcs());
    let t = table(&s);
    for bad in [t[..31].to_vec(), vec![0; 33], Vec::new()] {
        let e = c.set_bundle_crcs(bad).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }) && e.to_string().contains("32"), "{e}");
    }
    assert!(!c.has_bundle_crcs());
    c.begin(&[1, 2], 0).unwrap();
    assert!(matches!(c.set_bundle_crcs(t.clone()), Err(Error::Invalid { .. })), "a fill is pending");
    c.wait().unwrap();
    c.set_bundle_crcs(t.clone()).unwrap(); // the live rows match
    c.set_bundle_crcs(t.clone()).unwrap(); // the same table again: nothing to do
    let mut other = t.clone();
    other[5] ^= 1;
    assert!(matches!(c.set_bundle_crcs(other), Err(Error::Invalid { .. })), "set once");
    assert_eq!(live_set(&c), [1, 2]);
    check(&c, &s);
}

#[test]
fn crc_rows_already_live_are_checked_when_the_table_comes() {
    let s = Store::new(32, PAGE);
    corrupt(&s, 6);
    let mut c = s.cache(8, 10);
    c.admit(&[5, 6, 7, 9], 0).unwrap(); // no table yet: the corrupt bundle comes in unnoticed
    let e = c.set_bundle_crcs(table(&s)).unwrap_err();
    assert_corrupt(&e, &s, 6);
    assert!(c.has_bundle_crcs());
    assert_eq!(live_set(&c), [5, 7, 9]);
    check(&c, &s);
    assert_corrupt(&c.admit(&[6], 1).unwrap_err(), &s, 6);
    c.admit(&[8], 1).unwrap();
    assert_eq!(live_set(&c), [5, 7, 8, 9]);
    check(&c, &s);
}

#[test]
fn combined_crcs_are_the_crcs_of_the_runs() {
    let s = Store::new(12, 1000);
    let t = table(&s);
    for group in [1usize, 3, 4, 12] {
        let runs = combine_groups(&t, group, 1000).unwrap();
        assert_eq!(runs.len(), 12 / group);
        for (r, &crc) in runs.iter().enumerate() {
            let bytes: Vec<u8> = (r * group..(r + 1) * group).flat_map(|j| s.bundle(j as u32).to_vec()).collect();
            assert_eq!(crc, crc32fast::hash(&bytes), "run {r} of {group}");
        }
    }
    assert!(matches!(combine_groups(&t, 5, 1000), Err(Error::Invalid { .. })));
    assert!(matches!(combine_groups(&t, 0, 1000), Err(Error::Invalid { .. })));
}
