//! The replog itself: create, open with recovery, append with group commit, read, cursors,
//! reclaim, space and lag accounting.
//!
//! Concurrency: one mutex (`State`) covers layout, lsn assignment, the in-memory index and the
//! batch pipeline; a second one (`MetaState`) serialises metadata writes (cursor moves, reclaim).
//! Appenders copy their record into the open batch buffer under the state lock; whoever finds the
//! pipeline with room closes the open batch, pads it to a block and submits it, and the I/O
//! thread finishes batches in submit order and resolves the appenders' handles (`writer.rs`).
//! Lock order: meta before state. Nothing blocks on I/O while holding the state lock.
//!
//! Invariants (asserted where cheap):
//! - lsn order == ring position order; `State::index` is sorted by both.
//! - No batch write touches a block below `round_down(tail) + ring`: the space check in `append`
//!   is the only way to extend `next_vpos`.
//! - Every batch starts on a block boundary, so no block holding an acknowledged entry is rewritten.
//! - The tail only moves after the metadata naming it is durable, and never past an entry that is
//!   not yet written or whose lsn exceeds the lowest registered cursor.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use serde::Serialize;

use crate::appending::{self, Appending, Waiter};
use crate::error::{Error, Result};
use crate::format::{
    record_bytes_for, round_down, round_up, ActivityLogState, EntryHeader, Identity, MetaSlot,
    RecordKind, BLOCK_BYTES, ENTRY_HEADER_BYTES, MAX_DATA_BYTES, META_AREA_BYTES, MIN_RING_BYTES,
};
use crate::index::{Index, IndexEntry, Lag};
use crate::io::{self, AlignedBuf};
use crate::meta::{self, MetaSync};
use crate::recovery::{self, Finding, RingReader, ScanStart};
use crate::storage::Storage;
use crate::writer::{self, CompletionWaker, InFlight};
use crate::{Lsn, MAX_SLINKS};

/// Batches submitted and not yet completed (pipelining depth). With the open batch this bounds
/// batch buffer memory to (BATCHES_IN_FLIGHT_MAX + 1) * BATCH_BUFFER_BYTES_MAX.
pub const BATCHES_IN_FLIGHT_MAX: usize = 2;
/// Largest record (a Write of MAX_DATA_BYTES with its header).
pub const MAX_RECORD_BYTES: u64 = ENTRY_HEADER_BYTES as u64 + MAX_DATA_BYTES;
/// Capacity of one batch buffer: the bound on queued (not yet submitted) bytes. Appenders wait
/// when the open batch is full. Holds any record plus a lap-end pad in front of it.
pub const BATCH_BUFFER_BYTES_MAX: u64 = 2 * MAX_RECORD_BYTES + BLOCK_BYTES;
/// Spare batch buffers kept for reuse.
pub(crate) const BUFFER_POOL_MAX: usize = BATCHES_IN_FLIGHT_MAX + 1;

/// How far an append must get before its handle resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Durability {
    /// The write completed (survives a process crash).
    Written,
    /// The write completed and was flushed (survives a power loss).
    Durable,
}

/// What an entry does to its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EntryKind {
    Write,
    Zeroes,
    Discard,
}

impl EntryKind {
    fn record_kind(self) -> RecordKind {
        match self {
            EntryKind::Write => RecordKind::Write,
            EntryKind::Zeroes => RecordKind::Zeroes,
            EntryKind::Discard => RecordKind::Discard,
        }
    }

    fn from_record(kind: RecordKind) -> Option<EntryKind> {
        match kind {
            RecordKind::Write => Some(EntryKind::Write),
            RecordKind::Zeroes => Some(EntryKind::Zeroes),
            RecordKind::Discard => Some(EntryKind::Discard),
            RecordKind::Pad => None,
        }
    }
}

/// An entry to append. `data.len() == len` for Write, empty otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub device: u32,
    pub offset: u64,
    pub kind: EntryKind,
    pub len: u64,
    pub data: &'a [u8],
}

/// An entry read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub lsn: Lsn,
    pub device: u32,
    pub offset: u64,
    pub kind: EntryKind,
    pub len: u64,
    pub data: Vec<u8>,
    pub timestamp_ns: u64,
}

/// Where an entry wrote, without its data ([`Replog::extents_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryExtent {
    pub lsn: Lsn,
    pub device: u32,
    pub offset: u64,
    pub len: u64,
    pub kind: EntryKind,
    /// Ring bytes the entry holds (header, payload, padding).
    pub record_bytes: u64,
}

/// Where and how big a new replog is.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Byte offset of the replog inside the file or device (multiple of 4096).
    pub offset: u64,
    /// Bytes including the 8 KiB metadata area; the ring (size - 8192) must be a multiple of
    /// 4096 and at least 16 KiB.
    pub size: u64,
    pub io: io::IoOptions,
}

/// Where an existing replog is.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Byte offset of the replog inside the file or device (multiple of 4096).
    pub offset: u64,
    pub io: io::IoOptions,
}

/// Ring space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Space {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub entries: u64,
}

