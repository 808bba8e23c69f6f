//! The transmission phase of one connection.
//!
//! Shape: the connection task reads and checks request headers (and write payloads) in order;
//! each valid request runs in its own task against the export; replies go through a bounded
//! channel to one writer task that batches them into the buffered socket writer and flushes when
//! the channel is momentarily empty. Replies therefore complete out of order (NBD matches them
//! by cookie).
//!
//! Bounds: a request permit (`max_inflight_requests`) is taken before a request is processed and
//! a byte permit (`max_inflight_bytes`, the payload length) before a write payload is read or a
//! read is issued; both are released only when the reply has been handed to the socket writer.
//! When either runs out, the reader stops reading the socket, which is the backpressure.

use std::borrow::Cow;
use std::io::IoSlice;
use std::sync::Arc;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    BufWriter,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::check::{check_request, Command};
use super::config::{ServerConfig, DISCARD_WRITE_LIMIT, IO_BUFFER_BYTES};
use super::export::{BlockError, Export};
use super::handshake::{skip, Negotiated};
use super::proto::{self, NbdErrno, Request};
use super::stats::{self, ServerStats};
use super::wait_shutdown;

/// Why the request loop stopped.
#[derive(Debug)]
enum End {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection (possibly mid-message).
    Eof,
    /// Server shutdown.
    Shutdown,
    /// Garbage or a hard-disconnect-worthy request.
    Violation,
    /// Socket error.
    Io,
    /// Shutdown was requested and the connection did not finish within the drain timeout.
    DrainTimeout,
}

/// A reply ready to be written, with the permits it holds until then.
struct Reply {
    cookie: u64,
    body: ReplyBody,
    _permits: Permits,
}

/// The bounds a request holds from the moment its header is read until its reply is handed to
/// the socket writer (or dropped because the connection died). Keeps the in-flight gauge.
struct Permits {
    _request: OwnedSemaphorePermit,
    bytes: Option<OwnedSemaphorePermit>,
    stats: Arc<ServerStats>,
}

