//! Every file a group uses belongs to one role in one group: a table naming a file that is in use
//! (however it is named, in this daemon or in another one) is refused, names the holder, and
//! leaves every file as it was. Real daemons, the real CLI, qemu-io for the data path.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

const LAG_TIMEOUT: Duration = Duration::from_secs(60);
const DEV_MIB: u64 = 16;

/// The files of a table with a local primary (slink 0) and a second local site (slink 1) with a
/// `disk` dirty log; every path as given (relative ones resolve against the daemon's directory).
struct Files<'a> {
    replog: &'a str,
    /// How the replog is opened: `create`, `open` or `auto`.
    mode: &'a str,
    primary: &'a str,
    secondary: &'a str,
    dirty: &'a str,
}

/// A second group `b` with files of its own; a test names the ones it points elsewhere
/// (`Files { primary: "replog.img", ..B }`).
const B: Files<'static> = Files {
    replog: "b_replog.img",
    mode: "create",
    primary: "b_pri.img",
    secondary: "b_sec.img",
    dirty: "b.dirty",
};

impl Files<'_> {
    fn table(&self) -> String {
        let Files {
            replog,
            mode,
            primary,
            secondary,
            dirty,
        } = self;
        let sectors = DEV_MIB * 2048;
        let (n, size) = if *mode == "open" {
            (3, String::new())
        } else {
            (4, format!(" {}", 16 * 2048))
        };
        format!(
            "0 {sectors} replicator \\\n\
             default {n} {replog} 0 {mode}{size} \\\n\
             local 2 0 async ios=0 \\\n\
             2 0 {primary} \\\n\
             - 0 \\\n\
             local 2 1 async ios=100 \\\n\
             2 0 {secondary} \\\n\
             disk 3 128 {dirty} nosync\n"
        )
    }
}

/// A daemon with the group most tests start from: `a` on replog.img, primary0.img,
/// secondary0.img, slink1_dev0.dirty.
fn live_group() -> Daemon {
    let d = Daemon::start();
    d.create(
        "a",
        &two_site_table(DEV_MIB, 16, "async ios=100", 0, "create"),
    );
    d
}