/// What open found and did.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    /// Entries recovered (retained between tail and head).
    pub entries: u64,
    /// Retained lsn range; 0s when empty.
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    /// The lsn the next `append` gets.
    pub next_lsn: Lsn,
    /// The writer generation of this open (durably bumped before any append).
    pub generation: u32,
    /// Metadata slot used and its sequence.
    pub metadata_slot: usize,
    pub metadata_sequence: u64,
    /// What each metadata slot held.
    pub slots: Vec<meta::SlotStatus>,
    pub tail_vpos: u64,
    pub head_vpos: u64,
    /// Records per finding of the decision table (the one that ended the chain included).
    pub findings: std::collections::BTreeMap<Finding, u64>,
    /// The finding that ended the chain.
    pub stop: Finding,
    /// Block-boundary jumps over the ends of earlier generations.
    pub jumps: u64,
    /// Format version the metadata was in before this open (1: this open upgraded it to 2).
    pub metadata_version_found: u16,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Records appended and not yet taken by the writer.
pub(crate) struct OpenBatch {
    pub buf: Option<AlignedBuf>,
    /// Block-aligned virtual position of the first byte of `buf`.
    pub start_vpos: u64,
    /// Bytes filled (records and lap-end pads).
    pub fill: u64,
    pub waiters: Vec<Waiter>,
    /// Some waiter asked for Durable (or a flush is pending).
    pub sync: bool,
    pub last_lsn: Lsn,
    /// Identifies this open batch (bumped whenever it is closed or dropped).
    pub seq: u64,
    /// Appended into an idle log and not submitted: a handle's `wait` may write it itself
    /// (`writer::lead`); anything else that pumps submits it.
    pub deferred: bool,
}

pub(crate) struct State {
    /// Highest lsn assigned (or recovered, or reclaimed).
    pub last_lsn: Lsn,
    /// Where the next record goes.
    pub next_vpos: u64,
    pub open: OpenBatch,
    /// Every retained entry, written or not.
    pub index: Index,
    /// Entries with lsn <= this have completed writes.
    pub written_lsn: Lsn,
    /// Entries with lsn <= this are durable: a sync completed after their writes.
    pub durable_lsn: Lsn,
    pub tail_vpos: u64,
    pub tail_lsn: Lsn,
    pub tail_generation: u32,
    /// Published cursors (after their metadata write is durable).
    pub cursors: [Option<Lsn>; MAX_SLINKS],
    /// Flushes requested while the open batch was empty.
    pub flush_waiters: Vec<Waiter>,
    /// Submitted batches, oldest first (at most BATCHES_IN_FLIGHT_MAX).
    pub pipeline: VecDeque<InFlight>,
    /// Threads waiting on `Inner::room` (so that nobody pays a wake-up syscall for nobody).
    pub room_waiters: usize,
    /// A leader writes a batch on its own thread: counts as a full pipeline.
    pub inline_busy: bool,
    pub pool: Vec<AlignedBuf>,
    /// Set at the first failed write: the log refuses further appends.
    pub failed: Option<String>,
    pub shutdown: bool,
}

/// Authoritative metadata fields not derived from `State` (serialised by the meta lock).
#[derive(Debug, Clone)]
pub(crate) struct MetaState {
    pub sequence: u64,
    pub registered: u16,
    pub cursors: [Lsn; MAX_SLINKS],
    pub persisted: Persisted,
}

/// The format-2 and format-3 fields: what the group's identity needs across restarts, the
/// activity log and the slinks' drop floors. Written with every metadata write; changed only
/// through `Replog::update_persisted` (and cleared drop floors by (un)registering a slink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Persisted {
    pub resync_seqs: [u64; MAX_SLINKS],
    pub drop_floors: [Option<Lsn>; MAX_SLINKS],
    pub features: u64,
    pub identity: Identity,
    pub activity_log: ActivityLogState,
}

impl Persisted {
    fn from_slot(m: &MetaSlot) -> Persisted {
        Persisted {
            resync_seqs: m.resync_seqs,
            drop_floors: m.drop_floors,
            features: m.features,
            identity: m.identity.clone(),
            activity_log: m.activity_log.clone(),
        }
    }
}

pub(crate) struct Inner {
    pub storage: Arc<dyn Storage>,
    pub path: String,
    /// Byte offset of the replog in the storage.
    pub base: u64,
    pub ring_bytes: u64,
    pub uuid: [u8; 16],
    pub generation: u32,
    pub created_ns: u64,
    /// Capacity of batch buffers for this ring.
    pub batch_buffer_bytes: u64,
    pub state: Mutex<State>,
    /// Appenders wait here for room in the open batch; `Drop` waits here for the pipeline to
    /// drain.
    pub room: Condvar,
    /// Batch tickets are polled with this: it finishes batches on the I/O thread.
    pub completion_waker: Waker,
    pub meta: Mutex<MetaState>,
    /// The last durable `MetaState::persisted`, for readers: a getter never waits behind a
    /// metadata write (the meta lock is held across the write). Lock order: meta, then this.
    pub published: Mutex<Persisted>,
    /// The last read buffer, kept for the next read (a slink that reads back entries reads
    /// continually; a fresh buffer each time cost an allocation and zeroing of every byte).
    /// At most [`READ_BUFFER_KEEP_MAX`] bytes are kept.
    pub read_buffer: Mutex<Option<AlignedBuf>>,
}

/// Largest read buffer a replog keeps between reads.
const READ_BUFFER_KEEP_MAX: usize = 32 << 20;

impl Inner {
    /// A buffer of `len` visible bytes: the kept one when it is large enough.
    fn take_read_buffer(&self, len: usize) -> AlignedBuf {
        if let Some(mut buf) = lock(&self.read_buffer).take() {
            if buf.capacity() >= len && buf.set_len(len).is_ok() {
                return buf;
            }
        }
        AlignedBuf::zeroed(len)
    }

