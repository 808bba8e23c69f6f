//! replicator: asynchronous remote replication of block device groups (the dm-replicator design,
//! in user space). The binary is a thin shell over this library.
//!
//! Code map: `table` parses mapping tables; `engine` holds groups, the write path, slinks and
//! policies; `nbd` is the NBD server; `daemon` glues them (registry, control socket, state dir);
//! `control` is the CLI/daemon protocol; `cli` the command line; `metrics` the Prometheus side.

pub mod cli;
pub mod control;
pub mod core;
pub mod daemon;
pub mod driver;
pub mod engine;
pub mod metrics;
pub mod nbd;
pub mod table;