/// `create` must fail; returns its stderr. The device must not exist afterwards.
fn refused(d: &Daemon, name: &str, table: &str) -> String {
    let p = d.path(&format!("{name}.table"));
    std::fs::write(&p, table).unwrap();
    let o = d.cli(&["create", name, p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "create {name} was accepted: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!names(d).contains(&name.to_string()), "{name} is listed");
    err
}

/// The device names `ls` lists (one per line, the name before a tab).
fn names(d: &Daemon) -> Vec<String> {
    d.ok(&["ls"])
        .lines()
        .filter_map(|l| l.split('\t').next())
        .map(str::to_string)
        .collect()
}

/// qemu-io `cmds` on `uri`, which must succeed and verify; returns its output.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let out = must(&mut qemu_io_command(uri, cmds));
    assert!(!out.contains("verification failed"), "{out}");
    out
}

/// Every slink of the device up, its device healthy, nothing behind.
fn assert_up_and_in_sync(d: &Daemon, name: &str) {
    let st = d.wait_lag_zero(name, LAG_TIMEOUT);
    for s in st["slinks"].as_array().unwrap() {
        assert_eq!(s["state"], "up", "{st:#}");
        assert_eq!(s["health"], "A", "{st:#}");
    }
    let line = d.ok(&["status", name]);
    assert!(line.contains(" 0 UA ") && line.contains(" 1 UA "), "{line}");
}

/// The group still works end to end: a write reads back, reaches the second site, and the
/// replog opens again after a restart (its metadata is intact).
fn assert_group_unharmed(d: &mut Daemon, pattern: u8) {
    let uri = d.uri("a");
    qemu_io(&uri, &[&format!("write -P {pattern} 1M 1M")]);
    qemu_io(&uri, &[&format!("read -P {pattern} 1M 1M")]);
    assert_up_and_in_sync(d, "a");
    assert!(same_bytes(
        &d.path("primary0.img"),
        &d.path("secondary0.img"),
        DEV_MIB << 20
    ));
    assert!(d.stop().success(), "{}", d.log());
    d.spawn();
    assert!(!d.log().contains("not restored"), "{}", d.log());
    qemu_io(&uri, &[&format!("read -P {pattern} 1M 1M")]);
    assert_up_and_in_sync(d, "a");
}

fn assert_absent(d: &Daemon, files: &[&str]) {
    for f in files {
        assert!(!d.path(f).exists(), "{f} was created by a refused create");
    }
}

#[test]
fn a_table_naming_a_live_groups_replog_as_its_device_is_refused_and_the_group_keeps_working() {
    if !have("qemu-io") {
        return;
    }
    let mut d = live_group();
    let before = std::fs::metadata(d.path("replog.img")).unwrap();
    let err = refused(
        &d,
        "b",
        &Files {
            primary: "replog.img",
            ..B
        }
        .table(),
    );
    let replog = d.path("replog.img");
    assert!(
        err.contains(&format!("{} is the replog of group", replog.display())),
        "{err}"
    );
    assert!(err.contains("(device a) in this daemon"), "{err}");
    assert_absent(&d, &["b_replog.img", "b_sec.img", "b.dirty"]);
    let after = std::fs::metadata(d.path("replog.img")).unwrap();
    assert_eq!(before.len(), after.len());
    assert_group_unharmed(&mut d, 0x5a);
}

#[test]
fn a_table_naming_a_live_groups_device_is_refused() {
    if !have("qemu-io") {
        return;
    }
    let mut d = live_group();
    let err = refused(
        &d,
        "b",
        &Files {
            primary: "primary0.img",
            ..B
        }
        .table(),
    );
    assert!(
        err.contains("primary0.img is device 0 of slink 0 of group"),
        "{err}"
    );
    assert!(err.contains("(device a) in this daemon"), "{err}");
    // The second site's copy is the group's too.
    let err = refused(
        &d,
        "b",
        &Files {
            secondary: "secondary0.img",
            ..B
        }
        .table(),
    );
    assert!(
        err.contains("secondary0.img is device 0 of slink 1"),
        "{err}"
    );
    assert_absent(&d, &["b_replog.img", "b_pri.img", "b_sec.img", "b.dirty"]);
    assert_group_unharmed(&mut d, 0x6b);
}

#[test]
fn a_table_naming_a_live_groups_dirty_log_is_refused() {
    let d = live_group();
    let err = refused(
        &d,
        "b",
        &Files {
            dirty: "slink1_dev0.dirty",
            ..B
        }
        .table(),
    );
    assert!(
        err.contains("slink1_dev0.dirty is the dirty log of slink 1 for device 0 of group"),
        "{err}"
    );
    assert_absent(&d, &["b_replog.img", "b_pri.img", "b_sec.img"]);
}

#[test]
fn a_table_whose_replog_is_its_own_device_is_refused_and_creates_nothing() {
    let d = Daemon::start();
    let err = refused(
        &d,
        "b",
        &Files {
            replog: "same.img",
            primary: "same.img",
            ..B
        }
        .table(),
    );
    assert!(
        err.contains("names one file as the replog") && err.contains("device 0 of slink 0"),
        "{err}"
    );
    assert_absent(&d, &["same.img", "b_sec.img", "b.dirty"]);
    // Existing files are not touched either.
    std::fs::write(d.path("same.img"), vec![7u8; 1 << 20]).unwrap();
    let err = refused(
        &d,
        "b",
        &Files {
            replog: "same.img",
            mode: "auto",
            secondary: "./same.img",
            ..B
        }
        .table(),
    );
    assert!(err.contains("names one file as the replog"), "{err}");
    assert_eq!(
        std::fs::read(d.path("same.img")).unwrap(),
        vec![7u8; 1 << 20]
    );
    assert_absent(&d, &["b_pri.img", "b.dirty"]);
}

#[test]
fn the_replog_through_a_symlink_is_refused() {
    let d = live_group();
    std::os::unix::fs::symlink("replog.img", d.path("link.img")).unwrap();
    let err = refused(
        &d,
        "b",
        &Files {
            primary: "link.img",
            ..B
        }
        .table(),
    );
    assert!(err.contains("link.img (= "), "{err}");
    assert!(err.contains("replog.img) is the replog of group"), "{err}");
    assert_absent(&d, &["b_replog.img", "b_sec.img", "b.dirty"]);
}

#[test]
fn the_replog_through_dotdot_is_refused() {
    let d = live_group();
    std::fs::create_dir(d.path("sub")).unwrap();
    let err = refused(
        &d,
        "b",
        &Files {
            primary: "sub/../replog.img",
            ..B
        }
        .table(),
    );
    assert!(err.contains("is the replog of group"), "{err}");
    // A symlinked directory followed by `..` as well.
    std::os::unix::fs::symlink(d.path("sub"), d.path("subl")).unwrap();
    let err = refused(
        &d,
        "b",
        &Files {
            secondary: "subl/./../primary0.img",
            ..B
        }
        .table(),
    );
    assert!(
        err.contains("is device 0 of slink 1") || err.contains("is device 0 of slink 0"),
        "{err}"
    );
    assert_absent(&d, &["b_replog.img", "b_pri.img", "b_sec.img", "b.dirty"]);
}

#[test]
fn the_replog_through_a_hard_link_is_refused() {
    let d = live_group();
    std::fs::hard_link(d.path("replog.img"), d.path("hard.img")).unwrap();
    let err = refused(
        &d,
        "b",
        &Files {
            primary: "hard.img",
            ..B
        }
        .table(),
    );
    assert!(err.contains("hard.img is the replog of group"), "{err}");
    // As a replog too: `create` would re-create (wipe) the live one.
    let err = refused(
        &d,
        "b",
        &Files {
            replog: "hard.img",
            ..B
        }
        .table(),
    );
    assert!(err.contains("hard.img is in use as the replog"), "{err}");
    assert_absent(&d, &["b_replog.img", "b_pri.img", "b_sec.img", "b.dirty"]);
}

#[test]
fn a_second_table_joins_a_group_but_not_with_a_device_in_use() {
    let d = live_group();
    let err = refused(
        &d,
        "b",
        &Files {
            replog: "replog.img",
            mode: "open",
            primary: "primary0.img",
            ..B
        }
        .table(),
    );
    assert!(err.contains("primary0.img is device 0 of slink 0"), "{err}");
    assert_absent(&d, &["b_sec.img", "b.dirty"]);
    // Through a hard link the replog is the same group's.
    std::fs::hard_link(d.path("replog.img"), d.path("hard.img")).unwrap();
    let joined =
        two_site_table(DEV_MIB, 16, "async ios=100", 1, "open").replace("replog.img", "hard.img");
    d.create("b", &joined);
    assert_eq!(
        d.status("a")["replog"]["devices"].as_array().unwrap().len(),
        2,
        "{:#}",
        d.status("a")
    );
}

#[test]
fn a_second_daemon_on_the_same_replog_is_refused() {
    if !have("qemu-io") {
        return;
    }
    let mut d = live_group();
    let other = Daemon::start();
    let replog = d.path("replog.img");
    // `create` would wipe the replog, `open` would run a second writer on it: both refused.
    for mode in ["create", "open"] {
        let err = refused(
            &other,
            "b",
            &Files {
                replog: replog.to_str().unwrap(),
                mode,
                ..B
            }
            .table(),
        );
        assert!(
            err.contains(&format!(
                "{} is locked by another process",
                replog.display()
            )),
            "{err}"
        );
        let pid = d.child.as_ref().unwrap().id();
        assert!(err.contains(&format!("pid {pid}")), "{err}");
    }
    assert_absent(&other, &["b_pri.img", "b_sec.img", "b.dirty"]);
    // The other daemon's device on this daemon's device: refused the same way.
    let err = refused(
        &other,
        "b",
        &Files {
            primary: d.path("primary0.img").to_str().unwrap(),
            ..B
        }
        .table(),
    );
    assert!(err.contains("is locked by another process"), "{err}");
    assert_absent(&other, &["b_replog.img"]);
    assert_group_unharmed(&mut d, 0x7c);
}

/// A loop device, as losetup makes it: the same disk through another node is refused in this
/// daemon (st_rdev), and another daemon is refused by the kernel (O_EXCL).
#[test]
fn a_loop_device_used_by_one_group_is_refused_for_another() {
    if !have("losetup") {
        return;
    }
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("SKIP: no /dev/loop-control");
        return;
    }
    let mut d = Daemon::start();
    let backing = d.path("loop-backing.img");
    std::fs::write(&backing, vec![0u8; (DEV_MIB << 20) as usize]).unwrap();
    let attach = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    if !attach.status.success() {
        eprintln!(
            "SKIP: losetup could not attach a loop device: {}",
            String::from_utf8_lossy(&attach.stderr)
        );
        return;
    }
    let loopdev = String::from_utf8_lossy(&attach.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).output();
        }
    }
    let _detach = Detach(loopdev.clone());

    d.create(
        "a",
        &Files {
            replog: "replog.img",
            primary: "primary0.img",
            secondary: &loopdev,
            dirty: "a.dirty",
            ..B
        }
        .table(),
    );
    // Another node for the same disk.
    let rdev = std::fs::metadata(&loopdev).unwrap().rdev();
    let alias = d.path("alias-node");
    let c = std::ffi::CString::new(alias.to_str().unwrap()).unwrap();
    // SAFETY: mknod with a valid C string, in the test's own directory.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, rdev) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    let err = refused(
        &d,
        "b",
        &Files {
            secondary: alias.to_str().unwrap(),
            ..B
        }
        .table(),
    );
    assert!(err.contains("is device 0 of slink 1 of group"), "{err}");
    assert_absent(&d, &["b_replog.img", "b_pri.img", "b.dirty"]);

    let other = Daemon::start();
    let err = refused(
        &other,
        "b",
        &Files {
            secondary: &loopdev,
            ..B
        }
        .table(),
    );
    assert!(
        err.contains("is in exclusive use by another process"),
        "{err}"
    );
    assert_absent(&other, &["b_replog.img", "b_pri.img", "b.dirty"]);

    // Writes still reach the loop device.
    if have("qemu-io") {
        qemu_io(&d.uri("a"), &["write -P 0x3c 0 1M"]);
        d.wait_lag_zero("a", LAG_TIMEOUT);
        assert!(same_bytes(
            &d.path("primary0.img"),
            Path::new(&loopdev),
            DEV_MIB << 20
        ));
    }
    // Released with the group: the other daemon may use it now.
    d.ok(&["remove", "a"]);
    other.create(
        "b",
        &Files {
            secondary: &loopdev,
            ..B
        }
        .table(),
    );
    other.ok(&["remove", "b"]);
    d.stop();
}

