//! Golden test vectors for every on-disk structure, checked in both directions:
//! encode(struct) == bytes and decode(bytes) == struct. The bytes follow FORMAT.md; if this test
//! fails, the format changed: bump FORMAT_VERSION and add a version history entry.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use replog::format::{
    ActivityLogState, Binding, EntryHeader, EpochStart, Identity, MetaSlot, RecordKind, Role,
    FEATURE_ACTIVITY_LOG,
};

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn golden_header() -> EntryHeader {
    EntryHeader {
        kind: RecordKind::Write,
        uuid: *b"0123456789abcdef",
        vpos: 0x0000_0001_0000_2000,
        lsn: 0x0102_0304_0506_0708,
        generation: 7,
        device: 3,
        offset: 0x4000,
        len: 11,
        timestamp_ns: 1_700_000_000_123_456_789,
        data_crc: crc32c::crc32c(b"hello world"),
    }
}

const HEADER_HEX: &str = "
    524c4745 01000100 30313233 34353637 38396162 63646566 00200000 01000000
    08070605 04030201 07000000 03000000 00400000 00000000 0b000000 00000000
    15cd853d fe9c9717 aa6594c9 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 be63a1c8
";

/// The format-1 slot vector: what a format-1 build wrote. This build decodes it (format-2
/// fields at their defaults) and, only to build upgrade-test images, can still encode it.
fn golden_meta_v1() -> MetaSlot {
    MetaSlot {
        uuid: *b"0123456789abcdef",
        sequence: 42,
        replog_bytes: 8192 + (1 << 20),
        ring_offset: 8192,
        ring_bytes: 1 << 20,
        block_bytes: 4096,
        generation: 9,
        tail_generation: 8,
        tail_vpos: 0x20_0080,
        tail_lsn: 1000,
        head_hint_vpos: 0x20_4000,
        created_ns: 1_700_000_000_000_000_000,
        registered: 0b1000_0000_0000_0101,
        cursors: [1000, 0, 1500, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1234],
        resync_seqs: [0; 16],
        features: 0,
        identity: Identity::default(),
        activity_log: ActivityLogState::default(),
        drop_floors: [None; 16],
    }
}

const META_V1_HEX: &str = "
    52504c47 4d455441 01000000 00100000 30313233 34353637 38396162 63646566
    2a000000 00000000 00201000 00000000 00200000 00000000 00001000 00000000
    09000000 08000000 80002000 00000000 e8030000 00000000 00402000 00000000
    00002a36 fe9c9717 05800000 00000000 e8030000 00000000 00000000 00000000
    dc050000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 d2040000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
    00000000 00000000 00000000 00000000 00000000 00000000 00000000 b7962c08
";

