//! The accept loop: one task per connection, bounded by `max_connections`, and a graceful drain
//! on shutdown (stop accepting, let every connection finish its in-flight requests, return).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::config::{ServerConfig, IO_BUFFER_BYTES};
use super::export::Exports;
use super::handshake::{self, HandshakeEnd, HandshakeError};
use super::stats::{self, ServerStats};
use super::{transmission, wait_shutdown};

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// A listening socket that yields connections as buffered-ready read and write halves.
trait Acceptor: Send {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Accepts one connection; the string names the peer in logs.
    fn accept(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Read, Self::Write, String)>> + Send;
}

impl Acceptor for TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;

    async fn accept(&self) -> std::io::Result<(Self::Read, Self::Write, String)> {
        let (stream, addr) = TcpListener::accept(self).await?;
        // Replies are small and latency-bound; the spec recommends disabling Nagle.
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok((r, w, addr.to_string()))
    }
}

impl Acceptor for UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;

    async fn accept(&self) -> std::io::Result<(Self::Read, Self::Write, String)> {
        let (stream, _) = UnixListener::accept(self).await?;
        let peer = match stream.peer_cred() {
            Ok(cred) => format!("unix:pid={}", cred.pid().unwrap_or(-1)),
            Err(_) => "unix".to_owned(),
        };
        let (r, w) = stream.into_split();
        Ok((r, w, peer))
    }
}

/// Serves NBD on a TCP listener until `shutdown` becomes `true` (or its sender is dropped),
/// then drains: no new connections, in-flight requests are answered, connections close.
/// Returns an `InvalidInput` error for an invalid `cfg`.
pub async fn serve_tcp<E: Exports>(
    listener: TcpListener,
    exports: Arc<E>,
    cfg: ServerConfig,
    stats: Arc<ServerStats>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve(listener, exports, cfg, stats, shutdown).await
}

/// Serves NBD on a Unix socket listener; see [`serve_tcp`].
pub async fn serve_unix<E: Exports>(
    listener: UnixListener,
    exports: Arc<E>,
    cfg: ServerConfig,
    stats: Arc<ServerStats>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve(listener, exports, cfg, stats, shutdown).await
}

async fn serve<A: Acceptor, E: Exports>(
    acceptor: A,
    exports: Arc<E>,
    cfg: ServerConfig,
    stats: Arc<ServerStats>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    cfg.validate()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let cfg = Arc::new(cfg);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut connections = JoinSet::new();

    loop {
        // A connection slot is taken before accepting, so excess clients wait in the backlog.
        let next = async {
            let slot = Arc::clone(&slots)
                .acquire_owned()
                .await
                .map_err(std::io::Error::other)?;
            let (r, w, peer) = acceptor.accept().await?;
            Ok::<_, std::io::Error>((slot, r, w, peer))
        };
        tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "NBD connection task failed");
                }
            }
            accepted = next => match accepted {
                Ok((slot, r, w, peer)) => {
                    let exports = Arc::clone(&exports);
                    let cfg = Arc::clone(&cfg);
                    let stats = Arc::clone(&stats);
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        handle_connection(r, w, peer, exports, &cfg, stats, shutdown).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }

    drop(acceptor);
    tracing::info!(
        connections = connections.len(),
        "NBD server shutting down, draining connections"
    );
    while let Some(done) = connections.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "NBD connection task failed");
        }
    }
    Ok(())
}

async fn handle_connection<E: Exports, R, W>(
    r: R,
    w: W,
    peer: String,
    exports: Arc<E>,
    cfg: &ServerConfig,
    stats: Arc<ServerStats>,
    mut shutdown: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    stats::inc(&stats.connections_total);
    stats::inc(&stats.connections_active);
    tracing::debug!(peer, "NBD connection accepted");
    let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, r);
    let mut writer = BufWriter::with_capacity(IO_BUFFER_BYTES, w);

    let negotiated = tokio::time::timeout(
        cfg.handshake_timeout,
        handshake::negotiate(
            &mut reader,
            &mut writer,
            &*exports,
            cfg.max_payload,
            &mut shutdown,
        ),
    )
    .await;
    match negotiated {
        Ok(Ok(HandshakeEnd::Transmission(session))) => {
            tracing::debug!(peer, export = %session.name, "NBD handshake done");
            transmission::run(
                reader,
                writer,
                session,
                cfg,
                Arc::clone(&stats),
                shutdown,
                &peer,
            )
            .await;
        }
        Ok(Ok(HandshakeEnd::Closed)) => tracing::debug!(peer, "NBD session ended in handshake"),
        Ok(Err(HandshakeError::Violation(what))) => {
            stats::inc(&stats.handshakes_failed_total);
            stats::inc(&stats.protocol_violations_total);
            tracing::warn!(peer, "NBD protocol violation in handshake: {what}; closing");
        }
        Ok(Err(e)) => {
            stats::inc(&stats.handshakes_failed_total);
            tracing::info!(peer, error = %e, "NBD handshake failed");
        }
        Err(_) => {
            stats::inc(&stats.handshakes_failed_total);
            tracing::warn!(peer, timeout = ?cfg.handshake_timeout, "NBD handshake timed out");
        }
    }
    stats::dec(&stats.connections_active);
}
