//! Crash consistency: images built from durably written bytes only (torn sectors included) and
//! the model-based property test (append / cursor advance / reclaim / crash / reopen).
//!
//! Rule checked after every crash: open() returns a contiguous run of the appended sequence with
//! identical content, containing every entry whose append was acknowledged with the durability the
//! crash respects (Durable for a power loss, Written or Durable for a process crash) and that was
//! not reclaimed by a successful reclaim(); never a torn, stale or foreign entry.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use replog::storage::MemDisk;
use replog::{Durability, EntryKind, Record, Replog};

const RING: u64 = 64 * 1024;
const SIZE: u64 = 8192 + RING;

fn payload(lsn: u64, salt: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (lsn * 131 + salt * 17 + i as u64 * 7) as u8)
        .collect()
}

/// What the test knows about the history.
#[derive(Default, Clone)]
struct History {
    /// Every append that got an lsn, in order (may be lost by a crash if not acknowledged).
    appended: Vec<(u64, Vec<u8>)>,
    /// lsn -> acknowledged durability.
    acked: BTreeMap<u64, Durability>,
    /// Entries <= this were reclaimed by a successful reclaim().
    reclaimed_through: u64,
    /// Entries <= this may have been reclaimed (a reclaim that failed may still have reached disk).
    maybe_reclaimed_through: u64,
}

fn check_recovered(log: &Replog, history: &History, power_loss: bool) -> Vec<(u64, Vec<u8>)> {
    let entries = log.read_from(0, usize::MAX, u64::MAX).unwrap();
    let got: Vec<(u64, Vec<u8>)> = entries.into_iter().map(|e| (e.lsn, e.data)).collect();
    if let Some((first, _)) = got.first() {
        let at = history
            .appended
            .iter()
            .position(|(l, _)| l == first)
            .unwrap_or_else(|| panic!("recovered lsn {first} was never appended"));
        let run = &history.appended[at..];
        assert!(
            got.len() <= run.len(),
            "more entries recovered than appended"
        );
        for (g, want) in got.iter().zip(run) {
            assert_eq!(
                g.0, want.0,
                "recovered lsns are not a contiguous run of the history"
            );
            assert_eq!(g.1, want.1, "lsn {} recovered with other content", g.0);
        }
        assert!(
            *first > history.reclaimed_through,
            "lsn {first} recovered although a durable reclaim freed through {}",
            history.reclaimed_through
        );
    }
    for (lsn, durability) in &history.acked {
        if *lsn
            <= history
                .reclaimed_through
                .max(history.maybe_reclaimed_through)
        {
            continue;
        }
        let required = !power_loss || *durability == Durability::Durable;
        if required {
            assert!(
                got.iter().any(|(l, _)| l == lsn),
                "acknowledged ({durability:?}) lsn {lsn} lost by a {} crash; recovered {:?}",
                if power_loss { "power-loss" } else { "process" },
                got.iter().map(|g| g.0).collect::<Vec<_>>()
            );
        }
    }
    got
}

fn write_rec(data: &[u8]) -> Record<'_> {
    Record {
        device: 0,
        offset: 0,
        kind: EntryKind::Write,
        len: data.len() as u64,
        data,
    }
}

/// A workload that stops writing (disk dies) after `fail_after` write calls.
fn workload(disk: &Arc<MemDisk>, log: &Replog, history: &mut History, salt: u64, steps: u64) {
    for step in 0..steps {
        let len = ((step * 1237 + salt * 71) % 5000 + 1) as usize;
        let lsn = log.next_lsn();
        let data = payload(lsn, salt, len);
        let durability = if step % 3 == 0 {
            Durability::Written
        } else {
            Durability::Durable
        };
        match log.append(write_rec(&data), durability) {
            Ok(h) => {
                assert_eq!(h.lsn(), lsn);
                history.appended.push((lsn, data));
                if h.wait().is_ok() {
                    history.acked.insert(lsn, durability);
                }
            }
            Err(replog::Error::Full { .. }) => {
                let target = log.last_lsn().saturating_sub(2);
                if log
                    .set_cursor(0, target.max(log.cursor(0).unwrap_or(0)))
                    .is_ok()
                {
                    history.maybe_reclaimed_through =
                        history.maybe_reclaimed_through.max(log.cursor(0).unwrap());
                    if log.reclaim().is_ok() {
                        history.reclaimed_through = log
                            .first_lsn()
                            .saturating_sub(1)
                            .max(history.reclaimed_through);
                    }
                }
            }
            Err(_) => return,
        }
        let _ = disk;
    }
}

