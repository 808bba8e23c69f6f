//! The public API against a real file (io layer, O_DIRECT where the file system allows it).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;

use replog::{CreateOptions, Durability, EntryKind, Error, OpenOptions, Record, Replog};

const MIB: u64 = 1 << 20;

fn write(device: u32, offset: u64, data: &[u8]) -> Record<'_> {
    Record {
        device,
        offset,
        kind: EntryKind::Write,
        len: data.len() as u64,
        data,
    }
}

fn payload(lsn: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (lsn as usize * 31 + i * 7) as u8)
        .collect()
}

fn create(dir: &tempfile::TempDir, size: u64) -> (std::path::PathBuf, Replog) {
    let path = dir.path().join("replog");
    let opts = CreateOptions {
        offset: 0,
        size,
        io: Default::default(),
    };
    (path.clone(), Replog::create(&path, &opts).unwrap())
}

#[test]
fn append_read_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = create(&dir, 8 * MIB);
    assert_eq!((log.first_lsn(), log.last_lsn(), log.next_lsn()), (0, 0, 1));
    let mut handles = Vec::new();
    for i in 1..=20u64 {
        let data = payload(i, (i as usize * 1000) % 9000 + 1);
        handles.push(
            log.append(write(i as u32 % 3, i * 4096, &data), Durability::Durable)
                .unwrap(),
        );
    }
    handles.push(
        log.append(
            Record {
                device: 1,
                offset: 0,
                kind: EntryKind::Zeroes,
                len: 1 << 30,
                data: &[],
            },
            Durability::Written,
        )
        .unwrap(),
    );
    let lsns: Vec<u64> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
    assert_eq!(lsns, (1..=21).collect::<Vec<_>>());
    assert_eq!(log.flush().wait().unwrap(), 21);
    let e = log.read(5).unwrap();
    assert_eq!(
        (e.lsn, e.device, e.offset, e.kind),
        (5, 2, 5 * 4096, EntryKind::Write)
    );
    assert_eq!(e.data, payload(5, 5001));
    // The index alone says where entries wrote (what overflow marks dirty), without reading.
    let extents = log.extents_from(19, 10);
    let seen: Vec<_> = extents
        .iter()
        .map(|x| (x.lsn, x.device, x.offset, x.len, x.kind))
        .collect();
    assert_eq!(
        seen,
        vec![
            (19, 1, 19 * 4096, 1001, EntryKind::Write),
            (20, 2, 20 * 4096, 2001, EntryKind::Write),
            (21, 1, 0, 1 << 30, EntryKind::Zeroes),
        ]
    );
    assert!(extents.iter().all(|x| x.record_bytes >= 128));
    assert_eq!(log.extents_from(1, 2).len(), 2);
    // Reads of different sizes one after another (the read buffer is reused) return the right
    // bytes every time.
    for (lsn, len) in [(8usize, 8001usize), (1, 1001), (20, 2001), (9, 1)] {
        let e = log.read(lsn as u64).unwrap();
        assert_eq!(e.data, payload(lsn as u64, len), "lsn {lsn}");
    }
    let batch = log.read_from(1, 100, 1 << 30).unwrap();
    assert_eq!(batch.len(), 21);
    assert_eq!(batch[7].data, payload(8, 8001));
    let z = log.read(21).unwrap();
    assert_eq!(
        (z.kind, z.len, z.data.len()),
        (EntryKind::Zeroes, 1 << 30, 0)
    );
    // read_from honours max_entries and max_bytes but returns at least one entry.
    assert_eq!(
        log.read_from(3, 4, u64::MAX)
            .unwrap()
            .iter()
            .map(|e| e.lsn)
            .collect::<Vec<_>>(),
        vec![3, 4, 5, 6]
    );
    assert_eq!(log.read_from(10, 100, 1).unwrap().len(), 1);
    assert!(log.read_from(22, 10, u64::MAX).unwrap().is_empty());
    assert!(matches!(log.read(22), Err(Error::NotFound { lsn: 22 })));
    let uuid = log.uuid();
    let generation = log.generation();
    drop(log);

    let (log, report) = Replog::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(report.entries, 21);
    assert_eq!(
        (report.first_lsn, report.last_lsn, report.next_lsn),
        (1, 21, 22)
    );
    assert_eq!(report.generation, generation + 1);
    assert_eq!(log.uuid(), uuid);
    for lsn in 1..=20 {
        assert_eq!(
            log.read(lsn).unwrap().data,
            payload(lsn, (lsn as usize * 1000) % 9000 + 1)
        );
    }
    assert_eq!(
        log.append(write(0, 0, b"x"), Durability::Durable)
            .unwrap()
            .wait()
            .unwrap(),
        22
    );
    assert!(matches!(
        log.append_with_lsn(22, write(0, 0, b"y"), Durability::Written),
        Err(Error::LsnNotIncreasing { lsn: 22, last: 22 })
    ));
    assert_eq!(
        log.append_with_lsn(100, write(0, 0, b"y"), Durability::Durable)
            .unwrap()
            .wait()
            .unwrap(),
        100
    );
    assert_eq!(log.next_lsn(), 101);
    // Gaps are skipped by read_from.
    assert_eq!(log.read_from(23, 10, u64::MAX).unwrap()[0].lsn, 100);
}

