//! Bytes and append time by lsn, for the entries the replog retains.
//!
//! Lag in bytes and seconds is asked per slink on every write (for the fallbehind policy) and in
//! every status: this index answers both in O(log n) without touching the disk. It holds one small
//! record per retained entry, so its size is bounded by the ring's size (the configured replog
//! size divided by the smallest entry), never by the volume or by time.

use std::collections::VecDeque;
use std::sync::Mutex;

use replog::Lsn;

#[derive(Clone, Copy, Debug)]
struct Mark {
    lsn: Lsn,
    /// Bytes of all entries up to and including this one (since the group was opened).
    cumulative_bytes: u64,
    /// Bytes of this entry alone.
    bytes: u64,
    timestamp_ns: u64,
}

#[derive(Default)]
pub struct LsnIndex {
    marks: Mutex<VecDeque<Mark>>,
}

impl LsnIndex {
    pub fn push(&self, lsn: Lsn, bytes: u64, timestamp_ns: u64) {
        if let Ok(mut m) = self.marks.lock() {
            let prev = m.back().map(|b| b.cumulative_bytes).unwrap_or(0);
            if m.back().is_some_and(|b| b.lsn >= lsn) {
                return;
            }
            m.push_back(Mark {
                lsn,
                cumulative_bytes: prev + bytes,
                bytes,
                timestamp_ns,
            });
        }
    }

    /// Forget entries with lsn below `first_retained` (reclaimed by the replog).
    pub fn trim_below(&self, first_retained: Lsn) {
        if let Ok(mut m) = self.marks.lock() {
            while m.front().is_some_and(|f| f.lsn < first_retained) {
                m.pop_front();
            }
        }
    }

    /// Bytes and the oldest timestamp of the retained entries above `lsn`.
    pub fn above(&self, lsn: Lsn) -> (u64, Option<u64>) {
        let Ok(m) = self.marks.lock() else {
            return (0, None);
        };
        let (Some(front), Some(last)) = (m.front(), m.back()) else {
            return (0, None);
        };
        let idx = m.partition_point(|x| x.lsn <= lsn);
        let Some(first_above) = m.get(idx) else {
            return (0, None);
        };
        // Cumulative bytes just before the first entry above `lsn`.
        let base = match idx.checked_sub(1).and_then(|i| m.get(i)) {
            Some(prev) => prev.cumulative_bytes,
            None => front.cumulative_bytes - front.bytes,
        };
        (last.cumulative_bytes - base, Some(first_above.timestamp_ns))
    }

    pub fn len(&self) -> usize {
        self.marks.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_age_above_an_lsn() {
        let ix = LsnIndex::default();
        ix.push(1, 100, 10);
        ix.push(2, 200, 20);
        ix.push(3, 300, 30);
        assert_eq!(ix.above(3), (0, None));
        assert_eq!(ix.above(2), (300, Some(30)));
        assert_eq!(ix.above(1), (500, Some(20)));
        assert_eq!(ix.above(0), (600, Some(10)));
        ix.trim_below(2);
        assert_eq!(ix.above(0), (500, Some(20)));
        assert_eq!(ix.above(1), (500, Some(20)));
        assert_eq!(ix.len(), 2);
    }
}
