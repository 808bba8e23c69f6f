//! The group state kept in metadata (format 2): every setter is durable when it returns and
//! survives a reopen (file) and a power loss (MemDisk durable bytes only); refusals write
//! nothing; durable_lsn; format-1 replogs open and are upgraded in place.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;

use replog::format::{MetaSlot, AL_EXTENTS_MAX, EPOCH_HISTORY_MAX, FEATURE_ACTIVITY_LOG};
use replog::storage::MemDisk;
use replog::{
    Binding, CreateOptions, Durability, EntryKind, EpochStart, Error, IdentityUpdate, OpenOptions,
    Record, Replog, Role,
};

const SIZE: u64 = 8192 + 64 * 1024;

fn write_rec(data: &[u8]) -> Record<'_> {
    Record {
        device: 0,
        offset: 0,
        kind: EntryKind::Write,
        len: data.len() as u64,
        data,
    }
}

fn binding(site: &str) -> Binding {
    Binding {
        peer_group_uuid: *b"peer-group-uuid!",
        peer_site_id: site.to_string(),
    }
}

/// Everything format 2 persists, as one comparable value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    role: Role,
    epochs: Vec<EpochStart>,
    binding: Option<Binding>,
    resync: Vec<u64>,
    features: u64,
    al: replog::ActivityLogState,
    cursors: Vec<Option<u64>>,
    drop_floors: Vec<Option<u64>>,
}

fn snapshot(log: &Replog) -> Snapshot {
    Snapshot {
        role: log.role(),
        epochs: log.epochs(),
        binding: log.binding(),
        resync: (0..16).map(|s| log.resync_seq(s).unwrap()).collect(),
        features: log.features(),
        al: log.activity_log(),
        cursors: (0..16).map(|s| log.cursor(s)).collect(),
        drop_floors: (0..16).map(|s| log.drop_floor(s).unwrap()).collect(),
    }
}

fn reopen_durable(disk: &Arc<MemDisk>) -> Replog {
    Replog::open_on(MemDisk::from_image(disk.durable_image(), 512), 0)
        .unwrap()
        .0
}

#[test]
fn a_fresh_replog_has_no_identity() {
    let log = Replog::create_on(MemDisk::new(SIZE, 512), 0, SIZE).unwrap();
    assert_eq!(log.role(), Role::Unset);
    assert_eq!(log.epochs(), vec![]);
    assert_eq!(log.current_epoch(), None);
    assert_eq!(log.binding(), None);
    assert_eq!(log.features(), 0);
    assert_eq!(log.resync_seq(3).unwrap(), 0);
    assert_eq!(log.drop_floor(3).unwrap(), None);
    assert!(matches!(log.drop_floor(16), Err(Error::BadSlink { .. })));
    let al = log.activity_log();
    assert_eq!((al.extent_bytes, al.extents.len()), (4 << 20, 0));
    assert!(matches!(log.resync_seq(16), Err(Error::BadSlink { .. })));
}

