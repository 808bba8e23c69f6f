//! Server limits: one config type, validated in one place.

use std::time::Duration;

/// Limits of the NBD server. Every queue and buffer of a connection is bounded by these.
///
/// Worst-case memory of the server is about
/// `max_connections x (max_inflight_bytes + 2 x IO_BUFFER_BYTES)` plus small per-request
/// bookkeeping, independent of export sizes and client claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Requests of one connection being processed or waiting for their reply to be written.
    /// When the bound is reached the server stops reading from that connection (backpressure).
    /// Default: 128. Minimum: 1. Maximum: 65536.
    pub max_inflight_requests: usize,
    /// Payload bytes (write data received, read data to send) of one connection in flight.
    /// Default: 64 MiB. Minimum: `max_payload`.
    pub max_inflight_bytes: usize,
    /// Largest READ/WRITE/WRITE_ZEROES length accepted (advertised as the maximum block size,
    /// lowered further by an export's own maximum). Default: 32 MiB (2^25, the length the spec
    /// says every server should accept). Minimum: 64 KiB. Maximum: 2^31.
    pub max_payload: u32,
    /// Concurrent client connections (handshaking or transmitting). Further connections wait
    /// in the listen backlog. Default: 64. Minimum: 1.
    pub max_connections: usize,
    /// Time a client has from connecting to finishing option negotiation. Default: 10 s.
    /// Minimum: 1 ms.
    pub handshake_timeout: Duration,
    /// After shutdown is requested, how long a connection may take to finish its in-flight
    /// requests and write their replies before it is dropped (a client that stops reading
    /// would otherwise hold the drain forever). Default: 30 s.
    pub shutdown_drain_timeout: Duration,
}

/// Size of each buffered reader and writer of a connection.
pub const IO_BUFFER_BYTES: usize = 128 * 1024;

/// Largest WRITE payload beyond `max_payload` that is read and discarded (answered `EINVAL`)
/// rather than dropping the connection. The spec says lengths below 2^25 should not be treated
/// as a denial-of-service attempt.
pub const DISCARD_WRITE_LIMIT: u32 = 1 << 25;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_inflight_requests: 128,
            max_inflight_bytes: 64 << 20,
            max_payload: 32 << 20,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(10),
            shutdown_drain_timeout: Duration::from_secs(30),
        }
    }
}

/// A configuration value out of its documented range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid NBD server config: {0}")]
pub struct ConfigError(pub String);

impl ServerConfig {
    /// Checks the documented minimums and maximums.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_inflight_requests == 0 || self.max_inflight_requests > 65536 {
            return Err(ConfigError(
                "max_inflight_requests must be in [1, 65536]".into(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ConfigError("max_connections must be >= 1".into()));
        }
        if self.max_payload < 64 * 1024 || self.max_payload > 1 << 31 {
            return Err(ConfigError(format!(
                "max_payload {} outside [65536, 2^31]",
                self.max_payload
            )));
        }
        if self.max_inflight_bytes < self.max_payload as usize {
            return Err(ConfigError(format!(
                "max_inflight_bytes {} < max_payload {}",
                self.max_inflight_bytes, self.max_payload
            )));
        }
        // Semaphore permits are bounded; stay well inside.
        if self.max_inflight_bytes > u32::MAX as usize {
            return Err(ConfigError("max_inflight_bytes must be < 4 GiB".into()));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError("handshake_timeout must be > 0".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(ServerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn rejects_out_of_range() {
        let bad = [
            ServerConfig {
                max_inflight_requests: 0,
                ..Default::default()
            },
            ServerConfig {
                max_inflight_requests: 1 << 20,
                ..Default::default()
            },
            ServerConfig {
                max_connections: 0,
                ..Default::default()
            },
            ServerConfig {
                max_payload: 4096,
                ..Default::default()
            },
            ServerConfig {
                max_inflight_bytes: 1 << 20,
                ..Default::default()
            },
            ServerConfig {
                handshake_timeout: Duration::ZERO,
                ..Default::default()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }
}
