//! Where the replog's bytes live, behind a small trait so that tests (and the core's simulations)
//! can swap the real file for an in-memory disk that knows which bytes are durable.
//!
//! - [`Storage`]: the calls the replog makes (aligned reads/writes, batches, sync).
//! - [`MemDisk`]: in-memory storage that records which writes were synced and can produce the image
//!   a power loss would leave (durable bytes plus a random subset of sectors of unsynced writes),
//!   or the image a process crash leaves (everything written). Fail points stop writes after N.
//! - [`ReadOnlyFile`]: plain `pread` access used by `Replog::inspect`, which must not modify the file.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::io::{AlignedBuf, IoTicket};

/// The storage calls the replog needs. Offsets are absolute bytes in the file or device.
#[allow(
    clippy::len_without_is_empty,
    reason = "a device size, not a collection"
)]
pub trait Storage: Send + Sync {
    /// Human-readable name (the path) for error messages.
    fn describe(&self) -> String;
    /// Offsets and lengths of reads and writes must be multiples of this (a power of two <= 4096).
    fn alignment(&self) -> usize;
    /// Size of the file or device in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Makes `[offset, offset + len)` exist and read as zeros.
    fn preallocate_zeroed(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf>;
    /// Writes `buf` at `offset` (not synced).
    fn write_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf>;
    /// Makes every completed write durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Makes every write that completed before the call durable, on the calling thread and NOT
    /// queued behind batches in flight (so their completions do not wait for it, nor it for
    /// them). What it covers is only what completed before it began.
    /// Default: `sync_data` (ordered: covers at least that).
    fn sync_completed(&self) -> io::Result<()> {
        self.sync_data()
    }
    /// Writes `buf` at `offset` and makes that range durable, without waiting for other
    /// unsynced writes to reach the disk. The log uses it for cursor and tail updates, which
    /// never depend on ring bytes being durable (FORMAT.md "Metadata"). Not ordered with queued
    /// batches: callers write only what completed writes already back.
    /// Default: `write_at`, then `sync_data` (durable, just more than needed).
    fn write_durable_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        let buf = self.write_at(offset, buf)?;
        self.sync_data()?;
        Ok(buf)
    }
    /// Submits writes and an optional sync; completes in submit order. The sync is issued only
    /// after the writes of this batch and of every earlier batch completed.
    ///
    /// Must not block waiting for I/O (the log submits under its state lock, and completes
    /// batches from the waker the ticket was polled with, which takes that lock): queue the
    /// batch, or do it synchronously and return a ready ticket. The log bounds its own batches.
    fn submit(&self, writes: Vec<(u64, AlignedBuf)>, sync_after: bool) -> IoTicket;
    /// Which I/O path is in use (for status output).
    fn backend(&self) -> crate::io::Backend;
    /// Writes and optionally syncs on the calling thread, returning the buffers: for a lone batch
    /// while nothing else of the caller is in flight (no ordering with queued batches).
    /// Default: `submit` and wait.
    fn write_now(
        &self,
        writes: Vec<(u64, AlignedBuf)>,
        sync_after: bool,
    ) -> io::Result<Vec<AlignedBuf>> {
        self.submit(writes, sync_after).wait()
    }
    /// True when writes bypass the page cache (O_DIRECT). Default: false.
    fn is_direct(&self) -> bool {
        false
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Bytes of one sector for torn-write simulation: a power loss keeps or loses each independently.
pub const TORN_SECTOR_BYTES: usize = 512;

struct MemState {
    /// What reads see (every completed write).
    current: Vec<u8>,
    /// What survives a power loss for sure (state at the last sync).
    durable: Vec<u8>,
    /// Writes since the last sync, in order.
    unsynced: Vec<(u64, Vec<u8>)>,
    /// Remaining writes before the disk "dies" (further writes fail); None = unlimited.
    writes_left: Option<u64>,
    /// Total write calls so far (a batch counts each of its writes).
    writes_done: u64,
}

/// In-memory storage with crash images built from durably written bytes only.
pub struct MemDisk {
    state: Mutex<MemState>,
    alignment: usize,
}

impl MemDisk {
    /// A zero-filled disk of `len` bytes.
    pub fn new(len: u64, alignment: usize) -> Arc<MemDisk> {
        MemDisk::from_image(vec![0; usize::try_from(len).unwrap_or(0)], alignment)
    }

    /// A disk whose durable content is `image` (e.g. a crash image).
    pub fn from_image(image: Vec<u8>, alignment: usize) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            state: Mutex::new(MemState {
                current: image.clone(),
                durable: image,
                unsynced: Vec::new(),
                writes_left: None,
                writes_done: 0,
            }),
            alignment,
        })
    }

    /// Everything written so far: what a process crash (kill -9) leaves behind.
    pub fn current_image(&self) -> Vec<u8> {
        lock(&self.state).current.clone()
    }

    /// Only synced bytes: what a power loss leaves when no unsynced sector made it.
    pub fn durable_image(&self) -> Vec<u8> {
        lock(&self.state).durable.clone()
    }

    /// What a power loss could leave: the durable bytes plus, for each unsynced write in order,
    /// each 512-byte sector kept or lost at random (seeded): torn writes included.
    pub fn power_loss_image(&self, seed: u64) -> Vec<u8> {
        let state = lock(&self.state);
        let mut image = state.durable.clone();
        let mut rng = seed ^ 0x9E37_79B9_7F4A_7C15;
        for (offset, data) in &state.unsynced {
            for (i, sector) in data.chunks(TORN_SECTOR_BYTES).enumerate() {
                // xorshift64: deterministic per seed, no dependency needed.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if rng & 1 == 0 {
                    continue;
                }
                let at = usize::try_from(*offset)
                    .unwrap_or(usize::MAX)
                    .saturating_add(i * TORN_SECTOR_BYTES);
                if let Some(dst) = image.get_mut(at..at.saturating_add(sector.len())) {
                    dst.copy_from_slice(sector);
                }
            }
        }
        image
    }

    /// After `writes` more write calls, every write fails (a dying disk / crash point).
    pub fn fail_writes_after(&self, writes: Option<u64>) {
        lock(&self.state).writes_left = writes;
    }

    /// Number of write calls performed so far.
    pub fn writes_done(&self) -> u64 {
        lock(&self.state).writes_done
    }

    fn check_aligned(&self, offset: u64, len: usize) -> io::Result<()> {
        let a = self.alignment as u64;
        if !offset.is_multiple_of(a) || !(len as u64).is_multiple_of(a) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unaligned I/O: offset {offset} len {len} alignment {a}"),
            ));
        }
        Ok(())
    }

    fn range(state: &MemState, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start.saturating_add(len);
        if end > state.current.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("I/O at {offset}+{len} beyond end {}", state.current.len()),
            ));
        }
        Ok(start..end)
    }

    fn write_locked(&self, state: &mut MemState, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_aligned(offset, data.len())?;
        if let Some(left) = state.writes_left.as_mut() {
            if *left == 0 {
                return Err(io::Error::other("MemDisk: write fail point reached"));
            }
            *left -= 1;
        }
        let range = MemDisk::range(state, offset, data.len())?;
        if let Some(dst) = state.current.get_mut(range) {
            dst.copy_from_slice(data);
        }
        state.unsynced.push((offset, data.to_vec()));
        state.writes_done += 1;
        Ok(())
    }

    /// A write that is durable on its own: it supersedes earlier unsynced writes of its range
    /// (they can no longer reappear after a power loss), and leaves the others unsynced.
    fn write_durable_locked(
        &self,
        state: &mut MemState,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        self.write_locked(state, offset, data)?;
        // write_locked queued it as unsynced; it is durable instead.
        state.unsynced.pop();
        let start = offset;
        let end = offset.saturating_add(data.len() as u64);
        let mut kept = Vec::with_capacity(state.unsynced.len());
        for (at, bytes) in std::mem::take(&mut state.unsynced) {
            let w_end = at.saturating_add(bytes.len() as u64);
            if w_end <= start || at >= end {
                kept.push((at, bytes));
                continue;
            }
            // Keep only the parts outside the durable range.
            if at < start {
                let n = usize::try_from(start - at).unwrap_or(0);
                kept.push((at, bytes.get(..n).unwrap_or_default().to_vec()));
            }
            if w_end > end {
                let n = usize::try_from(end - at).unwrap_or(0);
                kept.push((end, bytes.get(n..).unwrap_or_default().to_vec()));
            }
        }
        state.unsynced = kept;
        let range = MemDisk::range(state, offset, data.len())?;
        if let Some(dst) = state.durable.get_mut(range) {
            dst.copy_from_slice(data);
        }
        Ok(())
    }

    fn sync_locked(state: &mut MemState) -> io::Result<()> {
        if state.writes_left == Some(0) {
            return Err(io::Error::other("MemDisk: sync after the fail point"));
        }
        for (offset, data) in std::mem::take(&mut state.unsynced) {
            let at = usize::try_from(offset).unwrap_or(usize::MAX);
            if let Some(dst) = state.durable.get_mut(at..at.saturating_add(data.len())) {
                dst.copy_from_slice(&data);
            }
        }
        Ok(())
    }
}

