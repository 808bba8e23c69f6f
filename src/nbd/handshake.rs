//! Fixed newstyle handshake and option haggling, up to the start of transmission.
//!
//! One function, [`negotiate`], drives a connection from the greeting to either transmission
//! (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`) or a client-initiated end (`NBD_OPT_ABORT`, EOF).
//! Option payloads are read into memory only up to [`proto::MAX_OPTION_LEN`]; longer ones are
//! skipped in bounded chunks.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::watch;

use super::check::{negotiate_block_sizes, Limits};
use super::export::{Export, Exports};
use super::proto::{self, ClientFlags};
use super::wait_shutdown;

/// Outcome of a handshake that did not fail.
pub(crate) enum HandshakeEnd<X> {
    /// Enter transmission with this export.
    Transmission(Negotiated<X>),
    /// The client ended the session (`NBD_OPT_ABORT`, EOF between options) or the server is
    /// shutting down.
    Closed,
}

/// What transmission needs from negotiation.
pub(crate) struct Negotiated<X> {
    pub export: Arc<X>,
    pub name: String,
    pub limits: Limits,
    pub flags: u16,
}

/// Why a handshake failed (the connection is dropped).
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("I/O error during handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke a MUST of the protocol.
    #[error("protocol violation: {0}")]
    Violation(String),
    /// `NBD_OPT_EXPORT_NAME` named an export we do not have; the spec says to terminate.
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
}

/// Per-connection negotiation state.
struct Session {
    client: ClientFlags,
    structured: bool,
    /// Export name the last `NBD_OPT_SET_META_CONTEXT` selected `base:allocation` for.
    meta_export: Option<String>,
    /// `ServerConfig::max_payload`, the cap on the advertised maximum block size.
    max_payload: u32,
}

