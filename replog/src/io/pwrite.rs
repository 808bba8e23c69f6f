//! The fallback backend: blocking pwrite/pread/fdatasync on the dedicated I/O thread.
//!
//! Batches run one after another in submit order, so the ordering contract (a sync covers this
//! and every earlier batch) holds trivially. Short transfers are continued and EINTR retried by
//! std's `write_all_at`/`read_exact_at`; EAGAIN (not expected on blocking files) is retried here.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::intake::Intake;
use super::{AlignedBuf, Op, OpKind, Target, TRANSIENT_RETRIES_MAX};

pub(crate) fn spawn(target: Arc<Target>, rx: Arc<Intake>) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("replog-io-pwrite".into())
        .spawn(move || {
            // Ends when every IoFile clone is gone and the queue is drained.
            while let Some(job) = rx.recv() {
                let result = run_job(&target, job.ops, job.sync_after);
                job.completer.complete(result);
            }
        })
}

pub(crate) fn run_job(
    target: &Target,
    ops: Vec<Op>,
    sync_after: bool,
) -> io::Result<Vec<AlignedBuf>> {
    let mut bufs = Vec::with_capacity(ops.len());
    for mut op in ops {
        let len = op.buf.len();
        let (what, result) = match op.kind {
            OpKind::Write => (
                "write",
                retry_transient(|| target.file.write_all_at(&op.buf, op.offset)),
            ),
            OpKind::Read => (
                "read",
                retry_transient(|| target.file.read_exact_at(&mut op.buf, op.offset)),
            ),
        };
        result.map_err(|e| target.error(&e, what, op.offset, len))?;
        bufs.push(op.buf);
    }
    if sync_after {
        retry_transient(|| target.file.sync_data())
            .map_err(|e| target.error(&e, "fdatasync", 0, 0))?;
    }
    Ok(bufs)
}

/// fdatasync on the calling thread (see `IoFile::sync_completed_now`).
pub(crate) fn sync_now(target: &Target) -> io::Result<()> {
    retry_transient(|| target.file.sync_data()).map_err(|e| target.error(&e, "fdatasync", 0, 0))
}

/// One write that is durable when it returns (`pwritev2` with `RWF_DSYNC`: the kernel syncs just
/// this range and flushes the device cache, as O_DSYNC would), continued on short writes.
pub(crate) fn write_dsync(target: &Target, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        let rest = data.get(done..).unwrap_or_default();
        let iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let at = offset.saturating_add(done as u64);
        let at = libc::off_t::try_from(at).map_err(io::Error::other)?;
        // SAFETY: the iovec points into `data`, which outlives the call; the kernel only reads it.
        let n = unsafe { libc::pwritev2(target.file.as_raw_fd(), &iov, 1, at, libc::RWF_DSYNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                continue;
            }
            return Err(target.error(&e, "pwritev2(RWF_DSYNC)", offset, data.len()));
        }
        if n == 0 {
            let e = io::Error::new(io::ErrorKind::WriteZero, "pwritev2 wrote nothing");
            return Err(target.error(&e, "pwritev2(RWF_DSYNC)", offset, data.len()));
        }
        done += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

fn retry_transient(mut f: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut retries = 0;
    loop {
        match f() {
            Err(e)
                if retries < TRANSIENT_RETRIES_MAX
                    && matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) =>
            {
                retries += 1;
            }
            other => return other,
        }
    }
}
