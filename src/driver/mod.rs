//! The production driver of the group core ([`crate::core::Core`]): real files, real threads.
//!
//! The core decides; this module carries its commands out and reports their completions back as
//! inputs. It is the production twin of the simulation's driver (`sim/src/world.rs`): both run
//! the same core on the same replog code, so what the simulation tries is what runs here.
//!
//! # Threads and waits
//! - The core sits behind one mutex. Whoever has an input (an NBD task with a write, a worker
//!   with a completion, the ticker) takes the lock, hands the input to the core and carries out
//!   the resulting commands that cost no I/O at once (`Append` into the replog's open batch,
//!   `Reply`, `Event`); every command that does I/O goes to a worker thread's queue. No blocking
//!   I/O runs under the lock or on the async runtime.
//! - Workers (one job each, see [`workers`]): `log-written` waits for appends to be written,
//!   `log-flush` makes the replog durable, `apply-N` write entries to slink 0's devices (the
//!   core's overlap rule decides what may run in parallel), one `site-N` per local slink applies
//!   shipped entries and resync pieces to that site's devices, `persist` carries out cursor,
//!   dirty-log and reclaim work in order, `meta` writes the activity log, resync
//!   reservations and drop floors, `tick` gives the core the time every [`TICK`]; a secondary
//!   also has `secondary-store` (resync pieces and the consistency flag, [`secondary`]).
//! - Every wait is a wake-up: a worker blocks on its queue, a client on its reply channel.
//!
//! # Bounds
//! Worker queues hold commands for work the core has in flight; the core bounds that work by the
//! writes in flight (the NBD front end's request limit) and the ring. The entry cache
//! ([`DriverConfig::entry_cache_bytes`]) holds entry data for slink 0 and the sites; an entry
//! evicted from it is read back from the replog (the one read-back path).
//!
//! - A `tcp` slink ships through [`tcp`]: its link on a thread of its own, a `tcp-N` worker for
//!   its events and reads.
//!
//! # Scope of this slice
//! A primary whose slinks are `local` (slink 0 and local sites, with or without dirty logs) or
//! `tcp` ([`tcp`]), and a secondary (its replog says so; slink 0 only) fed by a slink listener
//! through [`GroupDriver::durable_position`] and [`GroupDriver::store`] (see [`secondary`]).

mod open;
mod secondary;
mod tcp;
mod workers;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod secondary_tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use replog::{EntryKind, Record, Replog};

use crate::core::{Command, Core, Extent, Failure, Input, Lsn, RequestId};
use crate::engine::blockfile::BlockFile;
use crate::engine::queue::MemEntry;

pub use crate::engine::slink::LinkView;
pub(crate) use open::dirty_log_keeps_marks;
pub use open::{DriverConfig, EventSink, OpenError};
pub use secondary::STORE_CALL_BYTES_MAX;
use workers::{Queues, SiteWork, StoreWork};

/// How often the core is told the time (fallbehind timeouts, checkpoint interval, batched
/// flushes for async sites).
pub const TICK: Duration = Duration::from_millis(2);

/// A client request the core has not answered yet.
struct Request {
    reply: tokio::sync::oneshot::Sender<Result<(), Failure>>,
    /// The write's bytes until its entry is appended.
    write: Option<(EntryKind, Vec<u8>)>,
}

/// What sits behind the lock: the core and what the driver keeps per request and per entry.
struct State {
    core: Core,
    requests: HashMap<RequestId, Request>,
    next_id: RequestId,
    /// Entry data by lsn, for slink 0's applies and the sites' shipping.
    entries: BTreeMap<Lsn, Arc<MemEntry>>,
    entry_bytes: usize,
    stopped: bool,
    /// Set while a worker's input runs: the first `Apply` is kept for that worker.
    keep_one_apply: bool,
    kept_apply: Option<Arc<MemEntry>>,
    /// Secondary: received data until the core takes it, the waiting store.
    inbound: secondary::Inbound,
}

/// One local site (slink > 0): its devices and dirty logs.
pub(crate) struct LocalSite {
    pub devices: BTreeMap<u32, Arc<BlockFile>>,
}

