//! Faults on the replication path, each with real daemons over real TCP and real NBD clients:
//! a primary restarted after a resync, a paused tcp site, a sync site that is down, and (in the
//! unit tests of `engine::slink`) failures on the durability path.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::time::{Duration, Instant};

use common::*;

const DEV_MIB: u64 = 32;
const LAG_TIMEOUT: Duration = Duration::from_secs(120);

/// Devices `0..devs` at both sites; slink 1 of the primary has `policy` and, per device, `dirty`
/// (a dirty log spec with `{dev}` for the device number).
fn create_devices(sites: &Sites, devs: u32, ring_mib: u64, policy: &str, dirty: &str) {
    for dev in 0..devs {
        let (mode, size) = if dev == 0 {
            ("create", format!(" {}", 64 * 2048))
        } else {
            ("open", String::new())
        };
        let n = if dev == 0 { 4 } else { 3 };
        let table = format!(
            "0 {} replicator default {n} srep.img 0 {mode}{size} local 2 0 async 2 {dev} sdev{dev}.img - 0\n",
            DEV_MIB * 2048
        );
        let name = format!("dev{dev}");
        sites.s.ok(&[
            "create",
            "--secondary",
            &name,
            &sites.s.table_file(&name, &table),
        ]);
    }
    for dev in 0..devs {
        let (mode, size) = if dev == 0 {
            ("create", format!(" {}", ring_mib * 2048))
        } else {
            ("open", String::new())
        };
        let n = if dev == 0 { 4 } else { 3 };
        let count = 3 + policy.split_whitespace().count() - 1;
        let dirty = dirty.replace("{dev}", &dev.to_string());
        let table = format!(
            "0 {} replicator default {n} prep.img 0 {mode}{size} local 2 0 async 2 {dev} pdev{dev}.img - 0 \
             tcp {count} 1 {policy} {} 2 {dev} dev{dev} {dirty}\n",
            DEV_MIB * 2048,
            sites.listen
        );
        sites.p.create(&format!("dev{dev}"), &table);
    }
}

/// Both daemons, the devices, and slink 1's link up.
fn up(primary_flags: &[&str], devs: u32, ring_mib: u64, policy: &str, dirty: &str) -> Sites {
    let sites = Sites::start(primary_flags);
    create_devices(&sites, devs, ring_mib, policy, dirty);
    sites.wait_link_up("dev0", Duration::from_secs(20));
    sites
}

/// Lag 0 and nothing dirty at both sites, the same last lsn, and devices `0..devs` byte-equal.
fn converge_and_compare(sites: &Sites, devs: u32) {
    for dev in 0..devs {
        let name = format!("dev{dev}");
        sites.p.wait_lag_zero(&name, LAG_TIMEOUT);
        sites.s.wait_lag_zero(&name, LAG_TIMEOUT);
    }
    let last = |d: &Daemon| d.status("dev0")["replog"]["last_lsn"].as_u64().unwrap();
    assert_eq!(
        last(&sites.p),
        last(&sites.s),
        "the secondary holds the primary's last lsn"
    );
    for dev in 0..devs {
        assert!(
            same_bytes(
                &sites.p.path(&format!("pdev{dev}.img")),
                &sites.s.path(&format!("sdev{dev}.img")),
                DEV_MIB << 20
            ),
            "device {dev} differs between the sites\nprimary log:\n{}\nsecondary log:\n{}",
            sites.p.log(),
            sites.s.log()
        );
    }
}

