//! The driver as a secondary, fed as a slink listener feeds it (entries in lsn order, resync
//! pieces with sequence numbers, a completion marker): what `store` acknowledges survives a
//! restart, a restart in the middle of a resync still knows the devices are not a prefix, a
//! secondary refuses writes, and a store after a reset or a halt fails.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::core::{Command, Failure, Input, Position};
use crate::engine::policy::PolicyKind;
use crate::engine::spec::{DeviceSpec, GroupSpec, ReplogOpen};

use super::secondary::Inbound;
use super::tests::{device_files, device_specs, image, slink, tmpdir, DEVICES, DEV_BYTES};
use super::{DriverConfig, GroupDriver};

/// A secondary group: its replog (created once, role secondary) and slink 0's devices.
fn secondary_spec(dir: &Path) -> (GroupSpec, Vec<DeviceSpec>) {
    let replog_path = dir.join("replog");
    if !replog_path.exists() {
        let log = replog::Replog::create(
            &replog_path,
            &replog::CreateOptions {
                offset: 0,
                size: 8 << 20,
                io: Default::default(),
            },
        )
        .unwrap();
        log.set_role(replog::Role::Secondary).unwrap();
        device_files(dir, 0);
    }
    let group = GroupSpec {
        replog_path,
        replog_offset: 0,
        open: ReplogOpen::Open,
        slinks: vec![slink(dir, 0, PolicyKind::Sync, false)],
    };
    (group, device_specs())
}

fn open(dir: &Path) -> GroupDriver {
    let (group, devices) = secondary_spec(dir);
    GroupDriver::open(&DriverConfig::default(), &group, &devices).unwrap()
}

/// What the devices should hold, updated as items are made.
struct Model {
    devices: Vec<Vec<u8>>,
}

impl Model {
    fn new() -> Model {
        Model {
            devices: DEVICES
                .iter()
                .map(|_| vec![0u8; DEV_BYTES as usize])
                .collect(),
        }
    }

    fn put(&mut self, device: u32, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.devices[device as usize][at..at + data.len()].copy_from_slice(data);
    }

    /// Entry `lsn`: 4 KiB to 16 KiB of one byte, overlapping earlier ones on purpose.
    fn entry(&mut self, lsn: u64) -> slink::Item {
        let device = DEVICES[(lsn % 2) as usize];
        let len = 4096 * (1 + lsn % 4);
        let offset = (lsn * 12288) % (DEV_BYTES - len);
        let data = vec![lsn as u8 ^ 0x5a; len as usize];
        self.put(device, offset, &data);
        slink::Item::Entry(slink::Entry {
            lsn,
            device,
            offset,
            kind: slink::EntryKind::Write,
            len,
            timestamp_ns: 1,
            data: Bytes::from(data),
        })
    }

    fn piece(&mut self, seq: u64, device: u32, offset: u64) -> slink::Item {
        let data = vec![0xc0 ^ seq as u8; 64 << 10];
        self.put(device, offset, &data);
        slink::Item::ResyncData(slink::ResyncChunk {
            seq,
            device,
            offset,
            data: Bytes::from(data),
        })
    }

    fn assert_devices(&self, dir: &Path) {
        for d in DEVICES {
            assert!(
                image(dir, 0, d) == self.devices[d as usize],
                "device {d} does not hold what was stored"
            );
        }
    }
}