    fn keep_read_buffer(&self, buf: AlignedBuf) {
        if buf.capacity() <= READ_BUFFER_KEEP_MAX {
            let mut kept = lock(&self.read_buffer);
            if kept.as_ref().is_none_or(|k| k.capacity() < buf.capacity()) {
                *kept = Some(buf);
            }
        }
    }

    pub fn ring_start(&self) -> u64 {
        self.base + META_AREA_BYTES
    }

    /// Largest record this ring accepts: any record up to half the ring fits once the ring is
    /// empty, wherever the tail is.
    fn max_record_bytes(&self) -> u64 {
        MAX_RECORD_BYTES.min((self.ring_bytes / 2).saturating_sub(BLOCK_BYTES))
    }

    fn meta_slot(&self, meta: &MetaState, st: &State) -> MetaSlot {
        MetaSlot {
            uuid: self.uuid,
            sequence: meta.sequence,
            replog_bytes: META_AREA_BYTES + self.ring_bytes,
            ring_offset: META_AREA_BYTES,
            ring_bytes: self.ring_bytes,
            block_bytes: BLOCK_BYTES as u32,
            generation: self.generation,
            tail_generation: st.tail_generation,
            tail_vpos: st.tail_vpos,
            tail_lsn: st.tail_lsn,
            head_hint_vpos: st.next_vpos,
            created_ns: self.created_ns,
            registered: meta.registered,
            cursors: meta.cursors,
            resync_seqs: meta.persisted.resync_seqs,
            features: meta.persisted.features,
            identity: meta.persisted.identity.clone(),
            activity_log: meta.persisted.activity_log.clone(),
            drop_floors: meta.persisted.drop_floors,
        }
    }

    /// Durably writes `next` (with the tail fields of `st_tail`) as the new metadata.
    pub(crate) fn commit_meta(
        &self,
        current: &mut MetaState,
        mut next: MetaState,
        tail: Option<(u64, Lsn, u32)>,
        sync: MetaSync,
    ) -> Result<()> {
        next.sequence = current.sequence + 1;
        let mut slot = {
            let st = lock(&self.state);
            self.meta_slot(&next, &st)
        };
        if let Some((vpos, lsn, generation)) = tail {
            slot.tail_vpos = vpos;
            slot.tail_lsn = lsn;
            slot.tail_generation = generation;
        }
        meta::write(self.storage.as_ref(), self.base, &slot, sync)?;
        if next.persisted != current.persisted {
            *lock(&self.published) = next.persisted.clone();
        }
        *current = next;
        Ok(())
    }
}

/// The replication log. `Send + Sync`; share it with `Arc`. Dropping it submits the open batch
/// and waits until every submitted batch completed.
pub struct Replog {
    inner: Arc<Inner>,
}

fn check_base(offset: u64) -> Result<()> {
    if !offset.is_multiple_of(BLOCK_BYTES) {
        return Err(Error::InvalidOptions {
            what: format!("replog offset {offset} is not a multiple of {BLOCK_BYTES}"),
        });
    }
    Ok(())
}

fn check_alignment(storage: &dyn Storage) -> Result<()> {
    let a = storage.alignment() as u64;
    if a == 0 || !BLOCK_BYTES.is_multiple_of(a) {
        return Err(Error::InvalidOptions {
            what: format!(
                "{}: I/O alignment {a} does not divide the replog block of {BLOCK_BYTES}",
                storage.describe()
            ),
        });
    }
    Ok(())
}

fn open_file(path: &Path, create: bool, io_opts: &io::IoOptions) -> Result<Arc<dyn Storage>> {
    let file = io::IoFile::open(path, create, io_opts)
        .map_err(|e| Error::io("open", &path.display().to_string(), e))?;
    Ok(Arc::new(file))
}

