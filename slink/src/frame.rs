//! The frame codec: the one module that owns the bytes on the wire (spec: `slink/PROTOCOL.md`).
//!
//! Decoding is two steps, as in mini-redis: [`check`] looks at a buffer and says whether a whole,
//! intact frame is there (`Incomplete` when more bytes are needed; an error for a bad magic, a bad
//! header or payload crc, an unknown type or a length over the limit), then [`parse`] turns the
//! checked bytes into a [`Frame`]. Neither step panics or allocates more than the frame's own
//! payload, whatever the input.

use bytes::{BufMut, Bytes, BytesMut};

use crate::types::{
    DeviceInfo, Entry, EntryKind, ResyncChunk, ResyncDone, SiteId, MAX_ENTRY_DATA_BYTES,
    SITE_ID_BYTES_MAX,
};

/// First four bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"SLNK";
/// Bytes of the frame header: magic, type, flags, reserved, payload length, payload crc32c,
/// header crc32c.
pub const FRAME_HEADER_BYTES: usize = 20;
/// Largest payload of any frame (one maximal Write entry fits with room to spare). A peer that
/// announces more is cut off before its payload is buffered.
pub const MAX_FRAME_PAYLOAD_BYTES: usize = 16 << 20;
/// Largest payload accepted before the peer is authenticated (handshake frames are small).
pub const MAX_HANDSHAKE_PAYLOAD_BYTES: usize = 64 << 10;
/// Protocol version spoken by this code.
pub const PROTOCOL_VERSION: u16 = 1;
/// Bytes of a handshake nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of an HMAC-SHA256 proof.
pub const PROOF_BYTES: usize = 32;
/// Most devices listed in a Hello.
pub const MAX_DEVICES: usize = 4096;
/// Longest message in an Error frame, in bytes (longer messages are cut at a char boundary).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// Frame type codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameType {
    Hello = 1,
    Challenge = 2,
    Auth = 3,
    Accept = 4,
    Entries = 16,
    Ack = 17,
    Ping = 18,
    Pong = 19,
    ResyncData = 20,
    ResyncDone = 21,
    Error = 255,
}

impl FrameType {
    pub fn from_code(code: u8) -> Option<FrameType> {
        Some(match code {
            1 => FrameType::Hello,
            2 => FrameType::Challenge,
            3 => FrameType::Auth,
            4 => FrameType::Accept,
            16 => FrameType::Entries,
            17 => FrameType::Ack,
            18 => FrameType::Ping,
            19 => FrameType::Pong,
            20 => FrameType::ResyncData,
            21 => FrameType::ResyncDone,
            255 => FrameType::Error,
            _ => return None,
        })
    }
}

/// Sender's opening message: who it is, whom it wants, which group and devices, its nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub features: u64,
    pub group_uuid: [u8; 16],
    pub epoch: u64,
    pub nonce: [u8; NONCE_BYTES],
    pub sender_site: SiteId,
    pub receiver_site: SiteId,
    pub devices: Vec<DeviceInfo>,
}

/// Receiver's answer to an allowed Hello: its features and its nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub features: u64,
    pub nonce: [u8; NONCE_BYTES],
}

/// Sender's proof that it holds the key (HMAC over the transcript so far).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Auth {
    pub proof: [u8; PROOF_BYTES],
}

/// Receiver admits the sender: its epoch, its durable position, the negotiated features and its
/// own proof (HMAC over the whole transcript including these fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    pub epoch: u64,
    pub durable_lsn: u64,
    pub durable_resync_seq: u64,
    pub features: u64,
    pub proof: [u8; PROOF_BYTES],
}

/// Highest entry lsn and resync seq the receiver has durably stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub durable_lsn: u64,
    pub resync_seq: u64,
}