#[test]
fn every_setter_survives_a_reopen_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replog");
    let opts = CreateOptions {
        offset: 0,
        size: SIZE,
        io: Default::default(),
    };
    let log = Replog::create(&path, &opts).unwrap();
    log.register_slink(2, 0).unwrap();
    log.set_role(Role::Primary).unwrap();
    log.begin_epoch(1, 1).unwrap();
    log.begin_epoch(3, 40).unwrap();
    log.set_binding(Some(binding("site-b"))).unwrap();
    assert_eq!(log.raise_resync_seq(2, 17).unwrap(), 17);
    assert_eq!(log.raise_resync_seq(2, 5).unwrap(), 17, "never lowers");
    log.set_features(FEATURE_ACTIVITY_LOG).unwrap();
    log.set_activity_log_extent_bytes(1 << 20).unwrap();
    log.set_activity_log(&[(1, 9), (0, 4), (1, 9), (0, 2)])
        .unwrap();
    // Cursor and tail writes carry every field too.
    for i in 0..4u8 {
        let data = vec![i; 3000];
        log.append(write_rec(&data), Durability::Durable)
            .unwrap()
            .wait()
            .unwrap();
    }
    log.set_cursor(2, 3).unwrap();
    log.set_drop_floor(2, Some(1)).unwrap();
    log.reclaim().unwrap();
    let before = snapshot(&log);
    assert_eq!(before.drop_floors[2], Some(1));
    assert_eq!(
        before.al.extents,
        vec![(0, 2), (0, 4), (1, 9)],
        "sorted, deduplicated"
    );
    assert_eq!(before.al.extent_bytes, 1 << 20);
    assert_eq!(
        log.current_epoch(),
        Some(EpochStart {
            epoch: 3,
            start_lsn: 40
        })
    );
    drop(log);
    let (log, report) = Replog::open(&path, &OpenOptions::default()).unwrap();
    assert_eq!(report.metadata_version_found, 3);
    assert_eq!(snapshot(&log), before);
    let ins = Replog::inspect(&path, 0, 0).unwrap();
    assert_eq!(ins.format_version, 3);
    assert_eq!(ins.role, Role::Primary);
    assert_eq!(ins.epochs.len(), 2);
    assert_eq!(ins.binding.as_ref().unwrap().peer_site_id, "site-b");
    assert_eq!(
        ins.binding.as_ref().unwrap().peer_group_uuid,
        "706565722d67726f75702d7575696421"
    );
    assert_eq!(ins.feature_names, vec!["activity_log"]);
    assert_eq!(ins.activity_log, vec![(0, 2), (0, 4), (1, 9)]);
    assert_eq!(ins.slinks[0].resync_seq, 17);
    assert_eq!(ins.slinks[0].drop_floor, Some(1));
    let json = serde_json::to_string(&ins).unwrap();
    assert!(json.contains("\"role\":\"Primary\""), "{json}");
}

#[test]
fn setters_are_durable_when_they_return() {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    // Unsynced ring bytes around the metadata writes must not matter.
    let data = vec![7u8; 2000];
    log.append(write_rec(&data), Durability::Written)
        .unwrap()
        .wait()
        .unwrap();
    log.update_identity(&IdentityUpdate {
        role: Some(Role::Secondary),
        begin_epoch: Some(EpochStart {
            epoch: 2,
            start_lsn: 1,
        }),
        binding: Some(Some(binding("paris"))),
    })
    .unwrap();
    assert_eq!(snapshot(&reopen_durable(&disk)), snapshot(&log));
    log.raise_resync_seq(0, 9).unwrap();
    assert_eq!(snapshot(&reopen_durable(&disk)), snapshot(&log));
    log.set_activity_log(&[(0, 1)]).unwrap();
    assert_eq!(snapshot(&reopen_durable(&disk)), snapshot(&log));
    log.set_binding(None).unwrap();
    log.set_activity_log(&[]).unwrap();
    for seed in 0..8 {
        let (log2, _) =
            Replog::open_on(MemDisk::from_image(disk.power_loss_image(seed), 512), 0).unwrap();
        assert_eq!(snapshot(&log2), snapshot(&log), "seed {seed}");
    }
}

