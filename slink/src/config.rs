//! The one configuration type of a site link, validated in one place. Every field says its unit,
//! its default and its limits.

use std::time::Duration;

use crate::auth::Psk;
use crate::frame::{MAX_FRAME_PAYLOAD_BYTES, PROTOCOL_VERSION};
use crate::types::SiteId;

/// What an allowed peer may do here (DST's per-address permissions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Permission {
    /// May connect and ship entries and resync data.
    ReadWrite,
    /// May connect (handshake, keepalives) but every entry or resync frame is refused.
    ReadOnly,
}

/// One peer allowed to connect to this site's listener. No allow entry, no connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowEntry {
    pub site: SiteId,
    pub permission: Permission,
}

/// Capped exponential backoff with jitter between reconnect attempts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// Default: 100 ms. Minimum: 1 ms.
    pub initial: Duration,
    /// Default: 10 s. Minimum: `initial`.
    pub max: Duration,
    /// Fraction of the delay added or removed at random. Default: 0.2. Range: 0.0..=1.0.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
            jitter: 0.2,
        }
    }
}

impl Backoff {
    /// Delay before attempt number `failures` (1 after the first failure), before jitter.
    pub fn base_delay(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(30);
        self.initial
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// Delay with jitter: `base * (1 + jitter * u)` for `u` in `[-1, 1]`, never above `max`.
    pub fn delay(&self, failures: u32, u: f64) -> Duration {
        let base = self.base_delay(failures).as_secs_f64();
        let factor = 1.0 + self.jitter * u.clamp(-1.0, 1.0);
        Duration::from_secs_f64((base * factor).max(0.0)).min(self.max)
    }
}

/// Configuration of one side of a site link (the sender uses the transport fields, the listener
/// also the allow list).
#[derive(Clone, Debug)]
pub struct SiteConfig {
    /// This site's id, sent in the Hello (sender) or matched against it (receiver).
    pub site_id: SiteId,
    /// The group's pre-shared key. Minimum 16 bytes.
    pub psk: Psk,
    /// Receiver: peers that may connect. Empty: nobody may connect.
    pub allow: Vec<AllowEntry>,
    /// Send a Ping this often. Default: 1 s. Minimum: 10 ms.
    pub keepalive_interval: Duration,
    /// Declare the peer dead after hearing nothing for this long. Default: 5 s. Minimum: 2 x
    /// `keepalive_interval`.
    pub dead_peer_timeout: Duration,
    /// Whole handshake (connect included) must finish within this. Default: 10 s.
    pub handshake_timeout: Duration,
    /// Sender: unacknowledged bytes in flight (frame payloads). Default: 16 MiB (1 Gbit/s x
    /// 100 ms is 12.5 MB, rounded up). Minimum: `batch_bytes_max`. Maximum: 1 GiB.
    /// Receiver: bytes received and not yet stored it buffers.
    pub window_bytes: usize,
    /// Sender: target payload bytes of one Entries frame (a larger single entry gets its own
    /// frame). Default: 1 MiB. Range: 4 KiB..=`MAX_FRAME_PAYLOAD_BYTES`.
    pub batch_bytes_max: usize,
    /// SO_SNDBUF and SO_RCVBUF requested for every link socket (the kernel caps them at
    /// net.core.wmem_max / rmem_max). Default: 16 MiB. 0 leaves the kernel's autotuning.
    pub socket_buffer_bytes: u32,
    /// Sender: pause between reconnect attempts.
    pub backoff: Backoff,
    /// Receiver: concurrent connections (handshaking or running). Default: 64. Minimum: 1.
    pub connections_max: usize,
}

/// Default window: 1 Gbit/s x 100 ms = 12.5 MB, rounded up to a power of two.
pub const DEFAULT_WINDOW_BYTES: usize = 16 << 20;
/// Default target payload of an Entries frame.
pub const DEFAULT_BATCH_BYTES: usize = 1 << 20;
/// Largest window accepted.
pub const WINDOW_BYTES_MAX: usize = 1 << 30;

impl SiteConfig {
    /// A configuration with every default; `allow` empty.
    pub fn new(site_id: SiteId, psk: Psk) -> SiteConfig {
        SiteConfig {
            site_id,
            psk,
            allow: Vec::new(),
            keepalive_interval: Duration::from_secs(1),
            dead_peer_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            window_bytes: DEFAULT_WINDOW_BYTES,
            batch_bytes_max: DEFAULT_BATCH_BYTES,
            socket_buffer_bytes: 16 << 20,
            backoff: Backoff::default(),
            connections_max: 64,
        }
    }

