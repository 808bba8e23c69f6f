//! Pure decisions about requests: which block sizes we advertise, and whether a request is valid
//! for the negotiated export (and which NBD error it gets if not). No I/O here.

use super::proto::{self, NbdErrno, Request};

/// Block size constraints advertised in `NBD_INFO_BLOCK_SIZE` and enforced on requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Power of two in [1, 65536]; offsets and lengths must be multiples of it.
    pub min: u32,
    /// Power of two, at least max(min, 512).
    pub preferred: u32,
    /// Multiple of `min`, at least `preferred`: the longest READ/WRITE/WRITE_ZEROES accepted.
    pub max: u32,
}

/// Turns an export's wish `(min, preferred, max)` and the server's `max_payload` into values the
/// spec allows: `min` a power of two in [1, 64 KiB] (rounded up), `preferred` a power of two at
/// least `max(min, 512)`, `max` at most `max_payload`, a multiple of `min` and at least
/// `preferred` (preferred is lowered when the maximum cannot reach it).
pub fn negotiate_block_sizes(export: (u32, u32, u32), max_payload: u32) -> BlockSizes {
    let (want_min, want_pref, want_max) = export;
    let min = want_min.clamp(1, 65536).next_power_of_two();
    let cap = want_max.clamp(1, max_payload.max(1));
    // Largest multiple of `min` not above the cap, and never below one minimum block.
    let max = (cap - cap % min).max(min);
    let pref_floor = min.max(512);
    let mut preferred = want_pref.clamp(pref_floor, 1 << 30).next_power_of_two();
    while preferred > max && preferred > pref_floor {
        preferred /= 2;
    }
    let max = max.max(preferred);
    BlockSizes {
        min,
        preferred,
        max,
    }
}

/// What a connection knows about its export after negotiation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub size: u64,
    pub sizes: BlockSizes,
    pub read_only: bool,
    /// Structured replies negotiated (enables `NBD_CMD_FLAG_DF`).
    pub structured: bool,
    /// The `base:allocation` context id, when the client selected it for this export.
    pub meta_context: Option<u32>,
}

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
    },
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    BlockStatus {
        offset: u64,
        len: u32,
        context_id: u32,
    },
    Disc,
}

/// Command flags a command accepts. `FUA` is valid on every command because we advertise
/// `NBD_FLAG_SEND_FUA` (the spec requires accepting it everywhere then).
fn allowed_flags(command: u16, limits: &Limits) -> Option<u16> {
    let fua = proto::CMD_FLAG_FUA;
    Some(match command {
        proto::CMD_READ if limits.structured => fua | proto::CMD_FLAG_DF,
        proto::CMD_READ => fua,
        proto::CMD_WRITE | proto::CMD_TRIM | proto::CMD_FLUSH | proto::CMD_DISC => fua,
        proto::CMD_WRITE_ZEROES => fua | proto::CMD_FLAG_NO_HOLE,
        proto::CMD_BLOCK_STATUS => fua | proto::CMD_FLAG_REQ_ONE,
        _ => return None,
    })
}

