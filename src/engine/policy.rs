//! Fallbehind policy: when an async slink turns sync, and when it turns back.
//!
//! A slink's table policy gives high marks (`ios=N`, `size=BYTES`, `timeout=DURATION`). Lag above
//! any high mark switches an async slink to sync mode: new writes then wait for that site, so the
//! lag cannot grow further. It switches back to async only when the lag is under the low mark of
//! every bound, the low mark being half the high mark ([`LOW_MARK_PERCENT`]). The gap between the
//! marks is the hysteresis: a lag that hovers around one threshold does not flap the mode on every
//! write.
//!
//! A threshold of 0 means "no bound" (the seed's tables give slink 0 `ios=0`).
//!
//! Pure functions only: the core calls [`next_mode`] with the current lag and acts on the answer.

use std::time::Duration;

/// The low mark is this percentage of the high mark.
pub const LOW_MARK_PERCENT: u64 = 50;

/// How a slink's writes are acknowledged right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A write is acknowledged when it is in the replog.
    Async,
    /// A write is acknowledged only when this site has it.
    Sync,
}

/// The table's policy for a slink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Always sync.
    Sync,
    /// Async, turning sync above the fallbehind high mark.
    Async,
    /// Like async, but entries are never dropped for this site: writes wait when the ring is full.
    Stall,
}

/// High marks; `None` (or 0 in a table) is "no bound".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fallbehind {
    pub ios: Option<u64>,
    pub bytes: Option<u64>,
    pub timeout: Option<Duration>,
}

impl Fallbehind {
    /// Treat zero thresholds as absent.
    pub fn normalized(self) -> Self {
        Fallbehind {
            ios: self.ios.filter(|&v| v > 0),
            bytes: self.bytes.filter(|&v| v > 0),
            timeout: self.timeout.filter(|d| !d.is_zero()),
        }
    }

    pub fn is_unbounded(&self) -> bool {
        let n = self.normalized();
        n.ios.is_none() && n.bytes.is_none() && n.timeout.is_none()
    }
}

/// How far a site is behind the replog head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Lag {
    pub ios: u64,
    pub bytes: u64,
    pub age: Duration,
}

fn low_mark(high: u64) -> u64 {
    high.saturating_mul(LOW_MARK_PERCENT) / 100
}

/// True when the lag is above any high mark.
pub fn above_high_mark(fb: &Fallbehind, lag: &Lag) -> bool {
    let fb = fb.normalized();
    fb.ios.is_some_and(|h| lag.ios > h)
        || fb.bytes.is_some_and(|h| lag.bytes > h)
        || fb.timeout.is_some_and(|h| lag.age > h)
}

/// True when the lag is under the low mark of every bound.
pub fn below_low_mark(fb: &Fallbehind, lag: &Lag) -> bool {
    let fb = fb.normalized();
    fb.ios.is_none_or(|h| lag.ios <= low_mark(h))
        && fb.bytes.is_none_or(|h| lag.bytes <= low_mark(h))
        && fb
            .timeout
            .is_none_or(|h| lag.age.as_nanos() <= (h.as_nanos() * LOW_MARK_PERCENT as u128) / 100)
}

/// The mode a slink should be in, given its policy, its current mode and its lag.
pub fn next_mode(policy: PolicyKind, fb: &Fallbehind, current: Mode, lag: &Lag) -> Mode {
    match policy {
        PolicyKind::Sync => Mode::Sync,
        PolicyKind::Async | PolicyKind::Stall => match current {
            Mode::Async if above_high_mark(fb, lag) => Mode::Sync,
            Mode::Sync if below_low_mark(fb, lag) => Mode::Async,
            other => other,
        },
    }
}

/// How long writes wait for a site in sync mode whose link is down (table `down_wait=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownWait {
    /// Writes wait until the site is back (RPO 0 above availability).
    Forever,
    /// After this long down, the site is out of date: writes stop waiting for it.
    For(Duration),
}

/// An out-of-date site is current again (a sync site, waited for) once its link is up, nothing is
/// dirty for it and it lags by at most this many entries. Not exactly 0: writes do not wait for an
/// out-of-date site, so under steady writes at queue depth above 1 its lag rarely reads 0 at the
/// moment it is looked at; this close, the first write that waits for it again waits for at most
/// this many earlier entries (about one round trip).
pub const CAUGHT_UP_LAG_IOS_MAX: u64 = 32;

/// Whether a site in sync mode whose link has been down for `down_for` is out of date now.
pub fn outdated_after(wait: DownWait, down_for: Duration) -> bool {
    match wait {
        DownWait::Forever => false,
        DownWait::For(limit) => down_for >= limit,
    }
}

