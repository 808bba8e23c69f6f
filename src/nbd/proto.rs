//! NBD wire constants and pure encode/decode functions.
//!
//! This module owns every byte layout of the protocol subset we speak (see `PROTOCOL.md` next to
//! this file). Everything here is a plain function over byte slices: no I/O, no allocation beyond
//! the returned buffers, and no panics on any input. All integers are big-endian on the wire.

// ---------------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second 8 bytes the server sends, and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may ask us to skip the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits, sent with the export size)
// ---------------------------------------------------------------------------------------------

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// The transmission flags we advertise for an export.
///
/// `SEND_DF` only when structured replies were negotiated (the spec requires it to be clear
/// otherwise); we can honour DF because every read reply is a single content chunk. A read-only
/// export does not offer trim and write-zeroes (they would only fail with `EPERM`); flush and
/// FUA stay, they are harmless and some clients expect them.
pub fn transmission_flags(read_only: bool, multi_conn: bool, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    if multi_conn {
        flags |= TFLAG_CAN_MULTI_CONN;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

// ---------------------------------------------------------------------------------------------
// Options and option replies
// ---------------------------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The one metadata context we implement.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// The id we hand out for `base:allocation` (ids are opaque to the client; any value works).
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Longest string (export name, query, message) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Longest option payload we read into memory. Larger options are skipped in bounded chunks and
/// answered with an error, so a client cannot make us allocate what it claims.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Transmission: commands, flags, reply chunk types, errors
// ---------------------------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = 0x8001;
pub const CHUNK_ERROR_OFFSET: u16 = 0x8002;

/// Request header length on the wire (compact headers; we do not negotiate extended headers).
pub const REQUEST_HEADER_LEN: usize = 28;
/// Simple reply length on the wire.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header length on the wire.
pub const CHUNK_HEADER_LEN: usize = 20;

/// The error values the protocol defines for the reply `error` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdErrno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
}

impl NbdErrno {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdErrno::Perm => 1,
            NbdErrno::Io => 5,
            NbdErrno::NoMem => 12,
            NbdErrno::Inval => 22,
            NbdErrno::NoSpc => 28,
            NbdErrno::Overflow => 75,
            NbdErrno::NotSup => 95,
            NbdErrno::Shutdown => 108,
        }
    }

    /// Inverse of [`NbdErrno::code`] (used by tests and test clients).
    pub fn from_code(code: u32) -> Option<NbdErrno> {
        Some(match code {
            1 => NbdErrno::Perm,
            5 => NbdErrno::Io,
            12 => NbdErrno::NoMem,
            22 => NbdErrno::Inval,
            28 => NbdErrno::NoSpc,
            75 => NbdErrno::Overflow,
            95 => NbdErrno::NotSup,
            108 => NbdErrno::Shutdown,
            _ => return None,
        })
    }

    /// Maps an OS error from the backing store to the closest NBD error value.
    /// The spec asks for `EDQUOT` and `EFBIG` to become `ENOSPC`; anything unknown is `EIO`.
    pub fn from_io(err: &std::io::Error) -> NbdErrno {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NbdErrno::Perm,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NbdErrno::NoSpc,
            Some(libc::EINVAL) => NbdErrno::Inval,
            Some(libc::EOVERFLOW) => NbdErrno::Overflow,
            Some(libc::EOPNOTSUPP) => NbdErrno::NotSup,
            Some(libc::ESHUTDOWN) => NbdErrno::Shutdown,
            _ => NbdErrno::Io,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A panic-free big-endian cursor over a byte slice
// ---------------------------------------------------------------------------------------------

/// Reads big-endian integers and byte strings from a slice; every getter returns `None` when the
/// slice is too short instead of panicking.
#[derive(Debug)]
pub struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Cursor { rest: bytes }
    }

    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    pub fn u16(&mut self) -> Option<u16> {
        let (head, rest) = self.rest.split_first_chunk::<2>()?;
        self.rest = rest;
        Some(u16::from_be_bytes(*head))
    }

    pub fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.rest.split_first_chunk::<4>()?;
        self.rest = rest;
        Some(u32::from_be_bytes(*head))
    }

    pub fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.rest.split_first_chunk::<8>()?;
        self.rest = rest;
        Some(u64::from_be_bytes(*head))
    }

    pub fn bytes(&mut self, len: usize) -> Option<&'a [u8]> {
        if len > self.rest.len() {
            return None;
        }
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(head)
    }

    /// A protocol string: valid UTF-8, at most [`MAX_STRING_LEN`] bytes, no NUL.
    pub fn string(&mut self, len: usize) -> Option<&'a str> {
        if len > MAX_STRING_LEN {
            return None;
        }
        let raw = self.bytes(len)?;
        let s = std::str::from_utf8(raw).ok()?;
        if s.contains('\0') {
            return None;
        }
        Some(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// The 18 bytes the server sends first: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    let (magic, rest) = out.split_at_mut(8);
    magic.copy_from_slice(&NBDMAGIC.to_be_bytes());
    let (opt, flags) = rest.split_at_mut(8);
    opt.copy_from_slice(&IHAVEOPT.to_be_bytes());
    flags.copy_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
    out
}