/// Why a side refuses or closes. Codes are stable; the message is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// Anything else.
    Other = 1,
    /// The protocol version is not spoken here.
    Version = 2,
    /// The peer's site id has no allow entry here.
    NotAllowed = 3,
    /// The key proof did not verify.
    AuthFailed = 4,
    /// The group uuid is not known here (or is another group).
    GroupMismatch = 5,
    /// Device list or sizes differ.
    DeviceMismatch = 6,
    /// The epoch histories say the sender must not ship here.
    Epoch = 7,
    /// The Hello names another receiver site.
    WrongSite = 8,
    /// A malformed or unexpected frame.
    Protocol = 9,
    /// The peer may connect but not write (read-only allow entry).
    ReadOnly = 10,
    /// The receiving core failed to store what it got.
    StoreFailed = 11,
    /// The receiver is shutting down or replaced this session with a newer one.
    Closing = 12,
}

impl ErrorCode {
    pub fn from_code(code: u16) -> ErrorCode {
        match code {
            2 => ErrorCode::Version,
            3 => ErrorCode::NotAllowed,
            4 => ErrorCode::AuthFailed,
            5 => ErrorCode::GroupMismatch,
            6 => ErrorCode::DeviceMismatch,
            7 => ErrorCode::Epoch,
            8 => ErrorCode::WrongSite,
            9 => ErrorCode::Protocol,
            10 => ErrorCode::ReadOnly,
            11 => ErrorCode::StoreFailed,
            12 => ErrorCode::Closing,
            _ => ErrorCode::Other,
        }
    }
}

/// An error frame: a code and a message for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorFrame {
    /// An error frame; the message is cut to [`MAX_ERROR_MESSAGE_BYTES`] at a char boundary.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
        let mut message: String = message.into();
        if message.len() > MAX_ERROR_MESSAGE_BYTES {
            let mut cut = MAX_ERROR_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut = cut.saturating_sub(1);
            }
            message.truncate(cut);
        }
        ErrorFrame { code, message }
    }
}

/// Every frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Challenge(Challenge),
    Auth(Auth),
    Accept(Accept),
    /// A batch of entries, lsn strictly increasing, at least one.
    Entries(Vec<Entry>),
    Ack(Ack),
    Ping(u64),
    Pong(u64),
    ResyncData(ResyncChunk),
    ResyncDone(ResyncDone),
    Error(ErrorFrame),
}

/// What is wrong with bytes that were meant to be a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not an error of the bytes: more are needed before the frame can be checked.
    #[error("incomplete frame")]
    Incomplete,
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("frame header crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("frame payload crc32c mismatch ({frame_type:?}, {len} bytes): stored {stored:#010x}, computed {computed:#010x}")]
    PayloadCrc {
        frame_type: FrameType,
        len: usize,
        stored: u32,
        computed: u32,
    },
    #[error("frame payload of {len} bytes over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("nonzero flags or reserved bytes in frame header")]
    Reserved,
    #[error("malformed {frame_type:?} frame: {what}")]
    Malformed {
        frame_type: FrameType,
        what: &'static str,
    },
}

impl FrameError {
    /// True for checksum failures (a corrupted frame rather than a confused peer).
    pub fn is_crc(&self) -> bool {
        matches!(
            self,
            FrameError::HeaderCrc { .. } | FrameError::PayloadCrc { .. }
        )
    }
}

/// A checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub frame_type: FrameType,
    pub payload_len: usize,
}