/// Whether an out-of-date site has caught up (see [`CAUGHT_UP_LAG_IOS_MAX`]).
pub fn caught_up(link_up: bool, lag: &Lag, dirty_bytes: u64) -> bool {
    link_up && dirty_bytes == 0 && lag.ios <= CAUGHT_UP_LAG_IOS_MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_site_is_out_of_date_after_its_wait_and_never_with_forever() {
        let wait = DownWait::For(Duration::from_secs(5));
        assert!(!outdated_after(wait, Duration::from_millis(4999)));
        assert!(outdated_after(wait, Duration::from_secs(5)));
        assert!(outdated_after(
            DownWait::For(Duration::ZERO),
            Duration::ZERO
        ));
        assert!(!outdated_after(
            DownWait::Forever,
            Duration::from_secs(1 << 40)
        ));
    }

    #[test]
    fn an_out_of_date_site_is_caught_up_only_when_up_clean_and_close() {
        let close = lag(CAUGHT_UP_LAG_IOS_MAX, 1 << 20, 0);
        assert!(caught_up(true, &close, 0));
        assert!(!caught_up(false, &close, 0), "link down");
        assert!(!caught_up(true, &close, 4096), "regions dirty");
        assert!(
            !caught_up(true, &lag(CAUGHT_UP_LAG_IOS_MAX + 1, 0, 0), 0),
            "too far behind"
        );
    }

    fn lag(ios: u64, bytes: u64, ms: u64) -> Lag {
        Lag {
            ios,
            bytes,
            age: Duration::from_millis(ms),
        }
    }

    #[test]
    fn sync_policy_is_always_sync() {
        let fb = Fallbehind::default();
        assert_eq!(
            next_mode(PolicyKind::Sync, &fb, Mode::Async, &lag(0, 0, 0)),
            Mode::Sync
        );
    }

    #[test]
    fn unbounded_async_never_turns_sync() {
        let fb = Fallbehind {
            ios: Some(0),
            ..Default::default()
        };
        assert!(fb.is_unbounded());
        assert_eq!(
            next_mode(
                PolicyKind::Async,
                &fb,
                Mode::Async,
                &lag(u64::MAX, u64::MAX, 1 << 40)
            ),
            Mode::Async
        );
    }

    #[test]
    fn hysteresis_between_marks_keeps_the_mode() {
        let fb = Fallbehind {
            ios: Some(100),
            ..Default::default()
        };
        let p = PolicyKind::Async;
        assert_eq!(next_mode(p, &fb, Mode::Async, &lag(100, 0, 0)), Mode::Async);
        assert_eq!(next_mode(p, &fb, Mode::Async, &lag(101, 0, 0)), Mode::Sync);
        // Between low (50) and high (100): stays in whatever mode it is.
        assert_eq!(next_mode(p, &fb, Mode::Sync, &lag(75, 0, 0)), Mode::Sync);
        assert_eq!(next_mode(p, &fb, Mode::Async, &lag(75, 0, 0)), Mode::Async);
        assert_eq!(next_mode(p, &fb, Mode::Sync, &lag(50, 0, 0)), Mode::Async);
    }

    #[test]
    fn any_bound_turns_sync_all_bounds_turn_back() {
        let fb = Fallbehind {
            ios: Some(100),
            bytes: Some(1 << 20),
            timeout: Some(Duration::from_secs(2)),
        };
        let p = PolicyKind::Stall;
        assert_eq!(next_mode(p, &fb, Mode::Async, &lag(1, 1, 2001)), Mode::Sync);
        assert_eq!(
            next_mode(p, &fb, Mode::Async, &lag(1, (1 << 20) + 1, 0)),
            Mode::Sync
        );
        // Only ios is low; bytes still between the marks: stays sync.
        assert_eq!(
            next_mode(p, &fb, Mode::Sync, &lag(1, 600_000, 0)),
            Mode::Sync
        );
        assert_eq!(
            next_mode(p, &fb, Mode::Sync, &lag(1, 500_000, 900)),
            Mode::Async
        );
    }

    proptest::proptest! {
        /// The mode never flips twice for the same lag: from the mode it flips to, the same lag
        /// keeps it there (no flapping on a constant lag).
        #[test]
        fn no_flapping_on_constant_lag(ios in 0u64..400, bytes in 0u64..4_000_000, ms in 0u64..6000,
                                       hi_ios in 0u64..200, hi_bytes in 0u64..2_000_000, hi_ms in 0u64..3000) {
            let fb = Fallbehind { ios: Some(hi_ios), bytes: Some(hi_bytes), timeout: Some(Duration::from_millis(hi_ms)) };
            let l = lag(ios, bytes, ms);
            for start in [Mode::Async, Mode::Sync] {
                let once = next_mode(PolicyKind::Async, &fb, start, &l);
                let twice = next_mode(PolicyKind::Async, &fb, once, &l);
                proptest::prop_assert_eq!(once, twice);
            }
        }
    }
}
