//! The receiving side of site links: a listener that authenticates peers, admits only allowed
//! sites whose group and devices the core accepts, hands received batches to the core's
//! [`SiteSink`] in order, and acknowledges what the core reports durable.
//!
//! Invariants:
//! - no allow entry, no connection; a refusal is sent to the peer as an Error frame and logged;
//! - at most one session per (sender site, group) stores at a time: a newer connection from the
//!   same site replaces the older one, and is admitted only after the older one has finished
//!   storing, so the durable position it reports in the handshake is final;
//! - items reach the core in the order they were sent, strictly after the durable position;
//! - memory: received-but-not-stored bytes are bounded by `window_bytes` plus one frame.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::config::{Permission, SiteConfig};
use crate::conn::{self, FrameReader};
use crate::counters::{Counters, CountersSnapshot};
use crate::error::LinkError;
use crate::frame::{
    Ack, ErrorCode, ErrorFrame, Frame, MAX_FRAME_PAYLOAD_BYTES, MAX_HANDSHAKE_PAYLOAD_BYTES,
};
use crate::handshake::{self, Authenticated};
use crate::types::{DeviceInfo, Item, Position, SiteId};

/// Small frames (acks, pongs, errors) queued for a session's writer.
pub const OUTGOING_FRAMES_MAX: usize = 64;
/// Received frames queued for the store task (their bytes are also bounded by the window).
pub const STORE_QUEUE_FRAMES_MAX: usize = 1024;
/// Bytes of queued frames merged into one `store` call (lets the core make one fsync for many).
pub const STORE_BATCH_BYTES_MAX: usize = 16 << 20;
/// How long a closing session waits to flush its last frames.
const FLUSH_ON_CLOSE: Duration = Duration::from_millis(500);

/// An authenticated, allowed peer as the core sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerHello {
    pub sender_site: SiteId,
    pub permission: Permission,
    pub group_uuid: [u8; 16],
    pub epoch: u64,
    pub devices: Vec<DeviceInfo>,
    /// Features the sender offered.
    pub features: u64,
    pub peer_addr: SocketAddr,
}

/// The core admits a peer: its own epoch and how far it holds the stream durably.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    pub epoch: u64,
    pub durable: Position,
}

