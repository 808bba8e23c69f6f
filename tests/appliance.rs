//! The appliance as a user drives it: a real daemon, the real CLI, real NBD clients (nbdinfo,
//! qemu-io, fio's nbd engine, nbdfuse + loop device + mkfs.ext4 + mount + e2fsck), file-backed
//! devices, and byte comparisons of the sites.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const LAG_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn nbdinfo_shows_size_and_flags() {
    if !have("nbdinfo") {
        return;
    }
    let d = Daemon::start();
    d.create("r1", &two_site_table(16, 16, "async ios=100", 0, "create"));
    let out = must(Command::new("nbdinfo").arg("--json").arg(d.uri("r1")));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(16 << 20), "{v:#}");
    assert_eq!(e["is_read_only"].as_bool(), Some(false), "{v:#}");
    assert_eq!(e["can_flush"].as_bool(), Some(true), "{v:#}");
    assert_eq!(e["can_fua"].as_bool(), Some(true), "{v:#}");
    assert_eq!(e["can_trim"].as_bool(), Some(true), "{v:#}");
    assert_eq!(e["can_zero"].as_bool(), Some(true), "{v:#}");
    assert_eq!(e["can_multi_conn"].as_bool(), Some(true), "{v:#}");
    let list = must(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://127.0.0.1:{}", d.nbd_port)),
    );
    assert!(list.contains("r1"), "{list}");
}

#[test]
fn qemu_io_patterns_reach_the_second_site() {
    if !have("qemu-io") {
        return;
    }
    let d = Daemon::start();
    d.create("r1", &two_site_table(16, 16, "async ios=100", 0, "create"));
    let uri = d.uri("r1");
    let writes: &[(u8, u64, u64)] = &[
        (0x11, 0, 65536),
        (0x22, 1 << 20, 4096),
        (0x33, 7 << 20, 1 << 20),
        (0x44, (16 << 20) - 512, 512),
        (0x55, (5 << 20) + 512, 1536),
    ];
    for (pat, off, len) in writes {
        must(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -P {pat} {off} {len}"),
        ]));
    }
    must(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -z 2M 64k",
        "-c",
        "discard 3M 128k",
        "-c",
        "flush",
    ]));
    for (pat, off, len) in writes {
        let out = must(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("read -P {pat} {off} {len}"),
        ]));
        assert!(!out.contains("Pattern verification failed"), "{out}");
    }
    let out = must(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "read -P 0 2M 64k",
        "-c",
        "read -P 0 3M 128k",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    d.wait_lag_zero("r1", LAG_TIMEOUT);
    assert!(same_bytes(
        &d.path("primary0.img"),
        &d.path("secondary0.img"),
        16 << 20
    ));
}

