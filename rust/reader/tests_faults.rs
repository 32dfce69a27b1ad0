//! Checked region reads (hashed as they land) and the fault-injection hook, on every engine:
//! EIO and EOF are errors naming the file, EINTR and short reads are continued to the same bytes,
//! changed bytes are caught by the region's CRC-32.

use super::faults::{self, Kind, Rule};
use super::*;
use std::io::Write;
use std::sync::Mutex;

const ENGINES: [Engine; 3] = [Engine::Threads, Engine::Uring, Engine::Auto];

/// The fault rules are process-wide: the tests that install them run one at a time (their rules
/// name their own temporary file, so the other tests' reads never match them).
static SERIAL: Mutex<()> = Mutex::new(());

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect()
}

fn temp_file(data: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    f
}

fn open(f: &tempfile::NamedTempFile, engine: Engine) -> Reader {
    Reader::open_with(f.path(), ReaderOptions { concurrency: 4, engine, ..Default::default() }).unwrap()
}

fn rule(kind: Kind, f: &tempfile::NamedTempFile, start: u64, end: u64, times: Option<u64>) -> Rule {
    let file = f.path().file_name().unwrap().to_string_lossy().into_owned();
    Rule { kind, file, start, end, skip: 0, times }
}

/// Runs `body` with the fault table to itself, cleared before and after (even on panic).
fn with_faults(body: impl FnOnce()) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            faults::clear();
        }
    }
    let _c = Clear;
    faults::clear();
    body();
}

#[test]
fn combine_matches_one_hash() {
    let data = pattern(10_000);
    let cuts = [0, 1, 4096, 4097, 9_999, 10_000];
    let blocks: Vec<(u32, u64)> =
        cuts.windows(2).map(|w| (crc32fast::hash(&data[w[0]..w[1]]), (w[1] - w[0]) as u64)).collect();
    assert_eq!(hashed::combine(blocks), crc32fast::hash(&data));
    assert_eq!(hashed::combine([]), crc32fast::hash(&[]));
}

#[test]
fn region_crc_is_the_crc_of_the_prefix() {
    let data = pattern((3 << 20) + 5 * 4096);
    let f = temp_file(&data);
    for engine in ENGINES {
        let r = open(&f, engine);
        let off = 4096u64;
        let len = data.len() - 4096;
        for hash_len in [0, 1, 3_000_001, len - 4096 + 17, len] {
            let mut dest = AlignedBuf::zeroed(len).unwrap();
            let crc = r.read_region_crc(off, &mut dest, hash_len).unwrap();
            assert_eq!(&dest[..], &data[4096..], "{engine:?}");
            assert_eq!(crc, crc32fast::hash(&data[4096..4096 + hash_len]), "{engine:?} {hash_len}");
        }
        let mut dest = AlignedBuf::zeroed(len).unwrap();
        assert!(matches!(r.read_region_crc(off, &mut dest, len + 1), Err(Error::Invalid { .. })));
    }
}