#[test]
fn refused_values_write_nothing() {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    log.begin_epoch(5, 100).unwrap();
    log.set_activity_log(&[(0, 1)]).unwrap();
    let image = disk.current_image();
    let writes = disk.writes_done();
    let refusals: Vec<(&str, replog::Result<()>)> = vec![
        ("older epoch", log.begin_epoch(4, 200)),
        ("same epoch, other start", log.begin_epoch(5, 101)),
        ("start before the current", log.begin_epoch(6, 99)),
        ("epoch 0", Replog::begin_epoch(&log, 0, 0)),
        ("empty site id", log.set_binding(Some(binding("")))),
        (
            "site id too long",
            log.set_binding(Some(binding(&"x".repeat(65)))),
        ),
        ("unknown feature", log.set_features(1 << 9)),
        (
            "too many extents",
            log.set_activity_log(
                &(0..=AL_EXTENTS_MAX as u64)
                    .map(|i| (0, i))
                    .collect::<Vec<_>>(),
            ),
        ),
        ("extent beyond 2^64", log.set_activity_log(&[(0, u64::MAX)])),
        (
            "extent size not a power of two",
            log.set_activity_log_extent_bytes(3 << 20),
        ),
        (
            "extent size change while hot",
            log.set_activity_log_extent_bytes(1 << 20),
        ),
        (
            "a bad epoch in a combined update",
            log.update_identity(&IdentityUpdate {
                role: Some(Role::Primary),
                begin_epoch: Some(EpochStart {
                    epoch: 1,
                    start_lsn: 0,
                }),
                binding: None,
            }),
        ),
    ];
    for (what, result) in refusals {
        assert!(
            matches!(result, Err(Error::InvalidMetadata { .. })),
            "{what}: {result:?}"
        );
    }
    assert_eq!(disk.writes_done(), writes, "a refusal wrote");
    assert_eq!(disk.current_image(), image);
    assert_eq!(
        log.role(),
        Role::Unset,
        "the combined update applied nothing"
    );
    // No-ops write nothing either.
    log.begin_epoch(5, 100).unwrap();
    log.set_activity_log(&[(0, 1), (0, 1)]).unwrap();
    log.set_role(Role::Unset).unwrap();
    assert_eq!(disk.writes_done(), writes, "a no-op wrote");
    // A site id of exactly 64 bytes (multi-byte UTF-8 included) fits.
    let long = "é".repeat(32);
    log.set_binding(Some(binding(&long))).unwrap();
    assert_eq!(reopen_durable(&disk).binding().unwrap().peer_site_id, long);
}

#[test]
fn a_full_epoch_history_drops_its_oldest_entry() {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    for epoch in 1..=EPOCH_HISTORY_MAX as u64 + 3 {
        log.begin_epoch(epoch, epoch * 100).unwrap();
    }
    let epochs = reopen_durable(&disk).epochs();
    assert_eq!(epochs.len(), EPOCH_HISTORY_MAX);
    assert_eq!(epochs[0].epoch, 4);
    assert_eq!(epochs.last().unwrap().epoch, EPOCH_HISTORY_MAX as u64 + 3);
}

#[test]
fn a_full_activity_log_round_trips() {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    let extents: Vec<(u32, u64)> = (0..AL_EXTENTS_MAX as u64)
        .map(|i| ((i % 5) as u32, i * 1_000_003))
        .collect();
    log.set_activity_log(&extents).unwrap();
    let mut sorted = extents;
    sorted.sort_unstable();
    assert_eq!(reopen_durable(&disk).activity_log().extents, sorted);
}

#[test]
fn durable_lsn_follows_syncs_not_writes() {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    assert_eq!(log.durable_lsn(), 0);
    let data = vec![1u8; 1000];
    for _ in 0..3 {
        log.append(write_rec(&data), Durability::Written)
            .unwrap()
            .wait()
            .unwrap();
    }
    assert_eq!((log.written_lsn(), log.durable_lsn()), (3, 0));
    assert_eq!(log.flush().wait().unwrap(), 3);
    assert_eq!(log.durable_lsn(), 3);
    log.append(write_rec(&data), Durability::Written)
        .unwrap()
        .wait()
        .unwrap();
    log.append(write_rec(&data), Durability::Durable)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(log.durable_lsn(), 5);
    log.append(write_rec(&data), Durability::Written)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(log.durable_lsn(), 5);
    drop(log);
    // Open syncs the recovered chain: everything recovered is durable.
    let (log, report) = Replog::open_on(MemDisk::from_image(disk.current_image(), 512), 0).unwrap();
    assert_eq!(report.last_lsn, 6);
    assert_eq!(log.durable_lsn(), 6);
}

/// Rewrites both metadata slots of a format-2 image as a format-1 build would have written
/// them (same fields; sequence and slot positions unchanged).
fn downgrade_to_v1(image: &mut [u8]) {
    for at in [0usize, 4096] {
        let m = MetaSlot::decode(&image[at..at + 4096]).unwrap();
        image[at..at + 4096].fill(0);
        image[at..at + 512].copy_from_slice(&m.encode_v1().unwrap());
    }
}

