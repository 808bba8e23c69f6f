//! The group core: every decision of a group, with no I/O.
//!
//! The core takes [`Input`]s (a write arrived, a log write completed, a site acknowledged, a link
//! went down, a tick), each with the time supplied by the driver, and returns [`Command`]s
//! (append, apply, ship, checkpoint, mark dirty, reply). It owns no threads, files, clocks or
//! runtime; the production driver and the simulation (`sim/`) carry commands out and report
//! their completions as inputs. Primary and secondary are two roles of this one type.
//!
//! Code map: [`slink`] a slink's positions, mode and its one state transition function;
//! [`order`] the apply order and overlap rule; [`activity`] the activity log policy (power-loss
//! safety); [`dirty`] dirty regions and resync pieces; [`index`] the retained entries (lag,
//! overflow marks).
//!
//! # Invariants (asserted; a broken one stops the process)
//! - lsns are handed out in order without gaps on the primary; a site applies in lsn order.
//! - R1: an entry reaches another site only once it is durable in this site's replog
//!   (`shipped <= durable`). After a power loss the primary never has fewer entries than a site.
//! - R2: a persisted cursor never exceeds the replog's durable lsn, nor what its site has.
//! - R3: slink 0 applies an entry that is not yet durable only inside an extent of the durable
//!   activity log; after an unclean start those extents are dirty for every other site.
//! - A region is marked dirty, durably, before a cursor moves past entries that covered it.
//! - A resync piece is read from slink 0 only once slink 0 has applied everything shipped to
//!   that site before it; a piece read before its region was marked dirty again never cleans it.
//! - Resync sequence numbers never repeat, across restarts too (reserved durably ahead of use).
//!
//! # Storage failures
//! An I/O error is an input, never a panic. What the core does with each (the simulation
//! injects every one of them, see `sim/`):
//! - **Replog write or sync** (an append, a flush; the replog refuses everything after one, to
//!   keep lsn order): `Input::LogFailed`. The core halts (`Command::Halt`): every waiting write,
//!   parked write and flush fails with `Failure::Io` (a failed write is never acknowledged; its
//!   entry may or may not be in the replog, as a block device's failed write may or may not have
//!   happened), every later input is refused, and the driver reopens the group from its disks
//!   (the recovery of a kill -9). A full disk (ENOSPC) is the same failure; reopening retries
//!   until space is back.
//! - **Dirty log persist** (`DirtyPersisted` Err), **activity log write** (`ActivityLogWritten`
//!   Err), **resync piece store** on a secondary (`PieceStored` Err): halt, as above. Nothing
//!   moved past what failed (a drop's cursor waits for its marks, the unclean start's activity
//!   log stays frozen until its marks are durable, an unstored piece is not acknowledged), so the
//!   restart plans the same work again.
//! - **Slink 0 device write** (`Applied` Err) or **device sync at a slink-0 checkpoint**
//!   (`CheckpointDone` Err for slink 0), or the driver's `SiteFailed` for slink 0: slink 0 is
//!   Faulty (fail-stop): the waiting writes fail with EIO, new writes fail with EIO, nothing more
//!   is applied and no resync piece is read from it. The applied prefix (and so slink 0's cursor)
//!   stays below the lowest failed write, so a restart replays it from the replog; the operator
//!   (the simulation models one) restarts the group. A site whose devices failed has not
//!   converged until then.
//! - **A site's cursor persist** (`CheckpointDone` Err for another slink): the cursor stays where
//!   it was (R2 holds either way) and the next tick asks again. **Resync sequence reservation**
//!   (`ResyncSeqPersisted` Err): no number above the old reservation is used; the next tick asks
//!   again (not at once: a failing disk would loop).
//! - **Reads** are the driver's: a replog read for shipping or a device read for a resync piece
//!   that fails ends the link's session (the site reports its position, the core resends from
//!   it and reads the piece again: `LinkDown` forgets pieces in flight); a replog read for an
//!   apply is an apply failure (`Applied` Err). A failed `DropTo` cursor persist leaves the
//!   persisted cursor lower (the entries stay in the ring, their regions dirty; the next
//!   checkpoint persists it); a failed reclaim frees nothing (`Reclaimed` with the old space).
//!
//! # Drop floor
//! A slink's `drop_floor` (set in `room` at its first drop since its last repair) is what the
//! site had then: on `LinkUp`, a site at or above `min(floor, cursor)` lacks only entries that
//! are in the ring or dirty (a partial resync of the dirty regions); one below it lacks entries
//! that are neither (a full resync). It is persisted in the replog metadata next to the cursor
//! (`Command::PersistDropFloor`, `Input::DropFloorPersisted`), and `Restored::drop_floors`
//! brings it back, so a primary restart during a long outage still repairs partially. What is
//! safe: a floor on disk that is higher than the true one (or none, which reads as the cursor)
//! only costs a full resync; one that is lower would let a site that lost acknowledged entries
//! off with a partial one (wrong data). So the rules, all in `progress` and `room`:
//! - **Set**: in memory at the drop, then written (no wait: until it is durable the disk holds
//!   none, which is higher). A restored floor also restores `skip_to` to the cursor: the entries
//!   between the floor and the cursor are dirty, not to be shipped.
//! - **Clear**, at the end of a repair (the completion marker acknowledged): the floor keeps
//!   deciding, the slink's cursor does not move (no checkpoint, no drop) until the clear is
//!   durable; only then is the floor forgotten in memory. So the disk never holds a floor lower
//!   than the one the core decides by, and no cursor moves past entries a stale floor would
//!   vouch for.
//! - **A failed write** (either kind) leaves the old or the new value on disk, both safe by the
//!   rules above, so the core counts on the lower of the two (`FloorPersist::write_failed`);
//!   the in-memory floor stays as it was and the next tick writes again. A clear that keeps
//!   failing keeps that slink's cursor (and its drops) where they are: writes that need its
//!   room wait, then fail with ENOSPC after `ring_full_wait`.
//! - A restored floor whose dirty marks did not survive (`Restored::marks_lost`: an in-memory
//!   dirty log, or one created or overwritten at open) vouches for nothing: it is cleared at
//!   boot, like a repaired one, before the cursor moves.
//!
//! The simulation checks at every primary restart that the restored floor is never below the
//! one the stopped core decided by, and counts the full resyncs a lost floor still costs.

