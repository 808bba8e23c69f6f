//! A `tcp` site of the driver: carries the core's `Ship`, `ResyncPiece` and `ResyncComplete`
//! for one remote slink to a [`slink::SlinkSender`], and reports what the link sees back to the
//! core (`LinkUp`, `SiteAck`, `LinkDown`). It decides nothing: down waits, out of date, resends
//! and resync are the core's (see `sim/src/world.rs` for the same semantics in the simulation).
//!
//! # Sessions
//! A session is one authenticated connection. The rule that keeps acks within what was sent:
//! the core sees `LinkUp { peer }` (the site's durable position from the handshake) before
//! anything is served in that session, and a session serves only what the core planned after
//! its `LinkUp`. Plans of an earlier session are dropped when it ends; commands the core gives
//! between the end of a session and its `LinkDown` are dropped too (the core resends from the
//! site's position after the next `LinkUp`). The sender awaits [`EntrySource::session_started`]
//! after the handshake and before its first pull; that hook hands `LinkUp` to the core and
//! returns once the core has planned. (Without it, a pull right after a reconnect served the
//! old session's plan: "ack for Position{lsn, resync_seq: 1329} beyond what was sent
//! (resync_seq: 0)", and the link flapped.)
//!
//! # Threads
//! - The link (sender tasks) runs on a thread of its own ([`LinkThread`], lower priority for an
//!   async site); it only moves bytes and never blocks.
//! - `tcp-N`, a worker thread, hands the link's events to the core in order (`LinkUp`,
//!   `SiteAck`, `LinkDown`; the core's lock is never taken on the link's runtime) and does the
//!   plan's blocking I/O: replog read-back (the one read-back path, [`workers::read_back`]) and
//!   resync piece reads from slink 0's devices. A read failure ends the session.
//!
//! # Bounds
//! Entry data held for the link (cached entries taken at `Ship`, entries read back) stays under
//! [`super::DriverConfig::link_queue_bytes`] plus one read-back batch: past it, a `Ship` keeps
//! only the lsn range and the entries are read back when the link gets to them. Resync pieces
//! are read as soon as the core gives them (the core reads a piece only once slink 0 holds what
//! was shipped before it; a late read could hold newer bytes than the core accounts for), so
//! their data is bounded by the core's pieces in flight (`RESYNC_PIECES_IN_FLIGHT_MAX` of
//! `RESYNC_PIECE_BYTES_MAX`). Link events coalesce (one ack per session), so at most a few wait.
//! The sender bounds what is on the wire (`SiteConfig::window_bytes`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use slink::{
    Counters, EntrySource, Item, LinkIdentity, Position, ResyncChunk, ResyncDone, SenderStatus,
    SiteConfig, SlinkSender,
};

use crate::core::dirty::Piece;
use crate::core::{Input, Lsn};
use crate::engine::link_thread::LinkThread;
use crate::engine::queue::MemEntry;
use crate::engine::slink::LinkView;
use crate::engine::tcp::{link_view, to_wire};

use super::{stop_the_process, workers, Shared};

/// Something the link saw, for the core, in the order it happened.
enum LinkEvent {
    Up {
        session: u64,
        peer: Position,
        planned: tokio::sync::oneshot::Sender<()>,
    },
    Ack {
        session: u64,
        pos: Position,
    },
    Down {
        session: u64,
        reason: String,
    },
}

/// What the core asked to send in the current session, in its order.
enum Planned {
    /// Entries in `[next, upto]`; `held` are those of them in memory, in lsn order (taken from
    /// the entry cache at `Ship`, or read back); the others are read back when they come first.
    Entries {
        next: Lsn,
        upto: Lsn,
        held: VecDeque<Arc<MemEntry>>,
    },
    /// A resync piece; `data` once read from slink 0.
    Piece {
        piece: Piece,
        data: Option<Bytes>,
        reading: bool,
    },
    Complete {
        seq: u64,
    },
}