/// Times one qemu-io write that must succeed.
fn timed_write(uri: &str, cmd: &str) -> Duration {
    let t = Instant::now();
    let o = qemu_io_command(uri, &[cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.elapsed()
}

/// qemu-io writes of 64 KiB over both devices at NBD port `port` until stopped; failed writes
/// (the daemon is down) are retried by the next round. Counts those that succeeded.
fn qemu_writer(port: u16, devs: u32) -> Writer {
    Writer::spawn(move |i| {
        let dev = i % u64::from(devs);
        let off = (i * 7 * 64 * 1024) % (DEV_MIB << 20);
        let pat = (i % 250 + 1) as u8;
        let uri = format!("nbd://127.0.0.1:{port}/dev{dev}");
        // Several writes per client: the load is the daemon's, not qemu-io's start-up.
        let cmds: Vec<String> = (0..8u64)
            .map(|k| {
                format!(
                    "write -P {pat} {} 64k",
                    (off + k * 64 * 1024) % (DEV_MIB << 20)
                )
            })
            .collect();
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        let ok = qemu_io_command(&uri, &cmds)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            8
        } else {
            0
        }
    })
}

/// How often `needle` occurs in `text`.
fn count(text: &str, needle: &str) -> usize {
    text.matches(needle).count()
}

fn have_tools() -> bool {
    have("qemu-io")
}

/// The user's report: after an initial full sync (resync seq in the thousands at the secondary),
/// a kill -9 of the primary and a restart under writes made the link flap ("ack ... beyond what
/// was sent") because the restarted primary's resync seq began at 0 again. The restarted link
/// must come up once and stay up, nothing may overflow, and the sites end byte-equal.
#[test]
fn a_primary_restarted_after_a_resync_keeps_its_link_up_under_writes() {
    if !have_tools() {
        return;
    }
    let mut sites = Sites::start(&[]);
    create_devices(&sites, 2, 64, "async", "disk 3 128 s1-dev{dev}.dirty sync");
    // The initial full sync: every region of both devices is copied (hundreds of resync chunks).
    for dev in ["dev0", "dev1"] {
        sites.p.wait_lag_zero(dev, LAG_TIMEOUT);
    }
    let writer = qemu_writer(sites.p.nbd_port, 2);
    while writer.done() < 40 {
        std::thread::sleep(Duration::from_millis(20));
    }
    sites.p.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let log_before = sites.p.log().len();
    sites.p.spawn();
    sites.wait_link_up("dev0", Duration::from_secs(20));
    let at_restart = writer.done();
    // Writes go on for a while after the restart: the link must not go down once.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let s = sites.slink1("dev0");
        assert_eq!(
            s["link"]["sessions"].as_u64(),
            Some(1),
            "the restarted primary's link reconnected: {s:#}\nprimary log:\n{}",
            &sites.p.log()[log_before..]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let written = writer.stop();
    assert!(written > at_restart, "writes went on after the restart");
    let log = sites.p.log()[log_before..].to_string();
    assert_eq!(
        count(&log, "\"slink-down\""),
        0,
        "no slink-down after the restart:\n{log}"
    );
    assert_eq!(count(&log, "beyond what was sent"), 0, "{log}");
    assert_eq!(count(&log, "\"overflow\""), 0, "nothing overflowed:\n{log}");
    converge_and_compare(&sites, 2);
    assert_eq!(sites.slink1("dev0")["link"]["sessions"].as_u64(), Some(1));
}

/// The primary's slink 1 state for `dev`, from status.
fn slink1_state(sites: &Sites, dev: &str) -> String {
    sites.slink1(dev)["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

const DEAD_AFTER: Duration = Duration::from_secs(2);
/// Time a test allows on top of a deadline for qemu-io start-up and the link watcher's poll.
const MARGIN: Duration = Duration::from_secs(3);

/// One device whose slink 1 (`policy`, a ring of `ring_mib`, a dirty log) is a site declared
/// dead after [`DEAD_AFTER`] without word, its link up.
fn sync_site(policy: &str, ring_mib: u64) -> Sites {
    let dead_after = format!("{}s", DEAD_AFTER.as_secs());
    up(
        &["--link-dead-after", &dead_after],
        1,
        ring_mib,
        policy,
        "disk 3 128 s1-dev{dev}.dirty nosync",
    )
}

/// A sync site that is killed: the next write waits for it no longer than the link's dead
/// timeout (the default `down_wait`), the site is then out of date (status `outdated`, letter
/// `O`, event), and once it is back and has caught up it is a sync site again.
#[test]
fn a_sync_site_that_is_down_is_waited_for_only_its_down_wait_then_marked_out_of_date() {
    if !have_tools() {
        return;
    }
    let mut sites = sync_site("sync", 64);
    let uri = sites.p.uri("dev0");
    timed_write(&uri, "write -P 1 0 64k");
    sites.s.kill9();
    let waited = timed_write(&uri, "write -P 2 64k 64k");
    assert!(
        waited < DEAD_AFTER + MARGIN,
        "a write waited {waited:?} for a sync site that is down (down_wait {DEAD_AFTER:?})"
    );
    assert!(
        waited >= DEAD_AFTER - Duration::from_millis(500),
        "the write did not wait for the sync site at all: {waited:?}"
    );
    assert_eq!(slink1_state(&sites, "dev0"), "outdated");
    let line = sites.p.ok(&["status", "dev0"]);
    assert!(line.contains(" 1 OA sync "), "status letter O: {line}");
    let log = sites.p.log();
    assert_eq!(count(&log, "\"slink-outdated\""), 1, "{log}");
    // Out of date: writes go on without waiting for it.
    for i in 0..5u64 {
        let quick = timed_write(&uri, &format!("write -P 3 {}k 64k", 128 + i * 64));
        assert!(quick < Duration::from_secs(1), "write {i} waited {quick:?}");
    }
    sites.s.spawn();
    sites.wait_slink1("dev0", "back to a current sync site", LAG_TIMEOUT, |s| {
        s["state"] == "up" && s["lag_ios"] == 0
    });
    assert_eq!(count(&sites.p.log(), "\"slink-uptodate\""), 1);
    // Current again: a write waits for it (the secondary holds it once acknowledged).
    timed_write(&uri, "write -P 4 1M 64k");
    let p_last = sites.p.status("dev0")["replog"]["last_lsn"]
        .as_u64()
        .unwrap();
    let s_last = sites.s.status("dev0")["replog"]["last_lsn"]
        .as_u64()
        .unwrap();
    assert!(
        s_last >= p_last,
        "sync again: primary {p_last}, secondary {s_last}"
    );
    converge_and_compare(&sites, 1);
}

/// `down_wait=forever`: RPO 0 above availability. A write waits for a sync site that is down
/// for as long as it takes, and completes once the site is back.
#[test]
fn with_down_wait_forever_a_write_waits_until_the_sync_site_is_back() {
    if !have_tools() {
        return;
    }
    let mut sites = sync_site("sync down_wait=forever", 64);
    let uri = sites.p.uri("dev0");
    timed_write(&uri, "write -P 1 0 64k");
    sites.s.kill9();
    let uri2 = uri.clone();
    let writer = std::thread::spawn(move || timed_write(&uri2, "write -P 2 64k 64k"));
    std::thread::sleep(DEAD_AFTER + MARGIN);
    assert!(
        !writer.is_finished(),
        "a write finished while its down_wait=forever sync site was down"
    );
    assert_eq!(slink1_state(&sites, "dev0"), "down");
    assert_eq!(count(&sites.p.log(), "\"slink-outdated\""), 0);
    sites.s.spawn();
    let waited = writer.join().unwrap();
    assert!(waited >= DEAD_AFTER + MARGIN, "{waited:?}");
    converge_and_compare(&sites, 1);
}

/// `message NAME 0 pause 1` stops shipping to a tcp site: the secondary gets nothing and the
/// lag grows; `resume 1` ships the backlog and the sites end byte-equal.
#[test]
fn a_paused_tcp_site_gets_nothing_until_resumed() {
    if !have_tools() {
        return;
    }
    let sites = Sites::start(&[]);
    create_devices(
        &sites,
        1,
        64,
        "async",
        "disk 3 128 s1-dev{dev}.dirty nosync",
    );
    let uri = sites.p.uri("dev0");
    timed_write(&uri, "write -P 1 0 64k");
    sites.p.wait_lag_zero("dev0", LAG_TIMEOUT);
    sites.s.wait_lag_zero("dev0", LAG_TIMEOUT);
    sites.p.ok(&["message", "dev0", "0", "pause", "1"]);
    let secondary_last = || {
        sites.s.status("dev0")["replog"]["last_lsn"]
            .as_u64()
            .unwrap()
    };
    let before = secondary_last();
    let image = std::fs::read(sites.s.path("sdev0.img")).unwrap();
    let mut lags = Vec::new();
    for round in 0..2u64 {
        for i in 0..4u64 {
            timed_write(
                &uri,
                &format!("write -P {} {}k 64k", 2 + round, (round * 4 + i) * 64),
            );
        }
        // Time for a link that ships to have shipped.
        std::thread::sleep(Duration::from_millis(700));
        lags.push(sites.slink1("dev0")["lag_ios"].as_u64().unwrap());
    }
    assert_eq!(secondary_last(), before, "the paused site received entries");
    assert!(
        std::fs::read(sites.s.path("sdev0.img")).unwrap() == image,
        "the paused site's device changed"
    );
    assert!(
        lags[0] >= 4 && lags[1] > lags[0],
        "the lag grows while paused: {lags:?}"
    );
    assert_eq!(
        sites.slink1("dev0")["link"]["state"],
        "up",
        "paused, not disconnected"
    );
    sites.p.ok(&["message", "dev0", "0", "resume", "1"]);
    converge_and_compare(&sites, 1);
}

/// An out-of-date sync site with a dirty log is dropped for when the ring overflows, like an
/// async site: writes go on, its regions go dirty, and when it is back a resync repairs them and
/// it is a current sync site again.
#[test]
fn an_out_of_date_sync_site_is_dropped_for_on_overflow_and_resynced_when_back() {
    if !have_tools() {
        return;
    }
    let mut sites = sync_site("sync", 4);
    let uri = sites.p.uri("dev0");
    sites.s.kill9();
    // 8 MiB through a 4 MiB ring while the site is away.
    for i in 0..8u64 {
        timed_write(&uri, &format!("write -P {} {}M 1M", i + 1, i));
    }
    assert_eq!(slink1_state(&sites, "dev0"), "outdated");
    let s = sites.slink1("dev0");
    assert!(
        s["dirty_bytes"].as_u64().unwrap() > 0,
        "the ring overflowed: {s:#}"
    );
    assert!(count(&sites.p.log(), "\"overflow\"") >= 1);
    sites.s.spawn();
    sites.wait_slink1("dev0", "back to a current sync site", LAG_TIMEOUT, |s| {
        s["state"] == "up" && s["lag_ios"] == 0 && s["dirty_bytes"] == 0
    });
    converge_and_compare(&sites, 1);
}
