//! What moves after every input: applies to slink 0, the activity log, shipping, resync pieces,
//! replies, fallbehind modes, checkpoints and shutdown. Each step only looks at the core's state,
//! so running them all after any input is always correct; the steps are cheap (bounded by the
//! writes in flight and the number of slinks).

use super::activity::Plan;
use super::order::Stage;
use super::slink::{SlinkEvent, SlinkState, Transport};
use super::{
    Command, Core, Failure, Lsn, Mode, Position, Role, ASYNC_FLUSH_DELAY, RESYNC_SEQ_RESERVE,
    RING_PRESSURE_PERCENT,
};

impl Core {
    pub(super) fn progress(&mut self, out: &mut Vec<Command>) {
        if self.role == Role::Secondary {
            self.secondary_progress(out);
        }
        self.apply_ready(out);
        self.plan_activity_log(out);
        self.persist_floors(out);
        if self.role == Role::Primary {
            self.ship(out);
            self.resync(out);
            self.update_modes(out);
            self.reply(out);
            self.flush_for_sites(out);
        }
        self.shutdown_progress(out);
    }

    pub(super) fn on_appended(&mut self, _lsn: Lsn) {
        if self.role == Role::Secondary {
            self.secondary_appended();
        }
    }

    /// Slink 0: apply what the overlap rule allows; an entry not yet durable only inside the
    /// durable activity log (R3). A secondary has no activity log: it applies durable entries.
    fn apply_ready(&mut self, out: &mut Vec<Command>) {
        if self.slink0_failed {
            return;
        }
        self.al.clear_wanted();
        for (lsn, extent) in self.order.ready() {
            let allowed = lsn <= self.durable
                || (self.role == Role::Primary && self.al.covers_or_want(&extent));
            if !allowed {
                continue;
            }
            self.al.touch(&extent, lsn);
            self.order.set_stage(lsn, Stage::Applying);
            out.push(Command::Apply { lsn });
        }
    }

    pub(super) fn on_applied(
        &mut self,
        lsn: Lsn,
        result: Result<(), String>,
        out: &mut Vec<Command>,
    ) {
        let u = self.order.remove(lsn);
        assert!(
            u.is_some_and(|u| u.stage == Stage::Applying),
            "applied lsn {lsn} that was not being applied ({u:?})"
        );
        let applied = self.order.first().map_or(self.next_lsn - 1, |f| f - 1);
        // A failed write is not applied: slink 0's applied prefix (and so its cursor) stays
        // below it, so a restart replays it from the replog.
        self.applied0 = match self.slink0_hole {
            Some(hole) => applied.min(hole - 1),
            None => applied,
        };
        if result.is_err() && self.slink0_hole.is_none_or(|h| lsn < h) {
            self.slink0_hole = Some(lsn);
            self.applied0 = self.applied0.min(lsn - 1);
        }
        match result {
            Ok(()) => {
                if let Some(w) = self.waiting.get_mut(&lsn) {
                    w.applied = true;
                }
            }
            Err(e) => {
                // The device of this site failed a write: fail-stop for its clients. The entry is
                // in the replog; a later start replays it.
                self.fail_slink(0, format!("write of lsn {lsn} failed: {e}"), out);
                let ids: Vec<_> = self.waiting.values().map(|w| w.id).collect();
                self.waiting.clear();
                for id in ids {
                    out.push(Command::Reply {
                        id,
                        result: Err(Failure::Io(format!("device write failed: {e}"))),
                    });
                }
            }
        }
    }

    fn plan_activity_log(&mut self, out: &mut Vec<Command>) {
        if self.role != Role::Primary {
            return;
        }
        match self.al.plan(self.durable) {
            Plan::Idle => {}
            Plan::Write { token, extents } => {
                out.push(Command::WriteActivityLog { token, extents })
            }
            Plan::NeedFlush => self.request_flush(out),
        }
    }

    /// Hand every active site what is durable (R1).
    fn ship(&mut self, out: &mut Vec<Command>) {
        let durable = self.durable;
        for s in self.slinks.iter_mut().skip(1) {
            if !s.active() {
                continue;
            }
            let after = s.shipped.max(s.skip_to);
            if durable > after {
                out.push(Command::Ship {
                    slink: s.nr(),
                    after,
                    upto: durable,
                });
                s.shipped = durable;
            } else if s.skip_to > s.shipped {
                s.shipped = s.skip_to;
            }
        }
    }

