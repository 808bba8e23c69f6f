//! Recovery: find the valid chain of records from the tail, as an explicit decision table.
//!
//! The scan starts at the metadata's tail and classifies the record at each expected position into
//! one [`Finding`]; [`decide`] maps the finding to a [`Decision`]. The table is [`DECISION_TABLE`]
//! and a test enumerates every row. The chain ends at the first finding that is not Accept/SkipPad.
//!
//! One extra rule: a writer that opened after a crash starts its first batch at the next block
//! boundary after the last valid record (it never rewrites a block holding an acknowledged entry).
//! So when the chain ends in the middle of a block, the scan looks once at the next block boundary
//! and continues there only if it finds a valid record of a strictly newer generation: such a
//! record can only have been written by a later open, which started exactly there.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::{
    round_down, round_up, EntryHeader, HeaderFault, RecordKind, BLOCK_BYTES, ENTRY_HEADER_BYTES,
    META_AREA_BYTES,
};
use crate::index::IndexEntry;
use crate::io::AlignedBuf;
use crate::storage::Storage;
use crate::Lsn;

/// What the scan found at one expected record position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Finding {
    /// A record that continues the chain.
    Valid,
    /// A valid pad record (end of a batch or of a lap) that continues the chain.
    Pad,
    /// All zero: never written since the ring was created.
    Zeroed,
    /// No entry magic: garbage, or payload bytes of a record with another layout.
    BadMagic,
    /// Magic but the header checksum fails: a torn or corrupt header.
    BadHeaderCrc,
    /// Header valid but of another format version.
    ForeignVersion,
    /// Header checksum valid but fields out of range.
    Malformed,
    /// Header of another replog (other uuid): left over from an earlier replog on this space.
    OtherUuid,
    /// Header written at this ring offset during an earlier lap.
    StaleLap,
    /// Header claiming another position than where it sits (not from an earlier lap).
    WrongPosition,
    /// Generation lower than the chain's (or not strictly higher after a block jump): a leftover
    /// from before a crash that a shorter rewrite did not cover.
    StaleGeneration,
    /// Generation above the metadata's: cannot have been written by an opened writer.
    FutureGeneration,
    /// lsn not above the previous entry's (or the reclaimed lsn at the tail).
    LsnNotIncreasing,
    /// Record would extend past the end of its lap or into space the tail still protects.
    BeyondTail,
    /// Header valid, data checksum fails: a torn data write.
    BadDataCrc,
    /// The scan reached tail + ring size: the ring is full, nothing further can be valid.
    RingFull,
}

/// What recovery does with a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Decision {
    /// The entry is part of the log; continue after it.
    Accept,
    /// Padding; continue after it.
    SkipPad,
    /// The log ends here (the next batch starts at the next block boundary).
    EndOfLog,
}

/// The recovery decision table: finding, decision, why.
pub const DECISION_TABLE: &[(Finding, Decision, &str)] = &[
    (
        Finding::Valid,
        Decision::Accept,
        "checksums, uuid, position, generation and lsn all agree",
    ),
    (
        Finding::Pad,
        Decision::SkipPad,
        "padding written with the batch; skip its length",
    ),
    (
        Finding::Zeroed,
        Decision::EndOfLog,
        "never written since creation",
    ),
    (
        Finding::BadMagic,
        Decision::EndOfLog,
        "garbage or payload of an old record: nothing written here in this chain",
    ),
    (
        Finding::BadHeaderCrc,
        Decision::EndOfLog,
        "torn header: its append never completed",
    ),
    (
        Finding::ForeignVersion,
        Decision::EndOfLog,
        "not written by this format version's writer",
    ),
    (
        Finding::Malformed,
        Decision::EndOfLog,
        "fields out of range: not a record this writer wrote",
    ),
    (
        Finding::OtherUuid,
        Decision::EndOfLog,
        "left over from another replog on the same space",
    ),
    (
        Finding::StaleLap,
        Decision::EndOfLog,
        "left over from an earlier lap of the ring",
    ),
    (
        Finding::WrongPosition,
        Decision::EndOfLog,
        "record claims another position: misplaced or corrupt",
    ),
    (
        Finding::StaleGeneration,
        Decision::EndOfLog,
        "left over from before a crash, past a shorter rewrite",
    ),
    (
        Finding::FutureGeneration,
        Decision::EndOfLog,
        "no opened writer had this generation",
    ),
    (
        Finding::LsnNotIncreasing,
        Decision::EndOfLog,
        "lsn order broken: left over or corrupt",
    ),
    (
        Finding::BeyondTail,
        Decision::EndOfLog,
        "would overlap the lap end or protected space",
    ),
    (
        Finding::BadDataCrc,
        Decision::EndOfLog,
        "torn data: the append never completed",
    ),
    (
        Finding::RingFull,
        Decision::EndOfLog,
        "the ring is full up to the tail",
    ),
];

