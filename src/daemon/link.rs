//! The receiving side of `tcp` slinks: a daemon with `--slink-listen` accepts primaries that its
//! allow list names (authenticated with the pre-shared key by the slink crate), finds the
//! secondary group they ship to, and stores what they send.
//!
//! Which group: the one already bound to the primary's group uuid; else a secondary group not yet
//! bound whose devices the primary lists with equal sizes; it is then bound (the binding is kept
//! next to its replog: `<replog>.binding.json`) and refuses any other group uuid from then on.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slink::{
    check_devices, Admission, DeviceInfo, ErrorCode, Item, PeerHello, Permission, Position,
    Refusal, SiteSink,
};

use crate::engine::group::{Group, Role};

use super::registry::Registry;

#[derive(Debug, Serialize, Deserialize)]
struct Binding {
    group_uuid: String,
    primary_site: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn binding_path(g: &Group) -> PathBuf {
    let mut p = g.replog_path.clone().into_os_string();
    p.push(".binding.json");
    PathBuf::from(p)
}

fn read_binding(path: &Path) -> Option<Binding> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn write_binding(path: &Path, b: &Binding) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(b)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn devices_of(g: &Group) -> Vec<DeviceInfo> {
    g.devices
        .read()
        .map(|d| {
            d.values()
                .map(|i| DeviceInfo {
                    device: i.dev_nr,
                    size_bytes: i.size,
                })
                .collect()
        })
        .unwrap_or_default()
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
        let mut bound_elsewhere = None;
        for g in &secondaries {
            match read_binding(&binding_path(g)) {
                Some(b) if b.group_uuid == theirs => return Ok(g.clone()),
                Some(b) => bound_elsewhere = Some(b.group_uuid),
                None => {}
            }
        }
        let mut last_refusal = None;
        for g in &secondaries {
            if read_binding(&binding_path(g)).is_some() {
                continue;
            }
            match check_devices(&peer.devices, &devices_of(g)) {
                Ok(()) => {
                    let b = Binding {
                        group_uuid: theirs.clone(),
                        primary_site: peer.sender_site.as_str().to_string(),
                    };
                    write_binding(&binding_path(g), &b).map_err(|e| {
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
        tracing::info!(
            peer = %peer.peer_addr,
            site = peer.sender_site.as_str(),
            "admitted primary of group {}",
            hex(&peer.group_uuid)
        );
        Ok(Admission {
            epoch: peer.epoch,
            durable: g.stored_position(),
        })
    }

    async fn store(&self, peer: &PeerHello, items: Vec<Item>) -> Result<Position, String> {
        let g = self.group_for(peer).map_err(|r| r.message)?;
        g.store_replicated(items).await.map_err(|e| e.to_string())
    }
}