#[test]
fn cursors_reclaim_space_and_lag() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = create(&dir, 8 * MIB);
    assert_eq!(log.cursor(0), None);
    assert_eq!(
        log.reclaim().unwrap(),
        0,
        "nothing is reclaimed without a registered slink"
    );
    log.register_slink(0, 0).unwrap();
    log.register_slink(3, 0).unwrap();
    let before = log.space();
    assert_eq!(before.used_bytes, 0);
    for i in 1..=10u64 {
        log.append(write(0, 0, &payload(i, 4096)), Durability::Durable)
            .unwrap()
            .wait()
            .unwrap();
    }
    let space = log.space();
    assert_eq!(space.entries, 10);
    assert_eq!(space.used_bytes + space.free_bytes, space.capacity_bytes);
    assert!(space.used_bytes >= 10 * (4096 + 128));
    let lag = log.lag(0).unwrap();
    assert_eq!((lag.ios, lag.bytes), (10, 40960));
    assert!(lag.oldest_timestamp_ns.unwrap() > 0);
    assert!(log.lag(1).is_none());
    log.set_cursor(0, 6).unwrap();
    assert!(matches!(
        log.set_cursor(0, 5),
        Err(Error::CursorBackwards {
            slink: 0,
            current: 6,
            requested: 5
        })
    ));
    assert!(matches!(
        log.set_cursor(1, 5),
        Err(Error::SlinkNotRegistered { slink: 1 })
    ));
    assert!(matches!(log.set_cursor(16, 5), Err(Error::BadSlink { .. })));
    assert_eq!(log.lag(0).unwrap().ios, 4);
    assert_eq!(log.reclaim().unwrap(), 0, "slink 3 still holds everything");
    log.set_cursor(3, 4).unwrap();
    let freed = log.reclaim().unwrap();
    assert!(freed >= 4 * (4096 + 128), "freed {freed}");
    assert_eq!(log.first_lsn(), 5);
    assert!(matches!(log.read(4), Err(Error::NotFound { lsn: 4 })));
    log.unregister_slink(3).unwrap();
    assert!(log.reclaim().unwrap() > 0);
    assert_eq!(log.first_lsn(), 7);
    drop(log);
    let (log, report) = Replog::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!((report.first_lsn, report.last_lsn), (7, 10));
    assert_eq!(log.cursor(0), Some(6));
    assert_eq!(log.cursor(3), None);
    log.set_cursor(0, 10).unwrap();
    log.reclaim().unwrap();
    assert_eq!(
        (log.first_lsn(), log.last_lsn(), log.next_lsn()),
        (0, 0, 11)
    );
    assert_eq!(log.space().used_bytes, 0);
    drop(log);
    let (log, report) = Replog::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!((report.entries, report.next_lsn), (0, 11));
    assert_eq!(
        log.append(write(0, 0, b"z"), Durability::Durable)
            .unwrap()
            .wait()
            .unwrap(),
        11
    );
}

#[test]
fn full_and_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let ring = 64 * 1024;
    let (_path, log) = create(&dir, 8192 + ring);
    log.register_slink(0, 0).unwrap();
    let big = vec![1u8; 40 * 1024];
    assert!(matches!(
        log.append(write(0, 0, &big), Durability::Written),
        Err(Error::TooLarge { len: 40960, .. })
    ));
    let chunk = vec![2u8; 8000];
    let mut n = 0;
    let err = loop {
        match log.append(write(0, 0, &chunk), Durability::Written) {
            Ok(h) => {
                h.wait().unwrap();
                n += 1;
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::Full { .. }), "{err}");
    assert!(n >= 6, "only {n} appends fit");
    log.set_cursor(0, 3).unwrap();
    assert!(log.reclaim().unwrap() > 0);
    log.append(write(0, 0, &chunk), Durability::Durable)
        .unwrap()
        .wait()
        .unwrap();
}

