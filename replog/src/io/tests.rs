//! The io test suite, run against both backends (`uring::*` and `pwrite::*`).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::*;

/// A scratch directory on the machine's temp file system (ext4 on the CI/dev machines, where
/// O_DIRECT works; see `tmpfs_direct_or_buffered` for tmpfs).
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("replog-io-test")
        .tempdir()
        .unwrap()
}

/// True for file systems known to support O_DIRECT on regular files.
fn fs_supports_direct(dir: &Path) -> bool {
    const EXT4_SUPER_MAGIC: i64 = 0xEF53;
    const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683E;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs fills the zeroed struct we pass; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut st) };
    assert_eq!(rc, 0);
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's width differs between targets"
    )]
    let kind = st.f_type as i64;
    matches!(kind, EXT4_SUPER_MAGIC | XFS_SUPER_MAGIC | BTRFS_SUPER_MAGIC)
}

fn opts(backend: Backend, direct: bool) -> IoOptions {
    IoOptions {
        backend,
        direct,
        ..IoOptions::default()
    }
}

fn pattern(len: usize, seed: u8) -> AlignedBuf {
    let mut buf = AlignedBuf::zeroed(len);
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    buf
}

fn open_new(dir: &Path, backend: Backend, direct: bool) -> (IoFile, PathBuf) {
    let path = dir.join("log");
    let file = IoFile::open(&path, true, &opts(backend, direct)).unwrap();
    assert_eq!(file.backend(), backend, "backend forced by the test");
    (file, path)
}

fn round_trip_direct(backend: Backend) {
    let dir = scratch();
    let (file, _) = open_new(dir.path(), backend, true);
    if fs_supports_direct(dir.path()) {
        assert!(
            file.is_direct(),
            "O_DIRECT must be used on this file system"
        );
    }
    let align = file.alignment();
    assert!(align >= 512 && align.is_power_of_two());
    file.preallocate_zeroed(0, 1 << 20).unwrap();
    assert_eq!(file.len().unwrap(), 1 << 20);
    let a = pattern(4096, 1);
    let b = pattern(64 * 1024, 2);
    let bufs = file
        .submit(IoBatch {
            writes: vec![(0, a.clone()), (8192, b.clone())],
            sync_after: true,
        })
        .wait()
        .unwrap();
    assert_eq!(
        bufs,
        vec![a.clone(), b.clone()],
        "buffers come back in order"
    );
    assert_eq!(file.read_at(0, AlignedBuf::zeroed(4096)).unwrap(), a);
    assert_eq!(
        file.read_at(8192, AlignedBuf::zeroed(64 * 1024)).unwrap(),
        b
    );
    let gap = file.read_at(4096, AlignedBuf::zeroed(4096)).unwrap();
    assert!(gap.iter().all(|&x| x == 0), "preallocated bytes are zero");
}

fn round_trip_buffered(backend: Backend) {
    let dir = scratch();
    let (file, path) = open_new(dir.path(), backend, false);
    assert!(!file.is_direct());
    assert_eq!(file.alignment(), ALIGNMENT_MIN);
    let data = pattern(1536, 7);
    file.write_at(512, data.clone()).unwrap();
    file.sync_data().unwrap();
    assert_eq!(file.read_at(512, AlignedBuf::zeroed(1536)).unwrap(), data);
    // Really on disk, seen through an independent reader.
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk.get(512..2048).unwrap(), &data[..]);
    assert!(on_disk.get(..512).unwrap().iter().all(|&x| x == 0));
}

