//! The bytes of a `disk` dirty log (spec: replog/DIRTYLOG.md). This module is their only owner:
//! it encodes and decodes the header and bitmap pages, and checks every checksum.
//!
//! Integers are little-endian. Checksums are CRC-32C (Castagnoli).

/// Size of the header and of every bitmap page slot.
pub const PAGE_BYTES: usize = 4096;
/// Header magic, bytes 0..8 of the file.
pub const HEADER_MAGIC: [u8; 8] = *b"RPLDIRTY";
/// Format version written and read by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Bitmap page magic, bytes 0..4 of every page slot.
pub const PAGE_MAGIC: [u8; 4] = *b"DLPG";
/// Bytes of a page before its bitmap.
pub const PAGE_HEADER_BYTES: usize = 32;
/// Bitmap bytes per page.
pub const BITMAP_BYTES_PER_PAGE: usize = PAGE_BYTES - PAGE_HEADER_BYTES;
/// Regions (bits) per page: 32,512.
pub const REGIONS_PER_PAGE: u64 = (BITMAP_BYTES_PER_PAGE * 8) as u64;
/// Copies (slots) of every page: a persist writes the older one, so a torn write never destroys
/// the last durable copy.
pub const SLOTS_PER_PAGE: u64 = 2;

/// Header field offsets.
const H_VERSION: usize = 8;
const H_PAGE_SIZE: usize = 12;
const H_FILE_ID: usize = 16;
const H_DEVICE_SIZE: usize = 24;
const H_REGION_SIZE: usize = 32;
const H_REGIONS: usize = 40;
const H_PAGES: usize = 48;
const H_CRC: usize = 56;

/// Page field offsets.
const P_CRC: usize = 4;
const P_INDEX: usize = 8;
const P_GENERATION: usize = 16;

/// The geometry and identity stored in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Random at creation; salts every page checksum so pages of another file never validate.
    pub file_id: u64,
    pub device_size: u64,
    pub region_size: u64,
    pub regions: u64,
    pub pages: u64,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    BadMagic,
    UnsupportedVersion(u32),
    BadChecksum { stored: u32, computed: u32 },
    BadPageSize(u32),
}

/// Why a page slot was refused (the other slot may still be good).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageError {
    BadMagic,
    BadChecksum,
    WrongIndex { stored: u64 },
}

/// A decoded bitmap page slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<'a> {
    pub generation: u64,
    pub bitmap: &'a [u8],
}

fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = out.get_mut(at..at.saturating_add(bytes.len())) {
        dst.copy_from_slice(bytes);
    }
}

fn get_u32(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at.saturating_add(4))
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at.saturating_add(8))
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Offset of a page slot in the file.
pub fn slot_offset(page: u64, slot: u64) -> u64 {
    (PAGE_BYTES as u64).saturating_mul(
        1u64.saturating_add(page.saturating_mul(SLOTS_PER_PAGE).saturating_add(slot)),
    )
}

/// Size of a file holding `pages` bitmap pages.
pub fn file_len(pages: u64) -> u64 {
    slot_offset(pages, 0)
}

/// The header block (PAGE_BYTES long).
pub fn encode_header(h: &Header) -> Vec<u8> {
    let mut out = vec![0u8; PAGE_BYTES];
    put(&mut out, 0, &HEADER_MAGIC);
    put(&mut out, H_VERSION, &FORMAT_VERSION.to_le_bytes());
    put(&mut out, H_PAGE_SIZE, &(PAGE_BYTES as u32).to_le_bytes());
    put(&mut out, H_FILE_ID, &h.file_id.to_le_bytes());
    put(&mut out, H_DEVICE_SIZE, &h.device_size.to_le_bytes());
    put(&mut out, H_REGION_SIZE, &h.region_size.to_le_bytes());
    put(&mut out, H_REGIONS, &h.regions.to_le_bytes());
    put(&mut out, H_PAGES, &h.pages.to_le_bytes());
    let crc = crc32c::crc32c(out.get(..H_CRC).unwrap_or_default());
    put(&mut out, H_CRC, &crc.to_le_bytes());
    out
}

/// Decodes and checks a header block (at least 64 bytes; the rest is ignored).
pub fn decode_header(bytes: &[u8]) -> Result<Header, HeaderError> {
    if bytes.get(..HEADER_MAGIC.len()) != Some(&HEADER_MAGIC[..]) {
        return Err(HeaderError::BadMagic);
    }
    let version = get_u32(bytes, H_VERSION);
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let stored = get_u32(bytes, H_CRC);
    let computed = crc32c::crc32c(bytes.get(..H_CRC).unwrap_or_default());
    if stored != computed {
        return Err(HeaderError::BadChecksum { stored, computed });
    }
    let page_size = get_u32(bytes, H_PAGE_SIZE);
    if page_size as usize != PAGE_BYTES {
        return Err(HeaderError::BadPageSize(page_size));
    }
    Ok(Header {
        file_id: get_u64(bytes, H_FILE_ID),
        device_size: get_u64(bytes, H_DEVICE_SIZE),
        region_size: get_u64(bytes, H_REGION_SIZE),
        regions: get_u64(bytes, H_REGIONS),
        pages: get_u64(bytes, H_PAGES),
    })
}

fn page_crc(file_id: u64, page: &[u8]) -> u32 {
    let salted = crc32c::crc32c(&file_id.to_le_bytes());
    crc32c::crc32c_append(salted, page.get(P_INDEX..).unwrap_or_default())
}

/// A page slot (PAGE_BYTES long) holding `bitmap` (at most BITMAP_BYTES_PER_PAGE bytes; the rest
/// of the bitmap area is zero).
pub fn encode_page(file_id: u64, index: u64, generation: u64, bitmap: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; PAGE_BYTES];
    put(&mut out, 0, &PAGE_MAGIC);
    put(&mut out, P_INDEX, &index.to_le_bytes());
    put(&mut out, P_GENERATION, &generation.to_le_bytes());
    let len = bitmap.len().min(BITMAP_BYTES_PER_PAGE);
    put(
        &mut out,
        PAGE_HEADER_BYTES,
        bitmap.get(..len).unwrap_or_default(),
    );
    let crc = page_crc(file_id, &out);
    put(&mut out, P_CRC, &crc.to_le_bytes());
    out
}

/// Decodes and checks one page slot (PAGE_BYTES long).
pub fn decode_page(file_id: u64, index: u64, bytes: &[u8]) -> Result<Page<'_>, PageError> {
    if bytes.len() != PAGE_BYTES || bytes.get(..PAGE_MAGIC.len()) != Some(&PAGE_MAGIC[..]) {
        return Err(PageError::BadMagic);
    }
    if get_u32(bytes, P_CRC) != page_crc(file_id, bytes) {
        return Err(PageError::BadChecksum);
    }
    let stored = get_u64(bytes, P_INDEX);
    if stored != index {
        return Err(PageError::WrongIndex { stored });
    }
    Ok(Page {
        generation: get_u64(bytes, P_GENERATION),
        bitmap: bytes.get(PAGE_HEADER_BYTES..).unwrap_or_default(),
    })
}
