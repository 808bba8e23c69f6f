//! Opening a group on the core: the replog (which says the role), slink 0's devices, the local
//! sites' devices, the tcp sites' links, the dirty logs, what they held ([`Restored`], with a
//! secondary's consistency flag), and the core's configuration.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use replog::Replog;

use crate::core::activity::ExtentKey;
use crate::core::index::Retained;
use crate::core::slink::{DownWait, SlinkConfig, Transport};
use crate::core::{Core, CoreConfig, DeviceConfig, Extent, Restored, Role};
use crate::engine::blockfile::BlockFile;
use crate::engine::group::{open_dirty_log, open_replog_with, settle_role, Role as GroupRole};
use crate::engine::link_thread::ASYNC_LINK_NICE;
use crate::engine::policy;
use crate::engine::spec::{DeviceSpec, DirtyLogSpec, GroupSpec, SlinkSpec};
use crate::engine::tcp::LinkSettings;

use super::tcp::{self, TcpLink, TcpSite};
use super::workers::{self, Queues};
use super::{GroupDriver, LocalSite, Shared, State};

/// What the table does not say.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Entry data kept in memory for slink 0 and the sites (beyond it they read the replog).
    pub entry_cache_bytes: usize,
    pub checkpoint_interval: Duration,
    pub ring_full_wait: Duration,
    /// How long writes wait for a sync site that is down when its table says nothing.
    pub default_down_wait: Duration,
    /// Activity log capacity in extents (the extent size is the replog's).
    pub activity_extents_max: usize,
    /// Open the replog with O_DIRECT.
    pub replog_direct: bool,
    /// Slinks whose dirty logs the caller created or overwrote before this open (it opens them
    /// early to create their files): their persisted marks are not what a drop floor counted on.
    pub marks_lost: Vec<u8>,
    /// Where the core's events go (the daemon's event log); without one they are only logged.
    pub events: Option<EventSink>,
    /// This site's identity and key, and the site ids of the addresses `tcp` slinks name.
    /// Default: none (a table with a `tcp` slink is refused).
    pub links: Option<Arc<LinkSettings>>,
    /// Entry data a `tcp` slink holds in memory for its link beyond what is on the wire (past it
    /// entries are read back from the replog when the link gets to them). Default: 16 MiB
    /// (about the link's default window).
    pub link_queue_bytes: usize,
}

