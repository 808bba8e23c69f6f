//! The in-memory index of retained entries, in lsn (= ring position) order.
//!
//! It answers "where is lsn N", lag per slink (entries, bytes, age) and what reclaim may free,
//! without touching the disk. Its size is bounded by the ring: at most ring_bytes / 128 entries.

use std::collections::VecDeque;

use serde::Serialize;

use crate::format::RecordKind;
use crate::Lsn;

/// Where one retained entry lives and what it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IndexEntry {
    pub lsn: Lsn,
    /// Virtual position of the record header.
    pub vpos: u64,
    /// Header + payload + padding.
    pub record_bytes: u64,
    pub kind: RecordKind,
    pub device: u32,
    pub offset: u64,
    pub len: u64,
    pub timestamp_ns: u64,
    pub generation: u32,
}

impl IndexEntry {
    /// Payload bytes a site must receive for this entry (Write data; 0 for Zeroes/Discard).
    pub fn data_bytes(&self) -> u64 {
        if self.kind == RecordKind::Write {
            self.len
        } else {
            0
        }
    }
}

/// Lag of one slink: what the replog holds above its cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Lag {
    /// Entries above the cursor.
    pub ios: u64,
    /// Write payload bytes above the cursor.
    pub bytes: u64,
    /// Timestamp (unix ns) of the oldest entry above the cursor; None when there is none.
    pub oldest_timestamp_ns: Option<u64>,
}

/// Retained entries with running totals of payload bytes.
#[derive(Debug, Default)]
pub struct Index {
    /// (entry, payload bytes of every entry up to and including this one since the index began).
    entries: VecDeque<(IndexEntry, u64)>,
}

impl Index {
    /// Appends an entry; its lsn must exceed the last one (callers check).
    pub fn push(&mut self, entry: IndexEntry) {
        let before = self.entries.back().map_or(0, |(_, cum)| *cum);
        self.entries
            .push_back((entry, before.saturating_add(entry.data_bytes())));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn first(&self) -> Option<&IndexEntry> {
        self.entries.front().map(|(e, _)| e)
    }

    pub fn last(&self) -> Option<&IndexEntry> {
        self.entries.back().map(|(e, _)| e)
    }

    /// Position of the first entry with lsn >= `lsn`.
    pub fn position_from(&self, lsn: Lsn) -> usize {
        self.entries.partition_point(|(e, _)| e.lsn < lsn)
    }

    pub fn get(&self, position: usize) -> Option<&IndexEntry> {
        self.entries.get(position).map(|(e, _)| e)
    }

    /// The entry with exactly this lsn.
    pub fn find(&self, lsn: Lsn) -> Option<&IndexEntry> {
        self.get(self.position_from(lsn)).filter(|e| e.lsn == lsn)
    }

    /// Iterates entries from `position` on.
    pub fn iter_from(&self, position: usize) -> impl Iterator<Item = &IndexEntry> {
        self.entries.iter().skip(position).map(|(e, _)| e)
    }

    /// Lag of a slink whose cursor is `cursor`.
    pub fn lag_above(&self, cursor: Lsn) -> Lag {
        let position = self.position_from(cursor.saturating_add(1));
        let Some((oldest, _)) = self.entries.get(position) else {
            return Lag::default();
        };
        let total = self.entries.back().map_or(0, |(_, cum)| *cum);
        let before = match position.checked_sub(1).and_then(|p| self.entries.get(p)) {
            Some((_, cum)) => *cum,
            None => self
                .entries
                .front()
                .map_or(0, |(e, cum)| cum - e.data_bytes()),
        };
        Lag {
            ios: (self.entries.len() - position) as u64,
            bytes: total.saturating_sub(before),
            oldest_timestamp_ns: Some(oldest.timestamp_ns),
        }
    }

    /// Drops every entry with lsn <= `lsn`; returns how many.
    pub fn pop_through(&mut self, lsn: Lsn) -> usize {
        let n = self.position_from(lsn.saturating_add(1));
        self.entries.drain(..n);
        n
    }

    /// Drops entries with lsn > `lsn` (used when writes failed before completing).
    pub fn truncate_after(&mut self, lsn: Lsn) {
        let n = self.position_from(lsn.saturating_add(1));
        self.entries.truncate(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(lsn: Lsn, len: u64, ts: u64) -> IndexEntry {
        IndexEntry {
            lsn,
            vpos: lsn * 4096,
            record_bytes: 4096,
            kind: RecordKind::Write,
            device: 0,
            offset: 0,
            len,
            timestamp_ns: ts,
            generation: 1,
        }
    }

    #[test]
    fn lag_counts_entries_above_cursor() {
        let mut index = Index::default();
        for lsn in 1..=5 {
            index.push(e(lsn, lsn * 10, lsn * 100));
        }
        assert_eq!(
            index.lag_above(2),
            Lag {
                ios: 3,
                bytes: 30 + 40 + 50,
                oldest_timestamp_ns: Some(300)
            }
        );
        assert_eq!(index.lag_above(0).ios, 5);
        assert_eq!(index.lag_above(0).bytes, 150);
        assert_eq!(index.lag_above(5), Lag::default());
        assert_eq!(index.pop_through(2), 2);
        assert_eq!(index.lag_above(0).bytes, 120);
        assert_eq!(index.lag_above(3).bytes, 90);
        assert_eq!(index.find(4).map(|e| e.lsn), Some(4));
        assert!(index.find(2).is_none());
    }
}
