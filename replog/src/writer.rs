//! Group commit without threads of its own: batches are closed and submitted by whoever finds
//! the pipeline with room (the appender itself, a flush, or the completion of an earlier batch),
//! and finished on the I/O thread by the waker their ticket was polled with.
//!
//! Why: at queue depth 1 every thread hand-off costs a futex wake-up (tens of microseconds on a
//! small VM). The path of one append is now: the appender closes and submits its batch (one
//! wake-up of the I/O thread), the I/O thread completes the write and resolves the appender
//! (one wake-up of the appender). The old writer and completer threads added two more.
//!
//! Group commit: while [`BATCHES_IN_FLIGHT_MAX`] batches are in flight, appends collect in the
//! open batch; when the oldest completes, its completion closes the open batch and submits all of
//! it with a single write (two at a lap end) and at most one sync. A batch syncs if any of its
//! appends asked for Durable or a flush is pending.
//!
//! Invariants:
//! - Batches are closed and submitted under the state lock, so submit order == close order ==
//!   ring order, and the storage completes them in that order (its contract).
//! - `State::pipeline` holds the submitted batches in submit order; only its front is finished,
//!   so `written_lsn` moves over a prefix and a batch's waiters resolve only after its own write
//!   (and every earlier one) completed. A failed batch fails every later one.
//! - At most [`BATCHES_IN_FLIGHT_MAX`] batches are in the pipeline; `Storage::submit` never
//!   blocks, so holding the state lock while submitting cannot deadlock with the I/O thread
//!   that takes the lock to finish a batch.
//! - Whenever the open batch (or a flush) has work and the pipeline has room, it is submitted
//!   before the state lock is released (`pump`), so nothing waits without a completion coming.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake};

use crate::appending::Waiter;
use crate::error::Error;
use crate::format::{round_up, EntryHeader, RecordKind, BLOCK_BYTES, ENTRY_HEADER_BYTES};
use crate::io::{AlignedBuf, BatchResult, IoTicket};
use crate::log::{lock, Inner, State, BATCHES_IN_FLIGHT_MAX};
use crate::Lsn;

/// A submitted batch on its way to completion.
pub(crate) struct InFlight {
    ticket: IoTicket,
    /// The ticket's result once it resolved (polled but not yet finished).
    result: Option<BatchResult>,
    waiters: Vec<Waiter>,
    last_lsn: Lsn,
}

/// Finished batches whose waiters are still to be resolved (outside the state lock).
#[must_use = "finished batches must be resolved"]
pub(crate) struct Finished {
    batches: Vec<(Vec<Waiter>, Result<(), String>)>,
}

impl Finished {
    /// Resolves every waiter (written, or failed with the log's failure).
    pub(crate) fn resolve(self) {
        for (waiters, result) in self.batches {
            for w in waiters {
                let lsn = w.lsn;
                match &result {
                    Ok(()) => w.resolve(Ok(lsn)),
                    Err(what) => w.resolve(Err(Error::Failed { what: what.clone() })),
                }
            }
        }
    }
}

/// The waker every batch ticket is polled with: runs on the I/O thread when a ticket completes.
pub(crate) struct CompletionWaker {
    inner: Weak<Inner>,
}

impl CompletionWaker {
    pub(crate) fn new(inner: Weak<Inner>) -> CompletionWaker {
        CompletionWaker { inner }
    }
}

impl Wake for CompletionWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Gone: the replog was dropped, which waited for its pipeline to drain first.
        if let Some(inner) = self.inner.upgrade() {
            let finished = {
                let mut st = lock(&inner.state);
                pump(&inner, &mut st)
            };
            finished.resolve();
        }
    }
}

/// Under the state lock: finishes completed batches from the front of the pipeline, and submits
/// the open batch (or a pending flush) while the pipeline has room. Wakes appenders waiting for
/// room when the open batch was taken. Call after every change to the open batch or pipeline.
pub(crate) fn pump(inner: &Inner, st: &mut State) -> Finished {
    let mut finished = Finished {
        batches: Vec::new(),
    };
    let mut room_made = false;
    loop {
        while let Some(front) = st.pipeline.front_mut() {
            if front.result.is_none() {
                let mut cx = Context::from_waker(&inner.completion_waker);
                match Pin::new(&mut front.ticket).poll(&mut cx) {
                    Poll::Ready(result) => front.result = Some(result),
                    Poll::Pending => break,
                }
            }
            let Some(batch) = st.pipeline.pop_front() else {
                break;
            };
            finished.batches.push(finish(inner, st, batch));
            room_made = true;
        }
        if st.failed.is_some() {
            fail_pending(st);
            room_made = true;
        }
        let has_work = st.open.fill > 0 || !st.flush_waiters.is_empty();
        if !has_work || st.pipeline.len() >= BATCHES_IN_FLIGHT_MAX {
            break;
        }
        let closed = close_batch(inner, st);
        room_made = true;
        let ticket = inner.storage.submit(closed.writes, closed.sync);
        st.pipeline.push_back(InFlight {
            ticket,
            result: None,
            waiters: closed.waiters,
            last_lsn: closed.last_lsn,
        });
        // Loop: a synchronous storage completed it already (and the next may go now).
    }
    if room_made && st.room_waiters > 0 {
        inner.room.notify_all();
    }
    finished
}

