//! Decision-level tests of the group core: each sets up a core, feeds a short scripted sequence
//! of inputs and checks the commands that come out and what the queries say. The simulation
//! (`sim/`) covers long random runs; these pin one rule each.
//!
//! The harness plays a minimal driver: it answers every `Append` at once (accepted unless a
//! refusal was asked for), remembers which extent each lsn writes, and after every input checks
//! the invariants that hold for any sequence (R1, R2, R3).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::activity::ExtentKey;
use super::dirty::Piece;
use super::index::Retained;
use super::slink::{DownWait, SlinkConfig, SlinkState, Transport};
use super::*;
use crate::engine::policy::{Fallbehind, Mode, PolicyKind};

const S: Nanos = NS_PER_SEC;
const DEVICE_BYTES: u64 = 1 << 20;
const REGION_BYTES: u64 = 64 << 10;
const AL_EXTENT_BYTES: u64 = 64 << 10;
const DOWN_WAIT: Nanos = 5 * S;
const RING_FULL_WAIT: Nanos = 10 * S;
const CHECKPOINT_INTERVAL: Nanos = S;

// ---- configuration ----

struct Setup {
    cfg: CoreConfig,
    restored: Restored,
}

fn slink0() -> SlinkConfig {
    SlinkConfig {
        nr: 0,
        transport: Transport::Local,
        policy: PolicyKind::Sync,
        fallbehind: Fallbehind::default(),
        down_wait: DownWait::Forever,
        region_bytes: None,
    }
}

fn config(role: Role) -> Setup {
    Setup {
        cfg: CoreConfig {
            role,
            devices: vec![DeviceConfig {
                device: 0,
                size: DEVICE_BYTES,
            }],
            slinks: vec![slink0()],
            ring_bytes: 1 << 30,
            record_overhead_bytes: 0,
            ring_full_wait: RING_FULL_WAIT,
            checkpoint_interval: CHECKPOINT_INTERVAL,
            activity_extent_bytes: AL_EXTENT_BYTES,
            activity_extents_max: 4,
        },
        restored: Restored {
            consistent: true,
            ..Restored::default()
        },
    }
}

fn primary() -> Setup {
    config(Role::Primary)
}

fn secondary() -> Setup {
    config(Role::Secondary)
}

impl Setup {
    /// A remote site with a dirty log.
    fn site(mut self, nr: u8, policy: PolicyKind, down_wait: DownWait) -> Self {
        self.cfg.slinks.push(SlinkConfig {
            nr,
            transport: Transport::Remote,
            policy,
            fallbehind: Fallbehind::default(),
            down_wait,
            region_bytes: Some(REGION_BYTES),
        });
        self
    }

    fn sync_site(self, nr: u8) -> Self {
        self.site(nr, PolicyKind::Sync, DownWait::Bounded(DOWN_WAIT))
    }

    fn async_site(self, nr: u8) -> Self {
        self.site(nr, PolicyKind::Async, DownWait::Bounded(DOWN_WAIT))
    }

    fn without_dirty_log(mut self, nr: u8) -> Self {
        if let Some(s) = self.cfg.slinks.iter_mut().find(|s| s.nr == nr) {
            s.region_bytes = None;
        }
        self
    }

    fn ring_bytes(mut self, bytes: u64) -> Self {
        self.cfg.ring_bytes = bytes;
        self
    }

    fn activity_extents_max(mut self, n: usize) -> Self {
        self.cfg.activity_extents_max = n;
        self
    }

    fn restored(mut self, f: impl FnOnce(&mut Restored)) -> Self {
        f(&mut self.restored);
        self
    }

    /// The core at time 0, with the boot flush answered (nothing was in the replog).
    fn start(self) -> Rig {
        let mut rig = self.start_raw();
        let last = rig.core.last_lsn();
        assert_eq!(count(&rig.boot, |c| matches!(c, Command::FlushLog)), 1);
        rig.feed(Input::LogDurable { upto: last });
        rig
    }

    /// The core at time 0; its recovery commands are in `Rig::boot`, none answered.
    fn start_raw(self) -> Rig {
        let extents = self
            .restored
            .retained
            .iter()
            .map(|r| (r.lsn, r.extent))
            .collect();
        let reserved = self.restored.resync_seq.iter().copied().collect();
        let (core, boot) = Core::new(self.cfg, self.restored, 0);
        let rig = Rig {
            core,
            now: 0,
            refuse: 0,
            extents,
            by_id: HashMap::new(),
            reserved,
            seqs: BTreeSet::new(),
            boot,
        };
        rig.check(&rig.boot.clone());
        rig
    }
}

fn ext(offset: u64, len: u64) -> Extent {
    Extent {
        device: 0,
        offset,
        len,
    }
}

fn pos(lsn: Lsn) -> Position {
    Position { lsn, resync_seq: 0 }
}

// ---- the driver ----

struct Rig {
    core: Core,
    now: Nanos,
    /// Appends still to refuse (ring full).
    refuse: usize,
    /// The extent of every lsn handed out.
    extents: BTreeMap<Lsn, Extent>,
    by_id: HashMap<RequestId, Extent>,
    /// Per slink: the resync seq reservation known durable (restored, then persisted).
    reserved: HashMap<u8, u64>,
    /// Every resync seq handed out (pieces and completion markers), per slink.
    seqs: BTreeSet<(u8, u64)>,
    boot: Vec<Command>,
}

impl Rig {
    /// Feed one input at the rig's time; answer appends at once; check R1-R3.
    fn feed(&mut self, input: Input) -> Vec<Command> {
        match &input {
            Input::Write { id, extent, .. } => {
                self.by_id.insert(*id, *extent);
            }
            Input::ResyncSeqPersisted {
                slink,
                reserved,
                result: Ok(()),
            } => {
                let r = self.reserved.entry(*slink).or_insert(0);
                *r = (*r).max(*reserved);
            }
            Input::Received { items } => {
                for it in items {
                    if let Received::Entry { lsn, extent } = it {
                        self.extents.insert(*lsn, *extent);
                    }
                }
            }
            _ => {}
        }
        let mut all = Vec::new();
        let mut next = Some(input);
        while let Some(input) = next.take() {
            let mut out = Vec::new();
            self.core.handle(self.now, input, &mut out);
            for c in &out {
                if let Command::Append { lsn, id, .. } = c {
                    if let Some(e) = id.and_then(|id| self.by_id.get(&id)) {
                        self.extents.insert(*lsn, *e);
                    }
                    let accepted = self.refuse == 0;
                    self.refuse = self.refuse.saturating_sub(1);
                    next = Some(Input::AppendResult {
                        lsn: *lsn,
                        accepted,
                    });
                }
            }
            self.check(&out);
            self.check_seqs(&out);
            all.extend(out);
        }
        all
    }

