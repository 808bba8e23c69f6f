//! The daemon's devices and groups, by name: what `create` adds and `remove` takes away.
//!
//! Tables that name the same replog (the same file, however it is named) form one group; each
//! table is one device of it, exported over NBD under its name. Every file a table uses is
//! claimed ([`super::claims`]) before any of them is opened for writing.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::control::{BindingStatus, DeviceStatus, ReplogStatus};
use crate::engine::group::Role;
use crate::engine::spec::{self, ReplogOpen};
use crate::engine::tcp::LinkSettings;
use crate::table;

use super::claims::{self, Book, GroupTag, Ticket};
use super::group::Group;

#[derive(Clone)]
pub struct DeviceHandle {
    pub name: String,
    pub group: Arc<Group>,
    pub dev_nr: u32,
    pub size: u64,
    pub table: String,
}

/// The role a `create` asks for, and whether it restores a device (then the state dir record
/// asked, and the group's replog wins over it: see `group::settle_role`).
#[derive(Clone, Copy)]
struct AskedRole {
    role: Role,
    reopen: bool,
}

#[derive(Default)]
pub struct Registry {
    devices: RwLock<BTreeMap<String, DeviceHandle>>,
    /// Keyed by the tag the claim book gave the group's replog claim.
    groups: RwLock<BTreeMap<GroupTag, Arc<Group>>>,
    /// Who owns which file; held only for the claim steps, never across a group's I/O.
    claims: Mutex<Book>,
    pub event_hook: Option<String>,
    pub links: Option<Arc<LinkSettings>>,
    /// How this daemon's groups run (what their tables do not say).
    driver: crate::driver::DriverConfig,
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
    pub fn new(
        event_hook: Option<String>,
        links: Option<Arc<LinkSettings>>,
        driver: crate::driver::DriverConfig,
    ) -> Self {
        Registry {
            event_hook,
            links,
            driver,
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
        // Claims first: a refused table must not have opened (let alone created) any file.
        let may_join = !matches!(gspec.open, ReplogOpen::Create { .. });
        let files = claims::files_of(&gspec, &dspec);
        let ticket = self
            .book()
            .take(name, &files, may_join)
            .map_err(|e| format!("{source}: {e}"))?;
        let asked = AskedRole { role, reopen };
        let group = match self.open_claimed(&ticket, &gspec, &dspec, name, table_text, asked) {
            Ok(g) => g,
            Err(e) => {
                self.book().release(&ticket);
                return Err(e);
            }
        };
        if !reopen {
            // A daemon restoring its groups starts them once every device is back (start_all).
            if let Err(e) = group.start() {
                self.undo(&ticket, &group, dspec.dev_nr);
                return Err(e.to_string());
            }
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

    /// Open the group of a table whose files are claimed (or add the device to the group it
    /// joins), then lock the files that opening created.
    fn open_claimed(
        &self,
        ticket: &Ticket,
        gspec: &spec::GroupSpec,
        dspec: &spec::DeviceSpec,
        name: &str,
        table_text: &str,
        asked: AskedRole,
    ) -> Result<Arc<Group>, String> {
        let AskedRole { role, reopen } = asked;
        let group = if ticket.joins {
            let g = self
                .groups
                .read()
                .ok()
                .and_then(|g| g.get(&ticket.group).cloned())
                .ok_or_else(|| {
                    format!(
                        "replog {} is still being opened by another `create`; try again",
                        gspec.replog_path.display()
                    )
                })?;
            if g.role() != role && reopen {
                // Restoring: the group's role came from its replog, which wins over the
                // state dir record (see `group::settle_role`).
                tracing::warn!(
                    device = name,
                    "the daemon's record says {role:?}, the group's replog says {:?}: the replog wins",
                    g.role()
                );
            } else if g.role() != role {
                return Err(format!(
                    "replog {} belongs to a {:?} group; this device was created as {:?}",
                    gspec.replog_path.display(),
                    g.role(),
                    role
                ));
            }
            g.add_device(gspec, dspec, name, table_text)
                .map_err(|e| e.to_string())?;
            g
        } else {
            let g = Group::open(
                gspec,
                dspec,
                name,
                table_text,
                self.event_hook.clone(),
                role,
                crate::driver::DriverConfig {
                    links: self.links.clone(),
                    // A sync site that is down is waited for the link's dead timeout unless its
                    // table says `down_wait=`.
                    default_down_wait: self
                        .links
                        .as_ref()
                        .map_or(self.driver.default_down_wait, |l| l.site.dead_peer_timeout),
                    ..self.driver.clone()
                },
            )
            .map_err(|e| e.to_string())?;
            if let Ok(mut groups) = self.groups.write() {
                groups.insert(ticket.group, g.clone());
            }
            g
        };
        let settled = self.book().settle(ticket);
        let joined = settled.and_then(|()| group.device_joined().map_err(|e| e.to_string()));
        if let Err(e) = joined {
            self.unlink_group(ticket, &group, dspec.dev_nr);
            return Err(e);
        }
        Ok(group)
    }

    /// Take a device that did not come up out of its group (and the group out of the registry
    /// when it was its only device), then give its claims back.
    fn undo(&self, ticket: &Ticket, group: &Arc<Group>, dev_nr: u32) {
        self.unlink_group(ticket, group, dev_nr);
        self.book().release(ticket);
    }

    fn unlink_group(&self, ticket: &Ticket, group: &Arc<Group>, dev_nr: u32) {
        if group.remove_device(dev_nr) {
            if let Ok(mut g) = self.groups.write() {
                g.remove(&ticket.group);
            }
            group.shutdown();
        }
    }

    /// The claim book. Its lock is only held for a claim step; a panic there is a bug, not a
    /// state to carry on from.
    fn book(&self) -> MutexGuard<'_, Book> {
        match self.claims.lock() {
            Ok(b) => b,
            Err(_) => panic!("the claim book's lock is poisoned: a claim step panicked"),
        }
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
        // Leaving a running group opens it again (blocking work), off the runtime.
        let (group, dev_nr) = (handle.group.clone(), handle.dev_nr);
        let last = tokio::task::spawn_blocking(move || group.remove_device(dev_nr))
            .await
            .map_err(|e| e.to_string())?;
        if last {
            if let Ok(mut g) = self.groups.write() {
                g.retain(|_, g| !Arc::ptr_eq(g, &handle.group));
            }
            let group = handle.group.clone();
            let stopped = tokio::task::spawn_blocking(move || group.shutdown()).await;
            // The files are closed or idle either way; a failed join must not keep them claimed.
            self.book().release_device(name);
            return stopped.map_err(|e| e.to_string());
        }
        self.book().release_device(name);
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
        self.book().release_all();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn device_status(h: &DeviceHandle) -> DeviceStatus {
    let g = &h.group;
    let replog = g.replog();
    let views = g.slink_views(h.dev_nr);
    let mut line_slinks = String::new();
    for v in &views {
        let s = &v.status;
        line_slinks.push_str(&format!(
            " {} {}{} {} {} {} {}",
            s.slink, v.state_letter, v.health_letter, s.mode, s.lag_ios, s.lag_bytes, s.dirty_bytes
        ));
    }
    let space = replog.as_ref().map(|r| r.space());
    let space = space.as_ref();
    let (capacity_bytes, used_bytes, free_bytes, entries) = space.map_or((0, 0, 0, 0), |s| {
        (s.capacity_bytes, s.used_bytes, s.free_bytes, s.entries)
    });
    let sectors = h.size / 512;
    let line = format!(
        "0 {sectors} replicator {}/{} {}{}",
        used_bytes / 512,
        capacity_bytes / 512,
        views.len(),
        line_slinks
    );
    DeviceStatus {
        name: h.name.clone(),
        role: match g.role() {
            Role::Primary => "primary".into(),
            Role::Secondary => "secondary".into(),
        },
        epoch: replog
            .as_ref()
            .and_then(|r| r.current_epoch())
            .map(|e| e.epoch),
        binding: replog
            .as_ref()
            .and_then(|r| r.binding())
            .map(|b| BindingStatus {
                peer_group_uuid: hex(&b.peer_group_uuid),
                peer_site_id: b.peer_site_id,
            }),
        dev_nr: h.dev_nr,
        size_bytes: h.size,
        replog: ReplogStatus {
            path: g.replog_path.display().to_string(),
            capacity_bytes,
            used_bytes,
            free_bytes,
            entries,
            first_lsn: replog.as_ref().map_or(0, |r| r.first_lsn()),
            last_lsn: replog
                .as_ref()
                .map_or(0, |r| r.next_lsn().saturating_sub(1)),
            durable_lsn: replog.as_ref().map_or(0, |r| r.durable_lsn()),
            io_backend: replog
                .as_ref()
                .map(|r| format!("{:?}", r.io_backend()).to_lowercase())
                .unwrap_or_default(),
            devices: g.devices().into_iter().map(|i| i.name).collect(),
        },
        slinks: views.into_iter().map(|v| v.status).collect(),
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
    let done = |r: Result<(), String>| match r {
        Ok(()) => Response::ok(serde_json::Value::Null),
        Err(e) => Response::err(e),
    };
    match words.as_slice() {
        ["checkpoint"] => done(
            h.group
                .checkpoint_now()
                .then_some(())
                .ok_or_else(|| "checkpoint: the group is not running".to_string()),
        ),
        ["resync", nr] => {
            let Ok(nr) = nr.parse::<u8>() else {
                return Response::err(format!("resync: expected a slink number, found `{nr}`"));
            };
            done(h.group.resync_device(nr, h.dev_nr))
        }
        [verb @ ("pause" | "resume"), nr] => {
            let Ok(nr) = nr.parse::<u8>() else {
                return Response::err(format!("{verb}: no remote slink `{nr}`"));
            };
            done(
                h.group
                    .pause(nr, *verb == "pause")
                    .map_err(|e| format!("{verb}: {e}")),
            )
        }
        _ => Response::err(format!(
            "unknown message `{}`; known: checkpoint, resync <slink>, pause <slink>, resume <slink>",
            args.join(" ")
        )),
    }
}
