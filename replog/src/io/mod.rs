//! Log-device I/O: one dedicated thread per open file, io_uring when the kernel allows it, a
//! pwrite/fdatasync fallback otherwise, O_DIRECT where the file system supports it.
//!
//! Key decisions:
//! - The I/O thread owns the ring (or does the blocking syscalls), so callers never touch the
//!   kernel interface: they submit [`IoBatch`]es and get [`IoTicket`]s back. Tickets complete in
//!   submit order.
//! - Ordering contract: the writes of one batch may run in parallel, and batches may be in flight
//!   together (pipelining), but a batch's `fdatasync` is issued only after every write of this batch
//!   AND of every earlier-submitted batch completed. A completed sync therefore covers all of them.
//!   A failed batch does not fail later batches: callers that need prefix semantics (the log) must
//!   stop at the first error.
//! - Alignment is checked before submission, identically for both backends and for buffered and
//!   O_DIRECT files, so a misaligned request is an `InvalidInput` error on every machine, never a
//!   surprise on the one that happens to support O_DIRECT.
//! - Every queue has a named bound: [`SUBMIT_QUEUE_BATCHES_MAX`] batches wait for the thread
//!   (submit blocks beyond), [`BATCHES_IN_FLIGHT_MAX`] are worked on at once, and at most
//!   `queue_depth` requests are in the ring. The log's own batches bypass the first bound (they
//!   are bounded by the log, and must never block: see `intake.rs`).
//! - Completion can be observed without a thread of one's own: a ticket is a `Future`, and the
//!   waker it was polled with runs on the I/O thread right after the ticket completes. The log
//!   uses this to finish batches on the I/O thread (no completer thread, no extra wake-up).
//! - Libraries never print: which backend and whether O_DIRECT is in use are exposed through
//!   [`IoFile::backend`] and [`IoFile::is_direct`].

mod buf;
mod file;
mod intake;
mod pwrite;
mod ticket;
mod uring;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::thread::JoinHandle;

pub use buf::{AlignedBuf, BUF_ALIGN};
pub use ticket::{BatchResult, IoTicket};

/// Batches that may wait in the submit queue before `submit` blocks.
pub const SUBMIT_QUEUE_BATCHES_MAX: usize = 64;
/// Batches the I/O thread works on at once (pipelining depth).
pub const BATCHES_IN_FLIGHT_MAX: usize = 32;
/// Requests (reads + writes) in one batch.
pub const OPS_PER_BATCH_MAX: usize = 1 << 20;
/// Bounds for [`IoOptions::queue_depth`]; values outside are clamped.
pub const QUEUE_DEPTH_MIN: u32 = 4;
/// See [`QUEUE_DEPTH_MIN`].
pub const QUEUE_DEPTH_MAX: u32 = 4096;
/// The smallest alignment ever reported by [`IoFile::alignment`] (a sector).
pub const ALIGNMENT_MIN: usize = 512;
/// Largest single kernel read/write (Linux MAX_RW_COUNT); longer requests are split.
pub(crate) const RW_BYTES_MAX: usize = 0x7fff_f000;
/// Retries of a request that failed with EINTR/EAGAIN before the error is returned.
pub(crate) const TRANSIENT_RETRIES_MAX: u32 = 64;

/// Which kernel interface the I/O thread uses.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// io_uring if the kernel allows it (not disabled by sysctl, seccomp or age), else pwrite.
    #[default]
    Auto,
    /// io_uring or fail to open.
    IoUring,
    /// Blocking pwrite/pread/fdatasync on the I/O thread.
    Pwrite,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::IoUring => "io_uring",
            Backend::Pwrite => "pwrite",
        })
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(Backend::IoUring),
            "pwrite" => Ok(Backend::Pwrite),
            other => Err(format!(
                "unknown io backend {other:?} (expected auto, io_uring or pwrite)"
            )),
        }
    }
}

/// How to open a log device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct IoOptions {
    /// Kernel interface. Default: `Auto`.
    pub backend: Backend,
    /// Try O_DIRECT; fall back to buffered I/O if the file system refuses it. Default: true.
    pub direct: bool,
    /// Requests in the io_uring at once. Default: 128. Minimum: 4. Maximum: 4096 (clamped).
    pub queue_depth: u32,
}

impl Default for IoOptions {
    fn default() -> IoOptions {
        IoOptions {
            backend: Backend::Auto,
            direct: true,
            queue_depth: 128,
        }
    }
}

