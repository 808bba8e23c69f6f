//! The group on the core (`replicator::driver`) against the engine it is to replace
//! (`replicator::engine::group`), in one process, on equal files, taking turns on every job:
//! what the core's decisions and the driver's threads cost a write, without NBD in between.
//!
//!   cargo test --release --test driver_bench -- --ignored --nocapture
//!   BENCH_SECS=5 BENCH_MIB=1024 BENCH_ROUNDS=3 BENCH_JOBS=rand-write-4k-qd1 cargo test --release --test driver_bench -- --ignored --nocapture
//!
//! Not a CI test (it measures; these machines are shared): ignored unless asked for.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator::driver::{DriverConfig, GroupDriver};
use replicator::engine::group::{Group, Role};
use replicator::engine::policy::{Fallbehind, PolicyKind};
use replicator::engine::spec::{
    DeviceSpec, DirtyLogSpec, GroupSpec, ReplogOpen, SiteDeviceSpec, SlinkSpec,
};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spec(dir: &Path, tag: &str, dev_bytes: u64, with_site: bool) -> (GroupSpec, DeviceSpec) {
    let mut slinks = Vec::new();
    for nr in 0..if with_site { 2u8 } else { 1 } {
        let path = dir.join(format!("{tag}-site{nr}.img"));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(dev_bytes).unwrap();
        slinks.push(SlinkSpec {
            nr,
            transport: "local",
            remote_addr: None,
            policy: if nr == 0 {
                PolicyKind::Sync
            } else {
                PolicyKind::Async
            },
            fallbehind: Fallbehind::default(),
            down_wait: None,
            devices: vec![SiteDeviceSpec {
                dev_nr: 0,
                path,
                dirty_log: if nr == 0 {
                    DirtyLogSpec::None
                } else {
                    DirtyLogSpec::Core {
                        region_size: 1 << 20,
                        initially_dirty: false,
                    }
                },
            }],
        });
    }
    (
        GroupSpec {
            replog_path: dir.join(format!("{tag}-replog")),
            replog_offset: 0,
            open: ReplogOpen::Create { size: 1 << 30 },
            slinks,
        },
        DeviceSpec {
            dev_nr: 0,
            size: dev_bytes,
        },
    )
}

enum Subject {
    Engine(Arc<Group>),
    Driver(Arc<GroupDriver>),
}

impl Subject {
    async fn write(&self, offset: u64, data: Vec<u8>) {
        let len = data.len() as u64;
        match self {
            Subject::Engine(g) => g
                .submit(0, offset, replog::EntryKind::Write, len, data, false)
                .await
                .unwrap(),
            Subject::Driver(d) => d
                .write(0, offset, replog::EntryKind::Write, len, data, false)
                .await
                .unwrap(),
        }
    }
    fn stop(self) {
        match self {
            Subject::Engine(g) => g.shutdown(),
            Subject::Driver(d) => d.shutdown(),
        }
    }
}

/// `qd` tasks writing `bs`-byte blocks (sequential per task or random) for `secs`; returns
/// writes per second.
async fn run(
    s: Arc<Subject>,
    dev_bytes: u64,
    bs: u64,
    qd: u64,
    sequential: bool,
    secs: u64,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let blocks = dev_bytes / bs;
    let mut tasks = Vec::new();
    for t in 0..qd {
        let (s, stop, count) = (s.clone(), stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut x = 0x2545_F491_4F6C_DD1D_u64 ^ (t + 1);
            let mut next = t * (blocks / qd);
            while !stop.load(Ordering::Relaxed) {
                let block = if sequential {
                    next = (next + 1) % blocks;
                    next
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % blocks
                };
                s.write(block * bs, vec![x as u8; bs as usize]).await;
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // One second of warm-up, then the measured window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c0 = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let n = count.load(Ordering::Relaxed) - c0;
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    rate
}

#[test]
#[ignore]
fn driver_against_engine() {
    let secs = env_u64("BENCH_SECS", 4);
    let dev_bytes = env_u64("BENCH_MIB", 512) << 20;
    let rounds = env_u64("BENCH_ROUNDS", 2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let jobs: [(&str, u64, u64, bool); 3] = [
        ("seq-write-1M-qd16", 1 << 20, 16, true),
        ("rand-write-4k-qd32", 4096, 32, false),
        ("rand-write-4k-qd1", 4096, 1, false),
    ];
    println!("| job | slinks | engine | driver | driver/engine |");
    println!("|---|---|---:|---:|---:|");
    let only = std::env::var("BENCH_JOBS").unwrap_or_default();
    for (job, bs, qd, seq) in jobs {
        if !only.is_empty() && !only.split_whitespace().any(|j| j == job) {
            continue;
        }
        for with_site in [false, true] {
            let mut best = [0f64; 2];
            for round in 0..rounds {
                for (i, which) in ["engine", "driver"].iter().enumerate() {
                    let dir = tempfile::Builder::new()
                        .prefix("driver-bench-")
                        .tempdir_in(if Path::new("/work").is_dir() {
                            "/work"
                        } else {
                            "/var/tmp"
                        })
                        .unwrap();
                    let (group, device) = spec(dir.path(), which, dev_bytes, with_site);
                    let subject = if *which == "engine" {
                        let g = Group::open(&group, &device, "d0", "", None, Role::Primary, None)
                            .unwrap();
                        g.start().unwrap();
                        Subject::Engine(g)
                    } else {
                        Subject::Driver(Arc::new(
                            GroupDriver::open(&DriverConfig::default(), &group, &[device]).unwrap(),
                        ))
                    };
                    let s = Arc::new(subject);
                    let rate = rt.block_on(run(s.clone(), dev_bytes, bs, qd, seq, secs));
                    eprintln!("{job} site={with_site} round={round} {which}: {rate:.0}/s");
                    best[i] = best[i].max(rate);
                    match Arc::try_unwrap(s) {
                        Ok(s) => s.stop(),
                        Err(_) => panic!("writers still hold the group"),
                    }
                }
            }
            let unit = |r: f64| {
                if bs >= 1 << 20 {
                    format!("{:.0} MiB/s", r * bs as f64 / (1 << 20) as f64)
                } else {
                    format!("{r:.0} IOPS")
                }
            };
            println!(
                "| {job} | {} | {} | {} | {:.2}x |",
                if with_site { "0 + async local 1" } else { "0" },
                unit(best[0]),
                unit(best[1]),
                best[1] / best[0]
            );
        }
    }
}
