//! A front-end benchmark, ignored by default (it takes about a minute and wants a quiet
//! machine): the same fio jobs against this server (over the test file export), qemu-nbd and
//! nbdkit's file plugin, each on its own file of the same file system.
//!
//! Run: `cargo test --release --test nbd_bench -- --ignored --nocapture`
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod nbd_support;

use std::time::Duration;

use nbd_support::*;
use replicator::nbd::ServerConfig;

const SIZE: u64 = 1 << 30;

/// (name, fio arguments) of the benchmark jobs.
fn jobs() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("seq-write-1M-qd16", vec!["--rw=write", "--bs=1M", "--iodepth=16"]),
        ("rand-write-4k-qd32", vec!["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
        ("rand-write-4k-qd1", vec!["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
        ("rand-read-4k-qd32", vec!["--rw=randread", "--bs=4k", "--iodepth=32"]),
    ]
}

/// Runs one fio job, returns (IOPS, MiB/s).
async fn fio_job(uri: &str, args: &[&str], secs: u32) -> (f64, f64) {
    let uri_arg = format!("--uri={uri}");
    let runtime = format!("--runtime={secs}");
    let size = format!("--size={SIZE}");
    let mut all = vec![
        "--name=bench",
        "--ioengine=nbd",
        &uri_arg,
        "--time_based",
        &runtime,
        &size,
        "--output-format=json",
    ];
    all.extend_from_slice(args);
    let out = run_ok("fio", &all).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let job = &v["jobs"][0];
    let dir = if args.iter().any(|a| a.contains("read")) {
        "read"
    } else {
        "write"
    };
    let iops = job[dir]["iops"].as_f64().unwrap();
    let bw_kib = job[dir]["bw"].as_f64().unwrap();
    (iops, bw_kib / 1024.0)
}

async fn wait_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port} never opened");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Fills a file with data so reads hit real blocks (not holes) for every server alike.
fn prefill(path: &std::path::Path) {
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::File::create(path).unwrap();
    for _ in 0..(SIZE >> 20) {
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored"]
async fn bench_against_qemu_nbd_and_nbdkit() {
    require_bins!("fio", "qemu-nbd", "nbdkit");
    let secs: u32 = std::env::var("NBD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();

    let ours_path = dir.path().join("ours.img");
    prefill(&ours_path);
    let mut exports = TestExports::default();
    let export = FileExport::open_existing(&ours_path);
    exports.add("disk", export);
    let server = start_tcp(exports, ServerConfig::default()).await;

    let qemu_path = dir.path().join("qemu.img");
    prefill(&qemu_path);
    let qemu_port = free_port();
    let mut qemu = tokio::process::Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "disk",
            "-b",
            "127.0.0.1",
            "-p",
            &qemu_port.to_string(),
            "--persistent",
            "--shared=16",
            "--cache=writeback",
            "--aio=threads",
            qemu_path.to_str().unwrap(),
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_port(qemu_port).await;

    let kit_path = dir.path().join("kit.img");
    prefill(&kit_path);
    let kit_port = free_port();
    let mut kit = tokio::process::Command::new("nbdkit")
        .args([
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            &kit_port.to_string(),
            "file",
            kit_path.to_str().unwrap(),
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_port(kit_port).await;

    println!("{:<22} {:>26} {:>26} {:>26} {:>8}", "job", "replicator", "qemu-nbd", "nbdkit", "vs qemu");
    for (name, args) in jobs() {
        let ours = fio_job(&server.uri("disk"), &args, secs).await;
        let q = fio_job(&format!("nbd://127.0.0.1:{qemu_port}/disk"), &args, secs).await;
        let k = fio_job(&format!("nbd://127.0.0.1:{kit_port}/"), &args, secs).await;
        let fmt = |(iops, mib): (f64, f64)| format!("{iops:>9.0} IOPS {mib:>8.1} MiB/s");
        println!(
            "{name:<22} {:>26} {:>26} {:>26} {:>7.2}x",
            fmt(ours),
            fmt(q),
            fmt(k),
            ours.0 / q.0
        );
    }
    qemu.kill().await.unwrap();
    kit.kill().await.unwrap();
    server.stop().await;
}
