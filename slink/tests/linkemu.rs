//! The in-repo link emulator, measured from outside: delay, rate, stall bound, partition, reset,
//! corruption and the control port, over real loopback TCP.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use slink::linkemu::{LinkEmulator, LinkParams};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn say_link() {
    eprintln!("link path: in-repo link emulator (slink::linkemu, in-process)");
}

/// An upstream that echoes everything back.
async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An upstream that discards everything and reports the byte count when the peer closes.
async fn sink_server() -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut v = Vec::new();
                let _ = s.read_to_end(&mut v).await;
                let _ = tx.send(v).await;
            });
        }
    });
    (addr, rx)
}

async fn rtt(s: &mut TcpStream) -> Duration {
    let t0 = Instant::now();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_doubles_into_rtt_and_changes_at_run_time() {
    say_link();
    let up = echo_server().await;
    let params = LinkParams {
        delay: Duration::from_millis(30),
        ..LinkParams::default()
    };
    let emu = LinkEmulator::start("127.0.0.1:0".parse().unwrap(), up.to_string(), params)
        .await
        .unwrap();
    let mut s = TcpStream::connect(emu.local_addr()).await.unwrap();
    let r = rtt(&mut s).await;
    assert!(
        r >= Duration::from_millis(60) && r < Duration::from_millis(90),
        "{r:?}"
    );
    assert_eq!(emu.apply("delay 5ms"), "ok");
    let r = rtt(&mut s).await;
    assert!(
        r >= Duration::from_millis(10) && r < Duration::from_millis(40),
        "{r:?}"
    );
    assert_eq!(emu.apply("jitter 4ms"), "ok");
    for _ in 0..5 {
        let r = rtt(&mut s).await;
        assert!(
            r >= Duration::from_millis(2) && r < Duration::from_millis(50),
            "{r:?}"
        );
    }
    assert!(emu.apply("delay soon").starts_with("error"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_paces_each_direction() {
    say_link();
    let (up, mut got) = sink_server().await;
    let rate = 2_500_000u64; // 20 Mbit/s
    let params = LinkParams {
        rate_bytes_per_sec: Some(rate),
        ..LinkParams::default()
    };
    let emu = LinkEmulator::start("127.0.0.1:0".parse().unwrap(), up.to_string(), params)
        .await
        .unwrap();
    let mut s = TcpStream::connect(emu.local_addr()).await.unwrap();
    let data = vec![7u8; 5_000_000];
    let t0 = Instant::now();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let v = got.recv().await.unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(v.len(), data.len());
    let measured = v.len() as f64 / secs;
    eprintln!("rate set {rate} B/s, measured {measured:.0} B/s");
    assert!(
        measured < rate as f64 * 1.1 && measured > rate as f64 * 0.85,
        "{measured}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_holds_traffic_within_the_memory_bound() {
    say_link();
    let (up, mut got) = sink_server().await;
    let params = LinkParams {
        delay: Duration::from_millis(10),
        rate_bytes_per_sec: Some(1_250_000),
        ..LinkParams::default()
    };
    let emu = LinkEmulator::start("127.0.0.1:0".parse().unwrap(), up.to_string(), params)
        .await
        .unwrap();
    assert_eq!(emu.apply("stall on"), "ok");
    let mut s = TcpStream::connect(emu.local_addr()).await.unwrap();
    // Push for a second: the emulator must stop reading once its delay line is full.
    let chunk = vec![1u8; 1 << 20];
    let mut pushed = 0usize;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(100), s.write(&chunk)).await {
            pushed += n;
        }
    }
    assert_eq!(
        emu.stats().bytes_forward,
        0,
        "nothing delivered while stalled"
    );
    // Delay line (12.5 kB + 4 MiB slack) plus kernel socket buffers on both legs.
    eprintln!("accepted {pushed} bytes while stalled");
    assert!(pushed < 4_200_000 + 24 * (1 << 20), "{pushed}");
    assert_eq!(emu.apply("stall off"), "ok");
    assert_eq!(emu.apply("rate off"), "ok");
    s.shutdown().await.unwrap();
    let v = tokio::time::timeout(Duration::from_secs(10), got.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        v.len(),
        pushed,
        "everything held is delivered after the stall"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_drops_and_refuses_then_heals_by_time() {
    say_link();
    let up = echo_server().await;
    let emu = LinkEmulator::start(
        "127.0.0.1:0".parse().unwrap(),
        up.to_string(),
        LinkParams::default(),
    )
    .await
    .unwrap();
    let mut s = TcpStream::connect(emu.local_addr()).await.unwrap();
    rtt(&mut s).await;
    assert_eq!(emu.apply("partition 700ms"), "ok");
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b))
        .await
        .unwrap();
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "existing connection dropped: {r:?}"
    );
    // New connections are accepted by the kernel and dropped at once (RST), which the client
    // sees either at connect or at its first read.
    if let Ok(mut s2) = TcpStream::connect(emu.local_addr()).await {
        let _ = s2.write_all(b"ping").await;
        let r = tokio::time::timeout(Duration::from_secs(2), s2.read(&mut b))
            .await
            .unwrap();
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "refused while partitioned: {r:?}"
        );
    }
    for _ in 0..100 {
        if emu.stats().refused >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(emu.stats().refused >= 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut s3 = TcpStream::connect(emu.local_addr()).await.unwrap();
    rtt(&mut s3).await;
    // `reset` drops the live connection; the next one works.
    assert_eq!(emu.apply("reset"), "ok");
    let r = tokio::time::timeout(Duration::from_secs(2), s3.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "reset: {r:?}");
    let mut s4 = TcpStream::connect(emu.local_addr()).await.unwrap();
    rtt(&mut s4).await;
    assert!(emu.stats().dropped >= 2);
    // partition without a time lasts until heal.
    assert_eq!(emu.apply("partition"), "ok");
    assert_eq!(emu.apply("heal"), "ok");
    let mut s5 = TcpStream::connect(emu.local_addr()).await.unwrap();
    rtt(&mut s5).await;
}

#[tokio::test]
async fn corruption_flips_exactly_one_byte_every_n() {
    say_link();
    let (up, mut got) = sink_server().await;
    let params = LinkParams {
        corrupt_every_bytes: Some(1000),
        ..LinkParams::default()
    };
    let emu = LinkEmulator::start("127.0.0.1:0".parse().unwrap(), up.to_string(), params)
        .await
        .unwrap();
    let mut s = TcpStream::connect(emu.local_addr()).await.unwrap();
    let data: Vec<u8> = (0..10_500u32).map(|i| i as u8).collect();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap();
    let v = got.recv().await.unwrap();
    assert_eq!(v.len(), data.len());
    let diffs: Vec<usize> = (0..v.len()).filter(|&i| v[i] != data[i]).collect();
    let want: Vec<usize> = (1..=10).map(|k| k * 1000 - 1).collect();
    assert_eq!(diffs, want);
    assert_eq!(emu.stats().corrupted, 10);
}

#[tokio::test]
async fn control_port_takes_one_command_per_line() {
    say_link();
    let up = echo_server().await;
    let emu = Arc::new(
        LinkEmulator::start(
            "127.0.0.1:0".parse().unwrap(),
            up.to_string(),
            LinkParams::default(),
        )
        .await
        .unwrap(),
    );
    let ctl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ctl_addr = ctl.local_addr().unwrap();
    emu.serve_control(ctl);
    let c = TcpStream::connect(ctl_addr).await.unwrap();
    let (r, mut w) = c.into_split();
    let mut lines = BufReader::new(r).lines();
    w.write_all(b"delay 50ms\nrate 100mbit\nbogus\nstatus\n")
        .await
        .unwrap();
    assert_eq!(lines.next_line().await.unwrap().unwrap(), "ok");
    assert_eq!(lines.next_line().await.unwrap().unwrap(), "ok");
    assert!(lines
        .next_line()
        .await
        .unwrap()
        .unwrap()
        .starts_with("error unknown command"));
    let status = lines.next_line().await.unwrap().unwrap();
    assert!(
        status.contains("delay=50ms") && status.contains("rate=100000000bit"),
        "{status}"
    );
    assert_eq!(emu.params().delay, Duration::from_millis(50));
    assert_eq!(emu.params().rate_bytes_per_sec, Some(12_500_000));
}

/// The `replicator-linkemu` binary: flags at start, the control port at run time, SIGTERM.
#[tokio::test]
async fn the_binary_runs_and_takes_commands() {
    eprintln!("link path: replicator-linkemu binary");
    let up = echo_server().await;
    let free = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, control) = (free(()), free(()));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_replicator-linkemu"))
        .args([
            "--listen",
            &listen.to_string(),
            "--upstream",
            &up.to_string(),
        ])
        .args([
            "--delay",
            "20ms",
            "--rate",
            "100mbit",
            "--control",
            &control.to_string(),
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut s = None;
    for _ in 0..100 {
        if let Ok(c) = TcpStream::connect(listen).await {
            s = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = s.expect("emulator listening");
    let r = rtt(&mut s).await;
    assert!(r >= Duration::from_millis(40), "{r:?}");
    let c = TcpStream::connect(control).await.unwrap();
    let (r, mut w) = c.into_split();
    let mut lines = BufReader::new(r).lines();
    w.write_all(b"delay 1ms\nstatus\n").await.unwrap();
    assert_eq!(lines.next_line().await.unwrap().unwrap(), "ok");
    let status = lines.next_line().await.unwrap().unwrap();
    assert!(
        status.contains("delay=1ms") && status.contains("rate=100000000bit"),
        "{status}"
    );
    let r = rtt(&mut s).await;
    assert!(r < Duration::from_millis(30), "{r:?}");
    let pid = child.id().unwrap() as i32;
    assert_eq!(
        std::process::Command::new("kill")
            .arg(pid.to_string())
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    let st = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(st.success(), "exits cleanly on SIGTERM: {st:?}");
}
