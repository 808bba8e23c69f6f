//! `AlignedBuf`: heap memory aligned for O_DIRECT.
//!
//! O_DIRECT needs the user buffer aligned to the device's memory alignment (at most the page size
//! on every Linux file system and block device we target), so every buffer is aligned to
//! [`BUF_ALIGN`]. The capacity is rounded up to a multiple of [`BUF_ALIGN`]; the visible length can
//! be anything up to the capacity. Every byte is initialised (allocated zeroed), so growing the
//! visible length within the capacity never exposes uninitialised memory.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment (and capacity granule) of every [`AlignedBuf`], in bytes.
pub const BUF_ALIGN: usize = 4096;

/// Heap memory aligned to [`BUF_ALIGN`], owned, `Send` and `Sync`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    /// Visible length (`<= capacity`).
    len: usize,
    /// Allocated bytes: a non-zero multiple of `BUF_ALIGN`.
    capacity: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>); moving it to another thread
// moves that ownership, and shared references only give out `&[u8]`.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; `&AlignedBuf` only allows reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` visible bytes (capacity rounded up to [`BUF_ALIGN`]).
    ///
    /// Aborts the process like `Vec` does if memory is exhausted (via `handle_alloc_error`).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let capacity = len.max(1).div_ceil(BUF_ALIGN).saturating_mul(BUF_ALIGN);
        let layout = match Layout::from_size_align(capacity, BUF_ALIGN) {
            Ok(layout) => layout,
            // Only when capacity overflows isize: the same situation as Vec's capacity overflow.
            Err(_) => alloc::handle_alloc_error(Layout::new::<[u8; BUF_ALIGN]>()),
        };
        // SAFETY: layout has a non-zero size (capacity >= BUF_ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, capacity }
    }

    /// A buffer holding a copy of `data` (capacity rounded up, padding zeroed).
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Visible length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the visible length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated bytes (a multiple of [`BUF_ALIGN`]); `set_len` may grow up to this.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the visible length. Growing exposes whatever the bytes held before (zeros if never
    /// written). Fails with `InvalidInput` beyond the capacity.
    pub fn set_len(&mut self, len: usize) -> std::io::Result<()> {
        if len > self.capacity {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "AlignedBuf::set_len({len}) beyond capacity {}",
                    self.capacity
                ),
            ));
        }
        self.len = len;
        Ok(())
    }

    /// Shortens the visible length to `len`; no effect if `len >= self.len()` (like `Vec`).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` initialised bytes (allocated zeroed) and len <= capacity.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: the allocation was made in `zeroed` with exactly this size and alignment, and
        // from_size_align succeeded there, so it succeeds here.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.capacity, BUF_ALIGN),
            );
        }
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        let mut copy = AlignedBuf::zeroed(self.capacity);
        copy.copy_from_slice(AlignedBuf::full_view(self));
        copy.len = self.len;
        copy
    }
}

impl AlignedBuf {
    fn full_view(buf: &AlignedBuf) -> &[u8] {
        // SAFETY: all `capacity` bytes are allocated and initialised (allocated zeroed).
        unsafe { std::slice::from_raw_parts(buf.ptr.as_ptr(), buf.capacity) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &AlignedBuf) -> bool {
        **self == **other
    }
}

impl Eq for AlignedBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        for len in [0, 1, 511, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
            assert_eq!(buf.capacity() % BUF_ALIGN, 0);
            assert!(buf.capacity() >= len.max(1));
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn set_len_within_capacity_only() {
        let mut buf = AlignedBuf::from_slice(b"abc");
        assert_eq!(&buf[..], b"abc");
        buf.set_len(4096).unwrap();
        assert_eq!(&buf[..4], b"abc\0");
        assert!(buf.set_len(4097).is_err());
        buf.truncate(2);
        assert_eq!(&buf[..], b"ab");
        buf.truncate(10);
        assert_eq!(buf.len(), 2);
        let copy = buf.clone();
        assert_eq!(copy, buf);
        assert_eq!(copy.capacity(), buf.capacity());
    }
}
