//! The values that cross a site link: entries, resync chunks, positions, site ids and devices.
//!
//! These are the transport's own types. The core converts its replog entries into [`Entry`]
//! (slink never sees a replog) and converts received entries back.

use std::fmt;

use bytes::Bytes;
use serde::Serialize;

/// Log sequence number: one counter per group, the apply order at every site.
pub type Lsn = u64;

/// Largest data payload of one Write entry on the wire (the replog's own limit is 8 MiB; a bigger
/// write is split by the core before it enters the replog).
pub const MAX_ENTRY_DATA_BYTES: u64 = 8 << 20;

/// Bytes of an entry's fixed fields on the wire (lsn, device, offset, kind, len, timestamp_ns).
pub const ENTRY_HEADER_WIRE_BYTES: usize = 8 + 4 + 8 + 1 + 8 + 8;

/// Bytes of a resync chunk's fixed fields on the wire (seq, device, offset, data length).
pub const RESYNC_HEADER_WIRE_BYTES: usize = 8 + 4 + 8 + 4;

/// Bytes of a resync-done record on the wire (seq, device).
pub const RESYNC_DONE_WIRE_BYTES: usize = 8 + 4;

/// Longest site id in bytes.
pub const SITE_ID_BYTES_MAX: usize = 64;

/// What an entry does to its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EntryKind {
    /// `len` bytes of `data` at `offset`.
    Write,
    /// Zeroes over `len` bytes at `offset`; no data on the wire.
    Zeroes,
    /// Discard (trim) of `len` bytes at `offset`; no data on the wire.
    Discard,
}

impl EntryKind {
    /// The wire code of this kind.
    pub fn code(self) -> u8 {
        match self {
            EntryKind::Write => 1,
            EntryKind::Zeroes => 2,
            EntryKind::Discard => 3,
        }
    }

    /// The kind for a wire code, `None` for an unknown code.
    pub fn from_code(code: u8) -> Option<EntryKind> {
        match code {
            1 => Some(EntryKind::Write),
            2 => Some(EntryKind::Zeroes),
            3 => Some(EntryKind::Discard),
            _ => None,
        }
    }
}

/// One replog entry as it crosses the link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub lsn: Lsn,
    pub device: u32,
    /// Byte offset on the device.
    pub offset: u64,
    pub kind: EntryKind,
    /// Bytes covered on the device (for a Write, also the length of `data`).
    pub len: u64,
    /// When the primary accepted the write (ns since the Unix epoch); the lag in time is measured
    /// from it.
    pub timestamp_ns: u64,
    /// The written bytes for a Write; empty for Zeroes and Discard.
    pub data: Bytes,
}

impl Entry {
    /// Bytes this entry takes inside an Entries frame payload.
    pub fn wire_bytes(&self) -> usize {
        ENTRY_HEADER_WIRE_BYTES.saturating_add(self.data.len())
    }
}

/// Bytes of a device copied by a resync, in the order the sender chose. `seq` is assigned by the
/// sending core, strictly increasing over the life of a resync; the receiver acknowledges the
/// highest `seq` it has stored durably.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncChunk {
    pub seq: u64,
    pub device: u32,
    pub offset: u64,
    pub data: Bytes,
}

/// The sender has copied every dirty region of `device`; `seq` orders it with the chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncDone {
    pub seq: u64,
    pub device: u32,
}

/// One unit the sending core hands to the link, and the receiving core gets back, in send order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Entry(Entry),
    ResyncData(ResyncChunk),
    ResyncDone(ResyncDone),
}

impl Item {
    /// Bytes this item takes inside a frame payload (what the window counts).
    pub fn wire_bytes(&self) -> usize {
        match self {
            Item::Entry(e) => e.wire_bytes(),
            Item::ResyncData(c) => RESYNC_HEADER_WIRE_BYTES.saturating_add(c.data.len()),
            Item::ResyncDone(_) => RESYNC_DONE_WIRE_BYTES,
        }
    }
}

/// How far a site has durably stored the stream: the highest entry lsn and the highest resync
/// seq. Both only grow over a session; the receiver reports its position in the handshake and
/// the sender resends everything after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Position {
    pub lsn: Lsn,
    pub resync_seq: u64,
}

/// A site's name: 1 to 64 bytes of `[A-Za-z0-9._-]`, so it can be printed in any message.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SiteId(String);

/// A site id that is empty, too long or has a character outside `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid site id {0:?}: 1 to 64 characters of [A-Za-z0-9._-]")]
pub struct BadSiteId(pub String);

impl SiteId {
    pub fn new(name: &str) -> Result<SiteId, BadSiteId> {
        let ok = !name.is_empty()
            && name.len() <= SITE_ID_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(SiteId(name.to_owned()))
        } else {
            Err(BadSiteId(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SiteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A device of the group as one side sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Number of the device within its group (the same at every site).
    pub device: u32,
    pub size_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids() {
        assert!(SiteId::new("paris-1.dc_2").is_ok());
        assert!(SiteId::new("").is_err());
        assert!(SiteId::new("a b").is_err());
        assert!(SiteId::new(&"x".repeat(65)).is_err());
        assert!(SiteId::new(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn kinds_round_trip() {
        for k in [EntryKind::Write, EntryKind::Zeroes, EntryKind::Discard] {
            assert_eq!(EntryKind::from_code(k.code()), Some(k));
        }
        assert_eq!(EntryKind::from_code(0), None);
        assert_eq!(EntryKind::from_code(4), None);
    }
}