#[test]
fn crash_at_every_write_point() {
    for fail_after in 0..60u64 {
        let disk = MemDisk::new(SIZE, 512);
        let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
        log.register_slink(0, 0).unwrap();
        disk.fail_writes_after(Some(fail_after));
        let mut history = History::default();
        workload(&disk, &log, &mut history, fail_after, 40);
        let images: Vec<(Vec<u8>, bool)> = std::iter::once((disk.current_image(), false))
            .chain(std::iter::once((disk.durable_image(), true)))
            .chain((0..4).map(|seed| (disk.power_loss_image(seed * 1000 + fail_after), true)))
            .collect();
        drop(log);
        for (image, power_loss) in images {
            let disk2 = MemDisk::from_image(image, 512);
            let (log2, report) = Replog::open_on(disk2.clone(), 0).unwrap();
            let recovered = check_recovered(&log2, &history, power_loss);
            assert_eq!(report.entries as usize, recovered.len());
            // Append a shorter run after the crash, crash again (power loss), and check that no
            // leftover of the first life validates behind the new entries.
            let mut h2 = History {
                appended: recovered.clone(),
                acked: recovered
                    .iter()
                    .map(|(l, _)| (*l, Durability::Durable))
                    .collect(),
                reclaimed_through: 0,
                maybe_reclaimed_through: 0,
            };
            for i in 0..2u64 {
                let lsn = log2.next_lsn();
                let data = payload(lsn, 999 + i, 200);
                match log2.append(write_rec(&data), Durability::Durable) {
                    Ok(h) => {
                        h2.appended.push((lsn, data));
                        h2.acked.insert(lsn, Durability::Durable);
                        h.wait().unwrap();
                    }
                    Err(replog::Error::Full { .. }) => break,
                    Err(e) => panic!("{e}"),
                }
            }
            let image2 = disk2.durable_image();
            drop(log2);
            let (log3, _) = Replog::open_on(MemDisk::from_image(image2, 512), 0).unwrap();
            let again = check_recovered(&log3, &h2, true);
            assert_eq!(
                again.len(),
                h2.appended.len(),
                "exactly the durable entries, no leftovers"
            );
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Append { len: usize, durable: bool, kind: u8 },
    Advance { keep: u64 },
    Reclaim,
    Crash { power_loss: bool, seed: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..9000, any::<bool>(), 0u8..6).prop_map(|(len, durable, kind)| Op::Append { len, durable, kind }),
        2 => (0u64..5).prop_map(|keep| Op::Advance { keep }),
        2 => Just(Op::Reclaim),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(power_loss, seed)| Op::Crash { power_loss, seed }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn model_append_advance_reclaim_crash(ops in proptest::collection::vec(op(), 1..120)) {
        let mut disk = MemDisk::new(SIZE, 512);
        let mut log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
        log.register_slink(0, 0).unwrap();
        let mut history = History::default();
        let mut salt = 0u64;
        for op in ops {
            salt += 1;
            match op {
                Op::Append { len, durable, kind } => {
                    let lsn = log.next_lsn();
                    let data = if kind == 0 { Vec::new() } else { payload(lsn, salt, len) };
                    let rec = if kind == 0 {
                        Record { device: 1, offset: 4096, kind: EntryKind::Zeroes, len: len as u64, data: &[] }
                    } else {
                        write_rec(&data)
                    };
                    let durability = if durable { Durability::Durable } else { Durability::Written };
                    match log.append(rec, durability) {
                        Ok(h) => {
                            history.appended.push((lsn, data));
                            prop_assert_eq!(h.wait().unwrap(), lsn);
                            history.acked.insert(lsn, durability);
                        }
                        Err(replog::Error::Full { .. }) => {}
                        Err(e) => panic!("append: {e}"),
                    }
                }
                Op::Advance { keep } => {
                    let target = log.last_lsn().saturating_sub(keep).max(log.cursor(0).unwrap());
                    log.set_cursor(0, target).unwrap();
                }
                Op::Reclaim => {
                    log.reclaim().unwrap();
                    let through = if log.first_lsn() == 0 { log.next_lsn() - 1 } else { log.first_lsn() - 1 };
                    history.reclaimed_through = history.reclaimed_through.max(through);
                    let lag = log.lag(0).unwrap();
                    prop_assert_eq!(lag.ios, log.space().entries - (log.cursor(0).unwrap().saturating_sub(log.first_lsn().max(1) - 1)).min(log.space().entries));
                }
                Op::Crash { power_loss, seed } => {
                    let image = if power_loss { disk.power_loss_image(seed) } else { disk.current_image() };
                    let cursor = log.cursor(0).unwrap();
                    drop(log);
                    disk = MemDisk::from_image(image, 512);
                    let (reopened, report) = Replog::open_on(disk.clone(), 0).unwrap();
                    log = reopened;
                    let got = check_recovered(&log, &history, power_loss);
                    prop_assert_eq!(report.entries as usize, got.len());
                    prop_assert!(log.cursor(0).unwrap() <= cursor);
                    // Forget what the crash lost: the history continues from what was recovered.
                    let keep_from = history.appended.iter().position(|(l, _)| Some(l) == got.first().map(|g| &g.0));
                    if let Some(at) = keep_from {
                        history.appended.truncate(at + got.len());
                    } else {
                        history.appended.retain(|(l, _)| *l <= history.reclaimed_through);
                    }
                    let last = got.last().map(|g| g.0).unwrap_or(0);
                    history.acked.retain(|l, _| *l <= last);
                }
            }
        }
    }
}

/// Concurrent appenders while the disk dies at a random write: every acknowledged Durable append
/// survives a power loss, and what is recovered is a contiguous run of the appended history.
#[test]
fn concurrent_appenders_then_power_loss() {
    for fail_after in [3u64, 7, 12, 20, 33, 50] {
        let disk = MemDisk::new(8192 + 1024 * 1024, 512);
        let log = Arc::new(Replog::create_on(disk.clone(), 0, 8192 + 1024 * 1024).unwrap());
        disk.fail_writes_after(Some(fail_after));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    for i in 0..40u64 {
                        let data = payload(t * 1000 + i, t, 500 + (i as usize * 37) % 3000);
                        let durability = if i % 2 == 0 {
                            Durability::Durable
                        } else {
                            Durability::Written
                        };
                        match log.append(write_rec(&data), durability) {
                            Ok(h) => {
                                let lsn = h.lsn();
                                let acked = h.wait().is_ok();
                                out.push((lsn, data, acked.then_some(durability)));
                            }
                            Err(_) => break,
                        }
                    }
                    out
                })
            })
            .collect();
        let mut all: Vec<_> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        all.sort_by_key(|(lsn, _, _)| *lsn);
        let history = History {
            appended: all.iter().map(|(l, d, _)| (*l, d.clone())).collect(),
            acked: all
                .iter()
                .filter_map(|(l, _, a)| a.map(|a| (*l, a)))
                .collect(),
            reclaimed_through: 0,
            maybe_reclaimed_through: 0,
        };
        let images = [
            disk.durable_image(),
            disk.power_loss_image(fail_after),
            disk.power_loss_image(fail_after + 1),
        ];
        drop(log);
        for image in images {
            let (log2, _) = Replog::open_on(MemDisk::from_image(image, 512), 0).unwrap();
            check_recovered(&log2, &history, true);
        }
    }
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Replog>();
    send::<replog::Appending>();
}

