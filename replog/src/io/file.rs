//! Opening a log device and probing what it supports: O_DIRECT (with fallback), the direct-I/O
//! alignment (statx STATX_DIOALIGN, BLKSSZGET), the size of files and block devices.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use super::{ALIGNMENT_MIN, BUF_ALIGN};

/// Alignment assumed for O_DIRECT on a regular file when the kernel cannot tell (no DIOALIGN).
const DIRECT_ALIGNMENT_FALLBACK: usize = 4096;

pub(crate) struct Opened {
    pub file: File,
    pub direct: bool,
    pub alignment: usize,
    pub is_block_device: bool,
}

pub(crate) fn open(path: &Path, create: bool, want_direct: bool) -> io::Result<Opened> {
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: open: {e}", path.display()));
    let (file, mut direct) =
        open_falling_back(|direct| open_once(path, create, direct), want_direct).map_err(ctx)?;
    let file_type = file.metadata().map_err(ctx)?.file_type();
    let is_block_device = file_type.is_block_device();
    if !is_block_device && !file_type.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a regular file or block device", path.display()),
        ));
    }
    let mut file = file;
    let mut alignment = ALIGNMENT_MIN;
    if direct {
        match direct_alignment(&file, is_block_device) {
            Some(align) => alignment = align.max(ALIGNMENT_MIN),
            None => {
                // The file system accepted O_DIRECT at open but says it cannot do direct I/O on
                // this file (DIOALIGN of 0): use buffered I/O.
                file = open_once(path, false, false).map_err(ctx)?;
                direct = false;
            }
        }
    }
    Ok(Opened {
        file,
        direct,
        alignment,
        is_block_device,
    })
}

fn open_once(path: &Path, create: bool, direct: bool) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .create(create)
        .truncate(false);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options.open(path)
}

/// Opens with O_DIRECT if wanted; if the file system refuses it (EINVAL), opens buffered.
/// Returns the file and whether it is direct.
pub(crate) fn open_falling_back(
    open: impl Fn(bool) -> io::Result<File>,
    want_direct: bool,
) -> io::Result<(File, bool)> {
    if want_direct {
        match open(true) {
            Ok(file) => return Ok((file, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok((open(false)?, false))
}

/// Offsets of the fields of the kernel's `struct statx` (256 bytes) that libc does not expose.
const STATX_SIZE: usize = 256;
const STATX_MASK_AT: usize = 0;
const STATX_DIO_MEM_ALIGN_AT: usize = 152;
const STATX_DIO_OFFSET_ALIGN_AT: usize = 156;
const _: () = assert!(std::mem::size_of::<libc::statx>() == STATX_SIZE);

#[repr(C, align(8))]
struct StatxBytes([u8; STATX_SIZE]);

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let field = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(field.try_into().ok()?))
}

/// The direct-I/O offset/length alignment, or None if this file cannot do direct I/O with our
/// buffers (aligned to BUF_ALIGN).
fn direct_alignment(file: &File, is_block_device: bool) -> Option<usize> {
    let mut buf = StatxBytes([0; STATX_SIZE]);
    // SAFETY: `buf` is 256 bytes, 8-aligned, the size of `struct statx` that the kernel fills (size
    // asserted above); the empty path with AT_EMPTY_PATH designates the open fd.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_TYPE | libc::STATX_DIOALIGN,
            buf.0.as_mut_ptr().cast::<libc::statx>(),
        )
    };
    if rc == 0 {
        let mask = read_u32(&buf.0, STATX_MASK_AT).unwrap_or(0);
        if mask & libc::STATX_DIOALIGN != 0 {
            let mem_align = read_u32(&buf.0, STATX_DIO_MEM_ALIGN_AT).unwrap_or(0) as usize;
            let offset_align = read_u32(&buf.0, STATX_DIO_OFFSET_ALIGN_AT).unwrap_or(0) as usize;
            if offset_align == 0 || mem_align == 0 || mem_align > BUF_ALIGN {
                return None;
            }
            return Some(offset_align);
        }
    }
    if is_block_device {
        let mut sector: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live c_int.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut sector) };
        if rc == 0 {
            if let Ok(sector) = usize::try_from(sector) {
                if sector > 0 {
                    return Some(sector);
                }
            }
        }
    }
    Some(DIRECT_ALIGNMENT_FALLBACK)
}

/// Size of a regular file or block device (seeking to the end works for both; all I/O is
/// positional, so the file position does not matter).
pub(crate) fn size(file: &File) -> io::Result<u64> {
    let mut handle = file;
    handle.seek(SeekFrom::End(0))
}

/// Asks the file system to allocate `[offset, offset+len)` (contiguous extents, early ENOSPC);
/// silently does nothing where fallocate is unsupported.
pub(crate) fn fallocate_best_effort(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    loop {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(()),
            _ => return Err(err),
        }
    }
}
