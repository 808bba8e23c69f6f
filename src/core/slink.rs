//! One slink as the core sees it: its positions, its mode and its state, with the one function
//! through which its state changes ([`SlinkCore::on`]).
//!
//! Positions (all lsns; see the invariants in `core/mod.rs`):
//! - `shipped`: entries up to here were handed to the site (driver) to send or apply;
//! - `acked`: the site has every entry up to here (a `tcp` site: durably, in its own replog; a
//!   `local` site: applied to its devices);
//! - `cursor`: persisted in the replog metadata; the ring never reclaims above it;
//! - `skip_to`: entries up to here were dropped for this site (ring overflow); their regions are
//!   dirty instead.

use crate::engine::policy::{next_mode, Fallbehind, Lag, Mode, PolicyKind};

use super::dirty::DirtyRegions;
use super::{Lsn, Nanos};

/// How the site is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Its devices are on this host (slink 0 is the primary's own devices).
    Local,
    /// A remote replicator daemon over a site link.
    Remote,
}

/// How long writes wait for a sync site whose link is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownWait {
    /// At most this long; then the site is out of date and no longer waited for.
    Bounded(Nanos),
    /// Forever: RPO 0 above availability.
    Forever,
}

#[derive(Clone, Debug)]
pub struct SlinkConfig {
    pub nr: u8,
    pub transport: Transport,
    pub policy: PolicyKind,
    pub fallbehind: Fallbehind,
    pub down_wait: DownWait,
    /// Region size of its dirty log, or None when it has none (entries are never dropped for a
    /// site without one: writes wait instead).
    pub region_bytes: Option<u64>,
}

/// What a slink is doing, as status shows it. Derived from facts by [`SlinkCore::derive`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlinkState {
    /// Connected (or local) and clean.
    Up,
    /// Connected, copying dirty regions.
    Resync,
    /// The link is down; a sync site is still waited for (up to its down wait).
    Down,
    /// A sync site was down longer than its down wait: no longer waited for; its missed writes
    /// stay in the ring or go to its dirty log. Back to Up once connected, caught up and clean.
    OutOfDate,
    /// A device of the site failed, or the site diverged: it gets nothing until an operator acts.
    Faulty,
    /// The group is stopping.
    Stopped,
}

/// What happened to a slink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlinkEvent {
    Connected,
    Disconnected,
    /// Time passed; `caught_up`: no lag and no dirty region.
    Tick {
        caught_up: bool,
    },
    DirtyChanged {
        dirty: bool,
    },
    Failed,
    Stop,
    Paused(bool),
}

/// Where a slink's persisted drop floor stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloorPersist {
    /// The lowest floor the disk may hold (None: it holds none). Restored at start; after a
    /// failed write the disk holds the old or the new value, so this is the lower of the two.
    pub on_disk: Option<Lsn>,
    /// A write of this value is on its way.
    pub in_flight: Option<Option<Lsn>>,
    /// The site's repair completed: the floor is cleared once the clear is durable. Until
    /// then `drop_floor` keeps deciding and the cursor does not move (nor do drops).
    pub repaired: bool,
    /// The last write failed: the next tick may try again.
    pub retry: bool,
}

impl FloorPersist {
    /// The lowest floor the disk may hold after a write of `attempted` failed.
    pub fn write_failed(&mut self, attempted: Option<Lsn>) {
        self.on_disk = match (self.on_disk, attempted) {
            (Some(old), Some(new)) => Some(old.min(new)),
            (old, new) => old.or(new),
        };
        self.retry = true;
    }

    /// What the disk should hold now.
    pub fn wanted(&self, drop_floor: Option<Lsn>) -> Option<Lsn> {
        if self.repaired {
            None
        } else {
            drop_floor
        }
    }
}

/// A state change, for the event log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: SlinkState,
    pub to: SlinkState,
}

impl Change {
    /// The event name users see (`wait`, hooks, logs).
    pub fn event_kind(&self) -> &'static str {
        match (self.from, self.to) {
            (_, SlinkState::Up) if self.from == SlinkState::Resync => "resync-end",
            // An out-of-date site is current (waited for) again.
            (_, SlinkState::Up) if self.from == SlinkState::OutOfDate => "slink-uptodate",
            (_, SlinkState::Up) => "slink-up",
            (_, SlinkState::Resync) => "resync-start",
            (_, SlinkState::Down) => "slink-down",
            (_, SlinkState::OutOfDate) => "slink-outdated",
            (_, SlinkState::Faulty) => "slink-faulty",
            (_, SlinkState::Stopped) => "slink-stopped",
        }
    }
}

