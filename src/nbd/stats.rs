//! Counters of the NBD server, shared with the metrics module. Plain atomics, updated with
//! relaxed ordering (they are statistics, not synchronisation).

use std::sync::atomic::{AtomicU64, Ordering};

use super::proto;

/// Server counters. Every field is monotonic except `connections_active` and
/// `requests_inflight` (gauges).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections_total: AtomicU64,
    /// Connections currently open.
    pub connections_active: AtomicU64,
    /// Connections that did not reach transmission (bad magic, timeout, unknown export, abort).
    pub handshakes_failed_total: AtomicU64,
    /// Requests received, by command.
    pub requests_read_total: AtomicU64,
    pub requests_write_total: AtomicU64,
    pub requests_flush_total: AtomicU64,
    pub requests_trim_total: AtomicU64,
    pub requests_write_zeroes_total: AtomicU64,
    pub requests_block_status_total: AtomicU64,
    pub requests_disc_total: AtomicU64,
    /// Requests with a command we do not implement.
    pub requests_unknown_total: AtomicU64,
    /// Requests being processed or whose reply is not yet written.
    pub requests_inflight: AtomicU64,
    /// Payload bytes returned by reads.
    pub read_bytes_total: AtomicU64,
    /// Payload bytes accepted by writes.
    pub written_bytes_total: AtomicU64,
    /// Replies carrying an error.
    pub errors_total: AtomicU64,
    /// Violations of the protocol by clients (bad magic, garbage, truncated messages, unknown
    /// flags). Each is logged with the peer address.
    pub protocol_violations_total: AtomicU64,
}

/// A copy of the counters at one point in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStatsSnapshot {
    pub connections_total: u64,
    pub connections_active: u64,
    pub handshakes_failed_total: u64,
    pub requests_read_total: u64,
    pub requests_write_total: u64,
    pub requests_flush_total: u64,
    pub requests_trim_total: u64,
    pub requests_write_zeroes_total: u64,
    pub requests_block_status_total: u64,
    pub requests_disc_total: u64,
    pub requests_unknown_total: u64,
    pub requests_inflight: u64,
    pub read_bytes_total: u64,
    pub written_bytes_total: u64,
    pub errors_total: u64,
    pub protocol_violations_total: u64,
}

pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

pub(crate) fn dec(counter: &AtomicU64) {
    counter.fetch_sub(1, Ordering::Relaxed);
}

impl ServerStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter for a request of `command`.
    pub(crate) fn request_counter(&self, command: u16) -> &AtomicU64 {
        match command {
            proto::CMD_READ => &self.requests_read_total,
            proto::CMD_WRITE => &self.requests_write_total,
            proto::CMD_FLUSH => &self.requests_flush_total,
            proto::CMD_TRIM => &self.requests_trim_total,
            proto::CMD_WRITE_ZEROES => &self.requests_write_zeroes_total,
            proto::CMD_BLOCK_STATUS => &self.requests_block_status_total,
            proto::CMD_DISC => &self.requests_disc_total,
            _ => &self.requests_unknown_total,
        }
    }

    pub fn snapshot(&self) -> ServerStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ServerStatsSnapshot {
            connections_total: l(&self.connections_total),
            connections_active: l(&self.connections_active),
            handshakes_failed_total: l(&self.handshakes_failed_total),
            requests_read_total: l(&self.requests_read_total),
            requests_write_total: l(&self.requests_write_total),
            requests_flush_total: l(&self.requests_flush_total),
            requests_trim_total: l(&self.requests_trim_total),
            requests_write_zeroes_total: l(&self.requests_write_zeroes_total),
            requests_block_status_total: l(&self.requests_block_status_total),
            requests_disc_total: l(&self.requests_disc_total),
            requests_unknown_total: l(&self.requests_unknown_total),
            requests_inflight: l(&self.requests_inflight),
            read_bytes_total: l(&self.read_bytes_total),
            written_bytes_total: l(&self.written_bytes_total),
            errors_total: l(&self.errors_total),
            protocol_violations_total: l(&self.protocol_violations_total),
        }
    }
}
