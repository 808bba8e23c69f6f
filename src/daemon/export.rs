//! The NBD face of a device: every request goes to the device's group.

use std::sync::Arc;

use replog::EntryKind;

use crate::core::Failure;
use crate::nbd::{BlockError, Export, Exports};

use super::registry::{DeviceHandle, Registry};

pub struct DeviceExport {
    handle: DeviceHandle,
}

fn to_block_error(e: Failure) -> BlockError {
    match &e {
        Failure::NoSpace => {
            tracing::warn!("write refused: the replog stayed full");
            BlockError::NoSpace
        }
        Failure::OutOfRange => BlockError::Invalid,
        Failure::ReadOnly => BlockError::ReadOnly,
        Failure::Halted => BlockError::Io(std::io::Error::other(e.to_string())),
        Failure::Io(msg) => {
            tracing::warn!("I/O error: {msg}");
            BlockError::Io(std::io::Error::other(msg.clone()))
        }
    }
}

impl Export for DeviceExport {
    fn size(&self) -> u64 {
        self.handle.size
    }

    /// A secondary's devices are read-only: writes get EPERM (they come from the primary only).
    fn read_only(&self) -> bool {
        self.handle.group.role() == crate::engine::group::Role::Secondary
    }

    /// The largest write is what one replog entry holds.
    fn block_size(&self) -> (u32, u32, u32) {
        (512, 4096, replog::format::MAX_DATA_BYTES as u32)
    }

    fn description(&self) -> String {
        format!(
            "replicator device {} (replog {})",
            self.handle.name,
            self.handle.group.replog_path.display()
        )
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BlockError> {
        let group = self.handle.group.clone();
        let dev = self.handle.dev_nr;
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            group.read(dev, offset, &mut buf).map(|_| buf)
        })
        .await
        .map_err(|e| BlockError::Io(std::io::Error::other(e.to_string())))?
        .map_err(BlockError::Io)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), BlockError> {
        let len = data.len() as u64;
        self.handle
            .group
            .submit(self.handle.dev_nr, offset, EntryKind::Write, len, data, fua)
            .await
            .map_err(to_block_error)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        _may_trim: bool,
    ) -> Result<(), BlockError> {
        self.handle
            .group
            .submit(
                self.handle.dev_nr,
                offset,
                EntryKind::Zeroes,
                len as u64,
                Vec::new(),
                fua,
            )
            .await
            .map_err(to_block_error)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), BlockError> {
        // A trim is replicated as a discard: every site frees the range and reads it as zeroes,
        // so the sites stay byte-identical.
        self.handle
            .group
            .submit(
                self.handle.dev_nr,
                offset,
                EntryKind::Discard,
                len as u64,
                Vec::new(),
                fua,
            )
            .await
            .map_err(to_block_error)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.handle.group.flush().await.map_err(to_block_error)
    }
}

/// The daemon's devices as NBD exports.
pub struct RegistryExports(pub Arc<Registry>);

impl Exports for RegistryExports {
    type Export = DeviceExport;

    fn lookup(&self, name: &str) -> Option<Arc<DeviceExport>> {
        self.0
            .get(name)
            .map(|handle| Arc::new(DeviceExport { handle }))
    }

    fn list(&self) -> Vec<String> {
        self.0.names()
    }

    fn default_export(&self) -> Option<String> {
        let names = self.0.names();
        match names.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        }
    }
}
