//! Mapping tables: parser and grammar (being written).
