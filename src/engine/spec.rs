//! What the core needs from a table target, resolved: absolute paths, bytes instead of sectors,
//! the core's policy types. The table module parses; this module turns a parsed target into the
//! group and device it describes.

use std::path::{Path, PathBuf};

use crate::table;

use super::policy::{DownWait, Fallbehind, PolicyKind};

pub const SECTOR: u64 = 512;

#[derive(Clone, Debug)]
pub enum ReplogOpen {
    Open,
    Create { size: u64 },
    Auto { size: Option<u64> },
}

#[derive(Clone, Debug)]
pub enum DirtyLogSpec {
    None,
    Core {
        region_size: u64,
        initially_dirty: bool,
    },
    Disk {
        region_size: u64,
        path: PathBuf,
        initially_dirty: bool,
        /// For a log that exists already: `Some(true)` all dirty, `Some(false)` all clean.
        overwrite_existing: Option<bool>,
    },
}

#[derive(Clone, Debug)]
pub struct SiteDeviceSpec {
    pub dev_nr: u32,
    pub path: PathBuf,
    pub dirty_log: DirtyLogSpec,
}

#[derive(Clone, Debug)]
pub struct SlinkSpec {
    pub nr: u8,
    pub transport: &'static str,
    /// `tcp` slinks: the remote daemon's slink address (host:port).
    pub remote_addr: Option<String>,
    pub policy: PolicyKind,
    pub fallbehind: Fallbehind,
    /// `down_wait=`; `None`: the daemon's default.
    pub down_wait: Option<DownWait>,
    pub devices: Vec<SiteDeviceSpec>,
}

#[derive(Clone, Debug)]
pub struct GroupSpec {
    pub replog_path: PathBuf,
    /// Byte offset of the replog inside its file or device.
    pub replog_offset: u64,
    pub open: ReplogOpen,
    pub slinks: Vec<SlinkSpec>,
}

#[derive(Clone, Debug)]
pub struct DeviceSpec {
    pub dev_nr: u32,
    pub size: u64,
}

/// Absolute, with `.` and `..` folded lexically (the file may not exist yet, so no canonicalize).
fn resolve(base: &Path, p: &Path) -> PathBuf {
    use std::path::Component;
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Resolve a parsed target. Relative paths are taken relative to `base` (the directory the client
/// ran `create` from). With `reopen`, the replog is opened whatever the table says: a daemon
/// restoring its groups must never re-create (wipe) a replog.
pub fn from_target(t: &table::Target, base: &Path, reopen: bool) -> (GroupSpec, DeviceSpec) {
    let open = if reopen {
        ReplogOpen::Open
    } else {
        match t.replog.mode {
            table::ReplogMode::Open => ReplogOpen::Open,
            table::ReplogMode::Create => ReplogOpen::Create {
                size: t.replog.size_sectors.unwrap_or(0) * SECTOR,
            },
            table::ReplogMode::Auto => ReplogOpen::Auto {
                size: t.replog.size_sectors.map(|s| s * SECTOR),
            },
        }
    };
    let mut dev_nr = 0;
    let slinks = t
        .slinks
        .iter()
        .map(|s| {
            dev_nr = s.device.dev_nr;
            let dirty_log = match &s.dirty_log {
                table::DirtyLogParams::None => DirtyLogSpec::None,
                table::DirtyLogParams::Core {
                    region_sectors,
                    sync,
                } => DirtyLogSpec::Core {
                    region_size: region_sectors * SECTOR,
                    initially_dirty: sync.new_regions_dirty(),
                },
                table::DirtyLogParams::Disk {
                    region_sectors,
                    path,
                    sync,
                } => DirtyLogSpec::Disk {
                    region_size: region_sectors * SECTOR,
                    path: resolve(base, path),
                    initially_dirty: sync.new_regions_dirty(),
                    // `sync`/`nosync` on an existing log act at `create` (a table load), never
                    // when a daemon restores its groups: a restart must not force a full resync.
                    overwrite_existing: if reopen {
                        None
                    } else {
                        sync.overwrite_existing()
                    },
                },
            };
            let remote_addr = match &s.transport {
                table::Transport::Tcp { addr } => Some(addr.clone()),
                table::Transport::Local => None,
            };
            SlinkSpec {
                nr: s.slink_nr,
                remote_addr: remote_addr.clone(),
                transport: match s.transport {
                    table::Transport::Local => "local",
                    table::Transport::Tcp { .. } => "tcp",
                },
                policy: match s.policy.mode {
                    table::PolicyMode::Sync => PolicyKind::Sync,
                    table::PolicyMode::Async => PolicyKind::Async,
                    table::PolicyMode::Stall => PolicyKind::Stall,
                },
                fallbehind: Fallbehind {
                    ios: s.policy.fallbehind.ios,
                    bytes: s.policy.fallbehind.bytes,
                    timeout: s.policy.fallbehind.timeout,
                }
                .normalized(),
                down_wait: s.policy.down_wait.map(|w| match w {
                    table::DownWait::Forever => DownWait::Forever,
                    table::DownWait::For(d) => DownWait::For(d),
                }),
                devices: vec![SiteDeviceSpec {
                    dev_nr: s.device.dev_nr,
                    // A remote device is named at its site, not a path here.
                    path: if remote_addr.is_some() {
                        PathBuf::from(&s.device.path)
                    } else {
                        resolve(base, Path::new(&s.device.path))
                    },
                    dirty_log,
                }],
            }
        })
        .collect();
    (
        GroupSpec {
            replog_path: resolve(base, &t.replog.path),
            replog_offset: t.replog.dev_start_sectors * SECTOR,
            open,
            slinks,
        },
        DeviceSpec {
            dev_nr,
            size: t.length_sectors * SECTOR,
        },
    )
}
