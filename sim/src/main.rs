//! `replicator-sim`: run the simulation over many seeds, or replay one.
//!
//! ```text
//! replicator-sim --seeds 2000            # seeds 0..2000
//! replicator-sim --from 5000 --seeds 1000000
//! replicator-sim --seed 1234 --trace     # replay one seed, printing every event
//! ```
//! A failing seed prints the command that replays it; the commit and the seed replay it exactly.

use std::process::ExitCode;
use std::time::Instant;

use replicator_sim::{run, Options, Stats};

fn arg(args: &[String], name: &str) -> Option<u64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let trace = args.iter().any(|a| a == "--trace");
    let writes = arg(&args, "--writes").unwrap_or(Options::default().writes);
    let (from, count) = match arg(&args, "--seed") {
        Some(s) => (s, 1),
        None => (
            arg(&args, "--from").unwrap_or(0),
            arg(&args, "--seeds").unwrap_or(100),
        ),
    };
    let started = Instant::now();
    let mut total = Stats::default();
    let mut failed = 0u64;
    let (mut runs, mut two_groups) = (0u64, 0u64);
    for seed in from..from + count {
        let out = run(Options {
            seed,
            writes,
            faults: true,
            trace,
        });
        total.events += out.stats.events;
        total.sim_ns += out.stats.sim_ns;
        total.writes_acked += out.stats.writes_acked;
        total.checks += out.stats.checks;
        total.groups += out.stats.groups;
        runs += 1;
        two_groups += u64::from(out.stats.groups == 2);
        for (k, v) in out.stats.faults {
            *total.faults.entry(k).or_default() += v;
        }
        for (k, v) in out.stats.core_events {
            *total.core_events.entry(k).or_default() += v;
        }
        if let Some(f) = out.failure {
            failed += 1;
            eprintln!("seed {seed} FAILED: {f}");
            eprintln!("replay: cargo run --release -p replicator-sim -- --seed {seed} --trace");
            if failed >= 5 {
                break;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{count} seeds from {from}: {failed} failed; {} events, {:.0} simulated s, {} writes acked, {} checks in {secs:.1} s wall ({:.0} runs/min, {:.0} events/s)",
        total.events,
        total.sim_ns as f64 / 1e9,
        total.writes_acked,
        total.checks,
        count as f64 / secs * 60.0,
        total.events as f64 / secs
    );
    println!("runs with two groups (sharing sites and network): {two_groups} of {runs}");
    println!("faults injected: {:?}", total.faults);
    println!("core events: {:?}", total.core_events);
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
