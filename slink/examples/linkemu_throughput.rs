//! Measures what the link emulator sustains: an iperf-like bulk transfer through it (raw TCP), or
//! slink shipping through it (`--slink`). Run in release:
//!
//! ```text
//! cargo run --release -p slink --example linkemu_throughput -- --delay 50ms --rate 1gbit --secs 5
//! cargo run --release -p slink --example linkemu_throughput -- --delay 50ms --rate 1gbit --slink
//! ```
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use slink::linkemu::command::{parse_duration, parse_rate};
use slink::linkemu::{LinkEmulator, LinkParams};
use slink::{
    Admission, DeviceInfo, Entry, EntryKind, EntrySource, Item, LinkIdentity, PeerHello,
    Permission, Position, Psk, Refusal, SiteConfig, SiteId, SiteSink, SlinkListener, SlinkSender,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Args {
    delay: Duration,
    rate: Option<u64>,
    secs: u64,
    slink: bool,
}

fn args() -> Args {
    let mut a = Args {
        delay: Duration::from_millis(50),
        rate: Some(125_000_000),
        secs: 5,
        slink: false,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        match v[i].as_str() {
            "--delay" => {
                a.delay = parse_duration(&v[i + 1]).unwrap();
                i += 1;
            }
            "--rate" => {
                a.rate = parse_rate(&v[i + 1]).unwrap();
                i += 1;
            }
            "--secs" => {
                a.secs = v[i + 1].parse().unwrap();
                i += 1;
            }
            "--slink" => a.slink = true,
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    a
}

/// Source of 1 MiB write entries, as many as the window takes.
struct Endless;
const ENTRY_BYTES: usize = 1 << 20;

impl EntrySource for Endless {
    async fn next_items(&self, after: Position, max_bytes: usize) -> Result<Vec<Item>, String> {
        let data = Bytes::from(vec![0x5au8; ENTRY_BYTES]);
        let n = (max_bytes / (ENTRY_BYTES + 37)).max(1);
        Ok((1..=n as u64)
            .map(|k| {
                Item::Entry(Entry {
                    lsn: after.lsn + k,
                    device: 0,
                    offset: 0,
                    kind: EntryKind::Write,
                    len: ENTRY_BYTES as u64,
                    timestamp_ns: 0,
                    data: data.clone(),
                })
            })
            .collect())
    }
}

struct NullSink {
    bytes: AtomicU64,
}

impl SiteSink for NullSink {
    async fn admit(&self, _: &PeerHello) -> Result<Admission, Refusal> {
        Ok(Admission {
            epoch: 1,
            durable: Position::default(),
        })
    }
    async fn store(&self, _: &PeerHello, items: Vec<Item>) -> Result<Position, String> {
        let mut last = Position::default();
        for i in items {
            if let Item::Entry(e) = i {
                self.bytes.fetch_add(e.data.len() as u64, Ordering::Relaxed);
                last.lsn = e.lsn;
            }
        }
        Ok(last)
    }
}

fn report(what: &str, bytes: u64, secs: f64, rate: Option<u64>) {
    let bps = bytes as f64 * 8.0 / secs;
    let pct = rate.map_or(String::new(), |r| {
        format!(" = {:.1}% of the set rate", bps / (r as f64 * 8.0) * 100.0)
    });
    println!(
        "{what}: {bytes} bytes in {secs:.2} s = {:.1} Mbit/s{pct}",
        bps / 1e6
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    println!(
        "link path: in-repo link emulator, one-way delay {:?} (RTT {:?}), rate {}",
        a.delay,
        a.delay * 2,
        a.rate.map_or("unlimited".into(), |r| format!(
            "{} Mbit/s",
            r * 8 / 1_000_000
        ))
    );
    let params = LinkParams {
        delay: a.delay,
        rate_bytes_per_sec: a.rate,
        ..LinkParams::default()
    };
    if a.slink {
        let key = Psk::new(b"benchmark key 0123456789".to_vec()).unwrap();
        let mut rcfg = SiteConfig::new(SiteId::new("b").unwrap(), key.clone())
            .allow(SiteId::new("a").unwrap(), Permission::ReadWrite);
        rcfg.dead_peer_timeout = Duration::from_secs(10);
        let sink = Arc::new(NullSink {
            bytes: AtomicU64::new(0),
        });
        let l = SlinkListener::bind("127.0.0.1:0".parse().unwrap(), rcfg, sink.clone()).unwrap();
        let emu = LinkEmulator::start(
            "127.0.0.1:0".parse().unwrap(),
            l.local_addr().to_string(),
            params,
        )
        .await
        .unwrap();
        let mut scfg = SiteConfig::new(SiteId::new("a").unwrap(), key);
        scfg.dead_peer_timeout = Duration::from_secs(10);
        let id = LinkIdentity {
            receiver_site: SiteId::new("b").unwrap(),
            group_uuid: [1; 16],
            epoch: 1,
            devices: vec![DeviceInfo {
                device: 0,
                size_bytes: 1 << 30,
            }],
            features: 0,
        };
        println!(
            "slink window {} bytes, batch {} bytes",
            scfg.window_bytes, scfg.batch_bytes_max
        );
        let s =
            SlinkSender::spawn(emu.local_addr().to_string(), scfg, id, Arc::new(Endless)).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await; // handshake + ramp up
        let b0 = sink.bytes.load(Ordering::Relaxed);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(a.secs)).await;
        let b1 = sink.bytes.load(Ordering::Relaxed);
        report(
            "slink entry data stored",
            b1 - b0,
            t0.elapsed().as_secs_f64(),
            a.rate,
        );
        println!("sender status: {:?}", *s.status().borrow());
        s.shutdown().await;
        l.shutdown().await;
        emu.shutdown().await;
        return;
    }
    // Raw TCP: a sink that counts, a client that writes as fast as it can.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c2 = count.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    c2.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    });
    let emu = LinkEmulator::start("127.0.0.1:0".parse().unwrap(), up.to_string(), params)
        .await
        .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_send_buffer_size(16 << 20).unwrap();
    let mut c = sock.connect(emu.local_addr()).await.unwrap();
    tokio::spawn(async move {
        let buf = vec![0xa5u8; 1 << 20];
        while c.write_all(&buf).await.is_ok() {}
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b0 = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.secs)).await;
    let b1 = count.load(Ordering::Relaxed);
    report(
        "raw TCP through the emulator",
        b1 - b0,
        t0.elapsed().as_secs_f64(),
        a.rate,
    );
    println!("emulator stats: {:?}", emu.stats());
}