/// Writes to run together, optionally followed by an fdatasync that covers them and every
/// earlier-submitted batch.
#[derive(Debug, Default)]
pub struct IoBatch {
    /// (offset, data); offsets and lengths must be multiples of [`IoFile::alignment`].
    pub writes: Vec<(u64, AlignedBuf)>,
    /// Issue fdatasync once these writes and all earlier batches' writes completed.
    pub sync_after: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Read,
    Write,
}

/// One read or write of a job.
pub(crate) struct Op {
    pub kind: OpKind,
    pub offset: u64,
    pub buf: AlignedBuf,
}

/// What the I/O thread receives: a batch (or an internal read) with its completion.
pub(crate) struct Job {
    pub ops: Vec<Op>,
    pub sync_after: bool,
    pub completer: ticket::Completer,
    /// Counted against [`SUBMIT_QUEUE_BATCHES_MAX`] while queued (set by the intake).
    pub bounded: bool,
}

/// The file and its identity, shared with the I/O thread.
pub(crate) struct Target {
    pub file: File,
    pub path: PathBuf,
}

impl Target {
    /// `err` with the file, operation, offset and length in its message (kind kept).
    pub fn error(&self, err: &io::Error, op: &str, offset: u64, len: usize) -> io::Error {
        io::Error::new(
            err.kind(),
            format!(
                "{}: {op} at offset {offset} len {len}: {err}",
                self.path.display()
            ),
        )
    }
}

/// A log device (regular file or block device) with its dedicated I/O thread.
///
/// Cheap to clone; the thread stops (after finishing every submitted batch) when the last clone
/// is dropped.
#[derive(Clone)]
pub struct IoFile {
    inner: Arc<Inner>,
}

struct Inner {
    target: Arc<Target>,
    backend: Backend,
    direct: bool,
    alignment: usize,
    is_block_device: bool,
    intake: Arc<intake::Intake>,
    /// Wakes the io_uring thread when it waits on the ring (None for pwrite).
    wake: Option<Arc<uring::EventFd>>,
    /// The I/O thread (which never needs waking: it looks at the intake before it sleeps).
    io_thread: std::thread::ThreadId,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the intake tells the thread to finish what it has and stop.
        self.intake.close();
        if let Some(wake) = &self.wake {
            wake.notify();
        }
        if let Some(thread) = self.thread.take() {
            // The last clone can be dropped on the I/O thread itself (by a completion waker that
            // held the last reference to its owner): joining would wait for ourselves. The thread
            // then stops on its own once it has drained the closed intake.
            if thread.thread().id() != std::thread::current().id() {
                // The thread does not panic by design; if it did, there is nothing left to clean up.
                let _ = thread.join();
            }
        }
    }
}

