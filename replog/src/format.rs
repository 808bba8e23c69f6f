//! The on-disk bytes of a replog: constants, the entry header and the metadata slot.
//!
//! This module is the only place that knows byte offsets; FORMAT.md is its prose twin and the
//! golden vectors in the tests below (and in `tests/golden.rs`) are the truth. Everything is
//! little-endian. Decoders never panic: they return a [`HeaderFault`] naming what is wrong.

use serde::Serialize;

/// Format version of the metadata slot written by this code. Format-1 and format-2 slots are
/// still read (and upgraded by the first open); any other version is refused.
pub const FORMAT_VERSION: u16 = 3;
/// The first format: 512-byte metadata slots without identity or activity log.
pub const FORMAT_VERSION_V1: u16 = 1;
/// The second format: identity and activity log, 12-byte activity-log entries, no drop floors.
pub const FORMAT_VERSION_V2: u16 = 2;
/// Version of the entry header, unchanged since format 1 (format 2 changed only the metadata).
pub const ENTRY_VERSION: u16 = 1;

/// Unit of every ring write: batches start and end on multiples of this, relative to the ring
/// start. 4096 covers O_DIRECT on 512- and 4096-byte sector devices alike.
pub const BLOCK_BYTES: u64 = 4096;

/// One metadata slot occupies one block; two slots form the metadata area.
pub const META_SLOT_BYTES: u64 = BLOCK_BYTES;
/// Bytes before the ring: slot 0 at 0, slot 1 at 4096.
pub const META_AREA_BYTES: u64 = 2 * META_SLOT_BYTES;
/// Bytes of a slot covered by its layout and checksum: the whole block (since format 2).
pub const META_ENCODED_BYTES: usize = META_SLOT_BYTES as usize;
/// Bytes a format-1 slot covered (the rest of its block is zero).
pub const META_V1_ENCODED_BYTES: usize = 512;
/// Magic at the start of each metadata slot.
pub const META_MAGIC: [u8; 8] = *b"RPLGMETA";

/// Size of an entry header; every record is a multiple of this (the record granule).
pub const ENTRY_HEADER_BYTES: usize = 128;
/// Records (header + payload + padding) are multiples of this, so the gap left at the end of a
/// block is always 0 or large enough to hold a pad record's header.
pub const RECORD_GRANULE: u64 = ENTRY_HEADER_BYTES as u64;
/// Magic at the start of each entry header.
pub const ENTRY_MAGIC: [u8; 4] = *b"RLGE";

/// Smallest ring accepted (four blocks).
pub const MIN_RING_BYTES: u64 = 4 * BLOCK_BYTES;
/// Largest data payload of one Write entry (also bounds one record and one batch buffer).
pub const MAX_DATA_BYTES: u64 = 8 << 20;
/// Number of slink cursors in a metadata slot.
pub const SLOTS_CURSORS: usize = crate::MAX_SLINKS;

/// Entries of the epoch history kept in metadata (oldest dropped when a new epoch begins on a
/// full history). 32 promotions of one group is far beyond what an operator keeps in mind; a
/// peer whose last common epoch is older than that resyncs fully.
pub const EPOCH_HISTORY_MAX: usize = 32;
/// Longest peer site id, in bytes of UTF-8.
pub const PEER_SITE_ID_BYTES_MAX: usize = 64;
/// Extents the activity log holds: what fits the slot after the other fields (12 bytes each).
/// At the default 4 MiB extent that is 1 GiB of hot data.
pub const AL_EXTENTS_MAX: usize = 256;
/// Default activity-log extent size.
pub const AL_EXTENT_BYTES_DEFAULT: u64 = 4 << 20;
/// Smallest activity-log extent: one block.
pub const AL_EXTENT_BYTES_MIN: u64 = BLOCK_BYTES;
/// Largest activity-log extent (1 TiB): beyond that an extent says nothing useful.
pub const AL_EXTENT_BYTES_MAX: u64 = 1 << 40;

/// Feature bit: the writer keeps the activity log up to date, so after an unclean stop the
/// extents it lists are the only ones whose device contents may be ahead of the replog. Clear:
/// the activity log says nothing (a format-1 replog, or a writer that does not keep one).
pub const FEATURE_ACTIVITY_LOG: u64 = 1 << 0;
/// Feature bit (a state, persisted as a feature so that a build that does not know it refuses
/// the replog rather than ignore it): this secondary's devices are not a prefix of the primary's
/// history (a resync from the primary is incomplete, or the primary dropped entries for it), so
/// they must not be promoted or exported as a consistent copy. Set before the first resync piece
/// is written (devices synced first), cleared once the resync is complete.
pub const FEATURE_RESYNC_INCOMPLETE: u64 = 1 << 1;
/// Every feature bit this code knows; a slot with any other bit set is refused at open.
pub const FEATURES_KNOWN: u64 = FEATURE_ACTIVITY_LOG | FEATURE_RESYNC_INCOMPLETE;

/// Names of the known feature bits, for inspection.
pub fn feature_names(bits: u64) -> Vec<&'static str> {
    let mut names = Vec::new();
    if bits & FEATURE_ACTIVITY_LOG != 0 {
        names.push("activity_log");
    }
    if bits & FEATURE_RESYNC_INCOMPLETE != 0 {
        names.push("resync_incomplete");
    }
    names
}

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RecordKind {
    /// A write: `len` data bytes follow the header.
    Write,
    /// Zeroes over `len` bytes of the device; no payload.
    Zeroes,
    /// Discard (trim) of `len` bytes of the device; no payload.
    Discard,
    /// Padding: `len` unchecked bytes follow the header (end of a batch, or end of a lap).
    Pad,
}

impl RecordKind {
    /// The kind byte on disk.
    pub fn code(self) -> u8 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Zeroes => 2,
            RecordKind::Discard => 3,
            RecordKind::Pad => 0x50,
        }
    }

    /// Decodes a kind byte.
    pub fn from_code(code: u8) -> Option<RecordKind> {
        match code {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zeroes),
            3 => Some(RecordKind::Discard),
            0x50 => Some(RecordKind::Pad),
            _ => None,
        }
    }
}

/// Why bytes do not decode as a header or metadata slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HeaderFault {
    /// Fewer bytes than the structure needs.
    Short,
    /// Every byte is zero (never written).
    Zeroed,
    /// The magic does not match (garbage, or payload bytes of some other record).
    BadMagic,
    /// The magic matches but the header checksum does not (torn or corrupt).
    BadCrc,
    /// Checksum is fine but the version is not ours.
    UnsupportedVersion(u16),
    /// Checksum is fine but a field is out of range (unknown kind, flags, reserved bytes).
    Malformed(&'static str),
    /// Checksum is fine but the slot has feature bits this code does not know (these bits).
    UnknownFeatures(u64),
}

