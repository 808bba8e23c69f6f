//! Errors and warnings of the table parser.

use std::fmt;
use std::path::PathBuf;

/// Longest token text quoted in an error; longer tokens are cut (with `…`) so an error message
/// stays one readable line whatever the input.
const MAX_TOKEN_CHARS_IN_ERROR: usize = 64;

/// A position in the table text: 1-based line and column; columns count characters (a tab is
/// one column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub(crate) line: usize,
    pub(crate) col: usize,
}

/// An error before the file name is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fault {
    pub(crate) pos: Pos,
    pub(crate) token: Option<String>,
    pub(crate) expected: String,
}

/// A warning before the file name is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Note {
    pub(crate) pos: Pos,
    pub(crate) message: String,
}

/// A table that was refused. Parsing is pure: a refused table changed nothing.
///
/// Display: `FILE:LINE:COL: expected <what>, found `<token>`` or
/// `FILE:LINE:COL: expected <what>, found end of table`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableError {
    /// The `source` given to [`super::parse`] (usually the file name).
    pub file: String,
    /// 1-based line of the offending token (or of the end of the last token).
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// The offending token after quote removal (cut to 64 characters); `None` at end of table.
    pub token: Option<String>,
    /// What the grammar or a rule wanted at this place.
    pub expected: String,
}

impl TableError {
    pub(crate) fn from_fault(file: &str, fault: Fault) -> Self {
        let token = fault.token.map(|t| {
            if t.chars().count() > MAX_TOKEN_CHARS_IN_ERROR {
                let mut cut: String = t.chars().take(MAX_TOKEN_CHARS_IN_ERROR).collect();
                cut.push('…');
                cut
            } else {
                t
            }
        });
        TableError {
            file: file.to_owned(),
            line: fault.pos.line,
            col: fault.pos.col,
            token,
            expected: fault.expected,
        }
    }
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: expected {}, found ",
            self.file, self.line, self.col, self.expected
        )?;
        match &self.token {
            Some(token) => write!(f, "`{token}`"),
            None => f.write_str("end of table"),
        }
    }
}

impl std::error::Error for TableError {}

/// Something accepted but worth telling the operator (a needless backslash quote, a count that
/// the seed's compatibility rule forgave). The daemon logs these when it loads a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableWarning {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl TableWarning {
    pub(crate) fn from_note(file: &str, note: Note) -> Self {
        TableWarning {
            file: file.to_owned(),
            line: note.pos.line,
            col: note.pos.col,
            message: note.message,
        }
    }
}

impl fmt::Display for TableWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: warning: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

/// Reading a table file failed: the file could not be read, or its text was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoadTableError {
    #[error("{}: cannot read table: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: table file is {len_bytes} bytes, more than the {max_bytes} a table may hold", path.display())]
    TooLarge {
        path: PathBuf,
        len_bytes: u64,
        max_bytes: usize,
    },
    #[error("{}: table is not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error(transparent)]
    Parse(#[from] TableError),
}
