//! A daemon group on real files: devices join and leave a running group (it is opened again,
//! writes go on), and a halted core is opened again from the disks.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replog::EntryKind;

use crate::driver::DriverConfig;
use crate::engine::group::Role;
use crate::engine::policy::{Fallbehind, PolicyKind};
use crate::engine::spec::{
    DeviceSpec, DirtyLogSpec, GroupSpec, ReplogOpen, SiteDeviceSpec, SlinkSpec,
};

use super::Group;

const DEV_BYTES: u64 = 2 << 20;

fn tmpdir() -> tempfile::TempDir {
    let base = if Path::new("/work").is_dir() {
        "/work"
    } else {
        "/var/tmp"
    };
    tempfile::Builder::new()
        .prefix("group-test-")
        .tempdir_in(base)
        .unwrap()
}

fn path(dir: &Path, nr: u8, dev: u32) -> std::path::PathBuf {
    dir.join(format!("site{nr}-dev{dev}.img"))
}

/// The table of device `dev`: slink 0 and a local async site with an on-disk dirty log.
fn table(dir: &Path, dev: u32, open: ReplogOpen) -> (GroupSpec, DeviceSpec) {
    let slink = |nr: u8, policy| SlinkSpec {
        nr,
        transport: "local",
        remote_addr: None,
        policy,
        fallbehind: Fallbehind::default(),
        down_wait: None,
        devices: vec![SiteDeviceSpec {
            dev_nr: dev,
            path: path(dir, nr, dev),
            dirty_log: if nr == 0 {
                DirtyLogSpec::None
            } else {
                DirtyLogSpec::Disk {
                    region_size: 64 << 10,
                    path: dir.join(format!("dev{dev}.dirty")),
                    initially_dirty: false,
                    overwrite_existing: None,
                }
            },
        }],
    };
    (
        GroupSpec {
            replog_path: dir.join("replog"),
            replog_offset: 0,
            open,
            slinks: vec![slink(0, PolicyKind::Sync), slink(1, PolicyKind::Async)],
        },
        DeviceSpec {
            dev_nr: dev,
            size: DEV_BYTES,
        },
    )
}

fn open_group(dir: &Path) -> Arc<Group> {
    let (g, d) = table(dir, 0, ReplogOpen::Create { size: 8 << 20 });
    let group = Group::open(
        &g,
        &d,
        "dev0",
        "table of dev0",
        None,
        Role::Primary,
        DriverConfig::default(),
    )
    .unwrap();
    group.start().unwrap();
    group
}

fn join(group: &Arc<Group>, dir: &Path, dev: u32) {
    let (g, d) = table(dir, dev, ReplogOpen::Open);
    group
        .add_device(&g, &d, &format!("dev{dev}"), "table")
        .unwrap();
    group.device_joined().unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `n` writes of 4 KiB to `dev` (each block a different byte); returns the expected image.
async fn write_blocks(group: &Group, dev: u32, n: u64, byte: u8, model: &mut [u8]) {
    for i in 0..n {
        let offset = (i * 7919 % (DEV_BYTES / 4096)) * 4096;
        let data = vec![byte.wrapping_add(i as u8); 4096];
        group
            .submit(dev, offset, EntryKind::Write, 4096, data.clone(), false)
            .await
            .unwrap();
        model[offset as usize..offset as usize + 4096].copy_from_slice(&data);
    }
}

/// Waits until slink 1 has everything and is clean, then compares both sites with the model.
fn assert_replicated(group: &Group, dir: &Path, dev: u32, model: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views = group.slink_views(dev);
        let s = &views[1].status;
        if s.lag_ios == 0 && s.dirty_bytes == 0 && s.state == "up" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slink 1 never caught up: {}",
            s.state
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for nr in [0u8, 1] {
        let img = std::fs::read(path(dir, nr, dev)).unwrap();
        assert!(
            img == model,
            "site {nr} device {dev} differs from what was written"
        );
    }
}

fn kinds(group: &Group) -> Vec<&'static str> {
    group.events.history().iter().map(|e| e.kind).collect()
}

#[test]
fn a_device_joins_a_running_group_while_another_device_is_written() {
    let dir = tmpdir();
    let group = open_group(dir.path());
    let rt = runtime();
    let mut m0 = vec![0u8; DEV_BYTES as usize];
    rt.block_on(write_blocks(&group, 0, 100, 1, &mut m0));
    // Writes to device 0 go on while device 1 joins (the group is opened again under them).
    let writer = {
        let group = group.clone();
        let mut m = m0.clone();
        rt.spawn(async move {
            write_blocks(&group, 0, 300, 50, &mut m).await;
            m
        })
    };
    join(&group, dir.path(), 1);
    let m0 = rt.block_on(writer).unwrap();
    let mut m1 = vec![0u8; DEV_BYTES as usize];
    rt.block_on(write_blocks(&group, 1, 100, 9, &mut m1));
    assert_eq!(group.devices().len(), 2);
    assert_eq!(
        group
            .reopens_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(kinds(&group).contains(&"reopened"), "{:?}", kinds(&group));
    assert_replicated(&group, dir.path(), 0, &m0);
    assert_replicated(&group, dir.path(), 1, &m1);
    // A clean reopen is no unclean start: nothing was marked dirty for the site.
    assert!(
        !kinds(&group).contains(&"unclean-start"),
        "{:?}",
        kinds(&group)
    );

    // Device 0 leaves: the group goes on with device 1; the last device says it was the last.
    assert!(!group.remove_device(0));
    rt.block_on(write_blocks(&group, 1, 50, 77, &mut m1));
    assert_replicated(&group, dir.path(), 1, &m1);
    assert!(group.remove_device(1));
    group.shutdown();
}

#[test]
fn a_halted_group_is_opened_again_from_its_disks_and_writes_go_on() {
    let dir = tmpdir();
    let group = open_group(dir.path());
    let rt = runtime();
    let mut m0 = vec![0u8; DEV_BYTES as usize];
    rt.block_on(write_blocks(&group, 0, 100, 1, &mut m0));
    group
        .with_driver(|d| d.fail_log_for_test("injected: replog write failed"))
        .unwrap();
    // The watcher reopens the group; writes wait for it rather than fail.
    rt.block_on(write_blocks(&group, 0, 100, 100, &mut m0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while group
        .reopens_total
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "never reopened: {:?}",
            kinds(&group)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let k = kinds(&group);
    let halted = k.iter().position(|e| *e == "halted");
    let reopened = k.iter().position(|e| *e == "reopened");
    assert!(halted.is_some() && halted < reopened, "{k:?}");
    assert_replicated(&group, dir.path(), 0, &m0);
    group.shutdown();
    // Stopped for good: requests fail instead of waiting.
    let r = rt.block_on(group.submit(0, 0, EntryKind::Write, 4096, vec![0; 4096], false));
    assert!(r.is_err());
}
