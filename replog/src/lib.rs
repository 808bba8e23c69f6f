//! The replication log (replog): an on-disk ring buffer that every write of a device group enters
//! first, in one order (the lsn) across all devices of the group. Sites are fed from it; each
//! slink's cursor says how far that site durably has it; space below the lowest cursor is reclaimed.
//!
//! Key decisions (see FORMAT.md for the bytes):
//! - This crate owns every byte persisted locally: the ring, its metadata and the dirty logs. It
//!   knows nothing of networks.
//! - Appends are group-committed without writer threads: many concurrent appends share one write
//!   and one flush. The appender that finds the log idle writes its batch itself when it waits
//!   (no thread hand-off at queue depth 1); otherwise batches go to the I/O thread, which finishes
//!   them and resolves the appenders directly (`writer.rs`).
//! - I/O goes through io_uring on a dedicated thread, with a pwrite/fdatasync fallback chosen
//!   automatically when io_uring is unavailable.
//! - Batches start on 4096-byte blocks and a block holding an acknowledged entry is never
//!   rewritten; entries carry uuid, virtual position (lap) and writer generation so that a leftover
//!   of an earlier lap, another replog or a pre-crash write never validates (FORMAT.md).
//! - Recovery is an explicit decision table (`recovery::DECISION_TABLE`).
//!
//! Code map: `format` owns the bytes, `meta` the metadata slots, `persisted` the group state
//! kept in them for the core (role, epochs, binding, resync marks, features, activity log),
//! `recovery` the scan, `index` the
//! in-memory entry index and lag, `log` the public `Replog`, `writer` the group commit (batch pipeline),
//! `storage` the storage trait (with an in-memory crash-image disk for tests), `inspect` the
//! read-only inspection.

pub mod dirtylog;
pub mod io;

mod appending;
mod error;
pub mod format;
pub mod index;
mod inspect;
mod log;
pub mod meta;
mod persisted;
pub mod recovery;
pub mod storage;
mod writer;

pub use appending::Appending;
pub use error::{Error, Result};
pub use format::{ActivityLogState, Binding, EpochStart, Identity, Role};
pub use index::Lag;
pub use inspect::{inspect_storage, BindingInspection, Inspection, SlinkInspection};
pub use log::{
    CreateOptions, Durability, Entry, EntryExtent, EntryKind, OpenOptions, Record, RecoveryReport,
    Replog, Space, BATCHES_IN_FLIGHT_MAX, BATCH_BUFFER_BYTES_MAX, MAX_RECORD_BYTES,
};
pub use persisted::IdentityUpdate;

/// Log sequence number: one counter per group. The first entry has lsn 1; 0 means "nothing".
pub type Lsn = u64;

/// Highest number of slinks (sites) a replog keeps cursors for.
pub const MAX_SLINKS: usize = 16;
