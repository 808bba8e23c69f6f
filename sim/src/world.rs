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
use crate::rng::Rng;

const MS: Nanos = 1_000_000;
const DEVICES: [(u32, u64); 2] = [(0, 64 << 10), (1, 32 << 10)];
const REGION_BYTES: u64 = 4096;
const RING_BYTES: u64 = 128 << 10;
const REPLOG_BYTES: u64 = 8192 + RING_BYTES;
const SECTOR: u64 = 512;
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
    Input { site: usize, inc: u64, input: Input },
    /// A completion that persists something in the site's modelled durable state first.
    Persist { site: usize, inc: u64, what: Persist },
    ToSecondary { link: usize, session: u64, items: Vec<Item> },
    ToPrimary { link: usize, session: u64, pos: Position },
    Connect { link: usize },
    Restart { site: usize },
    Tick { site: usize, inc: u64 },
    Workload,
    Fault,
}

#[derive(Clone, Debug)]
enum Persist {
    Dirty {
        slink: u8,
        token: u64,
        regions: Vec<(u32, u64)>,
    },
    Activity {
        token: u64,
        extents: Vec<(u32, u64)>,
    },
    ResyncSeq {
        slink: u8,
        reserved: u64,
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

/// What survives a crash besides the disks: the modelled persisted sets.
#[derive(Clone, Debug, Default)]
struct Durable {
    dirty: BTreeSet<(u8, u32, u64)>,
    activity: Vec<(u32, u64)>,
    resync_seq: BTreeMap<u8, u64>,
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
}

struct Link {
    /// Secondary site index; the primary's slink number is the same.
    site: usize,
    up: bool,
    session: u64,
    partitioned_until: Nanos,
    /// Delivery time of the last message of this session each way (TCP keeps order).
    last_to_secondary: Nanos,
    last_to_primary: Nanos,
    connecting: bool,
}

struct Pending {
    extent: Extent,
    data: Vec<u8>,
    fua: bool,
    lsn: Option<u64>,
}

struct World {
    opts: Options,
    rng: Rng,
    now: Nanos,
    seq: u64,
    queue: BinaryHeap<Queued>,
    sites: Vec<Site>,
    links: Vec<Link>,
    stats: Stats,
    /// The primary's history by lsn (index lsn - 1), truncated when a primary restart recovers
    /// fewer entries (a power loss took unflushed ones; no site ever got them).
    history: Vec<HistoryWrite>,
    /// Where histories start: zeros, and the primary's devices after each restart's recovery.
    bases: Vec<check::Base>,
    next_id: u64,
    pending: BTreeMap<u64, Pending>,
    flush_requests: BTreeMap<u64, u64>,
    /// Highest lsn whose durability a completed FLUSH or FUA promised.
    durable_promise: u64,
    /// Highest lsn acknowledged while the sync site (slink 1) was waited for.
    sync_promise: u64,
    max_acked: u64,
    writes_issued: u64,
    faults_until: Nanos,
    trace: VecDeque<String>,
    failure: Option<String>,
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
        activity_extent_bytes: 8192,
        activity_extents_max: 4,
    }
}

pub fn run(opts: Options) -> Outcome {
    let mut w = World::new(opts);
    w.main_loop();
    Outcome {
        stats: w.stats.clone(),
        failure: w.failure.take(),
    }
}

impl World {
    fn new(opts: Options) -> World {
        let mut rng = Rng::new(opts.seed);
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
            });
        }
        let links = SECONDARIES
            .iter()
            .map(|s| Link {
                site: *s,
                up: false,
                session: 0,
                partitioned_until: 0,
                last_to_secondary: 0,
                last_to_primary: 0,
                connecting: false,
            })
            .collect();
        let faults_until = if opts.faults {
            rng.between(5, 20) * NS_PER_SEC
        } else {
            0
        };
        let mut w = World {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            sites,
            links,
            stats: Stats::default(),
            history: Vec::new(),
            bases: vec![check::zero_base(&DEVICES)],
            next_id: 1,
            pending: BTreeMap::new(),
            flush_requests: BTreeMap::new(),
            durable_promise: 0,
            sync_promise: 0,
            max_acked: 0,
            writes_issued: 0,
            faults_until,
            trace: VecDeque::new(),
            failure: None,
            opts,
        };
        for i in 0..3 {
            let replog = Replog::create_on(w.sites[i].log_disk.clone(), 0, REPLOG_BYTES);
            match replog {
                Ok(log) => {
                    for nr in 0..if i == PRIMARY { 3 } else { 1 } {
                        if let Err(e) = log.register_slink(nr, 0) {
                            w.fail(format!("register slink {nr}: {e}"));
                        }
                    }
                    drop(log);
                }
                Err(e) => w.fail(format!("replog create: {e}")),
            }
            w.start_site(i);
        }
        for l in 0..w.links.len() {
            w.at(MS, Ev::Connect { link: l });
        }
        w.at(MS, Ev::Workload);
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

    fn start_site(&mut self, i: usize) {
        let disk = self.sites[i].log_disk.clone();
        let (log, _report) = match Replog::open_on(disk, 0) {
            Ok(v) => v,
            Err(e) => {
                self.fail(format!("site {i}: replog does not open after restart: {e}"));
                return;
            }
        };
        let last = log.next_lsn() - 1;
        if i == PRIMARY {
            if last < self.durable_promise {
                self.fail(format!(
                    "primary restart: the replog ends at lsn {last}, below lsn {} that a FLUSH/FUA made durable",
                    self.durable_promise
                ));
            }
            // Entries above `last` were lost with the power: no site has them (R1).
            self.history.truncate(last as usize);
            self.max_acked = self.max_acked.min(last);
            let devs: BTreeMap<u32, Vec<u8>> = self.sites[PRIMARY]
                .devices
                .iter()
                .map(|(d, disk)| (*d, disk.current_image()))
                .collect();
            match check::recovered_images(self.sites[PRIMARY].log_disk.current_image(), &devs) {
                Ok((lsn, images)) => {
                    self.bases.retain(|b| b.lsn <= lsn);
                    self.bases.push(check::Base { lsn, images });
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
        let site = &self.sites[i];
        let nrs: Vec<u8> = if i == PRIMARY { vec![0, 1, 2] } else { vec![0] };
        let restored = Restored {
            last_lsn: last,
            retained,
            cursors: nrs
                .iter()
                .filter_map(|n| log.cursor(*n).map(|c| (*n, c)))
                .collect(),
            dirty: site.durable.dirty.iter().copied().collect(),
            resync_seq: site
                .durable
                .resync_seq
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect(),
            activity_log: site.durable.activity.clone(),
            consistent: site.durable.consistent,
        };
        let (core, cmds) = Core::new(core_config(site.role), restored, self.now);
        let site = &mut self.sites[i];
        site.core = Some(core);
        site.log = Some(log);
        site.alive = true;
        site.inc += 1;
        site.recv_entries.clear();
        site.recv_pieces.clear();
        let inc = site.inc;
        self.note(format!("site {i} started (inc {inc}, last lsn {last})"));
        self.run_commands(i, cmds);
        let d = self.rng.between(50, 150) * MS;
        self.at(d, Ev::Tick { site: i, inc });
    }

    /// kill -9 (power: false) or power loss (true): the process state goes; with power, so do
    /// unsynced writes (each sector of each unsynced write kept or lost at random: torn writes).
    fn crash(&mut self, i: usize, power: bool) {
        if !self.sites[i].alive {
            return;
        }
        self.check_site(i, "before crash");
        self.fault_count(if power { "power-loss" } else { "kill" });
        self.note(format!("site {i} {}", if power { "POWER LOSS" } else { "KILL -9" }));
        let site = &mut self.sites[i];
        site.alive = false;
        site.core = None;
        // Dropping a replog waits for submitted batches; the simulated disk has none in flight.
        site.log = None;
        if power {
            let seed = self.rng.next_u64();
            let img = site.log_disk.power_loss_image(seed);
            site.log_disk = MemDisk::from_image(img, 512);
            for d in site.devices.values_mut() {
                let img = d.power_loss_image(seed.rotate_left(7));
                *d = MemDisk::from_image(img, 512);
            }
        }
        if i == PRIMARY {
            // The clients of a dead primary see their requests fail.
            self.pending.clear();
            self.flush_requests.clear();
        }
        for l in 0..self.links.len() {
            if i == PRIMARY || self.links[l].site == i {
                self.reset_link(l, "peer died");
            }
        }
        let d = self.rng.between(50, 800) * MS;
        self.at(d, Ev::Restart { site: i });
    }

    fn core_input(&mut self, i: usize, input: Input) {
        if !self.sites[i].alive {
            return;
        }
        if self.opts.trace {
            self.note(format!("site {i} <- {input:?}"));
        }
        let mut out = Vec::new();
        let now = self.now;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Some(core) = self.sites[i].core.as_mut() {
                core.handle(now, input, &mut out);
            }
        }));
        if let Err(p) = result {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            self.fail(format!("site {i}: core assertion: {msg}"));
            return;
        }
        self.run_commands(i, out);
    }

    fn delay(&mut self, max_ms: u64) -> Nanos {
        self.rng.below(max_ms * MS + 1)
    }

    fn run_commands(&mut self, i: usize, cmds: Vec<Command>) {
        for c in cmds {
            if self.failure.is_some() || !self.sites[i].alive {
                return;
            }
            if self.opts.trace {
                self.note(format!("site {i} -> {c:?}"));
            }
            self.run_command(i, c);
        }
    }

    fn run_command(&mut self, i: usize, c: Command) {
        let inc = self.sites[i].inc;
        match c {
            Command::Append { lsn, id, .. } => {
                let (extent, data) = match id {
                    Some(id) => match self.pending.get(&id) {
                        Some(p) => (p.extent, p.data.clone()),
                        None => {
                            self.fail(format!("append of unknown request {id}"));
                            return;
                        }
                    },
                    None => match self.sites[i].recv_entries.get(&lsn) {
                        Some((e, d)) => (*e, d.clone()),
                        None => {
                            self.fail(format!("site {i}: append of lsn {lsn} never received"));
                            return;
                        }
                    },
                };
                let Some(log) = self.sites[i].log.as_ref() else {
                    return;
                };
                let rec = Record {
                    device: extent.device,
                    offset: extent.offset,
                    kind: EntryKind::Write,
                    len: extent.len,
                    data: &data,
                };
                match log.append_with_lsn(lsn, rec, replog::Durability::Written) {
                    Ok(appending) => {
                        if let Err(e) = appending.wait() {
                            self.fail(format!("site {i}: append lsn {lsn}: {e}"));
                            return;
                        }
                        let written = log.written_lsn();
                        if i == PRIMARY {
                            if let Some(id) = id {
                                if let Some(p) = self.pending.get_mut(&id) {
                                    p.lsn = Some(lsn);
                                }
                            }
                            self.history.truncate(lsn as usize - 1);
                            if self.history.len() as u64 != lsn - 1 {
                                self.fail(format!(
                                    "primary lsn {lsn} after a history of {}",
                                    self.history.len()
                                ));
                                return;
                            }
                            self.history.push(HistoryWrite {
                                device: extent.device,
                                offset: extent.offset,
                                data,
                            });
                        } else {
                            self.sites[i].recv_entries.remove(&lsn);
                        }
                        self.core_input(
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
                                site: i,
                                inc,
                                input: Input::LogWritten { upto: written },
                            },
                        );
                    }
                    Err(replog::Error::Full { .. }) => {
                        if self.opts.trace {
                            let sp = log.space();
                            let note = format!(
                                "site {i}: ring full: {sp:?}, cursor0 {:?}, first {} next {}",
                                log.cursor(0),
                                log.first_lsn(),
                                log.next_lsn()
                            );
                            self.note(note);
                        }
                        self.core_input(
                            i,
                            Input::AppendResult {
                                lsn,
                                accepted: false,
                            },
                        );
                    }
                    Err(e) => self.fail(format!("site {i}: append lsn {lsn}: {e}")),
                }
            }
            Command::FlushLog => {
                let Some(log) = self.sites[i].log.as_ref() else {
                    return;
                };
                match log.flush().wait() {
                    Ok(upto) => {
                        let d = self.delay(4);
                        self.at(
                            d,
                            Ev::Input {
                                site: i,
                                inc,
                                input: Input::LogDurable { upto },
                            },
                        );
                    }
                    Err(e) => self.fail(format!("site {i}: flush: {e}")),
                }
            }
            Command::Apply { lsn } => {
                let Some(log) = self.sites[i].log.as_ref() else {
                    return;
                };
                let e = match log.read(lsn) {
                    Ok(e) => e,
                    Err(e) => {
                        self.fail(format!("site {i}: apply reads lsn {lsn}: {e}"));
                        return;
                    }
                };
                let dev = self.sites[i].devices.get(&e.device).cloned();
                let result = match dev {
                    Some(d) => write_device(&d, e.offset, &e.data),
                    None => Err(format!("no device {}", e.device)),
                };
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Input {
                        site: i,
                        inc,
                        input: Input::Applied { lsn, result },
                    },
                );
            }
            Command::Ship { slink, after, upto } => {
                let l = usize::from(slink) - 1;
                let Some(log) = self.sites[i].log.as_ref() else {
                    return;
                };
                let mut items = Vec::new();
                let mut from = after + 1;
                while from <= upto {
                    let batch = match log.read_from(from, 8, 1 << 20) {
                        Ok(b) => b,
                        Err(e) => {
                            self.fail(format!("ship: read lsn {from}: {e}"));
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
                self.send_to_secondary(l, items);
            }
            Command::ResyncPiece { slink, piece } => {
                let l = usize::from(slink) - 1;
                let dev = self.sites[i].devices.get(&piece.device).cloned();
                let Some(dev) = dev else {
                    self.fail(format!("resync piece of unknown device {}", piece.device));
                    return;
                };
                let img = dev.current_image();
                let (s, e) = (piece.offset as usize, (piece.offset + piece.len) as usize);
                let data = img.get(s..e).map(|d| d.to_vec()).unwrap_or_default();
                self.send_to_secondary(
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
                self.send_to_secondary(usize::from(slink) - 1, vec![Item::Done { seq }]);
            }
            Command::Checkpoint {
                slink,
                lsn,
                sync_devices,
            } => {
                let mut result = Ok(());
                if sync_devices && slink == 0 {
                    for d in self.sites[i].devices.values() {
                        if let Err(e) = d.sync_data() {
                            result = Err(e.to_string());
                        }
                    }
                }
                if result.is_ok() {
                    if let Some(log) = self.sites[i].log.as_ref() {
                        if log.cursor(slink).is_some_and(|c| c < lsn) {
                            result = log.set_cursor(slink, lsn).map_err(|e| e.to_string());
                        }
                    }
                }
                let d = self.delay(5);
                self.at(
                    d,
                    Ev::Input {
                        site: i,
                        inc,
                        input: Input::CheckpointDone { slink, lsn, result },
                    },
                );
            }
            Command::Reclaim => self.reclaim(i),
            Command::DropTo { slink, lsn } => {
                if let Some(log) = self.sites[i].log.as_ref() {
                    if log.cursor(slink).is_some_and(|c| c < lsn) {
                        if let Err(e) = log.set_cursor(slink, lsn) {
                            self.fail(format!("drop: cursor of slink {slink} to {lsn}: {e}"));
                            return;
                        }
                    }
                }
                self.reclaim(i);
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
                self.sites[i].durable.dirty.remove(&(slink, device, region));
            }
            Command::WriteActivityLog { token, extents } => {
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Persist {
                        site: i,
                        inc,
                        what: Persist::Activity { token, extents },
                    },
                );
            }
            Command::PersistResyncSeq { slink, reserved } => {
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Persist {
                        site: i,
                        inc,
                        what: Persist::ResyncSeq { slink, reserved },
                    },
                );
            }
            Command::StorePiece { seq, extent } => {
                let data = self.sites[i].recv_pieces.remove(&seq).unwrap_or_default();
                let dev = self.sites[i].devices.get(&extent.device).cloned();
                let result = match dev {
                    Some(d) => write_device(&d, extent.offset, &data)
                        .and_then(|_| d.sync_data().map_err(|e| e.to_string())),
                    None => Err(format!("no device {}", extent.device)),
                };
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Input {
                        site: i,
                        inc,
                        input: Input::PieceStored { seq, result },
                    },
                );
            }
            Command::AckPrimary { pos } => {
                if let Some(l) = self.links.iter().position(|l| l.site == i) {
                    self.send_to_primary(l, pos);
                }
            }
            Command::PersistConsistency { consistent } => {
                let synced: Result<Vec<()>, _> = self.sites[i]
                    .devices
                    .values()
                    .map(|d| d.sync_data())
                    .collect();
                if let Err(e) = synced {
                    self.fail(format!("site {i}: device sync: {e}"));
                }
                let d = self.delay(3);
                self.at(
                    d,
                    Ev::Persist {
                        site: i,
                        inc,
                        what: Persist::Consistency { consistent },
                    },
                );
            }
            Command::ResetLink { reason } => {
                if let Some(l) = self.links.iter().position(|l| l.site == i) {
                    self.reset_link(l, &reason);
                }
            }
            Command::Reply { id, result } => self.on_reply(i, id, result),
            Command::Event { kind, detail } => {
                *self.stats.core_events.entry(kind).or_default() += 1;
                self.note(format!("site {i} event {kind}: {detail}"));
            }
            Command::Stopped => {}
        }
    }

    fn reclaim(&mut self, i: usize) {
        let Some(log) = self.sites[i].log.as_ref() else {
            return;
        };
        if let Err(e) = log.reclaim() {
            self.fail(format!("site {i}: reclaim: {e}"));
            return;
        }
        let first = if log.first_lsn() == 0 {
            log.next_lsn()
        } else {
            log.first_lsn()
        };
        let free = log.space().free_bytes;
        let inc = self.sites[i].inc;
        self.at(
            0,
            Ev::Input {
                site: i,
                inc,
                input: Input::Reclaimed {
                    first_lsn: first,
                    free_bytes: free,
                },
            },
        );
    }

    fn on_reply(&mut self, i: usize, id: u64, result: Result<(), replicator::core::Failure>) {
        if i != PRIMARY {
            self.fail(format!("site {i} replied to a client request"));
            return;
        }
        if let Some(before) = self.flush_requests.remove(&id) {
            if result.is_ok() {
                self.stats.flushes += 1;
                self.durable_promise = self.durable_promise.max(before);
            }
            return;
        }
        let Some(p) = self.pending.remove(&id) else {
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
                self.max_acked = self.max_acked.max(lsn);
                if p.fua {
                    self.durable_promise = self.durable_promise.max(lsn);
                }
                let waited = self.sites[PRIMARY]
                    .core
                    .as_ref()
                    .map(|c| c.waited_slinks())
                    .unwrap_or_default();
                if waited.contains(&1) {
                    self.sync_promise = self.sync_promise.max(lsn);
                }
            }
            Err(_) => self.stats.writes_failed += 1,
        }
    }

    // ---- links ----

    fn reset_link(&mut self, l: usize, why: &str) {
        let link = &mut self.links[l];
        let was_up = link.up;
        link.up = false;
        link.session += 1;
        link.connecting = false;
        let slink = l as u8 + 1;
        if was_up {
            self.note(format!("link {slink} reset: {why}"));
            self.core_input(
                PRIMARY,
                Input::LinkDown {
                    slink,
                    reason: why.to_string(),
                },
            );
        }
        let d = self.rng.between(20, 400) * MS;
        self.at(d, Ev::Connect { link: l });
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

    fn send_to_secondary(&mut self, l: usize, items: Vec<Item>) {
        if items.is_empty() || !self.links[l].up {
            return;
        }
        let lat = self.latency();
        let link = &mut self.links[l];
        let at = (self.now + lat).max(link.last_to_secondary);
        link.last_to_secondary = at;
        let session = link.session;
        self.at(
            at - self.now,
            Ev::ToSecondary {
                link: l,
                session,
                items,
            },
        );
    }

    fn send_to_primary(&mut self, l: usize, pos: Position) {
        if !self.links[l].up {
            return;
        }
        let lat = self.latency();
        let link = &mut self.links[l];
        let at = (self.now + lat).max(link.last_to_primary);
        link.last_to_primary = at;
        let session = link.session;
        self.at(at - self.now, Ev::ToPrimary { link: l, session, pos });
    }

    fn connect(&mut self, l: usize) {
        let s = self.links[l].site;
        let link = &self.links[l];
        if link.up {
            return;
        }
        if self.now < link.partitioned_until || !self.sites[PRIMARY].alive || !self.sites[s].alive
        {
            let d = self.rng.between(50, 300) * MS;
            self.at(d, Ev::Connect { link: l });
            return;
        }
        let peer = self.sites[s]
            .core
            .as_ref()
            .map(|c| c.secondary_position())
            .unwrap_or_default();
        let link = &mut self.links[l];
        link.up = true;
        link.session += 1;
        link.last_to_primary = self.now;
        link.last_to_secondary = self.now;
        let slink = l as u8 + 1;
        self.note(format!("link {slink} up, site reports {peer:?}"));
        self.core_input(PRIMARY, Input::LinkUp { slink, peer });
    }

    // ---- workload and faults ----

    fn workload(&mut self) {
        if self.writes_issued >= self.opts.writes {
            return;
        }
        let d = self.rng.between(0, 4) * MS;
        self.at(d, Ev::Workload);
        if !self.sites[PRIMARY].alive || self.pending.len() >= WRITES_IN_FLIGHT_MAX {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if self.rng.chance(40) {
            self.flush_requests.insert(id, self.max_acked);
            self.core_input(PRIMARY, Input::Flush { id });
            return;
        }
        self.writes_issued += 1;
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
        self.pending.insert(
            id,
            Pending {
                extent,
                data,
                fua,
                lsn: None,
            },
        );
        self.core_input(PRIMARY, Input::Write { id, extent, fua });
    }

    fn fault(&mut self) {
        if self.now >= self.faults_until {
            return;
        }
        let d = self.rng.between(20, 200) * MS;
        self.at(d, Ev::Fault);
        let r = self.rng.below(1000);
        match r {
            0..=59 => {
                let l = self.rng.below(2) as usize;
                self.fault_count("link-reset");
                self.reset_link(l, "injected reset");
            }
            60..=89 => {
                let l = self.rng.below(2) as usize;
                let len = self.rng.between(100, 4000) * MS;
                self.fault_count("partition");
                self.links[l].partitioned_until = self.now + len;
                self.reset_link(l, "partition");
            }
            90..=109 => {
                let s = self.rng.below(3) as usize;
                self.crash(s, false);
            }
            110..=124 => {
                let s = self.rng.below(3) as usize;
                self.crash(s, true);
            }
            _ => {}
        }
    }

    // ---- checks ----

    /// The promises about site `i`'s durable state, from a crash image and a power-loss image.
    fn check_site(&mut self, i: usize, when: &str) {
        self.stats.checks += 1;
        if i == PRIMARY {
            return;
        }
        let power_seed = self.rng.next_u64();
        for power in [None, Some(power_seed)] {
            let site = &self.sites[i];
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
                    self.fail(format!("site {i} {when}: {e}"));
                    return;
                }
            };
            let kind = if power.is_some() { "power loss" } else { "crash" };
            if i == SECONDARIES[0] && last < self.sync_promise {
                // Only a promise while the site was waited for: it may have been dropped since
                // (out of date), but what it acknowledged durably stays in its replog.
                let gap = self.sites[i].durable.consistent;
                if gap {
                    self.fail(format!(
                        "sync site after a {kind} {when}: its replog ends at lsn {last}, lsn {} was acknowledged while it was waited for",
                        self.sync_promise
                    ));
                    return;
                }
            }
            if !consistent {
                continue;
            }
            if last as usize > self.history.len() {
                self.fail(format!(
                    "site {i} after a {kind} {when}: has lsn {last}, the primary's history ends at {}",
                    self.history.len()
                ));
                return;
            }
            let mut diff = None;
            for base in self.bases.iter().filter(|b| b.lsn <= last) {
                let expected = check::replay(&self.history, base, last);
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

    fn converged(&self) -> Result<(), String> {
        let Some(p) = self.sites[PRIMARY].core.as_ref() else {
            return Err("primary down".into());
        };
        if p.writes_in_flight() > 0 || !self.pending.is_empty() {
            return Err(format!("{} writes in flight", self.pending.len()));
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
            let c = self.sites[*s].core.as_ref().ok_or("secondary down")?;
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

    fn final_check(&mut self) {
        let primary: BTreeMap<u32, Vec<u8>> = self.sites[PRIMARY]
            .devices
            .iter()
            .map(|(d, disk)| (*d, disk.current_image()))
            .collect();
        for s in SECONDARIES {
            self.check_site(s, "at the end");
            let theirs: BTreeMap<u32, Vec<u8>> = self.sites[s]
                .devices
                .iter()
                .map(|(d, disk)| (*d, disk.current_image()))
                .collect();
            if let Some(diff) = check::first_difference(&theirs, &primary) {
                self.fail(format!("converged, but site {s} differs from the primary: {diff}"));
                return;
            }
        }
        // The primary's own devices are the replay of its history since its last restart.
        let Some(base) = self.bases.last() else {
            return;
        };
        let expected = check::replay(&self.history, base, self.history.len() as u64);
        let actual: BTreeMap<u32, Vec<u8>> = self.sites[PRIMARY]
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
                    .sites
                    .iter()
                    .map(|s| s.core.as_ref().map_or("down".into(), |c| c.summary()))
                    .collect();
                self.fail(format!(
                    "livelock: {EVENTS_MAX} events without an end\n  {}",
                    cores.join("\n  ")
                ));
                break;
            }
            self.step(q.ev);
            if self.stats.events % 97 == 0 {
                let s = SECONDARIES[(self.stats.events / 97 % 2) as usize];
                if self.sites[s].alive {
                    self.check_site(s, "mid-run");
                }
            }
            if self.now > self.faults_until + 2 * CONVERGE_WITHIN {
                let why = self.converged().err().unwrap_or_default();
                self.fail(format!(
                    "no progress: {} of {} writes issued {} s after faults stopped: {why}",
                    self.writes_issued,
                    self.opts.writes,
                    2 * CONVERGE_WITHIN / NS_PER_SEC
                ));
                break;
            }
            let quiet = self.writes_issued >= self.opts.writes && self.now >= self.faults_until;
            if quiet {
                let deadline = *converge_deadline.get_or_insert_with(|| self.now + CONVERGE_WITHIN);
                // Heal: no partition outlives the faults.
                for l in &mut self.links {
                    l.partitioned_until = 0;
                }
                if self.converged().is_ok() {
                    self.final_check();
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
            Ev::Input { site, inc, input } => {
                if self.sites[site].alive && self.sites[site].inc == inc {
                    self.core_input(site, input);
                }
            }
            Ev::Persist { site, inc, what } => {
                if !self.sites[site].alive || self.sites[site].inc != inc {
                    return;
                }
                let input = {
                    let d = &mut self.sites[site].durable;
                    match what {
                        Persist::Dirty {
                            slink,
                            token,
                            regions,
                        } => {
                            for (dev, r) in regions {
                                d.dirty.insert((slink, dev, r));
                            }
                            Input::DirtyPersisted {
                                token,
                                result: Ok(()),
                            }
                        }
                        Persist::Activity { token, extents } => {
                            d.activity = extents;
                            Input::ActivityLogWritten {
                                token,
                                result: Ok(()),
                            }
                        }
                        Persist::ResyncSeq { slink, reserved } => {
                            let e = d.resync_seq.entry(slink).or_default();
                            *e = (*e).max(reserved);
                            Input::ResyncSeqPersisted {
                                slink,
                                reserved,
                                result: Ok(()),
                            }
                        }
                        Persist::Consistency { consistent } => {
                            d.consistent = consistent;
                            Input::ConsistencyPersisted { consistent }
                        }
                    }
                };
                self.core_input(site, input);
            }
            Ev::ToSecondary {
                link,
                session,
                items,
            } => {
                let l = &self.links[link];
                if !l.up || l.session != session {
                    return;
                }
                let s = l.site;
                let mut received = Vec::new();
                for it in items {
                    match it {
                        Item::Entry { lsn, extent, data } => {
                            self.sites[s].recv_entries.insert(lsn, (extent, data));
                            received.push(Received::Entry { lsn, extent });
                        }
                        Item::Piece { seq, extent, data } => {
                            self.sites[s].recv_pieces.insert(seq, data);
                            received.push(Received::Piece { seq, extent });
                        }
                        Item::Done { seq } => received.push(Received::Done { seq }),
                    }
                }
                self.core_input(s, Input::Received { items: received });
            }
            Ev::ToPrimary { link, session, pos } => {
                let l = &self.links[link];
                if !l.up || l.session != session {
                    return;
                }
                self.core_input(
                    PRIMARY,
                    Input::SiteAck {
                        slink: link as u8 + 1,
                        pos,
                    },
                );
            }
            Ev::Connect { link } => self.connect(link),
            Ev::Restart { site } => {
                if !self.sites[site].alive {
                    self.start_site(site);
                }
            }
            Ev::Tick { site, inc } => {
                if self.sites[site].alive && self.sites[site].inc == inc {
                    self.core_input(site, Input::Tick);
                    self.at(100 * MS, Ev::Tick { site, inc });
                }
            }
            Ev::Workload => self.workload(),
            Ev::Fault => self.fault(),
        }
    }
}

fn write_device(d: &Arc<MemDisk>, offset: u64, data: &[u8]) -> Result<(), String> {
    let buf = replog::io::AlignedBuf::from_slice(data);
    d.write_at(offset, buf).map(|_| ()).map_err(|e| e.to_string())
}