    /// R1, R2, R3 on one input's commands.
    fn check(&self, out: &[Command]) {
        let durable = self.core.durable_lsn();
        let al = self.core.activity_log();
        for c in out {
            match c {
                Command::Ship { upto, .. } => {
                    assert!(*upto <= durable, "R1: {c:?} above durable {durable}")
                }
                Command::Checkpoint { lsn, .. } => {
                    assert!(*lsn <= durable, "R2: {c:?} above durable {durable}")
                }
                Command::Apply { lsn } if *lsn > durable && self.core.role() == Role::Primary => {
                    let e = self.extents[lsn];
                    let first = e.offset / AL_EXTENT_BYTES;
                    let last = (e.offset + e.len.max(1) - 1) / AL_EXTENT_BYTES;
                    for k in first..=last {
                        assert!(
                            al.contains(&(e.device, k)),
                            "R3: {c:?} not durable ({durable}) outside the activity log {al:?}"
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// Resync seqs are used once and only below a durable reservation.
    fn check_seqs(&mut self, out: &[Command]) {
        for c in out {
            let (slink, seq) = match c {
                Command::ResyncPiece { slink, piece } => (*slink, piece.seq),
                Command::ResyncComplete { slink, seq } => (*slink, *seq),
                _ => continue,
            };
            let reserved = self.reserved.get(&slink).copied().unwrap_or(0);
            assert!(
                seq <= reserved,
                "{c:?} above the durable reservation {reserved}"
            );
            assert!(self.seqs.insert((slink, seq)), "{c:?}: seq used twice");
        }
    }

    fn at(&mut self, t: Nanos) -> &mut Self {
        self.now = t;
        self
    }

    fn write(&mut self, id: RequestId, offset: u64, len: u64) -> Vec<Command> {
        self.feed(Input::Write {
            id,
            extent: ext(offset, len),
            fua: false,
        })
    }

    fn write_fua(&mut self, id: RequestId, offset: u64, len: u64) -> Vec<Command> {
        self.feed(Input::Write {
            id,
            extent: ext(offset, len),
            fua: true,
        })
    }

    fn written(&mut self, upto: Lsn) -> Vec<Command> {
        self.feed(Input::LogWritten { upto })
    }

    fn durable(&mut self, upto: Lsn) -> Vec<Command> {
        self.feed(Input::LogDurable { upto })
    }

    fn applied(&mut self, lsn: Lsn) -> Vec<Command> {
        self.feed(Input::Applied {
            lsn,
            result: Ok(()),
        })
    }

    fn ack(&mut self, slink: u8, lsn: Lsn) -> Vec<Command> {
        let resync_seq = self.core.slink(slink).map_or(0, |s| s.next_seq - 1);
        self.feed(Input::SiteAck {
            slink,
            pos: Position { lsn, resync_seq },
        })
    }

    fn tick(&mut self, t: Nanos) -> Vec<Command> {
        self.at(t).feed(Input::Tick)
    }

    fn al_written(&mut self, out: &[Command]) -> Vec<Command> {
        let tokens: Vec<u64> = out
            .iter()
            .filter_map(|c| match c {
                Command::WriteActivityLog { token, .. } => Some(*token),
                _ => None,
            })
            .collect();
        let mut all = Vec::new();
        for token in tokens {
            all.extend(self.feed(Input::ActivityLogWritten {
                token,
                result: Ok(()),
            }));
        }
        all
    }

    fn seq_persisted(&mut self, out: &[Command]) -> Vec<Command> {
        let mut all = Vec::new();
        for c in out {
            if let Command::PersistResyncSeq { slink, reserved } = c {
                all.extend(self.feed(Input::ResyncSeqPersisted {
                    slink: *slink,
                    reserved: *reserved,
                    result: Ok(()),
                }));
            }
        }
        all
    }

    /// Answer every drop floor write in `out` with `result`.
    fn floor_persisted(&mut self, out: &[Command], result: Result<(), String>) -> Vec<Command> {
        let mut all = Vec::new();
        for c in out {
            if let Command::PersistDropFloor { slink, floor } = c {
                all.extend(self.feed(Input::DropFloorPersisted {
                    slink: *slink,
                    floor: *floor,
                    result: result.clone(),
                }));
            }
        }
        all
    }

    fn dirty_persisted(&mut self, out: &[Command]) -> Vec<Command> {
        let mut all = Vec::new();
        for c in out {
            if let Command::MarkDirty { token, .. } = c {
                all.extend(self.feed(Input::DirtyPersisted {
                    token: *token,
                    result: Ok(()),
                }));
            }
        }
        all
    }

    /// Bring a site up from `peer` and finish the session's repair handshake (the seq
    /// reservation and the completion marker), so it is Up and clean.
    fn connect(&mut self, slink: u8, peer: Lsn) -> Vec<Command> {
        let mut all = self.feed(Input::LinkUp {
            slink,
            peer: pos(peer),
        });
        let more = self.seq_persisted(&all);
        all.extend(more);
        if let Some(seq) = completions(&all, slink).last() {
            let lsn = self.core.slink(slink).map_or(0, |s| s.acked);
            let more = self.feed(Input::SiteAck {
                slink,
                pos: Position {
                    lsn,
                    resync_seq: *seq,
                },
            });
            all.extend(more);
        }
        assert_eq!(self.core.slink_state(slink), Some(SlinkState::Up));
        all
    }

    /// A write through the log and slink 0 (written, in the activity log, durable, applied);
    /// returns its lsn.
    fn write_through(&mut self, id: RequestId, offset: u64, len: u64) -> Lsn {
        let out = self.write(id, offset, len);
        let lsn = appended(&out);
        let mut out = self.written(lsn);
        let more = self.al_written(&out);
        out.extend(more);
        out.extend(self.durable(lsn));
        assert_eq!(applies(&out), vec![lsn]);
        self.applied(lsn);
        lsn
    }
}

// ---- reading commands ----

fn count(out: &[Command], f: impl Fn(&Command) -> bool) -> usize {
    out.iter().filter(|c| f(c)).count()
}

/// The lsn of the one accepted append in `out` (the last Append).
fn appended(out: &[Command]) -> Lsn {
    out.iter()
        .rev()
        .find_map(|c| match c {
            Command::Append { lsn, .. } => Some(*lsn),
            _ => None,
        })
        .expect("an Append")
}

fn applies(out: &[Command]) -> Vec<Lsn> {
    out.iter()
        .filter_map(|c| match c {
            Command::Apply { lsn } => Some(*lsn),
            _ => None,
        })
        .collect()
}

fn replies(out: &[Command]) -> Vec<(RequestId, Result<(), Failure>)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Reply { id, result } => Some((*id, result.clone())),
            _ => None,
        })
        .collect()
}

fn ok_replies(out: &[Command]) -> Vec<RequestId> {
    replies(out)
        .into_iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(id, _)| id)
        .collect()
}

fn ships(out: &[Command], nr: u8) -> Vec<(Lsn, Lsn)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Ship { slink, after, upto } if *slink == nr => Some((*after, *upto)),
            _ => None,
        })
        .collect()
}

fn pieces(out: &[Command], nr: u8) -> Vec<Piece> {
    out.iter()
        .filter_map(|c| match c {
            Command::ResyncPiece { slink, piece } if *slink == nr => Some(*piece),
            _ => None,
        })
        .collect()
}

fn completions(out: &[Command], nr: u8) -> Vec<u64> {
    out.iter()
        .filter_map(|c| match c {
            Command::ResyncComplete { slink, seq } if *slink == nr => Some(*seq),
            _ => None,
        })
        .collect()
}

