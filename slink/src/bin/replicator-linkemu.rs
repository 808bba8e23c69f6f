//! `replicator-linkemu`: the in-repo link emulator as a program (logic in `slink::linkemu`).
//!
//! ```text
//! replicator-linkemu --listen 127.0.0.1:7411 --upstream 127.0.0.1:7410 \
//!     --delay 50ms --rate 1gbit --control 127.0.0.1:7499
//! echo "partition 5s" | nc -q1 127.0.0.1 7499
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use slink::linkemu::command::{parse_duration, parse_rate};
use slink::linkemu::{LinkEmulator, LinkParams};

/// A TCP proxy that emulates a long, narrow or broken link (delay, jitter, rate, stall,
/// partition, reset, corruption), controlled at run time over a line-based control port.
#[derive(Parser, Debug)]
#[command(name = "replicator-linkemu", version)]
struct Args {
    /// Address to listen on (clients connect here).
    #[arg(long)]
    listen: SocketAddr,
    /// Address to forward to (`host:port`).
    #[arg(long)]
    upstream: String,
    /// One-way delay (RTT = 2x), e.g. 50ms.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    delay: Duration,
    /// Random +- delay per chunk, e.g. 5ms.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    jitter: Duration,
    /// Rate limit per direction: <n>[k|m|g]bit, bytes/s, or off.
    #[arg(long, default_value = "off")]
    rate: String,
    /// Flip one byte every N bytes client -> upstream (tests only).
    #[arg(long)]
    corrupt_every: Option<u64>,
    /// Control port (one command per line: delay, jitter, rate, stall, partition, reset, heal,
    /// corrupt, status, help).
    #[arg(long)]
    control: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rate = match parse_rate(&args.rate) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("replicator-linkemu: --rate: {e}");
            return ExitCode::from(2);
        }
    };
    let params = LinkParams {
        delay: args.delay,
        jitter: args.jitter,
        rate_bytes_per_sec: rate,
        corrupt_every_bytes: args.corrupt_every.filter(|n| *n > 0),
        corrupt_both: false,
    };
    let emu = match LinkEmulator::start(args.listen, args.upstream.clone(), params).await {
        Ok(e) => Arc::new(e),
        Err(e) => {
            eprintln!("replicator-linkemu: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = args.control {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                emu.serve_control(l);
            }
            Err(e) => {
                eprintln!("replicator-linkemu: cannot listen on control {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!(
        "replicator-linkemu: {} -> {} delay={:?} jitter={:?} rate={} control={}",
        emu.local_addr(),
        args.upstream,
        params.delay,
        params.jitter,
        params
            .rate_bytes_per_sec
            .map_or("off".to_string(), |r| format!("{} bytes/s", r)),
        args.control.map_or("none".to_string(), |a| a.to_string()),
    );
    wait_for_signal().await;
    ExitCode::SUCCESS
}

/// SIGINT or SIGTERM (tests and scripts stop the emulator with either).
async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