/// Client flags as we understand them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decodes the client's 32-bit flags. Unknown bits are an error: the spec says the server MUST
/// drop the connection.
pub fn decode_client_flags(raw: u32) -> Result<ClientFlags, u32> {
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if raw & !known != 0 {
        return Err(raw);
    }
    Ok(ClientFlags {
        fixed_newstyle: raw & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: raw & FLAG_C_NO_ZEROES != 0,
    })
}

/// Header of a client option: `IHAVEOPT`, option, data length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// The 16-byte option header. Returns the bad magic on mismatch.
pub fn decode_option_header(raw: &[u8; 16]) -> Result<OptionHeader, u64> {
    let mut c = Cursor::new(raw);
    let (Some(magic), Some(option), Some(length)) = (c.u64(), c.u32(), c.u32()) else {
        return Err(0);
    };
    if magic != IHAVEOPT {
        return Err(magic);
    }
    Ok(OptionHeader { option, length })
}

/// Client side of [`decode_option_header`] (test clients use it).
pub fn encode_option_header(option: u32, length: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    put(&mut out, 0, &IHAVEOPT.to_be_bytes());
    put(&mut out, 8, &option.to_be_bytes());
    put(&mut out, 12, &length.to_be_bytes());
    out
}

/// Header of an option reply: magic, option, reply type, data length.
pub fn encode_option_reply_header(option: u32, reply_type: u32, length: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    put(&mut out, 0, &OPTION_REPLY_MAGIC.to_be_bytes());
    put(&mut out, 8, &option.to_be_bytes());
    put(&mut out, 12, &reply_type.to_be_bytes());
    put(&mut out, 16, &length.to_be_bytes());
    out
}

/// A decoded option reply header (test clients use it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub fn decode_option_reply_header(raw: &[u8; 20]) -> Option<OptionReplyHeader> {
    let mut c = Cursor::new(raw);
    let magic = c.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return None;
    }
    Some(OptionReplyHeader {
        option: c.u32()?,
        reply_type: c.u32()?,
        length: c.u32()?,
    })
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124 zero bytes unless the client
/// negotiated `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(10 + 124, 0);
    }
    out
}

/// Data of an `NBD_REP_SERVER` reply: name length and name.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    put(&mut out, 0, &INFO_EXPORT.to_be_bytes());
    put(&mut out, 2, &size.to_be_bytes());
    put(&mut out, 10, &flags.to_be_bytes());
    out
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    put(&mut out, 0, &INFO_BLOCK_SIZE.to_be_bytes());
    put(&mut out, 2, &min.to_be_bytes());
    put(&mut out, 6, &preferred.to_be_bytes());
    put(&mut out, 10, &max.to_be_bytes());
    out
}

/// Data of `NBD_REP_INFO` with a string payload (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn encode_info_string(info_type: u16, value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + value.len());
    out.extend_from_slice(&info_type.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
    out
}

/// Data of `NBD_REP_META_CONTEXT`: context id and name.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Why an option's data did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionDataError {
    /// Lengths inside the option disagree with the option length, or a string is not valid.
    Invalid,
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    pub info_requests: Vec<u16>,
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data: u32 name length, name, u16 count, count x u16.
/// The lengths must add up exactly to the option length.
pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest<'_>, OptionDataError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().ok_or(OptionDataError::Invalid)? as usize;
    let name = c.string(name_len).ok_or(OptionDataError::Invalid)?;
    let count = c.u16().ok_or(OptionDataError::Invalid)? as usize;
    if c.remaining() != count * 2 {
        return Err(OptionDataError::Invalid);
    }
    let mut info_requests = Vec::with_capacity(count);
    for _ in 0..count {
        info_requests.push(c.u16().ok_or(OptionDataError::Invalid)?);
    }
    Ok(InfoRequest {
        name,
        info_requests,
    })
}