impl Header {
    /// Header plus payload bytes.
    pub fn frame_bytes(&self) -> usize {
        FRAME_HEADER_BYTES.saturating_add(self.payload_len)
    }
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = bytes.get(at..at.saturating_add(4)) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

/// Step one: is a whole, intact frame at the start of `buf`? Returns its header (the frame is
/// `header.frame_bytes()` long), [`FrameError::Incomplete`] when more bytes are needed, or the
/// reason the bytes are not a frame. Payloads over `max_payload` are refused from the header alone.
pub fn check(buf: &[u8], max_payload: usize) -> Result<Header, FrameError> {
    let Some(head) = buf.get(..FRAME_HEADER_BYTES) else {
        // Fail early on a wrong magic even before the header is complete: garbage is refused
        // without waiting for 20 bytes that may never come.
        let have = buf.len().min(FRAME_MAGIC.len());
        if buf.get(..have) != FRAME_MAGIC.get(..have) {
            let mut found = [0u8; 4];
            for (d, s) in found.iter_mut().zip(buf.iter()) {
                *d = *s;
            }
            return Err(FrameError::BadMagic(found));
        }
        return Err(FrameError::Incomplete);
    };
    let mut magic = [0u8; 4];
    magic.copy_from_slice(head.get(..4).unwrap_or(&[0; 4]));
    if magic != FRAME_MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let stored = le_u32(head, 16);
    let computed = crc32c::crc32c(head.get(..16).unwrap_or(&[]));
    if stored != computed {
        return Err(FrameError::HeaderCrc { stored, computed });
    }
    let type_code = head.get(4).copied().unwrap_or(0);
    let frame_type = FrameType::from_code(type_code).ok_or(FrameError::UnknownType(type_code))?;
    if head.get(5..8) != Some(&[0u8, 0, 0][..]) {
        return Err(FrameError::Reserved);
    }
    let payload_len = usize::try_from(le_u32(head, 8)).unwrap_or(usize::MAX);
    let max = max_payload.min(MAX_FRAME_PAYLOAD_BYTES);
    if payload_len > max {
        return Err(FrameError::TooLarge {
            len: payload_len,
            max,
        });
    }
    let header = Header {
        frame_type,
        payload_len,
    };
    let Some(payload) = buf.get(FRAME_HEADER_BYTES..header.frame_bytes()) else {
        return Err(FrameError::Incomplete);
    };
    let stored = le_u32(head, 12);
    let computed = crc32c::crc32c(payload);
    if stored != computed {
        return Err(FrameError::PayloadCrc {
            frame_type,
            len: payload_len,
            stored,
            computed,
        });
    }
    Ok(header)
}

/// A cursor over a payload that fails instead of panicking when the bytes run out.
struct Cursor {
    buf: Bytes,
    frame_type: FrameType,
}

impl Cursor {
    fn fail<T>(&self, what: &'static str) -> Result<T, FrameError> {
        Err(FrameError::Malformed {
            frame_type: self.frame_type,
            what,
        })
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<Bytes, FrameError> {
        if self.buf.len() < n {
            return self.fail(what);
        }
        Ok(self.buf.split_to(n))
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        let b = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&b);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(u8::from_le_bytes(self.array::<1>(what)?))
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array::<2>(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array::<4>(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array::<8>(what)?))
    }

    fn site(&mut self, what: &'static str) -> Result<SiteId, FrameError> {
        let len = usize::from(self.u8(what)?);
        if len > SITE_ID_BYTES_MAX {
            return self.fail(what);
        }
        let raw = self.take(len, what)?;
        match std::str::from_utf8(&raw).ok().map(SiteId::new) {
            Some(Ok(id)) => Ok(id),
            _ => self.fail(what),
        }
    }

    fn end(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            self.fail("trailing bytes after the payload")
        }
    }
}

