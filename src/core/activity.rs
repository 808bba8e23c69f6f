//! The activity log policy: which extents of the primary's devices may hold a write that no
//! durable replog record covers.
//!
//! A write is appended to the replog and applied to the device through the page cache; write-back
//! may persist the device page before the replog record is flushed. After a power loss the device
//! would then hold a write the replog lost, which no site ever gets and no dirty bit records. The
//! rule (DRBD's activity log): an entry that is not yet durable in the replog is applied to the
//! primary's device only inside an extent listed in the durable activity log. After an unclean
//! start, every listed extent is marked dirty for every other site, so the sites are repaired from
//! whatever the primary's device holds there.
//!
//! An extent leaves the log only once every write applied inside it is durable in the replog
//! (its newest applied lsn <= the replog's durable lsn): replay then covers it. The log is written
//! as a whole set (the replog persists it in its metadata slot); one write at a time.
//!
//! Cost: an activity log write is one small durable metadata write (about one fdatasync), needed
//! only when a write enters an extent that is not in the log. With 4 MiB extents and a few hundred
//! of them, a working set of a GiB or more causes none.

use std::collections::{BTreeMap, BTreeSet};

use super::{Extent, Lsn};

/// An extent: (device, index), the index counting `extent_bytes` units.
pub type ExtentKey = (u32, u64);

#[derive(Debug)]
pub struct ActivityLog {
    extent_bytes: u64,
    capacity: usize,
    /// Extents in the durable log, with the newest lsn applied inside each.
    durable: BTreeMap<ExtentKey, Lsn>,
    /// Extents writes are waiting for.
    wanted: BTreeSet<ExtentKey>,
    /// The set being written, by token.
    writing: Option<(u64, BTreeSet<ExtentKey>)>,
    next_token: u64,
    /// No write is planned while set (an unclean start's dirty marks are not durable yet: the
    /// extents must stay listed until they are).
    frozen: bool,
}

/// What the log needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to do.
    Idle,
    /// Persist this whole set, then report the token.
    Write { token: u64, extents: Vec<ExtentKey> },
    /// Every listed extent holds writes that are not durable yet: flush the replog first.
    NeedFlush,
}

impl ActivityLog {
    pub fn new(extent_bytes: u64, capacity: usize, restored: &[ExtentKey]) -> Self {
        assert!(
            extent_bytes.is_power_of_two(),
            "activity log extent {extent_bytes} is not a power of two"
        );
        assert!(capacity > 0, "activity log capacity 0");
        ActivityLog {
            extent_bytes,
            capacity,
            durable: restored.iter().map(|k| (*k, 0)).collect(),
            wanted: BTreeSet::new(),
            writing: None,
            next_token: 1,
            frozen: false,
        }
    }

