//! The on-disk bytes of a replog: constants, the entry header and the metadata slot.
//!
//! This module is the only place that knows byte offsets; FORMAT.md is its prose twin and the
//! golden vectors in the tests below (and in `tests/golden.rs`) are the truth. Everything is
//! little-endian. Decoders never panic: they return a [`HeaderFault`] naming what is wrong.

use serde::Serialize;

/// Format version written by this code and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

/// Unit of every ring write: batches start and end on multiples of this, relative to the ring
/// start. 4096 covers O_DIRECT on 512- and 4096-byte sector devices alike.
pub const BLOCK_BYTES: u64 = 4096;

/// One metadata slot occupies one block; two slots form the metadata area.
pub const META_SLOT_BYTES: u64 = BLOCK_BYTES;
/// Bytes before the ring: slot 0 at 0, slot 1 at 4096.
pub const META_AREA_BYTES: u64 = 2 * META_SLOT_BYTES;
/// Bytes of a slot covered by its layout (the rest of the block is zero): fits one 512-byte sector.
pub const META_ENCODED_BYTES: usize = 512;
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
}

impl std::fmt::Display for HeaderFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderFault::Short => write!(f, "too short"),
            HeaderFault::Zeroed => write!(f, "all zero (never written)"),
            HeaderFault::BadMagic => write!(f, "bad magic"),
            HeaderFault::BadCrc => write!(f, "checksum mismatch"),
            HeaderFault::UnsupportedVersion(v) => {
                write!(f, "format version {v} (supported: {FORMAT_VERSION})")
            }
            HeaderFault::Malformed(what) => write!(f, "malformed: {what}"),
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
        put(out, 4, &FORMAT_VERSION.to_le_bytes());
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
        if version != FORMAT_VERSION {
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

/// One metadata slot (512 meaningful bytes at the start of a 4096-byte block). See FORMAT.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MetaSlot {
    pub uuid: [u8; 16],
    /// Bumped at every metadata write; the valid slot with the highest sequence wins.
    pub sequence: u64,
    /// Bytes of the whole replog (metadata area + ring).
    pub replog_bytes: u64,
    /// Where the ring starts, relative to the replog start (8192 in v1).
    pub ring_offset: u64,
    pub ring_bytes: u64,
    /// Batch alignment unit (4096 in v1).
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
}

impl MetaSlot {
    /// The 512 meaningful bytes of the slot, checksum included.
    pub fn encode(&self) -> [u8; META_ENCODED_BYTES] {
        let mut out = [0u8; META_ENCODED_BYTES];
        put(&mut out, 0, &META_MAGIC);
        put(&mut out, 8, &FORMAT_VERSION.to_le_bytes());
        // 10..12 flags: none in v1.
        put(&mut out, 12, &self.block_bytes.to_le_bytes());
        put(&mut out, 16, &self.uuid);
        put(&mut out, 32, &self.sequence.to_le_bytes());
        put(&mut out, 40, &self.replog_bytes.to_le_bytes());
        put(&mut out, 48, &self.ring_offset.to_le_bytes());
        put(&mut out, 56, &self.ring_bytes.to_le_bytes());
        put(&mut out, 64, &self.generation.to_le_bytes());
        put(&mut out, 68, &self.tail_generation.to_le_bytes());
        put(&mut out, 72, &self.tail_vpos.to_le_bytes());
        put(&mut out, 80, &self.tail_lsn.to_le_bytes());
        put(&mut out, 88, &self.head_hint_vpos.to_le_bytes());
        put(&mut out, 96, &self.created_ns.to_le_bytes());
        put(&mut out, 104, &self.registered.to_le_bytes());
        for (i, cursor) in self.cursors.iter().enumerate() {
            put(&mut out, 112 + 8 * i, &cursor.to_le_bytes());
        }
        let crc = crc32c::crc32c(out.get(..META_CRC_AT).unwrap_or_default());
        put(&mut out, META_CRC_AT, &crc.to_le_bytes());
        out
    }

    /// Decodes and checks a slot's bytes (at least the first 512 bytes of the slot block).
    pub fn decode(bytes: &[u8]) -> Result<MetaSlot, HeaderFault> {
        let Some(b) = bytes.get(..META_ENCODED_BYTES) else {
            return Err(HeaderFault::Short);
        };
        if all_zero(b) {
            return Err(HeaderFault::Zeroed);
        }
        if get::<8>(b, 0) != META_MAGIC {
            return Err(HeaderFault::BadMagic);
        }
        let crc = crc32c::crc32c(b.get(..META_CRC_AT).unwrap_or_default());
        if crc != get_u32(b, META_CRC_AT) {
            return Err(HeaderFault::BadCrc);
        }
        let version = get_u16(b, 8);
        if version != FORMAT_VERSION {
            return Err(HeaderFault::UnsupportedVersion(version));
        }
        if get_u16(b, 10) != 0 {
            return Err(HeaderFault::Malformed("unknown metadata flags"));
        }
        if !all_zero(b.get(106..112).unwrap_or_default())
            || !all_zero(b.get(240..META_CRC_AT).unwrap_or_default())
        {
            return Err(HeaderFault::Malformed("reserved metadata bytes not zero"));
        }
        let mut cursors = [0u64; SLOTS_CURSORS];
        for (i, cursor) in cursors.iter_mut().enumerate() {
            *cursor = get_u64(b, 112 + 8 * i);
        }
        Ok(MetaSlot {
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
        })
    }

    /// Checks the geometry fields against what v1 allows; `Err` names the field.
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

    #[test]
    fn meta_round_trips() {
        let m = MetaSlot {
            uuid: [7; 16],
            sequence: 9,
            replog_bytes: META_AREA_BYTES + MIN_RING_BYTES,
            ring_offset: META_AREA_BYTES,
            ring_bytes: MIN_RING_BYTES,
            block_bytes: 4096,
            generation: 2,
            tail_generation: 1,
            tail_vpos: 4096,
            tail_lsn: 3,
            head_hint_vpos: 8192,
            created_ns: 5,
            registered: 0b101,
            cursors: [4; SLOTS_CURSORS],
        };
        let bytes = m.encode();
        assert_eq!(MetaSlot::decode(&bytes), Ok(m));
        assert_eq!(m.check_geometry(), Ok(()));
        let mut bad = bytes;
        bad[200] ^= 0x80;
        assert_eq!(MetaSlot::decode(&bad), Err(HeaderFault::BadCrc));
    }
}
