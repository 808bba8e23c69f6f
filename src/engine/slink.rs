//! A slink as the core sees it: the site's devices, its feed of entries, its applied lsn, its
//! mode, its dirty logs, and (for `local` slinks) the applier thread that writes entries to the
//! site's devices in lsn order, checkpoints its cursor and resyncs dirty regions.
//!
//! Invariants kept here:
//! - entries are applied in lsn order, across all devices of the group;
//! - R1: an entry is applied at a site other than slink 0 only once it is durable in the replog
//!   (`ApplySource::shippable_lsn`), so no site ever holds a write that the primary's replog could
//!   lose on a crash or a power loss (and whose lsn it would hand out again);
//! - R2: a persisted cursor never exceeds the replog's durable lsn (`Group::save_cursor`);
//! - the cursor saved in the replog never exceeds what the site's devices hold durably
//!   (fdatasync of every device before `set_cursor`);
//! - a dirty region is copied only once the primary's devices have applied at least everything
//!   this site has applied, and entries that follow are applied after the copy: a write that lands
//!   in a region while it is being copied is not lost (it is re-applied after the copy).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use replog::dirtylog::DirtyLog;
use replog::{EntryKind, Lsn};
use serde::Serialize;
use tokio::sync::watch;

use super::blockfile::BlockFile;
use super::policy::{DownWait, Fallbehind, Mode, PolicyKind};
use super::queue::{EntryFeed, MemEntry, Wakeup};

/// Bytes of entries a slink's in-memory feed may hold before it reads from the replog instead.
pub const FEED_BYTES_MAX: usize = 64 << 20;
/// Entries applied per round of the applier loop.
const APPLY_BATCH_MAX: usize = 256;
/// Entries read back from the replog per read when a feed has a gap.
pub const REPLAY_BATCH_ENTRIES_MAX: usize = 256;
/// Bytes read back from the replog per read when a feed has a gap.
pub const REPLAY_BATCH_BYTES_MAX: u64 = 16 << 20;
/// How often an applier makes its devices durable and saves its cursor while it makes progress.
/// Between checkpoints the replog holds every write the devices may not have durably, so a longer
/// interval lets the page cache merge overwrites (less device I/O) at the cost of a longer replay
/// after a crash; a ring filling up forces a checkpoint earlier (`ApplySource::ring_pressure`).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// The checkpoint interval in force (ms): `CHECKPOINT_INTERVAL` unless the daemon was started with
/// `--checkpoint-interval`. Process-wide: set once at start-up, read by every applier.
static CHECKPOINT_INTERVAL_MS: AtomicU64 = AtomicU64::new(5000);

/// Set the checkpoint interval for every applier (daemon start-up). Minimum 10 ms.
pub fn set_checkpoint_interval(d: Duration) {
    CHECKPOINT_INTERVAL_MS.store((d.as_millis() as u64).max(10), Ordering::Relaxed);
}

fn checkpoint_interval() -> Duration {
    Duration::from_millis(CHECKPOINT_INTERVAL_MS.load(Ordering::Relaxed))
}
/// How often a checkpointer looks at the ring's fill between checkpoints.
const RING_PRESSURE_POLL: Duration = Duration::from_millis(50);
/// Dirty regions copied per round between entry batches (resync shares the thread with shipping).
const RESYNC_REGIONS_PER_ROUND: usize = 4;

/// Per-device health letters, as dm-raid1 status shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Alive: no failures.
    Alive = b'A',
    /// Dead: a write failed; the site is out of sync.
    Dead = b'D',
    /// Sync: a resync copy failed.
    SyncFailed = b'S',
    /// Read: a read failed; data unaffected.
    ReadFailed = b'R',
}

impl Health {
    pub fn letter(v: u8) -> char {
        v as char
    }
}

/// A device of the group as held by one site.
pub struct SiteDevice {
    pub dev_nr: u32,
    /// The device on this host (`local` slinks); `None` for a device at a remote site (`tcp`).
    pub file: Option<BlockFile>,
    pub size: u64,
    /// Where the device is, for status: a path, or the remote site's address and device name.
    pub location: String,
    pub dirty: Option<Mutex<DirtyLog>>,
    pub health: AtomicU8,
}

impl SiteDevice {
    pub fn local(dev_nr: u32, file: BlockFile, dirty: Option<DirtyLog>) -> Self {
        SiteDevice {
            dev_nr,
            size: file.size(),
            location: file.path().display().to_string(),
            file: Some(file),
            dirty: dirty.map(Mutex::new),
            health: AtomicU8::new(Health::Alive as u8),
        }
    }

    pub fn remote(dev_nr: u32, size: u64, location: String, dirty: Option<DirtyLog>) -> Self {
        SiteDevice {
            dev_nr,
            file: None,
            size,
            location,
            dirty: dirty.map(Mutex::new),
            health: AtomicU8::new(Health::Alive as u8),
        }
    }

