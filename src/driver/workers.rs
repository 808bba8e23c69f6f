//! The driver's worker threads: each blocks on its own queue, does one kind of I/O and reports
//! the completion to the core as an input.

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use replog::{Appending, EntryKind};

use crate::core::dirty::Piece;
use crate::core::{Extent, Input, Lsn, Position};
use crate::engine::blockfile::BlockFile;
use crate::engine::queue::MemEntry;
use crate::engine::slink::apply_entry;

use super::secondary::{storage_worker, SecondaryWork};
use super::{stop_the_process, Shared, TICK};

/// Threads that write entries to slink 0's devices (the core's overlap rule keeps overlapping
/// entries apart; disjoint ones run in parallel).
pub const APPLY_THREADS: usize = 4;

pub(crate) enum SiteWork {
    /// Apply the entries in `(after, upto]`; `cached` holds those still in memory.
    Entries {
        after: Lsn,
        upto: Lsn,
        cached: Vec<Arc<MemEntry>>,
    },
    Piece(Piece),
    Complete {
        seq: u64,
    },
}

pub(crate) enum StoreWork {
    Checkpoint {
        slink: u8,
        lsn: Lsn,
        sync_devices: bool,
    },
    MarkDirty {
        slink: u8,
        token: u64,
        extents: Vec<Extent>,
    },
    ClearDirty {
        slink: u8,
        device: u32,
        region: u64,
    },
    DropTo {
        slink: u8,
        lsn: Lsn,
    },
    Reclaim,
}

pub(crate) enum MetaWork {
    ActivityLog {
        token: u64,
        extents: Vec<(u32, u64)>,
    },
    ResyncSeq {
        slink: u8,
        reserved: u64,
    },
    DropFloor {
        slink: u8,
        floor: Option<Lsn>,
    },
}

/// The senders of every worker's queue. Closing them (dropping the senders) ends the workers.
#[derive(Default)]
pub(crate) struct Queues {
    inner: Mutex<Option<Senders>>,
}

struct Senders {
    written: Sender<Appending>,
    flush: Sender<()>,
    apply: Sender<Arc<MemEntry>>,
    sites: BTreeMap<u8, Sender<SiteWork>>,
    store: Sender<StoreWork>,
    meta: Sender<MetaWork>,
    secondary: Sender<SecondaryWork>,
}

/// The receiving ends, handed to the threads by [`spawn`].
pub(crate) struct Receivers {
    written: Receiver<Appending>,
    flush: Receiver<()>,
    apply: Receiver<Arc<MemEntry>>,
    sites: BTreeMap<u8, Receiver<SiteWork>>,
    store: Receiver<StoreWork>,
    meta: Receiver<MetaWork>,
    secondary: Receiver<SecondaryWork>,
}

impl Queues {
    pub fn new(site_nrs: &[u8]) -> (Queues, Receivers) {
        let (written, written_rx) = channel();
        let (flush, flush_rx) = channel();
        let (apply, apply_rx) = channel();
        let (store, store_rx) = channel();
        let (meta, meta_rx) = channel();
        let (secondary, secondary_rx) = channel();
        let mut sites = BTreeMap::new();
        let mut sites_rx = BTreeMap::new();
        for nr in site_nrs {
            let (tx, rx) = channel();
            sites.insert(*nr, tx);
            sites_rx.insert(*nr, rx);
        }
        (
            Queues {
                inner: Mutex::new(Some(Senders {
                    written,
                    flush,
                    apply,
                    sites,
                    store,
                    meta,
                    secondary,
                })),
            },
            Receivers {
                written: written_rx,
                flush: flush_rx,
                apply: apply_rx,
                sites: sites_rx,
                store: store_rx,
                meta: meta_rx,
                secondary: secondary_rx,
            },
        )
    }

    fn with(&self, f: impl FnOnce(&Senders)) {
        let g = self
            .inner
            .lock()
            .unwrap_or_else(|_| stop_the_process("driver queues lock poisoned"));
        // Closed: the group is stopping and its workers are gone; the work no longer matters
        // (the core asked for everything it needs before it said `Stopped`).
        if let Some(s) = g.as_ref() {
            f(s)
        }
    }

