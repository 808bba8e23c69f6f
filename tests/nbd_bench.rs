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
        (
            "seq-write-1M-qd16",
            vec!["--rw=write", "--bs=1M", "--iodepth=16"],
        ),
        (
            "rand-write-4k-qd32",
            vec!["--rw=randwrite", "--bs=4k", "--iodepth=32"],
        ),
        (
            "rand-write-4k-qd1",
            vec!["--rw=randwrite", "--bs=4k", "--iodepth=1"],
        ),
        (
            "rand-read-4k-qd32",
            vec!["--rw=randread", "--bs=4k", "--iodepth=32"],
        ),
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
    // fio may print notes before the JSON document.
    let json = &out[out
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in fio output:\n{out}"))..];
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}\n{out}"));
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
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
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

    println!(
        "{:<22} {:>26} {:>26} {:>26} {:>8}",
        "job", "replicator", "qemu-nbd", "nbdkit", "vs qemu"
    );
    // NBD_BENCH_JOBS=substring limits the run to matching jobs.
    let only = std::env::var("NBD_BENCH_JOBS").unwrap_or_default();
    for (name, args) in jobs()
        .into_iter()
        .filter(|(n, _)| n.contains(only.as_str()))
    {
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

/// An in-memory export: isolates the front end's own cost from the storage path.
struct MemExport {
    data: std::sync::RwLock<Vec<u8>>,
}

impl replicator::nbd::Export for MemExport {
    fn size(&self) -> u64 {
        self.data.read().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, replicator::nbd::BlockError> {
        let d = self.data.read().unwrap();
        Ok(d[offset as usize..offset as usize + len as usize].to_vec())
    }
    async fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        _fua: bool,
    ) -> Result<(), replicator::nbd::BlockError> {
        let mut d = self.data.write().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        Ok(())
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _fua: bool,
        _may_trim: bool,
    ) -> Result<(), replicator::nbd::BlockError> {
        let mut d = self.data.write().unwrap();
        d[offset as usize..offset as usize + len as usize].fill(0);
        Ok(())
    }
    async fn trim(&self, _: u64, _: u32, _: bool) -> Result<(), replicator::nbd::BlockError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), replicator::nbd::BlockError> {
        Ok(())
    }
}

struct MemExports(std::sync::Arc<MemExport>);

impl replicator::nbd::Exports for MemExports {
    type Export = MemExport;
    fn lookup(&self, name: &str) -> Option<std::sync::Arc<MemExport>> {
        (name == "mem").then(|| std::sync::Arc::clone(&self.0))
    }
    fn list(&self) -> Vec<String> {
        vec!["mem".into()]
    }
}

/// Front end only: both servers keep the data in memory (ours: `MemExport`; nbdkit: its
/// `memory` plugin), so the difference is protocol handling, scheduling and copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored"]
async fn bench_front_end_in_memory_against_nbdkit() {
    require_bins!("fio", "nbdkit");
    let secs: u32 = std::env::var("NBD_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let exports = MemExports(std::sync::Arc::new(MemExport {
        data: std::sync::RwLock::new(vec![0x5a; SIZE as usize]),
    }));
    let server = tokio::spawn(replicator::nbd::serve_tcp(
        listener,
        std::sync::Arc::new(exports),
        ServerConfig::default(),
        std::sync::Arc::new(replicator::nbd::ServerStats::new()),
        rx,
    ));
    let kit_port = free_port();
    let mut kit = tokio::process::Command::new("nbdkit")
        .args([
            "--foreground",
            "--exit-with-parent",
            "-i",
            "127.0.0.1",
            "-p",
            &kit_port.to_string(),
            "memory",
            &SIZE.to_string(),
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_port(kit_port).await;
    println!(
        "{:<22} {:>26} {:>26} {:>8}",
        "job", "replicator(mem)", "nbdkit(memory)", "ratio"
    );
    let only = std::env::var("NBD_BENCH_JOBS").unwrap_or_default();
    for (name, args) in jobs()
        .into_iter()
        .filter(|(n, _)| n.contains(only.as_str()))
    {
        let ours = fio_job(&format!("nbd://127.0.0.1:{port}/mem"), &args, secs).await;
        let k = fio_job(&format!("nbd://127.0.0.1:{kit_port}/"), &args, secs).await;
        let fmt = |(iops, mib): (f64, f64)| format!("{iops:>9.0} IOPS {mib:>8.1} MiB/s");
        println!(
            "{name:<22} {:>26} {:>26} {:>7.2}x",
            fmt(ours),
            fmt(k),
            ours.0 / k.0
        );
    }
    kit.kill().await.unwrap();
    tx.send(true).unwrap();
    server.await.unwrap().unwrap();
}
