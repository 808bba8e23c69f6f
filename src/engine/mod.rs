//! The engine (the "core" of the design): groups, their write path, slinks, policies and events. It knows tables only through
//! [`spec`], NBD only through the export glue in `crate::daemon`, and the disk only through the
//! `replog` crate and [`blockfile`].

pub mod activity;
pub mod blockfile;
pub mod events;
pub mod group;
pub mod link_thread;
pub mod lsn_index;
pub mod policy;
pub mod queue;
pub mod slink;
pub mod spec;
pub mod tcp;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("replog {path}: {source}")]
    Replog {
        path: String,
        #[source]
        source: replog::Error,
    },
    #[error("replog full (needs {needed} bytes)")]
    Full { needed: u64 },
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Invalid(String),
}

impl CoreError {
    pub fn replog(path: &Path, source: replog::Error) -> Self {
        CoreError::Replog {
            path: path.display().to_string(),
            source,
        }
    }
}

pub type CoreResult<T> = Result<T, CoreError>;