    /// Resync pieces, once slink 0 holds everything shipped to the site before them.
    fn resync(&mut self, out: &mut Vec<Command>) {
        let applied0 = self.applied0;
        let written = self.written;
        for s in self.slinks.iter_mut().skip(1) {
            // A failed device is no source for pieces.
            if self.slink0_failed || !s.active() || s.seq_reserving || applied0 < s.shipped {
                continue;
            }
            loop {
                if s.next_seq > s.seq_reserved {
                    let reserved = s.next_seq + RESYNC_SEQ_RESERVE;
                    s.seq_reserving = true;
                    out.push(Command::PersistResyncSeq {
                        slink: s.nr(),
                        reserved,
                    });
                    break;
                }
                if s.dirty.is_clean() {
                    if s.resync_running
                        && s.dirty.pieces_in_flight() == 0
                        && s.complete_in_flight.is_none()
                        && s.shipped >= s.resync_high
                    {
                        s.complete_in_flight = Some(s.next_seq);
                        out.push(Command::ResyncComplete {
                            slink: s.nr(),
                            seq: s.next_seq,
                        });
                        s.next_seq += 1;
                    }
                    break;
                }
                match s.dirty.next_piece(s.next_seq) {
                    Some(piece) => {
                        s.next_seq += 1;
                        s.resync_running = true;
                        s.resync_high = s.resync_high.max(written);
                        // A marker sent before this piece no longer ends the resync.
                        s.complete_in_flight = None;
                        out.push(Command::ResyncPiece {
                            slink: s.nr(),
                            piece,
                        });
                    }
                    None => break,
                }
            }
        }
    }

    fn update_modes(&mut self, out: &mut Vec<Command>) {
        for i in 1..self.slinks.len() {
            let lag = self.lag(self.slinks[i].nr());
            let s = &mut self.slinks[i];
            if let Some(m) = s.update_mode(&lag) {
                out.push(Command::Event {
                    kind: if m == Mode::Sync {
                        "slink-sync"
                    } else {
                        "slink-async"
                    },
                    detail: format!(
                        "slink {} now {m:?} (lag {} ios, {} bytes, {:.3}s)",
                        s.nr(),
                        lag.ios,
                        lag.bytes,
                        lag.age.as_secs_f64()
                    ),
                });
            }
        }
    }

    /// Reply to every write whose promises are kept: in the replog (durable for FUA), applied to
    /// slink 0 (reads return it), and at every site that is waited for now.
    fn reply(&mut self, out: &mut Vec<Command>) {
        let bound = self
            .slinks
            .iter()
            .skip(1)
            .filter(|s| s.waited_for())
            .map(|s| s.acked.max(s.skip_to))
            .min()
            .unwrap_or(Lsn::MAX);
        let ready: Vec<Lsn> = self
            .waiting
            .range(..=bound.min(self.written))
            .filter(|(lsn, w)| w.applied && (!w.fua || **lsn <= self.durable))
            .map(|(lsn, _)| *lsn)
            .collect();
        for lsn in ready {
            if let Some(w) = self.waiting.remove(&lsn) {
                out.push(Command::Reply {
                    id: w.id,
                    result: Ok(()),
                });
            }
        }
    }

    /// Sites only get durable entries: flush when one waits for that. A write waiting for a sync
    /// site or a FUA flushes now; async sites within `ASYNC_FLUSH_DELAY`.
    fn flush_for_sites(&mut self, out: &mut Vec<Command>) {
        if self.written <= self.durable || self.flush_in_flight {
            return;
        }
        let sync_waiting = self.slinks.iter().skip(1).any(|s| s.waited_for())
            && self
                .waiting
                .keys()
                .next_back()
                .is_some_and(|l| *l > self.durable);
        let fua_waiting = self
            .waiting
            .iter()
            .any(|(l, w)| w.fua && *l <= self.written && *l > self.durable);
        let async_waiting = self
            .slinks
            .iter()
            .skip(1)
            .any(|s| s.active() && s.shipped < self.written);
        if sync_waiting
            || fua_waiting
            || (async_waiting && self.now.saturating_sub(self.last_flush_at) >= ASYNC_FLUSH_DELAY)
        {
            self.request_flush(out);
        }
    }

    /// What a slink may persist as its cursor now (R2: never above the durable lsn).
    pub(super) fn checkpointable(&self, i: usize) -> Lsn {
        let s = &self.slinks[i];
        let has = if i == 0 {
            self.applied0
        } else {
            s.acked.max(s.skip_to)
        };
        has.min(self.durable)
    }

    /// Ask for a checkpoint of slink `i` if it would move its cursor; true when asked. Not while
    /// its drop floor's clear is on its way (see "Drop floor").
    pub(super) fn checkpoint(&mut self, i: usize, out: &mut Vec<Command>) -> bool {
        let lsn = self.checkpointable(i);
        let s = &mut self.slinks[i];
        if s.checkpoint_in_flight.is_some() || lsn <= s.cursor || s.floor.repaired {
            return false;
        }
        s.checkpoint_in_flight = Some(lsn);
        out.push(Command::Checkpoint {
            slink: s.nr(),
            lsn,
            sync_devices: s.cfg.transport == Transport::Local,
        });
        true
    }