    pub fn close(&self) {
        if let Ok(mut g) = self.inner.lock() {
            *g = None;
        }
    }

    pub fn written(&self, a: Appending) {
        self.with(|s| {
            let _ = s.written.send(a);
        })
    }
    pub fn flush(&self) {
        self.with(|s| {
            let _ = s.flush.send(());
        })
    }
    pub fn apply(&self, e: Arc<MemEntry>) {
        self.with(|s| {
            let _ = s.apply.send(e);
        })
    }
    pub fn site(&self, nr: u8, w: SiteWork) {
        self.with(|s| match s.sites.get(&nr) {
            Some(tx) => {
                let _ = tx.send(w);
            }
            None => stop_the_process(&format!("the core shipped to slink {nr}, not a local site")),
        })
    }
    pub fn store(&self, w: StoreWork) {
        self.with(|s| {
            let _ = s.store.send(w);
        })
    }
    pub fn meta(&self, w: MetaWork) {
        self.with(|s| {
            let _ = s.meta.send(w);
        })
    }
    pub fn secondary(&self, w: SecondaryWork) {
        self.with(|s| {
            let _ = s.secondary.send(w);
        })
    }
}

pub(crate) fn thread(name: String, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    match std::thread::Builder::new().name(name.clone()).spawn(f) {
        Ok(h) => h,
        Err(e) => stop_the_process(&format!("spawning thread {name}: {e}")),
    }
}

/// Start every worker.
pub(crate) fn spawn(shared: &Arc<Shared>, rx: Receivers) -> Vec<JoinHandle<()>> {
    let mut threads = Vec::new();
    let s = shared.clone();
    threads.push(thread("log-written".into(), move || {
        log_written(&s, rx.written)
    }));
    let s = shared.clone();
    threads.push(thread("log-flush".into(), move || log_flush(&s, rx.flush)));
    let apply_rx = Arc::new(Mutex::new(rx.apply));
    for i in 0..APPLY_THREADS {
        let (s, r) = (shared.clone(), apply_rx.clone());
        threads.push(thread(format!("apply-{i}"), move || apply0(&s, &r)));
    }
    for (nr, r) in rx.sites {
        let s = shared.clone();
        threads.push(thread(format!("site-{nr}"), move || site(&s, nr, r)));
    }
    let s = shared.clone();
    threads.push(thread("persist".into(), move || store(&s, rx.store)));
    let s = shared.clone();
    threads.push(thread("meta".into(), move || meta(&s, rx.meta)));
    if shared.lock().core.role() == crate::core::Role::Secondary {
        let s = shared.clone();
        threads.push(thread("secondary-store".into(), move || {
            storage_worker(&s, rx.secondary)
        }));
    }
    let s = Arc::downgrade(shared);
    threads.push(thread("tick".into(), move || loop {
        std::thread::sleep(TICK);
        let Some(s) = s.upgrade() else { return };
        if s.lock().stopped {
            return;
        }
        s.input(Input::Tick);
    }));
    threads
}