fn misaligned_requests_rejected(backend: Backend) {
    let dir = scratch();
    for direct in [true, false] {
        let (file, _) = open_new(dir.path(), backend, direct);
        file.preallocate_zeroed(0, 64 * 1024).unwrap();
        let align = file.alignment() as u64;
        let cases: [(u64, usize); 3] = [
            (align / 2, 4096),           // misaligned offset
            (0, file.alignment() + 100), // misaligned length
            (u64::MAX - 4095, 4096),     // beyond any file offset
        ];
        for (offset, len) in cases {
            let err = file.write_at(offset, AlignedBuf::zeroed(len)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
            assert!(err.to_string().contains("offset"), "context in {err}");
            let err = file.read_at(offset, AlignedBuf::zeroed(len)).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        }
        let err = file.preallocate_zeroed(100, 4096).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
        // A misaligned batch fails as a whole and writes nothing.
        let err = file
            .submit(IoBatch {
                writes: vec![(0, pattern(4096, 9)), (3, AlignedBuf::zeroed(4096))],
                sync_after: true,
            })
            .wait()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        let head = file.read_at(0, AlignedBuf::zeroed(4096)).unwrap();
        assert!(head.iter().all(|&x| x == 0));
    }
}

fn short_read_at_eof_is_an_error(backend: Backend) {
    let dir = scratch();
    let (file, _) = open_new(dir.path(), backend, true);
    file.preallocate_zeroed(0, 8192).unwrap();
    let err = file.read_at(4096, AlignedBuf::zeroed(8192)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("read at offset 4096 len 8192"),
        "context in {msg}"
    );
}

fn pipelined_batches_complete_in_order(backend: Backend) {
    const BATCHES: usize = 40;
    const WRITES_PER_BATCH: usize = 8;
    const BLOCK: usize = 4096;
    let dir = scratch();
    let path = dir.path().join("log");
    // A tiny ring, so batches queue behind each other inside the engine too.
    let options = IoOptions {
        backend,
        direct: true,
        queue_depth: 4,
    };
    let file = IoFile::open(&path, true, &options).unwrap();
    file.preallocate_zeroed(0, (BATCHES * WRITES_PER_BATCH * BLOCK) as u64)
        .unwrap();
    let mut tickets = Vec::new();
    for batch in 0..BATCHES {
        let writes = (0..WRITES_PER_BATCH)
            .map(|i| {
                let block = batch * WRITES_PER_BATCH + i;
                ((block * BLOCK) as u64, pattern(BLOCK, block as u8))
            })
            .collect();
        tickets.push(file.submit(IoBatch {
            writes,
            sync_after: batch % 5 == 4,
        }));
    }
    let last = tickets.pop().unwrap();
    last.wait().unwrap();
    for (i, earlier) in tickets.into_iter().enumerate() {
        assert!(
            earlier.is_done(),
            "batch {i} completes before a later batch"
        );
        assert_eq!(earlier.wait().unwrap().len(), WRITES_PER_BATCH);
    }
    let all = file
        .read_at(0, AlignedBuf::zeroed(BATCHES * WRITES_PER_BATCH * BLOCK))
        .unwrap();
    for (block, chunk) in all.chunks(BLOCK).enumerate() {
        assert_eq!(chunk, &pattern(BLOCK, block as u8)[..], "block {block}");
    }
}

fn batch_larger_than_ring(backend: Backend) {
    let dir = scratch();
    let options = IoOptions {
        backend,
        direct: true,
        queue_depth: 4,
    };
    let file = IoFile::open(&dir.path().join("log"), true, &options).unwrap();
    let writes: Vec<_> = (0..300u64)
        .map(|i| (i * 4096, pattern(4096, i as u8)))
        .collect();
    let bufs = file
        .submit(IoBatch {
            writes,
            sync_after: true,
        })
        .wait()
        .unwrap();
    assert_eq!(bufs.len(), 300);
    assert_eq!(file.len().unwrap(), 300 * 4096);
    for i in [0u64, 1, 150, 299] {
        let got = file.read_at(i * 4096, AlignedBuf::zeroed(4096)).unwrap();
        assert_eq!(got, pattern(4096, i as u8));
    }
}

fn concurrent_submitters(backend: Backend) {
    const THREADS: u64 = 8;
    const WRITES: u64 = 50;
    let dir = scratch();
    let (file, _) = open_new(dir.path(), backend, true);
    file.preallocate_zeroed(0, THREADS * WRITES * 4096).unwrap();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let file = file.clone();
            s.spawn(move || {
                for w in 0..WRITES {
                    let block = t * WRITES + w;
                    file.submit(IoBatch {
                        writes: vec![(block * 4096, pattern(4096, block as u8))],
                        sync_after: w % 10 == 0,
                    })
                    .wait()
                    .unwrap();
                }
            });
        }
    });
    for block in 0..THREADS * WRITES {
        let got = file
            .read_at(block * 4096, AlignedBuf::zeroed(4096))
            .unwrap();
        assert_eq!(got, pattern(4096, block as u8), "block {block}");
    }
}

fn drop_drains_submitted_work(backend: Backend) {
    let dir = scratch();
    let (file, path) = open_new(dir.path(), backend, true);
    let ticket = file.submit(IoBatch {
        writes: vec![(0, pattern(1 << 20, 3))],
        sync_after: true,
    });
    drop(file);
    ticket.wait().unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(on_disk, &pattern(1 << 20, 3)[..]);
}

