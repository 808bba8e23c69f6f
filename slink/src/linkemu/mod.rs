//! The in-repo link emulator: a TCP proxy that makes a loopback connection behave like a long,
//! narrow or broken link, for machines without `sch_netem` (and for tests that must inject faults
//! at a precise moment). It listens on one address and forwards each connection to an upstream
//! address, and in each direction applies:
//!
//! - a one-way delay (RTT = 2 x delay) with optional jitter (stream order is kept),
//! - a rate limit (bytes/s per direction, shared by all connections, GCRA pacing),
//! - stall (hold all traffic), partition (drop connections and refuse new ones for a while),
//!   reset (drop every connection with RST), and byte corruption (flip one byte every N bytes).
//!
//! Settings change at run time through [`LinkEmulator::apply`] (the `replicator-linkemu` binary
//! exposes it on a TCP control port, one command per line; see [`command`]).
//!
//! Memory bound: each direction of each connection holds at most its delay line, sized
//! `rate x (delay + jitter) + DELAY_LINE_SLACK_BYTES` (or `UNPACED_DELAY_LINE_BYTES` without a
//! rate), plus one read chunk. When the line is full the proxy stops reading and TCP flow control
//! pushes back on the sender, as a full router queue would.
//!
//! What it does not emulate: packet loss and TCP's own congestion control over the long path
//! (each hop is a loopback TCP connection); for those use `deploy/netem/` on a host with netem.

pub mod command;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

pub use command::Command;

/// Bytes read from a socket at once.
pub const CHUNK_BYTES: usize = 64 << 10;
/// Extra bytes a delay line holds beyond rate x delay.
pub const DELAY_LINE_SLACK_BYTES: usize = 4 << 20;
/// Delay line size per direction and connection when no rate is set.
pub const UNPACED_DELAY_LINE_BYTES: usize = 64 << 20;
/// Largest delay line per direction and connection, whatever the settings.
pub const DELAY_LINE_BYTES_MAX: usize = 256 << 20;
/// Chunks a delay line holds at most (small reads are small chunks).
pub const DELAY_LINE_CHUNKS_MAX: usize = 1 << 16;
/// Burst the pacer allows above the rate, in time.
pub const PACER_BURST: Duration = Duration::from_millis(5);
/// Socket buffers for both legs.
pub const SOCKET_BUFFER_BYTES: u32 = 8 << 20;

/// The emulated link's settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkParams {
    /// One-way delay.
    pub delay: Duration,
    /// Up to this much extra or less delay per chunk, at random.
    pub jitter: Duration,
    /// Bytes per second per direction; `None` is unlimited.
    pub rate_bytes_per_sec: Option<u64>,
    /// Flip one byte every this many bytes (client to upstream only unless `corrupt_both`).
    pub corrupt_every_bytes: Option<u64>,
    pub corrupt_both: bool,
}