/// The decision for a finding (looked up in [`DECISION_TABLE`]).
pub fn decide(finding: Finding) -> Decision {
    DECISION_TABLE
        .iter()
        .find(|(f, _, _)| *f == finding)
        .map_or(Decision::EndOfLog, |(_, d, _)| *d)
}

/// What the classifier knows about the chain so far.
#[derive(Debug, Clone, Copy)]
pub struct ChainState {
    pub uuid: [u8; 16],
    pub ring_bytes: u64,
    /// Where the record is expected (virtual position).
    pub expected_vpos: u64,
    /// lsn of the previous entry (or the reclaimed lsn at the tail).
    pub prev_lsn: Lsn,
    /// Generation of the previous record (or the tail generation).
    pub prev_generation: u32,
    /// After a block jump the generation must be strictly newer than `prev_generation`.
    pub require_newer_generation: bool,
    /// The metadata's generation.
    pub max_generation: u32,
    /// No record may end beyond this virtual position (block below tail + ring size).
    pub limit_vpos: u64,
}

/// Classifies the record at `state.expected_vpos`. `header` is the 128 bytes there; `data`
/// fetches `len` payload bytes after the header (only called for Write records whose header is
/// otherwise valid).
pub fn classify(
    state: &ChainState,
    header: &[u8],
    data: &mut dyn FnMut(u64) -> Result<u32>,
) -> Result<(Finding, Option<EntryHeader>)> {
    if state.expected_vpos >= state.limit_vpos {
        return Ok((Finding::RingFull, None));
    }
    let h = match EntryHeader::decode(header) {
        Ok(h) => h,
        Err(fault) => {
            let finding = match fault {
                HeaderFault::Short | HeaderFault::Zeroed => Finding::Zeroed,
                HeaderFault::BadMagic => Finding::BadMagic,
                HeaderFault::BadCrc => Finding::BadHeaderCrc,
                HeaderFault::UnsupportedVersion(_) => Finding::ForeignVersion,
                HeaderFault::Malformed(_) | HeaderFault::UnknownFeatures(_) => Finding::Malformed,
            };
            return Ok((finding, None));
        }
    };
    let end = h.vpos.saturating_add(h.record_bytes());
    let lap_end = (h.vpos / state.ring_bytes.max(1) + 1).saturating_mul(state.ring_bytes);
    let overruns = end > lap_end || round_up(end, BLOCK_BYTES) > state.limit_vpos;
    let finding = if h.uuid != state.uuid {
        Finding::OtherUuid
    } else if h.vpos != state.expected_vpos {
        if h.vpos < state.expected_vpos
            && (state.expected_vpos - h.vpos).is_multiple_of(state.ring_bytes)
        {
            Finding::StaleLap
        } else {
            Finding::WrongPosition
        }
    } else if h.generation > state.max_generation {
        Finding::FutureGeneration
    } else if h.generation < state.prev_generation
        || (state.require_newer_generation && h.generation <= state.prev_generation)
    {
        Finding::StaleGeneration
    } else if h.kind != RecordKind::Pad && h.lsn <= state.prev_lsn {
        Finding::LsnNotIncreasing
    } else if overruns {
        Finding::BeyondTail
    } else if h.kind == RecordKind::Write && data(h.len)? != h.data_crc {
        Finding::BadDataCrc
    } else if h.kind == RecordKind::Pad {
        Finding::Pad
    } else {
        Finding::Valid
    };
    Ok((finding, Some(h)))
}

