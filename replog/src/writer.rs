//! Group commit without threads of its own: batches are closed and submitted by whoever finds
//! the pipeline with room (the appender itself, a flush, or the completion of an earlier batch),
//! and finished on the I/O thread by the waker their ticket was polled with.
//!
//! Why: at queue depth 1 every thread hand-off costs a futex wake-up (tens of microseconds on a
//! small VM, more when the CPUs are busy). Two paths:
//! - Idle log, blocking waiter (leader): an append into an empty pipeline is *deferred*; the
//!   handle's `wait` closes the batch and writes it on its own thread (`Storage::write_now`),
//!   books it, submits whatever queued meanwhile, and resolves the batch's other waiters. No
//!   hand-off at all at queue depth 1. An async caller gets the same through
//!   `Appending::write_now_unless_sync`, only for a batch that needs no sync (a page-cache copy
//!   or a direct write may block a task for that long; an fdatasync may not).
//! - Otherwise (pipeline busy, or an async handle): the batch is submitted to the I/O thread,
//!   which completes it and resolves the appenders: one wake-up each way.
//!
//! While a leader writes, it occupies the whole pipeline (`State::inline_busy`): nothing else is
//! submitted until its write (and sync) completed, so the storage's ordering contract (a sync
//! covers every earlier write) holds without the I/O thread knowing about the leader's write.
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
    /// The batch ends with a sync (which covers every earlier write: the storage's contract).
    sync: bool,
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
        if st.inline_busy {
            // A leader writes on its own thread; it pumps when done.
            break;
        }
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
            finished.batches.push(finish(
                inner,
                st,
                batch.result,
                batch.waiters,
                (batch.last_lsn, batch.sync),
            ));
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
            sync: closed.sync,
        });
        // Loop: a synchronous storage completed it already (and the next may go now).
    }
    if room_made && st.room_waiters > 0 {
        inner.room.notify_all();
    }
    finished
}

/// Hands the open batch to the I/O thread if it is still the deferred batch `batch`.
pub(crate) fn kick(inner: &Inner, batch: u64) {
    let finished = {
        let mut st = lock(&inner.state);
        if !(st.open.deferred && st.open.seq == batch) {
            return;
        }
        pump(inner, &mut st)
    };
    finished.resolve();
}

/// The leader path: if `batch` is still the deferred open batch and nothing is in flight, closes
/// it and writes it on this thread, books it, submits what queued meanwhile and resolves the
/// batch's waiters (the caller's own included). Otherwise does nothing (the batch is on its way,
/// or already done).
pub(crate) fn lead(inner: &Inner, batch: u64) {
    lead_when(inner, batch, true);
}

/// [`lead`] for callers that must not block on a sync (an async task): leads only when the
/// batch needs no sync (its write goes to the page cache or straight to the disk, no fdatasync).
/// Returns whether it led; otherwise the batch is left to the ordinary path.
pub(crate) fn lead_without_sync(inner: &Inner, batch: u64) -> bool {
    lead_when(inner, batch, false)
}

fn lead_when(inner: &Inner, batch: u64, sync_allowed: bool) -> bool {
    let closed = {
        let mut st = lock(&inner.state);
        if !(st.open.deferred && st.open.seq == batch) {
            return false;
        }
        if !sync_allowed && (st.open.sync || !st.flush_waiters.is_empty()) {
            return false;
        }
        if !st.pipeline.is_empty() || st.inline_busy || st.failed.is_some() {
            // Cannot happen while deferred (whoever fills the pipeline takes the open batch
            // first), but if it did, the ordinary path is always correct.
            let finished = pump(inner, &mut st);
            drop(st);
            finished.resolve();
            return false;
        }
        st.inline_busy = true;
        close_batch(inner, &mut st)
    };
    let result = inner.storage.write_now(closed.writes, closed.sync);
    let finished = {
        let mut st = lock(&inner.state);
        st.inline_busy = false;
        let own = finish(
            inner,
            &mut st,
            Some(result),
            closed.waiters,
            (closed.last_lsn, closed.sync),
        );
        let mut finished = pump(inner, &mut st);
        finished.batches.insert(0, own);
        if st.room_waiters > 0 {
            // Drop may wait for the pipeline to drain.
            inner.room.notify_all();
        }
        finished
    };
    finished.resolve();
    true
}

/// Books a completed batch: moves `written_lsn` (and `durable_lsn` when it synced: batches
/// complete in submit order, so its sync covered every earlier batch), recycles buffers, or
/// fails the log.
fn finish(
    inner: &Inner,
    st: &mut State,
    result: Option<BatchResult>,
    waiters: Vec<Waiter>,
    (last_lsn, synced): (Lsn, bool),
) -> (Vec<Waiter>, Result<(), String>) {
    match result {
        Some(Ok(bufs)) => {
            if st.failed.is_none() {
                st.written_lsn = st.written_lsn.max(last_lsn);
                if synced {
                    st.durable_lsn = st.durable_lsn.max(last_lsn);
                }
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
    (waiters, result)
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
    st.open.deferred = false;
    st.open.seq = st.open.seq.wrapping_add(1);
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
    st.open.deferred = false;
    st.open.seq = st.open.seq.wrapping_add(1);
    st.index.truncate_after(failed_lsn.max(st.tail_lsn));
}
