//! The core's view of one slink's dirty regions: which regions of which device the site is
//! missing, and which resync pieces of them are on their way.
//!
//! The driver persists every change the core decides (`Command::MarkDirty`, `Command::ClearDirty`)
//! through the replog crate's dirty logs; this is the in-memory mirror the decisions are made on.
//! One bit per region, so memory is the device size divided by the region size (the dirty log
//! on disk has the same bound).
//!
//! The rule that keeps a resync from losing a write: a piece that was read before a region was
//! marked dirty again (an overflow dropped newer entries for it) must not clear the region when
//! its acknowledgement comes back. Marking a region stales every piece of it in flight.

use std::collections::BTreeMap;

/// Resync pieces: a region bigger than this travels in several.
pub const RESYNC_PIECE_BYTES_MAX: u64 = 1 << 20;
/// Resync pieces in flight per slink (sent, not acknowledged): bounds what a resync adds to a
/// link's window and what the primary reads ahead. 16 MiB, about the link window.
pub const RESYNC_PIECES_IN_FLIGHT_MAX: usize = 16;

#[derive(Clone, Debug)]
struct DeviceBits {
    size: u64,
    region_bytes: u64,
    bits: Vec<u64>,
    dirty: u64,
}

impl DeviceBits {
    fn regions(&self) -> u64 {
        self.size.div_ceil(self.region_bytes)
    }

    fn get(&self, r: u64) -> bool {
        let (w, b) = ((r / 64) as usize, r % 64);
        self.bits.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn set(&mut self, r: u64, v: bool) -> bool {
        let (w, b) = ((r / 64) as usize, r % 64);
        let Some(x) = self.bits.get_mut(w) else {
            return false;
        };
        let was = *x & (1 << b) != 0;
        if v {
            *x |= 1 << b;
        } else {
            *x &= !(1 << b);
        }
        match (was, v) {
            (false, true) => self.dirty += 1,
            (true, false) => self.dirty -= 1,
            _ => {}
        }
        was != v
    }

    fn next_from(&self, from: u64) -> Option<u64> {
        (from..self.regions()).find(|r| self.get(*r))
    }
}

/// A piece of a dirty region handed to the site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub seq: u64,
    pub device: u32,
    pub region: u64,
    pub offset: u64,
    pub len: u64,
    /// The region's last piece: its acknowledgement cleans the region.
    pub last: bool,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    piece: Piece,
    /// The region was marked dirty again after this piece was read.
    stale: bool,
}

/// The region being sent piece by piece.
#[derive(Clone, Copy, Debug)]
struct Cursor {
    device: u32,
    region: u64,
    next: u64,
    end: u64,
}

#[derive(Clone, Debug, Default)]
pub struct DirtyRegions {
    devices: BTreeMap<u32, DeviceBits>,
    in_flight: BTreeMap<u64, InFlight>,
    sending: Option<Cursor>,
}

impl DirtyRegions {
    /// A device with `region_bytes` regions, all clean.
    pub fn add_device(&mut self, device: u32, size: u64, region_bytes: u64) {
        assert!(
            region_bytes > 0,
            "dirty regions of device {device}: region size 0"
        );
        let regions = size.div_ceil(region_bytes);
        self.devices.insert(
            device,
            DeviceBits {
                size,
                region_bytes,
                bits: vec![0; regions.div_ceil(64) as usize],
                dirty: 0,
            },
        );
    }

    pub fn has_device(&self, device: u32) -> bool {
        self.devices.contains_key(&device)
    }

    pub fn region_bytes(&self, device: u32) -> Option<u64> {
        self.devices.get(&device).map(|d| d.region_bytes)
    }

    /// Mark the regions under `[offset, offset+len)` dirty; returns the regions that were clean.
    pub fn mark(&mut self, device: u32, offset: u64, len: u64) -> Vec<u64> {
        let Some(d) = self.devices.get_mut(&device) else {
            return Vec::new();
        };
        let first = offset / d.region_bytes;
        let last = (offset + len.max(1) - 1) / d.region_bytes;
        let mut newly = Vec::new();
        for r in first..=last.min(d.regions().saturating_sub(1)) {
            if d.set(r, true) {
                newly.push(r);
            }
            for f in self.in_flight.values_mut() {
                if f.piece.device == device && f.piece.region == r {
                    f.stale = true;
                }
            }
            if self
                .sending
                .is_some_and(|c| c.device == device && c.region == r)
            {
                // Start the region again: what was already sent predates the new mark.
                self.sending = None;
            }
        }
        newly
    }