fn done(seq: u64) -> slink::Item {
    slink::Item::ResyncDone(slink::ResyncDone { seq, device: 0 })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn wait_until(what: &str, g: &GroupDriver, ok: impl Fn(&crate::core::Core) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !g.with_core(&ok) {
        assert!(Instant::now() < deadline, "{what}: {}", g.summary());
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn replog_features(dir: &Path) -> u64 {
    let (log, _) = replog::Replog::open(&dir.join("replog"), &Default::default()).unwrap();
    log.features()
}

#[test]
fn what_store_acknowledged_is_durable_across_a_restart_and_on_the_devices() {
    let dir = tmpdir();
    let rt = runtime();
    let mut model = Model::new();
    let g = open(dir.path());
    assert_eq!(g.durable_position(), slink::Position::default());
    let first: Vec<_> = (1..=40).map(|l| model.entry(l)).collect();
    let pos = rt.block_on(g.store(first)).unwrap();
    assert_eq!(pos.lsn, 40, "the acknowledged position covers the batch");
    let second: Vec<_> = (41..=90).map(|l| model.entry(l)).collect();
    let acked = rt.block_on(g.store(second)).unwrap();
    assert_eq!(acked.lsn, 90);
    g.shutdown();
    drop(g);
    model.assert_devices(dir.path());

    let g = open(dir.path());
    let reopened = g.durable_position();
    assert!(
        reopened.lsn >= acked.lsn,
        "after a restart the site reports {reopened:?}, it had acknowledged {acked:?}"
    );
    // The primary resends from what it was told: resent entries are skipped, new ones stored.
    let resent: Vec<_> = (85..=95).map(|l| model.entry(l)).collect();
    assert_eq!(rt.block_on(g.store(resent)).unwrap().lsn, 95);
    let mut buf = vec![0u8; 4096];
    g.read(1, 0, &mut buf).unwrap();
    assert_eq!(buf, model.devices[1][..4096], "reads on a secondary work");
    g.shutdown();
    drop(g);
    model.assert_devices(dir.path());
}

#[test]
fn a_restart_in_the_middle_of_a_resync_reopens_inconsistent_until_the_done_marker() {
    let dir = tmpdir();
    let rt = runtime();
    let mut model = Model::new();
    let g = open(dir.path());
    assert!(g.with_core(|c| c.consistent()));
    let entries: Vec<_> = (1..=10).map(|l| model.entry(l)).collect();
    rt.block_on(g.store(entries)).unwrap();
    let pieces = vec![model.piece(1, 0, 0), model.piece(2, 1, 128 << 10)];
    let pos = rt.block_on(g.store(pieces)).unwrap();
    assert_eq!((pos.lsn, pos.resync_seq), (10, 2));
    assert!(!g.with_core(|c| c.consistent()));
    // Stopped mid-resync (no done marker yet).
    g.shutdown();
    drop(g);
    assert_ne!(
        replog_features(dir.path()) & replog::format::FEATURE_RESYNC_INCOMPLETE,
        0,
        "the replog says the resync is incomplete"
    );

    let g = open(dir.path());
    assert!(
        !g.with_core(|c| c.consistent()),
        "reopened in the middle of a resync: not a prefix of the primary's history"
    );
    g.durable_position();
    let rest = vec![model.entry(11), model.piece(3, 0, 512 << 10), done(4)];
    let pos = rt.block_on(g.store(rest)).unwrap();
    assert_eq!((pos.lsn, pos.resync_seq), (11, 4));
    wait_until("consistent after the done marker", &g, |c| c.consistent());
    g.shutdown();
    drop(g);
    assert_eq!(
        replog_features(dir.path()) & replog::format::FEATURE_RESYNC_INCOMPLETE,
        0
    );
    let g = open(dir.path());
    assert!(g.with_core(|c| c.consistent()), "consistent after reopen");
    g.shutdown();
    drop(g);
    model.assert_devices(dir.path());
}

#[test]
fn a_write_on_a_secondary_fails_read_only() {
    let dir = tmpdir();
    let g = open(dir.path());
    assert_eq!(
        g.write_blocking(0, 0, vec![1u8; 4096], false),
        Err(Failure::ReadOnly)
    );
    let mut buf = vec![9u8; 4096];
    g.read(0, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0u8; 4096], "the refused write reached nothing");
    g.shutdown();
}

#[test]
fn a_store_fails_after_a_reset_until_the_next_session_and_for_good_after_a_halt() {
    let dir = tmpdir();
    let rt = runtime();
    let mut model = Model::new();
    let g = open(dir.path());
    {
        let mut st = g.shared.lock();
        g.shared.execute(
            &mut st,
            Command::ResetLink {
                reason: "injected".into(),
            },
        );
    }
    let err = rt.block_on(g.store(vec![model.entry(1)])).unwrap_err();
    assert!(err.contains("link reset"), "{err}");
    g.durable_position();
    assert_eq!(rt.block_on(g.store(vec![model.entry(1)])).unwrap().lsn, 1);

    // What the log-written worker reports when the replog fails a write.
    g.shared.input(Input::LogFailed {
        reason: "injected write error".into(),
    });
    let err = rt.block_on(g.store(vec![model.entry(2)])).unwrap_err();
    assert!(err.contains("halted"), "{err}");
    g.durable_position();
    assert!(rt.block_on(g.store(vec![model.entry(2)])).is_err());
}

#[test]
fn a_store_refuses_items_outside_the_devices_and_keeps_nothing_of_them() {
    let dir = tmpdir();
    let rt = runtime();
    let mut model = Model::new();
    let g = open(dir.path());
    let mut bad = model.entry(2);
    if let slink::Item::Entry(e) = &mut bad {
        e.offset = DEV_BYTES;
    }
    let err = rt.block_on(g.store(vec![model.entry(1), bad])).unwrap_err();
    assert!(err.contains("outside device"), "{err}");
    assert!(
        g.with_core(|c| c.last_lsn()) == 0,
        "nothing of the call was taken"
    );
    let mut model = Model::new();
    let good: Vec<_> = (1..=3).map(|l| model.entry(l)).collect();
    assert_eq!(rt.block_on(g.store(good)).unwrap().lsn, 3);
    g.shutdown();
    drop(g);
    model.assert_devices(dir.path());
}

#[test]
fn a_store_resolves_only_once_the_acked_position_covers_its_last_item_and_fails_at_a_halt() {
    let pos = |lsn, resync_seq| Position { lsn, resync_seq };
    let mut inbound = Inbound::new(pos(9, 0));
    let mut rx = inbound.wait(pos(12, 3));
    inbound.acked(pos(12, 2));
    assert!(rx.try_recv().is_err(), "piece 3 is not stored yet");
    inbound.acked(pos(12, 3));
    assert_eq!(
        rx.try_recv().unwrap(),
        Ok(slink::Position {
            lsn: 12,
            resync_seq: 3
        })
    );
    // What open made durable is never reported lower than it was.
    let mut rx = inbound.wait(pos(0, 1));
    inbound.acked(pos(3, 1));
    assert_eq!(rx.try_recv().unwrap().unwrap().lsn, 9);
    let mut rx = inbound.wait(pos(20, 0));
    inbound.end("group halted: injected".into());
    assert!(rx.try_recv().unwrap().unwrap_err().contains("halted"));
}