fn tmpfs_direct_or_buffered(backend: Backend) {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIP: no /dev/shm");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("replog-io-test")
        .tempdir_in(shm)
        .unwrap();
    // tmpfs may accept O_DIRECT (Linux >= 6.6) or refuse it (EINVAL): both must work.
    let (file, _) = open_new(dir.path(), backend, true);
    let data = pattern(8192, 5);
    file.write_at(0, data.clone()).unwrap();
    file.sync_data().unwrap();
    assert_eq!(file.read_at(0, AlignedBuf::zeroed(8192)).unwrap(), data);
}

fn block_device(backend: Backend) {
    let dir = scratch();
    let image = dir.path().join("image");
    std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&image)
        .output();
    let loop_dev = match out {
        Ok(out) if out.status.success() => String::from_utf8(out.stdout).unwrap(),
        other => {
            eprintln!("SKIP: cannot set up a loop device: {other:?}");
            return;
        }
    };
    let loop_dev = loop_dev.trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(loop_dev.clone());
    let file = IoFile::open(Path::new(&loop_dev), false, &opts(backend, true)).unwrap();
    assert!(file.is_block_device());
    assert_eq!(file.len().unwrap(), 4 << 20);
    assert!(file.alignment() >= 512);
    let data = pattern(65536, 11);
    file.write_at(4096, data.clone()).unwrap();
    file.sync_data().unwrap();
    assert_eq!(file.read_at(4096, AlignedBuf::zeroed(65536)).unwrap(), data);
    file.preallocate_zeroed(0, 4 << 20).unwrap();
    let err = file.preallocate_zeroed(0, 8 << 20).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    // A request the kernel fails (beyond the device end) fails its batch with context, and the
    // file stays usable.
    let err = file
        .submit(IoBatch {
            writes: vec![(0, pattern(4096, 1)), (4 << 20, pattern(4096, 2))],
            sync_after: true,
        })
        .wait()
        .unwrap_err();
    assert!(
        err.to_string().contains("write at offset 4194304 len 4096"),
        "{err}"
    );
    assert!(file.read_at(4 << 20, AlignedBuf::zeroed(4096)).is_err());
    file.sync_data().unwrap();
}

macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { super::$name(super::Backend::IoUring) })*
        }
        mod pwrite {
            $(#[test] fn $name() { super::$name(super::Backend::Pwrite) })*
        }
    };
}

for_each_backend!(
    round_trip_direct,
    round_trip_buffered,
    misaligned_requests_rejected,
    short_read_at_eof_is_an_error,
    pipelined_batches_complete_in_order,
    batch_larger_than_ring,
    concurrent_submitters,
    drop_drains_submitted_work,
    tmpfs_direct_or_buffered,
    block_device,
);

#[test]
fn auto_prefers_io_uring_when_available() {
    let dir = scratch();
    let file = IoFile::open(&dir.path().join("log"), true, &IoOptions::default()).unwrap();
    let available = crate::io::uring::setup(8).is_ok();
    let expected = if available {
        Backend::IoUring
    } else {
        Backend::Pwrite
    };
    assert_eq!(file.backend(), expected);
}

#[test]
fn direct_refused_falls_back_to_buffered() {
    let dir = scratch();
    let path = dir.path().join("log");
    let (file, direct) = file::open_falling_back(
        |direct| {
            if direct {
                Err(std::io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                std::fs::File::create(&path)
            }
        },
        true,
    )
    .unwrap();
    assert!(!direct);
    drop(file);
    // Other errors are not hidden by the fallback.
    let err = file::open_falling_back(
        |_| Err(std::io::Error::from_raw_os_error(libc::EACCES)),
        true,
    )
    .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
}

#[test]
fn opening_a_directory_fails_clearly() {
    let dir = scratch();
    let err = IoFile::open(dir.path(), false, &opts(Backend::Pwrite, false)).unwrap_err();
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );
}

#[test]
fn backend_names_round_trip() {
    for backend in [Backend::Auto, Backend::IoUring, Backend::Pwrite] {
        assert_eq!(backend.to_string().parse::<Backend>().unwrap(), backend);
    }
    assert!("spdk".parse::<Backend>().is_err());
    let json = serde_json::to_string(&IoOptions::default()).unwrap();
    assert_eq!(
        json,
        r#"{"backend":"auto","direct":true,"queue_depth":128}"#
    );
}
