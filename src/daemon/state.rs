//! The daemon's state directory: every created device is recorded there (its table, where the
//! table came from, the directory relative paths resolve against), so it comes back after a
//! restart. `remove` deletes the record.
//!
//! Layout: `<state-dir>/devices/<seq>-<name>.json`, seq giving creation order (a device that
//! joins a group with `open` must come back after the device that created the group).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub seq: u64,
    pub name: String,
    pub table: String,
    pub source: String,
    pub cwd: String,
    #[serde(default)]
    pub secondary: bool,
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> std::io::Result<StateDir> {
        let dir = root.join("devices");
        fs::create_dir_all(&dir)?;
        Ok(StateDir { dir })
    }

    pub fn load(&self) -> std::io::Result<Vec<DeviceRecord>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let text = fs::read_to_string(&p)?;
            match serde_json::from_str::<DeviceRecord>(&text) {
                Ok(r) => out.push(r),
                Err(err) => tracing::error!("state record {}: {err}; skipped", p.display()),
            }
        }
        out.sort_by_key(|r| r.seq);
        Ok(out)
    }

    pub fn next_seq(&self) -> u64 {
        self.load()
            .map(|v| v.last().map(|r| r.seq + 1).unwrap_or(1))
            .unwrap_or(1)
    }

    fn path_of(&self, r: &DeviceRecord) -> PathBuf {
        self.dir.join(format!("{:08}-{}.json", r.seq, r.name))
    }

    /// Write a record durably (temp file, fsync, rename, fsync the directory).
    pub fn save(&self, r: &DeviceRecord) -> std::io::Result<()> {
        let path = self.path_of(r);
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(serde_json::to_string_pretty(r)?.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(&self.dir)?.sync_all()
    }

    pub fn delete(&self, name: &str) -> std::io::Result<()> {
        for r in self.load()? {
            if r.name == name {
                fs::remove_file(self.path_of(&r))?;
            }
        }
        fs::File::open(&self.dir)?.sync_all()
    }
}
