//! The sending side of a site link: connects, authenticates, then ships what the core's
//! [`EntrySource`] yields, pipelined within a window of unacknowledged bytes, and reconnects with
//! capped exponential backoff and jitter when anything goes wrong. After every (re)connect it
//! resends from the position the receiver reports as durable in the handshake.
//!
//! Sessions: after each handshake the sender awaits the source's
//! [`EntrySource::session_started`] before it pulls, reports acks through
//! [`EntrySource::acked`] and ends with [`EntrySource::session_ended`], so a source can keep
//! what it serves within what its core planned for this session (a core that plans from the
//! receiver's position must hear of it before the first pull).
//!
//! Invariants:
//! - bytes in flight (sent, not acknowledged) stay under `window_bytes` plus one pull of items;
//! - items go on the wire in the order the source gave them, strictly after the last sent
//!   position (a source that goes backwards is an error, never silently shipped);
//! - the acknowledged position only grows within a connection and never passes what was sent.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{LinkIdentity, SiteConfig};
use crate::conn::{self, FrameReader};
use crate::counters::{Counters, CountersSnapshot};
use crate::error::LinkError;
use crate::frame::MAX_HANDSHAKE_PAYLOAD_BYTES;
use crate::frame::{Ack, ErrorCode, ErrorFrame, Frame, MAX_FRAME_PAYLOAD_BYTES};
use crate::handshake;
use crate::types::{Entry, Item, Position};

/// Encoded frames queued for the socket writer task.
pub const WRITER_QUEUE_FRAMES_MAX: usize = 64;
/// One pull from the source asks for at most this many frames' worth of items.
pub const PULL_FRAMES_MAX: usize = 4;
/// Frames in flight at most (also bounded by the window; this bounds the bookkeeping when frames
/// are tiny).
pub const IN_FLIGHT_FRAMES_MAX: usize = 1 << 16;

/// Where the core's entries come from. The sender asks for items strictly after a position: the
/// last one it sent, or after a reconnect the receiver's durable position.
pub trait EntrySource: Send + Sync + 'static {
    /// Items after `after` (entries with lsn > `after.lsn`, resync items with seq >
    /// `after.resync_seq`), in send order, about `max_bytes` of them by [`Item::wire_bytes`] but
    /// at least one. Waits until there is at least one. Must be cancel safe (the sender drops the
    /// future when an ack or a keepalive comes first and asks again later with the same
    /// position). An error closes the connection and is reported as the link's last error.
    fn next_items(
        &self,
        after: Position,
        max_bytes: usize,
    ) -> impl Future<Output = Result<Vec<Item>, String>> + Send;

    /// Session `session` (the sender's count of completed handshakes, from 1) began: the
    /// receiver holds `peer` durably. Awaited after the handshake and before the session's first
    /// pull, so a source whose plans depend on the receiver's position (a core that must see the
    /// link up before it plans what to send) can make them first; every item pulled in this
    /// session comes after it. An error ends the connection (reported as the link's last error).
    /// Every call is followed by one [`EntrySource::session_ended`] for the same session.
    fn session_started(
        &self,
        _session: u64,
        _peer: Position,
    ) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// The receiver acknowledged `pos` durably in `session` (positions only grow within a
    /// session). Called on the link's task: it must not block.
    fn acked(&self, _session: u64, _pos: Position) {}

    /// Session `session` ended (`reason`: why); nothing more is pulled in it. Called on the
    /// link's task: it must not block.
    fn session_ended(&self, _session: u64, _reason: &str) {}
}

/// Connection state of a sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LinkState {
    /// Connecting or handshaking.
    Connecting,
    /// Handshake done, shipping.
    Up,
    /// The last attempt failed; waiting for the backoff to expire.
    Down,
    /// `shutdown` was called.
    Stopped,
}

/// What the core sees of a sender, through a watch channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SenderStatus {
    pub state: LinkState,
    /// Highest position the receiver said it holds durably (from the last handshake or ack).
    pub acked: Position,
    /// Highest position put on the wire in this connection.
    pub sent: Position,
    /// Frame payload bytes sent and not yet acknowledged.
    pub in_flight_bytes: usize,
    /// The receiver's epoch from the last handshake.
    pub peer_epoch: Option<u64>,
    /// Features both sides support, from the last handshake.
    pub features: u64,
    /// Why the last connection ended or failed.
    pub last_error: Option<String>,
    /// Completed handshakes so far.
    pub sessions: u64,
}

