//! What a parsed table says, in sectors as written, with byte helpers, and its canonical text.
//!
//! `Display` for [`Target`] and [`Table`] writes the canonical form: one line per target, every
//! count equal to the number of tokens that follow it (fallbehind tokens counted), the replog
//! mode always spelled out, sizes and durations in their shortest exact unit. Parsing the
//! canonical text gives back an equal value (property-tested in tests/table_parse.rs).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::error::TableWarning;
use super::lexer::quote_token;
use super::units::{format_duration, format_size_bytes};

/// Tables count in sectors of 512 bytes, whatever the logical block size of the devices.
pub const SECTOR_BYTES: u64 = 512;

/// Largest sector number or count the parser accepts: every sector value of a parsed table
/// (and `start + length`, `dev_start + size`) converts to bytes without overflow.
pub const MAX_SECTORS: u64 = u64::MAX / SECTOR_BYTES;

/// Slink numbers are `0..MAX_SLINKS`; the replog keeps one cursor per slink
/// (`replog::MAX_SLINKS`, equal by a unit test).
pub const MAX_SLINKS: u8 = 16;

/// Smallest region size of a dirty log, in sectors (4 KiB).
pub const MIN_REGION_SECTORS: u64 = 8;

/// Converts sectors to bytes. Exact for every value of a parsed table (bounded by
/// [`MAX_SECTORS`]); saturates for hand-built values beyond that.
pub fn sectors_to_bytes(sectors: u64) -> u64 {
    sectors.saturating_mul(SECTOR_BYTES)
}

/// A parsed table: its targets in order (contiguous from sector 0) and the warnings the parser
/// had. A table file usually holds one target: one replicated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub targets: Vec<Target>,
    pub warnings: Vec<TableWarning>,
}

impl Table {
    /// Size of the mapped device: the end of the last target, in sectors.
    pub fn length_sectors(&self) -> u64 {
        self.targets.last().map_or(0, Target::end_sectors)
    }

    /// Size of the mapped device in bytes.
    pub fn length_bytes(&self) -> u64 {
        sectors_to_bytes(self.length_sectors())
    }
}

/// Canonical text: one target per line, no trailing newline, warnings not included.
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, target) in self.targets.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{target}")?;
        }
        Ok(())
    }
}

/// One mapping line: `<start> <length> replicator <replog> <slink>...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start_sectors: u64,
    /// Greater than 0.
    pub length_sectors: u64,
    pub replog: ReplogParams,
    /// At least one; the first is slink 0 (`local`); numbers unique and below [`MAX_SLINKS`];
    /// all share one `device.dev_nr`.
    pub slinks: Vec<SlinkParams>,
}

impl Target {
    pub fn end_sectors(&self) -> u64 {
        self.start_sectors.saturating_add(self.length_sectors)
    }

    pub fn start_bytes(&self) -> u64 {
        sectors_to_bytes(self.start_sectors)
    }

    pub fn length_bytes(&self) -> u64 {
        sectors_to_bytes(self.length_sectors)
    }

    /// Slink 0, the local site (always the first slink of a parsed target).
    pub fn local_slink(&self) -> Option<&SlinkParams> {
        self.slinks.first().filter(|s| s.slink_nr == 0)
    }

    /// The device number that all slinks of this target share.
    pub fn dev_nr(&self) -> Option<u32> {
        self.slinks.first().map(|s| s.device.dev_nr)
    }

    /// The slink with number `slink_nr`.
    pub fn slink(&self, slink_nr: u8) -> Option<&SlinkParams> {
        self.slinks.iter().find(|s| s.slink_nr == slink_nr)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} replicator {}",
            self.start_sectors, self.length_sectors, self.replog
        )?;
        for slink in &self.slinks {
            write!(f, " {slink}")?;
        }
        Ok(())
    }
}

/// The replication log (type `default`, the ring buffer): `default <#> <path> <dev_start>
/// [<mode> [<size>]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplogParams {
    /// Backing store (block device or file).
    pub path: PathBuf,
    /// Offset of the replog header in the backing store, in sectors.
    pub dev_start_sectors: u64,
    /// `open` when the table gives no mode.
    pub mode: ReplogMode,
    /// Size of the replog in sectors, from `dev_start`. Always present for `create` and `auto`;
    /// optional for `open` (the replog's own header is authoritative there).
    pub size_sectors: Option<u64>,
}

impl ReplogParams {
    pub fn dev_start_bytes(&self) -> u64 {
        sectors_to_bytes(self.dev_start_sectors)
    }

    pub fn size_bytes(&self) -> Option<u64> {
        self.size_sectors.map(sectors_to_bytes)
    }
}

