//! The group-commit writer: one thread closes the open batch and submits it, one thread completes
//! batches in submit order and resolves the appenders' handles.
//!
//! Group commit: while up to [`BATCHES_IN_FLIGHT_MAX`] batches are in flight, appends collect in
//! the open batch; the next submit carries all of them with a single write (two at a lap end) and
//! at most one sync. A batch syncs if any of its appends asked for Durable or a flush is pending.

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::appending::Waiter;
use crate::error::{Error, Result};
use crate::format::{round_up, EntryHeader, RecordKind, BLOCK_BYTES, ENTRY_HEADER_BYTES};
use crate::io::{AlignedBuf, IoTicket};
use crate::log::{lock, Inner, State, BATCHES_IN_FLIGHT_MAX};
use crate::Lsn;

/// A submitted batch on its way to completion.
struct InFlight {
    ticket: IoTicket,
    waiters: Vec<Waiter>,
    last_lsn: Lsn,
}

/// Starts the writer and completer threads.
pub(crate) fn start(inner: &Arc<Inner>) -> Result<Vec<JoinHandle<()>>> {
    let (tx, rx) = mpsc::sync_channel::<InFlight>(BATCHES_IN_FLIGHT_MAX);
    let spawn_error = |e: std::io::Error| Error::io("spawn writer thread", &inner.path, e);
    let writer = {
        let inner = Arc::clone(inner);
        std::thread::Builder::new()
            .name("replog-writer".to_string())
            .spawn(move || writer_loop(&inner, &tx))
            .map_err(spawn_error)?
    };
    let completer = {
        let inner = Arc::clone(inner);
        std::thread::Builder::new()
            .name("replog-complete".to_string())
            .spawn(move || completer_loop(&inner, &rx))
            .map_err(spawn_error)?
    };
    Ok(vec![writer, completer])
}

/// A closed batch ready to submit.
struct Closed {
    writes: Vec<(u64, AlignedBuf)>,
    sync: bool,
    waiters: Vec<Waiter>,
    last_lsn: Lsn,
}

fn writer_loop(inner: &Inner, tx: &SyncSender<InFlight>) {
    loop {
        let closed = {
            let mut st = lock(&inner.state);
            loop {
                if st.failed.is_some() {
                    fail_pending(&mut st);
                }
                let has_work = st.open.fill > 0 || !st.flush_waiters.is_empty();
                if has_work && st.in_flight < BATCHES_IN_FLIGHT_MAX {
                    break;
                }
                if st.shutdown && !has_work {
                    return;
                }
                st = inner
                    .work
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            st.in_flight += 1;
            close_batch(inner, &mut st)
        };
        inner.room.notify_all();
        let ticket = inner.storage.submit(closed.writes, closed.sync);
        let sent = tx.send(InFlight {
            ticket,
            waiters: closed.waiters,
            last_lsn: closed.last_lsn,
        });
        if sent.is_err() {
            // The completer is gone (it only stops when this sender is dropped): nothing to do.
            return;
        }
    }
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

fn completer_loop(inner: &Inner, rx: &Receiver<InFlight>) {
    while let Ok(batch) = rx.recv() {
        let result = batch.ticket.wait();
        let failed = {
            let mut st = lock(&inner.state);
            st.in_flight = st.in_flight.saturating_sub(1);
            match result {
                Ok(bufs) => {
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
                Err(e) => {
                    if st.failed.is_none() {
                        st.failed = Some(format!("{}: batch write failed: {e}", inner.path));
                    }
                }
            }
            st.failed.clone()
        };
        inner.work.notify_all();
        inner.room.notify_all();
        for w in batch.waiters {
            let lsn = w.lsn;
            match &failed {
                None => w.resolve(Ok(lsn)),
                Some(what) => w.resolve(Err(Error::Failed { what: what.clone() })),
            }
        }
    }
}
