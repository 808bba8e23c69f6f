//! Append throughput of the replog against the file system's sequential O_DIRECT bandwidth.
//!
//! One run measures, on the same file system, and prints MiB/s, appends/s, latency and the ratios
//! against the goals (1 MiB appends >= 0.8x fio; 4 KiB appends >= 20,000/s):
//!
//! 1. 4 KiB durable appends from 32 writer threads (group commit; each append is durable before it
//!    returns);
//! 2. 1 MiB durable appends from 16 writer threads;
//! 3. fio's sequential O_DIRECT write (1 MiB blocks, io_uring, queue depth 16), if fio is installed.
//!
//! A background thread keeps the ring from filling: it advances
//! slink 0's cursor to the highest completed lsn and reclaims every 2 ms.
//!
//! Run: `cargo bench -p replog --bench append`. Environment knobs:
//! - `REPLOG_BENCH_DIR`: directory for the log and fio's file (default: cargo's target tmpdir);
//! - `REPLOG_BENCH_SECS`: seconds per append phase (default 8);
//! - `REPLOG_BENCH_RING_MIB`: replog size in MiB (default 512);
//! - `REPLOG_BENCH_FIO_SIZE`: fio's --size (default 2G);
//! - `REPLOG_BENCH_BACKEND`: auto | io_uring | pwrite (default auto).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replog::io::{Backend, IoFile, IoOptions};
use replog::{CreateOptions, Durability, EntryKind, Record, Replog};

const MIB: f64 = 1024.0 * 1024.0;
const RECLAIM_INTERVAL: Duration = Duration::from_millis(2);
const GOAL_1M_VS_FIO: f64 = 0.8;
const GOAL_4K_APPENDS_PER_SEC: f64 = 20_000.0;

struct Phase {
    name: String,
    threads: usize,
    appends: u64,
    bytes: u64,
    elapsed: Duration,
    full_retries: u64,
    latencies_us: Vec<u32>,
}

impl Phase {
    fn appends_per_sec(&self) -> f64 {
        self.appends as f64 / self.elapsed.as_secs_f64()
    }
    fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / MIB / self.elapsed.as_secs_f64()
    }
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.latencies_us[i]) / 1000.0
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not valid")),
        Err(_) => default,
    }
}

fn run_phase(
    log: &Arc<Replog>,
    completed: &Arc<AtomicU64>,
    entry_bytes: usize,
    threads: usize,
    duration: Duration,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = Arc::clone(log);
            let completed = Arc::clone(completed);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let data = vec![(t as u8).wrapping_add(1); entry_bytes];
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut appends = 0u64;
                let mut full_retries = 0u64;
                // Each thread writes its own stripe of a 1 TiB virtual device.
                let stripe = (t as u64) << 34;
                while !stop.load(Ordering::Relaxed) {
                    let offset = stripe + (appends * entry_bytes as u64) % (1 << 34);
                    let record = Record {
                        device: 0,
                        offset,
                        kind: EntryKind::Write,
                        len: entry_bytes as u64,
                        data: &data,
                    };
                    let began = Instant::now();
                    let lsn = match log.append(record, Durability::Durable) {
                        Ok(appending) => appending.wait().expect("durable append failed"),
                        Err(replog::Error::Full { .. }) => {
                            // The reclaimer frees space every few ms.
                            full_retries += 1;
                            std::thread::sleep(Duration::from_micros(200));
                            continue;
                        }
                        Err(e) => panic!("append failed: {e}"),
                    };
                    latencies.push(u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX));
                    completed.fetch_max(lsn, Ordering::Relaxed);
                    appends += 1;
                }
                (appends, full_retries, latencies)
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut phase = Phase {
        name: format!("append {} durable", human(entry_bytes)),
        threads,
        appends: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        full_retries: 0,
        latencies_us: Vec::new(),
    };
    for h in handles {
        let (appends, retries, lat) = h.join().unwrap();
        phase.appends += appends;
        phase.full_retries += retries;
        phase.latencies_us.extend(lat);
    }
    phase.elapsed = start.elapsed();
    phase.bytes = phase.appends * entry_bytes as u64;
    phase.latencies_us.sort_unstable();
    phase
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// fio's sequential O_DIRECT write bandwidth in bytes/s, or why it could not be measured.
fn fio_bandwidth(dir: &Path, size: &str) -> Result<f64, String> {
    match Command::new("fio").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        _ => return Err("fio is not installed: skipped (apt-get install fio)".into()),
    }
    let file = dir.join("fio-seq.dat");
    let out = Command::new("fio")
        .args([
            "--name=seq",
            "--rw=write",
            "--bs=1M",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=16",
            "--end_fsync=1",
            "--output-format=json",
        ])
        .arg(format!("--size={size}"))
        .arg(format!("--filename={}", file.display()))
        .output()
        .map_err(|e| format!("running fio: {e}"))?;
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // fio may print warnings before the JSON document.
    let text = String::from_utf8_lossy(&out.stdout);
    let json_start = text.find('{').ok_or("fio printed no JSON")?;
    let doc: serde_json::Value =
        serde_json::from_str(&text[json_start..]).map_err(|e| format!("fio JSON: {e}"))?;
    doc["jobs"][0]["write"]["bw_bytes"]
        .as_f64()
        .filter(|bw| *bw > 0.0)
        .ok_or_else(|| "fio JSON has no jobs[0].write.bw_bytes".into())
}