impl fmt::Display for ReplogParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = if self.size_sectors.is_some() { 4 } else { 3 };
        write!(
            f,
            "default {count} {} {} {}",
            quote_token(&self.path.to_string_lossy()),
            self.dev_start_sectors,
            self.mode
        )?;
        if let Some(size) = self.size_sectors {
            write!(f, " {size}")?;
        }
        Ok(())
    }
}

/// How the replog is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplogMode {
    /// Open an existing replog, or create one (of the given size) if there is none.
    Auto,
    /// Create a new replog, overwriting whatever is there.
    Create,
    /// Open an existing replog or fail (how a second device joins a group).
    Open,
}

impl fmt::Display for ReplogMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplogMode::Auto => "auto",
            ReplogMode::Create => "create",
            ReplogMode::Open => "open",
        })
    }
}

/// One site link of a target, with the device at that site and the slink's dirty log:
/// `<slink_type> <#> <slink_params>... <#dev_params> <dev_params>... <dirtylog>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlinkParams {
    pub transport: Transport,
    /// `0..MAX_SLINKS`; 0 is the local site.
    pub slink_nr: u8,
    pub policy: Policy,
    pub device: DeviceParams,
    pub dirty_log: DirtyLogParams,
}

impl fmt::Display for SlinkParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fallbehind = self.policy.tokens();
        let (name, base_count) = match &self.transport {
            Transport::Local => ("local", 2),
            Transport::Tcp { .. } => ("tcp", 3),
        };
        write!(
            f,
            "{name} {} {} {}",
            base_count + fallbehind.len(),
            self.slink_nr,
            self.policy.mode
        )?;
        for token in &fallbehind {
            write!(f, " {token}")?;
        }
        if let Transport::Tcp { addr } = &self.transport {
            write!(f, " {}", quote_token(addr))?;
        }
        write!(
            f,
            " 2 {} {} {}",
            self.device.dev_nr,
            quote_token(&self.device.path),
            self.dirty_log
        )
    }
}

/// How a slink reaches its site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A device path on this host (the seed's `local` slink).
    Local,
    /// A `replicator` daemon at `addr` (`host:port`, IPv6 as `[addr]:port`; the host may be a
    /// name, resolved when connecting).
    Tcp { addr: String },
}

/// Replication policy of a slink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: PolicyMode,
    /// Always unbounded for `Sync` (the parser refuses thresholds on a sync slink).
    pub fallbehind: Fallbehind,
    /// `down_wait=`: `tcp` slinks only; `None` when the table does not say (the daemon's
    /// `--link-dead-after` applies).
    pub down_wait: Option<DownWait>,
}

impl Policy {
    /// The canonical `key=value` tokens after the mode: fallbehind, then `down_wait`.
    pub fn tokens(&self) -> Vec<String> {
        let mut tokens = self.fallbehind.tokens();
        match self.down_wait {
            None => {}
            Some(DownWait::Forever) => tokens.push("down_wait=forever".to_owned()),
            Some(DownWait::For(d)) => tokens.push(format!("down_wait={}", format_duration(d))),
        }
        tokens
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mode)?;
        for token in self.tokens() {
            write!(f, " {token}")?;
        }
        Ok(())
    }
}

/// How long writes wait for a site in sync mode whose link is down before it is marked out of
/// date and no longer waited for (`down_wait=DURATION`), or that they always wait
/// (`down_wait=forever`: RPO 0 above availability).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownWait {
    Forever,
    /// Millisecond resolution; 0: out of date as soon as the link is down.
    For(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyMode {
    /// A write is acknowledged when this site has it (`sync`, `synchronous`).
    Sync,
    /// A write is acknowledged when it is in the replog (`async`, `asynchronous`).
    Async,
    /// Never drop entries for this site: writes wait when the ring is full (`stall`).
    Stall,
}

impl fmt::Display for PolicyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyMode::Sync => "sync",
            PolicyMode::Async => "async",
            PolicyMode::Stall => "stall",
        })
    }
}

/// How far an async or stall slink may fall behind before it turns sync. `None` is "no bound";
/// a `0` in the table (the seed gives slink 0 `ios=0`) parses to `None`, so the parser never
/// yields `Some(0)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fallbehind {
    /// `ios=N`: unshipped writes.
    pub ios: Option<u64>,
    /// `size=BYTES`: unshipped bytes (the table's suffixes k, m, g, t already applied).
    pub bytes: Option<u64>,
    /// `timeout=DURATION`: age of the oldest unshipped write (RPO in time), millisecond
    /// resolution.
    pub timeout: Option<Duration>,
}

