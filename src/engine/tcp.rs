//! The `tcp` slink on the primary: feeds a [`slink::SlinkSender`] with the group's entries in lsn
//! order and with resync chunks of dirty regions, and turns the sender's acknowledgements into
//! the slink's applied lsn (the site has it durably), cleared dirty regions and events.
//!
//! Ordering rule for resync (the same as for local slinks): a region is read from the primary's
//! devices only once they have applied every entry already handed to the link; entries handed
//! after the chunk are applied after it at the remote site, so a write that lands in a region
//! while it is copied is not lost.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use replog::Lsn;
use slink::{
    DeviceInfo, EntrySource, Item, LinkIdentity, LinkState, Position, ResyncChunk, SiteConfig,
    SiteId, SlinkSender,
};

use super::group::Group;
use super::link_thread::{LinkThread, ASYNC_LINK_NICE};
use super::policy::{caught_up, outdated_after, DownWait, Mode, PolicyKind};
use super::queue::MemEntry;
use super::slink::{Slink, SlinkState};
use crate::core::RESYNC_SEQ_RESERVE;

/// How long `next_items` waits for new entries before it looks at dirty regions (or a resume
/// after a pause) again.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// The daemon's identity and keys for its links (from `replicator daemon` flags).
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// This site's id and key; `allow` is used when it receives.
    pub site: SiteConfig,
    /// Which site id answers at an address the tables name (`--peer SITE@HOST:PORT`).
    pub peers: HashMap<String, SiteId>,
}

/// An entry's data as the link's `Bytes`, without copying: the bytes stay owned by the entry.
struct SharedData(Arc<MemEntry>);

impl AsRef<[u8]> for SharedData {
    fn as_ref(&self) -> &[u8] {
        &self.0.data
    }
}

pub(crate) fn to_wire(e: &Arc<MemEntry>) -> slink::Entry {
    slink::Entry {
        lsn: e.lsn,
        device: e.device,
        offset: e.offset,
        kind: kind_to_wire(e.kind),
        len: e.len,
        timestamp_ns: e.timestamp_ns,
        data: Bytes::from_owner(SharedData(e.clone())),
    }
}

pub fn kind_to_wire(k: replog::EntryKind) -> slink::EntryKind {
    match k {
        replog::EntryKind::Write => slink::EntryKind::Write,
        replog::EntryKind::Zeroes => slink::EntryKind::Zeroes,
        replog::EntryKind::Discard => slink::EntryKind::Discard,
    }
}

pub fn kind_from_wire(k: slink::EntryKind) -> replog::EntryKind {
    match k {
        slink::EntryKind::Write => replog::EntryKind::Write,
        slink::EntryKind::Zeroes => replog::EntryKind::Zeroes,
        slink::EntryKind::Discard => replog::EntryKind::Discard,
    }
}

/// Resync data travels in pieces of at most this size (a region may be larger than a frame).
const RESYNC_CHUNK_BYTES: u64 = 1 << 20;

/// The part of a dirty region still to send.
#[derive(Clone, Copy, Debug)]
struct Piece {
    device: u32,
    region: u64,
    next: u64,
    end: u64,
}

#[derive(Default)]
struct SourceState {
    /// The region being sent piece by piece.
    piece: Option<Piece>,
    /// Entries taken from the feed and not yet handed to the link.
    stash: VecDeque<Arc<MemEntry>>,
    /// The last position handed to the link; a lower `after` means the link resends.
    handed: Position,
    /// The last resync seq handed out (or the floor to go above).
    next_seq: u64,
    /// Every seq up to here is durably reserved in the replog (`raise_resync_seq`); a seq above
    /// it is handed out only after the next block is reserved, so a restarted primary, starting
    /// above the persisted mark, never repeats one a site may have stored.
    seq_reserved: u64,
}

/// Where the sender's items come from.
pub struct TcpSource {
    group: Weak<Group>,
    slink: Arc<Slink>,
    state: tokio::sync::Mutex<SourceState>,
}