/// Step two: parse a frame that [`check`] accepted. `frame` holds exactly the frame's bytes
/// (header and payload); entry and resync data are slices of it, not copies.
pub fn parse(header: Header, mut frame: Bytes) -> Result<Frame, FrameError> {
    let frame_type = header.frame_type;
    if frame.len() != header.frame_bytes() {
        return Err(FrameError::Malformed {
            frame_type,
            what: "frame length differs from its header",
        });
    }
    let payload = frame.split_off(FRAME_HEADER_BYTES);
    let mut c = Cursor {
        buf: payload,
        frame_type,
    };
    let out = match frame_type {
        FrameType::Hello => {
            let version = c.u16("version")?;
            let features = c.u64("features")?;
            let group_uuid = c.array::<16>("group uuid")?;
            let epoch = c.u64("epoch")?;
            let nonce = c.array::<NONCE_BYTES>("nonce")?;
            let sender_site = c.site("sender site id")?;
            let receiver_site = c.site("receiver site id")?;
            let count = usize::try_from(c.u32("device count")?).unwrap_or(usize::MAX);
            if count > MAX_DEVICES {
                return c.fail("more devices than MAX_DEVICES");
            }
            let mut devices = Vec::with_capacity(count.min(c.buf.len() / 12));
            for _ in 0..count {
                let device = c.u32("device number")?;
                let size_bytes = c.u64("device size")?;
                devices.push(DeviceInfo { device, size_bytes });
            }
            Frame::Hello(Hello {
                version,
                features,
                group_uuid,
                epoch,
                nonce,
                sender_site,
                receiver_site,
                devices,
            })
        }
        FrameType::Challenge => Frame::Challenge(Challenge {
            features: c.u64("features")?,
            nonce: c.array::<NONCE_BYTES>("nonce")?,
        }),
        FrameType::Auth => Frame::Auth(Auth {
            proof: c.array::<PROOF_BYTES>("proof")?,
        }),
        FrameType::Accept => Frame::Accept(Accept {
            epoch: c.u64("epoch")?,
            durable_lsn: c.u64("durable lsn")?,
            durable_resync_seq: c.u64("durable resync seq")?,
            features: c.u64("features")?,
            proof: c.array::<PROOF_BYTES>("proof")?,
        }),
        FrameType::Entries => {
            let count = usize::try_from(c.u32("entry count")?).unwrap_or(usize::MAX);
            if count == 0 {
                return c.fail("no entries");
            }
            let mut entries =
                Vec::with_capacity(count.min(c.buf.len() / crate::types::ENTRY_HEADER_WIRE_BYTES));
            let mut prev_lsn: Option<u64> = None;
            for _ in 0..count {
                let lsn = c.u64("entry lsn")?;
                if prev_lsn.is_some_and(|p| lsn <= p) {
                    return c.fail("entry lsns not strictly increasing");
                }
                prev_lsn = Some(lsn);
                let device = c.u32("entry device")?;
                let offset = c.u64("entry offset")?;
                let kind = EntryKind::from_code(c.u8("entry kind")?);
                let Some(kind) = kind else {
                    return c.fail("unknown entry kind");
                };
                let len = c.u64("entry len")?;
                let timestamp_ns = c.u64("entry timestamp")?;
                if offset.checked_add(len).is_none() {
                    return c.fail("entry offset + len overflows");
                }
                let data = if kind == EntryKind::Write {
                    if len > MAX_ENTRY_DATA_BYTES {
                        return c.fail("write entry over MAX_ENTRY_DATA_BYTES");
                    }
                    let n = usize::try_from(len).unwrap_or(usize::MAX);
                    c.take(n, "entry data shorter than its len")?
                } else {
                    Bytes::new()
                };
                entries.push(Entry {
                    lsn,
                    device,
                    offset,
                    kind,
                    len,
                    timestamp_ns,
                    data,
                });
            }
            Frame::Entries(entries)
        }
        FrameType::Ack => Frame::Ack(Ack {
            durable_lsn: c.u64("durable lsn")?,
            resync_seq: c.u64("resync seq")?,
        }),
        FrameType::Ping => Frame::Ping(c.u64("token")?),
        FrameType::Pong => Frame::Pong(c.u64("token")?),
        FrameType::ResyncData => {
            let seq = c.u64("resync seq")?;
            let device = c.u32("resync device")?;
            let offset = c.u64("resync offset")?;
            let len = usize::try_from(c.u32("resync data length")?).unwrap_or(usize::MAX);
            if u64::try_from(len).unwrap_or(u64::MAX) > MAX_ENTRY_DATA_BYTES {
                return c.fail("resync data over MAX_ENTRY_DATA_BYTES");
            }
            if offset
                .checked_add(u64::try_from(len).unwrap_or(u64::MAX))
                .is_none()
            {
                return c.fail("resync offset + length overflows");
            }
            let data = c.take(len, "resync data shorter than its length")?;
            Frame::ResyncData(ResyncChunk {
                seq,
                device,
                offset,
                data,
            })
        }
        FrameType::ResyncDone => Frame::ResyncDone(ResyncDone {
            seq: c.u64("resync seq")?,
            device: c.u32("resync device")?,
        }),
        FrameType::Error => {
            let code = ErrorCode::from_code(c.u16("error code")?);
            let len = usize::from(c.u16("message length")?);
            if len > MAX_ERROR_MESSAGE_BYTES {
                return c.fail("error message over MAX_ERROR_MESSAGE_BYTES");
            }
            let raw = c.take(len, "error message shorter than its length")?;
            let Ok(message) = std::str::from_utf8(&raw) else {
                return c.fail("error message is not utf-8");
            };
            Frame::Error(ErrorFrame {
                code,
                message: message.to_owned(),
            })
        }
    };
    c.end()?;
    Ok(out)
}

