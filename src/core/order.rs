//! The apply order of slink 0 (the devices of this site): entries that have an lsn and are not
//! yet applied, and the overlap rule that says which of them may be applied now.
//!
//! The rule: an entry may be applied once its replog write completed and no lower lsn that
//! overlaps it is still unapplied. Entries that do not overlap apply in parallel; overlapping
//! ones in lsn order, so the device always ends up as the replay of the log. The set is bounded
//! by the writes in flight (the NBD server bounds those per connection).

use std::collections::BTreeMap;

use super::{Extent, Lsn};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Has an lsn; its replog write has not completed.
    Appended,
    /// Its replog write completed; waiting for its turn (or for the activity log).
    Written,
    /// Handed to the driver to apply.
    Applying,
}

#[derive(Clone, Copy, Debug)]
pub struct Unapplied {
    pub extent: Extent,
    pub stage: Stage,
}

#[derive(Debug, Default)]
pub struct ApplyOrder {
    entries: BTreeMap<Lsn, Unapplied>,
}

impl ApplyOrder {
    pub fn insert(&mut self, lsn: Lsn, extent: Extent, stage: Stage) {
        let old = self.entries.insert(lsn, Unapplied { extent, stage });
        assert!(old.is_none(), "apply order: lsn {lsn} inserted twice");
    }

    pub fn remove(&mut self, lsn: Lsn) -> Option<Unapplied> {
        self.entries.remove(&lsn)
    }

    /// Every entry up to `written` moves from Appended to Written.
    pub fn mark_written(&mut self, written: Lsn) {
        for (_, u) in self.entries.range_mut(..=written) {
            if u.stage == Stage::Appended {
                u.stage = Stage::Written;
            }
        }
    }

    /// Written entries whose every lower overlapping entry is applied, in lsn order.
    pub fn ready(&self) -> Vec<(Lsn, Extent)> {
        let mut out = Vec::new();
        for (lsn, u) in &self.entries {
            if u.stage != Stage::Written {
                continue;
            }
            let blocked = self
                .entries
                .range(..*lsn)
                .any(|(_, lower)| lower.extent.overlaps(&u.extent));
            if !blocked {
                out.push((*lsn, u.extent));
            }
        }
        out
    }

    pub fn set_stage(&mut self, lsn: Lsn, stage: Stage) {
        let u = self.entries.get_mut(&lsn);
        assert!(u.is_some(), "apply order: no lsn {lsn}");
        if let Some(u) = u {
            u.stage = stage;
        }
    }

    pub fn get(&self, lsn: Lsn) -> Option<&Unapplied> {
        self.entries.get(&lsn)
    }

    /// The lowest unapplied lsn.
    pub fn first(&self) -> Option<Lsn> {
        self.entries.keys().next().copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(device: u32, offset: u64, len: u64) -> Extent {
        Extent {
            device,
            offset,
            len,
        }
    }

    #[test]
    fn overlapping_entries_apply_in_lsn_order_and_others_in_parallel() {
        let mut o = ApplyOrder::default();
        o.insert(1, e(0, 0, 4096), Stage::Appended);
        o.insert(2, e(0, 2048, 4096), Stage::Appended);
        o.insert(3, e(1, 0, 4096), Stage::Appended);
        o.insert(4, e(0, 8192, 512), Stage::Appended);
        o.mark_written(4);
        let ready: Vec<Lsn> = o.ready().into_iter().map(|(l, _)| l).collect();
        assert_eq!(ready, vec![1, 3, 4], "2 overlaps 1");
        o.set_stage(1, Stage::Applying);
        assert!(
            o.ready().iter().all(|(l, _)| *l != 2),
            "still blocked while 1 is being applied"
        );
        o.remove(1);
        assert!(o.ready().iter().any(|(l, _)| *l == 2));
    }

    #[test]
    fn an_entry_not_yet_written_is_never_ready() {
        let mut o = ApplyOrder::default();
        o.insert(5, e(0, 0, 1), Stage::Appended);
        assert!(o.ready().is_empty());
        o.mark_written(4);
        assert!(o.ready().is_empty());
        o.mark_written(5);
        assert_eq!(o.ready().len(), 1);
    }
}
