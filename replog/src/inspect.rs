//! `Replog::inspect`: a read-only look at a replog file (metadata, cursors, lag, entries) for
//! `replicator replog inspect PATH`. Opens the file read-only and never writes.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{feature_names, round_down, EpochStart, MetaSlot, Role, BLOCK_BYTES};
use crate::index::{Index, IndexEntry, Lag};
use crate::log::{scan_start, Replog};
use crate::meta::{self, SlotStatus};
use crate::recovery::{self, Finding, RingReader};
use crate::storage::{ReadOnlyFile, Storage};
use crate::{Lsn, MAX_SLINKS};

/// One registered slink as seen on disk.
#[derive(Debug, Clone, Serialize)]
pub struct SlinkInspection {
    pub slink: u8,
    pub cursor: Lsn,
    pub lag: Lag,
    /// Resync sequence high-water mark.
    pub resync_seq: u64,
    /// The caller's drop floor (format 3), None when none is set.
    pub drop_floor: Option<Lsn>,
}

/// The peer group binding as seen on disk, uuid in hex.
#[derive(Debug, Clone, Serialize)]
pub struct BindingInspection {
    pub peer_group_uuid: String,
    pub peer_site_id: String,
}

/// What a replog holds, as recovery would see it.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub path: String,
    pub offset: u64,
    /// Format version of the chosen metadata slot on disk (1: the next open upgrades it).
    pub format_version: u16,
    /// Hex of the 16 uuid bytes.
    pub uuid: String,
    pub role: Role,
    /// The last of `epochs`; None before the first epoch began.
    pub current_epoch: Option<EpochStart>,
    /// Oldest first.
    pub epochs: Vec<EpochStart>,
    /// None when unbound.
    pub binding: Option<BindingInspection>,
    /// Feature bits and their names.
    pub features: u64,
    pub feature_names: Vec<&'static str>,
    pub activity_log_extent_bytes: u64,
    /// Hot extents: (device, extent index), sorted.
    pub activity_log: Vec<(u32, u64)>,
    /// The metadata slot recovery would use.
    pub metadata_slot: usize,
    pub metadata: MetaSlot,
    pub slots: Vec<SlotStatus>,
    pub capacity_bytes: u64,
    /// Ring bytes from the tail's block to the head.
    pub used_bytes: u64,
    pub tail_vpos: u64,
    pub head_vpos: u64,
    pub entries_total: u64,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    /// Records per decision-table finding, and the one that ended the chain.
    pub findings: std::collections::BTreeMap<Finding, u64>,
    pub stop: Finding,
    pub jumps: u64,
    pub slinks: Vec<SlinkInspection>,
    /// The first `max_entries` entries.
    pub entries: Vec<IndexEntry>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Replog {
    /// Reads a replog without modifying it: metadata, cursors, lag per slink and the first
    /// `max_entries` entries of the chain recovery would accept.
    pub fn inspect(path: &Path, offset: u64, max_entries: usize) -> Result<Inspection> {
        let file = ReadOnlyFile::open(path)
            .map_err(|e| Error::io("open read-only", &path.display().to_string(), e))?;
        inspect_storage(&file, offset, max_entries)
    }
}

/// [`Replog::inspect`] on any storage.
pub fn inspect_storage(
    storage: &dyn Storage,
    offset: u64,
    max_entries: usize,
) -> Result<Inspection> {
    if !offset.is_multiple_of(BLOCK_BYTES) {
        return Err(Error::InvalidOptions {
            what: format!("replog offset {offset} is not a multiple of {BLOCK_BYTES}"),
        });
    }
    let loaded = meta::load(storage, offset)?;
    let m = &loaded.meta;
    let scanned = {
        let mut reader = RingReader::new(storage, offset, m.ring_bytes);
        recovery::scan(&mut reader, &scan_start(m), usize::MAX)?
    };
    let mut index = Index::default();
    for e in &scanned.entries {
        index.push(*e);
    }
    let slinks = (0..MAX_SLINKS)
        .filter(|i| m.registered & (1 << i) != 0)
        .filter_map(|i| {
            let cursor = m.cursors.get(i).copied()?;
            Some(SlinkInspection {
                slink: u8::try_from(i).ok()?,
                cursor,
                lag: index.lag_above(cursor),
                resync_seq: m.resync_seqs.get(i).copied().unwrap_or(0),
                drop_floor: m.drop_floors.get(i).copied().flatten(),
            })
        })
        .collect();
    Ok(Inspection {
        path: storage.describe(),
        offset,
        format_version: loaded.version,
        uuid: hex(&m.uuid),
        role: m.identity.role,
        current_epoch: m.identity.current_epoch(),
        epochs: m.identity.epochs.clone(),
        binding: m.identity.binding.as_ref().map(|b| BindingInspection {
            peer_group_uuid: hex(&b.peer_group_uuid),
            peer_site_id: b.peer_site_id.clone(),
        }),
        features: m.features,
        feature_names: feature_names(m.features),
        activity_log_extent_bytes: m.activity_log.extent_bytes,
        activity_log: m.activity_log.extents.clone(),
        metadata_slot: loaded.slot,
        metadata: m.clone(),
        slots: loaded.slots,
        capacity_bytes: m.ring_bytes,
        used_bytes: scanned
            .head_vpos
            .saturating_sub(round_down(m.tail_vpos, BLOCK_BYTES)),
        tail_vpos: m.tail_vpos,
        head_vpos: scanned.head_vpos,
        entries_total: index.len() as u64,
        first_lsn: index.first().map_or(0, |e| e.lsn),
        last_lsn: index.last().map_or(0, |e| e.lsn),
        findings: scanned.findings,
        stop: scanned.stop,
        jumps: scanned.jumps,
        slinks,
        entries: scanned.entries.into_iter().take(max_entries).collect(),
    })
}
