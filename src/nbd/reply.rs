//! Replies on their way to the socket.
//!
//! There is no writer task: whoever has a reply ready (a request task, or the connection task
//! for refusals and lone requests) queues it and tries to take the socket writer. The taker
//! writes everything queued, then flushes, so replies that complete together go out in one
//! write, and no task has to be woken just to write a reply. After releasing the writer the
//! taker looks at the queue again, so a reply queued while the writer was busy is never left
//! behind.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::config::IO_BUFFER_BYTES;
use super::proto::{self, NbdErrno};
use super::stats::{self, ServerStats};

/// A reply ready to be written, with the permits it holds until then.
pub(crate) struct Reply {
    pub cookie: u64,
    pub body: ReplyBody,
    /// Held until the reply is written (or dropped with the connection), then released.
    pub _permits: Permits,
}

/// The bounds a request holds from the moment its header is read until its reply is handed to
/// the socket writer (or dropped because the connection died). Keeps the in-flight gauge.
pub(crate) struct Permits {
    _request: OwnedSemaphorePermit,
    pub bytes: Option<OwnedSemaphorePermit>,
    stats: Arc<ServerStats>,
}

impl Permits {
    pub fn new(request: OwnedSemaphorePermit, stats: &Arc<ServerStats>) -> Self {
        stats::inc(&stats.requests_inflight);
        Permits {
            _request: request,
            bytes: None,
            stats: Arc::clone(stats),
        }
    }
}

impl Drop for Permits {
    fn drop(&mut self) {
        stats::dec(&self.stats.requests_inflight);
    }
}

pub(crate) enum ReplyBody {
    /// Success without data.
    Done,
    /// A successful read.
    Data { offset: u64, data: Vec<u8> },
    /// One `base:allocation` extent.
    BlockStatus {
        context_id: u32,
        len: u32,
        status: u32,
    },
    /// A failed request. `offset` selects `NBD_REPLY_TYPE_ERROR_OFFSET` (structured replies).
    Error {
        errno: NbdErrno,
        message: Cow<'static, str>,
        offset: Option<u64>,
    },
}

pub(crate) fn error_body(
    errno: NbdErrno,
    offset: Option<u64>,
    message: Cow<'static, str>,
) -> ReplyBody {
    ReplyBody::Error {
        errno,
        message,
        offset,
    }
}

/// The socket writer of one connection and the replies waiting for it.
pub(crate) struct ReplySink<W> {
    /// Replies not yet written. Bounded: each holds a request permit.
    queue: Mutex<VecDeque<Reply>>,
    /// `None` once writing failed or the connection was abandoned: replies are then dropped.
    writer: tokio::sync::Mutex<Option<BufWriter<W>>>,
    structured: bool,
    stats: Arc<ServerStats>,
    /// Set (and notified) when the connection gives up on a client that does not read.
    abandoned: AtomicBool,
    abandon: Notify,
}

impl<W: AsyncWrite + Unpin + Send> ReplySink<W> {
    pub fn new(
        writer: BufWriter<W>,
        structured: bool,
        stats: Arc<ServerStats>,
        max_queued: usize,
    ) -> Self {
        ReplySink {
            queue: Mutex::new(VecDeque::with_capacity(max_queued)),
            writer: tokio::sync::Mutex::new(Some(writer)),
            structured,
            stats,
            abandoned: AtomicBool::new(false),
            abandon: Notify::new(),
        }
    }

    /// Queues a reply and writes whatever is queued unless someone else is writing already.
    pub async fn submit(&self, reply: Reply) {
        self.lock_queue().push_back(reply);
        self.pump().await;
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Reply>> {
        // A poisoned queue only means a writer panicked mid-push; the data is still sound.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pop(&self) -> Option<Reply> {
        self.lock_queue().pop_front()
    }

    async fn pump(&self) {
        loop {
            let Ok(mut guard) = self.writer.try_lock() else {
                // The holder writes our reply: it checks the queue after releasing the writer.
                return;
            };
            while let Some(reply) = self.pop() {
                let Some(writer) = guard.as_mut() else {
                    drop(reply);
                    continue;
                };
                if self
                    .guarded(write_reply(writer, reply, self.structured, &self.stats))
                    .await
                    .is_err()
                {
                    *guard = None;
                }
            }
            if let Some(writer) = guard.as_mut() {
                if self.guarded(writer.flush()).await.is_err() {
                    *guard = None;
                }
            }
            drop(guard);
            if self.lock_queue().is_empty() {
                return;
            }
        }
    }

    /// Runs a socket write unless the connection is abandoned first.
    async fn guarded<F: std::future::Future<Output = std::io::Result<()>>>(
        &self,
        io: F,
    ) -> std::io::Result<()> {
        let abandon = self.abandon.notified();
        tokio::pin!(abandon);
        abandon.as_mut().enable();
        if self.abandoned.load(Ordering::Acquire) {
            return Err(std::io::ErrorKind::ConnectionAborted.into());
        }
        tokio::select! {
            result = io => result.inspect_err(|e| tracing::debug!(error = %e, "writing replies failed")),
            () = abandon => Err(std::io::ErrorKind::ConnectionAborted.into()),
        }
    }

    /// Flushes and shuts down the socket's write side (all replies are written by now).
    pub async fn close(&self) {
        let mut guard = self.writer.lock().await;
        if let Some(writer) = guard.as_mut() {
            let _ = self.guarded(writer.shutdown()).await;
        }
        *guard = None;
    }

    /// Gives up on the client: pending and future writes fail, replies are dropped, and the
    /// socket's write side is released as soon as no write is in progress.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.abandon.notify_waiters();
        if let Ok(mut guard) = self.writer.try_lock() {
            *guard = None;
        }
    }
}

