//! The group state the replog keeps durably for the core (formats 2 and 3): role, epoch
//! history, binding to a peer group, per-slink resync sequence high-water marks and drop floors,
//! feature flags and the activity log.
//!
//! The replog decides nothing here: it checks that a value fits the format (bounds, order,
//! known bits) and stores it. Every setter writes the whole metadata slot (all fields, the other
//! slot of the newest one) with `RWF_DSYNC` and returns once it is durable; a setter that would
//! change nothing writes nothing. Getters read an in-memory copy of the last durable state and
//! never wait behind a metadata write.
//!
//! Why one write for the whole identity ([`Replog::update_identity`]): a promotion changes the
//! role and begins an epoch; two writes would let a power loss between them leave a primary of
//! the old epoch. One slot write is all or nothing (the crc refuses a torn slot and the other
//! slot still holds the old state).

use crate::error::{Error, Result};
use crate::format::{
    check_al_extent_bytes, check_peer_site_id, ActivityLogState, Binding, EpochStart, Identity,
    Role, AL_EXTENTS_MAX, FEATURES_KNOWN,
};
use crate::log::{lock, Persisted, Replog};
use crate::meta::MetaSync;
use crate::Lsn;

/// Identity changes applied together by one durable metadata write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityUpdate {
    /// New role; None keeps the current one.
    pub role: Option<Role>,
    /// Epoch to begin (appended to the history, see [`Identity::begin_epoch`]); None begins none.
    pub begin_epoch: Option<EpochStart>,
    /// `Some(Some(b))` binds to `b`, `Some(None)` unbinds, None keeps the binding.
    pub binding: Option<Option<Binding>>,
}

fn invalid(what: String) -> Error {
    Error::InvalidMetadata { what }
}

impl Replog {
    /// Applies `change` to a copy of the persisted fields and, when it changed anything, writes
    /// the metadata durably before publishing the new values. `change` refuses with an error
    /// and nothing is written.
    fn update_persisted(&self, change: impl FnOnce(&mut Persisted) -> Result<()>) -> Result<()> {
        let inner = self.inner();
        let mut meta_state = lock(&inner.meta);
        let mut next = meta_state.clone();
        change(&mut next.persisted)?;
        if next.persisted == meta_state.persisted {
            return Ok(());
        }
        inner.commit_meta(&mut meta_state, next, None, MetaSync::SlotOnly)
    }

    fn published(&self) -> Persisted {
        lock(&self.inner().published).clone()
    }

    /// Role, epoch history and binding, as last made durable.
    pub fn identity(&self) -> Identity {
        lock(&self.inner().published).identity.clone()
    }

    /// The group's role here ([`Role::Unset`] until set; also for a format-1 replog).
    pub fn role(&self) -> Role {
        lock(&self.inner().published).identity.role
    }

    /// The epoch history, oldest first (empty until the first `begin_epoch`).
    pub fn epochs(&self) -> Vec<EpochStart> {
        lock(&self.inner().published).identity.epochs.clone()
    }

    /// The current epoch (the last of the history); None before the first `begin_epoch`.
    pub fn current_epoch(&self) -> Option<EpochStart> {
        lock(&self.inner().published).identity.current_epoch()
    }

    /// The peer group this group is bound to; None when unbound.
    pub fn binding(&self) -> Option<Binding> {
        lock(&self.inner().published).identity.binding.clone()
    }

    /// Applies every change of `update` with one durable metadata write (all or nothing, also
    /// across a power loss). Refused, with nothing written, when the epoch does not follow the
    /// current one or the binding does not fit the format.
    pub fn update_identity(&self, update: &IdentityUpdate) -> Result<()> {
        self.update_persisted(|p| {
            let id = &mut p.identity;
            if let Some(role) = update.role {
                id.role = role;
            }
            if let Some(binding) = &update.binding {
                if let Some(b) = binding {
                    check_peer_site_id(&b.peer_site_id).map_err(invalid)?;
                }
                id.binding.clone_from(binding);
            }
            if let Some(epoch) = update.begin_epoch {
                id.begin_epoch(epoch).map_err(invalid)?;
            }
            Ok(())
        })
    }

    /// Sets the role. Durable when it returns.
    pub fn set_role(&self, role: Role) -> Result<()> {
        self.update_identity(&IdentityUpdate {
            role: Some(role),
            ..IdentityUpdate::default()
        })
    }

    /// Begins epoch `epoch` at `start_lsn` (the first lsn of the new epoch): it must exceed the
    /// current epoch and not start before it. Repeating the current epoch with the same start
    /// is a no-op. With a full history ([`crate::format::EPOCH_HISTORY_MAX`]) the oldest entry
    /// is dropped. Durable when it returns.
    pub fn begin_epoch(&self, epoch: u64, start_lsn: Lsn) -> Result<()> {
        self.update_identity(&IdentityUpdate {
            begin_epoch: Some(EpochStart { epoch, start_lsn }),
            ..IdentityUpdate::default()
        })
    }

