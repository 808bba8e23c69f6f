//! The secondary role's transport-facing part: what a slink listener's `SiteSink` calls
//! ([`GroupDriver::durable_position`] when it admits a primary, [`GroupDriver::store`] with each
//! batch), the bytes of received items until the core takes them, and the worker that writes
//! resync pieces and the consistency flag.
//!
//! The core decides everything (which entry is appended when, when a piece may be written, when
//! the devices stop being a prefix of the primary's history); this module only keeps the data the
//! core does not hold and answers the listener once the core's `AckPrimary` covers a batch.
//!
//! # Bounds
//! - One `store` call at a time, of at most [`STORE_CALL_BYTES_MAX`] (the listener merges queued
//!   frames up to `slink::receiver::STORE_BATCH_BYTES_MAX`, plus the frame that crossed it).
//!   `store` returns only once every item of the call is durable, and the listener calls it
//!   again only after that, so the bytes held here never exceed one call. The listener's window
//!   (`SiteConfig::window_bytes`) bounds what waits behind it.
//! - An appended entry's bytes move to the driver's entry cache (bounded by
//!   `DriverConfig::entry_cache_bytes` once applied; a secondary applies only durable entries,
//!   so what is not applied yet is again at most one call).
//!
//! # Persisted state
//! The consistency flag is the replog's `FEATURE_RESYNC_INCOMPLETE` bit (metadata, written
//! durably, devices synced first). The position a new session hears is the core's acked
//! position, or what open made durable (the replog is flushed before the core starts), whichever
//! is higher; resync sequence numbers are the core's (not persisted on a secondary: a primary
//! never reuses one, so pieces after a restart are never mistaken for resent ones).
//!
//! # Today's primary
//! The engine's primary (`engine::tcp`) ships entries and resync pieces but sends no
//! resync-complete marker (`ResyncDone`): behind it this site turns inconsistent at its first
//! piece and stays so (the devices are byte-equal once it caught up, but the flag cannot know).
//! The core's primary ends every repair with a marker.

use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;

use replog::EntryKind;

use crate::core::{Extent, Input, Lsn, Position, Received};
use crate::engine::slink::apply_entry;
use crate::engine::tcp::kind_from_wire;

use super::{stop_the_process, GroupDriver, Shared, State};

/// Bytes (on the wire) one `store` call may carry: the listener's batch limit plus one frame.
pub const STORE_CALL_BYTES_MAX: usize =
    slink::receiver::STORE_BATCH_BYTES_MAX + slink::frame::MAX_FRAME_PAYLOAD_BYTES;

/// Work for the secondary's storage worker, in the order the core asked for it.
pub(crate) enum SecondaryWork {
    /// Write a resync piece to slink 0's device and make it durable.
    StorePiece {
        seq: u64,
        extent: Extent,
        data: Vec<u8>,
    },
    /// Sync slink 0's devices, then persist the consistency flag in the replog.
    PersistConsistency { consistent: bool },
}

/// A received entry's bytes until the core appends it.
struct HeldEntry {
    kind: EntryKind,
    data: Vec<u8>,
    timestamp_ns: u64,
}

/// A `store` call waiting for the core's acknowledgement.
struct WaitingStore {
    /// Every item of the call is durable once the acked position reaches this.
    covers: Position,
    reply: tokio::sync::oneshot::Sender<Result<slink::Position, String>>,
}

/// The secondary role's part of the driver state (behind the core's lock).
#[derive(Default)]
pub(crate) struct Inbound {
    entries: BTreeMap<Lsn, HeldEntry>,
    pieces: BTreeMap<u64, Vec<u8>>,
    waiting: Option<WaitingStore>,
    /// Durable when the core started (open flushed the replog first).
    at_open: Position,
    /// The core reset the link: stores fail until the next session.
    reset: Option<String>,
    /// The core halted or stopped: every store fails.
    ended: Option<String>,
}

impl Inbound {
    pub fn new(at_open: Position) -> Inbound {
        Inbound {
            at_open,
            ..Default::default()
        }
    }