/// A metadata-style durable write survives every power loss; the unsynced writes around it do
/// not become durable with it, and an older unsynced write of its range cannot reappear.
#[test]
fn memdisk_write_durable_is_durable_alone() {
    use replog::io::AlignedBuf;
    use replog::storage::Storage;
    let disk = MemDisk::new(16 * 4096, 512);
    let filled = |byte: u8| {
        let mut b = AlignedBuf::zeroed(4096);
        b.fill(byte);
        b
    };
    disk.write_at(0, filled(1)).unwrap(); // unsynced, same range as the durable write
    disk.write_at(4096, filled(2)).unwrap(); // unsynced, elsewhere
    disk.write_durable_at(0, filled(3)).unwrap();
    let durable = disk.durable_image();
    assert!(durable[..4096].iter().all(|&b| b == 3));
    assert!(durable[4096..8192].iter().all(|&b| b == 0));
    for seed in 0..32 {
        let image = disk.power_loss_image(seed);
        assert!(image[..4096].iter().all(|&b| b == 3), "seed {seed}");
    }
    assert!(disk.current_image()[4096..8192].iter().all(|&b| b == 2));
}

/// Cursor and tail updates no longer sync the ring: after appends that were only Written, a
/// cursor move and a reclaim, a power loss that keeps no unsynced ring byte still opens, at the
/// durable tail, with nothing torn.
#[test]
fn reclaim_without_ring_sync_recovers_after_power_loss() {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    log.register_slink(0, 0).unwrap();
    let mut last = 0;
    for i in 0..8u64 {
        let data = payload(i + 1, 7, 1000);
        let h = log.append(write_rec(&data), Durability::Written).unwrap();
        last = h.lsn();
        h.wait().unwrap();
    }
    log.set_cursor(0, 4).unwrap();
    log.reclaim().unwrap();
    let first_after = log.first_lsn();
    drop(log);
    let (log2, _) = Replog::open_on(MemDisk::from_image(disk.durable_image(), 512), 0).unwrap();
    // Nothing after the tail was durable: the log is empty, and numbering continues after it.
    assert_eq!(log2.last_lsn(), 0);
    assert!(log2.next_lsn() >= first_after.min(5));
    assert!(log2.next_lsn() <= last + 1);
    assert_eq!(log2.cursor(0), Some(4));
}