    pub(super) fn on_checkpoint_done(
        &mut self,
        slink: u8,
        lsn: Lsn,
        result: Result<(), String>,
        out: &mut Vec<Command>,
    ) {
        let Some(i) = self.slink_index(slink) else {
            return;
        };
        let asked = self.slinks[i].checkpoint_in_flight.take();
        assert_eq!(
            asked,
            Some(lsn),
            "checkpoint of slink {slink} not asked for"
        );
        match result {
            Ok(()) => {
                // An overflow drop may have moved the cursor past this checkpoint meanwhile.
                let s = &mut self.slinks[i];
                s.cursor = s.cursor.max(lsn);
                s.last_checkpoint = self.now;
                out.push(Command::Reclaim);
            }
            // Slink 0 synced its devices first: a failed device sync may have lost applied
            // writes (the cursor did not move, so a restart replays them): fail-stop.
            Err(e) if i == 0 => self.fail_slink(i, format!("checkpoint: {e}"), out),
            // A site's cursor was not persisted: it stays where it was (R2 holds either way),
            // the next tick asks again.
            Err(e) => out.push(Command::Event {
                kind: "checkpoint-failed",
                detail: format!("slink {slink} at lsn {lsn}: {e}"),
            }),
        }
        if let Some(room) = &mut self.room {
            room.checkpoints = room.checkpoints.saturating_sub(1);
            // The Reclaim above is this episode's: a refusal after it goes on to drop.
            room.reclaim_asked = true;
        }
    }

    pub(super) fn on_tick(&mut self, out: &mut Vec<Command>) {
        for s in &mut self.slinks {
            if std::mem::take(&mut s.seq_retry) {
                s.seq_reserving = false;
            }
            s.floor.retry = false;
        }
        for i in 0..self.slinks.len() {
            let nr = self.slinks[i].nr();
            let caught_up = self.lag(nr).ios == 0 && self.slinks[i].dirty.is_clean();
            self.slink_changed(i, SlinkEvent::Tick { caught_up }, out);
        }
        // Parked writes that waited too long for ring space fail.
        let now = self.now;
        while self
            .parked
            .front()
            .is_some_and(|w| now.saturating_sub(w.since) >= self.cfg.ring_full_wait)
        {
            if let Some(w) = self.parked.pop_front() {
                out.push(Command::Reply {
                    id: w.id,
                    result: Err(Failure::NoSpace),
                });
            }
        }
        let used =
            self.index.total_bytes() + self.index.len() as u64 * self.cfg.record_overhead_bytes;
        let pressure =
            used.saturating_mul(100) >= self.cfg.ring_bytes.saturating_mul(RING_PRESSURE_PERCENT);
        for i in 0..self.slinks.len() {
            let due =
                now.saturating_sub(self.slinks[i].last_checkpoint) >= self.cfg.checkpoint_interval;
            if due || pressure {
                self.checkpoint(i, out);
            }
        }
        if self.room.is_some() {
            self.continue_room(out);
        }
        if self.written > self.durable
            && now.saturating_sub(self.last_flush_at) >= ASYNC_FLUSH_DELAY
        {
            self.request_flush(out);
        }
    }

    pub(super) fn on_site_ack(&mut self, slink: u8, pos: Position, out: &mut Vec<Command>) {
        let Some(i) = self.slink_index(slink) else {
            return;
        };
        let s = &mut self.slinks[i];
        if pos.lsn > s.shipped.max(s.skip_to) {
            out.push(Command::Event {
                kind: "protocol-violation",
                detail: format!(
                    "slink {slink}: ack of lsn {} beyond what was shipped ({})",
                    pos.lsn, s.shipped
                ),
            });
            return;
        }
        s.acked = s.acked.max(pos.lsn);
        let mut repaired = false;
        if s.complete_in_flight.is_some_and(|c| pos.resync_seq >= c) {
            s.complete_in_flight = None;
            s.resync_running = false;
            repaired = s.acked >= s.skip_to;
        }
        let clean = s.dirty.acked(pos.resync_seq);
        s.regions_copied += clean.len() as u64;
        if repaired {
            self.floor_repaired(i);
        }
        for (device, region) in clean {
            out.push(Command::ClearDirty {
                slink,
                device,
                region,
            });
        }
        self.slink_changed(i, SlinkEvent::DirtyChanged { dirty: false }, out);
        if self.room.as_ref().is_some_and(|r| r.stuck) {
            self.continue_room(out);
        }
    }

