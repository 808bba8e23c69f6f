//! A group as the daemon runs it: the tables that joined it (its devices), its events and
//! counters, and the driver of its core ([`crate::driver::GroupDriver`]).
//!
//! # Why a group is opened more than once
//! The core is built for a fixed set of devices, and a halted core is not resumed. So the
//! driver is opened again, from the group's disks, when
//! - a device joins or leaves a running group (a clean stop first: drain, checkpoint, empty
//!   activity log, so the next open is not an unclean start), and
//! - the core halted (a replog failure: every waiting request already got EIO; the next open is
//!   the recovery of a kill -9, retried with a backoff while it fails).
//!
//! Requests hold the group's driver slot for reading while they run; a reopen takes it for
//! writing, so it waits for the requests in flight and new ones wait for the new driver (at most
//! [`REOPEN_WAIT`], then they fail with EIO). A table's one-shot choices (create the replog,
//! overwrite a dirty log as all dirty or all clean) apply to the first open only.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use replog::{EntryKind, Replog};
use tokio::sync::RwLock;

use crate::core::slink::SlinkState;
use crate::core::Failure;
use crate::driver::{DriverConfig, EventSink, GroupDriver};
use crate::engine::blockfile::BlockFile;
use crate::engine::events::Events;
use crate::engine::group::{open_dirty_log, open_replog_with, settle_role, Role};
use crate::engine::spec::{DeviceSpec, DirtyLogSpec, GroupSpec, ReplogOpen, SlinkSpec};
use crate::engine::CoreError;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
#[path = "group_tests.rs"]
mod tests;

/// How long a request waits for a group that is being opened again.
pub const REOPEN_WAIT: Duration = Duration::from_secs(30);
/// Backoff between attempts to open a halted group again.
const REOPEN_BACKOFF_FIRST: Duration = Duration::from_millis(200);
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A device of the group: the table that made it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub name: String,
    pub dev_nr: u32,
    pub size: u64,
    pub table: String,
}

/// What the next open of the driver is built from.
struct Members {
    spec: GroupSpec,
    /// Slinks whose dirty logs were created or overwritten since the last driver open.
    marks_lost: Vec<u8>,
    devices: BTreeMap<u32, (DeviceSpec, DeviceInfo)>,
}

pub struct Group {
    pub replog_path: PathBuf,
    pub events: Arc<Events>,
    role: Role,
    cfg: DriverConfig,
    members: Mutex<Members>,
    /// The running driver (None before `start`, while reopening, and after `shutdown`).
    driver: RwLock<Option<Arc<GroupDriver>>>,
    started: AtomicBool,
    /// Set by `shutdown`: a driver that stops now is not opened again.
    stopping: AtomicBool,
    pub writes_total: AtomicU64,
    pub overflows_total: AtomicU64,
    pub reopens_total: AtomicU64,
    write_latency: prometheus::Histogram,
}

fn replog_error(path: &std::path::Path, e: replog::Error) -> CoreError {
    CoreError::replog(path, e)
}

