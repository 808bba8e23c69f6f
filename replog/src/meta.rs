//! Reading and writing the two metadata slots (newest valid wins; writes alternate so the slot
//! holding the newest valid state is never the one being overwritten).

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{
    HeaderFault, MetaSlot, FEATURES_KNOWN, FORMAT_VERSION, META_AREA_BYTES, META_ENCODED_BYTES,
    META_SLOT_BYTES, RECORD_GRANULE,
};
use crate::io::AlignedBuf;
use crate::storage::Storage;

/// What was found in one slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    pub slot: usize,
    /// None when the slot decoded; otherwise why not.
    pub fault: Option<String>,
    pub sequence: Option<u64>,
    /// Format version the slot was written in (1 or 2) when it decoded.
    pub version: Option<u16>,
}

/// The chosen metadata and what each slot held.
#[derive(Debug, Clone)]
pub struct LoadedMeta {
    pub meta: MetaSlot,
    pub slot: usize,
    /// Format version of the chosen slot: 1 means the next metadata write upgrades it.
    pub version: u16,
    pub slots: Vec<SlotStatus>,
}

/// Reads both slots at `base`, picks the newest valid one and checks it against the storage size.
pub fn load(storage: &dyn Storage, base: u64) -> Result<LoadedMeta> {
    let path = storage.describe();
    let len = storage.len().map_err(|e| Error::io("size of", &path, e))?;
    if len < base.saturating_add(META_AREA_BYTES) {
        return Err(Error::Truncated {
            what: format!("{path}: metadata area at offset {base}"),
            expected: base.saturating_add(META_AREA_BYTES),
            found: len,
        });
    }
    let buf = AlignedBuf::zeroed(META_AREA_BYTES as usize);
    let buf = storage
        .read_at(base, buf)
        .map_err(|e| Error::io("read metadata", &path, e))?;
    let mut decoded = Vec::new();
    let mut slots = Vec::new();
    for slot in 0..2usize {
        let at = slot * META_SLOT_BYTES as usize;
        let bytes = buf.get(at..at + META_ENCODED_BYTES).unwrap_or_default();
        let result = MetaSlot::decode_versioned(bytes);
        slots.push(SlotStatus {
            slot,
            fault: result.as_ref().err().map(|f| f.to_string()),
            sequence: result.as_ref().ok().map(|(m, _)| m.sequence),
            version: result.as_ref().ok().map(|(_, v)| *v),
        });
        decoded.push(result);
    }
    // A crc-valid slot of another version, or with features this code does not know, was
    // written by a newer build and may be newer than the other slot: refuse rather than roll
    // back to the other slot silently.
    for (i, result) in decoded.iter().enumerate() {
        match result {
            Err(HeaderFault::UnsupportedVersion(found)) => {
                return Err(Error::UnsupportedVersion {
                    found: *found,
                    supported: FORMAT_VERSION,
                });
            }
            Err(HeaderFault::UnknownFeatures(bits)) => {
                return Err(Error::UnsupportedFeatures {
                    what: format!("{path} at offset {base}: metadata slot {i}"),
                    bits: *bits,
                    known: FEATURES_KNOWN,
                });
            }
            _ => {}
        }
    }
    let best = decoded
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().ok().map(|(m, v)| (i, m, *v)))
        .max_by_key(|(_, m, _)| m.sequence);
    let Some((slot, meta, version)) = best else {
        let all_zero = decoded
            .iter()
            .all(|r| matches!(r, Err(HeaderFault::Zeroed)));
        let what = if all_zero {
            format!("{path} at offset {base}: both metadata slots are all zero (not a replog, or never created)")
        } else {
            let describe = |i: usize| {
                slots
                    .get(i)
                    .and_then(|s| s.fault.clone())
                    .unwrap_or_default()
            };
            format!(
                "{path} at offset {base}: no valid metadata slot (slot 0: {}; slot 1: {})",
                describe(0),
                describe(1)
            )
        };
        return Err(Error::BadFormat { what });
    };
    meta.check_geometry().map_err(|what| Error::BadFormat {
        what: format!("{path}: metadata slot {slot}: {what}"),
    })?;
    if meta.tail_vpos % RECORD_GRANULE != 0 {
        return Err(Error::BadFormat {
            what: format!(
                "{path}: metadata tail {} not on a record boundary",
                meta.tail_vpos
            ),
        });
    }
    let needed = base.saturating_add(meta.replog_bytes);
    if len < needed {
        return Err(Error::Truncated {
            what: format!("{path}: ring of {} bytes at offset {base}", meta.ring_bytes),
            expected: needed,
            found: len,
        });
    }
    Ok(LoadedMeta {
        meta: meta.clone(),
        slot,
        version,
        slots,
    })
}

/// How much a metadata write makes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaSync {
    /// The slot and every earlier write of the file (fdatasync): create, and the generation bump
    /// at open, which must make the recovered chain durable before the new writer builds on it.
    WholeFile,
    /// The slot only: cursor and tail updates, which never depend on ring bytes being durable.
    SlotOnly,
}

/// Writes `meta` (always in the current format, every field) into slot `sequence % 2` and
/// makes it durable as `sync` says. A slot that decode would refuse is never written.
pub fn write(storage: &dyn Storage, base: u64, meta: &MetaSlot, sync: MetaSync) -> Result<()> {
    let path = storage.describe();
    meta.check().map_err(|what| Error::InvalidMetadata {
        what: format!("{path}: refusing to write metadata: {what}"),
    })?;
    let mut buf = AlignedBuf::zeroed(META_SLOT_BYTES as usize);
    let encoded = meta.encode();
    if let Some(dst) = buf.get_mut(..encoded.len()) {
        dst.copy_from_slice(&encoded);
    }
    let at = base + (meta.sequence % 2) * META_SLOT_BYTES;
    match sync {
        MetaSync::WholeFile => {
            storage
                .write_at(at, buf)
                .map_err(|e| Error::io("write metadata", &path, e))?;
            storage
                .sync_data()
                .map_err(|e| Error::io("sync metadata", &path, e))
        }
        MetaSync::SlotOnly => storage
            .write_durable_at(at, buf)
            .map(drop)
            .map_err(|e| Error::io("write metadata (dsync)", &path, e)),
    }
}