impl std::fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderFault::Short => write!(f, "too short"),
            HeaderFault::Zeroed => write!(f, "all zero (never written)"),
            HeaderFault::BadMagic => write!(f, "bad magic"),
            HeaderFault::BadCrc => write!(f, "checksum mismatch"),
            HeaderFault::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            HeaderFault::Malformed(what) => write!(f, "malformed: {what}"),
            HeaderFault::UnknownFeatures(bits) => write!(
                f,
                "unknown feature bits {bits:#x} (this build knows {FEATURES_KNOWN:#x})"
            ),
        }
    }
}

/// One entry header (128 bytes on disk). See FORMAT.md "Entry header".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EntryHeader {
    pub kind: RecordKind,
    /// Replog uuid: an entry of another replog never validates.
    pub uuid: [u8; 16],
    /// Virtual position of this header: lap = vpos / ring_size, ring offset = vpos % ring_size.
    /// A leftover entry from another lap sits at the same ring offset with another vpos.
    pub vpos: u64,
    /// Entry lsn (Pad: the lsn of the entry before it, informational).
    pub lsn: u64,
    /// Writer generation, bumped durably at every open before any append.
    pub generation: u32,
    pub device: u32,
    pub offset: u64,
    /// Write/Zeroes/Discard: bytes covered on the device. Pad: payload bytes after the header.
    pub len: u64,
    pub timestamp_ns: u64,
    /// crc32c of the `len` data bytes of a Write; 0 for other kinds.
    pub data_crc: u32,
}

const HDR_CRC_AT: usize = ENTRY_HEADER_BYTES - 4;
const META_CRC_AT: usize = META_ENCODED_BYTES - 4;

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn get<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = buf.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

fn get_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(get(buf, at))
}
fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(get(buf, at))
}
fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(get(buf, at))
}
/// The low 7 bytes of a little-endian u64 (a format-3 activity-log extent index).
fn get_u56(buf: &[u8], at: usize) -> u64 {
    let low: [u8; 7] = get(buf, at);
    let mut all = [0u8; 8];
    all[..7].copy_from_slice(&low);
    u64::from_le_bytes(all)
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| *b == 0)
}

impl EntryHeader {
    /// Writes the 128 header bytes (checksum included) into `out[..128]`. `out` must be at least
    /// 128 bytes; shorter buffers are left untouched beyond their end.
    pub fn encode_into(&self, out: &mut [u8]) {
        let Some(out) = out.get_mut(..ENTRY_HEADER_BYTES) else {
            return;
        };
        out.fill(0);
        put(out, 0, &ENTRY_MAGIC);
        put(out, 4, &ENTRY_VERSION.to_le_bytes());
        put(out, 6, &[self.kind.code(), 0]); // kind, flags (none defined in v1)
        put(out, 8, &self.uuid);
        put(out, 24, &self.vpos.to_le_bytes());
        put(out, 32, &self.lsn.to_le_bytes());
        put(out, 40, &self.generation.to_le_bytes());
        put(out, 44, &self.device.to_le_bytes());
        put(out, 48, &self.offset.to_le_bytes());
        put(out, 56, &self.len.to_le_bytes());
        put(out, 64, &self.timestamp_ns.to_le_bytes());
        put(out, 72, &self.data_crc.to_le_bytes());
        // 76..124 reserved, zero.
        let crc = crc32c::crc32c(out.get(..HDR_CRC_AT).unwrap_or_default());
        put(out, HDR_CRC_AT, &crc.to_le_bytes());
    }

    /// The 128 header bytes.
    pub fn encode(&self) -> [u8; ENTRY_HEADER_BYTES] {
        let mut out = [0u8; ENTRY_HEADER_BYTES];
        self.encode_into(&mut out);
        out
    }

    /// Decodes and checks a header (magic, checksum, version, field ranges). It does not check
    /// position, uuid, lsn or generation: that is the recovery decision table's job.
    pub fn decode(bytes: &[u8]) -> Result<EntryHeader, HeaderFault> {
        let Some(b) = bytes.get(..ENTRY_HEADER_BYTES) else {
            return Err(HeaderFault::Short);
        };
        if all_zero(b) {
            return Err(HeaderFault::Zeroed);
        }
        if get::<4>(b, 0) != ENTRY_MAGIC {
            return Err(HeaderFault::BadMagic);
        }
        let crc = crc32c::crc32c(b.get(..HDR_CRC_AT).unwrap_or_default());
        if crc != get_u32(b, HDR_CRC_AT) {
            return Err(HeaderFault::BadCrc);
        }
        let version = get_u16(b, 4);
        if version != ENTRY_VERSION {
            return Err(HeaderFault::UnsupportedVersion(version));
        }
        let [kind, flags] = get::<2>(b, 6);
        let kind = RecordKind::from_code(kind).ok_or(HeaderFault::Malformed("unknown kind"))?;
        if flags != 0 {
            return Err(HeaderFault::Malformed("unknown flags"));
        }
        if !all_zero(b.get(76..HDR_CRC_AT).unwrap_or_default()) {
            return Err(HeaderFault::Malformed("reserved bytes not zero"));
        }
        let header = EntryHeader {
            kind,
            uuid: get(b, 8),
            vpos: get_u64(b, 24),
            lsn: get_u64(b, 32),
            generation: get_u32(b, 40),
            device: get_u32(b, 44),
            offset: get_u64(b, 48),
            len: get_u64(b, 56),
            timestamp_ns: get_u64(b, 64),
            data_crc: get_u32(b, 72),
        };
        match kind {
            RecordKind::Write if header.len > MAX_DATA_BYTES => {
                Err(HeaderFault::Malformed("write longer than the maximum"))
            }
            RecordKind::Pad if !header.len.is_multiple_of(RECORD_GRANULE) => {
                Err(HeaderFault::Malformed("pad length not a multiple of 128"))
            }
            RecordKind::Pad if header.data_crc != 0 => {
                Err(HeaderFault::Malformed("pad with a data checksum"))
            }
            RecordKind::Zeroes | RecordKind::Discard if header.data_crc != 0 => Err(
                HeaderFault::Malformed("payload-less entry with a data checksum"),
            ),
            _ => Ok(header),
        }
    }

    /// Bytes that follow the header on disk (payload and its padding to the record granule).
    pub fn payload_span(&self) -> u64 {
        match self.kind {
            RecordKind::Write => round_up(self.len, RECORD_GRANULE),
            RecordKind::Pad => self.len,
            RecordKind::Zeroes | RecordKind::Discard => 0,
        }
    }

    /// Whole record size: header plus payload span.
    pub fn record_bytes(&self) -> u64 {
        ENTRY_HEADER_BYTES as u64 + self.payload_span()
    }
}

/// Record size of an entry with `data_len` payload bytes (0 for Zeroes/Discard).
pub fn record_bytes_for(data_len: u64) -> u64 {
    ENTRY_HEADER_BYTES as u64 + round_up(data_len, RECORD_GRANULE)
}

/// Rounds `value` up to a multiple of `to` (a power of two or any non-zero value).
pub fn round_up(value: u64, to: u64) -> u64 {
    value.div_ceil(to.max(1)).saturating_mul(to.max(1))
}

/// Rounds `value` down to a multiple of `to`.
pub fn round_down(value: u64, to: u64) -> u64 {
    value - value % to.max(1)
}

