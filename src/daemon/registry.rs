//! The daemon's devices and groups, by name: what `create` adds and `remove` takes away.
//!
//! Tables that name the same replog (same canonical path) form one group; each table is one
//! device of it, exported over NBD under its name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::control::{DeviceStatus, ReplogStatus, SlinkStatus};
use crate::engine::group::{replog_key, Group, Role};
use crate::engine::slink::Health;
use crate::engine::spec::{self, ReplogOpen};
use crate::engine::tcp::LinkSettings;
use crate::table;

#[derive(Clone)]
pub struct DeviceHandle {
    pub name: String,
    pub group: Arc<Group>,
    pub dev_nr: u32,
    pub size: u64,
    pub table: String,
}

#[derive(Default)]
pub struct Registry {
    devices: RwLock<BTreeMap<String, DeviceHandle>>,
    groups: RwLock<BTreeMap<PathBuf, Arc<Group>>>,
    pub event_hook: Option<String>,
    pub links: Option<Arc<LinkSettings>>,
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

impl Registry {
    pub fn new(event_hook: Option<String>, links: Option<Arc<LinkSettings>>) -> Self {
        Registry {
            event_hook,
            links,
            ..Default::default()
        }
    }

    pub fn get(&self, name: &str) -> Option<DeviceHandle> {
        self.devices.read().ok()?.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.devices
            .read()
            .map(|d| d.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Create a device from a table. `reopen` is set when a daemon restores its groups.
    pub fn create(
        &self,
        name: &str,
        table_text: &str,
        source: &str,
        cwd: &Path,
        reopen: bool,
        role: Role,
    ) -> Result<DeviceHandle, String> {
        if !valid_name(name) {
            return Err(format!(
                "invalid device name `{name}`: use letters, digits, '-', '_' and '.'"
            ));
        }
        if self.get(name).is_some() {
            return Err(format!("device `{name}` already exists"));
        }
        let parsed = table::parse(table_text, source).map_err(|e| e.to_string())?;
        for w in &parsed.warnings {
            tracing::warn!("{w}");
        }
        let target = match parsed.targets.as_slice() {
            [t] => t,
            [] => return Err(format!("{source}: the table has no target")),
            _ => {
                return Err(format!(
                    "{source}: one replicator target per device; this table has {}",
                    parsed.targets.len()
                ))
            }
        };
        if target.start_sectors != 0 {
            return Err(format!(
                "{source}: a replicator target must start at sector 0"
            ));
        }
        let (gspec, dspec) = spec::from_target(target, cwd, reopen);
        let key = replog_key(&gspec.replog_path);
        let existing = self.groups.read().ok().and_then(|g| g.get(&key).cloned());
        let group = match existing {
            Some(g) => {
                if let ReplogOpen::Create { .. } = gspec.open {
                    return Err(format!(
                        "{source}: replog {} is in use by a group; join it with `open`, not `create`",
                        gspec.replog_path.display()
                    ));
                }
                if g.role() != role {
                    return Err(format!(
                        "{source}: replog {} belongs to a {:?} group; this device was created as {:?}",
                        gspec.replog_path.display(),
                        g.role(),
                        role
                    ));
                }
                g.add_device(&gspec, &dspec, name, table_text)
                    .map_err(|e| e.to_string())?;
                g.device_joined().map_err(|e| e.to_string())?;
                g
            }
            None => {
                let g = Group::open(
                    &gspec,
                    &dspec,
                    name,
                    table_text,
                    self.event_hook.clone(),
                    role,
                    self.links.clone(),
                )
                .map_err(|e| e.to_string())?;
                if let Ok(mut groups) = self.groups.write() {
                    groups.insert(replog_key(&gspec.replog_path), g.clone());
                }
                g
            }
        };
        if !reopen {
            // A daemon restoring its groups starts them once every device is back (start_all).
            group.start().map_err(|e| e.to_string())?;
        }
        let handle = DeviceHandle {
            name: name.to_string(),
            group,
            dev_nr: dspec.dev_nr,
            size: dspec.size,
            table: table_text.to_string(),
        };
        if let Ok(mut d) = self.devices.write() {
            d.insert(name.to_string(), handle.clone());
        }
        Ok(handle)
    }

    /// Flush and forget a device; the group goes with its last device.
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        let handle = self
            .get(name)
            .ok_or_else(|| format!("no device `{name}`"))?;
        handle.group.flush().await.map_err(|e| e.to_string())?;
        if let Ok(mut d) = self.devices.write() {
            d.remove(name);
        }
        if handle.group.remove_device(handle.dev_nr) {
            let key = replog_key(&handle.group.replog_path);
            if let Ok(mut g) = self.groups.write() {
                g.remove(&key);
            }
            let group = handle.group.clone();
            tokio::task::spawn_blocking(move || group.shutdown())
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub fn status(&self, name: &str) -> Option<DeviceStatus> {
        let h = self.get(name)?;
        Some(device_status(&h))
    }

    /// Start every group that is not running (after a restore).
    pub fn start_all(&self) {
        for g in self.groups() {
            if let Err(e) = g.start() {
                tracing::error!(replog = %g.replog_path.display(), "group did not start: {e}");
            }
        }
    }

    /// Stop every group (SIGTERM): appliers drain what is written, cursors are saved.
    pub fn shutdown_all(&self) {
        for g in self.groups() {
            g.shutdown();
        }
    }
}

fn state_letter(s: crate::engine::slink::SlinkState) -> char {
    use crate::engine::slink::SlinkState::*;
    match s {
        Down => 'D',
        Up => 'U',
        Resync => 'R',
        Faulty => 'F',
        Stopped => 'S',
        Outdated => 'O',
    }
}

pub fn device_status(h: &DeviceHandle) -> DeviceStatus {
    let g = &h.group;
    let space = g.replog.space();
    let mut slinks = Vec::new();
    let mut line_slinks = String::new();
    for s in &g.slinks {
        let lag = g.lag(s);
        let dev = s.device(h.dev_nr);
        let health = dev
            .as_ref()
            .map(|d| Health::letter(d.health.load(std::sync::atomic::Ordering::Relaxed)))
            .unwrap_or('-');
        let dirty_bytes = dev.as_ref().map(|d| d.dirty_bytes()).unwrap_or(0);
        let mode = format!("{:?}", s.mode()).to_lowercase();
        let state = s.state();
        line_slinks.push_str(&format!(
            " {} {}{} {} {} {} {}",
            s.nr,
            state_letter(state),
            health,
            mode,
            lag.ios,
            lag.bytes,
            dirty_bytes
        ));
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
        slinks.push(SlinkStatus {
            slink: s.nr,
            transport: s.transport.to_string(),
            policy,
            mode,
            state: serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            applied_lsn: s.applied(),
            cursor_lsn: g.replog.cursor(s.nr).unwrap_or(0),
            lag_ios: lag.ios,
            lag_bytes: lag.bytes,
            lag_seconds: lag.age.as_secs_f64(),
            dirty_bytes,
            health: health.to_string(),
            device_path: dev.as_ref().map(|d| d.location.clone()).unwrap_or_default(),
            link: s.link.lock().ok().and_then(|l| l.clone()),
        });
    }
    let sectors = h.size / 512;
    let line = format!(
        "0 {sectors} replicator {}/{} {}{}",
        space.used_bytes / 512,
        space.capacity_bytes / 512,
        g.slinks.len(),
        line_slinks
    );
    DeviceStatus {
        name: h.name.clone(),
        role: match g.role() {
            Role::Primary => "primary".into(),
            Role::Secondary => "secondary".into(),
        },
        dev_nr: h.dev_nr,
        size_bytes: h.size,
        replog: ReplogStatus {
            path: g.replog_path.display().to_string(),
            capacity_bytes: space.capacity_bytes,
            used_bytes: space.used_bytes,
            free_bytes: space.free_bytes,
            entries: space.entries,
            first_lsn: g.replog.first_lsn(),
            last_lsn: g.written_lsn(),
            io_backend: format!("{:?}", g.replog.io_backend()).to_lowercase(),
            devices: g
                .devices
                .read()
                .map(|d| d.values().map(|i| i.name.clone()).collect())
                .unwrap_or_default(),
        },
        slinks,
        event_nr: g.events.current(),
        line,
    }
}

/// `message NAME 0 ...`: run-time requests to a device's group.
///
/// - `checkpoint`: every site makes its devices durable and saves its cursor now.
/// - `resync <slink>`: mark every region of this device dirty for that site (full resync).
/// - `pause <slink>` / `resume <slink>`: stop and restart shipping to a site (maintenance; the
///   ring keeps its entries, or marks their regions dirty when it overflows).
pub async fn message(h: &DeviceHandle, sector: u64, args: &[String]) -> crate::control::Response {
    use crate::control::Response;
    if sector != 0 {
        return Response::err(format!("messages go to sector 0, not {sector}"));
    }
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["checkpoint"] => {
            for s in &h.group.slinks {
                s.checkpoint_now().await;
            }
            Response::ok(serde_json::Value::Null)
        }
        ["resync", nr] => {
            let Ok(nr) = nr.parse::<u8>() else {
                return Response::err(format!("resync: expected a slink number, found `{nr}`"));
            };
            let Some(s) = h.group.slink(nr).filter(|s| s.nr != 0) else {
                return Response::err(format!("resync: no remote slink {nr}"));
            };
            let Some(dev) = s.device(h.dev_nr) else {
                return Response::err(format!("resync: slink {nr} has no device {}", h.dev_nr));
            };
            let Some(dirty) = &dev.dirty else {
                return Response::err(format!("resync: slink {nr} has no dirty log (`- 0`)"));
            };
            let res = match dirty.lock() {
                Ok(mut d) => {
                    d.mark_range(0, h.size);
                    d.persist().map_err(|e| e.to_string())
                }
                Err(_) => Err("dirty log lock poisoned".to_string()),
            };
            match res {
                Ok(()) => {
                    s.feed.kick();
                    h.group
                        .events
                        .raise("resync-requested", format!("slink {nr} device {} full resync", h.dev_nr));
                    Response::ok(serde_json::Value::Null)
                }
                Err(e) => Response::err(e),
            }
        }
        [verb @ ("pause" | "resume"), nr] => {
            let Some(s) = nr.parse::<u8>().ok().and_then(|n| h.group.slink(n)).filter(|s| s.nr != 0) else {
                return Response::err(format!("{verb}: no remote slink `{nr}`"));
            };
            let pause = *verb == "pause";
            if s.set_paused(pause) {
                h.group.events.raise(
                    if pause { "slink-paused" } else { "slink-resumed" },
                    format!("slink {} {verb}d by operator", s.nr),
                );
            }
            Response::ok(serde_json::Value::Null)
        }
        _ => Response::err(format!(
            "unknown message `{}`; known: checkpoint, resync <slink>, pause <slink>, resume <slink>",
            args.join(" ")
        )),
    }
}