impl Group {
    /// Open (or create) the group's replog for its first table and settle its role; the driver
    /// starts with [`Group::start`], once every device of the group joined.
    pub fn open(
        spec: &GroupSpec,
        device: &DeviceSpec,
        name: &str,
        table: &str,
        hook: Option<String>,
        role: Role,
        mut cfg: DriverConfig,
    ) -> Result<Arc<Group>, CoreError> {
        let replog = open_replog_with(spec, cfg.replog_direct)?;
        let role = settle_role(&replog, &spec.replog_path, role)?;
        if role == Role::Secondary && spec.slinks.iter().any(|s| s.nr != 0) {
            return Err(CoreError::Invalid(
                "a secondary group has only slink 0 (its own devices); the primary ships to it"
                    .into(),
            ));
        }
        if role == Role::Secondary {
            super::link::adopt_legacy_binding(&replog, &spec.replog_path)
                .map_err(CoreError::Invalid)?;
        }
        // This writer keeps the activity log: its extents say where slink 0 may be ahead of the
        // replog after an unclean stop.
        let features = replog.features();
        if features & replog::format::FEATURE_ACTIVITY_LOG == 0 {
            replog
                .set_features(features | replog::format::FEATURE_ACTIVITY_LOG)
                .map_err(|e| replog_error(&spec.replog_path, e))?;
        }
        drop(replog);
        let key = spec.replog_path.display().to_string();
        let events = Arc::new(Events::new(&key, hook));
        let write_latency = crate::metrics::write_latency().with_label_values(&[key.as_str()]);
        let group = Arc::new_cyclic(|me: &std::sync::Weak<Group>| {
            let me = me.clone();
            cfg.events = Some(EventSink(Arc::new(move |kind, detail| {
                if let Some(g) = me.upgrade() {
                    g.on_event(kind, detail);
                }
            })));
            let mut spec = spec.clone();
            // The replog exists now: every later open opens it.
            spec.open = ReplogOpen::Open;
            for s in &mut spec.slinks {
                s.devices.clear();
            }
            Group {
                replog_path: spec.replog_path.clone(),
                events,
                role,
                cfg,
                members: Mutex::new(Members {
                    spec,
                    marks_lost: Vec::new(),
                    devices: BTreeMap::new(),
                }),
                driver: RwLock::new(None),
                started: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                writes_total: AtomicU64::new(0),
                overflows_total: AtomicU64::new(0),
                reopens_total: AtomicU64::new(0),
                write_latency,
            }
        });
        group.add_device(spec, device, name, table)?;
        Ok(group)
    }

