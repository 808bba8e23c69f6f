//! The core's driver as a secondary over real TCP, fed by a primary daemon: a real `replicator
//! daemon` (site `siteA`) ships to a `slink::SlinkListener` in this process
//! whose `SiteSink` is a secondary `GroupDriver`. Writes go through NBD with qemu-io; at the end
//! the secondary's device files are byte-equal to the primary's (wire compatibility of the new
//! secondary with a primary daemon).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replicator::driver::{DriverConfig, GroupDriver};
use replicator::engine::spec::{from_target, GroupSpec};
use slink::{
    check_devices, Admission, DeviceInfo, Item, PeerHello, Permission, Position, Psk, Refusal,
    SiteConfig, SiteId, SiteSink, SlinkListener,
};

use common::*;

const DEV_MIB: u64 = 16;
const DEVICES: [u32; 2] = [0, 1];
const TIMEOUT: Duration = Duration::from_secs(60);

/// The smallest `SiteSink` over a secondary driver (the daemon's own wiring is not this test's).
struct DriverSink {
    driver: Arc<GroupDriver>,
    devices: Vec<DeviceInfo>,
}

impl SiteSink for DriverSink {
    async fn admit(&self, peer: &PeerHello) -> Result<Admission, Refusal> {
        check_devices(&peer.devices, &self.devices)?;
        Ok(Admission {
            epoch: peer.epoch,
            durable: self.driver.durable_position(),
        })
    }

    async fn store(&self, _peer: &PeerHello, items: Vec<Item>) -> Result<Position, String> {
        self.driver.store(items).await
    }
}

fn sdev(dir: &Path, d: u32) -> PathBuf {
    dir.join(format!("sdev{d}.img"))
}

/// A secondary group in `dir`: a replog whose role is secondary, and its devices.
fn create_secondary(dir: &Path) {
    let log = replog::Replog::create(
        &dir.join("srep.img"),
        &replog::CreateOptions {
            offset: 0,
            size: 64 << 20,
            io: Default::default(),
        },
    )
    .unwrap();
    log.set_role(replog::Role::Secondary).unwrap();
    drop(log);
    for d in DEVICES {
        std::fs::File::create(sdev(dir, d))
            .unwrap()
            .set_len(DEV_MIB << 20)
            .unwrap();
    }
}

/// The secondary group as its tables say (one table per device, one replog), gathered the way a
/// daemon gathers a group's tables.
fn open_secondary(dir: &Path) -> GroupDriver {
    let mut group: Option<GroupSpec> = None;
    let mut devices = Vec::new();
    for d in DEVICES {
        let text = format!(
            "0 {} replicator default 3 srep.img 0 open local 2 0 async 2 {d} sdev{d}.img - 0\n",
            DEV_MIB * 2048
        );
        let table = replicator::table::parse(&text, "secondary table").unwrap();
        let (g, device) = from_target(&table.targets[0], dir, true);
        devices.push(device);
        match &mut group {
            None => group = Some(g),
            Some(first) => first.slinks[0].devices.extend(g.slinks[0].devices.clone()),
        }
    }
    GroupDriver::open(&DriverConfig::default(), &group.unwrap(), &devices).unwrap()
}

/// The primary's devices: one group (one replog) with a local slink 0 and an async tcp slink 1
/// to `listen`, dirty logs on disk.
fn create_primary(p: &Daemon, listen: &str) {
    for dev in DEVICES {
        let (mode, n) = if dev == 0 {
            (format!("create {}", 64 * 2048), 4)
        } else {
            ("open".to_string(), 3)
        };
        let table = format!(
            "0 {} replicator default {n} prep.img 0 {mode} local 2 0 async 2 {dev} pdev{dev}.img - 0 \
             tcp 3 1 async {listen} 2 {dev} dev{dev} disk 3 128 p1-dev{dev}.dirty sync\n",
            DEV_MIB * 2048
        );
        p.create(&format!("dev{dev}"), &table);
    }
}

