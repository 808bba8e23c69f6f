//! The simulated world: sites, links, the event queue, faults and the workload.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::sync::Arc;

use replicator::core::slink::{DownWait, SlinkConfig, Transport};
use replicator::core::{
    Command, Core, CoreConfig, DeviceConfig, Extent, Input, Nanos, Position, Received, Restored,
    Role, NS_PER_SEC,
};
use replicator::engine::policy::{Fallbehind, PolicyKind};
use replog::storage::{MemDisk, Storage};
use replog::{EntryKind, Record, Replog};

use crate::check::{self, HistoryWrite};
use crate::faults::{self, Disk, FaultyDisk, Op, SharedFaults};
use crate::rng::Rng;

const MS: Nanos = 1_000_000;
const DEVICES: [(u32, u64); 2] = [(0, 64 << 10), (1, 32 << 10)];
const REGION_BYTES: u64 = 4096;
const RING_BYTES: u64 = 128 << 10;
const REPLOG_BYTES: u64 = 8192 + RING_BYTES;
const SECTOR: u64 = 512;
/// Activity log extents: small, so that a run keeps adding and evicting them.
const AL_EXTENT_BYTES: u64 = 8192;
const PRIMARY: usize = 0;
/// Site 1 is the sync secondary (slink 1), site 2 the async one (slink 2).
const SECONDARIES: [usize; 2] = [1, 2];
const WRITES_IN_FLIGHT_MAX: usize = 8;
/// Simulated time allowed for convergence once faults stop.
const CONVERGE_WITHIN: Nanos = 120 * NS_PER_SEC;
/// Events of one run: far above what a run needs (about 10,000); more is a livelock.
const EVENTS_MAX: u64 = 2_000_000;

#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// Client writes of the run.
    pub writes: u64,
    pub faults: bool,
    /// Print every event and command.
    pub trace: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seed: 0,
            writes: 300,
            faults: true,
            trace: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub sim_ns: Nanos,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub flushes: u64,
    pub checks: u64,
    /// Groups of the run (summed over runs: one or two each).
    pub groups: u64,
    pub faults: BTreeMap<&'static str, u64>,
    pub core_events: BTreeMap<&'static str, u64>,
}

#[derive(Debug)]
pub struct Outcome {
    pub stats: Stats,
    /// The first broken promise, with the tail of the trace.
    pub failure: Option<String>,
}

#[derive(Clone, Debug)]
enum Item {
    Entry {
        lsn: u64,
        extent: Extent,
        data: Vec<u8>,
    },
    Piece {
        seq: u64,
        extent: Extent,
        data: Vec<u8>,
    },
    Done {
        seq: u64,
    },
}

#[derive(Clone, Debug)]
enum Ev {
    Input {
        g: usize,
        site: usize,
        inc: u64,
        input: Input,
    },
    /// A completion that persists something in the site's modelled durable state first.
    Persist {
        g: usize,
        site: usize,
        inc: u64,
        what: Persist,
    },
    ToSecondary {
        g: usize,
        link: usize,
        session: u64,
        items: Vec<Item>,
    },
    ToPrimary {
        g: usize,
        link: usize,
        session: u64,
        pos: Position,
    },
    Connect {
        g: usize,
        link: usize,
    },
    /// Handshake, first step: the primary's hello reaches the site.
    Hello {
        g: usize,
        link: usize,
        session: u64,
    },
    /// Handshake, second step: the site's reply (its durable position) reaches the primary.
    HelloReply {
        g: usize,
        link: usize,
        session: u64,
        peer: Position,
    },
    Restart {
        g: usize,
        site: usize,
    },
    /// The operator restarts a site whose devices failed (slink 0 faulty).
    OperatorRestart {
        g: usize,
        site: usize,
        inc: u64,
    },
    /// A disk-full window ends.
    SpaceFreed {
        g: usize,
        site: usize,
        disk: Disk,
    },
    Tick {
        g: usize,
        site: usize,
        inc: u64,
    },
    Workload {
        g: usize,
    },
    Fault,
}

#[derive(Clone, Debug)]
enum Persist {
    Dirty {
        slink: u8,
        token: u64,
        regions: Vec<(u32, u64)>,
    },
    Consistency {
        consistent: bool,
    },
}

struct Queued {
    at: Nanos,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// What survives a crash besides the disks (the replog's metadata holds the activity log and
/// the resync sequence reservations): the modelled dirty logs and consistency flag.
#[derive(Clone, Debug, Default)]
struct Durable {
    dirty: BTreeSet<(u8, u32, u64)>,
    consistent: bool,
}

struct Site {
    role: Role,
    alive: bool,
    inc: u64,
    core: Option<Core>,
    log: Option<Replog>,
    log_disk: Arc<MemDisk>,
    devices: BTreeMap<u32, Arc<MemDisk>>,
    durable: Durable,
    /// Secondary: received data by lsn / seq, until stored.
    recv_entries: BTreeMap<u64, (Extent, Vec<u8>)>,
    recv_pieces: BTreeMap<u64, Vec<u8>>,
    /// Armed storage faults (they belong to the hardware: they outlive a restart).
    log_faults: SharedFaults,
    dev_faults: SharedFaults,
    /// The next dirty log persist of this site fails (the modelled dirty log).
    dirty_fault: bool,
    /// This incarnation's slink 0 failed and the operator restart is on its way.
    restart_asked: bool,
}

impl Site {
    fn log_storage(&self) -> Arc<FaultyDisk> {
        FaultyDisk::new(self.log_disk.clone(), self.log_faults.clone(), Disk::Log)
    }

    fn device(&self, d: u32) -> Option<Arc<FaultyDisk>> {
        self.devices
            .get(&d)
            .map(|m| FaultyDisk::new(m.clone(), self.dev_faults.clone(), Disk::Device))
    }