/// Blocking I/O the plan needs, for the site's worker.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Work {
    ReadBack { session: u64, from: Lsn, upto: Lsn },
    ReadPiece { session: u64, piece: Piece },
}

/// One session's plan: what the core gave since that session's `LinkUp`, and what of it is in
/// memory. Pure bookkeeping (no I/O), so the session rule is tested directly.
pub(crate) struct Plan {
    /// The session the core was last told of (`LinkUp`); 0 before the first.
    session: u64,
    /// Between that session's `LinkUp` and its end: the core's commands belong to it.
    live: bool,
    pending: VecDeque<Planned>,
    /// Wire bytes of entry and piece data held in `pending`.
    held_bytes: usize,
    held_bytes_max: usize,
    reading_back: bool,
    /// A read for this session failed: the next pull ends the session.
    failed: Option<String>,
    /// The group stopped: pulls fail, the worker ends.
    closed: bool,
    /// The device a `ResyncDone` names (the core completes a site's resync as a whole).
    done_device: u32,
}

fn entry_bytes(e: &MemEntry) -> usize {
    slink::types::ENTRY_HEADER_WIRE_BYTES + e.data.len()
}

impl Plan {
    pub(crate) fn new(held_bytes_max: usize, done_device: u32) -> Plan {
        Plan {
            session: 0,
            live: false,
            pending: VecDeque::new(),
            held_bytes: 0,
            held_bytes_max,
            reading_back: false,
            failed: None,
            closed: false,
            done_device,
        }
    }

    fn clear(&mut self) {
        self.pending.clear();
        self.held_bytes = 0;
        self.reading_back = false;
        self.failed = None;
    }

    /// `session` begins: the core is about to get its `LinkUp`; an older plan is dropped.
    pub(crate) fn begin(&mut self, session: u64) {
        self.clear();
        self.session = session;
        self.live = true;
    }

    /// `session` ended: its plan is dropped, and whatever the core gives until it hears so.
    pub(crate) fn end(&mut self, session: u64) {
        if self.session == session {
            self.clear();
            self.live = false;
        }
    }

    pub(crate) fn current(&self) -> Option<u64> {
        self.live.then_some(self.session)
    }

    /// `Ship (after, upto]`: entries the cache holds are taken while the held bytes allow.
    pub(crate) fn ship(&mut self, after: Lsn, upto: Lsn, cache: &BTreeMap<Lsn, Arc<MemEntry>>) {
        if !self.live || upto <= after {
            return;
        }
        let mut taken = VecDeque::new();
        for e in cache.range(after + 1..=upto).map(|(_, e)| e) {
            if self.held_bytes >= self.held_bytes_max {
                break;
            }
            self.held_bytes += entry_bytes(e);
            taken.push_back(e.clone());
        }
        // Ships follow one another ((after, upto] then (upto, ...]): one range grows.
        if let Some(Planned::Entries {
            upto: last, held, ..
        }) = self.pending.back_mut()
        {
            if *last == after {
                *last = upto;
                held.extend(taken);
                return;
            }
        }
        self.pending.push_back(Planned::Entries {
            next: after + 1,
            upto,
            held: taken,
        });
    }

    pub(crate) fn piece(&mut self, piece: Piece) {
        if self.live {
            self.pending.push_back(Planned::Piece {
                piece,
                data: None,
                reading: false,
            });
        }
    }

    pub(crate) fn complete(&mut self, seq: u64) {
        if self.live {
            self.pending.push_back(Planned::Complete { seq });
        }
    }

