//! The simulation's CI budget: 2,000 seeds (four ranges of 500, so nextest runs them side by
//! side), each a full run with faults, checked after sampled events, at every crash and at the
//! end. `SIM_SEEDS_PER_TEST=N` changes the range size. A failure prints the command that replays
//! the seed.
//!
//! Below the budget: one test per bug the simulation found, named after it, with the seed that
//! found it. The bugs were found while the simulation was being written: the failing code is the
//! core of the commit named in each comment, driven by the simulation of the commit that fixed
//! it (which was not committed in its failing form). Any change to the core or the simulation
//! sends a seed down another path, so each test is also a plain run of that seed that must pass.

use replicator_sim::{run, Options};

fn seeds_per_test() -> u64 {
    std::env::var("SIM_SEEDS_PER_TEST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500)
}

fn run_range(from: u64, count: u64) {
    let mut failures = Vec::new();
    let mut events = 0;
    for seed in from..from + count {
        let out = run(Options {
            seed,
            ..Options::default()
        });
        events += out.stats.events;
        if let Some(f) = out.failure {
            failures.push(format!(
                "seed {seed}: {f}\nreplay: cargo run --release -p replicator-sim -- --seed {seed} --trace"
            ));
        }
    }
    println!("seeds {from}..{}: {events} events", from + count);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn seeds_0_to_500_keep_every_promise() {
    run_range(0, seeds_per_test());
}

#[test]
fn seeds_500_to_1000_keep_every_promise() {
    run_range(seeds_per_test(), seeds_per_test());
}

#[test]
fn seeds_1000_to_1500_keep_every_promise() {
    run_range(2 * seeds_per_test(), seeds_per_test());
}

#[test]
fn seeds_1500_to_2000_keep_every_promise() {
    run_range(3 * seeds_per_test(), seeds_per_test());
}

fn seed_passes(seed: u64) {
    let out = run(Options {
        seed,
        ..Options::default()
    });
    assert!(out.failure.is_none(), "seed {seed}: {:?}", out.failure);
    assert!(
        out.stats.writes_acked > 0,
        "seed {seed} acknowledged nothing"
    );
}

/// Found in the core of 8f3d922, fixed in 5e7a574: two overflow drops planned for one slink before the first was persisted;
/// the second, older target moved its cursor back ("cursor cannot move back from 153 to 151").
#[test]
fn regression_seed_13_a_second_drop_for_a_slink_never_moves_its_cursor_back() {
    seed_passes(13);
}

/// Found in the core of 8f3d922, fixed in 5e7a574: the resync completion marker was lost with a link reset; the site stayed
/// inconsistent forever. Every session now ends its repair with a marker.
#[test]
fn regression_seed_78_a_completion_marker_lost_with_its_session_is_sent_again() {
    seed_passes(78);
}

/// Found in the core of 5e7a574, fixed in 92abf6e: pieces sent after a completion marker, whose ack then ended the resync:
/// the site stayed inconsistent. A piece now supersedes a marker in flight.
#[test]
fn regression_seed_837_a_piece_after_a_completion_marker_keeps_the_resync_running() {
    seed_passes(837);
}

/// Found in the core of 92abf6e, fixed in a8a73fc: a cursor persisted just before a crash freed ring space
/// nobody reclaimed after the restart; the secondary's ring stayed full (livelock).
#[test]
fn regression_seed_3287_a_restart_reclaims_what_cursors_persisted_before_the_crash_free() {
    seed_passes(3287);
}

/// Found in the core of 92abf6e, fixed in a8a73fc: a refused append asked for a reclaim, whose completion
/// retried the append, at one simulated instant, forever. One reclaim per ring-full episode.
#[test]
fn regression_seed_40_a_full_ring_never_loops_on_reclaims_at_one_instant() {
    seed_passes(40);
}

/// Found in the core of 92abf6e, fixed in a8a73fc: the secondary's retry after a reclaim started a new
/// ring-full episode each time (and so a new reclaim): the same loop on the secondary.
#[test]
fn regression_seed_164_a_secondary_retries_its_front_entry_once_per_reclaim_that_freed_space() {
    seed_passes(164);
}

/// Found by the storage faults of 454e692 in the core of c17c68a, fixed in 454e692: a slink-0
/// device write that failed still counted as applied (the apply order dropped it), so slink 0's
/// cursor was checkpointed past it and a restart never replayed it: the device kept the old
/// bytes (seed 18: the sync secondary; seed 12: the primary). The applied prefix now stays below
/// the lowest failed write.
#[test]
fn regression_seed_18_a_failed_device_write_on_a_secondary_is_replayed_after_its_restart() {
    seed_passes(18);
}

#[test]
fn regression_seed_12_a_failed_device_write_on_the_primary_is_replayed_after_its_restart() {
    seed_passes(12);
}

/// Counted (not failed) by the simulation of 6bb9d0d: the primary restarted while entries were
/// dropped for a lagging site, forgot the site's drop floor and gave it three full resyncs where
/// partial ones were correct (`resync-full-for-a-forgotten-drop-floor`). The floor is now
/// persisted in the replog (format 3) and restored; every restart checks it is never below the
/// one the stopped core decided by.
#[test]
fn regression_seed_27_a_primary_restart_keeps_the_drop_floor_so_the_site_resyncs_partially() {
    let out = run(Options {
        seed: 27,
        ..Options::default()
    });
    assert!(out.failure.is_none(), "seed 27: {:?}", out.failure);
    let events = &out.stats.core_events;
    let count = |kind: &str| events.get(kind).copied().unwrap_or(0);
    assert!(
        count("drop-floor-restored") > 0,
        "the restart restored a floor: {events:?}"
    );
    assert_eq!(
        count("resync-full-for-a-forgotten-drop-floor"),
        0,
        "{events:?}"
    );
    assert_eq!(count("resync-full"), 0, "{events:?}");
}

/// Found by the check of restored drop floors (this commit's simulation) in a core that took a
/// failed floor write for a durable one: a clear that failed left the old, lower floor on disk
/// while the core forgot it and moved the cursor; the restart restored it ("restored drop floor
/// Some(234) is below the stopped core's None"). A failed write now leaves the floor and the
/// cursor where they were until a retry succeeds.
#[test]
fn regression_seed_807_a_failed_floor_clear_never_leaves_a_lower_floor_on_disk() {
    seed_passes(807);
}