impl Storage for MemDisk {
    fn describe(&self) -> String {
        "memdisk".to_string()
    }
    fn alignment(&self) -> usize {
        self.alignment
    }
    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.state).current.len() as u64)
    }
    fn preallocate_zeroed(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut state = lock(&self.state);
        let end = usize::try_from(offset.saturating_add(len)).map_err(io::Error::other)?;
        if end > state.current.len() {
            state.current.resize(end, 0);
            state.durable.resize(end, 0);
        }
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let state = &mut *state;
        for image in [&mut state.current, &mut state.durable] {
            if let Some(dst) = image.get_mut(start..end) {
                dst.fill(0);
            }
        }
        Ok(())
    }
    fn read_at(&self, offset: u64, mut buf: AlignedBuf) -> io::Result<AlignedBuf> {
        self.check_aligned(offset, buf.len())?;
        let state = lock(&self.state);
        let range = MemDisk::range(&state, offset, buf.len())?;
        if let Some(src) = state.current.get(range) {
            buf.copy_from_slice(src);
        }
        Ok(buf)
    }
    fn write_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        let mut state = lock(&self.state);
        self.write_locked(&mut state, offset, &buf)?;
        Ok(buf)
    }
    fn sync_data(&self) -> io::Result<()> {
        MemDisk::sync_locked(&mut lock(&self.state))
    }
    fn write_durable_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        let mut state = lock(&self.state);
        if state.writes_left == Some(0) {
            return Err(io::Error::other("MemDisk: write fail point reached"));
        }
        self.write_durable_locked(&mut state, offset, &buf)?;
        Ok(buf)
    }
    fn submit(&self, writes: Vec<(u64, AlignedBuf)>, sync_after: bool) -> IoTicket {
        let mut state = lock(&self.state);
        let mut bufs = Vec::with_capacity(writes.len());
        for (offset, buf) in writes {
            if let Err(e) = self.write_locked(&mut state, offset, &buf) {
                return IoTicket::ready(Err(e));
            }
            bufs.push(buf);
        }
        if sync_after {
            if let Err(e) = MemDisk::sync_locked(&mut state) {
                return IoTicket::ready(Err(e));
            }
        }
        IoTicket::ready(Ok(bufs))
    }
    fn backend(&self) -> crate::io::Backend {
        crate::io::Backend::Pwrite
    }
}

