//! The NBD server against real clients: nbdinfo, qemu-io, fio's nbd engine, nbdcopy (libnbd).
//! Each test starts the server in-process on a loopback port over real files and checks both
//! what the client reports and the bytes in the backing file.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod nbd_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nbd_support::*;
use replicator::nbd::ServerConfig;

const MIB: u64 = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    server: TestServer,
    disk_path: PathBuf,
    _disk: Arc<FileExport>,
}

/// `disk0` (64 MiB, read-write, multi-conn), `ro0` (8 MiB read-only), `single` (8 MiB, no
/// multi-conn).
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("disk0.img");
    let mut exports = TestExports::default();
    let disk = exports.add("disk0", FileExport::create(&disk_path, 64 * MIB));
    exports.add(
        "ro0",
        FileExport::create(&dir.path().join("ro0.img"), 8 * MIB).read_only(),
    );
    exports.add(
        "single",
        FileExport::create(&dir.path().join("single.img"), 8 * MIB).single_conn(),
    );
    let server = start_tcp(exports, ServerConfig::default()).await;
    Fixture {
        dir,
        server,
        disk_path,
        _disk: disk,
    }
}

/// Reads `key: value` lines of nbdinfo's text output.
fn nbdinfo_field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .filter_map(|l| l.trim().split_once(": "))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.trim())
        .unwrap_or_else(|| panic!("{key} not in nbdinfo output:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_shows_size_flags_and_list() {
    require_bins!("nbdinfo");
    let f = fixture().await;
    let out = run_ok("nbdinfo", &[&f.server.uri("disk0")]).await;
    println!("{out}");
    assert!(nbdinfo_field(&out, "export-size").starts_with("67108864"));
    for (key, want) in [
        ("is_read_only", "false"),
        ("can_flush", "true"),
        ("can_fua", "true"),
        ("can_trim", "true"),
        ("can_zero", "true"),
        ("can_multi_conn", "true"),
        ("can_df", "true"),
        ("can_cache", "false"),
        ("can_fast_zero", "false"),
        ("block_size_minimum", "512"),
        ("block_size_preferred", "4096"),
        ("block_size_maximum", "33554432"),
    ] {
        assert_eq!(nbdinfo_field(&out, key), want, "{key}");
    }
    assert!(
        out.contains("base:allocation"),
        "meta context listed:\n{out}"
    );
    assert!(out.contains("using structured packets"), "{out}");

    let out = run_ok("nbdinfo", &[&f.server.uri("ro0")]).await;
    assert!(nbdinfo_field(&out, "export-size").starts_with("8388608"));
    assert_eq!(nbdinfo_field(&out, "is_read_only"), "true");
    let out = run_ok("nbdinfo", &[&f.server.uri("single")]).await;
    assert_eq!(nbdinfo_field(&out, "can_multi_conn"), "false");

    let out = run_ok("nbdinfo", &["--list", &f.server.uri("")]).await;
    println!("{out}");
    for name in ["disk0", "ro0", "single"] {
        assert!(
            out.contains(&format!("export=\"{name}\"")),
            "{name} listed:\n{out}"
        );
    }

    // `--map` drives NBD_CMD_BLOCK_STATUS on base:allocation: one data extent.
    let out = run_ok("nbdinfo", &["--map", &f.server.uri("disk0")]).await;
    println!("{out}");
    let first = out.lines().next().unwrap();
    let cols: Vec<&str> = first.split_whitespace().collect();
    assert_eq!(&cols[..3], &["0", "67108864", "0"], "{out}");

    // Unknown export: a clean error, not a hang.
    let (ok, _, err) = run("nbdinfo", &[&f.server.uri("nope")]).await;
    assert!(!ok);
    println!("{err}");
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_over_unix_socket() {
    require_bins!("nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let mut exports = TestExports::default();
    exports.add(
        "u0",
        FileExport::create(&dir.path().join("u0.img"), 4 * MIB),
    );
    let sock = dir.path().join("nbd.sock");
    let server = start_unix(exports, ServerConfig::default(), &sock).await;
    let uri = format!("nbd+unix:///u0?socket={}", sock.display());
    let out = run_ok("nbdinfo", &[&uri]).await;
    assert!(nbdinfo_field(&out, "export-size").starts_with("4194304"));
    server.stop().await;
}

fn qemu_io_args<'a>(uri: &'a str, cmds: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    args
}

async fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let out = run_ok("qemu-io", &qemu_io_args(uri, cmds)).await;
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("error"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_then_verify_patterns() {
    require_bins!("qemu-io");
    let f = fixture().await;
    let uri = f.server.uri("disk0");
    // (pattern, offset, length): aligned, large, unaligned start and end, crossing blocks.
    let cases: [(u8, u64, u64); 7] = [
        (0x11, 0, 4096),
        (0x22, 65536, 1 << 20),
        (0x33, 3 * MIB + 1000, 3000),
        (0x44, 5 * MIB + 511, 1),
        (0x55, 7 * MIB + 100, 70_000),
        (0x66, 64 * MIB - 4096, 4096),
        (0x77, 10 * MIB, 8 * MIB),
    ];
    let writes: Vec<String> = cases
        .iter()
        .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    qemu_io(&uri, &writes).await;
    // Verify through a second connection, then the bytes in the file itself.
    let reads: Vec<String> = cases
        .iter()
        .map(|(p, o, l)| format!("read -P {p:#x} {o} {l}"))
        .collect();
    let out = qemu_io(&uri, &reads).await;
    assert_eq!(out.matches("read ").count(), cases.len(), "{out}");
    for (p, o, l) in cases {
        let bytes = read_file_at(&f.disk_path, o, l as usize);
        assert!(bytes.iter().all(|b| *b == p), "file content at {o}+{l}");
    }
    // Neighbours of the unaligned writes are untouched (read-modify-write kept them).
    assert_eq!(
        read_file_at(&f.disk_path, 3 * MIB + 500, 500),
        vec![0u8; 500]
    );
    assert_eq!(
        read_file_at(&f.disk_path, 3 * MIB + 4000, 96),
        vec![0u8; 96]
    );
    assert_eq!(read_file_at(&f.disk_path, 5 * MIB + 510, 1), vec![0u8]);
    assert_eq!(read_file_at(&f.disk_path, 5 * MIB + 512, 1), vec![0u8]);

    // Writes to the read-only export fail cleanly in the client.
    let (ok, out, err) = run(
        "qemu-io",
        &qemu_io_args(&f.server.uri("ro0"), &["write -P 1 0 4096".to_string()]),
    )
    .await;
    assert!(
        !ok || out.contains("failed") || err.contains("read-only") || err.contains("denied"),
        "write to a read-only export must fail\n{out}\n{err}"
    );
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_zeroes_discard_flush() {
    require_bins!("qemu-io");
    let f = fixture().await;
    let uri = f.server.uri("disk0");
    qemu_io(
        &uri,
        &[
            "write -P 0xcd 0 4M".to_string(),
            "flush".to_string(),
            // Zero without unmap (NBD_CMD_FLAG_NO_HOLE), zero with unmap allowed.
            "write -z 0 64k".to_string(),
            "write -z -u 1M 128k".to_string(),
            "discard 2M 1M".to_string(),
            "write -z -f 3M 4k".to_string(),
            "write -f -P 0xef 3149824 4k".to_string(),
            "flush".to_string(),
            "read -P 0 0 64k".to_string(),
            "read -P 0xcd 64k 960k".to_string(),
            "read -P 0 1M 128k".to_string(),
            "read -P 0 3M 4k".to_string(),
            "read -P 0xef 3149824 4k".to_string(),
        ],
    )
    .await;
    assert_eq!(read_file_at(&f.disk_path, 0, 65536), vec![0u8; 65536]);
    assert_eq!(read_file_at(&f.disk_path, 65536, 4096), vec![0xcdu8; 4096]);
    assert_eq!(read_file_at(&f.disk_path, MIB, 131072), vec![0u8; 131072]);
    let s = f.server.stats.snapshot();
    assert!(s.requests_write_zeroes_total >= 3, "{s:?}");
    assert!(s.requests_trim_total >= 1, "{s:?}");
    assert!(s.requests_flush_total >= 2, "{s:?}");
    assert_eq!(s.errors_total, 0, "{s:?}");
    f.server.stop().await;
}

fn fio_has_nbd() -> bool {
    std::process::Command::new("fio")
        .arg("--enghelp")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "nbd")
        })
        .unwrap_or(false)
}

async fn fio(uri: &str, extra: &[&str]) -> String {
    let mut args = vec!["--name=nbdtest", "--ioengine=nbd", "--output-format=normal"];
    let uri_arg = format!("--uri={uri}");
    args.push(&uri_arg);
    args.extend_from_slice(extra);
    let (ok, out, err) = run("fio", &args).await;
    assert!(ok, "fio failed\n{out}\n{err}");
    assert!(!out.contains("verify: bad"), "{out}");
    assert!(out.contains("err= 0"), "fio reported errors:\n{out}\n{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_verifies_crc32c() {
    require_bins!("fio");
    if !fio_has_nbd() {
        println!("SKIP: this fio has no nbd ioengine (fio --enghelp does not list it)");
        return;
    }
    let f = fixture().await;
    let uri = f.server.uri("disk0");
    // Random 4 KiB writes at QD32, then verification of every block written.
    fio(
        &uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    )
    .await;
    // Sequential 1 MiB writes at QD16 with verification (exercises large payloads).
    fio(
        &uri,
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=16",
            "--size=48M",
            "--offset=16M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    )
    .await;
    // Four jobs = four connections on disjoint quarters (multi-conn), mixed read/write.
    fio(
        &uri,
        &[
            "--rw=randrw",
            "--bs=16k",
            "--iodepth=8",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
        ],
    )
    .await;
    let s = f.server.stats.snapshot();
    assert!(s.connections_total >= 6, "{s:?}");
    assert_eq!(s.errors_total, 0, "{s:?}");
    assert_eq!(s.protocol_violations_total, 0, "{s:?}");
    f.server.stop().await;
}

fn write_random_file(path: &Path, len: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|i| ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 29) as u8)
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_multi_conn_round_trip_and_concurrent_clients() {
    require_bins!("nbdcopy", "qemu-io");
    let f = fixture().await;
    let uri = f.server.uri("disk0");
    let src = f.dir.path().join("src.img");
    let data = write_random_file(&src, 64 * MIB as usize);
    // nbdcopy uses several connections when the server advertises multi-conn.
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            "--requests=16",
            src.to_str().unwrap(),
            &uri,
        ],
    )
    .await;
    // nbdcopy opens one extra connection to probe the server before copying.
    let conns = f.server.stats.snapshot().connections_total;
    assert!(conns >= 4, "nbdcopy used multi-conn: {conns} connections");
    assert!(
        std::fs::read(&f.disk_path).unwrap() == data,
        "file content after nbdcopy"
    );
    let back = f.dir.path().join("back.img");
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--threads=4",
            &uri,
            back.to_str().unwrap(),
        ],
    )
    .await;
    assert!(std::fs::read(&back).unwrap() == data, "round trip");

    // Several independent clients at once, each on its own region.
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let uri = uri.clone();
        tasks.push(tokio::spawn(async move {
            let off = i * 8 * MIB;
            let p = 0x10 + i as u8;
            qemu_io(
                &uri,
                &[
                    format!("write -P {p:#x} {off} 4M"),
                    format!("read -P {p:#x} {off} 4M"),
                ],
            )
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for i in 0..6u64 {
        let bytes = read_file_at(&f.disk_path, i * 8 * MIB, 4 * MIB as usize);
        assert!(bytes.iter().all(|b| *b == 0x10 + i as u8), "region {i}");
    }
    assert_eq!(f.server.stats.snapshot().errors_total, 0);
    f.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdfuse_mkfs_ext4_and_fsck() {
    require_bins!("nbdfuse", "fusermount3", "mkfs.ext4", "e2fsck");
    if !Path::new("/dev/fuse").exists() {
        println!("SKIP: /dev/fuse missing, nbdfuse cannot mount");
        return;
    }
    let f = fixture().await;
    let mnt = f.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut fuse = tokio::process::Command::new("nbdfuse")
        .args([mnt.to_str().unwrap(), &f.server.uri("disk0")])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let image = mnt.join("nbd");
    for _ in 0..100 {
        if image.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(image.exists(), "nbdfuse did not expose {}", image.display());
    let img = image.to_str().unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", img]).await;
    let out = run_ok("e2fsck", &["-f", "-n", img]).await;
    println!("{out}");
    run_ok("fusermount3", &["-u", mnt.to_str().unwrap()]).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), fuse.wait()).await;
    // The file system's superblock magic (0xEF53 at byte 1080) is in the backing file.
    assert_eq!(read_file_at(&f.disk_path, 1080, 2), vec![0x53, 0xef]);
    let s = f.server.stats.snapshot();
    assert_eq!(s.errors_total, 0, "{s:?}");
    f.server.stop().await;
}
