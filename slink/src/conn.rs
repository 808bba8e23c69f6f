//! Moving frames over a byte stream: a cancel-safe frame reader that counts what it sees, a frame
//! writer, and socket setup (large buffers, no Nagle: the sender batches on its own).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::counters::Counters;
use crate::error::LinkError;
use crate::frame::{self, Frame};

/// Bytes asked of the socket per read.
pub const READ_CHUNK_BYTES: usize = 256 << 10;

/// Reads frames from a stream. The buffer lives here, so [`FrameReader::read_frame`] can be
/// cancelled (in `select!`) without losing bytes. It holds at most one frame plus one read chunk.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    max_payload: usize,
    counters: Arc<Counters>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_payload: usize, counters: Arc<Counters>) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            max_payload,
            counters,
        }
    }

    /// Raises (or lowers) the largest payload accepted, e.g. after authentication.
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.max_payload = max_payload;
    }

    /// A frame already in the buffer, without reading.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, LinkError> {
        let before = self.buf.len();
        match frame::decode(&mut self.buf, self.max_payload) {
            Ok(Some(f)) => {
                Counters::inc(&self.counters.frames_received);
                let used = before.saturating_sub(self.buf.len());
                Counters::add(&self.counters.bytes_received, used as u64);
                Ok(Some(f))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                if e.is_crc() {
                    Counters::inc(&self.counters.crc_errors);
                } else {
                    Counters::inc(&self.counters.bad_frames);
                }
                Err(LinkError::Frame(e))
            }
        }
    }

    /// The next frame; `Ok(None)` when the peer closed cleanly between frames. Cancel safe.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(Some(f));
            }
            self.buf.reserve(READ_CHUNK_BYTES);
            let n = self
                .inner
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| LinkError::io("reading from peer", e))?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(LinkError::Closed(" in the middle of a frame"));
            }
        }
    }

    /// The next frame, treating a clean close as an error.
    pub async fn expect_frame(&mut self) -> Result<Frame, LinkError> {
        self.read_frame()
            .await?
            .ok_or(LinkError::Closed(" during the handshake"))
    }
}

/// Encodes one frame.
pub fn encode(frame: &Frame) -> Result<Bytes, LinkError> {
    frame.to_bytes().map_err(LinkError::Frame)
}

/// Writes one encoded frame and counts it.
pub async fn write_bytes<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    counters: &Counters,
) -> Result<(), LinkError> {
    w.write_all(bytes)
        .await
        .map_err(|e| LinkError::io("writing to peer", e))?;
    Counters::inc(&counters.frames_sent);
    Counters::add(&counters.bytes_sent, bytes.len() as u64);
    Ok(())
}

/// Encodes and writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
    counters: &Counters,
) -> Result<(), LinkError> {
    let bytes = encode(frame)?;
    write_bytes(w, &bytes, counters).await
}

fn socket_for(addr: &SocketAddr, buffer_bytes: u32) -> std::io::Result<TcpSocket> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if buffer_bytes > 0 {
        // The kernel caps these at net.core.{w,r}mem_max; a smaller buffer is not an error.
        s.set_send_buffer_size(buffer_bytes)?;
        s.set_recv_buffer_size(buffer_bytes)?;
    }
    Ok(s)
}

/// Connects with large socket buffers (set before connect so the window scale covers them).
pub async fn connect(addr: SocketAddr, buffer_bytes: u32) -> Result<TcpStream, LinkError> {
    let s = socket_for(&addr, buffer_bytes).map_err(|e| LinkError::io("creating socket", e))?;
    let stream = s
        .connect(addr)
        .await
        .map_err(|e| LinkError::io("connecting", e))?;
    stream
        .set_nodelay(true)
        .map_err(|e| LinkError::io("setting TCP_NODELAY", e))?;
    Ok(stream)
}

/// Binds a listener whose accepted sockets inherit large buffers.
pub fn listen(addr: SocketAddr, buffer_bytes: u32) -> Result<TcpListener, LinkError> {
    let s = socket_for(&addr, buffer_bytes).map_err(|e| LinkError::io("creating socket", e))?;
    s.set_reuseaddr(true)
        .map_err(|e| LinkError::io("setting SO_REUSEADDR", e))?;
    s.bind(addr).map_err(|e| LinkError::io("binding", e))?;
    s.listen(1024).map_err(|e| LinkError::io("listening", e))
}