/// Role of the group at this site. Stored as one byte: 0 never set, 1 primary, 2 secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub enum Role {
    /// Never set: a replog created by format-1 code, or a fresh one nobody assigned a role yet.
    #[default]
    Unset,
    Primary,
    Secondary,
}

impl Role {
    /// The role byte on disk.
    pub fn code(self) -> u8 {
        match self {
            Role::Unset => 0,
            Role::Primary => 1,
            Role::Secondary => 2,
        }
    }

    /// Decodes a role byte.
    pub fn from_code(code: u8) -> Option<Role> {
        match code {
            0 => Some(Role::Unset),
            1 => Some(Role::Primary),
            2 => Some(Role::Secondary),
            _ => None,
        }
    }
}

/// One step of the epoch history: epoch `epoch` began at lsn `start_lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EpochStart {
    /// At least 1; strictly increasing along the history.
    pub epoch: u64,
    /// Non-decreasing along the history.
    pub start_lsn: u64,
}

/// The peer group this group is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Binding {
    pub peer_group_uuid: [u8; 16],
    /// 1..=[`PEER_SITE_ID_BYTES_MAX`] bytes of UTF-8.
    pub peer_site_id: String,
}

/// What identifies the group across restarts: role, epoch history, binding.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Identity {
    pub role: Role,
    /// Oldest first; at most [`EPOCH_HISTORY_MAX`]; the last one is the current epoch.
    pub epochs: Vec<EpochStart>,
    /// None: not bound to a peer group.
    pub binding: Option<Binding>,
}

impl Identity {
    /// The current epoch (the last of the history); None before the first `begin_epoch`.
    pub fn current_epoch(&self) -> Option<EpochStart> {
        self.epochs.last().copied()
    }

    /// Appends epoch `next` to the history. Beginning the current epoch again with the same
    /// start lsn changes nothing (a caller that does not know whether its last call reached the
    /// disk may repeat it). When the history is full the oldest entry is dropped: see FORMAT.md
    /// "Epoch history" for why this keeps the newest rather than refusing.
    pub fn begin_epoch(&mut self, next: EpochStart) -> Result<(), String> {
        if next.epoch == 0 {
            return Err("epoch 0 is reserved (epochs start at 1)".to_string());
        }
        if let Some(current) = self.current_epoch() {
            if current == next {
                return Ok(());
            }
            if next.epoch <= current.epoch {
                return Err(format!(
                    "epoch {} does not exceed the current epoch {}",
                    next.epoch, current.epoch
                ));
            }
            if next.start_lsn < current.start_lsn {
                return Err(format!(
                    "epoch {} would start at lsn {}, before the current epoch {} (lsn {})",
                    next.epoch, next.start_lsn, current.epoch, current.start_lsn
                ));
            }
        }
        if self.epochs.len() >= EPOCH_HISTORY_MAX {
            let excess = self.epochs.len() + 1 - EPOCH_HISTORY_MAX;
            self.epochs.drain(..excess);
        }
        self.epochs.push(next);
        Ok(())
    }

    /// Checks every field against what the format allows; `Err` names the field.
    pub fn check(&self) -> Result<(), String> {
        if self.epochs.len() > EPOCH_HISTORY_MAX {
            return Err(format!(
                "epoch history of {} entries (max {EPOCH_HISTORY_MAX})",
                self.epochs.len()
            ));
        }
        let mut prev: Option<EpochStart> = None;
        for e in &self.epochs {
            if e.epoch == 0 {
                return Err("epoch 0 in the history".to_string());
            }
            if let Some(p) = prev {
                if e.epoch <= p.epoch || e.start_lsn < p.start_lsn {
                    return Err(format!(
                        "epoch history out of order: ({}, lsn {}) after ({}, lsn {})",
                        e.epoch, e.start_lsn, p.epoch, p.start_lsn
                    ));
                }
            }
            prev = Some(*e);
        }
        if let Some(b) = &self.binding {
            check_peer_site_id(&b.peer_site_id)?;
        }
        Ok(())
    }
}

/// Checks a peer site id: 1..=[`PEER_SITE_ID_BYTES_MAX`] bytes (a `String` is UTF-8 already).
pub fn check_peer_site_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > PEER_SITE_ID_BYTES_MAX {
        return Err(format!(
            "peer site id of {} bytes (must be 1 to {PEER_SITE_ID_BYTES_MAX})",
            id.len()
        ));
    }
    Ok(())
}

/// The persisted activity log: extents whose device writes may be on the primary's device with
/// no durable replog record covering them. The replog stores the set; the policy is the caller's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivityLogState {
    /// Bytes per extent: a power of two in [`AL_EXTENT_BYTES_MIN`]..=[`AL_EXTENT_BYTES_MAX`].
    pub extent_bytes: u64,
    /// (device, extent index), strictly ascending, at most [`AL_EXTENTS_MAX`]. Extent `i` of a
    /// device covers bytes `i * extent_bytes .. (i + 1) * extent_bytes`.
    pub extents: Vec<(u32, u64)>,
}

impl Default for ActivityLogState {
    fn default() -> ActivityLogState {
        ActivityLogState {
            extent_bytes: AL_EXTENT_BYTES_DEFAULT,
            extents: Vec::new(),
        }
    }
}

impl ActivityLogState {
    /// Checks the extent size and the set (bounded, sorted, no duplicate, no extent whose byte
    /// offset overflows a u64); `Err` names the problem.
    pub fn check(&self) -> Result<(), String> {
        check_al_extent_bytes(self.extent_bytes)?;
        if self.extents.len() > AL_EXTENTS_MAX {
            return Err(format!(
                "activity log of {} extents (max {AL_EXTENTS_MAX})",
                self.extents.len()
            ));
        }
        for pair in self.extents.windows(2) {
            if let [a, b] = pair {
                if a >= b {
                    return Err(format!(
                        "activity log not strictly ascending: {a:?} then {b:?}"
                    ));
                }
            }
        }
        for (device, extent) in &self.extents {
            if extent.checked_mul(self.extent_bytes).is_none() {
                return Err(format!(
                    "activity log extent {extent} of device {device} lies beyond 2^64 bytes"
                ));
            }
        }
        Ok(())
    }
}

/// Checks an activity-log extent size.
pub fn check_al_extent_bytes(bytes: u64) -> Result<(), String> {
    if !bytes.is_power_of_two() || !(AL_EXTENT_BYTES_MIN..=AL_EXTENT_BYTES_MAX).contains(&bytes) {
        return Err(format!(
            "activity log extent size {bytes} (must be a power of two from {AL_EXTENT_BYTES_MIN} to {AL_EXTENT_BYTES_MAX})"
        ));
    }
    Ok(())
}