fn v1_image() -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    log.register_slink(1, 0).unwrap();
    log.register_slink(4, 0).unwrap();
    let mut entries = Vec::new();
    for i in 0..6u8 {
        let data = vec![i; 1500 + usize::from(i) * 300];
        let h = log.append(write_rec(&data), Durability::Durable).unwrap();
        entries.push((h.lsn(), data));
        h.wait().unwrap();
    }
    log.set_cursor(1, 2).unwrap();
    log.set_cursor(4, 2).unwrap();
    log.reclaim().unwrap();
    log.set_cursor(4, 5).unwrap();
    drop(log);
    let mut image = disk.durable_image();
    downgrade_to_v1(&mut image);
    entries.retain(|(lsn, _)| *lsn > 2);
    (image, entries)
}

#[test]
fn a_format_1_replog_opens_and_is_upgraded_in_place() {
    let (image, entries) = v1_image();
    for at in [0usize, 4096] {
        assert_eq!(
            MetaSlot::decode_versioned(&image[at..at + 4096]).unwrap().1,
            1
        );
    }
    // Inspect reads it as it is and writes nothing.
    let disk = MemDisk::from_image(image.clone(), 512);
    let ins = replog::inspect_storage(disk.as_ref(), 0, 100).unwrap();
    assert_eq!(ins.format_version, 1);
    assert_eq!(ins.entries_total, 4);
    assert_eq!(disk.current_image(), image);

    let (log, report) = Replog::open_on(disk.clone(), 0).unwrap();
    assert_eq!(report.metadata_version_found, 1);
    let got: Vec<(u64, Vec<u8>)> = log
        .read_from(0, 100, u64::MAX)
        .unwrap()
        .into_iter()
        .map(|e| (e.lsn, e.data))
        .collect();
    assert_eq!(got, entries, "entries survive the upgrade");
    assert_eq!(
        (log.cursor(1), log.cursor(4), log.cursor(0)),
        (Some(2), Some(5), None)
    );
    assert_eq!(log.next_lsn(), 7);
    // Format-2 fields start at their defaults.
    assert_eq!(log.role(), Role::Unset);
    assert_eq!(log.epochs(), vec![]);
    assert_eq!(log.binding(), None);
    assert_eq!(log.features(), 0);
    assert_eq!(log.activity_log(), replog::ActivityLogState::default());
    // The upgrade is durable before open returns: the newest slot is format 2, the other
    // still the older format-1 one (never overwritten by the upgrade).
    let after = disk.durable_image();
    let versions: Vec<(u64, u16)> = [0usize, 4096]
        .iter()
        .map(|at| {
            let (m, v) = MetaSlot::decode_versioned(&after[*at..*at + 4096]).unwrap();
            (m.sequence, v)
        })
        .collect();
    let newest = versions.iter().max().unwrap();
    assert_eq!(newest.1, 3, "{versions:?}");
    assert!(versions.iter().any(|(_, v)| *v == 1), "{versions:?}");
    log.set_role(Role::Primary).unwrap();
    drop(log);
    let (log, report) = Replog::open_on(MemDisk::from_image(disk.durable_image(), 512), 0).unwrap();
    assert_eq!(report.metadata_version_found, 3);
    assert_eq!(log.role(), Role::Primary);
    assert_eq!(log.cursor(4), Some(5));
}

