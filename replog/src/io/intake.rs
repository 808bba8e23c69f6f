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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn job() -> (super::super::IoTicket, Job) {
        let (ticket, completer) = super::super::ticket::ticket();
        let job = Job {
            ops: Vec::new(),
            sync_after: false,
            completer,
            bounded: false,
        };
        (ticket, job)
    }

    #[test]
    fn self_bounded_jobs_pass_a_full_queue_in_order() {
        let intake = Arc::new(Intake::new());
        let mut tickets = Vec::new();
        for _ in 0..SUBMIT_QUEUE_BATCHES_MAX {
            let (t, j) = job();
            assert!(intake.send(j).is_ok());
            tickets.push(t);
        }
        // The bounded queue is full: a self-bounded job still goes in at once, at the back.
        let (_t, j) = job();
        assert!(intake.send_self_bounded(j).is_ok());
        // A bounded one waits until the I/O side takes a job.
        let sender = {
            let intake = Arc::clone(&intake);
            std::thread::spawn(move || {
                let (t, j) = job();
                assert!(intake.send(j).is_ok());
                t
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!sender.is_finished(), "a bounded send must wait for room");
        let first = intake.try_recv().ok().unwrap();
        assert!(first.bounded);
        let _late = sender.join().unwrap();
        let mut kinds = Vec::new();
        while let Ok(j) = intake.try_recv() {
            kinds.push(j.bounded);
        }
        // 63 bounded, then the self-bounded one, then the late bounded one.
        assert_eq!(kinds.len(), SUBMIT_QUEUE_BATCHES_MAX + 1);
        assert_eq!(kinds.iter().filter(|b| !**b).count(), 1);
        assert!(!kinds[SUBMIT_QUEUE_BATCHES_MAX - 1]);
        assert!(matches!(intake.try_recv(), Err(Empty::Now)));
        intake.close();
        assert!(matches!(intake.try_recv(), Err(Empty::Closed)));
        let (_t, j) = job();
        assert!(intake.send_self_bounded(j).is_err());
        assert!(intake.recv().is_none());
    }

    #[test]
    fn an_idle_worker_is_woken_through_the_intake() {
        let intake = Arc::new(Intake::new());
        let worker = {
            let intake = Arc::clone(&intake);
            std::thread::spawn(move || intake.recv().is_some())
        };
        // Wait until the worker sleeps on the intake.
        while !intake.lock().worker_idle {
            std::thread::yield_now();
        }
        let (_t, j) = job();
        assert!(matches!(intake.send(j), Ok(Wake::Done)));
        assert!(worker.join().unwrap());
        // Not idle (not waiting on the intake): the submitter must poke the ring.
        let (_t, j) = job();
        assert!(matches!(intake.send(j), Ok(Wake::Ring)));
    }
}