    /// Syncs every device; the first error.
    fn sync_devices(&self) -> Result<(), String> {
        let mut result = Ok(());
        for d in self.devices.keys() {
            if let Some(dev) = self.device(*d) {
                if let Err(e) = dev.sync_data() {
                    result = result.and(Err(e.to_string()));
                }
            }
        }
        result
    }
}

struct Link {
    /// Secondary site index; the primary's slink number is the same.
    site: usize,
    up: bool,
    session: u64,
    /// Delivery time of the last message of this session each way (TCP keeps order).
    last_to_secondary: Nanos,
    last_to_primary: Nanos,
    /// A handshake of the current session is on its way (hello, then the site's reply).
    connecting: bool,
    /// The primary's `drop_floor` for this site when it last stopped: the floor its restart
    /// restores must never be below it (checked at the restart), and the first handshake after
    /// it counts the full resyncs a floor lost anyway costs (a write that did not make it).
    floor_at_stop: Option<u64>,
}

struct Pending {
    extent: Extent,
    data: Vec<u8>,
    fua: bool,
    lsn: Option<u64>,
}

/// One replicated group: its member at each site (own replog and devices), its links (one
/// connection per group and site pair) and what its clients were promised.
struct Group {
    sites: Vec<Site>,
    links: Vec<Link>,
    /// The primary's history by lsn (index lsn - 1), truncated when a primary restart recovers
    /// fewer entries (a power loss took unflushed ones; no site ever got them).
    history: Vec<HistoryWrite>,
    /// Where histories start: zeros, and the primary's devices after each restart's recovery.
    bases: Vec<check::Base>,
    pending: BTreeMap<u64, Pending>,
    flush_requests: BTreeMap<u64, u64>,
    /// Highest lsn whose durability a completed FLUSH or FUA promised.
    durable_promise: u64,
    /// Highest lsn acknowledged while the sync site (slink 1) was waited for.
    sync_promise: u64,
    max_acked: u64,
    /// Lsns whose device write (or read back for it) failed at the primary since its start:
    /// none of them may be acknowledged.
    apply_failed: BTreeSet<u64>,
    writes_issued: u64,
}

struct World {
    opts: Options,
    rng: Rng,
    now: Nanos,
    seq: u64,
    queue: BinaryHeap<Queued>,
    /// The groups of the run (one or two), sharing the sites' processes, power and network.
    g: Vec<Group>,
    /// Per secondary site (index as `SECONDARIES`): the network to it is cut until then (every
    /// group's link to it).
    partitioned_until: [Nanos; 2],
    stats: Stats,
    faults_until: Nanos,
    next_id: u64,
    trace: VecDeque<String>,
    failure: Option<String>,
}

impl Group {
    fn new() -> Group {
        let mut sites = Vec::new();
        for i in 0..3 {
            let role = if i == PRIMARY {
                Role::Primary
            } else {
                Role::Secondary
            };
            sites.push(Site {
                role,
                alive: false,
                inc: 0,
                core: None,
                log: None,
                log_disk: MemDisk::new(REPLOG_BYTES, 512),
                devices: DEVICES
                    .iter()
                    .map(|(d, s)| (*d, MemDisk::new(*s, 512)))
                    .collect(),
                durable: Durable {
                    consistent: true,
                    ..Default::default()
                },
                recv_entries: BTreeMap::new(),
                recv_pieces: BTreeMap::new(),
                log_faults: SharedFaults::default(),
                dev_faults: SharedFaults::default(),
                dirty_fault: false,
                restart_asked: false,
            });
        }
        let links = SECONDARIES
            .iter()
            .map(|s| Link {
                site: *s,
                up: false,
                session: 0,
                last_to_secondary: 0,
                last_to_primary: 0,
                connecting: false,
                floor_at_stop: None,
            })
            .collect();
        Group {
            sites,
            links,
            history: Vec::new(),
            bases: vec![check::zero_base(&DEVICES)],
            pending: BTreeMap::new(),
            flush_requests: BTreeMap::new(),
            durable_promise: 0,
            sync_promise: 0,
            max_acked: 0,
            apply_failed: BTreeSet::new(),
            writes_issued: 0,
        }
    }
}

fn core_config(role: Role) -> CoreConfig {
    let mut slinks = vec![SlinkConfig {
        nr: 0,
        transport: Transport::Local,
        policy: PolicyKind::Sync,
        fallbehind: Fallbehind::default(),
        down_wait: DownWait::Forever,
        region_bytes: None,
    }];
    if role == Role::Primary {
        slinks.push(SlinkConfig {
            nr: 1,
            transport: Transport::Remote,
            policy: PolicyKind::Sync,
            fallbehind: Fallbehind::default(),
            down_wait: DownWait::Bounded(2 * NS_PER_SEC),
            region_bytes: Some(REGION_BYTES),
        });
        slinks.push(SlinkConfig {
            nr: 2,
            transport: Transport::Remote,
            policy: PolicyKind::Async,
            fallbehind: Fallbehind {
                ios: Some(12),
                bytes: None,
                timeout: Some(std::time::Duration::from_secs(3)),
            },
            down_wait: DownWait::Bounded(2 * NS_PER_SEC),
            region_bytes: Some(REGION_BYTES),
        });
    }
    CoreConfig {
        role,
        devices: DEVICES
            .iter()
            .map(|(device, size)| DeviceConfig {
                device: *device,
                size: *size,
            })
            .collect(),
        slinks,
        ring_bytes: RING_BYTES,
        // Every append of the simulation is a batch of its own: one 4 KiB block or more.
        record_overhead_bytes: 4096,
        ring_full_wait: 20 * NS_PER_SEC,
        checkpoint_interval: 500 * MS,
        activity_extent_bytes: AL_EXTENT_BYTES,
        activity_extents_max: 4,
    }
}

pub fn run(opts: Options) -> Outcome {
    let mut w = World::new(opts);
    w.main_loop();
    for site in w.g.iter().flat_map(|g| g.sites.iter()) {
        for f in [&site.log_faults, &site.dev_faults] {
            for (k, v) in &faults::lock(f).fired {
                *w.stats.faults.entry(k).or_default() += v;
            }
        }
    }
    Outcome {
        stats: w.stats.clone(),
        failure: w.failure.take(),
    }
}

impl World {
    fn new(opts: Options) -> World {
        let mut rng = Rng::new(opts.seed);
        // Half of the runs have two groups on the same sites and network.
        let groups = if rng.chance(500) { 2 } else { 1 };
        let g = (0..groups).map(|_| Group::new()).collect();
        let faults_until = if opts.faults {
            rng.between(5, 20) * NS_PER_SEC
        } else {
            0
        };
        let stats = Stats {
            groups: groups as u64,
            ..Default::default()
        };
        let mut w = World {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            g,
            partitioned_until: [0; 2],
            stats,
            faults_until,
            next_id: 1,
            trace: VecDeque::new(),
            failure: None,
            opts,
        };
        for g in 0..groups {
            for i in 0..3 {
                let replog = Replog::create_on(w.g[g].sites[i].log_disk.clone(), 0, REPLOG_BYTES);
                match replog {
                    Ok(log) => {
                        for nr in 0..if i == PRIMARY { 3 } else { 1 } {
                            if let Err(e) = log.register_slink(nr, 0) {
                                w.fail(format!("register slink {nr}: {e}"));
                            }
                        }
                        if let Err(e) = log.set_activity_log_extent_bytes(AL_EXTENT_BYTES) {
                            w.fail(format!("activity log extent: {e}"));
                        }
                        drop(log);
                    }
                    Err(e) => w.fail(format!("replog create: {e}")),
                }
                w.start_site(g, i);
            }
            for l in 0..w.g[g].links.len() {
                w.at(MS, Ev::Connect { g, link: l });
            }
            w.at(MS, Ev::Workload { g });
        }
        w.at(10 * MS, Ev::Fault);
        w
    }

    fn at(&mut self, delay: Nanos, ev: Ev) {
        self.seq += 1;
        self.queue.push(Queued {
            at: self.now + delay,
            seq: self.seq,
            ev,
        });
    }

    fn note(&mut self, s: String) {
        if self.opts.trace {
            println!("{:>12} {s}", self.now);
        }
        self.trace.push_back(format!("{:>12} {s}", self.now));
        if self.trace.len() > 60 {
            self.trace.pop_front();
        }
    }

    fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            let tail: Vec<String> = self.trace.iter().cloned().collect();
            self.failure = Some(format!(
                "{what}\n  at t={} ns, event {}\n  last events:\n    {}",
                self.now,
                self.stats.events,
                tail.join("\n    ")
            ));
        }
    }

    fn fault_count(&mut self, kind: &'static str) {
        *self.stats.faults.entry(kind).or_default() += 1;
    }

    // ---- sites ----

    fn start_site(&mut self, g: usize, i: usize) {
        let disk = self.g[g].sites[i].log_storage();
        let fired_before = self.fired_total(g, i);
        let (log, _report) = match Replog::open_on(disk, 0) {
            Ok(v) => v,
            // An injected fault hit the open: the daemon tries again later.
            Err(e) if self.fired_total(g, i) > fired_before => {
                self.note(format!("g{g} site {i}: replog does not open ({e}): retry"));
                *self.stats.core_events.entry("open-retry").or_default() += 1;
                let d = self.rng.between(100, 500) * MS;
                self.at(d, Ev::Restart { g, site: i });
                return;
            }
            Err(e) => {
                self.fail(format!(
                    "g{g} site {i}: replog does not open after restart: {e}"
                ));
                return;
            }
        };
        let last = log.next_lsn() - 1;
        if i == PRIMARY {
            if last < self.g[g].durable_promise {
                self.fail(format!(
                    "primary restart: the replog ends at lsn {last}, below lsn {} that a FLUSH/FUA made durable",
                    self.g[g].durable_promise
                ));
            }
            // Entries above `last` were lost with the power: no site has them (R1).
            self.g[g].history.truncate(last as usize);
            self.g[g].max_acked = self.g[g].max_acked.min(last);
            let devs: BTreeMap<u32, Vec<u8>> = self.g[g].sites[PRIMARY]
                .devices
                .iter()
                .map(|(d, disk)| (*d, disk.current_image()))
                .collect();
            match check::recovered_images(self.g[g].sites[PRIMARY].log_disk.current_image(), &devs)
            {
                Ok((lsn, images)) => {
                    self.g[g].bases.retain(|b| b.lsn <= lsn);
                    self.g[g].bases.push(check::Base { lsn, images });
                }
                Err(e) => self.fail(format!("primary recovery image: {e}")),
            }
        }
        let mut retained = Vec::new();
        let mut from = log.first_lsn().max(1);
        loop {
            let batch = log.extents_from(from, 1024);
            let Some(l) = batch.last() else { break };
            from = l.lsn + 1;
            for e in batch {
                retained.push(replicator::core::index::Retained {
                    lsn: e.lsn,
                    extent: Extent {
                        device: e.device,
                        offset: e.offset,
                        len: e.len,
                    },
                    ring_bytes: e.record_bytes,
                    at: self.now,
                });
            }
        }
        let site = &self.g[g].sites[i];
        let nrs: Vec<u8> = if i == PRIMARY { vec![0, 1, 2] } else { vec![0] };
        let restored = Restored {
            last_lsn: last,
            retained,
            cursors: nrs
                .iter()
                .filter_map(|n| log.cursor(*n).map(|c| (*n, c)))
                .collect(),
            dirty: site.durable.dirty.iter().copied().collect(),
            resync_seq: nrs
                .iter()
                .map(|n| (*n, log.resync_seq(*n).unwrap_or(0)))
                .collect(),
            drop_floors: nrs
                .iter()
                .filter_map(|n| log.drop_floor(*n).ok().flatten().map(|f| (*n, f)))
                .collect(),
            // The simulated dirty logs keep every persisted mark.
            marks_lost: Vec::new(),
            activity_log: log.activity_log().extents,
            consistent: site.durable.consistent,
        };
        let role = site.role;
        if i == PRIMARY {
            self.check_restored_floors(g, &restored);
        }
        let (core, cmds) = Core::new(core_config(role), restored, self.now);
        let site = &mut self.g[g].sites[i];
        site.core = Some(core);
        site.log = Some(log);
        site.alive = true;
        site.inc += 1;
        site.recv_entries.clear();
        site.recv_pieces.clear();
        site.restart_asked = false;
        let inc = site.inc;
        self.note(format!(
            "g{g} site {i} started (inc {inc}, last lsn {last})"
        ));
        self.run_commands(g, i, cmds);
        let d = self.rng.between(50, 150) * MS;
        self.at(d, Ev::Tick { g, site: i, inc });
    }

    /// A restored drop floor is never below the one the stopped core decided by (both read
    /// against the persisted cursor, as the core reads them): a lower one would let a site that
    /// lost acknowledged entries off with a partial resync.
    fn check_restored_floors(&mut self, g: usize, restored: &Restored) {
        for l in 0..self.g[g].links.len() {
            let slink = l as u8 + 1;
            let Some(cursor) = restored
                .cursors
                .iter()
                .find(|(n, _)| *n == slink)
                .map(|c| c.1)
            else {
                continue;
            };
            let effective = |f: Option<u64>| f.unwrap_or(cursor).min(cursor);
            let truth = self.g[g].links[l].floor_at_stop;
            let back = restored
                .drop_floors
                .iter()
                .find(|(n, _)| *n == slink)
                .map(|f| f.1);
            if back.is_some() {
                *self
                    .stats
                    .core_events
                    .entry("drop-floor-restored")
                    .or_default() += 1;
            }
            if effective(back) < effective(truth) {
                self.fail(format!(
                    "g{g} slink {slink}: restored drop floor {back:?} is below the stopped core's {truth:?} \
                     (cursor {cursor})"
                ));
            }
        }
    }

    /// kill -9 (power: false) or power loss (true): the process state goes; with power, so do
    /// unsynced writes (each sector of each unsynced write kept or lost at random: torn writes).
    /// Unsynced writes of the member's replog and devices are lost (each sector kept or not).
    fn lose_power(&mut self, g: usize, i: usize) {
        let seed = self.rng.next_u64();
        let site = &mut self.g[g].sites[i];
        let img = site.log_disk.power_loss_image(seed);
        site.log_disk = MemDisk::from_image(img, 512);
        for d in site.devices.values_mut() {
            let img = d.power_loss_image(seed.rotate_left(7));
            *d = MemDisk::from_image(img, 512);
        }
    }

    /// kill -9 or power loss of site `i`: every group's member there goes down at once.
    fn crash(&mut self, i: usize, power: bool) {
        let members: Vec<usize> = (0..self.g.len())
            .filter(|g| self.g[*g].sites[i].alive)
            .collect();
        if members.is_empty() {
            return;
        }
        self.fault_count(if power { "power-loss" } else { "kill" });
        for &g in &members {
            // Where the crash hit (counted, so a run shows these cases happen).
            let (checkpoint, resync) =
                self.g[g].sites[i]
                    .core
                    .as_ref()
                    .map_or((false, false), |c| {
                        (
                            c.slinks().iter().any(|s| s.checkpoint_in_flight.is_some()),
                            c.slinks()
                                .iter()
                                .any(|s| s.resync_running && !s.dirty.is_clean())
                                || (i != PRIMARY && !c.consistent()),
                        )
                    });
            if checkpoint {
                self.fault_count("crash-mid-checkpoint");
            }
            if resync {
                self.fault_count("crash-mid-resync");
            }
            if self.g[g]
                .links
                .iter()
                .any(|l| l.connecting && (i == PRIMARY || l.site == i))
            {
                self.fault_count("crash-mid-handshake");
            }
        }
        let why = if power { "POWER LOSS" } else { "KILL -9" };
        let d = self.rng.between(50, 800) * MS;
        if power {
            // A member that is down (halted, restarting) loses its unsynced writes too.
            for g in 0..self.g.len() {
                if !self.g[g].sites[i].alive {
                    self.lose_power(g, i);
                }
            }
        }
        for g in members {
            self.stop_site(g, i, power, why, d);
        }
    }

    /// Faults that fired at site `i` so far (replog and devices).
    fn fired_total(&self, g: usize, i: usize) -> u64 {
        let site = &self.g[g].sites[i];
        [&site.log_faults, &site.dev_faults]
            .iter()
            .map(|f| faults::lock(f).fired.values().sum::<u64>())
            .sum()
    }

    /// The site's process ends (with the power when `power`), checked first; it starts again
    /// `restart_in` later (a crash, a halt the driver reopens, an operator restart).
    fn stop_site(&mut self, g: usize, i: usize, power: bool, why: &str, restart_in: Nanos) {
        if !self.g[g].sites[i].alive {
            return;
        }
        self.check_site(g, i, "before crash");
        self.note(format!("g{g} site {i} {why}"));
        if i == PRIMARY {
            self.g[g].apply_failed.clear();
            let grp = &mut self.g[g];
            for (l, link) in grp.links.iter_mut().enumerate() {
                link.floor_at_stop = grp.sites[PRIMARY]
                    .core
                    .as_ref()
                    .and_then(|c| c.slink(l as u8 + 1))
                    .and_then(|s| s.drop_floor);
            }
        }
        let site = &mut self.g[g].sites[i];
        site.alive = false;
        site.core = None;
        // Dropping a replog waits for submitted batches; the simulated disk has none in flight.
        site.log = None;
        if power {
            self.lose_power(g, i);
        }
        if i == PRIMARY {
            // The clients of a dead primary see their requests fail.
            self.g[g].pending.clear();
            self.g[g].flush_requests.clear();
        }
        for l in 0..self.g[g].links.len() {
            if i == PRIMARY || self.g[g].links[l].site == i {
                self.reset_link(g, l, "peer died");
            }
        }
        self.at(restart_in, Ev::Restart { g, site: i });
    }

    fn core_input(&mut self, g: usize, i: usize, input: Input) {
        if !self.g[g].sites[i].alive {
            return;
        }
        if self.opts.trace {
            self.note(format!("g{g} site {i} <- {input:?}"));
        }
        let mut out = Vec::new();
        let now = self.now;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(core) = self.g[g].sites[i].core.as_mut() {
                core.handle(now, input, &mut out);
            }
        }));
        if let Err(p) = result {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            self.fail(format!("g{g} site {i}: core assertion: {msg}"));
            return;
        }
        self.run_commands(g, i, out);
        self.operator_watch(g, i);
    }

    /// An operator restarts a site whose devices failed (the core keeps them failed until then).
    fn operator_watch(&mut self, g: usize, i: usize) {
        let site = &self.g[g].sites[i];
        let failed = site.core.as_ref().is_some_and(|c| c.slink0_failed());
        if !site.alive || !failed || site.restart_asked {
            return;
        }
        let inc = site.inc;
        self.g[g].sites[i].restart_asked = true;
        let d = self.rng.between(300, 1500) * MS;
        self.at(d, Ev::OperatorRestart { g, site: i, inc });
    }

    fn delay(&mut self, max_ms: u64) -> Nanos {
        self.rng.below(max_ms * MS + 1)
    }

    fn run_commands(&mut self, g: usize, i: usize, cmds: Vec<Command>) {
        for c in cmds {
            if self.failure.is_some() || !self.g[g].sites[i].alive {
                return;
            }
            if self.opts.trace {
                self.note(format!("g{g} site {i} -> {c:?}"));
            }
            self.run_command(g, i, c);
        }
    }

    fn run_command(&mut self, g: usize, i: usize, c: Command) {
        let inc = self.g[g].sites[i].inc;
        match c {
            Command::Append { lsn, id, .. } => {
                let (extent, data) = match id {
                    Some(id) => match self.g[g].pending.get(&id) {
                        Some(p) => (p.extent, p.data.clone()),
                        None => {
                            self.fail(format!("append of unknown request {id}"));
                            return;
                        }
                    },
                    None => match self.g[g].sites[i].recv_entries.get(&lsn) {
                        Some((e, d)) => (*e, d.clone()),
                        None => {
                            self.fail(format!("g{g} site {i}: append of lsn {lsn} never received"));
                            return;
                        }
                    },
                };
                let Some(log) = self.g[g].sites[i].log.as_ref() else {
                    return;
                };
                let rec = Record {
                    device: extent.device,
                    offset: extent.offset,
                    kind: EntryKind::Write,
                    len: extent.len,
                    data: &data,
                };
                let appended = log
                    .append_with_lsn(lsn, rec, replog::Durability::Written)
                    .and_then(|a| a.wait().map(|_| ()));
                let written = log.written_lsn();
                let full = matches!(appended, Err(replog::Error::Full { .. }));
                let full_note = (self.opts.trace && full).then(|| {
                    format!(
                        "g{g} site {i}: ring full: {:?}, cursor0 {:?}, first {} next {}",
                        log.space(),
                        log.cursor(0),
                        log.first_lsn(),
                        log.next_lsn()
                    )
                });
                if i == PRIMARY && !matches!(appended, Err(replog::Error::Full { .. })) {
                    // A failed append may still be on disk (a block device's failed write may
                    // or may not have happened): in the history until a restart's recovery
                    // says how far the replog goes.
                    self.g[g].history.truncate(lsn as usize - 1);
                    if self.g[g].history.len() as u64 != lsn - 1 {
                        self.fail(format!(
                            "primary lsn {lsn} after a history of {}",
                            self.g[g].history.len()
                        ));
                        return;
                    }
                    self.g[g].history.push(HistoryWrite {
                        device: extent.device,
                        offset: extent.offset,
                        data: data.clone(),
                    });
                }
                match appended {
                    Ok(()) => {
                        if i == PRIMARY {
                            if let Some(id) = id {
                                if let Some(p) = self.g[g].pending.get_mut(&id) {
                                    p.lsn = Some(lsn);
                                }
                            }
                        } else {
                            self.g[g].sites[i].recv_entries.remove(&lsn);
                        }
                        self.core_input(
                            g,
                            i,
                            Input::AppendResult {
                                lsn,
                                accepted: true,
                            },
                        );
                        let d = self.delay(2);
                        self.at(
                            d,
                            Ev::Input {
                                g,
                                site: i,
                                inc,
                                input: Input::LogWritten { upto: written },
                            },
                        );
                    }
                    Err(replog::Error::Full { .. }) => {
                        if let Some(note) = full_note {
                            self.note(note);
                        }
                        self.core_input(
                            g,
                            i,
                            Input::AppendResult {
                                lsn,
                                accepted: false,
                            },
                        );
                    }
                    Err(e) => self.log_failed(g, i, format!("append lsn {lsn}: {e}")),
                }
            }
            Command::FlushLog => {
                let Some(log) = self.g[g].sites[i].log.as_ref() else {
                    return;
                };
                match log.flush().wait() {
                    Ok(upto) => {
                        let d = self.delay(4);
                        self.at(
                            d,
                            Ev::Input {
                                g,
                                site: i,
                                inc,
                                input: Input::LogDurable { upto },
                            },
                        );
                    }
                    Err(e) => self.log_failed(g, i, format!("flush: {e}")),
                }
            }
            Command::Apply { lsn } => {
                let Some(log) = self.g[g].sites[i].log.as_ref() else {
                    return;
                };
                let result = match log.read(lsn) {
                    Ok(e) => match self.g[g].sites[i].device(e.device) {
                        Some(d) => write_device(&d, e.offset, &e.data),
                        None => Err(format!("no device {}", e.device)),
                    },
                    Err(e) => Err(format!("reading lsn {lsn} back: {e}")),
                };
                if result.is_err() && i == PRIMARY {
                    self.g[g].apply_failed.insert(lsn);
                }
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Input {
                        g,
                        site: i,
                        inc,
                        input: Input::Applied { lsn, result },
                    },
                );
            }
            Command::Ship { slink, after, upto } => {
                let l = usize::from(slink) - 1;
                let Some(log) = self.g[g].sites[i].log.as_ref() else {
                    return;
                };
                if upto > log.durable_lsn() {
                    let d = log.durable_lsn();
                    self.fail(format!(
                        "R1: ships up to lsn {upto}, the replog is durable to {d}"
                    ));
                    return;
                }
                let mut items = Vec::new();
                let mut from = after + 1;
                while from <= upto {
                    let batch = match log.read_from(from, 8, 1 << 20) {
                        Ok(b) => b,
                        Err(e) => {
                            // The driver's policy: the session ends, the site reports its
                            // position and gets everything after it again.
                            self.reset_link(g, l, &format!("ship: read lsn {from}: {e}"));
                            return;
                        }
                    };
                    let Some(last) = batch.last().map(|e| e.lsn) else {
                        break;
                    };
                    for e in batch {
                        if e.lsn > upto {
                            break;
                        }
                        items.push(Item::Entry {
                            lsn: e.lsn,
                            extent: Extent {
                                device: e.device,
                                offset: e.offset,
                                len: e.len,
                            },
                            data: e.data,
                        });
                    }
                    from = last + 1;
                }
                self.send_to_secondary(g, l, items);
            }
            Command::ResyncPiece { slink, piece } => {
                let l = usize::from(slink) - 1;
                let Some(dev) = self.g[g].sites[i].device(piece.device) else {
                    self.fail(format!("resync piece of unknown device {}", piece.device));
                    return;
                };
                let buf = replog::io::AlignedBuf::zeroed(piece.len as usize);
                let data = match dev.read_at(piece.offset, buf) {
                    Ok(b) => b.to_vec(),
                    Err(e) => {
                        // As for entries: the session ends, the piece is read again later.
                        self.reset_link(g, l, &format!("resync piece read: {e}"));
                        return;
                    }
                };
                self.send_to_secondary(
                    g,
                    l,
                    vec![Item::Piece {
                        seq: piece.seq,
                        extent: Extent {
                            device: piece.device,
                            offset: piece.offset,
                            len: piece.len,
                        },
                        data,
                    }],
                );
            }
            Command::ResyncComplete { slink, seq } => {
                self.send_to_secondary(g, usize::from(slink) - 1, vec![Item::Done { seq }]);
            }
            Command::Checkpoint {
                slink,
                lsn,
                sync_devices,
            } => {
                let mut result = Ok(());
                if sync_devices && slink == 0 {
                    result = self.g[g].sites[i].sync_devices();
                }
                if let Some(d) = self.g[g].sites[i].log.as_ref().map(|l| l.durable_lsn()) {
                    if lsn > d {
                        self.fail(format!(
                            "R2: checkpoint of slink {slink} at lsn {lsn}, the replog is durable to {d}"
                        ));
                        return;
                    }
                }
                if result.is_ok() {
                    if let Some(log) = self.g[g].sites[i].log.as_ref() {
                        if log.cursor(slink).is_some_and(|c| c < lsn) {
                            result = log.set_cursor(slink, lsn).map_err(|e| e.to_string());
                        }
                    }
                }
                let d = self.delay(5);
                self.at(
                    d,
                    Ev::Input {
                        g,
                        site: i,
                        inc,
                        input: Input::CheckpointDone { slink, lsn, result },
                    },
                );
            }
            Command::Reclaim => self.reclaim(g, i),
            Command::DropTo { slink, lsn } => {
                if let Some(log) = self.g[g].sites[i].log.as_ref() {
                    if log.cursor(slink).is_some_and(|c| c < lsn) {
                        if let Err(e) = log.set_cursor(slink, lsn) {
                            // The persisted cursor stays below the drop: the entries stay in
                            // the ring (their regions are dirty too), a later checkpoint moves it.
                            self.note(format!("g{g} site {i}: drop: cursor of slink {slink}: {e}"));
                        }
                    }
                }
                self.reclaim(g, i);
            }
            Command::MarkDirty {
                slink,
                token,
                extents,
            } => {
                let mut regions = Vec::new();
                for e in extents {
                    let first = e.offset / REGION_BYTES;
                    let last = (e.offset + e.len.max(1) - 1) / REGION_BYTES;
                    let size = DEVICES
                        .iter()
                        .find(|(d, _)| *d == e.device)
                        .map_or(0, |(_, s)| *s);
                    for r in first..=last.min(size.div_ceil(REGION_BYTES) - 1) {
                        regions.push((e.device, r));
                    }
                }
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Persist {
                        g,
                        site: i,
                        inc,
                        what: Persist::Dirty {
                            slink,
                            token,
                            regions,
                        },
                    },
                );
            }
            Command::ClearDirty {
                slink,
                device,
                region,
            } => {
                self.g[g].sites[i]
                    .durable
                    .dirty
                    .remove(&(slink, device, region));
            }
            Command::WriteActivityLog { token, extents } => {
                let Some(log) = self.g[g].sites[i].log.as_ref() else {
                    return;
                };
                let result = log.set_activity_log(&extents).map_err(|e| e.to_string());
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Input {
                        g,
                        site: i,
                        inc,
                        input: Input::ActivityLogWritten { token, result },
                    },
                );
            }
            Command::PersistResyncSeq { slink, reserved } => {
                let Some(log) = self.g[g].sites[i].log.as_ref() else {
                    return;
                };
                let result = log
                    .raise_resync_seq(slink, reserved)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Input {
                        g,
                        site: i,
                        inc,
                        input: Input::ResyncSeqPersisted {
                            slink,
                            reserved,
                            result,
                        },
                    },
                );
            }
            Command::PersistDropFloor { slink, floor } => {
                let Some(log) = self.g[g].sites[i].log.as_ref() else {
                    return;
                };
                let result = log.set_drop_floor(slink, floor).map_err(|e| e.to_string());
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Input {
                        g,
                        site: i,
                        inc,
                        input: Input::DropFloorPersisted {
                            slink,
                            floor,
                            result,
                        },
                    },
                );
            }
            Command::StorePiece { seq, extent } => {
                let data = self.g[g].sites[i]
                    .recv_pieces
                    .remove(&seq)
                    .unwrap_or_default();
                let result = match self.g[g].sites[i].device(extent.device) {
                    Some(d) => write_device(&d, extent.offset, &data)
                        .and_then(|_| d.sync_data().map_err(|e| e.to_string())),
                    None => Err(format!("no device {}", extent.device)),
                };
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Input {
                        g,
                        site: i,
                        inc,
                        input: Input::PieceStored { seq, result },
                    },
                );
            }
            Command::AckPrimary { pos } => {
                if let Some(l) = self.g[g].links.iter().position(|l| l.site == i) {
                    self.send_to_primary(g, l, pos);
                }
            }
            Command::PersistConsistency { consistent } => {
                if let Err(e) = self.g[g].sites[i].sync_devices() {
                    // The flag is not persisted: the devices failed (fail-stop until the
                    // operator restarts the site).
                    self.core_input(
                        g,
                        i,
                        Input::SiteFailed {
                            slink: 0,
                            reason: format!("device sync before the consistency flag: {e}"),
                        },
                    );
                    return;
                }
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Persist {
                        g,
                        site: i,
                        inc,
                        what: Persist::Consistency { consistent },
                    },
                );
            }
            Command::ResetLink { reason } => {
                if let Some(l) = self.g[g].links.iter().position(|l| l.site == i) {
                    self.reset_link(g, l, &reason);
                }
            }
            Command::Reply { id, result } => self.on_reply(g, i, id, result),
            Command::Event { kind, detail } => {
                *self.stats.core_events.entry(kind).or_default() += 1;
                self.note(format!("g{g} site {i} event {kind}: {detail}"));
            }
            Command::Stopped => {}
            Command::Halt { reason } => {
                // The driver reopens the group from its disks (page cache kept).
                let d = self.rng.between(20, 200) * MS;
                self.stop_site(g, i, false, &format!("HALT: {reason}"), d);
            }
        }
    }

    /// The replog refused a write or a sync: the core halts (the replog refuses everything now).
    fn log_failed(&mut self, g: usize, i: usize, reason: String) {
        self.core_input(g, i, Input::LogFailed { reason });
    }

    fn reclaim(&mut self, g: usize, i: usize) {
        let Some(log) = self.g[g].sites[i].log.as_ref() else {
            return;
        };
        if let Err(e) = log.reclaim() {
            // Nothing freed: the core sees the same free space and waits for a site or a tick.
            let note = format!("g{g} site {i}: reclaim: {e}");
            self.note(note);
        }
        let Some(log) = self.g[g].sites[i].log.as_ref() else {
            return;
        };
        let first = if log.first_lsn() == 0 {
            log.next_lsn()
        } else {
            log.first_lsn()
        };
        let free = log.space().free_bytes;
        let inc = self.g[g].sites[i].inc;
        self.at(
            0,
            Ev::Input {
                g,
                site: i,
                inc,
                input: Input::Reclaimed {
                    first_lsn: first,
                    free_bytes: free,
                },
            },
        );
    }

    fn on_reply(
        &mut self,
        g: usize,
        i: usize,
        id: u64,
        result: Result<(), replicator::core::Failure>,
    ) {
        if i != PRIMARY {
            self.fail(format!("g{g} site {i} replied to a client request"));
            return;
        }
        if let Some(before) = self.g[g].flush_requests.remove(&id) {
            if result.is_ok() {
                self.stats.flushes += 1;
                self.g[g].durable_promise = self.g[g].durable_promise.max(before);
            }
            return;
        }
        let Some(p) = self.g[g].pending.remove(&id) else {
            self.fail(format!("reply to unknown request {id}"));
            return;
        };
        match result {
            Ok(()) => {
                self.stats.writes_acked += 1;
                let Some(lsn) = p.lsn else {
                    self.fail(format!("request {id} acknowledged without an lsn"));
                    return;
                };
                if self.g[g].apply_failed.contains(&lsn) {
                    self.fail(format!(
                        "request {id} (lsn {lsn}) acknowledged, its device write failed"
                    ));
                    return;
                }
                // What is acknowledged is in the replog, with its data.
                // The checker's read must not take an armed fault.
                let faults = self.g[g].sites[PRIMARY].log_faults.clone();
                let armed = std::mem::take(&mut faults::lock(&faults).read);
                let logged = self.g[g].sites[PRIMARY]
                    .log
                    .as_ref()
                    .map(|l| l.read(lsn).map(|e| e.data));
                faults::lock(&faults).read = armed;
                if let Some(Ok(data)) = &logged {
                    if *data != p.data {
                        self.fail(format!(
                            "request {id} acknowledged, the replog holds other data at lsn {lsn}"
                        ));
                        return;
                    }
                }
                self.g[g].max_acked = self.g[g].max_acked.max(lsn);
                if p.fua {
                    self.g[g].durable_promise = self.g[g].durable_promise.max(lsn);
                }
                let waited = self.g[g].sites[PRIMARY]
                    .core
                    .as_ref()
                    .map(|c| c.waited_slinks())
                    .unwrap_or_default();
                if waited.contains(&1) {
                    self.g[g].sync_promise = self.g[g].sync_promise.max(lsn);
                }
            }
            Err(_) => self.stats.writes_failed += 1,
        }
    }

    // ---- links ----

    fn reset_link(&mut self, g: usize, l: usize, why: &str) {
        let link = &mut self.g[g].links[l];
        let was_up = link.up;
        let mid_handshake = link.connecting;
        link.up = false;
        link.session += 1;
        link.connecting = false;
        if mid_handshake {
            self.fault_count("cut-mid-handshake");
        }
        let slink = l as u8 + 1;
        if was_up {
            self.note(format!("g{g} link {slink} reset: {why}"));
            self.core_input(
                g,
                PRIMARY,
                Input::LinkDown {
                    slink,
                    reason: why.to_string(),
                },
            );
        }
        let d = self.rng.between(20, 400) * MS;
        self.at(d, Ev::Connect { g, link: l });
    }

    fn latency(&mut self) -> Nanos {
        // 1-20 ms one way, with a tail.
        let base = self.rng.between(1, 20) * MS;
        if self.rng.chance(20) {
            base + self.rng.between(50, 300) * MS
        } else {
            base
        }
    }

    fn send_to_secondary(&mut self, g: usize, l: usize, items: Vec<Item>) {
        if items.is_empty() || !self.g[g].links[l].up {
            return;
        }
        let lat = self.latency();
        let link = &mut self.g[g].links[l];
        let at = (self.now + lat).max(link.last_to_secondary);
        link.last_to_secondary = at;
        let session = link.session;
        self.at(
            at - self.now,
            Ev::ToSecondary {
                g,
                link: l,
                session,
                items,
            },
        );
    }

    fn send_to_primary(&mut self, g: usize, l: usize, pos: Position) {
        if !self.g[g].links[l].up {
            return;
        }
        let lat = self.latency();
        let link = &mut self.g[g].links[l];
        let at = (self.now + lat).max(link.last_to_primary);
        link.last_to_primary = at;
        let session = link.session;
        self.at(
            at - self.now,
            Ev::ToPrimary {
                g,
                link: l,
                session,
                pos,
            },
        );
    }

    fn connect(&mut self, g: usize, l: usize) {
        let s = self.g[g].links[l].site;
        let link = &self.g[g].links[l];
        if link.up || link.connecting {
            return;
        }
        if self.now < self.partitioned_until[l]
            || !self.g[g].sites[PRIMARY].alive
            || !self.g[g].sites[s].alive
        {
            let d = self.rng.between(50, 300) * MS;
            self.at(d, Ev::Connect { g, link: l });
            return;
        }
        // The handshake takes a round trip; a reset, partition or crash in between ends it
        // (its session's messages are dropped) and the primary connects again.
        let link = &mut self.g[g].links[l];
        link.connecting = true;
        link.session += 1;
        let session = link.session;
        let lat = self.latency();
        self.at(
            lat,
            Ev::Hello {
                g,
                link: l,
                session,
            },
        );
    }

    fn on_hello(&mut self, g: usize, l: usize, session: u64) {
        let link = &self.g[g].links[l];
        if !link.connecting || link.session != session {
            return;
        }
        let s = link.site;
        // The site reports its durable position when the hello arrives, not when it was sent.
        let peer = self.g[g].sites[s]
            .core
            .as_ref()
            .map(|c| c.secondary_position())
            .unwrap_or_default();
        let lat = self.latency();
        self.at(
            lat,
            Ev::HelloReply {
                g,
                link: l,
                session,
                peer,
            },
        );
    }

    fn on_hello_reply(&mut self, g: usize, l: usize, session: u64, peer: Position) {
        let link = &mut self.g[g].links[l];
        if !link.connecting || link.session != session {
            return;
        }
        link.connecting = false;
        link.up = true;
        link.last_to_primary = self.now;
        link.last_to_secondary = self.now;
        let slink = l as u8 + 1;
        self.note(format!("g{g} link {slink} up, site reports {peer:?}"));
        if let Some(floor) = self.g[g].links[l].floor_at_stop.take() {
            // What the restarted core repairs from (its own drops since the restart count).
            let now_floor = self.g[g].sites[PRIMARY]
                .core
                .as_ref()
                .and_then(|c| c.slink(slink))
                .map_or(0, |s| s.drop_floor.unwrap_or(s.cursor).min(s.cursor));
            if peer.lsn < now_floor && peer.lsn >= floor.min(now_floor) {
                *self
                    .stats
                    .core_events
                    .entry("resync-full-for-a-forgotten-drop-floor")
                    .or_default() += 1;
            }
        }
        self.core_input(g, PRIMARY, Input::LinkUp { slink, peer });
    }

    // ---- workload and faults ----

    fn workload(&mut self, g: usize) {
        if self.g[g].writes_issued >= self.opts.writes {
            return;
        }
        let d = self.rng.between(0, 4) * MS;
        self.at(d, Ev::Workload { g });
        if !self.g[g].sites[PRIMARY].alive || self.g[g].pending.len() >= WRITES_IN_FLIGHT_MAX {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if self.rng.chance(40) {
            let grp = &mut self.g[g];
            grp.flush_requests.insert(id, grp.max_acked);
            self.core_input(g, PRIMARY, Input::Flush { id });
            return;
        }
        self.g[g].writes_issued += 1;
        let (device, size) = DEVICES[self.rng.below(DEVICES.len() as u64) as usize];
        let sectors = self.rng.between(1, 8);
        let len = sectors * SECTOR;
        let offset = self.rng.below((size - len) / SECTOR + 1) * SECTOR;
        let fill = (id % 251) as u8 + 1;
        let mut data = vec![fill; len as usize];
        // A stamp per sector so a misplaced sector never compares equal by luck.
        for (k, chunk) in data.chunks_mut(SECTOR as usize).enumerate() {
            chunk[..8].copy_from_slice(&id.to_le_bytes());
            chunk[8] = k as u8;
        }
        let fua = self.rng.chance(50);
        let extent = Extent {
            device,
            offset,
            len,
        };
        self.g[g].pending.insert(
            id,
            Pending {
                extent,
                data,
                fua,
                lsn: None,
            },
        );
        self.core_input(g, PRIMARY, Input::Write { id, extent, fua });
    }

    fn fault(&mut self) {
        if self.now >= self.faults_until {
            return;
        }
        let d = self.rng.between(20, 200) * MS;
        self.at(d, Ev::Fault);
        let r = self.rng.below(1000);
        // The group a fault of one group's connection or storage hits.
        let g = self.rng.below(self.g.len() as u64) as usize;
        match r {
            0..=59 => {
                let l = self.rng.below(2) as usize;
                self.fault_count("link-reset");
                self.reset_link(g, l, "injected reset");
            }
            60..=89 => {
                // The network to a site: every group's connection to it.
                let l = self.rng.below(2) as usize;
                let len = self.rng.between(100, 4000) * MS;
                self.fault_count("partition");
                self.partitioned_until[l] = self.now + len;
                for g in 0..self.g.len() {
                    self.reset_link(g, l, "partition");
                }
            }
            90..=109 => {
                let s = self.rng.below(3) as usize;
                self.crash(s, false);
            }
            110..=124 => {
                let s = self.rng.below(3) as usize;
                self.crash(s, true);
            }
            125..=164 => {
                // One I/O error on the next read, write or sync of a site's replog or devices
                // (counted when it fires).
                let s = self.rng.below(3) as usize;
                let op = [Op::Read, Op::Write, Op::Sync][self.rng.below(3) as usize];
                let f = if r < 145 {
                    &self.g[g].sites[s].log_faults
                } else {
                    &self.g[g].sites[s].dev_faults
                };
                faults::lock(f).arm(op);
            }
            165..=174 => {
                // A full disk for a while: every write fails with ENOSPC.
                let s = self.rng.below(3) as usize;
                let disk = if self.rng.chance(500) {
                    Disk::Log
                } else {
                    Disk::Device
                };
                self.fault_count(match disk {
                    Disk::Log => "log-disk-full",
                    Disk::Device => "device-disk-full",
                });
                let len = self.rng.between(50, 1500) * MS;
                // The site's file system: every group's replogs (or devices) there.
                for g in 0..self.g.len() {
                    let site = &self.g[g].sites[s];
                    let f = match disk {
                        Disk::Log => &site.log_faults,
                        Disk::Device => &site.dev_faults,
                    };
                    faults::lock(f).full = true;
                    self.at(len, Ev::SpaceFreed { g, site: s, disk });
                }
            }
            175..=184 => {
                // The primary's next dirty log persist fails.
                self.g[g].sites[PRIMARY].dirty_fault = true;
            }
            _ => {}
        }
    }

    // ---- checks ----

    /// The promises about site `i`'s durable state, from a crash image and a power-loss image.
    fn check_site(&mut self, g: usize, i: usize, when: &str) {
        self.stats.checks += 1;
        if i == PRIMARY {
            self.check_primary(g, when);
            return;
        }
        let power_seed = self.rng.next_u64();
        for power in [None, Some(power_seed)] {
            let site = &self.g[g].sites[i];
            let log_img = check::images(&site.log_disk, power);
            let devs: BTreeMap<u32, Vec<u8>> = site
                .devices
                .iter()
                .map(|(d, disk)| (*d, check::images(disk, power.map(|s| s.rotate_left(7)))))
                .collect();
            let consistent = site.durable.consistent;
            let (last, images) = match check::recovered_images(log_img, &devs) {
                Ok(v) => v,
                Err(e) => {
                    self.fail(format!("g{g} site {i} {when}: {e}"));
                    return;
                }
            };
            let kind = if power.is_some() {
                "power loss"
            } else {
                "crash"
            };
            if i == SECONDARIES[0] && last < self.g[g].sync_promise {
                // Only a promise while the site was waited for: it may have been dropped since
                // (out of date), but what it acknowledged durably stays in its replog.
                let gap = self.g[g].sites[i].durable.consistent;
                if gap {
                    self.fail(format!(
                        "sync site after a {kind} {when}: its replog ends at lsn {last}, lsn {} was acknowledged while it was waited for",
                        self.g[g].sync_promise
                    ));
                    return;
                }
            }
            if !consistent {
                continue;
            }
            if last as usize > self.g[g].history.len() {
                self.fail(format!(
                    "site {i} after a {kind} {when}: has lsn {last}, the primary's history ends at {}",
                    self.g[g].history.len()
                ));
                return;
            }
            let mut diff = None;
            for base in self.g[g].bases.iter().filter(|b| b.lsn <= last) {
                let expected = check::replay(&self.g[g].history, base, last);
                match check::first_difference(&images, &expected) {
                    None => {
                        diff = None;
                        break;
                    }
                    Some(d) => {
                        diff.get_or_insert(format!("(from lsn {}) {d}", base.lsn));
                    }
                }
            }
            if let Some(diff) = diff {
                self.fail(format!(
                    "site {i} after a {kind} {when}: not a prefix up to lsn {last}: {diff}"
                ));
                return;
            }
        }
    }

    /// After a kill -9 (the page cache survives) the primary's recovery replays its replog above
    /// slink 0's cursor: its devices are then its history up to the recovered lsn. (After a power
    /// loss its devices may also hold sectors of lost, unflushed writes inside the activity log's
    /// extents; those are what the sites are repaired from, see `check::Base`.)
    fn check_primary(&mut self, g: usize, when: &str) {
        let site = &self.g[g].sites[PRIMARY];
        let devs: BTreeMap<u32, Vec<u8>> = site
            .devices
            .iter()
            .map(|(d, disk)| (*d, disk.current_image()))
            .collect();
        let (last, images) = match check::recovered_images(site.log_disk.current_image(), &devs) {
            Ok(v) => v,
            Err(e) => {
                self.fail(format!("primary {when}: {e}"));
                return;
            }
        };
        let Some(base) = self.g[g].bases.last() else {
            return;
        };
        let expected = check::replay(&self.g[g].history, base, last);
        if let Some(diff) = check::first_difference(&images, &expected) {
            self.fail(format!(
                "primary after a crash {when}: not its history up to lsn {last}: {diff}"
            ));
        }
    }

    /// Every group converged (the first that did not, and why).
    fn converged(&self) -> Result<(), String> {
        for g in 0..self.g.len() {
            self.converged_group(g)
                .map_err(|e| format!("group {g}: {e}"))?;
        }
        Ok(())
    }

    fn converged_group(&self, g: usize) -> Result<(), String> {
        let Some(p) = self.g[g].sites[PRIMARY].core.as_ref() else {
            return Err("primary down".into());
        };
        if p.writes_in_flight() > 0 || !self.g[g].pending.is_empty() {
            return Err(format!("{} writes in flight", self.g[g].pending.len()));
        }
        // A site whose devices failed has not converged: it waits for the operator's restart
        // (the simulation's operator always comes; a device that never recovers is not injected).
        for (i, site) in self.g[g].sites.iter().enumerate() {
            if site.core.as_ref().is_some_and(|c| c.slink0_failed()) {
                return Err(format!(
                    "site {i}: devices failed, operator restart pending"
                ));
            }
        }
        if p.applied0() < p.written_lsn() {
            return Err(format!(
                "primary applied {} of {}",
                p.applied0(),
                p.written_lsn()
            ));
        }
        for (k, s) in SECONDARIES.iter().enumerate() {
            let slink = k as u8 + 1;
            let lag = p.lag(slink);
            let sl = p.slink(slink).ok_or("no slink")?;
            if lag.ios > 0 || !sl.dirty.is_clean() {
                return Err(format!(
                    "slink {slink}: lag {} ios, {} dirty bytes, state {:?}",
                    lag.ios,
                    sl.dirty.dirty_bytes(),
                    sl.state()
                ));
            }
            let c = self.g[g].sites[*s].core.as_ref().ok_or("secondary down")?;
            if !c.consistent() {
                return Err(format!(
                    "site {s} not consistent (primary's slink {slink}: resync running {}, marker {:?}, shipped {}, resync high {}, applied0 {}, state {:?})",
                    sl.resync_running,
                    sl.complete_in_flight,
                    sl.shipped,
                    sl.resync_high,
                    p.applied0(),
                    sl.state()
                ));
            }
            if c.applied0() < p.written_lsn() {
                return Err(format!(
                    "site {s} applied {} of {}",
                    c.applied0(),
                    p.written_lsn()
                ));
            }
        }
        Ok(())
    }

    fn final_check(&mut self, g: usize) {
        let primary: BTreeMap<u32, Vec<u8>> = self.g[g].sites[PRIMARY]
            .devices
            .iter()
            .map(|(d, disk)| (*d, disk.current_image()))
            .collect();
        for s in SECONDARIES {
            self.check_site(g, s, "at the end");
            let theirs: BTreeMap<u32, Vec<u8>> = self.g[g].sites[s]
                .devices
                .iter()
                .map(|(d, disk)| (*d, disk.current_image()))
                .collect();
            if let Some(diff) = check::first_difference(&theirs, &primary) {
                self.fail(format!(
                    "converged, but site {s} differs from the primary: {diff}"
                ));
                return;
            }
        }
        // The primary's own devices are the replay of its history since its last restart.
        let Some(base) = self.g[g].bases.last() else {
            return;
        };
        let expected = check::replay(&self.g[g].history, base, self.g[g].history.len() as u64);
        let actual: BTreeMap<u32, Vec<u8>> = self.g[g].sites[PRIMARY]
            .devices
            .iter()
            .map(|(d, disk)| (*d, disk.current_image()))
            .collect();
        if let Some(diff) = check::first_difference(&actual, &expected) {
            self.fail(format!("the primary's devices are not its history: {diff}"));
        }
    }

    // ---- the loop ----

    fn main_loop(&mut self) {
        let mut converge_deadline: Option<Nanos> = None;
        while let Some(q) = self.queue.pop() {
            if self.failure.is_some() {
                break;
            }
            self.now = q.at;
            self.stats.events += 1;
            if self.stats.events > EVENTS_MAX {
                let cores: Vec<String> = self
                    .g
                    .iter()
                    .flat_map(|g| g.sites.iter())
                    .map(|s| s.core.as_ref().map_or("down".into(), |c| c.summary()))
                    .collect();
                self.fail(format!(
                    "livelock: {EVENTS_MAX} events without an end\n  {}",
                    cores.join("\n  ")
                ));
                break;
            }
            self.step(q.ev);
            if self.stats.events.is_multiple_of(97) {
                let k = self.stats.events / 97;
                let s = (k % 3) as usize;
                let g = (k / 3 % self.g.len() as u64) as usize;
                if self.g[g].sites[s].alive {
                    self.check_site(g, s, "mid-run");
                }
            }
            if self.now > self.faults_until + 2 * CONVERGE_WITHIN {
                let why = self.converged().err().unwrap_or_default();
                self.fail(format!(
                    "no progress: {} of {} writes issued {} s after faults stopped: {why}",
                    self.g.iter().map(|g| g.writes_issued).min().unwrap_or(0),
                    self.opts.writes,
                    2 * CONVERGE_WITHIN / NS_PER_SEC
                ));
                break;
            }
            let quiet = self.g.iter().all(|g| g.writes_issued >= self.opts.writes)
                && self.now >= self.faults_until;
            if quiet {
                let deadline = *converge_deadline.get_or_insert_with(|| self.now + CONVERGE_WITHIN);
                // Heal: no partition, armed storage fault or full disk outlives the faults.
                self.partitioned_until = [0; 2];
                for site in self.g.iter_mut().flat_map(|g| g.sites.iter_mut()) {
                    faults::lock(&site.log_faults).disarm();
                    faults::lock(&site.dev_faults).disarm();
                    site.dirty_fault = false;
                }
                if self.converged().is_ok() {
                    for g in 0..self.g.len() {
                        self.final_check(g);
                    }
                    break;
                }
                if self.now > deadline {
                    let why = self.converged().err().unwrap_or_default();
                    self.fail(format!(
                        "no convergence within {} s after faults stopped: {why}",
                        CONVERGE_WITHIN / NS_PER_SEC
                    ));
                    break;
                }
            }
        }
        self.stats.sim_ns = self.now;
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Input {
                g,
                site,
                inc,
                input,
            } => {
                if self.g[g].sites[site].alive && self.g[g].sites[site].inc == inc {
                    self.core_input(g, site, input);
                }
            }
            Ev::Persist { g, site, inc, what } => {
                if !self.g[g].sites[site].alive || self.g[g].sites[site].inc != inc {
                    return;
                }
                let input = {
                    match what {
                        Persist::Dirty {
                            slink,
                            token,
                            regions,
                        } => {
                            if std::mem::take(&mut self.g[g].sites[site].dirty_fault) {
                                *self
                                    .stats
                                    .faults
                                    .entry("dirty-log-write-error")
                                    .or_default() += 1;
                                Input::DirtyPersisted {
                                    token,
                                    result: Err("injected dirty log write error".into()),
                                }
                            } else {
                                let d = &mut self.g[g].sites[site].durable;
                                for (dev, r) in regions {
                                    d.dirty.insert((slink, dev, r));
                                }
                                Input::DirtyPersisted {
                                    token,
                                    result: Ok(()),
                                }
                            }
                        }
                        Persist::Consistency { consistent } => {
                            let d = &mut self.g[g].sites[site].durable;
                            d.consistent = consistent;
                            Input::ConsistencyPersisted { consistent }
                        }
                    }
                };
                self.core_input(g, site, input);
            }
            Ev::ToSecondary {
                g,
                link,
                session,
                items,
            } => {
                let l = &self.g[g].links[link];
                if !l.up || l.session != session {
                    return;
                }
                let s = l.site;
                let mut received = Vec::new();
                for it in items {
                    match it {
                        Item::Entry { lsn, extent, data } => {
                            self.g[g].sites[s].recv_entries.insert(lsn, (extent, data));
                            received.push(Received::Entry { lsn, extent });
                        }
                        Item::Piece { seq, extent, data } => {
                            self.g[g].sites[s].recv_pieces.insert(seq, data);
                            received.push(Received::Piece { seq, extent });
                        }
                        Item::Done { seq } => received.push(Received::Done { seq }),
                    }
                }
                self.core_input(g, s, Input::Received { items: received });
            }
            Ev::ToPrimary {
                g,
                link,
                session,
                pos,
            } => {
                let l = &self.g[g].links[link];
                if !l.up || l.session != session {
                    return;
                }
                self.core_input(
                    g,
                    PRIMARY,
                    Input::SiteAck {
                        slink: link as u8 + 1,
                        pos,
                    },
                );
            }
            Ev::Connect { g, link } => self.connect(g, link),
            Ev::Hello { g, link, session } => self.on_hello(g, link, session),
            Ev::HelloReply {
                g,
                link,
                session,
                peer,
            } => self.on_hello_reply(g, link, session, peer),
            Ev::Restart { g, site } => {
                if !self.g[g].sites[site].alive {
                    self.start_site(g, site);
                }
            }
            Ev::OperatorRestart { g, site, inc } => {
                if self.g[g].sites[site].alive && self.g[g].sites[site].inc == inc {
                    *self
                        .stats
                        .core_events
                        .entry("operator-restart")
                        .or_default() += 1;
                    let d = self.rng.between(20, 200) * MS;
                    self.stop_site(g, site, false, "OPERATOR RESTART (device failed)", d);
                }
            }
            Ev::SpaceFreed { g, site, disk } => {
                let site = &self.g[g].sites[site];
                let f = match disk {
                    Disk::Log => &site.log_faults,
                    Disk::Device => &site.dev_faults,
                };
                faults::lock(f).full = false;
            }
            Ev::Tick { g, site, inc } => {
                if self.g[g].sites[site].alive && self.g[g].sites[site].inc == inc {
                    self.core_input(g, site, Input::Tick);
                    self.at(100 * MS, Ev::Tick { g, site, inc });
                }
            }
            Ev::Workload { g } => self.workload(g),
            Ev::Fault => self.fault(),
        }
    }
}

fn write_device(d: &Arc<FaultyDisk>, offset: u64, data: &[u8]) -> Result<(), String> {
    let buf = replog::io::AlignedBuf::from_slice(data);
    d.write_at(offset, buf)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