impl Replog {
    /// Creates (or overwrites) a replog: preallocates `size` zero-filled bytes at `offset`, writes
    /// fresh metadata with a new random uuid, then opens it.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Replog> {
        check_base(opts.offset)?;
        let storage = open_file(path, true, &opts.io)?;
        Replog::create_on(storage, opts.offset, opts.size)
    }

    /// [`Replog::create`] on any storage (tests and simulations use [`crate::storage::MemDisk`]).
    pub fn create_on(storage: Arc<dyn Storage>, offset: u64, size: u64) -> Result<Replog> {
        check_base(offset)?;
        check_alignment(storage.as_ref())?;
        let ring_bytes = size.saturating_sub(META_AREA_BYTES);
        if size < META_AREA_BYTES + MIN_RING_BYTES || !ring_bytes.is_multiple_of(BLOCK_BYTES) {
            return Err(Error::InvalidOptions {
                what: format!(
                    "replog size {size}: must be {META_AREA_BYTES} (metadata) + a ring that is a \
                     multiple of {BLOCK_BYTES} and at least {MIN_RING_BYTES}"
                ),
            });
        }
        let path = storage.describe();
        storage
            .preallocate_zeroed(offset, size)
            .map_err(|e| Error::io("preallocate", &path, e))?;
        let slot = MetaSlot::fresh(rand::random(), ring_bytes, now_ns());
        meta::write(storage.as_ref(), offset, &slot, MetaSync::WholeFile)?;
        meta::write(
            storage.as_ref(),
            offset,
            &MetaSlot {
                sequence: 2,
                ..slot.clone()
            },
            MetaSync::WholeFile,
        )?;
        Replog::open_on(storage, offset).map(|(replog, _)| replog)
    }

    /// Opens a replog, recovers the valid chain from the tail, durably bumps the writer generation
    /// and starts the writer.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<(Replog, RecoveryReport)> {
        check_base(opts.offset)?;
        let storage = open_file(path, false, &opts.io)?;
        Replog::open_on(storage, opts.offset)
    }

    /// [`Replog::open`] on any storage.
    pub fn open_on(storage: Arc<dyn Storage>, offset: u64) -> Result<(Replog, RecoveryReport)> {
        check_base(offset)?;
        check_alignment(storage.as_ref())?;
        let loaded = meta::load(storage.as_ref(), offset)?;
        let m = loaded.meta;
        let scanned = {
            let mut reader = RingReader::new(storage.as_ref(), offset, m.ring_bytes);
            recovery::scan(&mut reader, &scan_start(&m), usize::MAX)?
        };
        let generation = m
            .generation
            .checked_add(1)
            .ok_or_else(|| Error::BadFormat {
                what: format!("{}: writer generation exhausted", storage.describe()),
            })?;
        let mut index = Index::default();
        for entry in &scanned.entries {
            index.push(*entry);
        }
        let last_lsn = index.last().map_or(m.tail_lsn, |e| e.lsn).max(m.tail_lsn);
        let mut cursors = [None; MAX_SLINKS];
        for (i, c) in cursors.iter_mut().enumerate() {
            if m.registered & (1 << i) != 0 {
                *c = m.cursors.get(i).copied();
            }
        }
        // The next metadata write must go to the slot not holding the newest valid state.
        let sequence = if (m.sequence + 1) % 2 == loaded.slot as u64 % 2 {
            m.sequence + 1
        } else {
            m.sequence
        };
        let ring_bytes = m.ring_bytes;
        let batch_buffer_bytes = BATCH_BUFFER_BYTES_MAX.min(ring_bytes);
        let inner = Arc::new_cyclic(|weak| Inner {
            completion_waker: Waker::from(Arc::new(CompletionWaker::new(weak.clone()))),
            path: storage.describe(),
            storage,
            base: offset,
            ring_bytes,
            uuid: m.uuid,
            generation,
            created_ns: m.created_ns,
            batch_buffer_bytes,
            state: Mutex::new(State {
                last_lsn,
                next_vpos: scanned.head_vpos,
                open: OpenBatch {
                    buf: None,
                    start_vpos: scanned.head_vpos,
                    fill: 0,
                    waiters: Vec::new(),
                    sync: false,
                    last_lsn,
                    seq: 0,
                    deferred: false,
                },
                index,
                written_lsn: last_lsn,
                // The generation bump below syncs the whole file: the recovered chain is durable.
                durable_lsn: last_lsn,
                tail_vpos: m.tail_vpos,
                tail_lsn: m.tail_lsn,
                tail_generation: m.tail_generation,
                cursors,
                flush_waiters: Vec::new(),
                pipeline: VecDeque::new(),
                room_waiters: 0,
                inline_busy: false,
                pool: Vec::new(),
                failed: None,
                shutdown: false,
            }),
            room: Condvar::new(),
            meta: Mutex::new(MetaState {
                sequence,
                registered: m.registered,
                cursors: m.cursors,
                persisted: Persisted::from_slot(&m),
            }),
            published: Mutex::new(Persisted::from_slot(&m)),
            read_buffer: Mutex::new(None),
        });
        // Bump the generation durably before any append (this sync also makes the scanned
        // chain durable, so nothing this writer builds on can vanish). A format-1 or format-2
        // replog is upgraded by this same write: it is written in format 3 with every field the
        // old format had, and the defaults (FORMAT.md "Version history") for the rest.
        {
            let mut meta_state = lock(&inner.meta);
            let next = meta_state.clone();
            inner.commit_meta(&mut meta_state, next, None, MetaSync::WholeFile)?;
        }
        let report = {
            let st = lock(&inner.state);
            RecoveryReport {
                entries: st.index.len() as u64,
                first_lsn: st.index.first().map_or(0, |e| e.lsn),
                last_lsn: st.index.last().map_or(0, |e| e.lsn),
                next_lsn: st.last_lsn + 1,
                generation,
                metadata_slot: loaded.slot,
                metadata_sequence: m.sequence,
                slots: loaded.slots,
                tail_vpos: m.tail_vpos,
                head_vpos: scanned.head_vpos,
                findings: scanned.findings,
                stop: scanned.stop,
                jumps: scanned.jumps,
                metadata_version_found: loaded.version,
            }
        };
        Ok((Replog { inner }, report))
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// This replog's uuid.
    pub fn uuid(&self) -> [u8; 16] {
        self.inner.uuid
    }

    /// The writer generation of this open.
    pub fn generation(&self) -> u32 {
        self.inner.generation
    }

    /// What the io layer actually uses.
    pub fn io_backend(&self) -> io::Backend {
        self.inner.storage.backend()
    }

    /// True when the log device is written with O_DIRECT (false for buffered I/O and for
    /// in-memory storage).
    pub fn is_direct(&self) -> bool {
        self.inner.storage.is_direct()
    }

    /// Highest lsn such that it and every lower lsn completed its write (survives a process
    /// crash); 0 when nothing was written. Moves in batch completion order.
    pub fn written_lsn(&self) -> Lsn {
        lock(&self.inner.state).written_lsn
    }

    /// Highest lsn such that it and every lower lsn is durable (survives a power loss): moved by
    /// every completed batch that synced (a Durable append, a flush) and by open, which syncs
    /// the recovered chain. Never above `written_lsn`.
    pub fn durable_lsn(&self) -> Lsn {
        lock(&self.inner.state).durable_lsn
    }

    /// Assigns the next lsn synchronously, in call order, and queues the entry for writing.
    /// `Err(Full)` at once when the ring has no room; `Err(TooLarge)` if it could never fit.
    /// Blocks briefly (backpressure) while the open batch buffer is full.
    ///
    /// On an idle log the write starts when the handle is waited on (`wait` writes it on the
    /// calling thread), polled, checked with `is_done` or dropped, or when another append, a
    /// flush or a completion comes first: wait on (or drop) the handle promptly.
    pub fn append(&self, rec: Record<'_>, durability: Durability) -> Result<Appending> {
        self.append_inner(None, rec, durability)
    }

    /// Same as [`Replog::append`] with an explicit lsn, which must exceed the last one.
    pub fn append_with_lsn(
        &self,
        lsn: Lsn,
        rec: Record<'_>,
        durability: Durability,
    ) -> Result<Appending> {
        self.append_inner(Some(lsn), rec, durability)
    }

    fn append_inner(
        &self,
        explicit: Option<Lsn>,
        rec: Record<'_>,
        durability: Durability,
    ) -> Result<Appending> {
        let inner = &*self.inner;
        let data_len = match rec.kind {
            EntryKind::Write => {
                if rec.data.len() as u64 != rec.len {
                    return Err(Error::InvalidRecord {
                        what: format!(
                            "write of len {} carries {} data bytes",
                            rec.len,
                            rec.data.len()
                        ),
                    });
                }
                rec.len
            }
            EntryKind::Zeroes | EntryKind::Discard => {
                if !rec.data.is_empty() {
                    return Err(Error::InvalidRecord {
                        what: format!("{:?} entry carries {} data bytes", rec.kind, rec.data.len()),
                    });
                }
                0
            }
        };
        let max_record = inner.max_record_bytes();
        let rsize = record_bytes_for(data_len);
        if data_len > MAX_DATA_BYTES || rsize > max_record {
            return Err(Error::TooLarge {
                len: data_len,
                max: max_record.saturating_sub(ENTRY_HEADER_BYTES as u64),
            });
        }
        let data_crc = if rec.kind == EntryKind::Write {
            crc32c::crc32c(rec.data)
        } else {
            0
        };
        let timestamp_ns = now_ns();
        let ring = inner.ring_bytes;
        let mut st = lock(&inner.state);
        let (v0, pad_before) = loop {
            if let Some(what) = &st.failed {
                return Err(Error::Failed { what: what.clone() });
            }
            if st.shutdown {
                return Err(Error::Closed);
            }
            let v0 = st.next_vpos;
            let lap_end = (v0 / ring + 1) * ring;
            let pad_before = if lap_end - v0 < rsize {
                lap_end - v0
            } else {
                0
            };
            let end = v0 + pad_before + rsize;
            let limit = round_down(st.tail_vpos, BLOCK_BYTES) + ring;
            if round_up(end, BLOCK_BYTES) > limit {
                return Err(Error::Full {
                    needed: pad_before + rsize,
                    free: limit.saturating_sub(v0),
                });
            }
            if st.open.fill + pad_before + rsize > inner.batch_buffer_bytes {
                // Bounded queue: wait until a completion takes the open batch. Start it first
                // in case it is deferred (else the pipeline is full and a completion will).
                writer::pump(inner, &mut st).resolve();
                st.room_waiters += 1;
                st = inner.room.wait(st).unwrap_or_else(PoisonError::into_inner);
                st.room_waiters -= 1;
                continue;
            }
            break (v0, pad_before);
        };
        let lsn = match explicit {
            Some(lsn) if lsn <= st.last_lsn => {
                return Err(Error::LsnNotIncreasing {
                    lsn,
                    last: st.last_lsn,
                });
            }
            Some(lsn) => lsn,
            None => st.last_lsn + 1,
        };
        let mut guard = st;
        let st = &mut *guard;
        let prev_lsn = st.last_lsn;
        if st.open.fill == 0 {
            debug_assert_eq!(v0 % BLOCK_BYTES, 0, "a batch starts on a block boundary");
            st.open.start_vpos = v0;
        }
        if st.open.buf.is_none() {
            let buf = st
                .pool
                .pop()
                .unwrap_or_else(|| AlignedBuf::zeroed(inner.batch_buffer_bytes as usize));
            st.open.buf = Some(buf);
        }
        let Some(buf) = st.open.buf.as_mut() else {
            return Err(Error::Closed);
        };
        let at = usize::try_from(v0 - st.open.start_vpos).unwrap_or(usize::MAX);
        let mut cursor = at;
        if pad_before > 0 {
            let pad = EntryHeader {
                kind: RecordKind::Pad,
                uuid: inner.uuid,
                vpos: v0,
                lsn: prev_lsn,
                generation: inner.generation,
                device: 0,
                offset: 0,
                len: pad_before - ENTRY_HEADER_BYTES as u64,
                timestamp_ns: 0,
                data_crc: 0,
            };
            write_record(buf, cursor, &pad, &[], pad_before)?;
            cursor += pad_before as usize;
        }
        let vpos = v0 + pad_before;
        let header = EntryHeader {
            kind: rec.kind.record_kind(),
            uuid: inner.uuid,
            vpos,
            lsn,
            generation: inner.generation,
            device: rec.device,
            offset: rec.offset,
            len: rec.len,
            timestamp_ns,
            data_crc,
        };
        write_record(buf, cursor, &header, rec.data, rsize)?;
        st.open.fill += pad_before + rsize;
        st.next_vpos = vpos + rsize;
        st.last_lsn = lsn;
        st.index.push(IndexEntry {
            lsn,
            vpos,
            record_bytes: rsize,
            kind: header.kind,
            device: rec.device,
            offset: rec.offset,
            len: rec.len,
            timestamp_ns,
            generation: inner.generation,
        });
        let (appending, waiter) = appending::pair(lsn);
        st.open.waiters.push(waiter);
        st.open.sync |= durability == Durability::Durable;
        st.open.last_lsn = lsn;
        let first_in_batch = st.open.fill == pad_before + rsize;
        let idle = st.pipeline.is_empty() && !st.inline_busy;
        if idle && (first_in_batch || st.open.deferred) {
            // Idle log: leave the batch for the handles to start (see `appending`).
            st.open.deferred = true;
            let lead = appending::Lead {
                inner: Arc::downgrade(&self.inner),
                batch: st.open.seq,
            };
            return Ok(appending.with_lead(lead));
        }
        let finished = writer::pump(inner, st);
        drop(guard);
        finished.resolve();
        Ok(appending)
    }

    /// Everything appended before the call becomes durable; resolves to the last lsn covered.
    pub fn flush(&self) -> Appending {
        let inner = &*self.inner;
        let mut st = lock(&inner.state);
        let lsn = st.last_lsn;
        if let Some(what) = &st.failed {
            return Appending::ready(lsn, Err(Error::Failed { what: what.clone() }));
        }
        let (appending, waiter) = appending::pair(lsn);
        if st.open.fill > 0 {
            st.open.sync = true;
            st.open.waiters.push(waiter);
        } else {
            st.flush_waiters.push(waiter);
        }
        let finished = writer::pump(inner, &mut st);
        drop(st);
        finished.resolve();
        appending
    }

    /// Makes every entry written so far durable with one sync on the calling thread, outside the
    /// batch pipeline: appends go on meanwhile and no batch waits for this sync (a [`flush`]
    /// makes the open batch a syncing one, so every append queued behind it waits for the
    /// fdatasync). Returns the durable lsn after it. Blocks: call it from a thread that may.
    ///
    /// Covers `written_lsn` as read before the sync: those batches' writes completed, and a
    /// sync covers every completed write. A failed sync fails the log, as a failed batch sync
    /// does (after an fdatasync error the kernel may have dropped the dirty pages).
    ///
    /// [`flush`]: Replog::flush
    pub fn sync_written(&self) -> Result<Lsn> {
        let inner = &*self.inner;
        let covered = {
            let st = lock(&inner.state);
            if let Some(what) = &st.failed {
                return Err(Error::Failed { what: what.clone() });
            }
            if st.written_lsn <= st.durable_lsn {
                return Ok(st.durable_lsn);
            }
            st.written_lsn
        };
        let synced = inner.storage.sync_completed();
        let mut st = lock(&inner.state);
        if let Err(e) = synced {
            if st.failed.is_none() {
                st.failed = Some(format!("{}: sync failed: {e}", inner.path));
            }
            let finished = writer::pump(inner, &mut st);
            drop(st);
            finished.resolve();
            return Err(Error::Failed {
                what: format!("{}: sync failed: {e}", inner.path),
            });
        }
        if st.failed.is_none() {
            st.durable_lsn = st.durable_lsn.max(covered);
        }
        Ok(st.durable_lsn)
    }

    /// Reads one written entry.
    pub fn read(&self, lsn: Lsn) -> Result<Entry> {
        let entry = {
            let st = lock(&self.inner.state);
            let entry = st.index.find(lsn).copied().ok_or(Error::NotFound { lsn })?;
            if lsn > st.written_lsn {
                return Err(Error::NotYetWritten { lsn });
            }
            entry
        };
        self.read_entries(&[entry])?
            .into_iter()
            .next()
            .ok_or(Error::NotFound { lsn })
    }

    /// Written entries with lsn >= `lsn`, at most `max_entries` and `max_bytes` of records (but at
    /// least one if any exists, whatever its size).
    pub fn read_from(&self, lsn: Lsn, max_entries: usize, max_bytes: u64) -> Result<Vec<Entry>> {
        let wanted: Vec<IndexEntry> = {
            let st = lock(&self.inner.state);
            let mut bytes = 0u64;
            let mut out = Vec::new();
            for e in st.index.iter_from(st.index.position_from(lsn)) {
                if e.lsn > st.written_lsn || out.len() >= max_entries {
                    break;
                }
                if !out.is_empty() && bytes + e.record_bytes > max_bytes {
                    break;
                }
                bytes += e.record_bytes;
                out.push(*e);
            }
            out
        };
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        self.read_entries(&wanted)
    }

    /// Reads consecutive index entries with one read per lap and checks every record.
    fn read_entries(&self, wanted: &[IndexEntry]) -> Result<Vec<Entry>> {
        let inner = &*self.inner;
        let ring = inner.ring_bytes;
        let mut out = Vec::with_capacity(wanted.len());
        let mut rest = wanted;
        while let Some(first) = rest.first() {
            let lap = first.vpos / ring;
            let n = rest.iter().take_while(|e| e.vpos / ring == lap).count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let Some(last) = group.last() else { break };
            let start = round_down(first.vpos, BLOCK_BYTES);
            let end = round_up(last.vpos + last.record_bytes, BLOCK_BYTES);
            let buf = inner.take_read_buffer(usize::try_from(end - start).unwrap_or(0));
            let buf = inner
                .storage
                .read_at(inner.ring_start() + start % ring, buf)
                .map_err(|e| Error::io("read entry", &inner.path, e))?;
            for e in group {
                let at = usize::try_from(e.vpos - start).unwrap_or(usize::MAX);
                match decode_entry(inner, &buf, at, e) {
                    Some(entry) => out.push(entry),
                    None => {
                        inner.keep_read_buffer(buf);
                        let reclaimed = lock(&inner.state).tail_vpos > e.vpos;
                        return Err(if reclaimed {
                            Error::NotFound { lsn: e.lsn }
                        } else {
                            Error::BadFormat {
                                what: format!(
                                    "{}: entry lsn {} at ring position {} fails its checks",
                                    inner.path, e.lsn, e.vpos
                                ),
                            }
                        });
                    }
                }
            }
            inner.keep_read_buffer(buf);
        }
        Ok(out)
    }

    /// Where the retained, written entries from `lsn` on wrote (lsn order, at most `max`), from
    /// the in-memory index: no I/O. For a caller that needs the regions entries cover but not
    /// their data (overflow marks them dirty).
    pub fn extents_from(&self, lsn: Lsn, max: usize) -> Vec<EntryExtent> {
        let st = lock(&self.inner.state);
        st.index
            .iter_from(st.index.position_from(lsn))
            .take_while(|e| e.lsn <= st.written_lsn)
            .filter_map(|e| {
                Some(EntryExtent {
                    lsn: e.lsn,
                    device: e.device,
                    offset: e.offset,
                    len: e.len,
                    kind: EntryKind::from_record(e.kind)?,
                    record_bytes: e.record_bytes,
                })
            })
            .take(max)
            .collect()
    }

    /// Lowest retained lsn (0 when empty).
    pub fn first_lsn(&self) -> Lsn {
        lock(&self.inner.state).index.first().map_or(0, |e| e.lsn)
    }

    /// Highest retained lsn (0 when empty).
    pub fn last_lsn(&self) -> Lsn {
        lock(&self.inner.state).index.last().map_or(0, |e| e.lsn)
    }

    /// The lsn the next `append` gets (continues after reclaimed entries, also after a restart).
    pub fn next_lsn(&self) -> Lsn {
        lock(&self.inner.state).last_lsn + 1
    }

    pub(crate) fn check_slink(slink: u8) -> Result<usize> {
        let i = usize::from(slink);
        if i >= MAX_SLINKS {
            return Err(Error::BadSlink {
                slink,
                max: MAX_SLINKS - 1,
            });
        }
        Ok(i)
    }

    fn set_slink(&self, slink: u8, value: Option<Lsn>) -> Result<()> {
        let i = Replog::check_slink(slink)?;
        let mut meta_state = lock(&self.inner.meta);
        let mut next = meta_state.clone();
        // A floor belongs to the slink's past: a slink registered again starts without one
        // (a stale floor could be lower than what the new site lacks).
        if let Some(f) = next.persisted.drop_floors.get_mut(i) {
            *f = None;
        }
        match value {
            Some(lsn) => {
                next.registered |= 1 << i;
                if let Some(c) = next.cursors.get_mut(i) {
                    *c = lsn;
                }
            }
            None => {
                next.registered &= !(1 << i);
                if let Some(c) = next.cursors.get_mut(i) {
                    *c = 0;
                }
            }
        }
        self.inner
            .commit_meta(&mut meta_state, next, None, MetaSync::SlotOnly)?;
        if let Some(c) = lock(&self.inner.state).cursors.get_mut(i) {
            *c = value;
        }
        Ok(())
    }

    /// Registers (or re-registers) a slink with a starting cursor. Durable.
    pub fn register_slink(&self, slink: u8, cursor: Lsn) -> Result<()> {
        self.set_slink(slink, Some(cursor))
    }

    /// Forgets a slink (its cursor no longer holds back reclaim). Durable.
    pub fn unregister_slink(&self, slink: u8) -> Result<()> {
        let i = Replog::check_slink(slink)?;
        if lock(&self.inner.state)
            .cursors
            .get(i)
            .copied()
            .flatten()
            .is_none()
        {
            return Err(Error::SlinkNotRegistered { slink });
        }
        self.set_slink(slink, None)
    }

    /// Moves a slink's cursor forward (durable metadata write).
    pub fn set_cursor(&self, slink: u8, lsn: Lsn) -> Result<()> {
        let i = Replog::check_slink(slink)?;
        let mut meta_state = lock(&self.inner.meta);
        if meta_state.registered & (1 << i) == 0 {
            return Err(Error::SlinkNotRegistered { slink });
        }
        let current = meta_state.cursors.get(i).copied().unwrap_or(0);
        if lsn < current {
            return Err(Error::CursorBackwards {
                slink,
                current,
                requested: lsn,
            });
        }
        if lsn == current {
            return Ok(());
        }
        let mut next = meta_state.clone();
        if let Some(c) = next.cursors.get_mut(i) {
            *c = lsn;
        }
        self.inner
            .commit_meta(&mut meta_state, next, None, MetaSync::SlotOnly)?;
        if let Some(c) = lock(&self.inner.state).cursors.get_mut(i) {
            *c = Some(lsn);
        }
        Ok(())
    }

    /// A slink's cursor; None when not registered.
    pub fn cursor(&self, slink: u8) -> Option<Lsn> {
        lock(&self.inner.state)
            .cursors
            .get(usize::from(slink))
            .copied()
            .flatten()
    }

    /// Frees the ring below the lowest registered cursor (only written entries; nothing when no
    /// slink is registered). The new tail is durable before the space is reused. Returns bytes freed.
    pub fn reclaim(&self) -> Result<u64> {
        let inner = &*self.inner;
        let mut meta_state = lock(&inner.meta);
        let (bound, new_tail, old_tail) = {
            let st = lock(&inner.state);
            let Some(min_cursor) = st.cursors.iter().flatten().min().copied() else {
                return Ok(0);
            };
            let bound = min_cursor.min(st.written_lsn);
            let position = st.index.position_from(bound.saturating_add(1));
            let new_tail = match st.index.get(position) {
                Some(e) => (e.vpos, bound.max(st.tail_lsn), e.generation),
                // Everything retained is reclaimable and written, so the open batch is empty and
                // next_vpos is block aligned: the next record (this generation) starts there.
                None => (st.next_vpos, bound.max(st.tail_lsn), inner.generation),
            };
            if new_tail.0 <= st.tail_vpos {
                return Ok(0);
            }
            (bound, new_tail, st.tail_vpos)
        };
        let next = meta_state.clone();
        inner.commit_meta(&mut meta_state, next, Some(new_tail), MetaSync::SlotOnly)?;
        let mut st = lock(&inner.state);
        st.tail_vpos = new_tail.0;
        st.tail_lsn = new_tail.1;
        st.tail_generation = new_tail.2;
        st.index.pop_through(bound);
        Ok(new_tail.0 - old_tail)
    }

    /// Ring space now.
    pub fn space(&self) -> Space {
        let st = lock(&self.inner.state);
        let ring = self.inner.ring_bytes;
        let limit = round_down(st.tail_vpos, BLOCK_BYTES) + ring;
        let free = limit.saturating_sub(st.next_vpos).min(ring);
        Space {
            capacity_bytes: ring,
            used_bytes: ring - free,
            free_bytes: free,
            entries: st.index.len() as u64,
        }
    }

    /// What the replog holds above a slink's cursor; None when the slink is not registered.
    pub fn lag(&self, slink: u8) -> Option<Lag> {
        let st = lock(&self.inner.state);
        let cursor = st.cursors.get(usize::from(slink)).copied().flatten()?;
        Some(st.index.lag_above(cursor))
    }
}

