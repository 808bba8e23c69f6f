//! The checkers: what a site's devices hold after its own recovery, and the history they must be a
//! prefix of.

use std::collections::BTreeMap;
use std::sync::Arc;

use replog::storage::MemDisk;
use replog::Replog;

/// One write of the primary's history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryWrite {
    pub device: u32,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// What the primary's devices held after a restart's own recovery, at the lsn it recovered.
/// After a power loss that is the replay of its history plus whatever sectors of unflushed,
/// lost writes the device kept (a disk with a volatile cache does the same); a site repaired
/// from it afterwards is a prefix of the history that starts from this base.
#[derive(Clone, Debug)]
pub struct Base {
    pub lsn: u64,
    pub images: BTreeMap<u32, Vec<u8>>,
}

pub fn zero_base(sizes: &[(u32, u64)]) -> Base {
    Base {
        lsn: 0,
        images: sizes
            .iter()
            .map(|(d, s)| (*d, vec![0u8; *s as usize]))
            .collect(),
    }
}

/// The devices' images after replaying `history` (lsn i + 1 at index i) from `base` up to `upto`.
pub fn replay(history: &[HistoryWrite], base: &Base, upto: u64) -> BTreeMap<u32, Vec<u8>> {
    let mut images = base.images.clone();
    for w in history.iter().take(upto as usize).skip(base.lsn as usize) {
        apply(&mut images, w.device, w.offset, &w.data);
    }
    images
}

fn apply(images: &mut BTreeMap<u32, Vec<u8>>, device: u32, offset: u64, data: &[u8]) {
    if let Some(img) = images.get_mut(&device) {
        let start = offset as usize;
        if let Some(dst) = img.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
        }
    }
}

/// A site's images as its own recovery leaves them: the replog recovered from `replog_image`,
/// every retained entry above slink 0's cursor replayed onto the device images. Returns the
/// recovered last lsn and the images.
pub fn recovered_images(
    replog_image: Vec<u8>,
    devices: &BTreeMap<u32, Vec<u8>>,
) -> Result<(u64, BTreeMap<u32, Vec<u8>>), String> {
    let disk = MemDisk::from_image(replog_image, 512);
    let (log, _) = Replog::open_on(disk, 0).map_err(|e| format!("replog does not open: {e}"))?;
    let mut images = devices.clone();
    let cursor = log.cursor(0).unwrap_or(0);
    let mut from = cursor + 1;
    loop {
        let batch = log
            .read_from(from, 64, 1 << 20)
            .map_err(|e| format!("replog read at {from}: {e}"))?;
        let Some(last) = batch.last() else { break };
        from = last.lsn + 1;
        for e in batch {
            apply(&mut images, e.device, e.offset, &e.data);
        }
    }
    let last = log.next_lsn() - 1;
    Ok((last, images))
}

/// The storage images a crash or a power loss leaves.
pub fn images(disk: &Arc<MemDisk>, power_loss: Option<u64>) -> Vec<u8> {
    match power_loss {
        None => disk.current_image(),
        Some(seed) => disk.power_loss_image(seed),
    }
}

/// The first byte where two image sets differ, for messages.
pub fn first_difference(a: &BTreeMap<u32, Vec<u8>>, b: &BTreeMap<u32, Vec<u8>>) -> Option<String> {
    for (dev, x) in a {
        let Some(y) = b.get(dev) else {
            return Some(format!("device {dev} missing"));
        };
        if let Some(i) = x.iter().zip(y.iter()).position(|(p, q)| p != q) {
            // Each sector of a simulated write starts with the write's request id.
            let sector = i / 512 * 512;
            let id = |img: &Vec<u8>| {
                img.get(sector..sector + 8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_le_bytes)
            };
            return Some(format!(
                "device {dev} differs at byte {i}: holds request {}, expected request {}",
                id(x),
                id(y)
            ));
        }
    }
    None
}
