//! Enumerates every row of the recovery decision table: each finding is produced by `classify`
//! from a crafted header, and (for every case that can be planted in a real image) open() ends or
//! continues the log exactly as the table says.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use replog::format::{EntryHeader, RecordKind, BLOCK_BYTES, ENTRY_HEADER_BYTES};
use replog::recovery::{classify, decide, ChainState, Decision, Finding, DECISION_TABLE};
use replog::storage::MemDisk;
use replog::{Durability, EntryKind, Record, Replog};

const RING: u64 = 64 * 1024;
const SIZE: u64 = 8192 + RING;
const U: [u8; 16] = [0x5A; 16];
const DATA: &[u8] = b"0123456789abcdef0123456789";

fn state() -> ChainState {
    let expected = RING + 4096; // lap 1
    ChainState {
        uuid: U,
        ring_bytes: RING,
        expected_vpos: expected,
        prev_lsn: 10,
        prev_generation: 3,
        require_newer_generation: false,
        max_generation: 5,
        limit_vpos: 4096 + RING + RING - 4096,
    }
}

fn header() -> EntryHeader {
    EntryHeader {
        kind: RecordKind::Write,
        uuid: U,
        vpos: RING + 4096,
        lsn: 11,
        generation: 4,
        device: 0,
        offset: 0,
        len: DATA.len() as u64,
        timestamp_ns: 1,
        data_crc: crc32c::crc32c(DATA),
    }
}

