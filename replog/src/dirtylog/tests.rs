//! Dirty log tests: bitmap operations against a model, persistence, refusal of bad files, crash
//! safety of persist (torn page writes), and golden byte vectors (DIRTYLOG.md) in both directions.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;

use super::format::{self, PAGE_BYTES, REGIONS_PER_PAGE};
use super::*;

const KIB: u64 = 1024;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("replog-dirtylog-test")
        .tempdir()
        .unwrap()
}

fn regions_of(log: &DirtyLog) -> Vec<u64> {
    log.dirty_regions().collect()
}

#[test]
fn core_mark_clear_count_iterate() {
    // 10 full regions of 64 KiB and a last one of 4 KiB.
    let size = 10 * 64 * KIB + 4 * KIB;
    let mut log = DirtyLog::core(size, 64 * KIB, false).unwrap();
    assert!(!log.is_persistent());
    assert_eq!(log.regions(), 11);
    assert_eq!(log.dirty_count(), 0);
    assert_eq!(log.mark_range(0, 1), 1);
    assert_eq!(
        log.mark_range(64 * KIB - 1, 2),
        1,
        "straddles regions 0 and 1"
    );
    assert_eq!(
        log.mark_range(5 * 64 * KIB, 64 * KIB),
        1,
        "exactly region 5"
    );
    assert_eq!(
        log.mark_range(size - 1, 1_000_000),
        1,
        "clipped at the device end"
    );
    assert_eq!(log.mark_range(size, 4096), 0, "beyond the device");
    assert_eq!(log.mark_range(0, 0), 0);
    assert_eq!(regions_of(&log), vec![0, 1, 5, 10]);
    assert_eq!(log.dirty_count(), 4);
    assert_eq!(log.dirty_bytes(), 3 * 64 * KIB + 4 * KIB);
    assert!(log.clear_region(1));
    assert!(!log.clear_region(1));
    assert!(!log.clear_region(99));
    assert!(!log.is_dirty(99));
    assert_eq!(regions_of(&log), vec![0, 5, 10]);
    assert_eq!(log.region_range(10), 10 * 64 * KIB..size);
    log.persist().unwrap();
    let all = DirtyLog::core(size, 64 * KIB, true).unwrap();
    assert_eq!(all.dirty_count(), 11);
    assert_eq!(all.dirty_bytes(), size);
}

#[test]
fn invalid_geometry_refused() {
    for (size, region) in [(0, 4096), (4096, 0), (u64::MAX, 512)] {
        let err = DirtyLog::core(size, region, false).unwrap_err();
        assert!(matches!(err, DirtyLogError::InvalidGeometry(_)), "{err}");
    }
}

#[test]
fn disk_round_trip_and_unpersisted_changes_are_not_durable() {
    let dir = scratch();
    let path = dir.path().join("dirty");
    let size = 3 * REGIONS_PER_PAGE * 512 + 512; // 4 pages of 512-byte regions
    let mut log = DirtyLog::create_disk(&path, size, 512, false).unwrap();
    assert!(log.is_persistent());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), format::file_len(4));
    let marks = [
        0,
        1,
        REGIONS_PER_PAGE - 1,
        REGIONS_PER_PAGE,
        2 * REGIONS_PER_PAGE + 7,
        3 * REGIONS_PER_PAGE,
    ];
    for r in marks {
        log.mark_region(r);
    }
    assert_eq!(log.unpersisted_pages(), 4);
    log.persist().unwrap();
    assert_eq!(log.unpersisted_pages(), 0);
    log.mark_region(5);
    log.clear_region(0);
    drop(log); // not persisted
    let mut log = DirtyLog::open_disk(&path, size, 512).unwrap();
    assert_eq!(regions_of(&log), marks.to_vec());
    // Several persists alternate slots; every reopen sees the latest.
    for round in 0..5u64 {
        log.clear_region(marks[round as usize]);
        log.mark_region(100 + round);
        log.persist().unwrap();
        let reopened = DirtyLog::open_disk(&path, size, 512).unwrap();
        assert_eq!(regions_of(&reopened), regions_of(&log), "round {round}");
        assert_eq!(reopened.dirty_count(), log.dirty_count());
    }
}

#[test]
fn initially_dirty_disk_log() {
    let dir = scratch();
    let path = dir.path().join("dirty");
    DirtyLog::create_disk(&path, 100 * 4096, 4096, true).unwrap();
    let log = DirtyLog::open_disk(&path, 100 * 4096, 4096).unwrap();
    assert_eq!(log.dirty_count(), 100);
    assert_eq!(regions_of(&log), (0..100).collect::<Vec<_>>());
}

