//! The two ways a batch gets written (see `writer.rs`): by the waiting appender itself when the
//! log is idle (leader), or by the I/O thread (async handles, dropped handles, busy pipeline),
//! and `written_lsn` / `is_direct`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use replog::storage::MemDisk;
use replog::{CreateOptions, Durability, EntryKind, Error, Record, Replog};

const MIB: u64 = 1 << 20;

fn write(offset: u64, data: &[u8]) -> Record<'_> {
    Record {
        device: 0,
        offset,
        kind: EntryKind::Write,
        len: data.len() as u64,
        data,
    }
}

fn create(dir: &tempfile::TempDir) -> Replog {
    let opts = CreateOptions {
        offset: 0,
        size: 8 * MIB,
        io: Default::default(),
    };
    Replog::create(&dir.path().join("replog"), &opts).unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn written_lsn_and_is_direct() {
    let dir = tempfile::tempdir().unwrap();
    let log = create(&dir);
    let probe = replog::io::IoFile::open(&dir.path().join("replog"), false, &Default::default())
        .unwrap()
        .is_direct();
    assert_eq!(log.is_direct(), probe);
    assert_eq!(log.written_lsn(), 0);
    let lsn = log
        .append(write(0, &[1; 4096]), Durability::Written)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(lsn, 1);
    assert_eq!(log.written_lsn(), 1);

    let mem = Replog::create_on(MemDisk::new(2 * MIB, 512), 0, 2 * MIB).unwrap();
    assert!(!mem.is_direct());
}

#[test]
fn waiting_appender_writes_the_whole_deferred_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = create(&dir);
    // Both land in the same deferred batch of the idle log.
    let first = log
        .append(write(0, &[1; 4096]), Durability::Written)
        .unwrap();
    let second = log
        .append(write(4096, &[2; 512]), Durability::Written)
        .unwrap();
    assert_eq!(
        log.written_lsn(),
        0,
        "nothing is written before someone waits"
    );
    assert_eq!(second.wait().unwrap(), 2);
    assert_eq!(log.written_lsn(), 2);
    assert!(first.is_done());
    assert_eq!(first.wait().unwrap(), 1);
    assert_eq!(log.read(1).unwrap().data, vec![1; 4096]);
    assert_eq!(log.read(2).unwrap().data, vec![2; 512]);
}

#[test]
fn a_dropped_handle_still_gets_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = create(&dir);
    drop(
        log.append(write(0, &[3; 4096]), Durability::Written)
            .unwrap(),
    );
    wait_until("the dropped append's write", || log.written_lsn() == 1);
    assert_eq!(log.read(1).unwrap().data, vec![3; 4096]);
}

#[test]
fn polling_is_done_starts_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let log = create(&dir);
    let handle = log
        .append(write(0, &[4; 4096]), Durability::Durable)
        .unwrap();
    wait_until("is_done", || handle.is_done());
    assert_eq!(handle.wait().unwrap(), 1);
}

#[test]
fn a_flush_starts_a_deferred_batch_and_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = create(&dir);
    let handle = log
        .append(write(0, &[5; 4096]), Durability::Written)
        .unwrap();
    assert_eq!(log.flush().wait().unwrap(), 1);
    assert!(handle.is_done());
    assert_eq!(log.written_lsn(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn awaited_appends_go_through_the_io_thread() {
    let dir = tempfile::tempdir().unwrap();
    let log = create(&dir);
    for i in 1..=50u64 {
        let durability = if i % 10 == 0 {
            Durability::Durable
        } else {
            Durability::Written
        };
        let lsn = log
            .append(write(i * 4096, &[i as u8; 4096]), durability)
            .unwrap()
            .await
            .unwrap();
        assert_eq!(lsn, i);
        assert_eq!(log.written_lsn(), i);
    }
}

/// Blocking waiters (leaders when they find the log idle), async waiters and droppers at once:
/// every append resolves, `written_lsn` only covers written entries, and everything reads back.
#[test]
fn mixed_waiters_under_concurrency() {
    const THREADS: u64 = 6;
    const PER_THREAD: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(create(&dir));
    let runtime = Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap(),
    );
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = Arc::clone(&log);
            let runtime = Arc::clone(&runtime);
            std::thread::spawn(move || {
                let mut dropped = Vec::new();
                for i in 0..PER_THREAD {
                    let data = vec![(t * PER_THREAD + i) as u8; 1024 + 512 * (i as usize % 8)];
                    let durability = if i % 7 == 0 {
                        Durability::Durable
                    } else {
                        Durability::Written
                    };
                    let handle = log.append(write(t << 32 | i, &data), durability).unwrap();
                    let lsn = handle.lsn();
                    match (t + i) % 3 {
                        0 => assert_eq!(handle.wait().unwrap(), lsn),
                        1 => assert_eq!(runtime.block_on(handle).unwrap(), lsn),
                        _ => {
                            drop(handle);
                            dropped.push(lsn);
                        }
                    }
                    assert!(log.written_lsn() >= lsn || (t + i) % 3 == 2);
                }
                dropped
            })
        })
        .collect();
    let dropped: Vec<u64> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let last = THREADS * PER_THREAD;
    assert_eq!(log.flush().wait().unwrap(), last);
    assert_eq!(log.written_lsn(), last);
    assert!(!dropped.is_empty());
    let entries = log.read_from(1, usize::MAX, u64::MAX).unwrap();
    assert_eq!(entries.len() as u64, last);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.lsn, i as u64 + 1);
        let t = e.offset >> 32;
        let n = e.offset & 0xffff_ffff;
        assert_eq!(
            e.data,
            vec![(t * PER_THREAD + n) as u8; 1024 + 512 * (n as usize % 8)]
        );
    }
}