fn reseal(mut b: [u8; 128]) -> [u8; 128] {
    let crc = crc32c::crc32c(&b[..124]);
    b[124..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn run(state: &ChainState, bytes: &[u8], data_crc: u32) -> Finding {
    classify(state, bytes, &mut |_len| Ok(data_crc)).unwrap().0
}

#[test]
fn classify_produces_every_finding() {
    let good_crc = crc32c::crc32c(DATA);
    let s = state();
    let mut seen = Vec::new();
    let mut check = |f: Finding, got: Finding| {
        assert_eq!(got, f);
        seen.push(f);
    };
    check(Finding::Valid, run(&s, &header().encode(), good_crc));
    check(
        Finding::Pad,
        run(
            &s,
            &EntryHeader {
                kind: RecordKind::Pad,
                len: 128,
                data_crc: 0,
                ..header()
            }
            .encode(),
            0,
        ),
    );
    check(Finding::Zeroed, run(&s, &[0u8; 128], good_crc));
    check(Finding::BadMagic, run(&s, &[0xEEu8; 128], good_crc));
    let mut torn = header().encode();
    torn[33] ^= 0x40;
    check(Finding::BadHeaderCrc, run(&s, &torn, good_crc));
    let mut v2 = header().encode();
    v2[4] = 2;
    check(Finding::ForeignVersion, run(&s, &reseal(v2), good_crc));
    let mut bad_kind = header().encode();
    bad_kind[6] = 0x77;
    check(Finding::Malformed, run(&s, &reseal(bad_kind), good_crc));
    check(
        Finding::OtherUuid,
        run(
            &s,
            &EntryHeader {
                uuid: [1; 16],
                ..header()
            }
            .encode(),
            good_crc,
        ),
    );
    check(
        Finding::StaleLap,
        run(
            &s,
            &EntryHeader {
                vpos: 4096,
                ..header()
            }
            .encode(),
            good_crc,
        ),
    );
    check(
        Finding::WrongPosition,
        run(
            &s,
            &EntryHeader {
                vpos: RING + 4096 + 128,
                ..header()
            }
            .encode(),
            good_crc,
        ),
    );
    check(
        Finding::StaleGeneration,
        run(
            &s,
            &EntryHeader {
                generation: 2,
                ..header()
            }
            .encode(),
            good_crc,
        ),
    );
    // After a block jump, the same generation as the chain is stale too.
    let jump = ChainState {
        require_newer_generation: true,
        ..s
    };
    assert_eq!(
        run(
            &jump,
            &EntryHeader {
                generation: 3,
                ..header()
            }
            .encode(),
            good_crc
        ),
        Finding::StaleGeneration
    );
    assert_eq!(run(&jump, &header().encode(), good_crc), Finding::Valid);
    check(
        Finding::FutureGeneration,
        run(
            &s,
            &EntryHeader {
                generation: 6,
                ..header()
            }
            .encode(),
            good_crc,
        ),
    );
    check(
        Finding::LsnNotIncreasing,
        run(
            &s,
            &EntryHeader {
                lsn: 10,
                ..header()
            }
            .encode(),
            good_crc,
        ),
    );
    let near_lap_end = ChainState {
        expected_vpos: 2 * RING - 256,
        ..s
    };
    check(
        Finding::BeyondTail,
        run(
            &near_lap_end,
            &EntryHeader {
                vpos: 2 * RING - 256,
                len: 1000,
                ..header()
            }
            .encode(),
            good_crc,
        ),
    );
    let tight = ChainState {
        limit_vpos: RING + 4096 + 128,
        ..s
    };
    assert_eq!(
        run(&tight, &header().encode(), good_crc),
        Finding::BeyondTail
    );
    check(
        Finding::BadDataCrc,
        run(&s, &header().encode(), good_crc ^ 1),
    );
    let full = ChainState {
        expected_vpos: s.limit_vpos,
        ..s
    };
    check(Finding::RingFull, run(&full, &header().encode(), good_crc));

    // Every row of the table was produced, and the table agrees with decide().
    for (finding, decision, why) in DECISION_TABLE {
        assert!(seen.contains(finding), "no case for {finding:?}");
        assert_eq!(decide(*finding), *decision);
        assert!(!why.is_empty());
        let continues = matches!(finding, Finding::Valid | Finding::Pad);
        assert_eq!(*decision != Decision::EndOfLog, continues, "{finding:?}");
    }
}

/// Builds a replog with two durable entries (lsn 1 at ring 0, lsn 2 at ring 4096), returns its
/// image, uuid and the generation that wrote them.
fn base_image() -> (Vec<u8>, [u8; 16], u32) {
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    for _ in 0..2 {
        let rec = Record {
            device: 0,
            offset: 0,
            kind: EntryKind::Write,
            len: 10,
            data: b"abcdefghij",
        };
        log.append(rec, Durability::Durable)
            .unwrap()
            .wait()
            .unwrap();
    }
    let (uuid, generation) = (log.uuid(), log.generation());
    drop(log);
    (disk.durable_image(), uuid, generation)
}

/// Plants `bytes` at ring position 8192 (where lsn 3 would go) and opens.
fn open_with_planted(image: &[u8], bytes: &[u8]) -> replog::RecoveryReport {
    let mut image = image.to_vec();
    let at = 8192 + 8192;
    image[at..at + bytes.len()].copy_from_slice(bytes);
    let (log, report) = Replog::open_on(MemDisk::from_image(image, 512), 0).unwrap();
    assert_eq!(
        log.read_from(0, 100, u64::MAX).unwrap().len() as u64,
        report.entries
    );
    report
}

#[test]
fn open_follows_the_table_on_planted_records() {
    let (image, uuid, generation) = base_image();
    let data = [7u8; 300];
    let valid = EntryHeader {
        kind: RecordKind::Write,
        uuid,
        vpos: 8192,
        lsn: 3,
        generation,
        device: 4,
        offset: 512,
        len: data.len() as u64,
        timestamp_ns: 9,
        data_crc: crc32c::crc32c(&data),
    };
    let record = |h: EntryHeader, payload: &[u8]| {
        let mut b = h.encode().to_vec();
        b.extend_from_slice(payload);
        b
    };
    // Valid: lsn 3 is recovered, then the zeroed rest ends the log.
    let r = open_with_planted(&image, &record(valid, &data));
    assert_eq!((r.entries, r.last_lsn, r.stop), (3, 3, Finding::Zeroed));
    // A valid pad then a valid entry at the next block.
    let pad = EntryHeader {
        kind: RecordKind::Pad,
        len: BLOCK_BYTES - ENTRY_HEADER_BYTES as u64,
        data_crc: 0,
        timestamp_ns: 0,
        ..valid
    };
    let mut bytes = record(pad, &vec![0u8; 4096 - 128]);
    bytes.extend(record(
        EntryHeader {
            vpos: 8192 + 4096,
            ..valid
        },
        &data,
    ));
    let r = open_with_planted(&image, &bytes);
    // Two batch-end pads of lsn 1 and 2, plus the planted one.
    assert_eq!(
        (r.entries, r.findings.get(&Finding::Pad).copied()),
        (3, Some(3))
    );

    let mut torn = record(valid, &data);
    torn[20] ^= 1;
    let mut v2 = valid.encode();
    v2[4] = 9;
    let mut bad_data = record(valid, &data);
    bad_data[200] ^= 1;
    let cases: Vec<(Finding, Vec<u8>)> = vec![
        (Finding::Zeroed, vec![0u8; 128]),
        (Finding::BadMagic, vec![0x42u8; 512]),
        (Finding::BadHeaderCrc, torn),
        (Finding::ForeignVersion, reseal(v2).to_vec()),
        (
            Finding::OtherUuid,
            record(
                EntryHeader {
                    uuid: [9; 16],
                    ..valid
                },
                &data,
            ),
        ),
        (
            Finding::WrongPosition,
            record(
                EntryHeader {
                    vpos: 8192 + 4096,
                    ..valid
                },
                &data,
            ),
        ),
        (
            Finding::StaleGeneration,
            record(
                EntryHeader {
                    generation: generation - 1,
                    ..valid
                },
                &data,
            ),
        ),
        (
            Finding::FutureGeneration,
            record(
                EntryHeader {
                    generation: generation + 5,
                    ..valid
                },
                &data,
            ),
        ),
        (
            Finding::LsnNotIncreasing,
            record(EntryHeader { lsn: 2, ..valid }, &data),
        ),
        (
            Finding::BeyondTail,
            record(EntryHeader { len: RING, ..valid }, &data),
        ),
        (Finding::BadDataCrc, bad_data),
    ];
    for (finding, bytes) in cases {
        let r = open_with_planted(&image, &bytes);
        assert_eq!((r.entries, r.stop), (2, finding), "{finding:?}: {r:?}");
    }
}

#[test]
fn stale_lap_leftover_never_validates() {
    // Fill lap 0, reclaim everything, and write a little in lap 1: the lap-0 records behind the
    // head are intact on disk but must not be recovered.
    let disk = MemDisk::new(SIZE, 512);
    let log = Replog::create_on(disk.clone(), 0, SIZE).unwrap();
    log.register_slink(0, 0).unwrap();
    let data = vec![3u8; 3000];
    let rec = Record {
        device: 0,
        offset: 0,
        kind: EntryKind::Write,
        len: 3000,
        data: &data,
    };
    while log.space().free_bytes > 8192 {
        log.append(rec, Durability::Written)
            .unwrap()
            .wait()
            .unwrap();
    }
    log.flush().wait().unwrap();
    let last = log.last_lsn();
    log.set_cursor(0, last).unwrap();
    log.reclaim().unwrap();
    for _ in 0..3 {
        log.append(rec, Durability::Durable)
            .unwrap()
            .wait()
            .unwrap();
    }
    drop(log);
    let (log, report) = Replog::open_on(MemDisk::from_image(disk.durable_image(), 512), 0).unwrap();
    assert_eq!(
        (report.entries, report.first_lsn, report.last_lsn),
        (3, last + 1, last + 3)
    );
    assert_eq!(report.stop, Finding::StaleLap, "{report:?}");
    drop(log);
}
