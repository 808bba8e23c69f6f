//! The io_uring backend: one thread owns the ring and the in-flight batches.
//!
//! The thread pulls batches from the submit queue, pushes their reads/writes into the ring (up to
//! the ring's size), issues a batch's fdatasync once every write of it and of all earlier batches
//! completed, and completes tickets strictly in submit order. While requests are in the ring, it
//! sleeps in `io_uring_enter`; an eventfd read that is always armed in the ring wakes it when a new
//! batch arrives, so a batch submitted while an fsync is in flight starts at once (pipelining).
//!
//! Buffer lifetime: every buffer handed to the kernel is owned by a [`JobState`] in `jobs` until
//! its completion arrives; jobs leave `jobs` only when nothing of theirs is in the ring. If the
//! ring itself fails, in-flight buffers are leaked rather than freed under the kernel.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{opcode, squeue, types, IoUring};

use super::intake::{Empty, Intake};
use super::{
    AlignedBuf, Job, OpKind, Target, BATCHES_IN_FLIGHT_MAX, RW_BYTES_MAX, TRANSIENT_RETRIES_MAX,
};

/// user_data layout: job sequence number (low 40 bits) << 24 | request index in the job.
const INDEX_BITS: u32 = 24;
const SEQ_MASK: u64 = (1 << 40) - 1;
/// Request index meaning "the job's fdatasync".
const SYNC_INDEX: u64 = (1 << INDEX_BITS) - 2;
/// user_data of the eventfd read that wakes the thread (never a valid job encoding).
const WAKE_TOKEN: u64 = u64::MAX;

/// Creates a ring of `queue_depth` entries and checks the kernel lets us use it (sysctl
/// io_uring_disabled, seccomp, old kernels without the opcodes we need).
pub(crate) fn setup(queue_depth: u32) -> io::Result<IoUring> {
    let mut ring = IoUring::new(queue_depth)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [
        opcode::Read::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
        opcode::Nop::CODE,
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {code} not supported by this kernel"),
            ));
        }
    }
    // A round trip proves io_uring_enter works too (seccomp may allow setup but not enter).
    let nop = opcode::Nop::new().build().user_data(0);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }
        .map_err(|_| io::Error::other("io_uring submission queue full at setup"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    let result = ring.completion().next().map(|cqe| cqe.result());
    match result {
        Some(0) => Ok(ring),
        Some(res) => Err(io::Error::from_raw_os_error(res.saturating_neg())),
        None => Err(io::Error::other("io_uring NOP did not complete")),
    }
}

/// An eventfd (blocking mode) used to wake the ring thread.
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall, no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd returned a new fd that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds 1 to the counter (wakes a pending read). Errors other than EINTR cannot happen for
    /// a counter far from overflow; they are ignored (the thread also wakes on completions).
    pub fn notify(&self) {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live u64 to an fd we own.
            let rc = unsafe {
                libc::write(
                    self.0.as_raw_fd(),
                    std::ptr::from_ref(&one).cast::<libc::c_void>(),
                    std::mem::size_of::<u64>(),
                )
            };
            if rc >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return;
            }
        }
    }
}

pub(crate) fn spawn(
    ring: IoUring,
    target: Arc<Target>,
    rx: Arc<Intake>,
    wake: Arc<EventFd>,
) -> io::Result<JoinHandle<()>> {
    // One slot stays free for the wake read.
    let ring_slots = (ring.params().sq_entries() as usize)
        .saturating_sub(1)
        .max(1);
    let engine = Engine {
        ring,
        fd: target.file.as_raw_fd(),
        target,
        rx,
        wake,
        wake_buf: Box::new([0; 8]),
        wake_armed: false,
        jobs: VecDeque::with_capacity(BATCHES_IN_FLIGHT_MAX),
        pending: VecDeque::new(),
        next_seq: 0,
        in_ring: 0,
        ring_slots,
        disconnected: false,
        broken: None,
        cqes: Vec::with_capacity(ring_slots + 1),
    };
    std::thread::Builder::new()
        .name("replog-io-uring".into())
        .spawn(move || engine.run())
}

