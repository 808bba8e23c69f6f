//! Two daemons, real TCP, NBD clients: a primary ships its two-device group over a `tcp` slink to
//! a secondary daemon; every test ends with both sites byte-equal and nothing acknowledged lost.
//! Links run over loopback, directly or through the in-repo link emulator (this machine has no
//! sch_netem); each test prints which.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use slink::linkemu::{LinkEmulator, LinkParams};

const DEV_MIB: u64 = 32;
const LAG_TIMEOUT: Duration = Duration::from_secs(120);
const KEY: &str = "correct horse battery staple 0123456789";

fn primary_table(dev: u32, mode: &str, link: &str) -> String {
    let size = if mode == "open" {
        String::new()
    } else {
        format!(" {}", 64 * 2048)
    };
    let n = if mode == "open" { 3 } else { 4 };
    format!(
        "0 {} replicator default {n} prep.img 0 {mode}{size} \
         local 2 0 async 2 {dev} pdev{dev}.img - 0 \
         tcp 3 1 async {link} 2 {dev} dev{dev} disk 3 128 s1-dev{dev}.dirty nosync\n",
        DEV_MIB * 2048
    )
}

fn secondary_table(dev: u32, mode: &str, mib: u64) -> String {
    let size = if mode == "open" {
        String::new()
    } else {
        format!(" {}", 64 * 2048)
    };
    let n = if mode == "open" { 3 } else { 4 };
    format!(
        "0 {} replicator default {n} srep.img 0 {mode}{size} local 2 0 async 2 {dev} sdev{dev}.img - 0\n",
        mib * 2048
    )
}

struct Sites {
    p: Daemon,
    s: Daemon,
    emu: Option<(tokio::runtime::Runtime, Arc<LinkEmulator>)>,
    /// The address the primary's table names (the secondary, or the emulator in front of it).
    link: String,
}

fn write_key(dir: &std::path::Path, key: &str) {
    std::fs::write(dir.join("key"), key).unwrap();
}

/// A running receiving daemon: site `site_id` listening for slinks at `listen`, allowing `allow`.
fn receiving_site(site_id: &str, listen: &str, allow: &str) -> Daemon {
    let mut d = Daemon::prepare(&[
        "--site-id",
        site_id,
        "--psk-file",
        "{dir}/key",
        "--slink-listen",
        listen,
        "--allow",
        allow,
    ]);
    write_key(&d.dir, KEY);
    d.spawn();
    d
}

/// The in-repo link emulator in front of `upstream`; returns its address and what keeps it
/// running.
fn emulated_link(
    upstream: &str,
    params: LinkParams,
) -> (String, (tokio::runtime::Runtime, Arc<LinkEmulator>)) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let eport = free_port();
    let e = rt
        .block_on(LinkEmulator::start(
            format!("127.0.0.1:{eport}").parse::<SocketAddr>().unwrap(),
            upstream.to_string(),
            params,
        ))
        .unwrap();
    (format!("127.0.0.1:{eport}"), (rt, Arc::new(e)))
}

/// A secondary daemon, then a primary whose link goes directly or through the emulator.
fn sites(emulated: Option<LinkParams>, primary_key: &str, allow: &str) -> Sites {
    let listen = format!("127.0.0.1:{}", free_port());
    let s = receiving_site("siteB", &listen, allow);
    let (link, emu) = match emulated {
        None => {
            eprintln!("link path: direct loopback TCP");
            (listen.clone(), None)
        }
        Some(params) => {
            eprintln!(
                "link path: in-repo link emulator (slink::linkemu) over loopback TCP: {params:?}"
            );
            let (link, emu) = emulated_link(&listen, params);
            (link, Some(emu))
        }
    };
    let peer = format!("siteB@{link}");
    let mut p = Daemon::prepare(&[
        "--site-id",
        "siteA",
        "--psk-file",
        "{dir}/key",
        "--peer",
        &peer,
    ]);
    write_key(&p.dir, primary_key);
    p.spawn();
    Sites { p, s, emu, link }
}

fn link_of(sites: &Sites) -> String {
    sites.link.clone()
}

