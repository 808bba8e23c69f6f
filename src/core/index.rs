//! The retained entries by lsn, as the core needs them: where each wrote (for overflow marks and
//! the activity log), its bytes and its age (for lag). One small record per entry the replog
//! retains, so the index is bounded by the ring (ring bytes / smallest record), never by the
//! volume or by time.

use std::collections::VecDeque;

use super::{Extent, Lsn, Nanos};

/// One retained entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retained {
    pub lsn: Lsn,
    pub extent: Extent,
    /// Ring bytes the entry takes (an estimate is enough: it only sizes overflow drops).
    pub ring_bytes: u64,
    /// When the write entered the group (the driver's clock).
    pub at: Nanos,
}

/// Entries in lsn order. On the primary they follow each other; a secondary has a gap where the
/// primary dropped entries for it (ring overflow).
#[derive(Debug, Default)]
pub struct RetainedIndex {
    /// Each entry with the bytes of every entry pushed before it (since the index was made), so
    /// the bytes between two lsns are one subtraction: lag is asked per slink on every write.
    entries: VecDeque<(Retained, u64)>,
    /// Bytes of every entry pushed so far.
    pushed_bytes: u64,
    /// Sum of `extent.len` over `entries`.
    bytes: u64,
}

impl RetainedIndex {
    /// Append the next entry; lsns only grow (asserted: lag and overflow marks depend on it).
    pub fn push(&mut self, r: Retained) {
        if let Some((last, _)) = self.entries.back() {
            assert!(
                r.lsn > last.lsn,
                "retained index: lsn {} after {}",
                r.lsn,
                last.lsn
            );
        }
        self.entries.push_back((r, self.pushed_bytes));
        self.pushed_bytes += r.extent.len;
        self.bytes += r.extent.len;
    }

    /// Take back the newest entry (an append the replog refused).
    pub fn pop_last(&mut self, lsn: Lsn) {
        let last = self.entries.pop_back();
        assert!(
            last.is_some_and(|(l, _)| l.lsn == lsn),
            "retained index: un-append of lsn {lsn} that is not the last ({:?})",
            last.map(|(l, _)| l.lsn)
        );
        if let Some((l, before)) = last {
            self.bytes -= l.extent.len;
            self.pushed_bytes = before;
        }
    }

    /// Forget entries at or below `lsn` (reclaimed).
    pub fn trim_through(&mut self, lsn: Lsn) {
        while let Some((f, _)) = self.entries.front() {
            if f.lsn > lsn {
                break;
            }
            self.bytes -= f.extent.len;
            self.entries.pop_front();
        }
    }

    pub fn first_lsn(&self) -> Option<Lsn> {
        self.entries.front().map(|(e, _)| e.lsn)
    }

    pub fn last_lsn(&self) -> Option<Lsn> {
        self.entries.back().map(|(e, _)| e.lsn)
    }

    /// Index of the first entry with an lsn >= `lsn`.
    fn position_from(&self, lsn: Lsn) -> usize {
        self.entries.partition_point(|(e, _)| e.lsn < lsn)
    }

    pub fn get(&self, lsn: Lsn) -> Option<&Retained> {
        self.entries
            .get(self.position_from(lsn))
            .map(|(e, _)| e)
            .filter(|e| e.lsn == lsn)
    }

    /// Bytes pushed before the first entry with an lsn >= `lsn`.
    fn bytes_before(&self, lsn: Lsn) -> u64 {
        self.entries
            .get(self.position_from(lsn))
            .map_or(self.pushed_bytes, |(_, before)| *before)
    }

    /// Entries with lsn in `(after, upto]`.
    pub fn range(&self, after: Lsn, upto: Lsn) -> impl Iterator<Item = &Retained> {
        let start = self.position_from(after.saturating_add(1));
        self.entries
            .iter()
            .skip(start)
            .map(|(e, _)| e)
            .take_while(move |e| e.lsn <= upto)
    }

    /// Bytes of the entries in `(lsn, upto]` and the age of the oldest of them.
    pub fn lag_above(&self, lsn: Lsn, upto: Lsn, now: Nanos) -> (u64, Nanos) {
        if upto <= lsn {
            return (0, 0);
        }
        let bytes = self
            .bytes_before(upto.saturating_add(1))
            .saturating_sub(self.bytes_before(lsn.saturating_add(1)));
        let oldest = self
            .entries
            .get(self.position_from(lsn.saturating_add(1)))
            .map(|(e, _)| e)
            .filter(|e| e.lsn <= upto);
        (bytes, oldest.map_or(0, |e| now.saturating_sub(e.at)))
    }

    pub fn total_bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
