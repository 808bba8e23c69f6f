//! A deterministic, seeded simulation of replicated groups: one primary and two secondaries (one
//! sync, one async), each a real [`replicator::core::Core`] over a real [`replog::Replog`] on
//! simulated storage ([`replog::storage::MemDisk`]: torn sectors, unsynced writes lost on power
//! loss), joined by simulated links, driven by one event queue on simulated time. Half of the
//! runs have two groups (two devices each) on the same three sites: one process per site (a kill
//! or power loss hits both groups' members there), one network (a partition cuts both groups'
//! links to a site), one file system (a full disk fills both); link resets, I/O errors, halts
//! and operator restarts hit one group.
//!
//! Faults injected: link resets (what a lost, corrupted or duplicated TCP segment becomes: the
//! session dies and the sender resends from the position the receiver reports), partitions,
//! variable delay, kill -9 and power loss of any site at any event, rings small enough to
//! overflow, and storage faults ([`faults`]): an EIO on the next read, write or sync of a site's
//! replog or devices, disk-full windows (every write fails with ENOSPC for 50-1500 ms), and
//! failed dirty log writes. The handshake is two messages with delay (the primary's hello, the
//! site's durable position in reply), so a reset, partition or crash can cut it; crashes
//! mid-handshake, mid-checkpoint and mid-resync are counted in the summary. Messages of a dead
//! session are dropped (TCP never delivers across sessions), so reordering and duplication
//! happen the way they do in production: across reconnects.
//!
//! What the driver (this simulation) does with a failure follows `src/core/mod.rs` "Storage
//! failures": a replog write or sync failure is `Input::LogFailed`; the core's `Command::Halt`
//! makes the simulation reopen that group's member from its disks (as after a kill -9), retrying
//! the open while a fault hits it; a read failure for shipping or a resync piece resets the
//! link; a device failure leaves slink 0 Faulty and an operator restarts the member 0.3-1.5 s
//! later (the simulation models that operator; a device that never recovers is not injected).
//!
//! Checks (see [`check`]): after a sampled event and at every crash, each secondary's image after
//! its own recovery (from a crash image and from a power-loss image) is the replay of one lsn
//! prefix of the primary's history across all devices, unless the site has persisted that it is
//! inconsistent (a resync from the primary is running); every write acknowledged while the sync
//! site was waited for is in that site's replog; after a primary restart every write covered by
//! a completed FLUSH or FUA is still there; an acknowledged write is in the primary's replog with
//! its data, and no write whose device write failed is acknowledged; once faults stop (armed
//! faults are disarmed, full disks freed, partitions healed) every group converges (lag 0,
//! byte-equal devices, consistent, no site with failed devices, the primary's devices applied up
//! to its log) within a bounded simulated time.
//!
//! The activity log and the resync sequence reservations are the replog's own (metadata format 2,
//! written through the same slot writes a power loss can tear). What is modelled rather than
//! real: the dirty logs and the secondary's consistency flag are "durable" sets that a completion
//! makes durable atomically (the dirty log format has its own crash tests in `replog`); the link
//! carries core-level items, not frames (frames have golden vectors and fuzzing in `slink`); the
//! devices are in-memory disks with the same crash semantics as the replog's; a failed sync makes
//! nothing durable and loses nothing (the unsynced writes stay unsynced, as after a transient
//! error): a kernel that drops dirty pages after a failed fsync (Linux) is not modelled.

pub mod check;
pub mod faults;
pub mod rng;
mod world;

pub use world::{run, Options, Outcome, Stats};
