//! What the NBD server needs from the rest of the system: exports (one per device) and a way to
//! look them up by name. The server is generic over these traits (no `dyn`), so the core's
//! futures are polled directly by the per-request tasks.

use std::future::Future;
use std::sync::Arc;

use super::proto::NbdErrno;

/// An error from an export operation, mapped to an NBD error value in the reply.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing store failed; the OS error decides the NBD value (`ENOSPC`, `EIO`, ...).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A write to an export that does not accept writes (`EPERM`).
    #[error("export is read-only")]
    ReadOnly,
    /// No space for the write (`ENOSPC`).
    #[error("no space left")]
    NoSpace,
    /// The request is invalid for this export (`EINVAL`).
    #[error("invalid request")]
    Invalid,
    /// A value is too large (`EOVERFLOW`).
    #[error("value too large")]
    Overflow,
    /// The export is shutting down (`ESHUTDOWN`); the client must disconnect.
    #[error("shutting down")]
    Shutdown,
}

impl BlockError {
    /// The NBD error value sent to the client.
    pub fn errno(&self) -> NbdErrno {
        match self {
            BlockError::Io(e) => NbdErrno::from_io(e),
            BlockError::ReadOnly => NbdErrno::Perm,
            BlockError::NoSpace => NbdErrno::NoSpc,
            BlockError::Invalid => NbdErrno::Inval,
            BlockError::Overflow => NbdErrno::Overflow,
            BlockError::Shutdown => NbdErrno::Shutdown,
        }
    }
}

/// One exported device.
///
/// The server checks every request against `size()`, `read_only()` and `block_size()` before it
/// calls an operation, so implementations see only in-range, aligned requests no longer than the
/// negotiated maximum payload (`len == 0` is answered by the server without calling the export).
/// Operations of one connection run concurrently; ordering between them is the client's business
/// (NBD has no ordering between in-flight requests), except that `flush` must cover every write
/// that completed before it was called.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes, trims and write-zeroes are refused (`EPERM`).
    fn read_only(&self) -> bool;
    /// Whether several connections may be used at once (flush/FUA effects visible across all).
    fn multi_conn(&self) -> bool {
        true
    }
    /// (minimum, preferred, maximum payload) in bytes. The server sanitises these (powers of two,
    /// minimum at most 64 KiB, maximum capped by `ServerConfig::max_payload`).
    fn block_size(&self) -> (u32, u32, u32) {
        (512, 4096, 32 << 20)
    }
    /// A human-readable description sent as `NBD_INFO_DESCRIPTION` when a client asks for it;
    /// empty means "none" and nothing is sent.
    fn description(&self) -> String {
        String::new()
    }
    /// Reads `len` bytes at `offset`. The returned buffer must be exactly `len` bytes long.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Vec<u8>, BlockError>> + Send;
    /// Writes `data` at `offset`; with `fua` the data is durable when this returns.
    fn write(
        &self,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// Makes `len` bytes at `offset` read as zeroes; `may_trim` allows deallocating them
    /// (clear when the client sent `NBD_CMD_FLAG_NO_HOLE`).
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// A hint that `len` bytes at `offset` are no longer needed (contents become unspecified).
    fn trim(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), BlockError>> + Send;
    /// Makes every write that completed before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), BlockError>> + Send;
}

/// The set of exports a server offers; each device is an export named after it.
pub trait Exports: Send + Sync + 'static {
    type Export: Export;
    /// The export called `name`, if any.
    fn lookup(&self, name: &str) -> Option<Arc<Self::Export>>;
    /// Names of all exports (answer to `NBD_OPT_LIST`).
    fn list(&self) -> Vec<String>;
    /// The export a client gets when it asks for the empty name.
    fn default_export(&self) -> Option<String> {
        None
    }
}
