//! Two sites over loopback TCP: a secondary daemon (site `siteB`) listening for slinks, and a
//! primary daemon (site `siteA`) that names it as its peer. Both hold the same key.

use std::process::Command;
use std::time::{Duration, Instant};

use super::Daemon;

/// The pre-shared key both sites hold (written to `key` in each daemon's directory).
pub const SITE_KEY: &str = "a key both sites hold, long enough 0123456789";

pub struct Sites {
    /// The primary (`siteA`).
    pub p: Daemon,
    /// The secondary (`siteB`).
    pub s: Daemon,
    /// Where the secondary listens for slinks: the address a primary table's `tcp` slink names.
    pub listen: String,
}

impl Sites {
    /// Both daemons, without devices; `primary_flags` go to the primary's command line.
    pub fn start(primary_flags: &[&str]) -> Sites {
        eprintln!("link path: direct loopback TCP");
        let listen = format!("127.0.0.1:{}", super::free_port());
        let s = Daemon::start_for_site("siteB", &["--slink-listen", &listen, "--allow", "siteA"]);
        let peer = format!("siteB@{listen}");
        let mut flags = vec!["--peer", &peer];
        flags.extend_from_slice(primary_flags);
        let p = Daemon::start_for_site("siteA", &flags);
        Sites { p, s, listen }
    }

    /// Slink 1 (the secondary site) of the primary's device `dev`, from its status.
    pub fn slink1(&self, dev: &str) -> serde_json::Value {
        self.p.status(dev)["slinks"][1].clone()
    }

    /// The link state of slink 1 of `dev` ("up", "down", ...).
    pub fn link_state(&self, dev: &str) -> String {
        self.slink1(dev)["link"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Wait until slink 1 of `dev` satisfies `ok`; the assertion names `what` and shows the
    /// slink and the primary's log.
    pub fn wait_slink1(
        &self,
        dev: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.slink1(dev);
            if ok(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "slink 1 of {dev}: {what} did not happen within {timeout:?}: {s:#}\nprimary log:\n{}",
                self.p.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until slink 1 of `dev` has its link up.
    pub fn wait_link_up(&self, dev: &str, timeout: Duration) {
        self.wait_slink1(dev, "link up", timeout, |s| s["link"]["state"] == "up");
    }
}

impl Daemon {
    /// A daemon for site `site` holding [`SITE_KEY`]; `extra` flags as in [`Daemon::start_with`].
    pub fn start_for_site(site: &str, extra: &[&str]) -> Daemon {
        let mut flags = vec!["--site-id", site, "--psk-file", "{dir}/key"];
        flags.extend_from_slice(extra);
        let mut d = Daemon::prepare(&flags);
        std::fs::write(d.dir.join("key"), SITE_KEY).unwrap();
        d.spawn();
        d
    }
}

/// Poll `check` every 100 ms until it returns something; panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A qemu-io client of the raw export at `uri` running `cmds` (one `-c` each), not started yet.
pub fn qemu_io_command(uri: &str, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c
}