pub(crate) struct Shared {
    state: Mutex<State>,
    stopped: Condvar,
    pub replog: Arc<Replog>,
    pub name: String,
    clock: Instant,
    pub slink0: BTreeMap<u32, Arc<BlockFile>>,
    pub sites: BTreeMap<u8, LocalSite>,
    /// Dirty logs by (slink, device).
    pub dirty: BTreeMap<(u8, u32), Mutex<replog::dirtylog::DirtyLog>>,
    /// The `tcp` sites (slink > 0), by slink.
    tcp: BTreeMap<u8, Arc<tcp::TcpSite>>,
    queues: Queues,
    entry_cache_bytes: usize,
    events: Option<EventSink>,
}

/// A running group on the core.
pub struct GroupDriver {
    shared: Arc<Shared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The links of the `tcp` slinks (dropped before the workers end: they feed them).
    links: Mutex<Vec<tcp::TcpLink>>,
}

/// A broken invariant or a poisoned lock: stop rather than go on with wrong data.
pub(crate) fn stop_the_process(what: &str) -> ! {
    tracing::error!("{what}");
    eprintln!("replicator: {what}");
    std::process::abort()
}

impl GroupDriver {
    /// Write `data` (or zeroes/discard `len` bytes) at `offset` of `device`. Resolves once the
    /// core's promises for it hold (in the replog, on slink 0, at every site waited for; durable
    /// with `fua`).
    pub async fn write(
        &self,
        device: u32,
        offset: u64,
        kind: EntryKind,
        len: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), Failure> {
        let rx = self
            .shared
            .submit_write(device, offset, kind, len, data, fua);
        rx.await
            .unwrap_or_else(|_| Err(Failure::Io("the group stopped".into())))
    }

