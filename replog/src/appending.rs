//! `Appending`: the caller's handle on an append (or flush) until its write completes.
//!
//! It is both a blocking handle (`wait`) and a `Future`, so the same writer serves threads and
//! tokio tasks without blocking a runtime. The writer side holds a [`Waiter`]; if it is dropped
//! unresolved (the replog shut down), the handle resolves to `Error::Closed` instead of hanging.
//!
//! An append made while the log is idle is not submitted at once: its handle carries a [`Lead`]
//! (the duty to get its batch going). `wait` writes the batch itself on the calling thread (no
//! thread hand-off at queue depth 1); the first `poll`, or dropping the handle, hands the batch
//! to the I/O thread. Any other append, flush or completion in the meantime submits it too, so a
//! batch never waits for a handle that is not being waited on by the time someone else acts.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};
use crate::log::Inner;
use crate::writer;
use crate::Lsn;

#[derive(Default)]
struct Slot {
    result: Option<Result<Lsn>>,
    taken: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Shared {
    slot: Mutex<Slot>,
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Handle on a queued append: resolves to its lsn once written (and flushed if Durable).
#[must_use = "an append is only acknowledged once its Appending resolves"]
pub struct Appending {
    lsn: Lsn,
    shared: Arc<Shared>,
    /// Set while this handle may still have to start its (deferred) batch.
    lead: Option<Lead>,
}

/// The duty to start a deferred open batch: which log, and which batch.
pub(crate) struct Lead {
    pub(crate) inner: Weak<Inner>,
    /// `OpenBatch::seq` of the batch the append went into.
    pub(crate) batch: u64,
}

/// The writer's end of an [`Appending`].
pub(crate) struct Waiter {
    pub(crate) lsn: Lsn,
    shared: Option<Arc<Shared>>,
}

/// A new (handle, writer end) pair for `lsn`.
pub(crate) fn pair(lsn: Lsn) -> (Appending, Waiter) {
    let shared = Arc::new(Shared::default());
    (
        Appending {
            lsn,
            shared: Arc::clone(&shared),
            lead: None,
        },
        Waiter {
            lsn,
            shared: Some(shared),
        },
    )
}

impl Appending {
    /// An already resolved handle.
    pub(crate) fn ready(lsn: Lsn, result: Result<Lsn>) -> Appending {
        let (appending, waiter) = pair(lsn);
        waiter.resolve(result);
        appending
    }

    /// Gives the handle the duty to start its deferred batch.
    pub(crate) fn with_lead(mut self, lead: Lead) -> Appending {
        self.lead = Some(lead);
        self
    }

    /// Hands a still deferred batch to the I/O thread (for callers that will not write it).
    /// Idempotent: a batch already started is left alone.
    fn kick(&self) {
        if let Some(lead) = &self.lead {
            if let Some(inner) = lead.inner.upgrade() {
                writer::kick(&inner, lead.batch);
            }
        }
    }

    /// The lsn assigned to this append (for a flush: the last lsn it covers).
    pub fn lsn(&self) -> Lsn {
        self.lsn
    }

    /// Blocks until the append is written (Durable: flushed). Do not call from an async task;
    /// `.await` the handle there.
    pub fn wait(mut self) -> Result<Lsn> {
        if let Some(lead) = self.lead.take() {
            if let Some(inner) = lead.inner.upgrade() {
                // Writes the batch here if it is still deferred (else it is on its way already).
                writer::lead(&inner, lead.batch);
            }
        }
        let mut slot = self.shared.lock();
        loop {
            if let Some(result) = slot.result.take() {
                slot.taken = true;
                return result;
            }
            if slot.taken {
                return Err(Error::Closed);
            }
            slot = self
                .shared
                .done
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// True once the result is available (`wait` will not block).
    /// For async callers at low queue depth: when this append opened a batch on an idle log and
    /// that batch needs no sync (only Written appends, no flush waiting), writes it now on this
    /// thread (one pwrite, or a direct write; no fdatasync), so awaiting the handle afterwards
    /// costs no hand-off to the I/O thread and back. Otherwise does nothing: the batch goes the
    /// ordinary way when the handle is polled. Returns whether it wrote.
    pub fn write_now_unless_sync(&mut self) -> bool {
        let Some(lead) = &self.lead else { return false };
        let Some(inner) = lead.inner.upgrade() else {
            return false;
        };
        let led = writer::lead_without_sync(&inner, lead.batch);
        if led {
            self.lead = None;
        }
        led
    }

    pub fn is_done(&self) -> bool {
        // Someone polling this must not wait for a batch nobody starts.
        self.kick();
        self.shared.lock().result.is_some()
    }
}

impl Future for Appending {
    type Output = Result<Lsn>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Lsn>> {
        // Never write on a runtime thread: the I/O thread does it and wakes us.
        self.kick();
        self.lead = None;
        let mut slot = self.shared.lock();
        if let Some(result) = slot.result.take() {
            slot.taken = true;
            return Poll::Ready(result);
        }
        if slot.taken {
            return Poll::Ready(Err(Error::Closed));
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Appending {
    fn drop(&mut self) {
        // Not waited on (or not to the end): others in the batch may be.
        self.kick();
    }
}

impl Waiter {
    /// Resolves the handle (once).
    pub(crate) fn resolve(mut self, result: Result<Lsn>) {
        if let Some(shared) = self.shared.take() {
            fill(&shared, result);
        }
    }
}

fn fill(shared: &Shared, result: Result<Lsn>) {
    let waker = {
        let mut slot = shared.lock();
        slot.result = Some(result);
        slot.waker.take()
    };
    shared.done.notify_all();
    if let Some(waker) = waker {
        waker.wake();
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            fill(&shared, Err(Error::Closed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_across_threads_and_on_drop() {
        let (a, w) = pair(3);
        std::thread::spawn(move || w.resolve(Ok(3)));
        assert_eq!(a.wait().unwrap(), 3);
        let (a, w) = pair(4);
        drop(w);
        assert!(matches!(a.wait(), Err(Error::Closed)));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn is_a_future() {
        let (a, w) = pair(5);
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(5));
            w.resolve(Ok(5));
        });
        assert_eq!(a.await.unwrap(), 5);
    }
}