/// A running sender. Dropping it stops the link (like `shutdown` without waiting).
pub struct SlinkSender {
    status: watch::Receiver<SenderStatus>,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SlinkSender {
    /// Starts a sender toward `addr` (`host:port`, resolved at every attempt). Must be called
    /// within a tokio runtime. Fails only on an invalid configuration.
    pub fn spawn<S: EntrySource>(
        addr: String,
        cfg: SiteConfig,
        identity: LinkIdentity,
        source: Arc<S>,
    ) -> Result<SlinkSender, LinkError> {
        cfg.validate().map_err(LinkError::Config)?;
        let (status_tx, status) = watch::channel(SenderStatus {
            state: LinkState::Connecting,
            acked: Position::default(),
            sent: Position::default(),
            in_flight_bytes: 0,
            peer_epoch: None,
            features: 0,
            last_error: None,
            sessions: 0,
        });
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = watch::channel(false);
        let link = Link {
            addr,
            cfg,
            identity,
            source,
            status: status_tx,
            counters: counters.clone(),
            stop: stop_rx,
        };
        let task = tokio::spawn(link.run());
        Ok(SlinkSender {
            status,
            counters,
            stop,
            task: Some(task),
        })
    }

    /// A receiver of status updates (state, acknowledged position, last error).
    pub fn status(&self) -> watch::Receiver<SenderStatus> {
        self.status.clone()
    }

    pub fn counters(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }

    /// Shared counters, for the core's metrics.
    pub fn counters_handle(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Stops the link (closing the connection) and waits for its task.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SlinkSender {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Link<S> {
    addr: String,
    cfg: SiteConfig,
    identity: LinkIdentity,
    source: Arc<S>,
    status: watch::Sender<SenderStatus>,
    counters: Arc<Counters>,
    stop: watch::Receiver<bool>,
}

/// One frame on the wire, not yet acknowledged.
struct InFlight {
    /// Position once this frame is stored.
    upto: Position,
    payload_bytes: usize,
}

/// How a connection ended.
enum End {
    Stopped,
    Failed { error: LinkError, progressed: bool },
}

/// Aborts the writer task when the connection ends, whatever the path.
struct AbortOnDrop(JoinHandle<Result<(), LinkError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<S: EntrySource> Link<S> {
    async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            if *self.stop.borrow() {
                break;
            }
            self.status.send_modify(|s| {
                s.state = LinkState::Connecting;
                s.in_flight_bytes = 0;
            });
            match self.connection().await {
                End::Stopped => break,
                End::Failed { error, progressed } => {
                    tracing::warn!(peer = %self.addr, receiver = %self.identity.receiver_site,
                        error = %error, "slink connection failed");
                    self.status.send_modify(|s| {
                        s.state = LinkState::Down;
                        s.in_flight_bytes = 0;
                        s.last_error = Some(error.to_string());
                    });
                    failures = if progressed {
                        1
                    } else {
                        failures.saturating_add(1)
                    };
                }
            }
            let u: f64 = rand::Rng::random_range(&mut rand::rng(), -1.0..=1.0);
            let delay = self.cfg.backoff.delay(failures, u);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.changed() => break,
            }
            Counters::inc(&self.counters.reconnects);
        }
        self.status.send_modify(|s| {
            s.state = LinkState::Stopped;
            s.in_flight_bytes = 0;
        });
    }

    /// Connects and handshakes; returns the connection and the position the receiver reports
    /// durable, where this connection's shipping starts.
    async fn connect(
        &mut self,
    ) -> Result<
        (
            FrameReader<tokio::net::tcp::OwnedReadHalf>,
            OwnedWriteHalf,
            Position,
        ),
        LinkError,
    > {
        Counters::inc(&self.counters.connections);
        let addrs = tokio::net::lookup_host(self.addr.as_str())
            .await
            .map_err(|e| LinkError::io("resolving the peer address", e))?;
        let mut last = LinkError::Config(format!("{} resolves to no address", self.addr));
        for addr in addrs {
            match conn::connect(addr, self.cfg.socket_buffer_bytes).await {
                Ok(stream) => {
                    let (rd, mut wr) = stream.into_split();
                    let mut rd =
                        FrameReader::new(rd, MAX_HANDSHAKE_PAYLOAD_BYTES, self.counters.clone());
                    let accepted = handshake::sender(
                        &mut rd,
                        &mut wr,
                        &self.cfg,
                        &self.identity,
                        &self.counters,
                    )
                    .await?;
                    rd.set_max_payload(MAX_FRAME_PAYLOAD_BYTES);
                    Counters::inc(&self.counters.sessions);
                    tracing::info!(peer = %addr, receiver = %self.identity.receiver_site,
                        durable_lsn = accepted.durable.lsn, "slink up");
                    self.status.send_modify(|s| {
                        s.state = LinkState::Up;
                        s.acked = accepted.durable;
                        s.sent = accepted.durable;
                        s.in_flight_bytes = 0;
                        s.peer_epoch = Some(accepted.peer_epoch);
                        s.features = accepted.features;
                        s.sessions = s.sessions.saturating_add(1);
                    });
                    return Ok((rd, wr, accepted.durable));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn connection(&mut self) -> End {
        let timeout = self.cfg.handshake_timeout;
        let mut stop = self.stop.clone();
        let connected = tokio::select! {
            r = tokio::time::timeout(timeout, self.connect()) => r,
            _ = stop.changed() => return End::Stopped,
        };
        let (reader, writer, start) = match connected {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => {
                return End::Failed {
                    error,
                    progressed: false,
                }
            }
            Err(_) => {
                return End::Failed {
                    error: LinkError::Timeout(format!(
                        "connect and handshake with {} took over {timeout:?}",
                        self.addr
                    )),
                    progressed: false,
                }
            }
        };
        // The session's number: the handshake just counted it.
        let session = self.status.borrow().sessions;
        let started = tokio::select! {
            r = self.source.session_started(session, start) => r,
            _ = stop.changed() => Err("sender stopping".to_string()),
        };
        let mut progressed = false;
        let end = match started {
            Ok(()) => match self
                .ship(reader, writer, start, session, &mut progressed)
                .await
            {
                Ok(()) => End::Stopped,
                Err(error) => End::Failed { error, progressed },
            },
            Err(_) if *self.stop.borrow() => End::Stopped,
            Err(e) => End::Failed {
                error: LinkError::Source(e),
                progressed: false,
            },
        };
        let reason = match &end {
            End::Stopped => "sender stopping".to_string(),
            End::Failed { error, .. } => error.to_string(),
        };
        self.source.session_ended(session, &reason);
        end
    }

    /// Runs an authenticated connection until it fails or the link stops (`Ok`). `start` is the
    /// position the receiver reported in this connection's handshake: what was sent and
    /// acknowledged before it (by this process or by an earlier one, before a restart) counts
    /// only through it, so an ack is checked against what this receiver really has.
    async fn ship(
        &mut self,
        mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
        mut writer: OwnedWriteHalf,
        start: Position,
        session: u64,
        progressed: &mut bool,
    ) -> Result<(), LinkError> {
        let (queue, mut queued) = mpsc::channel::<Bytes>(WRITER_QUEUE_FRAMES_MAX);
        let counters = self.counters.clone();
        let writer_task = AbortOnDrop(tokio::spawn(async move {
            while let Some(bytes) = queued.recv().await {
                conn::write_bytes(&mut writer, &bytes, &counters).await?;
            }
            Ok(())
        }));
        let mut writer_task = writer_task;

        let mut acked = start;
        let mut sent = start;
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut in_flight_bytes: usize = 0;
        let mut last_heard = Instant::now();
        let mut ping_token: u64 = 0;
        let mut tick = tokio::time::interval(self.cfg.keepalive_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let window = self.cfg.window_bytes;
        let batch = self.cfg.batch_bytes_max;
        let dead = self.cfg.dead_peer_timeout;
        let source = self.source.clone();
        let mut stop = self.stop.clone();

        loop {
            let room = window.saturating_sub(in_flight_bytes);
            let can_pull = room > 0 && in_flight.len() < IN_FLIGHT_FRAMES_MAX;
            let want = room.min(batch.saturating_mul(PULL_FRAMES_MAX)).max(1);
            tokio::select! {
                biased;
                _ = stop.changed() => {
                    let bye = Frame::Error(ErrorFrame::new(ErrorCode::Closing, "sender stopping"));
                    if let Ok(b) = conn::encode(&bye) {
                        let _ = queue.try_send(b);
                    }
                    drop(queue);
                    let _ = tokio::time::timeout(Duration::from_millis(200), &mut writer_task.0).await;
                    return Ok(());
                }
                r = &mut writer_task.0 => {
                    return Err(match r {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => LinkError::Closed(" (writer ended)"),
                        Err(e) => LinkError::Protocol(format!("writer task failed: {e}")),
                    });
                }
                frame = reader.read_frame() => {
                    last_heard = Instant::now();
                    match frame? {
                        None => return Err(LinkError::Closed("")),
                        Some(Frame::Ack(ack)) => {
                            let before = acked;
                            self.on_ack(ack, sent, &mut acked, &mut in_flight, &mut in_flight_bytes)?;
                            if acked != before {
                                *progressed = true;
                                source.acked(session, acked);
                            }
                        }
                        Some(Frame::Pong(_)) => {}
                        Some(Frame::Error(e)) => {
                            if e.code == ErrorCode::AuthFailed {
                                Counters::inc(&self.counters.auth_failures);
                            } else {
                                Counters::inc(&self.counters.refusals);
                            }
                            return Err(LinkError::Refused { code: e.code, message: e.message });
                        }
                        Some(other) => {
                            return Err(LinkError::Protocol(format!(
                                "receiver sent a {:?} frame", other.frame_type())));
                        }
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > dead {
                        Counters::inc(&self.counters.keepalive_timeouts);
                        return Err(LinkError::Timeout(format!(
                            "peer {} silent for over {dead:?} (dead peer timeout)", self.addr)));
                    }
                    ping_token = ping_token.wrapping_add(1);
                    let ping = conn::encode(&Frame::Ping(ping_token))?;
                    // A full queue means the peer is not reading; the silence check catches it.
                    let _ = queue.try_send(ping);
                }
                items = source.next_items(sent, want), if can_pull => {
                    let items = items.map_err(LinkError::Source)?;
                    let frames = pack(items, sent, batch)?;
                    for (frame, upto, payload_bytes) in frames {
                        let bytes = conn::encode(&frame)?;
                        if let Frame::Entries(v) = &frame {
                            Counters::add(&self.counters.entries, v.len() as u64);
                        }
                        match tokio::time::timeout(dead, queue.send(bytes)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return Err(LinkError::Closed(" (writer ended)")),
                            Err(_) => {
                                Counters::inc(&self.counters.keepalive_timeouts);
                                return Err(LinkError::Timeout(format!(
                                    "peer {} took no data for over {dead:?}", self.addr)));
                            }
                        }
                        sent = upto;
                        in_flight_bytes = in_flight_bytes.saturating_add(payload_bytes);
                        in_flight.push_back(InFlight { upto, payload_bytes });
                    }
                    self.status.send_modify(|s| {
                        s.sent = sent;
                        s.in_flight_bytes = in_flight_bytes;
                    });
                }
            }
        }
    }

    fn on_ack(
        &self,
        ack: Ack,
        sent: Position,
        acked: &mut Position,
        in_flight: &mut VecDeque<InFlight>,
        in_flight_bytes: &mut usize,
    ) -> Result<(), LinkError> {
        let pos = Position {
            lsn: ack.durable_lsn,
            resync_seq: ack.resync_seq,
        };
        if pos.lsn > sent.lsn || pos.resync_seq > sent.resync_seq {
            return Err(LinkError::Protocol(format!(
                "ack for {pos:?} beyond what was sent ({sent:?})"
            )));
        }
        if pos.lsn < acked.lsn || pos.resync_seq < acked.resync_seq {
            // Stale or reordered ack: the durable position never moves back.
            return Ok(());
        }
        *acked = pos;
        while let Some(f) = in_flight.front() {
            if f.upto.lsn <= pos.lsn && f.upto.resync_seq <= pos.resync_seq {
                *in_flight_bytes = in_flight_bytes.saturating_sub(f.payload_bytes);
                in_flight.pop_front();
            } else {
                break;
            }
        }
        let bytes = *in_flight_bytes;
        self.status.send_modify(|s| {
            s.acked = pos;
            s.in_flight_bytes = bytes;
        });
        Ok(())
    }
}

/// Packs items into frames: runs of entries into Entries frames of about `batch` payload bytes
/// (one oversized entry gets a frame of its own), resync items one per frame. Checks that the
/// items come strictly after `after`, in order. Returns each frame with the position it completes
/// and its payload size.
fn pack(
    items: Vec<Item>,
    after: Position,
    batch: usize,
) -> Result<Vec<(Frame, Position, usize)>, LinkError> {
    let mut out = Vec::new();
    let mut pos = after;
    let mut run: Vec<Entry> = Vec::new();
    let mut run_bytes: usize = 4;
    fn flush(
        run: &mut Vec<Entry>,
        run_bytes: &mut usize,
        pos: Position,
        out: &mut Vec<(Frame, Position, usize)>,
    ) {
        if !run.is_empty() {
            out.push((Frame::Entries(std::mem::take(run)), pos, *run_bytes));
        }
        *run_bytes = 4;
    }
    for item in items {
        let bytes = item.wire_bytes();
        match item {
            Item::Entry(e) => {
                if e.lsn <= pos.lsn {
                    return Err(LinkError::Source(format!(
                        "entry lsn {} not after {} (source went backwards)",
                        e.lsn, pos.lsn
                    )));
                }
                if !run.is_empty() && run_bytes.saturating_add(bytes) > batch {
                    flush(&mut run, &mut run_bytes, pos, &mut out);
                }
                pos.lsn = e.lsn;
                run_bytes = run_bytes.saturating_add(bytes);
                run.push(e);
            }
            Item::ResyncData(c) => {
                flush(&mut run, &mut run_bytes, pos, &mut out);
                if c.seq <= pos.resync_seq {
                    return Err(LinkError::Source(format!(
                        "resync seq {} not after {}",
                        c.seq, pos.resync_seq
                    )));
                }
                pos.resync_seq = c.seq;
                out.push((Frame::ResyncData(c), pos, bytes));
            }
            Item::ResyncDone(d) => {
                flush(&mut run, &mut run_bytes, pos, &mut out);
                if d.seq <= pos.resync_seq {
                    return Err(LinkError::Source(format!(
                        "resync seq {} not after {}",
                        d.seq, pos.resync_seq
                    )));
                }
                pos.resync_seq = d.seq;
                out.push((Frame::ResyncDone(d), pos, bytes));
            }
        }
    }
    flush(&mut run, &mut run_bytes, pos, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{EntryKind, ResyncDone};

    fn e(lsn: u64, n: usize) -> Item {
        Item::Entry(Entry {
            lsn,
            device: 0,
            offset: 0,
            kind: EntryKind::Write,
            len: n as u64,
            timestamp_ns: 0,
            data: Bytes::from(vec![0u8; n]),
        })
    }

    #[test]
    fn pack_batches_entries_and_splits_at_resync() {
        let items = vec![
            e(1, 100),
            e(2, 100),
            e(3, 5000),
            Item::ResyncDone(ResyncDone { seq: 1, device: 0 }),
            e(4, 10),
        ];
        let frames = pack(items, Position::default(), 4096).unwrap();
        let kinds: Vec<_> = frames
            .iter()
            .map(|(f, p, _)| (f.frame_type(), p.lsn, p.resync_seq))
            .collect();
        use crate::frame::FrameType as T;
        assert_eq!(
            kinds,
            vec![
                (T::Entries, 2, 0),
                (T::Entries, 3, 0),
                (T::ResyncDone, 3, 1),
                (T::Entries, 4, 1)
            ]
        );
        // Payload sizes: count field + entries.
        assert_eq!(frames[0].2, 4 + 2 * (37 + 100));
    }

    #[test]
    fn pack_refuses_a_source_going_backwards() {
        let after = Position {
            lsn: 5,
            resync_seq: 0,
        };
        assert!(pack(vec![e(5, 1)], after, 4096).is_err());
        assert!(pack(vec![e(7, 1), e(6, 1)], after, 4096).is_err());
    }
}