/// Client side of [`decode_info_request`].
pub fn encode_info_request(name: &str, info_requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len() + 2 * info_requests.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(info_requests.len() as u16).to_be_bytes());
    for r in info_requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub export: &'a str,
    pub queries: Vec<&'a str>,
}

/// Parses meta context option data: u32 name length, name, u32 query count, then per query
/// u32 length and string. The lengths must add up exactly to the option length.
pub fn decode_meta_context_request(data: &[u8]) -> Result<MetaContextRequest<'_>, OptionDataError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().ok_or(OptionDataError::Invalid)? as usize;
    let export = c.string(name_len).ok_or(OptionDataError::Invalid)?;
    let count = c.u32().ok_or(OptionDataError::Invalid)? as usize;
    // Each query takes at least 4 bytes, so the count is bounded by the (bounded) data length;
    // checking it first keeps a lying count from driving the allocation below.
    if count > c.remaining() / 4 {
        return Err(OptionDataError::Invalid);
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = c.u32().ok_or(OptionDataError::Invalid)? as usize;
        queries.push(c.string(len).ok_or(OptionDataError::Invalid)?);
    }
    if c.remaining() != 0 {
        return Err(OptionDataError::Invalid);
    }
    Ok(MetaContextRequest { export, queries })
}

/// Client side of [`decode_meta_context_request`].
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Transmission requests and replies
// ---------------------------------------------------------------------------------------------

/// A transmission request header (compact form).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Decodes the 28-byte request header. Returns the bad magic on mismatch.
pub fn decode_request(raw: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, u32> {
    let mut c = Cursor::new(raw);
    let magic = c.u32().ok_or(0u32)?;
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    let (Some(flags), Some(command), Some(cookie), Some(offset), Some(length)) =
        (c.u16(), c.u16(), c.u64(), c.u64(), c.u32())
    else {
        return Err(magic);
    };
    Ok(Request {
        flags,
        command,
        cookie,
        offset,
        length,
    })
}

/// Client side of [`decode_request`].
pub fn encode_request(req: &Request) -> [u8; REQUEST_HEADER_LEN] {
    let mut out = [0u8; REQUEST_HEADER_LEN];
    put(&mut out, 0, &REQUEST_MAGIC.to_be_bytes());
    put(&mut out, 4, &req.flags.to_be_bytes());
    put(&mut out, 6, &req.command.to_be_bytes());
    put(&mut out, 8, &req.cookie.to_be_bytes());
    put(&mut out, 16, &req.offset.to_be_bytes());
    put(&mut out, 24, &req.length.to_be_bytes());
    out
}

/// A simple reply: magic, error, cookie. For a successful read the data follows.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    put(&mut out, 0, &SIMPLE_REPLY_MAGIC.to_be_bytes());
    put(&mut out, 4, &error.to_be_bytes());
    put(&mut out, 8, &cookie.to_be_bytes());
    out
}

/// A structured reply chunk header: magic, flags, type, cookie, payload length.
pub fn encode_chunk_header(
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    length: u32,
) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    put(&mut out, 0, &STRUCTURED_REPLY_MAGIC.to_be_bytes());
    put(&mut out, 4, &flags.to_be_bytes());
    put(&mut out, 6, &chunk_type.to_be_bytes());
    put(&mut out, 8, &cookie.to_be_bytes());
    put(&mut out, 16, &length.to_be_bytes());
    out
}

/// A reply header as a client sees it (test clients use it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        length: u32,
    },
}

