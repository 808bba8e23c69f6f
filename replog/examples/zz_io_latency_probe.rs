#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
use replog::io::{AlignedBuf, Backend, IoBatch, IoFile, IoOptions};
use std::time::Instant;
fn main() {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().unwrap());
    let backend: Backend = args.next().unwrap_or("auto".into()).parse().unwrap();
    let f = IoFile::open(
        &path,
        true,
        &IoOptions {
            backend,
            ..Default::default()
        },
    )
    .unwrap();
    f.preallocate_zeroed(0, 64 << 20).unwrap();
    let mut lat = Vec::new();
    let mut buf = AlignedBuf::zeroed(8192);
    for i in 0..3000u64 {
        let t = Instant::now();
        let mut bufs = f
            .submit(IoBatch {
                writes: vec![((i % 4000) * 8192, buf)],
                sync_after: false,
            })
            .wait()
            .unwrap();
        buf = bufs.pop().unwrap();
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    println!(
        "io layer {:?} 8K QD1: p50 {} us p99 {}",
        f.backend(),
        lat[1500],
        lat[2970]
    );
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc_odirect())
        .open(&path)
        .unwrap();
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let mut lat = Vec::new();
    for i in 0..3000u64 {
        let t = Instant::now();
        file.write_all_at(&buf, (i % 4000) * 8192).unwrap();
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    println!("raw pwrite 8K QD1: p50 {} us p99 {}", lat[1500], lat[2970]);
}
fn libc_odirect() -> i32 {
    0o40000
}
