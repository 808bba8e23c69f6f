//! A group: devices that share one replog, with one write order across them, and the slinks that
//! carry that order to every site.
//!
//! The write path (see README "Architecture"):
//! 1. Under the group's order lock, the entry is appended to the replog (which assigns its lsn)
//!    and handed to every slink's feed, so every site sees one lsn order.
//! 2. The replog write completes (FUA: and is flushed); `written_lsn` moves.
//! 3. Slink 0 (the primary's own devices) applies it; reads are served from slink 0's devices, so
//!    a write is acknowledged only once slink 0 has applied it (reads return the newest
//!    acknowledged data).
//! 4. Every slink currently in sync mode has applied it.
//!
//! When the ring is full: appliers are asked to checkpoint (save cursors, reclaim); if that is not
//! enough, entries are dropped for async slinks with a dirty log, and for sync ones that are not
//! waited for now (paused, out of date) with a dirty log (`Slink::droppable`: their regions marked
//! dirty and persisted first, then their cursor moved, then the space reclaimed); `stall` slinks,
//! slinks without a dirty log and slink 0 are never dropped: writes wait for them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replog::dirtylog::DirtyLog;
use replog::{Durability, EntryKind, Lsn, Record, Replog};

use super::activity::ActivityGate;
use super::blockfile::BlockFile;
use super::events::Events;
use super::lsn_index::LsnIndex;
use super::policy::{next_mode, Fallbehind, Lag, Mode, PolicyKind};
use super::queue::MemEntry;
use super::slink::{run_local_applier, ApplySource, SiteDevice, Slink};
use super::spec::{DeviceSpec, DirtyLogSpec, GroupSpec, ReplogOpen};
use super::tcp::LinkSettings;

/// A group's role at this site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Role {
    /// Clients write here; slinks ship to the other sites.
    Primary = 0,
    /// Receives a primary's entries; its devices are read-only.
    Secondary = 1,
}
use super::{CoreError, CoreResult};

/// Whether replogs are opened with O_DIRECT (`daemon --replog-io direct`) or through the page
/// cache (`buffered`, the default). Process-wide: set once at start-up.
///
/// Buffered is the default because it measured faster on every NBD job here (4 KiB QD1 random
/// writes: 6.2k vs 4.7k IOPS; QD32: 27.5k vs 18.1k; 1 MiB sequential: 1,277 vs 1,156 MiB/s) and
/// keeps the same promises: a Written entry is in the page cache (it survives a crash of the
/// process, as an O_DIRECT write in a volatile device cache does), a Durable one is flushed
/// (fdatasync) before it is acknowledged, and recovery never trusts an entry a flush did not cover.
static REPLOG_DIRECT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn set_replog_direct(direct: bool) {
    REPLOG_DIRECT.store(direct, Ordering::Relaxed);
}

/// Ring fill (percent) at which appliers checkpoint without waiting for their interval.
const RING_PRESSURE_PERCENT: u64 = 50;
/// How long a write waits for ring space before it fails with ENOSPC.
pub const RING_FULL_WAIT_MAX: Duration = Duration::from_secs(30);
/// When entries must be dropped for a slow site, free at least this share of the ring at once so
/// overflow handling does not run on every write.
const OVERFLOW_FREE_FRACTION: u64 = 8;
/// R1: entries reach other sites only once durable in the replog. Entries only async sites wait
/// for are flushed at most this long after they were written, so one flush covers many writes
/// (the replog group-commits); a write a sync site waits for flushes at once. The core's
/// `ASYNC_FLUSH_DELAY`, which the simulation checks.
const ASYNC_FLUSH_DELAY: Duration = Duration::from_nanos(crate::core::ASYNC_FLUSH_DELAY);

/// R1: how far entries may be shipped to other sites: written and durable in the replog.
pub fn ship_horizon(written: Lsn, durable: Lsn) -> Lsn {
    written.min(durable)
}

/// R2: the cursor a checkpoint may persist for `applied`: never above the replog's durable lsn
/// (after a power loss recovery finds no entry above it; a cursor there would point past the
/// log, and the lsns above would be handed out again for other writes).
pub fn persistable_cursor(applied: Lsn, durable: Lsn) -> Lsn {
    applied.min(durable)
}

/// One write as the append path takes it.
#[derive(Clone, Copy, Debug)]
struct Write {
    device: u32,
    offset: u64,
    kind: EntryKind,
    len: u64,
    timestamp_ns: u64,
}

/// Where an entry writes.
#[derive(Clone, Copy, Debug)]
struct Extent {
    device: u32,
    offset: u64,
    len: u64,
}

impl Extent {
    fn overlaps(&self, o: &Extent) -> bool {
        self.device == o.device
            && self.offset < o.offset.saturating_add(o.len.max(1))
            && o.offset < self.offset.saturating_add(self.len.max(1))
    }
}

/// Removes an entry from the primary's pending set however the write ends.
struct PendingGuard<'a> {
    group: &'a Group,
    lsn: Lsn,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.group.finish_primary(self.lsn);
    }
}

/// The core's view of one device of the group (an NBD export).
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub dev_nr: u32,
    pub size: u64,
    pub table: String,
}

pub struct Group {
    /// The replog path identifies the group: tables that name the same replog form one group.
    pub replog_path: PathBuf,
    /// Shared with blocking threads (activity-log writes, syncs beside the pipeline).
    pub replog: Arc<Replog>,
    order: Mutex<()>,
    pub slinks: Vec<Arc<Slink>>,
    pub devices: RwLock<BTreeMap<u32, DeviceInfo>>,
    index: LsnIndex,
    written: AtomicU64,
    /// Entries appended and not yet applied to the primary's devices, by lsn. A write is applied
    /// once no lower lsn that overlaps it is still pending (lsn order where it matters, parallel
    /// where it does not). Bounded by the requests in flight.
    pending_primary: Mutex<BTreeMap<Lsn, Extent>>,
    pending_primary_changed: tokio::sync::Notify,
    overflow: Mutex<()>,
    /// Woken whenever `written` or the replog's durable lsn moves (tcp links wait on it for
    /// entries they may ship).
    pub written_changed: tokio::sync::Notify,
    /// R3: slink 0 applies an entry that is not durable only inside the durable activity log.
    activity: Arc<ActivityGate>,
    /// An async flush for the other sites is scheduled (R1): at most one at a time.
    ship_flush_scheduled: std::sync::atomic::AtomicBool,
    started: std::sync::atomic::AtomicBool,
    links: Option<Arc<LinkSettings>>,
    senders: Mutex<Vec<super::tcp::TcpLink>>,
    role: std::sync::atomic::AtomicU8,
    /// Secondary: the highest resync seq stored durably since this daemon started. Reported in
    /// the handshake with the written lsn ([`Group::stored_position`]): a primary that restarted
    /// (its own seq back at 0) continues above it, and never gets an ack for a seq it did not
    /// send.
    resync_seq: AtomicU64,
    pub events: Arc<Events>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub writes_total: AtomicU64,
    pub overflows_total: AtomicU64,
    pub write_latency: prometheus::Histogram,
}

