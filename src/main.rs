use clap::Parser;

use replicator::cli::{Cli, Command};
use replicator::daemon::{self, DaemonConfig};

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Command::Daemon {
            control,
            nbd,
            nbd_unix,
            metrics,
            state_dir,
            event_hook,
            site_id,
            psk_file,
            slink_listen,
            allow,
            peers,
            link_tuning,
            checkpoint_interval,
            replog_io,
        } => {
            daemon::allocator::tune_for_large_buffers();
            let checkpoint_interval = match replicator::cli::parse_duration(&checkpoint_interval) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("replicator: --checkpoint-interval: {e}");
                    std::process::exit(2);
                }
            };
            let links = match replicator::cli::link_settings(
                site_id,
                psk_file,
                &allow,
                &peers,
                &link_tuning,
            ) {
                Ok(l) => l.map(std::sync::Arc::new),
                Err(e) => {
                    eprintln!("replicator: {e}");
                    std::process::exit(2);
                }
            };
            let slink_listen = match slink_listen.map(|a| a.parse::<std::net::SocketAddr>()) {
                None => None,
                Some(Ok(a)) => Some(a),
                Some(Err(e)) => {
                    eprintln!("replicator: --slink-listen: {e}");
                    std::process::exit(2);
                }
            };
            let cfg = DaemonConfig {
                control: control.control,
                nbd,
                nbd_unix,
                metrics,
                state_dir,
                event_hook,
                links,
                slink_listen,
                driver: replicator::driver::DriverConfig {
                    replog_direct: replog_io == "direct",
                    // At least 10 ms: a checkpoint syncs devices.
                    checkpoint_interval: checkpoint_interval
                        .max(std::time::Duration::from_millis(10)),
                    ..Default::default()
                },
            };
            match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(daemon::run(cfg)),
                Err(e) => Err(format!("tokio runtime: {e}")),
            }
        }
        other => replicator::cli::run_client(other),
    };
    if let Err(e) = result {
        eprintln!("replicator: {e}");
        std::process::exit(1);
    }
}