//! # Driver contract
//! Commands are carried out in the order given, per slink. `Append` is carried out at once and its
//! result (`Input::AppendResult`, or `Input::LogFailed` when the replog failed) reported before
//! any other input. After `Command::Halt` the core takes no more inputs that matter: the driver
//! opens the group again. Completions may come in any order across kinds; positions
//! (`LogWritten`, `LogDurable`, `SiteAck`) only grow.

pub mod activity;
pub mod dirty;
mod floor;
pub mod index;
pub mod order;
mod progress;
mod room;
mod secondary;
pub mod slink;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};

use crate::engine::policy::{Lag, Mode};

use activity::{ActivityLog, ExtentKey};
use dirty::Piece;
use index::{Retained, RetainedIndex};
use order::{ApplyOrder, Stage};
use slink::{Change, SlinkConfig, SlinkCore, SlinkEvent};

pub type Lsn = u64;
/// Nanoseconds on the driver's monotonic clock (simulated in the simulation).
pub type Nanos = u64;
/// A client request, named by the driver.
pub type RequestId = u64;

pub const NS_PER_SEC: Nanos = 1_000_000_000;

/// Where an entry writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub device: u32,
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn overlaps(&self, o: &Extent) -> bool {
        self.device == o.device
            && self.offset < o.offset.saturating_add(o.len.max(1))
            && o.offset < self.offset.saturating_add(self.len.max(1))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    pub device: u32,
    pub size: u64,
}

#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub role: Role,
    pub devices: Vec<DeviceConfig>,
    /// Slink 0 first: the devices of this site.
    pub slinks: Vec<SlinkConfig>,
    /// Ring capacity in bytes (for ring pressure and how much an overflow frees).
    pub ring_bytes: u64,
    /// Ring bytes an entry takes besides its data (header and alignment, an estimate).
    pub record_overhead_bytes: u64,
    /// How long a write waits for ring space before it fails with ENOSPC.
    pub ring_full_wait: Nanos,
    /// How often slinks checkpoint while they make progress.
    pub checkpoint_interval: Nanos,
    /// Activity log extent size (power of two) and capacity.
    pub activity_extent_bytes: u64,
    pub activity_extents_max: usize,
}

/// Ring fill (percent) at which slinks checkpoint without waiting for their interval.
pub const RING_PRESSURE_PERCENT: u64 = 50;
/// An overflow frees at least this share of the ring (1/8) so it does not run on every write.
pub const OVERFLOW_FREE_DIVISOR: u64 = 8;
/// Resync sequence numbers reserved per durable reservation.
pub const RESYNC_SEQ_RESERVE: u64 = 4096;
/// Entries only async sites wait for are made durable (and so shippable) at most this long after
/// they were written: one flush then covers many writes instead of one flush per write.
pub const ASYNC_FLUSH_DELAY: Nanos = 2_000_000;

/// What the replog and the dirty logs held at open (after the replog's own recovery).
#[derive(Clone, Debug, Default)]
pub struct Restored {
    /// Every lsn up to here is in the replog (written; not known to be durable).
    pub last_lsn: Lsn,
    /// The entries the ring retains, in lsn order.
    pub retained: Vec<Retained>,
    /// Per slink: its persisted cursor (None: not registered yet).
    pub cursors: Vec<(u8, Lsn)>,
    /// Dirty regions per slink: (slink, device, region).
    pub dirty: Vec<(u8, u32, u64)>,
    /// Per slink: the highest resync sequence number reserved.
    pub resync_seq: Vec<(u8, u64)>,
    /// Per slink that has one: its persisted drop floor (see "Drop floor").
    pub drop_floors: Vec<(u8, Lsn)>,
    /// Slinks whose dirty logs did not keep their persisted marks (in memory, created afresh or
    /// overwritten at open): a persisted drop floor does not hold for them and is cleared.
    pub marks_lost: Vec<u8>,
    /// The activity log: non-empty after an unclean stop.
    pub activity_log: Vec<ExtentKey>,
    /// Secondary: false while a resync from the primary is incomplete.
    pub consistent: bool,
}

/// An item received from the primary (secondary role); data stays with the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    Entry {
        lsn: Lsn,
        extent: Extent,
    },
    Piece {
        seq: u64,
        extent: Extent,
    },
    /// The primary's resync of this site is complete.
    Done {
        seq: u64,
    },
}