fn events(out: &[Command]) -> Vec<&'static str> {
    out.iter()
        .filter_map(|c| match c {
            Command::Event { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

fn marks(out: &[Command], nr: u8) -> Vec<Vec<Extent>> {
    out.iter()
        .filter_map(|c| match c {
            Command::MarkDirty { slink, extents, .. } if *slink == nr => Some(extents.clone()),
            _ => None,
        })
        .collect()
}

fn al_writes(out: &[Command]) -> Vec<Vec<ExtentKey>> {
    out.iter()
        .filter_map(|c| match c {
            Command::WriteActivityLog { extents, .. } => Some(extents.clone()),
            _ => None,
        })
        .collect()
}

fn asks_flush(out: &[Command]) -> bool {
    out.iter().any(|c| matches!(c, Command::FlushLog))
}

fn checkpoints(out: &[Command]) -> Vec<(u8, Lsn)> {
    out.iter()
        .filter_map(|c| match c {
            Command::Checkpoint { slink, lsn, .. } => Some((*slink, *lsn)),
            _ => None,
        })
        .collect()
}

fn floor_writes(out: &[Command], nr: u8) -> Vec<Option<Lsn>> {
    out.iter()
        .filter_map(|c| match c {
            Command::PersistDropFloor { slink, floor } if *slink == nr => Some(*floor),
            _ => None,
        })
        .collect()
}

// ---- the write path ----

#[test]
fn a_write_is_acknowledged_only_once_written_applied_and_acked_by_a_sync_site() {
    let mut rig = primary().sync_site(1).start();
    rig.connect(1, 0);
    let out = rig.write(7, 0, 4096);
    let lsn = appended(&out);
    assert!(ok_replies(&out).is_empty());
    let out = rig.written(lsn);
    assert!(ok_replies(&out).is_empty(), "written only");
    let out = rig.al_written(&out);
    assert_eq!(applies(&out), vec![lsn]);
    let out = rig.applied(lsn);
    assert!(
        ok_replies(&out).is_empty(),
        "the sync site does not have it"
    );
    let out = rig.durable(lsn);
    assert_eq!(ships(&out, 1), vec![(0, lsn)]);
    assert!(ok_replies(&out).is_empty(), "shipped, not acknowledged");
    let out = rig.ack(1, lsn);
    assert_eq!(ok_replies(&out), vec![7]);
    assert_eq!(rig.core.lag(1).ios, 0);
}

#[test]
fn an_async_site_is_not_waited_for() {
    let mut rig = primary().async_site(2).start();
    rig.connect(2, 0);
    assert!(rig.core.waited_slinks().is_empty());
    let lsn = appended(&rig.write(1, 0, 4096));
    let out = rig.written(lsn);
    let out = rig.al_written(&out);
    assert_eq!(applies(&out), vec![lsn]);
    let out = rig.applied(lsn);
    assert_eq!(ok_replies(&out), vec![1], "written and applied is enough");
    assert_eq!(rig.core.lag(2).ios, 1, "the site still lags");
}

#[test]
fn a_fua_write_waits_until_it_is_durable() {
    let mut rig = primary().start();
    let out = rig.write_fua(3, 0, 4096);
    assert!(out.iter().any(|c| matches!(
        c,
        Command::Append {
            durability: Durability::Durable,
            ..
        }
    )));
    let lsn = appended(&out);
    let out = rig.written(lsn);
    let mut out2 = rig.al_written(&out);
    out2.extend(rig.applied(lsn));
    assert!(ok_replies(&out2).is_empty(), "applied but not durable");
    assert!(
        asks_flush(&out) || asks_flush(&out2),
        "a FUA write asks for a flush"
    );
    let out = rig.durable(lsn);
    assert_eq!(ok_replies(&out), vec![3]);
}

#[test]
fn a_flush_replies_once_everything_before_it_is_durable() {
    let mut rig = primary().start();
    let a = appended(&rig.write(1, 0, 4096));
    let b = appended(&rig.write(2, 8192, 4096));
    rig.written(b);
    let out = rig.feed(Input::Flush { id: 9 });
    assert!(replies(&out).is_empty());
    let out = rig.durable(a);
    assert!(
        !replies(&out).iter().any(|(id, _)| *id == 9),
        "lsn {b} is not durable yet"
    );
    let out = rig.durable(b);
    assert!(replies(&out).contains(&(9, Ok(()))));
    // With nothing new, a flush replies at once.
    let out = rig.feed(Input::Flush { id: 10 });
    assert_eq!(replies(&out), vec![(10, Ok(()))]);
}

#[test]
fn an_async_site_turns_sync_above_its_fallbehind_mark() {
    let mut setup = primary().async_site(2);
    setup.cfg.slinks[1].fallbehind.ios = Some(2);
    let mut rig = setup.start();
    rig.connect(2, 0);
    for id in 1..=3 {
        rig.write_through(id, id * 8192, 4096);
    }
    assert_eq!(rig.core.slink(2).map(|s| s.mode), Some(Mode::Sync));
    assert_eq!(rig.core.waited_slinks(), vec![2]);
}

#[test]
fn every_write_a_sync_site_waits_for_asks_for_a_flush() {
    let mut rig = primary().sync_site(1).start();
    rig.connect(1, 0);
    // lsn 1 is durable and shipped; the site has not acknowledged it yet.
    let a = rig.at(S).write_through(1, 0, 4096);
    assert_eq!(rig.core.slink(1).map(|s| s.shipped), Some(a));
    // lsn 2 is written a millisecond later: the site waits for it too, so flush now.
    let b = appended(&rig.at(S + 1_000_000).write(2, 8192, 4096));
    let mut out = rig.written(b);
    out.extend(rig.al_written(&out));
    out.extend(rig.applied(b));
    assert!(asks_flush(&out), "lsn {b} waits for the sync site: {out:?}");
}

#[test]
fn a_write_outside_a_device_is_refused_and_takes_no_lsn() {
    let mut rig = primary().start();
    let out = rig.write(1, DEVICE_BYTES - 512, 4096);
    assert_eq!(replies(&out), vec![(1, Err(Failure::OutOfRange))]);
    let out = rig.feed(Input::Write {
        id: 2,
        extent: Extent {
            device: 9,
            offset: 0,
            len: 512,
        },
        fua: false,
    });
    assert_eq!(replies(&out), vec![(2, Err(Failure::OutOfRange))]);
    assert_eq!(appended(&rig.write(3, 0, 512)), 1, "lsns have no gap");
}

#[test]
fn a_failed_apply_on_slink0_fails_waiting_and_later_writes() {
    let mut rig = primary().start();
    let a = appended(&rig.write(1, 0, 4096));
    let b = appended(&rig.write(2, 8192, 4096));
    rig.written(b);
    let out = rig.durable(b);
    assert_eq!(applies(&out), vec![a, b]);
    let out = rig.feed(Input::Applied {
        lsn: a,
        result: Err("EIO".into()),
    });
    let failed: Vec<RequestId> = replies(&out)
        .into_iter()
        .filter(|(_, r)| matches!(r, Err(Failure::Io(_))))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(failed, vec![1, 2]);
    assert_eq!(rig.core.slink_state(0), Some(SlinkState::Faulty));
    let out = rig.write(3, 0, 512);
    assert!(matches!(replies(&out)[..], [(3, Err(Failure::Io(_)))]));
}

#[test]
fn a_failed_apply_on_slink0_keeps_its_applied_prefix_and_cursor_below_the_failed_write() {
    let mut rig = primary().start();
    let a = appended(&rig.write(1, 0, 4096));
    let b = appended(&rig.write(2, 8192, 4096));
    rig.written(b);
    let out = rig.durable(b);
    assert_eq!(applies(&out), vec![a, b]);
    rig.feed(Input::Applied {
        lsn: a,
        result: Err("EIO".into()),
    });
    rig.applied(b);
    assert_eq!(
        rig.core.applied0(),
        a - 1,
        "the failed write is not applied"
    );
    let out = rig.tick(2 * CHECKPOINT_INTERVAL);
    assert!(
        checkpoints(&out).iter().all(|(n, l)| *n != 0 || *l < a),
        "slink 0's cursor never passes a failed write (a restart replays it): {out:?}"
    );
}

fn halts(out: &[Command]) -> usize {
    count(out, |c| matches!(c, Command::Halt { .. }))
}

#[test]
fn a_failed_replog_write_halts_and_fails_every_waiting_request() {
    let mut rig = primary().sync_site(1).start();
    rig.connect(1, 0);
    let a = appended(&rig.write(1, 0, 4096));
    rig.written(a);
    rig.feed(Input::Flush { id: 2 });
    let out = rig.feed(Input::LogFailed {
        reason: "EIO".into(),
    });
    assert_eq!(halts(&out), 1);
    let mut failed: Vec<RequestId> = replies(&out)
        .into_iter()
        .filter(|(_, r)| matches!(r, Err(Failure::Io(_))))
        .map(|(id, _)| id)
        .collect();
    failed.sort();
    assert_eq!(failed, vec![1, 2], "the write and the flush fail: {out:?}");
    assert!(ok_replies(&out).is_empty());
    assert!(rig.core.is_halted());
    let out = rig.write(3, 0, 512);
    assert!(matches!(replies(&out)[..], [(3, Err(Failure::Halted))]));
    let out = rig.durable(a);
    assert!(out.is_empty(), "a halted core does nothing: {out:?}");
}

#[test]
fn a_failed_dirty_mark_halts_rather_than_going_on_without_it() {
    let mut rig = primary().async_site(1).start();
    rig.connect(1, 0);
    let out = rig.feed(Input::ResyncAll { slink: 1 });
    let token = out
        .iter()
        .find_map(|c| match c {
            Command::MarkDirty { token, .. } => Some(*token),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no mark asked: {out:?}"));
    let out = rig.feed(Input::DirtyPersisted {
        token,
        result: Err("EIO".into()),
    });
    assert_eq!(halts(&out), 1, "{out:?}");
}

#[test]
fn a_failed_site_checkpoint_is_retried_and_the_site_stays_up() {
    let mut rig = primary().async_site(1).start();
    rig.connect(1, 0);
    let lsn = rig.write_through(1, 0, 4096);
    rig.ack(1, lsn);
    let out = rig.tick(2 * CHECKPOINT_INTERVAL);
    assert!(checkpoints(&out).contains(&(1, lsn)), "{out:?}");
    let out = rig.feed(Input::CheckpointDone {
        slink: 1,
        lsn,
        result: Err("EIO".into()),
    });
    assert_eq!(halts(&out), 0);
    assert_eq!(rig.core.slink_state(1), Some(SlinkState::Up));
    assert_eq!(
        rig.core.slink(1).map(|s| s.cursor),
        Some(0),
        "not persisted"
    );
    let out = rig.tick(4 * CHECKPOINT_INTERVAL);
    assert!(
        checkpoints(&out).contains(&(1, lsn)),
        "asked again: {out:?}"
    );
}

#[test]
fn a_failed_resync_seq_reservation_is_asked_again_at_the_next_tick() {
    let mut rig = primary().async_site(1).start();
    let out = rig.feed(Input::LinkUp {
        slink: 1,
        peer: pos(0),
    });
    let reserved = out
        .iter()
        .find_map(|c| match c {
            Command::PersistResyncSeq { reserved, .. } => Some(*reserved),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no reservation asked: {out:?}"));
    let out = rig.feed(Input::ResyncSeqPersisted {
        slink: 1,
        reserved,
        result: Err("EIO".into()),
    });
    assert_eq!(
        count(&out, |c| matches!(c, Command::PersistResyncSeq { .. })),
        0,
        "not at once (a failing disk would loop): {out:?}"
    );
    assert!(
        completions(&out, 1).is_empty(),
        "no seq above the reservation"
    );
    assert_ne!(rig.core.slink_state(1), Some(SlinkState::Faulty));
    let out = rig.tick(S / 10);
    assert_eq!(
        count(&out, |c| matches!(c, Command::PersistResyncSeq { .. })),
        1,
        "{out:?}"
    );
}

// ---- R1, R2, R3 ----

#[test]
fn nothing_is_shipped_above_the_durable_lsn_and_a_waiting_sync_site_asks_for_a_flush() {
    let mut rig = primary().sync_site(1).start();
    rig.connect(1, 0);
    let lsn = appended(&rig.write(1, 0, 4096));
    let mut out = rig.written(lsn);
    out.extend(rig.al_written(&out));
    out.extend(rig.applied(lsn));
    assert!(ships(&out, 1).is_empty(), "not durable: not shipped");
    assert!(asks_flush(&out), "the sync site waits: flush now");
    assert_eq!(rig.core.slink(1).map(|s| s.shipped), Some(0));
    let out = rig.durable(lsn);
    assert_eq!(ships(&out, 1), vec![(0, lsn)]);
}

#[test]
fn a_checkpoint_never_carries_an_lsn_above_the_durable_lsn() {
    let mut rig = primary().start();
    let lsn = appended(&rig.write(1, 0, 4096));
    let out = rig.written(lsn);
    rig.al_written(&out);
    rig.applied(lsn);
    assert_eq!(rig.core.applied0(), lsn);
    assert_eq!(rig.core.durable_lsn(), 0);
    let out = rig.tick(2 * CHECKPOINT_INTERVAL);
    assert!(
        checkpoints(&out).is_empty(),
        "applied but not durable: {out:?}"
    );
    rig.durable(lsn);
    let out = rig.tick(4 * CHECKPOINT_INTERVAL);
    assert_eq!(checkpoints(&out), vec![(0, lsn)]);
}

#[test]
fn an_entry_not_yet_durable_is_applied_only_after_its_activity_log_extent_is_durable() {
    let mut rig = primary().start();
    let lsn = appended(&rig.write(1, 3 * AL_EXTENT_BYTES + 100, 4096));
    let out = rig.written(lsn);
    assert!(applies(&out).is_empty());
    assert_eq!(al_writes(&out), vec![vec![(0, 3)]]);
    assert!(rig.core.activity_log().is_empty(), "not durable yet");
    let out = rig.al_written(&out);
    assert_eq!(applies(&out), vec![lsn]);
    // The extent stays in the log: a second write there needs no log write.
    let lsn2 = appended(&rig.write(2, 3 * AL_EXTENT_BYTES + 8192, 512));
    let out = rig.written(lsn2);
    assert!(al_writes(&out).is_empty());
    assert_eq!(applies(&out), vec![lsn2]);
}

#[test]
fn an_entry_already_durable_is_replayed_without_an_activity_log_write() {
    let retained: Vec<Retained> = (1..=3)
        .map(|lsn| Retained {
            lsn,
            extent: ext(lsn * AL_EXTENT_BYTES, 4096),
            ring_bytes: 4096,
            at: 0,
        })
        .collect();
    let mut rig = primary()
        .restored(|r| {
            r.last_lsn = 3;
            r.retained = retained;
            r.cursors = vec![(0, 0)];
        })
        .start_raw();
    assert!(applies(&rig.boot).is_empty(), "replay waits for durable");
    let out = rig.durable(3);
    assert_eq!(applies(&out), vec![1, 2, 3]);
    assert!(al_writes(&out).is_empty());
}

#[test]
fn a_write_waits_for_a_log_flush_when_the_activity_log_is_full_of_undurable_extents() {
    let mut rig = primary().activity_extents_max(1).start();
    let a = appended(&rig.write(1, 0, 4096));
    let out = rig.written(a);
    rig.al_written(&out);
    rig.applied(a);
    let b = appended(&rig.write(2, AL_EXTENT_BYTES, 4096));
    let out = rig.written(b);
    assert!(applies(&out).is_empty());
    assert!(
        al_writes(&out).is_empty(),
        "extent 0 holds lsn {a}, not durable"
    );
    assert!(asks_flush(&out));
    let out = rig.durable(b);
    assert_eq!(applies(&out), vec![b], "durable now: no log write needed");
}

#[test]
fn a_write_into_an_extent_being_logged_needs_no_second_log_write() {
    let mut rig = primary().start();
    let a = appended(&rig.write(1, 0, 4096));
    let first = rig.written(a);
    assert_eq!(al_writes(&first), vec![vec![(0, 0)]]);
    let b = appended(&rig.write(2, 8192, 4096));
    let out = rig.written(b);
    assert!(al_writes(&out).is_empty(), "one log write at a time");
    let out = rig.al_written(&first);
    assert_eq!(applies(&out), vec![a, b]);
    assert!(
        al_writes(&out).is_empty(),
        "(0, 0) is durable in the log already: {out:?}"
    );
}

#[test]
fn an_entry_that_became_durable_no_longer_wants_a_log_write() {
    let mut rig = primary().activity_extents_max(1).start();
    let a = appended(&rig.write(1, 0, 4096));
    let out = rig.written(a);
    rig.al_written(&out);
    rig.applied(a);
    let b = appended(&rig.write(2, AL_EXTENT_BYTES, 4096));
    rig.written(b);
    let out = rig.durable(b);
    assert_eq!(applies(&out), vec![b]);
    assert!(
        al_writes(&out).is_empty(),
        "nothing waits for (0, 1) any more: {out:?}"
    );
}

// ---- the overlap rule ----

#[test]
fn overlapping_writes_apply_in_lsn_order_and_others_in_parallel() {
    let mut rig = primary().start();
    let a = appended(&rig.write(1, 0, 4096));
    let b = appended(&rig.write(2, 2048, 4096));
    let c = appended(&rig.write(3, 8192, 512));
    rig.written(c);
    let out = rig.durable(c);
    assert_eq!(applies(&out), vec![a, c], "{b} overlaps {a}");
    let out = rig.applied(c);
    assert!(applies(&out).is_empty());
    let out = rig.applied(a);
    assert_eq!(applies(&out), vec![b]);
    rig.applied(b);
    assert_eq!(rig.core.applied0(), c);
}

// ---- a sync site that goes down, a paused site ----

#[test]
fn a_sync_site_down_past_its_wait_is_outdated_then_sync_again_once_caught_up() {
    let mut rig = primary().sync_site(1).start();
    rig.connect(1, 0);
    rig.at(S).feed(Input::LinkDown {
        slink: 1,
        reason: "test".into(),
    });
    assert_eq!(rig.core.slink_state(1), Some(SlinkState::Down));
    let lsn = rig.write_through(1, 0, 4096);
    assert_eq!(rig.core.waited_slinks(), vec![1]);
    let out = rig.tick(S + DOWN_WAIT - 1);
    assert!(ok_replies(&out).is_empty(), "still within the down wait");
    let out = rig.tick(S + DOWN_WAIT);
    assert!(events(&out).contains(&"slink-outdated"), "{out:?}");
    assert_eq!(ok_replies(&out), vec![1]);
    assert!(rig.core.waited_slinks().is_empty());
    // Back, behind: shipped to, still out of date until it has everything.
    let out = rig.feed(Input::LinkUp {
        slink: 1,
        peer: pos(0),
    });
    assert_eq!(ships(&out, 1), vec![(0, lsn)]);
    let out = rig.seq_persisted(&out);
    let seq = completions(&out, 1);
    rig.feed(Input::SiteAck {
        slink: 1,
        pos: Position {
            lsn,
            resync_seq: seq.last().copied().unwrap_or(0),
        },
    });
    assert_eq!(rig.core.slink_state(1), Some(SlinkState::OutOfDate));
    let out = rig.tick(S + DOWN_WAIT + 1);
    assert!(events(&out).contains(&"slink-uptodate"), "{out:?}");
    assert_eq!(rig.core.waited_slinks(), vec![1]);
}

#[test]
fn a_sync_site_that_waits_forever_keeps_the_write_waiting() {
    let mut rig = primary()
        .site(1, PolicyKind::Sync, DownWait::Forever)
        .start();
    rig.connect(1, 0);
    rig.feed(Input::LinkDown {
        slink: 1,
        reason: "test".into(),
    });
    rig.write_through(1, 0, 4096);
    let out = rig.tick(1000 * S);
    assert!(ok_replies(&out).is_empty());
    assert_eq!(rig.core.slink_state(1), Some(SlinkState::Down));
    assert_eq!(rig.core.waited_slinks(), vec![1]);
}

#[test]
fn a_paused_site_gets_no_ship_and_is_not_waited_for_until_resumed() {
    let mut rig = primary().sync_site(1).start();
    rig.connect(1, 0);
    let out = rig.feed(Input::Pause {
        slink: 1,
        paused: true,
    });
    assert!(events(&out).contains(&"slink-paused"));
    assert!(rig.core.waited_slinks().is_empty());
    let out = rig.write(1, 0, 4096);
    let lsn = appended(&out);
    let mut all = rig.written(lsn);
    all.extend(rig.al_written(&all));
    all.extend(rig.applied(lsn));
    all.extend(rig.durable(lsn));
    assert!(ships(&all, 1).is_empty());
    assert_eq!(ok_replies(&all), vec![1], "a paused site is not waited for");
    let out = rig.feed(Input::Pause {
        slink: 1,
        paused: false,
    });
    assert_eq!(ships(&out, 1), vec![(0, lsn)]);
}

#[test]
fn pausing_a_sync_site_releases_the_write_that_waits_for_it() {
    let mut rig = primary().sync_site(1).start();
    rig.connect(1, 0);
    rig.write_through(1, 0, 4096);
    assert_eq!(rig.core.writes_in_flight(), 1, "waits for slink 1");
    let out = rig.feed(Input::Pause {
        slink: 1,
        paused: true,
    });
    assert_eq!(ok_replies(&out), vec![1]);
}

// ---- a full ring ----

/// Adds slink 2 of some kind to a setup.
type SiteKind = fn(Setup) -> Setup;

/// Three 4 KiB writes in a ring of eight, through slink 0; an async site that never acks.
fn full_ring(site: impl FnOnce(Setup) -> Setup) -> Rig {
    let mut rig = site(primary().ring_bytes(8 * 4096)).start();
    rig.connect(2, 0);
    for id in 1..=3 {
        rig.write_through(id, id * 8192, 4096);
    }
    rig
}

/// Write 10 into the full ring of `full_ring`: refused, slink 0 checkpoints, the reclaim frees
/// nothing, the retry is refused too. Returns what the second refusal decided.
fn overflow(rig: &mut Rig) -> Vec<Command> {
    rig.refuse = 2;
    rig.write(10, 0, 4096);
    rig.feed(Input::CheckpointDone {
        slink: 0,
        lsn: 3,
        result: Ok(()),
    });
    rig.feed(Input::Reclaimed {
        first_lsn: 1,
        free_bytes: 0,
    })
}

#[test]
fn a_refused_append_parks_the_write_asks_checkpoints_and_retries_in_arrival_order() {
    let mut rig = full_ring(|s| s.async_site(2));
    rig.refuse = 1;
    let out = rig.write(10, 0, 4096);
    assert_eq!(checkpoints(&out), vec![(0, 3)], "slink 0 checkpoints");
    assert_eq!(rig.core.writes_in_flight(), 1, "parked, not replied");
    let out = rig.write(11, 65536, 4096);
    assert!(
        !out.iter().any(|c| matches!(c, Command::Append { .. })),
        "a later write waits behind the parked one"
    );
    let out = rig.feed(Input::CheckpointDone {
        slink: 0,
        lsn: 3,
        result: Ok(()),
    });
    assert!(out.contains(&Command::Reclaim));
    let out = rig.feed(Input::Reclaimed {
        first_lsn: 4,
        free_bytes: 4 * 4096,
    });
    let order: Vec<Option<RequestId>> = out
        .iter()
        .filter_map(|c| match c {
            Command::Append { id, lsn, .. } => Some((*lsn, *id)),
            _ => None,
        })
        .map(|(_, id)| id)
        .collect();
    assert_eq!(order, vec![Some(10), Some(11)]);
}

#[test]
fn a_full_ring_drops_for_an_async_site_after_marking_the_dropped_extents_dirty() {
    let mut rig = full_ring(|s| s.async_site(2));
    // Nothing was freed (the site holds the ring): the retry is refused, entries are dropped.
    let out = overflow(&mut rig);
    let m = marks(&out, 2);
    assert_eq!(m, vec![vec![ext(8192, 4096)]], "lsn 1 is dropped: {out:?}");
    assert!(
        !out.iter().any(|c| matches!(c, Command::DropTo { .. })),
        "no drop before the marks are durable"
    );
    let out = rig.dirty_persisted(&out);
    assert!(
        out.contains(&Command::DropTo { slink: 2, lsn: 1 }),
        "{out:?}"
    );
    assert_eq!(rig.core.slink_state(2), Some(SlinkState::Resync));
    let out = rig.feed(Input::Reclaimed {
        first_lsn: 2,
        free_bytes: 4096,
    });
    assert_eq!(appended(&out), 4);
    assert_eq!(rig.core.writes_in_flight(), 1, "the write is admitted");
}

#[test]
fn a_full_ring_never_drops_for_a_stall_or_sync_site_or_one_without_a_dirty_log() {
    let kinds: [(&str, SiteKind); 3] = [
        ("stall", |s| {
            s.site(2, PolicyKind::Stall, DownWait::Bounded(DOWN_WAIT))
        }),
        ("sync", |s| s.sync_site(2)),
        ("no dirty log", |s| s.async_site(2).without_dirty_log(2)),
    ];
    for (name, site) in kinds {
        let mut rig = full_ring(site);
        rig.refuse = usize::MAX;
        let mut all = rig.at(S).write(10, 0, 4096);
        if !checkpoints(&all).is_empty() {
            all.extend(rig.feed(Input::CheckpointDone {
                slink: 0,
                lsn: 3,
                result: Ok(()),
            }));
        }
        all.extend(rig.feed(Input::Reclaimed {
            first_lsn: 1,
            free_bytes: 0,
        }));
        all.extend(rig.tick(S + RING_FULL_WAIT - 1));
        assert!(
            !all.iter()
                .any(|c| matches!(c, Command::MarkDirty { .. } | Command::DropTo { .. })),
            "{name}: nothing is dropped: {all:?}"
        );
        assert!(!replies(&all).iter().any(|(id, _)| *id == 10), "{name}");
        let out = rig.tick(S + RING_FULL_WAIT);
        assert_eq!(
            replies(&out),
            vec![(10, Err(Failure::NoSpace))],
            "{name}: the parked write fails after the ring full wait"
        );
    }
}

#[test]
fn a_site_ack_unblocks_a_ring_held_by_a_stall_site() {
    let mut rig = full_ring(|s| s.site(2, PolicyKind::Stall, DownWait::Bounded(DOWN_WAIT)));
    overflow(&mut rig);
    assert_eq!(rig.core.writes_in_flight(), 1, "parked");
    let out = rig.ack(2, 3);
    assert_eq!(checkpoints(&out), vec![(2, 3)], "{out:?}");
    let out = rig.feed(Input::CheckpointDone {
        slink: 2,
        lsn: 3,
        result: Ok(()),
    });
    assert!(out.contains(&Command::Reclaim));
    let out = rig.feed(Input::Reclaimed {
        first_lsn: 4,
        free_bytes: 8 * 4096,
    });
    assert_eq!(appended(&out), 4);
}

#[test]
fn an_out_of_date_sync_site_with_a_dirty_log_is_dropped_for() {
    let mut rig = full_ring(|s| s.sync_site(2));
    rig.at(S).feed(Input::LinkDown {
        slink: 2,
        reason: "test".into(),
    });
    rig.tick(S + DOWN_WAIT);
    assert_eq!(rig.core.slink_state(2), Some(SlinkState::OutOfDate));
    let out = overflow(&mut rig);
    assert_eq!(marks(&out, 2), vec![vec![ext(8192, 4096)]], "{out:?}");
    let out = rig.dirty_persisted(&out);
    assert!(out.contains(&Command::DropTo { slink: 2, lsn: 1 }));
}

// ---- resync ----

#[test]
fn resync_pieces_wait_until_slink0_applied_what_was_shipped_before() {
    let mut rig = primary().async_site(1).start();
    rig.connect(1, 0);
    let lsn = appended(&rig.write(1, 0, 4096));
    rig.written(lsn);
    let out = rig.durable(lsn);
    assert_eq!(ships(&out, 1), vec![(0, lsn)]);
    assert_eq!(
        applies(&out),
        vec![lsn],
        "durable: applied without a log write"
    );
    let out = rig.feed(Input::ResyncAll { slink: 1 });
    assert_eq!(marks(&out, 1).len(), 1);
    assert!(
        pieces(&out, 1).is_empty(),
        "slink 0 has not applied lsn {lsn}"
    );
    let mut out = rig.applied(lsn);
    out.extend(rig.seq_persisted(&out));
    let p = pieces(&out, 1);
    assert!(!p.is_empty(), "{out:?}");
    assert_eq!((p[0].device, p[0].region, p[0].offset), (0, 0, 0));
}

#[test]
fn resync_seqs_never_repeat_across_a_restart() {
    // Before the restart: one reservation persisted, some seqs used.
    let mut before = primary().async_site(1).start();
    before.connect(1, 0);
    let mut out = before.feed(Input::ResyncAll { slink: 1 });
    out.extend(before.seq_persisted(&out));
    let used = pieces(&out, 1).iter().map(|p| p.seq).max().expect("pieces");
    let reserved = before.reserved[&1];
    assert!(used <= reserved);
    // After it: the restored reservation is honoured, a new one persisted before any piece.
    let mut rig = primary()
        .async_site(1)
        .restored(|r| r.resync_seq = vec![(1, reserved)])
        .start();
    let mut all = rig.feed(Input::LinkUp {
        slink: 1,
        peer: pos(0),
    });
    all.extend(rig.feed(Input::ResyncAll { slink: 1 }));
    assert!(
        pieces(&all, 1).is_empty(),
        "no piece before the reservation"
    );
    assert!(completions(&all, 1).is_empty());
    assert!(all.contains(&Command::PersistResyncSeq {
        slink: 1,
        reserved: reserved + 1 + RESYNC_SEQ_RESERVE
    }));
    let out = rig.seq_persisted(&all);
    let p = pieces(&out, 1);
    assert!(!p.is_empty());
    assert_eq!(
        p[0].seq,
        reserved + 1,
        "first seq above the restored reservation"
    );
    assert!(p.iter().all(|p| p.seq > used));
    assert!(p.windows(2).all(|w| w[1].seq == w[0].seq + 1));
}

#[test]
fn a_resync_that_uses_up_its_reservation_persists_a_new_one_before_the_next_piece() {
    let mut rig = primary().async_site(1).start();
    rig.connect(1, 0);
    let first = rig.reserved[&1];
    let mut reservations = 1;
    // Full resyncs until the seqs pass the first reservation (the harness checks every seq
    // against the durable reservation and for repeats).
    for _ in 0..400 {
        let mut out = rig.feed(Input::ResyncAll { slink: 1 });
        loop {
            if out
                .iter()
                .any(|c| matches!(c, Command::PersistResyncSeq { .. }))
            {
                reservations += 1;
                let more = rig.seq_persisted(&out);
                out.extend(more);
            }
            let top = pieces(&out, 1)
                .iter()
                .map(|p| p.seq)
                .chain(completions(&out, 1))
                .max();
            let Some(top) = top else { break };
            out = rig.feed(Input::SiteAck {
                slink: 1,
                pos: Position {
                    lsn: 0,
                    resync_seq: top,
                },
            });
        }
        if rig.seqs.last().is_some_and(|(_, s)| *s > first) {
            break;
        }
    }
    assert!(
        rig.seqs.last().is_some_and(|(_, s)| *s > first),
        "{} seqs, last {:?}, first reservation {first}",
        rig.seqs.len(),
        rig.seqs.last()
    );
    assert_eq!(reservations, 2);
    assert_eq!(rig.core.slink_state(1), Some(SlinkState::Up));
}

#[test]
fn a_piece_whose_region_an_overflow_marked_again_does_not_clean_it_when_acked() {
    let mut rig = full_ring(|s| s.async_site(2));
    let mut out = rig.feed(Input::ResyncAll { slink: 2 });
    out.extend(rig.seq_persisted(&out));
    let sent = pieces(&out, 2);
    assert_eq!(sent.len(), (DEVICE_BYTES / REGION_BYTES) as usize);
    // The ring fills: lsn 1 (region 0) is dropped for slink 2 while region 0's piece is out.
    let out = overflow(&mut rig);
    assert_eq!(marks(&out, 2), vec![vec![ext(8192, 4096)]]);
    rig.dirty_persisted(&out);
    let top = sent.iter().map(|p| p.seq).max().unwrap_or(0);
    let out = rig.feed(Input::SiteAck {
        slink: 2,
        pos: Position {
            lsn: 0,
            resync_seq: top,
        },
    });
    let cleared: Vec<u64> = out
        .iter()
        .filter_map(|c| match c {
            Command::ClearDirty { region, .. } => Some(*region),
            _ => None,
        })
        .collect();
    assert_eq!(
        cleared,
        (1..16).collect::<Vec<u64>>(),
        "region 0 stays dirty"
    );
    assert!(rig.core.slink(2).is_some_and(|s| s.dirty.is_dirty(0, 0)));
    assert!(pieces(&out, 2).iter().any(|p| p.region == 0), "sent again");
}

#[test]
fn a_piece_whose_region_was_marked_again_does_not_clean_it_when_acked() {
    let mut rig = primary().async_site(1).start();
    rig.connect(1, 0);
    let mut out = rig.feed(Input::ResyncAll { slink: 1 });
    out.extend(rig.seq_persisted(&out));
    let p = pieces(&out, 1);
    let first = p.iter().find(|p| p.region == 0).copied().expect("region 0");
    assert!(first.last, "a 64 KiB region is one piece");
    // Marked dirty again while the piece is on its way.
    rig.feed(Input::ResyncAll { slink: 1 });
    let out = rig.feed(Input::SiteAck {
        slink: 1,
        pos: Position {
            lsn: 0,
            resync_seq: first.seq,
        },
    });
    assert!(
        !out.contains(&Command::ClearDirty {
            slink: 1,
            device: 0,
            region: 0
        }),
        "{out:?}"
    );
    assert!(rig.core.slink(1).is_some_and(|s| s.dirty.is_dirty(0, 0)));
    let again = pieces(&out, 1);
    assert!(
        again.iter().any(|p| p.region == 0),
        "region 0 is sent again: {out:?}"
    );
}

#[test]
fn a_clean_site_gets_a_completion_marker_and_again_after_a_reconnect() {
    let mut rig = primary().async_site(1).start();
    rig.connect(1, 0);
    let mut out = rig.feed(Input::ResyncAll { slink: 1 });
    out.extend(rig.seq_persisted(&out));
    let p = pieces(&out, 1);
    assert_eq!(p.len(), (DEVICE_BYTES / REGION_BYTES) as usize);
    assert!(completions(&out, 1).is_empty(), "not clean yet");
    let top = p.iter().map(|p| p.seq).max().unwrap_or(0);
    let out = rig.feed(Input::SiteAck {
        slink: 1,
        pos: Position {
            lsn: 0,
            resync_seq: top,
        },
    });
    assert_eq!(
        count(&out, |c| matches!(c, Command::ClearDirty { .. })),
        p.len()
    );
    let done = completions(&out, 1);
    assert_eq!(done, vec![top + 1], "{out:?}");
    assert!(events(&out).contains(&"resync-end"));
    // The marker is lost with the session: resent after the reconnect, with a new seq.
    rig.feed(Input::LinkDown {
        slink: 1,
        reason: "test".into(),
    });
    let out = rig.feed(Input::LinkUp {
        slink: 1,
        peer: Position {
            lsn: 0,
            resync_seq: top,
        },
    });
    let again = completions(&out, 1);
    assert_eq!(again.len(), 1, "{out:?}");
    assert!(again[0] > top + 1, "seqs never repeat");
}

#[test]
fn the_completion_marker_waits_for_the_entries_a_piece_may_hold() {
    let mut rig = primary().async_site(1).start();
    rig.connect(1, 0);
    // lsn 1 is on slink 0's device but not durable, so not shipped.
    let lsn = appended(&rig.write(1, 0, 4096));
    let out = rig.written(lsn);
    rig.al_written(&out);
    rig.applied(lsn);
    let mut out = rig.feed(Input::ResyncAll { slink: 1 });
    out.extend(rig.seq_persisted(&out));
    let top = pieces(&out, 1).iter().map(|p| p.seq).max().expect("pieces");
    let out = rig.feed(Input::SiteAck {
        slink: 1,
        pos: Position {
            lsn: 0,
            resync_seq: top,
        },
    });
    assert!(rig.core.slink(1).is_some_and(|s| s.dirty.is_clean()));
    assert!(
        completions(&out, 1).is_empty(),
        "region 0's piece may hold lsn {lsn}, which the site does not have"
    );
    let out = rig.durable(lsn);
    assert_eq!(ships(&out, 1), vec![(0, lsn)]);
    assert_eq!(completions(&out, 1), vec![top + 1]);
    let ship = out.iter().position(|c| matches!(c, Command::Ship { .. }));
    let done = out
        .iter()
        .position(|c| matches!(c, Command::ResyncComplete { .. }));
    assert!(ship < done, "the marker follows the entries in the stream");
}

// ---- link up ----

#[test]
fn a_site_below_the_cursor_gets_a_full_resync() {
    let mut rig = primary()
        .async_site(1)
        .restored(|r| {
            r.last_lsn = 5;
            r.cursors = vec![(0, 5), (1, 5)];
        })
        .start();
    let out = rig.feed(Input::LinkUp {
        slink: 1,
        peer: pos(2),
    });
    assert_eq!(marks(&out, 1), vec![vec![ext(0, DEVICE_BYTES)]]);
    assert!(events(&out).contains(&"resync-full"));
    assert!(ships(&out, 1).is_empty(), "the ring does not hold 3..=5");
    assert_eq!(rig.core.slink_state(1), Some(SlinkState::Resync));
}

#[test]
fn a_site_ahead_of_this_one_is_faulty_never_silently_accepted() {
    let mut rig = primary().sync_site(1).start();
    rig.write_through(1, 0, 4096);
    let out = rig.feed(Input::LinkUp {
        slink: 1,
        peer: pos(9),
    });
    assert!(events(&out).contains(&"slink-faulty"), "{out:?}");
    assert_eq!(rig.core.slink_state(1), Some(SlinkState::Faulty));
    assert!(ships(&out, 1).is_empty());
    assert!(rig.core.waited_slinks().is_empty());
}

#[test]
fn a_site_that_reconnects_after_an_overflow_drop_resyncs_only_the_dropped_regions() {
    let mut rig = full_ring(|s| s.async_site(2));
    let out = overflow(&mut rig);
    let out = rig.dirty_persisted(&out);
    assert!(
        out.contains(&Command::DropTo { slink: 2, lsn: 1 }),
        "{out:?}"
    );
    // A link blip: the site reports what it has, lsn 0 (lsn 1 was dropped for it).
    rig.feed(Input::LinkDown {
        slink: 2,
        reason: "test".into(),
    });
    let out = rig.feed(Input::LinkUp {
        slink: 2,
        peer: pos(0),
    });
    assert!(
        !events(&out).contains(&"resync-full"),
        "lsn 1's region is dirty already; 2..=3 are in the ring: {out:?}"
    );
    assert_eq!(ships(&out, 2), vec![(1, 3)]);
}

// ---- the drop floor across restarts ----

/// What the replog and dirty log of `full_ring` hold after `overflow` dropped lsn 1 for slink 2
/// (region 0 dirty, its cursor at 1), with the drop floor `floor` persisted or not.
fn restored_after_drop(floor: Option<Lsn>) -> Setup {
    primary().ring_bytes(8 * 4096).async_site(2).restored(|r| {
        r.last_lsn = 3;
        r.retained = (2..=3)
            .map(|lsn| Retained {
                lsn,
                extent: ext(lsn * 8192, 4096),
                ring_bytes: 4096,
                at: 0,
            })
            .collect();
        r.cursors = vec![(0, 3), (2, 1)];
        r.dirty = vec![(2, 0, 0)];
        r.drop_floors = floor.map(|f| (2, f)).into_iter().collect();
    })
}

#[test]
fn a_drop_persists_the_floor_and_a_restart_with_it_resyncs_only_the_dirty_regions() {
    let mut rig = full_ring(|s| s.async_site(2));
    let out = overflow(&mut rig);
    assert_eq!(floor_writes(&out, 2), vec![Some(0)], "the site had lsn 0");
    rig.floor_persisted(&out, Ok(()));
    let out = rig.dirty_persisted(&out);
    assert!(out.contains(&Command::DropTo { slink: 2, lsn: 1 }));

    // Restarted with the floor: the site at lsn 0 lacks lsn 1 (dirty) and 2..=3 (in the ring).
    let mut rig = restored_after_drop(Some(0)).start();
    assert_eq!(rig.core.slink(2).map(|s| s.drop_floor), Some(Some(0)));
    let out = rig.feed(Input::LinkUp {
        slink: 2,
        peer: pos(0),
    });
    assert!(!events(&out).contains(&"resync-full"), "{out:?}");
    assert!(marks(&out, 2).is_empty(), "no device is marked whole");
    assert_eq!(ships(&out, 2), vec![(1, 3)], "lsn 1 is dirty, not shipped");
    assert!(rig.core.slink(2).is_some_and(|s| s.dirty.is_dirty(0, 0)));

    // Without it (a replog of format 2, or a floor that never got to disk): a full resync.
    let mut rig = restored_after_drop(None).start();
    let out = rig.feed(Input::LinkUp {
        slink: 2,
        peer: pos(0),
    });
    assert!(events(&out).contains(&"resync-full"), "{out:?}");
}

/// From `restored_after_drop(Some(0))`: the site reconnects at lsn 0 and is repaired (pieces,
/// then the completion marker, all acked up to lsn 3). Returns what the marker's ack decided.
fn repair_after_restart(rig: &mut Rig) -> Vec<Command> {
    let mut out = rig.feed(Input::LinkUp {
        slink: 2,
        peer: pos(0),
    });
    out.extend(rig.seq_persisted(&out));
    assert!(!pieces(&out, 2).is_empty(), "region 0 is copied: {out:?}");
    let out = rig.ack(2, 3);
    assert_eq!(completions(&out, 2).len(), 1, "{out:?}");
    rig.ack(2, 3)
}

#[test]
fn the_floor_clear_after_a_repair_is_durable_before_the_cursor_moves() {
    let mut rig = restored_after_drop(Some(0)).start();
    let out = repair_after_restart(&mut rig);
    assert_eq!(
        floor_writes(&out, 2),
        vec![None],
        "the repair clears the floor"
    );
    assert!(checkpoints(&out).iter().all(|(nr, _)| *nr != 2));
    // Until the clear is durable the floor still decides and the cursor stays at 1, even when
    // a checkpoint is due and the ring is under pressure.
    let out = rig.tick(10 * CHECKPOINT_INTERVAL);
    assert!(checkpoints(&out).iter().all(|(nr, _)| *nr != 2), "{out:?}");
    assert!(floor_writes(&out, 2).is_empty(), "one write on its way");
    assert_eq!(
        rig.core.slink(2).map(|s| (s.drop_floor, s.cursor)),
        Some((Some(0), 1))
    );
    let out = rig.floor_persisted(
        &[Command::PersistDropFloor {
            slink: 2,
            floor: None,
        }],
        Ok(()),
    );
    assert_eq!(rig.core.slink(2).map(|s| s.drop_floor), Some(None));
    let mut out = out;
    out.extend(rig.tick(11 * CHECKPOINT_INTERVAL));
    assert_eq!(
        checkpoints(&out).iter().filter(|(nr, _)| *nr == 2).count(),
        1,
        "the cursor moves once the clear is durable: {out:?}"
    );
}

#[test]
fn a_failed_floor_clear_keeps_the_floor_and_the_cursor_until_a_retry_succeeds() {
    let mut rig = restored_after_drop(Some(0)).start();
    let out = repair_after_restart(&mut rig);
    let out = rig.floor_persisted(&out, Err("metadata write failed".into()));
    assert!(events(&out).contains(&"drop-floor-persist-failed"));
    assert!(floor_writes(&out, 2).is_empty(), "not again at once");
    assert_eq!(
        rig.core.slink(2).map(|s| (s.drop_floor, s.cursor)),
        Some((Some(0), 1))
    );
    // The next tick writes the clear again; the cursor still waits for it.
    let out = rig.tick(10 * CHECKPOINT_INTERVAL);
    assert_eq!(floor_writes(&out, 2), vec![None]);
    assert!(checkpoints(&out).iter().all(|(nr, _)| *nr != 2), "{out:?}");
    let mut out = rig.floor_persisted(&out, Ok(()));
    out.extend(rig.tick(11 * CHECKPOINT_INTERVAL));
    assert_eq!(rig.core.slink(2).map(|s| s.drop_floor), Some(None));
    assert_eq!(
        checkpoints(&out).iter().filter(|(nr, _)| *nr == 2).count(),
        1
    );
}

#[test]
fn a_failed_floor_write_may_have_reached_the_disk_so_its_clear_is_written_too() {
    let mut rig = full_ring(|s| s.async_site(2));
    let out = overflow(&mut rig);
    // The set failed: the disk holds no floor or floor 0 (a write that failed may have landed).
    let failed = rig.floor_persisted(&out, Err("metadata write failed".into()));
    assert!(events(&failed).contains(&"drop-floor-persist-failed"));
    rig.dirty_persisted(&out);
    // The site comes back and is repaired before any retry: the clear is still written (the
    // floor is not just forgotten in memory), and the cursor waits for it.
    let mut out = rig.feed(Input::LinkDown {
        slink: 2,
        reason: "test".into(),
    });
    out.extend(rig.feed(Input::LinkUp {
        slink: 2,
        peer: pos(0),
    }));
    out.extend(rig.seq_persisted(&out));
    let out = rig.ack(2, 3);
    assert_eq!(completions(&out, 2).len(), 1, "{out:?}");
    let out = rig.ack(2, 3);
    assert!(
        floor_writes(&out, 2).is_empty(),
        "the retry waits for a tick"
    );
    assert_eq!(rig.core.slink(2).map(|s| s.drop_floor), Some(Some(0)));
    let out = rig.tick(10 * CHECKPOINT_INTERVAL);
    assert_eq!(floor_writes(&out, 2), vec![None], "{out:?}");
    assert!(checkpoints(&out).iter().all(|(nr, _)| *nr != 2), "{out:?}");
}

#[test]
fn a_restored_floor_whose_dirty_marks_were_lost_is_cleared_and_not_trusted() {
    let mut rig = restored_after_drop(Some(0))
        .restored(|r| {
            r.dirty.clear();
            r.marks_lost = vec![2];
        })
        .start();
    assert_eq!(floor_writes(&rig.boot, 2), vec![None], "{:?}", rig.boot);
    assert_eq!(rig.core.slink(2).map(|s| s.drop_floor), Some(None));
    let out = rig.feed(Input::LinkUp {
        slink: 2,
        peer: pos(0),
    });
    assert!(events(&out).contains(&"resync-full"), "{out:?}");
}

// ---- unclean start ----

#[test]
fn an_unclean_start_marks_the_activity_log_dirty_for_every_site_before_new_log_writes() {
    let mut rig = primary()
        .async_site(1)
        .sync_site(2)
        .restored(|r| r.activity_log = vec![(0, 2)])
        .start();
    let boot = std::mem::take(&mut rig.boot);
    let extent = Extent {
        device: 0,
        offset: 2 * AL_EXTENT_BYTES,
        len: AL_EXTENT_BYTES,
    };
    assert_eq!(marks(&boot, 1), vec![vec![extent]]);
    assert_eq!(marks(&boot, 2), vec![vec![extent]]);
    assert!(marks(&boot, 0).is_empty());
    // A write outside the old log needs a log write: not while the marks are not durable.
    let lsn = appended(&rig.write(1, 0, 4096));
    let out = rig.written(lsn);
    assert!(al_writes(&out).is_empty(), "{out:?}");
    assert!(applies(&out).is_empty());
    let tokens: Vec<Command> = boot
        .iter()
        .filter(|c| matches!(c, Command::MarkDirty { slink: 1, .. }))
        .cloned()
        .collect();
    let out = rig.dirty_persisted(&tokens);
    assert!(
        al_writes(&out).is_empty(),
        "slink 2's marks are not durable"
    );
    let rest: Vec<Command> = boot
        .iter()
        .filter(|c| matches!(c, Command::MarkDirty { slink: 2, .. }))
        .cloned()
        .collect();
    let out = rig.dirty_persisted(&rest);
    assert_eq!(al_writes(&out).len(), 1, "{out:?}");
}

#[test]
fn an_unclean_start_makes_a_site_without_a_dirty_log_faulty() {
    let rig = primary()
        .async_site(1)
        .without_dirty_log(1)
        .restored(|r| r.activity_log = vec![(0, 0)])
        .start();
    assert!(events(&rig.boot).contains(&"slink-faulty"));
    assert!(marks(&rig.boot, 1).is_empty());
    assert_eq!(rig.core.slink_state(1), Some(SlinkState::Faulty));
}

// ---- the secondary role ----

fn entry(lsn: Lsn, offset: u64) -> Received {
    Received::Entry {
        lsn,
        extent: ext(offset, 4096),
    }
}

fn acks(out: &[Command]) -> Vec<Position> {
    out.iter()
        .filter_map(|c| match c {
            Command::AckPrimary { pos } => Some(*pos),
            _ => None,
        })
        .collect()
}

fn appends(out: &[Command]) -> Vec<Lsn> {
    out.iter()
        .filter_map(|c| match c {
            Command::Append { lsn, .. } => Some(*lsn),
            _ => None,
        })
        .collect()
}

#[test]
fn a_secondary_appends_with_the_primarys_lsns_and_acks_only_durable_entries() {
    let mut rig = secondary().start();
    let out = rig.feed(Input::Received {
        items: vec![entry(1, 0), entry(2, 2048), entry(3, 65536)],
    });
    assert_eq!(appends(&out), vec![1, 2, 3]);
    assert!(acks(&out).is_empty());
    let out = rig.written(3);
    assert!(acks(&out).is_empty(), "written, not durable");
    assert!(
        applies(&out).is_empty(),
        "a secondary applies durable entries"
    );
    let out = rig.durable(3);
    assert_eq!(acks(&out), vec![pos(3)]);
    assert_eq!(applies(&out), vec![1, 3], "2 overlaps 1");
    let out = rig.applied(1);
    assert_eq!(applies(&out), vec![2]);
}

#[test]
fn a_gap_makes_a_secondary_persist_inconsistent_before_appending() {
    let mut rig = secondary().start();
    rig.feed(Input::Received {
        items: vec![entry(1, 0)],
    });
    let out = rig.feed(Input::Received {
        items: vec![entry(4, 0)],
    });
    assert_eq!(
        out.first(),
        Some(&Command::PersistConsistency { consistent: false })
    );
    assert!(appends(&out).is_empty());
    let out = rig.feed(Input::ConsistencyPersisted { consistent: false });
    assert_eq!(appends(&out), vec![4]);
    assert!(!rig.core.consistent());
}

#[test]
fn a_piece_makes_a_secondary_persist_inconsistent_before_storing_it() {
    let mut rig = secondary().start();
    let piece = Received::Piece {
        seq: 1,
        extent: ext(0, REGION_BYTES),
    };
    let out = rig.feed(Input::Received { items: vec![piece] });
    assert_eq!(out, vec![Command::PersistConsistency { consistent: false }]);
    let out = rig.feed(Input::ConsistencyPersisted { consistent: false });
    assert!(out.contains(&Command::StorePiece {
        seq: 1,
        extent: ext(0, REGION_BYTES)
    }));
    let out = rig.feed(Input::PieceStored {
        seq: 1,
        result: Ok(()),
    });
    assert_eq!(
        acks(&out),
        vec![Position {
            lsn: 0,
            resync_seq: 1
        }]
    );
}

#[test]
fn a_done_marker_makes_a_secondary_consistent_once_earlier_entries_are_applied() {
    let mut rig = secondary().restored(|r| r.consistent = false).start();
    assert!(!rig.core.consistent());
    let out = rig.feed(Input::Received {
        items: vec![entry(1, 0), Received::Done { seq: 5 }],
    });
    assert_eq!(appends(&out), vec![1]);
    rig.written(1);
    let out = rig.durable(1);
    assert_eq!(applies(&out), vec![1]);
    assert!(
        !out.iter()
            .any(|c| matches!(c, Command::PersistConsistency { .. })),
        "lsn 1 is not applied yet"
    );
    let out = rig.applied(1);
    assert!(out.contains(&Command::PersistConsistency { consistent: true }));
    rig.feed(Input::ConsistencyPersisted { consistent: true });
    assert!(rig.core.consistent());
}

#[test]
fn a_secondary_skips_entries_resent_after_a_reconnect() {
    let mut rig = secondary().start();
    rig.feed(Input::Received {
        items: vec![entry(1, 0), entry(2, 8192)],
    });
    let out = rig.feed(Input::Received {
        items: vec![entry(1, 0), entry(2, 8192), entry(3, 16384)],
    });
    assert_eq!(appends(&out), vec![3]);
    assert!(rig.core.consistent());
}

#[test]
fn a_secondary_skips_a_piece_resent_after_a_reconnect() {
    let mut rig = secondary().restored(|r| r.consistent = false).start();
    let piece = Received::Piece {
        seq: 1,
        extent: ext(0, REGION_BYTES),
    };
    let out = rig.feed(Input::Received { items: vec![piece] });
    assert_eq!(count(&out, |c| matches!(c, Command::StorePiece { .. })), 1);
    rig.feed(Input::PieceStored {
        seq: 1,
        result: Ok(()),
    });
    let out = rig.feed(Input::Received {
        items: vec![piece, entry(1, 0)],
    });
    assert_eq!(count(&out, |c| matches!(c, Command::StorePiece { .. })), 0);
    assert_eq!(appends(&out), vec![1]);
}

#[test]
fn a_new_session_drops_what_an_older_session_handed_in_and_the_core_did_not_take() {
    let mut rig = secondary().restored(|r| r.consistent = false).start();
    let piece = Received::Piece {
        seq: 7,
        extent: ext(0, REGION_BYTES),
    };
    // The piece waits behind entry 1, which is not applied yet.
    let out = rig.feed(Input::Received {
        items: vec![entry(1, 0), piece],
    });
    assert_eq!(appends(&out), vec![1]);
    rig.feed(Input::SessionStarted);
    rig.written(1);
    rig.durable(1);
    let out = rig.applied(1);
    assert_eq!(
        count(&out, |c| matches!(c, Command::StorePiece { .. })),
        0,
        "the older session's piece was dropped"
    );
    // The new session's items are taken as usual.
    let out = rig.feed(Input::Received {
        items: vec![entry(2, 8192)],
    });
    assert_eq!(appends(&out), vec![2]);
}

#[test]
fn a_client_write_on_a_secondary_is_refused_read_only() {
    let mut rig = secondary().start();
    let out = rig.write(1, 0, 4096);
    assert_eq!(replies(&out), vec![(1, Err(Failure::ReadOnly))]);
    assert!(appends(&out).is_empty());
}

#[test]
fn a_secondary_retries_an_entry_the_full_ring_refused() {
    let mut rig = secondary().start();
    rig.feed(Input::Received {
        items: vec![entry(1, 0)],
    });
    rig.refuse = 1;
    let out = rig.feed(Input::Received {
        items: vec![entry(2, 8192), entry(3, 16384)],
    });
    assert_eq!(
        appends(&out),
        vec![2],
        "refused, then nothing until room is made"
    );
    let mut all = rig.written(1);
    all.extend(rig.durable(1));
    all.extend(rig.tick(S));
    assert_eq!(appends(&all), vec![2, 3], "{all:?}");
    assert!(!all
        .iter()
        .any(|c| matches!(c, Command::PersistConsistency { .. })));
    assert_eq!(rig.core.last_lsn(), 3);
}

// ---- shutdown ----

#[test]
fn shutdown_drains_checkpoints_every_slink_empties_the_activity_log_then_stops() {
    let mut rig = primary().sync_site(1).start();
    rig.connect(1, 0);
    let lsn = appended(&rig.write(1, 0, 4096));
    let out = rig.written(lsn);
    rig.al_written(&out);
    rig.applied(lsn);
    let out = rig.feed(Input::Shutdown);
    assert!(checkpoints(&out).is_empty(), "not drained");
    assert!(!out.contains(&Command::Stopped));
    let refused = rig.write(2, 0, 4096);
    assert_eq!(replies(&refused), vec![(2, Err(Failure::ReadOnly))]);
    rig.durable(lsn);
    let out = rig.ack(1, lsn);
    assert_eq!(ok_replies(&out), vec![1]);
    let mut cps = checkpoints(&out);
    cps.sort();
    assert_eq!(cps, vec![(0, lsn), (1, lsn)]);
    let mut last = Vec::new();
    for (slink, lsn) in cps {
        last = rig.feed(Input::CheckpointDone {
            slink,
            lsn,
            result: Ok(()),
        });
        assert!(!last.contains(&Command::Stopped));
    }
    assert_eq!(al_writes(&last), vec![Vec::<ExtentKey>::new()]);
    let out = rig.al_written(&last);
    assert_eq!(out.last(), Some(&Command::Stopped));
    assert!(rig.core.is_stopped());
    assert!(rig.core.activity_log().is_empty());
}

#[test]
fn a_shutdown_right_after_an_unclean_start_keeps_the_activity_log_until_the_marks_are_durable() {
    let mut rig = primary()
        .async_site(1)
        .restored(|r| r.activity_log = vec![(0, 2)])
        .start();
    let boot = std::mem::take(&mut rig.boot);
    assert_eq!(marks(&boot, 1).len(), 1);
    let out = rig.feed(Input::Shutdown);
    let mut all = out.clone();
    all.extend(rig.durable(0));
    assert!(
        al_writes(&all).is_empty(),
        "emptying the log before slink 1's marks are durable loses them on a crash: {all:?}"
    );
    assert!(!all.contains(&Command::Stopped));
    let out = rig.dirty_persisted(&boot);
    assert_eq!(al_writes(&out), vec![Vec::<ExtentKey>::new()]);
    let out = rig.al_written(&out);
    assert!(out.contains(&Command::Stopped));
}

// ---- properties ----

proptest! {
    /// Writes at random places, completions in a random order: an entry is never applied while a
    /// lower overlapping one is unapplied, and every entry is applied once.
    #[test]
    fn the_overlap_rule_holds_for_any_completion_order(
        writes in prop::collection::vec((0u64..16, 1u64..4), 1..24),
        picks in prop::collection::vec(any::<prop::sample::Index>(), 0..64),
    ) {
        let mut rig = primary().start();
        let mut last = 0;
        for (i, (block, blocks)) in writes.iter().enumerate() {
            last = appended(&rig.write(i as u64 + 1, block * 4096, blocks * 4096));
        }
        rig.written(last);
        let mut applying: Vec<Lsn> = applies(&rig.durable(last));
        let mut done: Vec<Lsn> = Vec::new();
        let mut picks = picks.into_iter();
        while !applying.is_empty() {
            let k = picks.next().map_or(0, |p| p.index(applying.len()));
            let lsn = applying.swap_remove(k);
            for d in &done {
                prop_assert_ne!(*d, lsn, "applied twice");
            }
            let e = rig.extents[&lsn];
            for lower in 1..lsn {
                if rig.extents[&lower].overlaps(&e) {
                    prop_assert!(done.contains(&lower), "{} before {}", lsn, lower);
                }
            }
            let out = rig.applied(lsn);
            done.push(lsn);
            applying.extend(applies(&out));
        }
        prop_assert_eq!(done.len() as u64, last);
        prop_assert_eq!(rig.core.applied0(), last);
        let replied = ok_replies(&rig.feed(Input::Tick));
        prop_assert!(replied.is_empty(), "every write was replied to on its apply");
        prop_assert_eq!(rig.core.writes_in_flight(), 0);
    }
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Connected,
    Disconnected,
    Tick(bool),
    Failed,
    Stop,
    Paused(bool),
}

fn any_event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => Just(Ev::Connected),
        4 => Just(Ev::Disconnected),
        6 => any::<bool>().prop_map(Ev::Tick),
        1 => Just(Ev::Failed),
        1 => Just(Ev::Stop),
        2 => any::<bool>().prop_map(Ev::Paused),
    ]
}

proptest! {
    /// Any sequence of events on a remote sync site: a change is reported exactly when the state
    /// changes; faulty and stopped are never left (but for stopping); a site down past its wait
    /// is out of date after a tick; one that waits forever never is; a paused site is never
    /// waited for and gets nothing.
    #[test]
    fn the_slink_state_machine_keeps_its_rules_for_any_events(
        forever in any::<bool>(),
        events in prop::collection::vec((any_event(), 0u64..3 * DOWN_WAIT), 1..60),
    ) {
        use super::slink::{SlinkCore, SlinkEvent};
        let down_wait = if forever { DownWait::Forever } else { DownWait::Bounded(DOWN_WAIT) };
        let cfg = SlinkConfig {
            nr: 1,
            transport: Transport::Remote,
            policy: PolicyKind::Sync,
            fallbehind: Fallbehind::default(),
            down_wait,
            region_bytes: Some(REGION_BYTES),
        };
        let mut s = SlinkCore::new(cfg, 0, 0, 0);
        let mut now = 0;
        let (mut connected, mut down_since) = (false, Some(0));
        for (ev, dt) in events {
            now += dt;
            let before = s.state();
            let change = s.on(match ev {
                Ev::Connected => SlinkEvent::Connected,
                Ev::Disconnected => SlinkEvent::Disconnected,
                Ev::Tick(caught_up) => SlinkEvent::Tick { caught_up },
                Ev::Failed => SlinkEvent::Failed,
                Ev::Stop => SlinkEvent::Stop,
                Ev::Paused(p) => SlinkEvent::Paused(p),
            }, now);
            match ev {
                Ev::Connected => (connected, down_since) = (true, None),
                Ev::Disconnected if connected => (connected, down_since) = (false, Some(now)),
                _ => {}
            }
            let after = s.state();
            prop_assert_eq!(change.map(|c| (c.from, c.to)), (before != after).then_some((before, after)));
            if before == SlinkState::Stopped {
                prop_assert_eq!(after, SlinkState::Stopped);
            }
            if before == SlinkState::Faulty {
                prop_assert!(matches!(after, SlinkState::Faulty | SlinkState::Stopped));
            }
            if forever {
                prop_assert_ne!(after, SlinkState::OutOfDate);
            } else if let (Ev::Tick(_), false, Some(since)) = (ev, connected, down_since) {
                if now - since >= DOWN_WAIT {
                    prop_assert!(
                        matches!(after, SlinkState::OutOfDate | SlinkState::Faulty | SlinkState::Stopped),
                        "down since {since}, now {now}: {after:?}"
                    );
                }
            }
            prop_assert_eq!(s.connected(), connected);
            prop_assert_eq!(s.down_since(), down_since);
            if s.paused() {
                prop_assert!(!s.waited_for() && !s.active());
            }
            prop_assert_eq!(
                s.waited_for(),
                !s.paused() && matches!(after, SlinkState::Up | SlinkState::Resync | SlinkState::Down)
            );
        }
    }
}

// ---- operator requests ----

#[test]
fn a_device_resync_marks_only_that_device_dirty() {
    let mut setup = primary().async_site(1);
    setup.cfg.devices.push(DeviceConfig {
        device: 1,
        size: 1 << 20,
    });
    let mut rig = setup.start();
    rig.connect(1, 0);
    let out = rig.feed(Input::ResyncDevice {
        slink: 1,
        device: 1,
    });
    let m = marks(&out, 1);
    assert_eq!(m.len(), 1, "{out:?}");
    assert!(m[0].iter().all(|e| e.device == 1), "{m:?}");
    assert_eq!(
        rig.core.slink(1).unwrap().dirty.device_dirty_bytes(0),
        0,
        "device 0 stays clean"
    );
    assert!(rig.core.slink(1).unwrap().dirty.device_dirty_bytes(1) > 0);
    // Slink 0 and unknown devices: nothing to copy.
    assert!(marks(
        &rig.feed(Input::ResyncDevice {
            slink: 0,
            device: 0
        }),
        0
    )
    .is_empty());
    assert!(marks(
        &rig.feed(Input::ResyncDevice {
            slink: 1,
            device: 9
        }),
        1
    )
    .is_empty());
}

#[test]
fn checkpoint_now_checkpoints_every_slink_that_can_move_its_cursor() {
    let mut rig = primary().sync_site(1).start();
    rig.connect(1, 0);
    let lsn = appended(&rig.write(1, 0, 4096));
    rig.written(lsn);
    rig.durable(lsn);
    rig.applied(lsn);
    rig.feed(Input::SiteAck {
        slink: 1,
        pos: pos(lsn),
    });
    let out = rig.feed(Input::CheckpointNow);
    let mut got = checkpoints(&out);
    got.sort();
    assert_eq!(got, vec![(0, lsn), (1, lsn)], "{out:?}");
    // In flight: asking again does not duplicate them.
    assert!(checkpoints(&rig.feed(Input::CheckpointNow)).is_empty());
}