impl Permits {
    fn new(request: OwnedSemaphorePermit, stats: &Arc<ServerStats>) -> Self {
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

enum ReplyBody {
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

/// Runs transmission until the client disconnects, breaks the protocol, or the server shuts
/// down; in-flight requests are always finished and answered before this returns.
pub(crate) async fn run<X, R, W>(
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    session: Negotiated<X>,
    cfg: &ServerConfig,
    stats: Arc<ServerStats>,
    mut shutdown: watch::Receiver<bool>,
    peer: &str,
) where
    X: Export,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let limits = session.limits;
    let export = session.export;
    let requests = Arc::new(Semaphore::new(cfg.max_inflight_requests));
    let bytes = Arc::new(Semaphore::new(cfg.max_inflight_bytes));
    // Every queued reply holds a request permit, so the channel never holds more than
    // `max_inflight_requests` replies and sends never wait for long.
    let (tx, rx) = mpsc::channel::<Reply>(cfg.max_inflight_requests);
    let writer_task = tokio::spawn(write_replies(
        writer,
        rx,
        limits.structured,
        Arc::clone(&stats),
    ));
    tracing::debug!(peer, export = %session.name, "transmission started");

    // Once shutdown is requested, the connection has `shutdown_drain_timeout` to finish; a
    // client that stops reading replies or sending its payload cannot hold the drain longer.
    let mut shutdown_for_deadline = shutdown.clone();
    let drain_deadline = async move {
        wait_shutdown(&mut shutdown_for_deadline).await;
        tokio::time::sleep(cfg.shutdown_drain_timeout).await;
    };
    tokio::pin!(drain_deadline);

    let request_loop = async {
        loop {
            let mut raw = [0u8; proto::REQUEST_HEADER_LEN];
            // Shutdown is observed while waiting for a header: a header cut short by it is
            // dropped with the connection. A payload in progress is read to its end.
            tokio::select! {
                biased;
                _ = wait_shutdown(&mut shutdown) => break End::Shutdown,
                read = reader.read_exact(&mut raw) => match read {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break End::Eof,
                    Err(e) => {
                        tracing::debug!(peer, error = %e, "read failed");
                        break End::Io;
                    }
                },
            }
            let req = match proto::decode_request(&raw) {
                Ok(req) => req,
                Err(magic) => {
                    violation(&stats, peer, &format!("bad request magic {magic:#010x}"));
                    break End::Violation;
                }
            };
            stats::inc(stats.request_counter(req.command));
            // A request whose header was read is served even during shutdown (the drain deadline
            // bounds the wait for a slot when the client does not read its replies).
            let Ok(request_permit) = Arc::clone(&requests).acquire_owned().await else {
                break End::Io;
            };
            let mut permits = Permits::new(request_permit, &stats);

            let command = match check_request(&req, &limits) {
                Ok(command) => command,
                Err(errno) => {
                    if req.command == proto::CMD_WRITE && req.length > 0 {
                        // The payload follows the header whatever we think of the request; read
                        // and drop it so the stream stays in sync, unless it is so large that the
                        // spec lets us call it an attack.
                        if req.length > DISCARD_WRITE_LIMIT.max(limits.sizes.max) {
                            violation(&stats, peer, &format!("write of {} bytes", req.length));
                            break End::Violation;
                        }
                        if skip(&mut reader, u64::from(req.length)).await.is_err() {
                            break End::Eof;
                        }
                    }
                    let body =
                        error_body(errno, None, Cow::Borrowed(rejection_message(errno, &req)));
                    if send(&tx, req.cookie, body, permits).await.is_err() {
                        break End::Io;
                    }
                    continue;
                }
            };

            let payload_len = match command {
                Command::Read { len, .. } | Command::Write { len, .. } => len,
                _ => 0,
            };
            if payload_len > 0 {
                match Arc::clone(&bytes).acquire_many_owned(payload_len).await {
                    Ok(p) => permits.bytes = Some(p),
                    Err(_) => break End::Io,
                }
            }

            let payload = match command {
                Command::Disc => break End::Disconnect,
                Command::Write { len, .. } if len > 0 => match read_payload(&mut reader, len).await
                {
                    Ok(data) => data,
                    Err(e) => {
                        tracing::warn!(peer, error = %e, len, "connection lost in the middle of a write payload");
                        stats::inc(&stats.protocol_violations_total);
                        break End::Eof;
                    }
                },
                _ => Vec::new(),
            };

            let task = request_task(
                Arc::clone(&export),
                command,
                payload,
                req.cookie,
                permits,
                tx.clone(),
                Arc::clone(&stats),
            );
            // A lone request (nothing else in flight, nothing more received) runs right here:
            // handing it to another task would only add a wake-up to its latency (queue depth 1).
            // As soon as more input arrives it moves to its own task, so a slow request never holds
            // up the ones behind it.
            let alone = requests.available_permits() + 1 == cfg.max_inflight_requests
                && reader.buffer().is_empty();
            if alone {
                let mut task = Box::pin(task);
                tokio::select! {
                    biased;
                    () = &mut task => {}
                    _ = reader.fill_buf() => {
                        tokio::spawn(task);
                    }
                }
            } else {
                tokio::spawn(task);
            }
        }
    };
    let end = tokio::select! {
        end = request_loop => end,
        () = &mut drain_deadline => End::DrainTimeout,
    };

    let abort_writer = writer_task.abort_handle();
    let gave_up = || {
        abort_writer.abort();
        tracing::warn!(
            peer,
            timeout = ?cfg.shutdown_drain_timeout,
            "gave up draining replies after shutdown"
        );
    };
    if matches!(end, End::DrainTimeout) {
        // The deadline future has completed; it must not be polled again.
        gave_up();
    } else {
        let finish = async {
            if matches!(end, End::Shutdown) {
                answer_buffered_with_shutdown(&mut reader, &requests, &tx, &stats).await;
            }
            // The writer ends when the last sender is gone: ours now, the request tasks'
            // when they finish.
            drop(tx);
            writer_task.await
        };
        // Unbounded while the server runs (a client that stops reading holds only its own
        // connection slot), bounded once shutdown is requested.
        tokio::select! {
            drained = finish => {
                if let Err(join) = drained {
                    tracing::error!(peer, error = %join, "reply writer task failed");
                }
            }
            () = &mut drain_deadline => gave_up(),
        }
    }
    tracing::debug!(peer, ?end, "transmission ended");
}

/// Executes one request and queues its reply (with the permits it holds) for the writer.
async fn request_task<X: Export>(
    export: Arc<X>,
    command: Command,
    payload: Vec<u8>,
    cookie: u64,
    permits: Permits,
    tx: mpsc::Sender<Reply>,
    stats: Arc<ServerStats>,
) {
    let body = execute(&*export, command, payload, &stats).await;
    // The writer only goes away when the connection is dead; nothing to do then.
    let _ = send(&tx, cookie, body, permits).await;
}

/// After shutdown, answers with `ESHUTDOWN` the complete requests the client already sent and
/// we have buffered (the spec: requests received during shutdown should get `ESHUTDOWN`, after
/// which the client must disconnect). Never reads the socket again.
async fn answer_buffered_with_shutdown<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    requests: &Arc<Semaphore>,
    tx: &mpsc::Sender<Reply>,
    stats: &Arc<ServerStats>,
) {
    loop {
        let buffered = reader.buffer();
        let Some(raw) = buffered.first_chunk::<{ proto::REQUEST_HEADER_LEN }>() else {
            return;
        };
        let Ok(req) = proto::decode_request(raw) else {
            return;
        };
        let mut consumed = proto::REQUEST_HEADER_LEN;
        if req.command == proto::CMD_DISC {
            return;
        }
        if req.command == proto::CMD_WRITE {
            consumed += req.length as usize;
        }
        let available = buffered.len();
        let complete = consumed <= available;
        std::pin::Pin::new(&mut *reader).consume(consumed.min(available));
        let Ok(permit) = Arc::clone(requests).acquire_owned().await else {
            return;
        };
        stats::inc(stats.request_counter(req.command));
        let permits = Permits::new(permit, stats);
        let body = error_body(
            NbdErrno::Shutdown,
            None,
            Cow::Borrowed("server is shutting down"),
        );
        if send(tx, req.cookie, body, permits).await.is_err() || !complete {
            return;
        }
    }
}

/// Reads a write payload of exactly `len` bytes into a buffer allocated once at that size
/// (`len` was checked against the maximum block size before).
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    len: u32,
) -> std::io::Result<Vec<u8>> {
    let len = len as usize;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        // `read_buf` fills only the spare capacity, so the buffer never grows past `len`.
        let n = (&mut *reader)
            .take((len - data.len()) as u64)
            .read_buf(&mut data)
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(data)
}