/// One metadata slot: the whole 4096-byte block (format 3). See FORMAT.md "Metadata slot".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetaSlot {
    pub uuid: [u8; 16],
    /// Bumped at every metadata write; the valid slot with the highest sequence wins.
    pub sequence: u64,
    /// Bytes of the whole replog (metadata area + ring).
    pub replog_bytes: u64,
    /// Where the ring starts, relative to the replog start (8192).
    pub ring_offset: u64,
    pub ring_bytes: u64,
    /// Batch alignment unit (4096).
    pub block_bytes: u32,
    /// Writer generation: entries written after this metadata carry it.
    pub generation: u32,
    /// Lowest generation the entry at the tail may carry (see FORMAT.md "Recovery").
    pub tail_generation: u32,
    /// Virtual position of the first retained record (or of the head when empty).
    pub tail_vpos: u64,
    /// Highest reclaimed lsn: every retained entry has a larger lsn.
    pub tail_lsn: u64,
    /// Where the head was when this slot was written (informational; recovery scans from the tail).
    pub head_hint_vpos: u64,
    pub created_ns: u64,
    /// Bit i set: slink i is registered and `cursors[i]` is meaningful.
    pub registered: u16,
    pub cursors: [u64; SLOTS_CURSORS],
    /// Per slink: highest resync sequence handed out (a high-water mark; 0 = none yet).
    pub resync_seqs: [u64; SLOTS_CURSORS],
    /// Feature bits ([`FEATURES_KNOWN`]); a slot with any other bit is refused.
    pub features: u64,
    pub identity: Identity,
    pub activity_log: ActivityLogState,
    /// Per slink: the caller's drop floor (format 3; None in older slots). The replog gives it
    /// no meaning; it is cleared when the slink is registered or unregistered.
    pub drop_floors: [Option<u64>; SLOTS_CURSORS],
}

// Byte offsets of the format-2 and format-3 fields (FORMAT.md "Metadata slot"). Those below
// 240 are the format-1 offsets, unchanged.
const M_RESYNC_SEQS: usize = 240;
const M_FEATURES: usize = 368;
const M_ROLE: usize = 376;
const M_BOUND: usize = 377;
const M_PEER_SITE_LEN: usize = 378;
const M_EPOCH_COUNT: usize = 379;
const M_AL_COUNT: usize = 380;
/// Format 3: bit i set = slink i has a drop floor (reserved zero in format 2).
const M_DROP_FLOOR_SET: usize = 382;
const M_PEER_GROUP_UUID: usize = 384;
const M_PEER_SITE_ID: usize = 400;
const M_AL_EXTENT_BYTES: usize = 464;
const M_EPOCHS: usize = 480;
const EPOCH_ENTRY_BYTES: usize = 16;
const M_AL_EXTENTS: usize = M_EPOCHS + EPOCH_HISTORY_MAX * EPOCH_ENTRY_BYTES;
const META_V1_CRC_AT: usize = META_V1_ENCODED_BYTES - 4;

/// Where the two activity-log encodings differ: format 2 stores (device u32, extent u64) in
/// 12 bytes; format 3 stores the extent in 7 bytes (an extent index is below 2^52, since
/// `extent * al_extent_bytes < 2^64` and `al_extent_bytes >= 2^12`), which frees the room for
/// the drop floors after it.
#[derive(Clone, Copy)]
struct Layout {
    version: u16,
    al_entry_bytes: usize,
    al_extent_bytes_stored: usize,
    al_end: usize,
    /// Offset of `drop_floors[16]`; None in format 2.
    drop_floors: Option<usize>,
    reserved: &'static [std::ops::Range<usize>],
}

const AL_END_V2: usize = M_AL_EXTENTS + AL_EXTENTS_MAX * 12;
const AL_END_V3: usize = M_AL_EXTENTS + AL_EXTENTS_MAX * 11;
const M_DROP_FLOORS: usize = AL_END_V3;
const DROP_FLOORS_END: usize = M_DROP_FLOORS + 8 * SLOTS_CURSORS;

const LAYOUT_V2: Layout = Layout {
    version: FORMAT_VERSION_V2,
    al_entry_bytes: 12,
    al_extent_bytes_stored: 8,
    al_end: AL_END_V2,
    drop_floors: None,
    reserved: &[10..12, 106..112, 382..384, 472..480, AL_END_V2..META_CRC_AT],
};

const LAYOUT_V3: Layout = Layout {
    version: FORMAT_VERSION,
    al_entry_bytes: 11,
    al_extent_bytes_stored: 7,
    al_end: AL_END_V3,
    drop_floors: Some(M_DROP_FLOORS),
    reserved: &[10..12, 106..112, 472..480, DROP_FLOORS_END..META_CRC_AT],
};

// The layouts must fit the slot with its checksum last; checked at compile time.
const _: () = assert!(M_AL_EXTENTS == 992 && AL_END_V2 == 4064 && AL_END_V2 <= META_CRC_AT);
const _: () =
    assert!(AL_END_V3 == 3808 && DROP_FLOORS_END == 3936 && DROP_FLOORS_END <= META_CRC_AT);
// A format-3 extent index fits its 7 bytes: below 2^64 / AL_EXTENT_BYTES_MIN.
const _: () = assert!(AL_EXTENT_BYTES_MIN >= 1 << 8);

fn range_zero(b: &[u8], r: std::ops::Range<usize>) -> bool {
    all_zero(b.get(r).unwrap_or_default())
}

fn crc_ok(b: &[u8], crc_at: usize) -> bool {
    match b.get(..crc_at) {
        Some(covered) => crc32c::crc32c(covered) == get_u32(b, crc_at),
        None => false,
    }
}

impl MetaSlot {
    /// A fresh slot for `create`: no role, no epoch, unbound, no feature, empty activity log.
    pub fn fresh(uuid: [u8; 16], ring_bytes: u64, created_ns: u64) -> MetaSlot {
        MetaSlot {
            uuid,
            sequence: 1,
            replog_bytes: META_AREA_BYTES + ring_bytes,
            ring_offset: META_AREA_BYTES,
            ring_bytes,
            block_bytes: BLOCK_BYTES as u32,
            generation: 1,
            tail_generation: 1,
            tail_vpos: 0,
            tail_lsn: 0,
            head_hint_vpos: 0,
            created_ns,
            registered: 0,
            cursors: [0; SLOTS_CURSORS],
            resync_seqs: [0; SLOTS_CURSORS],
            features: 0,
            identity: Identity::default(),
            activity_log: ActivityLogState::default(),
            drop_floors: [None; SLOTS_CURSORS],
        }
    }

    /// The fields format 1 also has, at their format-1 offsets (shared by both encoders).
    fn encode_common(&self, out: &mut [u8], version: u16) {
        put(out, 0, &META_MAGIC);
        put(out, 8, &version.to_le_bytes());
        // 10..12: flags in format 1 (none defined), reserved in format 2.
        put(out, 12, &self.block_bytes.to_le_bytes());
        put(out, 16, &self.uuid);
        put(out, 32, &self.sequence.to_le_bytes());
        put(out, 40, &self.replog_bytes.to_le_bytes());
        put(out, 48, &self.ring_offset.to_le_bytes());
        put(out, 56, &self.ring_bytes.to_le_bytes());
        put(out, 64, &self.generation.to_le_bytes());
        put(out, 68, &self.tail_generation.to_le_bytes());
        put(out, 72, &self.tail_vpos.to_le_bytes());
        put(out, 80, &self.tail_lsn.to_le_bytes());
        put(out, 88, &self.head_hint_vpos.to_le_bytes());
        put(out, 96, &self.created_ns.to_le_bytes());
        put(out, 104, &self.registered.to_le_bytes());
        for (i, cursor) in self.cursors.iter().enumerate() {
            put(out, 112 + 8 * i, &cursor.to_le_bytes());
        }
    }

