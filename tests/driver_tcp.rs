//! The core's production driver (`replicator::driver`) as a primary with a `tcp` slink, shipping
//! over real TCP to a real secondary daemon process (this repo's binary): the sites end
//! byte-equal, a secondary killed with -9 and restarted under writes gets its link back without
//! flapping, a primary driver reopened after a full sync keeps its link up, and a hung
//! secondary's ring overflow is repaired by a resync.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use replicator::core::slink::SlinkState;
use replicator::driver::{DriverConfig, GroupDriver, LinkView};
use replicator::engine::policy::{Fallbehind, PolicyKind};
use replicator::engine::spec::{
    DeviceSpec, DirtyLogSpec, GroupSpec, ReplogOpen, SiteDeviceSpec, SlinkSpec,
};
use replicator::engine::tcp::LinkSettings;

const DEV_MIB: u64 = 8;
const DEV_BYTES: u64 = DEV_MIB << 20;
const DEVICES: [u32; 2] = [0, 1];
const REGION: u64 = 64 << 10;
const CONVERGE: Duration = Duration::from_secs(60);

/// The secondary daemon (site `siteB`) with devices 0 and 1 of one secondary group.
fn secondary(listen: &str) -> Daemon {
    let s = Daemon::start_for_site("siteB", &["--slink-listen", listen, "--allow", "siteA"]);
    for dev in DEVICES {
        let (mode, n) = if dev == 0 {
            (format!("create {}", 64 * 2048), 4)
        } else {
            ("open".to_string(), 3)
        };
        let table = format!(
            "0 {} replicator default {n} srep.img 0 {mode} local 2 0 async 2 {dev} sdev{dev}.img - 0\n",
            DEV_MIB * 2048
        );
        let name = format!("dev{dev}");
        s.ok(&["create", "--secondary", &name, &s.table_file(&name, &table)]);
    }
    s
}

/// The primary: a driver on files in `dir`, slink 1 a tcp site at `listen` with disk dirty logs
/// (`full_sync`: new logs start all dirty, so the first link up copies every region).
struct Primary {
    dir: PathBuf,
    group: GroupSpec,
    devices: Vec<DeviceSpec>,
    cfg: DriverConfig,
}

impl Primary {
    /// `narrow`: a link window of a few frames, so the driver holds planned entries that the
    /// link has no room for yet (what a slow link does) when a session ends.
    fn new(dir: &Path, listen: &str, policy: PolicyKind, full_sync: bool, narrow: bool) -> Primary {
        for d in DEVICES {
            let p = dir.join(format!("pdev{d}.img"));
            let f = std::fs::File::create(&p).unwrap();
            f.set_len(DEV_BYTES).unwrap();
        }
        let slink =
            |nr: u8, policy, remote: Option<&str>, device: &dyn Fn(u32) -> SiteDeviceSpec| {
                SlinkSpec {
                    nr,
                    transport: if remote.is_some() { "tcp" } else { "local" },
                    remote_addr: remote.map(str::to_string),
                    policy,
                    fallbehind: Fallbehind::default(),
                    down_wait: None,
                    devices: DEVICES.iter().map(|d| device(*d)).collect(),
                }
            };
        let slink0 = slink(0, PolicyKind::Sync, None, &|d| SiteDeviceSpec {
            dev_nr: d,
            path: dir.join(format!("pdev{d}.img")),
            dirty_log: DirtyLogSpec::None,
        });
        // A remote device is named by the secondary's device name; its dirty log is here.
        let site = slink(1, policy, Some(listen), &|d| SiteDeviceSpec {
            dev_nr: d,
            path: PathBuf::from(format!("dev{d}")),
            dirty_log: DirtyLogSpec::Disk {
                region_size: REGION,
                path: dir.join(format!("s1-dev{d}.dirty")),
                initially_dirty: full_sync,
                overwrite_existing: None,
            },
        });
        let group = GroupSpec {
            replog_path: dir.join("prep.img"),
            replog_offset: 0,
            open: ReplogOpen::Auto {
                size: Some(32 << 20),
            },
            slinks: vec![slink0, site],
        };
        let devices = DEVICES
            .iter()
            .map(|d| DeviceSpec {
                dev_nr: *d,
                size: DEV_BYTES,
            })
            .collect();
        let mut site_cfg = slink::SiteConfig::new(
            slink::SiteId::new("siteA").unwrap(),
            slink::Psk::new(SITE_KEY.as_bytes().to_vec()).unwrap(),
        );
        // A restarted secondary is found again within a second.
        site_cfg.backoff.max = Duration::from_millis(500);
        if narrow {
            site_cfg.batch_bytes_max = 64 << 10;
            site_cfg.window_bytes = 256 << 10;
        }
        let peers = HashMap::from([(listen.to_string(), slink::SiteId::new("siteB").unwrap())]);
        let cfg = DriverConfig {
            links: Some(Arc::new(LinkSettings {
                site: site_cfg,
                peers,
            })),
            ..DriverConfig::default()
        };
        Primary {
            dir: dir.to_path_buf(),
            group,
            devices,
            cfg,
        }
    }