/// Checks a request header against the export. The error values follow the spec's "Error
/// values" section:
/// - unknown command, unknown or inapplicable flag: `EINVAL`;
/// - write, trim or write-zeroes on a read-only export: `EPERM`;
/// - READ/WRITE/WRITE_ZEROES longer than the maximum block size: `EINVAL` (the spec reserves
///   `EOVERFLOW` for `NBD_CMD_FLAG_DF` reads, which we never fragment);
/// - write or write-zeroes beyond the end: `ENOSPC`; read, trim, block status beyond the end:
///   `EINVAL`;
/// - offset or length not a multiple of the minimum block size: `EINVAL`;
/// - block status without a selected metadata context, or of length 0: `EINVAL`.
///
/// Zero-length reads, writes, trims and write-zeroes are valid (the spec leaves them
/// unspecified but says not to disconnect); the executor answers them without touching the
/// export.
pub fn check_request(req: &Request, limits: &Limits) -> Result<Command, NbdErrno> {
    let allowed = allowed_flags(req.command, limits).ok_or(NbdErrno::Inval)?;
    if req.flags & !allowed != 0 {
        return Err(NbdErrno::Inval);
    }
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.length);
    match req.command {
        // Offset and length of DISC and FLUSH are reserved (must be zero); we do not refuse a
        // client that gets this wrong, there is nothing to misinterpret.
        proto::CMD_DISC => return Ok(Command::Disc),
        proto::CMD_FLUSH => return Ok(Command::Flush),
        _ => {}
    }
    let writes = matches!(
        req.command,
        proto::CMD_WRITE | proto::CMD_WRITE_ZEROES | proto::CMD_TRIM
    );
    if writes && limits.read_only {
        return Err(NbdErrno::Perm);
    }
    let context_id = if req.command == proto::CMD_BLOCK_STATUS {
        match limits.meta_context {
            Some(id) if len > 0 => Some(id),
            _ => return Err(NbdErrno::Inval),
        }
    } else {
        None
    };
    let payload_limited = matches!(
        req.command,
        proto::CMD_READ | proto::CMD_WRITE | proto::CMD_WRITE_ZEROES
    );
    if payload_limited && len > limits.sizes.max {
        return Err(NbdErrno::Inval);
    }
    let in_range = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= limits.size);
    if !in_range {
        return Err(match req.command {
            proto::CMD_WRITE | proto::CMD_WRITE_ZEROES => NbdErrno::NoSpc,
            _ => NbdErrno::Inval,
        });
    }
    let min = u64::from(limits.sizes.min);
    if offset % min != 0 || u64::from(len) % min != 0 {
        return Err(NbdErrno::Inval);
    }
    Ok(match req.command {
        proto::CMD_READ => Command::Read { offset, len },
        proto::CMD_WRITE => Command::Write { offset, len, fua },
        proto::CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim: req.flags & proto::CMD_FLAG_NO_HOLE == 0,
        },
        proto::CMD_TRIM => Command::Trim { offset, len, fua },
        _ => Command::BlockStatus {
            offset,
            len,
            context_id: context_id.unwrap_or(proto::META_BASE_ALLOCATION_ID),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;

    fn limits() -> Limits {
        Limits {
            size: 1 << 20,
            sizes: BlockSizes {
                min: 512,
                preferred: 4096,
                max: 64 * 1024,
            },
            read_only: false,
            structured: true,
            meta_context: Some(META_BASE_ALLOCATION_ID),
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    #[test]
    fn block_sizes_defaults() {
        assert_eq!(
            negotiate_block_sizes((512, 4096, 32 << 20), 32 << 20),
            BlockSizes {
                min: 512,
                preferred: 4096,
                max: 32 << 20
            }
        );
        // The server's cap wins over the export's.
        assert_eq!(
            negotiate_block_sizes((512, 4096, 32 << 20), 1 << 20).max,
            1 << 20
        );
    }

    #[test]
    fn block_sizes_sanitised() {
        // Non-power-of-two and oversized minimums, tiny preferred, unaligned max.
        let s = negotiate_block_sizes((1000, 100, 100_000), 32 << 20);
        assert_eq!(s.min, 1024);
        assert_eq!(s.preferred, 1024);
        assert_eq!(s.max, 97 * 1024);
        let s = negotiate_block_sizes((1 << 20, 0, 0), 32 << 20);
        assert_eq!(s.min, 65536);
        assert_eq!(s.max, 65536);
        assert_eq!(s.preferred, 65536);
        let s = negotiate_block_sizes((0, 1 << 24, 1 << 16), 32 << 20);
        assert_eq!(s.min, 1);
        assert_eq!(s.preferred, 1 << 16);
        assert_eq!(s.max, 1 << 16);
        // Invariants over a sweep of inputs.
        for min in [0, 1, 3, 512, 4096, 70000] {
            for pref in [0, 512, 5000, 1 << 21] {
                for max in [0, 1, 4095, 1 << 20, u32::MAX] {
                    let s = negotiate_block_sizes((min, pref, max), 32 << 20);
                    assert!(s.min.is_power_of_two() && s.min <= 65536, "{s:?}");
                    assert!(s.preferred.is_power_of_two(), "{s:?}");
                    assert!(s.preferred >= s.min.max(512), "{s:?}");
                    assert_eq!(s.max % s.min, 0, "{s:?}");
                    assert!(s.max >= s.preferred, "{s:?}");
                    assert!(s.max <= (32 << 20).max(s.preferred), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn valid_requests() {
        let l = limits();
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_DF, 4096, 4096), &l),
            Ok(Command::Read {
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 512), &l),
            Ok(Command::Write {
                offset: 0,
                len: 512,
                fua: true
            })
        );
        assert_eq!(
            check_request(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 512), &l),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 512,
                fua: false,
                may_trim: false
            })
        );
        // Trim is not limited by the maximum block size.
        assert_eq!(
            check_request(&req(CMD_TRIM, 0, 0, 1 << 20), &l),
            Ok(Command::Trim {
                offset: 0,
                len: 1 << 20,
                fua: false
            })
        );
        assert_eq!(
            check_request(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &l),
            Ok(Command::Flush)
        );
        assert_eq!(
            check_request(&req(CMD_DISC, 0, 0, 0), &l),
            Ok(Command::Disc)
        );
        assert_eq!(
            check_request(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &l),
            Ok(Command::BlockStatus {
                offset: 0,
                len: 1 << 20,
                context_id: META_BASE_ALLOCATION_ID
            })
        );
        // Zero length and the very last block are fine.
        assert!(check_request(&req(CMD_READ, 0, 0, 0), &l).is_ok());
        assert!(check_request(&req(CMD_WRITE, 0, (1 << 20) - 512, 512), &l).is_ok());
    }

    #[test]
    fn invalid_requests_get_the_spec_errno() {
        let l = limits();
        let e = |r: Request| check_request(&r, &l).err();
        assert_eq!(
            e(req(42, 0, 0, 512)),
            Some(NbdErrno::Inval),
            "unknown command"
        );
        assert_eq!(
            e(req(CMD_CACHE, 0, 0, 512)),
            Some(NbdErrno::Inval),
            "not advertised"
        );
        assert_eq!(
            e(req(CMD_READ, 1 << 9, 0, 512)),
            Some(NbdErrno::Inval),
            "unknown flag"
        );
        assert_eq!(
            e(req(CMD_WRITE, CMD_FLAG_DF, 0, 512)),
            Some(NbdErrno::Inval)
        );
        assert_eq!(
            e(req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512)),
            Some(NbdErrno::Inval),
            "fast zero is not advertised"
        );
        assert_eq!(
            e(req(CMD_READ, 0, 1 << 20, 512)),
            Some(NbdErrno::Inval),
            "read past end"
        );
        assert_eq!(
            e(req(CMD_TRIM, 0, 1 << 20, 512)),
            Some(NbdErrno::Inval),
            "trim past end"
        );
        assert_eq!(
            e(req(CMD_WRITE, 0, 1 << 20, 512)),
            Some(NbdErrno::NoSpc),
            "write past end"
        );
        assert_eq!(
            e(req(CMD_WRITE_ZEROES, 0, 1 << 20, 512)),
            Some(NbdErrno::NoSpc)
        );
        assert_eq!(
            e(req(CMD_READ, 0, u64::MAX - 100, 512)),
            Some(NbdErrno::Inval),
            "wraps"
        );
        assert_eq!(
            e(req(CMD_READ, 0, 0, 128 * 1024)),
            Some(NbdErrno::Inval),
            "oversized"
        );
        assert_eq!(
            e(req(CMD_WRITE, 0, 0, 128 * 1024)),
            Some(NbdErrno::Inval),
            "oversized"
        );
        assert_eq!(
            e(req(CMD_READ, 0, 100, 512)),
            Some(NbdErrno::Inval),
            "misaligned offset"
        );
        assert_eq!(
            e(req(CMD_WRITE, 0, 0, 100)),
            Some(NbdErrno::Inval),
            "misaligned length"
        );
        assert_eq!(
            e(req(CMD_BLOCK_STATUS, 0, 0, 0)),
            Some(NbdErrno::Inval),
            "empty status"
        );
        let no_meta = Limits {
            meta_context: None,
            structured: false,
            ..l
        };
        assert_eq!(
            check_request(&req(CMD_BLOCK_STATUS, 0, 0, 512), &no_meta),
            Err(NbdErrno::Inval)
        );
        assert_eq!(
            check_request(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &no_meta),
            Err(NbdErrno::Inval),
            "DF without structured replies"
        );
    }

    #[test]
    fn read_only_export() {
        let l = Limits {
            read_only: true,
            ..limits()
        };
        for cmd in [CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM] {
            assert_eq!(check_request(&req(cmd, 0, 0, 512), &l), Err(NbdErrno::Perm));
        }
        assert!(check_request(&req(CMD_READ, 0, 0, 512), &l).is_ok());
        assert!(check_request(&req(CMD_FLUSH, 0, 0, 0), &l).is_ok());
    }
}
