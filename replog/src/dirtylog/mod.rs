//! Dirty logs: per slink and device, a bitmap of the regions that site is missing (entries dropped
//! on ring overflow, or never synced). `core` logs live in memory only; `disk` logs persist every
//! page with a checksum (bytes: replog/DIRTYLOG.md, owned by [`format`]).
//!
//! Key decisions:
//! - Marks and clears change memory only; [`DirtyLog::persist`] makes them durable. The caller's
//!   invariant "a region is durably dirty before the entries that covered it are reclaimed" is:
//!   `mark_range` for every dropped entry, then `persist`, then reclaim.
//! - Every bitmap page has two slots on disk. A persist writes each changed page into the slot that
//!   does not hold its newest durable copy, with a higher generation, then fdatasyncs. A torn persist
//!   therefore leaves, for every page, either the new copy or the previous durable one: a mark that
//!   was durable before is never lost (at worst a region stays dirty and is copied again).
//! - A `core` log forgets everything on restart; the table then asks for a full resync (`sync`).
//! - Memory is one bit per region: `device_size / region_size` bits, bounded by [`REGIONS_MAX`].

pub mod format;

#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use format::{
    HeaderError, PageError, BITMAP_BYTES_PER_PAGE, PAGE_BYTES, REGIONS_PER_PAGE, SLOTS_PER_PAGE,
};

/// Most regions one dirty log may track (2^31 regions: a 256 MiB bitmap).
pub const REGIONS_MAX: u64 = 1 << 31;

const WORD_BITS: u64 = 64;
/// u64 words of the in-memory bitmap per on-disk page.
const WORDS_PER_PAGE: usize = BITMAP_BYTES_PER_PAGE / 8;

/// Why a dirty log could not be created, opened or persisted.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("invalid dirty log geometry: {0}")]
    InvalidGeometry(String),
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a dirty log (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("{path}: dirty log format version {found} is not supported (this build reads version {supported})", supported = format::FORMAT_VERSION)]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path}: dirty log header is corrupt: {detail}")]
    CorruptHeader { path: PathBuf, detail: String },
    #[error("{path}: dirty log is for device size {found_device_size} bytes and region size {found_region_size} bytes, but the table says {expected_device_size} and {expected_region_size}")]
    GeometryMismatch {
        path: PathBuf,
        found_device_size: u64,
        found_region_size: u64,
        expected_device_size: u64,
        expected_region_size: u64,
    },
    #[error(
        "{path}: dirty log is {len} bytes, expected {expected} (truncated or not a dirty log)"
    )]
    BadLength {
        path: PathBuf,
        len: u64,
        expected: u64,
    },
    #[error("{path}: bitmap page {page}: both copies are corrupt (slot 0: {slot0}; slot 1: {slot1}); the regions it covers must be treated as dirty: recreate the log with a full resync")]
    CorruptPage {
        path: PathBuf,
        page: u64,
        slot0: String,
        slot1: String,
    },
}

type Result<T> = std::result::Result<T, DirtyLogError>;

/// Newest durable copy of one bitmap page.
#[derive(Debug, Clone, Copy)]
struct PageState {
    slot: u64,
    generation: u64,
}

/// The persisted side of a `disk` log.
#[derive(Debug)]
struct Disk {
    path: PathBuf,
    file: File,
    file_id: u64,
    pages: Vec<PageState>,
    /// Pages changed since the last successful persist (flag per page, and the list of them).
    changed: Vec<bool>,
    changed_list: Vec<u64>,
}

/// A page write that `persist` will do: the new copy of `page` for `slot`.
#[derive(Debug)]
struct PageWrite {
    page: u64,
    slot: u64,
    generation: u64,
    offset: u64,
    bytes: Vec<u8>,
}

/// A region bitmap for one (slink, device).
#[derive(Debug)]
pub struct DirtyLog {
    device_size: u64,
    region_size: u64,
    regions: u64,
    /// Bit r of word r/64 is region r; padded to whole pages; bits >= regions are always 0.
    words: Vec<u64>,
    dirty_count: u64,
    disk: Option<Disk>,
}

