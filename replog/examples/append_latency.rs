//! Latency of single appends (queue depth 1): `cargo run --release -p replog --example
//! append_latency -- DIR [written|durable][-async] [COUNT]`. Prints p50/p99 in microseconds.
//!
//! Plain modes block in `Appending::wait` (an idle log lets the waiter write its batch itself);
//! `-async` modes `.await` the handle on a tokio current-thread runtime, as the NBD front end
//! does (the I/O thread writes the batch and wakes the task).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::Instant;

use replog::{CreateOptions, Durability, EntryKind, Record, Replog};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().unwrap_or_else(|| ".".into()));
    let mode = args.next().unwrap_or_else(|| "written".into());
    let durability = match mode.trim_end_matches("-async") {
        "durable" => Durability::Durable,
        _ => Durability::Written,
    };
    let awaited = mode.ends_with("-async");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let count: usize = args.next().map(|c| c.parse().unwrap()).unwrap_or(5000);
    let path = dir.join("append-latency.replog");
    let log = Replog::create(
        &path,
        &CreateOptions {
            offset: 0,
            size: 256 << 20,
            io: Default::default(),
        },
    )
    .unwrap();
    log.register_slink(0, 0).unwrap();
    let data = vec![7u8; 4096];
    let mut lat = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        let handle = log
            .append(
                Record {
                    device: 0,
                    offset: (i as u64 % 1000) * 4096,
                    kind: EntryKind::Write,
                    len: 4096,
                    data: &data,
                },
                durability,
            )
            .unwrap();
        let lsn = if awaited {
            runtime.block_on(handle).unwrap()
        } else {
            handle.wait().unwrap()
        };
        lat.push(t.elapsed().as_micros() as u64);
        if i % 1000 == 999 {
            log.set_cursor(0, lsn).unwrap();
            log.reclaim().unwrap();
        }
    }
    lat.sort_unstable();
    println!(
        "{:?}{} 4 KiB appends at QD1, backend {:?}: p50 {} us, p99 {} us",
        durability,
        if awaited { " (awaited)" } else { "" },
        log.io_backend(),
        lat[count / 2],
        lat[count * 99 / 100]
    );
    drop(log);
    let _ = std::fs::remove_file(&path);
}