    /// Adds an allow entry (builder style).
    pub fn allow(mut self, site: SiteId, permission: Permission) -> SiteConfig {
        self.allow.push(AllowEntry { site, permission });
        self
    }

    /// The permission of `site`, `None` when it has no allow entry.
    pub fn permission_of(&self, site: &SiteId) -> Option<Permission> {
        self.allow
            .iter()
            .find(|a| &a.site == site)
            .map(|a| a.permission)
    }

    /// Checks every limit; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.keepalive_interval < Duration::from_millis(10) {
            return Err(format!(
                "keepalive_interval {:?} under 10 ms",
                self.keepalive_interval
            ));
        }
        if self.dead_peer_timeout < self.keepalive_interval.saturating_mul(2) {
            return Err(format!(
                "dead_peer_timeout {:?} under 2 x keepalive_interval {:?}",
                self.dead_peer_timeout, self.keepalive_interval
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err("handshake_timeout is zero".into());
        }
        if self.batch_bytes_max < 4096 || self.batch_bytes_max > MAX_FRAME_PAYLOAD_BYTES {
            return Err(format!(
                "batch_bytes_max {} outside [4096, {MAX_FRAME_PAYLOAD_BYTES}]",
                self.batch_bytes_max
            ));
        }
        if self.window_bytes < self.batch_bytes_max || self.window_bytes > WINDOW_BYTES_MAX {
            return Err(format!(
                "window_bytes {} outside [batch_bytes_max {}, {WINDOW_BYTES_MAX}]",
                self.window_bytes, self.batch_bytes_max
            ));
        }
        if self.backoff.initial < Duration::from_millis(1)
            || self.backoff.max < self.backoff.initial
            || !(0.0..=1.0).contains(&self.backoff.jitter)
        {
            return Err(format!(
                "backoff {:?}: initial >= 1 ms, max >= initial, jitter in [0, 1]",
                self.backoff
            ));
        }
        if self.connections_max == 0 {
            return Err("connections_max is zero".into());
        }
        Ok(())
    }
}

/// What the sender says about itself and its group in the Hello; the core fills it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkIdentity {
    /// The site the sender wants to reach (checked by the receiver against its own id).
    pub receiver_site: crate::types::SiteId,
    pub group_uuid: [u8; 16],
    pub epoch: u64,
    pub devices: Vec<crate::types::DeviceInfo>,
    /// Feature bits offered (see PROTOCOL.md); the Accept carries the intersection.
    pub features: u64,
}

/// Protocol version of this build (re-exported for the core's status output).
pub const fn protocol_version() -> u16 {
    PROTOCOL_VERSION
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SiteConfig {
        SiteConfig::new(
            SiteId::new("a").unwrap(),
            Psk::new(*b"0123456789abcdef").unwrap(),
        )
    }

    #[test]
    fn defaults_validate() {
        cfg().validate().unwrap();
    }

    #[test]
    fn limits_are_checked() {
        let mut c = cfg();
        c.dead_peer_timeout = c.keepalive_interval;
        assert!(c.validate().unwrap_err().contains("dead_peer_timeout"));
        let mut c = cfg();
        c.window_bytes = 1024;
        assert!(c.validate().unwrap_err().contains("window_bytes"));
        let mut c = cfg();
        c.backoff.jitter = 2.0;
        assert!(c.validate().unwrap_err().contains("backoff"));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.base_delay(1), Duration::from_millis(100));
        assert_eq!(b.base_delay(2), Duration::from_millis(200));
        assert_eq!(b.base_delay(8), Duration::from_secs(10));
        assert_eq!(b.base_delay(u32::MAX), Duration::from_secs(10));
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(120));
        assert_eq!(b.delay(1, -1.0), Duration::from_millis(80));
        assert_eq!(b.delay(20, 1.0), Duration::from_secs(10));
    }
}