    /// The local file, or an error naming the device.
    pub fn file(&self) -> std::io::Result<&BlockFile> {
        self.file.as_ref().ok_or_else(|| {
            std::io::Error::other(format!(
                "device {} is at a remote site ({})",
                self.dev_nr, self.location
            ))
        })
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty
            .as_ref()
            .and_then(|d| d.lock().ok().map(|d| d.dirty_bytes()))
            .unwrap_or(0)
    }

    pub fn set_health(&self, h: Health) {
        self.health.store(h as u8, Ordering::Relaxed);
    }
}

/// What a slink is doing, for status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlinkState {
    /// Applying entries as they come.
    Up,
    /// Copying dirty regions.
    Resync,
    /// A device of the site failed; entries are kept for it (or its regions dirtied).
    Faulty,
    /// Stopped (group removed or daemon stopping).
    Stopped,
    /// The link to the site is down (connecting, or waiting to reconnect).
    Down,
    /// A site in sync mode that was down for longer than its `down_wait`: writes no longer wait
    /// for it; what it misses stays in the ring (or, once the ring overflows, its regions go
    /// dirty). Current again once it has caught up (`policy::caught_up`).
    Outdated,
}

pub struct Slink {
    pub nr: u8,
    pub transport: &'static str,
    /// `tcp` slinks: the remote daemon's address.
    pub remote_addr: Option<String>,
    pub policy: PolicyKind,
    pub fallbehind: Fallbehind,
    /// `tcp` slinks: how long writes wait for the site in sync mode while its link is down
    /// (table `down_wait=`); `None`: the daemon's dead-peer timeout (`--link-dead-after`).
    pub down_wait: Option<DownWait>,
    mode: AtomicU8,
    pub feed: EntryFeed,
    applied: watch::Sender<Lsn>,
    /// Entries at or below this lsn were dropped for this site (their regions are dirty instead).
    pub skip_to: AtomicU64,
    pub devices: RwLock<BTreeMap<u32, Arc<SiteDevice>>>,
    state: Mutex<SlinkState>,
    checkpoint_requested: AtomicBool,
    /// Wakes the checkpointer thread (slink 0, tcp) for a checkpoint request or stop only.
    checkpointer_wake: Wakeup,
    checkpoints: watch::Sender<u64>,
    stop: AtomicBool,
    /// Operator pause (`message NAME 0 pause N`): the site gets nothing until resumed; the ring
    /// keeps its entries (or its regions go dirty when the ring overflows).
    paused: AtomicBool,
    pub applied_entries_total: AtomicU64,
    pub resync_regions_copied_total: AtomicU64,
    /// `tcp` slinks: resync chunks sent and not yet acknowledged, by seq: (device, region, whether
    /// it is the region's last piece). A region is clean once its last piece is acknowledged
    /// (acknowledgements are cumulative, so every earlier piece is too).
    pub resync_in_flight: Mutex<BTreeMap<u64, (u32, u64, bool)>>,
    /// `tcp` slinks: the link's view (state, last error, counters), for status and metrics.
    pub link: Mutex<Option<LinkView>>,
}

/// A `tcp` slink's link as status shows it.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct LinkView {
    pub address: String,
    pub state: String,
    pub last_error: Option<String>,
    pub sessions: u64,
    pub reconnects: u64,
    pub crc_errors: u64,
    pub bad_frames: u64,
    pub auth_failures: u64,
    pub refusals: u64,
    pub keepalive_timeouts: u64,
    pub bytes_sent: u64,
    pub in_flight_bytes: u64,
}

impl Slink {
    pub fn new(
        nr: u8,
        transport: &'static str,
        policy: PolicyKind,
        fallbehind: Fallbehind,
        applied: Lsn,
    ) -> Self {
        let initial_mode = if policy == PolicyKind::Sync {
            Mode::Sync
        } else {
            Mode::Async
        };
        Slink {
            nr,
            transport,
            remote_addr: None,
            policy,
            fallbehind,
            down_wait: None,
            mode: AtomicU8::new(initial_mode as u8),
            feed: EntryFeed::new(FEED_BYTES_MAX),
            applied: watch::channel(applied).0,
            skip_to: AtomicU64::new(0),
            devices: RwLock::new(BTreeMap::new()),
            state: Mutex::new(SlinkState::Up),
            checkpoint_requested: AtomicBool::new(false),
            checkpointer_wake: Wakeup::default(),
            checkpoints: watch::channel(0).0,
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            applied_entries_total: AtomicU64::new(0),
            resync_regions_copied_total: AtomicU64::new(0),
            resync_in_flight: Mutex::new(BTreeMap::new()),
            link: Mutex::new(None),
        }
    }

    pub fn with_remote(mut self, addr: Option<String>) -> Self {
        self.remote_addr = addr;
        self
    }

