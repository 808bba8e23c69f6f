//! Test doubles for the core: an in-memory entry source and an in-memory receiving site.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use slink::{
    check_devices, Admission, DeviceInfo, Entry, EntryKind, EntrySource, Item, LinkIdentity,
    PeerHello, Position, Psk, Refusal, SiteConfig, SiteId, SiteSink,
};
use tokio::sync::watch;

pub const GROUP: [u8; 16] = *b"group-uuid-00001";
pub const KEY: &[u8] = b"test key: 0123456789abcdef";

pub fn site(name: &str) -> SiteId {
    SiteId::new(name).unwrap()
}

pub fn devices() -> Vec<DeviceInfo> {
    vec![
        DeviceInfo {
            device: 0,
            size_bytes: 64 << 20,
        },
        DeviceInfo {
            device: 1,
            size_bytes: 64 << 20,
        },
    ]
}

/// Short timers so failure paths finish quickly.
pub fn cfg(name: &str, key: &[u8]) -> SiteConfig {
    let mut c = SiteConfig::new(site(name), Psk::new(key.to_vec()).unwrap());
    c.keepalive_interval = Duration::from_millis(100);
    c.dead_peer_timeout = Duration::from_millis(800);
    c.handshake_timeout = Duration::from_secs(3);
    c.backoff.initial = Duration::from_millis(20);
    c.backoff.max = Duration::from_millis(200);
    c
}

pub fn identity() -> LinkIdentity {
    LinkIdentity {
        receiver_site: site("lyon"),
        group_uuid: GROUP,
        epoch: 1,
        devices: devices(),
        features: slink::handshake::FEATURES_SUPPORTED,
    }
}

/// Entry `lsn` of a deterministic workload: sizes vary from 512 B to 64 KiB, some zeroes and
/// discards, content derived from the lsn.
pub fn entry(lsn: u64) -> Entry {
    let kind = match lsn % 17 {
        0 => EntryKind::Zeroes,
        1 => EntryKind::Discard,
        _ => EntryKind::Write,
    };
    let len = 512u64 << (lsn % 8);
    let data = if kind == EntryKind::Write {
        let mut v = vec![0u8; len as usize];
        for (i, b) in v.iter_mut().enumerate() {
            *b = (lsn as usize).wrapping_mul(31).wrapping_add(i) as u8;
        }
        Bytes::from(v)
    } else {
        Bytes::new()
    };
    Entry {
        lsn,
        device: (lsn % 2) as u32,
        offset: (lsn % 1000) * 65536,
        kind,
        len,
        timestamp_ns: lsn * 1000,
        data,
    }
}

/// The sending core: entries 1..=published, produced on demand.
pub struct MemSource {
    published: watch::Sender<u64>,
}

impl MemSource {
    pub fn new() -> Arc<MemSource> {
        Arc::new(MemSource {
            published: watch::Sender::new(0),
        })
    }
    pub fn publish_to(&self, lsn: u64) {
        self.published.send_modify(|p| *p = (*p).max(lsn));
    }
}

impl EntrySource for MemSource {
    async fn next_items(&self, after: Position, max_bytes: usize) -> Result<Vec<Item>, String> {
        let mut rx = self.published.subscribe();
        let upto = *rx
            .wait_for(|p| *p > after.lsn)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for lsn in after.lsn + 1..=upto {
            let e = entry(lsn);
            bytes += e.wire_bytes();
            out.push(Item::Entry(e));
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }
}

#[derive(Default)]
pub struct SinkState {
    pub stored: Vec<Entry>,
    /// Entries of `stored` that are durable (a crash keeps only these).
    pub durable_len: usize,
    pub admitted: u64,
    /// Order violations seen by `store` (must stay empty).
    pub violations: Vec<String>,
}

/// The receiving core: keeps entries in memory, checks they arrive in order without gaps or
/// duplicates, and can lag its durable position behind what it stored (`durable_lag` entries)
/// so a simulated crash loses the tail and the sender must resend it.
pub struct MemSink {
    pub state: Mutex<SinkState>,
    pub durable_lag: AtomicUsize,
    pub group: [u8; 16],
    pub devices: Vec<DeviceInfo>,
    pub store_delay: Duration,
}

impl MemSink {
    pub fn new() -> Arc<MemSink> {
        Arc::new(MemSink {
            state: Mutex::new(SinkState::default()),
            durable_lag: AtomicUsize::new(0),
            group: GROUP,
            devices: devices(),
            store_delay: Duration::ZERO,
        })
    }