/// Decodes a reply header from its first 16 bytes, plus 4 more for a structured chunk. Returns
/// `Err(needed)` when `raw` is too short (`needed` = total bytes required) and `Ok(None)` on a
/// bad magic.
pub fn decode_reply_header(raw: &[u8]) -> Result<Option<ReplyHeader>, usize> {
    let mut c = Cursor::new(raw);
    let magic = c.u32().ok_or(SIMPLE_REPLY_LEN)?;
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let error = c.u32().ok_or(SIMPLE_REPLY_LEN)?;
            let cookie = c.u64().ok_or(SIMPLE_REPLY_LEN)?;
            Ok(Some(ReplyHeader::Simple { error, cookie }))
        }
        STRUCTURED_REPLY_MAGIC => {
            let flags = c.u16().ok_or(CHUNK_HEADER_LEN)?;
            let chunk_type = c.u16().ok_or(CHUNK_HEADER_LEN)?;
            let cookie = c.u64().ok_or(CHUNK_HEADER_LEN)?;
            let length = c.u32().ok_or(CHUNK_HEADER_LEN)?;
            Ok(Some(ReplyHeader::Chunk {
                flags,
                chunk_type,
                cookie,
                length,
            }))
        }
        _ => Ok(None),
    }
}

/// Payload of an `NBD_REPLY_TYPE_ERROR` (offset `None`) or `NBD_REPLY_TYPE_ERROR_OFFSET` chunk:
/// error, message length, message, and the offset for the latter. The message is cut to the
/// spec's string limit on a character boundary.
pub fn encode_error_payload(error: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = message.get(..end).unwrap_or("");
    let mut out = Vec::with_capacity(6 + msg.len() + 8);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
    if let Some(off) = offset {
        out.extend_from_slice(&off.to_be_bytes());
    }
    out
}

/// A decoded error chunk payload (test clients use it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorPayload {
    pub error: u32,
    pub message: String,
    pub offset: Option<u64>,
}

pub fn decode_error_payload(chunk_type: u16, payload: &[u8]) -> Option<ErrorPayload> {
    let mut c = Cursor::new(payload);
    let error = c.u32()?;
    let len = c.u16()? as usize;
    let message = String::from_utf8_lossy(c.bytes(len)?).into_owned();
    let offset = if chunk_type == CHUNK_ERROR_OFFSET {
        Some(c.u64()?)
    } else {
        None
    };
    Some(ErrorPayload {
        error,
        message,
        offset,
    })
}

/// Payload of a `NBD_REPLY_TYPE_BLOCK_STATUS` chunk with one descriptor.
pub fn encode_block_status_payload(context_id: u32, length: u32, status: u32) -> [u8; 12] {
    let mut out = [0u8; 12];
    put(&mut out, 0, &context_id.to_be_bytes());
    put(&mut out, 4, &length.to_be_bytes());
    put(&mut out, 8, &status.to_be_bytes());
    out
}

