//! The command line: `replicator daemon` and the dmsetup-style client subcommands.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::control::{DeviceStatus, Request, Response, CONTROL_DEFAULT, CONTROL_ENV};

#[derive(Parser, Debug)]
#[command(
    name = "replicator",
    version,
    about = "Asynchronous remote replication of block device groups"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ControlArg {
    /// The daemon's control socket.
    #[arg(long, env = CONTROL_ENV, default_value = CONTROL_DEFAULT)]
    pub control: PathBuf,
}

/// Link settings with their defaults (slink::SiteConfig documents each bound).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LinkTuning {
    /// Send a keepalive this often (e.g. 1s, 500ms). Default: 1s.
    #[arg(long)]
    pub link_keepalive: Option<String>,
    /// Declare a silent peer dead after this long. Default: 5s.
    #[arg(long)]
    pub link_dead_after: Option<String>,
    /// Unacknowledged bytes in flight per link. Default: 16 MiB (about 1 Gbit/s x 100 ms).
    #[arg(long)]
    pub link_window_bytes: Option<usize>,
}

pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("bad duration `{s}`"))?;
    match unit {
        "ms" => Ok(std::time::Duration::from_millis(n)),
        "s" => Ok(std::time::Duration::from_secs(n)),
        "m" => Ok(std::time::Duration::from_secs(n * 60)),
        _ => Err(format!("bad duration `{s}`: use ms, s or m")),
    }
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant, reason = "parsed once at start-up")]
pub enum Command {
    /// Run the daemon in the foreground.
    Daemon {
        #[command(flatten)]
        control: ControlArg,
        /// NBD listen address (host:port).
        #[arg(long)]
        nbd: Option<String>,
        /// NBD listen Unix socket.
        #[arg(long)]
        nbd_unix: Option<PathBuf>,
        /// Prometheus metrics listen address (host:port), serving /metrics.
        #[arg(long)]
        metrics: Option<String>,
        /// Where created devices are recorded, to come back after a restart.
        #[arg(long, default_value = "/var/lib/replicator")]
        state_dir: PathBuf,
        /// Shell command run on every event (REPLICATOR_GROUP, REPLICATOR_EVENT, ... in its env).
        #[arg(long)]
        event_hook: Option<String>,
        /// This site's id (1-64 of [A-Za-z0-9._-]); needed for tcp slinks either way.
        #[arg(long)]
        site_id: Option<String>,
        /// File holding the pre-shared key of the sites' links (at least 16 bytes; never sent).
        #[arg(long)]
        psk_file: Option<PathBuf>,
        /// Accept tcp slinks from primaries on this address (this site holds secondary groups).
        #[arg(long)]
        slink_listen: Option<String>,
        /// A site allowed to connect: SITE (ships writes) or SITE:ro (may not ship). Repeatable;
        /// no entry, no connection.
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// The site id that answers at an address named by a tcp slink: SITE@HOST:PORT.
        /// Repeatable.
        #[arg(long = "peer")]
        peers: Vec<String>,
        #[command(flatten)]
        link_tuning: LinkTuning,
        /// How often sites make their devices durable and save their cursors (the replog covers
        /// what lies between; a longer interval merges overwrites, a shorter one shortens replay
        /// after a crash). Also forced when the ring is half full.
        #[arg(long, default_value = "5s")]
        checkpoint_interval: String,
        /// How replogs are written: `buffered` (page cache; flushes make entries durable) or
        /// `direct` (O_DIRECT).
        #[arg(long, default_value = "buffered", value_parser = ["buffered", "direct"])]
        replog_io: String,
    },
    /// Create a device from a mapping table file ("-" reads standard input).
    Create {
        #[command(flatten)]
        control: ControlArg,
        /// Create the device in the secondary role: a primary's tcp slink ships to it; its NBD
        /// export is read-only.
        #[arg(long)]
        secondary: bool,
        name: String,
        table: PathBuf,
    },
    /// Flush and remove a device (the group goes with its last device).
    Remove {
        #[command(flatten)]
        control: ControlArg,
        name: String,
    },
    /// List devices.
    Ls {
        #[command(flatten)]
        control: ControlArg,
    },
    /// Show a device's status: a dm-style line, or JSON with stable field names.
    Status {
        #[command(flatten)]
        control: ControlArg,
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Print the table a device was created from.
    Table {
        #[command(flatten)]
        control: ControlArg,
        name: String,
    },
    /// Send a message to a device (`message NAME 0 checkpoint`, `message NAME 0 resync 1`).
    Message {
        #[command(flatten)]
        control: ControlArg,
        name: String,
        sector: u64,
        #[arg(required = true, num_args = 1..)]
        message: Vec<String>,
    },
    /// Wait for an event after EVENT_NR (default: the current one) and print the new event number.
    Wait {
        #[command(flatten)]
        control: ControlArg,
        name: String,
        event_nr: Option<u64>,
    },
    /// Operate on replog files directly (no daemon).
    Replog {
        #[command(subcommand)]
        cmd: ReplogCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReplogCommand {
    /// Print a replog's metadata, cursors, lag per slink and entries, without changing it.
    Inspect {
        path: PathBuf,
        /// Byte offset of the replog inside the file or device.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Entries to list at most.
        #[arg(long, default_value_t = 20)]
        max_entries: usize,
        #[arg(long)]
        json: bool,
    },
}

/// Send one request to the daemon and read its answer.
pub fn call(control: &ControlArg, req: &Request) -> Result<Response, String> {
    let mut s = UnixStream::connect(&control.control).map_err(|e| {
        format!(
            "cannot reach the daemon at {} ({e}); is `replicator daemon` running? (--control or ${CONTROL_ENV})",
            control.control.display()
        )
    })?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    s.write_all(&line).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    BufReader::new(s)
        .read_line(&mut resp)
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&resp).map_err(|e| format!("bad answer from daemon: {e}"))
}

fn body(control: &ControlArg, req: &Request) -> Result<serde_json::Value, String> {
    let r = call(control, req)?;
    if r.ok {
        Ok(r.body)
    } else {
        Err(r.error.unwrap_or_else(|| "failed".into()))
    }
}

/// Run a client subcommand; returns the process exit code.
pub fn run_client(cmd: Command) -> Result<(), String> {
    match cmd {
        Command::Daemon { .. } => Err("internal: daemon is not a client command".into()),
        Command::Create {
            control,
            secondary,
            name,
            table,
        } => {
            let (text, source) = if table.as_os_str() == "-" {
                let mut t = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)
                    .map_err(|e| e.to_string())?;
                (t, "<stdin>".to_string())
            } else {
                (
                    std::fs::read_to_string(&table)
                        .map_err(|e| format!("{}: {e}", table.display()))?,
                    table.display().to_string(),
                )
            };
            let cwd = std::env::current_dir()
                .map_err(|e| e.to_string())?
                .display()
                .to_string();
            let v = body(
                &control,
                &Request::Create {
                    name,
                    table: text,
                    source,
                    cwd,
                    secondary,
                },
            )?;
            for w in v["warnings"].as_array().into_iter().flatten() {
                eprintln!("warning: {}", w.as_str().unwrap_or_default());
            }
            Ok(())
        }
        Command::Remove { control, name } => body(&control, &Request::Remove { name }).map(|_| ()),
        Command::Ls { control } => {
            let v = body(&control, &Request::Ls)?;
            for d in v.as_array().into_iter().flatten() {
                println!(
                    "{}\t(dev {}, {} bytes, replog {})",
                    d["name"].as_str().unwrap_or(""),
                    d["dev_nr"],
                    d["size_bytes"],
                    d["replog"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
        Command::Status {
            control,
            name,
            json,
        } => {
            let v = body(&control, &Request::Status { name })?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
                );
            } else {
                let st: DeviceStatus = serde_json::from_value(v).map_err(|e| e.to_string())?;
                println!("{}", st.line);
            }
            Ok(())
        }
        Command::Table { control, name } => {
            let v = body(&control, &Request::Table { name })?;
            print!("{}", v.as_str().unwrap_or(""));
            Ok(())
        }
        Command::Message {
            control,
            name,
            sector,
            message,
        } => body(
            &control,
            &Request::Message {
                name,
                sector,
                args: message,
            },
        )
        .map(|_| ()),
        Command::Wait {
            control,
            name,
            event_nr,
        } => {
            let v = body(&control, &Request::Wait { name, event_nr })?;
            println!("{}", v["event_nr"]);
            Ok(())
        }
        Command::Replog {
            cmd:
                ReplogCommand::Inspect {
                    path,
                    offset,
                    max_entries,
                    json,
                },
        } => {
            let ins = replog::Replog::inspect(&path, offset, max_entries)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&ins).map_err(|e| e.to_string())?
                );
            } else {
                let v = serde_json::to_value(&ins).map_err(|e| e.to_string())?;
                print!("{}", render_inspection(&v));
            }
            Ok(())
        }
    }
}