    pub fn freeze(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    fn keys(&self, e: &Extent) -> impl Iterator<Item = ExtentKey> {
        let first = e.offset / self.extent_bytes;
        let last = (e.offset + e.len.max(1) - 1) / self.extent_bytes;
        let device = e.device;
        (first..=last).map(move |i| (device, i))
    }

    /// Whether every extent of `e` is in the durable log. If not, the missing ones are wanted.
    pub fn covers_or_want(&mut self, e: &Extent) -> bool {
        let missing: Vec<ExtentKey> = self
            .keys(e)
            .filter(|k| !self.durable.contains_key(k))
            .collect();
        let covered = missing.is_empty();
        // One being written now is covered once that write lands: no second write for it.
        let writing = self.writing.as_ref().map(|(_, set)| set);
        self.wanted.extend(
            missing
                .into_iter()
                .filter(|k| !writing.is_some_and(|w| w.contains(k))),
        );
        covered
    }

    /// Forget what was wanted: the caller asks again for the entries still waiting (an entry that
    /// became durable meanwhile needs no log write).
    pub fn clear_wanted(&mut self) {
        self.wanted.clear();
    }

    /// An entry is being applied inside `e`.
    pub fn touch(&mut self, e: &Extent, lsn: Lsn) {
        let keys: Vec<ExtentKey> = self.keys(e).collect();
        for k in keys {
            if let Some(t) = self.durable.get_mut(&k) {
                *t = (*t).max(lsn);
            }
        }
    }

    /// The next write of the log, given the replog's durable lsn.
    pub fn plan(&mut self, durable_lsn: Lsn) -> Plan {
        if self.frozen || self.writing.is_some() {
            return Plan::Idle;
        }
        if self.wanted.is_empty() {
            return Plan::Idle;
        }
        // Evictable: every write applied inside is durable. Oldest newest-write first.
        let mut evictable: Vec<(Lsn, ExtentKey)> = self
            .durable
            .iter()
            .filter(|(_, t)| **t <= durable_lsn)
            .map(|(k, t)| (*t, *k))
            .collect();
        evictable.sort();
        let mut next: BTreeSet<ExtentKey> = self.durable.keys().copied().collect();
        let mut evict = evictable.into_iter();
        let mut added = 0usize;
        let wanted: Vec<ExtentKey> = self.wanted.iter().copied().collect();
        for w in wanted {
            while next.len() >= self.capacity {
                match evict.next() {
                    Some((_, k)) => {
                        next.remove(&k);
                    }
                    None => break,
                }
            }
            if next.len() >= self.capacity {
                break;
            }
            next.insert(w);
            self.wanted.remove(&w);
            added += 1;
        }
        if added == 0 {
            return Plan::NeedFlush;
        }
        // Extents leaving the log stop covering applies now, not when the write lands.
        self.durable.retain(|k, _| next.contains(k));
        let token = self.next_token;
        self.next_token += 1;
        let extents: Vec<ExtentKey> = next.iter().copied().collect();
        self.writing = Some((token, next));
        Plan::Write { token, extents }
    }

    /// The write of `token` is durable.
    pub fn written(&mut self, token: u64) {
        let Some((t, set)) = self.writing.take() else {
            panic!("activity log: completion of token {token} with nothing being written");
        };
        assert_eq!(t, token, "activity log: completion out of order");
        for k in set {
            self.durable.entry(k).or_insert(0);
        }
    }

    /// A write of the log failed: the wanted extents stay wanted.
    pub fn write_failed(&mut self, token: u64) {
        if let Some((t, set)) = self.writing.take() {
            assert_eq!(t, token, "activity log: failure out of order");
            for k in set {
                if !self.durable.contains_key(&k) {
                    self.wanted.insert(k);
                }
            }
        }
    }

    /// Empty the log (clean shutdown; the caller made sure every applied write is durable).
    pub fn clear(&mut self) -> Option<(u64, Vec<ExtentKey>)> {
        if self.writing.is_some() {
            return None;
        }
        self.durable.clear();
        self.wanted.clear();
        let token = self.next_token;
        self.next_token += 1;
        self.writing = Some((token, BTreeSet::new()));
        Some((token, Vec::new()))
    }

    pub fn extents(&self) -> Vec<ExtentKey> {
        self.durable.keys().copied().collect()
    }

    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    pub fn is_writing(&self) -> bool {
        self.writing.is_some()
    }

    /// Everything applied is durable: the log may be emptied (clean shutdown).
    pub fn all_durable(&self, durable_lsn: Lsn) -> bool {
        self.durable.values().all(|t| *t <= durable_lsn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(device: u32, offset: u64, len: u64) -> Extent {
        Extent {
            device,
            offset,
            len,
        }
    }

    #[test]
    fn a_write_outside_the_log_waits_for_a_log_write() {
        let mut al = ActivityLog::new(4096, 4, &[]);
        assert!(!al.covers_or_want(&ext(0, 0, 512)));
        let Plan::Write { token, extents } = al.plan(0) else {
            panic!("expected a write")
        };
        assert_eq!(extents, vec![(0, 0)]);
        assert!(!al.covers_or_want(&ext(0, 0, 512)), "not durable yet");
        al.written(token);
        assert!(al.covers_or_want(&ext(0, 0, 512)));
    }

    #[test]
    fn an_extent_with_writes_not_yet_durable_is_never_evicted() {
        let mut al = ActivityLog::new(4096, 1, &[]);
        al.covers_or_want(&ext(0, 0, 1));
        let Plan::Write { token, .. } = al.plan(0) else {
            panic!()
        };
        al.written(token);
        al.touch(&ext(0, 0, 1), 7);
        assert!(!al.covers_or_want(&ext(0, 8192, 1)));
        assert_eq!(al.plan(6), Plan::NeedFlush, "lsn 7 is not durable");
        let Plan::Write { extents, .. } = al.plan(7) else {
            panic!()
        };
        assert_eq!(extents, vec![(0, 2)]);
        assert!(
            !al.covers_or_want(&ext(0, 0, 1)),
            "an evicted extent stops covering at once"
        );
    }

    #[test]
    fn a_write_across_extents_needs_all_of_them() {
        let mut al = ActivityLog::new(4096, 8, &[(1, 0)]);
        assert!(!al.covers_or_want(&ext(1, 4000, 200)));
        let Plan::Write { extents, .. } = al.plan(0) else {
            panic!()
        };
        assert_eq!(extents, vec![(1, 0), (1, 1)]);
    }

    #[test]
    fn a_frozen_log_plans_nothing() {
        let mut al = ActivityLog::new(4096, 8, &[(0, 3)]);
        al.freeze(true);
        al.covers_or_want(&ext(0, 0, 1));
        assert_eq!(al.plan(100), Plan::Idle);
        al.freeze(false);
        assert!(matches!(al.plan(100), Plan::Write { .. }));
    }
}