struct OpState {
    kind: OpKind,
    offset: u64,
    buf: AlignedBuf,
    /// Bytes transferred so far (short transfers are continued from here).
    done: usize,
    retries: u32,
    finished: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncState {
    NotWanted,
    Waiting { retries: u32 },
    InRing { retries: u32 },
    Done,
}

struct JobState {
    seq: u64,
    ops: Vec<OpState>,
    /// Ops not finished yet (in the ring or waiting in `pending`).
    unfinished: usize,
    /// Requests of this job in the ring.
    in_ring: usize,
    sync: SyncState,
    error: Option<io::Error>,
    completer: super::ticket::Completer,
}

impl JobState {
    fn is_finished(&self) -> bool {
        self.unfinished == 0
            && self.in_ring == 0
            && matches!(self.sync, SyncState::NotWanted | SyncState::Done)
    }

    fn fail(&mut self, err: io::Error) {
        if self.error.is_none() {
            self.error = Some(err);
        }
        if let SyncState::Waiting { .. } = self.sync {
            self.sync = SyncState::NotWanted;
        }
    }
}

struct Engine {
    ring: IoUring,
    fd: RawFd,
    target: Arc<Target>,
    rx: Arc<Intake>,
    wake: Arc<EventFd>,
    /// Destination of the wake read; boxed so its address is stable while the read is armed.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    /// Jobs in submit order; seq numbers are consecutive from the front.
    jobs: VecDeque<JobState>,
    /// (seq, op index) of requests to push into the ring.
    pending: VecDeque<(u64, usize)>,
    next_seq: u64,
    /// Our requests in the ring, the wake read excluded.
    in_ring: usize,
    ring_slots: usize,
    disconnected: bool,
    /// Set when the ring failed; every job from then on fails with this message.
    broken: Option<String>,
    cqes: Vec<(u64, i32)>,
}

impl Engine {
    fn run(mut self) {
        loop {
            self.accept_jobs();
            if self.jobs.is_empty() && self.disconnected {
                break;
            }
            if let Some(msg) = &self.broken {
                let msg = msg.clone();
                for job in self.jobs.drain(..) {
                    job.completer.complete(Err(io::Error::other(msg.clone())));
                }
                continue;
            }
            self.issue_syncs();
            self.issue_ops();
            self.arm_wake();
            if self.complete_finished() || self.jobs.is_empty() {
                // Completion wakers may have submitted jobs (without poking the eventfd, as they
                // run on this thread): take them before sleeping in the ring.
                continue;
            }
            if let Err(e) = self.wait_for_completions() {
                self.break_ring(&e);
                continue;
            }
            self.reap();
        }
        self.disarm_wake();
    }

    /// Takes new jobs: blocks when idle, otherwise only takes what is already queued.
    fn accept_jobs(&mut self) {
        while self.jobs.len() < BATCHES_IN_FLIGHT_MAX && !self.disconnected {
            let job = if self.jobs.is_empty() {
                match self.rx.recv() {
                    Some(job) => job,
                    None => {
                        self.disconnected = true;
                        break;
                    }
                }
            } else {
                match self.rx.try_recv() {
                    Ok(job) => job,
                    Err(Empty::Now) => break,
                    Err(Empty::Closed) => {
                        self.disconnected = true;
                        break;
                    }
                }
            };
            self.add_job(job);
        }
    }

    fn add_job(&mut self, job: Job) {
        let seq = self.next_seq & SEQ_MASK;
        self.next_seq = self.next_seq.wrapping_add(1);
        let mut ops = Vec::with_capacity(job.ops.len());
        let mut unfinished = 0;
        for (index, op) in job.ops.into_iter().enumerate() {
            let finished = op.buf.is_empty();
            if !finished {
                unfinished += 1;
                self.pending.push_back((seq, index));
            }
            ops.push(OpState {
                kind: op.kind,
                offset: op.offset,
                buf: op.buf,
                done: 0,
                retries: 0,
                finished,
            });
        }
        self.jobs.push_back(JobState {
            seq,
            ops,
            unfinished,
            in_ring: 0,
            sync: if job.sync_after {
                SyncState::Waiting { retries: 0 }
            } else {
                SyncState::NotWanted
            },
            error: None,
            completer: job.completer,
        });
    }