/// A file opened read-only, read with `pread` (for inspection, which must not modify anything).
pub struct ReadOnlyFile {
    file: std::fs::File,
    path: String,
}

impl ReadOnlyFile {
    /// Opens `path` read-only.
    pub fn open(path: &std::path::Path) -> io::Result<ReadOnlyFile> {
        Ok(ReadOnlyFile {
            file: std::fs::File::open(path)?,
            path: path.display().to_string(),
        })
    }
}

fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "storage opened read-only")
}

impl Storage for ReadOnlyFile {
    fn describe(&self) -> String {
        self.path.clone()
    }
    fn alignment(&self) -> usize {
        512
    }
    fn len(&self) -> io::Result<u64> {
        use std::io::Seek;
        // Block devices report 0 in metadata; seeking to the end works for both.
        let mut file = &self.file;
        file.seek(io::SeekFrom::End(0))
    }
    fn preallocate_zeroed(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(read_only_error())
    }
    fn read_at(&self, offset: u64, mut buf: AlignedBuf) -> io::Result<AlignedBuf> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
    fn write_at(&self, _offset: u64, _buf: AlignedBuf) -> io::Result<AlignedBuf> {
        Err(read_only_error())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn submit(&self, _writes: Vec<(u64, AlignedBuf)>, _sync_after: bool) -> IoTicket {
        IoTicket::ready(Err(read_only_error()))
    }
    fn backend(&self) -> crate::io::Backend {
        crate::io::Backend::Pwrite
    }
}

impl Storage for crate::io::IoFile {
    fn describe(&self) -> String {
        self.path().display().to_string()
    }
    fn alignment(&self) -> usize {
        crate::io::IoFile::alignment(self)
    }
    fn len(&self) -> io::Result<u64> {
        crate::io::IoFile::len(self)
    }
    fn preallocate_zeroed(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::io::IoFile::preallocate_zeroed(self, offset, len)
    }
    fn read_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        crate::io::IoFile::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        crate::io::IoFile::write_at(self, offset, buf)
    }
    fn sync_data(&self) -> io::Result<()> {
        crate::io::IoFile::sync_data(self)
    }
    fn sync_completed(&self) -> io::Result<()> {
        crate::io::IoFile::sync_completed_now(self)
    }
    fn write_durable_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        crate::io::IoFile::write_durable_at(self, offset, buf)
    }
    fn submit(&self, writes: Vec<(u64, AlignedBuf)>, sync_after: bool) -> IoTicket {
        crate::io::IoFile::submit_self_bounded(self, crate::io::IoBatch { writes, sync_after })
    }
    fn backend(&self) -> crate::io::Backend {
        crate::io::IoFile::backend(self)
    }
    fn is_direct(&self) -> bool {
        crate::io::IoFile::is_direct(self)
    }
    fn write_now(
        &self,
        writes: Vec<(u64, AlignedBuf)>,
        sync_after: bool,
    ) -> io::Result<Vec<AlignedBuf>> {
        crate::io::IoFile::write_now(self, crate::io::IoBatch { writes, sync_after })
    }
}
