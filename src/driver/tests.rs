//! The driver on real files: writes reach slink 0 and a local site in one order, a restart
//! continues where the last run stopped, a full ring drops entries for a paused site and the
//! resync repairs it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::slink::SlinkState;
use crate::engine::policy::{Fallbehind, PolicyKind};
use crate::engine::spec::{
    DeviceSpec, DirtyLogSpec, GroupSpec, ReplogOpen, SiteDeviceSpec, SlinkSpec,
};

use super::{DriverConfig, GroupDriver};

pub(super) const DEV_BYTES: u64 = 4 << 20;
pub(super) const DEVICES: [u32; 2] = [0, 1];
const REGION: u64 = 64 << 10;

pub(super) fn tmpdir() -> tempfile::TempDir {
    let base = if Path::new("/work").is_dir() {
        "/work"
    } else {
        "/var/tmp"
    };
    tempfile::Builder::new()
        .prefix("driver-test-")
        .tempdir_in(base)
        .unwrap()
}

pub(super) fn slink(dir: &Path, nr: u8, policy: PolicyKind, dirty: bool) -> SlinkSpec {
    SlinkSpec {
        nr,
        transport: "local",
        remote_addr: None,
        policy,
        fallbehind: Fallbehind::default(),
        down_wait: None,
        devices: DEVICES
            .iter()
            .map(|d| SiteDeviceSpec {
                dev_nr: *d,
                path: dir.join(format!("site{nr}-dev{d}.img")),
                dirty_log: if dirty {
                    DirtyLogSpec::Core {
                        region_size: REGION,
                        initially_dirty: false,
                    }
                } else {
                    DirtyLogSpec::None
                },
            })
            .collect(),
    }
}

/// Slink `nr`'s device files (`site{nr}-dev{d}.img`), zero-filled, unless they exist.
pub(super) fn device_files(dir: &Path, nr: u8) {
    for d in DEVICES {
        let p = dir.join(format!("site{nr}-dev{d}.img"));
        if !p.exists() {
            std::fs::File::create(&p)
                .unwrap()
                .set_len(DEV_BYTES)
                .unwrap();
        }
    }
}

/// The sizes of the group's devices.
pub(super) fn device_specs() -> Vec<DeviceSpec> {
    DEVICES
        .iter()
        .map(|d| DeviceSpec {
            dev_nr: *d,
            size: DEV_BYTES,
        })
        .collect()
}

fn spec(dir: &Path, ring: u64, site_policy: PolicyKind) -> (GroupSpec, Vec<DeviceSpec>) {
    device_files(dir, 0);
    device_files(dir, 1);
    let group = GroupSpec {
        replog_path: dir.join("replog"),
        replog_offset: 0,
        open: ReplogOpen::Auto { size: Some(ring) },
        slinks: vec![
            slink(dir, 0, PolicyKind::Sync, false),
            slink(dir, 1, site_policy, true),
        ],
    };
    (group, device_specs())
}

pub(super) fn image(dir: &Path, nr: u8, d: u32) -> Vec<u8> {
    std::fs::read(dir.join(format!("site{nr}-dev{d}.img"))).unwrap()
}