impl Fallbehind {
    /// True if no threshold is set.
    pub fn is_unbounded(&self) -> bool {
        self.ios.is_none() && self.bytes.is_none() && self.timeout.is_none()
    }

    /// The canonical tokens, in the order `ios`, `size`, `timeout`.
    pub fn tokens(&self) -> Vec<String> {
        let mut tokens = Vec::with_capacity(3);
        if let Some(ios) = self.ios {
            tokens.push(format!("ios={ios}"));
        }
        if let Some(bytes) = self.bytes {
            tokens.push(format!("size={}", format_size_bytes(bytes)));
        }
        if let Some(timeout) = self.timeout {
            tokens.push(format!("timeout={}", format_duration(timeout)));
        }
        tokens
    }
}

/// `2 <dev_nr> <path>`: the device at the slink's site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceParams {
    /// Number of the device within its group (the same at every site).
    pub dev_nr: u32,
    /// `local`: a path on this host (block device or file). `tcp`: the device's name at the
    /// remote site, resolved by the remote daemon.
    pub path: String,
}

/// The dirty log of one slink for one device: regions the site is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirtyLogParams {
    /// `- 0`: no dirty log; entries for this slink are never dropped for lack of one.
    None,
    /// `core <#> <region_sectors> [sync|nosync]`: in memory.
    Core {
        region_sectors: u64,
        sync: DirtyLogSync,
    },
    /// `disk <#> <region_sectors> <path> [sync|nosync]`: persisted in `path`.
    Disk {
        region_sectors: u64,
        path: PathBuf,
        sync: DirtyLogSync,
    },
}

impl DirtyLogParams {
    /// Region size in sectors (power of two, at least [`MIN_REGION_SECTORS`]), if there is a log.
    pub fn region_sectors(&self) -> Option<u64> {
        match self {
            DirtyLogParams::None => None,
            DirtyLogParams::Core { region_sectors, .. }
            | DirtyLogParams::Disk { region_sectors, .. } => Some(*region_sectors),
        }
    }

    pub fn region_bytes(&self) -> Option<u64> {
        self.region_sectors().map(sectors_to_bytes)
    }
}

impl fmt::Display for DirtyLogParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyLogParams::None => f.write_str("- 0"),
            DirtyLogParams::Core {
                region_sectors,
                sync,
            } => {
                let count = if *sync == DirtyLogSync::Default { 1 } else { 2 };
                write!(f, "core {count} {region_sectors}")?;
                write_sync(f, *sync)
            }
            DirtyLogParams::Disk {
                region_sectors,
                path,
                sync,
            } => {
                let count = if *sync == DirtyLogSync::Default { 2 } else { 3 };
                write!(
                    f,
                    "disk {count} {region_sectors} {}",
                    quote_token(&path.to_string_lossy())
                )?;
                write_sync(f, *sync)
            }
        }
    }
}

fn write_sync(f: &mut fmt::Formatter<'_>, sync: DirtyLogSync) -> fmt::Result {
    match sync {
        DirtyLogSync::Default => Ok(()),
        DirtyLogSync::ForceResync => f.write_str(" sync"),
        DirtyLogSync::AssumeInSync => f.write_str(" nosync"),
    }
}

/// The optional last dirty log parameter, with dm-log's meaning (drivers/md/dm-log.c: `sync`
/// forces a resync, `nosync` declares the copy in sync, neither keeps what a disk log persisted).
/// A bool cannot carry this: a `disk` log given neither must keep its bits across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogSync {
    /// Not given: `disk` keeps the state it has persisted (a new disk log starts all dirty);
    /// `core` has nothing persisted and starts all dirty.
    Default,
    /// `sync`: mark every region dirty, so the site gets a full resync (a new site).
    ForceResync,
    /// `nosync`: mark every region clean: the operator asserts the site already has the data.
    AssumeInSync,
}

impl DirtyLogSync {
    /// Whether every region starts dirty in a log that is created now (every `core` log, a
    /// `disk` log whose file does not exist yet): yes unless `nosync`.
    pub fn new_regions_dirty(self) -> bool {
        self != DirtyLogSync::AssumeInSync
    }

    /// What to do with a `disk` log that already exists: `None` keeps its bits, `Some(true)`
    /// sets every region dirty (`sync`), `Some(false)` every region clean (`nosync`).
    pub fn overwrite_existing(self) -> Option<bool> {
        match self {
            DirtyLogSync::Default => None,
            DirtyLogSync::ForceResync => Some(true),
            DirtyLogSync::AssumeInSync => Some(false),
        }
    }
}