/// Copies `src` into `dst` at `at`. Used only with constant, in-bounds positions on fixed-size
/// arrays; an out-of-bounds position is a programming error that tests catch, and it is ignored
/// rather than panicking.
fn put(dst: &mut [u8], at: usize, src: &[u8]) {
    if let Some(slot) = dst.get_mut(at..at + src.len()) {
        slot.copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        let g = encode_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            decode_client_flags(3),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            decode_client_flags(0),
            Ok(ClientFlags {
                fixed_newstyle: false,
                no_zeroes: false
            })
        );
        assert_eq!(decode_client_flags(4), Err(4));
    }

    #[test]
    fn option_header_both_directions() {
        let raw = encode_option_header(OPT_GO, 42);
        assert_eq!(&raw[..8], b"IHAVEOPT");
        assert_eq!(&raw[8..], &[0, 0, 0, 7, 0, 0, 0, 42]);
        assert_eq!(
            decode_option_header(&raw),
            Ok(OptionHeader {
                option: OPT_GO,
                length: 42
            })
        );
        let mut bad = raw;
        bad[0] = b'X';
        assert!(decode_option_header(&bad).is_err());
    }

    #[test]
    fn option_reply_header_both_directions() {
        let raw = encode_option_reply_header(OPT_LIST, REP_ERR_UNSUP, 5);
        assert_eq!(
            &raw[..],
            &[0, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 3, 0x80, 0, 0, 1, 0, 0, 0, 5]
        );
        assert_eq!(
            decode_option_reply_header(&raw),
            Some(OptionReplyHeader {
                option: OPT_LIST,
                reply_type: REP_ERR_UNSUP,
                length: 5
            })
        );
    }

    #[test]
    fn export_name_reply_with_and_without_zeroes() {
        let r = encode_export_name_reply(1 << 20, 0x0101, false);
        assert_eq!(r.len(), 134);
        assert_eq!(&r[..10], &[0, 0, 0, 0, 0, 0x10, 0, 0, 1, 1]);
        assert!(r[10..].iter().all(|b| *b == 0));
        assert_eq!(encode_export_name_reply(1 << 20, 0x0101, true).len(), 10);
    }

    #[test]
    fn info_payloads() {
        assert_eq!(
            encode_info_export(0x0102_0304_0506_0708, 0x0a0b),
            [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b]
        );
        assert_eq!(
            encode_info_block_size(512, 4096, 1 << 25),
            [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 2, 0, 0, 0]
        );
        assert_eq!(encode_info_string(INFO_NAME, "ab"), vec![0, 1, b'a', b'b']);
        assert_eq!(encode_rep_server("ab"), vec![0, 0, 0, 2, b'a', b'b']);
        assert_eq!(
            encode_meta_context(1, "base:allocation")[..5],
            [0, 0, 0, 1, b'b']
        );
    }

    #[test]
    fn info_request_both_directions() {
        let raw = encode_info_request("disk0", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            raw,
            vec![0, 0, 0, 5, b'd', b'i', b's', b'k', b'0', 0, 2, 0, 3, 0, 1]
        );
        let req = decode_info_request(&raw).unwrap();
        assert_eq!(req.name, "disk0");
        assert_eq!(req.info_requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        let raw = encode_info_request("disk0", &[INFO_BLOCK_SIZE]);
        // Truncated, extended, lying name length, lying count.
        assert!(decode_info_request(&raw[..raw.len() - 1]).is_err());
        let mut longer = raw.clone();
        longer.push(0);
        assert!(decode_info_request(&longer).is_err());
        let mut lying = raw.clone();
        lying[3] = 200;
        assert!(decode_info_request(&lying).is_err());
        let mut lying_count = raw.clone();
        lying_count[10] = 9;
        assert!(decode_info_request(&lying_count).is_err());
        assert!(decode_info_request(&[]).is_err());
        // Invalid UTF-8 and NUL in the name.
        assert!(decode_info_request(&[0, 0, 0, 1, 0xff, 0, 0]).is_err());
        assert!(decode_info_request(&[0, 0, 0, 1, 0, 0, 0]).is_err());
    }

    #[test]
    fn meta_context_request_both_directions() {
        let raw = encode_meta_context_request("d", &["base:allocation", "qemu:dirty"]);
        let req = decode_meta_context_request(&raw).unwrap();
        assert_eq!(req.export, "d");
        assert_eq!(req.queries, vec!["base:allocation", "qemu:dirty"]);
        assert!(decode_meta_context_request(&raw[..raw.len() - 1]).is_err());
        let mut lying_count = encode_meta_context_request("d", &[]);
        lying_count[8] = 0xff;
        assert!(decode_meta_context_request(&lying_count).is_err());
        let mut trailing = raw.clone();
        trailing.push(1);
        assert!(decode_meta_context_request(&trailing).is_err());
    }

    #[test]
    fn request_both_directions() {
        let req = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 4096,
            length: 512,
        };
        let raw = encode_request(&req);
        assert_eq!(
            raw,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88,
                0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0
            ]
        );
        assert_eq!(decode_request(&raw), Ok(req));
        let mut bad = raw;
        bad[3] = 0x14;
        assert_eq!(decode_request(&bad), Err(0x2560_9514));
    }

    #[test]
    fn replies_both_directions() {
        let simple = encode_simple_reply(22, 7);
        assert_eq!(
            simple,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert_eq!(
            decode_reply_header(&simple),
            Ok(Some(ReplyHeader::Simple {
                error: 22,
                cookie: 7
            }))
        );
        let chunk = encode_chunk_header(REPLY_FLAG_DONE, CHUNK_OFFSET_DATA, 9, 4104);
        assert_eq!(
            chunk,
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0x10, 0x08]
        );
        assert_eq!(decode_reply_header(&chunk[..16]), Err(CHUNK_HEADER_LEN));
        assert_eq!(
            decode_reply_header(&chunk),
            Ok(Some(ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                chunk_type: CHUNK_OFFSET_DATA,
                cookie: 9,
                length: 4104
            }))
        );
        assert_eq!(decode_reply_header(&[0u8; 16]), Ok(None));
    }

    #[test]
    fn error_payload_both_directions() {
        let p = encode_error_payload(5, "boom", Some(1024));
        assert_eq!(
            p,
            vec![0, 0, 0, 5, 0, 4, b'b', b'o', b'o', b'm', 0, 0, 0, 0, 0, 0, 4, 0]
        );
        assert_eq!(
            decode_error_payload(CHUNK_ERROR_OFFSET, &p),
            Some(ErrorPayload {
                error: 5,
                message: "boom".into(),
                offset: Some(1024)
            })
        );
        let p = encode_error_payload(22, "", None);
        assert_eq!(p, vec![0, 0, 0, 22, 0, 0]);
        // Over-long messages are cut to the string limit on a char boundary.
        let long = "é".repeat(3000);
        let p = encode_error_payload(22, &long, None);
        let d = decode_error_payload(CHUNK_ERROR, &p).unwrap();
        assert!(d.message.len() <= MAX_STRING_LEN);
        assert_eq!(d.message.len() % 2, 0);
    }

    #[test]
    fn block_status_payload() {
        assert_eq!(
            encode_block_status_payload(1, 4096, 0),
            [0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn flags_advertised() {
        let rw = transmission_flags(false, true, false);
        assert_eq!(rw, 0b1_0110_1101);
        let ro = transmission_flags(true, false, true);
        assert_eq!(ro & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
        assert_eq!(ro & TFLAG_SEND_DF, TFLAG_SEND_DF);
        assert_eq!(ro & TFLAG_CAN_MULTI_CONN, 0);
        assert_eq!(ro & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
        assert_eq!(
            rw & (TFLAG_SEND_CACHE | TFLAG_SEND_FAST_ZERO | TFLAG_ROTATIONAL),
            0
        );
    }

    #[test]
    fn errno_codes_round_trip() {
        for e in [
            NbdErrno::Perm,
            NbdErrno::Io,
            NbdErrno::NoMem,
            NbdErrno::Inval,
            NbdErrno::NoSpc,
            NbdErrno::Overflow,
            NbdErrno::NotSup,
            NbdErrno::Shutdown,
        ] {
            assert_eq!(NbdErrno::from_code(e.code()), Some(e));
        }
        let io = |c| std::io::Error::from_raw_os_error(c);
        assert_eq!(NbdErrno::from_io(&io(libc::EDQUOT)), NbdErrno::NoSpc);
        assert_eq!(NbdErrno::from_io(&io(libc::EFBIG)), NbdErrno::NoSpc);
        assert_eq!(NbdErrno::from_io(&io(libc::EIO)), NbdErrno::Io);
        assert_eq!(NbdErrno::from_io(&io(libc::ENOMEM)), NbdErrno::Io);
        assert_eq!(NbdErrno::from_io(&std::io::Error::other("x")), NbdErrno::Io);
    }

    proptest::proptest! {
        /// Decoders take any bytes without panicking.
        #[test]
        fn decoders_accept_any_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = decode_info_request(&bytes);
            let _ = decode_meta_context_request(&bytes);
            let _ = decode_reply_header(&bytes);
            let _ = decode_error_payload(CHUNK_ERROR_OFFSET, &bytes);
            if let Some(raw) = bytes.first_chunk::<REQUEST_HEADER_LEN>() {
                let _ = decode_request(raw);
            }
            if let Some(raw) = bytes.first_chunk::<16>() {
                let _ = decode_option_header(raw);
            }
        }

        /// Requests survive encode then decode unchanged.
        #[test]
        fn request_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) {
            let req = Request { flags, command, cookie, offset, length };
            proptest::prop_assert_eq!(decode_request(&encode_request(&req)), Ok(req));
        }

        /// INFO/GO data survives encode then decode unchanged.
        #[test]
        fn info_request_round_trip(name in "[a-z0-9_.-]{0,64}", infos in proptest::collection::vec(0u16..8, 0..8)) {
            let raw = encode_info_request(&name, &infos);
            let got = decode_info_request(&raw).unwrap();
            proptest::prop_assert_eq!(got.name, name.as_str());
            proptest::prop_assert_eq!(got.info_requests, infos);
        }
    }

    #[test]
    fn cursor_never_panics() {
        let mut c = Cursor::new(&[1, 2, 3]);
        assert_eq!(c.u32(), None);
        assert_eq!(c.u16(), Some(0x0102));
        assert_eq!(c.bytes(2), None);
        assert_eq!(c.bytes(1), Some(&[3u8][..]));
        assert_eq!(c.u16(), None);
        assert_eq!(Cursor::new(&[0u8; 8]).string(5000), None);
    }
}