/// The core refuses a peer; the code and message are sent to it and logged here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }

    /// "group uuid mismatch: ..." with both uuids in hex.
    pub fn group_mismatch(ours: &[u8; 16], theirs: &[u8; 16]) -> Refusal {
        Refusal::new(
            ErrorCode::GroupMismatch,
            format!(
                "group uuid mismatch: this site has {}, the peer sent {}",
                hex(ours),
                hex(theirs)
            ),
        )
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn human_bytes(n: u64) -> String {
    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;
    if n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

/// Compares the device lists of both sides; the refusal names the first difference, e.g.
/// "device 1 size differs: 64 MiB here, 32 MiB there".
pub fn check_devices(here: &[DeviceInfo], there: &[DeviceInfo]) -> Result<(), Refusal> {
    for d in here {
        match there.iter().find(|t| t.device == d.device) {
            None => {
                return Err(Refusal::new(
                    ErrorCode::DeviceMismatch,
                    format!(
                        "device {} exists here but the peer did not list it",
                        d.device
                    ),
                ))
            }
            Some(t) if t.size_bytes != d.size_bytes => {
                return Err(Refusal::new(
                    ErrorCode::DeviceMismatch,
                    format!(
                        "device {} size differs: {} here, {} there",
                        d.device,
                        human_bytes(d.size_bytes),
                        human_bytes(t.size_bytes)
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(t) = there
        .iter()
        .find(|t| !here.iter().any(|d| d.device == t.device))
    {
        return Err(Refusal::new(
            ErrorCode::DeviceMismatch,
            format!("device {} listed by the peer does not exist here", t.device),
        ));
    }
    Ok(())
}

/// The receiving core: admits peers and stores what they send.
pub trait SiteSink: Send + Sync + 'static {
    /// Decides whether an authenticated, allowed peer may ship here (group uuid, devices, epoch;
    /// [`check_devices`] and [`Refusal::group_mismatch`] make the usual messages). On admission
    /// it reports its durable position: the sender resends everything after it, so the core must
    /// drop (or be ready to overwrite) anything it held beyond that position. Called only after
    /// any older session of the same site and group has finished storing.
    fn admit(&self, peer: &PeerHello) -> impl Future<Output = Result<Admission, Refusal>> + Send;

    /// Stores `items` (in order, strictly after the last position) durably and returns the
    /// position now durable; the listener acknowledges it to the sender. An error is sent to the
    /// peer (`StoreFailed`) and closes the session.
    fn store(
        &self,
        peer: &PeerHello,
        items: Vec<Item>,
    ) -> impl Future<Output = Result<Position, String>> + Send;
}

/// A running listener. Dropping it stops accepting (like `shutdown` without waiting).
pub struct SlinkListener {
    local_addr: SocketAddr,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// One (sender site, group) session slot: the newest connection wins.
#[derive(Default)]
struct Slot {
    generation: watch::Sender<u64>,
    store_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Sessions are keyed by sender site and group uuid.
type SessionKey = (SiteId, [u8; 16]);

struct Shared<S> {
    cfg: SiteConfig,
    sink: Arc<S>,
    counters: Arc<Counters>,
    slots: Mutex<HashMap<SessionKey, Arc<Slot>>>,
}

impl SlinkListener {
    /// Binds `addr` and starts accepting. Must be called within a tokio runtime.
    pub fn bind<S: SiteSink>(
        addr: SocketAddr,
        cfg: SiteConfig,
        sink: Arc<S>,
    ) -> Result<SlinkListener, LinkError> {
        cfg.validate().map_err(LinkError::Config)?;
        let listener = conn::listen(addr, cfg.socket_buffer_bytes)?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| LinkError::io("reading the bound address", e))?;
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            cfg,
            sink,
            counters: counters.clone(),
            slots: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(accept_loop(listener, shared, stop_rx));
        Ok(SlinkListener {
            local_addr,
            counters,
            stop,
            task: Some(task),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn counters(&self) -> CountersSnapshot {
        self.counters.snapshot()
    }

    /// Shared counters, for the core's metrics.
    pub fn counters_handle(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Stops accepting, closes every session (each finishes its pending store first) and waits.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SlinkListener {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop<S: SiteSink>(
    listener: TcpListener,
    shared: Arc<Shared<S>>,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(shared.cfg.connections_max));
    let mut sessions = JoinSet::new();
    loop {
        let accept = async {
            let permit = permits.clone().acquire_owned().await;
            (permit, listener.accept().await)
        };
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            (permit, accepted) = accept => match (permit, accepted) {
                (Ok(permit), Ok((stream, peer))) => {
                    Counters::inc(&shared.counters.connections);
                    let shared = shared.clone();
                    let stop = stop.clone();
                    sessions.spawn(async move {
                        session(shared, stream, peer, stop).await;
                        drop(permit);
                    });
                }
                (_, Err(e)) => {
                    tracing::warn!(error = %e, "slink listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (Err(_), _) => break,
            },
        }
    }
    drop(listener);
    while sessions.join_next().await.is_some() {}
}

async fn session<S: SiteSink>(
    shared: Arc<Shared<S>>,
    stream: TcpStream,
    peer_addr: SocketAddr,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut rd = FrameReader::new(rd, MAX_HANDSHAKE_PAYLOAD_BYTES, shared.counters.clone());
    let timeout = shared.cfg.handshake_timeout;
    let admitted =
        tokio::time::timeout(timeout, handshake(&shared, &mut rd, &mut wr, peer_addr)).await;
    let (peer, admission, guard, generation) = match admitted {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::warn!(peer = %peer_addr, error = %e, "slink handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(peer = %peer_addr, "slink handshake took over {timeout:?}");
            return;
        }
    };
    Counters::inc(&shared.counters.sessions);
    tracing::info!(peer = %peer_addr, site = %peer.sender_site,
        durable_lsn = admission.durable.lsn, "slink session up");
    rd.set_max_payload(MAX_FRAME_PAYLOAD_BYTES);
    let result = run(&shared, rd, wr, &peer, admission, generation, stop).await;
    drop(guard);
    match result {
        Ok(()) => {
            tracing::info!(peer = %peer_addr, site = %peer.sender_site, "slink session closed")
        }
        Err(e) => tracing::warn!(peer = %peer_addr, site = %peer.sender_site, error = %e,
            "slink session failed"),
    }
}

type Admitted = (
    PeerHello,
    Admission,
    tokio::sync::OwnedMutexGuard<()>,
    (watch::Receiver<u64>, u64),
);

async fn handshake<S: SiteSink>(
    shared: &Shared<S>,
    rd: &mut FrameReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
    peer_addr: SocketAddr,
) -> Result<Admitted, LinkError> {
    let counters = &shared.counters;
    let a: Authenticated = handshake::receiver_authenticate(rd, wr, &shared.cfg, counters).await?;
    let key = (a.hello.sender_site.clone(), a.hello.group_uuid);
    let slot = {
        let mut slots = shared
            .slots
            .lock()
            .map_err(|_| LinkError::Protocol("session table poisoned".into()))?;
        slots.entry(key).or_default().clone()
    };
    // Kick the older session of this site and group, then wait until it has stored everything.
    let mut mine = 0;
    slot.generation.send_modify(|g| {
        *g = g.wrapping_add(1);
        mine = *g;
    });
    let generation = slot.generation.subscribe();
    let guard = slot.store_lock.clone().lock_owned().await;
    let peer = PeerHello {
        sender_site: a.hello.sender_site.clone(),
        permission: a.permission,
        group_uuid: a.hello.group_uuid,
        epoch: a.hello.epoch,
        devices: a.hello.devices.clone(),
        features: a.hello.features,
        peer_addr,
    };
    let admission = match shared.sink.admit(&peer).await {
        Ok(adm) => adm,
        Err(r) => {
            tracing::warn!(peer = %peer_addr, site = %peer.sender_site, code = ?r.code,
                "slink peer refused: {}", r.message);
            return Err(handshake::refuse(wr, r.code, r.message, counters).await);
        }
    };
    handshake::receiver_accept(
        wr,
        &shared.cfg,
        &a,
        admission.epoch,
        admission.durable,
        counters,
    )
    .await?;
    Ok((peer, admission, guard, (generation, mine)))
}

/// Store task: merges queued batches into one `store` call, acknowledges the result.
async fn store_loop<S: SiteSink>(
    sink: Arc<S>,
    peer: PeerHello,
    mut queued: mpsc::Receiver<(Vec<Item>, usize, OwnedSemaphorePermit)>,
    out: mpsc::Sender<Frame>,
    counters: Arc<Counters>,
) -> Result<(), LinkError> {
    while let Some((mut items, mut bytes, permit)) = queued.recv().await {
        let mut permits = vec![permit];
        while bytes < STORE_BATCH_BYTES_MAX {
            match queued.try_recv() {
                Ok((more, more_bytes, p)) => {
                    items.extend(more);
                    bytes = bytes.saturating_add(more_bytes);
                    permits.push(p);
                }
                Err(_) => break,
            }
        }
        let n = items.len() as u64;
        match sink.store(&peer, items).await {
            Ok(pos) => {
                Counters::add(&counters.entries, n);
                let ack = Frame::Ack(Ack {
                    durable_lsn: pos.lsn,
                    resync_seq: pos.resync_seq,
                });
                if out.send(ack).await.is_err() {
                    return Err(LinkError::Closed(" (writer ended)"));
                }
            }
            Err(message) => {
                let frame = Frame::Error(ErrorFrame::new(
                    ErrorCode::StoreFailed,
                    format!("store failed: {message}"),
                ));
                let _ = out.send(frame).await;
                return Err(LinkError::Protocol(format!(
                    "core failed to store: {message}"
                )));
            }
        }
        drop(permits);
    }
    Ok(())
}

/// The frames the receiver refuses a read-only peer.
fn is_write(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::Entries(_) | Frame::ResyncData(_) | Frame::ResyncDone(_)
    )
}

#[allow(clippy::too_many_lines, reason = "one select loop, read top to bottom")]
async fn run<S: SiteSink>(
    shared: &Shared<S>,
    mut rd: FrameReader<OwnedReadHalf>,
    mut wr: OwnedWriteHalf,
    peer: &PeerHello,
    admission: Admission,
    (mut generation, mine): (watch::Receiver<u64>, u64),
    mut stop: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let counters = shared.counters.clone();
    let (out, mut out_rx) = mpsc::channel::<Frame>(OUTGOING_FRAMES_MAX);
    let writer_counters = counters.clone();
    let mut writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            conn::write_frame(&mut wr, &f, &writer_counters).await?;
        }
        Ok::<(), LinkError>(())
    });
    let window = shared.cfg.window_bytes;
    let budget = Arc::new(Semaphore::new(window));
    let (store_tx, store_rx) = mpsc::channel(STORE_QUEUE_FRAMES_MAX);
    let mut store = tokio::spawn(store_loop(
        shared.sink.clone(),
        peer.clone(),
        store_rx,
        out.clone(),
        counters.clone(),
    ));
    let dead = shared.cfg.dead_peer_timeout;
    let mut last_heard = Instant::now();
    let mut received = admission.durable;
    let mut store_done = false;
    let mut writer_done = false;

    let result: Result<(), LinkError> = loop {
        let closing = |code: ErrorCode, msg: String| Frame::Error(ErrorFrame::new(code, msg));
        tokio::select! {
            biased;
            _ = stop.changed() => {
                let _ = out.try_send(closing(ErrorCode::Closing, "receiver shutting down".into()));
                break Ok(());
            }
            _ = generation.changed() => {
                if *generation.borrow() != mine {
                    let msg = format!("replaced by a newer connection from site {}", peer.sender_site);
                    let _ = out.try_send(closing(ErrorCode::Closing, msg));
                    break Ok(());
                }
            }
            r = &mut store => {
                store_done = true;
                break match r {
                    Ok(r) => r,
                    Err(e) => Err(LinkError::Protocol(format!("store task failed: {e}"))),
                };
            }
            r = &mut writer => {
                writer_done = true;
                break match r {
                    Ok(Ok(())) => Err(LinkError::Closed(" (writer ended)")),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(LinkError::Protocol(format!("writer task failed: {e}"))),
                };
            }
            _ = tokio::time::sleep_until(last_heard + dead) => {
                Counters::inc(&counters.keepalive_timeouts);
                break Err(LinkError::Timeout(format!(
                    "site {} silent for over {dead:?} (dead peer timeout)", peer.sender_site)));
            }
            frame = rd.read_frame() => {
                last_heard = Instant::now();
                let frame = match frame {
                    Ok(Some(f)) => f,
                    Ok(None) => break Err(LinkError::Closed("")),
                    Err(e) => {
                        let _ = out.try_send(closing(ErrorCode::Protocol,
                            format!("{e}; closing (send again from the durable position)")));
                        break Err(e);
                    }
                };
                if is_write(&frame) && peer.permission == Permission::ReadOnly {
                    let msg = format!("site {} is read-only here: it may not ship {:?} frames",
                        peer.sender_site, frame.frame_type());
                    Counters::inc(&counters.refusals);
                    let _ = out.try_send(closing(ErrorCode::ReadOnly, msg.clone()));
                    break Err(LinkError::RefusedPeer { code: ErrorCode::ReadOnly, message: msg });
                }
                let (items, bytes) = match frame {
                    Frame::Ping(t) => {
                        // A full queue means we are behind on writing; the sender's silence
                        // check copes with a missing pong.
                        let _ = out.try_send(Frame::Pong(t));
                        continue;
                    }
                    Frame::Pong(_) => continue,
                    Frame::Error(e) => {
                        break Err(LinkError::Refused { code: e.code, message: e.message });
                    }
                    Frame::Entries(entries) => {
                        let first = entries.first().map_or(0, |e| e.lsn);
                        let last = entries.last().map_or(0, |e| e.lsn);
                        if first <= received.lsn {
                            let msg = format!("entry lsn {first} not after {}", received.lsn);
                            let _ = out.try_send(closing(ErrorCode::Protocol, msg.clone()));
                            break Err(LinkError::Protocol(msg));
                        }
                        received.lsn = last;
                        let bytes = entries.iter().map(|e| e.wire_bytes()).sum::<usize>();
                        (entries.into_iter().map(Item::Entry).collect::<Vec<_>>(), bytes)
                    }
                    Frame::ResyncData(c) => {
                        if c.seq <= received.resync_seq {
                            let msg = format!("resync seq {} not after {}", c.seq, received.resync_seq);
                            let _ = out.try_send(closing(ErrorCode::Protocol, msg.clone()));
                            break Err(LinkError::Protocol(msg));
                        }
                        received.resync_seq = c.seq;
                        let item = Item::ResyncData(c);
                        let bytes = item.wire_bytes();
                        (vec![item], bytes)
                    }
                    Frame::ResyncDone(d) => {
                        if d.seq <= received.resync_seq {
                            let msg = format!("resync seq {} not after {}", d.seq, received.resync_seq);
                            let _ = out.try_send(closing(ErrorCode::Protocol, msg.clone()));
                            break Err(LinkError::Protocol(msg));
                        }
                        received.resync_seq = d.seq;
                        let item = Item::ResyncDone(d);
                        let bytes = item.wire_bytes();
                        (vec![item], bytes)
                    }
                    other => {
                        let msg = format!("unexpected {:?} frame after the handshake", other.frame_type());
                        let _ = out.try_send(closing(ErrorCode::Protocol, msg.clone()));
                        break Err(LinkError::Protocol(msg));
                    }
                };
                // Backpressure: stop reading while the core is a window behind.
                let want = u32::try_from(bytes.clamp(1, window)).unwrap_or(u32::MAX);
                let Ok(permit) = budget.clone().acquire_many_owned(want).await else {
                    break Err(LinkError::Protocol("store budget closed".into()));
                };
                last_heard = Instant::now();
                if store_tx.send((items, bytes, permit)).await.is_err() {
                    break Err(LinkError::Closed(" (store task ended)"));
                }
            }
        }
    };

    // Let the core finish what it received (its durable position must be final before a newer
    // session of this site is admitted), then flush the last acks and error frames.
    drop(store_tx);
    let store_result = if store_done {
        Ok(())
    } else {
        match store.await {
            Ok(r) => r,
            Err(e) => Err(LinkError::Protocol(format!("store task failed: {e}"))),
        }
    };
    drop(out);
    if !writer_done {
        let _ = tokio::time::timeout(FLUSH_ON_CLOSE, &mut writer).await;
        writer.abort();
    }
    result.and(store_result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(device: u32, size_bytes: u64) -> DeviceInfo {
        DeviceInfo { device, size_bytes }
    }

    #[test]
    fn device_checks_name_the_difference() {
        let here = [d(0, 64 << 20), d(1, 64 << 20)];
        assert!(check_devices(&here, &here).is_ok());
        let r = check_devices(&here, &[d(0, 64 << 20), d(1, 32 << 20)]).unwrap_err();
        assert_eq!(r.code, ErrorCode::DeviceMismatch);
        assert_eq!(
            r.message,
            "device 1 size differs: 64 MiB here, 32 MiB there"
        );
        let r = check_devices(&here, &[d(0, 64 << 20)]).unwrap_err();
        assert!(r.message.contains("device 1 exists here"), "{}", r.message);
        let r = check_devices(&here, &[d(0, 64 << 20), d(1, 64 << 20), d(2, 4096)]).unwrap_err();
        assert!(
            r.message.contains("device 2 listed by the peer"),
            "{}",
            r.message
        );
        let r = check_devices(&[d(0, 1000)], &[d(0, 4096)]).unwrap_err();
        assert_eq!(
            r.message,
            "device 0 size differs: 1000 bytes here, 4 KiB there"
        );
    }

    #[test]
    fn group_mismatch_message() {
        let r = Refusal::group_mismatch(&[1; 16], &[2; 16]);
        assert!(r
            .message
            .starts_with("group uuid mismatch: this site has 0101"));
    }
}
