//! The in-memory feed of one slink: entries in lsn order, bounded by bytes.
//!
//! The feed is lossy on purpose: when a slow site's feed is full, a new entry is not queued and
//! the slink's applier reads the gap back from the replog instead. So a slow site never holds the
//! writer up and never makes memory grow; it only moves its data source from memory to disk.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use replog::{EntryKind, Lsn};

/// One write of the group, as the core hands it to the slinks.
#[derive(Debug)]
pub struct MemEntry {
    pub lsn: Lsn,
    pub device: u32,
    pub offset: u64,
    pub kind: EntryKind,
    pub len: u64,
    pub data: Vec<u8>,
    pub appended_at: Instant,
    /// When the write entered the group (ns since the Unix epoch), as stored in the replog.
    pub timestamp_ns: u64,
}

impl From<replog::Entry> for MemEntry {
    /// An entry read back from the replog.
    fn from(e: replog::Entry) -> Self {
        MemEntry {
            lsn: e.lsn,
            device: e.device,
            offset: e.offset,
            kind: e.kind,
            len: e.len,
            data: e.data,
            appended_at: Instant::now(),
            timestamp_ns: e.timestamp_ns,
        }
    }
}

impl MemEntry {
    /// Bytes this entry holds in memory (what counts against a feed's budget).
    pub fn mem_bytes(&self) -> usize {
        self.data.len() + 64
    }
}

struct Inner {
    entries: VecDeque<Arc<MemEntry>>,
    bytes: usize,
    dropped: u64,
    closed: bool,
}

pub struct EntryFeed {
    inner: Mutex<Inner>,
    ready: Condvar,
    max_bytes: usize,
}

impl EntryFeed {
    pub fn new(max_bytes: usize) -> Self {
        EntryFeed {
            inner: Mutex::new(Inner {
                entries: VecDeque::new(),
                bytes: 0,
                dropped: 0,
                closed: false,
            }),
            ready: Condvar::new(),
            max_bytes,
        }
    }

    /// Queue an entry; false when the budget is exhausted and the entry was left to the replog.
    pub fn push(&self, e: Arc<MemEntry>) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        let size = e.mem_bytes();
        if g.bytes + size > self.max_bytes && !g.entries.is_empty() {
            g.dropped += 1;
            return false;
        }
        g.bytes += size;
        g.entries.push_back(e);
        drop(g);
        self.ready.notify_one();
        true
    }

    /// Take up to `max` entries, waiting up to `wait` for the first.
    pub fn pop_batch(&self, max: usize, wait: Duration) -> Vec<Arc<MemEntry>> {
        let Ok(mut g) = self.inner.lock() else {
            return Vec::new();
        };
        let deadline = Instant::now() + wait;
        while g.entries.is_empty() && !g.closed {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.ready.wait_timeout(g, deadline - now) {
                Ok((ng, _)) => g = ng,
                Err(_) => return Vec::new(),
            }
        }
        let n = g.entries.len().min(max);
        let batch: Vec<_> = g.entries.drain(..n).collect();
        let freed: usize = batch.iter().map(|e| e.mem_bytes()).sum();
        g.bytes -= freed;
        batch
    }

    /// Wake a waiting consumer (new written lsn, shutdown, checkpoint request). The lock is
    /// taken first so a consumer that checked its condition under the lock cannot miss the wake.
    pub fn kick(&self) {
        drop(self.inner.lock());
        self.ready.notify_all();
    }

    /// Wait until `done()` holds (checked under the feed's lock, so a `kick` after the condition
    /// became true is never missed), or `timeout` passes. Returns `done()`.
    pub fn wait_until(&self, done: impl Fn() -> bool, timeout: Duration) -> bool {
        if let Ok(g) = self.inner.lock() {
            drop(wait_while(
                &self.ready,
                g,
                |g| !done() && !g.closed,
                timeout,
            ));
        }
        done()
    }

    pub fn close(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.closed = true;
        }
        self.ready.notify_all();
    }

    pub fn dropped(&self) -> u64 {
        self.inner.lock().map(|g| g.dropped).unwrap_or(0)
    }

    pub fn queued_bytes(&self) -> usize {
        self.inner.lock().map(|g| g.bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(lsn: Lsn, len: usize) -> Arc<MemEntry> {
        Arc::new(MemEntry {
            lsn,
            device: 0,
            offset: 0,
            kind: EntryKind::Write,
            len: len as u64,
            data: vec![0; len],
            appended_at: Instant::now(),
            timestamp_ns: 0,
        })
    }

    #[test]
    fn budget_drops_instead_of_growing() {
        let f = EntryFeed::new(10_000);
        assert!(f.push(entry(1, 4096)));
        assert!(f.push(entry(2, 4096)));
        assert!(!f.push(entry(3, 4096)), "third does not fit the budget");
        assert_eq!(f.dropped(), 1);
        let b = f.pop_batch(10, Duration::ZERO);
        assert_eq!(b.iter().map(|e| e.lsn).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(f.queued_bytes(), 0);
        assert!(f.push(entry(4, 4096)));
    }

    #[test]
    fn an_oversized_entry_still_goes_through_an_empty_feed() {
        let f = EntryFeed::new(100);
        assert!(f.push(entry(1, 4096)));
    }
}

/// A wake-up for a thread that waits for a condition other threads set: [`Wakeup::notify`] after
/// changing what the condition reads. Lets a thread wait for its own events only (the slink 0 and
/// tcp checkpointers waited on the feed and woke at every write).
#[derive(Default)]
pub struct Wakeup {
    lock: Mutex<()>,
    ready: Condvar,
}

impl Wakeup {
    pub fn notify(&self) {
        drop(self.lock.lock());
        self.ready.notify_all();
    }

    /// Wait until `done()` holds (checked under the lock, so a `notify` after the condition became
    /// true is never missed) or `timeout` passes. Returns `done()`.
    pub fn wait_until(&self, done: impl Fn() -> bool, timeout: Duration) -> bool {
        if let Ok(g) = self.lock.lock() {
            drop(wait_while(&self.ready, g, |_| !done(), timeout));
        }
        done()
    }
}

/// Waits on `ready` while `waiting` holds for the guarded value, at most `timeout`; returns the
/// guard (None when the lock was poisoned meanwhile).
fn wait_while<'a, T>(
    ready: &Condvar,
    mut g: MutexGuard<'a, T>,
    waiting: impl Fn(&T) -> bool,
    timeout: Duration,
) -> Option<MutexGuard<'a, T>> {
    let deadline = Instant::now() + timeout;
    while waiting(&g) {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        g = ready.wait_timeout(g, deadline - now).ok()?.0;
    }
    Some(g)
}
