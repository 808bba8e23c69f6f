//! Counters of one side of a site link (atomics, read by the core's metrics).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Monotonic counters, shared by every connection of a sender or a listener.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A copy of [`Counters`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
        pub struct CountersSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            pub fn snapshot(&self) -> CountersSnapshot {
                CountersSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }
    };
}

counters! {
    /// Frames written to a peer.
    frames_sent,
    /// Frames read from a peer (checked and parsed).
    frames_received,
    /// Bytes written to peers (headers included).
    bytes_sent,
    /// Bytes read from peers.
    bytes_received,
    /// Entries shipped (sender) or handed to the core (receiver).
    entries,
    /// Frames whose header or payload crc32c did not match (the connection was closed).
    crc_errors,
    /// Bytes that were not a frame: bad magic, unknown type, over-long or malformed payload.
    bad_frames,
    /// Key proofs that did not verify (either direction).
    auth_failures,
    /// Peers refused (listener) or refusals received (sender), auth failures excluded.
    refusals,
    /// Connections that completed the handshake.
    sessions,
    /// Connections accepted (listener) or attempted (sender).
    connections,
    /// Reconnect attempts after a failure (sender).
    reconnects,
    /// Peers declared dead after `dead_peer_timeout` of silence.
    keepalive_timeouts,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
