//! NBD server front end: every device is an NBD export named after it.
//!
//! Key decisions (the protocol subset and byte layouts are in `src/nbd/PROTOCOL.md`):
//! - Fixed newstyle handshake only, no TLS; structured replies and `base:allocation` are
//!   offered, extended headers are not (and not advertised).
//! - Requests of one connection run concurrently, each in its own task (a lone request runs in
//!   the connection task, saving a hand-off at queue depth 1); replies are written in completion
//!   order (NBD matches them by cookie) by whichever task has one ready, batched into one
//!   buffered write, with no dedicated writer task to wake. In-flight requests and payload bytes
//!   per connection are bounded (`ServerConfig`), and the reader stops reading when a bound is
//!   reached, so memory never depends on what a client claims.
//! - Invalid requests get the error value the spec prescribes and the connection goes on;
//!   garbage (bad magic, truncated messages) drops only that connection.
//! - Shutdown drains: stop accepting, answer in-flight requests, then close.
//!
//! Code map: `proto` (wire constants, pure encode/decode), `check` (pure request validation and
//! block-size negotiation), `handshake` (option haggling), `transmission` (request loop),
//! `reply` (reply encoding and the shared socket writer), `server` (accept loop, drain),
//! `export` (the traits the core implements), `config`, `stats`.

mod check;
mod config;
mod export;
mod handshake;
pub mod proto;
mod reply;
mod server;
mod stats;
mod transmission;

pub use check::{negotiate_block_sizes, BlockSizes};
pub use config::{ConfigError, ServerConfig, DISCARD_WRITE_LIMIT, IO_BUFFER_BYTES};
pub use export::{BlockError, Export, Exports};
pub use server::{serve_tcp, serve_unix};
pub use stats::{ServerStats, ServerStatsSnapshot};

/// Resolves once shutdown is requested (`true` on the channel) or the sender is gone (nobody
/// can request it any more, which we treat the same way).
async fn wait_shutdown(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