    /// A ring of `mib` MiB (default 32).
    fn with_ring(mut self, mib: u64) -> Primary {
        self.group.open = ReplogOpen::Auto {
            size: Some(mib << 20),
        };
        self
    }

    fn open(&self) -> Arc<GroupDriver> {
        Arc::new(GroupDriver::open(&self.cfg, &self.group, &self.devices).unwrap())
    }
}

fn link(g: &GroupDriver) -> LinkView {
    g.link(1).expect("slink 1 is a tcp slink")
}

fn wait_link_up(g: &GroupDriver, timeout: Duration) {
    wait_for("the driver's link up", timeout, || {
        (link(g).state == "up").then_some(())
    });
}

/// The next number of a xorshift sequence (a seeded workload that replays).
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Writes of 4 to 64 KiB at pseudo-random places of both devices from one thread until
/// stopped (each write waits for its reply, so their order is the driver's).
fn driver_writer(g: &Arc<GroupDriver>, seed: u64) -> Writer {
    let g = g.clone();
    let mut x = seed | 1;
    Writer::spawn(move |_| {
        let r = xorshift(&mut x);
        let device = DEVICES[(r % 2) as usize];
        let len = 4096 * (1 + (r >> 8) % 16);
        let offset = ((r >> 16) % ((DEV_BYTES - len) / 4096)) * 4096;
        let data = vec![(r >> 40) as u8; len as usize];
        g.write_blocking(device, offset, data, (r >> 32).is_multiple_of(64))
            .unwrap();
        1
    })
}

/// A secondary daemon at a fresh address and a primary driver shipping to it, its link up.
struct Run {
    s: Daemon,
    p: Primary,
    g: Arc<GroupDriver>,
    /// The primary's files (bound by every test: dropping it removes them).
    dir: tempfile::TempDir,
}

fn start(policy: PolicyKind, full_sync: bool, narrow: bool, ring_mib: u64) -> Run {
    eprintln!("link path: direct loopback TCP");
    let listen = format!("127.0.0.1:{}", free_port());
    let s = secondary(&listen);
    let dir = scratch_dir("driver-tcp-");
    let p = Primary::new(dir.path(), &listen, policy, full_sync, narrow).with_ring(ring_mib);
    let g = p.open();
    wait_link_up(&g, Duration::from_secs(20));
    Run { s, p, g, dir }
}

/// 64 KiB writes at pseudo-random places of both devices, `bytes` of them.
fn write_64k(g: &GroupDriver, seed: u64, bytes: u64) {
    let mut x = seed | 1;
    for i in 0..bytes / (64 << 10) {
        let r = xorshift(&mut x);
        let device = DEVICES[(r % 2) as usize];
        let offset = ((r >> 16) % (DEV_BYTES / (64 << 10))) * (64 << 10);
        let data = vec![i as u8 ^ (r >> 40) as u8; 64 << 10];
        g.write_blocking(device, offset, data, false).unwrap();
    }
}