/// A listener for `siteA` at `listen` that stores into `driver`.
fn listen_into(
    rt: &tokio::runtime::Runtime,
    listen: &str,
    driver: &Arc<GroupDriver>,
) -> SlinkListener {
    let sink = Arc::new(DriverSink {
        driver: driver.clone(),
        devices: DEVICES
            .iter()
            .map(|d| DeviceInfo {
                device: *d,
                size_bytes: DEV_MIB << 20,
            })
            .collect(),
    });
    let cfg = SiteConfig::new(
        SiteId::new("siteB").unwrap(),
        Psk::new(SITE_KEY.as_bytes().to_vec()).unwrap(),
    )
    .allow(SiteId::new("siteA").unwrap(), Permission::ReadWrite);
    let _on_runtime = rt.enter();
    SlinkListener::bind(listen.parse().unwrap(), cfg, sink).unwrap()
}

/// Wait until the primary has nothing unshipped and `driver` applied its last lsn.
fn converge(p: &Daemon, driver: &GroupDriver) {
    for dev in DEVICES {
        p.wait_lag_zero(&format!("dev{dev}"), TIMEOUT);
    }
    let last = p.status("dev0")["replog"]["last_lsn"].as_u64().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !driver.with_core(|c| c.last_lsn() >= last && c.applied0() >= last) {
        assert!(
            Instant::now() < deadline,
            "the secondary did not apply lsn {last}: {}\nprimary log:\n{}",
            driver.summary(),
            p.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(driver.with_core(|c| c.secondary_position().lsn), last);
}

fn assert_same_devices(p: &Daemon, dir: &Path) {
    for dev in DEVICES {
        assert!(
            same_bytes(
                &p.path(&format!("pdev{dev}.img")),
                &sdev(dir, dev),
                DEV_MIB << 20
            ),
            "device {dev} differs between the primary and the secondary driver\nprimary log:\n{}",
            p.log()
        );
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let o = qemu_io_command(uri, cmds).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-io {cmds:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_primary_daemon_replicates_into_a_secondary_driver_over_tcp_across_its_restart() {
    if !have("qemu-io") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tmp = scratch_dir("driver-secondary-");
    create_secondary(tmp.path());
    let driver = Arc::new(open_secondary(tmp.path()));
    let listen = format!("127.0.0.1:{}", free_port());
    let listener = listen_into(&rt, &listen, &driver);

    let p = Daemon::start_for_site("siteA", &["--peer", &format!("siteB@{listen}")]);
    create_primary(&p, &listen);
    wait_for("slink 1 up", TIMEOUT, || {
        (p.status("dev0")["slinks"][1]["link"]["state"] == "up").then_some(())
    });

    // Overlapping writes on both devices (their order matters), zeroes, a partial overwrite.
    qemu_io(
        &p.uri("dev0"),
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 512k 1M",
            "write -z 768k 64k",
            "write -P 0x33 15M 1M",
        ],
    );
    qemu_io(
        &p.uri("dev1"),
        &["write -P 0x44 4k 2M", "write -P 0x55 1M 4k", "flush"],
    );
    qemu_io(&p.uri("dev0"), &["write -P 0x66 300k 8k"]);
    converge(&p, &driver);
    // The primary's new dirty logs (`sync`) start all dirty: every region also came as a resync
    // piece, through the core's StorePiece; once the primary's regions are clean its completion
    // marker makes the site consistent again.
    for dev in DEVICES {
        wait_for("the primary's regions clean", TIMEOUT, || {
            (p.status(&format!("dev{dev}"))["slinks"][1]["dirty_bytes"] == 0).then_some(())
        });
    }
    wait_for("the secondary consistent again", TIMEOUT, || {
        driver.with_core(|c| c.consistent()).then_some(())
    });
    assert!(
        driver.with_core(|c| c.secondary_position().resync_seq) > 0,
        "resync pieces were stored: {}",
        driver.summary()
    );
    rt.block_on(listener.shutdown());
    driver.shutdown();
    drop(driver);
    assert_same_devices(&p, tmp.path());

    // The secondary restarts: the primary reconnects, hears the durable position and sends what
    // came after it (writes made while the site was away too).
    qemu_io(&p.uri("dev1"), &["write -P 0x77 8M 2M"]);
    let driver = Arc::new(open_secondary(tmp.path()));
    let listener = listen_into(&rt, &listen, &driver);
    qemu_io(
        &p.uri("dev0"),
        &["write -P 0x88 0 64k", "write -P 0x99 10M 1M"],
    );
    converge(&p, &driver);
    rt.block_on(listener.shutdown());
    driver.shutdown();
    assert_same_devices(&p, tmp.path());
}
