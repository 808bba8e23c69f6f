//! Golden test vectors for every on-disk structure, checked in both directions:
//! encode(struct) == bytes and decode(bytes) == struct. The bytes follow FORMAT.md; if this test
//! fails, the format changed: bump FORMAT_VERSION and add a version history entry.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use replog::format::{EntryHeader, MetaSlot, RecordKind};

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

fn golden_meta() -> MetaSlot {
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
    }
}

const META_HEX: &str = "
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
fn metadata_slot_vector() {
    let bytes = unhex(META_HEX);
    assert_eq!(bytes.len(), 512);
    assert_eq!(golden_meta().encode().to_vec(), bytes, "encode");
    assert_eq!(MetaSlot::decode(&bytes).unwrap(), golden_meta(), "decode");
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
