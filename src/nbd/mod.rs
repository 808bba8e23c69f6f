//! NBD front end (being written).
