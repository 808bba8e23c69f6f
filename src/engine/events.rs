//! Events: every state change of a group (slink up/down, sync/async switch, overflow, resync
//! start/end, device fault, role change) bumps the group's event counter, which `wait NAME
//! [EVENT_NR]` blocks on (as `dmsetup wait`), is logged, is kept in a bounded history for
//! `status`, and may run an operator's hook command.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

/// How many recent events a group keeps for `status`.
pub const EVENT_HISTORY_MAX: usize = 64;

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Event {
    pub nr: u64,
    pub unix_ms: u64,
    pub kind: &'static str,
    pub detail: String,
}

pub struct Events {
    group: String,
    counter: watch::Sender<u64>,
    history: Mutex<VecDeque<Event>>,
    hook: Option<String>,
}

impl Events {
    pub fn new(group: &str, hook: Option<String>) -> Self {
        let (counter, _) = watch::channel(0);
        Events {
            group: group.to_string(),
            counter,
            history: Mutex::new(VecDeque::with_capacity(EVENT_HISTORY_MAX)),
            hook,
        }
    }

    pub fn current(&self) -> u64 {
        *self.counter.borrow()
    }

    /// Record a state change: bump the counter, log it, keep it, run the hook.
    pub fn raise(&self, kind: &'static str, detail: impl Into<String>) {
        let detail = detail.into();
        let mut nr = 0;
        self.counter.send_modify(|c| {
            *c += 1;
            nr = *c;
        });
        tracing::info!(group = %self.group, event = nr, kind, "{detail}");
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Ok(mut h) = self.history.lock() {
            if h.len() == EVENT_HISTORY_MAX {
                h.pop_front();
            }
            h.push_back(Event {
                nr,
                unix_ms,
                kind,
                detail: detail.clone(),
            });
        }
        if let Some(hook) = &self.hook {
            // The hook learns what happened through its environment; it runs detached so a slow
            // hook never holds up the data path.
            let spawned = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(hook)
                .env("REPLICATOR_GROUP", &self.group)
                .env("REPLICATOR_EVENT_NR", nr.to_string())
                .env("REPLICATOR_EVENT", kind)
                .env("REPLICATOR_EVENT_DETAIL", &detail)
                .stdin(std::process::Stdio::null())
                .spawn();
            match spawned {
                Ok(mut child) => {
                    std::thread::spawn(move || child.wait());
                }
                Err(e) => tracing::warn!(group = %self.group, "event hook failed to start: {e}"),
            }
        }
    }

    pub fn history(&self) -> Vec<Event> {
        self.history
            .lock()
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Wait until the counter exceeds `after`; returns the new counter.
    pub async fn wait_after(&self, after: u64) -> u64 {
        let mut rx = self.counter.subscribe();
        let reached = rx.wait_for(|c| *c > after).await.map(|v| *v);
        reached.unwrap_or_else(|_| self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_returns_after_next_event() {
        let ev = std::sync::Arc::new(Events::new("g", None));
        let ev2 = ev.clone();
        let waiter = tokio::spawn(async move { ev2.wait_after(0).await });
        tokio::task::yield_now().await;
        ev.raise("test", "one");
        assert_eq!(waiter.await.unwrap(), 1);
        assert_eq!(ev.history().len(), 1);
        assert_eq!(ev.wait_after(0).await, 1, "already past: returns at once");
    }

    #[test]
    fn history_is_bounded() {
        let ev = Events::new("g", None);
        for i in 0..(EVENT_HISTORY_MAX + 10) {
            ev.raise("test", format!("{i}"));
        }
        let h = ev.history();
        assert_eq!(h.len(), EVENT_HISTORY_MAX);
        assert_eq!(h.last().unwrap().nr, (EVENT_HISTORY_MAX + 10) as u64);
    }
}