/// Receives the core's events (`kind`, detail) as they happen, under the core's lock: it must
/// not block (the daemon's `Events::raise` bumps a counter and runs a hook in the background).
#[derive(Clone)]
pub struct EventSink(pub Arc<dyn Fn(&'static str, String) + Send + Sync>);

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            entry_cache_bytes: 256 << 20,
            checkpoint_interval: Duration::from_secs(1),
            ring_full_wait: Duration::from_secs(30),
            default_down_wait: Duration::from_secs(10),
            activity_extents_max: replog::format::AL_EXTENTS_MAX,
            replog_direct: false,
            events: None,
            marks_lost: Vec::new(),
            links: None,
            link_queue_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("replog {path}: {source}")]
    Replog {
        path: String,
        #[source]
        source: replog::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Open(#[from] crate::engine::CoreError),
}

fn file_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> OpenError + '_ {
    move |source| OpenError::File {
        path: path.display().to_string(),
        source,
    }
}

impl GroupDriver {
    /// Open the group: `group.slinks[*].devices` name every device of the group (`devices` gives
    /// their sizes). Recovery (replay onto slink 0, dirty marks after an unclean stop) starts
    /// before this returns and completes on the workers; writes may come at once.
    pub fn open(
        cfg: &DriverConfig,
        group: &GroupSpec,
        devices: &[DeviceSpec],
    ) -> Result<GroupDriver, OpenError> {
        let replog_err = |source| OpenError::Replog {
            path: group.replog_path.display().to_string(),
            source,
        };
        if let Some(s) = group.slinks.iter().find(|s| {
            !matches!(s.transport, "local" | "tcp") || (s.nr == 0 && s.transport != "local")
        }) {
            return Err(OpenError::Unsupported(format!(
                "slink {} is {}: this driver runs local slinks and tcp sites",
                s.nr, s.transport
            )));
        }
        let replog = Arc::new(open_replog_with(group, cfg.replog_direct)?);
        // The replog holds the role (every promotion and demotion is written there).
        let role = match replog.role() {
            replog::Role::Secondary => Role::Secondary,
            replog::Role::Primary | replog::Role::Unset => Role::Primary,
        };
        if role == Role::Primary {
            // A primary has its role and an epoch in its replog (its links name the epoch).
            settle_role(&replog, &group.replog_path, GroupRole::Primary)?;
        }
        if role == Role::Secondary && group.slinks.iter().any(|s| s.nr != 0) {
            return Err(OpenError::Unsupported(
                "a secondary group has only slink 0 (its own devices); the primary ships to it"
                    .into(),
            ));
        }
        let sizes: BTreeMap<u32, u64> = devices.iter().map(|d| (d.dev_nr, d.size)).collect();
        let last = replog.next_lsn().saturating_sub(1);
        // A secondary tells a connecting primary what it holds durably: what recovery found is
        // made durable before the core starts, so that position is known at once.
        let at_open = match role {
            Role::Secondary => {
                let durable = replog.flush().wait().map_err(replog_err)?;
                crate::core::Position {
                    lsn: durable.min(last),
                    resync_seq: 0,
                }
            }
            Role::Primary => crate::core::Position::default(),
        };

        let mut slink0 = BTreeMap::new();
        let mut sites = BTreeMap::new();
        let mut dirty_logs = BTreeMap::new();
        let mut slink_cfgs = Vec::new();
        let mut restored_dirty = Vec::new();
        let mut cursors = Vec::new();
        let mut resync_seq = Vec::new();
        let mut drop_floors = Vec::new();
        let mut marks_lost = Vec::new();
        let mut tcp_sites = BTreeMap::new();
        let mut links = Vec::new();
        for s in &group.slinks {
            let remote = s.transport == "tcp";
            let mut files = BTreeMap::new();
            let mut region_bytes = None;
            let mut marks_kept = !s.devices.is_empty();
            for d in &s.devices {
                marks_kept &= dirty_log_keeps_marks(&d.dirty_log);
                let size = *sizes.get(&d.dev_nr).ok_or_else(|| {
                    OpenError::Unsupported(format!("no size for device {}", d.dev_nr))
                })?;
                // A tcp site's device is named at the remote site; only its dirty log is here.
                if !remote {
                    let f = BlockFile::open(&d.path, size, true).map_err(file_err(&d.path))?;
                    files.insert(d.dev_nr, Arc::new(f));
                }
                if let Some(log) = open_dirty_log(&d.dirty_log, size)? {
                    region_bytes = Some(log.region_size());
                    for r in log.dirty_regions() {
                        restored_dirty.push((s.nr, d.dev_nr, r));
                    }
                    dirty_logs.insert((s.nr, d.dev_nr), Mutex::new(log));
                }
            }
            let cursor = match replog.cursor(s.nr) {
                Some(c) => c,
                None => {
                    replog.register_slink(s.nr, last).map_err(replog_err)?;
                    last
                }
            };
            cursors.push((s.nr, cursor));
            resync_seq.push((s.nr, replog.resync_seq(s.nr).map_err(replog_err)?));
            if let Some(floor) = replog.drop_floor(s.nr).map_err(replog_err)? {
                drop_floors.push((s.nr, floor));
            }
            if !marks_kept || cfg.marks_lost.contains(&s.nr) {
                marks_lost.push(s.nr);
            }
            let down_wait = match s.down_wait {
                Some(policy::DownWait::Forever) => DownWait::Forever,
                Some(policy::DownWait::For(d)) => DownWait::Bounded(d.as_nanos() as u64),
                None => DownWait::Bounded(cfg.default_down_wait.as_nanos() as u64),
            };
            slink_cfgs.push(SlinkConfig {
                nr: s.nr,
                transport: if remote {
                    Transport::Remote
                } else {
                    Transport::Local
                },
                policy: s.policy,
                fallbehind: s.fallbehind,
                down_wait,
                region_bytes: if s.nr == 0 { None } else { region_bytes },
            });
            if remote {
                let link = link_plan(cfg, group, s, &sizes, &replog)?;
                let done_device = s.devices.first().map_or(0, |d| d.dev_nr);
                let site = Arc::new(TcpSite::new(s.nr, cfg.link_queue_bytes, done_device));
                tcp_sites.insert(s.nr, site.clone());
                links.push((site, link));
            } else if s.nr == 0 {
                slink0 = files;
            } else {
                sites.insert(s.nr, LocalSite { devices: files });
            }
        }
        if slink_cfgs.first().is_none_or(|s| s.nr != 0) {
            return Err(OpenError::Unsupported(
                "a group's first slink is slink 0 (its own devices)".into(),
            ));
        }

        let restored = Restored {
            last_lsn: last,
            retained: retained(&replog),
            cursors,
            dirty: restored_dirty,
            resync_seq,
            drop_floors,
            marks_lost,
            activity_log: replog.activity_log().extents as Vec<ExtentKey>,
            consistent: role == Role::Primary || super::secondary::consistent_at_open(&replog),
        };
        let space = replog.space();
        let core_cfg = CoreConfig {
            role,
            devices: sizes
                .iter()
                .map(|(d, s)| DeviceConfig {
                    device: *d,
                    size: *s,
                })
                .collect(),
            slinks: slink_cfgs,
            ring_bytes: space.capacity_bytes,
            // Header plus alignment to the record granule, at most.
            record_overhead_bytes: 2 * replog::format::RECORD_GRANULE,
            ring_full_wait: cfg.ring_full_wait.as_nanos() as u64,
            checkpoint_interval: cfg.checkpoint_interval.as_nanos() as u64,
            activity_extent_bytes: replog.activity_log().extent_bytes,
            activity_extents_max: cfg.activity_extents_max.min(replog::format::AL_EXTENTS_MAX),
        };
        let (core, first) = Core::new(core_cfg, restored, 0);
        let site_nrs: Vec<u8> = sites.keys().copied().collect();
        let (queues, receivers) = Queues::new(&site_nrs);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                core,
                requests: HashMap::new(),
                next_id: 1,
                entries: BTreeMap::new(),
                entry_bytes: 0,
                stopped: false,
                keep_one_apply: false,
                kept_apply: None,
                inbound: super::secondary::Inbound::new(at_open),
            }),
            stopped: Condvar::new(),
            replog,
            name: group.replog_path.display().to_string(),
            clock: Instant::now(),
            slink0,
            sites,
            dirty: dirty_logs,
            tcp: tcp_sites,
            queues,
            entry_cache_bytes: cfg.entry_cache_bytes,
            events: cfg.events.clone(),
        });
        let mut threads = workers::spawn(&shared, receivers);
        threads.extend(tcp::spawn_workers(&shared));
        {
            let mut st = shared.lock();
            for c in first {
                if shared.execute(&mut st, c).is_some() {
                    super::stop_the_process("the core appended during recovery");
                }
            }
        }
        let driver = GroupDriver {
            shared,
            threads: Mutex::new(threads),
            links: Mutex::new(Vec::new()),
        };
        // Last: a link that comes up hands the core its LinkUp at once.
        for (site, plan) in links {
            let link = TcpLink::start(&site, &plan.address, plan.site, plan.identity, plan.nice)
                .map_err(OpenError::Unsupported)?;
            driver
                .links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(link);
        }
        Ok(driver)
    }
}