    /// Binds to a peer group (Some) or unbinds (None). The peer site id must be 1 to
    /// [`crate::format::PEER_SITE_ID_BYTES_MAX`] bytes. Durable when it returns.
    pub fn set_binding(&self, binding: Option<Binding>) -> Result<()> {
        self.update_identity(&IdentityUpdate {
            binding: Some(binding),
            ..IdentityUpdate::default()
        })
    }

    /// A slink's resync sequence high-water mark (0 until raised). Kept across unregister: a
    /// floor that is too high never hurts, one that went back could reuse a sequence.
    pub fn resync_seq(&self, slink: u8) -> Result<u64> {
        let i = Replog::check_slink(slink)?;
        Ok(lock(&self.inner().published)
            .resync_seqs
            .get(i)
            .copied()
            .unwrap_or(0))
    }

    /// Raises a slink's resync sequence high-water mark to at least `seq` (a lower `seq`
    /// changes nothing) and returns the mark. Durable when it returns.
    pub fn raise_resync_seq(&self, slink: u8, seq: u64) -> Result<u64> {
        let i = Replog::check_slink(slink)?;
        let mut mark = 0;
        self.update_persisted(|p| {
            if let Some(current) = p.resync_seqs.get_mut(i) {
                *current = (*current).max(seq);
                mark = *current;
            }
            Ok(())
        })?;
        Ok(mark)
    }

    /// A slink's drop floor (None until set, after a clear, and in a replog of format 1 or 2).
    /// The replog gives it no meaning: the caller stores what it needs to decide, after a
    /// restart, whether a site lacks entries that are neither in the ring nor dirty.
    pub fn drop_floor(&self, slink: u8) -> Result<Option<Lsn>> {
        let i = Replog::check_slink(slink)?;
        Ok(lock(&self.inner().published)
            .drop_floors
            .get(i)
            .copied()
            .flatten())
    }

    /// Sets (Some) or clears (None) a slink's drop floor. Durable when it returns; on an error
    /// the floor on disk is the old one or the new one (the slot write is all or nothing) and
    /// [`Replog::drop_floor`] still says the old one. Registering or unregistering the slink
    /// clears it too.
    pub fn set_drop_floor(&self, slink: u8, floor: Option<Lsn>) -> Result<()> {
        let i = Replog::check_slink(slink)?;
        self.update_persisted(|p| {
            if let Some(f) = p.drop_floors.get_mut(i) {
                *f = floor;
            }
            Ok(())
        })
    }

    /// Feature bits (see [`crate::format::FEATURES_KNOWN`]).
    pub fn features(&self) -> u64 {
        lock(&self.inner().published).features
    }

    /// Replaces the feature bits; unknown bits are refused (an older build could not open the
    /// replog afterwards). Durable when it returns.
    pub fn set_features(&self, bits: u64) -> Result<()> {
        self.update_persisted(|p| {
            if bits & !FEATURES_KNOWN != 0 {
                return Err(invalid(format!(
                    "unknown feature bits {:#x} (known: {FEATURES_KNOWN:#x})",
                    bits & !FEATURES_KNOWN
                )));
            }
            p.features = bits;
            Ok(())
        })
    }

    /// The persisted activity log: extent size and the hot extents, sorted.
    pub fn activity_log(&self) -> ActivityLogState {
        self.published().activity_log
    }

    /// Replaces the activity log with `extents` (device, extent index), in any order,
    /// duplicates allowed; at most [`AL_EXTENTS_MAX`] distinct ones. Durable when it returns.
    /// An empty set is the clean state (nothing to repair after a restart).
    pub fn set_activity_log(&self, extents: &[(u32, u64)]) -> Result<()> {
        let mut sorted = extents.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() > AL_EXTENTS_MAX {
            return Err(invalid(format!(
                "activity log of {} distinct extents (max {AL_EXTENTS_MAX})",
                sorted.len()
            )));
        }
        self.update_persisted(|p| {
            let next = ActivityLogState {
                extent_bytes: p.activity_log.extent_bytes,
                extents: sorted,
            };
            next.check().map_err(invalid)?;
            p.activity_log = next;
            Ok(())
        })
    }

    /// Sets the activity-log extent size (a power of two, 4 KiB to 1 TiB; default 4 MiB).
    /// Refused while the activity log is not empty: its extents would change meaning. Durable
    /// when it returns.
    pub fn set_activity_log_extent_bytes(&self, extent_bytes: u64) -> Result<()> {
        check_al_extent_bytes(extent_bytes).map_err(invalid)?;
        self.update_persisted(|p| {
            if p.activity_log.extent_bytes != extent_bytes && !p.activity_log.extents.is_empty() {
                return Err(invalid(format!(
                    "activity log extent size cannot change from {} to {extent_bytes} while it holds {} extents",
                    p.activity_log.extent_bytes,
                    p.activity_log.extents.len()
                )));
            }
            p.activity_log.extent_bytes = extent_bytes;
            Ok(())
        })
    }
}
