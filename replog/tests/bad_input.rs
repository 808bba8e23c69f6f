//! Bad input: truncated, other version, garbage, damaged metadata. Refused with an error that
//! names what is wrong; nothing panics (also under random corruption).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use proptest::prelude::*;
use replog::format::MetaSlot;
use replog::storage::MemDisk;
use replog::{CreateOptions, Durability, EntryKind, Error, OpenOptions, Record, Replog};

const SIZE: u64 = 8192 + 64 * 1024;

fn valid_image() -> Vec<u8> {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    log.register_slink(1, 0).unwrap();
    for i in 0..5u8 {
        let data = vec![i; 1000 + usize::from(i) * 700];
        let rec = Record {
            device: 0,
            offset: 0,
            kind: EntryKind::Write,
            len: data.len() as u64,
            data: &data,
        };
        log.append(rec, Durability::Durable)
            .unwrap()
            .wait()
            .unwrap();
    }
    drop(log);
    disk.durable_image()
}

fn open_image(image: Vec<u8>) -> replog::Result<(Replog, replog::RecoveryReport)> {
    Replog::open_on(MemDisk::from_image(image, 512), 0)
}

#[test]
fn truncated_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    drop(
        Replog::create(
            &path,
            &CreateOptions {
                offset: 0,
                size: SIZE,
                io: Default::default(),
            },
        )
        .unwrap(),
    );
    let full = std::fs::read(&path).unwrap();
    std::fs::write(&path, &full[..4096]).unwrap();
    let err = Replog::open(&path, &OpenOptions::default()).err().unwrap();
    assert!(
        matches!(
            err,
            Error::Truncated {
                expected: 8192,
                found: 4096,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("metadata area"), "{err}");
    std::fs::write(&path, &full[..40960]).unwrap();
    let err = Replog::open(&path, &OpenOptions::default()).err().unwrap();
    assert!(
        matches!(err, Error::Truncated { found: 40960, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("ring"), "{err}");
    let err = Replog::inspect(&path, 0, 10).err().unwrap();
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
    let err = Replog::open(&dir.path().join("missing"), &OpenOptions::default())
        .err()
        .unwrap();
    assert!(matches!(err, Error::Io { op: "open", .. }), "{err}");
}

/// The metadata slot (0 or 1) holding the newest state.
fn newest_slot(image: &[u8]) -> usize {
    let s0 = MetaSlot::decode(&image[..4096]).unwrap();
    let s1 = MetaSlot::decode(&image[4096..8192]).unwrap();
    usize::from(s1.sequence > s0.sequence)
}

#[test]
fn other_format_version_is_refused() {
    let mut image = valid_image();
    // Only the newest slot says version 4: the other, older one is valid, and open must still
    // refuse rather than roll back to it.
    let at = newest_slot(&image) * 4096;
    image[at + 8] = 4; // version 4
    let crc = crc32c::crc32c(&image[at..at + 4092]);
    image[at + 4092..at + 4096].copy_from_slice(&crc.to_le_bytes());
    let err = open_image(image.clone()).err().unwrap();
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                found: 4,
                supported: 3
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("version 4"), "{err}");
    assert!(err.to_string().contains("newer build"), "{err}");
    let disk = MemDisk::from_image(image, 512);
    let err = replog::inspect_storage(disk.as_ref(), 0, 10).err().unwrap();
    assert!(
        matches!(err, Error::UnsupportedVersion { found: 4, .. }),
        "{err}"
    );
}

#[test]
fn unknown_feature_bits_are_refused() {
    let mut image = valid_image();
    let at = newest_slot(&image) * 4096;
    image[at + 368] = 0x81; // feature bits 0 (known) and 7 (unknown)
    let crc = crc32c::crc32c(&image[at..at + 4092]);
    image[at + 4092..at + 4096].copy_from_slice(&crc.to_le_bytes());
    let err = open_image(image).err().unwrap();
    assert!(
        matches!(
            err,
            Error::UnsupportedFeatures {
                bits: 0x80,
                known: 0b11,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("0x80"), "{err}");
}

#[test]
fn garbage_and_zeroes_are_refused() {
    let err = open_image(vec![0u8; SIZE as usize]).err().unwrap();
    assert!(matches!(err, Error::BadFormat { .. }), "{err}");
    assert!(err.to_string().contains("all zero"), "{err}");
    let garbage: Vec<u8> = (0..SIZE as usize).map(|i| (i * 7919 % 251) as u8).collect();
    let err = open_image(garbage).err().unwrap();
    assert!(err.to_string().contains("bad magic"), "{err}");
}

#[test]
fn one_damaged_slot_falls_back_to_the_other() {
    let image = valid_image();
    let newest = newest_slot(&image);
    let mut damaged = image.clone();
    damaged[newest * 4096 + 100] ^= 0xFF;
    let (log, report) = open_image(damaged).unwrap();
    assert_eq!(report.metadata_slot, 1 - newest);
    assert!(report.slots[newest]
        .fault
        .as_deref()
        .unwrap()
        .contains("checksum"));
    // The older slot predates nothing of the chain: the entries are all there.
    assert_eq!(report.entries, 5);
    drop(log);
    let mut both = image;
    both[100] ^= 0xFF;
    both[4096 + 100] ^= 0xFF;
    let err = open_image(both).err().unwrap();
    assert!(
        err.to_string()
            .contains("slot 0: checksum mismatch; slot 1: checksum mismatch"),
        "{err}"
    );
}

#[test]
fn bad_geometry_is_named() {
    let mut image = valid_image();
    for slot in 0..2 {
        let at = slot * 4096;
        let mut m = MetaSlot::decode(&image[at..at + 4096]).unwrap();
        m.ring_bytes = 12345;
        image[at..at + 4096].copy_from_slice(&m.encode());
    }
    let err = open_image(image).err().unwrap();
    assert!(
        matches!(err, Error::BadFormat { .. }) && err.to_string().contains("ring size 12345"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random byte flips anywhere (metadata or ring): open and inspect return Ok or an error,
    /// never panic; whatever open returns reads back cleanly.
    #[test]
    fn random_corruption_never_panics(flips in proptest::collection::vec((0usize..SIZE as usize, any::<u8>()), 1..40)) {
        let mut image = valid_image();
        for (at, x) in flips {
            image[at] ^= x | 1;
        }
        let disk = MemDisk::from_image(image, 512);
        let _ = replog::inspect_storage(disk.as_ref(), 0, 100);
        if let Ok((log, report)) = Replog::open_on(disk, 0) {
            let entries = log.read_from(0, 100, u64::MAX).unwrap();
            prop_assert_eq!(entries.len() as u64, report.entries);
        }
    }
}
