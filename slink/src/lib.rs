//! Site links (slinks): the transports that ship replog entries to other sites.
//!
//! Key rule: slink never opens a replog file. It receives entries from the core and hands received
//! entries back to the core; every locally persisted byte belongs to the `replog` crate.