#[test]
fn checked_region_names_file_what_and_offset() {
    let data = pattern(2 << 20);
    let f = temp_file(&data);
    let r = open(&f, Engine::Auto);
    let mut dest = AlignedBuf::zeroed(1 << 20).unwrap();
    let good = crc32fast::hash(&data[8192..8192 + 1000]);
    r.read_region_checked(8192, &mut dest[..1 << 20], 1000, good, "layer 2's region").unwrap();
    let e = r.read_region_checked(8192, &mut dest[..1 << 20], 1000, good ^ 1, "layer 2's region").unwrap_err();
    assert!(matches!(e, Error::Corrupt { offset: 8192, .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&f.path().display().to_string()) && msg.contains("layer 2's region"), "{msg}");
}

#[test]
fn eio_and_eof_fail_naming_the_file() {
    let data = pattern(3 << 20);
    let f = temp_file(&data);
    with_faults(|| {
        for engine in ENGINES {
            for (kind, errno) in [(Kind::Eio, Some(libc::EIO)), (Kind::Eof, None)] {
                faults::clear();
                faults::inject(rule(kind, &f, 1 << 20, (1 << 20) + 1, None)).unwrap();
                let r = open(&f, engine);
                let mut dest = AlignedBuf::zeroed(3 << 20).unwrap();
                let e = r.read_region_crc(0, &mut dest, 3 << 20).unwrap_err();
                assert_eq!(e.path(), Some(f.path()), "{engine:?} {kind:?}: {e}");
                assert_eq!(e.errno(), errno, "{engine:?} {kind:?}: {e}");
                if kind == Kind::Eof {
                    assert!(matches!(e, Error::Eof { offset: 1048576, .. }), "{engine:?}: {e}");
                }
                assert!(faults::fired()[0] >= 1);
            }
        }
    });
}

#[test]
fn eintr_and_short_reads_are_continued_to_the_same_bytes() {
    let data = pattern(3 << 20);
    let f = temp_file(&data);
    let want = crc32fast::hash(&data);
    with_faults(|| {
        for engine in ENGINES {
            // Transient EINTR and short reads, and short reads on every read of the range.
            for (kind, times) in [(Kind::Eintr, Some(3)), (Kind::Short, Some(1)), (Kind::Short, None)] {
                faults::clear();
                faults::inject(rule(kind, &f, 0, 3 << 20, times)).unwrap();
                let r = open(&f, engine);
                let mut dest = AlignedBuf::zeroed(3 << 20).unwrap();
                let crc = r.read_region_crc(0, &mut dest, 3 << 20).unwrap();
                assert!(dest[..] == data[..], "{engine:?} {kind:?} {times:?}");
                assert_eq!(crc, want, "{engine:?} {kind:?} {times:?}");
                let fired = faults::fired()[0];
                assert!(fired >= 1 && times.map_or(true, |t| fired == t), "{engine:?} {kind:?}: fired {fired}");
            }
        }
    });
}

#[test]
fn a_short_read_then_the_end_of_the_file_is_an_eof_error() {
    let data = pattern(1 << 20);
    let f = temp_file(&data);
    with_faults(|| {
        for engine in ENGINES {
            faults::clear();
            faults::inject(rule(Kind::Short, &f, 0, 1 << 20, Some(1))).unwrap();
            faults::inject(rule(Kind::Eof, &f, 0, 1 << 20, None)).unwrap();
            let r = open(&f, engine);
            let mut dest = AlignedBuf::zeroed(1 << 20).unwrap();
            let e = r.read_region_crc(0, &mut dest, 1 << 20).unwrap_err();
            assert!(matches!(e, Error::Eof { got: 524288, .. }), "{engine:?}: {e}");
        }
    });
}

#[test]
fn changed_bytes_are_caught_by_the_region_crc() {
    let data = pattern(3 << 20);
    let f = temp_file(&data);
    let at = (2 << 20) + 12345;
    with_faults(|| {
        for engine in ENGINES {
            faults::clear();
            faults::inject(rule(Kind::Flip, &f, at, at + 1, Some(1))).unwrap();
            let r = open(&f, engine);
            let mut dest = AlignedBuf::zeroed(3 << 20).unwrap();
            let good = crc32fast::hash(&data);
            let e = r.read_region_checked(0, &mut dest, 3 << 20, good, "layer 0's region").unwrap_err();
            assert!(matches!(e, Error::Corrupt { .. }), "{engine:?}: {e}");
            assert_eq!(dest[at as usize], !data[at as usize], "{engine:?}: the flip landed");
            // Fired once: the next read is clean again.
            r.read_region_checked(0, &mut dest, 3 << 20, good, "layer 0's region").unwrap();
        }
    });
}

#[test]
fn a_rule_on_another_file_changes_nothing() {
    let data = pattern(1 << 20);
    let f = temp_file(&data);
    with_faults(|| {
        faults::inject(Rule {
            kind: Kind::Eio,
            file: "no-such-file.bin".into(),
            start: 0,
            end: u64::MAX,
            skip: 0,
            times: None,
        })
        .unwrap();
        for engine in ENGINES {
            let r = open(&f, engine);
            let mut dest = AlignedBuf::zeroed(1 << 20).unwrap();
            assert_eq!(r.read_region_crc(0, &mut dest, 1 << 20).unwrap(), crc32fast::hash(&data));
        }
        assert_eq!(faults::fired(), vec![0]);
        assert!(faults::inject(rule(Kind::Eio, &f, 5, 5, None)).is_err()); // empty range
    });
}