    /// The next read the plan waits for: a piece as soon as it is planned; entries that are
    /// not in memory once they come first.
    pub(crate) fn next_work(&mut self) -> Option<Work> {
        if !self.live || self.closed || self.failed.is_some() {
            return None;
        }
        let session = self.session;
        for p in self.pending.iter_mut() {
            if let Planned::Piece {
                piece,
                data: None,
                reading: reading @ false,
            } = p
            {
                *reading = true;
                return Some(Work::ReadPiece {
                    session,
                    piece: *piece,
                });
            }
        }
        if self.reading_back {
            return None;
        }
        match self.pending.front() {
            Some(Planned::Entries { next, upto, held }) if *next <= *upto => {
                let missing_upto = match held.front() {
                    Some(e) if e.lsn == *next => return None,
                    Some(e) => e.lsn - 1,
                    None => *upto,
                };
                self.reading_back = true;
                Some(Work::ReadBack {
                    session,
                    from: *next,
                    upto: missing_upto,
                })
            }
            _ => None,
        }
    }

    /// Entries of `[from, upto]` read back, in lsn order; those missing at the start were dropped
    /// for the site (a ring overflow) after the core shipped them: the site skips them.
    pub(crate) fn read_back(
        &mut self,
        session: u64,
        from: Lsn,
        upto: Lsn,
        read: Result<Vec<Arc<MemEntry>>, String>,
    ) {
        if session != self.session || !self.live {
            return;
        }
        self.reading_back = false;
        let entries = match read {
            Ok(v) => v,
            Err(e) => {
                self.failed = Some(e);
                return;
            }
        };
        if let Some(Planned::Entries { next, held, .. }) = self.pending.front_mut() {
            if *next != from {
                return;
            }
            *next = entries.first().map_or(upto + 1, |e| e.lsn);
            let below = held.front().map_or(Lsn::MAX, |e| e.lsn);
            for e in entries.into_iter().rev().filter(|e| e.lsn < below) {
                self.held_bytes += entry_bytes(&e);
                held.push_front(e);
            }
        }
    }

    pub(crate) fn piece_read(&mut self, session: u64, seq: u64, read: Result<Vec<u8>, String>) {
        if session != self.session || !self.live {
            return;
        }
        match read {
            Ok(bytes) => {
                let slot = self.pending.iter_mut().find_map(|p| match p {
                    Planned::Piece { piece, data, .. } if piece.seq == seq => Some(data),
                    _ => None,
                });
                if let Some(data) = slot {
                    self.held_bytes += bytes.len();
                    *data = Some(Bytes::from(bytes));
                }
            }
            Err(e) => self.failed = Some(e),
        }
    }

