//! The transmission phase of one connection.
//!
//! Shape: the connection task reads and checks request headers (and write payloads) in order;
//! each valid request runs in its own task against the export (a lone request runs in the
//! connection task itself, see below); replies are queued on the connection's [`ReplySink`],
//! which writes them in completion order. Replies therefore complete out of order (NBD matches
//! them by cookie).
//!
//! Bounds: a request permit (`max_inflight_requests`) is taken before a request is processed and
//! a byte permit (`max_inflight_bytes`, the payload length) before a write payload is read or a
//! read is issued; both are released only when the reply has been handed to the socket writer.
//! When either runs out, the reader stops reading the socket, which is the backpressure.

use std::borrow::Cow;
use std::sync::Arc;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, BufReader, BufWriter,
};
use tokio::sync::{watch, Semaphore};

use super::check::{check_request, Command};
use super::config::{ServerConfig, DISCARD_WRITE_LIMIT};
use super::export::{BlockError, Export};
use super::handshake::{skip, Negotiated};
use super::proto::{self, NbdErrno, Request};
use super::reply::{error_body, Permits, Reply, ReplyBody, ReplySink};
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
    let sink = Arc::new(ReplySink::new(
        writer,
        limits.structured,
        Arc::clone(&stats),
        cfg.max_inflight_requests,
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
                    sink.submit(Reply {
                        cookie: req.cookie,
                        body,
                        _permits: permits,
                    })
                    .await;
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
                Arc::clone(&sink),
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

    let gave_up = || {
        sink.abandon();
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
                answer_buffered_with_shutdown(&mut reader, &requests, &sink, &stats).await;
            }
            // Every request holds a slot until its reply is written: all slots back means
            // everything is answered.
            let all = u32::try_from(cfg.max_inflight_requests).unwrap_or(u32::MAX);
            let _all_done = requests.acquire_many(all).await;
            sink.close().await;
        };
        // Unbounded while the server runs (a client that stops reading holds only its own
        // connection slot), bounded once shutdown is requested.
        tokio::select! {
            () = finish => {}
            () = &mut drain_deadline => gave_up(),
        }
    }
    tracing::debug!(peer, ?end, "transmission ended");
}

/// Executes one request and queues its reply (with the permits it holds) for the writer.
async fn request_task<X: Export, W: AsyncWrite + Unpin + Send>(
    export: Arc<X>,
    command: Command,
    payload: Vec<u8>,
    cookie: u64,
    permits: Permits,
    sink: Arc<ReplySink<W>>,
    stats: Arc<ServerStats>,
) {
    let body = execute(&*export, command, payload, &stats).await;
    sink.submit(Reply {
        cookie,
        body,
        _permits: permits,
    })
    .await;
}

/// After shutdown, answers with `ESHUTDOWN` the complete requests the client already sent and
/// we have buffered (the spec: requests received during shutdown should get `ESHUTDOWN`, after
/// which the client must disconnect). Never reads the socket again.
async fn answer_buffered_with_shutdown<R: AsyncRead + Unpin, W: AsyncWrite + Unpin + Send>(
    reader: &mut BufReader<R>,
    requests: &Arc<Semaphore>,
    sink: &ReplySink<W>,
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
        sink.submit(Reply {
            cookie: req.cookie,
            body,
            _permits: permits,
        })
        .await;
        if !complete {
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

fn violation(stats: &ServerStats, peer: &str, what: &str) {
    stats::inc(&stats.protocol_violations_total);
    tracing::warn!(peer, "NBD protocol violation: {what}; closing connection");
}