async fn write_reply<W: AsyncWrite + Unpin + Send>(
    writer: &mut BufWriter<W>,
    reply: Reply,
    structured: bool,
    stats: &ServerStats,
) -> std::io::Result<()> {
    let cookie = reply.cookie;
    let done = proto::REPLY_FLAG_DONE;
    match (&reply.body, structured) {
        (ReplyBody::Done, false) => {
            writer
                .write_all(&proto::encode_simple_reply(0, cookie))
                .await
        }
        (ReplyBody::Done, true) => {
            let h = proto::encode_chunk_header(done, proto::CHUNK_NONE, cookie, 0);
            writer.write_all(&h).await
        }
        (ReplyBody::Data { data, .. }, false) => {
            let h = proto::encode_simple_reply(0, cookie);
            write_with_data(writer, &h, data).await
        }
        (ReplyBody::Data { data, .. }, true) if data.is_empty() => {
            let h = proto::encode_chunk_header(done, proto::CHUNK_NONE, cookie, 0);
            writer.write_all(&h).await
        }
        (ReplyBody::Data { offset, data }, true) => {
            // One OFFSET_DATA chunk, final: all data is in hand, no error can follow.
            // Lengths are bounded by the maximum block size (<= 2^31), so they fit.
            let len = (data.len() + 8) as u32;
            let mut h = [0u8; proto::CHUNK_HEADER_LEN + 8];
            let (head, off) = h.split_at_mut(proto::CHUNK_HEADER_LEN);
            head.copy_from_slice(&proto::encode_chunk_header(
                done,
                proto::CHUNK_OFFSET_DATA,
                cookie,
                len,
            ));
            off.copy_from_slice(&offset.to_be_bytes());
            write_with_data(writer, &h, data).await
        }
        (
            ReplyBody::BlockStatus {
                context_id,
                len,
                status,
            },
            true,
        ) => {
            let payload = proto::encode_block_status_payload(*context_id, *len, *status);
            let h = proto::encode_chunk_header(done, proto::CHUNK_BLOCK_STATUS, cookie, 12);
            writer.write_all(&h).await?;
            writer.write_all(&payload).await
        }
        // Block status needs a meta context, which needs structured replies; the checks make
        // this unreachable, and a simple EINVAL is the honest answer if it ever happens.
        (ReplyBody::BlockStatus { .. }, false) => {
            stats::inc(&stats.errors_total);
            let h = proto::encode_simple_reply(NbdErrno::Inval.code(), cookie);
            writer.write_all(&h).await
        }
        (ReplyBody::Error { errno, .. }, false) => {
            stats::inc(&stats.errors_total);
            writer
                .write_all(&proto::encode_simple_reply(errno.code(), cookie))
                .await
        }
        (
            ReplyBody::Error {
                errno,
                message,
                offset,
            },
            true,
        ) => {
            stats::inc(&stats.errors_total);
            let payload = proto::encode_error_payload(errno.code(), message, *offset);
            let kind = if offset.is_some() {
                proto::CHUNK_ERROR_OFFSET
            } else {
                proto::CHUNK_ERROR
            };
            let h = proto::encode_chunk_header(done, kind, cookie, payload.len() as u32);
            writer.write_all(&h).await?;
            writer.write_all(&payload).await
        }
    }
}

/// Writes a reply header followed by its data. Small replies are batched in the buffer; large
/// ones go to the socket as one vectored write (header and data together, no copy).
async fn write_with_data<W: AsyncWrite + Unpin + Send>(
    writer: &mut BufWriter<W>,
    header: &[u8],
    data: &[u8],
) -> std::io::Result<()> {
    if header.len() + data.len() <= IO_BUFFER_BYTES.saturating_sub(writer.buffer().len()) {
        writer.write_all(header).await?;
        return writer.write_all(data).await;
    }
    writer.flush().await?;
    let inner = writer.get_mut();
    let (mut header, mut data) = (header, data);
    while !header.is_empty() || !data.is_empty() {
        let slices = [IoSlice::new(header), IoSlice::new(data)];
        let n = inner.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_header = n.min(header.len());
        header = header.get(from_header..).unwrap_or_default();
        data = data.get(n - from_header..).unwrap_or_default();
    }
    Ok(())
}