#[test]
fn create_refuses_to_overwrite_and_open_or_create_reuses() {
    let dir = scratch();
    let path = dir.path().join("dirty");
    let mut log = DirtyLog::open_or_create_disk(&path, 1 << 20, 4096, false).unwrap();
    log.mark_region(7);
    log.persist().unwrap();
    let err = DirtyLog::create_disk(&path, 1 << 20, 4096, true).unwrap_err();
    assert!(err.to_string().contains("exists"), "{err}");
    let log = DirtyLog::open_or_create_disk(&path, 1 << 20, 4096, true).unwrap();
    assert_eq!(regions_of(&log), vec![7], "reopened, not recreated");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");
}

fn expect_refused(path: &std::path::Path, size: u64, region: u64, needle: &str) {
    let err = DirtyLog::open_disk(path, size, region).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
    assert!(msg.contains(&path.display().to_string()), "path in {msg:?}");
}

#[test]
fn bad_files_refused_with_clear_errors() {
    let dir = scratch();
    let path = dir.path().join("dirty");
    let size = 1 << 20;
    DirtyLog::create_disk(&path, size, 4096, false).unwrap();
    let good = std::fs::read(&path).unwrap();
    let other = dir.path().join("other");

    std::fs::write(&other, vec![0xA5u8; good.len()]).unwrap();
    expect_refused(&other, size, 4096, "not a dirty log");
    std::fs::write(&other, b"").unwrap();
    expect_refused(&other, size, 4096, "0 bytes");
    std::fs::write(&other, good.get(..good.len() - 100).unwrap()).unwrap();
    expect_refused(&other, size, 4096, "truncated");
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4096]);
    std::fs::write(&other, &longer).unwrap();
    expect_refused(&other, size, 4096, "expected");
    expect_refused(&path, size * 2, 4096, "device size 1048576");
    expect_refused(&path, size, 8192, "region size 4096");

    let mut bad_version = good.clone();
    bad_version[8] = 9;
    std::fs::write(&other, &bad_version).unwrap();
    expect_refused(&other, size, 4096, "version 9 is not supported");

    let mut bad_header = good.clone();
    bad_header[30] ^= 1; // a geometry byte
    std::fs::write(&other, &bad_header).unwrap();
    expect_refused(&other, size, 4096, "header is corrupt");

    let mut both_slots = good.clone();
    both_slots[PAGE_BYTES + 100] ^= 1;
    both_slots[2 * PAGE_BYTES + 100] ^= 1;
    std::fs::write(&other, &both_slots).unwrap();
    expect_refused(&other, size, 4096, "both copies are corrupt");

    // One bad slot is survivable: the other copy is used.
    let mut one_slot = good.clone();
    one_slot[PAGE_BYTES + 100] ^= 1;
    std::fs::write(&other, &one_slot).unwrap();
    DirtyLog::open_disk(&other, size, 4096).unwrap();

    // A page from another dirty log file (other file_id) never validates.
    let third = dir.path().join("third");
    DirtyLog::create_disk(&third, size, 4096, true).unwrap();
    let foreign = std::fs::read(&third).unwrap();
    let mut mixed = good.clone();
    mixed[PAGE_BYTES..].copy_from_slice(&foreign[PAGE_BYTES..]);
    std::fs::write(&other, &mixed).unwrap();
    expect_refused(&other, size, 4096, "both copies are corrupt");

    let missing = dir.path().join("missing");
    expect_refused(&missing, size, 4096, "open");
}

/// How the new copy of a page can look on disk after a crash in the middle of its write.
#[derive(Debug, Clone, Copy)]
enum Tear {
    /// The first `n` bytes are new, the rest still the old content of that slot.
    NewPrefix(usize),
    /// The first `n` bytes are new, the rest zeros (e.g. a fresh block).
    ZeroTail(usize),
    /// Fully written (the crash hit after the write but before the sync returned).
    Complete,
}

fn write_torn(path: &std::path::Path, offset: u64, new: &[u8], tear: Tear) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let bytes = match tear {
        Tear::NewPrefix(n) => new[..n].to_vec(),
        Tear::ZeroTail(n) => {
            let mut b = new[..n].to_vec();
            b.resize(PAGE_BYTES, 0);
            b
        }
        Tear::Complete => new.to_vec(),
    };
    file.write_all_at(&bytes, offset).unwrap();
}