    /// A store waits until the acked position covers `covers`.
    pub fn wait(
        &mut self,
        covers: Position,
    ) -> tokio::sync::oneshot::Receiver<Result<slink::Position, String>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.fail_waiting("a newer store replaced this one");
        self.waiting = Some(WaitingStore { covers, reply });
        rx
    }

    /// The entry's bytes for its append (the core appends only what it was handed).
    pub fn take_entry(&mut self, lsn: Lsn) -> Option<(EntryKind, Vec<u8>, u64)> {
        self.entries
            .remove(&lsn)
            .map(|e| (e.kind, e.data, e.timestamp_ns))
    }

    /// The ring refused the append: the core tries the entry again later.
    pub fn put_back(&mut self, lsn: Lsn, kind: EntryKind, data: Vec<u8>, timestamp_ns: u64) {
        self.entries.insert(
            lsn,
            HeldEntry {
                kind,
                data,
                timestamp_ns,
            },
        );
    }

    fn take_piece(&mut self, seq: u64) -> Option<Vec<u8>> {
        self.pieces.remove(&seq)
    }

    /// `AckPrimary`: answer the waiting store once its items are durable.
    pub fn acked(&mut self, pos: Position) {
        let pos = higher(pos, self.at_open);
        if self.waiting.as_ref().is_some_and(|w| covers(pos, w.covers)) {
            if let Some(w) = self.waiting.take() {
                // Items of the call the core skipped (resent ones) left no append to take
                // their bytes: nothing of the call is needed any more.
                self.entries = self.entries.split_off(&w.covers.lsn.saturating_add(1));
                self.pieces = self
                    .pieces
                    .split_off(&w.covers.resync_seq.saturating_add(1));
                // A listener that went away no longer waits: nothing to tell it.
                let _ = w.reply.send(Ok(wire(pos)));
            }
        }
    }

    /// `ResetLink`: the waiting store fails; so does every store until the next session.
    pub fn reset(&mut self, reason: String) {
        self.fail_waiting(&reason);
        self.reset = Some(reason);
    }

    /// `Halt` or `Stopped`: this driver stores nothing more (the group is opened again).
    pub fn end(&mut self, reason: String) {
        self.fail_waiting(&reason);
        self.ended = Some(reason);
    }

    fn fail_waiting(&mut self, reason: &str) {
        if let Some(w) = self.waiting.take() {
            let _ = w.reply.send(Err(reason.to_string()));
        }
    }
}

fn covers(pos: Position, want: Position) -> bool {
    pos.lsn >= want.lsn && pos.resync_seq >= want.resync_seq
}

fn higher(a: Position, b: Position) -> Position {
    Position {
        lsn: a.lsn.max(b.lsn),
        resync_seq: a.resync_seq.max(b.resync_seq),
    }
}

fn wire(p: Position) -> slink::Position {
    slink::Position {
        lsn: p.lsn,
        resync_seq: p.resync_seq,
    }
}

impl GroupDriver {
    /// For a listener's `admit`: a new session with the primary begins. What older sessions
    /// handed in and the core has not taken is dropped (a store still waiting fails), and the
    /// position returned is durable here: the primary sends everything after it again.
    pub fn durable_position(&self) -> slink::Position {
        let mut st = self.shared.lock();
        let inbound = &mut st.inbound;
        inbound.fail_waiting("a new session with the primary began");
        inbound.entries.clear();
        inbound.pieces.clear();
        inbound.reset = None;
        self.shared.run(&mut st, Input::SessionStarted);
        wire(higher(st.core.secondary_position(), st.inbound.at_open))
    }

    /// For a listener's `store`: hand `items` (in stream order, after the last position) to the
    /// core; resolves with the durable position once every item is durable here (entries in the
    /// replog, pieces on the devices). Fails when the core resets the link or halts; the
    /// listener then ends the session.
    pub async fn store(&self, items: Vec<slink::Item>) -> Result<slink::Position, String> {
        let rx = self.shared.receive(items)?;
        rx.await
            .unwrap_or_else(|_| Err("the group stopped".to_string()))
    }
}