/// The text form of `replog inspect`: the same facts as `--json`, one per line.
fn render_inspection(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let field = |k: &str| v.get(k).map(|x| x.to_string()).unwrap_or_default();
    for k in [
        "path",
        "offset",
        "format_version",
        "uuid",
        "role",
        "current_epoch",
        "binding",
        "metadata_slot",
        "capacity_bytes",
        "used_bytes",
        "entries_total",
        "first_lsn",
        "last_lsn",
        "stop",
    ] {
        out.push_str(&format!("{k:<16} {}\n", field(k)));
    }
    if let Some(m) = v.get("metadata") {
        out.push_str(&format!("{:<16} {m}\n", "metadata"));
    }
    out.push_str("slinks:\n");
    for s in v
        .get("slinks")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
    {
        out.push_str(&format!("  {s}\n"));
    }
    out.push_str("entries:\n");
    for e in v
        .get("entries")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
    {
        out.push_str(&format!("  {e}\n"));
    }
    out
}

/// Build the daemon's link identity from its flags (None when no tcp link is configured).
pub fn link_settings(
    site_id: Option<String>,
    psk_file: Option<PathBuf>,
    allow: &[String],
    peers: &[String],
    tuning: &LinkTuning,
) -> Result<Option<replicator_link::LinkSettings>, String> {
    let (site_id, psk_file) = match (site_id, psk_file) {
        (None, None) if allow.is_empty() && peers.is_empty() => return Ok(None),
        (Some(s), Some(p)) => (s, p),
        _ => {
            return Err(
                "tcp slinks need both --site-id and --psk-file (and --allow / --peer)".into(),
            )
        }
    };
    let site = slink::SiteId::new(&site_id).map_err(|e| format!("--site-id: {e:?}"))?;
    let key = std::fs::read(&psk_file).map_err(|e| format!("{}: {e}", psk_file.display()))?;
    let key: Vec<u8> = {
        // A key file usually ends with a newline; it is not part of the key.
        let mut k = key;
        while k.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            k.pop();
        }
        k
    };
    let psk = slink::Psk::new(key).map_err(|e| format!("{}: {e}", psk_file.display()))?;
    let mut cfg = slink::SiteConfig::new(site, psk);
    for a in allow {
        let (name, perm) = match a.strip_suffix(":ro") {
            Some(n) => (n, slink::Permission::ReadOnly),
            None => (a.as_str(), slink::Permission::ReadWrite),
        };
        let id = slink::SiteId::new(name).map_err(|e| format!("--allow {a}: {e:?}"))?;
        cfg = cfg.allow(id, perm);
    }
    if let Some(k) = &tuning.link_keepalive {
        cfg.keepalive_interval = parse_duration(k).map_err(|e| format!("--link-keepalive: {e}"))?;
    }
    if let Some(d) = &tuning.link_dead_after {
        cfg.dead_peer_timeout = parse_duration(d).map_err(|e| format!("--link-dead-after: {e}"))?;
    }
    if let Some(w) = tuning.link_window_bytes {
        cfg.window_bytes = w;
    }
    cfg.validate().map_err(|e| format!("link settings: {e}"))?;
    let mut map = std::collections::HashMap::new();
    for p in peers {
        let (name, addr) = p
            .split_once('@')
            .ok_or_else(|| format!("--peer {p}: expected SITE@HOST:PORT"))?;
        let id = slink::SiteId::new(name).map_err(|e| format!("--peer {p}: {e:?}"))?;
        map.insert(addr.to_string(), id);
    }
    Ok(Some(replicator_link::LinkSettings {
        site: cfg,
        peers: map,
    }))
}

use crate::engine::tcp as replicator_link;