    fn job_position(&self, seq: u64) -> Option<usize> {
        let front = self.jobs.front()?.seq;
        let position = usize::try_from(seq.wrapping_sub(front) & SEQ_MASK).ok()?;
        (position < self.jobs.len()).then_some(position)
    }

    /// Pushes an entry; false if the submission queue is full.
    ///
    /// # Safety
    /// Any memory the entry references must stay valid until its completion is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: forwarded to the caller.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    /// Issues the fdatasync of every job whose writes, and all earlier jobs' writes, completed.
    fn issue_syncs(&mut self) {
        let mut prefix_done = true;
        for position in 0..self.jobs.len() {
            if self.in_ring >= self.ring_slots {
                return;
            }
            let Some(job) = self.jobs.get(position) else {
                return;
            };
            prefix_done &= job.unfinished == 0;
            if !prefix_done {
                return;
            }
            let SyncState::Waiting { retries } = job.sync else {
                continue;
            };
            let user_data = (job.seq << INDEX_BITS) | SYNC_INDEX;
            let entry = opcode::Fsync::new(types::Fd(self.fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(user_data);
            // SAFETY: fsync references no memory.
            if !unsafe { self.push(&entry) } {
                return;
            }
            self.in_ring += 1;
            if let Some(job) = self.jobs.get_mut(position) {
                job.in_ring += 1;
                job.sync = SyncState::InRing { retries };
            }
        }
    }

    /// Moves pending reads/writes into the ring while there is room.
    fn issue_ops(&mut self) {
        while self.in_ring < self.ring_slots {
            let Some((seq, index)) = self.pending.pop_front() else {
                return;
            };
            let Some(position) = self.job_position(seq) else {
                continue;
            };
            let fd = self.fd;
            let Some(job) = self.jobs.get_mut(position) else {
                continue;
            };
            let failed = job.error.is_some();
            let Some(op) = job.ops.get_mut(index) else {
                continue;
            };
            if failed {
                // The batch already failed: skip the requests not yet started.
                op.finished = true;
                job.unfinished = job.unfinished.saturating_sub(1);
                continue;
            }
            let remaining = op.buf.len().saturating_sub(op.done).min(RW_BYTES_MAX);
            // Fits: RW_BYTES_MAX < u32::MAX.
            let len = u32::try_from(remaining).unwrap_or(u32::MAX);
            let offset = op.offset.saturating_add(op.done as u64);
            let user_data = (seq << INDEX_BITS) | index as u64;
            let entry = match op.kind {
                OpKind::Write => {
                    let Some(rest) = op.buf.get(op.done..) else {
                        continue;
                    };
                    opcode::Write::new(types::Fd(fd), rest.as_ptr(), len)
                        .offset(offset)
                        .build()
                        .user_data(user_data)
                }
                OpKind::Read => {
                    let done = op.done;
                    let Some(rest) = op.buf.get_mut(done..) else {
                        continue;
                    };
                    opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), len)
                        .offset(offset)
                        .build()
                        .user_data(user_data)
                }
            };
            // SAFETY: the buffer is owned by this job, which stays in `jobs` (heap allocation not
            // moved: AlignedBuf owns a separate allocation) until this request's completion is
            // reaped; `len` bytes from `done` lie within the buffer.
            if !unsafe { self.push(&entry) } {
                self.pending.push_front((seq, index));
                return;
            }
            self.in_ring += 1;
            if let Some(job) = self.jobs.get_mut(position) {
                job.in_ring += 1;
            }
        }
    }