    /// Items for the link, in plan order, about `max_bytes` of them (at least one when one is
    /// ready; none when the first is still being read). An error ends the session.
    pub(crate) fn serve(&mut self, max_bytes: usize) -> Result<Vec<Item>, String> {
        if self.closed {
            return Err("the group stopped".into());
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.is_empty() || bytes < max_bytes {
            let item = match self.pending.front_mut() {
                None => break,
                Some(Planned::Entries { next, upto, held }) => {
                    if *next > *upto {
                        self.pending.pop_front();
                        continue;
                    }
                    while held.front().is_some_and(|e| e.lsn < *next) {
                        if let Some(e) = held.pop_front() {
                            self.held_bytes = self.held_bytes.saturating_sub(entry_bytes(&e));
                        }
                    }
                    match held.front() {
                        Some(e) if e.lsn == *next => {
                            *next += 1;
                            let e = held.pop_front().unwrap_or_else(|| {
                                stop_the_process("a held entry vanished under the plan's lock")
                            });
                            self.held_bytes = self.held_bytes.saturating_sub(entry_bytes(&e));
                            Item::Entry(to_wire(&e))
                        }
                        _ => break,
                    }
                }
                Some(Planned::Piece {
                    piece,
                    data: Some(data),
                    ..
                }) => {
                    let item = Item::ResyncData(ResyncChunk {
                        seq: piece.seq,
                        device: piece.device,
                        offset: piece.offset,
                        data: data.clone(),
                    });
                    self.held_bytes = self.held_bytes.saturating_sub(data.len());
                    self.pending.pop_front();
                    item
                }
                Some(Planned::Piece { data: None, .. }) => break,
                Some(Planned::Complete { seq }) => {
                    let item = Item::ResyncDone(ResyncDone {
                        seq: *seq,
                        device: self.done_device,
                    });
                    self.pending.pop_front();
                    item
                }
            };
            bytes += item.wire_bytes();
            out.push(item);
        }
        Ok(out)
    }
}

/// One tcp site: its plan and events, the worker's wake-up and the link's.
pub(crate) struct TcpSite {
    pub nr: u8,
    state: Mutex<SiteState>,
    /// Wakes the `tcp-N` worker (an event, a read to do, the group stopping).
    work: Condvar,
    /// Wakes the link's pull (items ready, a failure, the group stopping).
    served: tokio::sync::Notify,
}

struct SiteState {
    plan: Plan,
    events: VecDeque<LinkEvent>,
}

impl TcpSite {
    pub fn new(nr: u8, held_bytes_max: usize, done_device: u32) -> TcpSite {
        TcpSite {
            nr,
            state: Mutex::new(SiteState {
                plan: Plan::new(held_bytes_max, done_device),
                events: VecDeque::new(),
            }),
            work: Condvar::new(),
            served: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SiteState> {
        self.state
            .lock()
            .unwrap_or_else(|_| stop_the_process("tcp site lock poisoned"))
    }

    fn changed(&self) {
        self.work.notify_one();
        self.served.notify_one();
    }

    /// The core's `Ship` (called under the core's lock, so `cache` is the driver's entry cache).
    pub fn ship(&self, after: Lsn, upto: Lsn, cache: &BTreeMap<Lsn, Arc<MemEntry>>) {
        self.lock().plan.ship(after, upto, cache);
        self.changed();
    }

    pub fn piece(&self, piece: Piece) {
        self.lock().plan.piece(piece);
        self.changed();
    }

    pub fn complete(&self, seq: u64) {
        self.lock().plan.complete(seq);
        self.changed();
    }

    /// The group stops: the worker ends, pulls fail.
    pub fn close(&self) {
        {
            let mut st = self.lock();
            st.plan.closed = true;
            // A link waiting for its LinkUp hears that the group stopped.
            st.events.clear();
        }
        self.work.notify_all();
        self.served.notify_waiters();
        self.served.notify_one();
    }

    fn event(&self, ev: LinkEvent) {
        let mut st = self.lock();
        if st.plan.closed {
            return;
        }
        if let (LinkEvent::Ack { session, pos }, Some(LinkEvent::Ack { session: s, pos: p })) =
            (&ev, st.events.back_mut())
        {
            if s == session {
                *p = *pos;
                return;
            }
        }
        st.events.push_back(ev);
        drop(st);
        self.work.notify_one();
    }
}

/// What the sender pulls from: the site's plan.
pub(crate) struct TcpSource(pub Arc<TcpSite>);

impl EntrySource for TcpSource {
    async fn next_items(&self, _after: Position, max_bytes: usize) -> Result<Vec<Item>, String> {
        loop {
            // Registered before the plan is looked at: a command that lands in between wakes it.
            let ready = self.0.served.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            {
                let mut st = self.0.lock();
                // Served synchronously (nothing awaited after a pop): cancel safe.
                let items = st.plan.serve(max_bytes)?;
                if !items.is_empty() {
                    drop(st);
                    // Room for the next read back, or the front now waits for one.
                    self.0.work.notify_one();
                    return Ok(items);
                }
            }
            ready.await;
        }
    }

    async fn session_started(&self, session: u64, peer: Position) -> Result<(), String> {
        let (planned, done) = tokio::sync::oneshot::channel();
        self.0.event(LinkEvent::Up {
            session,
            peer,
            planned,
        });
        done.await
            .map_err(|_| "the group stopped before the link came up".to_string())
    }

    fn acked(&self, session: u64, pos: Position) {
        self.0.event(LinkEvent::Ack { session, pos });
    }

    fn session_ended(&self, session: u64, reason: &str) {
        // At once, not on the worker: nothing the core gives from now on is for this session.
        self.0.lock().plan.end(session);
        self.0.event(LinkEvent::Down {
            session,
            reason: reason.to_string(),
        });
    }
}

/// What the worker does next.
enum Job {
    Event(LinkEvent),
    Read(Work),
}

/// The `tcp-N` worker: link events to the core in order, and the plan's reads.
pub(crate) fn worker(s: &Shared, site: &TcpSite) {
    let nr = site.nr;
    loop {
        let job = {
            let mut st = site.lock();
            loop {
                if st.plan.closed {
                    return;
                }
                if let Some(ev) = st.events.pop_front() {
                    break Job::Event(ev);
                }
                if let Some(w) = st.plan.next_work() {
                    break Job::Read(w);
                }
                st = site
                    .work
                    .wait(st)
                    .unwrap_or_else(|_| stop_the_process("tcp site lock poisoned"));
            }
        };
        match job {
            Job::Event(LinkEvent::Up {
                session,
                peer,
                planned,
            }) => {
                // The plan belongs to this session before the core plans anything for it.
                site.lock().plan.begin(session);
                s.input(Input::LinkUp {
                    slink: nr,
                    peer: crate::core::Position {
                        lsn: peer.lsn,
                        resync_seq: peer.resync_seq,
                    },
                });
                // The link waits for this; a link that gave up meanwhile has a Down queued.
                let _ = planned.send(());
            }
            Job::Event(LinkEvent::Ack { session, pos }) => {
                if site.lock().plan.current() == Some(session) {
                    s.input(Input::SiteAck {
                        slink: nr,
                        pos: crate::core::Position {
                            lsn: pos.lsn,
                            resync_seq: pos.resync_seq,
                        },
                    });
                }
            }
            Job::Event(LinkEvent::Down { session, reason }) => {
                site.lock().plan.end(session);
                s.input(Input::LinkDown { slink: nr, reason });
            }
            Job::Read(Work::ReadBack {
                session,
                from,
                upto,
            }) => {
                let read = workers::read_back(s, nr, from, upto);
                site.lock().plan.read_back(session, from, upto, read);
                site.served.notify_one();
            }
            Job::Read(Work::ReadPiece { session, piece }) => {
                let read = workers::read_piece(s, &piece);
                site.lock().plan.piece_read(session, piece.seq, read);
                site.served.notify_one();
            }
        }
    }
}

/// A running link: the sender and the thread its tasks run on.
pub(crate) struct TcpLink {
    pub nr: u8,
    address: String,
    status: tokio::sync::watch::Receiver<SenderStatus>,
    counters: Arc<Counters>,
    sender: Option<SlinkSender>,
    thread: LinkThread,
}

impl TcpLink {
    /// Start the link of slink `site.nr` toward `address` on a thread of its own (`nice` for an
    /// async site's lower priority).
    pub fn start(
        site: &Arc<TcpSite>,
        address: &str,
        cfg: SiteConfig,
        identity: LinkIdentity,
        nice: i32,
    ) -> Result<TcpLink, String> {
        let nr = site.nr;
        let thread = LinkThread::start(&format!("slink{nr}-tcp"), nice)
            .map_err(|e| format!("slink {nr}: link thread: {e}"))?;
        let sender = {
            let _on_link_thread = thread.handle().enter();
            SlinkSender::spawn(
                address.to_string(),
                cfg,
                identity,
                Arc::new(TcpSource(site.clone())),
            )
            .map_err(|e| format!("slink {nr}: {e}"))?
        };
        Ok(TcpLink {
            nr,
            address: address.to_string(),
            status: sender.status(),
            counters: sender.counters_handle(),
            sender: Some(sender),
            thread,
        })
    }

    pub fn view(&self) -> LinkView {
        link_view(
            &self.address,
            &self.status.borrow(),
            &self.counters.snapshot(),
        )
    }

    /// Say goodbye to the site and stop (blocking; never on an async runtime).
    pub fn stop(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.thread.handle().block_on(sender.shutdown());
        }
    }
}

/// Start the `tcp-N` workers.
pub(crate) fn spawn_workers(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    shared
        .tcp
        .values()
        .map(|site| {
            let (s, site) = (shared.clone(), site.clone());
            workers::thread(format!("tcp-{}", site.nr), move || worker(&s, &site))
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use replog::EntryKind;
    use std::time::Instant;

    fn entry(lsn: Lsn) -> Arc<MemEntry> {
        Arc::new(MemEntry {
            lsn,
            device: 0,
            offset: lsn * 4096,
            kind: EntryKind::Write,
            len: 4096,
            data: vec![lsn as u8; 4096],
            appended_at: Instant::now(),
            timestamp_ns: 0,
        })
    }

    fn cache(lsns: std::ops::RangeInclusive<Lsn>) -> BTreeMap<Lsn, Arc<MemEntry>> {
        lsns.map(|l| (l, entry(l))).collect()
    }

    fn lsns(items: &[Item]) -> Vec<Lsn> {
        items
            .iter()
            .map(|i| match i {
                Item::Entry(e) => e.lsn,
                other => panic!("not an entry: {other:?}"),
            })
            .collect()
    }

    fn piece(seq: u64) -> Piece {
        Piece {
            seq,
            device: 0,
            region: 0,
            offset: 0,
            len: 4096,
            last: true,
        }
    }

    #[test]
    fn a_new_session_serves_only_what_the_core_planned_after_its_link_up() {
        let mut p = Plan::new(64 << 20, 0);
        let c = cache(1..=10);
        // Session 1: the core plans 1..=5 and a piece; the session ends before they are served.
        p.begin(1);
        p.ship(0, 5, &c);
        p.piece(piece(7));
        assert_eq!(lsns(&p.serve(1).unwrap()), vec![1]);
        p.end(1);
        // The core has not heard of the end yet: what it plans meanwhile is dropped.
        p.ship(5, 8, &c);
        p.piece(piece(8));
        p.complete(9);
        assert!(p.serve(1 << 20).unwrap().is_empty());
        assert_eq!(p.next_work(), None, "nothing is read for an ended session");
        // Session 2: the site reports lsn 3; the core plans from there.
        p.begin(2);
        assert!(
            p.serve(1 << 20).unwrap().is_empty(),
            "nothing before the core plans for the new session"
        );
        p.ship(3, 6, &c);
        assert_eq!(lsns(&p.serve(1 << 20).unwrap()), vec![4, 5, 6]);
        assert!(p.serve(1 << 20).unwrap().is_empty());
    }

    #[test]
    fn a_read_of_an_ended_session_never_lands_in_the_next() {
        let mut p = Plan::new(64 << 20, 0);
        p.begin(1);
        p.ship(0, 3, &BTreeMap::new());
        p.piece(piece(1));
        let w1 = p.next_work().unwrap();
        assert_eq!(
            w1,
            Work::ReadPiece {
                session: 1,
                piece: piece(1)
            },
            "pieces are read as soon as they are planned"
        );
        assert_eq!(
            p.next_work(),
            Some(Work::ReadBack {
                session: 1,
                from: 1,
                upto: 3
            })
        );
        p.end(1);
        p.begin(2);
        p.ship(0, 2, &BTreeMap::new());
        // Session 1's reads come back late (one of them failed): both are ignored.
        p.read_back(1, 1, 3, Ok(vec![entry(1), entry(2), entry(3)]));
        p.piece_read(1, 1, Err("device gone".into()));
        assert!(p.serve(1 << 20).unwrap().is_empty());
        assert_eq!(
            p.next_work(),
            Some(Work::ReadBack {
                session: 2,
                from: 1,
                upto: 2
            })
        );
        p.read_back(2, 1, 2, Ok(vec![entry(1), entry(2)]));
        assert_eq!(lsns(&p.serve(1 << 20).unwrap()), vec![1, 2]);
    }

    #[test]
    fn a_failed_read_ends_the_session_at_the_next_pull() {
        let mut p = Plan::new(64 << 20, 0);
        p.begin(1);
        p.piece(piece(1));
        let Some(Work::ReadPiece { session, piece }) = p.next_work() else {
            panic!("a piece read")
        };
        p.piece_read(session, piece.seq, Err("EIO".into()));
        assert_eq!(p.serve(1 << 20).unwrap_err(), "EIO");
    }

    #[test]
    fn entries_past_the_byte_limit_are_read_back_when_they_come_first() {
        // Room for two entries' data: the rest of the range stays an lsn range.
        let mut p = Plan::new(2 * (4096 + 37), 0);
        p.begin(1);
        let c = cache(1..=6);
        p.ship(0, 6, &c);
        assert_eq!(p.next_work(), None, "the first entries are in memory");
        assert_eq!(lsns(&p.serve(1 << 20).unwrap()), vec![1, 2]);
        assert_eq!(
            p.next_work(),
            Some(Work::ReadBack {
                session: 1,
                from: 3,
                upto: 6
            })
        );
        p.read_back(1, 3, 6, Ok((3..=6).map(entry).collect()));
        assert_eq!(lsns(&p.serve(1 << 20).unwrap()), vec![3, 4, 5, 6]);
    }

    #[test]
    fn entries_dropped_for_the_site_after_they_were_planned_are_skipped() {
        let mut p = Plan::new(64 << 20, 0);
        p.begin(1);
        let c = cache(9..=9);
        p.ship(0, 9, &c);
        assert_eq!(
            p.next_work(),
            Some(Work::ReadBack {
                session: 1,
                from: 1,
                upto: 8
            })
        );
        // A ring overflow dropped 1..=5 for the site and reclaimed them: the read starts at 6.
        p.read_back(1, 1, 8, Ok((6..=8).map(entry).collect()));
        assert_eq!(lsns(&p.serve(1 << 20).unwrap()), vec![6, 7, 8, 9]);
        // A drop that covers a whole range read back: nothing of it, the plan goes on.
        p.ship(9, 12, &BTreeMap::new());
        p.complete(3);
        let Some(Work::ReadBack { from, upto, .. }) = p.next_work() else {
            panic!("a read back")
        };
        p.read_back(1, from, upto, Ok(Vec::new()));
        let items = p.serve(1 << 20).unwrap();
        assert!(
            matches!(items.as_slice(), [Item::ResyncDone(d)] if d.seq == 3),
            "{items:?}"
        );
    }

    #[test]
    fn pieces_and_the_completion_marker_keep_their_place_after_entries() {
        let mut p = Plan::new(64 << 20, 3);
        p.begin(1);
        let c = cache(1..=2);
        p.ship(0, 1, &c);
        p.piece(piece(5));
        p.ship(1, 2, &c);
        p.complete(6);
        let Some(Work::ReadPiece { session, piece }) = p.next_work() else {
            panic!("a piece read")
        };
        p.piece_read(session, piece.seq, Ok(vec![9; 4096]));
        let items = p.serve(1 << 30).unwrap();
        let order: Vec<String> = items
            .iter()
            .map(|i| match i {
                Item::Entry(e) => format!("e{}", e.lsn),
                Item::ResyncData(c) => format!("p{}", c.seq),
                Item::ResyncDone(d) => format!("done{}@{}", d.seq, d.device),
            })
            .collect();
        assert_eq!(order, vec!["e1", "p5", "e2", "done6@3"]);
    }
}