/// Both steps on a read buffer: if a whole frame is at its front, split it off and parse it.
/// `Ok(None)` means more bytes are needed; the buffer is untouched then.
pub fn decode(buf: &mut BytesMut, max_payload: usize) -> Result<Option<Frame>, FrameError> {
    match check(buf, max_payload) {
        Ok(header) => {
            let bytes = buf.split_to(header.frame_bytes()).freeze();
            parse(header, bytes).map(Some)
        }
        Err(FrameError::Incomplete) => Ok(None),
        Err(e) => Err(e),
    }
}

fn put_site(out: &mut BytesMut, site: &SiteId) {
    let s = site.as_str().as_bytes();
    // SiteId guarantees 1..=64 bytes.
    out.put_u8(u8::try_from(s.len()).unwrap_or(0));
    out.put_slice(s);
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Challenge(_) => FrameType::Challenge,
            Frame::Auth(_) => FrameType::Auth,
            Frame::Accept(_) => FrameType::Accept,
            Frame::Entries(_) => FrameType::Entries,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::ResyncData(_) => FrameType::ResyncData,
            Frame::ResyncDone(_) => FrameType::ResyncDone,
            Frame::Error(_) => FrameType::Error,
        }
    }

    /// Appends the payload (no header) to `out`.
    fn encode_payload(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        let malformed = |what| FrameError::Malformed {
            frame_type: self.frame_type(),
            what,
        };
        match self {
            Frame::Hello(h) => {
                if h.devices.len() > MAX_DEVICES {
                    return Err(malformed("more devices than MAX_DEVICES"));
                }
                out.put_u16_le(h.version);
                out.put_u64_le(h.features);
                out.put_slice(&h.group_uuid);
                out.put_u64_le(h.epoch);
                out.put_slice(&h.nonce);
                put_site(out, &h.sender_site);
                put_site(out, &h.receiver_site);
                out.put_u32_le(u32::try_from(h.devices.len()).unwrap_or(u32::MAX));
                for d in &h.devices {
                    out.put_u32_le(d.device);
                    out.put_u64_le(d.size_bytes);
                }
            }
            Frame::Challenge(ch) => {
                out.put_u64_le(ch.features);
                out.put_slice(&ch.nonce);
            }
            Frame::Auth(a) => out.put_slice(&a.proof),
            Frame::Accept(a) => {
                out.put_u64_le(a.epoch);
                out.put_u64_le(a.durable_lsn);
                out.put_u64_le(a.durable_resync_seq);
                out.put_u64_le(a.features);
                out.put_slice(&a.proof);
            }
            Frame::Entries(entries) => {
                if entries.is_empty() {
                    return Err(malformed("no entries"));
                }
                out.put_u32_le(u32::try_from(entries.len()).unwrap_or(u32::MAX));
                let mut prev: Option<u64> = None;
                for e in entries {
                    if prev.is_some_and(|p| e.lsn <= p) {
                        return Err(malformed("entry lsns not strictly increasing"));
                    }
                    prev = Some(e.lsn);
                    let data_ok = match e.kind {
                        EntryKind::Write => {
                            u64::try_from(e.data.len()).ok() == Some(e.len)
                                && e.len <= MAX_ENTRY_DATA_BYTES
                        }
                        EntryKind::Zeroes | EntryKind::Discard => e.data.is_empty(),
                    };
                    if !data_ok || e.offset.checked_add(e.len).is_none() {
                        return Err(malformed("entry data does not match its kind and len"));
                    }
                    out.put_u64_le(e.lsn);
                    out.put_u32_le(e.device);
                    out.put_u64_le(e.offset);
                    out.put_u8(e.kind.code());
                    out.put_u64_le(e.len);
                    out.put_u64_le(e.timestamp_ns);
                    out.put_slice(&e.data);
                }
            }
            Frame::Ack(a) => {
                out.put_u64_le(a.durable_lsn);
                out.put_u64_le(a.resync_seq);
            }
            Frame::Ping(t) | Frame::Pong(t) => out.put_u64_le(*t),
            Frame::ResyncData(r) => {
                let len = u64::try_from(r.data.len()).unwrap_or(u64::MAX);
                if len > MAX_ENTRY_DATA_BYTES || r.offset.checked_add(len).is_none() {
                    return Err(malformed("resync data over MAX_ENTRY_DATA_BYTES"));
                }
                out.put_u64_le(r.seq);
                out.put_u32_le(r.device);
                out.put_u64_le(r.offset);
                out.put_u32_le(u32::try_from(r.data.len()).unwrap_or(u32::MAX));
                out.put_slice(&r.data);
            }
            Frame::ResyncDone(d) => {
                out.put_u64_le(d.seq);
                out.put_u32_le(d.device);
            }
            Frame::Error(e) => {
                let msg = ErrorFrame::new(e.code, e.message.clone()).message;
                out.put_u16_le(e.code as u16);
                out.put_u16_le(u16::try_from(msg.len()).unwrap_or(0));
                out.put_slice(msg.as_bytes());
            }
        }
        Ok(())
    }

    /// Appends the whole frame (header and payload) to `out`. Fails, leaving `out` as it was, on a
    /// frame this side must not send (over [`MAX_FRAME_PAYLOAD_BYTES`], empty or unordered
    /// entries, data that does not match the entry kind).
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), FrameError> {
        let start = out.len();
        out.put_bytes(0, FRAME_HEADER_BYTES);
        if let Err(e) = self.encode_payload(out) {
            out.truncate(start);
            return Err(e);
        }
        let payload_at = start.saturating_add(FRAME_HEADER_BYTES);
        let payload_len = out.len().saturating_sub(payload_at);
        if payload_len > MAX_FRAME_PAYLOAD_BYTES {
            out.truncate(start);
            return Err(FrameError::TooLarge {
                len: payload_len,
                max: MAX_FRAME_PAYLOAD_BYTES,
            });
        }
        let payload_crc = crc32c::crc32c(out.get(payload_at..).unwrap_or(&[]));
        let mut head = [0u8; FRAME_HEADER_BYTES];
        {
            let mut w = head.as_mut_slice();
            w.put_slice(&FRAME_MAGIC);
            w.put_u8(self.frame_type() as u8);
            w.put_bytes(0, 3);
            w.put_u32_le(u32::try_from(payload_len).unwrap_or(u32::MAX));
            w.put_u32_le(payload_crc);
        }
        let head_crc = crc32c::crc32c(head.get(..16).unwrap_or(&[]));
        if let Some(tail) = head.get_mut(16..) {
            tail.copy_from_slice(&head_crc.to_le_bytes());
        }
        if let Some(dst) = out.get_mut(start..payload_at) {
            dst.copy_from_slice(&head);
        }
        Ok(())
    }

    /// The whole frame as bytes.
    pub fn to_bytes(&self) -> Result<Bytes, FrameError> {
        let mut out = BytesMut::new();
        self.encode(&mut out)?;
        Ok(out.freeze())
    }
}

/// The payload bytes of an encoded frame (for the handshake transcript).
pub fn payload_of(frame: &[u8]) -> &[u8] {
    frame.get(FRAME_HEADER_BYTES..).unwrap_or(&[])
}
