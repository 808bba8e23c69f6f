//! replicator: asynchronous remote replication of block device groups (the dm-replicator design,
//! in user space). The binary is a thin shell over this library.

pub mod nbd;
pub mod table;
