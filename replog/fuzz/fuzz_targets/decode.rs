//! Fuzzes the entry header and metadata slot decoders: never panic, and whatever decodes
//! re-encodes to the same bytes (decoding is exact), in the format version it was read in.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replog::format::{
    EntryHeader, MetaSlot, ENTRY_HEADER_BYTES, META_ENCODED_BYTES, META_V1_ENCODED_BYTES,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = EntryHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..ENTRY_HEADER_BYTES]);
        let _ = h.record_bytes();
    }
    if let Ok((m, version)) = MetaSlot::decode_versioned(data) {
        if version == 1 {
            let v1 = m.encode_v1().expect("a format-1 slot re-encodes as format 1");
            assert_eq!(&v1[..], &data[..META_V1_ENCODED_BYTES]);
        } else if version == 2 {
            let v2 = m.encode_v2().expect("a format-2 slot re-encodes as format 2");
            assert_eq!(&v2[..], &data[..META_ENCODED_BYTES]);
        } else {
            assert_eq!(&m.encode()[..], &data[..META_ENCODED_BYTES]);
        }
        assert_eq!(m.check(), Ok(()));
        let _ = m.check_geometry();
    }
});