/// Runs one validated command against the export.
async fn execute<X: Export>(
    export: &X,
    command: Command,
    payload: Vec<u8>,
    stats: &ServerStats,
) -> ReplyBody {
    let result = match command {
        Command::Read { offset, len: 0 } => {
            return ReplyBody::Data {
                offset,
                data: Vec::new(),
            }
        }
        Command::Read { offset, len } => match export.read(offset, len).await {
            Ok(data) if data.len() == len as usize => {
                stats::add(&stats.read_bytes_total, u64::from(len));
                return ReplyBody::Data { offset, data };
            }
            Ok(data) => {
                tracing::error!(
                    offset,
                    len,
                    got = data.len(),
                    "export returned a short read"
                );
                return error_body(NbdErrno::Io, Some(offset), "short read from export".into());
            }
            Err(e) => Err((e, offset)),
        },
        Command::Write { len: 0, .. }
        | Command::WriteZeroes { len: 0, .. }
        | Command::Trim { len: 0, .. } => Ok(()),
        Command::Write { offset, len, fua } => {
            let r = export.write(offset, payload, fua).await;
            if r.is_ok() {
                stats::add(&stats.written_bytes_total, u64::from(len));
            }
            r.map_err(|e| (e, offset))
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
        } => export
            .write_zeroes(offset, len, fua, may_trim)
            .await
            .map_err(|e| (e, offset)),
        Command::Trim { offset, len, fua } => {
            export.trim(offset, len, fua).await.map_err(|e| (e, offset))
        }
        Command::Flush => export.flush().await.map_err(|e| (e, 0)),
        Command::BlockStatus {
            len, context_id, ..
        } => {
            // We do not track allocation: status 0 ("allocated, contents unknown") is always
            // correct, for the whole requested range.
            return ReplyBody::BlockStatus {
                context_id,
                len,
                status: 0,
            };
        }
        Command::Disc => Ok(()),
    };
    match result {
        Ok(()) => ReplyBody::Done,
        Err((err, offset)) => {
            let errno = err.errno();
            // An I/O failure is located at the request (we do not know the exact byte); other
            // errors concern the request as a whole.
            let at = matches!(err, BlockError::Io(_)) && !matches!(command, Command::Flush);
            error_body(errno, at.then_some(offset), Cow::Owned(err.to_string()))
        }
    }
}

fn error_body(errno: NbdErrno, offset: Option<u64>, message: Cow<'static, str>) -> ReplyBody {
    ReplyBody::Error {
        errno,
        message,
        offset,
    }
}

/// The message sent with a request the checks refused.
fn rejection_message(errno: NbdErrno, req: &Request) -> &'static str {
    match errno {
        NbdErrno::Perm => "export is read-only",
        NbdErrno::NoSpc => "write beyond the end of the export",
        NbdErrno::Inval => match req.command {
            proto::CMD_READ
            | proto::CMD_WRITE
            | proto::CMD_TRIM
            | proto::CMD_WRITE_ZEROES
            | proto::CMD_BLOCK_STATUS => {
                "invalid request: flags, range, alignment or length not accepted"
            }
            _ => "unknown command",
        },
        _ => "request refused",
    }
}

async fn send(
    tx: &mpsc::Sender<Reply>,
    cookie: u64,
    body: ReplyBody,
    permits: Permits,
) -> Result<(), ()> {
    tx.send(Reply {
        cookie,
        body,
        _permits: permits,
    })
    .await
    .map_err(|_| ())
}

fn violation(stats: &ServerStats, peer: &str, what: &str) {
    stats::inc(&stats.protocol_violations_total);
    tracing::warn!(peer, "NBD protocol violation: {what}; closing connection");
}

/// The writer task: encodes replies into the buffered writer, flushing when no more replies are
/// immediately available, and shuts the socket down at the end.
async fn write_replies<W: AsyncWrite + Unpin + Send>(
    mut writer: BufWriter<W>,
    mut rx: mpsc::Receiver<Reply>,
    structured: bool,
    stats: Arc<ServerStats>,
) {
    let result: std::io::Result<()> = async {
        while let Some(reply) = rx.recv().await {
            write_reply(&mut writer, reply, structured, &stats).await?;
            while let Ok(reply) = rx.try_recv() {
                write_reply(&mut writer, reply, structured, &stats).await?;
            }
            writer.flush().await?;
        }
        writer.shutdown().await
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "writing replies failed");
        // Drain so that request tasks can finish and permits are released.
        rx.close();
        while let Some(reply) = rx.recv().await {
            drop(reply);
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
