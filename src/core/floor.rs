//! The drop floor's persistence (the rules are in `core/mod.rs`, "Drop floor"): one write per
//! slink on its way at a time, of the value the disk should hold now; a floor cleared at the end
//! of a repair is forgotten in memory only once the clear is durable.

use super::{Command, Core, Lsn};

impl Core {
    /// Write each slink's floor where the disk does not hold what it should (after any input).
    pub(super) fn persist_floors(&mut self, out: &mut Vec<Command>) {
        for s in self.slinks.iter_mut().skip(1) {
            let f = &mut s.floor;
            if f.in_flight.is_some() || f.retry {
                continue;
            }
            let wanted = f.wanted(s.drop_floor);
            if wanted == f.on_disk {
                if f.repaired {
                    // The clear is durable (or nothing was ever written): forget the floor.
                    f.repaired = false;
                    s.drop_floor = None;
                }
                continue;
            }
            f.in_flight = Some(wanted);
            out.push(Command::PersistDropFloor {
                slink: s.nr(),
                floor: wanted,
            });
        }
    }

    pub(super) fn on_floor_persisted(
        &mut self,
        slink: u8,
        floor: Option<Lsn>,
        result: Result<(), String>,
        out: &mut Vec<Command>,
    ) {
        let Some(i) = self.slink_index(slink) else {
            return;
        };
        let f = &mut self.slinks[i].floor;
        let asked = f.in_flight.take();
        assert_eq!(
            asked,
            Some(floor),
            "drop floor {floor:?} of slink {slink} persisted, not asked for"
        );
        match result {
            Ok(()) => {
                f.on_disk = floor;
                if f.repaired && floor.is_none() {
                    f.repaired = false;
                    self.slinks[i].drop_floor = None;
                    // The slink's cursor may move again: parked writes may get room now.
                    if self.room.is_some() {
                        self.continue_room(out);
                    }
                }
            }
            Err(e) => {
                // The disk holds the old or the new value, both safe; the in-memory floor and
                // the held cursor stay as they are until a write succeeds.
                f.write_failed(floor);
                out.push(Command::Event {
                    kind: "drop-floor-persist-failed",
                    detail: format!("slink {slink}: floor {floor:?}: {e}"),
                });
            }
        }
    }

    /// The site's repair completed: clear its floor (durably first).
    pub(super) fn floor_repaired(&mut self, i: usize) {
        let s = &mut self.slinks[i];
        if s.drop_floor.is_some() {
            s.floor.repaired = true;
        }
    }
}