/// Reads ring bytes by virtual position through a cached aligned window.
pub struct RingReader<'a> {
    storage: &'a dyn Storage,
    /// Absolute byte offset of the ring start.
    ring_start: u64,
    ring_bytes: u64,
    window: Option<(u64, AlignedBuf)>,
}

/// Bytes read at once while scanning.
pub const SCAN_WINDOW_BYTES: u64 = 1 << 20;

impl<'a> RingReader<'a> {
    pub fn new(storage: &'a dyn Storage, base: u64, ring_bytes: u64) -> RingReader<'a> {
        RingReader {
            storage,
            ring_start: base + META_AREA_BYTES,
            ring_bytes,
            window: None,
        }
    }

    /// `len` bytes at `vpos`; the range must not cross a lap end.
    pub fn bytes(&mut self, vpos: u64, len: u64) -> Result<&[u8]> {
        let cached = matches!(&self.window, Some((start, buf))
            if vpos >= *start && vpos + len <= *start + buf.len() as u64);
        if !cached {
            let start = round_down(vpos, BLOCK_BYTES);
            let lap_end = (vpos / self.ring_bytes + 1) * self.ring_bytes;
            let want_end = round_up(vpos + len, BLOCK_BYTES).max(start + SCAN_WINDOW_BYTES);
            let end = want_end.min(lap_end);
            if vpos + len > end {
                return Err(Error::BadFormat {
                    what: format!(
                        "read of {len} bytes at ring position {vpos} crosses the lap end"
                    ),
                });
            }
            let buf = AlignedBuf::zeroed(usize::try_from(end - start).unwrap_or(0));
            let phys = self.ring_start + start % self.ring_bytes;
            let buf = self
                .storage
                .read_at(phys, buf)
                .map_err(|e| Error::io("read ring", &self.storage.describe(), e))?;
            self.window = Some((start, buf));
        }
        match &self.window {
            Some((start, buf)) => {
                let from = usize::try_from(vpos - start).unwrap_or(usize::MAX);
                let to = from.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
                buf.get(from..to).ok_or_else(|| Error::BadFormat {
                    what: format!("ring read window miss at {vpos}"),
                })
            }
            None => Err(Error::BadFormat {
                what: "ring read window missing".to_string(),
            }),
        }
    }
}

/// Where the scan starts and what it checks against (from the metadata).
#[derive(Debug, Clone, Copy)]
pub struct ScanStart {
    pub uuid: [u8; 16],
    pub ring_bytes: u64,
    pub tail_vpos: u64,
    pub tail_lsn: Lsn,
    pub tail_generation: u32,
    pub generation: u32,
}

/// The recovered chain.
#[derive(Debug, Clone, Serialize)]
pub struct Scanned {
    #[serde(skip)]
    pub entries: Vec<IndexEntry>,
    /// End of the last valid record (or pad).
    pub end_vpos: u64,
    /// Where the next batch starts: `end_vpos` rounded up to a block.
    pub head_vpos: u64,
    /// How many records of each finding were seen (the terminal one included).
    pub findings: BTreeMap<Finding, u64>,
    /// The finding that ended the chain.
    pub stop: Finding,
    /// Block-boundary jumps taken (one per later open that started mid-block).
    pub jumps: u64,
}

/// Scans the chain from the tail. Never fails on content; only on I/O errors.
pub fn scan(reader: &mut RingReader<'_>, start: &ScanStart, max_entries: usize) -> Result<Scanned> {
    let limit_vpos = round_down(start.tail_vpos, BLOCK_BYTES) + start.ring_bytes;
    let mut state = ChainState {
        uuid: start.uuid,
        ring_bytes: start.ring_bytes,
        expected_vpos: start.tail_vpos,
        prev_lsn: start.tail_lsn,
        prev_generation: start.tail_generation,
        require_newer_generation: false,
        max_generation: start.generation,
        limit_vpos,
    };
    let mut findings = BTreeMap::new();
    let mut entries = Vec::new();
    let mut jumps = 0;
    let stop = loop {
        let (finding, header) = classify_at(reader, &state)?;
        *findings.entry(finding).or_insert(0u64) += 1;
        let decision = decide(finding);
        if let (Decision::Accept | Decision::SkipPad, Some(h)) = (decision, header) {
            if decision == Decision::Accept {
                if entries.len() >= max_entries {
                    break finding;
                }
                entries.push(IndexEntry {
                    lsn: h.lsn,
                    vpos: h.vpos,
                    record_bytes: h.record_bytes(),
                    kind: h.kind,
                    device: h.device,
                    offset: h.offset,
                    len: h.len,
                    timestamp_ns: h.timestamp_ns,
                    generation: h.generation,
                });
                state.prev_lsn = h.lsn;
            }
            state.prev_generation = h.generation;
            state.require_newer_generation = false;
            state.expected_vpos = h.vpos + h.record_bytes();
            continue;
        }
        // End of the chain here. If mid-block, a later open may have started at the next block.
        let next_block = round_up(state.expected_vpos, BLOCK_BYTES);
        if next_block != state.expected_vpos && !state.require_newer_generation {
            let jump_state = ChainState {
                expected_vpos: next_block,
                require_newer_generation: true,
                ..state
            };
            let (jump_finding, jump_header) = classify_at(reader, &jump_state)?;
            if let (Decision::Accept | Decision::SkipPad, Some(_)) =
                (decide(jump_finding), jump_header)
            {
                jumps += 1;
                state = jump_state;
                continue;
            }
        }
        break finding;
    };
    Ok(Scanned {
        entries,
        end_vpos: state.expected_vpos,
        head_vpos: round_up(state.expected_vpos, BLOCK_BYTES),
        findings,
        stop,
        jumps,
    })
}

fn classify_at(
    reader: &mut RingReader<'_>,
    state: &ChainState,
) -> Result<(Finding, Option<EntryHeader>)> {
    if state.expected_vpos >= state.limit_vpos {
        return Ok((Finding::RingFull, None));
    }
    let header = reader
        .bytes(state.expected_vpos, ENTRY_HEADER_BYTES as u64)?
        .to_vec();
    let data_vpos = state.expected_vpos + ENTRY_HEADER_BYTES as u64;
    let lap_end = (state.expected_vpos / state.ring_bytes + 1) * state.ring_bytes;
    let mut data = |len: u64| -> Result<u32> {
        if data_vpos + len > lap_end {
            return Ok(0);
        }
        Ok(crc32c::crc32c(reader.bytes(data_vpos, len)?))
    };
    classify(state, &header, &mut data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_finding_has_exactly_one_row() {
        let all = [
            Finding::Valid,
            Finding::Pad,
            Finding::Zeroed,
            Finding::BadMagic,
            Finding::BadHeaderCrc,
            Finding::ForeignVersion,
            Finding::Malformed,
            Finding::OtherUuid,
            Finding::StaleLap,
            Finding::WrongPosition,
            Finding::StaleGeneration,
            Finding::FutureGeneration,
            Finding::LsnNotIncreasing,
            Finding::BeyondTail,
            Finding::BadDataCrc,
            Finding::RingFull,
        ];
        assert_eq!(DECISION_TABLE.len(), all.len());
        for f in all {
            assert_eq!(
                DECISION_TABLE.iter().filter(|(g, _, _)| *g == f).count(),
                1,
                "{f:?}"
            );
        }
        assert_eq!(decide(Finding::Valid), Decision::Accept);
        assert_eq!(decide(Finding::Pad), Decision::SkipPad);
    }
}