impl Shared {
    fn receive(
        &self,
        items: Vec<slink::Item>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<slink::Position, String>>, String> {
        let bytes: usize = items.iter().map(|i| i.wire_bytes()).sum();
        if bytes > STORE_CALL_BYTES_MAX {
            return Err(format!(
                "a store of {bytes} bytes (at most {STORE_CALL_BYTES_MAX} per call)"
            ));
        }
        let mut st = self.lock();
        if let Some(why) = st.inbound.ended.as_ref().or(st.inbound.reset.as_ref()) {
            return Err(why.clone());
        }
        if st.inbound.waiting.is_some() {
            return Err("a store is already in flight for this group".into());
        }
        // Every item is checked before any is kept: a refused call leaves nothing behind.
        let received = items
            .iter()
            .map(|i| self.check_item(i))
            .collect::<Result<Vec<Received>, String>>()?;
        let taken = st.core.last_lsn();
        let mut covers = Position::default();
        for item in items {
            match item {
                slink::Item::Entry(e) => {
                    covers.lsn = covers.lsn.max(e.lsn);
                    // A resent entry the core has: it skips it, nothing to keep.
                    if e.lsn > taken {
                        st.inbound.entries.insert(
                            e.lsn,
                            HeldEntry {
                                kind: kind_from_wire(e.kind),
                                data: e.data.to_vec(),
                                timestamp_ns: e.timestamp_ns,
                            },
                        );
                    }
                }
                slink::Item::ResyncData(c) => {
                    covers.resync_seq = covers.resync_seq.max(c.seq);
                    st.inbound.pieces.insert(c.seq, c.data.to_vec());
                }
                slink::Item::ResyncDone(d) => covers.resync_seq = covers.resync_seq.max(d.seq),
            }
        }
        let rx = st.inbound.wait(covers);
        self.run(&mut st, Input::Received { items: received });
        // Everything already durable (resent items only): answered at once.
        let pos = st.core.secondary_position();
        st.inbound.acked(pos);
        Ok(rx)
    }

    /// What the core sees of an item, once it is known to fit this site's devices (bad input
    /// from a peer ends its session, never the process).
    fn check_item(&self, item: &slink::Item) -> Result<Received, String> {
        let fits = |device: u32, offset: u64, len: u64| -> Result<Extent, String> {
            let size = self
                .slink0
                .get(&device)
                .map(|f| f.size())
                .ok_or_else(|| format!("no device {device} here"))?;
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(format!(
                    "{len} bytes at {offset} are outside device {device} ({size} bytes)"
                ));
            }
            Ok(Extent {
                device,
                offset,
                len,
            })
        };
        Ok(match item {
            slink::Item::Entry(e) => {
                if e.kind == slink::EntryKind::Write && e.data.len() as u64 != e.len {
                    return Err(format!(
                        "entry {} writes {} bytes with {} bytes of data",
                        e.lsn,
                        e.len,
                        e.data.len()
                    ));
                }
                Received::Entry {
                    lsn: e.lsn,
                    extent: fits(e.device, e.offset, e.len)?,
                }
            }
            slink::Item::ResyncData(c) => Received::Piece {
                seq: c.seq,
                extent: fits(c.device, c.offset, c.data.len() as u64)?,
            },
            slink::Item::ResyncDone(d) => Received::Done { seq: d.seq },
        })
    }

    /// `StorePiece`: the piece's bytes go to the storage worker.
    pub(super) fn store_piece(&self, st: &mut State, seq: u64, extent: Extent) {
        let Some(data) = st.inbound.take_piece(seq) else {
            stop_the_process(&format!(
                "group {}: the core stores resync piece {seq} that nobody handed in",
                self.name
            ));
        };
        self.queues
            .secondary(SecondaryWork::StorePiece { seq, extent, data });
    }
}

/// The secondary's storage worker: resync pieces and the consistency flag, in the core's order
/// (the flag that says "inconsistent" is durable before the first piece is written).
pub(crate) fn storage_worker(s: &Shared, rx: Receiver<SecondaryWork>) {
    while let Ok(w) = rx.recv() {
        match w {
            SecondaryWork::StorePiece { seq, extent, data } => {
                let result = write_piece(s, extent, &data);
                s.input(Input::PieceStored { seq, result });
            }
            SecondaryWork::PersistConsistency { consistent } => {
                // The flag says the devices are (or are not) a prefix: they must hold what it
                // describes first. A failed sync is a failed device (fail-stop).
                if let Err(reason) = sync_devices(s) {
                    s.input(Input::SiteFailed {
                        slink: 0,
                        reason: format!("device sync before the consistency flag: {reason}"),
                    });
                    continue;
                }
                match persist_consistency(s, consistent) {
                    Ok(()) => s.input(Input::ConsistencyPersisted { consistent }),
                    // The replog refuses every write after a failed metadata write.
                    Err(reason) => s.input(Input::LogFailed { reason }),
                }
            }
        }
    }
}

fn write_piece(s: &Shared, extent: Extent, data: &[u8]) -> Result<(), String> {
    let Some(f) = s.slink0.get(&extent.device) else {
        return Err(format!("no device {}", extent.device));
    };
    apply_entry(f, EntryKind::Write, extent.offset, extent.len, data)
        .and_then(|()| f.sync_data())
        .map_err(|e| {
            format!(
                "resync piece at {} of device {}: {e}",
                extent.offset, extent.device
            )
        })
}

fn sync_devices(s: &Shared) -> Result<(), String> {
    for (nr, f) in &s.slink0 {
        f.sync_data()
            .map_err(|e| format!("sync of device {nr}: {e}"))?;
    }
    Ok(())
}

fn persist_consistency(s: &Shared, consistent: bool) -> Result<(), String> {
    let features = s.replog.features();
    let bits = if consistent {
        features & !replog::format::FEATURE_RESYNC_INCOMPLETE
    } else {
        features | replog::format::FEATURE_RESYNC_INCOMPLETE
    };
    if bits == features {
        return Ok(());
    }
    s.replog
        .set_features(bits)
        .map_err(|e| format!("consistency flag ({consistent}): {e}"))
}

/// What the replog says of the devices at open: false while a resync is incomplete.
pub(crate) fn consistent_at_open(replog: &replog::Replog) -> bool {
    replog.features() & replog::format::FEATURE_RESYNC_INCOMPLETE == 0
}
