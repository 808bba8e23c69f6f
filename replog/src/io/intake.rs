//! The submit queue between callers and the I/O thread.
//!
//! Why not a bounded `mpsc` channel: the log submits its batches while it holds its state lock,
//! and the I/O thread completes them by calling back into the log (which takes that lock). If
//! such a submit could block on a full queue, the I/O thread (stuck on the lock) could never make
//! room: a deadlock. So there are two kinds of submissions:
//! - bounded ([`Intake::send`]): blocks while [`SUBMIT_QUEUE_BATCHES_MAX`] bounded jobs wait;
//! - self-bounded ([`Intake::send_self_bounded`]): never blocks; the caller bounds how many it has
//!   outstanding (the log keeps at most `replog::BATCHES_IN_FLIGHT_MAX` batches in flight).
//!
//! Both kinds share one FIFO, so "earlier-submitted" keeps its meaning for the sync ordering
//! contract. The intake also knows whether the I/O thread sleeps on it (idle) or elsewhere (in
//! `io_uring_enter`), so a submitter wakes it by the one means that reaches it: a condvar when
//! idle, the eventfd (returned as [`Wake::Ring`]) otherwise.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::{Job, SUBMIT_QUEUE_BATCHES_MAX};

struct IntakeState {
    jobs: VecDeque<Job>,
    /// Jobs in `jobs` submitted through the bounded path.
    bounded: usize,
    /// No more submissions; the I/O thread drains `jobs` and stops.
    closed: bool,
    /// The I/O thread sleeps on `ready` (not in the ring).
    worker_idle: bool,
}

pub(crate) struct Intake {
    state: Mutex<IntakeState>,
    /// The I/O thread waits here when it has nothing in flight.
    ready: Condvar,
    /// Bounded submitters wait here for room.
    room: Condvar,
}

/// What a submitter must do after queueing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Nothing (the I/O thread was woken through the intake, or will look anyway).
    Done,
    /// The I/O thread may be sleeping in the ring: poke its eventfd.
    Ring,
}

/// Why [`Intake::try_recv`] returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Empty {
    /// Nothing queued now.
    Now,
    /// Nothing queued and closed: nothing will come.
    Closed,
}

impl Intake {
    pub fn new() -> Intake {
        Intake {
            state: Mutex::new(IntakeState {
                jobs: VecDeque::new(),
                bounded: 0,
                closed: false,
                worker_idle: false,
            }),
            ready: Condvar::new(),
            room: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, IntakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a job; blocks while [`SUBMIT_QUEUE_BATCHES_MAX`] bounded jobs wait. `Err(job)` when
    /// closed (dropping the job fails its ticket).
    pub fn send(&self, job: Job) -> Result<Wake, Job> {
        let mut st = self.lock();
        while st.bounded >= SUBMIT_QUEUE_BATCHES_MAX && !st.closed {
            st = self.room.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        self.push(st, job, true)
    }

    /// Queues a job without waiting for room: the caller bounds its own outstanding jobs.
    pub fn send_self_bounded(&self, job: Job) -> Result<Wake, Job> {
        self.push(self.lock(), job, false)
    }

    fn push(
        &self,
        mut st: MutexGuard<'_, IntakeState>,
        mut job: Job,
        bounded: bool,
    ) -> Result<Wake, Job> {
        if st.closed {
            return Err(job);
        }
        job.bounded = bounded;
        st.bounded += usize::from(bounded);
        st.jobs.push_back(job);
        if st.worker_idle {
            st.worker_idle = false;
            drop(st);
            self.ready.notify_one();
            Ok(Wake::Done)
        } else {
            Ok(Wake::Ring)
        }
    }

    fn pop(&self, st: &mut IntakeState) -> Option<Job> {
        let job = st.jobs.pop_front()?;
        if job.bounded {
            st.bounded = st.bounded.saturating_sub(1);
            self.room.notify_one();
        }
        Some(job)
    }

    /// The I/O thread, with nothing in flight: waits for a job; None once closed and drained.
    pub fn recv(&self) -> Option<Job> {
        let mut st = self.lock();
        loop {
            if let Some(job) = self.pop(&mut st) {
                st.worker_idle = false;
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.worker_idle = true;
            st = self.ready.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The I/O thread, busy: takes a job if one is queued.
    pub fn try_recv(&self) -> Result<Job, Empty> {
        let mut st = self.lock();
        match self.pop(&mut st) {
            Some(job) => Ok(job),
            None if st.closed => Err(Empty::Closed),
            None => Err(Empty::Now),
        }
    }

    /// No more submissions: the I/O thread finishes what is queued, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
        self.room.notify_all();
    }
}
