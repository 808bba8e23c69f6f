//! Power-loss safety of the primary (R1-R3 of `src/core`), with real daemons, real NBD clients
//! (qemu-io) and `replicator replog inspect`:
//! - the activity log lists the extents written to while the group runs, and a clean stop
//!   empties it;
//! - after an unclean stop (kill -9) the listed extents are dirty for the other site and resynced
//!   from the primary's devices, so a write the primary's device holds but its replog lost still
//!   reaches the site;
//! - a tcp site never holds an lsn above the primary's durable lsn.
//!
//! A real power loss cannot be had here (kill -9 keeps the page cache), so the second test makes
//! its effect by hand: after the kill, bytes are written into slink 0's device inside a listed
//! extent, where no replog entry covers them, as write-back of the device page would leave them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const DEV_MIB: u64 = 32;
const EXTENT_BYTES: u64 = 4 << 20;
const LAG_TIMEOUT: Duration = Duration::from_secs(120);
const KEY: &str = "a key both sites hold, long enough 0123456789";

fn inspect(d: &Daemon, replog: &str) -> serde_json::Value {
    let out = must(Command::new(bin()).args([
        "replog",
        "inspect",
        "--json",
        d.path(replog).to_str().unwrap(),
    ]));
    serde_json::from_str(&out).unwrap()
}

fn activity_log(d: &Daemon, replog: &str) -> Vec<(u32, u64)> {
    serde_json::from_value(inspect(d, replog)["activity_log"].clone()).unwrap()
}

fn qemu_io(uri: &str, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    // Writeback: plain writes, no FUA (qemu-io defaults to writethrough, FUA on every write).
    c.args(["-f", "raw", "-t", "writeback"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = must(&mut c);
    assert!(!out.contains("failed"), "qemu-io: {out}");
}

/// Writes of 64 KiB at the start of extents `extents` of the device.
fn writes_in_extents(extents: &[u64], pattern: u8) -> Vec<String> {
    extents
        .iter()
        .map(|x| format!("write -P {pattern} {} 64k", x * EXTENT_BYTES))
        .collect()
}

fn local_pair() -> Daemon {
    let d = Daemon::start();
    d.create("pl", &two_site_table(DEV_MIB, 64, "async", 0, "create"));
    d.wait_lag_zero("pl", LAG_TIMEOUT);
    d
}

#[test]
fn the_activity_log_lists_written_extents_while_running_and_is_empty_after_a_clean_stop() {
    if !have("qemu-io") {
        return;
    }
    let mut d = local_pair();
    qemu_io(&d.uri("pl"), &writes_in_extents(&[0, 2, 5], 0x5a));
    let listed = activity_log(&d, "replog.img");
    for x in [0, 2, 5] {
        assert!(
            listed.contains(&(0, x)),
            "extent {x} written to is not in the activity log: {listed:?}"
        );
    }
    let ins = inspect(&d, "replog.img");
    assert!(
        ins["feature_names"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "activity_log"),
        "the writer says it keeps the activity log: {}",
        ins["feature_names"]
    );
    assert!(d.stop().success());
    assert_eq!(
        activity_log(&d, "replog.img"),
        vec![],
        "a clean stop leaves the activity log empty"
    );
}

#[test]
fn after_an_unclean_stop_the_listed_extents_are_dirty_for_the_site_and_resynced() {
    if !have("qemu-io") {
        return;
    }
    let mut d = local_pair();
    qemu_io(&d.uri("pl"), &writes_in_extents(&[1, 3], 0x11));
    d.wait_lag_zero("pl", LAG_TIMEOUT);
    d.kill9();
    let listed = activity_log(&d, "replog.img");
    assert!(
        listed.contains(&(0, 1)) && listed.contains(&(0, 3)),
        "an unclean stop leaves the written extents listed: {listed:?}"
    );
    // What a power loss can leave: the device page written back, its replog record lost.
    let lost_write_at = 3 * EXTENT_BYTES + (1 << 20);
    let primary = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path("primary0.img"))
        .unwrap();
    primary.write_all_at(&[0xee; 8192], lost_write_at).unwrap();
    primary.sync_all().unwrap();
    drop(primary);
    assert!(
        !same_bytes(
            &d.path("primary0.img"),
            &d.path("secondary0.img"),
            DEV_MIB << 20
        ),
        "the sites differ before the restart"
    );

    let log_before = d.log().len();
    d.spawn();
    // The marks are made before the group starts: dirty bytes, or a resync already under way or
    // done, are seen from the first status on.
    let deadline = Instant::now() + LAG_TIMEOUT;
    let mut saw_dirty = false;
    loop {
        let st = d.status("pl");
        let dirty = st["slinks"][1]["dirty_bytes"].as_u64().unwrap();
        saw_dirty |= dirty > 0;
        if dirty == 0 && st["slinks"][1]["lag_ios"].as_u64() == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "no convergence: {st:#}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = d.log()[log_before..].to_string();
    assert!(log.contains("unclean-start"), "{log}");
    assert!(
        saw_dirty || log.contains("resync-end"),
        "the listed extents were never dirty for slink 1:\n{log}"
    );
    assert!(
        same_bytes(
            &d.path("primary0.img"),
            &d.path("secondary0.img"),
            DEV_MIB << 20
        ),
        "the write only the primary's device held did not reach the site\n{log}"
    );
    let cmp = Command::new("cmp")
        .arg(d.path("primary0.img"))
        .arg(d.path("secondary0.img"))
        .status()
        .unwrap();
    assert!(cmp.success(), "cmp finds the sites different");
    assert!(d.stop().success());
    assert_eq!(activity_log(&d, "replog.img"), vec![]);
}

/// Slink 0's cursor may not pass the replog's durable lsn (R2). With slink 0 alone and writes
/// that never ask for a flush, only the checkpoint's own replog sync moves that lsn: without it
/// the ring fills for good and writes are refused once they waited `RING_FULL_WAIT_MAX`.
#[test]
fn slink_0_alone_with_writes_that_never_flush_keeps_reclaiming_the_ring() {
    if !have("qemu-io") {
        return;
    }
    let d = Daemon::start();
    let (dev_mib, replog_mib) = (16u64, 4u64);
    d.create(
        "solo",
        &format!(
            "0 {} replicator default 4 replog.img 0 create {} local 2 0 async ios=0 \\\n\
             2 0 primary0.img - 0\n",
            dev_mib * 2048,
            replog_mib * 2048
        ),
    );
    // Four passes over the device: 64 MiB through a 4 MiB ring, in one client session (no
    // flush between the writes).
    let writes: Vec<String> = (0..4 * dev_mib)
        .map(|i| format!("write -P {} {} 1M", i % 251, (i % dev_mib) << 20))
        .collect();
    let started = Instant::now();
    qemu_io(&d.uri("solo"), &writes);
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "writes waited for ring space: {:?}",
        started.elapsed()
    );
    let st = d.status("solo");
    assert_eq!(
        st["replog"]["last_lsn"].as_u64(),
        Some(4 * dev_mib),
        "every write was taken: {st:#}"
    );
}

/// A secondary daemon (siteB) and a primary (siteA) with one device and a tcp slink 1.
fn tcp_pair() -> (Daemon, Daemon) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut s = Daemon::prepare(&[
        "--site-id",
        "siteB",
        "--psk-file",
        "{dir}/key",
        "--slink-listen",
        &listen,
        "--allow",
        "siteA",
    ]);
    std::fs::write(s.dir.join("key"), KEY).unwrap();
    s.spawn();
    let peer = format!("siteB@{listen}");
    let mut p = Daemon::prepare(&[
        "--site-id",
        "siteA",
        "--psk-file",
        "{dir}/key",
        "--peer",
        &peer,
    ]);
    std::fs::write(p.dir.join("key"), KEY).unwrap();
    p.spawn();
    let sectors = DEV_MIB * 2048;
    let secondary = format!(
        "0 {sectors} replicator default 4 srep.img 0 create {} local 2 0 async 2 0 sdev0.img - 0\n",
        64 * 2048
    );
    std::fs::write(s.path("dev0.table"), secondary).unwrap();
    s.ok(&["create", "--secondary", "dev0", "dev0.table"]);
    let primary = format!(
        "0 {sectors} replicator default 4 prep.img 0 create {} local 2 0 async 2 0 pdev0.img - 0 \
         tcp 3 1 async {listen} 2 0 dev0 disk 3 128 s1.dirty sync\n",
        64 * 2048
    );
    std::fs::write(p.path("dev0.table"), primary).unwrap();
    p.ok(&["create", "dev0", "dev0.table"]);
    p.wait_lag_zero("dev0", LAG_TIMEOUT);
    (p, s)
}