/// Appends are written in lsn order: report the highest written after each wait, taking every
/// handle already queued in one go. The entry the core then asks to apply first, this thread
/// writes itself (no hand-off at low queue depth) unless more appends wait for it: then the
/// apply threads take it, so that no log write waits behind a device write.
fn log_written(s: &Shared, rx: Receiver<Appending>) {
    let mut next = rx.recv().ok();
    while let Some(first) = next.take() {
        let mut result = wait_written(first);
        while let Ok(more) = rx.try_recv() {
            result = match (result, wait_written(more)) {
                (Ok(a), Ok(b)) => Ok(a.max(b)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        // Never drop a result on the durability path: a failed write halts the core.
        let mut kept = match result {
            Ok(upto) => s.input_keeping_apply(Input::LogWritten { upto }),
            Err(reason) => s.input_keeping_apply(Input::LogFailed { reason }),
        };
        while let Some(e) = kept.take() {
            match rx.try_recv() {
                Ok(waiting) => {
                    s.hand_to_apply(e);
                    next = Some(waiting);
                }
                Err(_) => kept = s.apply_kept(&e),
            }
        }
        if next.is_none() {
            next = rx.recv().ok();
        }
    }
}

fn wait_written(a: Appending) -> Result<Lsn, String> {
    let lsn = a.lsn();
    a.wait()
        .map(|l| l.max(lsn))
        .map_err(|e| format!("write of lsn {lsn}: {e}"))
}

/// Makes the replog durable for the core. First with a sync beside the batch pipeline
/// (`sync_written`): a flush through the pipeline makes the open batch a syncing one, and every
/// write appended meanwhile would wait for that fdatasync (at every async site's batched flush).
/// That sync covers what was written before it; when it moved nothing and appends are still on
/// their way (a client's flush covers those too), the pipeline flush waits for them, so a
/// repeated request always makes progress.
fn log_flush(s: &Shared, rx: Receiver<()>) {
    while rx.recv().is_ok() {
        while rx.try_recv().is_ok() {}
        match make_durable(&s.replog) {
            Ok(upto) => s.input(Input::LogDurable { upto }),
            Err(e) => s.input(Input::LogFailed {
                reason: format!("flush: {e}"),
            }),
        }
    }
}

fn make_durable(log: &replog::Replog) -> replog::Result<Lsn> {
    let appended = log.next_lsn().saturating_sub(1);
    let before = log.durable_lsn();
    let durable = log.sync_written()?;
    if durable > before || durable >= appended {
        return Ok(durable);
    }
    log.flush().wait()
}

fn apply0(s: &Shared, rx: &Mutex<Receiver<Arc<MemEntry>>>) {
    loop {
        let next = {
            let r = rx
                .lock()
                .unwrap_or_else(|_| stop_the_process("apply queue lock poisoned"));
            r.recv()
        };
        let Ok(e) = next else { return };
        let result = apply_to_slink0(s, &e);
        s.input(Input::Applied { lsn: e.lsn, result });
    }
}

pub(crate) fn apply_to_slink0(s: &Shared, e: &MemEntry) -> Result<(), String> {
    match s.slink0.get(&e.device) {
        Some(f) => apply_entry(f, e.kind, e.offset, e.len, &e.data).map_err(|x| x.to_string()),
        None => Err(format!("no device {}", e.device)),
    }
}

/// A local site: entries, resync pieces and completion markers in the order the core sent
/// them; every step acknowledged with the site's position.
fn site(s: &Shared, nr: u8, rx: Receiver<SiteWork>) {
    let Some(site) = s.sites.get(&nr) else { return };
    let mut pos = Position::default();
    let mut failed = false;
    while let Ok(w) = rx.recv() {
        // After a failure the site is faulty: nothing more reaches it out of order.
        if failed {
            continue;
        }
        let result = match w {
            SiteWork::Entries {
                after,
                upto,
                cached,
            } => {
                let r = site_entries(s, nr, &site.devices, after, upto, &cached);
                pos.lsn = pos.lsn.max(upto);
                r
            }
            SiteWork::Piece(p) => {
                let r = copy_piece(s, &site.devices, &p);
                pos.resync_seq = pos.resync_seq.max(p.seq);
                r
            }
            SiteWork::Complete { seq } => {
                pos.resync_seq = pos.resync_seq.max(seq);
                Ok(())
            }
        };
        match result {
            Ok(()) => s.input(Input::SiteAck { slink: nr, pos }),
            Err(reason) => {
                failed = true;
                s.input(Input::SiteFailed { slink: nr, reason });
            }
        }
    }
}

fn site_entries(
    s: &Shared,
    nr: u8,
    devices: &BTreeMap<u32, Arc<BlockFile>>,
    after: Lsn,
    upto: Lsn,
    cached: &[Arc<MemEntry>],
) -> Result<(), String> {
    let mut next = after + 1;
    let mut cached = cached.iter().peekable();
    while next <= upto {
        let batch: Vec<Arc<MemEntry>> = match cached.peek() {
            Some(e) if e.lsn == next => vec![cached
                .next()
                .cloned()
                .unwrap_or_else(|| stop_the_process("peeked entry vanished"))],
            _ => read_back(s, nr, next, upto)?,
        };
        // Everything left was dropped for the site meanwhile (its regions are dirty).
        if batch.is_empty() {
            break;
        }
        for e in &batch {
            let Some(f) = devices.get(&e.device) else {
                return Err(format!("slink has no device {}", e.device));
            };
            apply_entry(f, e.kind, e.offset, e.len, &e.data)
                .map_err(|x| format!("device {}: {x}", e.device))?;
            next = e.lsn + 1;
        }
    }
    Ok(())
}

/// Entries of `(from - 1, upto]` for slink `nr` from the replog (the one read-back path), up to
/// 4 MiB at a time. They start at `from` unless the core dropped entries for the site after it
/// shipped them (a ring overflow: their regions are dirty, and the ring reclaimed them): then at
/// the first one retained after them, or none when the drop covers the rest.
pub(crate) fn read_back(
    s: &Shared,
    nr: u8,
    from: Lsn,
    upto: Lsn,
) -> Result<Vec<Arc<MemEntry>>, String> {
    // Entries the core dropped for this site after it planned them may be reclaimed already:
    // start at the ring's first entry then (the gap is checked below).
    let start = from.max(s.replog.first_lsn());
    let skipped_to = || s.lock().core.slink(nr).map_or(0, |x| x.skip_to);
    let batch = if start > upto {
        Vec::new()
    } else {
        match s.replog.read_from(start, 256, 4 << 20) {
            Ok(b) => b,
            // Reclaimed between the two looks, all of it dropped for the site.
            Err(_) if skipped_to() >= upto => Vec::new(),
            Err(e) => return Err(format!("replog read from lsn {start}: {e}")),
        }
    };
    let out: Vec<Arc<MemEntry>> = batch
        .into_iter()
        .filter(|e| e.lsn <= upto)
        .map(|e| Arc::new(MemEntry::from(e)))
        .collect();
    // The ring reclaims above a site's acknowledged entries only what the core dropped for it:
    // any other gap is a broken invariant.
    let first = out.first().map(|e| e.lsn);
    if first != Some(from) {
        let missing_upto = first.map_or(upto, |f| f - 1);
        let skipped_to = skipped_to();
        if skipped_to < missing_upto {
            stop_the_process(&format!(
                "group {}: shipping lsn {from}..={upto} to slink {nr}, the replog starts at \
                 {first:?} and the core dropped only up to {skipped_to}",
                s.name
            ));
        }
    }
    Ok(out)
}

/// A resync piece: slink 0's bytes of the piece, written to the site's device.
fn copy_piece(
    s: &Shared,
    devices: &BTreeMap<u32, Arc<BlockFile>>,
    p: &Piece,
) -> Result<(), String> {
    let Some(dst) = devices.get(&p.device) else {
        return Err(format!("slink has no device {}", p.device));
    };
    let buf = read_piece(s, p)?;
    apply_entry(dst, EntryKind::Write, p.offset, p.len, &buf)
        .map_err(|e| format!("resync write of device {}: {e}", p.device))
}

/// A resync piece's bytes, read from slink 0's device.
pub(crate) fn read_piece(s: &Shared, p: &Piece) -> Result<Vec<u8>, String> {
    let Some(src) = s.slink0.get(&p.device) else {
        return Err(format!("resync of unknown device {}", p.device));
    };
    let mut buf = vec![0u8; p.len as usize];
    src.read_at(p.offset, &mut buf)
        .map_err(|e| format!("resync read of device {}: {e}", p.device))?;
    Ok(buf)
}

/// Cursors, dirty logs and reclaim, in the order the core asked for them (a drop's cursor
/// move must follow its dirty marks).
fn store(s: &Shared, rx: Receiver<StoreWork>) {
    while let Ok(w) = rx.recv() {
        match w {
            StoreWork::Checkpoint {
                slink,
                lsn,
                sync_devices,
            } => {
                let result = checkpoint(s, slink, lsn, sync_devices);
                s.input(Input::CheckpointDone { slink, lsn, result });
            }
            StoreWork::MarkDirty {
                slink,
                token,
                extents,
            } => {
                let result = mark_dirty(s, slink, &extents);
                s.input(Input::DirtyPersisted { token, result });
            }
            StoreWork::ClearDirty {
                slink,
                device,
                region,
            } => {
                if let Some(d) = s.dirty.get(&(slink, device)) {
                    let mut d = d
                        .lock()
                        .unwrap_or_else(|_| stop_the_process("dirty log lock poisoned"));
                    d.clear_region(region);
                    // A lost clear only copies the region again.
                    if let Err(e) = d.persist() {
                        tracing::warn!(group = %s.name, slink, device, "dirty log clear: {e}");
                    }
                }
            }
            StoreWork::DropTo { slink, lsn } => {
                if s.replog.cursor(slink).is_some_and(|c| c < lsn) {
                    if let Err(e) = s.replog.set_cursor(slink, lsn) {
                        stop_the_process(&format!(
                            "group {}: moving slink {slink}'s cursor to {lsn} after its dirty \
                             marks: {e}",
                            s.name
                        ));
                    }
                }
                reclaim(s);
            }
            StoreWork::Reclaim => reclaim(s),
        }
    }
}

fn checkpoint(s: &Shared, slink: u8, lsn: Lsn, sync_devices: bool) -> Result<(), String> {
    if sync_devices {
        let devices = if slink == 0 {
            &s.slink0
        } else {
            match s.sites.get(&slink) {
                Some(site) => &site.devices,
                None => return Err(format!("no local slink {slink}")),
            }
        };
        for (nr, f) in devices {
            f.sync_data()
                .map_err(|e| format!("sync of device {nr}: {e}"))?;
        }
    }
    if s.replog.cursor(slink).is_some_and(|c| c < lsn) {
        s.replog
            .set_cursor(slink, lsn)
            .map_err(|e| format!("cursor of slink {slink}: {e}"))?;
    }
    Ok(())
}

fn mark_dirty(s: &Shared, slink: u8, extents: &[Extent]) -> Result<(), String> {
    let mut touched = std::collections::BTreeSet::new();
    for e in extents {
        let Some(d) = s.dirty.get(&(slink, e.device)) else {
            return Err(format!(
                "slink {slink} has no dirty log for device {}",
                e.device
            ));
        };
        d.lock()
            .unwrap_or_else(|_| stop_the_process("dirty log lock poisoned"))
            .mark_range(e.offset, e.len.max(1));
        touched.insert(e.device);
    }
    for device in touched {
        if let Some(d) = s.dirty.get(&(slink, device)) {
            d.lock()
                .unwrap_or_else(|_| stop_the_process("dirty log lock poisoned"))
                .persist()
                .map_err(|e| format!("dirty log of slink {slink} device {device}: {e}"))?;
        }
    }
    Ok(())
}

fn reclaim(s: &Shared) {
    match s.replog.reclaim() {
        Ok(_) => {
            let first_lsn = s.replog.first_lsn();
            let free_bytes = s.replog.space().free_bytes;
            s.input(Input::Reclaimed {
                first_lsn,
                free_bytes,
            });
        }
        Err(e) => stop_the_process(&format!("group {}: replog reclaim: {e}", s.name)),
    }
}

fn meta(s: &Shared, rx: Receiver<MetaWork>) {
    while let Ok(w) = rx.recv() {
        match w {
            MetaWork::ActivityLog { token, extents } => {
                let result = s
                    .replog
                    .set_activity_log(&extents)
                    .map_err(|e| e.to_string());
                s.input(Input::ActivityLogWritten { token, result });
            }
            MetaWork::ResyncSeq { slink, reserved } => {
                let result = s
                    .replog
                    .raise_resync_seq(slink, reserved)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                s.input(Input::ResyncSeqPersisted {
                    slink,
                    reserved,
                    result,
                });
            }
            MetaWork::DropFloor { slink, floor } => {
                let result = s
                    .replog
                    .set_drop_floor(slink, floor)
                    .map_err(|e| e.to_string());
                s.input(Input::DropFloorPersisted {
                    slink,
                    floor,
                    result,
                });
            }
        }
    }
}