#[test]
fn wraps_many_laps_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let ring = 64 * 1024;
    let (path, log) = create(&dir, 8192 + ring);
    log.register_slink(0, 0).unwrap();
    let mut log = log;
    let mut next = 1u64;
    for round in 0..40u64 {
        for _ in 0..3 {
            let len = ((next * 977) % 7000 + 1) as usize;
            let h = log
                .append(write(0, next, &payload(next, len)), Durability::Durable)
                .unwrap();
            assert_eq!(h.wait().unwrap(), next);
            next += 1;
        }
        // Keep the last entry, reclaim the rest.
        log.set_cursor(0, next - 2).unwrap();
        log.reclaim().unwrap();
        if round % 7 == 0 {
            drop(log);
            let (reopened, report) = Replog::open(&path, &OpenOptions::default()).unwrap();
            assert_eq!(
                (report.first_lsn, report.last_lsn),
                (next - 1, next - 1),
                "{report:?}"
            );
            log = reopened;
        }
        let e = log.read(next - 1).unwrap();
        assert_eq!(
            e.data,
            payload(next - 1, ((next - 1) * 977 % 7000 + 1) as usize)
        );
    }
    let insp = Replog::inspect(&path, 0, 10).unwrap();
    assert!(
        insp.head_vpos > 10 * ring,
        "40 rounds of ~10 KiB cross several laps"
    );
}

#[test]
fn concurrent_appenders_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = create(&dir, 64 * MIB);
    let log = Arc::new(log);
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut got = Vec::new();
                for i in 0..100u64 {
                    let data = payload(i + u64::from(t) * 1000, 4096);
                    let lsn = log
                        .append(write(t, i * 4096, &data), Durability::Durable)
                        .unwrap()
                        .wait()
                        .unwrap();
                    got.push((lsn, data));
                }
                got
            })
        })
        .collect();
    let mut all: Vec<(u64, Vec<u8>)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort_by_key(|(lsn, _)| *lsn);
    assert_eq!(
        all.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        (1..=800).collect::<Vec<_>>()
    );
    drop(log);
    let (log, report) = Replog::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(report.entries, 800);
    let entries = log.read_from(1, 1000, u64::MAX).unwrap();
    for (e, (lsn, data)) in entries.iter().zip(&all) {
        assert_eq!((e.lsn, &e.data), (*lsn, data));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn appending_is_awaitable() {
    let dir = tempfile::tempdir().unwrap();
    let (_path, log) = create(&dir, 8 * MIB);
    let a = log
        .append(write(0, 0, b"abc"), Durability::Durable)
        .unwrap();
    assert_eq!(a.lsn(), 1);
    assert_eq!(a.await.unwrap(), 1);
    assert_eq!(log.flush().await.unwrap(), 1);
}

#[test]
fn inspect_is_read_only_and_serializes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, log) = create(&dir, 8 * MIB);
    log.register_slink(2, 0).unwrap();
    for i in 1..=5u64 {
        log.append(write(1, i, &payload(i, 100)), Durability::Durable)
            .unwrap()
            .wait()
            .unwrap();
    }
    log.set_cursor(2, 3).unwrap();
    drop(log);
    let before = std::fs::read(&path).unwrap();
    let insp = Replog::inspect(&path, 0, 3).unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "inspect must not modify the file"
    );
    assert_eq!(
        (insp.entries_total, insp.first_lsn, insp.last_lsn),
        (5, 1, 5)
    );
    assert_eq!(insp.entries.len(), 3);
    assert_eq!(insp.slinks.len(), 1);
    assert_eq!(
        (
            insp.slinks[0].slink,
            insp.slinks[0].cursor,
            insp.slinks[0].lag.ios
        ),
        (2, 3, 2)
    );
    let json = serde_json::to_value(&insp).unwrap();
    assert_eq!(json["entries"][0]["lsn"], 1);
    assert_eq!(json["slinks"][0]["lag"]["bytes"], 200);
}

#[test]
fn replog_at_an_offset_inside_a_bigger_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dev");
    std::fs::write(&path, vec![0xAB; 1 << 20]).unwrap();
    let opts = CreateOptions {
        offset: 1 << 20,
        size: 4 * MIB,
        io: Default::default(),
    };
    let log = Replog::create(&path, &opts).unwrap();
    log.append(write(0, 0, b"hello"), Durability::Durable)
        .unwrap()
        .wait()
        .unwrap();
    drop(log);
    let data = std::fs::read(&path).unwrap();
    assert!(
        data[..1 << 20].iter().all(|b| *b == 0xAB),
        "bytes before the offset untouched"
    );
    let (log, report) = Replog::open(
        &path,
        &OpenOptions {
            offset: 1 << 20,
            io: Default::default(),
        },
    )
    .unwrap();
    assert_eq!(report.entries, 1);
    assert_eq!(log.read(1).unwrap().data, b"hello");
    assert!(matches!(
        Replog::create(
            &path,
            &CreateOptions {
                offset: 100,
                size: 4 * MIB,
                io: Default::default()
            }
        ),
        Err(Error::InvalidOptions { .. })
    ));
}
