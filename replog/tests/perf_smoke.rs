//! Quick throughput figures (ignored by default; the real benchmark lives with the io layer).
//! Run: cargo test --release -p replog --test perf_smoke -- --ignored --nocapture
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;
use std::time::Instant;

use replog::{CreateOptions, Durability, EntryKind, Record, Replog};

fn run(writers: usize, len: usize, per_writer: usize) {
    let dir = tempfile::tempdir_in("/work").unwrap();
    let path = dir.path().join("replog");
    let size = 8192 + 2048 * (1 << 20);
    let log = Arc::new(
        Replog::create(
            &path,
            &CreateOptions {
                offset: 0,
                size,
                io: Default::default(),
            },
        )
        .unwrap(),
    );
    log.register_slink(0, 0).unwrap();
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let data = vec![t as u8; len];
                for i in 0..per_writer {
                    let rec = Record {
                        device: 0,
                        offset: (i * len) as u64,
                        kind: EntryKind::Write,
                        len: len as u64,
                        data: &data,
                    };
                    loop {
                        match log.append(rec, Durability::Durable) {
                            Ok(h) => {
                                h.wait().unwrap();
                                break;
                            }
                            Err(replog::Error::Full { .. }) => {
                                let last = log.last_lsn();
                                log.set_cursor(0, last.saturating_sub(1)).ok();
                                log.reclaim().unwrap();
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let n = writers * per_writer;
    println!(
        "writers={writers} len={len} appends={n} backend={} : {:.0} appends/s, {:.1} MB/s",
        log.io_backend(),
        n as f64 / secs,
        (n * len) as f64 / secs / 1e6
    );
}

#[test]
#[ignore]
fn perf_4k_32_writers() {
    run(32, 4096, 2000);
}

#[test]
#[ignore]
fn perf_1m_4_writers() {
    run(4, 1 << 20, 500);
}