/// A site's durable position: the entries it has and the resync pieces it stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    pub lsn: Lsn,
    pub resync_seq: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Written,
    Durable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// This site is a secondary (or fenced): its devices are read-only.
    ReadOnly,
    /// The ring stayed full for the configured wait.
    NoSpace,
    /// A device or log error.
    Io(String),
    /// Outside the device.
    OutOfRange,
    /// Refused by a halted core: never admitted (no lsn, nothing written), so the request may be
    /// sent again to the group once it is opened again.
    Halted,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::ReadOnly => f.write_str("the device is read-only here (a secondary)"),
            Failure::NoSpace => f.write_str("the replog stayed full"),
            Failure::Io(e) => write!(f, "I/O error: {e}"),
            Failure::OutOfRange => f.write_str("outside the device"),
            Failure::Halted => f.write_str("the group halted; it is being opened again"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A client write (also zeroes and discard: the driver keeps the data and the kind).
    Write {
        id: RequestId,
        extent: Extent,
        fua: bool,
    },
    /// A client flush: every write acknowledged before it becomes durable.
    Flush {
        id: RequestId,
    },
    /// The result of `Command::Append` (reported at once): `accepted: false` when the ring is
    /// full.
    AppendResult {
        lsn: Lsn,
        accepted: bool,
    },
    /// Every lsn up to here was written to the replog.
    LogWritten {
        upto: Lsn,
    },
    /// Every lsn up to here is durable in the replog.
    LogDurable {
        upto: Lsn,
    },
    /// The replog failed a write or a sync (an append, a flush, or its own metadata): the replog
    /// refuses everything after such a failure, so the core halts (see "Storage failures").
    LogFailed {
        reason: String,
    },
    /// An entry was applied to slink 0's device.
    Applied {
        lsn: Lsn,
        result: Result<(), String>,
    },
    /// A site has every entry up to `pos.lsn` and every resync piece up to `pos.resync_seq`.
    SiteAck {
        slink: u8,
        pos: Position,
    },
    /// A link is up; the site reports its durable position.
    LinkUp {
        slink: u8,
        peer: Position,
    },
    LinkDown {
        slink: u8,
        reason: String,
    },
    /// A site's device failed (applying or resyncing).
    SiteFailed {
        slink: u8,
        reason: String,
    },
    CheckpointDone {
        slink: u8,
        lsn: Lsn,
        result: Result<(), String>,
    },
    /// Cursor moves for ring space were persisted and the ring reclaimed up to `first_lsn - 1`;
    /// `free_bytes` is the ring's free space now.
    Reclaimed {
        first_lsn: Lsn,
        free_bytes: u64,
    },
    DirtyPersisted {
        token: u64,
        result: Result<(), String>,
    },
    ActivityLogWritten {
        token: u64,
        result: Result<(), String>,
    },
    ResyncSeqPersisted {
        slink: u8,
        reserved: u64,
        result: Result<(), String>,
    },
    /// The result of `Command::PersistDropFloor` (same slink and floor).
    DropFloorPersisted {
        slink: u8,
        floor: Option<Lsn>,
        result: Result<(), String>,
    },
    Pause {
        slink: u8,
        paused: bool,
    },
    /// A full resync of a slink (operator).
    ResyncAll {
        slink: u8,
    },
    /// A full resync of one device for a slink (operator: `message DEV 0 resync N`).
    ResyncDevice {
        slink: u8,
        device: u32,
    },
    /// Every slink that can move its cursor checkpoints now (operator: `message DEV 0
    /// checkpoint`), without waiting for its interval.
    CheckpointNow,
    /// Secondary: items from the primary in stream order.
    Received {
        items: Vec<Received>,
    },
    /// Secondary: a new session with the primary begins. Items received in an older session and
    /// not taken yet are dropped: the primary sends again everything after the position this
    /// site reports now ([`Core::secondary_position`]).
    SessionStarted,
    /// Secondary: a resync piece was written to the device durably.
    PieceStored {
        seq: u64,
        result: Result<(), String>,
    },
    /// Secondary: the consistency flag (and the devices before it) is durable.
    ConsistencyPersisted {
        consistent: bool,
    },
    Tick,
    /// Stop: drain, checkpoint, empty the activity log.
    Shutdown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Append the request's entry to the replog with this lsn (at once; report a refusal).
    Append {
        lsn: Lsn,
        id: Option<RequestId>,
        durability: Durability,
    },
    /// Make everything appended durable; report `LogDurable`.
    FlushLog,
    /// Apply entry `lsn` to slink 0's device; report `Applied`.
    Apply {
        lsn: Lsn,
    },
    /// Hand the site every entry in `(after, upto]` (entries up to `after` it has or skips).
    Ship {
        slink: u8,
        after: Lsn,
        upto: Lsn,
    },
    /// Read a resync piece from slink 0 and hand it to the site after what was shipped before.
    ResyncPiece {
        slink: u8,
        piece: Piece,
    },
    /// The site's resync is complete (a marker in its stream, with a sequence number).
    ResyncComplete {
        slink: u8,
        seq: u64,
    },
    /// Make the site's local devices durable (if any), then persist its cursor. Cursors only
    /// move forward: a drive persists `max(persisted, lsn)` (a drop may have passed it).
    Checkpoint {
        slink: u8,
        lsn: Lsn,
        sync_devices: bool,
    },
    /// Persist dirty marks of a slink (before anything depends on them); report the token.
    MarkDirty {
        slink: u8,
        token: u64,
        extents: Vec<Extent>,
    },
    /// Persist that a region is clean for a slink (no completion needed: a lost clear only
    /// copies the region again).
    ClearDirty {
        slink: u8,
        device: u32,
        region: u64,
    },
    /// Persist a slink's cursor moved past dropped entries (after their dirty marks), then
    /// reclaim; report `Reclaimed`.
    DropTo {
        slink: u8,
        lsn: Lsn,
    },
    /// Reclaim ring space below the lowest cursor; report `Reclaimed`.
    Reclaim,
    /// Persist the activity log as exactly this set; report the token.
    WriteActivityLog {
        token: u64,
        extents: Vec<ExtentKey>,
    },
    /// Persist a slink's resync sequence reservation.
    PersistResyncSeq {
        slink: u8,
        reserved: u64,
    },
    /// Persist a slink's drop floor (None: clear it) in the replog metadata; report
    /// `DropFloorPersisted`. At most one per slink is on its way.
    PersistDropFloor {
        slink: u8,
        floor: Option<Lsn>,
    },
    /// Secondary: write a received piece to the device, durably; report `PieceStored`.
    StorePiece {
        seq: u64,
        extent: Extent,
    },
    /// Secondary: tell the primary this site's durable position.
    AckPrimary {
        pos: Position,
    },
    /// Secondary: make the devices durable, then persist the consistency flag.
    PersistConsistency {
        consistent: bool,
    },
    /// Drop the link to the primary (a protocol violation): it reconnects.
    ResetLink {
        reason: String,
    },
    Reply {
        id: RequestId,
        result: Result<(), Failure>,
    },
    Event {
        kind: &'static str,
        detail: String,
    },
    /// Shutdown finished.
    Stopped,
    /// This instance of the group cannot go on safely (see "Storage failures"): every waiting
    /// request has been failed with `Failure::Io` and every later input is refused. The driver
    /// drops the core and the replog handle and opens the group again from its disks, the same
    /// recovery as after a kill -9.
    Halt {
        reason: String,
    },
}