/// Runs the handshake on a fresh connection. The buffered halves are passed in (not owned) so
/// that bytes a client pipelines right after `NBD_OPT_GO` stay in the buffer for transmission.
pub(crate) async fn negotiate<E, R, W>(
    reader: &mut BufReader<R>,
    writer: &mut BufWriter<W>,
    exports: &E,
    max_payload: u32,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<HandshakeEnd<E::Export>, HandshakeError>
where
    E: Exports,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    writer.write_all(&proto::encode_greeting()).await?;
    writer.flush().await?;
    let raw_flags = reader.read_u32().await?;
    let client = proto::decode_client_flags(raw_flags)
        .map_err(|f| HandshakeError::Violation(format!("unknown client flags {f:#x}")))?;
    let mut session = Session {
        client,
        structured: false,
        meta_export: None,
        max_payload,
    };

    loop {
        let mut raw = [0u8; 16];
        tokio::select! {
            biased;
            _ = wait_shutdown(shutdown) => return Ok(HandshakeEnd::Closed),
            read = reader.read_exact(&mut raw) => match read {
                Ok(_) => {}
                // A client may simply go away between options (e.g. after NBD_OPT_LIST).
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(HandshakeEnd::Closed)
                }
                Err(e) => return Err(e.into()),
            },
        }
        let header = proto::decode_option_header(&raw)
            .map_err(|m| HandshakeError::Violation(format!("bad option magic {m:#018x}")))?;

        if header.length > proto::MAX_OPTION_LEN {
            skip(reader, u64::from(header.length)).await?;
            if header.option == proto::OPT_EXPORT_NAME {
                return Err(HandshakeError::Violation(format!(
                    "NBD_OPT_EXPORT_NAME with {} byte name",
                    header.length
                )));
            }
            let reply = if is_known_option(header.option) {
                proto::REP_ERR_TOO_BIG
            } else {
                proto::REP_ERR_UNSUP
            };
            send_error(writer, header.option, reply, "option data too long").await?;
            continue;
        }
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data).await?;

        if *shutdown.borrow() && header.option != proto::OPT_ABORT {
            if header.option == proto::OPT_EXPORT_NAME {
                return Ok(HandshakeEnd::Closed);
            }
            send_error(
                writer,
                header.option,
                proto::REP_ERR_SHUTDOWN,
                "server shutting down",
            )
            .await?;
            continue;
        }

        match header.option {
            proto::OPT_EXPORT_NAME => {
                let name = std::str::from_utf8(&data)
                    .map_err(|_| HandshakeError::Violation("export name not UTF-8".into()))?;
                let Some((canonical, export)) = resolve(exports, name) else {
                    return Err(HandshakeError::UnknownExport(name.to_owned()));
                };
                let negotiated = session.finish(name, canonical, export);
                writer
                    .write_all(&proto::encode_export_name_reply(
                        negotiated.limits.size,
                        negotiated.flags,
                        session.client.no_zeroes,
                    ))
                    .await?;
                writer.flush().await?;
                return Ok(HandshakeEnd::Transmission(negotiated));
            }
            proto::OPT_ABORT => {
                // The client may already have closed; a failed ACK is not an error.
                let _ = send_reply(writer, header.option, proto::REP_ACK, &[]).await;
                return Ok(HandshakeEnd::Closed);
            }
            proto::OPT_LIST => {
                if !data.is_empty() {
                    send_error(
                        writer,
                        header.option,
                        proto::REP_ERR_INVALID,
                        "data not allowed",
                    )
                    .await?;
                    continue;
                }
                for name in exports.list() {
                    if name.len() <= proto::MAX_STRING_LEN {
                        let body = proto::encode_rep_server(&name);
                        queue_reply(writer, header.option, proto::REP_SERVER, &body).await?;
                    }
                }
                send_reply(writer, header.option, proto::REP_ACK, &[]).await?;
            }
            proto::OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(
                        writer,
                        header.option,
                        proto::REP_ERR_INVALID,
                        "data not allowed",
                    )
                    .await?;
                } else if session.structured {
                    send_error(writer, header.option, proto::REP_ERR_INVALID, "already on").await?;
                } else {
                    session.structured = true;
                    send_reply(writer, header.option, proto::REP_ACK, &[]).await?;
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                let Ok(request) = proto::decode_info_request(&data) else {
                    send_error(writer, header.option, proto::REP_ERR_INVALID, "malformed").await?;
                    continue;
                };
                let Some((canonical, export)) = resolve(exports, request.name) else {
                    send_error(
                        writer,
                        header.option,
                        proto::REP_ERR_UNKNOWN,
                        "no such export",
                    )
                    .await?;
                    continue;
                };
                let negotiated = session.finish(request.name, canonical, export);
                send_info(writer, header.option, &negotiated, &request.info_requests).await?;
                send_reply(writer, header.option, proto::REP_ACK, &[]).await?;
                if header.option == proto::OPT_GO {
                    return Ok(HandshakeEnd::Transmission(negotiated));
                }
            }
            proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                let set = header.option == proto::OPT_SET_META_CONTEXT;
                if set {
                    // Replaced even when this request fails.
                    session.meta_export = None;
                }
                if !session.structured {
                    send_error(
                        writer,
                        header.option,
                        proto::REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let Ok(request) = proto::decode_meta_context_request(&data) else {
                    send_error(writer, header.option, proto::REP_ERR_INVALID, "malformed").await?;
                    continue;
                };
                if resolve(exports, request.export).is_none() {
                    send_error(
                        writer,
                        header.option,
                        proto::REP_ERR_UNKNOWN,
                        "no such export",
                    )
                    .await?;
                    continue;
                }
                if selects_base_allocation(&request.queries, set) {
                    let (id, note) = if set {
                        session.meta_export = Some(request.export.to_owned());
                        (proto::META_BASE_ALLOCATION_ID, "selected")
                    } else {
                        // Ids in list replies are reserved and should be zero.
                        (0, "listed")
                    };
                    tracing::debug!(context = proto::META_BASE_ALLOCATION, note);
                    let body = proto::encode_meta_context(id, proto::META_BASE_ALLOCATION);
                    queue_reply(writer, header.option, proto::REP_META_CONTEXT, &body).await?;
                }
                send_reply(writer, header.option, proto::REP_ACK, &[]).await?;
            }
            other => {
                // STARTTLS, EXTENDED_HEADERS and anything unknown: not supported, and the
                // session goes on (the data was already consumed).
                send_error(writer, other, proto::REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

impl Session {
    /// Builds the transmission parameters for `export` as the client would get them now.
    fn finish<X: Export>(
        &self,
        requested: &str,
        canonical: String,
        export: Arc<X>,
    ) -> Negotiated<X> {
        let read_only = export.read_only();
        let flags = proto::transmission_flags(read_only, export.multi_conn(), self.structured);
        let meta_context = match &self.meta_export {
            Some(name) if self.structured && name == requested => {
                Some(proto::META_BASE_ALLOCATION_ID)
            }
            _ => None,
        };
        let sizes = negotiate_block_sizes(export.block_size(), self.max_payload);
        Negotiated {
            limits: Limits {
                size: export.size(),
                sizes,
                read_only,
                structured: self.structured,
                meta_context,
            },
            flags,
            export,
            name: canonical,
        }
    }
}

/// Whether the queries select (`set`) or list (`!set`) `base:allocation`.
/// For listing, no query at all and the `base:` wildcard also match; for selecting, only the
/// exact name does. Queries in other namespaces are ignored, as the spec requires.
fn selects_base_allocation(queries: &[&str], set: bool) -> bool {
    if queries.is_empty() {
        return !set;
    }
    queries
        .iter()
        .any(|q| *q == proto::META_BASE_ALLOCATION || (!set && *q == "base:"))
}

fn is_known_option(option: u32) -> bool {
    matches!(
        option,
        proto::OPT_EXPORT_NAME
            | proto::OPT_ABORT
            | proto::OPT_LIST
            | proto::OPT_INFO
            | proto::OPT_GO
            | proto::OPT_STRUCTURED_REPLY
            | proto::OPT_LIST_META_CONTEXT
            | proto::OPT_SET_META_CONTEXT
    )
}

/// The export a name refers to, with its canonical name (the empty name is the default export).
fn resolve<E: Exports>(exports: &E, name: &str) -> Option<(String, Arc<E::Export>)> {
    let canonical = if name.is_empty() {
        exports.default_export()?
    } else {
        name.to_owned()
    };
    let export = exports.lookup(&canonical)?;
    Some((canonical, export))
}

/// Sends the `NBD_REP_INFO` replies for INFO/GO: always `NBD_INFO_EXPORT` and
/// `NBD_INFO_BLOCK_SIZE` (we enforce a minimum block size, so we always tell), plus name and
/// description when asked.
async fn send_info<W, X>(
    writer: &mut BufWriter<W>,
    option: u32,
    negotiated: &Negotiated<X>,
    requested: &[u16],
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + Send,
    X: Export,
{
    let l = &negotiated.limits;
    let export = proto::encode_info_export(l.size, negotiated.flags);
    queue_reply(writer, option, proto::REP_INFO, &export).await?;
    let sizes = proto::encode_info_block_size(l.sizes.min, l.sizes.preferred, l.sizes.max);
    queue_reply(writer, option, proto::REP_INFO, &sizes).await?;
    if requested.contains(&proto::INFO_NAME) && negotiated.name.len() <= proto::MAX_STRING_LEN {
        let body = proto::encode_info_string(proto::INFO_NAME, &negotiated.name);
        queue_reply(writer, option, proto::REP_INFO, &body).await?;
    }
    if requested.contains(&proto::INFO_DESCRIPTION) {
        let description = negotiated.export.description();
        if !description.is_empty() && description.len() <= proto::MAX_STRING_LEN {
            let body = proto::encode_info_string(proto::INFO_DESCRIPTION, &description);
            queue_reply(writer, option, proto::REP_INFO, &body).await?;
        }
    }
    Ok(())
}

/// Writes one option reply into the buffer without flushing.
async fn queue_reply<W: AsyncWrite + Unpin + Send>(
    writer: &mut BufWriter<W>,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let header = proto::encode_option_reply_header(option, reply_type, data.len() as u32);
    writer.write_all(&header).await?;
    writer.write_all(data).await
}

/// Writes one option reply and flushes (a final reply: the client waits for it).
async fn send_reply<W: AsyncWrite + Unpin + Send>(
    writer: &mut BufWriter<W>,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> std::io::Result<()> {
    queue_reply(writer, option, reply_type, data).await?;
    writer.flush().await
}

/// Sends an error reply with a human-readable message.
async fn send_error<W: AsyncWrite + Unpin + Send>(
    writer: &mut BufWriter<W>,
    option: u32,
    reply_type: u32,
    message: &str,
) -> std::io::Result<()> {
    send_reply(writer, option, reply_type, message.as_bytes()).await
}

/// Reads and drops `len` bytes through a fixed-size buffer.
pub(crate) async fn skip<R: AsyncRead + Unpin + Send>(
    reader: &mut BufReader<R>,
    len: u64,
) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *reader).take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_context_queries() {
        assert!(selects_base_allocation(&[], false));
        assert!(!selects_base_allocation(&[], true));
        assert!(selects_base_allocation(&["base:"], false));
        assert!(!selects_base_allocation(&["base:"], true));
        assert!(selects_base_allocation(
            &["qemu:dirty-bitmap:x", "base:allocation"],
            true
        ));
        assert!(!selects_base_allocation(&["qemu:allocation-depth"], true));
    }
}