fn create_group(sites: &Sites, sec_mib: u64) {
    let link = link_of(sites);
    sites.s.ok(&[
        "create",
        "--secondary",
        "dev0",
        &write_table(&sites.s, "s0", &secondary_table(0, "create", sec_mib)),
    ]);
    sites.s.ok(&[
        "create",
        "--secondary",
        "dev1",
        &write_table(&sites.s, "s1", &secondary_table(1, "open", sec_mib)),
    ]);
    sites.p.ok(&[
        "create",
        "dev0",
        &write_table(&sites.p, "p0", &primary_table(0, "create", &link)),
    ]);
    sites.p.ok(&[
        "create",
        "dev1",
        &write_table(&sites.p, "p1", &primary_table(1, "open", &link)),
    ]);
}

fn write_table(d: &Daemon, name: &str, text: &str) -> String {
    let p = d.dir.join(format!("{name}.table"));
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn fio_randwrite(uri: &str, mib: u64, seed: u64) -> std::process::Output {
    Command::new("fio")
        .args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--size={}m", DEV_MIB),
            &format!("--io_size={mib}m"),
            &format!("--randseed={seed}"),
            "--output-format=terse",
        ])
        .output()
        .unwrap()
}

/// Wait until the primary's tcp slink has everything (lag 0, nothing dirty) and the secondary
/// has applied all it stored; then every device must be byte-equal at both sites.
fn converge_and_compare(sites: &Sites) {
    for dev in ["dev0", "dev1"] {
        sites.p.wait_lag_zero(dev, LAG_TIMEOUT);
        sites.s.wait_lag_zero(dev, LAG_TIMEOUT);
    }
    let pl = sites.p.status("dev0")["replog"]["last_lsn"]
        .as_u64()
        .unwrap();
    let sl = sites.s.status("dev0")["replog"]["last_lsn"]
        .as_u64()
        .unwrap();
    assert_eq!(pl, sl, "the secondary holds the primary's last lsn");
    for d in 0..2 {
        assert!(
            same_bytes(
                &sites.p.path(&format!("pdev{d}.img")),
                &sites.s.path(&format!("sdev{d}.img")),
                DEV_MIB << 20
            ),
            "device {d} differs between the sites\nprimary log:\n{}\nsecondary log:\n{}",
            sites.p.log(),
            sites.s.log()
        );
    }
}

fn have_tools() -> bool {
    have("fio") && have("qemu-io")
}

