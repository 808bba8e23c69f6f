//! The secondary role: items from the primary, in stream order, become this site's replog entries
//! (with the primary's lsns), are made durable before their position is acknowledged, and are
//! applied to the devices in lsn order by the same apply order as the primary's.
//!
//! Consistency: the devices are a prefix of the primary's history except while the primary
//! repairs this site (resync pieces arrive, or entries were dropped for it: a gap in the lsns).
//! The flag that says so is persisted (devices durable first) before the first piece or the gap,
//! and set again once the primary's resync-complete marker is applied, so a restart in between
//! still knows the devices are not a prefix.

use super::index::Retained;
use super::order::Stage;
use super::{Command, Core, Durability, Position, Received};

impl Core {
    pub(super) fn secondary_progress(&mut self, out: &mut Vec<Command>) {
        while let Some(item) = self.secondary.inbox.front().copied() {
            if self.append_in_flight.is_some()
                || self.secondary.consistency_persisting.is_some()
                || self.secondary.piece_storing.is_some()
                || self.room.as_ref().is_some_and(|r| !r.retry)
            {
                break;
            }
            match item {
                Received::Entry { lsn, extent } => {
                    if lsn <= self.secondary.appended {
                        self.secondary.inbox.pop_front(); // resent after a reconnect
                        continue;
                    }
                    if lsn > self.secondary.appended + 1 && self.secondary.consistent {
                        // The primary dropped entries for this site: not a prefix until repaired.
                        self.persist_consistency(false, out);
                        break;
                    }
                    if let Some(room) = &mut self.room {
                        room.retry = false;
                    }
                    self.append_in_flight = Some(lsn);
                    self.next_lsn = lsn + 1;
                    self.index.push(Retained {
                        lsn,
                        extent,
                        ring_bytes: extent.len + self.cfg.record_overhead_bytes,
                        at: self.now,
                    });
                    self.order.insert(lsn, extent, Stage::Appended);
                    self.secondary.appended = lsn;
                    out.push(Command::Append {
                        lsn,
                        id: None,
                        durability: Durability::Written,
                    });
                    // One append per input: its result comes next.
                    break;
                }
                Received::Piece { seq, extent } => {
                    // After every entry before it is applied (the piece is newer than them).
                    if !self.order.is_empty() {
                        break;
                    }
                    if self.secondary.consistent {
                        self.persist_consistency(false, out);
                        break;
                    }
                    self.secondary.inbox.pop_front();
                    if seq <= self.secondary.resync_seq {
                        continue; // resent
                    }
                    self.secondary.piece_storing = Some(seq);
                    out.push(Command::StorePiece { seq, extent });
                }
                Received::Done { seq } => {
                    if !self.order.is_empty() {
                        break;
                    }
                    self.secondary.inbox.pop_front();
                    self.secondary.resync_seq = self.secondary.resync_seq.max(seq);
                    if !self.secondary.consistent {
                        self.persist_consistency(true, out);
                    }
                }
            }
        }
        // Acknowledged only once durable: flush what was appended.
        self.request_flush_if_needed(out);
        let pos = Position {
            lsn: self.durable.min(self.secondary.appended),
            resync_seq: self.secondary.resync_seq,
        };
        if pos != self.secondary.acked {
            assert!(
                pos.lsn >= self.secondary.acked.lsn
                    && pos.resync_seq >= self.secondary.acked.resync_seq,
                "secondary position moved back: {pos:?} after {:?}",
                self.secondary.acked
            );
            self.secondary.acked = pos;
            out.push(Command::AckPrimary { pos });
        }
    }

    fn persist_consistency(&mut self, consistent: bool, out: &mut Vec<Command>) {
        self.secondary.consistency_persisting = Some(consistent);
        out.push(Command::PersistConsistency { consistent });
    }

    pub(super) fn secondary_appended(&mut self) {
        self.secondary.inbox.pop_front();
        self.room = None;
    }

    /// The ring refused the received entry at `lsn`: it stays at the inbox's front.
    pub(super) fn secondary_refused(&mut self, lsn: u64) {
        self.secondary.appended = self.index.last_lsn().unwrap_or(lsn - 1).min(lsn - 1);
    }

    /// The position this secondary reports to a primary that connects.
    pub fn secondary_position(&self) -> Position {
        self.secondary.acked
    }
}
