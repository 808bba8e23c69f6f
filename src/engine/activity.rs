//! R3 in the production engine: the primary's activity log gate.
//!
//! A non-FUA write is appended to the replog and applied to slink 0's device, both through the
//! page cache; write-back may persist the device page before the replog record. After a power
//! loss the device would then hold a write the replog lost: no site ever gets it and no dirty bit
//! records it. So slink 0 applies an entry that is not yet durable in the replog only inside an
//! extent listed in the durable activity log (the replog's metadata slot); after an unclean start
//! the listed extents are marked dirty for every other site (`Group::start`).
//!
//! The policy (which extents, which leave, when a flush is needed) is the core's pure
//! [`ActivityLog`]; this module only carries its plans out against the replog and makes writes
//! wait while their extent is being added. One activity-log write at a time (the policy hands out
//! one token at a time); every writer that wanted an extent waits on that one write.
//!
//! Cost: an activity-log write is one 4 KiB `RWF_DSYNC` slot write, needed only when a write
//! enters an extent not in the log (256 extents of 4 MiB: a working set up to 1 GiB causes none
//! once warm); an extent already listed costs one lock. The slot write runs on a blocking thread
//! (a runtime worker stuck in it would hold up unrelated writes); writers that want extents
//! while it is in flight share the next one. Waits end on wake-ups, not timers.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use replog::{Lsn, Replog};

use crate::core::activity::{ActivityLog, ExtentKey, Plan};
use crate::core::Extent;

/// A write waiting for another task's activity-log write is woken when that write ends; this
/// bound only keeps a lost wake-up (a bug, logged) from stopping it for good.
const IDLE_BACKSTOP: Duration = Duration::from_secs(1);

pub struct ActivityGate {
    log: Mutex<ActivityLog>,
    /// Woken when an activity-log write ended or the replog's durable lsn moved.
    changed: tokio::sync::Notify,
}

impl ActivityGate {
    /// The gate over the activity log the replog held at open. It stays frozen (the log does not
    /// change) until [`ActivityGate::unfreeze`]: after an unclean start the restored extents must
    /// stay listed until their dirty marks are durable for every other site.
    pub fn new(replog: &Replog) -> ActivityGate {
        let restored = replog.activity_log();
        let mut log = ActivityLog::new(
            restored.extent_bytes,
            replog::format::AL_EXTENTS_MAX,
            &restored.extents,
        );
        log.freeze(true);
        ActivityGate {
            log: Mutex::new(log),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn log(&self) -> MutexGuard<'_, ActivityLog> {
        match self.log.lock() {
            Ok(l) => l,
            // A panic while holding it left the policy half-updated: read as "covered" it could
            // let a write reach the device outside the durable log.
            Err(_) => super::group::stop_the_process("the activity log lock is poisoned"),
        }
    }

    /// The log may change from now on (the unclean start's dirty marks are durable).
    pub fn unfreeze(&self) {
        self.log().freeze(false);
        self.changed.notify_waiters();
    }

    /// The replog's durable lsn moved: waiting writes may apply at once.
    pub fn durable_moved(&self) {
        self.changed.notify_waiters();
    }

    /// Returns once slink 0 may apply entry `lsn` inside `extent`: the entry is durable in the
    /// replog, or every extent it touches is in the durable activity log (and recorded as
    /// holding `lsn`, so it does not leave the log before `lsn` is durable).
    ///
    /// An extent already in the durable log costs one uncontended lock. Otherwise the first
    /// writer to find no log write in flight writes the whole wanted set (on a blocking thread,
    /// not a runtime worker); writers arriving meanwhile add their extents to the next write, so
    /// one metadata write serves every extent wanted while the previous one was in flight.
    pub async fn admit(
        self: &Arc<Self>,
        replog: &Arc<Replog>,
        extent: &Extent,
        lsn: Lsn,
    ) -> Result<(), String> {
        loop {
            // Registered before the log is looked at: a change after the look still wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let plan = {
                let mut log = self.log();
                let durable = replog.durable_lsn();
                if lsn <= durable {
                    return Ok(());
                }
                if log.covers_or_want(extent) {
                    log.touch(extent, lsn);
                    return Ok(());
                }
                log.plan(durable)
            };
            match plan {
                Plan::Write { token, extents } => self.write_log(replog, token, extents).await?,
                Plan::NeedFlush => {
                    // Every listed extent holds writes that are not durable: make them durable
                    // (one sync beside the replog's pipeline; they are all written, as every
                    // touched lsn was applied after its append completed), then the oldest can
                    // leave.
                    let r = replog.clone();
                    let synced = tokio::task::spawn_blocking(move || r.sync_written())
                        .await
                        .map_err(|e| format!("sync for the activity log: {e}"))?;
                    synced.map_err(|e| format!("sync for the activity log: {e}"))?;
                    self.changed.notify_waiters();
                }
                Plan::Idle => {
                    // A log write is in flight (its writer wakes us when it ends) or the log is
                    // frozen (`unfreeze` wakes us). The bound is only a backstop against a
                    // lost wake-up, which would be a bug: it is logged.
                    if tokio::time::timeout(IDLE_BACKSTOP, changed).await.is_err() {
                        tracing::warn!(
                            lsn,
                            "activity log: a write waited {IDLE_BACKSTOP:?} without a wake-up"
                        );
                    }
                }
            }
        }
    }

