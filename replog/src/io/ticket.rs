//! Tickets: the caller's handle on a submitted batch, completed by the I/O thread.
//!
//! A ticket can be waited on by blocking (`wait`) or awaited (`IoTicket` is a `Future`), so the
//! same I/O thread serves blocking callers (the group-commit writer) and async ones. The I/O side
//! holds a [`Completer`]; if it is dropped without completing (the I/O thread stopped), the ticket
//! fails instead of hanging.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::AlignedBuf;

/// What a completed batch yields: its buffers back (in submit order) for reuse, or the first error.
pub type BatchResult = io::Result<Vec<AlignedBuf>>;

#[derive(Default)]
struct SlotState {
    result: Option<BatchResult>,
    /// Set once the result was handed out, so a second poll does not wait forever.
    taken: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    done: Condvar,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // A poisoned lock only means another thread panicked while holding it; the state itself
        // (an Option and a Waker) is always consistent, so keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handle on a submitted batch; completes in submit order with the batch's buffers or an error.
#[must_use = "a ticket must be waited on to learn whether the I/O succeeded"]
pub struct IoTicket {
    slot: Arc<Slot>,
}

/// The I/O thread's end of a ticket.
pub(crate) struct Completer {
    slot: Option<Arc<Slot>>,
}

/// A new (ticket, completer) pair.
pub(crate) fn ticket() -> (IoTicket, Completer) {
    let slot = Arc::new(Slot::default());
    (
        IoTicket {
            slot: Arc::clone(&slot),
        },
        Completer { slot: Some(slot) },
    )
}

impl IoTicket {
    /// A ticket that is already complete: for requests refused before submission, and for other
    /// storage implementations (in-memory test disks) that complete synchronously.
    pub fn ready(result: BatchResult) -> IoTicket {
        let (ticket, completer) = ticket();
        completer.complete(result);
        ticket
    }

    /// Blocks until the batch completed; returns its buffers (in submit order) or the error.
    pub fn wait(self) -> BatchResult {
        let mut state = self.slot.lock();
        loop {
            if let Some(result) = state.result.take() {
                state.taken = true;
                return result;
            }
            state = self
                .slot
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// True once the batch completed (wait will not block).
    pub fn is_done(&self) -> bool {
        self.slot.lock().result.is_some()
    }
}

impl Future for IoTicket {
    type Output = BatchResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BatchResult> {
        let mut state = self.slot.lock();
        if let Some(result) = state.result.take() {
            state.taken = true;
            return Poll::Ready(result);
        }
        if state.taken {
            return Poll::Ready(Err(io::Error::other("IoTicket polled after completion")));
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Completer {
    /// Completes the ticket, waking a blocked `wait` or a pending `poll`.
    pub(crate) fn complete(mut self, result: BatchResult) {
        if let Some(slot) = self.slot.take() {
            fill(&slot, result);
        }
    }
}

fn fill(slot: &Slot, result: BatchResult) {
    let waker = {
        let mut state = slot.lock();
        state.result = Some(result);
        state.waker.take()
    };
    slot.done.notify_all();
    if let Some(waker) = waker {
        waker.wake();
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            fill(
                &slot,
                Err(io::Error::other(
                    "I/O thread stopped before completing the request",
                )),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_returns_result_from_other_thread() {
        let (ticket, completer) = ticket();
        let handle = std::thread::spawn(move || {
            completer.complete(Ok(vec![AlignedBuf::zeroed(1)]));
        });
        assert_eq!(ticket.wait().unwrap().len(), 1);
        handle.join().unwrap();
    }

    #[test]
    fn dropped_completer_fails_ticket() {
        let (ticket, completer) = ticket();
        drop(completer);
        assert!(ticket.wait().is_err());
    }

    /// Minimal executor: polls one future, parking the thread between wake-ups.
    fn block_on<F: Future>(future: F) -> F::Output {
        struct ThreadWaker(std::thread::Thread);
        impl std::task::Wake for ThreadWaker {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
            std::thread::park();
        }
    }

    #[test]
    fn ticket_is_a_future() {
        let (ticket, completer) = ticket();
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(10));
            completer.complete(Ok(Vec::new()));
        });
        assert!(block_on(ticket).unwrap().is_empty());
    }
}