    pub fn with_down_wait(mut self, down_wait: Option<DownWait>) -> Self {
        self.down_wait = down_wait;
        self
    }

    pub fn mode(&self) -> Mode {
        if self.mode.load(Ordering::Relaxed) == Mode::Sync as u8 {
            Mode::Sync
        } else {
            Mode::Async
        }
    }

    /// Set the mode; true when it changed.
    pub fn set_mode(&self, m: Mode) -> bool {
        self.mode.swap(m as u8, Ordering::Relaxed) != m as u8
    }

    pub fn applied(&self) -> Lsn {
        *self.applied.borrow()
    }

    /// Move the applied lsn forward (appliers, the primary's write path, replay, link acks).
    pub fn publish_applied(&self, lsn: Lsn) {
        self.applied.send_if_modified(|a| {
            if lsn > *a {
                *a = lsn;
                true
            } else {
                false
            }
        });
    }

    /// Wait until this site has applied `lsn` (or the slink stops).
    pub async fn wait_applied(&self, lsn: Lsn) {
        let mut rx = self.applied.subscribe();
        let _ = rx.wait_for(|a| *a >= lsn || !self.waitable()).await;
    }

    pub fn state(&self) -> SlinkState {
        self.state.lock().map(|s| *s).unwrap_or(SlinkState::Faulty)
    }

    /// Set the state; true when it changed (writers waiting on this site are woken).
    pub fn set_state(&self, s: SlinkState) -> bool {
        let changed = match self.state.lock() {
            Ok(mut g) if *g != s => {
                *g = s;
                true
            }
            _ => false,
        };
        if changed {
            self.applied.send_modify(|_| {});
        }
        changed
    }

    pub fn device(&self, dev_nr: u32) -> Option<Arc<SiteDevice>> {
        self.devices.read().ok()?.get(&dev_nr).cloned()
    }

    pub fn add_device(&self, d: SiteDevice) {
        if let Ok(mut m) = self.devices.write() {
            m.insert(d.dev_nr, Arc::new(d));
        }
    }

    pub fn all_devices(&self) -> Vec<Arc<SiteDevice>> {
        self.devices
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.all_devices().iter().map(|d| d.dirty_bytes()).sum()
    }

    pub fn has_dirty_log(&self) -> bool {
        let devs = self.all_devices();
        !devs.is_empty() && devs.iter().all(|d| d.dirty.is_some())
    }

