//! Site links (slinks): the transports that ship replog entries to other sites.
//!
//! Key rule: slink never opens a replog file. It receives entries from the core and hands received
//! entries back to the core; every locally persisted byte belongs to the `replog` crate. The
//! crate does not depend on `replog`: entries cross this boundary as [`Entry`] values.
//!
//! Code map:
//! - [`frame`]: the wire format (spec: `slink/PROTOCOL.md`), two-step decoding, golden vectors;
//! - [`auth`], [`handshake`]: pre-shared-key mutual authentication and the handshake;
//! - [`sender`]: [`SlinkSender`], pipelined shipping with a window, keepalives, reconnect;
//! - [`receiver`]: [`SlinkListener`], allow list, admission by the core, ordered store, acks;
//! - [`config`]: the one configuration type with its limits;
//! - [`linkemu`]: the in-repo link emulator (delay, jitter, rate, stall, partition, reset,
//!   corruption), also the `replicator-linkemu` binary.

pub mod auth;
pub mod config;
pub mod conn;
pub mod counters;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod linkemu;
pub mod receiver;
pub mod sender;
pub mod types;

pub use auth::Psk;
pub use config::{AllowEntry, Backoff, LinkIdentity, Permission, SiteConfig};
pub use counters::{Counters, CountersSnapshot};
pub use error::LinkError;
pub use frame::{ErrorCode, Frame, FrameError};
pub use receiver::{check_devices, Admission, PeerHello, Refusal, SiteSink, SlinkListener};
pub use sender::{EntrySource, LinkState, SenderStatus, SlinkSender};
pub use types::{
    DeviceInfo, Entry, EntryKind, Item, Lsn, Position, ResyncChunk, ResyncDone, SiteId,
};
