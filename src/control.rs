//! The control protocol between the CLI and the daemon: one JSON object per line over a Unix
//! socket, a request then a response, then the connection closes.
//!
//! Request:  `{"op":"create","name":"r1","table":"0 2048 replicator ...","source":"r1.table","cwd":"/dir"}`
//! Response: `{"ok":true,"body":...}` or `{"ok":false,"error":"r1.table:1:12: expected ..."}`
//!
//! Field names are stable: scripts read `status --json`.

use serde::{Deserialize, Serialize};

/// Environment variable naming the control socket for every client subcommand.
pub const CONTROL_ENV: &str = "REPLICATOR_CONTROL";
/// Default control socket path.
pub const CONTROL_DEFAULT: &str = "/run/replicator/control.sock";
/// Longest request line the daemon reads (a table file is small; this bounds memory).
pub const REQUEST_BYTES_MAX: usize = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Create {
        name: String,
        table: String,
        source: String,
        cwd: String,
        /// "primary" (default) or "secondary".
        #[serde(default)]
        secondary: bool,
    },
    Remove {
        name: String,
    },
    Ls,
    Status {
        name: String,
    },
    Table {
        name: String,
    },
    Message {
        name: String,
        sector: u64,
        args: Vec<String>,
    },
    Wait {
        name: String,
        event_nr: Option<u64>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub body: serde_json::Value,
}

impl Response {
    pub fn ok(body: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            body,
        }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            body: serde_json::Value::Null,
        }
    }
}

/// Status of one device, as `status --json` prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    /// "primary" or "secondary".
    pub role: String,
    /// The group's current epoch (from its replog); None before one began (a secondary).
    #[serde(default)]
    pub epoch: Option<u64>,
    /// The peer group a secondary is bound to (from its replog); None when unbound.
    #[serde(default)]
    pub binding: Option<BindingStatus>,
    pub dev_nr: u32,
    pub size_bytes: u64,
    pub replog: ReplogStatus,
    pub slinks: Vec<SlinkStatus>,
    pub event_nr: u64,
    /// The dm-style one-line status.
    pub line: String,
}

/// A secondary's binding to its primary group, as `status --json` prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BindingStatus {
    /// Hex of the 16 uuid bytes.
    pub peer_group_uuid: String,
    pub peer_site_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplogStatus {
    pub path: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub entries: u64,
    pub first_lsn: u64,
    pub last_lsn: u64,
    /// Highest lsn durable in the replog (survives a power loss); no other site is ever shipped
    /// more (R1). Read after the slinks' positions, so `applied_lsn <= durable_lsn` in one status.
    #[serde(default)]
    pub durable_lsn: u64,
    pub io_backend: String,
    pub devices: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SlinkStatus {
    pub slink: u8,
    pub transport: String,
    pub policy: String,
    pub mode: String,
    pub state: String,
    pub applied_lsn: u64,
    pub cursor_lsn: u64,
    pub lag_ios: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub dirty_bytes: u64,
    /// Health letters of this site's copy of the device: A alive, D write failure, S sync
    /// failure, R read failure.
    pub health: String,
    pub device_path: String,
    /// `tcp` slinks: the link's state, last error and counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<crate::engine::slink::LinkView>,
}