    /// Ask the applier to make its devices durable and save its cursor now; resolves when done.
    pub async fn checkpoint_now(&self) {
        let mut rx = self.checkpoints.subscribe();
        let seen = *rx.borrow_and_update();
        self.checkpoint_requested.store(true, Ordering::Release);
        self.feed.kick();
        self.checkpointer_wake.notify();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|c| *c > seen || self.stop.load(Ordering::Relaxed)),
        )
        .await;
    }

    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.feed.close();
        self.checkpointer_wake.notify();
        self.applied.send_modify(|_| {});
    }

    /// Pause or resume the site; true when that changed something.
    pub fn set_paused(&self, p: bool) -> bool {
        let changed = self.paused.swap(p, Ordering::AcqRel) != p;
        self.feed.kick();
        // Wake writers waiting on this site: a paused site is not waited for.
        self.applied.send_modify(|_| {});
        changed
    }

    /// Whether writes may wait for this site (sync mode): not when paused, faulty, out of date
    /// or stopping.
    pub fn waitable(&self) -> bool {
        !self.paused()
            && !self.stopping()
            && !matches!(self.state(), SlinkState::Faulty | SlinkState::Outdated)
    }

    /// Whether the ring may drop entries for this site when it overflows (their regions marked
    /// dirty instead): an async site, or any site not waited for now (paused or out of date) that
    /// is not `stall`; always with a dirty log to record the loss. Never slink 0.
    pub fn droppable(&self) -> bool {
        let policy_allows = match self.policy {
            PolicyKind::Async => true,
            PolicyKind::Sync => self.paused() || matches!(self.state(), SlinkState::Outdated),
            PolicyKind::Stall => false,
        };
        self.nr != 0 && policy_allows && self.has_dirty_log()
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// What the applier needs from its group, kept as a trait so the applier stays testable and does
/// not see the write path.
pub trait ApplySource: Send + Sync {
    /// Highest lsn that is durable in the replog (and every lower one): how far a site other
    /// than slink 0 may apply (R1).
    fn shippable_lsn(&self) -> Lsn;
    /// Entries with lsn >= `from`, already shippable, in lsn order.
    fn read_entries(&self, from: Lsn) -> Result<Vec<replog::Entry>, String>;
    /// Save a slink's cursor durably and reclaim ring space.
    fn save_cursor(&self, slink: u8, lsn: Lsn) -> Result<(), String>;
    /// The primary site (slink 0).
    fn primary(&self) -> Arc<Slink>;
    /// Report a state change.
    fn event(&self, kind: &'static str, detail: String);
    /// True when the ring is filling up and cursors should move now.
    fn ring_pressure(&self) -> bool;
}

/// How applying one entry to a site ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "an entry that failed without a durable dirty mark must not be moved past"]
enum Applied {
    Ok,
    /// The write failed, and its region is durably dirty for this site: moving past the entry
    /// loses nothing (a resync copies the region).
    Dirty,
    /// The write failed and nothing durable records it (no dirty log, or its persist failed):
    /// the applier must stay at this entry, or the site would silently miss it.
    Failed,
}

/// How long an applier that is stuck at an entry it could not apply (nor record as dirty)
/// waits before it tries that entry again.
const FAILED_APPLY_RETRY: Duration = Duration::from_secs(1);

/// Apply one entry to a device.
pub fn apply_entry(
    file: &BlockFile,
    kind: EntryKind,
    offset: u64,
    len: u64,
    data: &[u8],
) -> std::io::Result<()> {
    match kind {
        EntryKind::Write => file.write_at(offset, data),
        EntryKind::Zeroes => file.zero_range(offset, len),
        EntryKind::Discard => file.discard(offset, len),
    }
}

/// Slink 0's thread (and a `tcp` slink's): the devices are written by someone else (the write
/// path; the remote site), this thread only makes local devices durable and saves the slink's
/// cursor (its applied prefix) every checkpoint interval.
pub fn run_checkpointer(source: Arc<dyn ApplySource>, slink: Arc<Slink>) {
    let mut saved = slink.applied();
    let mut last = Instant::now();
    loop {
        let requested = slink.checkpointer_wake.wait_until(
            || slink.checkpoint_requested.load(Ordering::Acquire) || slink.stopping(),
            RING_PRESSURE_POLL,
        );
        slink.checkpoint_requested.store(false, Ordering::Release);
        let applied = slink.applied();
        let due = last.elapsed() >= checkpoint_interval() || source.ring_pressure();
        if (applied > saved && due) || requested {
            checkpoint(&*source, &slink, applied);
            saved = applied;
            last = Instant::now();
        }
        if slink.stopping() {
            checkpoint(&*source, &slink, slink.applied());
            slink.set_state(SlinkState::Stopped);
            return;
        }
    }
}

/// The applier of a `local` slink: runs on its own thread until the slink stops and is drained.
pub fn run_local_applier(source: Arc<dyn ApplySource>, slink: Arc<Slink>) {
    if slink.nr == 0 {
        run_checkpointer(source, slink);
        return;
    }
    let mut next = slink.applied() + 1;
    let mut last_checkpoint = Instant::now();
    let mut dirty_since_checkpoint = false;
    let mut was_resyncing = false;
    let mut background = BackgroundCheckpoint::default();
    // Set when an entry could not be applied nor recorded dirty: the applier stays at `next`
    // (the slink is Faulty, its applied lsn and cursor stay below the entry) and retries later.
    let mut stuck_since: Option<Instant> = None;
    // Entries taken from the feed that are not durable yet (R1): applied first next round. At
    // most one batch (APPLY_BATCH_MAX entries).
    let mut held: Vec<Arc<MemEntry>> = Vec::new();
    loop {
        let skip = slink.skip_to.load(Ordering::Acquire);
        if next <= skip {
            next = skip + 1;
            slink.publish_applied(skip);
            stuck_since = None;
        }

        if let Some(since) = stuck_since {
            if slink.stopping() {
                background.wait();
                checkpoint(&*source, &slink, next - 1);
                slink.set_state(SlinkState::Stopped);
                return;
            }
            if since.elapsed() < FAILED_APPLY_RETRY {
                if slink.checkpoint_requested.swap(false, Ordering::AcqRel) {
                    background.wait();
                    checkpoint(&*source, &slink, next - 1);
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            stuck_since = None;
        }

        if slink.paused() && !slink.stopping() {
            if slink.checkpoint_requested.swap(false, Ordering::AcqRel) {
                background.wait();
                checkpoint(&*source, &slink, next - 1);
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let batch = if held.is_empty() {
            slink
                .feed
                .pop_batch(APPLY_BATCH_MAX, Duration::from_millis(10))
        } else {
            std::mem::take(&mut held)
        };
        let mut progressed = false;
        let mut stuck = false;
        for (i, e) in batch.iter().enumerate() {
            if e.lsn < next {
                continue;
            }
            if e.lsn > next {
                // The feed dropped entries (budget): read them back from the replog.
                let before = next;
                stuck = !replay_range(&*source, &slink, &mut next, e.lsn - 1);
                progressed |= next > before;
                if stuck {
                    break;
                }
            }
            if e.lsn != next && next <= e.lsn {
                // The replog could not give the gap yet (not written): wait for it.
                wait_written(&*source, &slink, e.lsn);
                let before = next;
                stuck = !replay_range(&*source, &slink, &mut next, e.lsn - 1);
                progressed |= next > before;
                if stuck {
                    break;
                }
            }
            if e.lsn < next {
                continue;
            }
            wait_written(&*source, &slink, e.lsn);
            if source.shippable_lsn() < e.lsn {
                // Not durable yet (the wait is bounded): keep it and the rest for next round.
                held = batch.get(i..).map(<[_]>::to_vec).unwrap_or_default();
                break;
            }
            if apply_mem_entry(&*source, &slink, e) == Applied::Failed {
                stuck = true;
                break;
            }
            next = e.lsn + 1;
            progressed = true;
        }
        // Entries the feed never got (dropped when full) are read back from the replog.
        let written = source.shippable_lsn();
        if !stuck && written >= next {
            let before = next;
            stuck = !replay_range(&*source, &slink, &mut next, written);
            progressed |= next > before;
        }
        if stuck {
            stuck_since = Some(Instant::now());
        }
        if progressed {
            slink.publish_applied(next - 1);
            dirty_since_checkpoint = true;
        }

        let requested = slink.checkpoint_requested.swap(false, Ordering::AcqRel);
        if requested
            || (dirty_since_checkpoint
                && (last_checkpoint.elapsed() >= checkpoint_interval() || source.ring_pressure()))
        {
            if background.busy() {
                // One at a time (cursors only move forward); a request waits for the next round.
                if requested {
                    slink.checkpoint_requested.store(true, Ordering::Release);
                }
            } else {
                background.start(&source, &slink, next - 1);
                last_checkpoint = Instant::now();
                dirty_since_checkpoint = false;
            }
        }

        let resyncing = resync_step(&*source, &slink, next - 1);
        if resyncing != was_resyncing {
            was_resyncing = resyncing;
            if resyncing {
                slink.set_state(SlinkState::Resync);
                source.event("resync-start", format!("slink {} resync started", slink.nr));
            } else {
                slink.set_state(SlinkState::Up);
                source.event("resync-end", format!("slink {} resync complete", slink.nr));
            }
        }

        if slink.stopping() && source.shippable_lsn() < next {
            background.wait();
            checkpoint(&*source, &slink, next - 1);
            slink.set_state(SlinkState::Stopped);
            return;
        }
    }
}

/// A local slink's checkpoint running beside its applier. An fdatasync of a device with hundreds
/// of MiB of dirty pages takes a while; an applier that waited for it fell behind its feed, and
/// then read every entry back from the replog (about four more passes over the data) and never
/// caught up under sustained writes. The cursor it saves is the applied lsn when it started:
/// the sync covers every write completed before it began.
#[derive(Default)]
struct BackgroundCheckpoint(Option<std::thread::JoinHandle<()>>);

impl BackgroundCheckpoint {
    /// Whether one is still running (a finished one is reaped).
    fn busy(&mut self) -> bool {
        if self.0.as_ref().is_some_and(|h| h.is_finished()) {
            self.wait();
        }
        self.0.is_some()
    }

    fn start(&mut self, source: &Arc<dyn ApplySource>, slink: &Arc<Slink>, applied: Lsn) {
        let (src, sl) = (source.clone(), slink.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("slink{}-ckpt", slink.nr))
            .spawn(move || checkpoint(&*src, &sl, applied));
        match spawned {
            Ok(h) => self.0 = Some(h),
            // No thread to be had: checkpoint here, as before.
            Err(_) => checkpoint(&**source, slink, applied),
        }
    }

    fn wait(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// Wait until the replog write of `lsn` completed (the writer kicks the feed when it does).
fn wait_written(source: &dyn ApplySource, slink: &Slink, lsn: Lsn) {
    // The bound only lets the caller re-check stop and checkpoint requests now and then.
    slink
        .feed
        .wait_until(|| source.shippable_lsn() >= lsn, Duration::from_secs(1));
}

fn apply_mem_entry(source: &dyn ApplySource, slink: &Slink, e: &MemEntry) -> Applied {
    apply_one(
        source, slink, e.lsn, e.device, e.kind, e.offset, e.len, &e.data,
    )
}

#[allow(clippy::too_many_arguments)]
fn apply_one(
    source: &dyn ApplySource,
    slink: &Slink,
    lsn: Lsn,
    device: u32,
    kind: EntryKind,
    offset: u64,
    len: u64,
    data: &[u8],
) -> Applied {
    let Some(dev) = slink.device(device) else {
        // A device of the group this site does not hold (yet): nothing to apply.
        return Applied::Ok;
    };
    match dev
        .file()
        .and_then(|f| apply_entry(f, kind, offset, len, data))
    {
        Ok(()) => {
            slink.applied_entries_total.fetch_add(1, Ordering::Relaxed);
            Applied::Ok
        }
        Err(e) => {
            if dev.health.load(Ordering::Relaxed) != Health::Dead as u8 {
                dev.set_health(Health::Dead);
                source.event(
                    "device-fault",
                    format!(
                        "slink {} device {} write failed at lsn {lsn}: {e}",
                        slink.nr, device
                    ),
                );
            }
            // The site may move past the entry only once its region is durably dirty (a resync
            // repairs it). Without that record (no dirty log, a poisoned one, or a persist that
            // failed) moving on would lose the write for this site silently: it stays behind.
            let recorded = match dev.dirty.as_ref().map(|d| d.lock()) {
                None | Some(Err(_)) => false,
                Some(Ok(mut d)) => {
                    d.mark_range(offset, len.max(1));
                    match d.persist() {
                        Ok(()) => true,
                        Err(pe) => {
                            source.event(
                                "dirtylog-error",
                                format!(
                                    "slink {} device {} dirty log not persisted at lsn {lsn}: {pe}; \
                                     the site stays behind",
                                    slink.nr, device
                                ),
                            );
                            false
                        }
                    }
                }
            };
            if slink.set_state(SlinkState::Faulty) {
                source.event("slink-faulty", format!("slink {} faulty", slink.nr));
            }
            if recorded {
                Applied::Dirty
            } else {
                Applied::Failed
            }
        }
    }
}

/// Applies written entries `*next..=upto` from the replog. Returns false when it stopped at an
/// entry that failed without a durable dirty mark (`*next` is that entry).
fn replay_range(source: &dyn ApplySource, slink: &Slink, next: &mut Lsn, upto: Lsn) -> bool {
    while *next <= upto {
        let skip = slink.skip_to.load(Ordering::Acquire);
        if *next <= skip {
            *next = skip + 1;
            continue;
        }
        let entries = match source.read_entries(*next) {
            Ok(v) => v,
            Err(e) => {
                source.event(
                    "replog-read-error",
                    format!("slink {} reading lsn {}: {e}", slink.nr, *next),
                );
                return true;
            }
        };
        if entries.is_empty() {
            return true;
        }
        for e in entries {
            if e.lsn > upto {
                return true;
            }
            if e.lsn < *next {
                continue;
            }
            let applied = apply_one(
                source, slink, e.lsn, e.device, e.kind, e.offset, e.len, &e.data,
            );
            if applied == Applied::Failed {
                return false;
            }
            *next = e.lsn + 1;
        }
    }
    true
}

fn checkpoint(source: &dyn ApplySource, slink: &Slink, applied: Lsn) {
    let mut ok = true;
    for dev in slink.all_devices() {
        let Some(file) = &dev.file else { continue };
        if let Err(e) = file.sync_data() {
            ok = false;
            dev.set_health(Health::Dead);
            source.event(
                "device-fault",
                format!("slink {} device {} sync failed: {e}", slink.nr, dev.dev_nr),
            );
        }
    }
    if ok {
        let lsn = applied.max(slink.skip_to.load(Ordering::Acquire));
        if let Err(e) = source.save_cursor(slink.nr, lsn) {
            tracing::warn!(slink = slink.nr, "saving cursor {lsn}: {e}");
        }
    }
    slink.checkpoints.send_modify(|c| *c += 1);
}

/// Copy a few dirty regions from the primary's devices to this site. Returns whether regions are
/// still dirty (the slink is resyncing).
fn resync_step(source: &dyn ApplySource, slink: &Slink, applied: Lsn) -> bool {
    if slink.nr == 0 {
        return false;
    }
    let primary = source.primary();
    let mut any_dirty = false;
    let mut copied = 0usize;
    for dev in slink.all_devices() {
        let Some(dirty) = &dev.dirty else { continue };
        let (regions, region_size): (Vec<u64>, u64) = match dirty.lock() {
            Ok(d) => (
                d.dirty_regions().take(RESYNC_REGIONS_PER_ROUND).collect(),
                d.region_size(),
            ),
            Err(_) => continue,
        };
        if regions.is_empty() {
            continue;
        }
        any_dirty = true;
        if copied >= RESYNC_REGIONS_PER_ROUND {
            continue;
        }
        // The primary must hold at least what this site has applied, or the copy could miss a
        // write this site will not apply again.
        if primary.applied() < applied {
            continue;
        }
        let (Some(src), Some(dst)) = (
            primary.device(dev.dev_nr).filter(|p| p.file.is_some()),
            dev.file.as_ref(),
        ) else {
            continue;
        };
        let mut buf = vec![0u8; region_size as usize];
        for region in regions {
            let offset = region * region_size;
            let len = region_size.min(dst.size().saturating_sub(offset)) as usize;
            let Some(chunk) = buf.get_mut(..len) else {
                continue;
            };
            if let Err(e) = src.file().and_then(|f| f.read_at(offset, chunk)) {
                src.set_health(Health::ReadFailed);
                source.event(
                    "device-fault",
                    format!("primary device {} read failed at {offset}: {e}", dev.dev_nr),
                );
                return true;
            }
            if let Err(e) = dst.write_at(offset, chunk) {
                dev.set_health(Health::SyncFailed);
                source.event(
                    "device-fault",
                    format!(
                        "slink {} device {} resync write failed at {offset}: {e}",
                        slink.nr, dev.dev_nr
                    ),
                );
                return true;
            }
            // The copy must be durable before the region stops being dirty.
            if dst.sync_data().is_err() {
                dev.set_health(Health::SyncFailed);
                return true;
            }
            if let Ok(mut d) = dirty.lock() {
                d.clear_region(region);
                // A failed persist after a clear leaves the region dirty on disk: more dirty
                // than memory, never less, so nothing is lost (it is copied again after a
                // restart). Say so and go on.
                if let Err(e) = d.persist() {
                    source.event(
                        "dirtylog-error",
                        format!(
                            "slink {} device {} dirty log not persisted after region {region} \
                             was copied: {e}",
                            slink.nr, dev.dev_nr
                        ),
                    );
                }
            }
            slink
                .resync_regions_copied_total
                .fetch_add(1, Ordering::Relaxed);
            copied += 1;
        }
    }
    any_dirty
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A group as the applier sees it: entries 1..=n written, cursors and events recorded.
    struct FakeGroup {
        entries: Vec<replog::Entry>,
        primary: Arc<Slink>,
        cursors: Mutex<Vec<(u8, Lsn)>>,
        events: Mutex<Vec<(&'static str, String)>>,
        /// The replog's durable lsn as the applier sees it (all `n` entries unless a test says).
        durable: AtomicU64,
    }

    impl FakeGroup {
        fn new(n: u64) -> Arc<FakeGroup> {
            let entries = (1..=n)
                .map(|lsn| replog::Entry {
                    lsn,
                    device: 0,
                    offset: (lsn - 1) * 4096,
                    kind: EntryKind::Write,
                    len: 4096,
                    data: vec![lsn as u8; 4096],
                    timestamp_ns: 0,
                })
                .collect();
            let primary = Arc::new(Slink::new(
                0,
                "local",
                PolicyKind::Sync,
                Fallbehind::default(),
                n,
            ));
            Arc::new(FakeGroup {
                entries,
                primary,
                cursors: Mutex::new(Vec::new()),
                events: Mutex::new(Vec::new()),
                durable: AtomicU64::new(n),
            })
        }

        fn events(&self) -> Vec<&'static str> {
            self.events
                .lock()
                .unwrap()
                .iter()
                .map(|(k, _)| *k)
                .collect()
        }
    }

    impl ApplySource for FakeGroup {
        fn shippable_lsn(&self) -> Lsn {
            self.durable.load(Ordering::Acquire)
        }
        fn read_entries(&self, from: Lsn) -> Result<Vec<replog::Entry>, String> {
            let durable = self.shippable_lsn();
            Ok(self
                .entries
                .iter()
                .filter(|e| e.lsn >= from && e.lsn <= durable)
                .cloned()
                .collect())
        }
        fn save_cursor(&self, slink: u8, lsn: Lsn) -> Result<(), String> {
            self.cursors.lock().unwrap().push((slink, lsn));
            Ok(())
        }
        fn primary(&self) -> Arc<Slink> {
            self.primary.clone()
        }
        fn event(&self, kind: &'static str, detail: String) {
            self.events.lock().unwrap().push((kind, detail));
        }
        fn ring_pressure(&self) -> bool {
            false
        }
    }

    /// Slink 1 whose device 0 refuses every write (a file opened read-only), with `dirty`.
    fn failing_site(dir: &Path, dirty: Option<DirtyLog>) -> Arc<Slink> {
        let path = dir.join("site1.img");
        drop(BlockFile::open(&path, 1 << 20, true).unwrap());
        let read_only = BlockFile::open(&path, 1 << 20, false).unwrap();
        let slink = Arc::new(Slink::new(
            1,
            "local",
            PolicyKind::Async,
            Fallbehind::default(),
            0,
        ));
        slink.add_device(SiteDevice::local(0, read_only, dirty));
        slink
    }

    /// Runs the applier until `done` holds (or 10 s), then stops it.
    fn run_until(group: &Arc<FakeGroup>, slink: &Arc<Slink>, done: impl Fn() -> bool) {
        let (g, s) = (group.clone(), slink.clone());
        let applier = std::thread::spawn(move || run_local_applier(g, s));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        slink.request_stop();
        applier.join().unwrap();
    }

    /// A healthy slink 1 on its own file.
    fn healthy_site(dir: &Path) -> Arc<Slink> {
        let file = BlockFile::open(&dir.join("site1.img"), 1 << 20, true).unwrap();
        let slink = Arc::new(Slink::new(
            1,
            "local",
            PolicyKind::Async,
            Fallbehind::default(),
            0,
        ));
        slink.add_device(SiteDevice::local(0, file, None));
        slink
    }

    #[test]
    fn a_site_applies_nothing_above_the_durable_lsn_and_the_rest_once_it_moves() {
        let dir = tempfile::tempdir().unwrap();
        let group = FakeGroup::new(6);
        group.durable.store(2, Ordering::Release);
        let slink = healthy_site(dir.path());
        for e in &group.entries {
            slink.feed.push(Arc::new(MemEntry {
                lsn: e.lsn,
                device: e.device,
                offset: e.offset,
                kind: e.kind,
                len: e.len,
                data: e.data.clone(),
                appended_at: Instant::now(),
                timestamp_ns: 0,
            }));
        }
        let (g, s) = (group.clone(), slink.clone());
        let applier = std::thread::spawn(move || run_local_applier(g, s));
        let deadline = Instant::now() + Duration::from_secs(10);
        while slink.applied() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        // Time for an applier that ignores the horizon to run ahead (its feed holds all six).
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(slink.applied(), 2, "applied above the durable lsn");
        let data = std::fs::read(dir.path().join("site1.img")).unwrap();
        assert!(
            data[2 * 4096..6 * 4096].iter().all(|b| *b == 0),
            "entries 3..=6 reached the site's device before they were durable"
        );
        group.durable.store(6, Ordering::Release);
        slink.feed.kick();
        let deadline = Instant::now() + Duration::from_secs(10);
        while slink.applied() < 6 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(slink.applied(), 6);
        slink.request_stop();
        applier.join().unwrap();
    }

    #[test]
    fn a_failed_apply_without_a_dirty_log_keeps_the_site_behind_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let group = FakeGroup::new(3);
        let slink = failing_site(dir.path(), None);
        // Stopped as soon as the first write failed: an applier that ignores the failure goes on
        // through entries 2 and 3 before it sees the stop, and saves cursor 3.
        run_until(&group, &slink, || group.events().contains(&"slink-faulty"));
        assert_eq!(
            slink.applied(),
            0,
            "applied lsn moved past an entry nothing records"
        );
        assert_eq!(slink.state(), SlinkState::Stopped);
        let cursors = group.cursors.lock().unwrap().clone();
        assert!(
            cursors.iter().all(|(nr, lsn)| *nr == 1 && *lsn == 0),
            "the cursor stays below the failed entry: {cursors:?}"
        );
        let dev = slink.device(0).unwrap();
        assert_eq!(Health::letter(dev.health.load(Ordering::Relaxed)), 'D');
        let events = group.events();
        assert!(events.contains(&"device-fault"), "{events:?}");
    }

    #[test]
    fn a_stuck_applier_retries_the_entry_and_stays_faulty_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let group = FakeGroup::new(2);
        let slink = failing_site(dir.path(), None);
        let (g, s) = (group.clone(), slink.clone());
        let applier = std::thread::spawn(move || run_local_applier(g, s));
        std::thread::sleep(FAILED_APPLY_RETRY + Duration::from_millis(500));
        assert_eq!(slink.state(), SlinkState::Faulty);
        assert_eq!(slink.applied(), 0);
        // One fault event for the device and one for the slink, not one per retry.
        let events = group.events();
        assert_eq!(
            events.iter().filter(|k| **k == "device-fault").count(),
            1,
            "{events:?}"
        );
        assert_eq!(
            events.iter().filter(|k| **k == "slink-faulty").count(),
            1,
            "{events:?}"
        );
        slink.request_stop();
        applier.join().unwrap();
        assert_eq!(slink.applied(), 0);
    }

    #[test]
    fn a_failed_apply_with_a_dirty_log_moves_on_with_its_region_durably_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let group = FakeGroup::new(3);
        let log_path = dir.path().join("site1.dirty");
        let dirty = DirtyLog::open_or_create_disk(&log_path, 1 << 20, 4096, false).unwrap();
        let slink = failing_site(dir.path(), Some(dirty));
        run_until(&group, &slink, || slink.applied() == 3);
        assert_eq!(
            slink.applied(),
            3,
            "every failed entry is recorded dirty: the site moves on"
        );
        assert_eq!(slink.dirty_bytes(), 3 * 4096);
        // Durably: the log on disk says so too.
        drop(slink);
        let reopened = DirtyLog::open_or_create_disk(&log_path, 1 << 20, 4096, false).unwrap();
        assert_eq!(reopened.dirty_regions().collect::<Vec<_>>(), vec![0, 1, 2]);
    }
}