    /// Blocking twin of [`GroupDriver::write`] (tests, tools; never on the async runtime).
    pub fn write_blocking(
        &self,
        device: u32,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), Failure> {
        let len = data.len() as u64;
        let rx = self
            .shared
            .submit_write(device, offset, EntryKind::Write, len, data, fua);
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(Failure::Io("the group stopped".into())))
    }

    /// Every write acknowledged before this becomes durable.
    pub async fn flush(&self) -> Result<(), Failure> {
        let rx = self.shared.submit_flush();
        rx.await
            .unwrap_or_else(|_| Err(Failure::Io("the group stopped".into())))
    }

    pub fn flush_blocking(&self) -> Result<(), Failure> {
        let rx = self.shared.submit_flush();
        rx.blocking_recv()
            .unwrap_or_else(|_| Err(Failure::Io("the group stopped".into())))
    }

    /// Read from slink 0's device. Acknowledged writes are on it (the core replies only after
    /// slink 0 applied the entry).
    pub fn read(&self, device: u32, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self.shared.slink0.get(&device) {
            Some(f) => f.read_at(offset, buf),
            None => Err(std::io::Error::other(format!("no device {device}"))),
        }
    }

    /// Pause or resume a site (it gets nothing while paused; its misses go to its dirty log).
    pub fn pause(&self, slink: u8, paused: bool) {
        self.shared.input(Input::Pause { slink, paused });
    }

    /// Copy every region to a site again.
    pub fn resync_all(&self, slink: u8) {
        self.shared.input(Input::ResyncAll { slink });
    }

    /// The core's positions in one line (status, logs).
    pub fn summary(&self) -> String {
        self.shared.lock().core.summary()
    }

    /// The group's replog (status: space, positions, identity).
    pub fn replog(&self) -> &Arc<Replog> {
        &self.shared.replog
    }

    /// Blocks until the core stopped: `true` when it halted (the group must be opened again),
    /// `false` after a shutdown.
    pub fn wait_stopped(&self) -> bool {
        let mut st = self.shared.lock();
        while !st.stopped {
            st = self
                .shared
                .stopped
                .wait(st)
                .unwrap_or_else(|_| stop_the_process("driver state lock poisoned"));
        }
        st.core.is_halted()
    }

    /// Tests: the replog "failed" (as an append or flush error would report): the core halts.
    #[cfg(test)]
    pub(crate) fn fail_log_for_test(&self, reason: &str) {
        self.shared.input(Input::LogFailed {
            reason: reason.to_string(),
        });
    }

    /// Whether the core halted (the group must be opened again).
    pub fn is_halted(&self) -> bool {
        self.shared.lock().core.is_halted()
    }

    /// Operator: every slink checkpoints now.
    pub fn checkpoint_now(&self) {
        self.shared.input(Input::CheckpointNow);
    }

    /// Operator: copy one device to a site again.
    pub fn resync_device(&self, slink: u8, device: u32) {
        self.shared.input(Input::ResyncDevice { slink, device });
    }

    /// Run `f` on the core (status queries).
    pub fn with_core<T>(&self, f: impl FnOnce(&Core) -> T) -> T {
        f(&self.shared.lock().core)
    }

    /// The link of a `tcp` slink as status shows it (None for another slink).
    pub fn link(&self, slink: u8) -> Option<LinkView> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.iter().find(|l| l.nr == slink).map(|l| l.view())
    }

    /// Drain, checkpoint, empty the activity log, stop the workers.
    pub fn shutdown(&self) {
        self.shared.input(Input::Shutdown);
        self.wait_stopped();
        // The links say goodbye while the workers still take their last events.
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(|e| e.into_inner()));
        for mut l in links {
            l.stop();
        }
        self.shared.close_workers();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for GroupDriver {
    fn drop(&mut self) {
        // Workers hold the shared state: close their queues so they end.
        self.shared.close_workers();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(_) => stop_the_process(&format!(
                "group {}: the core's lock is poisoned (a thread panicked holding it)",
                self.name
            )),
        }
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    fn close_workers(&self) {
        self.queues.close();
        for site in self.tcp.values() {
            site.close();
        }
    }

    fn submit_write(
        &self,
        device: u32,
        offset: u64,
        kind: EntryKind,
        len: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> tokio::sync::oneshot::Receiver<Result<(), Failure>> {
        let extent = Extent {
            device,
            offset,
            len,
        };
        self.submit(Some((kind, data)), |id| Input::Write { id, extent, fua })
    }

    fn submit_flush(&self) -> tokio::sync::oneshot::Receiver<Result<(), Failure>> {
        self.submit(None, |id| Input::Flush { id })
    }

    /// Register a client request (with a write's bytes) and hand it to the core.
    fn submit(
        &self,
        write: Option<(EntryKind, Vec<u8>)>,
        input: impl FnOnce(RequestId) -> Input,
    ) -> tokio::sync::oneshot::Receiver<Result<(), Failure>> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.requests.insert(id, Request { reply, write });
        self.run(&mut st, input(id));
        rx
    }

    /// A worker hands an input to the core and carries out what it decides. The first entry
    /// the core asks to apply, the worker writes itself once the lock is released (a hand-off to
    /// an apply thread and back is most of a low queue depth write's time); the others go to the
    /// apply threads.
    pub(crate) fn input(&self, input: Input) {
        let mut kept = self.input_keeping_apply(input);
        while let Some(e) = kept.take() {
            kept = self.apply_kept(&e);
        }
    }

    /// [`Shared::input`] without the apply: the first entry the core asks to apply is returned
    /// for the caller to write ([`Shared::apply_kept`]) or hand on ([`Shared::hand_to_apply`]).
    pub(crate) fn input_keeping_apply(&self, input: Input) -> Option<Arc<MemEntry>> {
        let mut st = self.lock();
        st.keep_one_apply = true;
        self.run(&mut st, input);
        st.keep_one_apply = false;
        st.kept_apply.take()
    }

    /// Write a kept entry to slink 0 here and report it; returns the next entry kept.
    pub(crate) fn apply_kept(&self, e: &MemEntry) -> Option<Arc<MemEntry>> {
        let result = workers::apply_to_slink0(self, e);
        self.input_keeping_apply(Input::Applied { lsn: e.lsn, result })
    }

    /// A kept entry the caller has no time for goes to the apply threads.
    pub(crate) fn hand_to_apply(&self, e: Arc<MemEntry>) {
        self.queues.apply(e);
    }

    fn run(&self, st: &mut State, first: Input) {
        let mut inputs = VecDeque::from([first]);
        let mut out = Vec::new();
        while let Some(input) = inputs.pop_front() {
            let now = self.now();
            st.core.handle(now, input, &mut out);
            for c in out.drain(..) {
                // An append's result goes in before any other input (the core's contract).
                if let Some(result) = self.execute(st, c) {
                    inputs.push_front(result);
                }
            }
        }
        self.trim_cache(st);
    }

    /// Carry out one command: at once when it costs no I/O, else on a worker's queue. Returns the
    /// input an `Append` reports at once.
    fn execute(&self, st: &mut State, c: Command) -> Option<Input> {
        match c {
            Command::Append { lsn, id, .. } => return Some(self.append(st, lsn, id)),
            Command::FlushLog => self.queues.flush(),
            Command::Apply { lsn } => {
                let entry = self.entry(st, lsn);
                if st.keep_one_apply && st.kept_apply.is_none() {
                    st.kept_apply = Some(entry);
                } else {
                    self.queues.apply(entry);
                }
            }
            Command::Ship { slink, after, upto } => match self.tcp.get(&slink) {
                Some(site) => site.ship(after, upto, &st.entries),
                None => {
                    let cached: Vec<Arc<MemEntry>> = st
                        .entries
                        .range(after + 1..=upto)
                        .map(|(_, e)| e.clone())
                        .collect();
                    self.queues.site(
                        slink,
                        SiteWork::Entries {
                            after,
                            upto,
                            cached,
                        },
                    );
                }
            },
            Command::ResyncPiece { slink, piece } => match self.tcp.get(&slink) {
                Some(site) => site.piece(piece),
                None => self.queues.site(slink, SiteWork::Piece(piece)),
            },
            Command::ResyncComplete { slink, seq } => match self.tcp.get(&slink) {
                Some(site) => site.complete(seq),
                None => self.queues.site(slink, SiteWork::Complete { seq }),
            },
            Command::Checkpoint {
                slink,
                lsn,
                sync_devices,
            } => self.queues.store(StoreWork::Checkpoint {
                slink,
                lsn,
                sync_devices,
            }),
            Command::MarkDirty {
                slink,
                token,
                extents,
            } => self.queues.store(StoreWork::MarkDirty {
                slink,
                token,
                extents,
            }),
            Command::ClearDirty {
                slink,
                device,
                region,
            } => self.queues.store(StoreWork::ClearDirty {
                slink,
                device,
                region,
            }),
            Command::DropTo { slink, lsn } => self.queues.store(StoreWork::DropTo { slink, lsn }),
            Command::Reclaim => self.queues.store(StoreWork::Reclaim),
            Command::WriteActivityLog { token, extents } => self
                .queues
                .meta(workers::MetaWork::ActivityLog { token, extents }),
            Command::PersistResyncSeq { slink, reserved } => self
                .queues
                .meta(workers::MetaWork::ResyncSeq { slink, reserved }),
            Command::PersistDropFloor { slink, floor } => self
                .queues
                .meta(workers::MetaWork::DropFloor { slink, floor }),
            Command::Reply { id, result } => {
                if let Some(r) = st.requests.remove(&id) {
                    // A client that went away no longer waits: nothing to tell it.
                    let _ = r.reply.send(result);
                }
            }
            Command::Event { kind, detail } => match &self.events {
                Some(sink) => (sink.0)(kind, detail),
                None => tracing::info!(group = %self.name, event = kind, "{detail}"),
            },
            // The replog (or a store the core cannot do without) failed: every waiting request
            // got EIO. The group is reopened from its disks by whoever owns the driver (a new
            // `GroupDriver::open`: the recovery of a kill -9).
            Command::Halt { reason } => {
                tracing::error!(group = %self.name, "group halted: {reason}");
                st.inbound.end(format!("group halted: {reason}"));
                st.stopped = true;
                self.stopped.notify_all();
            }
            Command::Stopped => {
                st.inbound.end("the group stopped".into());
                st.stopped = true;
                self.stopped.notify_all();
            }
            Command::StorePiece { seq, extent } => self.store_piece(st, seq, extent),
            Command::AckPrimary { pos } => st.inbound.acked(pos),
            Command::PersistConsistency { consistent } => self
                .queues
                .secondary(secondary::SecondaryWork::PersistConsistency { consistent }),
            Command::ResetLink { reason } => {
                tracing::warn!(group = %self.name, "link to the primary reset: {reason}");
                st.inbound.reset(format!("link reset: {reason}"));
            }
        }
        None
    }

    /// `Append`: the entry's bytes (a client request's on a primary, a received entry's on a
    /// secondary) go into the replog's open batch with the core's lsn.
    fn append(&self, st: &mut State, lsn: Lsn, id: Option<RequestId>) -> Input {
        let Some(extent) = st.core.retained_extent(lsn) else {
            stop_the_process(&format!(
                "group {}: append of lsn {lsn} the core does not retain",
                self.name
            ));
        };
        let bytes = match id {
            Some(id) => st
                .requests
                .get_mut(&id)
                .and_then(|r| r.write.take())
                .map(|(kind, data)| (kind, data, crate::engine::group::now_ns())),
            None => st.inbound.take_entry(lsn),
        };
        let Some((kind, data, timestamp_ns)) = bytes else {
            stop_the_process(&format!(
                "group {}: append of lsn {lsn} (request {id:?}) that has no bytes",
                self.name
            ));
        };
        let rec = Record {
            device: extent.device,
            offset: extent.offset,
            kind,
            len: extent.len,
            data: &data,
        };
        // Durability comes from the core's `FlushLog` (one flush for many writes), so every
        // append is only written here.
        match self
            .replog
            .append_with_lsn(lsn, rec, replog::Durability::Written)
        {
            Ok(appending) => {
                let entry = Arc::new(MemEntry {
                    lsn,
                    device: extent.device,
                    offset: extent.offset,
                    kind,
                    len: extent.len,
                    data,
                    appended_at: Instant::now(),
                    timestamp_ns,
                });
                st.entry_bytes += entry.mem_bytes();
                st.entries.insert(lsn, entry);
                self.queues.written(appending);
                Input::AppendResult {
                    lsn,
                    accepted: true,
                }
            }
            Err(replog::Error::Full { .. }) => {
                match id {
                    Some(id) => {
                        if let Some(r) = st.requests.get_mut(&id) {
                            r.write = Some((kind, data));
                        }
                    }
                    None => st.inbound.put_back(lsn, kind, data, timestamp_ns),
                }
                Input::AppendResult {
                    lsn,
                    accepted: false,
                }
            }
            // Any other failure: the replog refuses everything after it; the core halts.
            Err(e) => Input::LogFailed {
                reason: format!("append of lsn {lsn}: {e}"),
            },
        }
    }

    /// An entry's data: from the cache, else read back from the replog.
    fn entry(&self, st: &State, lsn: Lsn) -> Arc<MemEntry> {
        if let Some(e) = st.entries.get(&lsn) {
            return e.clone();
        }
        match self.replog.read(lsn) {
            Ok(e) => Arc::new(MemEntry::from(e)),
            Err(e) => stop_the_process(&format!(
                "group {}: lsn {lsn} is neither cached nor readable from the replog: {e}",
                self.name
            )),
        }
    }

    /// Drop cached entries nobody needs from memory: applied on slink 0 and handed to every
    /// site; past the budget, also entries a site will read back from the replog.
    fn trim_cache(&self, st: &mut State) {
        let applied0 = st.core.applied0();
        let shipped = st
            .core
            .slinks()
            .iter()
            .skip(1)
            .map(|s| s.shipped.max(s.skip_to))
            .min()
            .unwrap_or(Lsn::MAX);
        let floor = applied0.min(shipped);
        while let Some((&lsn, e)) = st.entries.first_key_value() {
            let over_budget = st.entry_bytes > self.entry_cache_bytes;
            if lsn > floor && !(over_budget && lsn <= applied0) {
                break;
            }
            st.entry_bytes -= e.mem_bytes();
            st.entries.pop_first();
        }
    }
}
