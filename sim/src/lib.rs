//! A deterministic, seeded simulation of a replicated group: one primary and two secondaries (one
//! sync, one async), each a real [`replicator::core::Core`] over a real [`replog::Replog`] on
//! simulated storage ([`replog::storage::MemDisk`]: torn sectors, unsynced writes lost on power
//! loss), joined by simulated links, driven by one event queue on simulated time.
//!
//! Faults injected: link resets (what a lost, corrupted or duplicated TCP segment becomes: the
//! session dies and the sender resends from the position the receiver reports), partitions,
//! variable delay, kill -9 and power loss of any site at any event (mid-resync, mid-handshake,
//! mid-checkpoint included, since they are just events), and rings small enough to overflow.
//! Messages of a dead session are dropped (TCP never delivers across sessions), so reordering and
//! duplication happen the way they do in production: across reconnects.
//!
//! Checks (see [`check`]): after a sampled event and at every crash, each secondary's image after
//! its own recovery (from a crash image and from a power-loss image) is the replay of one lsn
//! prefix of the primary's history across all devices, unless the site has persisted that it is
//! inconsistent (a resync from the primary is running); every write acknowledged while the sync
//! site was waited for is in that site's replog; after a primary restart every write covered by
//! a completed FLUSH or FUA is still there; once faults stop every site converges (lag 0,
//! byte-equal devices, consistent) within a bounded simulated time.
//!
//! The activity log and the resync sequence reservations are the replog's own (metadata format 2,
//! written through the same slot writes a power loss can tear). What is modelled rather than
//! real: the dirty logs and the secondary's consistency flag are "durable" sets that a completion
//! makes durable atomically (the dirty log format has its own crash tests in `replog`); the link
//! carries core-level items, not frames (frames have golden vectors and fuzzing in `slink`); the
//! devices are in-memory disks with the same crash semantics as the replog's.

pub mod check;
pub mod faults;
pub mod rng;
mod world;

pub use world::{run, Options, Outcome, Stats};