#[test]
fn a_failed_leader_write_fails_the_log() {
    let disk = MemDisk::new(2 * MIB, 512);
    let log = Replog::create_on(disk.clone(), 0, 2 * MIB).unwrap();
    disk.fail_writes_after(Some(0));
    let handle = log
        .append(write(0, &[6; 4096]), Durability::Written)
        .unwrap();
    assert!(matches!(handle.wait(), Err(Error::Failed { .. })));
    assert_eq!(log.written_lsn(), 0);
    assert!(matches!(
        log.append(write(0, &[6; 512]), Durability::Written),
        Err(Error::Failed { .. })
    ));
}

/// A Durable append written by a leader leaves every earlier append durable: the power-loss image
/// (only synced bytes) recovers all of them.
#[test]
fn a_leaders_sync_covers_earlier_appends() {
    let disk = MemDisk::new(2 * MIB, 512);
    let log = Replog::create_on(disk.clone(), 0, 2 * MIB).unwrap();
    for i in 1..=5u64 {
        let h = log
            .append(write(i * 4096, &[i as u8; 4096]), Durability::Written)
            .unwrap();
        if i % 2 == 0 {
            h.wait().unwrap();
        }
    }
    log.append(write(0, &[9; 512]), Durability::Durable)
        .unwrap()
        .wait()
        .unwrap();
    let (reopened, report) =
        Replog::open_on(MemDisk::from_image(disk.durable_image(), 512), 0).unwrap();
    assert_eq!(report.last_lsn, 6);
    for i in 1..=5u64 {
        assert_eq!(reopened.read(i).unwrap().data, vec![i as u8; 4096]);
    }
}

/// `sync_written` makes what is written durable (the power-loss image recovers it) and covers
/// nothing that was not written when it began.
#[test]
fn a_sync_beside_the_pipeline_makes_every_written_entry_durable() {
    let disk = MemDisk::new(2 * MIB, 512);
    let log = Replog::create_on(disk.clone(), 0, 2 * MIB).unwrap();
    for i in 1..=4u64 {
        log.append(write(i * 4096, &[i as u8; 4096]), Durability::Written)
            .unwrap()
            .wait()
            .unwrap();
    }
    assert_eq!(
        log.durable_lsn(),
        0,
        "the test needs entries that are not durable"
    );
    assert_eq!(log.sync_written().unwrap(), 4);
    assert_eq!(log.durable_lsn(), 4);
    // Nothing new written: no sync, same answer.
    assert_eq!(log.sync_written().unwrap(), 4);
    let (reopened, report) =
        Replog::open_on(MemDisk::from_image(disk.durable_image(), 512), 0).unwrap();
    assert_eq!(report.last_lsn, 4);
    for i in 1..=4u64 {
        assert_eq!(reopened.read(i).unwrap().data, vec![i as u8; 4096]);
    }
}

/// On a real file, with appends in flight on another thread: the durable lsn it reports only
/// grows and never passes the written lsn.
#[test]
fn a_sync_beside_the_pipeline_never_claims_more_than_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(create(&dir));
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for i in 0..1000u64 {
                let h = log
                    .append(
                        write((i % 256) * 4096, &[i as u8; 4096]),
                        Durability::Written,
                    )
                    .unwrap();
                if i % 8 == 0 {
                    h.wait().unwrap();
                }
            }
        })
    };
    let mut last = 0;
    while !writer.is_finished() {
        let durable = log.sync_written().unwrap();
        assert!(
            durable >= last,
            "durable lsn went back: {last} -> {durable}"
        );
        assert!(
            durable <= log.written_lsn(),
            "durable {durable} above written {}",
            log.written_lsn()
        );
        last = durable;
    }
    writer.join().unwrap();
    log.flush().wait().unwrap();
    assert_eq!(log.sync_written().unwrap(), 1000);
}
