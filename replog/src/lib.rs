//! The replication log (replog): an on-disk ring buffer that every write of a device group enters
//! first, in one order (the lsn) across all devices of the group. Sites are fed from it; each
//! slink's cursor says how far that site durably has it; space below the lowest cursor is reclaimed.
//!
//! Key decisions (see FORMAT.md for the bytes):
//! - This crate owns every byte persisted locally: the ring, its metadata and the dirty logs. It
//!   knows nothing of networks.
//! - Appends are group-committed by one writer thread per log device: many concurrent appends share
//!   one write and one flush.
//! - I/O goes through io_uring on a dedicated thread, with a pwrite/fdatasync fallback chosen
//!   automatically when io_uring is unavailable.
//!
//! NOTE: this file is the public contract between the replog crate and the core; the bodies are
//! being filled in (see the module docs).

pub mod dirtylog;
pub mod io;

/// Log sequence number: one counter per group. The first entry has lsn 1; 0 means "nothing".
pub type Lsn = u64;

/// Highest number of slinks (sites) a replog keeps cursors for.
pub const MAX_SLINKS: usize = 16;
