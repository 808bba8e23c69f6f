//! Fuzzes the entry header and metadata slot decoders: never panic, and whatever decodes
//! re-encodes to the same bytes (decoding is exact).
#![no_main]

use libfuzzer_sys::fuzz_target;
use replog::format::{EntryHeader, MetaSlot, ENTRY_HEADER_BYTES, META_ENCODED_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = EntryHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..ENTRY_HEADER_BYTES]);
        let _ = h.record_bytes();
    }
    if let Ok(m) = MetaSlot::decode(data) {
        assert_eq!(&m.encode()[..], &data[..META_ENCODED_BYTES]);
        let _ = m.check_geometry();
    }
});
