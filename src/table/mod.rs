//! Mapping tables: the text an operator writes to create a replicated device, after the
//! dm-replicator slides (shared/seeds/004): `<start> <length> replicator <replog> <slink>...`.
//! The grammar, the rules and examples are in `TABLE.md` next to this file.
//!
//! Key decisions (argued in TABLE.md):
//! - Lexing follows sh (backslash quotes the next character; backslash-newline continues the
//!   line; `#` starts a comment), and line breaks are plain whitespace because the replicator's
//!   parameter list is self-delimiting. This is what accepts both seed examples as printed.
//! - Values stay in sectors as written; byte helpers convert. Every sector value is bounded by
//!   [`MAX_SECTORS`] so the conversions cannot overflow.
//! - Parsing is pure and checks every rule (including cross-slink rules) with the position of
//!   the offending token: a refused table changes nothing.
//!
//! Module map: `lexer` (text to tokens), `parser` (tokens to targets, all rules), `model` (the
//! parsed values, byte helpers and canonical `Display`), `units` (numbers, sizes, durations),
//! `error` (errors and warnings with positions).

mod error;
mod lexer;
mod model;
mod parser;
mod units;

use std::io::Read;
use std::path::Path;

pub use error::{LoadTableError, TableError, TableWarning};
pub use lexer::MAX_TABLE_BYTES;
pub use model::{
    sectors_to_bytes, DeviceParams, DirtyLogParams, DirtyLogSync, DownWait, Fallbehind, Policy,
    PolicyMode, ReplogMode, ReplogParams, SlinkParams, Table, Target, Transport, MAX_SECTORS,
    MAX_SLINKS, MIN_REGION_SECTORS, SECTOR_BYTES,
};

/// Parses table text. `source` names the text in errors and warnings (usually the file name).
pub fn parse(text: &str, source: &str) -> Result<Table, TableError> {
    let lexed = lexer::lex(text).map_err(|fault| TableError::from_fault(source, fault))?;
    let (targets, mut notes) =
        parser::parse_targets(lexed).map_err(|fault| TableError::from_fault(source, fault))?;
    // Lexer and parser notes interleave; report them in text order.
    notes.sort_by_key(|note| (note.pos.line, note.pos.col));
    let warnings = notes
        .into_iter()
        .map(|note| TableWarning::from_note(source, note))
        .collect();
    Ok(Table { targets, warnings })
}

/// Reads and parses a table file (at most [`MAX_TABLE_BYTES`]); errors name the path as given.
pub fn read_table_file(path: &Path) -> Result<Table, LoadTableError> {
    let io_error = |source| LoadTableError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_error)?;
    let mut bytes = Vec::new();
    // Read one byte past the limit to tell "exactly at the limit" from "too large" without
    // trusting the file's metadata (it may be a pipe or still growing).
    let limit = u64::try_from(MAX_TABLE_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    file.take(limit).read_to_end(&mut bytes).map_err(io_error)?;
    if bytes.len() > MAX_TABLE_BYTES {
        return Err(LoadTableError::TooLarge {
            path: path.to_owned(),
            len_bytes: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            max_bytes: MAX_TABLE_BYTES,
        });
    }
    let text = String::from_utf8(bytes).map_err(|_| LoadTableError::NotUtf8 {
        path: path.to_owned(),
    })?;
    Ok(parse(&text, &path.display().to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slink_limit_matches_the_replog() {
        assert_eq!(usize::from(MAX_SLINKS), replog::MAX_SLINKS);
    }

    #[test]
    fn minimal_target_parses() {
        let table = parse(
            "0 8 replicator default 4 r 0 create 64 local 2 0 async 2 0 d - 0",
            "t",
        )
        .unwrap();
        assert_eq!(table.targets.len(), 1);
        assert!(table.warnings.is_empty());
        assert_eq!(table.length_bytes(), 4096);
    }

    #[test]
    fn error_display_has_file_line_col_and_token() {
        let err = parse("0 8 mirror", "x.table").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.table:1:5: expected target type `replicator`, found `mirror`"
        );
        let err = parse("0 8", "x.table").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.table:1:4: expected target type `replicator`, found end of table"
        );
    }

    #[test]
    fn long_tokens_are_cut_in_errors() {
        let long = "x".repeat(500);
        let err = parse(&format!("0 8 {long}"), "t").unwrap_err();
        assert_eq!(err.token.unwrap().chars().count(), 65);
    }

    #[test]
    fn read_table_file_reports_io_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.table");
        assert!(matches!(
            read_table_file(&missing),
            Err(LoadTableError::Io { .. })
        ));
        let big = dir.path().join("big.table");
        std::fs::write(&big, vec![b' '; MAX_TABLE_BYTES + 1]).unwrap();
        assert!(matches!(
            read_table_file(&big),
            Err(LoadTableError::TooLarge { .. })
        ));
        let good = dir.path().join("good.table");
        std::fs::write(
            &good,
            "0 8 replicator default 3 r 0 open local 2 0 sync 2 0 d - 0\n",
        )
        .unwrap();
        let table = read_table_file(&good).unwrap();
        assert_eq!(table.targets[0].replog.mode, ReplogMode::Open);
        let bad = dir.path().join("bad.table");
        std::fs::write(
            &bad,
            "0 8 replicator default 3 r 0 open local 2 0 sync 2 0 d - 1\n",
        )
        .unwrap();
        let err = read_table_file(&bad).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:1:", bad.display())), "{err}");
    }
}