#[test]
fn entry_header_vector() {
    let bytes = unhex(HEADER_HEX);
    assert_eq!(bytes.len(), 128);
    assert_eq!(golden_header().encode().to_vec(), bytes, "encode");
    assert_eq!(
        EntryHeader::decode(&bytes).unwrap(),
        golden_header(),
        "decode"
    );
    // Spot checks against FORMAT.md offsets (little-endian).
    assert_eq!(&bytes[0..4], b"RLGE");
    assert_eq!(&bytes[4..6], &[1, 0]);
    assert_eq!(bytes[6], 1);
    assert_eq!(&bytes[8..24], b"0123456789abcdef");
    assert_eq!(&bytes[24..32], &0x0000_0001_0000_2000u64.to_le_bytes());
    assert_eq!(&bytes[32..40], &[8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(&bytes[40..44], &7u32.to_le_bytes());
    assert_eq!(&bytes[56..64], &11u64.to_le_bytes());
    assert!(bytes[76..124].iter().all(|b| *b == 0));
    assert_eq!(
        &bytes[124..128],
        &crc32c::crc32c(&bytes[..124]).to_le_bytes()
    );
}

#[test]
fn metadata_slot_v1_vector() {
    let bytes = unhex(META_V1_HEX);
    assert_eq!(bytes.len(), 512);
    assert_eq!(
        golden_meta_v1().encode_v1().unwrap().to_vec(),
        bytes,
        "encode"
    );
    assert_eq!(
        MetaSlot::decode_versioned(&bytes).unwrap(),
        (golden_meta_v1(), 1),
        "decode"
    );
    let mut block = bytes.clone();
    block.resize(4096, 0);
    assert_eq!(
        MetaSlot::decode_versioned(&block).unwrap(),
        (golden_meta_v1(), 1),
        "decode as the 4096-byte block format-1 code wrote"
    );
    assert_eq!(&bytes[0..8], b"RPLGMETA");
    assert_eq!(&bytes[8..10], &[1, 0]);
    assert_eq!(&bytes[32..40], &42u64.to_le_bytes());
    assert_eq!(&bytes[104..106], &[0b101, 0b1000_0000]);
    assert_eq!(&bytes[112..120], &1000u64.to_le_bytes());
    assert_eq!(&bytes[112 + 15 * 8..120 + 15 * 8], &1234u64.to_le_bytes());
    assert_eq!(
        &bytes[508..512],
        &crc32c::crc32c(&bytes[..508]).to_le_bytes()
    );
}

fn golden_meta_v2() -> MetaSlot {
    let mut resync_seqs = [0u64; 16];
    resync_seqs[0] = 7;
    resync_seqs[2] = 0x0102_0304_0506_0708;
    resync_seqs[15] = 99;
    MetaSlot {
        sequence: 43,
        generation: 10,
        resync_seqs,
        features: FEATURE_ACTIVITY_LOG,
        identity: Identity {
            role: Role::Secondary,
            epochs: vec![
                EpochStart {
                    epoch: 1,
                    start_lsn: 1,
                },
                EpochStart {
                    epoch: 2,
                    start_lsn: 1001,
                },
                EpochStart {
                    epoch: 5,
                    start_lsn: 0x1_0000_0000,
                },
            ],
            binding: Some(Binding {
                peer_group_uuid: *b"fedcba9876543210",
                peer_site_id: "paris-2".to_string(),
            }),
        },
        activity_log: ActivityLogState {
            extent_bytes: 4 << 20,
            extents: vec![(0, 0), (0, 5), (3, 0x1_0000_0000)],
        },
        ..golden_meta_v1()
    }
}

/// The format-2 slot vector (what a format-2 build wrote; this build decodes it with no drop
/// floors and, only to build upgrade-test images, can still encode it): (offset, bytes) rows;
/// every byte not listed is zero.
const META_V2_ROWS: &[(usize, &str)] = &[
    (
        0,
        "52504c47 4d455441 02000000 00100000 30313233 34353637 38396162 63646566",
    ),
    (
        32,
        "2b000000 00000000 00201000 00000000 00200000 00000000 00001000 00000000",
    ),
    (
        64,
        "0a000000 08000000 80002000 00000000 e8030000 00000000 00402000 00000000",
    ),
    (
        96,
        "00002a36 fe9c9717 05800000 00000000 e8030000 00000000 00000000 00000000",
    ),
    (
        128,
        "dc050000 00000000 00000000 00000000 00000000 00000000 00000000 00000000",
    ),
    (
        224,
        "00000000 00000000 d2040000 00000000 07000000 00000000 00000000 00000000",
    ),
    (
        256,
        "08070605 04030201 00000000 00000000 00000000 00000000 00000000 00000000",
    ),
    (
        352,
        "00000000 00000000 63000000 00000000 01000000 00000000 02010703 03000000",
    ),
    (
        384,
        "66656463 62613938 37363534 33323130 70617269 732d3200 00000000 00000000",
    ),
    (
        448,
        "00000000 00000000 00000000 00000000 00004000 00000000 00000000 00000000",
    ),
    (
        480,
        "01000000 00000000 01000000 00000000 02000000 00000000 e9030000 00000000",
    ),
    (
        512,
        "05000000 00000000 00000000 01000000 00000000 00000000 00000000 00000000",
    ),
    (
        992,
        "00000000 00000000 00000000 00000000 05000000 00000000 03000000 00000000",
    ),
    (
        1024,
        "01000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000",
    ),
    (
        4064,
        "00000000 00000000 00000000 00000000 00000000 00000000 00000000 2c8a656f",
    ),
];

fn slot_bytes(rows: &[(usize, &str)]) -> Vec<u8> {
    let mut bytes = vec![0u8; 4096];
    for (at, row) in rows {
        let row = unhex(row);
        bytes[*at..*at + row.len()].copy_from_slice(&row);
    }
    bytes
}

#[test]
fn metadata_slot_v2_vector() {
    let bytes = slot_bytes(META_V2_ROWS);
    assert_eq!(golden_meta_v2().encode_v2().unwrap(), bytes, "encode");
    assert_eq!(
        MetaSlot::decode_versioned(&bytes).unwrap(),
        (golden_meta_v2(), 2),
        "decode"
    );
    // Spot checks against FORMAT.md offsets (little-endian).
    assert_eq!(&bytes[0..8], b"RPLGMETA");
    assert_eq!(&bytes[8..10], &[2, 0]);
    // The format-1 fields keep their format-1 offsets.
    assert_eq!(&bytes[16..32], b"0123456789abcdef");
    assert_eq!(&bytes[32..40], &43u64.to_le_bytes());
    assert_eq!(&bytes[112..120], &1000u64.to_le_bytes());
    assert_eq!(&bytes[240..248], &7u64.to_le_bytes(), "resync_seqs[0]");
    assert_eq!(&bytes[256..264], &0x0102_0304_0506_0708u64.to_le_bytes());
    assert_eq!(&bytes[360..368], &99u64.to_le_bytes(), "resync_seqs[15]");
    assert_eq!(&bytes[368..376], &1u64.to_le_bytes(), "features");
    assert_eq!(bytes[376], 2, "role secondary");
    assert_eq!(bytes[377], 1, "bound");
    assert_eq!(bytes[378], 7, "peer site id length");
    assert_eq!(bytes[379], 3, "epoch count");
    assert_eq!(&bytes[380..382], &3u16.to_le_bytes(), "activity log count");
    assert_eq!(&bytes[384..400], b"fedcba9876543210");
    assert_eq!(&bytes[400..407], b"paris-2");
    assert!(bytes[407..464].iter().all(|b| *b == 0));
    assert_eq!(
        &bytes[464..472],
        &(4u64 << 20).to_le_bytes(),
        "extent bytes"
    );
    assert_eq!(&bytes[480..488], &1u64.to_le_bytes(), "epochs[0].epoch");
    assert_eq!(
        &bytes[504..512],
        &1001u64.to_le_bytes(),
        "epochs[1].start_lsn"
    );
    assert_eq!(&bytes[512..520], &5u64.to_le_bytes(), "epochs[2].epoch");
    assert_eq!(&bytes[1004..1008], &0u32.to_le_bytes(), "al[1].device");
    assert_eq!(&bytes[1008..1016], &5u64.to_le_bytes(), "al[1].extent");
    assert_eq!(&bytes[1016..1020], &3u32.to_le_bytes(), "al[2].device");
    assert_eq!(&bytes[1020..1028], &0x1_0000_0000u64.to_le_bytes());
    assert_eq!(
        &bytes[4092..4096],
        &crc32c::crc32c(&bytes[..4092]).to_le_bytes()
    );
}

/// The format-3 slot: the format-2 example with drop floors for slinks 1, 2 (floor 0, which a
/// set bit tells apart from none) and 15. The activity log moved to 11-byte entries.
fn golden_meta_v3() -> MetaSlot {
    let mut drop_floors = [None; 16];
    drop_floors[1] = Some(1200);
    drop_floors[2] = Some(0);
    drop_floors[15] = Some(0x0a0b_0c0d_0e0f_1011);
    MetaSlot {
        sequence: 44,
        drop_floors,
        ..golden_meta_v2()
    }
}

/// The format-3 slot vector: (offset, bytes) rows; every byte not listed is zero.
const META_V3_ROWS: &[(usize, &str)] = &[
    (
        0,
        "52504c47 4d455441 03000000 00100000 30313233 34353637 38396162 63646566",
    ),
    (
        32,
        "2c000000 00000000 00201000 00000000 00200000 00000000 00001000 00000000",
    ),
    (
        64,
        "0a000000 08000000 80002000 00000000 e8030000 00000000 00402000 00000000",
    ),
    (
        96,
        "00002a36 fe9c9717 05800000 00000000 e8030000 00000000 00000000 00000000",
    ),
    (
        128,
        "dc050000 00000000 00000000 00000000 00000000 00000000 00000000 00000000",
    ),
    (
        224,
        "00000000 00000000 d2040000 00000000 07000000 00000000 00000000 00000000",
    ),
    (
        256,
        "08070605 04030201 00000000 00000000 00000000 00000000 00000000 00000000",
    ),
    (
        352,
        "00000000 00000000 63000000 00000000 01000000 00000000 02010703 03000680",
    ),
    (
        384,
        "66656463 62613938 37363534 33323130 70617269 732d3200 00000000 00000000",
    ),
    (
        448,
        "00000000 00000000 00000000 00000000 00004000 00000000 00000000 00000000",
    ),
    (
        480,
        "01000000 00000000 01000000 00000000 02000000 00000000 e9030000 00000000",
    ),
    (
        512,
        "05000000 00000000 00000000 01000000 00000000 00000000 00000000 00000000",
    ),
    (
        992,
        "00000000 00000000 00000000 00000005 00000000 00000300 00000000 00000100",
    ),
    (
        3808,
        "00000000 00000000 b0040000 00000000 00000000 00000000 00000000 00000000",
    ),
    (
        3904,
        "00000000 00000000 00000000 00000000 00000000 00000000 11100f0e 0d0c0b0a",
    ),
    (
        4064,
        "00000000 00000000 00000000 00000000 00000000 00000000 00000000 b9ea6391",
    ),
];

#[test]
fn metadata_slot_v3_vector() {
    let bytes = slot_bytes(META_V3_ROWS);
    assert_eq!(golden_meta_v3().encode(), bytes, "encode");
    assert_eq!(
        MetaSlot::decode_versioned(&bytes).unwrap(),
        (golden_meta_v3(), 3),
        "decode"
    );
    // Spot checks against FORMAT.md offsets (little-endian).
    assert_eq!(&bytes[8..10], &[3, 0]);
    // Fields before the activity log keep their format-2 offsets.
    assert_eq!(&bytes[240..248], &7u64.to_le_bytes(), "resync_seqs[0]");
    assert_eq!(&bytes[380..382], &3u16.to_le_bytes(), "activity log count");
    assert_eq!(
        &bytes[382..384],
        &0b1000_0000_0000_0110u16.to_le_bytes(),
        "drop_floor_set: slinks 1, 2, 15"
    );
    // Activity log entries: device u32 + extent in 7 bytes, 11 bytes each from 992.
    assert_eq!(&bytes[1003..1007], &0u32.to_le_bytes(), "al[1].device");
    assert_eq!(&bytes[1007..1014], &5u64.to_le_bytes()[..7], "al[1].extent");
    assert_eq!(&bytes[1014..1018], &3u32.to_le_bytes(), "al[2].device");
    assert_eq!(&bytes[1018..1025], &0x1_0000_0000u64.to_le_bytes()[..7]);
    assert!(bytes[1025..3808].iter().all(|b| *b == 0), "unused entries");
    // drop_floors[16] from 3808; slink 2's floor 0 is told apart from none by its bit.
    assert_eq!(&bytes[3816..3824], &1200u64.to_le_bytes(), "drop_floors[1]");
    assert_eq!(&bytes[3824..3832], &[0; 8], "drop_floors[2] = 0");
    assert_eq!(
        &bytes[3928..3936],
        &0x0a0b_0c0d_0e0f_1011u64.to_le_bytes(),
        "drop_floors[15]"
    );
    assert!(bytes[3936..4092].iter().all(|b| *b == 0), "reserved");
    assert_eq!(
        &bytes[4092..4096],
        &crc32c::crc32c(&bytes[..4092]).to_le_bytes()
    );
    assert!(
        golden_meta_v3().encode_v2().is_none(),
        "format 2 cannot say it"
    );
}
