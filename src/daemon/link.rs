//! The receiving side of `tcp` slinks: a daemon with `--slink-listen` accepts primaries that its
//! allow list names (authenticated with the pre-shared key by the slink crate), finds the
//! secondary group they ship to, and stores what they send.
//!
//! Which group: the one already bound to the primary's group uuid; else a secondary group not yet
//! bound whose devices the primary lists with equal sizes; it is then bound (peer group uuid and
//! peer site id, written durably into its replog with `set_binding`) and refuses any other group
//! uuid, or the same group from another site, from then on.
//!
//! Older builds kept the binding next to the replog in `<replog>.binding.json`;
//! [`adopt_legacy_binding`] moves it into the replog once when the group is opened.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use slink::{
    check_devices, Admission, DeviceInfo, ErrorCode, Item, PeerHello, Permission, Position,
    Refusal, SiteSink,
};

use crate::engine::group::Role;

use super::group::Group;

use super::registry::Registry;

/// The side file of older builds (`<replog>.binding.json`): read only, to migrate it.
#[derive(Debug, Deserialize)]
struct LegacyBinding {
    group_uuid: String,
    primary_site: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex_uuid(s: &str) -> Option<[u8; 16]> {
    let mut out = [0u8; 16];
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn legacy_binding_path(replog_path: &Path) -> PathBuf {
    let mut p = replog_path.to_path_buf().into_os_string();
    p.push(".binding.json");
    PathBuf::from(p)
}

fn remove_durably(path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}

/// Moves the binding of an older build's side file into the replog: adopted when the replog has
/// no binding yet, then the file is deleted (replog first, so a crash in between adopts it again,
/// which is a no-op). When the replog already has a binding the file is stale: the replog wins, a
/// disagreement is logged, the file is deleted. A file that cannot be read or parsed is left
/// where it is and refuses the open: dropping it could let the group bind to another primary.
pub fn adopt_legacy_binding(replog: &replog::Replog, replog_path: &Path) -> Result<(), String> {
    let path = legacy_binding_path(replog_path);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("binding file {}: {e}", path.display())),
    };
    let bad = |why: String| {
        format!(
            "binding file {} of an older build: {why}; fix or remove it to open the group",
            path.display()
        )
    };
    let old: LegacyBinding = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let peer_group_uuid = unhex_uuid(&old.group_uuid)
        .ok_or_else(|| bad(format!("group uuid `{}`", old.group_uuid)))?;
    let legacy = replog::Binding {
        peer_group_uuid,
        peer_site_id: old.primary_site,
    };
    match replog.binding() {
        None => {
            replog
                .set_binding(Some(legacy.clone()))
                .map_err(|e| bad(format!("adopting it into the replog: {e}")))?;
            tracing::info!(
                replog = %replog_path.display(),
                "binding to group {} of site {} moved from {} into the replog",
                old.group_uuid,
                legacy.peer_site_id,
                path.display()
            );
        }
        Some(b) if b == legacy => {}
        Some(b) => tracing::warn!(
            replog = %replog_path.display(),
            "stale binding file {} names group {} of site {}; the replog's binding (group {} of \
             site {}) wins",
            path.display(),
            old.group_uuid,
            legacy.peer_site_id,
            hex(&b.peer_group_uuid),
            b.peer_site_id
        ),
    }
    remove_durably(&path).map_err(|e| bad(format!("removing it: {e}")))
}

fn devices_of(g: &Group) -> Vec<DeviceInfo> {
    g.devices()
        .iter()
        .map(|i| DeviceInfo {
            device: i.dev_nr,
            size_bytes: i.size,
        })
        .collect()
}

pub struct SecondarySink {
    pub registry: Arc<Registry>,
}

impl SecondarySink {
    fn group_for(&self, peer: &PeerHello) -> Result<Arc<Group>, Refusal> {
        let secondaries: Vec<Arc<Group>> = self
            .registry
            .groups()
            .into_iter()
            .filter(|g| g.role() == Role::Secondary)
            .collect();
        if secondaries.is_empty() {
            return Err(Refusal::new(
                ErrorCode::Other,
                "this site holds no secondary group (create one with `replicator create --secondary`)",
            ));
        }
        let theirs = hex(&peer.group_uuid);
        let site = peer.sender_site.as_str();
        let mut bound_elsewhere = None;
        for g in &secondaries {
            match g.replog().and_then(|r| r.binding()) {
                Some(b) if b.peer_group_uuid == peer.group_uuid && b.peer_site_id == site => {
                    return Ok(g.clone())
                }
                Some(b) if b.peer_group_uuid == peer.group_uuid => {
                    return Err(Refusal::new(
                        ErrorCode::GroupMismatch,
                        format!(
                        "group {theirs} is bound here to its primary at site {}, not site {site}",
                        b.peer_site_id
                    ),
                    ))
                }
                Some(b) => bound_elsewhere = Some(hex(&b.peer_group_uuid)),
                None => {}
            }
        }
        let mut last_refusal = None;
        for g in &secondaries {
            let Some(replog) = g.replog() else { continue };
            if replog.binding().is_some() {
                continue;
            }
            match check_devices(&peer.devices, &devices_of(g)) {
                Ok(()) => {
                    let b = replog::Binding {
                        peer_group_uuid: peer.group_uuid,
                        peer_site_id: site.to_string(),
                    };
                    replog.set_binding(Some(b)).map_err(|e| {
                        Refusal::new(ErrorCode::StoreFailed, format!("binding the group: {e}"))
                    })?;
                    g.events.raise(
                        "bound",
                        format!(
                            "secondary of group {theirs} from site {}",
                            peer.sender_site.as_str()
                        ),
                    );
                    return Ok(g.clone());
                }
                Err(r) => last_refusal = Some(r),
            }
        }
        if let Some(r) = last_refusal {
            return Err(r);
        }
        match bound_elsewhere {
            Some(ours) => Err(Refusal::new(
                ErrorCode::GroupMismatch,
                format!("group uuid mismatch: this site has {ours}, the peer sent {theirs}"),
            )),
            None => Err(Refusal::new(ErrorCode::Other, "no secondary group matches")),
        }
    }
}

impl SiteSink for SecondarySink {
    async fn admit(&self, peer: &PeerHello) -> Result<Admission, Refusal> {
        if peer.permission == Permission::ReadOnly {
            return Err(Refusal::new(
                ErrorCode::ReadOnly,
                format!(
                    "site {} is allowed read-only here; it cannot ship writes",
                    peer.sender_site.as_str()
                ),
            ));
        }
        let g = self.group_for(peer)?;
        check_devices(&peer.devices, &devices_of(&g))?;
        let durable = g
            .durable_position()
            .await
            .map_err(|e| Refusal::new(ErrorCode::Other, e))?;
        tracing::info!(
            peer = %peer.peer_addr,
            site = peer.sender_site.as_str(),
            features = peer.features,
            "admitted primary of group {} at epoch {}, stored up to lsn {} resync seq {}",
            hex(&peer.group_uuid),
            peer.epoch,
            durable.lsn,
            durable.resync_seq
        );
        Ok(Admission {
            epoch: peer.epoch,
            durable,
        })
    }

    async fn store(&self, peer: &PeerHello, items: Vec<Item>) -> Result<Position, String> {
        let g = self.group_for(peer).map_err(|r| r.message)?;
        g.store(items).await
    }
}