    fn arm_wake(&mut self) {
        if self.wake_armed || self.disconnected {
            return;
        }
        let entry = opcode::Read::new(
            types::Fd(self.wake.0.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE_TOKEN);
        // SAFETY: wake_buf is a boxed 8-byte array owned by the engine; the engine waits for this
        // read to complete (disarm_wake) before it is dropped.
        if unsafe { self.push(&entry) } {
            self.wake_armed = true;
        }
    }

    /// Completes finished jobs from the front (tickets complete in submit order). True if any.
    fn complete_finished(&mut self) -> bool {
        let mut any = false;
        while self.jobs.front().is_some_and(JobState::is_finished) {
            let Some(job) = self.jobs.pop_front() else {
                break;
            };
            any = true;
            let result = match job.error {
                Some(err) => Err(err),
                None => Ok(job.ops.into_iter().map(|op| op.buf).collect()),
            };
            job.completer.complete(result);
        }
        any
    }

    fn wait_for_completions(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completion queue full: reaping makes room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self) {
        self.cqes.clear();
        self.cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        let cqes = std::mem::take(&mut self.cqes);
        for &(user_data, result) in &cqes {
            self.handle_completion(user_data, result);
        }
        self.cqes = cqes;
    }

    fn handle_completion(&mut self, user_data: u64, result: i32) {
        if user_data == WAKE_TOKEN {
            self.wake_armed = false;
            return;
        }
        let seq = user_data >> INDEX_BITS;
        let index = user_data & ((1 << INDEX_BITS) - 1);
        let Some(position) = self.job_position(seq) else {
            return;
        };
        self.in_ring = self.in_ring.saturating_sub(1);
        let target = Arc::clone(&self.target);
        let Some(job) = self.jobs.get_mut(position) else {
            return;
        };
        job.in_ring = job.in_ring.saturating_sub(1);
        if index == SYNC_INDEX {
            let SyncState::InRing { retries } = job.sync else {
                return;
            };
            if result >= 0 {
                job.sync = SyncState::Done;
            } else if is_transient(result) && retries < TRANSIENT_RETRIES_MAX {
                job.sync = SyncState::Waiting {
                    retries: retries + 1,
                };
            } else {
                job.sync = SyncState::Done;
                let err = io::Error::from_raw_os_error(result.saturating_neg());
                job.fail(target.error(&err, "fdatasync", 0, 0));
            }
            return;
        }
        let Ok(index) = usize::try_from(index) else {
            return;
        };
        let Some(op) = job.ops.get_mut(index) else {
            return;
        };
        let what = match op.kind {
            OpKind::Read => "read",
            OpKind::Write => "write",
        };
        let outcome = match usize::try_from(result) {
            Ok(0) if op.done < op.buf.len() => Err(match op.kind {
                OpKind::Read => io::Error::new(io::ErrorKind::UnexpectedEof, "end of file"),
                OpKind::Write => io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes"),
            }),
            Ok(transferred) => {
                op.done = op.done.saturating_add(transferred);
                Ok(op.done >= op.buf.len())
            }
            Err(_) if is_transient(result) && op.retries < TRANSIENT_RETRIES_MAX => {
                op.retries += 1;
                Ok(false)
            }
            Err(_) => Err(io::Error::from_raw_os_error(result.saturating_neg())),
        };
        match outcome {
            Ok(true) => {
                op.finished = true;
                job.unfinished = job.unfinished.saturating_sub(1);
            }
            // Short transfer or transient error: submit the rest again.
            Ok(false) => self.pending.push_back((seq, index)),
            Err(err) => {
                let err = target.error(&err, what, op.offset, op.buf.len());
                op.finished = true;
                job.unfinished = job.unfinished.saturating_sub(1);
                job.fail(err);
            }
        }
    }

    /// The ring itself failed: fail every job, leaking buffers the kernel may still reference.
    fn break_ring(&mut self, err: &io::Error) {
        let msg = format!(
            "{}: io_uring failed, log device unusable: {err}",
            self.target.path.display()
        );
        for mut job in self.jobs.drain(..) {
            let ops = std::mem::take(&mut job.ops);
            if job.in_ring > 0 {
                // The kernel may still write into these buffers: never free them.
                std::mem::forget(ops);
            }
            job.completer.complete(Err(io::Error::other(msg.clone())));
        }
        self.pending.clear();
        if self.wake_armed {
            // Same reason: the wake buffer may still be referenced by the kernel.
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
            self.wake_armed = false;
        }
        self.in_ring = 0;
        self.broken = Some(msg);
    }

    /// Before the engine (and wake_buf) is dropped: complete the armed wake read.
    fn disarm_wake(&mut self) {
        while self.wake_armed {
            self.wake.notify();
            if self.wait_for_completions().is_err() {
                std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new([0; 8])));
                return;
            }
            self.reap();
        }
    }
}

fn is_transient(result: i32) -> bool {
    result == -libc::EINTR || result == -libc::EAGAIN
}