#[test]
fn a_tcp_site_never_holds_an_lsn_above_the_primarys_durable_lsn() {
    if !have("qemu-io") {
        return;
    }
    let (mut p, s) = tcp_pair();
    let uri = p.uri("dev0");
    let writer = std::thread::spawn(move || {
        for round in 0..20u64 {
            let cmds: Vec<String> = (0..16u64)
                .map(|i| {
                    format!(
                        "write -P {} {} 4k",
                        round % 200 + 1,
                        (round * 16 + i) * 65536
                    )
                })
                .collect();
            qemu_io(&uri, &cmds);
        }
    });
    let mut samples = 0;
    let mut shipped_max = 0;
    while !writer.is_finished() {
        let st = p.status("dev0");
        let acked = st["slinks"][1]["applied_lsn"].as_u64().unwrap();
        let durable = st["replog"]["durable_lsn"].as_u64().unwrap();
        assert!(
            acked <= durable,
            "the tcp site acknowledged lsn {acked} above the primary's durable lsn {durable}"
        );
        shipped_max = shipped_max.max(acked);
        samples += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    writer.join().unwrap();
    assert!(
        samples > 0 && shipped_max > 0,
        "nothing was shipped while sampled"
    );
    p.kill9();
    // After the kill, what the primary's replog recovers holds every lsn the site has.
    let primary_last = inspect(&p, "prep.img")["last_lsn"].as_u64().unwrap();
    let site_last = s.status("dev0")["replog"]["last_lsn"].as_u64().unwrap();
    assert!(
        site_last <= primary_last,
        "the site holds lsn {site_last}, the primary recovers only up to {primary_last}"
    );
}