impl IoFile {
    /// Opens (and with `create`, creates) a regular file or block device for log I/O.
    pub fn open(path: &Path, create: bool, opts: &IoOptions) -> io::Result<IoFile> {
        let opened = file::open(path, create, opts.direct)?;
        let queue_depth = opts.queue_depth.clamp(QUEUE_DEPTH_MIN, QUEUE_DEPTH_MAX);
        let ring = match opts.backend {
            Backend::Pwrite => None,
            Backend::IoUring => Some(uring::setup(queue_depth).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{}: io_uring backend requested but unavailable: {e}",
                        path.display()
                    ),
                )
            })?),
            Backend::Auto => uring::setup(queue_depth).ok(),
        };
        let target = Arc::new(Target {
            file: opened.file,
            path: path.to_path_buf(),
        });
        let intake = Arc::new(intake::Intake::new());
        let rx = Arc::clone(&intake);
        let (backend, wake, thread) = match ring {
            Some(ring) => {
                let wake = Arc::new(uring::EventFd::new()?);
                let thread = uring::spawn(ring, Arc::clone(&target), rx, Arc::clone(&wake))?;
                (Backend::IoUring, Some(wake), thread)
            }
            None => (
                Backend::Pwrite,
                None,
                pwrite::spawn(Arc::clone(&target), rx)?,
            ),
        };
        Ok(IoFile {
            inner: Arc::new(Inner {
                target,
                backend,
                direct: opened.direct,
                alignment: opened.alignment,
                is_block_device: opened.is_block_device,
                intake,
                wake,
                io_thread: thread.thread().id(),
                thread: Some(thread),
            }),
        })
    }

    /// The backend in use (never `Auto`).
    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// True when the file is open with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.inner.is_block_device
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.inner.target.path
    }

    /// Required multiple for offsets and lengths (>= 512; the direct-I/O alignment when direct).
    pub fn alignment(&self) -> usize {
        self.inner.alignment
    }

    /// Size of the file, or of the block device.
    pub fn len(&self) -> io::Result<u64> {
        file::size(&self.inner.target.file).map_err(|e| self.inner.target.error(&e, "size", 0, 0))
    }

    /// True when [`IoFile::len`] is 0.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Makes `[offset, offset+len)` exist and hold written zeros, then syncs, so later O_DIRECT
    /// overwrites need no allocation or extent conversion (metadata updates) to be durable.
    /// Regular files are extended (fallocate first where supported, for contiguity); block devices
    /// must already be large enough.
    pub fn preallocate_zeroed(&self, offset: u64, len: u64) -> io::Result<()> {
        let target = &self.inner.target;
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        self.check_aligned(offset, len_usize)
            .map_err(|e| target.error(&e, "preallocate", offset, len_usize))?;
        let end = offset.checked_add(len).ok_or_else(|| {
            target.error(
                &io::Error::from(io::ErrorKind::InvalidInput),
                "preallocate",
                offset,
                len_usize,
            )
        })?;
        if self.inner.is_block_device {
            let size = self.len()?;
            if end > size {
                return Err(target.error(
                    &io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("beyond the block device's {size} bytes"),
                    ),
                    "preallocate",
                    offset,
                    len_usize,
                ));
            }
        } else if len > 0 {
            file::fallocate_best_effort(&target.file, offset, len)
                .map_err(|e| target.error(&e, "fallocate", offset, len_usize))?;
        }
        const ZERO_CHUNK_BYTES: u64 = 1 << 20;
        const ZERO_CHUNKS_PER_BATCH: usize = 8;
        let mut spare: Vec<AlignedBuf> = Vec::with_capacity(ZERO_CHUNKS_PER_BATCH);
        let mut at = offset;
        while at < end {
            let mut writes = Vec::with_capacity(ZERO_CHUNKS_PER_BATCH);
            while at < end && writes.len() < ZERO_CHUNKS_PER_BATCH {
                let chunk = (end - at).min(ZERO_CHUNK_BYTES);
                let chunk_usize = usize::try_from(chunk).unwrap_or(usize::MAX);
                let mut buf = spare
                    .pop()
                    .unwrap_or_else(|| AlignedBuf::zeroed(ZERO_CHUNK_BYTES as usize));
                buf.set_len(chunk_usize)?;
                writes.push((at, buf));
                at += chunk;
            }
            spare = self
                .submit(IoBatch {
                    writes,
                    sync_after: false,
                })
                .wait()?;
        }
        self.sync_data()
    }

    /// Queues a batch; blocks only when [`SUBMIT_QUEUE_BATCHES_MAX`] batches are already waiting.
    /// Misaligned or oversized requests fail the ticket with `InvalidInput` without any I/O.
    pub fn submit(&self, batch: IoBatch) -> IoTicket {
        self.submit_ops(batch_ops(batch.writes), batch.sync_after, Bound::Queue)
    }

    /// [`IoFile::submit`] that never blocks: the batch is queued even when
    /// [`SUBMIT_QUEUE_BATCHES_MAX`] batches already wait. For callers that bound their own
    /// outstanding batches and submit under a lock the completion path also takes (the log).
    pub fn submit_self_bounded(&self, batch: IoBatch) -> IoTicket {
        self.submit_ops(batch_ops(batch.writes), batch.sync_after, Bound::Caller)
    }

    /// Writes a batch on the calling thread (pwrite, then fdatasync if `sync_after`), bypassing
    /// the I/O thread: no hand-off, so the lowest latency for a lone write. NOT ordered with
    /// batches queued on the I/O thread: the caller must have none in flight that this write or
    /// sync must follow (the log uses it only while its pipeline is empty).
    pub fn write_now(&self, batch: IoBatch) -> io::Result<Vec<AlignedBuf>> {
        let ops = batch_ops(batch.writes);
        self.validate(&ops)?;
        pwrite::run_job(&self.inner.target, ops, batch.sync_after)
    }

    /// Writes `buf` at `offset` (no sync) and returns the buffer.
    pub fn write_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        let bufs = self
            .submit(IoBatch {
                writes: vec![(offset, buf)],
                sync_after: false,
            })
            .wait()?;
        bufs.into_iter()
            .next()
            .ok_or_else(|| io::Error::other("I/O thread returned no buffer"))
    }

    /// Writes `buf` at `offset` with `RWF_DSYNC` on the calling thread: that range is durable on
    /// return, other dirty pages of the file are not waited for (unlike fdatasync). Not ordered
    /// with queued batches.
    pub fn write_durable_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        self.check_aligned(offset, buf.len())?;
        pwrite::write_dsync(&self.inner.target, offset, &buf)?;
        Ok(buf)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`; a short read (EOF) is `UnexpectedEof`.
    pub fn read_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        self.submit_read(offset, buf)
            .wait()?
            .into_iter()
            .next()
            .ok_or_else(|| io::Error::other("I/O thread returned no buffer"))
    }

    /// Queues a read of `buf.len()` bytes at `offset`; ordered with batches like a write.
    pub fn submit_read(&self, offset: u64, buf: AlignedBuf) -> IoTicket {
        self.submit_ops(
            vec![Op {
                kind: OpKind::Read,
                offset,
                buf,
            }],
            false,
            Bound::Queue,
        )
    }

    /// fdatasync on the calling thread, bypassing the I/O thread: covers every write that
    /// completed before the call (the kernel syncs the file's dirty pages and the device cache),
    /// and lets batches in flight go on meanwhile. NOT ordered with queued batches.
    pub fn sync_completed_now(&self) -> io::Result<()> {
        pwrite::sync_now(&self.inner.target)
    }

    /// fdatasync after every write submitted before this call completed.
    pub fn sync_data(&self) -> io::Result<()> {
        self.submit(IoBatch {
            writes: Vec::new(),
            sync_after: true,
        })
        .wait()
        .map(drop)
    }

    fn check_aligned(&self, offset: u64, len: usize) -> io::Result<()> {
        let align = self.inner.alignment;
        // usize -> u64 is lossless on every target Linux supports.
        if !offset.is_multiple_of(align as u64) || !len.is_multiple_of(align) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset and length must be multiples of {align}"),
            ));
        }
        Ok(())
    }

    fn validate(&self, ops: &[Op]) -> io::Result<()> {
        if ops.len() > OPS_PER_BATCH_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: batch of {} requests exceeds {OPS_PER_BATCH_MAX}",
                    self.path().display(),
                    ops.len()
                ),
            ));
        }
        for op in ops {
            let what = match op.kind {
                OpKind::Read => "read",
                OpKind::Write => "write",
            };
            let len = op.buf.len();
            let in_range = op
                .offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= i64::MAX as u64);
            let checked = if in_range {
                self.check_aligned(op.offset, len)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "range beyond the largest file offset",
                ))
            };
            checked.map_err(|e| self.inner.target.error(&e, what, op.offset, len))?;
        }
        Ok(())
    }

    fn submit_ops(&self, ops: Vec<Op>, sync_after: bool, bound: Bound) -> IoTicket {
        if let Err(e) = self.validate(&ops) {
            return IoTicket::ready(Err(e));
        }
        let (ticket, completer) = ticket::ticket();
        let job = Job {
            ops,
            sync_after,
            completer,
            bounded: false,
        };
        let intake = &self.inner.intake;
        let sent = match bound {
            Bound::Queue => intake.send(job),
            Bound::Caller => intake.send_self_bounded(job),
        };
        // If the intake is closed, the job (and its completer) is dropped, which fails the ticket.
        if matches!(sent, Ok(intake::Wake::Ring))
            && std::thread::current().id() != self.inner.io_thread
        {
            if let Some(wake) = &self.inner.wake {
                wake.notify();
            }
        }
        ticket
    }
}

/// Who bounds a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bound {
    /// [`SUBMIT_QUEUE_BATCHES_MAX`]: the submitter blocks beyond it.
    Queue,
    /// The caller bounds its outstanding batches; never blocks.
    Caller,
}

fn batch_ops(writes: Vec<(u64, AlignedBuf)>) -> Vec<Op> {
    writes
        .into_iter()
        .map(|(offset, buf)| Op {
            kind: OpKind::Write,
            offset,
            buf,
        })
        .collect()
}

impl fmt::Debug for IoFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoFile")
            .field("path", &self.inner.target.path)
            .field("backend", &self.inner.backend)
            .field("direct", &self.inner.direct)
            .field("alignment", &self.inner.alignment)
            .finish()
    }
}