    /// Mark every region of every device dirty (a full resync).
    pub fn mark_all(&mut self) {
        let devices: Vec<(u32, u64)> = self.devices.iter().map(|(k, d)| (*k, d.size)).collect();
        for (dev, size) in devices {
            self.mark(dev, 0, size.max(1));
        }
    }

    pub fn is_dirty(&self, device: u32, region: u64) -> bool {
        self.devices.get(&device).is_some_and(|d| d.get(region))
    }

    pub fn dirty_regions(&self) -> u64 {
        self.devices.values().map(|d| d.dirty).sum()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.devices
            .values()
            .map(|d| d.dirty.saturating_mul(d.region_bytes))
            .sum()
    }

    /// Dirty bytes of one device (status shows them per device).
    pub fn device_dirty_bytes(&self, device: u32) -> u64 {
        self.devices
            .get(&device)
            .map_or(0, |d| d.dirty.saturating_mul(d.region_bytes))
    }

    pub fn is_clean(&self) -> bool {
        self.dirty_regions() == 0
    }

    pub fn pieces_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The next piece to send with sequence number `seq`, if a dirty region has one that is not on
    /// its way and the window has room.
    pub fn next_piece(&mut self, seq: u64) -> Option<Piece> {
        if self.in_flight.len() >= RESYNC_PIECES_IN_FLIGHT_MAX {
            return None;
        }
        if self.sending.is_none() {
            self.sending = self.next_unsent_region();
        }
        let c = self.sending?;
        let len = RESYNC_PIECE_BYTES_MAX.min(c.end - c.next);
        let last = c.next + len >= c.end;
        let piece = Piece {
            seq,
            device: c.device,
            region: c.region,
            offset: c.next,
            len,
            last,
        };
        self.sending = if last {
            None
        } else {
            Some(Cursor {
                next: c.next + len,
                ..c
            })
        };
        self.in_flight.insert(
            seq,
            InFlight {
                piece,
                stale: false,
            },
        );
        Some(piece)
    }

    /// A dirty region none of whose pieces is in flight.
    fn next_unsent_region(&self) -> Option<Cursor> {
        for (dev, d) in &self.devices {
            let mut from = 0;
            while let Some(r) = d.next_from(from) {
                let busy = self
                    .in_flight
                    .values()
                    .any(|f| f.piece.device == *dev && f.piece.region == r);
                if !busy {
                    let start = r * d.region_bytes;
                    return Some(Cursor {
                        device: *dev,
                        region: r,
                        next: start,
                        end: (start + d.region_bytes).min(d.size),
                    });
                }
                from = r + 1;
            }
        }
        None
    }

    /// The site has every piece up to `seq`: returns the regions that are now clean (their last
    /// piece acknowledged and not stale). The caller persists the clears.
    pub fn acked(&mut self, seq: u64) -> Vec<(u32, u64)> {
        let rest = self.in_flight.split_off(&(seq + 1));
        let done = std::mem::replace(&mut self.in_flight, rest);
        let mut clean = Vec::new();
        for f in done.into_values() {
            if f.piece.last && !f.stale {
                if let Some(d) = self.devices.get_mut(&f.piece.device) {
                    if d.set(f.piece.region, false) {
                        clean.push((f.piece.device, f.piece.region));
                    }
                }
            }
        }
        clean
    }

    /// The link lost what was in flight (reconnect): those regions are still dirty, send again.
    pub fn forget_in_flight(&mut self) {
        self.in_flight.clear();
        self.sending = None;
    }

    /// Restore one region as dirty at start (from the persisted dirty log).
    pub fn restore(&mut self, device: u32, region: u64) {
        if let Some(d) = self.devices.get_mut(&device) {
            d.set(region, true);
        }
    }

    /// Regions that an entry `(device, offset, len)` covers, for a device of this set.
    pub fn regions_of(&self, device: u32, offset: u64, len: u64) -> Vec<u64> {
        let Some(d) = self.devices.get(&device) else {
            return Vec::new();
        };
        let first = offset / d.region_bytes;
        let last = (offset + len.max(1) - 1) / d.region_bytes;
        (first..=last.min(d.regions().saturating_sub(1))).collect()
    }
}