#[test]
fn remove_releases_the_claims_in_this_daemon_and_for_others() {
    let d = live_group();
    d.ok(&["remove", "a"]);
    // The same files again, here.
    d.create(
        "a",
        &two_site_table(DEV_MIB, 16, "async ios=100", 0, "open"),
    );
    d.ok(&["remove", "a"]);
    // And from another daemon: no lock is left behind.
    let other = Daemon::start();
    let abs = |f: &str| d.path(f).to_str().unwrap().to_string();
    other.create(
        "b",
        &Files {
            replog: &abs("replog.img"),
            mode: "open",
            primary: &abs("primary0.img"),
            secondary: &abs("secondary0.img"),
            dirty: &abs("slink1_dev0.dirty"),
        }
        .table(),
    );
    // Which now holds them: this daemon is refused.
    let err = refused(
        &d,
        "a",
        &two_site_table(DEV_MIB, 16, "async ios=100", 0, "open"),
    );
    assert!(err.contains("is locked by another process"), "{err}");
}

#[test]
fn a_restarted_daemon_gets_its_groups_back_without_refusal() {
    if !have("qemu-io") {
        return;
    }
    let mut d = Daemon::start();
    d.create("lv0", &two_site_table(8, 16, "async ios=100", 0, "create"));
    d.create("lv1", &two_site_table(8, 16, "async ios=100", 1, "open"));
    d.create(
        "other",
        &Files {
            replog: "o_replog.img",
            primary: "o_pri.img",
            secondary: "o_sec.img",
            dirty: "o.dirty",
            ..B
        }
        .table(),
    );
    qemu_io(&d.uri("lv1"), &["write -P 0x21 0 1M"]);
    for restart in ["stop", "kill -9"] {
        if restart == "stop" {
            assert!(d.stop().success(), "{}", d.log());
        } else {
            d.kill9();
        }
        d.spawn();
        let log = d.log();
        assert!(!log.contains("not restored"), "after {restart}:\n{log}");
        for name in ["lv0", "lv1", "other"] {
            assert!(
                names(&d).contains(&name.to_string()),
                "{name} after {restart}"
            );
        }
        qemu_io(&d.uri("lv1"), &["read -P 0x21 0 1M"]);
        assert_eq!(
            d.status("lv0")["replog"]["devices"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        // The restored claims hold again.
        let err = refused(
            &d,
            "b",
            &Files {
                primary: "o_pri.img",
                ..B
            }
            .table(),
        );
        assert!(err.contains("o_pri.img is device 0 of slink 0"), "{err}");
    }
}