#[derive(Debug)]
struct WaitingWrite {
    id: RequestId,
    fua: bool,
    applied: bool,
}

#[derive(Debug)]
struct ParkedWrite {
    id: RequestId,
    extent: Extent,
    fua: bool,
    since: Nanos,
}

/// Making ring space for parked writes.
#[derive(Debug, Default)]
struct Room {
    /// Checkpoints asked for this round, not yet done.
    checkpoints: usize,
    /// Overflow dirty marks not yet persisted: token -> (slink, drop target).
    marks: BTreeMap<u64, (u8, Lsn)>,
    /// The last reclaim freed nothing new: wait for a site before retrying.
    stuck: bool,
    free_bytes: u64,
    /// A reclaim was asked without a checkpoint (cursors persisted before a restart, or moved
    /// by a drop): once per episode, so a refusal never loops on reclaims at one instant.
    reclaim_asked: bool,
    /// Secondary: the received entry at the inbox's front may be tried again (once).
    retry: bool,
}

/// Secondary role state.
#[derive(Debug, Default)]
struct Secondary {
    inbox: VecDeque<Received>,
    /// Highest lsn appended (entries received so far).
    appended: Lsn,
    resync_seq: u64,
    consistent: bool,
    consistency_persisting: Option<bool>,
    piece_storing: Option<u64>,
    acked: Position,
}

pub struct Core {
    cfg: CoreConfig,
    role: Role,
    now: Nanos,
    next_lsn: Lsn,
    written: Lsn,
    durable: Lsn,
    flush_in_flight: bool,
    /// A flush was asked for while one was in flight.
    flush_again: bool,
    index: RetainedIndex,
    order: ApplyOrder,
    /// Slink 0's applied prefix.
    applied0: Lsn,
    /// The one `Append` whose result is not reported yet (one per input, so that a refusal
    /// never leaves a later lsn appended).
    append_in_flight: Option<Lsn>,
    /// When the last flush was asked for (async shipping batches flushes, see `ASYNC_FLUSH_DELAY`).
    last_flush_at: Nanos,
    waiting: BTreeMap<Lsn, WaitingWrite>,
    flushes: Vec<(RequestId, Lsn)>,
    parked: VecDeque<ParkedWrite>,
    room: Option<Room>,
    slinks: Vec<SlinkCore>,
    al: ActivityLog,
    /// Unclean-start dirty marks not yet durable (the activity log stays frozen until then).
    recovery_marks: std::collections::BTreeSet<u64>,
    next_token: u64,
    secondary: Secondary,
    shutting_down: bool,
    stopped: bool,
    slink0_failed: bool,
    /// The lowest lsn whose write to slink 0 failed: `applied0` stays below it.
    slink0_hole: Option<Lsn>,
    /// Set by `Command::Halt`: the core refuses every input (writes and flushes with EIO).
    halted: bool,
}