#[test]
fn fio_verify_through_the_nbd_engine() {
    if !have("fio") {
        return;
    }
    let enghelp = Command::new("fio").arg("--enghelp").output().unwrap();
    if !String::from_utf8_lossy(&enghelp.stdout).contains("nbd") {
        eprintln!("SKIP: this fio has no nbd engine");
        return;
    }
    let d = Daemon::start();
    d.create("r1", &two_site_table(64, 32, "async ios=1000", 0, "create"));
    let out = must(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", d.uri("r1")),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=32m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(v["jobs"][0]["error"].as_i64(), Some(0), "{out}");
    d.wait_lag_zero("r1", LAG_TIMEOUT);
    assert!(same_bytes(
        &d.path("primary0.img"),
        &d.path("secondary0.img"),
        64 << 20
    ));
}

/// The seed's workflow (create, mount, some fs io, umount, fsck) through nbdfuse and a loop device.
#[test]
fn ext4_on_nbdfuse_loop_device_is_clean_and_replicated() {
    if !(have("nbdfuse") && have("losetup") && have("mkfs.ext4") && have("e2fsck")) {
        return;
    }
    if !Command::new("sh")
        .args(["-c", "test -e /dev/fuse && test -e /dev/loop-control"])
        .status()
        .unwrap()
        .success()
    {
        eprintln!("SKIP: no /dev/fuse or /dev/loop-control");
        return;
    }
    let d = Daemon::start();
    d.create(
        "r1",
        &two_site_table(128, 64, "async ios=1000", 0, "create"),
    );
    let mnt = d.path("fuse");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut fuse = Command::new("nbdfuse")
        .arg(&mnt)
        .arg(d.uri("r1"))
        .spawn()
        .unwrap();
    let img = mnt.join("nbd");
    for _ in 0..200 {
        if std::fs::metadata(&img)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let loopdev = must(
        Command::new("losetup")
            .args(["-f", "--show", "--direct-io=off"])
            .arg(&img),
    )
    .trim()
    .to_string();
    let fsdir = d.path("fs");
    std::fs::create_dir_all(&fsdir).unwrap();
    let result = std::panic::catch_unwind(|| {
        must(Command::new("mkfs.ext4").args(["-q", "-F", &loopdev]));
        must(Command::new("mount").arg(&loopdev).arg(&fsdir));
        for i in 0..20 {
            let data: Vec<u8> = (0..(37 * 1024 + i * 1000))
                .map(|b| (b * 7 + i) as u8)
                .collect();
            std::fs::write(fsdir.join(format!("file{i}")), &data).unwrap();
        }
        must(&mut Command::new("sync"));
        must(Command::new("umount").arg(&fsdir));
        let fsck = Command::new("e2fsck")
            .args(["-fn", &loopdev])
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
    });
    let _ = Command::new("umount").arg(&fsdir).output();
    let _ = Command::new("losetup").args(["-d", &loopdev]).output();
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).output();
    let _ = fuse.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    d.wait_lag_zero("r1", LAG_TIMEOUT);
    assert!(same_bytes(
        &d.path("primary0.img"),
        &d.path("secondary0.img"),
        128 << 20
    ));
    // The second site holds a clean file system too.
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(d.path("secondary0.img"))
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn devices_come_back_after_restart_and_survive_kill_9() {
    if !have("qemu-io") {
        return;
    }
    let mut d = Daemon::start();
    d.create("r1", &two_site_table(16, 16, "async ios=100", 0, "create"));
    let uri = d.uri("r1");
    must(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0xa1 0 1M"]));
    assert!(d.stop().success(), "SIGTERM exit status; log:\n{}", d.log());
    d.spawn();
    assert!(d.ok(&["ls"]).contains("r1"));
    let out = must(Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read -P 0xa1 0 1M"]));
    assert!(!out.contains("verification failed"), "{out}");
    // Acknowledged writes survive kill -9; the second site catches up after restart.
    must(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "write -P 0xb2 1M 2M",
        "-c",
        "write -P 0xc3 5M 64k",
    ]));
    d.kill9();
    d.spawn();
    let out = must(Command::new("qemu-io").args([
        "-f",
        "raw",
        &uri,
        "-c",
        "read -P 0xb2 1M 2M",
        "-c",
        "read -P 0xc3 5M 64k",
        "-c",
        "read -P 0xa1 0 1M",
    ]));
    assert!(!out.contains("verification failed"), "{out}");
    d.wait_lag_zero("r1", LAG_TIMEOUT);
    assert!(same_bytes(
        &d.path("primary0.img"),
        &d.path("secondary0.img"),
        16 << 20
    ));
    // remove forgets it, across a restart too.
    d.ok(&["remove", "r1"]);
    assert!(!d.ok(&["ls"]).contains("r1"));
    d.stop();
    d.spawn();
    assert!(!d.ok(&["ls"]).contains("r1"));
}

#[test]
fn two_tables_on_one_replog_form_one_group() {
    if !have("qemu-io") {
        return;
    }
    let d = Daemon::start();
    d.create("lv0", &two_site_table(8, 16, "async ios=100", 0, "create"));
    d.create("lv1", &two_site_table(8, 16, "async ios=100", 1, "open"));
    let st0 = d.status("lv0");
    let st1 = d.status("lv1");
    assert_eq!(st0["replog"]["path"], st1["replog"]["path"]);
    assert_eq!(
        st0["replog"]["devices"].as_array().unwrap().len(),
        2,
        "{st0:#}"
    );
    must(Command::new("qemu-io").args(["-f", "raw", &d.uri("lv0"), "-c", "write -P 1 0 1M"]));
    let before = d.status("lv1")["replog"]["last_lsn"].as_u64().unwrap();
    must(Command::new("qemu-io").args(["-f", "raw", &d.uri("lv1"), "-c", "write -P 2 0 1M"]));
    let after = d.status("lv0")["replog"]["last_lsn"].as_u64().unwrap();
    assert!(
        after > before,
        "one lsn counter across both devices: {before} -> {after}"
    );
    d.wait_lag_zero("lv0", LAG_TIMEOUT);
    d.wait_lag_zero("lv1", LAG_TIMEOUT);
    assert!(same_bytes(
        &d.path("primary0.img"),
        &d.path("secondary0.img"),
        8 << 20
    ));
    assert!(same_bytes(
        &d.path("primary1.img"),
        &d.path("secondary1.img"),
        8 << 20
    ));
    // A `create` on a replog in use is refused.
    let p = d.path("bad.table");
    std::fs::write(&p, two_site_table(8, 16, "async", 2, "create")).unwrap();
    let o = d.cli(&["create", "lv2", p.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_malformed_table_is_refused_with_its_position_and_creates_nothing() {
    let d = Daemon::start();
    let p = d.path("broken.table");
    std::fs::write(
        &p,
        "0 2048 replicator default 4 replog.img 0 create 4096 local 2 0 asink 2 0 p.img - 0\n",
    )
    .unwrap();
    let o = d.cli(&["create", "bad", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("broken.table:1:"), "{err}");
    assert!(err.contains("asink"), "{err}");
    assert!(!d.ok(&["ls"]).contains("bad"));
    assert!(!d.path("replog.img").exists(), "nothing was created");
}

#[test]
fn status_line_and_json_fields() {
    let d = Daemon::start();
    d.create(
        "r1",
        &two_site_table(8, 16, "async ios=100 size=1m timeout=5s", 0, "create"),
    );
    let line = d.ok(&["status", "r1"]);
    assert!(line.starts_with("0 16384 replicator "), "{line}");
    let st = d.status("r1");
    for s in st["slinks"].as_array().unwrap() {
        for f in [
            "lag_ios",
            "lag_bytes",
            "lag_seconds",
            "mode",
            "policy",
            "state",
            "dirty_bytes",
        ] {
            assert!(!s[f].is_null(), "missing {f}: {st:#}");
        }
    }
    assert_eq!(st["slinks"][1]["mode"], "async");
    assert_eq!(
        st["slinks"][1]["policy"],
        "async ios=100 size=1048576 timeout=5000ms"
    );
    let table = d.ok(&["table", "r1"]);
    assert!(table.contains("replicator"), "{table}");
}

/// A paused site falls behind; the ring overflows; its regions go dirty; after resume a resync
/// copies them and the sites are byte-equal again.
#[test]
fn overflow_marks_dirty_and_resync_repairs() {
    if !have("qemu-io") {
        return;
    }
    let d = Daemon::start();
    // 32 MiB device, 4 MiB ring: writing 24 MiB while slink 1 is paused must overflow.
    d.create("r1", &two_site_table(32, 4, "async", 0, "create"));
    d.ok(&["message", "r1", "0", "pause", "1"]);
    let ev0: u64 = d.status("r1")["event_nr"].as_u64().unwrap();
    let uri = d.uri("r1");
    for i in 0..24u64 {
        must(Command::new("qemu-io").args([
            "-f",
            "raw",
            &uri,
            "-c",
            &format!("write -P {} {}M 1M", i + 1, i),
        ]));
    }
    let st = d.status("r1");
    assert!(
        st["slinks"][1]["dirty_bytes"].as_u64().unwrap() > 0,
        "overflow left no dirty regions: {st:#}"
    );
    assert!(st["event_nr"].as_u64().unwrap() > ev0);
    d.ok(&["message", "r1", "0", "resume", "1"]);
    d.wait_lag_zero("r1", LAG_TIMEOUT);
    assert!(same_bytes(
        &d.path("primary0.img"),
        &d.path("secondary0.img"),
        32 << 20
    ));
}