/// Wall-clock nanoseconds since the Unix epoch (entry timestamps).
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Group {
    /// Open (or create) the replog named by the spec and bring up its slinks with the spec's
    /// device. Further devices join with [`Group::add_device`].
    pub fn open(
        spec: &GroupSpec,
        device: &DeviceSpec,
        name: &str,
        table: &str,
        hook: Option<String>,
        role: Role,
        links: Option<Arc<LinkSettings>>,
    ) -> CoreResult<Arc<Group>> {
        let replog = open_replog(spec)?;
        let role = settle_role(&replog, &spec.replog_path, role)?;
        if role == Role::Secondary && spec.slinks.iter().any(|s| s.nr != 0) {
            return Err(CoreError::Invalid(
                "a secondary group has only slink 0 (its own devices); the primary ships to it"
                    .into(),
            ));
        }
        // This writer keeps the activity log: its extents say where slink 0 may be ahead of
        // the replog after an unclean stop.
        let features = replog.features();
        if features & replog::format::FEATURE_ACTIVITY_LOG == 0 {
            replog
                .set_features(features | replog::format::FEATURE_ACTIVITY_LOG)
                .map_err(|e| CoreError::replog(&spec.replog_path, e))?;
        }
        let events = Arc::new(Events::new(&spec.replog_path.display().to_string(), hook));

        // Index the retained entries (lag in bytes and age).
        let index = LsnIndex::default();
        let mut from = replog.first_lsn().max(1);
        loop {
            let batch = replog
                .read_from(from, 1024, 64 << 20)
                .map_err(|e| CoreError::replog(&spec.replog_path, e))?;
            let Some(last) = batch.last() else { break };
            from = last.lsn + 1;
            for e in &batch {
                index.push(e.lsn, e.len, e.timestamp_ns);
            }
        }
        // Every lsn the replog handed out so far; after recovery all of them are written.
        let last = replog.next_lsn().saturating_sub(1);

        let mut slinks = Vec::new();
        for s in &spec.slinks {
            let cursor = match replog.cursor(s.nr) {
                Some(c) => c,
                None => {
                    replog
                        .register_slink(s.nr, last)
                        .map_err(|e| CoreError::replog(&spec.replog_path, e))?;
                    last
                }
            };
            slinks.push(Arc::new(
                Slink::new(s.nr, s.transport, s.policy, s.fallbehind, cursor)
                    .with_remote(s.remote_addr.clone())
                    .with_down_wait(s.down_wait),
            ));
        }
        let write_latency = crate::metrics::write_latency().with_label_values(&[spec
            .replog_path
            .display()
            .to_string()
            .as_str()]);
        let activity = Arc::new(ActivityGate::new(&replog));
        let group = Arc::new(Group {
            replog_path: spec.replog_path.clone(),
            replog: Arc::new(replog),
            order: Mutex::new(()),
            slinks,
            devices: RwLock::new(BTreeMap::new()),
            index,
            written: AtomicU64::new(last),
            pending_primary: Mutex::new(BTreeMap::new()),
            pending_primary_changed: tokio::sync::Notify::new(),
            overflow: Mutex::new(()),
            written_changed: tokio::sync::Notify::new(),
            activity,
            ship_flush_scheduled: std::sync::atomic::AtomicBool::new(false),
            started: std::sync::atomic::AtomicBool::new(false),
            links,
            senders: Mutex::new(Vec::new()),
            role: std::sync::atomic::AtomicU8::new(role as u8),
            resync_seq: AtomicU64::new(0),
            events,
            threads: Mutex::new(Vec::new()),
            writes_total: AtomicU64::new(0),
            overflows_total: AtomicU64::new(0),
            write_latency,
        });
        group.add_device(spec, device, name, table)?;
        Ok(group)
    }

    /// Bring the group up once all its devices are present: replay onto the primary's devices
    /// what they may lack (entries above slink 0's cursor), then start the site appliers.
    ///
    /// Restoring a daemon opens every table of a group before it starts the group: an entry for
    /// a device not yet joined must never be skipped by a replay.
    pub fn start(self: &Arc<Self>) -> CoreResult<()> {
        if self.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let replayed = self.replay_primary()?;
        self.repair_after_unclean_stop()?;
        for s in &self.slinks {
            let src: Arc<dyn ApplySource> = self.clone();
            let slink = s.clone();
            let tcp = s.transport == "tcp";
            let h = std::thread::Builder::new()
                .name(format!("slink{}-apply", s.nr))
                .spawn(move || {
                    if tcp {
                        super::slink::run_checkpointer(src, slink)
                    } else {
                        run_local_applier(src, slink)
                    }
                })
                .map_err(|e| CoreError::Invalid(format!("spawning applier: {e}")))?;
            if let Ok(mut t) = self.threads.lock() {
                t.push(h);
            }
        }
        self.spawn_links()?;
        self.events.raise(
            "group-up",
            format!(
                "replog {} open, lsn {}..{}, {} slinks, {replayed} entries replayed on the primary",
                self.replog_path.display(),
                self.replog.first_lsn(),
                self.written_lsn(),
                self.slinks.len()
            ),
        );
        Ok(())
    }

    /// Unclean start: a non-empty activity log at open lists the extents where slink 0's
    /// devices may hold writes the replog lost (R3). They are marked dirty, durably, for every
    /// other site with a dirty log (a site without one is faulty: nothing can record what it may
    /// miss); only then may the activity log change (before, its extents could leave it and the
    /// next unclean stop would forget them).
    fn repair_after_unclean_stop(&self) -> CoreResult<()> {
        let al = self.replog.activity_log();
        if !al.extents.is_empty() {
            self.events.raise(
                "unclean-start",
                format!(
                    "activity log holds {} extent(s) of {} bytes: the stop was not clean; \
                     marking them dirty for every other site",
                    al.extents.len(),
                    al.extent_bytes
                ),
            );
        }
        for s in self.slinks.iter().filter(|s| s.nr != 0) {
            let mut lacking = Vec::new();
            for dev in s.all_devices() {
                let listed: Vec<u64> = al
                    .extents
                    .iter()
                    .filter(|(d, _)| *d == dev.dev_nr)
                    .map(|(_, i)| *i)
                    .collect();
                if listed.is_empty() {
                    continue;
                }
                let Some(dirty) = &dev.dirty else {
                    lacking.push(dev.dev_nr);
                    continue;
                };
                let mut d = dirty
                    .lock()
                    .map_err(|_| CoreError::Invalid("dirty log lock poisoned".into()))?;
                for i in listed {
                    d.mark_range(i.saturating_mul(al.extent_bytes), al.extent_bytes);
                }
                d.persist().map_err(|e| {
                    CoreError::Io(format!(
                        "slink {} device {}: dirty log after an unclean stop: {e}",
                        s.nr, dev.dev_nr
                    ))
                })?;
            }
            if !lacking.is_empty() {
                s.set_state(super::slink::SlinkState::Faulty);
                self.events.raise(
                    "slink-faulty",
                    format!(
                        "slink {}: device(s) {lacking:?} may miss writes lost by an unclean stop \
                         and have no dirty log to record it; resync the site in full",
                        s.nr
                    ),
                );
            }
        }
        self.activity.unfreeze();
        Ok(())
    }

    /// Start (or restart, when a device joined) the links of the `tcp` slinks.
    fn spawn_links(self: &Arc<Self>) -> CoreResult<()> {
        let mut senders = self
            .senders
            .lock()
            .map_err(|_| CoreError::Invalid("senders lock poisoned".into()))?;
        senders.clear();
        for s in &self.slinks {
            let Some(addr) = &s.remote_addr else { continue };
            let settings = self.links.as_ref().ok_or_else(|| {
                CoreError::Invalid(format!(
                    "slink {} is tcp but the daemon has no link identity (--site-id, --psk-file)",
                    s.nr
                ))
            })?;
            // A site that is out of date stays so across a restart of its link (a device
            // joined): only catching up makes writes wait for it again.
            // A faulty one (unclean stop without a dirty log) stays faulty.
            if !matches!(
                s.state(),
                super::slink::SlinkState::Outdated | super::slink::SlinkState::Faulty
            ) {
                s.set_state(super::slink::SlinkState::Down);
            }
            let sender =
                super::tcp::spawn_link(self, s, addr, settings).map_err(CoreError::Invalid)?;
            senders.push(sender);
        }
        Ok(())
    }

    pub fn role(&self) -> Role {
        if self.role.load(Ordering::Acquire) == Role::Secondary as u8 {
            Role::Secondary
        } else {
            Role::Primary
        }
    }

    /// Apply entries above slink 0's cursor to the primary's devices, in lsn order.
    fn replay_primary(&self) -> CoreResult<u64> {
        let Some(primary) = self.primary_slink() else {
            return Ok(0);
        };
        let mut next = self.replog.cursor(0).unwrap_or(0) + 1;
        let last = self.written_lsn();
        let mut replayed = 0u64;
        while next <= last {
            let batch = self
                .replog
                .read_from(
                    next,
                    super::slink::REPLAY_BATCH_ENTRIES_MAX,
                    super::slink::REPLAY_BATCH_BYTES_MAX,
                )
                .map_err(|e| CoreError::replog(&self.replog_path, e))?;
            let Some(end) = batch.last().map(|e| e.lsn) else {
                break;
            };
            for e in batch {
                if let Some(dev) = primary.device(e.device) {
                    dev.file()
                        .and_then(|f| {
                            super::slink::apply_entry(f, e.kind, e.offset, e.len, &e.data)
                        })
                        .map_err(|err| {
                            CoreError::Io(format!(
                                "replaying lsn {} onto device {}: {err}",
                                e.lsn, e.device
                            ))
                        })?;
                } else {
                    tracing::warn!(
                        lsn = e.lsn,
                        device = e.device,
                        "replay: device not in group"
                    );
                }
                replayed += 1;
            }
            next = end + 1;
        }
        primary.publish_applied(last);
        Ok(replayed)
    }

    /// Join a device to this group (a table that names this group's replog with `open`).
    pub fn add_device(
        &self,
        spec: &GroupSpec,
        device: &DeviceSpec,
        name: &str,
        table: &str,
    ) -> CoreResult<()> {
        if let Ok(devs) = self.devices.read() {
            if let Some(d) = devs.get(&device.dev_nr) {
                return Err(CoreError::Invalid(format!(
                    "device number {} is already in this group as {}",
                    device.dev_nr, d.name
                )));
            }
        }
        // The slinks of a group are fixed by its first table; later tables must name the same.
        for s in &spec.slinks {
            let Some(mine) = self.slink(s.nr) else {
                return Err(CoreError::Invalid(format!(
                    "slink {} is not a slink of the group of {}",
                    s.nr,
                    self.replog_path.display()
                )));
            };
            if mine.policy != s.policy || mine.transport != s.transport {
                return Err(CoreError::Invalid(format!(
                    "slink {} policy/transport differs from the group's",
                    s.nr
                )));
            }
        }
        if spec.slinks.len() != self.slinks.len() {
            return Err(CoreError::Invalid(format!(
                "the table names {} slinks, the group has {}",
                spec.slinks.len(),
                self.slinks.len()
            )));
        }
        let mut opened = Vec::new();
        for s in &spec.slinks {
            let site = s
                .devices
                .iter()
                .find(|d| d.dev_nr == device.dev_nr)
                .ok_or_else(|| {
                    CoreError::Invalid(format!("slink {} has no device {}", s.nr, device.dev_nr))
                })?;
            let dirty = open_dirty_log(&site.dirty_log, device.size)?;
            let dev = match &s.remote_addr {
                Some(addr) => SiteDevice::remote(
                    device.dev_nr,
                    device.size,
                    format!("tcp://{addr}/{}", site.path.display()),
                    dirty,
                ),
                None => {
                    let file = BlockFile::open(&site.path, device.size, true)
                        .map_err(|e| CoreError::Io(format!("slink {}: {e}", s.nr)))?;
                    SiteDevice::local(device.dev_nr, file, dirty)
                }
            };
            opened.push((s.nr, dev));
        }
        for (nr, dev) in opened {
            if let Some(sl) = self.slink(nr) {
                sl.add_device(dev);
            }
        }
        if let Ok(mut devs) = self.devices.write() {
            devs.insert(
                device.dev_nr,
                DeviceInfo {
                    name: name.to_string(),
                    dev_nr: device.dev_nr,
                    size: device.size,
                    table: table.to_string(),
                },
            );
        }
        self.events.raise(
            "device-added",
            format!("device {} ({name}) joined", device.dev_nr),
        );
        Ok(())
    }

    /// After a device joined a running group: the links handshake again with the new device list.
    pub fn device_joined(self: &Arc<Self>) -> CoreResult<()> {
        if self.started.load(Ordering::Acquire) {
            self.spawn_links()?;
        }
        Ok(())
    }

    /// Take a device out of the group; true when it was the last one.
    pub fn remove_device(&self, dev_nr: u32) -> bool {
        for s in &self.slinks {
            if let Ok(mut m) = s.devices.write() {
                m.remove(&dev_nr);
            }
        }
        let mut devs = match self.devices.write() {
            Ok(d) => d,
            Err(_) => return false,
        };
        devs.remove(&dev_nr);
        devs.is_empty()
    }

    pub fn slink(&self, nr: u8) -> Option<&Arc<Slink>> {
        self.slinks.iter().find(|s| s.nr == nr)
    }

    pub fn primary_slink(&self) -> Option<&Arc<Slink>> {
        self.slink(0)
    }

    pub fn written_lsn(&self) -> Lsn {
        self.written.load(Ordering::Acquire)
    }

    fn mark_written(&self, lsn: Lsn) {
        self.written.fetch_max(lsn, Ordering::AcqRel);
        self.written_changed.notify_waiters();
    }

    /// R1: how far entries may go to other sites (local slinks >= 1, tcp senders).
    pub fn shippable_lsn(&self) -> Lsn {
        ship_horizon(self.written_lsn(), self.replog.durable_lsn())
    }

    /// The replog's durable lsn may have moved: wake the shippers and writes waiting at the
    /// activity log.
    fn durable_moved(&self) {
        self.written_changed.notify_waiters();
        self.activity.durable_moved();
        for s in &self.slinks {
            if s.nr != 0 {
                s.feed.kick();
            }
        }
    }

    /// R1: a written entry must become durable before other sites get it. A sync site waits for
    /// it: flush now (concurrent flushes share one replog sync). Only async sites: one flush
    /// within `ASYNC_FLUSH_DELAY` covers every write of that window.
    async fn flush_for_sites(self: &Arc<Self>, lsn: Lsn) -> CoreResult<()> {
        if self.slinks.iter().all(|s| s.nr == 0) || self.replog.durable_lsn() >= lsn {
            return Ok(());
        }
        let sync_waits = self
            .slinks
            .iter()
            .any(|s| s.nr != 0 && s.mode() == Mode::Sync && s.waitable());
        if sync_waits {
            self.replog
                .flush()
                .await
                .map_err(|e| CoreError::replog(&self.replog_path, e))?;
            self.durable_moved();
            return Ok(());
        }
        if self.ship_flush_scheduled.swap(true, Ordering::AcqRel) {
            return Ok(()); // the scheduled flush starts later than this write: it covers it
        }
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ASYNC_FLUSH_DELAY).await;
            // Cleared before the sync starts: a write after this point schedules the next one.
            me.ship_flush_scheduled.store(false, Ordering::Release);
            // A sync beside the pipeline, not a flush: a flush would make the open batch sync,
            // and every write appended meanwhile would wait for that fdatasync (the writes'
            // clients do not wait for async sites, so nothing of theirs should).
            let syncing = me.clone();
            let synced = tokio::task::spawn_blocking(move || syncing.replog.sync_written()).await;
            match synced {
                Ok(Ok(_)) => me.durable_moved(),
                Ok(Err(e)) => me.events.raise(
                    "replog-error",
                    format!("sync for the other sites failed: {e}; they get nothing new"),
                ),
                Err(e) => me.events.raise(
                    "replog-error",
                    format!("sync task for the other sites: {e}; they get nothing new"),
                ),
            }
        });
        Ok(())
    }

    /// Lag of a slink behind the newest written entry.
    pub fn lag(&self, s: &Slink) -> Lag {
        let applied = s.applied();
        let last = self.written_lsn();
        let (bytes, oldest) = self.index.above(applied);
        let age = match oldest {
            Some(ts) if last > applied => Duration::from_nanos(now_ns().saturating_sub(ts)),
            _ => Duration::ZERO,
        };
        Lag {
            ios: last.saturating_sub(applied),
            bytes,
            age,
        }
    }

    fn update_mode(&self, s: &Slink) {
        let lag = self.lag(s);
        let m = next_mode(s.policy, &s.fallbehind, s.mode(), &lag);
        if s.set_mode(m) {
            self.events.raise(
                if m == Mode::Sync {
                    "slink-sync"
                } else {
                    "slink-async"
                },
                format!(
                    "slink {} now {:?} (lag {} ios, {} bytes, {:.3}s)",
                    s.nr,
                    m,
                    lag.ios,
                    lag.bytes,
                    lag.age.as_secs_f64()
                ),
            );
        }
    }

    /// Re-evaluate every slink's mode (the monitor calls this so `timeout=` and the way back to
    /// async work when no writes come).
    pub fn update_modes(&self) {
        for s in &self.slinks {
            if s.nr != 0 {
                self.update_mode(s);
            }
        }
    }

    /// The write path: returns once the write may be acknowledged under every slink's policy.
    ///
    /// Runs as its own task: once an entry has an lsn it must reach the primary's devices even
    /// if the client that sent it goes away.
    pub async fn submit(
        self: &Arc<Self>,
        device: u32,
        offset: u64,
        kind: EntryKind,
        len: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> CoreResult<()> {
        let me = self.clone();
        tokio::spawn(async move { me.submit_task(device, offset, kind, len, data, fua).await })
            .await
            .map_err(|e| CoreError::Invalid(format!("write task: {e}")))?
    }

    async fn submit_task(
        self: Arc<Self>,
        device: u32,
        offset: u64,
        kind: EntryKind,
        len: u64,
        mut data: Vec<u8>,
        fua: bool,
    ) -> CoreResult<()> {
        let started = Instant::now();
        let durability = if fua {
            Durability::Durable
        } else {
            Durability::Written
        };
        let give_up = Instant::now() + RING_FULL_WAIT_MAX;
        let (pending, entry) = loop {
            match self.append_and_feed(device, offset, kind, len, &mut data, durability) {
                Ok(v) => break v,
                Err(CoreError::Full { needed }) => {
                    if Instant::now() > give_up {
                        return Err(CoreError::NoSpace(format!(
                            "replog {} full for {:?}: a site does not catch up",
                            self.replog_path.display(),
                            RING_FULL_WAIT_MAX
                        )));
                    }
                    self.make_room(needed).await?;
                }
                Err(e) => return Err(e),
            }
        };
        let guard = PendingGuard {
            group: &self,
            lsn: entry.lsn,
        };
        let mut pending = pending;
        if durability == Durability::Written && !self.replog.is_direct() {
            // At low queue depth the log is idle: writing the batch here (a page-cache copy)
            // spares a round trip through the replog's I/O thread, which is most of a QD1
            // write's time in the daemon. Busy log, or a sync needed: the ordinary path.
            pending.write_now_unless_sync();
        }
        let lsn = pending
            .await
            .map_err(|e| CoreError::replog(&self.replog_path, e))?;
        self.mark_written(lsn);
        for s in &self.slinks {
            if s.nr != 0 {
                s.feed.kick();
            }
        }
        if durability == Durability::Durable {
            self.durable_moved();
        } else {
            self.flush_for_sites(lsn).await?;
        }
        self.apply_primary(&entry).await?;
        drop(guard);
        drop(entry);
        for s in &self.slinks {
            if s.nr != 0 {
                self.update_mode(s);
                // A paused or faulty site is not waited for: its regions go dirty instead, and
                // status says so. Waiting would stop the application for a site that is gone.
                if s.mode() == Mode::Sync && s.waitable() {
                    s.wait_applied(lsn).await;
                }
            }
        }
        self.writes_total.fetch_add(1, Ordering::Relaxed);
        self.write_latency.observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The primary's pending set. A poisoned lock (a thread panicked holding it) stops the
    /// process: read as "nothing pending", it would let overlapping writes reach the devices out
    /// of lsn order.
    fn pending_primary(&self) -> std::sync::MutexGuard<'_, BTreeMap<Lsn, Extent>> {
        match self.pending_primary.lock() {
            Ok(p) => p,
            Err(_) => stop_the_process(&format!(
                "group {}: the primary's pending-write set is poisoned (a thread panicked \
                 holding it); the write order on the primary's devices can no longer be kept",
                self.replog_path.display()
            )),
        }
    }

    /// Apply a written entry to the primary's devices (slink 0), after every lower pending lsn
    /// that overlaps it.
    async fn apply_primary(&self, e: &MemEntry) -> CoreResult<()> {
        let me = Extent {
            device: e.device,
            offset: e.offset,
            len: e.len,
        };
        loop {
            let changed = self.pending_primary_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let blocked = self
                .pending_primary()
                .range(..e.lsn)
                .any(|(_, x)| x.overlaps(&me));
            if !blocked {
                break;
            }
            changed.await;
        }
        let Some(dev) = self.primary_slink().and_then(|p| p.device(e.device)) else {
            return Err(CoreError::Invalid(format!("no device {}", e.device)));
        };
        let extent = crate::core::Extent {
            device: e.device,
            offset: e.offset,
            len: e.len,
        };
        self.activity
            .admit(&self.replog, &extent, e.lsn)
            .await
            .map_err(|err| {
                self.events.raise(
                    "replog-error",
                    format!("lsn {} not applied on the primary: {err}", e.lsn),
                );
                CoreError::Io(format!("replog {}: {err}", self.replog_path.display()))
            })?;
        let applied = dev
            .file()
            .and_then(|f| super::slink::apply_entry(f, e.kind, e.offset, e.len, &e.data));
        applied.map_err(|err| {
            dev.health
                .store(super::slink::Health::Dead as u8, Ordering::Relaxed);
            self.events.raise(
                "device-fault",
                format!(
                    "primary device {} write failed at lsn {}: {err}",
                    e.device, e.lsn
                ),
            );
            CoreError::Io(format!("device {}: {err}", e.device))
        })
    }

    /// An entry is done with the primary (applied, or failed): unblock overlapping successors
    /// and move slink 0's applied lsn to the end of the contiguous applied prefix.
    fn finish_primary(&self, lsn: Lsn) {
        let prefix = {
            let mut p = self.pending_primary();
            p.remove(&lsn);
            match p.keys().next() {
                Some(first) => first.saturating_sub(1),
                None => self.replog.next_lsn().saturating_sub(1),
            }
        };
        if let Some(p) = self.primary_slink() {
            p.publish_applied(prefix);
        }
        self.pending_primary_changed.notify_waiters();
    }

    fn append_and_feed(
        &self,
        device: u32,
        offset: u64,
        kind: EntryKind,
        len: u64,
        data: &mut Vec<u8>,
        durability: Durability,
    ) -> CoreResult<(replog::Appending, Arc<MemEntry>)> {
        let w = Write {
            device,
            offset,
            kind,
            len,
            timestamp_ns: now_ns(),
        };
        self.append_locked(None, w, data, durability)
    }

    /// Append under the order lock (the replog assigns the lsn, or the primary's `lsn` is kept),
    /// register the entry as pending on the primary's devices and hand it to every other slink:
    /// one lsn order for every site.
    fn append_locked(
        &self,
        lsn: Option<Lsn>,
        w: Write,
        data: &mut Vec<u8>,
        durability: Durability,
    ) -> CoreResult<(replog::Appending, Arc<MemEntry>)> {
        let _order = self
            .order
            .lock()
            .map_err(|_| CoreError::Invalid("order lock poisoned".into()))?;
        let rec = Record {
            device: w.device,
            offset: w.offset,
            kind: w.kind,
            len: w.len,
            data: data.as_slice(),
        };
        let appended = match lsn {
            None => self.replog.append(rec, durability),
            Some(lsn) => self.replog.append_with_lsn(lsn, rec, durability),
        };
        let pending = match appended {
            Ok(p) => p,
            Err(replog::Error::Full { needed, .. }) => return Err(CoreError::Full { needed }),
            Err(e) => return Err(CoreError::replog(&self.replog_path, e)),
        };
        let lsn = pending.lsn();
        self.index.push(lsn, w.len, w.timestamp_ns);
        self.pending_primary().insert(
            lsn,
            Extent {
                device: w.device,
                offset: w.offset,
                len: w.len,
            },
        );
        let entry = Arc::new(MemEntry {
            lsn,
            device: w.device,
            offset: w.offset,
            kind: w.kind,
            len: w.len,
            // Moved, not copied: the request's buffer becomes the slinks' entry.
            data: std::mem::take(data),
            appended_at: Instant::now(),
            timestamp_ns: w.timestamp_ns,
        });
        // Slink 0 is applied by the write's own task (`apply_primary`); the others get a feed.
        for s in &self.slinks {
            if s.nr != 0 {
                s.feed.push(entry.clone());
            }
        }
        Ok((pending, entry))
    }

    /// FLUSH: every write acknowledged before it becomes durable in the replog.
    pub async fn flush(&self) -> CoreResult<()> {
        self.replog
            .flush()
            .await
            .map_err(|e| CoreError::replog(&self.replog_path, e))?;
        self.durable_moved();
        Ok(())
    }

    /// Make room in a full ring: checkpoint, reclaim, and if still short, drop entries for async
    /// slinks that have a dirty log.
    async fn make_room(self: &Arc<Self>, needed: u64) -> CoreResult<()> {
        for s in &self.slinks {
            s.checkpoint_now().await;
        }
        self.reclaim();
        if self.replog.space().free_bytes >= needed {
            return Ok(());
        }
        let me = self.clone();
        let dropped = tokio::task::spawn_blocking(move || me.drop_for_slow_sites(needed))
            .await
            .map_err(|e| CoreError::Invalid(format!("overflow task: {e}")))??;
        if !dropped {
            // Someone we may not drop for (slink 0, stall, no dirty log) holds the ring: wait.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    fn reclaim(&self) {
        match self.replog.reclaim() {
            Ok(_) => self.index.trim_below(self.replog.first_lsn()),
            Err(e) => tracing::warn!(replog = %self.replog_path.display(), "reclaim: {e}"),
        }
    }

    /// Overflow: for every slink that may lose entries (async, with a dirty log) and holds the
    /// ring, mark the regions of the entries up to a target lsn dirty (durably), then move its
    /// cursor there. Returns whether anything was dropped.
    fn drop_for_slow_sites(&self, needed: u64) -> CoreResult<bool> {
        // One overflow at a time: concurrent writers that all found the ring full must not each
        // drop (and move cursors) on their own.
        let _one = self
            .overflow
            .lock()
            .map_err(|_| CoreError::Invalid("overflow lock poisoned".into()))?;
        if self.replog.space().free_bytes >= needed {
            return Ok(true);
        }
        if self.primary_slink().is_none() {
            return Ok(false);
        }
        let primary_cursor = self.replog.cursor(0).unwrap_or(0);
        let space = self.replog.space();
        let want = needed.max(space.capacity_bytes / OVERFLOW_FREE_FRACTION);
        // Target: the lsn below which enough bytes are retained, never past slink 0's cursor.
        let first = self.replog.first_lsn();
        let mut target = first.saturating_sub(1);
        let mut freed = 0u64;
        let mut from = first.max(1);
        let mut touched: Vec<(u32, u64, u64, Lsn)> = Vec::new();
        // From the replog's index: which regions the entries cover is all this needs, and
        // reading their data here (under the overflow lock, with writers waiting) was slow.
        'scan: while freed < want && target < primary_cursor {
            let batch = self.replog.extents_from(from, 4096);
            if batch.is_empty() {
                break;
            }
            for e in batch {
                if e.lsn > primary_cursor || freed >= want {
                    break 'scan;
                }
                freed += e.record_bytes;
                target = e.lsn;
                from = e.lsn + 1;
                touched.push((e.device, e.offset, e.len, e.lsn));
            }
        }
        let mut dropped_any = false;
        for s in &self.slinks {
            if !s.droppable() {
                continue;
            }
            let cursor = self.replog.cursor(s.nr).unwrap_or(0);
            if cursor >= target {
                continue;
            }
            // 1. Regions dirty, durably, before the entries go.
            for dev in s.all_devices() {
                let Some(d) = &dev.dirty else { continue };
                let mut d = d
                    .lock()
                    .map_err(|_| CoreError::Invalid("dirty log lock poisoned".into()))?;
                for (device, offset, len, lsn) in &touched {
                    if *device == dev.dev_nr && *lsn > cursor {
                        d.mark_range(*offset, (*len).max(1));
                    }
                }
                d.persist()
                    .map_err(|e| CoreError::Io(format!("dirty log of slink {}: {e}", s.nr)))?;
            }
            // Chunks already on their way may predate these marks: their acks must not clear them.
            if let Ok(mut m) = s.resync_in_flight.lock() {
                m.clear();
            }
            // 2. The site skips them.
            s.skip_to.fetch_max(target, Ordering::AcqRel);
            s.feed.kick();
            // 3. Its cursor moves past them.
            self.replog
                .set_cursor(s.nr, target)
                .map_err(|e| CoreError::replog(&self.replog_path, e))?;
            dropped_any = true;
            self.overflows_total.fetch_add(1, Ordering::Relaxed);
            self.events.raise(
                "overflow",
                format!(
                    "replog full: slink {} dropped lsn {}..={target}, regions marked dirty",
                    s.nr,
                    cursor + 1
                ),
            );
        }
        self.reclaim();
        Ok(dropped_any)
    }

    /// Stop the appliers after they drained what is written; save cursors. Clean: everything
    /// is flushed first (so local sites drain every entry and cursors are not held below the
    /// durable lsn), slink 0's devices are synced, and the activity log is emptied: the next
    /// start finds nothing to repair.
    pub fn shutdown(&self) {
        let first_flush = self.replog.flush().wait();
        self.durable_moved();
        if let Ok(mut s) = self.senders.lock() {
            s.clear();
        }
        for s in &self.slinks {
            s.request_stop();
        }
        if let Ok(mut t) = self.threads.lock() {
            for h in t.drain(..) {
                let _ = h.join();
            }
        }
        // No promise is broken if this fails (writes a FLUSH or FUA covered are durable already;
        // the others were never promised durable), but the operator must know the log did not
        // sync on the way down; the activity log then stays as it is (repaired at next start).
        let flushed = first_flush.and_then(|_| self.replog.flush().wait());
        let mut clean = match flushed {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(replog = %self.replog_path.display(), "final replog flush failed: {e}");
                self.events.raise(
                    "replog-error",
                    format!("final flush on shutdown failed: {e}"),
                );
                false
            }
        };
        if let Some(p) = self.primary_slink() {
            for dev in p.all_devices() {
                let Some(f) = &dev.file else { continue };
                if let Err(e) = f.sync_data() {
                    clean = false;
                    self.events.raise(
                        "device-fault",
                        format!("primary device {} sync on shutdown failed: {e}", dev.dev_nr),
                    );
                }
            }
        }
        if clean {
            match self.activity.clear(&self.replog, self.replog.durable_lsn()) {
                Ok(true) => {}
                Ok(false) => self.events.raise(
                    "unclean-stop",
                    "activity log kept: writes were still in flight at shutdown".to_string(),
                ),
                Err(e) => self
                    .events
                    .raise("replog-error", format!("on shutdown: {e}")),
            }
        }
        self.events.raise("group-down", "group stopped");
    }

    /// Secondary: store entries and resync chunks received from the primary, in stream order.
    /// Entries go into this site's replog with the primary's lsns and are flushed (durable)
    /// before the position is returned (and acknowledged); they are applied to this site's
    /// devices in lsn order. A resync chunk is written to the device after every entry before it
    /// was applied, and made durable before it is acknowledged.
    pub async fn store_replicated(
        self: &Arc<Self>,
        items: Vec<slink::Item>,
    ) -> CoreResult<slink::Position> {
        let mut appended: Vec<(replog::Appending, Arc<MemEntry>, PendingGuard<'_>)> = Vec::new();
        for item in items {
            match item {
                slink::Item::Entry(e) => {
                    if e.lsn <= self.written_lsn()
                        || appended.last().is_some_and(|(_, m, _)| m.lsn >= e.lsn)
                    {
                        continue; // resent after a reconnect: already here
                    }
                    let kind = super::tcp::kind_from_wire(e.kind);
                    let mut data = e.data.to_vec();
                    let w = Write {
                        device: e.device,
                        offset: e.offset,
                        kind,
                        len: e.len,
                        timestamp_ns: e.timestamp_ns,
                    };
                    let (pending, entry) = loop {
                        match self.append_locked(Some(e.lsn), w, &mut data, Durability::Written) {
                            Ok(v) => break v,
                            Err(CoreError::Full { needed }) => {
                                // Make what is appended so far durable and applied, then room.
                                self.complete_replicated(std::mem::take(&mut appended))
                                    .await?;
                                self.make_room(needed).await?;
                            }
                            Err(other) => return Err(other),
                        }
                    };
                    let guard = PendingGuard {
                        group: self,
                        lsn: entry.lsn,
                    };
                    appended.push((pending, entry, guard));
                }
                slink::Item::ResyncData(c) => {
                    self.complete_replicated(std::mem::take(&mut appended))
                        .await?;
                    let dev = self
                        .primary_slink()
                        .and_then(|p| p.device(c.device))
                        .ok_or_else(|| CoreError::Invalid(format!("no device {}", c.device)))?;
                    let data = c.data;
                    let offset = c.offset;
                    tokio::task::spawn_blocking(move || {
                        let f = dev.file()?;
                        f.write_at(offset, &data)?;
                        f.sync_data()
                    })
                    .await
                    .map_err(|e| CoreError::Io(e.to_string()))?
                    .map_err(|e| CoreError::Io(format!("resync write at {offset}: {e}")))?;
                    self.resync_seq.fetch_max(c.seq, Ordering::AcqRel);
                }
                slink::Item::ResyncDone(d) => {
                    self.complete_replicated(std::mem::take(&mut appended))
                        .await?;
                    self.resync_seq.fetch_max(d.seq, Ordering::AcqRel);
                    self.events.raise(
                        "resync-received",
                        format!("device {} resync from the primary complete", d.device),
                    );
                }
            }
        }
        self.complete_replicated(appended).await?;
        Ok(self.stored_position())
    }

    /// Secondary: how far this site holds the primary's stream durably (what the handshake
    /// reports and what `store_replicated` acknowledges): the written lsn and the highest resync
    /// seq stored. The two must agree, or a reconnecting sender sees acks beyond what it sent.
    pub fn stored_position(&self) -> slink::Position {
        slink::Position {
            lsn: self.written_lsn(),
            resync_seq: self.resync_seq.load(Ordering::Acquire),
        }
    }

    /// Wait for the appended entries' writes, make them durable with one flush, apply them.
    async fn complete_replicated(
        &self,
        appended: Vec<(replog::Appending, Arc<MemEntry>, PendingGuard<'_>)>,
    ) -> CoreResult<()> {
        let Some((_, last, _)) = appended.last() else {
            return Ok(());
        };
        let last_lsn = last.lsn;
        let mut entries = Vec::with_capacity(appended.len());
        for (pending, entry, guard) in appended {
            pending
                .await
                .map_err(|e| CoreError::replog(&self.replog_path, e))?;
            entries.push((entry, guard));
        }
        self.replog
            .flush()
            .await
            .map_err(|e| CoreError::replog(&self.replog_path, e))?;
        self.mark_written(last_lsn);
        for (entry, guard) in entries {
            self.apply_primary(&entry).await?;
            drop(guard);
        }
        Ok(())
    }

    /// Read from the primary's devices (slink 0).
    pub fn read(&self, device: u32, offset: u64, buf: &mut [u8]) -> CoreResult<()> {
        let dev = self
            .primary_slink()
            .and_then(|p| p.device(device))
            .ok_or_else(|| CoreError::Invalid(format!("no device {device}")))?;
        dev.file()
            .and_then(|f| f.read_at(offset, buf))
            .map_err(|e| {
                dev.health
                    .store(super::slink::Health::ReadFailed as u8, Ordering::Relaxed);
                CoreError::Io(e.to_string())
            })
    }
}

impl ApplySource for Group {
    fn shippable_lsn(&self) -> Lsn {
        Group::shippable_lsn(self)
    }

    fn read_entries(&self, from: Lsn) -> Result<Vec<replog::Entry>, String> {
        self.replog
            .read_from(
                from,
                super::slink::REPLAY_BATCH_ENTRIES_MAX,
                super::slink::REPLAY_BATCH_BYTES_MAX,
            )
            .map(|v| {
                let w = self.shippable_lsn();
                v.into_iter().filter(|e| e.lsn <= w).collect()
            })
            .map_err(|e| e.to_string())
    }

    fn save_cursor(&self, slink: u8, lsn: Lsn) -> Result<(), String> {
        if lsn > self.replog.durable_lsn() {
            // Slink 0 applies entries before they are durable (R3). Its cursor may not pass the
            // durable lsn (R2), so without this flush a group whose writes never ask for one
            // (no FUA, no other site) would never move it, and the ring would fill for good.
            // One sync per checkpoint, on the checkpointer's thread, not the write path.
            // A sync beside the pipeline: writes appended meanwhile do not wait for it.
            let synced = self.replog.sync_written();
            self.durable_moved();
            synced.map_err(|e| format!("replog sync before the cursor: {e}"))?;
        }
        let lsn = persistable_cursor(lsn, self.replog.durable_lsn());
        let cur = self.replog.cursor(slink).unwrap_or(0);
        if lsn > cur {
            self.replog
                .set_cursor(slink, lsn)
                .map_err(|e| e.to_string())?;
            self.reclaim();
        }
        Ok(())
    }

    fn primary(&self) -> Arc<Slink> {
        match self.primary_slink() {
            Some(p) => p.clone(),
            None => Arc::new(Slink::new(
                0,
                "local",
                PolicyKind::Sync,
                Fallbehind::default(),
                0,
            )),
        }
    }

    fn event(&self, kind: &'static str, detail: String) {
        self.events.raise(kind, detail);
    }

    fn ring_pressure(&self) -> bool {
        let s = self.replog.space();
        s.used_bytes.saturating_mul(100) >= s.capacity_bytes.saturating_mul(RING_PRESSURE_PERCENT)
    }
}

/// A broken invariant: log it and stop the process. Not a panic: inside a tokio task a panic
/// ends only that task, and the daemon would go on with the broken state.
pub(super) fn stop_the_process(what: &str) -> ! {
    tracing::error!("invariant broken, stopping: {what}");
    eprintln!("replicator: invariant broken, stopping: {what}");
    std::process::abort()
}

impl Role {
    fn to_replog(self) -> replog::Role {
        match self {
            Role::Primary => replog::Role::Primary,
            Role::Secondary => replog::Role::Secondary,
        }
    }

    fn from_replog(r: replog::Role) -> Option<Role> {
        match r {
            replog::Role::Primary => Some(Role::Primary),
            replog::Role::Secondary => Some(Role::Secondary),
            replog::Role::Unset => None,
        }
    }
}

/// The group's role, from its replog; `asked` is what the daemon asked for (`create
/// [--secondary]`, or the state dir record on a restart).
///
/// - A replog with no role yet (created just now, or written by a format-1 build) takes `asked`,
///   durably.
/// - A replog that has one keeps it: when `asked` differs, the replog wins and the mismatch is
///   logged. Why not refuse: the replog is where a role change (promotion, demotion) is written,
///   in one durable write with its epoch; the state dir record is written once at `create` and
///   lags behind any such change. Refusing would keep a promoted group from coming back after a
///   restart, and trusting the record would undo a durable promotion.
/// - A primary with no epoch yet begins epoch 1 at the replog's next lsn, in the same write as
///   its role (a primary always has a current epoch: the link handshake carries it).
pub(crate) fn settle_role(replog: &Replog, path: &Path, asked: Role) -> CoreResult<Role> {
    let stored = replog.role();
    let role = match Role::from_replog(stored) {
        Some(r) if r != asked => {
            tracing::warn!(
                replog = %path.display(),
                "the daemon's record says this group is {asked:?}, its replog says {r:?}: the \
                 replog wins (it holds every role change durably)"
            );
            r
        }
        Some(r) => r,
        None => asked,
    };
    let begin_epoch =
        (role == Role::Primary && replog.current_epoch().is_none()).then(|| replog::EpochStart {
            epoch: 1,
            start_lsn: replog.next_lsn(),
        });
    let update = replog::IdentityUpdate {
        role: (stored != role.to_replog()).then_some(role.to_replog()),
        begin_epoch,
        binding: None,
    };
    if update != replog::IdentityUpdate::default() {
        replog
            .update_identity(&update)
            .map_err(|e| CoreError::replog(path, e))?;
        tracing::info!(replog = %path.display(), "identity persisted: {update:?}");
    }
    Ok(role)
}

fn open_replog(spec: &GroupSpec) -> CoreResult<Replog> {
    open_replog_with(spec, REPLOG_DIRECT.load(Ordering::Relaxed))
}

/// Open (or create, as the spec says) a group's replog; `direct`: O_DIRECT.
pub(crate) fn open_replog_with(spec: &GroupSpec, direct: bool) -> CoreResult<Replog> {
    let io = replog::io::IoOptions {
        direct,
        ..Default::default()
    };
    let path = &spec.replog_path;
    let create = |size: u64| {
        Replog::create(
            path,
            &replog::CreateOptions {
                offset: spec.replog_offset,
                size,
                io: io.clone(),
            },
        )
        .map_err(|e| CoreError::replog(path, e))
    };
    let open = || {
        Replog::open(
            path,
            &replog::OpenOptions {
                offset: spec.replog_offset,
                io: io.clone(),
            },
        )
        .map(|(r, report)| {
            tracing::info!(replog = %path.display(), "recovered: {report:?}");
            r
        })
        .map_err(|e| CoreError::replog(path, e))
    };
    match spec.open {
        ReplogOpen::Open => open(),
        ReplogOpen::Create { size } => create(size),
        ReplogOpen::Auto { size } => match open() {
            Ok(r) => Ok(r),
            Err(e) => match size {
                Some(size) => {
                    tracing::info!(replog = %path.display(), "no usable replog ({e}); creating one");
                    create(size)
                }
                None => Err(e),
            },
        },
    }
}

pub(crate) fn open_dirty_log(
    spec: &DirtyLogSpec,
    device_size: u64,
) -> CoreResult<Option<DirtyLog>> {
    let mut log = match spec {
        DirtyLogSpec::None => return Ok(None),
        DirtyLogSpec::Core {
            region_size,
            initially_dirty,
        } => DirtyLog::core(device_size, *region_size, *initially_dirty),
        DirtyLogSpec::Disk {
            region_size,
            path,
            initially_dirty,
            ..
        } => DirtyLog::open_or_create_disk(path, device_size, *region_size, *initially_dirty),
    }
    .map_err(|e| CoreError::Io(format!("dirty log: {e}")))?;
    if let DirtyLogSpec::Disk {
        overwrite_existing: Some(all_dirty),
        ..
    } = spec
    {
        if *all_dirty {
            log.mark_all();
        } else {
            let dirty: Vec<u64> = log.dirty_regions().collect();
            for r in dirty {
                log.clear_region(r);
            }
        }
        log.persist()
            .map_err(|e| CoreError::Io(format!("dirty log: {e}")))?;
    }
    Ok(Some(log))
}

pub fn replog_key(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_shippable_only_up_to_the_durable_lsn() {
        assert_eq!(ship_horizon(10, 4), 4);
        assert_eq!(ship_horizon(4, 10), 4, "never past what is written");
    }

    #[test]
    fn a_persisted_cursor_never_exceeds_the_durable_lsn() {
        assert_eq!(persistable_cursor(10, 4), 4);
        assert_eq!(persistable_cursor(3, 4), 3);
    }
}