/// Copies a record (header, payload, zeroed padding up to `rsize`) into `buf` at `at`.
fn write_record(
    buf: &mut [u8],
    at: usize,
    header: &EntryHeader,
    data: &[u8],
    rsize: u64,
) -> Result<()> {
    let end = at.saturating_add(rsize as usize);
    let Some(dst) = buf.get_mut(at..end) else {
        return Err(Error::InvalidRecord {
            what: format!("record of {rsize} bytes beyond the batch buffer"),
        });
    };
    let (head, rest) = dst.split_at_mut(ENTRY_HEADER_BYTES.min(dst.len()));
    header.encode_into(head);
    let n = data.len().min(rest.len());
    let (payload, padding) = rest.split_at_mut(n);
    payload.copy_from_slice(data.get(..n).unwrap_or_default());
    padding.fill(0);
    Ok(())
}

/// Decodes and checks the record of `e` at `buf[at..]`; None if anything disagrees.
fn decode_entry(inner: &Inner, buf: &[u8], at: usize, e: &IndexEntry) -> Option<Entry> {
    let h = EntryHeader::decode(buf.get(at..)?).ok()?;
    if h.uuid != inner.uuid || h.vpos != e.vpos || h.lsn != e.lsn || h.kind == RecordKind::Pad {
        return None;
    }
    let data = if h.kind == RecordKind::Write {
        let from = at + ENTRY_HEADER_BYTES;
        let data = buf.get(from..from.checked_add(usize::try_from(h.len).ok()?)?)?;
        if crc32c::crc32c(data) != h.data_crc {
            return None;
        }
        data.to_vec()
    } else {
        Vec::new()
    };
    Some(Entry {
        lsn: h.lsn,
        device: h.device,
        offset: h.offset,
        kind: EntryKind::from_record(h.kind)?,
        len: h.len,
        data,
        timestamp_ns: h.timestamp_ns,
    })
}

pub(crate) fn scan_start(m: &MetaSlot) -> ScanStart {
    ScanStart {
        uuid: m.uuid,
        ring_bytes: m.ring_bytes,
        tail_vpos: m.tail_vpos,
        tail_lsn: m.tail_lsn,
        tail_generation: m.tail_generation,
        generation: m.generation,
    }
}

impl Drop for Replog {
    fn drop(&mut self) {
        let inner = &*self.inner;
        let mut st = lock(&inner.state);
        st.shutdown = true;
        // Appenders blocked for room see `shutdown` and return Closed.
        inner.room.notify_all();
        loop {
            writer::pump(inner, &mut st).resolve();
            let has_work = st.open.fill > 0 || !st.flush_waiters.is_empty();
            if st.pipeline.is_empty() && !st.inline_busy && !has_work {
                break;
            }
            // Each completion pumps (on the I/O thread) and wakes us; a storage whose thread
            // died fails the ticket instead of dropping it, so this ends.
            st.room_waiters += 1;
            st = inner.room.wait(st).unwrap_or_else(PoisonError::into_inner);
            st.room_waiters -= 1;
        }
    }
}
