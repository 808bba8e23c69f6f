//! Test support for the NBD server tests: a file-backed export (a real file, pread/pwrite), an
//! in-process server on a loopback port, a minimal raw NBD client, and client-binary checks.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use replicator::nbd::proto::{self, ReplyHeader, Request};
use replicator::nbd::{
    serve_tcp, serve_unix, BlockError, Export, Exports, ServerConfig, ServerStats,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

// -------------------------------------------------------------------------------------------
// Client binaries
// -------------------------------------------------------------------------------------------

/// Whether `bin` is on PATH. Tests that need a missing client print why and return.
pub fn have(bin: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[macro_export]
macro_rules! require_bins {
    ($($bin:expr),+) => {
        $(
            if !nbd_support::have($bin) {
                println!("SKIP: {} not installed (deploy/install-deps.sh installs it)", $bin);
                return;
            }
        )+
    };
}

/// Runs a client binary to completion; returns (success, stdout, stderr).
pub async fn run(bin: &str, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a client binary and fails the test with its output if it fails.
pub async fn run_ok(bin: &str, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run(bin, args).await;
    assert!(
        ok,
        "{bin} {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}

// -------------------------------------------------------------------------------------------
// File-backed export
// -------------------------------------------------------------------------------------------

/// A test export over a real file: pread/pwrite on a blocking thread, fdatasync for flush/FUA,
/// fallocate for trim and write-zeroes. Optionally gated (reads wait for a permit) to observe
/// concurrency and drain.
pub struct FileExport {
    file: Arc<File>,
    size: u64,
    read_only: bool,
    multi_conn: bool,
    block_size: (u32, u32, u32),
    /// When set, every read waits for one permit from this semaphore.
    pub gate: Option<Arc<Semaphore>>,
    /// Reads currently inside the export, and the most seen at once.
    pub reads_now: AtomicUsize,
    pub reads_max: AtomicUsize,
    /// Reads that entered the export.
    pub reads_started: AtomicUsize,
}

impl FileExport {
    pub fn create(path: &Path, size: u64) -> FileExport {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(size).unwrap();
        FileExport {
            file: Arc::new(file),
            size,
            read_only: false,
            multi_conn: true,
            block_size: (512, 4096, 32 << 20),
            gate: None,
            reads_now: AtomicUsize::new(0),
            reads_max: AtomicUsize::new(0),
            reads_started: AtomicUsize::new(0),
        }
    }

    /// An export over an existing file, sized like it.
    pub fn open_existing(path: &Path) -> FileExport {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let size = file.metadata().unwrap().len();
        FileExport {
            file: Arc::new(file),
            size,
            read_only: false,
            multi_conn: true,
            block_size: (512, 4096, 32 << 20),
            gate: None,
            reads_now: AtomicUsize::new(0),
            reads_max: AtomicUsize::new(0),
            reads_started: AtomicUsize::new(0),
        }
    }

    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    pub fn single_conn(mut self) -> Self {
        self.multi_conn = false;
        self
    }

    pub fn with_block_size(mut self, sizes: (u32, u32, u32)) -> Self {
        self.block_size = sizes;
        self
    }

    pub fn gated(mut self, gate: Arc<Semaphore>) -> Self {
        self.gate = Some(gate);
        self
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, BlockError> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))?
            .map_err(BlockError::Io)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u32) -> std::io::Result<()> {
    // SAFETY: plain syscall on an open descriptor with integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn multi_conn(&self) -> bool {
        self.multi_conn
    }

    fn block_size(&self) -> (u32, u32, u32) {
        self.block_size
    }

    fn description(&self) -> String {
        "test file export".into()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BlockError> {
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        let now = self.reads_now.fetch_add(1, Ordering::SeqCst) + 1;
        self.reads_max.fetch_max(now, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let r = self
            .blocking(move |f| {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, offset)?;
                Ok(buf)
            })
            .await;
        self.reads_now.fetch_sub(1, Ordering::SeqCst);
        r
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        self.blocking(move |f| {
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> Result<(), BlockError> {
        self.blocking(move |f| {
            let mode = if may_trim {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            if fallocate(f, mode, offset, len).is_err() {
                f.write_all_at(&vec![0u8; len as usize], offset)?;
            }
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), BlockError> {
        self.blocking(move |f| {
            // Trim is advisory: a file system without hole punching simply keeps the data.
            let _ = fallocate(
                f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.blocking(|f| f.sync_data()).await
    }
}

/// A name -> export map.
#[derive(Default)]
pub struct TestExports {
    pub exports: HashMap<String, Arc<FileExport>>,
    pub default: Option<String>,
}

impl TestExports {
    pub fn add(&mut self, name: &str, export: FileExport) -> Arc<FileExport> {
        let e = Arc::new(export);
        self.exports.insert(name.to_owned(), Arc::clone(&e));
        e
    }
}

impl Exports for TestExports {
    type Export = FileExport;

    fn lookup(&self, name: &str) -> Option<Arc<FileExport>> {
        self.exports.get(name).cloned()
    }

    fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.exports.keys().cloned().collect();
        names.sort();
        names
    }

    fn default_export(&self) -> Option<String> {
        self.default.clone()
    }
}

// -------------------------------------------------------------------------------------------
// In-process server
// -------------------------------------------------------------------------------------------

pub struct TestServer {
    pub port: u16,
    pub unix_path: Option<PathBuf>,
    pub stats: Arc<ServerStats>,
    pub shutdown: watch::Sender<bool>,
    pub handle: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, export)
    }

    pub async fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Signals shutdown and waits (bounded) for the server to drain and return.
    pub async fn stop(self) {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("server did not drain in time")
            .unwrap()
            .unwrap();
    }
}

pub async fn start_tcp(exports: TestExports, cfg: ServerConfig) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stats = Arc::new(ServerStats::new());
    let (tx, rx) = watch::channel(false);
    let handle = tokio::spawn(serve_tcp(
        listener,
        Arc::new(exports),
        cfg,
        Arc::clone(&stats),
        rx,
    ));
    TestServer {
        port,
        unix_path: None,
        stats,
        shutdown: tx,
        handle,
    }
}

pub async fn start_unix(exports: TestExports, cfg: ServerConfig, path: &Path) -> TestServer {
    let listener = UnixListener::bind(path).unwrap();
    let stats = Arc::new(ServerStats::new());
    let (tx, rx) = watch::channel(false);
    let handle = tokio::spawn(serve_unix(
        listener,
        Arc::new(exports),
        cfg,
        Arc::clone(&stats),
        rx,
    ));
    TestServer {
        port: 0,
        unix_path: Some(path.to_owned()),
        stats,
        shutdown: tx,
        handle,
    }
}

/// Deterministic test pattern: byte `i` of the export written by `seed`.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i)
                .wrapping_mul(2654435761)
                .wrapping_add(u64::from(seed));
            (x >> 13) as u8
        })
        .collect()
}

pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

// -------------------------------------------------------------------------------------------
// Raw client
// -------------------------------------------------------------------------------------------

/// A minimal NBD client speaking raw bytes, for tests of edge cases real clients never send.
pub struct RawClient {
    pub s: TcpStream,
    pub structured: bool,
}

/// An option reply as received.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// A complete transmission reply as received.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success, else the NBD error value.
    pub error: u32,
    /// Data of a successful read.
    pub data: Vec<u8>,
    /// Structured chunk types seen, in order.
    pub chunks: Vec<u16>,
    /// Payloads of non-data chunks (error and block status payloads).
    pub payloads: Vec<Vec<u8>>,
}

pub const T: Duration = Duration::from_secs(10);

impl RawClient {
    /// Connects and completes the initial greeting with the given client flags.
    pub async fn greet(server: &TestServer, client_flags: u32) -> RawClient {
        let mut s = server.connect().await;
        let mut greeting = [0u8; 18];
        tokio::time::timeout(T, s.read_exact(&mut greeting))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]), 3);
        s.write_all(&client_flags.to_be_bytes()).await.unwrap();
        RawClient {
            s,
            structured: false,
        }
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut msg = proto::encode_option_header(option, data.len() as u32).to_vec();
        msg.extend_from_slice(data);
        self.s.write_all(&msg).await.unwrap();
    }

    pub async fn read_opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        tokio::time::timeout(T, self.s.read_exact(&mut h))
            .await
            .unwrap()
            .unwrap();
        let h = proto::decode_option_reply_header(&h).expect("option reply magic");
        let mut data = vec![0u8; h.length as usize];
        tokio::time::timeout(T, self.s.read_exact(&mut data))
            .await
            .unwrap()
            .unwrap();
        OptReply {
            option: h.option,
            reply_type: h.reply_type,
            data,
        }
    }

    /// Sends an option and collects replies up to the final one (ACK or error).
    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data).await;
        let mut replies = Vec::new();
        loop {
            let r = self.read_opt_reply().await;
            assert_eq!(r.option, option);
            let last = r.reply_type == proto::REP_ACK || r.reply_type & 0x8000_0000 != 0;
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    /// Full handshake: fixed newstyle, optionally structured replies, then GO.
    pub async fn connect_go(server: &TestServer, export: &str, structured: bool) -> RawClient {
        let mut c = RawClient::greet(
            server,
            proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES,
        )
        .await;
        if structured {
            let r = c.option(proto::OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(r.last().unwrap().reply_type, proto::REP_ACK);
            c.structured = true;
        }
        let req = proto::encode_info_request(export, &[proto::INFO_BLOCK_SIZE]);
        let r = c.option(proto::OPT_GO, &req).await;
        assert_eq!(
            r.last().unwrap().reply_type,
            proto::REP_ACK,
            "GO {export}: {r:?}"
        );
        c
    }

    pub async fn send_request(
        &mut self,
        command: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) {
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        self.s
            .write_all(&proto::encode_request(&req))
            .await
            .unwrap();
    }

    /// Reads one complete reply. For simple replies to reads, `read_len` says how much data
    /// follows on success (simple replies are not self-describing).
    pub async fn read_reply(&mut self, read_len: Option<u32>) -> Reply {
        tokio::time::timeout(T, self.read_reply_inner(read_len))
            .await
            .expect("timed out waiting for a reply")
    }

    async fn read_reply_inner(&mut self, read_len: Option<u32>) -> Reply {
        let mut reply = Reply {
            cookie: 0,
            error: 0,
            data: Vec::new(),
            chunks: Vec::new(),
            payloads: Vec::new(),
        };
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h[..16]).await.unwrap();
            let header = match proto::decode_reply_header(&h[..16]) {
                Ok(Some(h)) => h,
                Err(_) => {
                    self.s.read_exact(&mut h[16..]).await.unwrap();
                    proto::decode_reply_header(&h).unwrap().unwrap()
                }
                Ok(None) => panic!("bad reply magic {:x?}", &h[..16]),
            };
            match header {
                ReplyHeader::Simple { error, cookie } => {
                    assert!(
                        !self.structured || read_len.is_none(),
                        "simple reply to a read"
                    );
                    reply.cookie = cookie;
                    reply.error = error;
                    if let (0, Some(len)) = (error, read_len) {
                        reply.data = vec![0u8; len as usize];
                        self.s.read_exact(&mut reply.data).await.unwrap();
                    }
                    return reply;
                }
                ReplyHeader::Chunk {
                    flags,
                    chunk_type,
                    cookie,
                    length,
                } => {
                    assert!(self.structured, "structured chunk without negotiation");
                    reply.cookie = cookie;
                    reply.chunks.push(chunk_type);
                    let mut payload = vec![0u8; length as usize];
                    self.s.read_exact(&mut payload).await.unwrap();
                    match chunk_type {
                        proto::CHUNK_OFFSET_DATA => {
                            reply.data.extend_from_slice(&payload[8..]);
                        }
                        proto::CHUNK_ERROR | proto::CHUNK_ERROR_OFFSET => {
                            let e = proto::decode_error_payload(chunk_type, &payload).unwrap();
                            reply.error = e.error;
                            reply.payloads.push(payload);
                        }
                        _ => reply.payloads.push(payload),
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        return reply;
                    }
                }
            }
        }
    }

    /// Whether the server closed the connection (EOF within the timeout).
    pub async fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(T, self.s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