    pub fn with(group: [u8; 16], devices: Vec<DeviceInfo>) -> Arc<MemSink> {
        Arc::new(MemSink {
            state: Mutex::new(SinkState::default()),
            durable_lag: AtomicUsize::new(0),
            group,
            devices,
            store_delay: Duration::ZERO,
        })
    }

    /// What a crash of the receiving site leaves: the durable prefix.
    pub fn crash(&self) {
        let mut s = self.state.lock().unwrap();
        let keep = s.durable_len;
        s.stored.truncate(keep);
    }

    pub fn durable_lsn(&self) -> u64 {
        let s = self.state.lock().unwrap();
        s.durable_len.checked_sub(1).map_or(0, |i| s.stored[i].lsn)
    }

    pub fn stored_len(&self) -> usize {
        self.state.lock().unwrap().stored.len()
    }

    /// Checks the stored stream is exactly entries 1..=n.
    pub fn assert_exactly(&self, n: u64) {
        let s = self.state.lock().unwrap();
        assert!(
            s.violations.is_empty(),
            "order violations: {:?}",
            s.violations
        );
        assert_eq!(s.stored.len() as u64, n, "stored entries");
        for (i, e) in s.stored.iter().enumerate() {
            assert_eq!(*e, entry(i as u64 + 1), "entry {}", i + 1);
        }
    }
}

impl SiteSink for MemSink {
    async fn admit(&self, peer: &PeerHello) -> Result<Admission, Refusal> {
        if peer.group_uuid != self.group {
            return Err(Refusal::group_mismatch(&self.group, &peer.group_uuid));
        }
        check_devices(&self.devices, &peer.devices)?;
        let mut s = self.state.lock().unwrap();
        s.admitted += 1;
        // A new session starts from the durable prefix (what survived).
        let keep = s.durable_len;
        s.stored.truncate(keep);
        let lsn = keep.checked_sub(1).map_or(0, |i| s.stored[i].lsn);
        Ok(Admission {
            epoch: 9,
            durable: Position { lsn, resync_seq: 0 },
        })
    }

    async fn store(&self, _peer: &PeerHello, items: Vec<Item>) -> Result<Position, String> {
        if !self.store_delay.is_zero() {
            tokio::time::sleep(self.store_delay).await;
        }
        let mut s = self.state.lock().unwrap();
        for item in items {
            let Item::Entry(e) = item else {
                return Err("unexpected resync item".into());
            };
            let want = s.stored.last().map_or(1, |l| l.lsn + 1);
            if e.lsn != want {
                let v = format!("got lsn {} want {want}", e.lsn);
                s.violations.push(v.clone());
                return Err(v);
            }
            s.stored.push(e);
        }
        let lag = self.durable_lag.load(Ordering::Relaxed);
        let len = s.stored.len();
        s.durable_len = s.durable_len.max(len.saturating_sub(lag));
        let lsn = s.durable_len.checked_sub(1).map_or(0, |i| s.stored[i].lsn);
        Ok(Position { lsn, resync_seq: 0 })
    }
}

/// Waits until `f` holds on the sender status, or panics after `secs` with the last status.
pub async fn wait_status(
    rx: &mut watch::Receiver<slink::SenderStatus>,
    secs: u64,
    what: &str,
    f: impl Fn(&slink::SenderStatus) -> bool,
) -> slink::SenderStatus {
    let r = tokio::time::timeout(Duration::from_secs(secs), async {
        rx.wait_for(|s| f(s)).await.map(|s| s.clone())
    })
    .await;
    match r {
        Ok(Ok(s)) => s,
        _ => panic!(
            "timed out waiting for {what}; last status {:?}",
            *rx.borrow()
        ),
    }
}

/// Prints which link path a test used (the issue asks tests to say so).
pub fn say_link(path: &str) {
    eprintln!("link path: {path}");
}