/// A format-2 replog (a build before drop floors) opens with no floor for any slink, keeps
/// everything else, and its first open upgrades it to format 3; a floor set then survives.
#[test]
fn a_format_2_replog_opens_with_no_drop_floors_and_is_upgraded() {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    log.register_slink(1, 0).unwrap();
    log.raise_resync_seq(1, 40).unwrap();
    log.set_activity_log(&[(0, 3), (1, 1 << 40)]).unwrap();
    for i in 0..3u8 {
        let h = log
            .append(write_rec(&[i; 2000]), Durability::Durable)
            .unwrap();
        h.wait().unwrap();
    }
    log.set_cursor(1, 2).unwrap();
    let before = snapshot(&log);
    drop(log);
    let mut image = disk.durable_image();
    for at in [0usize, 4096] {
        let m = MetaSlot::decode(&image[at..at + 4096]).unwrap();
        image[at..at + 4096].copy_from_slice(&m.encode_v2().unwrap());
    }
    let disk = MemDisk::from_image(image, 512);
    let (log, report) = Replog::open_on(disk.clone(), 0).unwrap();
    assert_eq!(report.metadata_version_found, 2);
    assert_eq!(snapshot(&log), before, "every format-2 field survives");
    assert!(before.drop_floors.iter().all(Option::is_none));
    log.set_drop_floor(1, Some(2)).unwrap();
    drop(log);
    let (log, report) = Replog::open_on(MemDisk::from_image(disk.durable_image(), 512), 0).unwrap();
    assert_eq!(report.metadata_version_found, 3);
    assert_eq!(log.drop_floor(1).unwrap(), Some(2));
    assert_eq!(log.activity_log().extents, vec![(0, 3), (1, 1 << 40)]);
    assert_eq!(log.resync_seq(1).unwrap(), 40);
}

/// A floor is a slink's past: registering the slink again, or unregistering it, clears it in
/// the same durable write (a stale floor could be lower than what a new site lacks).
#[test]
fn registering_a_slink_clears_its_drop_floor() {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    log.register_slink(3, 0).unwrap();
    log.register_slink(4, 0).unwrap();
    log.set_drop_floor(3, Some(0)).unwrap();
    log.set_drop_floor(4, Some(7)).unwrap();
    log.register_slink(3, 0).unwrap();
    log.unregister_slink(4).unwrap();
    assert_eq!(log.drop_floor(3).unwrap(), None);
    assert_eq!(log.drop_floor(4).unwrap(), None);
    let log = reopen_durable(&disk);
    assert_eq!(log.drop_floor(3).unwrap(), None);
    assert_eq!(log.drop_floor(4).unwrap(), None);
    log.set_drop_floor(3, Some(5)).unwrap();
    log.set_drop_floor(3, None).unwrap();
    assert_eq!(reopen_durable(&disk).drop_floor(3).unwrap(), None);
}

/// A power loss in the middle of the upgrade write (any subset of its sectors reached the disk)
/// leaves a replog that opens: a torn format-2 slot is refused and the format-1 state is used.
#[test]
fn a_torn_upgrade_write_falls_back_to_the_format_1_slot() {
    let (image, entries) = v1_image();
    let disk = MemDisk::from_image(image.clone(), 512);
    drop(Replog::open_on(disk.clone(), 0).unwrap());
    let upgraded = disk.durable_image();
    let changed: Vec<usize> = (0..2)
        .filter(|s| image[s * 4096..(s + 1) * 4096] != upgraded[s * 4096..(s + 1) * 4096])
        .collect();
    assert_eq!(changed.len(), 1, "the upgrade writes one slot");
    let slot = changed[0] * 4096;
    let mut torn_cases = 0;
    for mask in 1u32..255 {
        let mut torn = image.clone();
        for sector in 0..8 {
            if mask & (1 << sector) != 0 {
                let at = slot + sector * 512;
                torn[at..at + 512].copy_from_slice(&upgraded[at..at + 512]);
            }
        }
        // Sectors the upgrade did not change (zeros in both) may make the torn slot the
        // whole new one: then it is valid, and that is the new state, not a mix.
        let whole_new = torn[slot..slot + 4096] == upgraded[slot..slot + 4096];
        let (log, report) = Replog::open_on(MemDisk::from_image(torn, 512), 0).unwrap();
        let expected = if whole_new { 3 } else { 1 };
        torn_cases += u32::from(!whole_new);
        assert_eq!(report.metadata_version_found, expected, "mask {mask:#x}");
        assert_eq!(log.cursor(4), Some(5), "mask {mask:#x}");
        assert_eq!(log.last_lsn(), entries.last().unwrap().0, "mask {mask:#x}");
    }
    assert!(torn_cases > 100, "only {torn_cases} masks tore the slot");
}