impl TcpSource {
    /// `seq_mark`: the slink's persisted resync seq mark; every seq at or below it may have been
    /// used by an earlier run, so numbering starts above it.
    pub fn new(group: Weak<Group>, slink: Arc<Slink>, seq_mark: u64) -> Self {
        TcpSource {
            group,
            slink,
            state: tokio::sync::Mutex::new(SourceState {
                next_seq: seq_mark,
                seq_reserved: seq_mark,
                ..SourceState::default()
            }),
        }
    }

    /// The next resync seq, reserving a block of [`RESYNC_SEQ_RESERVE`] durably first when it
    /// would go above the reserved mark (as the core's `resync` does with `PersistResyncSeq`).
    async fn take_seq(&self, g: &Arc<Group>, st: &mut SourceState) -> Result<u64, String> {
        let seq = st.next_seq + 1;
        if seq > st.seq_reserved {
            let g2 = g.clone();
            let nr = self.slink.nr;
            let mark = tokio::task::spawn_blocking(move || {
                g2.replog.raise_resync_seq(nr, seq + RESYNC_SEQ_RESERVE)
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reserving resync seqs above {seq}: {e}"))?;
            st.seq_reserved = mark;
        }
        st.next_seq = seq;
        Ok(seq)
    }

    /// Entries `next..=written` (`written`: the shipping horizon, durable in the replog).
    async fn entries(
        &self,
        g: &Arc<Group>,
        st: &mut SourceState,
        mut next: Lsn,
        written: Lsn,
        max_bytes: usize,
    ) -> Result<Vec<Item>, String> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while next <= written && (bytes < max_bytes || out.is_empty()) {
            while st.stash.front().is_some_and(|e| e.lsn < next) {
                st.stash.pop_front();
            }
            if st.stash.is_empty() {
                st.stash
                    .extend(self.slink.feed.pop_batch(256, Duration::ZERO));
                while st.stash.front().is_some_and(|e| e.lsn < next) {
                    st.stash.pop_front();
                }
            }
            match st.stash.front() {
                Some(e) if e.lsn == next && e.lsn <= written => {
                    let item = Item::Entry(to_wire(e));
                    bytes += item.wire_bytes();
                    out.push(item);
                    st.stash.pop_front();
                    next += 1;
                }
                _ => {
                    // Not in memory (the feed dropped it, or the link resends): read the replog.
                    let g2 = g.clone();
                    let from = next;
                    let budget = (max_bytes.saturating_sub(bytes)).max(1) as u64;
                    let read = tokio::task::spawn_blocking(move || {
                        g2.replog.read_from(
                            from,
                            super::slink::REPLAY_BATCH_ENTRIES_MAX,
                            budget.min(super::slink::REPLAY_BATCH_BYTES_MAX),
                        )
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                    if read.is_empty() {
                        break;
                    }
                    for e in read {
                        if e.lsn < next || e.lsn > written {
                            continue;
                        }
                        let item = Item::Entry(slink::Entry {
                            lsn: e.lsn,
                            device: e.device,
                            offset: e.offset,
                            kind: kind_to_wire(e.kind),
                            len: e.len,
                            timestamp_ns: e.timestamp_ns,
                            data: Bytes::from(e.data),
                        });
                        bytes += item.wire_bytes();
                        out.push(item);
                        next = e.lsn + 1;
                    }
                }
            }
        }
        Ok(out)
    }

    /// The next piece of a dirty region, if any region is dirty and not already on its way.
    async fn resync_chunk(
        &self,
        g: &Arc<Group>,
        st: &mut SourceState,
        handed_lsn: Lsn,
    ) -> Result<Option<Item>, String> {
        let Some(primary) = g.primary_slink().cloned() else {
            return Ok(None);
        };
        if primary.applied() < handed_lsn {
            return Ok(None);
        }
        if st.piece.is_none() {
            st.piece = self.next_dirty_region();
        }
        let Some(piece) = st.piece else {
            return Ok(None);
        };
        let Some(src) = primary.device(piece.device) else {
            st.piece = None;
            return Ok(None);
        };
        let offset = piece.next;
        let len = RESYNC_CHUNK_BYTES.min(piece.end.saturating_sub(offset)) as usize;
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            src.file()
                .and_then(|f| f.read_at(offset, &mut buf))
                .map(|_| buf)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("resync read of device {} at {offset}: {e}", piece.device))?;
        let last = offset + len as u64 >= piece.end;
        let seq = self.take_seq(g, st).await?;
        if let Ok(mut m) = self.slink.resync_in_flight.lock() {
            m.insert(seq, (piece.device, piece.region, last));
        }
        st.piece = if last {
            None
        } else {
            Some(Piece {
                next: offset + len as u64,
                ..piece
            })
        };
        Ok(Some(Item::ResyncData(ResyncChunk {
            seq,
            device: piece.device,
            offset,
            data: Bytes::from(data),
        })))
    }

    /// A dirty region none of whose pieces is on its way.
    fn next_dirty_region(&self) -> Option<Piece> {
        let in_flight: Vec<(u32, u64)> = self
            .slink
            .resync_in_flight
            .lock()
            .map(|m| m.values().map(|(d, r, _)| (*d, *r)).collect())
            .unwrap_or_default();
        for dev in self.slink.all_devices() {
            let Some(dirty) = &dev.dirty else { continue };
            let Ok(d) = dirty.lock() else { continue };
            let region_size = d.region_size();
            let found = d
                .dirty_regions()
                .find(|r| !in_flight.contains(&(dev.dev_nr, *r)));
            drop(d);
            if let Some(region) = found {
                let start = region * region_size;
                return Some(Piece {
                    device: dev.dev_nr,
                    region,
                    next: start,
                    end: (start + region_size).min(dev.size),
                });
            }
        }
        None
    }
}

impl EntrySource for TcpSource {
    async fn next_items(&self, after: Position, max_bytes: usize) -> Result<Vec<Item>, String> {
        loop {
            let Some(g) = self.group.upgrade() else {
                return Err("group removed".into());
            };
            if self.slink.paused() {
                // Operator pause: nothing is shipped (entries stay in the ring, or their regions
                // go dirty if it overflows); the link stays up with keepalives. Resume is seen
                // within one poll.
                drop(g);
                tokio::time::sleep(IDLE_POLL).await;
                continue;
            }
            let mut st = self.state.lock().await;
            if after.lsn < st.handed.lsn || after.resync_seq < st.handed.resync_seq {
                // The link resends after a reconnect: chunks it never got acknowledged go back to
                // being plain dirty regions, sent again.
                if let Ok(mut m) = self.slink.resync_in_flight.lock() {
                    m.retain(|seq, _| *seq <= after.resync_seq);
                }
                st.piece = None;
            }
            // Resync seqs only grow at the site: after a restart of this primary (its seq back
            // at 0) `after` carries the highest seq the site has stored (from the handshake), and
            // new chunks go above it. A seq at or below it would be refused by the receiver, and
            // its acks would name seqs this process never sent.
            st.next_seq = st.next_seq.max(after.resync_seq);
            let mut next = after.lsn + 1;
            let skip = self.slink.skip_to.load(Ordering::Acquire);
            if next <= skip {
                next = skip + 1;
            }
            // Registered before the horizon is read: a flush that lands in between still wakes us.
            let notified = g.written_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // R1: only entries durable in this replog go out. Shipped once merely written, a
            // site could hold lsns a power loss takes from the primary, which would then hand
            // them out again for other writes.
            let written = g.shippable_lsn();
            if written >= next {
                let items = self.entries(&g, &mut st, next, written, max_bytes).await?;
                if let Some(Item::Entry(last)) = items.last() {
                    st.handed = Position {
                        lsn: last.lsn,
                        resync_seq: after.resync_seq,
                    };
                    return Ok(items);
                }
            }
            if let Some(chunk) = self.resync_chunk(&g, &mut st, next - 1).await? {
                if let Item::ResyncData(c) = &chunk {
                    st.handed = Position {
                        lsn: next - 1,
                        resync_seq: c.seq,
                    };
                }
                return Ok(vec![chunk]);
            }
            drop(st);
            let _ = tokio::time::timeout(IDLE_POLL, notified).await;
        }
    }
}

/// A running tcp link: its sender and the thread its tasks run on. Dropping it stops both (the
/// sender first, so the link says goodbye before its runtime goes).
pub struct TcpLink {
    _sender: SlinkSender,
    _thread: LinkThread,
}

/// Start the link of a `tcp` slink and the task that follows its acknowledgements, both on a
/// thread of the link's own (`engine::link_thread`).
pub fn spawn_link(
    group: &Arc<Group>,
    slink: &Arc<Slink>,
    addr: &str,
    settings: &LinkSettings,
) -> Result<TcpLink, String> {
    let receiver_site = settings.peers.get(addr).cloned().ok_or_else(|| {
        format!(
            "slink {}: no site id for {addr}; start the daemon with --peer SITE@{addr}",
            slink.nr
        )
    })?;
    let devices: Vec<DeviceInfo> = slink
        .all_devices()
        .iter()
        .map(|d| DeviceInfo {
            device: d.dev_nr,
            size_bytes: d.size,
        })
        .collect();
    // A primary always has a current epoch (`group::settle_role` begins epoch 1).
    let epoch = group
        .replog
        .current_epoch()
        .map(|e| e.epoch)
        .ok_or_else(|| {
            format!(
                "slink {}: the replog {} has no epoch; only a primary ships",
                slink.nr,
                group.replog_path.display()
            )
        })?;
    let identity = LinkIdentity {
        receiver_site,
        group_uuid: group.replog.uuid(),
        epoch,
        devices,
        // What this sender uses: it ships resync pieces (ResyncData) of dirty regions.
        features: slink::handshake::FEATURE_RESYNC,
    };
    let seq_mark = group
        .replog
        .resync_seq(slink.nr)
        .map_err(|e| format!("slink {}: resync seq mark: {e}", slink.nr))?;
    let source = Arc::new(TcpSource::new(
        Arc::downgrade(group),
        slink.clone(),
        seq_mark,
    ));
    let nice = if slink.policy == PolicyKind::Async {
        ASYNC_LINK_NICE
    } else {
        0
    };
    let thread = LinkThread::start(&format!("slink{}-tcp", slink.nr), nice)
        .map_err(|e| format!("slink {}: link thread: {e}", slink.nr))?;
    // Everything below that spawns (the sender's tasks, the watcher) lands on the link thread.
    let link_runtime = thread.handle().clone();
    let _on_link_thread = link_runtime.enter();
    let sender = SlinkSender::spawn(addr.to_string(), settings.site.clone(), identity, source)
        .map_err(|e| format!("slink {}: {e}", slink.nr))?;
    let mut status = sender.status();
    let counters = sender.counters_handle();
    let weak = Arc::downgrade(group);
    let sl = slink.clone();
    let addr = addr.to_string();
    let down_wait = slink
        .down_wait
        .unwrap_or(DownWait::For(settings.site.dead_peer_timeout));
    tokio::spawn(async move {
        let mut last_state = None;
        // Since when the link is down while the site is in sync mode (writes wait for it).
        let mut down_in_sync_since: Option<Instant> = None;
        loop {
            let st = status.borrow_and_update().clone();
            let Some(g) = weak.upgrade() else { return };
            let c = counters.snapshot();
            if let Ok(mut v) = sl.link.lock() {
                *v = Some(link_view(&addr, &st, &c));
            }
            sl.publish_applied(st.acked.lsn);
            clear_acked_regions(&g, &sl, st.acked.resync_seq).await;
            if st.state == LinkState::Stopped {
                return;
            }
            let link_up = st.state == LinkState::Up;
            if last_state != Some(st.state) {
                last_state = Some(st.state);
                let input = if link_up {
                    LinkInput::LinkUp
                } else {
                    LinkInput::LinkDown
                };
                transition(&g, &sl, input, &addr, st.last_error.as_deref());
            }
            down_in_sync_since = match down_in_sync_since {
                _ if link_up || sl.mode() != Mode::Sync => None,
                None => Some(Instant::now()),
                since => since,
            };
            if let Some(since) = down_in_sync_since {
                if outdated_after(down_wait, since.elapsed()) {
                    transition(&g, &sl, LinkInput::DownWaitOver, &addr, None);
                }
            }
            if sl.state() == SlinkState::Outdated
                && caught_up(link_up, &g.lag(&sl), sl.dirty_bytes())
            {
                transition(&g, &sl, LinkInput::CaughtUp, &addr, None);
            }
            // While the link is down or the site out of date, time passes without status
            // changes: look again every OUTDATED_POLL.
            let poll = !link_up || sl.state() == SlinkState::Outdated;
            drop(g);
            tokio::select! {
                changed = status.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(OUTDATED_POLL), if poll => {}
            }
        }
    });
    Ok(TcpLink {
        _sender: sender,
        _thread: thread,
    })
}

/// A link as status shows it, from its sender's status and counters.
pub(crate) fn link_view(
    address: &str,
    st: &slink::SenderStatus,
    c: &slink::CountersSnapshot,
) -> super::slink::LinkView {
    super::slink::LinkView {
        address: address.to_string(),
        state: format!("{:?}", st.state).to_lowercase(),
        last_error: st.last_error.clone(),
        sessions: st.sessions,
        reconnects: c.reconnects,
        crc_errors: c.crc_errors,
        bad_frames: c.bad_frames,
        auth_failures: c.auth_failures,
        refusals: c.refusals,
        keepalive_timeouts: c.keepalive_timeouts,
        bytes_sent: c.bytes_sent,
        in_flight_bytes: st.in_flight_bytes as u64,
    }
}

/// How often a link watcher looks at a down or out-of-date site (for `down_wait=` and catch-up).
const OUTDATED_POLL: Duration = Duration::from_millis(50);

/// What moves a tcp slink between `Up`/`Resync`, `Down` and `Outdated`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkInput {
    LinkUp,
    LinkDown,
    /// The link has been down, with the site in sync mode, for its `down_wait`.
    DownWaitOver,
    /// An out-of-date site is back and close enough (`policy::caught_up`).
    CaughtUp,
}

/// The state a tcp slink moves to on `input`, and the event that says so (`None`: no change).
/// Out of date is left only by catching up: a link that comes up (or goes down again) does not
/// make writes wait for a site that is still behind.
fn next_link_state(current: SlinkState, input: LinkInput) -> Option<(SlinkState, &'static str)> {
    use SlinkState::*;
    match (current, input) {
        (Stopped | Faulty, _) => None,
        (Outdated, LinkInput::CaughtUp) => Some((Up, "slink-uptodate")),
        (Outdated, _) => None,
        (Down, LinkInput::LinkUp) => Some((Up, "slink-up")),
        (Up | Resync, LinkInput::LinkDown) => Some((Down, "slink-down")),
        (Down, LinkInput::DownWaitOver) => Some((Outdated, "slink-outdated")),
        _ => None,
    }
}

/// Applies [`next_link_state`] to the slink and raises its event.
fn transition(g: &Group, sl: &Slink, input: LinkInput, addr: &str, error: Option<&str>) {
    let Some((state, event)) = next_link_state(sl.state(), input) else {
        if input == LinkInput::LinkUp {
            g.events
                .raise("slink-up", format!("slink {} connected to {addr}", sl.nr));
        }
        return;
    };
    if !sl.set_state(state) {
        return;
    }
    let detail = match input {
        LinkInput::LinkUp => format!("slink {} connected to {addr}", sl.nr),
        LinkInput::LinkDown => format!(
            "slink {} to {addr} down: {}",
            sl.nr,
            error.unwrap_or("connecting")
        ),
        LinkInput::DownWaitOver => format!(
            "slink {} to {addr} out of date: down for its down_wait, writes no longer wait for it",
            sl.nr
        ),
        LinkInput::CaughtUp => format!("slink {} to {addr} caught up: a sync site again", sl.nr),
    };
    g.events.raise(event, detail);
}

/// Regions whose chunks the site acknowledged are clean (durably) for it.
async fn clear_acked_regions(g: &Arc<Group>, sl: &Arc<Slink>, acked_seq: u64) {
    let done: BTreeMap<u64, (u32, u64, bool)> = match sl.resync_in_flight.lock() {
        Ok(mut m) => {
            let keep = m.split_off(&(acked_seq + 1));
            std::mem::replace(&mut *m, keep)
        }
        Err(_) => return,
    };
    if done.is_empty() {
        return;
    }
    let sl2 = sl.clone();
    let cleared = tokio::task::spawn_blocking(move || {
        let mut unsaved = Vec::new();
        for (_, (dev_nr, region, last)) in done {
            if !last {
                continue;
            }
            if let Some(dev) = sl2.device(dev_nr) {
                if let Some(d) = &dev.dirty {
                    if let Ok(mut d) = d.lock() {
                        d.clear_region(region);
                        if let Err(e) = d.persist() {
                            unsaved.push(format!("device {dev_nr} region {region}: {e}"));
                        }
                    }
                }
            }
            sl2.resync_regions_copied_total
                .fetch_add(1, Ordering::Relaxed);
        }
        unsaved
    })
    .await;
    // A failed persist after a clear leaves the region dirty on disk: more dirty than memory,
    // never less, so nothing is lost (it is copied again after a restart). It is said, and the
    // link goes on.
    let unsaved = cleared.unwrap_or_else(|e| vec![format!("clearing task failed: {e}")]);
    if let Some(first) = unsaved.first() {
        g.events.raise(
            "dirtylog-error",
            format!(
                "slink {} dirty log not persisted after {} resynced region(s) ({first})",
                sl.nr,
                unsaved.len()
            ),
        );
    }
    let dirty = sl.dirty_bytes();
    let resyncing = sl.state() == SlinkState::Resync;
    if dirty == 0 && resyncing {
        sl.set_state(SlinkState::Up);
        g.events
            .raise("resync-end", format!("slink {} resync complete", sl.nr));
    } else if dirty > 0 && sl.state() == SlinkState::Up {
        sl.set_state(SlinkState::Resync);
        g.events
            .raise("resync-start", format!("slink {} resync started", sl.nr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_out_of_date_site_stays_out_of_date_until_it_has_caught_up() {
        use LinkInput::*;
        use SlinkState::*;
        assert_eq!(next_link_state(Up, LinkDown), Some((Down, "slink-down")));
        assert_eq!(
            next_link_state(Resync, LinkDown),
            Some((Down, "slink-down"))
        );
        assert_eq!(next_link_state(Down, LinkUp), Some((Up, "slink-up")));
        assert_eq!(
            next_link_state(Down, DownWaitOver),
            Some((Outdated, "slink-outdated"))
        );
        assert_eq!(next_link_state(Up, DownWaitOver), None, "only a down link");
        assert_eq!(next_link_state(Outdated, LinkUp), None);
        assert_eq!(next_link_state(Outdated, LinkDown), None);
        assert_eq!(next_link_state(Outdated, DownWaitOver), None);
        assert_eq!(
            next_link_state(Outdated, CaughtUp),
            Some((Up, "slink-uptodate"))
        );
        assert_eq!(next_link_state(Up, CaughtUp), None);
        for input in [LinkUp, LinkDown, DownWaitOver, CaughtUp] {
            assert_eq!(next_link_state(Faulty, input), None);
            assert_eq!(next_link_state(Stopped, input), None);
        }
    }
}
