//! Fuzzes recovery: arbitrary bytes laid over a valid replog image (metadata and ring) must open
//! to Ok or a clean error, never panic, and whatever opens must read back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replog::storage::MemDisk;
use replog::{Durability, EntryKind, Record, Replog};

const SIZE: u64 = 8192 + 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&where_byte, patch)) = data.split_first() else {
        return;
    };
    let disk = MemDisk::new(SIZE, 512);
    let Ok(log) = Replog::create_on(disk.clone(), 0, SIZE) else {
        return;
    };
    for i in 0..3u8 {
        let payload = vec![i; 700];
        let rec = Record {
            device: 0,
            offset: 0,
            kind: EntryKind::Write,
            len: 700,
            data: &payload,
        };
        if let Ok(h) = log.append(rec, Durability::Durable) {
            let _ = h.wait();
        }
    }
    drop(log);
    let mut image = disk.durable_image();
    let at = usize::from(where_byte) * 64;
    for (i, b) in patch.iter().enumerate() {
        if let Some(x) = image.get_mut(at + i) {
            *x = *b;
        }
    }
    let disk = MemDisk::from_image(image, 512);
    let _ = replog::inspect_storage(disk.as_ref(), 0, 16);
    if let Ok((log, report)) = Replog::open_on(disk, 0) {
        let entries = log.read_from(0, 100, u64::MAX).unwrap_or_default();
        assert_eq!(entries.len() as u64, report.entries);
    }
});