    /// Persist one planned set on a blocking thread (a 4 KiB `RWF_DSYNC` write) and wake every
    /// writer waiting for the log. The completion is booked on that thread too, so a caller
    /// that stops waiting (its future dropped) cannot leave the set "in flight" for good, and
    /// no second log write can start before this one landed (two slot writes racing could
    /// leave the older set on disk).
    async fn write_log(
        self: &Arc<Self>,
        replog: &Arc<Replog>,
        token: u64,
        extents: Vec<ExtentKey>,
    ) -> Result<(), String> {
        let (gate, r) = (self.clone(), replog.clone());
        tokio::task::spawn_blocking(move || {
            let written = r.set_activity_log(&extents);
            let mut log = gate.log();
            let result = match written {
                Ok(()) => {
                    log.written(token);
                    Ok(())
                }
                Err(e) => {
                    log.write_failed(token);
                    Err(format!("activity log write: {e}"))
                }
            };
            drop(log);
            gate.changed.notify_waiters();
            result
        })
        .await
        .map_err(|e| format!("activity log write task: {e}"))?
    }

    /// Clean shutdown: empty the log, given that everything applied is durable in the replog
    /// (`durable`) and slink 0's devices were synced. Returns false (and leaves the log as it is)
    /// when that does not hold or a log write is still in flight.
    pub fn clear(&self, replog: &Replog, durable: Lsn) -> Result<bool, String> {
        let mut log = self.log();
        if !log.all_durable(durable) {
            return Ok(false);
        }
        let Some((token, extents)) = log.clear() else {
            return Ok(false);
        };
        let result = match replog.set_activity_log(&extents) {
            Ok(()) => {
                log.written(token);
                Ok(true)
            }
            Err(e) => {
                log.write_failed(token);
                Err(format!("emptying the activity log: {e}"))
            }
        };
        drop(log);
        self.changed.notify_waiters();
        result
    }

    /// The extents in the log (for status and tests).
    pub fn extents(&self) -> Vec<ExtentKey> {
        self.log().extents()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replog::{Durability, EntryKind, Record};

    fn replog_in(dir: &std::path::Path) -> Replog {
        Replog::create(
            &dir.join("replog.img"),
            &replog::CreateOptions {
                offset: 0,
                size: 4 << 20,
                io: Default::default(),
            },
        )
        .unwrap()
    }

    fn append_written(r: &Replog, offset: u64) -> Lsn {
        let data = vec![7u8; 4096];
        let rec = Record {
            device: 0,
            offset,
            kind: EntryKind::Write,
            len: 4096,
            data: &data,
        };
        r.append(rec, Durability::Written).unwrap().wait().unwrap()
    }

    fn extent(offset: u64) -> Extent {
        Extent {
            device: 0,
            offset,
            len: 4096,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn an_entry_not_yet_durable_is_applied_only_once_its_extent_is_in_the_durable_log() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(replog_in(dir.path()));
        let gate = Arc::new(ActivityGate::new(&r));
        gate.unfreeze();
        let at = 2 * replog::format::AL_EXTENT_BYTES_DEFAULT + 4096;
        let lsn = append_written(&r, at);
        assert!(
            r.durable_lsn() < lsn,
            "the test needs an entry that is not durable"
        );
        block_on(gate.admit(&r, &extent(at), lsn)).unwrap();
        assert_eq!(
            r.activity_log().extents,
            vec![(0, 2)],
            "admitted before its extent was durably listed"
        );
        // A durable entry needs no listing.
        r.flush().wait().unwrap();
        let far = 9 * replog::format::AL_EXTENT_BYTES_DEFAULT;
        block_on(gate.admit(&r, &extent(far), lsn)).unwrap();
        assert_eq!(r.activity_log().extents, vec![(0, 2)]);
    }

    #[test]
    fn a_clean_stop_empties_the_log_only_when_every_applied_write_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(replog_in(dir.path()));
        let gate = Arc::new(ActivityGate::new(&r));
        gate.unfreeze();
        let lsn = append_written(&r, 0);
        block_on(gate.admit(&r, &extent(0), lsn)).unwrap();
        assert!(
            !gate.clear(&r, lsn - 1).unwrap(),
            "lsn {lsn} is not durable"
        );
        assert_eq!(r.activity_log().extents, vec![(0, 0)]);
        r.flush().wait().unwrap();
        assert!(gate.clear(&r, r.durable_lsn()).unwrap());
        assert!(r.activity_log().extents.is_empty());
    }

    #[test]
    fn a_restored_log_stays_as_it_is_until_unfrozen() {
        let dir = tempfile::tempdir().unwrap();
        let r = Arc::new(replog_in(dir.path()));
        r.set_activity_log(&[(0, 5)]).unwrap();
        let gate = Arc::new(ActivityGate::new(&r));
        let lsn = append_written(&r, 0);
        let waited = block_on(async {
            tokio::time::timeout(Duration::from_millis(50), gate.admit(&r, &extent(0), lsn)).await
        });
        assert!(waited.is_err(), "a frozen log took a new extent");
        assert_eq!(r.activity_log().extents, vec![(0, 5)]);
        gate.unfreeze();
        block_on(gate.admit(&r, &extent(0), lsn)).unwrap();
        assert!(r.activity_log().extents.contains(&(0, 0)));
    }
}