/// Books a completed batch: moves `written_lsn`, recycles buffers, or fails the log.
fn finish(inner: &Inner, st: &mut State, batch: InFlight) -> (Vec<Waiter>, Result<(), String>) {
    match batch.result {
        Some(Ok(bufs)) => {
            if st.failed.is_none() {
                st.written_lsn = st.written_lsn.max(batch.last_lsn);
            }
            for mut buf in bufs {
                let full = usize::try_from(inner.batch_buffer_bytes).unwrap_or(0);
                if buf.capacity() >= full
                    && st.pool.len() < crate::log::BUFFER_POOL_MAX
                    && buf.set_len(full).is_ok()
                {
                    st.pool.push(buf);
                }
            }
        }
        Some(Err(e)) => {
            if st.failed.is_none() {
                st.failed = Some(format!("{}: batch write failed: {e}", inner.path));
            }
        }
        None => {
            if st.failed.is_none() {
                st.failed = Some(format!("{}: batch finished without a result", inner.path));
            }
        }
    }
    let result = match &st.failed {
        None => Ok(()),
        Some(what) => Err(what.clone()),
    };
    (batch.waiters, result)
}

/// A closed batch ready to submit.
struct Closed {
    writes: Vec<(u64, AlignedBuf)>,
    sync: bool,
    waiters: Vec<Waiter>,
    last_lsn: Lsn,
}

/// Takes the open batch (or a pending flush), pads it to a block and splits it at the lap end.
fn close_batch(inner: &Inner, st: &mut State) -> Closed {
    let ring = inner.ring_bytes;
    let flush_waiters = std::mem::take(&mut st.flush_waiters);
    let mut waiters = std::mem::take(&mut st.open.waiters);
    let sync = st.open.sync || !flush_waiters.is_empty();
    waiters.extend(flush_waiters);
    let last_lsn = st.last_lsn;
    let fill = st.open.fill;
    let start = st.open.start_vpos;
    let mut writes = Vec::new();
    if let (true, Some(mut buf)) = (fill > 0, st.open.buf.take()) {
        let end = start + fill;
        let aligned = round_up(end, BLOCK_BYTES);
        if aligned > end {
            // Batch-end pad: fills the block so the next batch starts on a fresh one.
            let pad = EntryHeader {
                kind: RecordKind::Pad,
                uuid: inner.uuid,
                vpos: end,
                lsn: st.open.last_lsn,
                generation: inner.generation,
                device: 0,
                offset: 0,
                len: aligned - end - ENTRY_HEADER_BYTES as u64,
                timestamp_ns: 0,
                data_crc: 0,
            };
            let from = usize::try_from(fill).unwrap_or(usize::MAX);
            let to = usize::try_from(aligned - start).unwrap_or(usize::MAX);
            if let Some(dst) = buf.get_mut(from..to) {
                dst.fill(0);
                pad.encode_into(dst);
            }
        }
        let total = aligned - start;
        let phys = inner.ring_start() + start % ring;
        let first_len = total.min(ring - start % ring);
        if first_len < total {
            // The batch crosses the lap end: the rest goes to the ring start.
            let from = usize::try_from(first_len).unwrap_or(usize::MAX);
            let to = usize::try_from(total).unwrap_or(usize::MAX);
            let second = AlignedBuf::from_slice(buf.get(from..to).unwrap_or_default());
            truncate(&mut buf, first_len);
            writes.push((phys, buf));
            writes.push((inner.ring_start(), second));
        } else {
            truncate(&mut buf, total);
            writes.push((phys, buf));
        }
        st.next_vpos = aligned;
        st.open.start_vpos = aligned;
    }
    st.open.fill = 0;
    st.open.sync = false;
    Closed {
        writes,
        sync,
        waiters,
        last_lsn,
    }
}

fn truncate(buf: &mut AlignedBuf, len: u64) {
    buf.truncate(usize::try_from(len).unwrap_or(usize::MAX));
}

/// After a failed write: every queued append and flush fails; the open batch is dropped.
fn fail_pending(st: &mut State) {
    let what = st.failed.clone().unwrap_or_default();
    let failed_lsn = st.written_lsn;
    for w in st.open.waiters.drain(..).chain(st.flush_waiters.drain(..)) {
        w.resolve(Err(Error::Failed { what: what.clone() }));
    }
    st.open.fill = 0;
    st.open.sync = false;
    st.index.truncate_after(failed_lsn.max(st.tail_lsn));
}
