//! `replicator daemon`: holds any number of groups, exports their devices over NBD, answers the
//! CLI on a Unix socket, serves metrics, and survives restarts through its state directory.
//!
//! Runs in the foreground (systemd `Type=simple`). SIGTERM/SIGINT: stop accepting NBD clients,
//! let in-flight requests finish, flush every replog, let the appliers drain, exit 0.

pub mod allocator;
pub mod claims;
pub mod control_server;
pub mod export;
pub mod group;
pub mod link;
pub mod registry;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::nbd::{self, ServerConfig, ServerStats};

use self::export::RegistryExports;
use self::registry::Registry;
use self::state::StateDir;

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub control: PathBuf,
    pub nbd: Option<String>,
    pub nbd_unix: Option<PathBuf>,
    pub metrics: Option<String>,
    pub state_dir: PathBuf,
    pub event_hook: Option<String>,
    /// This site's link identity (tcp slinks out, and in with `slink_listen`).
    pub links: Option<Arc<crate::engine::tcp::LinkSettings>>,
    /// Accept primaries' links here (this daemon holds secondary groups).
    pub slink_listen: Option<std::net::SocketAddr>,
    /// How the groups run (what their tables do not say: replog I/O, checkpoint interval).
    pub driver: crate::driver::DriverConfig,
}

pub async fn run(cfg: DaemonConfig) -> Result<(), String> {
    let state = Arc::new(
        StateDir::open(&cfg.state_dir)
            .map_err(|e| format!("state dir {}: {e}", cfg.state_dir.display()))?,
    );
    let registry = Arc::new(Registry::new(
        cfg.event_hook.clone(),
        cfg.links.clone(),
        cfg.driver.clone(),
    ));

    // Restore groups: replogs are opened (never re-created) and recovered; appliers catch up
    // from their cursors.
    let records = state
        .load()
        .map_err(|e| format!("reading state dir: {e}"))?;
    for r in records {
        let reg = registry.clone();
        let rec = r.clone();
        let res = tokio::task::spawn_blocking(move || {
            let role = if rec.secondary {
                crate::engine::group::Role::Secondary
            } else {
                crate::engine::group::Role::Primary
            };
            reg.create(
                &rec.name,
                &rec.table,
                &rec.source,
                std::path::Path::new(&rec.cwd),
                true,
                role,
            )
        })
        .await
        .map_err(|e| e.to_string())?;
        match res {
            Ok(_) => tracing::info!(device = %r.name, "restored"),
            Err(e) => tracing::error!(device = %r.name, "not restored: {e}"),
        }
    }

    {
        let reg = registry.clone();
        tokio::task::spawn_blocking(move || reg.start_all())
            .await
            .map_err(|e| e.to_string())?;
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let nbd_stats = Arc::new(ServerStats::default());
    let exports = Arc::new(RegistryExports(registry.clone()));
    let mut tasks = Vec::new();

    if let Some(addr) = &cfg.nbd {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("NBD listen on {addr}: {e}"))?;
        tracing::info!(
            "NBD on {}",
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        );
        tasks.push(tokio::spawn(nbd::serve_tcp(
            l,
            exports.clone(),
            ServerConfig::default(),
            nbd_stats.clone(),
            shutdown_rx.clone(),
        )));
    }
    if let Some(path) = &cfg.nbd_unix {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .map_err(|e| format!("NBD listen on {}: {e}", path.display()))?;
        tasks.push(tokio::spawn(nbd::serve_unix(
            l,
            exports.clone(),
            ServerConfig::default(),
            nbd_stats.clone(),
            shutdown_rx.clone(),
        )));
    }
    if let Some(addr) = &cfg.metrics {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("metrics listen on {addr}: {e}"))?;
        let m = Arc::new(Metrics::new().map_err(|e| format!("metrics: {e}"))?);
        tokio::spawn(crate::metrics::serve(
            l,
            m,
            registry.clone(),
            nbd_stats.clone(),
            shutdown_rx.clone(),
        ));
    }

    if let Some(dir) = cfg.control.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&cfg.control);
    let control = UnixListener::bind(&cfg.control)
        .map_err(|e| format!("control socket {}: {e}", cfg.control.display()))?;
    tokio::spawn(control_server::serve(
        control,
        registry.clone(),
        state.clone(),
        shutdown_rx.clone(),
    ));

    let mut listener = None;
    if let Some(addr) = cfg.slink_listen {
        let links = cfg.links.as_ref().ok_or(
            "--slink-listen needs the site's identity: --site-id and --psk-file (and --allow)",
        )?;
        let sink = Arc::new(link::SecondarySink {
            registry: registry.clone(),
        });
        let l = slink::SlinkListener::bind(addr, links.site.clone(), sink)
            .map_err(|e| format!("slink listen on {addr}: {e}"))?;
        tracing::info!("accepting slinks on {}", l.local_addr());
        listener = Some(l);
    }

    tracing::info!(control = %cfg.control.display(), "replicator daemon ready");
    wait_for_signal().await;
    tracing::info!("stopping: draining NBD requests");
    let _ = shutdown_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    if let Some(l) = listener {
        l.shutdown().await;
    }
    let reg = registry.clone();
    let _ = tokio::task::spawn_blocking(move || reg.shutdown_all()).await;
    let _ = std::fs::remove_file(&cfg.control);
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