    fn members(&self) -> MutexGuard<'_, Members> {
        match self.members.lock() {
            Ok(m) => m,
            Err(_) => crate::driver::stop_the_process(&format!(
                "group {}: the members lock is poisoned",
                self.replog_path.display()
            )),
        }
    }

    fn on_event(&self, kind: &'static str, detail: String) {
        if kind == "overflow" {
            self.overflows_total.fetch_add(1, Ordering::Relaxed);
        }
        self.events.raise(kind, detail);
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Join a device (a table that names this group's replog). The slinks of a group are fixed
    /// by its first table; later tables must name the same ones.
    pub fn add_device(
        &self,
        spec: &GroupSpec,
        device: &DeviceSpec,
        name: &str,
        table: &str,
    ) -> Result<(), CoreError> {
        let mut m = self.members();
        if let Some((_, d)) = m.devices.get(&device.dev_nr) {
            return Err(CoreError::Invalid(format!(
                "device number {} is already in this group as {}",
                device.dev_nr, d.name
            )));
        }
        if spec.slinks.len() != m.spec.slinks.len() {
            return Err(CoreError::Invalid(format!(
                "the table names {} slinks, the group has {}",
                spec.slinks.len(),
                m.spec.slinks.len()
            )));
        }
        let mut joined = Vec::new();
        for s in &spec.slinks {
            let Some(mine) = m.spec.slinks.iter().find(|x| x.nr == s.nr) else {
                return Err(CoreError::Invalid(format!(
                    "slink {} is not a slink of the group of {}",
                    s.nr,
                    self.replog_path.display()
                )));
            };
            if mine.policy != s.policy
                || mine.transport != s.transport
                || mine.remote_addr != s.remote_addr
            {
                return Err(CoreError::Invalid(format!(
                    "slink {} policy/transport differs from the group's",
                    s.nr
                )));
            }
            let site = s
                .devices
                .iter()
                .find(|d| d.dev_nr == device.dev_nr)
                .ok_or_else(|| {
                    CoreError::Invalid(format!("slink {} has no device {}", s.nr, device.dev_nr))
                })?;
            joined.push((s.nr, site.clone()));
        }
        // The files exist (are created) now, before the caller locks what it claimed; the
        // table's one-shot dirty log choice (overwrite all dirty or all clean) is spent here.
        let mut marks_lost = Vec::new();
        for (nr, site) in &mut joined {
            if !crate::driver::dirty_log_keeps_marks(&site.dirty_log) {
                marks_lost.push(*nr);
            }
            let remote = spec
                .slinks
                .iter()
                .any(|s| s.nr == *nr && s.remote_addr.is_some());
            if !remote {
                BlockFile::open(&site.path, device.size, true)
                    .map_err(|e| CoreError::Io(format!("slink {nr}: {e}")))?;
            }
            if let DirtyLogSpec::Disk { .. } = site.dirty_log {
                open_dirty_log(&site.dirty_log, device.size)?;
            }
            site.dirty_log = reopened_dirty_log(&site.dirty_log, false);
        }
        m.marks_lost.extend(marks_lost);
        for (nr, site) in joined {
            if let Some(mine) = m.spec.slinks.iter_mut().find(|x| x.nr == nr) {
                mine.devices.push(site);
            }
        }
        let info = DeviceInfo {
            name: name.to_string(),
            dev_nr: device.dev_nr,
            size: device.size,
            table: table.to_string(),
        };
        m.devices.insert(device.dev_nr, (device.clone(), info));
        drop(m);
        self.events.raise(
            "device-added",
            format!("device {} ({name}) joined", device.dev_nr),
        );
        Ok(())
    }

    /// After a device joined: a running group is opened again with it.
    pub fn device_joined(self: &Arc<Self>) -> Result<(), CoreError> {
        if self.started.load(Ordering::Acquire) {
            self.reopen("a device joined")?;
        }
        Ok(())
    }

    /// Take a device out of the group; true when it was the last one (the caller shuts the
    /// group down). A running group with devices left is opened again without it.
    pub fn remove_device(self: &Arc<Self>, dev_nr: u32) -> bool {
        let last = {
            let mut m = self.members();
            m.devices.remove(&dev_nr);
            for s in &mut m.spec.slinks {
                s.devices.retain(|d| d.dev_nr != dev_nr);
            }
            m.devices.is_empty()
        };
        if !last && self.started.load(Ordering::Acquire) {
            if let Err(e) = self.reopen("a device left") {
                tracing::error!(replog = %self.replog_path.display(), "{e}");
            }
        }
        last
    }

    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.members()
            .devices
            .values()
            .map(|(_, i)| i.clone())
            .collect()
    }

    /// Open the driver (once every device of the group joined).
    pub fn start(self: &Arc<Self>) -> Result<(), CoreError> {
        if self.started.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut slot = self.driver.blocking_write();
        match self.open_driver() {
            Ok(d) => {
                *slot = Some(d);
                Ok(())
            }
            Err(e) => {
                self.started.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// A new driver from the members; the table's one-shot choices are spent by the first.
    fn open_driver(self: &Arc<Self>) -> Result<Arc<GroupDriver>, CoreError> {
        let (spec, devices, marks_lost) = {
            let m = self.members();
            let devices: Vec<DeviceSpec> = m.devices.values().map(|(d, _)| d.clone()).collect();
            (m.spec.clone(), devices, m.marks_lost.clone())
        };
        let cfg = DriverConfig {
            marks_lost,
            ..self.cfg.clone()
        };
        let driver = GroupDriver::open(&cfg, &spec, &devices)
            .map_err(|e| CoreError::Invalid(e.to_string()))?;
        {
            let mut m = self.members();
            m.marks_lost.clear();
            for s in &mut m.spec.slinks {
                for d in &mut s.devices {
                    d.dirty_log = reopened_dirty_log(&d.dirty_log, true);
                }
            }
        }
        let driver = Arc::new(driver);
        self.watch(&driver);
        Ok(driver)
    }

    /// A thread that waits for the driver to stop and opens the group again if it halted.
    fn watch(self: &Arc<Self>, driver: &Arc<GroupDriver>) {
        let me = Arc::downgrade(self);
        let d = Arc::downgrade(driver);
        let spawned = std::thread::Builder::new()
            .name("group-watch".into())
            .spawn(move || {
                let halted = match d.upgrade() {
                    Some(d) => d.wait_stopped(),
                    None => return,
                };
                let Some(g) = me.upgrade() else { return };
                if halted && !g.stopping.load(Ordering::Acquire) {
                    g.reopen_after_halt();
                }
            });
        if let Err(e) = spawned {
            crate::driver::stop_the_process(&format!(
                "group {}: no thread to watch the driver: {e}",
                self.replog_path.display()
            ));
        }
    }

    /// Stop the running driver cleanly and open a new one (device set changed).
    fn reopen(self: &Arc<Self>, why: &str) -> Result<(), CoreError> {
        let mut slot = self.driver.blocking_write();
        if let Some(old) = slot.take() {
            // The watcher sees a shutdown, not a halt: it does not reopen.
            old.shutdown();
        }
        let d = self.open_driver()?;
        *slot = Some(d);
        self.reopens_total.fetch_add(1, Ordering::Relaxed);
        self.events.raise("reopened", why.to_string());
        Ok(())
    }

    /// The core halted: open the group from its disks until it works (or the group stops).
    fn reopen_after_halt(self: &Arc<Self>) {
        let mut slot = self.driver.blocking_write();
        if let Some(old) = slot.take() {
            old.shutdown();
        }
        let mut backoff = REOPEN_BACKOFF_FIRST;
        loop {
            if self.stopping.load(Ordering::Acquire) {
                return;
            }
            match self.open_driver() {
                Ok(d) => {
                    *slot = Some(d);
                    self.reopens_total.fetch_add(1, Ordering::Relaxed);
                    self.events
                        .raise("reopened", "after a halt, from the group's disks");
                    return;
                }
                Err(e) => {
                    self.events.raise(
                        "reopen-failed",
                        format!("{e}; next attempt in {} ms", backoff.as_millis()),
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(REOPEN_BACKOFF_MAX);
                }
            }
        }
    }

    /// Drain, checkpoint and stop; the group is not opened again.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let mut slot = self.driver.blocking_write();
        if let Some(d) = slot.take() {
            d.shutdown();
        }
    }

    /// The running driver, waiting for a reopen in progress and for a halted driver to be
    /// replaced (at most [`REOPEN_WAIT`]). The guard keeps a reopen from starting until the
    /// request is done.
    async fn running(
        &self,
    ) -> Result<
        (
            tokio::sync::RwLockReadGuard<'_, Option<Arc<GroupDriver>>>,
            Arc<GroupDriver>,
        ),
        Failure,
    > {
        let deadline = tokio::time::Instant::now() + REOPEN_WAIT;
        let reopening = || Failure::Io("the group is being opened again; try later".into());
        loop {
            let slot = tokio::time::timeout_at(deadline, self.driver.read())
                .await
                .map_err(|_| reopening())?;
            if let Some(d) = slot.as_ref().filter(|d| !d.is_halted()).cloned() {
                return Ok((slot, d));
            }
            drop(slot);
            if self.stopping.load(Ordering::Acquire) || !self.started.load(Ordering::Acquire) {
                return Err(Failure::Io("the group is not running".into()));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(reopening());
            }
            // The watcher has not taken the halted driver yet, or a reopen failed and retries.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A client write; resolves once the core's promises for it hold. (A core that halts
    /// between the check in `running` and this write refuses it with `Failure::Halted`: the
    /// client gets EIO for a write that was never admitted.)
    pub async fn submit(
        &self,
        device: u32,
        offset: u64,
        kind: EntryKind,
        len: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), Failure> {
        let started = Instant::now();
        let (slot, d) = self.running().await?;
        let r = d.write(device, offset, kind, len, data, fua).await;
        drop(slot);
        if r.is_ok() {
            self.writes_total.fetch_add(1, Ordering::Relaxed);
            self.write_latency.observe(started.elapsed().as_secs_f64());
        }
        r
    }

    /// Every write acknowledged before this is durable. A flush a halting core refused is sent
    /// again to the group opened again (it carries no data).
    pub async fn flush(&self) -> Result<(), Failure> {
        loop {
            let (slot, d) = self.running().await?;
            match d.flush().await {
                Err(Failure::Halted) => drop(slot),
                r => return r,
            }
        }
    }

    /// Read from this site's device (blocking: call it off the async runtime).
    pub fn read(&self, device: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self.driver.blocking_read().as_ref() {
            Some(d) => d.read(device, offset, buf),
            None => Err(std::io::Error::other("the group is not running")),
        }
    }

    /// Run `f` on the running driver (status, operator requests); None when it is not running.
    pub fn with_driver<T>(&self, f: impl FnOnce(&GroupDriver) -> T) -> Option<T> {
        let slot = self.driver.try_read().ok()?;
        slot.as_ref().map(|d| f(d))
    }

    /// Secondary: a primary's new session begins; the position this site holds durably (what
    /// the primary resends after). Items held from an older session are dropped.
    pub async fn durable_position(&self) -> Result<slink::Position, String> {
        let (_slot, d) = self.running().await.map_err(|e| e.to_string())?;
        Ok(d.durable_position())
    }

    /// Secondary: store items from the primary durably; the position now durable.
    pub async fn store(&self, items: Vec<slink::Item>) -> Result<slink::Position, String> {
        let (slot, d) = self.running().await.map_err(|e| e.to_string())?;
        let r = d.store(items).await;
        drop(slot);
        r
    }

    /// The replog, for status (None while the group is not running).
    pub fn replog(&self) -> Option<Arc<Replog>> {
        self.with_driver(|d| d.replog().clone())
    }
}

/// What a dirty log spec becomes once its table's choices are spent: an on-disk log keeps what
/// it holds (the overwrite is done once, when the device joins); an in-memory log, once a
/// driver ran with it (`core_log_ran`), lost its marks with that driver, so it starts all dirty
/// (a full copy is the only safe repair of what it forgot).
fn reopened_dirty_log(spec: &DirtyLogSpec, core_log_ran: bool) -> DirtyLogSpec {
    match spec {
        DirtyLogSpec::None => DirtyLogSpec::None,
        DirtyLogSpec::Core {
            region_size,
            initially_dirty,
        } => DirtyLogSpec::Core {
            region_size: *region_size,
            initially_dirty: *initially_dirty || core_log_ran,
        },
        DirtyLogSpec::Disk {
            region_size,
            path,
            initially_dirty,
            ..
        } => DirtyLogSpec::Disk {
            region_size: *region_size,
            path: path.clone(),
            initially_dirty: *initially_dirty,
            overwrite_existing: None,
        },
    }
}

/// One slink of a group as `status` shows it for one device.
pub struct SlinkView {
    pub status: crate::control::SlinkStatus,
    /// The dm-style status letter of its state and of the device's health.
    pub state_letter: char,
    pub health_letter: char,
}

/// Status names of slink states (those the daemon has always shown).
fn state_name(s: SlinkState) -> (&'static str, char) {
    match s {
        SlinkState::Up => ("up", 'U'),
        SlinkState::Resync => ("resync", 'R'),
        SlinkState::Down => ("down", 'D'),
        SlinkState::OutOfDate => ("outdated", 'O'),
        SlinkState::Faulty => ("faulty", 'F'),
        SlinkState::Stopped => ("stopped", 'S'),
    }
}

fn policy_text(s: &SlinkSpec) -> String {
    let mut policy = format!("{:?}", s.policy).to_lowercase();
    if let Some(v) = s.fallbehind.ios {
        policy.push_str(&format!(" ios={v}"));
    }
    if let Some(v) = s.fallbehind.bytes {
        policy.push_str(&format!(" size={v}"));
    }
    if let Some(v) = s.fallbehind.timeout {
        policy.push_str(&format!(" timeout={}ms", v.as_millis()));
    }
    policy
}

impl Group {
    /// Every slink of the group as seen from device `dev_nr` (its path at each site, its dirty
    /// bytes); positions and states come from the core.
    pub fn slink_views(&self, dev_nr: u32) -> Vec<SlinkView> {
        let specs = self.members().spec.slinks.clone();
        let links = self
            .with_driver(|d| specs.iter().map(|s| d.link(s.nr)).collect::<Vec<_>>())
            .unwrap_or_default();
        let core_views = self.with_driver(|d| {
            let replog = d.replog().clone();
            d.with_core(|c| {
                specs
                    .iter()
                    .map(|s| {
                        c.slink(s.nr).map(|sl| {
                            let applied = if s.nr == 0 { c.applied0() } else { sl.acked };
                            (
                                sl.state(),
                                sl.mode,
                                applied,
                                replog.cursor(s.nr).unwrap_or(0),
                                c.lag(s.nr),
                                sl.dirty.device_dirty_bytes(dev_nr),
                            )
                        })
                    })
                    .collect::<Vec<_>>()
            })
        });
        specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let core = core_views
                    .as_ref()
                    .and_then(|v| v.get(i).copied().flatten());
                let (state, mode, applied, cursor, lag, dirty) = core.unwrap_or((
                    SlinkState::Stopped,
                    crate::engine::policy::Mode::Async,
                    0,
                    0,
                    crate::engine::policy::Lag::default(),
                    0,
                ));
                let (state_text, state_letter) = state_name(state);
                let health_letter = if state == SlinkState::Faulty {
                    'F'
                } else {
                    'A'
                };
                let path = s
                    .devices
                    .iter()
                    .find(|d| d.dev_nr == dev_nr)
                    .map(|d| match &s.remote_addr {
                        Some(addr) => format!("tcp://{addr}/{}", d.path.display()),
                        None => d.path.display().to_string(),
                    })
                    .unwrap_or_default();
                SlinkView {
                    status: crate::control::SlinkStatus {
                        slink: s.nr,
                        transport: s.transport.to_string(),
                        policy: policy_text(s),
                        mode: format!("{mode:?}").to_lowercase(),
                        state: state_text.to_string(),
                        applied_lsn: applied,
                        cursor_lsn: cursor,
                        lag_ios: lag.ios,
                        lag_bytes: lag.bytes,
                        lag_seconds: lag.age.as_secs_f64(),
                        dirty_bytes: dirty,
                        health: health_letter.to_string(),
                        device_path: path,
                        link: links.get(i).cloned().flatten(),
                    },
                    state_letter,
                    health_letter,
                }
            })
            .collect()
    }

    /// Operator: every slink checkpoints now.
    pub fn checkpoint_now(&self) -> bool {
        self.with_driver(|d| d.checkpoint_now()).is_some()
    }

    /// Operator: copy device `dev_nr` to slink `nr` again. Errors name what is missing.
    pub fn resync_device(&self, nr: u8, dev_nr: u32) -> Result<(), String> {
        let has_log = {
            let m = self.members();
            let Some(s) = m.spec.slinks.iter().find(|s| s.nr == nr && s.nr != 0) else {
                return Err(format!("resync: no remote slink {nr}"));
            };
            let Some(d) = s.devices.iter().find(|d| d.dev_nr == dev_nr) else {
                return Err(format!("resync: slink {nr} has no device {dev_nr}"));
            };
            !matches!(d.dirty_log, DirtyLogSpec::None)
        };
        if !has_log {
            return Err(format!("resync: slink {nr} has no dirty log (`- 0`)"));
        }
        self.with_driver(|d| d.resync_device(nr, dev_nr))
            .ok_or_else(|| "resync: the group is not running".to_string())?;
        self.events.raise(
            "resync-requested",
            format!("slink {nr} device {dev_nr} full resync"),
        );
        Ok(())
    }

    /// Operator: pause or resume shipping to slink `nr`.
    pub fn pause(&self, nr: u8, paused: bool) -> Result<(), String> {
        let known = self
            .members()
            .spec
            .slinks
            .iter()
            .any(|s| s.nr == nr && nr != 0);
        if !known {
            return Err(format!("no remote slink `{nr}`"));
        }
        self.with_driver(|d| d.pause(nr, paused))
            .ok_or_else(|| "the group is not running".to_string())
    }

    /// Dirty regions slink `nr` copied since the group was last opened (metrics).
    pub fn regions_copied(&self, nr: u8) -> Option<u64> {
        self.with_driver(|d| d.with_core(|c| c.slink(nr).map(|s| s.regions_copied)))
            .flatten()
    }

    /// How many slinks the group has (slink 0 included).
    pub fn slink_count(&self) -> usize {
        self.members().spec.slinks.len()
    }
}