/// Whether a dirty log opens with the marks it persisted before (asked before it is opened, which
/// may create it): a `disk` log that exists and is not overwritten by the table. A persisted drop
/// floor holds only together with those marks (`Restored::marks_lost`).
pub(crate) fn dirty_log_keeps_marks(spec: &DirtyLogSpec) -> bool {
    match spec {
        DirtyLogSpec::Disk {
            path,
            overwrite_existing: None,
            ..
        } => path.exists(),
        DirtyLogSpec::Disk { .. } | DirtyLogSpec::Core { .. } | DirtyLogSpec::None => false,
    }
}

/// What starts a tcp slink's link.
struct LinkPlan {
    address: String,
    site: slink::SiteConfig,
    identity: slink::LinkIdentity,
    nice: i32,
}

fn link_plan(
    cfg: &DriverConfig,
    group: &GroupSpec,
    s: &SlinkSpec,
    sizes: &BTreeMap<u32, u64>,
    replog: &Replog,
) -> Result<LinkPlan, OpenError> {
    let unsupported = |why: String| OpenError::Unsupported(format!("slink {}: {why}", s.nr));
    let settings = cfg.links.as_ref().ok_or_else(|| {
        unsupported("tcp, but the driver has no link settings (site id, key, peers)".into())
    })?;
    let address = s
        .remote_addr
        .clone()
        .ok_or_else(|| unsupported("tcp without an address".into()))?;
    let receiver_site = settings.peers.get(&address).cloned().ok_or_else(|| {
        unsupported(format!(
            "no site id for {address}; name it with --peer SITE@{address}"
        ))
    })?;
    let epoch = replog.current_epoch().map(|e| e.epoch).ok_or_else(|| {
        unsupported(format!(
            "the replog {} has no epoch",
            group.replog_path.display()
        ))
    })?;
    let devices = s
        .devices
        .iter()
        .map(|d| slink::DeviceInfo {
            device: d.dev_nr,
            size_bytes: sizes.get(&d.dev_nr).copied().unwrap_or(0),
        })
        .collect();
    Ok(LinkPlan {
        address,
        site: settings.site.clone(),
        identity: slink::LinkIdentity {
            receiver_site,
            group_uuid: replog.uuid(),
            epoch,
            devices,
            // It ships resync pieces (ResyncData) and completion markers (ResyncDone).
            features: slink::handshake::FEATURE_RESYNC,
        },
        // An async site's shipping uses the CPU the application leaves (engine::link_thread).
        nice: if s.policy == policy::PolicyKind::Async {
            ASYNC_LINK_NICE
        } else {
            0
        },
    })
}

/// The entries the ring retains, in lsn order (their extents only).
fn retained(replog: &Replog) -> Vec<Retained> {
    let mut out = Vec::new();
    let mut from = replog.first_lsn().max(1);
    loop {
        let batch = replog.extents_from(from, 4096);
        let Some(l) = batch.last() else { break };
        from = l.lsn + 1;
        for e in batch {
            out.push(Retained {
                lsn: e.lsn,
                extent: Extent {
                    device: e.device,
                    offset: e.offset,
                    len: e.len,
                },
                ring_bytes: e.record_bytes,
                at: 0,
            });
        }
    }
    out
}