/// Every image a power loss during one metadata write can leave: the durable image before it
/// with each subset (picked by `masks`) of the written slot's 512-byte sectors replaced by the
/// new bytes. Each must open with exactly the state before or the state after, never a mix.
fn check_torn_write(
    disk: &Arc<MemDisk>,
    log: &Replog,
    masks: &[u32],
    op: impl FnOnce(&Replog) -> replog::Result<()>,
) {
    let (before_image, before) = (disk.durable_image(), snapshot(log));
    op(log).unwrap();
    let (after_image, after) = (disk.durable_image(), snapshot(log));
    let changed: Vec<usize> = (0..after_image.len() / 4096)
        .filter(|b| before_image[b * 4096..(b + 1) * 4096] != after_image[b * 4096..(b + 1) * 4096])
        .collect();
    assert!(
        changed.len() <= 1 && changed.iter().all(|b| *b < 2),
        "{changed:?}"
    );
    let Some(slot) = changed.first().map(|b| b * 4096) else {
        assert_eq!(before, after, "nothing written, nothing changed");
        return;
    };
    for &mask in masks {
        let mut torn = before_image.clone();
        for sector in 0..8 {
            if mask & (1 << sector) != 0 {
                let at = slot + sector * 512;
                torn[at..at + 512].copy_from_slice(&after_image[at..at + 512]);
            }
        }
        let (log2, _) = Replog::open_on(MemDisk::from_image(torn, 512), 0).unwrap();
        let got = snapshot(&log2);
        assert!(
            got == before || got == after,
            "mask {mask:#x}: a mix of old and new:\n{got:?}\nold {before:?}\nnew {after:?}"
        );
        if mask == 0 {
            assert_eq!(got, before);
        }
        if mask == 0xFF {
            assert_eq!(got, after);
        }
    }
}

/// A replog with every format-2 field set, so that a torn write has old bytes to mix with.
fn busy_log() -> (Arc<MemDisk>, Replog) {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    log.register_slink(0, 0).unwrap();
    log.update_identity(&IdentityUpdate {
        role: Some(Role::Secondary),
        begin_epoch: Some(EpochStart {
            epoch: 1,
            start_lsn: 1,
        }),
        binding: Some(Some(binding("site-a"))),
    })
    .unwrap();
    log.raise_resync_seq(0, 3).unwrap();
    let al: Vec<(u32, u64)> = (0..200).map(|i| (i % 3, u64::from(i) * 7)).collect();
    log.set_activity_log(&al).unwrap();
    (disk, log)
}

const ALL_MASKS: std::ops::Range<u32> = 0..256;

#[test]
fn a_torn_promotion_leaves_the_old_or_the_new_identity() {
    let (disk, log) = busy_log();
    let masks: Vec<u32> = ALL_MASKS.collect();
    check_torn_write(&disk, &log, &masks, |log| {
        log.update_identity(&IdentityUpdate {
            role: Some(Role::Primary),
            begin_epoch: Some(EpochStart {
                epoch: 2,
                start_lsn: 50,
            }),
            binding: Some(Some(binding("site-b-with-a-longer-name"))),
        })
    });
}

#[test]
fn a_torn_activity_log_write_leaves_the_old_or_the_new_set() {
    let (disk, log) = busy_log();
    let masks: Vec<u32> = ALL_MASKS.collect();
    let al: Vec<(u32, u64)> = (0..256).map(|i| (i % 4, u64::from(i) * 11 + 1)).collect();
    check_torn_write(&disk, &log, &masks, |log| log.set_activity_log(&al));
    check_torn_write(&disk, &log, &masks, |log| log.set_activity_log(&[]));
}

#[test]
fn a_torn_resync_or_cursor_write_leaves_the_old_or_the_new_value() {
    let (disk, log) = busy_log();
    let masks: Vec<u32> = ALL_MASKS.collect();
    check_torn_write(&disk, &log, &masks, |log| {
        log.raise_resync_seq(0, 1 << 40).map(drop)
    });
    check_torn_write(&disk, &log, &masks, |log| log.set_cursor(0, 0));
    check_torn_write(&disk, &log, &masks, |log| log.register_slink(9, 0));
    check_torn_write(&disk, &log, &masks, |log| log.set_drop_floor(9, Some(3)));
    check_torn_write(&disk, &log, &masks, |log| log.set_drop_floor(9, None));
}

