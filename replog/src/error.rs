//! Errors of the replog crate: values with context, never panics.

use crate::Lsn;

/// Everything that can go wrong in the replog.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed.
    #[error("{op} on {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The ring has no room for this record now; reclaim (or drop entries for a slink) first.
    #[error("replog full: {needed} bytes needed, {free} bytes free")]
    Full { needed: u64, free: u64 },
    /// The record could never fit (payload above the maximum or above half the ring).
    #[error("record of {len} bytes can never fit in this replog (max {max})")]
    TooLarge { len: u64, max: u64 },
    /// The bytes are not a replog (or the metadata is damaged beyond recovery).
    #[error("not a usable replog: {what}")]
    BadFormat { what: String },
    /// The file or device is shorter than the replog needs.
    #[error("replog truncated: {what}: need {expected} bytes, found {found}")]
    Truncated {
        what: String,
        expected: u64,
        found: u64,
    },
    /// A metadata slot of a format version this code does not read (a newer build wrote it).
    #[error("unsupported replog format version {found}: this build reads versions 1 to {supported} (a newer build wrote this replog; open it with that build)")]
    UnsupportedVersion { found: u16, supported: u16 },
    /// A metadata slot with feature bits this code does not know (a newer build set them).
    #[error("{what}: unknown replog feature bits {bits:#x} (this build knows {known:#x}; a newer build wrote this replog; open it with that build)")]
    UnsupportedFeatures { what: String, bits: u64, known: u64 },
    /// A metadata value the format cannot hold or that breaks its rules (epoch order, bounds,
    /// unknown feature bits); nothing was written.
    #[error("invalid metadata: {what}")]
    InvalidMetadata { what: String },
    /// No retained entry has this lsn (never appended, reclaimed, or lost in a crash).
    #[error("lsn {lsn} not in the replog")]
    NotFound { lsn: Lsn },
    /// The entry is appended but its write has not completed yet.
    #[error("lsn {lsn} is not written yet")]
    NotYetWritten { lsn: Lsn },
    /// A slink cursor may only move forward.
    #[error("slink {slink}: cursor cannot move back from {current} to {requested}")]
    CursorBackwards {
        slink: u8,
        current: Lsn,
        requested: Lsn,
    },
    /// An explicit lsn must exceed every lsn already in the log.
    #[error("lsn {lsn} does not exceed the last lsn {last}")]
    LsnNotIncreasing { lsn: Lsn, last: Lsn },
    /// Slink number outside 0..MAX_SLINKS.
    #[error("slink {slink} out of range (max {max})")]
    BadSlink { slink: u8, max: usize },
    /// The slink is not registered.
    #[error("slink {slink} is not registered")]
    SlinkNotRegistered { slink: u8 },
    /// The record's fields do not agree (e.g. data length differs from len).
    #[error("invalid record: {what}")]
    InvalidRecord { what: String },
    /// Create/open options that cannot work.
    #[error("invalid options: {what}")]
    InvalidOptions { what: String },
    /// An earlier write failed; the log refuses further appends to keep lsn order intact.
    #[error("replog stopped after an earlier write error: {what}")]
    Failed { what: String },
    /// The replog is shutting down.
    #[error("replog closed")]
    Closed,
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(op: &'static str, path: &str, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.to_string(),
            source,
        }
    }
}
