//! A site's device: a regular file or a block device, reached with positioned reads and writes.
//!
//! Zeroes and discards are applied the same way at every site (the range reads back as zeroes
//! afterwards), so sites stay byte-identical whatever the file system supports.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Zeroes are written in chunks of this size when the file system cannot zero a range itself.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug)]
pub struct BlockFile {
    path: PathBuf,
    file: File,
    size: u64,
}

impl BlockFile {
    /// Open a device for a site. A missing regular file is created sparse with `size` bytes; an
    /// existing one shorter than `size` is refused (its data would not cover the device).
    ///
    /// A missing file is created exclusively (`O_CREAT|O_EXCL`): if another process creates it
    /// between the check and the open, this open fails instead of sizing and sharing that file.
    pub fn open(path: &Path, size: u64, writable: bool) -> io::Result<BlockFile> {
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .create_new(writable && !exists)
            .truncate(false)
            .open(path)
            .map_err(|e| with_path(e, "open", path))?;
        let meta = file.metadata().map_err(|e| with_path(e, "stat", path))?;
        let actual = if meta.file_type().is_file() {
            if !exists {
                file.set_len(size).map_err(|e| with_path(e, "size", path))?;
                size
            } else {
                meta.len()
            }
        } else {
            block_device_size(&file).map_err(|e| with_path(e, "size", path))?
        };
        if actual < size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: device has {actual} bytes, the table needs {size}",
                    path.display()
                ),
            ));
        }
        Ok(BlockFile {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: range {offset}+{len} beyond device size {}",
                    self.path.display(),
                    self.size
                ),
            )),
        }
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check_range(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset)
    }

    /// fallocate(2) over a range; true when the file system did it.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> bool {
        // SAFETY: fallocate on an fd we own, with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        r == 0
    }

    /// Make the range read back as zeroes.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 || self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            return Ok(());
        }
        let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Discard: free the space where the file system can, and read back as zeroes everywhere.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 || self.fallocate(libc::FALLOC_FL_PUNCH_HOLE, offset, len) {
            return Ok(());
        }
        self.zero_range(offset, len)
    }

    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn with_path(e: io::Error, op: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{op} {}: {e}", path.display()))
}

fn block_device_size(file: &File) -> io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: the ioctl writes one u64 into `size`, which lives for the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_discard_read_back_as_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dev");
        let f = BlockFile::open(&p, 1 << 20, true).unwrap();
        f.write_at(0, &[0xAB; 65536]).unwrap();
        f.zero_range(4096, 4096).unwrap();
        f.discard(16384, 8192).unwrap();
        let mut buf = vec![0u8; 65536];
        f.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xAB));
        assert!(buf[4096..8192].iter().all(|&b| b == 0));
        assert!(buf[8192..16384].iter().all(|&b| b == 0xAB));
        assert!(buf[16384..24576].iter().all(|&b| b == 0));
        assert!(buf[24576..].iter().all(|&b| b == 0xAB));
    }

    #[test]
    fn out_of_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = BlockFile::open(&dir.path().join("d"), 8192, true).unwrap();
        assert!(f.write_at(8000, &[0; 512]).is_err());
        assert!(f.read_at(u64::MAX - 10, &mut [0; 16]).is_err());
    }

    #[test]
    fn short_existing_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, [0u8; 100]).unwrap();
        let e = BlockFile::open(&p, 8192, true).unwrap_err();
        assert!(e.to_string().contains("needs 8192"), "{e}");
    }
}