    /// The whole 4096-byte slot (format 3), checksum included. Lists longer than the format
    /// allows are cut at their bound (never happens for a slot that passes [`MetaSlot::check`],
    /// which every write checks first).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(&LAYOUT_V3)
    }

    /// The slot a format-2 build wrote, or None when it has a drop floor (format 2 cannot say
    /// that). Production never writes format 2: this builds the images the upgrade tests open.
    pub fn encode_v2(&self) -> Option<Vec<u8>> {
        if self.drop_floors.iter().any(Option::is_some) {
            return None;
        }
        Some(self.encode_as(&LAYOUT_V2))
    }

    fn encode_as(&self, layout: &Layout) -> Vec<u8> {
        let mut out = vec![0u8; META_ENCODED_BYTES];
        self.encode_common(&mut out, layout.version);
        for (i, seq) in self.resync_seqs.iter().enumerate() {
            put(&mut out, M_RESYNC_SEQS + 8 * i, &seq.to_le_bytes());
        }
        put(&mut out, M_FEATURES, &self.features.to_le_bytes());
        let id = &self.identity;
        let epochs = id.epochs.get(..EPOCH_HISTORY_MAX).unwrap_or(&id.epochs);
        let extents = &self.activity_log.extents;
        let extents = extents.get(..AL_EXTENTS_MAX).unwrap_or(extents);
        put(&mut out, M_ROLE, &[id.role.code()]);
        put(&mut out, M_EPOCH_COUNT, &[epochs.len() as u8]);
        put(&mut out, M_AL_COUNT, &(extents.len() as u16).to_le_bytes());
        if let Some(b) = &id.binding {
            let site = b.peer_site_id.as_bytes();
            let site = site.get(..PEER_SITE_ID_BYTES_MAX).unwrap_or(site);
            put(&mut out, M_BOUND, &[1]);
            put(&mut out, M_PEER_SITE_LEN, &[site.len() as u8]);
            put(&mut out, M_PEER_GROUP_UUID, &b.peer_group_uuid);
            put(&mut out, M_PEER_SITE_ID, site);
        }
        put(
            &mut out,
            M_AL_EXTENT_BYTES,
            &self.activity_log.extent_bytes.to_le_bytes(),
        );
        for (i, e) in epochs.iter().enumerate() {
            let at = M_EPOCHS + EPOCH_ENTRY_BYTES * i;
            put(&mut out, at, &e.epoch.to_le_bytes());
            put(&mut out, at + 8, &e.start_lsn.to_le_bytes());
        }
        for (i, (device, extent)) in extents.iter().enumerate() {
            let at = M_AL_EXTENTS + layout.al_entry_bytes * i;
            put(&mut out, at, &device.to_le_bytes());
            let extent = extent.to_le_bytes();
            put(
                &mut out,
                at + 4,
                extent
                    .get(..layout.al_extent_bytes_stored)
                    .unwrap_or(&extent),
            );
        }
        if let Some(floors_at) = layout.drop_floors {
            let mut set = 0u16;
            for (i, floor) in self.drop_floors.iter().enumerate() {
                if let Some(floor) = floor {
                    set |= 1 << i;
                    put(&mut out, floors_at + 8 * i, &floor.to_le_bytes());
                }
            }
            put(&mut out, M_DROP_FLOOR_SET, &set.to_le_bytes());
        }
        let crc = crc32c::crc32c(out.get(..META_CRC_AT).unwrap_or_default());
        put(&mut out, META_CRC_AT, &crc.to_le_bytes());
        out
    }

    /// The 512 bytes a format-1 build wrote for this slot, or None when a format-2 field holds
    /// something format 1 cannot say. Production never writes format 1: this builds the images
    /// the upgrade tests open.
    pub fn encode_v1(&self) -> Option<[u8; META_V1_ENCODED_BYTES]> {
        let v1_expressible = self.resync_seqs == [0; SLOTS_CURSORS]
            && self.drop_floors == [None; SLOTS_CURSORS]
            && self.features == 0
            && self.identity == Identity::default()
            && self.activity_log == ActivityLogState::default();
        if !v1_expressible {
            return None;
        }
        let mut out = [0u8; META_V1_ENCODED_BYTES];
        self.encode_common(&mut out, FORMAT_VERSION_V1);
        let crc = crc32c::crc32c(out.get(..META_V1_CRC_AT).unwrap_or_default());
        put(&mut out, META_V1_CRC_AT, &crc.to_le_bytes());
        Some(out)
    }

    /// Decodes and checks a slot (the whole 4096-byte block; 512 bytes suffice for format 1).
    pub fn decode(bytes: &[u8]) -> Result<MetaSlot, HeaderFault> {
        MetaSlot::decode_versioned(bytes).map(|(m, _)| m)
    }

    /// [`MetaSlot::decode`] that also says which format version the slot was written in (1, 2
    /// or 3). A format-1 slot decodes with the defaults of the later fields, a format-2 slot
    /// with no drop floors.
    pub fn decode_versioned(bytes: &[u8]) -> Result<(MetaSlot, u16), HeaderFault> {
        let Some(head) = bytes.get(..META_V1_ENCODED_BYTES) else {
            return Err(HeaderFault::Short);
        };
        let slot = bytes.get(..META_ENCODED_BYTES).unwrap_or(bytes);
        if all_zero(slot) {
            return Err(HeaderFault::Zeroed);
        }
        if get::<8>(head, 0) != META_MAGIC {
            return Err(HeaderFault::BadMagic);
        }
        match get_u16(head, 8) {
            FORMAT_VERSION_V1 => MetaSlot::decode_v1(slot).map(|m| (m, FORMAT_VERSION_V1)),
            FORMAT_VERSION_V2 => {
                MetaSlot::decode_v2(slot, &LAYOUT_V2).map(|m| (m, FORMAT_VERSION_V2))
            }
            FORMAT_VERSION => MetaSlot::decode_v2(slot, &LAYOUT_V3).map(|m| (m, FORMAT_VERSION)),
            other => {
                // Every version keeps the magic, the version at 8 and a crc32c of the bytes
                // before it at the end of its layout (512 in format 1, 4096 since): a valid
                // one means a real slot of another version, not garbage.
                if crc_ok(slot, META_CRC_AT) || crc_ok(head, META_V1_CRC_AT) {
                    Err(HeaderFault::UnsupportedVersion(other))
                } else {
                    Err(HeaderFault::BadCrc)
                }
            }
        }
    }

    /// The format-1 fields (offsets 0..240) of a checked slot.
    fn decode_common(b: &[u8]) -> MetaSlot {
        let mut cursors = [0u64; SLOTS_CURSORS];
        for (i, cursor) in cursors.iter_mut().enumerate() {
            *cursor = get_u64(b, 112 + 8 * i);
        }
        MetaSlot {
            uuid: get(b, 16),
            sequence: get_u64(b, 32),
            replog_bytes: get_u64(b, 40),
            ring_offset: get_u64(b, 48),
            ring_bytes: get_u64(b, 56),
            block_bytes: get_u32(b, 12),
            generation: get_u32(b, 64),
            tail_generation: get_u32(b, 68),
            tail_vpos: get_u64(b, 72),
            tail_lsn: get_u64(b, 80),
            head_hint_vpos: get_u64(b, 88),
            created_ns: get_u64(b, 96),
            registered: get_u16(b, 104),
            cursors,
            resync_seqs: [0; SLOTS_CURSORS],
            features: 0,
            identity: Identity::default(),
            activity_log: ActivityLogState::default(),
            drop_floors: [None; SLOTS_CURSORS],
        }
    }

    fn decode_v1(slot: &[u8]) -> Result<MetaSlot, HeaderFault> {
        if !crc_ok(slot, META_V1_CRC_AT) {
            return Err(HeaderFault::BadCrc);
        }
        if get_u16(slot, 10) != 0 {
            return Err(HeaderFault::Malformed("unknown metadata flags"));
        }
        if !range_zero(slot, 106..112) || !range_zero(slot, 240..META_V1_CRC_AT) {
            return Err(HeaderFault::Malformed("reserved metadata bytes not zero"));
        }
        // Format-1 code wrote the rest of the block as zeros. Anything there is a torn or
        // damaged write (a format-2 write over a format-1 slot that kept only its first
        // sector, for one): the slot does not hold one consistent state.
        if !range_zero(slot, META_V1_ENCODED_BYTES..slot.len()) {
            return Err(HeaderFault::Malformed(
                "format-1 slot with bytes after its 512-byte layout (torn or damaged)",
            ));
        }
        Ok(MetaSlot::decode_common(slot))
    }

    /// A format-2 or format-3 slot (they differ in `layout` only).
    fn decode_v2(b: &[u8], layout: &Layout) -> Result<MetaSlot, HeaderFault> {
        if b.len() < META_ENCODED_BYTES {
            return Err(HeaderFault::Short);
        }
        if !crc_ok(b, META_CRC_AT) {
            return Err(HeaderFault::BadCrc);
        }
        if layout.reserved.iter().any(|r| !range_zero(b, r.clone())) {
            return Err(HeaderFault::Malformed("reserved metadata bytes not zero"));
        }
        let features = get_u64(b, M_FEATURES);
        if features & !FEATURES_KNOWN != 0 {
            return Err(HeaderFault::UnknownFeatures(features & !FEATURES_KNOWN));
        }
        let [role] = get::<1>(b, M_ROLE);
        let role = Role::from_code(role).ok_or(HeaderFault::Malformed("unknown role"))?;
        let [site_len] = get::<1>(b, M_PEER_SITE_LEN);
        let site_len = usize::from(site_len);
        let [bound] = get::<1>(b, M_BOUND);
        let binding = match bound {
            0 if site_len == 0
                && range_zero(
                    b,
                    M_PEER_GROUP_UUID..M_PEER_SITE_ID + PEER_SITE_ID_BYTES_MAX,
                ) =>
            {
                None
            }
            0 => return Err(HeaderFault::Malformed("binding bytes set while unbound")),
            1 if (1..=PEER_SITE_ID_BYTES_MAX).contains(&site_len) => {
                let site_end = M_PEER_SITE_ID + site_len;
                if !range_zero(b, site_end..M_PEER_SITE_ID + PEER_SITE_ID_BYTES_MAX) {
                    return Err(HeaderFault::Malformed(
                        "peer site id bytes beyond its length",
                    ));
                }
                let site = b.get(M_PEER_SITE_ID..site_end).unwrap_or_default();
                let peer_site_id = std::str::from_utf8(site)
                    .map_err(|_| HeaderFault::Malformed("peer site id is not UTF-8"))?
                    .to_string();
                Some(Binding {
                    peer_group_uuid: get(b, M_PEER_GROUP_UUID),
                    peer_site_id,
                })
            }
            1 => return Err(HeaderFault::Malformed("peer site id length out of range")),
            _ => return Err(HeaderFault::Malformed("bound flag neither 0 nor 1")),
        };
        let [epoch_count] = get::<1>(b, M_EPOCH_COUNT);
        let epoch_count = usize::from(epoch_count);
        if epoch_count > EPOCH_HISTORY_MAX {
            return Err(HeaderFault::Malformed(
                "epoch history longer than its bound",
            ));
        }
        let epochs: Vec<EpochStart> = (0..epoch_count)
            .map(|i| {
                let at = M_EPOCHS + EPOCH_ENTRY_BYTES * i;
                EpochStart {
                    epoch: get_u64(b, at),
                    start_lsn: get_u64(b, at + 8),
                }
            })
            .collect();
        if !range_zero(b, M_EPOCHS + EPOCH_ENTRY_BYTES * epoch_count..M_AL_EXTENTS) {
            return Err(HeaderFault::Malformed(
                "unused epoch history entries not zero",
            ));
        }
        let al_count = usize::from(get_u16(b, M_AL_COUNT));
        if al_count > AL_EXTENTS_MAX {
            return Err(HeaderFault::Malformed("activity log longer than its bound"));
        }
        let extents: Vec<(u32, u64)> = (0..al_count)
            .map(|i| {
                let at = M_AL_EXTENTS + layout.al_entry_bytes * i;
                let extent = if layout.al_extent_bytes_stored == 8 {
                    get_u64(b, at + 4)
                } else {
                    get_u56(b, at + 4)
                };
                (get_u32(b, at), extent)
            })
            .collect();
        if !range_zero(
            b,
            M_AL_EXTENTS + layout.al_entry_bytes * al_count..layout.al_end,
        ) {
            return Err(HeaderFault::Malformed(
                "unused activity log entries not zero",
            ));
        }
        let mut drop_floors = [None; SLOTS_CURSORS];
        if let Some(floors_at) = layout.drop_floors {
            let set = get_u16(b, M_DROP_FLOOR_SET);
            for (i, floor) in drop_floors.iter_mut().enumerate() {
                let at = floors_at + 8 * i;
                if set & (1 << i) != 0 {
                    *floor = Some(get_u64(b, at));
                } else if !range_zero(b, at..at + 8) {
                    return Err(HeaderFault::Malformed("unset drop floor not zero"));
                }
            }
        }
        let mut resync_seqs = [0u64; SLOTS_CURSORS];
        for (i, seq) in resync_seqs.iter_mut().enumerate() {
            *seq = get_u64(b, M_RESYNC_SEQS + 8 * i);
        }
        let slot = MetaSlot {
            resync_seqs,
            features,
            identity: Identity {
                role,
                epochs,
                binding,
            },
            activity_log: ActivityLogState {
                extent_bytes: get_u64(b, M_AL_EXTENT_BYTES),
                extents,
            },
            drop_floors,
            ..MetaSlot::decode_common(b)
        };
        if slot.identity.check().is_err() {
            return Err(HeaderFault::Malformed("epoch history out of order"));
        }
        if slot.activity_log.check().is_err() {
            return Err(HeaderFault::Malformed(
                "activity log extent size or order out of range",
            ));
        }
        Ok(slot)
    }

    /// Checks the format-2 fields (features, identity, activity log; drop floors have no rule);
    /// `Err` names the field.
    /// Every metadata write checks this first, so nothing decode would refuse reaches the disk.
    pub fn check(&self) -> Result<(), String> {
        if self.features & !FEATURES_KNOWN != 0 {
            return Err(format!(
                "unknown feature bits {:#x} (known: {FEATURES_KNOWN:#x})",
                self.features & !FEATURES_KNOWN
            ));
        }
        self.identity.check()?;
        self.activity_log.check()
    }

    /// Checks the geometry fields against what the format allows; `Err` names the field.
    pub fn check_geometry(&self) -> Result<(), String> {
        if u64::from(self.block_bytes) != BLOCK_BYTES {
            return Err(format!(
                "block size {} (expected {BLOCK_BYTES})",
                self.block_bytes
            ));
        }
        if self.ring_offset != META_AREA_BYTES {
            return Err(format!(
                "ring offset {} (expected {META_AREA_BYTES})",
                self.ring_offset
            ));
        }
        if self.ring_bytes < MIN_RING_BYTES || !self.ring_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err(format!(
                "ring size {} (must be a multiple of {BLOCK_BYTES}, at least {MIN_RING_BYTES})",
                self.ring_bytes
            ));
        }
        if self.replog_bytes != self.ring_offset.saturating_add(self.ring_bytes) {
            return Err(format!(
                "replog size {} is not ring offset {} + ring size {}",
                self.replog_bytes, self.ring_offset, self.ring_bytes
            ));
        }
        if self.generation == 0 || self.tail_generation > self.generation {
            return Err(format!(
                "generation {} / tail generation {}",
                self.generation, self.tail_generation
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_header() -> EntryHeader {
        EntryHeader {
            kind: RecordKind::Write,
            uuid: [0x11; 16],
            vpos: 0x1000,
            lsn: 7,
            generation: 3,
            device: 2,
            offset: 0x20_0000,
            len: 5,
            timestamp_ns: 1_700_000_000_000_000_000,
            data_crc: crc32c::crc32c(b"hello"),
        }
    }

    #[test]
    fn header_round_trips_and_detects_every_fault() {
        let h = sample_header();
        let bytes = h.encode();
        assert_eq!(EntryHeader::decode(&bytes), Ok(h));
        assert_eq!(h.record_bytes(), 256);
        assert_eq!(EntryHeader::decode(&bytes[..127]), Err(HeaderFault::Short));
        assert_eq!(EntryHeader::decode(&[0u8; 128]), Err(HeaderFault::Zeroed));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert_eq!(EntryHeader::decode(&bad), Err(HeaderFault::BadMagic));
        let mut bad = bytes;
        bad[40] ^= 1;
        assert_eq!(EntryHeader::decode(&bad), Err(HeaderFault::BadCrc));
    }

    #[test]
    fn header_field_checks_after_crc() {
        let h = sample_header();
        let reseal = |mut b: [u8; 128]| {
            let crc = crc32c::crc32c(&b[..124]);
            b[124..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        let mut b = h.encode();
        b[4] = 2;
        assert_eq!(
            EntryHeader::decode(&reseal(b)),
            Err(HeaderFault::UnsupportedVersion(2))
        );
        let mut b = h.encode();
        b[6] = 9;
        assert!(matches!(
            EntryHeader::decode(&reseal(b)),
            Err(HeaderFault::Malformed(_))
        ));
        let mut b = h.encode();
        b[7] = 1;
        assert!(matches!(
            EntryHeader::decode(&reseal(b)),
            Err(HeaderFault::Malformed(_))
        ));
        let mut b = h.encode();
        b[100] = 1;
        assert!(matches!(
            EntryHeader::decode(&reseal(b)),
            Err(HeaderFault::Malformed(_))
        ));
    }

    fn sample_meta() -> MetaSlot {
        MetaSlot {
            sequence: 9,
            generation: 2,
            tail_generation: 1,
            tail_vpos: 4096,
            tail_lsn: 3,
            head_hint_vpos: 8192,
            registered: 0b101,
            cursors: [4; SLOTS_CURSORS],
            resync_seqs: [11; SLOTS_CURSORS],
            features: FEATURE_ACTIVITY_LOG,
            identity: Identity {
                role: Role::Primary,
                epochs: vec![
                    EpochStart {
                        epoch: 1,
                        start_lsn: 1,
                    },
                    EpochStart {
                        epoch: 4,
                        start_lsn: 90,
                    },
                ],
                binding: Some(Binding {
                    peer_group_uuid: [0xAB; 16],
                    peer_site_id: "site-b".to_string(),
                }),
            },
            activity_log: ActivityLogState {
                extent_bytes: 1 << 22,
                extents: vec![(0, 3), (0, 7), (2, 1)],
            },
            ..MetaSlot::fresh([7; 16], MIN_RING_BYTES, 5)
        }
    }

    /// Re-seals a slot after a field was changed, so the field check (not the crc)
    /// must refuse it.
    fn reseal(mut b: Vec<u8>) -> Vec<u8> {
        let crc = crc32c::crc32c(b.get(..META_CRC_AT).unwrap_or_default());
        put(&mut b, META_CRC_AT, &crc.to_le_bytes());
        b
    }

    fn with_byte(at: usize, value: u8) -> Vec<u8> {
        let mut b = sample_meta().encode();
        put(&mut b, at, &[value]);
        reseal(b)
    }

    #[test]
    fn meta_round_trips() {
        let m = sample_meta();
        let bytes = m.encode();
        assert_eq!(bytes.len(), META_ENCODED_BYTES);
        assert_eq!(MetaSlot::decode_versioned(&bytes), Ok((m.clone(), 3)));
        assert_eq!(m.check_geometry(), Ok(()));
        assert_eq!(m.check(), Ok(()));
        let mut bad = bytes.clone();
        put(&mut bad, 200, &[0x80]);
        assert_eq!(MetaSlot::decode(&bad), Err(HeaderFault::BadCrc));
        // A slot is the whole block: a cut one is refused, not read with zeros.
        assert_eq!(
            MetaSlot::decode(bytes.get(..4000).unwrap_or_default()),
            Err(HeaderFault::Short)
        );
    }

    #[test]
    fn meta_field_checks_after_crc() {
        let malformed = |b: Vec<u8>| matches!(MetaSlot::decode(&b), Err(HeaderFault::Malformed(_)));
        assert!(malformed(with_byte(M_ROLE, 3)), "unknown role");
        assert!(malformed(with_byte(M_BOUND, 2)), "bound flag 2");
        assert!(
            malformed(with_byte(M_PEER_SITE_LEN, 65)),
            "site id too long"
        );
        assert!(
            malformed(with_byte(M_PEER_SITE_LEN, 0)),
            "bound with empty site id"
        );
        assert!(
            malformed(with_byte(M_PEER_SITE_ID, 0xFF)),
            "site id not UTF-8"
        );
        assert!(
            malformed(with_byte(M_PEER_SITE_ID + 10, b'x')),
            "bytes past the site id"
        );
        assert!(
            malformed(with_byte(M_EPOCH_COUNT, 33)),
            "epoch history too long"
        );
        assert!(
            malformed(with_byte(M_EPOCH_COUNT, 1)),
            "unused epoch entry not zero"
        );
        assert!(
            malformed(with_byte(M_EPOCHS + 16, 0)),
            "epochs out of order"
        );
        assert!(
            malformed(with_byte(M_AL_COUNT, 2)),
            "unused AL entry not zero"
        );
        assert!(
            malformed(with_byte(M_AL_EXTENTS + 11, 9)),
            "AL not ascending"
        );
        assert!(
            malformed(with_byte(M_DROP_FLOORS + 8 * 3, 1)),
            "a floor whose bit is clear is not zero"
        );
        assert!(
            malformed(with_byte(M_AL_EXTENT_BYTES, 1)),
            "AL extent not a power of two"
        );
        for r in LAYOUT_V3.reserved {
            assert!(
                malformed(with_byte(r.start, 1)),
                "reserved byte {}",
                r.start
            );
        }
        let mut unbound = sample_meta();
        unbound.identity.binding = None;
        let mut b = unbound.encode();
        put(&mut b, M_PEER_GROUP_UUID, &[1]);
        assert!(malformed(reseal(b)), "binding bytes while unbound");
        assert_eq!(
            MetaSlot::decode(&with_byte(M_FEATURES, 0b111)),
            Err(HeaderFault::UnknownFeatures(0b100))
        );
        assert_eq!(
            MetaSlot::decode(&with_byte(8, 4)),
            Err(HeaderFault::UnsupportedVersion(4))
        );
        // Version 4 without a valid checksum anywhere is garbage, not a newer slot.
        let mut b = with_byte(8, 4);
        put(&mut b, META_CRC_AT, &[0, 0, 0, 0]);
        assert_eq!(MetaSlot::decode(&b), Err(HeaderFault::BadCrc));
    }

    #[test]
    fn drop_floors_round_trip_including_zero_and_the_largest_lsn() {
        let mut m = sample_meta();
        m.drop_floors[0] = Some(0);
        m.drop_floors[1] = Some(u64::MAX);
        m.drop_floors[15] = Some(12345);
        let bytes = m.encode();
        assert_eq!(get_u16(&bytes, M_DROP_FLOOR_SET), 0b1000_0000_0000_0011);
        assert_eq!(MetaSlot::decode_versioned(&bytes), Ok((m.clone(), 3)));
        assert!(m.encode_v2().is_none(), "format 2 cannot say it");
        // A set bit with a zero floor is floor 0, not "none".
        let mut only_zero = sample_meta();
        only_zero.drop_floors[4] = Some(0);
        assert_eq!(
            MetaSlot::decode(&only_zero.encode()).map(|d| d.drop_floors[4]),
            Ok(Some(0))
        );
    }

    #[test]
    fn v2_slots_decode_with_no_drop_floors_and_their_own_activity_log_layout() {
        let mut m = sample_meta();
        // The largest extent index any valid slot can hold: 7 bytes in format 3, 8 in format 2.
        m.activity_log.extent_bytes = AL_EXTENT_BYTES_MIN;
        m.activity_log.extents = vec![(0, 3), (7, (u64::MAX / AL_EXTENT_BYTES_MIN) - 1)];
        assert_eq!(m.check(), Ok(()));
        let v2 = m.encode_v2().unwrap_or_default();
        assert_eq!(get_u16(&v2, 8), 2);
        assert_eq!(MetaSlot::decode_versioned(&v2), Ok((m.clone(), 2)));
        assert_eq!(MetaSlot::decode_versioned(&m.encode()), Ok((m.clone(), 3)));
        // Format 2 kept bytes 382..384 reserved: a drop floor bit there is refused.
        let mut b = v2.clone();
        put(&mut b, M_DROP_FLOOR_SET, &[1]);
        assert!(matches!(
            MetaSlot::decode(&reseal(b)),
            Err(HeaderFault::Malformed(_))
        ));
    }

    #[test]
    fn v1_slots_decode_with_defaults_and_torn_ones_are_refused() {
        let m = MetaSlot::fresh([3; 16], MIN_RING_BYTES, 77);
        let v1 = m.encode_v1().unwrap_or([0; META_V1_ENCODED_BYTES]);
        assert_eq!(MetaSlot::decode_versioned(&v1), Ok((m.clone(), 1)));
        let mut block = vec![0u8; META_ENCODED_BYTES];
        put(&mut block, 0, &v1);
        assert_eq!(MetaSlot::decode_versioned(&block), Ok((m.clone(), 1)));
        // A format-2 write over it that kept only its first (old) sector.
        let v2 = sample_meta().encode();
        put(&mut block, 512, v2.get(512..).unwrap_or_default());
        assert!(matches!(
            MetaSlot::decode(&block),
            Err(HeaderFault::Malformed(_))
        ));
        // ...and one that kept only its new first sector.
        let mut block = vec![0u8; META_ENCODED_BYTES];
        put(&mut block, 0, v2.get(..512).unwrap_or_default());
        assert_eq!(MetaSlot::decode(&block), Err(HeaderFault::BadCrc));
        assert!(
            sample_meta().encode_v1().is_none(),
            "format 1 cannot say it"
        );
    }

    #[test]
    fn epoch_history_keeps_the_newest_and_refuses_going_back() {
        let mut id = Identity::default();
        for epoch in 1..=40u64 {
            let next = EpochStart {
                epoch,
                start_lsn: epoch * 10,
            };
            assert_eq!(id.begin_epoch(next), Ok(()));
            assert_eq!(id.begin_epoch(next), Ok(()), "repeating is a no-op");
        }
        assert_eq!(id.epochs.len(), EPOCH_HISTORY_MAX);
        assert_eq!(id.epochs.first().map(|e| e.epoch), Some(9));
        assert_eq!(id.current_epoch().map(|e| e.epoch), Some(40));
        assert_eq!(id.check(), Ok(()));
        let back = |epoch, start_lsn| EpochStart { epoch, start_lsn };
        assert!(
            id.clone().begin_epoch(back(40, 500)).is_err(),
            "same epoch, other start"
        );
        assert!(
            id.clone().begin_epoch(back(39, 500)).is_err(),
            "older epoch"
        );
        assert!(
            id.clone().begin_epoch(back(41, 399)).is_err(),
            "starts before the current"
        );
        assert!(
            Identity::default().begin_epoch(back(0, 0)).is_err(),
            "epoch 0"
        );
    }
}