impl LinkParams {
    fn delay_line_bytes(&self) -> usize {
        match self.rate_bytes_per_sec {
            None => UNPACED_DELAY_LINE_BYTES,
            Some(rate) => {
                let secs = self.delay.saturating_add(self.jitter).as_secs_f64();
                let in_flight = (rate as f64 * secs) as usize;
                in_flight
                    .saturating_add(DELAY_LINE_SLACK_BYTES)
                    .min(DELAY_LINE_BYTES_MAX)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Control {
    params: LinkParams,
    /// Hold traffic until then (`Some(far future)` for "until told").
    stall_until: Option<Instant>,
    partition_until: Option<Instant>,
    /// Bumped to drop every connection.
    reset_generation: u64,
}

/// Counters of an emulator.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EmuStats {
    pub connections: u64,
    pub active: u64,
    /// Connections refused while partitioned (or whose upstream could not be reached).
    pub refused: u64,
    /// Bytes delivered client -> upstream.
    pub bytes_forward: u64,
    /// Bytes delivered upstream -> client.
    pub bytes_reverse: u64,
    /// Bytes flipped.
    pub corrupted: u64,
    /// Connections dropped by reset or partition.
    pub dropped: u64,
}

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    active: AtomicU64,
    refused: AtomicU64,
    bytes_forward: AtomicU64,
    bytes_reverse: AtomicU64,
    corrupted: AtomicU64,
    dropped: AtomicU64,
}

/// Pacing by theoretical arrival time (GCRA): long-run rate exact, bursts bounded by
/// [`PACER_BURST`], and sleeping late does not lose credit (the 1 ms timer does not cap the rate).
#[derive(Debug)]
struct Pacer {
    tat: Instant,
}

impl Pacer {
    /// When `n` bytes may go, and books them.
    fn reserve(&mut self, now: Instant, n: usize, rate: u64) -> Instant {
        let tat = self.tat.max(now);
        let send_at = tat.checked_sub(PACER_BURST).unwrap_or(tat).max(now);
        let cost = Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
        self.tat = tat + cost;
        send_at
    }
}

struct Shared {
    upstream: String,
    control: watch::Sender<Control>,
    stats: Stats,
    /// Pacers per direction.
    pacer_forward: Mutex<Pacer>,
    pacer_reverse: Mutex<Pacer>,
    /// Bytes left before the next flip, per direction (0: corruption off).
    countdown_forward: AtomicU64,
    countdown_reverse: AtomicU64,
}

/// A running emulator.
pub struct LinkEmulator {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Forward,
    Reverse,
}

impl LinkEmulator {
    /// Listens on `listen` and forwards every connection to `upstream` (`host:port`).
    pub async fn start(
        listen: SocketAddr,
        upstream: String,
        params: LinkParams,
    ) -> std::io::Result<LinkEmulator> {
        let listener = TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            upstream,
            control: watch::Sender::new(Control {
                params,
                ..Control::default()
            }),
            stats: Stats::default(),
            pacer_forward: Mutex::new(Pacer { tat: now }),
            pacer_reverse: Mutex::new(Pacer { tat: now }),
            countdown_forward: AtomicU64::new(0),
            countdown_reverse: AtomicU64::new(0),
        });
        shared.rearm_corruption(&params);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        Ok(LinkEmulator {
            local_addr,
            shared,
            stop,
            task: Some(task),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn params(&self) -> LinkParams {
        self.shared.control.borrow().params
    }

    pub fn stats(&self) -> EmuStats {
        let s = &self.shared.stats;
        EmuStats {
            connections: s.connections.load(Ordering::Relaxed),
            active: s.active.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            bytes_forward: s.bytes_forward.load(Ordering::Relaxed),
            bytes_reverse: s.bytes_reverse.load(Ordering::Relaxed),
            corrupted: s.corrupted.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
        }
    }

    /// Applies one command; returns the reply line.
    pub fn execute(&self, cmd: Command) -> String {
        let now = Instant::now();
        // "Until told": a day is beyond any test and keeps Instant arithmetic safe.
        let forever = now + Duration::from_secs(86_400);
        let mut reply = String::from("ok");
        match cmd {
            Command::Delay(d) => self.shared.control.send_modify(|c| c.params.delay = d),
            Command::Jitter(d) => self.shared.control.send_modify(|c| c.params.jitter = d),
            Command::Rate(r) => self
                .shared
                .control
                .send_modify(|c| c.params.rate_bytes_per_sec = r),
            Command::Stall(d) => self.shared.control.send_modify(|c| {
                c.stall_until = Some(d.map_or(forever, |d| now + d));
            }),
            Command::StallOff => self.shared.control.send_modify(|c| c.stall_until = None),
            Command::Partition(d) => self.shared.control.send_modify(|c| {
                c.partition_until = Some(d.map_or(forever, |d| now + d));
                c.reset_generation = c.reset_generation.wrapping_add(1);
            }),
            Command::Reset => self.shared.control.send_modify(|c| {
                c.reset_generation = c.reset_generation.wrapping_add(1);
            }),
            Command::Heal => self.shared.control.send_modify(|c| {
                c.stall_until = None;
                c.partition_until = None;
            }),
            Command::Corrupt { every_bytes, both } => {
                self.shared.control.send_modify(|c| {
                    c.params.corrupt_every_bytes = every_bytes;
                    c.params.corrupt_both = both;
                });
                let p = self.params();
                self.shared.rearm_corruption(&p);
            }
            Command::Status => {
                let c = *self.shared.control.borrow();
                let left = |t: Option<Instant>| {
                    t.and_then(|t| t.checked_duration_since(now))
                        .map_or("no".to_string(), |d| format!("{:.1}s", d.as_secs_f64()))
                };
                let s = self.stats();
                reply = format!(
                    "ok delay={:?} jitter={:?} rate={} corrupt={} stall={} partition={} \
                     connections={} active={} refused={} dropped={} fwd_bytes={} rev_bytes={} corrupted={}",
                    c.params.delay,
                    c.params.jitter,
                    c.params
                        .rate_bytes_per_sec
                        .map_or("off".into(), |r| format!("{}bit", r * 8)),
                    c.params
                        .corrupt_every_bytes
                        .map_or("off".into(), |n| n.to_string()),
                    left(c.stall_until),
                    left(c.partition_until),
                    s.connections,
                    s.active,
                    s.refused,
                    s.dropped,
                    s.bytes_forward,
                    s.bytes_reverse,
                    s.corrupted
                );
            }
            Command::Help => {
                reply = "ok commands: delay D | jitter D | rate R|off | stall [D|on|off] | \
                         partition [D|on] | reset | heal | corrupt N|off [both] | status"
                    .into()
            }
        }
        reply
    }

    /// Parses and applies one control line; the reply starts with `ok` or `error`.
    pub fn apply(&self, line: &str) -> String {
        match command::parse(line) {
            Ok(cmd) => self.execute(cmd),
            Err(e) => format!("error {e}"),
        }
    }

    /// Serves the control protocol on `listener`: one command per line, one reply line each.
    pub fn serve_control(self: &Arc<Self>, listener: TcpListener) -> JoinHandle<()> {
        let emu = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let emu = emu.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = stream.into_split();
                    let mut lines = tokio::io::BufReader::new(rd.take(64 << 10));
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        if line.trim().is_empty() {
                            continue;
                        }
                        let mut reply = emu.apply(&line);
                        reply.push('\n');
                        if wr.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        })
    }

    /// Stops accepting and drops every connection.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for LinkEmulator {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Shared {
    fn rearm_corruption(&self, p: &LinkParams) {
        let n = p.corrupt_every_bytes.unwrap_or(0);
        self.countdown_forward.store(n, Ordering::Relaxed);
        self.countdown_reverse.store(n, Ordering::Relaxed);
    }

    fn partitioned(&self) -> bool {
        self.control
            .borrow()
            .partition_until
            .is_some_and(|t| t > Instant::now())
    }

    /// Flips bytes of `buf` that fall on the corruption interval of this direction.
    fn corrupt(&self, dir: Dir, buf: &mut BytesMut) {
        let p = self.control.borrow().params;
        let Some(every) = p.corrupt_every_bytes else {
            return;
        };
        if dir == Dir::Reverse && !p.corrupt_both {
            return;
        }
        let countdown = match dir {
            Dir::Forward => &self.countdown_forward,
            Dir::Reverse => &self.countdown_reverse,
        };
        let mut at = 0usize;
        loop {
            let left = countdown.load(Ordering::Relaxed);
            let room = (buf.len() - at) as u64;
            if left == 0 || left > room {
                countdown.store(left.saturating_sub(room), Ordering::Relaxed);
                return;
            }
            at += usize::try_from(left).unwrap_or(usize::MAX) - 1;
            if let Some(b) = buf.get_mut(at) {
                *b ^= 0x5a;
                self.stats.corrupted.fetch_add(1, Ordering::Relaxed);
            }
            at += 1;
            countdown.store(every, Ordering::Relaxed);
            if at >= buf.len() {
                return;
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => {
                let Ok((client, _)) = r else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                if shared.partitioned() {
                    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                    let _ = client.set_zero_linger();
                    drop(client);
                    continue;
                }
                let shared = shared.clone();
                let stop = stop.clone();
                conns.spawn(async move { connection(shared, client, stop).await });
            }
        }
    }
    conns.shutdown().await;
}

async fn connect_upstream(upstream: &str) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::other(format!("{upstream} resolves to no address"));
    for addr in tokio::net::lookup_host(upstream).await? {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
        sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
        match sock.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connection(shared: Arc<Shared>, client: TcpStream, mut stop: watch::Receiver<bool>) {
    let mut control = shared.control.subscribe();
    let generation = control.borrow().reset_generation;
    let upstream = match connect_upstream(&shared.upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(upstream = %shared.upstream, error = %e, "linkemu: upstream unreachable");
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    shared.stats.active.fetch_add(1, Ordering::Relaxed);
    let (mut c_rd, mut c_wr) = client.into_split();
    let (mut u_rd, mut u_wr) = upstream.into_split();
    let dropped = {
        let both = async {
            tokio::join!(
                pump(&shared, Dir::Forward, &mut c_rd, &mut u_wr),
                pump(&shared, Dir::Reverse, &mut u_rd, &mut c_wr)
            )
        };
        let reset = async {
            loop {
                if control.changed().await.is_err() {
                    return;
                }
                if control.borrow().reset_generation != generation {
                    return;
                }
            }
        };
        tokio::select! {
            _ = both => false,
            _ = reset => true,
            _ = stop.changed() => true,
        }
    };
    if dropped {
        shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
        // RST both ways: a reset or partition must look like a broken link, not a clean close.
        let _ = c_rd.as_ref().set_zero_linger();
        let _ = u_rd.as_ref().set_zero_linger();
    }
    shared.stats.active.fetch_sub(1, Ordering::Relaxed);
}

/// Sleeps until `t` only if it is still ahead: tokio rounds deadlines up to the next 1 ms tick,
/// so sleeping until "now" would cost up to a millisecond per chunk and cap the rate.
async fn sleep_if_future(t: Instant) {
    if t > Instant::now() {
        tokio::time::sleep_until(t).await;
    }
}

/// Waits while the link is stalled; false if the emulator is gone.
async fn wait_unstalled(control: &mut watch::Receiver<Control>) -> bool {
    loop {
        let until = control.borrow_and_update().stall_until;
        match until {
            Some(t) if t > Instant::now() => {
                tokio::select! {
                    _ = tokio::time::sleep_until(t) => {}
                    r = control.changed() => if r.is_err() { return false; },
                }
            }
            _ => return true,
        }
    }
}

/// One direction: a reader fills the delay line (bounded by bytes), a writer releases chunks when
/// their time comes, paced and possibly corrupted.
async fn pump(shared: &Shared, dir: Dir, rd: &mut OwnedReadHalf, wr: &mut OwnedWriteHalf) {
    let line_bytes = shared.control.borrow().params.delay_line_bytes();
    let budget = Arc::new(Semaphore::new(line_bytes));
    let (tx, mut rx) = mpsc::channel(DELAY_LINE_CHUNKS_MAX);
    let reader = async {
        let mut last_release = Instant::now();
        loop {
            let want = u32::try_from(CHUNK_BYTES).unwrap_or(u32::MAX);
            let Ok(mut permit) = budget.clone().acquire_many_owned(want).await else {
                break;
            };
            let mut buf = BytesMut::with_capacity(CHUNK_BYTES);
            match rd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Keep only the permits this chunk uses; the rest go back to the line.
                    drop(permit.split(CHUNK_BYTES - n));
                }
            }
            let p = shared.control.borrow().params;
            let mut one_way = p.delay;
            if !p.jitter.is_zero() {
                // Symmetric jitter around the delay; order is kept below (a TCP stream cannot
                // reorder), so a late chunk delays the ones behind it as on a real queue.
                let j = p.jitter.as_secs_f64();
                let off = rand::Rng::random_range(&mut rand::rng(), -j..=j);
                one_way = Duration::from_secs_f64((p.delay.as_secs_f64() + off).max(0.0));
            }
            let release = (Instant::now() + one_way).max(last_release);
            last_release = release;
            if tx.send((release, buf, permit)).await.is_err() {
                break;
            }
        }
        drop(tx);
    };
    let writer = async {
        let mut control = shared.control.subscribe();
        while let Some((release, mut buf, permit)) = rx.recv().await {
            sleep_if_future(release).await;
            // Stall: hold the chunk until the stall ends or is lifted.
            if !wait_unstalled(&mut control).await {
                return;
            }
            let rate = control.borrow().params.rate_bytes_per_sec;
            if let Some(rate) = rate {
                let pacer = match dir {
                    Dir::Forward => &shared.pacer_forward,
                    Dir::Reverse => &shared.pacer_reverse,
                };
                let send_at = match pacer.lock() {
                    Ok(mut pacer) => pacer.reserve(Instant::now(), buf.len(), rate),
                    Err(_) => Instant::now(),
                };
                sleep_if_future(send_at).await;
            }
            shared.corrupt(dir, &mut buf);
            if wr.write_all(&buf).await.is_err() {
                return;
            }
            let counter = match dir {
                Dir::Forward => &shared.stats.bytes_forward,
                Dir::Reverse => &shared.stats.bytes_reverse,
            };
            counter.fetch_add(buf.len() as u64, Ordering::Relaxed);
            drop(permit);
        }
        // The reader saw end of stream and the line is drained: pass the FIN on (a stalled link
        // does not deliver a FIN either).
        if wait_unstalled(&mut control).await {
            let _ = wr.shutdown().await;
        }
    };
    tokio::pin!(reader);
    tokio::pin!(writer);
    tokio::select! {
        // The writer ends first only when its socket failed: stop reading too.
        _ = &mut writer => {}
        // End of stream: let the writer drain the line and pass the FIN on.
        _ = &mut reader => writer.await,
    }
}