#[test]
fn torn_persist_never_loses_durable_marks() {
    let tears = [
        Tear::NewPrefix(0),
        Tear::NewPrefix(8),
        Tear::NewPrefix(512),
        Tear::NewPrefix(2048),
        Tear::NewPrefix(4095),
        Tear::ZeroTail(0),
        Tear::ZeroTail(1024),
        Tear::ZeroTail(4000),
        Tear::Complete,
    ];
    let size = 2 * REGIONS_PER_PAGE * 512; // 2 pages
    for tear in tears {
        for extra_persists in 0..3 {
            let dir = scratch();
            let path = dir.path().join("dirty");
            let mut log = DirtyLog::create_disk(&path, size, 512, false).unwrap();
            // Durable state: a few marks on both pages, after `extra_persists` earlier rounds so
            // the torn write hits either slot.
            for round in 0..=extra_persists {
                log.mark_region(10 + round);
                log.mark_region(REGIONS_PER_PAGE + 10 + round);
                log.persist().unwrap();
            }
            let durable: BTreeSet<u64> = log.dirty_regions().collect();
            // The next persist: new marks and a clear on both pages, then a crash that tears the
            // write of page 0 and never writes page 1.
            log.mark_region(3);
            log.clear_region(10);
            log.mark_region(REGIONS_PER_PAGE + 3);
            let after: BTreeSet<u64> = log.dirty_regions().collect();
            let writes = log.pending_writes();
            assert_eq!(writes.len(), 2);
            write_torn(&path, writes[0].offset, &writes[0].bytes, tear);
            drop(log);

            let reopened = DirtyLog::open_disk(&path, size, 512).unwrap();
            let got: BTreeSet<u64> = reopened.dirty_regions().collect();
            let page0 = |set: &BTreeSet<u64>| -> BTreeSet<u64> {
                set.iter()
                    .copied()
                    .filter(|r| *r < REGIONS_PER_PAGE)
                    .collect()
            };
            let page1 = |set: &BTreeSet<u64>| -> BTreeSet<u64> {
                set.iter()
                    .copied()
                    .filter(|r| *r >= REGIONS_PER_PAGE)
                    .collect()
            };
            assert!(
                page0(&got) == page0(&durable) || page0(&got) == page0(&after),
                "{tear:?}/{extra_persists}: page 0 is the old or the new copy, got {got:?}"
            );
            if matches!(tear, Tear::Complete) {
                assert_eq!(page0(&got), page0(&after), "{tear:?}");
            }
            assert_eq!(
                page1(&got),
                page1(&durable),
                "{tear:?}: page 1 was not written"
            );
            assert_eq!(reopened.dirty_count(), got.len() as u64);

            // The log keeps working after recovery: a later persist makes the new state durable.
            let mut reopened = reopened;
            for r in &after {
                reopened.mark_region(*r);
            }
            if !after.contains(&10) {
                reopened.clear_region(10);
            }
            reopened.persist().unwrap();
            let again = DirtyLog::open_disk(&path, size, 512).unwrap();
            assert_eq!(
                again.dirty_regions().collect::<BTreeSet<_>>(),
                after,
                "{tear:?}"
            );
        }
    }
}

// ---- golden vectors (DIRTYLOG.md "Example") ----

const GOLDEN_FILE_ID: u64 = 0x0123_4567_89AB_CDEF;
const GOLDEN_DEVICE_SIZE: u64 = 10 * 65536 + 4096; // 11 regions of 64 KiB, the last 4 KiB
const GOLDEN_REGION_SIZE: u64 = 65536;

/// Header bytes 0..64 of the example, from DIRTYLOG.md.
const GOLDEN_HEADER_HEX: &str = concat!(
    "52504c4449525459", // magic "RPLDIRTY"
    "01000000",         // version 1
    "00100000",         // page size 4096
    "efcdab8967452301", // file id
    "00100a0000000000", // device size 659456
    "0000010000000000", // region size 65536
    "0b00000000000000", // regions 11
    "0100000000000000", // pages 1
    "5eca04d6",         // crc32c of bytes 0..56
    "00000000",         // zero
);

