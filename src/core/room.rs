//! A full ring: writes park (in arrival order) while the core makes room. First every slink
//! checkpoints and the ring reclaims; if that is not enough, entries are dropped for the sites
//! that may lose them (async or out of date, with a dirty log): their regions are marked dirty
//! durably, then their cursors move past the entries, then the ring reclaims. Sites that may not
//! lose entries (slink 0, sync sites waited for, stall sites, sites without a dirty log) make the
//! writes wait, up to `CoreConfig::ring_full_wait`, then ENOSPC.

use super::{Command, Core, Extent, Lsn, Role, Room, OVERFLOW_FREE_DIVISOR};

impl Core {
    pub(super) fn start_room(&mut self, out: &mut Vec<Command>) {
        if self.room.is_none() {
            self.room = Some(Room::default());
        }
        let mut asked = 0;
        for i in 0..self.slinks.len() {
            if self.checkpoint(i, out) {
                asked += 1;
            }
        }
        let in_flight = self
            .slinks
            .iter()
            .filter(|s| s.checkpoint_in_flight.is_some())
            .count();
        if let Some(room) = &mut self.room {
            room.checkpoints = in_flight.max(asked);
            room.stuck = false;
        }
        if in_flight == 0 {
            if let Some(room) = self.room.as_mut().filter(|r| !r.reclaim_asked) {
                room.reclaim_asked = true;
                out.push(Command::Reclaim);
                return;
            }
            self.plan_drop(out);
        }
    }

    /// Something changed (a checkpoint, an ack, a tick): go on making room.
    pub(super) fn continue_room(&mut self, out: &mut Vec<Command>) {
        let Some(room) = &self.room else { return };
        if room.checkpoints > 0 || !room.marks.is_empty() {
            return;
        }
        // Checkpoints may have moved cursors since: ask again, then drop if nothing moved.
        let mut asked = false;
        for i in 0..self.slinks.len() {
            asked |= self.checkpoint(i, out);
        }
        if asked {
            if let Some(room) = &mut self.room {
                room.checkpoints = self
                    .slinks
                    .iter()
                    .filter(|s| s.checkpoint_in_flight.is_some())
                    .count();
            }
            return;
        }
        self.retry_parked(out);
        if self.room.is_some() && self.append_in_flight.is_none() {
            self.plan_drop(out);
        }
    }

    /// Drop entries for the sites that may lose them, up to a target that frees an eighth of
    /// the ring, never past a cursor of a site that may not lose them.
    fn plan_drop(&mut self, out: &mut Vec<Command>) {
        if self.role != Role::Primary {
            return;
        }
        let floor = self
            .slinks
            .iter()
            .filter(|s| !s.droppable())
            .map(|s| s.cursor)
            .min()
            .unwrap_or(Lsn::MAX);
        let want = (self.cfg.ring_bytes / OVERFLOW_FREE_DIVISOR).max(1);
        let mut freed = 0u64;
        let mut target = 0;
        for r in self.index.range(0, floor) {
            freed += r.ring_bytes;
            target = r.lsn;
            if freed >= want {
                break;
            }
        }
        let mut planned = false;
        let pending: Vec<u8> = self
            .room
            .as_ref()
            .map(|r| r.marks.values().map(|(nr, _)| *nr).collect())
            .unwrap_or_default();
        for i in 1..self.slinks.len() {
            let s = &self.slinks[i];
            // A floor whose clear is on its way holds the cursor (see "Drop floor").
            if !s.droppable() || s.cursor >= target || pending.contains(&s.nr()) || s.floor.repaired
            {
                continue;
            }
            let nr = s.nr();
            let from = s.cursor.max(s.skip_to);
            // Entries up to `from` are the site's or, above the cursor, still in the ring; those
            // above it become dirty regions. A site that comes back with less than `from` lacks
            // entries that are neither: a full resync.
            let s = &mut self.slinks[i];
            s.drop_floor = Some(s.drop_floor.map_or(from, |f| f.min(from)));
            let extents: Vec<Extent> = self.index.range(from, target).map(|r| r.extent).collect();
            for e in &extents {
                self.slinks[i].dirty.mark(e.device, e.offset, e.len);
            }
            let token = self.token();
            out.push(Command::MarkDirty {
                slink: nr,
                token,
                extents,
            });
            out.push(Command::Event {
                kind: "overflow",
                detail: format!(
                    "replog full: slink {nr} drops lsn {}..={target}, regions marked dirty",
                    from + 1
                ),
            });
            if let Some(room) = &mut self.room {
                room.marks.insert(token, (nr, target));
            }
            planned = true;
        }
        if let Some(room) = &mut self.room {
            room.stuck = !planned && room.marks.is_empty();
        }
    }

    pub(super) fn on_dirty_persisted(
        &mut self,
        token: u64,
        result: Result<(), String>,
        out: &mut Vec<Command>,
    ) {
        if let Err(e) = result {
            // A dirty mark that is not durable cannot back a drop or an unclean start's repair:
            // halt. Nothing moved past it (the drop's cursor, the frozen activity log), so a
            // restart plans the same marks again.
            self.halt(format!("dirty log persist failed: {e}"), out);
            return;
        }
        if self.recovery_marks.remove(&token) && self.recovery_marks.is_empty() {
            self.al.freeze(false);
        }
        let planned = self.room.as_mut().and_then(|r| r.marks.remove(&token));
        if let Some((nr, target)) = planned {
            if let Some(i) = self.slink_index(nr) {
                let s = &mut self.slinks[i];
                s.skip_to = s.skip_to.max(target);
                s.acked = s.acked.max(target);
                s.shipped = s.shipped.max(target);
                s.cursor = s.cursor.max(target);
                out.push(Command::DropTo {
                    slink: nr,
                    lsn: s.cursor,
                });
                let now_dirty = !s.dirty.is_clean();
                self.slink_changed(
                    i,
                    super::slink::SlinkEvent::DirtyChanged { dirty: now_dirty },
                    out,
                );
            }
        }
    }

    /// Admit the first parked write (one per input: see `append_in_flight`).
    pub(super) fn retry_parked(&mut self, out: &mut Vec<Command>) {
        if self.append_in_flight.is_some() {
            return;
        }
        if self.role == Role::Secondary {
            // The secondary's inbox tries its front entry again in `secondary_progress`; the
            // episode (and its one reclaim) lasts until an append is accepted.
            if let Some(room) = &mut self.room {
                room.retry = true;
            }
            return;
        }
        match self.parked.pop_front() {
            Some(w) => self.admit(w, out),
            None => self.room = None,
        }
    }
}
