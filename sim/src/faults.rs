//! Storage faults: a [`Storage`] that passes every call to a [`MemDisk`] unless a fault is armed.
//!
//! A site has one [`DiskFaults`] for its replog and one for its devices. The world arms one-shot
//! faults (the next read, write or sync fails with EIO) and disk-full windows (every write fails
//! with ENOSPC until the window is closed). A failed write writes nothing; a write of a batch
//! fails on its own, after the writes before it in the batch went through (a torn batch). A
//! failed sync makes nothing durable (the unsynced writes stay unsynced: what a later sync or a
//! power loss does with them is MemDisk's usual semantics). Every fault that fires is counted.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use replog::io::{AlignedBuf, IoTicket};
use replog::storage::{MemDisk, Storage};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disk {
    Log,
    Device,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Sync,
}

/// Armed faults of one kind of storage of one site, and the faults that fired.
#[derive(Debug, Default)]
pub struct DiskFaults {
    pub read: bool,
    pub write: bool,
    pub sync: bool,
    /// Disk full: every write fails with ENOSPC while set.
    pub full: bool,
    pub fired: BTreeMap<&'static str, u64>,
}

impl DiskFaults {
    pub fn arm(&mut self, op: Op) {
        match op {
            Op::Read => self.read = true,
            Op::Write => self.write = true,
            Op::Sync => self.sync = true,
        }
    }

    /// No fault armed any more (faults stopped): what fired stays counted.
    pub fn disarm(&mut self) {
        self.read = false;
        self.write = false;
        self.sync = false;
        self.full = false;
    }

    /// The error this call fails with, if a fault is armed for it (one-shot faults disarm).
    fn take(&mut self, disk: Disk, op: Op) -> Option<io::Error> {
        let (kind, armed) = match op {
            Op::Read => ("read-error", std::mem::take(&mut self.read)),
            Op::Write if self.full => ("enospc", true),
            Op::Write => ("write-error", std::mem::take(&mut self.write)),
            Op::Sync => ("sync-error", std::mem::take(&mut self.sync)),
        };
        if !armed {
            return None;
        }
        *self.fired.entry(fired_name(disk, kind)).or_default() += 1;
        Some(if kind == "enospc" {
            io::Error::new(
                io::ErrorKind::StorageFull,
                "injected: no space left on device",
            )
        } else {
            io::Error::other(format!("injected {kind}"))
        })
    }
}

fn fired_name(disk: Disk, kind: &str) -> &'static str {
    match (disk, kind) {
        (Disk::Log, "read-error") => "log-read-error",
        (Disk::Log, "write-error") => "log-write-error",
        (Disk::Log, "sync-error") => "log-sync-error",
        (Disk::Log, _) => "log-enospc-write",
        (Disk::Device, "read-error") => "device-read-error",
        (Disk::Device, "write-error") => "device-write-error",
        (Disk::Device, "sync-error") => "device-sync-error",
        (Disk::Device, _) => "device-enospc-write",
    }
}

pub type SharedFaults = Arc<Mutex<DiskFaults>>;

pub fn lock(f: &SharedFaults) -> MutexGuard<'_, DiskFaults> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A MemDisk behind the armed faults of its site.
pub struct FaultyDisk {
    inner: Arc<MemDisk>,
    faults: SharedFaults,
    disk: Disk,
}

impl FaultyDisk {
    pub fn new(inner: Arc<MemDisk>, faults: SharedFaults, disk: Disk) -> Arc<FaultyDisk> {
        Arc::new(FaultyDisk {
            inner,
            faults,
            disk,
        })
    }

    fn check(&self, op: Op) -> io::Result<()> {
        match lock(&self.faults).take(self.disk, op) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Storage for FaultyDisk {
    fn describe(&self) -> String {
        format!("faulty {:?} memdisk", self.disk)
    }
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn preallocate_zeroed(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(Op::Write)?;
        self.inner.preallocate_zeroed(offset, len)
    }
    fn read_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        self.check(Op::Read)?;
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        self.check(Op::Write)?;
        self.inner.write_at(offset, buf)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check(Op::Sync)?;
        self.inner.sync_data()
    }
    fn write_durable_at(&self, offset: u64, buf: AlignedBuf) -> io::Result<AlignedBuf> {
        self.check(Op::Write)?;
        self.inner.write_durable_at(offset, buf)
    }
    fn submit(&self, writes: Vec<(u64, AlignedBuf)>, sync_after: bool) -> IoTicket {
        let mut bufs = Vec::with_capacity(writes.len());
        for (offset, buf) in writes {
            match self.write_at(offset, buf) {
                Ok(b) => bufs.push(b),
                Err(e) => return IoTicket::ready(Err(e)),
            }
        }
        if sync_after {
            if let Err(e) = self.sync_data() {
                return IoTicket::ready(Err(e));
            }
        }
        IoTicket::ready(Ok(bufs))
    }
    fn backend(&self) -> replog::io::Backend {
        self.inner.backend()
    }
}
