//! The daemon's side of the control protocol (see `crate::control`).

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::control::{Request, Response, REQUEST_BYTES_MAX};

use super::registry::Registry;
use super::state::{DeviceRecord, StateDir};

pub async fn serve(
    listener: UnixListener,
    registry: Arc<Registry>,
    state: Arc<StateDir>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((sock, _)) = accepted else { continue };
        let registry = registry.clone();
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(sock, registry, state).await {
                tracing::debug!("control connection: {e}");
            }
        });
    }
}

async fn handle(
    sock: UnixStream,
    registry: Arc<Registry>,
    state: Arc<StateDir>,
) -> std::io::Result<()> {
    let (rd, mut wr) = sock.into_split();
    let mut line = String::new();
    let n = BufReader::new(rd.take(REQUEST_BYTES_MAX as u64))
        .read_line(&mut line)
        .await?;
    let resp = if n == 0 {
        return Ok(());
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(req, &registry, &state).await,
            Err(e) => Response::err(format!("bad control request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.shutdown().await
}

async fn answer(req: Request, registry: &Arc<Registry>, state: &Arc<StateDir>) -> Response {
    match req {
        Request::Create {
            name,
            table,
            source,
            cwd,
            secondary,
        } => {
            let reg = registry.clone();
            let (n, t, s, c) = (name.clone(), table.clone(), source.clone(), cwd.clone());
            let role = if secondary {
                crate::engine::group::Role::Secondary
            } else {
                crate::engine::group::Role::Primary
            };
            let created = tokio::task::spawn_blocking(move || {
                reg.create(&n, &t, &s, Path::new(&c), false, role)
            })
            .await;
            match created {
                Ok(Ok(h)) => {
                    let rec = DeviceRecord {
                        seq: state.next_seq(),
                        name: name.clone(),
                        table,
                        source,
                        cwd,
                        secondary,
                    };
                    if let Err(e) = state.save(&rec) {
                        return Response::err(format!(
                            "created {name} but could not record it in the state dir: {e}"
                        ));
                    }
                    let warnings: Vec<String> = crate::table::parse(&rec.table, &rec.source)
                        .map(|t| t.warnings.iter().map(|w| w.to_string()).collect())
                        .unwrap_or_default();
                    Response::ok(serde_json::json!({
                        "name": name, "dev_nr": h.dev_nr, "size_bytes": h.size, "warnings": warnings,
                    }))
                }
                Ok(Err(e)) => Response::err(e),
                Err(e) => Response::err(format!("create failed: {e}")),
            }
        }
        Request::Remove { name } => match registry.remove(&name).await {
            Ok(()) => match state.delete(&name) {
                Ok(()) => Response::ok(serde_json::Value::Null),
                Err(e) => Response::err(format!("removed {name}; state dir: {e}")),
            },
            Err(e) => Response::err(e),
        },
        Request::Ls => {
            let list: Vec<_> = registry
                .names()
                .into_iter()
                .filter_map(|n| registry.get(&n))
                .map(|h| {
                    serde_json::json!({
                        "name": h.name,
                        "dev_nr": h.dev_nr,
                        "size_bytes": h.size,
                        "replog": h.group.replog_path.display().to_string(),
                    })
                })
                .collect();
            Response::ok(serde_json::Value::Array(list))
        }
        Request::Status { name } => match registry.status(&name) {
            Some(st) => Response::ok(serde_json::to_value(st).unwrap_or_default()),
            None => Response::err(format!("no device `{name}`")),
        },
        Request::Table { name } => match registry.get(&name) {
            Some(h) => Response::ok(serde_json::Value::String(h.table)),
            None => Response::err(format!("no device `{name}`")),
        },
        Request::Message { name, sector, args } => match registry.get(&name) {
            Some(h) => super::registry::message(&h, sector, &args).await,
            None => Response::err(format!("no device `{name}`")),
        },
        Request::Wait { name, event_nr } => match registry.get(&name) {
            Some(h) => {
                let after = event_nr.unwrap_or_else(|| h.group.events.current());
                let nr = h.group.events.wait_after(after).await;
                Response::ok(
                    serde_json::json!({ "event_nr": nr, "events": h.group.events.history().into_iter().filter(|e| e.nr > after).collect::<Vec<_>>() }),
                )
            }
            None => Response::err(format!("no device `{name}`")),
        },
    }
}