impl Core {
    /// A core for a group whose replog and dirty logs held `restored`; the commands are the
    /// recovery decisions (replay onto slink 0, dirty marks after an unclean stop, a flush).
    pub fn new(cfg: CoreConfig, restored: Restored, now: Nanos) -> (Core, Vec<Command>) {
        assert!(
            cfg.slinks.first().is_some_and(|s| s.nr == 0),
            "slink 0 (this site's devices) comes first"
        );
        let mut slinks = Vec::new();
        for sc in &cfg.slinks {
            let cursor = restored
                .cursors
                .iter()
                .find(|(n, _)| *n == sc.nr)
                .map_or(restored.last_lsn, |(_, c)| *c);
            let seq = restored
                .resync_seq
                .iter()
                .find(|(n, _)| *n == sc.nr)
                .map_or(0, |(_, s)| *s);
            let mut s = SlinkCore::new(sc.clone(), cursor, seq, now);
            let floor = restored
                .drop_floors
                .iter()
                .find(|(n, _)| *n == sc.nr)
                .map(|(_, f)| *f);
            let marks_kept = sc.region_bytes.is_some() && !restored.marks_lost.contains(&sc.nr);
            match floor {
                Some(floor) if sc.nr != 0 && marks_kept => {
                    // Entries between the floor and the cursor are dirty, not to be shipped.
                    s.drop_floor = Some(floor);
                    s.floor.on_disk = Some(floor);
                    s.skip_to = cursor;
                }
                Some(floor) if sc.nr != 0 => {
                    // The marks it vouched for are gone: cleared durably before the cursor
                    // moves, like a repaired site's.
                    s.floor.on_disk = Some(floor);
                    s.floor.repaired = true;
                }
                _ => {}
            }
            if let Some(rb) = sc.region_bytes {
                for d in &cfg.devices {
                    s.dirty.add_device(d.device, d.size, rb);
                }
            }
            slinks.push(s);
        }
        for (nr, dev, region) in &restored.dirty {
            if let Some(s) = slinks.iter_mut().find(|s| s.nr() == *nr) {
                s.dirty.restore(*dev, *region);
            }
        }
        let mut index = RetainedIndex::default();
        for r in &restored.retained {
            index.push(*r);
        }
        let cursor0 = slinks.first().map_or(0, |s| s.cursor);
        let mut order = ApplyOrder::default();
        for r in index.range(cursor0, restored.last_lsn) {
            order.insert(r.lsn, r.extent, Stage::Written);
        }
        let al = ActivityLog::new(
            cfg.activity_extent_bytes,
            cfg.activity_extents_max,
            &restored.activity_log,
        );
        let role = cfg.role;
        let mut core = Core {
            role,
            now,
            next_lsn: restored.last_lsn + 1,
            written: restored.last_lsn,
            durable: 0,
            flush_in_flight: false,
            flush_again: false,
            index,
            order,
            applied0: cursor0,
            append_in_flight: None,
            last_flush_at: now,
            waiting: BTreeMap::new(),
            flushes: Vec::new(),
            parked: VecDeque::new(),
            room: None,
            slinks,
            al,
            recovery_marks: Default::default(),
            next_token: 1,
            secondary: Secondary {
                appended: restored.last_lsn,
                consistent: restored.consistent || role == Role::Primary,
                ..Default::default()
            },
            shutting_down: false,
            stopped: false,
            slink0_failed: false,
            slink0_hole: None,
            halted: false,
            cfg,
        };
        let mut out = Vec::new();
        core.recover(&restored, &mut out);
        (core, out)
    }