fn main() {
    let secs: u64 = env_or("REPLOG_BENCH_SECS", 8);
    let ring_mib: u64 = env_or("REPLOG_BENCH_RING_MIB", 512);
    let fio_size: String = env_or("REPLOG_BENCH_FIO_SIZE", "2G".to_string());
    let backend: Backend = env_or("REPLOG_BENCH_BACKEND", Backend::Auto);
    let base: PathBuf = env_or(
        "REPLOG_BENCH_DIR",
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    );
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("replog-bench")
        .tempdir_in(&base)
        .unwrap();
    let path = dir.path().join("replog");
    let io = IoOptions {
        backend,
        ..IoOptions::default()
    };

    let created = Instant::now();
    let log = Replog::create(
        &path,
        &CreateOptions {
            offset: 0,
            size: ring_mib << 20,
            io: io.clone(),
        },
    )
    .unwrap();
    let create_time = created.elapsed();
    // The replog does not report O_DIRECT; open the same file with the same options to learn
    // what the file system grants.
    let direct = IoFile::open(&path, false, &io).unwrap().is_direct();
    log.register_slink(0, 0).unwrap();
    let log = Arc::new(log);
    let completed = Arc::new(AtomicU64::new(0));

    let stop_reclaim = Arc::new(AtomicBool::new(false));
    let reclaimer = {
        let log = Arc::clone(&log);
        let completed = Arc::clone(&completed);
        let stop = Arc::clone(&stop_reclaim);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let lsn = completed.load(Ordering::Relaxed);
                if lsn > log.cursor(0).unwrap_or(0) {
                    log.set_cursor(0, lsn).unwrap();
                    log.reclaim().unwrap();
                }
                std::thread::sleep(RECLAIM_INTERVAL);
            }
        })
    };

    let duration = Duration::from_secs(secs);
    let small = run_phase(&log, &completed, 4096, 32, duration);
    let large = run_phase(&log, &completed, 1 << 20, 16, duration);
    stop_reclaim.store(true, Ordering::Relaxed);
    reclaimer.join().unwrap();
    let backend_used = log.io_backend();
    drop(log);
    drop(std::fs::remove_file(&path));

    let fio = fio_bandwidth(dir.path(), &fio_size);

    println!();
    println!("replog append benchmark");
    println!("  directory:   {}", base.display());
    println!("  io backend:  {backend_used} (requested {backend})");
    println!(
        "  O_DIRECT:    {}",
        if direct {
            "yes"
        } else {
            "no (buffered fallback)"
        }
    );
    println!(
        "  replog:      {ring_mib} MiB, created (zero-filled) in {:.2} s; {secs} s per phase",
        create_time.as_secs_f64()
    );
    println!();
    println!(
        "{:<28} {:>7} {:>12} {:>10} {:>9} {:>9} {:>10}",
        "workload", "threads", "appends/s", "MiB/s", "p50 ms", "p99 ms", "ring full"
    );
    for p in [&small, &large] {
        println!(
            "{:<28} {:>7} {:>12.0} {:>10.1} {:>9.2} {:>9.2} {:>10}",
            p.name,
            p.threads,
            p.appends_per_sec(),
            p.mib_per_sec(),
            p.percentile_ms(0.5),
            p.percentile_ms(0.99),
            p.full_retries
        );
    }
    match &fio {
        Ok(bw) => println!(
            "{:<28} {:>7} {:>12} {:>10.1}",
            format!("fio seq write 1M qd16 {fio_size}"),
            1,
            "-",
            bw / MIB
        ),
        Err(why) => println!("{:<28} {why}", "fio seq write"),
    }
    println!();
    let verdict = |ok: bool| if ok { "meets goal" } else { "BELOW GOAL" };
    match &fio {
        Ok(bw) => {
            let ratio = large.mib_per_sec() * MIB / bw;
            println!(
                "1 MiB appends vs fio bandwidth: {ratio:.2}x (goal >= {GOAL_1M_VS_FIO}x): {}",
                verdict(ratio >= GOAL_1M_VS_FIO)
            );
        }
        Err(_) => println!("1 MiB appends vs fio bandwidth: not measured (no fio)"),
    }
    let rate = small.appends_per_sec();
    println!(
        "4 KiB appends per second: {rate:.0}/s (goal >= {GOAL_4K_APPENDS_PER_SEC:.0}/s): {}",
        verdict(rate >= GOAL_4K_APPENDS_PER_SEC)
    );
}