/// (regions, pages) for a geometry, or why it is invalid.
fn geometry(device_size: u64, region_size: u64) -> Result<(u64, u64)> {
    if device_size == 0 {
        return Err(DirtyLogError::InvalidGeometry("device size is 0".into()));
    }
    if region_size == 0 {
        return Err(DirtyLogError::InvalidGeometry("region size is 0".into()));
    }
    let regions = device_size.div_ceil(region_size);
    if regions > REGIONS_MAX {
        return Err(DirtyLogError::InvalidGeometry(format!(
            "{regions} regions of {region_size} bytes for a {device_size}-byte device exceed the \
             limit of {REGIONS_MAX}: choose a larger region size"
        )));
    }
    Ok((regions, regions.div_ceil(REGIONS_PER_PAGE)))
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> DirtyLogError + 'a {
    move |source| DirtyLogError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl DirtyLog {
    fn new_in_memory(
        device_size: u64,
        region_size: u64,
        initially_dirty: bool,
    ) -> Result<DirtyLog> {
        let (regions, pages) = geometry(device_size, region_size)?;
        let words = usize::try_from(pages)
            .ok()
            .and_then(|p| p.checked_mul(WORDS_PER_PAGE))
            .ok_or_else(|| DirtyLogError::InvalidGeometry("bitmap too large".into()))?;
        let mut log = DirtyLog {
            device_size,
            region_size,
            regions,
            words: vec![0; words],
            dirty_count: 0,
            disk: None,
        };
        if initially_dirty {
            log.mark_all();
        }
        Ok(log)
    }

    /// A memory-only log (`core`). `initially_dirty`: every region starts dirty (`sync`).
    pub fn core(device_size: u64, region_size: u64, initially_dirty: bool) -> Result<DirtyLog> {
        DirtyLog::new_in_memory(device_size, region_size, initially_dirty)
    }

    /// Creates a new `disk` log file (refuses to overwrite one). The file appears complete or not
    /// at all: it is written under a temporary name, synced, then linked into place.
    pub fn create_disk(
        path: &Path,
        device_size: u64,
        region_size: u64,
        initially_dirty: bool,
    ) -> Result<DirtyLog> {
        DirtyLog::create_disk_with_id(
            path,
            device_size,
            region_size,
            initially_dirty,
            rand::random(),
        )
    }

    fn create_disk_with_id(
        path: &Path,
        device_size: u64,
        region_size: u64,
        initially_dirty: bool,
        file_id: u64,
    ) -> Result<DirtyLog> {
        let mut log = DirtyLog::new_in_memory(device_size, region_size, initially_dirty)?;
        let pages = log.pages();
        if path.symlink_metadata().is_ok() {
            return Err(io_err(path, "create")(io::Error::from(
                io::ErrorKind::AlreadyExists,
            )));
        }
        let file_name = path.file_name().ok_or_else(|| {
            io_err(path, "create")(io::Error::new(
                io::ErrorKind::InvalidInput,
                "path has no file name",
            ))
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(".creating");
        let tmp = path.with_file_name(tmp_name);
        let _ = std::fs::remove_file(&tmp);
        {
            let file = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
            let mut out = io::BufWriter::new(&file);
            let header = format::Header {
                file_id,
                device_size,
                region_size,
                regions: log.regions,
                pages,
            };
            out.write_all(&format::encode_header(&header))
                .map_err(io_err(&tmp, "write header"))?;
            for page in 0..pages {
                let bitmap = log.page_bytes(page);
                // Slot 0 holds generation 1, slot 1 generation 0: both valid, same bits.
                for generation in [1, 0] {
                    out.write_all(&format::encode_page(file_id, page, generation, &bitmap))
                        .map_err(io_err(&tmp, "write page"))?;
                }
            }
            out.flush().map_err(io_err(&tmp, "write"))?;
            drop(out);
            file.sync_all().map_err(io_err(&tmp, "fsync"))?;
        }
        // hard_link fails if `path` appeared meanwhile: never overwrite a log.
        let linked = std::fs::hard_link(&tmp, path).map_err(io_err(path, "create"));
        let _ = std::fs::remove_file(&tmp);
        linked?;
        sync_parent_dir(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        let page_count = log.words.len() / WORDS_PER_PAGE;
        log.disk = Some(Disk {
            path: path.to_path_buf(),
            file,
            file_id,
            pages: vec![
                PageState {
                    slot: 0,
                    generation: 1
                };
                page_count
            ],
            changed: vec![false; page_count],
            changed_list: Vec::new(),
        });
        Ok(log)
    }

    /// Opens an existing `disk` log, checking magic, version, checksums, length and that its
    /// geometry is the one the table asks for.
    pub fn open_disk(path: &Path, device_size: u64, region_size: u64) -> Result<DirtyLog> {
        let (regions, pages) = geometry(device_size, region_size)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(path, "open"))?;
        let len = file.metadata().map_err(io_err(path, "stat"))?.len();
        let mut header_bytes = vec![0u8; PAGE_BYTES];
        if len < PAGE_BYTES as u64 {
            return Err(DirtyLogError::BadLength {
                path: path.to_path_buf(),
                len,
                expected: format::file_len(pages),
            });
        }
        file.read_exact_at(&mut header_bytes, 0)
            .map_err(io_err(path, "read header"))?;
        let header = format::decode_header(&header_bytes).map_err(|e| match e {
            HeaderError::BadMagic => DirtyLogError::BadMagic {
                path: path.to_path_buf(),
            },
            HeaderError::UnsupportedVersion(found) => DirtyLogError::UnsupportedVersion {
                path: path.to_path_buf(),
                found,
            },
            HeaderError::BadChecksum { stored, computed } => DirtyLogError::CorruptHeader {
                path: path.to_path_buf(),
                detail: format!("checksum {stored:#010x}, computed {computed:#010x}"),
            },
            HeaderError::BadPageSize(size) => DirtyLogError::CorruptHeader {
                path: path.to_path_buf(),
                detail: format!("page size {size}, expected {PAGE_BYTES}"),
            },
        })?;
        if header.device_size != device_size || header.region_size != region_size {
            return Err(DirtyLogError::GeometryMismatch {
                path: path.to_path_buf(),
                found_device_size: header.device_size,
                found_region_size: header.region_size,
                expected_device_size: device_size,
                expected_region_size: region_size,
            });
        }
        if header.regions != regions || header.pages != pages {
            return Err(DirtyLogError::CorruptHeader {
                path: path.to_path_buf(),
                detail: format!(
                    "{} regions in {} pages do not match the geometry ({regions} in {pages})",
                    header.regions, header.pages
                ),
            });
        }
        let expected = format::file_len(pages);
        if len != expected {
            return Err(DirtyLogError::BadLength {
                path: path.to_path_buf(),
                len,
                expected,
            });
        }
        let mut log = DirtyLog::new_in_memory(device_size, region_size, false)?;
        let mut page_states = Vec::with_capacity(log.words.len() / WORDS_PER_PAGE);
        let mut slots = vec![0u8; PAGE_BYTES * SLOTS_PER_PAGE as usize];
        for page in 0..pages {
            file.read_exact_at(&mut slots, format::slot_offset(page, 0))
                .map_err(io_err(path, "read page"))?;
            let (first, second) = slots.split_at(PAGE_BYTES);
            let decoded = [
                format::decode_page(header.file_id, page, first),
                format::decode_page(header.file_id, page, second),
            ];
            let (state, bitmap) = match decoded {
                [Ok(a), Ok(b)] if a.generation == b.generation => {
                    // Never written by this format; be conservative: the union.
                    let union: Vec<u8> =
                        a.bitmap.iter().zip(b.bitmap).map(|(x, y)| x | y).collect();
                    (
                        PageState {
                            slot: 0,
                            generation: a.generation,
                        },
                        union,
                    )
                }
                [Ok(a), Ok(b)] if a.generation > b.generation => (
                    PageState {
                        slot: 0,
                        generation: a.generation,
                    },
                    a.bitmap.to_vec(),
                ),
                [_, Ok(b)] => (
                    PageState {
                        slot: 1,
                        generation: b.generation,
                    },
                    b.bitmap.to_vec(),
                ),
                [Ok(a), Err(_)] => (
                    PageState {
                        slot: 0,
                        generation: a.generation,
                    },
                    a.bitmap.to_vec(),
                ),
                [Err(e0), Err(e1)] => {
                    return Err(DirtyLogError::CorruptPage {
                        path: path.to_path_buf(),
                        page,
                        slot0: describe(&e0),
                        slot1: describe(&e1),
                    })
                }
            };
            log.load_page(page, &bitmap);
            page_states.push(state);
        }
        let page_count = page_states.len();
        log.disk = Some(Disk {
            path: path.to_path_buf(),
            file,
            file_id: header.file_id,
            pages: page_states,
            changed: vec![false; page_count],
            changed_list: Vec::new(),
        });
        Ok(log)
    }

    /// Opens the log at `path`, or creates it (with `initially_dirty`) if there is none.
    pub fn open_or_create_disk(
        path: &Path,
        device_size: u64,
        region_size: u64,
        initially_dirty: bool,
    ) -> Result<DirtyLog> {
        if path.symlink_metadata().is_ok() {
            return DirtyLog::open_disk(path, device_size, region_size);
        }
        match DirtyLog::create_disk(path, device_size, region_size, initially_dirty) {
            // Created by someone else meanwhile.
            Err(DirtyLogError::Io { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists =>
            {
                DirtyLog::open_disk(path, device_size, region_size)
            }
            other => other,
        }
    }

    /// Bytes per region.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Number of regions (the last one may be shorter than `region_size`).
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// Size of the device the log covers.
    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    /// True for `disk` logs.
    pub fn is_persistent(&self) -> bool {
        self.disk.is_some()
    }

    /// Path of a `disk` log.
    pub fn path(&self) -> Option<&Path> {
        self.disk.as_ref().map(|d| d.path.as_path())
    }

    /// Byte range `[start, end)` of a region on the device (end clipped to the device size).
    pub fn region_range(&self, region: u64) -> std::ops::Range<u64> {
        let start = region
            .saturating_mul(self.region_size)
            .min(self.device_size);
        let end = start.saturating_add(self.region_size).min(self.device_size);
        start..end
    }

    /// Marks dirty (in memory) every region that `[offset, offset+len)` touches; the part beyond
    /// the device is ignored. Returns how many regions became dirty.
    pub fn mark_range(&mut self, offset: u64, len: u64) -> u64 {
        if len == 0 || offset >= self.device_size {
            return 0;
        }
        let last_byte = offset.saturating_add(len - 1).min(self.device_size - 1);
        self.set_bits(offset / self.region_size, last_byte / self.region_size)
    }

    /// Marks every region dirty (in memory).
    pub fn mark_all(&mut self) -> u64 {
        if self.regions == 0 {
            return 0;
        }
        self.set_bits(0, self.regions - 1)
    }

    /// Marks one region dirty (in memory); out-of-range regions are ignored.
    pub fn mark_region(&mut self, region: u64) -> bool {
        region < self.regions && self.set_bits(region, region) == 1
    }

    /// Clears one region (in memory), e.g. once a resync copied it durably. Returns whether it was
    /// dirty; out-of-range regions are ignored.
    pub fn clear_region(&mut self, region: u64) -> bool {
        if !self.is_dirty(region) {
            return false;
        }
        let (word, bit) = split(region);
        if let Some(w) = self.words.get_mut(word) {
            *w &= !bit;
            self.dirty_count = self.dirty_count.saturating_sub(1);
            self.note_changed(word / WORDS_PER_PAGE);
            return true;
        }
        false
    }

    /// Whether a region is dirty (false beyond the device).
    pub fn is_dirty(&self, region: u64) -> bool {
        let (word, bit) = split(region);
        region < self.regions && self.words.get(word).is_some_and(|w| w & bit != 0)
    }

    /// Dirty regions in ascending order.
    pub fn dirty_regions(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .filter(|(_, word)| **word != 0)
            .flat_map(|(index, &word)| Bits {
                word,
                base: index as u64 * WORD_BITS,
            })
    }

    /// Number of dirty regions.
    pub fn dirty_count(&self) -> u64 {
        self.dirty_count
    }

    /// Bytes of the device covered by dirty regions (the last region counts its real length).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.dirty_count.saturating_mul(self.region_size);
        if let Some(last) = self.regions.checked_sub(1) {
            if self.is_dirty(last) {
                let last_len = self.region_range(last).end - self.region_range(last).start;
                bytes = bytes.saturating_sub(self.region_size - last_len);
            }
        }
        bytes
    }

    /// Makes every mark and clear so far durable. `disk`: writes each changed page into its
    /// older slot with a new generation, then fdatasync; `core`: nothing to do.
    /// On error nothing is considered persisted; a later call writes the same pages again.
    pub fn persist(&mut self) -> Result<()> {
        let writes = self.pending_writes();
        let Some(disk) = self.disk.as_mut() else {
            return Ok(());
        };
        if writes.is_empty() {
            return Ok(());
        }
        for w in &writes {
            disk.file
                .write_all_at(&w.bytes, w.offset)
                .map_err(io_err(&disk.path, "write page"))?;
        }
        disk.file
            .sync_data()
            .map_err(io_err(&disk.path, "fdatasync"))?;
        for w in writes {
            if let Some(state) = usize::try_from(w.page)
                .ok()
                .and_then(|p| disk.pages.get_mut(p))
            {
                *state = PageState {
                    slot: w.slot,
                    generation: w.generation,
                };
            }
        }
        for page in disk.changed_list.drain(..) {
            if let Some(flag) = usize::try_from(page)
                .ok()
                .and_then(|p| disk.changed.get_mut(p))
            {
                *flag = false;
            }
        }
        Ok(())
    }

    /// Pages changed since the last persist (0 for `core` logs).
    pub fn unpersisted_pages(&self) -> usize {
        self.disk.as_ref().map_or(0, |d| d.changed_list.len())
    }

    /// The page writes the next persist does, in page order.
    fn pending_writes(&self) -> Vec<PageWrite> {
        let Some(disk) = &self.disk else {
            return Vec::new();
        };
        let mut pages = disk.changed_list.clone();
        pages.sort_unstable();
        pages
            .into_iter()
            .filter_map(|page| {
                let state = disk.pages.get(usize::try_from(page).ok()?)?;
                let slot = 1 - state.slot;
                let generation = state.generation.checked_add(1)?;
                Some(PageWrite {
                    page,
                    slot,
                    generation,
                    offset: format::slot_offset(page, slot),
                    bytes: format::encode_page(
                        disk.file_id,
                        page,
                        generation,
                        &self.page_bytes(page),
                    ),
                })
            })
            .collect()
    }

    fn pages(&self) -> u64 {
        (self.words.len() / WORDS_PER_PAGE) as u64
    }

    /// Sets bits `first..=last` (both < regions); returns how many were newly set.
    fn set_bits(&mut self, first: u64, last: u64) -> u64 {
        let last = last.min(self.regions.saturating_sub(1));
        if first > last {
            return 0;
        }
        let mut newly = 0;
        let (first_word, _) = split(first);
        let (last_word, _) = split(last);
        for word_index in first_word..=last_word {
            let lo = if word_index == first_word {
                first % WORD_BITS
            } else {
                0
            };
            let hi = if word_index == last_word {
                last % WORD_BITS
            } else {
                WORD_BITS - 1
            };
            // Bits lo..=hi.
            let mask = (u64::MAX >> (WORD_BITS - 1 - hi)) & (u64::MAX << lo);
            let Some(word) = self.words.get_mut(word_index) else {
                break;
            };
            let added = mask & !*word;
            if added != 0 {
                *word |= added;
                newly += u64::from(added.count_ones());
                self.note_changed(word_index / WORDS_PER_PAGE);
            }
        }
        self.dirty_count += newly;
        newly
    }

    fn note_changed(&mut self, page: usize) {
        if let Some(disk) = &mut self.disk {
            if let Some(flag) = disk.changed.get_mut(page) {
                if !*flag {
                    *flag = true;
                    disk.changed_list.push(page as u64);
                }
            }
        }
    }

    /// The bitmap bytes of one page (bit r%8 of byte r/8, for the page's regions).
    fn page_bytes(&self, page: u64) -> Vec<u8> {
        let start = usize::try_from(page)
            .unwrap_or(usize::MAX)
            .saturating_mul(WORDS_PER_PAGE);
        let words = self
            .words
            .get(start..start.saturating_add(WORDS_PER_PAGE))
            .unwrap_or_default();
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// Loads one page's bitmap; bits beyond `regions` are ignored.
    fn load_page(&mut self, page: u64, bitmap: &[u8]) {
        let start = usize::try_from(page)
            .unwrap_or(usize::MAX)
            .saturating_mul(WORDS_PER_PAGE);
        for (i, chunk) in bitmap.chunks_exact(8).take(WORDS_PER_PAGE).enumerate() {
            let mut word = chunk.try_into().map_or(0, u64::from_le_bytes);
            let first_region = (start.saturating_add(i) as u64).saturating_mul(WORD_BITS);
            let valid = self.regions.saturating_sub(first_region);
            if valid < WORD_BITS {
                word &= (1u64 << valid).wrapping_sub(1);
            }
            if let Some(w) = self.words.get_mut(start.saturating_add(i)) {
                *w = word;
                self.dirty_count += u64::from(word.count_ones());
            }
        }
    }
}

/// (word index, bit mask) of a region.
fn split(region: u64) -> (usize, u64) {
    (
        usize::try_from(region / WORD_BITS).unwrap_or(usize::MAX),
        1u64 << (region % WORD_BITS),
    )
}

fn describe(e: &PageError) -> String {
    match e {
        PageError::BadMagic => "bad magic".into(),
        PageError::BadChecksum => "checksum mismatch".into(),
        PageError::WrongIndex { stored } => format!("holds page {stored}"),
    }
}

/// fsync the directory holding `path`, so a newly linked file survives a crash.
fn sync_parent_dir(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(io_err(parent, "fsync directory"))
}

/// Iterator over the set bits of one word.
struct Bits {
    word: u64,
    base: u64,
}

impl Iterator for Bits {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.word == 0 {
            return None;
        }
        let bit = u64::from(self.word.trailing_zeros());
        self.word &= self.word - 1;
        Some(self.base + bit)
    }
}