/// Writes from `threads` threads, each in its own stripe of every device (overlapping within a
/// stripe, so their order matters); returns the expected images.
fn write_load(g: &Arc<GroupDriver>, threads: u64, writes: u64, seed: u64, model: &mut [Vec<u8>]) {
    let stripe = DEV_BYTES / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let g = g.clone();
            std::thread::spawn(move || {
                let mut x = seed ^ (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut done = Vec::new();
                for i in 0..writes {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let device = DEVICES[(x % 2) as usize];
                    let len = 4096 * (1 + (x >> 8) % 4);
                    let offset = t * stripe + ((x >> 16) % ((stripe - len) / 4096)) * 4096;
                    let byte = (x >> 40) as u8 ^ i as u8;
                    let data = vec![byte; len as usize];
                    g.write_blocking(device, offset, data.clone(), i % 50 == 0)
                        .unwrap();
                    done.push((device, offset, data));
                }
                done
            })
        })
        .collect();
    for h in handles {
        for (device, offset, data) in h.join().unwrap() {
            let m = &mut model[device as usize];
            m[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
    }
}

/// Waits (up to 30 s) until `done` says so of the core; `what` names it in the failure.
fn wait_until(g: &GroupDriver, what: &str, done: impl Fn(&crate::core::Core) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (done, summary) = g.with_core(|c| (done(c), c.summary()));
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {summary}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_caught_up(g: &GroupDriver, slink: u8) {
    wait_until(g, &format!("slink {slink} did not catch up"), |c| {
        c.slink(slink).is_some_and(|s| {
            s.acked >= c.last_lsn() && s.dirty.is_clean() && s.state() == SlinkState::Up
        })
    });
}

fn images_equal(dir: &Path, model: &[Vec<u8>]) {
    for d in DEVICES {
        assert!(
            image(dir, 0, d) == model[d as usize],
            "slink 0 device {d} differs from the writes"
        );
        assert!(
            image(dir, 1, d) == model[d as usize],
            "site 1 device {d} differs from slink 0"
        );
    }
}

fn empty_model() -> Vec<Vec<u8>> {
    DEVICES
        .iter()
        .map(|_| vec![0u8; DEV_BYTES as usize])
        .collect()
}

#[test]
fn writes_reach_slink0_and_a_sync_local_site_in_one_order() {
    let dir = tmpdir();
    let (group, devices) = spec(dir.path(), 32 << 20, PolicyKind::Sync);
    let g = Arc::new(GroupDriver::open(&DriverConfig::default(), &group, &devices).unwrap());
    let mut model = empty_model();
    write_load(&g, 4, 300, 1, &mut model);
    g.flush_blocking().unwrap();
    wait_caught_up(&g, 1);
    g.shutdown();
    images_equal(dir.path(), &model);
}

#[test]
fn a_restart_continues_the_lsn_order_and_the_cursors() {
    let dir = tmpdir();
    let (group, devices) = spec(dir.path(), 32 << 20, PolicyKind::Async);
    let mut model = empty_model();
    let mut last = 0;
    for round in 0..3 {
        let g = Arc::new(GroupDriver::open(&DriverConfig::default(), &group, &devices).unwrap());
        let first = g.with_core(|c| c.last_lsn());
        assert_eq!(first, last, "round {round} starts after the last run's lsn");
        write_load(&g, 2, 200, 10 + round, &mut model);
        wait_caught_up(&g, 1);
        last = g.with_core(|c| c.last_lsn());
        g.shutdown();
        images_equal(dir.path(), &model);
        // Clean stop: both cursors at the end, the activity log empty.
        let log = replog::Replog::open(&group.replog_path, &Default::default())
            .unwrap()
            .0;
        assert_eq!(log.cursor(0), Some(last));
        assert_eq!(log.cursor(1), Some(last));
        assert!(log.activity_log().extents.is_empty());
    }
}

#[test]
fn a_full_ring_drops_for_a_paused_site_and_the_resync_repairs_it() {
    let dir = tmpdir();
    // 2 MiB of ring for 16 MiB of writes: the ring overflows several times over.
    let (group, devices) = spec(dir.path(), 2 << 20, PolicyKind::Async);
    let g = Arc::new(GroupDriver::open(&DriverConfig::default(), &group, &devices).unwrap());
    g.pause(1, true);
    let mut model = empty_model();
    write_load(&g, 2, 800, 7, &mut model);
    let (dirty, skipped) = g.with_core(|c| {
        let s = c.slink(1).unwrap();
        (s.dirty.dirty_regions(), s.skip_to)
    });
    assert!(
        dirty > 0 && skipped > 0,
        "the paused site lost entries to the ring: {}",
        g.summary()
    );
    g.pause(1, false);
    wait_caught_up(&g, 1);
    g.shutdown();
    images_equal(dir.path(), &model);
}

#[test]
fn a_drop_floor_comes_back_after_a_restart_and_the_repair_clears_it_on_disk() {
    let dir = tmpdir();
    let (mut group, devices) = spec(dir.path(), 2 << 20, PolicyKind::Async);
    // The floor holds only with dirty marks that survive the restart: disk dirty logs.
    for d in &mut group.slinks[1].devices {
        d.dirty_log = DirtyLogSpec::Disk {
            region_size: REGION,
            path: dir.path().join(format!("site1-dev{}.dirty", d.dev_nr)),
            initially_dirty: false,
            overwrite_existing: None,
        };
    }
    let g = Arc::new(GroupDriver::open(&DriverConfig::default(), &group, &devices).unwrap());
    g.pause(1, true);
    let mut model = empty_model();
    write_load(&g, 2, 800, 7, &mut model);
    let floor = g.with_core(|c| c.slink(1).and_then(|s| s.drop_floor));
    assert!(floor.is_some(), "entries were dropped: {}", g.summary());
    wait_until(&g, "the floor is durable", |c| {
        c.slink(1)
            .is_some_and(|s| s.floor.on_disk == floor && s.floor.in_flight.is_none())
    });
    g.shutdown();
    let log = replog::Replog::open(&group.replog_path, &Default::default())
        .unwrap()
        .0;
    assert_eq!(log.drop_floor(1).unwrap(), floor, "in the replog");
    drop(log);

    let g = Arc::new(GroupDriver::open(&DriverConfig::default(), &group, &devices).unwrap());
    assert_eq!(
        g.with_core(|c| c.slink(1).and_then(|s| s.drop_floor)),
        floor
    );
    wait_caught_up(&g, 1);
    wait_until(&g, "the repair clears the floor durably", |c| {
        c.slink(1)
            .is_some_and(|s| s.drop_floor.is_none() && s.floor.on_disk.is_none())
    });
    g.shutdown();
    images_equal(dir.path(), &model);
    let log = replog::Replog::open(&group.replog_path, &Default::default())
        .unwrap()
        .0;
    assert_eq!(log.drop_floor(1).unwrap(), None);
}