#[test]
fn random_writes_reach_the_secondary_byte_equal() {
    if !have_tools() {
        return;
    }
    let sites = sites(None, KEY, "siteA");
    create_group(&sites, DEV_MIB);
    for (dev, seed) in [("dev0", 1), ("dev1", 2)] {
        let o = fio_randwrite(&sites.p.uri(dev), 16, seed);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    converge_and_compare(&sites);
    let st = sites.p.status("dev0");
    assert_eq!(st["slinks"][1]["link"]["state"], "up", "{st:#}");
    // The secondary's export is read-only: a write is refused (EPERM).
    let o = Command::new("qemu-io")
        .args(["-f", "raw", &sites.s.uri("dev0"), "-c", "write 0 4k"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let text = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("Permission denied") || text.contains("read-only") || text.contains("EPERM"),
        "{text}"
    );
    let o = must(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        &sites.s.uri("dev0"),
        "-c",
        "read 0 4k",
    ]));
    assert!(o.contains("read 4096/4096"), "{o}");
    // Removing the group ends its link: the link's thread goes with it.
    let pid = sites.p.child.as_ref().unwrap().id();
    assert!(
        thread_nice(pid, "slink1-tcp").is_some(),
        "link thread while the group runs"
    );
    sites.p.ok(&["remove", "dev1"]);
    sites.p.ok(&["remove", "dev0"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while thread_nice(pid, "slink1-tcp").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the link thread outlived its group"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_partition_heals_and_the_sites_converge() {
    if !have_tools() {
        return;
    }
    let sites = sites(
        Some(LinkParams {
            delay: Duration::from_millis(5),
            ..Default::default()
        }),
        KEY,
        "siteA",
    );
    create_group(&sites, DEV_MIB);
    let (_, emu) = sites.emu.as_ref().unwrap();
    let o = fio_randwrite(&sites.p.uri("dev0"), 4, 3);
    assert!(o.status.success());
    assert_eq!(
        emu.apply("partition 4s").split_whitespace().next(),
        Some("ok"),
        "partition command"
    );
    let started = Instant::now();
    for (dev, seed) in [("dev0", 4), ("dev1", 5)] {
        let o = fio_randwrite(&sites.p.uri(dev), 8, seed);
        assert!(o.status.success(), "writes continue during the partition");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "async writes did not wait for the partitioned site"
    );
    converge_and_compare(&sites);
    let st = sites.p.status("dev0");
    assert!(
        st["slinks"][1]["link"]["sessions"].as_u64().unwrap() >= 2,
        "reconnected: {st:#}"
    );
}

#[test]
fn kill_9_of_the_secondary_mid_stream() {
    if !have_tools() {
        return;
    }
    let mut sites = sites(None, KEY, "siteA");
    create_group(&sites, DEV_MIB);
    let uri = sites.p.uri("dev0");
    let writer = std::thread::spawn(move || fio_randwrite(&uri, 24, 6));
    std::thread::sleep(Duration::from_millis(700));
    sites.s.kill9();
    std::thread::sleep(Duration::from_millis(500));
    sites.s.spawn();
    assert!(writer.join().unwrap().status.success());
    let o = fio_randwrite(&sites.p.uri("dev1"), 4, 7);
    assert!(o.status.success());
    converge_and_compare(&sites);
}

/// Writes recorded as acknowledged before a kill -9 of the primary are there after its restart,
/// at both sites.
#[test]
fn kill_9_of_the_primary_mid_stream_loses_nothing_acknowledged() {
    if !have_tools() {
        return;
    }
    let mut sites = sites(None, KEY, "siteA");
    create_group(&sites, DEV_MIB);
    let acked: Arc<Mutex<Vec<(String, u64, u8)>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (a2, s2, port) = (acked.clone(), stop.clone(), sites.p.nbd_port);
    let writer = std::thread::spawn(move || {
        let mut i: u64 = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let dev = if i.is_multiple_of(2) { "dev0" } else { "dev1" };
            let off = (i * 64 * 1024) % (DEV_MIB << 20);
            let pat = (i % 250 + 1) as u8;
            let o = Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    &format!("nbd://127.0.0.1:{port}/{dev}"),
                    "-c",
                    &format!("write -P {pat} {off} 64k"),
                ])
                .output()
                .unwrap();
            if o.status.success() {
                a2.lock().unwrap().push((dev.to_string(), off, pat));
            }
            i += 1;
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    sites.p.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    sites.p.spawn();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 5,
        "some writes were acknowledged before the kill"
    );
    // Last acknowledged pattern per (device, offset).
    let mut last = std::collections::BTreeMap::new();
    for (dev, off, pat) in &acked {
        last.insert((dev.clone(), *off), *pat);
    }
    for ((dev, off), pat) in &last {
        let out = must(Command::new("qemu-io").args([
            "-f",
            "raw",
            &sites.p.uri(dev),
            "-c",
            &format!("read -P {pat} {off} 64k"),
        ]));
        assert!(!out.contains("verification failed"), "{dev} {off}: {out}");
    }
    converge_and_compare(&sites);
}

#[test]
fn a_corrupted_byte_on_the_wire_is_caught_and_resent() {
    if !have_tools() {
        return;
    }
    let sites = sites(
        Some(LinkParams {
            corrupt_every_bytes: Some(5 << 20),
            ..Default::default()
        }),
        KEY,
        "siteA",
    );
    create_group(&sites, DEV_MIB);
    for (dev, seed) in [("dev0", 8), ("dev1", 9)] {
        let o = fio_randwrite(&sites.p.uri(dev), 12, seed);
        assert!(o.status.success());
    }
    converge_and_compare(&sites);
    let st = sites.p.status("dev0");
    assert!(
        st["slinks"][1]["link"]["sessions"].as_u64().unwrap() >= 2,
        "the corrupt frame closed a session: {st:#}"
    );
    assert!(
        sites.s.log().contains("crc"),
        "the secondary logged the crc error"
    );
}

fn refused_with(sites: &Sites, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = sites.p.status("dev0");
        let err = st["slinks"][1]["link"]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if err.contains(needle) {
            eprintln!("refused as expected: {err}");
            assert_ne!(st["slinks"][1]["link"]["state"], "up");
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "expected a refusal containing `{needle}`, status: {st:#}\nsecondary log:\n{}",
                sites.s.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_peer_with_the_wrong_key_is_refused() {
    let sites = sites(None, "this is not the key that siteB has", "siteA");
    create_group(&sites, DEV_MIB);
    refused_with(&sites, "auth");
}

#[test]
fn a_peer_without_an_allow_entry_is_refused() {
    let sites = sites(None, KEY, "siteC");
    create_group(&sites, DEV_MIB);
    refused_with(&sites, "allow");
}

#[test]
fn a_peer_with_other_device_sizes_is_refused() {
    let sites = sites(None, KEY, "siteA");
    let link = link_of(&sites);
    sites.s.ok(&[
        "create",
        "--secondary",
        "dev0",
        &write_table(&sites.s, "s0", &secondary_table(0, "create", DEV_MIB / 2)),
    ]);
    sites.p.ok(&[
        "create",
        "dev0",
        &write_table(&sites.p, "p0", &primary_table(0, "create", &link)),
    ]);
    refused_with(&sites, "size differs");
}

#[test]
fn a_peer_of_another_group_is_refused() {
    let sites = sites(None, KEY, "siteA");
    create_group(&sites, DEV_MIB);
    sites.p.wait_lag_zero("dev0", LAG_TIMEOUT);
    // The primary's group is recreated: a new replog, a new group uuid.
    sites.p.ok(&["remove", "dev1"]);
    sites.p.ok(&["remove", "dev0"]);
    std::fs::remove_file(sites.p.path("prep.img")).unwrap();
    let link = link_of(&sites);
    sites.p.ok(&[
        "create",
        "dev0",
        &write_table(&sites.p, "p0", &primary_table(0, "create", &link)),
    ]);
    refused_with(&sites, "group uuid mismatch");
}

/// A one-device group whose slink 1 has the given policy, over the emulator.
fn policy_sites(policy: &str, params: LinkParams, ring_mib: u64) -> Sites {
    let sites = sites(Some(params), KEY, "siteA");
    sites.s.ok(&[
        "create",
        "--secondary",
        "dev0",
        &write_table(&sites.s, "s0", &secondary_table(0, "create", DEV_MIB)),
    ]);
    let n = 3 + policy.split_whitespace().count() - 1;
    let table = format!(
        "0 {} replicator default 4 prep.img 0 create {} local 2 0 async 2 0 pdev0.img - 0 \
         tcp {n} 1 {policy} {} 2 0 dev0 disk 3 128 s1-dev0.dirty nosync\n",
        DEV_MIB * 2048,
        ring_mib * 2048,
        sites.link
    );
    sites
        .p
        .ok(&["create", "dev0", &write_table(&sites.p, "p0", &table)]);
    // Wait for the link.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sites.p.status("dev0")["slinks"][1]["link"]["state"] != "up" {
        assert!(
            Instant::now() < deadline,
            "link did not come up: {}",
            sites.p.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sites
}

fn qemu_write(uri: &str, cmd: &str) -> Duration {
    let t = Instant::now();
    must(Command::new("qemu-io").args(["-f", "raw", uri, "-c", cmd]));
    t.elapsed()
}

#[test]
fn a_sync_site_has_every_acknowledged_write() {
    if !have_tools() {
        return;
    }
    let sites = policy_sites(
        "sync",
        LinkParams {
            delay: Duration::from_millis(20),
            ..Default::default()
        },
        64,
    );
    for i in 0..10u64 {
        qemu_write(
            &sites.p.uri("dev0"),
            &format!("write -P {} {}k 4k", i + 1, i * 64),
        );
        let p = sites.p.status("dev0")["replog"]["last_lsn"]
            .as_u64()
            .unwrap();
        let s = sites.s.status("dev0")["replog"]["last_lsn"]
            .as_u64()
            .unwrap();
        assert!(
            s >= p,
            "write {i} acknowledged before the sync site stored it: primary {p}, secondary {s}"
        );
    }
    assert_eq!(sites.p.status("dev0")["slinks"][1]["mode"], "sync");
}

/// `timeout=1s`: an async site cut off for longer than a second turns sync (writes then wait for
/// it, bounding the RPO), and turns async again once it has caught up.
#[test]
fn fallbehind_timeout_turns_an_async_site_sync_and_back() {
    if !have_tools() {
        return;
    }
    let sites = policy_sites("async timeout=1s", LinkParams::default(), 64);
    let (_, emu) = sites.emu.as_ref().unwrap();
    let uri = sites.p.uri("dev0");
    assert_eq!(sites.p.status("dev0")["slinks"][1]["mode"], "async");
    assert!(emu.apply("partition on").starts_with("ok"));
    let quick = qemu_write(&uri, "write -P 1 0 4k");
    assert!(
        quick < Duration::from_secs(1),
        "an async write waited for a cut-off site: {quick:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while sites.p.status("dev0")["slinks"][1]["mode"] != "sync" {
        assert!(
            Instant::now() < deadline,
            "did not turn sync: {:#}",
            sites.p.status("dev0")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ev = sites.p.ok(&["wait", "dev0", "0"]);
    assert!(ev.trim().parse::<u64>().unwrap() > 0);
    // Now a write waits for the site: it finishes only after the link heals.
    let uri2 = uri.clone();
    let writer = std::thread::spawn(move || qemu_write(&uri2, "write -P 2 8k 4k"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !writer.is_finished(),
        "a write in sync mode finished while the site was cut off"
    );
    assert!(emu.apply("heal").starts_with("ok"));
    let waited = writer.join().unwrap();
    assert!(waited >= Duration::from_millis(1400), "{waited:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while sites.p.status("dev0")["slinks"][1]["mode"] != "async" {
        assert!(Instant::now() < deadline, "did not turn async again");
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = sites.p.status("dev0");
    let line = sites.p.ok(&["status", "dev0"]);
    assert!(line.contains("async"), "{line} {st:#}");
}

/// `stall`: entries are never dropped for the site; when the ring is full, writes wait for it.
#[test]
fn a_stall_site_makes_writes_wait_when_the_ring_is_full() {
    if !have_tools() {
        return;
    }
    let sites = policy_sites("stall", LinkParams::default(), 4);
    let (_, emu) = sites.emu.as_ref().unwrap();
    assert!(emu.apply("partition on").starts_with("ok"));
    let uri = sites.p.uri("dev0");
    let writer = std::thread::spawn(move || {
        for i in 0..8u64 {
            qemu_write(&uri, &format!("write -P {} {}M 1M", i + 1, i));
        }
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !writer.is_finished(),
        "8 MiB went through a 4 MiB ring while the stall site was cut off"
    );
    let st = sites.p.status("dev0");
    assert_eq!(
        st["slinks"][1]["dirty_bytes"].as_u64(),
        Some(0),
        "stall never drops: {st:#}"
    );
    assert!(emu.apply("heal").starts_with("ok"));
    writer.join().unwrap();
    sites.p.wait_lag_zero("dev0", LAG_TIMEOUT);
    sites.s.wait_lag_zero("dev0", LAG_TIMEOUT);
    assert!(same_bytes(
        &sites.p.path("pdev0.img"),
        &sites.s.path("sdev0.img"),
        DEV_MIB << 20
    ));
}

/// The nice value of the thread of process `pid` named `name` (from /proc).
fn thread_nice(pid: u32, name: &str) -> Option<i64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after "(comm) ": state is field 3 of stat(5), nice is field 19.
        let rest = &stat[stat.rfind(')')? + 2..];
        return rest.split(' ').nth(19 - 3)?.parse().ok();
    }
    None
}

/// The seed's "Sync Mirror + Async Replication": one group shipping to a near sync site and a far
/// async site (50 ms one-way through the emulator), each with its own lag.
#[test]
fn fan_out_to_a_near_sync_site_and_a_far_async_site() {
    if !have_tools() {
        return;
    }
    let near_listen = format!("127.0.0.1:{}", free_port());
    let far_listen = format!("127.0.0.1:{}", free_port());
    let near = receiving_site("near", &near_listen, "siteA");
    let far = receiving_site("far", &far_listen, "siteA");
    eprintln!("link path: near = direct loopback TCP; far = in-repo link emulator, 50 ms one-way");
    let (far_link, _emu) = emulated_link(
        &far_listen,
        LinkParams {
            delay: Duration::from_millis(50),
            ..Default::default()
        },
    );
    let peers = [format!("near@{near_listen}"), format!("far@{far_link}")];
    let mut p = Daemon::prepare(&[
        "--site-id",
        "siteA",
        "--psk-file",
        "{dir}/key",
        "--peer",
        &peers[0],
        "--peer",
        &peers[1],
    ]);
    write_key(&p.dir, KEY);
    p.spawn();
    for d in [&near, &far] {
        d.ok(&[
            "create",
            "--secondary",
            "dev0",
            &write_table(d, "s0", &secondary_table(0, "create", DEV_MIB)),
        ]);
    }
    let table = format!(
        "0 {} replicator default 4 prep.img 0 create {} local 2 0 async 2 0 pdev0.img - 0 \
         tcp 3 1 sync {near_listen} 2 0 dev0 - 0 \
         tcp 4 2 async ios=100000 {far_link} 2 0 dev0 disk 3 128 s2-dev0.dirty nosync\n",
        DEV_MIB * 2048,
        64 * 2048
    );
    p.ok(&["create", "dev0", &write_table(&p, "p0", &table)]);
    let o = fio_randwrite(&p.uri("dev0"), 16, 11);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = p.status("dev0");
    assert_eq!(st["slinks"][1]["mode"], "sync");
    assert_eq!(
        st["slinks"][1]["lag_ios"].as_u64(),
        Some(0),
        "the sync site has every acknowledged write: {st:#}"
    );
    assert_eq!(st["slinks"][2]["mode"], "async");
    // Each link ships from a thread of its own; the async site's runs at a lower priority (the
    // application's writes come first), the sync site's at the normal one (it is on their path).
    let pid = p.child.as_ref().unwrap().id();
    assert_eq!(
        thread_nice(pid, "slink1-tcp"),
        Some(0),
        "sync site's link thread"
    );
    assert_eq!(
        thread_nice(pid, "slink2-tcp"),
        Some(10),
        "async site's link thread"
    );
    p.wait_lag_zero("dev0", LAG_TIMEOUT);
    for d in [&near, &far] {
        d.wait_lag_zero("dev0", LAG_TIMEOUT);
        assert!(same_bytes(
            &p.path("pdev0.img"),
            &d.path("sdev0.img"),
            DEV_MIB << 20
        ));
    }
}

/// A primary device that already holds data, a `sync` dirty log (every region dirty) with regions
/// larger than a frame: the whole device is copied to the secondary in pieces.
#[test]
fn initial_full_resync_copies_existing_data() {
    let sites = sites(None, KEY, "siteA");
    sites.s.ok(&[
        "create",
        "--secondary",
        "dev0",
        &write_table(&sites.s, "s0", &secondary_table(0, "create", DEV_MIB)),
    ]);
    let data: Vec<u8> = (0..(DEV_MIB << 20))
        .map(|i| ((i * 2_654_435_761u64) >> 13) as u8)
        .collect();
    std::fs::write(sites.p.path("pdev0.img"), &data).unwrap();
    let table = format!(
        "0 {} replicator default 4 prep.img 0 create {} local 2 0 async 2 0 pdev0.img - 0 \
         tcp 3 1 async {} 2 0 dev0 disk 3 32768 s1-dev0.dirty sync\n",
        DEV_MIB * 2048,
        64 * 2048,
        sites.link
    );
    sites
        .p
        .ok(&["create", "dev0", &write_table(&sites.p, "p0", &table)]);
    let st = sites.p.status("dev0");
    assert!(
        st["slinks"][1]["dirty_bytes"].as_u64().unwrap() > 0,
        "{st:#}"
    );
    sites.p.wait_lag_zero("dev0", LAG_TIMEOUT);
    sites.s.wait_lag_zero("dev0", LAG_TIMEOUT);
    assert!(same_bytes(
        &sites.p.path("pdev0.img"),
        &sites.s.path("sdev0.img"),
        DEV_MIB << 20
    ));
}

/// The ring overflows while the link is cut: the async site's regions go dirty; after the link
/// heals, a resync over TCP repairs them and the sites are byte-equal.
#[test]
fn overflow_while_partitioned_is_repaired_by_resync_over_tcp() {
    if !have_tools() {
        return;
    }
    let sites = policy_sites("async", LinkParams::default(), 4);
    let (_, emu) = sites.emu.as_ref().unwrap();
    assert!(emu.apply("partition on").starts_with("ok"));
    let o = fio_randwrite(&sites.p.uri("dev0"), 24, 12);
    assert!(
        o.status.success(),
        "writes go on while the async site is cut off: {}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        sites.p.log()
    );
    let st = sites.p.status("dev0");
    assert!(
        st["slinks"][1]["dirty_bytes"].as_u64().unwrap() > 0,
        "the 4 MiB ring overflowed: {st:#}"
    );
    assert!(emu.apply("heal").starts_with("ok"));
    sites.p.wait_lag_zero("dev0", LAG_TIMEOUT);
    sites.s.wait_lag_zero("dev0", LAG_TIMEOUT);
    assert!(same_bytes(
        &sites.p.path("pdev0.img"),
        &sites.s.path("sdev0.img"),
        DEV_MIB << 20
    ));
}