/// The driver's site has every entry and no dirty region, the secondary daemon holds the same
/// last lsn and has applied it (lag 0), and the devices are byte-equal.
fn converge_and_compare(g: &GroupDriver, p: &Primary, s: &Daemon) {
    g.flush_blocking().unwrap();
    let deadline = Instant::now() + CONVERGE;
    let last = loop {
        let (done, last, summary) = g.with_core(|c| {
            let sl = c.slink(1).unwrap();
            (
                sl.acked >= c.last_lsn() && sl.dirty.is_clean() && sl.state() == SlinkState::Up,
                c.last_lsn(),
                c.summary(),
            )
        });
        if done {
            break last;
        }
        assert!(
            Instant::now() < deadline,
            "the tcp site did not catch up: {summary}\nlink: {:?}\nsecondary log:\n{}",
            link(g),
            s.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for dev in DEVICES {
        s.wait_lag_zero(&format!("dev{dev}"), CONVERGE);
    }
    let s_last = s.status("dev0")["replog"]["last_lsn"].as_u64().unwrap();
    assert_eq!(s_last, last, "the secondary holds the primary's last lsn");
    for dev in DEVICES {
        assert!(
            same_bytes(
                &p.dir.join(format!("pdev{dev}.img")),
                &s.path(&format!("sdev{dev}.img")),
                DEV_BYTES
            ),
            "device {dev} differs between the sites\nsecondary log:\n{}",
            s.log()
        );
    }
}

#[test]
fn writes_through_the_driver_reach_a_secondary_daemon_byte_equal() {
    let Run { s, p, g, dir: _dir } = start(PolicyKind::Async, false, false, 32);
    // 32 MiB of writes (four times each device): what the link ships, timed to convergence.
    let started = Instant::now();
    let bytes = 32u64 << 20;
    write_64k(&g, 0x2545_F491_4F6C_DD1D, bytes);
    converge_and_compare(&g, &p, &s);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "shipped {} MiB to the secondary daemon and converged in {secs:.2} s ({:.1} MiB/s)",
        bytes >> 20,
        (bytes >> 20) as f64 / secs
    );
    let l = link(&g);
    assert_eq!(l.sessions, 1, "one session, no reconnect: {l:?}");
    assert_eq!(l.last_error, None, "{l:?}");
    g.shutdown();
}

#[test]
fn a_secondary_killed_and_restarted_under_writes_gets_its_link_back_without_flapping() {
    let Run {
        mut s,
        p,
        g,
        dir: _dir,
    } = start(PolicyKind::Async, false, true, 32);
    let writer = driver_writer(&g, 7);
    while writer.done() < 200 {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The secondary hangs first (SIGSTOP): the link's window fills and the driver holds what
    // the core planned for the session; then it dies with that plan unsent.
    signal(&s, libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(300));
    let lag = g.with_core(|c| {
        let sl = c.slink(1).unwrap();
        sl.shipped - sl.acked
    });
    assert!(
        lag > 0,
        "the core planned entries the hung site has not acknowledged"
    );
    s.kill9();
    wait_for("the driver's link down", Duration::from_secs(20), || {
        (link(&g).state != "up").then_some(())
    });
    let during_outage = writer.done();
    std::thread::sleep(Duration::from_millis(500));
    s.spawn();
    wait_link_up(&g, Duration::from_secs(20));
    let back = link(&g);
    // Writes go on over the restored link; it must stay up (no further session).
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let l = link(&g);
        assert_eq!(
            (l.state.as_str(), l.sessions),
            ("up", back.sessions),
            "the link flapped after the secondary came back: {l:?}\ncore: {}\nsecondary log:\n{}",
            g.summary(),
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let written = writer.stop();
    assert!(
        written > during_outage,
        "writes went on while the site was away and after"
    );
    converge_and_compare(&g, &p, &s);
    let l = link(&g);
    // One session before the kill, one after (a connection cut during the secondary's start-up
    // may add one); never a stream of them.
    assert!(
        (2..=3).contains(&l.sessions),
        "sessions: {l:?}\nsecondary log:\n{}",
        s.log()
    );
    assert_eq!(l.state, "up");
    let err = l.last_error.clone().unwrap_or_default();
    assert!(
        !err.contains("beyond what was sent") && !err.contains("protocol"),
        "{l:?}"
    );
    g.shutdown();
}

#[test]
fn a_primary_driver_reopened_after_a_full_sync_keeps_its_link_up() {
    // New dirty logs all dirty: the first link up copies every region (256 pieces).
    let Run { s, p, g, dir: _dir } = start(PolicyKind::Async, true, true, 32);
    let writer = driver_writer(&g, 11);
    while writer.done() < 100 {
        std::thread::sleep(Duration::from_millis(10));
    }
    writer.stop();
    converge_and_compare(&g, &p, &s);
    let seq_before = g.with_core(|c| c.slink(1).unwrap().next_seq);
    assert!(
        seq_before > 256,
        "the full sync sent every region: next resync seq {seq_before}"
    );
    g.shutdown();
    drop(g);

    let g = p.open();
    wait_link_up(&g, Duration::from_secs(20));
    let writer = driver_writer(&g, 12);
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let l = link(&g);
        assert_eq!(
            (l.state.as_str(), l.sessions, l.last_error.as_deref()),
            ("up", 1, None),
            "the reopened primary's link did not stay up: {l:?}\nsecondary log:\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let written = writer.stop();
    assert!(written > 0, "writes went on after the reopen");
    converge_and_compare(&g, &p, &s);
    let l = link(&g);
    assert_eq!((l.sessions, l.last_error.as_deref()), (1, None), "{l:?}");
    g.shutdown();
}

/// Send `sig` to the daemon's process.
fn signal(d: &Daemon, sig: i32) {
    let pid = d.child.as_ref().unwrap().id() as i32;
    // SAFETY: signals our own child process.
    unsafe {
        libc::kill(pid, sig);
    }
}

#[test]
fn a_hung_secondary_overflows_the_ring_and_the_resync_repairs_it() {
    // 4 MiB of ring for 24 MiB of writes while the site does not read.
    let Run { s, p, g, dir: _dir } = start(PolicyKind::Async, false, true, 4);
    signal(&s, libc::SIGSTOP);
    write_64k(&g, 0x9E37_79B9_7F4A_7C15, 24 << 20);
    let (skipped, dirty) = g.with_core(|c| {
        let sl = c.slink(1).unwrap();
        (sl.skip_to, sl.dirty.dirty_regions())
    });
    assert!(
        skipped > 0 && dirty > 0,
        "the ring overflowed for the hung site: skip_to {skipped}, {dirty} dirty regions"
    );
    signal(&s, libc::SIGCONT);
    converge_and_compare(&g, &p, &s);
    g.shutdown();
}

/// A sync tcp site: a write is acknowledged only once the secondary daemon acknowledged it, so
/// when the writers are done the site already has every write, without waiting.
#[test]
fn a_sync_tcp_site_has_every_acknowledged_write() {
    let Run { s, p, g, dir: _dir } = start(PolicyKind::Sync, false, false, 32);
    let writers: Vec<Writer> = (0..4).map(|t| driver_writer(&g, 100 + t)).collect();
    std::thread::sleep(Duration::from_secs(2));
    let written: u64 = writers.into_iter().map(Writer::stop).sum();
    let (acked, last) = g.with_core(|c| (c.slink(1).unwrap().acked, c.last_lsn()));
    assert!(written > 0);
    assert!(
        acked >= last,
        "every acknowledged write is at the sync site: acked {acked}, last lsn {last}"
    );
    converge_and_compare(&g, &p, &s);
    g.shutdown();
}