#[derive(Debug, Clone)]
enum Op {
    Role(u8),
    Epoch(u64, u64),
    Bind(Option<String>),
    Resync(u8, u64),
    Features(bool),
    ActivityLog(Vec<(u32, u64)>),
    DropFloor(u8, Option<u64>),
    Append(usize),
    Cursor(u64),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3).prop_map(Op::Role),
        (0u64..4, 0u64..50).prop_map(|(de, dl)| Op::Epoch(de, dl)),
        proptest::option::of("[a-z0-9é-]{1,30}").prop_map(Op::Bind),
        (0u8..16, any::<u64>()).prop_map(|(s, q)| Op::Resync(s, q)),
        any::<bool>().prop_map(Op::Features),
        proptest::collection::vec((0u32..4, 0u64..1 << 20), 0..300).prop_map(Op::ActivityLog),
        (0u8..16, proptest::option::of(any::<u64>())).prop_map(|(s, f)| Op::DropFloor(s, f)),
        (1usize..3000).prop_map(Op::Append),
        (0u64..10).prop_map(Op::Cursor),
    ]
}

fn apply(log: &Replog, op: &Op) -> replog::Result<()> {
    match op {
        Op::Role(r) => log.set_role([Role::Unset, Role::Primary, Role::Secondary][usize::from(*r)]),
        Op::Epoch(de, dl) => {
            let cur = log.current_epoch().unwrap_or(EpochStart {
                epoch: 0,
                start_lsn: 0,
            });
            log.begin_epoch(cur.epoch + de, cur.start_lsn + dl)
        }
        Op::Bind(site) => log.set_binding(site.as_deref().map(binding)),
        Op::Resync(s, q) => log.raise_resync_seq(*s, *q).map(drop),
        Op::Features(on) => log.set_features(if *on { FEATURE_ACTIVITY_LOG } else { 0 }),
        Op::ActivityLog(al) => log.set_activity_log(al),
        Op::DropFloor(s, f) => log.set_drop_floor(*s, *f),
        Op::Append(len) => {
            let data = vec![*len as u8; *len];
            match log.append(write_rec(&data), Durability::Written) {
                Ok(h) => h.wait().map(drop),
                Err(Error::Full { .. }) => log.reclaim().map(drop),
                Err(e) => Err(e),
            }
        }
        Op::Cursor(d) => {
            let to = (log.cursor(0).unwrap_or(0) + d).min(log.written_lsn());
            log.set_cursor(0, to.max(log.cursor(0).unwrap_or(0)))
        }
    }
}

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any sequence of metadata changes among appends: after each, a power loss (durable bytes
    /// plus a random part of the unsynced ring writes) reopens with exactly the state the live
    /// log reports; a power loss during it (random torn subsets of the slot) reopens with the
    /// state before or after it. Refused changes leave the state as it was.
    #[test]
    fn metadata_changes_are_atomic_and_durable(
        ops in proptest::collection::vec(op_strategy(), 1..12),
        masks in proptest::collection::vec(0u32..256, 6),
        seed in any::<u64>(),
    ) {
        let disk = MemDisk::new(SIZE, 512);
        let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
        log.register_slink(0, 0).unwrap();
        for op in &ops {
            let before = snapshot(&log);
            let mut refused = None;
            check_torn_write(&disk, &log, &masks, |log| {
                if let Err(e) = apply(log, op) {
                    refused = Some(e);
                }
                Ok(())
            });
            if let Some(e) = refused {
                prop_assert!(matches!(e, Error::InvalidMetadata { .. }), "{:?}: {}", op, e);
                prop_assert_eq!(&snapshot(&log), &before);
            }
            let (log2, _) =
                Replog::open_on(MemDisk::from_image(disk.power_loss_image(seed), 512), 0).unwrap();
            prop_assert_eq!(snapshot(&log2), snapshot(&log));
        }
    }
}
