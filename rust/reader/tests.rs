//! Reader tests: every engine round-trips, fails naming file/offset/length, and rejects bad destinations.

use super::*;
use std::io::Write;

const ENGINES: [Engine; 3] = [Engine::Threads, Engine::Uring, Engine::Auto];

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
}

fn temp_file(data: &[u8]) -> tempfile::NamedTempFile {
    // Under the target dir's filesystem (the real disk), not a tmpfs.
    let mut f = tempfile::NamedTempFile::new_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    f.write_all(data).unwrap();
    f.flush().unwrap();
    f
}

#[test]
fn round_trip_aligned_and_unaligned() {
    for engine in ENGINES {
        round_trip_aligned_and_unaligned_with(engine)
    }
}

fn round_trip_aligned_and_unaligned_with(engine: Engine) {
    let data = pattern(3 << 20);
    let f = temp_file(&data);
    let r = Reader::open_with(f.path(), ReaderOptions { concurrency: 8, engine, ..Default::default() }).unwrap();
    let ops = [
        ReadOp { file_offset: 0, len: 4096, dest_offset: 0 },
        ReadOp { file_offset: 1 << 20, len: 65536, dest_offset: 8192 },
        ReadOp { file_offset: 12345, len: 3456, dest_offset: 100_000 }, // unaligned: buffered
        ReadOp { file_offset: (3 << 20) - 4096, len: 4096, dest_offset: 200_704 },
    ];
    let mut dest = AlignedBuf::zeroed(300_000).unwrap();
    r.read_into(&ops, &mut dest).unwrap();
    for op in ops {
        let f = op.file_offset as usize;
        assert_eq!(&dest[op.dest_offset..op.dest_offset + op.len], &data[f..f + op.len]);
    }
    let s = r.stats().snapshot();
    assert_eq!((s.requests, s.batches, s.bytes_read), (4, 1, 4096 + 65536 + 3456 + 4096));
    r.stats().reset();
    assert_eq!(r.stats().snapshot(), Default::default());
}

#[test]
fn read_region_matches_file() {
    for engine in ENGINES {
        read_region_matches_file_with(engine)
    }
}

fn read_region_matches_file_with(engine: Engine) {
    let data = pattern((5 << 20) + 4096 * 3);
    let f = temp_file(&data);
    let r = Reader::open_with(f.path(), ReaderOptions { engine, ..Default::default() }).unwrap();
    let off = 4096 * 5;
    let len = data.len() - off;
    let buf = r.read_region(off as u64, len).unwrap();
    assert_eq!(&buf[..], &data[off..]);
    assert_eq!(r.stats().snapshot().requests, len.div_ceil(1 << 20) as u64);
}

#[test]
fn past_eof_is_an_error_naming_file_offset_length() {
    for engine in ENGINES {
        past_eof_is_an_error_naming_file_offset_length_with(engine)
    }
}

fn past_eof_is_an_error_naming_file_offset_length_with(engine: Engine) {
    let f = temp_file(&pattern(8192));
    let r = Reader::open_with(f.path(), ReaderOptions { engine, ..Default::default() }).unwrap();
    let err = r.read_region(4096, 8192).unwrap_err();
    match &err {
        Error::Eof { offset, len, got, file_len, .. } => {
            assert_eq!((*offset, *len, *got, *file_len), (4096, 8192, 4096, Some(8192)));
        }
        e => panic!("unexpected {e:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&f.path().display().to_string()) && msg.contains("4096") && msg.contains("8192"), "{msg}");
    // Entirely past the end.
    assert!(matches!(r.read_region(1 << 20, 4096), Err(Error::Eof { got: 0, .. })));
}

#[test]
fn truncated_under_an_open_reader() {
    for engine in ENGINES {
        truncated_under_an_open_reader_with(engine)
    }
}

fn truncated_under_an_open_reader_with(engine: Engine) {
    let data = pattern(4 << 20);
    let f = temp_file(&data);
    let r = Reader::open_with(f.path(), ReaderOptions { engine, ..Default::default() }).unwrap();
    assert_eq!(&r.read_region(0, 1 << 20).unwrap()[..], &data[..1 << 20]);
    f.as_file().set_len(1 << 20).unwrap();
    let err = r.read_region(0, 4 << 20).unwrap_err();
    assert!(matches!(err, Error::Eof { file_len: Some(1048576), .. }), "{err:?}");
}

#[test]
fn bad_destinations_are_rejected() {
    for engine in ENGINES {
        bad_destinations_are_rejected_with(engine)
    }
}

fn bad_destinations_are_rejected_with(engine: Engine) {
    let f = temp_file(&pattern(16384));
    let r = Reader::open_with(f.path(), ReaderOptions { engine, ..Default::default() }).unwrap();
    let mut dest = AlignedBuf::zeroed(8192).unwrap();
    let over = [ReadOp { file_offset: 0, len: 8192, dest_offset: 4096 }];
    assert!(matches!(r.read_into(&over, &mut dest), Err(Error::Invalid { .. })));
    let overlap =
        [ReadOp { file_offset: 0, len: 4096, dest_offset: 0 }, ReadOp { file_offset: 0, len: 4096, dest_offset: 2048 }];
    assert!(matches!(r.read_into(&overlap, &mut dest), Err(Error::Invalid { .. })));
    assert!(Reader::open_with(f.path(), ReaderOptions { concurrency: 0, ..Default::default() }).is_err());
    assert!(matches!(Reader::open("/nonexistent/llmflash"), Err(Error::Open { .. })));
}

#[test]
fn many_batches_from_many_threads() {
    for engine in ENGINES {
        many_batches_from_many_threads_with(engine)
    }
}

fn many_batches_from_many_threads_with(engine: Engine) {
    let data = pattern(2 << 20);
    let f = temp_file(&data);
    let r = Reader::open_with(f.path(), ReaderOptions { concurrency: 4, engine, ..Default::default() }).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (r, data) = (&r, &data);
            s.spawn(move || {
                for k in 0..20 {
                    let ops: Vec<ReadOp> = (0..7)
                        .map(|j| ReadOp {
                            file_offset: (((t * 31 + k * 7 + j) % 500) * 4096) as u64,
                            len: 4096,
                            dest_offset: j * 4096,
                        })
                        .collect();
                    let mut dest = AlignedBuf::zeroed(7 * 4096).unwrap();
                    r.read_into(&ops, &mut dest).unwrap();
                    for op in ops {
                        let o = op.file_offset as usize;
                        assert_eq!(&dest[op.dest_offset..op.dest_offset + 4096], &data[o..o + 4096]);
                    }
                }
            });
        }
    });
    assert_eq!(r.stats().snapshot().batches, 80);
}

#[test]
fn buffered_mode_reads_the_same() {
    for engine in ENGINES {
        buffered_mode_reads_the_same_with(engine)
    }
}

fn buffered_mode_reads_the_same_with(engine: Engine) {
    let data = pattern(1 << 20);
    let f = temp_file(&data);
    let r = Reader::open_with(f.path(), ReaderOptions { concurrency: 2, direct: false, engine }).unwrap();
    assert!(!r.is_direct());
    assert_eq!(&r.read_region(0, 1 << 20).unwrap()[..], &data[..]);
}
