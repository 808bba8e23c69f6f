//! Prometheus metrics, defined in one place with base units in their names. `/metrics` serves
//! the text format; gauges are refreshed from the groups at every scrape.
//!
//! The Grafana dashboard in grafana/ uses these names; `tests/metrics_names.rs` checks it against
//! what this module exports.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::daemon::registry::{self, Registry as Devices};
use crate::nbd::ServerStats;

/// Longest HTTP request head the metrics endpoint reads.
const HTTP_REQUEST_BYTES_MAX: usize = 8192;

pub struct Metrics {
    registry: Registry,
    slink_lag_ios: IntGaugeVec,
    slink_lag_bytes: IntGaugeVec,
    slink_lag_seconds: GaugeVec,
    slink_sync: IntGaugeVec,
    slink_dirty_bytes: IntGaugeVec,
    slink_applied_lsn: IntGaugeVec,
    slink_resync_regions_copied: IntGaugeVec,
    replog_capacity_bytes: IntGaugeVec,
    replog_used_bytes: IntGaugeVec,
    replog_entries: IntGaugeVec,
    replog_last_lsn: IntGaugeVec,
    group_writes: IntGaugeVec,
    group_overflows: IntGaugeVec,
    group_events: IntGaugeVec,
    nbd: IntCounterVec,
}

/// Write latency per group; groups observe into it directly on the write path.
pub fn write_latency() -> &'static HistogramVec {
    static H: OnceLock<HistogramVec> = OnceLock::new();
    H.get_or_init(|| {
        let buckets = vec![
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        HistogramVec::new(
            HistogramOpts::new(
                "replicator_write_latency_seconds",
                "Write latency from NBD request to acknowledgement",
            )
            .buckets(buckets),
            &["group"],
        )
        .unwrap_or_else(|_| unreachable_histogram())
    })
}

#[allow(
    clippy::unwrap_used,
    reason = "constant, valid options; checked by a unit test"
)]
fn unreachable_histogram() -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new("replicator_write_latency_fallback_seconds", "x"),
        &["group"],
    )
    .unwrap()
}