#[derive(Debug)]
pub struct SlinkCore {
    pub cfg: SlinkConfig,
    pub shipped: Lsn,
    pub acked: Lsn,
    pub cursor: Lsn,
    pub skip_to: Lsn,
    pub mode: Mode,
    pub dirty: DirtyRegions,
    /// Next resync sequence number to hand out, and the highest one persisted as reserved: no
    /// number above `seq_reserved` is used before the reservation is durable, so numbers never
    /// repeat across restarts.
    pub next_seq: u64,
    pub seq_reserved: u64,
    pub seq_reserving: bool,
    /// The last reservation failed: the next tick asks again.
    pub seq_retry: bool,
    /// The site may be inconsistent (a resync ran, or it reconnected): it gets a completion
    /// marker once clean, and this stays set until the site acknowledged the marker.
    pub resync_running: bool,
    /// The sequence number of the completion marker on its way.
    pub complete_in_flight: Option<u64>,
    /// The newest lsn slink 0 may have applied when a piece of this resync was read: the piece
    /// can hold that entry's bytes, so the site is a prefix again only once the stream got every
    /// entry up to here (the completion marker waits for it).
    pub resync_high: Lsn,
    /// What the site had when entries were first dropped for it (since it was last repaired):
    /// a site that reconnects with at least this much lacks only dropped entries, which its dirty
    /// regions cover; less means it lost entries it had acknowledged. Persisted (see "Drop
    /// floor" in `core/mod.rs`): `floor` holds what is on disk and what is on its way.
    pub drop_floor: Option<Lsn>,
    pub floor: FloorPersist,
    pub checkpoint_in_flight: Option<Lsn>,
    pub last_checkpoint: Nanos,
    /// Dirty regions the site confirmed it copied, since this core started (metrics).
    pub regions_copied: u64,
    connected: bool,
    down_since: Option<Nanos>,
    outdated: bool,
    faulty: bool,
    stopped: bool,
    paused: bool,
    state: SlinkState,
}

impl SlinkCore {
    pub fn new(cfg: SlinkConfig, cursor: Lsn, seq_persisted: u64, now: Nanos) -> Self {
        let mode = if cfg.policy == PolicyKind::Sync {
            Mode::Sync
        } else {
            Mode::Async
        };
        let local = cfg.transport == Transport::Local;
        let mut s = SlinkCore {
            cfg,
            shipped: cursor,
            acked: cursor,
            cursor,
            skip_to: 0,
            mode,
            dirty: DirtyRegions::default(),
            next_seq: seq_persisted + 1,
            seq_reserved: seq_persisted,
            seq_reserving: false,
            seq_retry: false,
            resync_running: false,
            complete_in_flight: None,
            resync_high: 0,
            drop_floor: None,
            floor: FloorPersist::default(),
            checkpoint_in_flight: None,
            last_checkpoint: now,
            regions_copied: 0,
            connected: local,
            down_since: if local { None } else { Some(now) },
            outdated: false,
            faulty: false,
            stopped: false,
            paused: false,
            state: SlinkState::Up,
        };
        s.state = s.derive();
        s
    }

    pub fn nr(&self) -> u8 {
        self.cfg.nr
    }