    fn recover(&mut self, restored: &Restored, out: &mut Vec<Command>) {
        // What recovery found may sit in the page cache only: nothing is shipped, replayed
        // outside the activity log, or counted in a cursor before it is durable (R1, R2).
        self.request_flush(out);
        // Cursors persisted just before a crash may free ring space nobody reclaimed.
        out.push(Command::Reclaim);
        if !restored.activity_log.is_empty() && self.role == Role::Primary {
            // Unclean stop: the listed extents of slink 0 may hold writes the replog lost. Every
            // other site is repaired there from slink 0. The log stays as it is until the marks
            // are durable (a crash before then finds it again).
            self.al.freeze(true);
            let extents: Vec<Extent> = restored
                .activity_log
                .iter()
                .map(|(device, i)| Extent {
                    device: *device,
                    offset: i * self.cfg.activity_extent_bytes,
                    len: self.cfg.activity_extent_bytes,
                })
                .collect();
            for i in 1..self.slinks.len() {
                let nr = self.slinks[i].nr();
                if self.slinks[i].cfg.region_bytes.is_none() {
                    self.fail_slink(
                        i,
                        "unclean stop and no dirty log: the site may differ from this one".into(),
                        out,
                    );
                    continue;
                }
                for e in &extents {
                    self.slinks[i].dirty.mark(e.device, e.offset, e.len);
                }
                let token = self.token();
                self.recovery_marks.insert(token);
                out.push(Command::MarkDirty {
                    slink: nr,
                    token,
                    extents: extents.clone(),
                });
            }
            if self.recovery_marks.is_empty() {
                self.al.freeze(false);
            }
            out.push(Command::Event {
                kind: "unclean-start",
                detail: format!(
                    "{} activity log extents marked dirty for every site",
                    extents.len()
                ),
            });
        }
        for i in 0..self.slinks.len() {
            self.slink_changed(i, SlinkEvent::DirtyChanged { dirty: true }, out);
        }
        // A restored floor that no longer holds is cleared before anything else moves.
        self.persist_floors(out);
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    // ---- queries (status, checkers) ----

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn written_lsn(&self) -> Lsn {
        self.written
    }

    pub fn durable_lsn(&self) -> Lsn {
        self.durable
    }

    pub fn last_lsn(&self) -> Lsn {
        self.next_lsn - 1
    }

    pub fn applied0(&self) -> Lsn {
        self.applied0
    }

    pub fn slink(&self, nr: u8) -> Option<&SlinkCore> {
        self.slinks.iter().find(|s| s.nr() == nr)
    }

    pub fn slinks(&self) -> &[SlinkCore] {
        &self.slinks
    }

    pub fn lag(&self, nr: u8) -> Lag {
        let Some(s) = self.slink(nr) else {
            return Lag::default();
        };
        // Slink 0 has what it applied; a site what it acknowledged.
        let has = if nr == 0 { self.applied0 } else { s.acked };
        let (bytes, age) = self.index.lag_above(has, self.written, self.now);
        Lag {
            ios: self.written.saturating_sub(has),
            bytes,
            age: std::time::Duration::from_nanos(age),
        }
    }

    /// Secondary: whether the devices are a prefix of the primary's history (no resync running).
    pub fn consistent(&self) -> bool {
        self.secondary.consistent
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Whether the core halted (`Command::Halt`): the driver reopens the group.
    pub fn is_halted(&self) -> bool {
        self.halted
    }

    /// Whether slink 0 (this site's devices) failed: writes fail until the group is restarted.
    pub fn slink0_failed(&self) -> bool {
        self.slink0_failed
    }

    pub fn activity_log(&self) -> Vec<ExtentKey> {
        self.al.extents()
    }

    /// One line of the core's positions, for logs and failed simulations.
    pub fn summary(&self) -> String {
        let slinks: Vec<String> = self
            .slinks
            .iter()
            .map(|s| {
                format!(
                    "#{} {:?} {:?} shipped {} acked {} cursor {} skip {} dirty {} ckpt {:?}",
                    s.nr(),
                    s.state(),
                    s.mode,
                    s.shipped,
                    s.acked,
                    s.cursor,
                    s.skip_to,
                    s.dirty.dirty_regions(),
                    s.checkpoint_in_flight
                )
            })
            .collect();
        format!(
            "{:?} next {} written {} durable {} applied0 {} unapplied {} waiting {} parked {} room {:?} append {:?} flush {} | {}",
            self.role,
            self.next_lsn,
            self.written,
            self.durable,
            self.applied0,
            self.order.len(),
            self.waiting.len(),
            self.parked.len(),
            self.room,
            self.append_in_flight,
            self.flush_in_flight,
            slinks.join(" | ")
        )
    }

    /// Where a retained entry writes (the driver appends the request's bytes there).
    pub fn retained_extent(&self, lsn: Lsn) -> Option<Extent> {
        self.index.get(lsn).map(|r| r.extent)
    }

    pub fn writes_in_flight(&self) -> usize {
        self.waiting.len() + self.parked.len()
    }

    // ---- the one entry point ----

    pub fn handle(&mut self, now: Nanos, input: Input, out: &mut Vec<Command>) {
        self.now = self.now.max(now);
        if self.halted {
            self.refuse_halted(input, out);
            return;
        }
        match input {
            Input::Write { id, extent, fua } => self.on_write(id, extent, fua, out),
            Input::Flush { id } => {
                let upto = self.next_lsn - 1;
                if upto <= self.durable {
                    out.push(Command::Reply { id, result: Ok(()) });
                } else {
                    self.flushes.push((id, upto));
                    self.request_flush(out);
                }
            }
            Input::AppendResult { lsn, accepted } => {
                assert_eq!(
                    self.append_in_flight.take(),
                    Some(lsn),
                    "append result for lsn {lsn} that is not the append in flight"
                );
                if accepted {
                    self.on_appended(lsn);
                    if self.role == Role::Primary && !self.parked.is_empty() {
                        self.retry_parked(out);
                    }
                } else {
                    self.on_append_refused(lsn, out);
                }
            }
            Input::LogWritten { upto } => {
                assert!(
                    upto < self.next_lsn,
                    "log written up to {upto}, only {} handed out",
                    self.next_lsn - 1
                );
                if upto > self.written {
                    self.written = upto;
                    self.order.mark_written(upto);
                }
            }
            Input::LogDurable { upto } => {
                self.flush_in_flight = false;
                assert!(
                    upto < self.next_lsn,
                    "durable up to {upto}, only {} handed out",
                    self.next_lsn - 1
                );
                if upto > self.durable {
                    self.durable = upto.min(self.written);
                }
                let durable = self.durable;
                let (done, rest): (Vec<_>, Vec<_>) =
                    self.flushes.drain(..).partition(|(_, l)| *l <= durable);
                self.flushes = rest;
                for (id, _) in done {
                    out.push(Command::Reply { id, result: Ok(()) });
                }
                if std::mem::take(&mut self.flush_again) || !self.flushes.is_empty() {
                    self.request_flush(out);
                }
            }
            Input::LogFailed { reason } => self.halt(format!("replog failed: {reason}"), out),
            Input::Applied { lsn, result } => self.on_applied(lsn, result, out),
            Input::SiteAck { slink, pos } => self.on_site_ack(slink, pos, out),
            Input::LinkUp { slink, peer } => self.on_link_up(slink, peer, out),
            Input::LinkDown { slink, reason } => {
                if let Some(i) = self.slink_index(slink) {
                    let s = &mut self.slinks[i];
                    s.dirty.forget_in_flight();
                    s.shipped = s.acked.max(s.skip_to);
                    if s.connected() {
                        out.push(Command::Event {
                            kind: "link-down",
                            detail: format!("slink {slink}: {reason}"),
                        });
                    }
                    self.slink_changed(i, SlinkEvent::Disconnected, out);
                }
            }
            Input::SiteFailed { slink, reason } => {
                if let Some(i) = self.slink_index(slink) {
                    self.fail_slink(i, reason, out);
                }
            }
            Input::CheckpointDone { slink, lsn, result } => {
                self.on_checkpoint_done(slink, lsn, result, out)
            }
            Input::Reclaimed {
                first_lsn,
                free_bytes,
            } => {
                self.index.trim_through(first_lsn.saturating_sub(1));
                // Retry now. A refused retry asks for a reclaim at most once per episode
                // (`Room::reclaim_asked`) and otherwise checkpoints that move a cursor or drops,
                // so this never loops at one instant.
                if let Some(room) = &mut self.room {
                    room.stuck = free_bytes <= room.free_bytes && room.marks.is_empty();
                    room.free_bytes = free_bytes;
                }
                self.retry_parked(out);
            }
            Input::DirtyPersisted { token, result } => self.on_dirty_persisted(token, result, out),
            Input::ActivityLogWritten { token, result } => {
                match result {
                    Ok(()) => self.al.written(token),
                    Err(e) => {
                        // Which extents are durable is unknown now: applies outside the log
                        // would break R3. The log on disk still names every extent applied
                        // outside durability, so a restart repairs them.
                        self.al.write_failed(token);
                        self.halt(format!("activity log write failed: {e}"), out);
                    }
                }
            }
            Input::ResyncSeqPersisted {
                slink,
                reserved,
                result,
            } => {
                if let Some(i) = self.slink_index(slink) {
                    let s = &mut self.slinks[i];
                    s.seq_reserving = false;
                    match result {
                        Ok(()) => s.seq_reserved = s.seq_reserved.max(reserved),
                        Err(e) => {
                            // Nothing above the old reservation is used: retried at a tick.
                            s.seq_reserving = true;
                            s.seq_retry = true;
                            out.push(Command::Event {
                                kind: "resync-seq-failed",
                                detail: format!("slink {slink}: {e}"),
                            });
                        }
                    }
                }
            }
            Input::DropFloorPersisted {
                slink,
                floor,
                result,
            } => self.on_floor_persisted(slink, floor, result, out),
            Input::Pause { slink, paused } => {
                if let Some(i) = self.slink_index(slink) {
                    self.slink_changed(i, SlinkEvent::Paused(paused), out);
                    out.push(Command::Event {
                        kind: if paused {
                            "slink-paused"
                        } else {
                            "slink-resumed"
                        },
                        detail: format!("slink {slink}"),
                    });
                }
            }
            Input::ResyncAll { slink } => {
                let extents = whole_devices(&self.cfg);
                self.resync_extents(slink, extents, out);
            }
            Input::ResyncDevice { slink, device } => {
                let extents: Vec<Extent> = whole_devices(&self.cfg)
                    .into_iter()
                    .filter(|e| e.device == device)
                    .collect();
                self.resync_extents(slink, extents, out);
            }
            Input::CheckpointNow => {
                for i in 0..self.slinks.len() {
                    self.checkpoint(i, out);
                }
            }
            Input::Received { items } => {
                if self.role != Role::Secondary {
                    out.push(Command::ResetLink {
                        reason: "this site is a primary: it takes no entries".into(),
                    });
                } else {
                    self.secondary.inbox.extend(items);
                }
            }
            Input::SessionStarted => self.secondary.inbox.clear(),
            Input::PieceStored { seq, result } => {
                let expected = self.secondary.piece_storing.take();
                assert_eq!(expected, Some(seq), "piece stored out of order");
                match result {
                    Ok(()) => self.secondary.resync_seq = self.secondary.resync_seq.max(seq),
                    // Not acknowledged: the primary sends the piece again after the restart.
                    Err(e) => self.halt(format!("resync piece {seq} not stored: {e}"), out),
                }
            }
            Input::ConsistencyPersisted { consistent } => {
                assert_eq!(self.secondary.consistency_persisting, Some(consistent));
                self.secondary.consistency_persisting = None;
                self.secondary.consistent = consistent;
            }
            Input::Tick => self.on_tick(out),
            Input::Shutdown => {
                self.shutting_down = true;
                self.request_flush(out);
            }
        }
        self.progress(out);
    }

    /// Mark `extents` dirty for a remote or local site (not slink 0) with a dirty log: the
    /// resync copies them. A slink without a dirty log cannot resync; nothing happens.
    fn resync_extents(&mut self, slink: u8, extents: Vec<Extent>, out: &mut Vec<Command>) {
        let Some(i) = self.slink_index(slink) else {
            return;
        };
        if i == 0 || self.slinks[i].cfg.region_bytes.is_none() || extents.is_empty() {
            return;
        }
        for e in &extents {
            self.slinks[i].dirty.mark(e.device, e.offset, e.len.max(1));
        }
        let token = self.token();
        out.push(Command::MarkDirty {
            slink,
            token,
            extents,
        });
        self.slink_changed(i, SlinkEvent::DirtyChanged { dirty: true }, out);
    }

    /// Stop this instance: fail every waiting request (never acknowledged), refuse the rest.
    fn halt(&mut self, reason: String, out: &mut Vec<Command>) {
        if self.halted {
            return;
        }
        self.halted = true;
        let failure = || Err(Failure::Io(format!("group halted: {reason}")));
        let mut ids: Vec<RequestId> = self.waiting.values().map(|w| w.id).collect();
        ids.extend(self.parked.iter().map(|w| w.id));
        ids.extend(self.flushes.iter().map(|(id, _)| *id));
        self.waiting.clear();
        self.parked.clear();
        self.flushes.clear();
        for id in ids {
            out.push(Command::Reply {
                id,
                result: failure(),
            });
        }
        out.push(Command::Event {
            kind: "halted",
            detail: reason.clone(),
        });
        out.push(Command::Halt { reason });
    }

    /// A halted core answers client requests with EIO and ignores everything else.
    fn refuse_halted(&mut self, input: Input, out: &mut Vec<Command>) {
        if let Input::Write { id, .. } | Input::Flush { id } = input {
            out.push(Command::Reply {
                id,
                result: Err(Failure::Halted),
            });
        }
    }

    fn slink_index(&self, nr: u8) -> Option<usize> {
        self.slinks.iter().position(|s| s.nr() == nr)
    }

    fn slink_changed(&mut self, i: usize, ev: SlinkEvent, out: &mut Vec<Command>) {
        let now = self.now;
        let s = &mut self.slinks[i];
        if let Some(change) = s.on(ev, now) {
            out.push(slink_event(s.nr(), change));
        }
    }

    fn fail_slink(&mut self, i: usize, reason: String, out: &mut Vec<Command>) {
        let nr = self.slinks[i].nr();
        out.push(Command::Event {
            kind: "device-fault",
            detail: format!("slink {nr}: {reason}"),
        });
        if i == 0 {
            self.slink0_failed = true;
        }
        self.slink_changed(i, SlinkEvent::Failed, out);
    }

    fn request_flush(&mut self, out: &mut Vec<Command>) {
        self.last_flush_at = self.now;
        if self.flush_in_flight {
            self.flush_again = true;
        } else {
            self.flush_in_flight = true;
            out.push(Command::FlushLog);
        }
    }

    // ---- primary write path ----

    fn on_write(&mut self, id: RequestId, extent: Extent, fua: bool, out: &mut Vec<Command>) {
        if self.role != Role::Primary || self.shutting_down {
            out.push(Command::Reply {
                id,
                result: Err(Failure::ReadOnly),
            });
            return;
        }
        let in_range = self
            .cfg
            .devices
            .iter()
            .find(|d| d.device == extent.device)
            .is_some_and(|d| {
                extent
                    .offset
                    .checked_add(extent.len)
                    .is_some_and(|e| e <= d.size)
            });
        if !in_range {
            out.push(Command::Reply {
                id,
                result: Err(Failure::OutOfRange),
            });
            return;
        }
        if self.slink0_failed {
            out.push(Command::Reply {
                id,
                result: Err(Failure::Io("this site's device failed".into())),
            });
            return;
        }
        let w = ParkedWrite {
            id,
            extent,
            fua,
            since: self.now,
        };
        if self.parked.is_empty() {
            self.admit(w, out);
        } else {
            self.parked.push_back(w);
        }
    }

    fn admit(&mut self, w: ParkedWrite, out: &mut Vec<Command>) {
        let lsn = self.next_lsn;
        self.append_in_flight = Some(lsn);
        self.next_lsn += 1;
        self.index.push(Retained {
            lsn,
            extent: w.extent,
            ring_bytes: w.extent.len + self.cfg.record_overhead_bytes,
            at: w.since,
        });
        self.order.insert(lsn, w.extent, Stage::Appended);
        self.waiting.insert(
            lsn,
            WaitingWrite {
                id: w.id,
                fua: w.fua,
                applied: false,
            },
        );
        out.push(Command::Append {
            lsn,
            id: Some(w.id),
            durability: if w.fua {
                Durability::Durable
            } else {
                Durability::Written
            },
        });
    }

    fn on_append_refused(&mut self, lsn: Lsn, out: &mut Vec<Command>) {
        assert_eq!(
            lsn,
            self.next_lsn - 1,
            "a refused append must be the last one handed out"
        );
        let extent = self.index.get(lsn).map(|r| r.extent);
        let since = self.index.get(lsn).map_or(self.now, |r| r.at);
        self.next_lsn -= 1;
        self.index.pop_last(lsn);
        self.order.remove(lsn);
        if self.role == Role::Secondary {
            self.secondary_refused(lsn);
        } else {
            let (Some(w), Some(extent)) = (self.waiting.remove(&lsn), extent) else {
                panic!("refused append of lsn {lsn} that no write waits for");
            };
            // The parked queue keeps arrival order: the refused write goes first.
            self.parked.push_front(ParkedWrite {
                id: w.id,
                extent,
                fua: w.fua,
                since,
            });
        }
        self.start_room(out);
    }
}

/// Every byte of every device: the extents of a full resync.
fn whole_devices(cfg: &CoreConfig) -> Vec<Extent> {
    cfg.devices
        .iter()
        .map(|d| Extent {
            device: d.device,
            offset: 0,
            len: d.size,
        })
        .collect()
}

fn slink_event(nr: u8, c: Change) -> Command {
    Command::Event {
        kind: c.event_kind(),
        detail: format!("slink {nr}: {:?} -> {:?}", c.from, c.to),
    }
}