/// Page 0, slot 1 after marking regions 0, 3, 4, 10 and one persist: bytes 0..34.
const GOLDEN_PAGE_HEX: &str = concat!(
    "444c5047",         // magic "DLPG"
    "e6ea922e",         // crc32c(file id LE ++ bytes 8..4096)
    "0000000000000000", // page index 0
    "0200000000000000", // generation 2
    "0000000000000000", // reserved
    "1904",             // bitmap: regions 0,3,4 (0x19) and 10 (0x04 in byte 1)
);

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn golden_encode() {
    let dir = scratch();
    let path = dir.path().join("dirty");
    let mut log = DirtyLog::create_disk_with_id(
        &path,
        GOLDEN_DEVICE_SIZE,
        GOLDEN_REGION_SIZE,
        false,
        GOLDEN_FILE_ID,
    )
    .unwrap();
    log.mark_range(0, 1);
    log.mark_range(3 * 65536 + 100, 65536);
    log.mark_range(10 * 65536, 4096);
    log.persist().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 3 * PAGE_BYTES);
    assert_eq!(bytes[..64], hex(GOLDEN_HEADER_HEX)[..], "header");
    assert!(bytes[64..PAGE_BYTES].iter().all(|&b| b == 0));
    // Slot 0 still holds the creation copy (generation 1, empty bitmap).
    let slot0 = &bytes[PAGE_BYTES..2 * PAGE_BYTES];
    assert_eq!(&slot0[16..24], &1u64.to_le_bytes());
    assert!(slot0[32..].iter().all(|&b| b == 0));
    let slot1 = &bytes[2 * PAGE_BYTES..];
    assert_eq!(slot1[..34], hex(GOLDEN_PAGE_HEX)[..], "page slot 1");
    assert!(slot1[34..].iter().all(|&b| b == 0));
}

#[test]
fn golden_decode() {
    // The file built from the spec's bytes alone, not by the encoder.
    let mut image = vec![0u8; 3 * PAGE_BYTES];
    image[..64].copy_from_slice(&hex(GOLDEN_HEADER_HEX));
    // Slot 0: generation 1, empty bitmap (creation copy) with its own crc.
    let slot0_hex = concat!(
        "444c5047",
        "b533c104",
        "0000000000000000",
        "0100000000000000",
    );
    image[PAGE_BYTES..PAGE_BYTES + 24].copy_from_slice(&hex(slot0_hex));
    image[2 * PAGE_BYTES..2 * PAGE_BYTES + 34].copy_from_slice(&hex(GOLDEN_PAGE_HEX));
    let dir = scratch();
    let path = dir.path().join("dirty");
    std::fs::write(&path, &image).unwrap();
    let log = DirtyLog::open_disk(&path, GOLDEN_DEVICE_SIZE, GOLDEN_REGION_SIZE).unwrap();
    assert_eq!(regions_of(&log), vec![0, 3, 4, 10]);
    assert_eq!(log.dirty_bytes(), 3 * 65536 + 4096);
    // Generation 2 beats generation 1; if slot 1 is torn, slot 0 (empty) is used.
    image[2 * PAGE_BYTES + 40] ^= 0xff;
    std::fs::write(&path, &image).unwrap();
    let log = DirtyLog::open_disk(&path, GOLDEN_DEVICE_SIZE, GOLDEN_REGION_SIZE).unwrap();
    assert_eq!(regions_of(&log), Vec::<u64>::new());
}

#[test]
fn crc32c_is_castagnoli() {
    // The standard check value of CRC-32C, so the spec's "CRC-32C" is the one implemented.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
}

#[derive(Debug, Clone)]
enum Action {
    Mark(u64, u64),
    Clear(u64),
    Persist,
    Reopen,
}

fn action() -> impl Strategy<Value = Action> {
    let size = 70_000 * 512u64;
    prop_oneof![
        4 => (0..size, 0..200_000u64).prop_map(|(o, l)| Action::Mark(o, l)),
        3 => (0..70_000u64).prop_map(Action::Clear),
        1 => Just(Action::Persist),
        1 => Just(Action::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    /// The disk log behaves like a set of regions; what was persisted survives a reopen exactly.
    #[test]
    fn disk_log_matches_model(actions in proptest::collection::vec(action(), 1..60)) {
        let size = 70_000 * 512u64; // 70,000 regions: 3 pages
        let dir = scratch();
        let path = dir.path().join("dirty");
        let mut log = DirtyLog::create_disk(&path, size, 512, false).unwrap();
        let mut model = BTreeSet::new();
        let mut durable = BTreeSet::new();
        for a in actions {
            match a {
                Action::Mark(offset, len) => {
                    if len > 0 {
                        let last = (offset + len - 1).min(size - 1) / 512;
                        model.extend(offset / 512..=last);
                    }
                    log.mark_range(offset, len);
                }
                Action::Clear(r) => {
                    model.remove(&r);
                    log.clear_region(r);
                }
                Action::Persist => {
                    log.persist().unwrap();
                    durable = model.clone();
                }
                Action::Reopen => {
                    drop(log);
                    log = DirtyLog::open_disk(&path, size, 512).unwrap();
                    model = durable.clone();
                }
            }
            prop_assert_eq!(log.dirty_count(), model.len() as u64);
        }
        prop_assert_eq!(log.dirty_regions().collect::<BTreeSet<_>>(), model);
    }
}