    pub fn state(&self) -> SlinkState {
        self.state
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    pub fn paused(&self) -> bool {
        self.paused
    }

    pub fn down_since(&self) -> Option<Nanos> {
        self.down_since
    }

    /// The status state from the facts. Precedence: stopped, faulty, out of date, down, resync.
    fn derive(&self) -> SlinkState {
        if self.stopped {
            SlinkState::Stopped
        } else if self.faulty {
            SlinkState::Faulty
        } else if self.outdated {
            SlinkState::OutOfDate
        } else if !self.connected {
            SlinkState::Down
        } else if !self.dirty.is_clean() {
            SlinkState::Resync
        } else {
            SlinkState::Up
        }
    }

    /// The one place a slink's state changes: apply the event to the facts, derive the state,
    /// and report a change. `now` is the driver's clock.
    pub fn on(&mut self, ev: SlinkEvent, now: Nanos) -> Option<Change> {
        match ev {
            SlinkEvent::Connected => {
                self.connected = true;
                self.down_since = None;
            }
            SlinkEvent::Disconnected => {
                if self.cfg.transport == Transport::Remote {
                    if self.connected || self.down_since.is_none() {
                        self.down_since = Some(now);
                    }
                    self.connected = false;
                }
            }
            SlinkEvent::Tick { caught_up } => {
                if let (false, Some(since), DownWait::Bounded(wait)) =
                    (self.connected, self.down_since, self.cfg.down_wait)
                {
                    if self.mode == Mode::Sync && now.saturating_sub(since) >= wait {
                        self.outdated = true;
                    }
                }
                if self.outdated && self.connected && caught_up {
                    self.outdated = false;
                }
            }
            SlinkEvent::DirtyChanged { .. } => {}
            SlinkEvent::Failed => self.faulty = true,
            SlinkEvent::Stop => self.stopped = true,
            SlinkEvent::Paused(p) => self.paused = p,
        }
        let to = self.derive();
        if to == self.state {
            return None;
        }
        let change = Change {
            from: self.state,
            to,
        };
        self.state = to;
        Some(change)
    }

    /// Re-evaluate the fallbehind mode; Some(new mode) when it changed.
    pub fn update_mode(&mut self, lag: &Lag) -> Option<Mode> {
        let m = next_mode(self.cfg.policy, &self.cfg.fallbehind, self.mode, lag);
        if m == self.mode {
            return None;
        }
        self.mode = m;
        Some(m)
    }

    /// Whether writes wait for this site now: sync mode, not paused, and in a state that is
    /// waited for (a Down site only until its down wait runs out, then it is OutOfDate).
    pub fn waited_for(&self) -> bool {
        self.mode == Mode::Sync
            && !self.paused
            && matches!(
                self.state,
                SlinkState::Up | SlinkState::Resync | SlinkState::Down
            )
    }

    /// Whether the site gets entries and resync pieces now.
    pub fn active(&self) -> bool {
        self.connected
            && !self.paused
            && !matches!(self.state, SlinkState::Faulty | SlinkState::Stopped)
    }

    /// Whether entries may be dropped for this site when the ring is full: an async (or out of
    /// date) site with a dirty log. Sync and stall sites, slink 0 and sites without a dirty log
    /// make writes wait instead.
    pub fn droppable(&self) -> bool {
        self.cfg.nr != 0
            && self.cfg.region_bytes.is_some()
            && (self.cfg.policy == PolicyKind::Async
                || self.state == SlinkState::OutOfDate
                || self.state == SlinkState::Faulty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    fn remote_sync(down_wait: DownWait) -> SlinkCore {
        SlinkCore::new(
            SlinkConfig {
                nr: 1,
                transport: Transport::Remote,
                policy: PolicyKind::Sync,
                fallbehind: Fallbehind::default(),
                down_wait,
                region_bytes: Some(4096),
            },
            0,
            0,
            0,
        )
    }

    #[test]
    fn a_sync_site_down_past_its_wait_is_out_of_date_and_not_waited_for() {
        let mut s = remote_sync(DownWait::Bounded(5 * S));
        assert_eq!(
            s.on(SlinkEvent::Connected, 0).map(|c| c.to),
            Some(SlinkState::Up)
        );
        assert_eq!(
            s.on(SlinkEvent::Disconnected, 10 * S).map(|c| c.to),
            Some(SlinkState::Down)
        );
        assert!(s.waited_for(), "down but within its wait");
        assert_eq!(s.on(SlinkEvent::Tick { caught_up: false }, 14 * S), None);
        let c = s.on(SlinkEvent::Tick { caught_up: false }, 15 * S);
        assert_eq!(c.map(|c| c.event_kind()), Some("slink-outdated"));
        assert!(!s.waited_for());
        // Back, but behind: still out of date until caught up.
        assert_eq!(s.on(SlinkEvent::Connected, 16 * S), None);
        assert!(!s.waited_for());
        assert_eq!(
            s.on(SlinkEvent::Tick { caught_up: true }, 17 * S)
                .map(|c| c.to),
            Some(SlinkState::Up)
        );
        assert!(s.waited_for());
    }

    #[test]
    fn a_site_that_waits_forever_is_never_out_of_date() {
        let mut s = remote_sync(DownWait::Forever);
        s.on(SlinkEvent::Connected, 0);
        s.on(SlinkEvent::Disconnected, S);
        s.on(SlinkEvent::Tick { caught_up: false }, 1_000 * S);
        assert_eq!(s.state(), SlinkState::Down);
        assert!(s.waited_for());
    }

    #[test]
    fn a_paused_site_is_not_waited_for_and_gets_nothing() {
        let mut s = remote_sync(DownWait::Forever);
        s.on(SlinkEvent::Connected, 0);
        s.on(SlinkEvent::Paused(true), 0);
        assert!(!s.waited_for());
        assert!(!s.active());
        s.on(SlinkEvent::Paused(false), 0);
        assert!(s.waited_for() && s.active());
    }

    #[test]
    fn faulty_wins_over_every_other_fact() {
        let mut s = remote_sync(DownWait::Bounded(S));
        s.on(SlinkEvent::Failed, 0);
        s.on(SlinkEvent::Connected, 0);
        assert_eq!(s.state(), SlinkState::Faulty);
        assert!(!s.waited_for());
    }
}
