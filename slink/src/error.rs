//! Errors of a site link, with the context a person needs (peer, what was expected).

use crate::frame::{ErrorCode, FrameError};

/// Why a link (or one connection of it) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("{context}: {message}")]
    Io {
        context: &'static str,
        message: String,
    },
    #[error("bad frame from peer: {0}")]
    Frame(#[from] FrameError),
    #[error("peer closed the connection{0}")]
    Closed(&'static str),
    #[error("timed out: {0}")]
    Timeout(String),
    /// The peer sent an Error frame.
    #[error("peer refused ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    /// This side refused the peer (and told it with an Error frame).
    #[error("refused peer ({code:?}): {message}")]
    RefusedPeer { code: ErrorCode, message: String },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error("entry source: {0}")]
    Source(String),
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl LinkError {
    pub fn io(context: &'static str, e: std::io::Error) -> LinkError {
        LinkError::Io {
            context,
            message: e.to_string(),
        }
    }
}