fn igv(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), labels)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let sl = &["device", "slink"];
        let g = &["group"];
        let m = Metrics {
            registry: Registry::new(),
            slink_lag_ios: igv(
                "replicator_slink_lag_ios",
                "Entries the site has not applied",
                sl,
            )?,
            slink_lag_bytes: igv(
                "replicator_slink_lag_bytes",
                "Bytes the site has not applied",
                sl,
            )?,
            slink_lag_seconds: GaugeVec::new(
                Opts::new(
                    "replicator_slink_lag_seconds",
                    "Age of the oldest entry the site has not applied",
                ),
                sl,
            )?,
            slink_sync: igv(
                "replicator_slink_sync",
                "1 when the slink is in sync mode",
                sl,
            )?,
            slink_dirty_bytes: igv(
                "replicator_slink_dirty_bytes",
                "Bytes in dirty regions the site is missing",
                sl,
            )?,
            slink_applied_lsn: igv(
                "replicator_slink_applied_lsn",
                "Highest lsn the site has applied",
                sl,
            )?,
            slink_resync_regions_copied: igv(
                "replicator_slink_resync_regions_copied",
                "Dirty regions copied to the site since start",
                sl,
            )?,
            replog_capacity_bytes: igv("replicator_replog_capacity_bytes", "Ring capacity", g)?,
            replog_used_bytes: igv("replicator_replog_used_bytes", "Ring bytes in use", g)?,
            replog_entries: igv(
                "replicator_replog_entries",
                "Entries retained in the ring",
                g,
            )?,
            replog_last_lsn: igv("replicator_replog_last_lsn", "Newest lsn in the ring", g)?,
            group_writes: igv(
                "replicator_group_writes",
                "Writes acknowledged since start",
                g,
            )?,
            group_overflows: igv(
                "replicator_group_overflows",
                "Ring overflows (entries dropped for a site)",
                g,
            )?,
            group_events: igv("replicator_group_events", "Event counter of the group", g)?,
            nbd: IntCounterVec::new(
                Opts::new("replicator_nbd_total", "NBD server counters"),
                &["counter"],
            )?,
        };
        m.registry.register(Box::new(m.slink_lag_ios.clone()))?;
        m.registry.register(Box::new(m.slink_lag_bytes.clone()))?;
        m.registry.register(Box::new(m.slink_lag_seconds.clone()))?;
        m.registry.register(Box::new(m.slink_sync.clone()))?;
        m.registry.register(Box::new(m.slink_dirty_bytes.clone()))?;
        m.registry.register(Box::new(m.slink_applied_lsn.clone()))?;
        m.registry
            .register(Box::new(m.slink_resync_regions_copied.clone()))?;
        m.registry
            .register(Box::new(m.replog_capacity_bytes.clone()))?;
        m.registry.register(Box::new(m.replog_used_bytes.clone()))?;
        m.registry.register(Box::new(m.replog_entries.clone()))?;
        m.registry.register(Box::new(m.replog_last_lsn.clone()))?;
        m.registry.register(Box::new(m.group_writes.clone()))?;
        m.registry.register(Box::new(m.group_overflows.clone()))?;
        m.registry.register(Box::new(m.group_events.clone()))?;
        m.registry.register(Box::new(m.nbd.clone()))?;
        m.registry.register(Box::new(write_latency().clone()))?;
        Ok(m)
    }

    /// Refresh every gauge from the daemon's groups and render the text format.
    pub fn render(&self, devices: &Devices, nbd: &ServerStats) -> String {
        self.slink_lag_ios.reset();
        self.slink_lag_bytes.reset();
        self.slink_lag_seconds.reset();
        self.slink_sync.reset();
        self.slink_dirty_bytes.reset();
        self.slink_applied_lsn.reset();
        self.slink_resync_regions_copied.reset();
        for name in devices.names() {
            let Some(h) = devices.get(&name) else {
                continue;
            };
            let st = registry::device_status(&h);
            for s in &st.slinks {
                let nr = s.slink.to_string();
                let l = [name.as_str(), nr.as_str()];
                self.slink_lag_ios
                    .with_label_values(&l)
                    .set(s.lag_ios as i64);
                self.slink_lag_bytes
                    .with_label_values(&l)
                    .set(s.lag_bytes as i64);
                self.slink_lag_seconds
                    .with_label_values(&l)
                    .set(s.lag_seconds);
                self.slink_sync
                    .with_label_values(&l)
                    .set(i64::from(s.mode == "sync"));
                self.slink_dirty_bytes
                    .with_label_values(&l)
                    .set(s.dirty_bytes as i64);
                self.slink_applied_lsn
                    .with_label_values(&l)
                    .set(s.applied_lsn as i64);
                if let Some(copied) = h.group.regions_copied(s.slink) {
                    self.slink_resync_regions_copied
                        .with_label_values(&l)
                        .set(copied as i64);
                }
            }
        }
        for g in devices.groups() {
            let key = g.replog_path.display().to_string();
            let l = [key.as_str()];
            let Some(replog) = g.replog() else { continue };
            let space = replog.space();
            self.replog_capacity_bytes
                .with_label_values(&l)
                .set(space.capacity_bytes as i64);
            self.replog_used_bytes
                .with_label_values(&l)
                .set(space.used_bytes as i64);
            self.replog_entries
                .with_label_values(&l)
                .set(space.entries as i64);
            self.replog_last_lsn
                .with_label_values(&l)
                .set(replog.next_lsn().saturating_sub(1) as i64);
            self.group_writes
                .with_label_values(&l)
                .set(g.writes_total.load(std::sync::atomic::Ordering::Relaxed) as i64);
            self.group_overflows
                .with_label_values(&l)
                .set(g.overflows_total.load(std::sync::atomic::Ordering::Relaxed) as i64);
            self.group_events
                .with_label_values(&l)
                .set(g.events.current() as i64);
        }
        let snap = nbd.snapshot();
        for (k, n) in [
            ("connections", snap.connections_total),
            ("handshakes_failed", snap.handshakes_failed_total),
            ("requests_read", snap.requests_read_total),
            ("requests_write", snap.requests_write_total),
            ("requests_flush", snap.requests_flush_total),
            ("requests_trim", snap.requests_trim_total),
            ("requests_write_zeroes", snap.requests_write_zeroes_total),
            ("requests_unknown", snap.requests_unknown_total),
            ("errors", snap.errors_total),
            ("protocol_violations", snap.protocol_violations_total),
        ] {
            let c = self.nbd.with_label_values(&[k]);
            let cur = c.get();
            if n > cur {
                c.inc_by(n - cur);
            }
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serve `GET /metrics` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    devices: Arc<Devices>,
    nbd: Arc<ServerStats>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((mut sock, _)) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        let devices = devices.clone();
        let nbd = nbd.clone();
        tokio::spawn(async move {
            let mut head = vec![0u8; HTTP_REQUEST_BYTES_MAX];
            let mut n = 0;
            loop {
                let Some(rest) = head.get_mut(n..) else {
                    return;
                };
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(rest)).await
                {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => return,
                    Ok(Ok(k)) => n += k,
                }
                if head
                    .get(..n)
                    .is_some_and(|h| h.windows(4).any(|w| w == b"\r\n\r\n"))
                {
                    break;
                }
                if n >= head.len() {
                    return;
                }
            }
            let req = String::from_utf8_lossy(head.get(..n).unwrap_or_default());
            let (status, ctype, body) = if req.starts_with("GET /metrics") {
                (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    metrics.render(&devices, &nbd),
                )
            } else if req.starts_with("GET / ") {
                (
                    "200 OK",
                    "text/plain",
                    "replicator: see /metrics\n".to_string(),
                )
            } else {
                ("404 Not Found", "text/plain", "not found\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