    pub(super) fn on_link_up(&mut self, slink: u8, peer: Position, out: &mut Vec<Command>) {
        let Some(i) = self.slink_index(slink) else {
            return;
        };
        let written = self.written;
        if peer.lsn > written {
            // The site has entries this one does not: it was promoted, or this site lost
            // entries. Never resolved silently (failover decides).
            self.fail_slink(
                i,
                format!(
                    "site is ahead: it has lsn {} and this site {written}",
                    peer.lsn
                ),
                out,
            );
            return;
        }
        // Entries up to here are no longer in the ring (reclaimed below every cursor).
        let ring_floor = self
            .index
            .first_lsn()
            .map_or(written, |f| f.saturating_sub(1));
        let s = &mut self.slinks[i];
        s.dirty.forget_in_flight();
        s.next_seq = s.next_seq.max(peer.resync_seq + 1);
        // The site may have persisted that it is inconsistent (a marker lost with a session, or
        // with a restart of this site): every session ends its repair with a completion marker.
        s.resync_running = true;
        s.complete_in_flight = None;
        let floor = s.drop_floor.unwrap_or(s.cursor).min(s.cursor);
        // A partial repair resumes after what the site has or what was dropped for it; it needs
        // every entry after that in the ring. A site that reports less than it acknowledged
        // (while a drop floor let it off) can need entries the ring reclaimed: only a full
        // resync repairs that.
        let unservable = peer.lsn.max(s.skip_to) < ring_floor;
        if peer.lsn < floor || unservable {
            // The site lost entries this ring no longer holds: a full resync, or nothing.
            if s.cfg.region_bytes.is_some() {
                s.dirty.mark_all();
                s.skip_to = s.skip_to.max(s.cursor);
                s.acked = s.cursor;
                let token = self.next_token;
                self.next_token += 1;
                out.push(Command::MarkDirty {
                    slink,
                    token,
                    extents: super::whole_devices(&self.cfg),
                });
                out.push(Command::Event {
                    kind: "resync-full",
                    detail: format!(
                        "slink {slink}: the site has lsn {}, the ring starts above {}",
                        peer.lsn, s.cursor
                    ),
                });
            } else {
                self.fail_slink(
                    i,
                    format!("site has lsn {} below the ring and no dirty log", peer.lsn),
                    out,
                );
                return;
            }
        } else {
            if peer.lsn < s.acked && s.drop_floor.is_none() {
                out.push(Command::Event {
                    kind: "site-lost-entries",
                    detail: format!(
                        "slink {slink}: the site reports lsn {}, it had acknowledged {}",
                        peer.lsn, s.acked
                    ),
                });
            }
            // Entries dropped for it count as had: their regions are dirty.
            s.acked = peer.lsn.max(s.skip_to);
        }
        let s = &mut self.slinks[i];
        s.shipped = s.acked.max(s.skip_to);
        self.slink_changed(i, SlinkEvent::Connected, out);
    }

    fn shutdown_progress(&mut self, out: &mut Vec<Command>) {
        if !self.shutting_down || self.stopped {
            return;
        }
        let drained = self.parked.is_empty()
            && self.waiting.is_empty()
            && self.order.is_empty()
            && self.durable >= self.next_lsn - 1
            && self.append_in_flight.is_none();
        if !drained {
            self.request_flush_if_needed(out);
            return;
        }
        let mut busy = false;
        for i in 0..self.slinks.len() {
            self.checkpoint(i, out);
            busy |= self.slinks[i].checkpoint_in_flight.is_some();
        }
        // An unclean start's repair marks must be durable before the log that names the
        // extents is emptied.
        if busy || self.al.is_writing() || !self.recovery_marks.is_empty() {
            return;
        }
        if !self.al.extents().is_empty() {
            if let Some((token, extents)) = self.al.clear() {
                out.push(Command::WriteActivityLog { token, extents });
            }
            return;
        }
        for i in 0..self.slinks.len() {
            self.slink_changed(i, SlinkEvent::Stop, out);
        }
        self.stopped = true;
        out.push(Command::Stopped);
    }

    /// Ask for a flush when something appended is not durable and none is in flight.
    pub(super) fn request_flush_if_needed(&mut self, out: &mut Vec<Command>) {
        if self.durable < self.next_lsn - 1 && !self.flush_in_flight {
            self.request_flush(out);
        }
    }

    /// For status: slinks in a state that a write waits on.
    pub fn waited_slinks(&self) -> Vec<u8> {
        self.slinks
            .iter()
            .skip(1)
            .filter(|s| s.waited_for())
            .map(|s| s.nr())
            .collect()
    }

    pub fn slink_state(&self, nr: u8) -> Option<SlinkState> {
        self.slink(nr).map(|s| s.state())
    }
}
