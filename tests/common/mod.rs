//! Test harness: a real `replicator daemon` process on loopback, driven through the real CLI, with
//! file-backed devices in a temporary directory.
#![allow(dead_code)]

mod sites;

// Not every test crate uses the two-site helpers (as with dead_code above).
#[allow(unused_imports)]
pub use sites::*;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_replicator"))
}

/// A loopback port nobody listens on, and that no other test of this run has been handed.
///
/// The kernel may hand the same ephemeral port to two `bind(0)` calls in a row once the first
/// listener is closed (a CI run once gave a daemon's NBD and metrics addresses the same port),
/// and nextest runs each test in its own process. So every port handed out is also claimed with
/// an exclusively created file in a directory shared by the run's processes; claims older than
/// ten minutes are stale (a run that died) and are taken over.
pub fn free_port() -> u16 {
    let claims = std::env::temp_dir().join("replicator-test-ports");
    std::fs::create_dir_all(&claims).unwrap();
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let claim = claims.join(port.to_string());
        let stale = std::fs::metadata(&claim)
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600))
            .unwrap_or(false);
        if stale {
            let _ = std::fs::remove_file(&claim);
        }
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&claim)
            .is_ok()
        {
            return port;
        }
    }
}

/// True when `tool` is on PATH; otherwise prints why the test is skipped.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: {tool} is not installed (deploy/install-deps.sh installs it)");
    }
    ok
}

/// A fresh temporary directory under /work when it exists (O_DIRECT needs a real file system,
/// and /tmp may be tmpfs), else under /var/tmp.
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let base = if Path::new("/work").is_dir() {
        Path::new("/work")
    } else {
        Path::new("/var/tmp")
    };
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .unwrap()
}

/// A thread that runs rounds of writes (`round(i)` for i = 0, 1, ..., each returning how many
/// writes it completed) until stopped.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    pub fn spawn(mut round: impl FnMut(u64) -> u64 + Send + 'static) -> Writer {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s2, d2) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let mut i: u64 = 0;
            while !s2.load(Ordering::Relaxed) {
                d2.fetch_add(round(i), Ordering::Relaxed);
                i += 1;
            }
        });
        Writer { stop, done, thread }
    }

    /// Writes completed so far.
    pub fn done(&self) -> u64 {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop after the current round; returns the writes completed.
    pub fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap();
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub struct Daemon {
    /// Extra `replicator daemon` flags (site id, keys, links).
    pub extra: Vec<String>,
    pub dir: PathBuf,
    pub control: PathBuf,
    pub nbd_port: u16,
    pub metrics_port: u16,
    pub child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    /// A daemon in a fresh temporary directory (under /work when it exists: O_DIRECT needs a real
    /// file system, and /tmp may be tmpfs).
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// A daemon with extra flags; `{dir}` in a flag is replaced by the daemon's directory.
    pub fn start_with(extra: &[&str]) -> Daemon {
        let mut d = Self::prepare(extra);
        d.spawn();
        d
    }

    /// A daemon's directory and ports, not started yet (write keys into `dir`, then `spawn`).
    pub fn prepare(extra: &[&str]) -> Daemon {
        let tmp = scratch_dir("replicator-test-");
        let dir = tmp.path().to_path_buf();
        Daemon {
            extra: extra
                .iter()
                .map(|a| a.replace("{dir}", dir.to_str().unwrap()))
                .collect(),
            control: dir.join("control.sock"),
            dir,
            nbd_port: free_port(),
            metrics_port: free_port(),
            child: None,
            _tmp: Some(tmp),
        }
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = Command::new(bin())
            .arg("daemon")
            .arg("--control")
            .arg(&self.control)
            .arg("--nbd")
            .arg(format!("127.0.0.1:{}", self.nbd_port))
            .arg("--metrics")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.cli(&["ls"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon did not come up; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("REPLICATOR_CONTROL", &self.control)
            .current_dir(&self.dir)
            .output()
            .unwrap()
    }

    /// Run a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "replicator {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn status(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", name, "--json"])).unwrap()
    }

    /// Wait until every slink of the device has lag 0 (and no dirty bytes).
    pub fn wait_lag_zero(&self, name: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status(name);
            let done =
                st["slinks"].as_array().unwrap().iter().all(|s| {
                    s["lag_ios"].as_u64() == Some(0) && s["dirty_bytes"].as_u64() == Some(0)
                });
            if done {
                return st;
            }
            if Instant::now() > deadline {
                panic!("lag did not reach 0: {st:#}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Write `text` to `{file}.table` in the daemon's directory; returns the file's path.
    pub fn table_file(&self, file: &str, text: &str) -> String {
        let p = self.dir.join(format!("{file}.table"));
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    pub fn create(&self, name: &str, table: &str) {
        self.ok(&["create", name, &self.table_file(name, table)]);
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.nbd_port, name)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("daemon did not stop on SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A table for one device with a local primary (slink 0) and a second local site (slink 1), all
/// files inside the daemon's directory.
pub fn two_site_table(
    dev_mib: u64,
    replog_mib: u64,
    policy: &str,
    dev_nr: u32,
    replog_mode: &str,
) -> String {
    let sectors = dev_mib * 2048;
    let replog_sectors = replog_mib * 2048;
    let size = if replog_mode == "open" {
        String::new()
    } else {
        format!(" {replog_sectors}")
    };
    let n = if replog_mode == "open" { 3 } else { 4 };
    format!(
        "0 {sectors} replicator \\\n\
         default {n} replog.img 0 {replog_mode}{size} \\\n\
         local 2 0 async ios=0 \\\n\
         2 {dev_nr} primary{dev_nr}.img \\\n\
         - 0 \\\n\
         local 2 1 {policy} \\\n\
         2 {dev_nr} secondary{dev_nr}.img \\\n\
         disk 3 128 slink1_dev{dev_nr}.dirty nosync\n"
    )
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

pub fn must(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Byte-compare two files (the first `len` bytes).
pub fn same_bytes(a: &Path, b: &Path, len: u64) -> bool {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    let n = len as usize;
    x.len() >= n && y.len() >= n && x[..n] == y[..n]
}
