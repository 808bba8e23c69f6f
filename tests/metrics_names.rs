//! The Grafana dashboard uses only metric names the daemon really exports.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn dashboard_names_exist_in_metrics() {
    let d = common::Daemon::start();
    d.create(
        "r1",
        &common::two_site_table(8, 16, "async ios=100", 0, "create"),
    );
    // One write so the latency histogram has a series.
    if common::have("qemu-io") {
        common::must(std::process::Command::new("qemu-io").args([
            "-f",
            "raw",
            &d.uri("r1"),
            "-c",
            "write 0 4k",
        ]));
    }
    let text = scrape(d.metrics_port);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let exported: BTreeSet<String> = text
        .lines()
        .filter(|l| l.starts_with("replicator_"))
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    let dash = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/grafana/replicator.json"
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&dash).unwrap();
    let mut used = BTreeSet::new();
    for p in v["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("replicator_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                used.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    assert!(!used.is_empty());
    for name in &used {
        assert!(
            exported.contains(name),
            "dashboard uses {name}, not exported; exported: {exported:?}"
        );
    }
    for must_have in [
        "replicator_slink_lag_seconds",
        "replicator_slink_lag_bytes",
        "replicator_replog_used_bytes",
        "replicator_slink_dirty_bytes",
    ] {
        assert!(exported.contains(must_have), "{must_have} missing");
    }
}
