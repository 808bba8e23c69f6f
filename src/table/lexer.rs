//! Lexer: table text to tokens with positions.
//!
//! The rules are those of POSIX sh word splitting without quotes (see TABLE.md, "Lexical rules"):
//! - tokens are separated by ASCII whitespace; line breaks are whitespace too (the replicator
//!   grammar is self-delimiting, so the parser never needs a line break to find the end of a
//!   target);
//! - a backslash quotes the next character: `\ ` is a space inside a token, `\\` a backslash,
//!   `\#` a literal `#`; a backslash before a line break (`\n` or `\r\n`) is a line continuation
//!   and disappears, as in sh;
//! - an unquoted `#` at the start of a token begins a comment that runs to the end of the line.

use super::error::{Fault, Note, Pos};

/// Largest table text accepted, in bytes. Tables are a few hundred bytes; the limit keeps the
/// token vector (and memory) bounded for hostile input.
pub const MAX_TABLE_BYTES: usize = 1 << 20;

/// Most warnings kept for one table; later ones are counted in a final note.
pub(crate) const MAX_WARNINGS: usize = 32;

/// One token: its text after quote removal and the position of its first character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Token {
    pub(crate) text: String,
    pub(crate) pos: Pos,
}

/// The lexer's result: tokens, the position just after the last token (where "found end of
/// table" errors point) and warnings (needless escapes).
#[derive(Debug)]
pub(crate) struct Lexed {
    pub(crate) tokens: Vec<Token>,
    pub(crate) end: Pos,
    pub(crate) notes: Vec<Note>,
}

/// Whitespace that separates tokens: ASCII only, so a non-ASCII character is always part of a
/// token (paths may contain them).
pub(crate) fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// Characters that must be quoted with a backslash to be part of a token.
fn needs_quote(c: char) -> bool {
    is_space(c) || c == '\\' || c == '#'
}

/// Writes `text` as one token that lexes back to `text` (the inverse of [`lex`] for one token).
/// A line break cannot be expressed (backslash-newline is a continuation), so a text containing
/// one does not round-trip; the parser never produces such a text.
pub(crate) fn quote_token(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if needs_quote(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

struct Scanner<'a> {
    rest: std::str::Chars<'a>,
    pos: Pos,
    offset: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<char> {
        self.rest.clone().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.rest.next()?;
        self.offset += c.len_utf8();
        if c == '\n' {
            self.pos.line += 1;
            self.pos.col = 1;
        } else {
            self.pos.col += 1;
        }
        Some(c)
    }

    /// Consumes a line continuation (`\` + `\n` or `\` + `\r\n`) if one starts here.
    fn continuation(&mut self) -> bool {
        let mut ahead = self.rest.clone();
        let is_continuation = match (ahead.next(), ahead.next(), ahead.next()) {
            (Some('\\'), Some('\n'), _) => 2,
            (Some('\\'), Some('\r'), Some('\n')) => 3,
            _ => 0,
        };
        for _ in 0..is_continuation {
            self.bump();
        }
        is_continuation > 0
    }
}

/// Splits `text` into tokens. Fails on a backslash at the very end of the text (it quotes
/// nothing) and on a token that starts beyond [`MAX_TABLE_BYTES`].
pub(crate) fn lex(text: &str) -> Result<Lexed, Fault> {
    let mut s = Scanner {
        rest: text.chars(),
        pos: Pos { line: 1, col: 1 },
        offset: 0,
    };
    let mut tokens = Vec::new();
    let mut notes = Vec::new();
    let mut end = s.pos;
    loop {
        // Between tokens: whitespace, continuations and comments.
        match s.peek() {
            None => break,
            Some(c) if is_space(c) => {
                s.bump();
                continue;
            }
            Some('#') => {
                while s.peek().is_some_and(|c| c != '\n') {
                    s.bump();
                }
                continue;
            }
            Some('\\') if s.continuation() => continue,
            Some(_) => {}
        }
        let start = s.pos;
        let start_offset = s.offset;
        let mut token = String::new();
        while let Some(c) = s.peek() {
            if is_space(c) {
                break;
            }
            if c == '\\' {
                if s.continuation() {
                    continue;
                }
                let quote_pos = s.pos;
                s.bump();
                match s.bump() {
                    None => {
                        return Err(Fault {
                            pos: quote_pos,
                            token: Some("\\".to_owned()),
                            expected: "a character after `\\` (a backslash quotes the next \
                                       character or continues the line)"
                                .to_owned(),
                        });
                    }
                    Some(quoted) => {
                        if !needs_quote(quoted) {
                            push_note(
                                &mut notes,
                                quote_pos,
                                format!(
                                    "`\\{quoted}`: a backslash before an ordinary character only \
                                     quotes it; read as `{quoted}`"
                                ),
                            );
                        }
                        token.push(quoted);
                    }
                }
                continue;
            }
            token.push(c);
            s.bump();
        }
        end = s.pos;
        if start_offset >= MAX_TABLE_BYTES {
            return Err(Fault {
                pos: start,
                token: Some(token),
                expected: format!(
                    "the end of the table (a table holds at most {MAX_TABLE_BYTES} bytes)"
                ),
            });
        }
        tokens.push(Token {
            text: token,
            pos: start,
        });
    }
    Ok(Lexed { tokens, end, notes })
}

/// Adds a warning unless [`MAX_WARNINGS`] are already kept.
pub(crate) fn push_note(notes: &mut Vec<Note>, pos: Pos, message: String) {
    if notes.len() < MAX_WARNINGS {
        notes.push(Note { pos, message });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(text: &str) -> Vec<String> {
        lex(text)
            .unwrap()
            .tokens
            .into_iter()
            .map(|t| t.text)
            .collect()
    }

    fn positions(text: &str) -> Vec<(usize, usize)> {
        lex(text)
            .unwrap()
            .tokens
            .into_iter()
            .map(|t| (t.pos.line, t.pos.col))
            .collect()
    }

    #[test]
    fn splits_on_whitespace_and_line_breaks() {
        assert_eq!(texts(" a\tbb \n ccc\r\n"), ["a", "bb", "ccc"]);
        assert_eq!(positions(" a\tbb \n ccc\r\n"), [(1, 2), (1, 4), (2, 2)]);
    }

    #[test]
    fn backslash_newline_is_a_continuation() {
        assert_eq!(texts("a \\\nb"), ["a", "b"]);
        assert_eq!(texts("a \\\r\nb"), ["a", "b"]);
        // Inside a token it joins, as in sh.
        assert_eq!(texts("ab\\\ncd"), ["abcd"]);
        // A line holding only a backslash is an empty continued line (the seed's syntax slide).
        assert_eq!(texts("a \\\n\\\nb"), ["a", "b"]);
        assert_eq!(positions("a \\\n\\\nb"), [(1, 1), (3, 1)]);
    }

    #[test]
    fn backslash_quotes_the_next_character() {
        assert_eq!(texts("a\\ b c"), ["a b", "c"]);
        assert_eq!(texts("\\\\x"), ["\\x"]);
        assert_eq!(texts("\\#x"), ["#x"]);
        let lexed = lex("\\local x").unwrap();
        assert_eq!(lexed.tokens[0].text, "local");
        assert_eq!(lexed.notes.len(), 1, "a needless quote is reported");
        assert_eq!(lexed.notes[0].pos, Pos { line: 1, col: 1 });
    }

    #[test]
    fn comments_run_to_end_of_line_only_at_token_start() {
        assert_eq!(texts("a # b c \\\nd"), ["a", "d"]);
        assert_eq!(texts("a#b"), ["a#b"]);
        assert_eq!(texts("# only a comment"), Vec::<String>::new());
    }

    #[test]
    fn dangling_backslash_is_an_error() {
        let fault = lex("a \\").unwrap_err();
        assert_eq!(fault.pos, Pos { line: 1, col: 3 });
        assert_eq!(fault.token.as_deref(), Some("\\"));
    }

    #[test]
    fn end_position_is_just_after_the_last_token() {
        let lexed = lex("ab  \n  cd  # x\n\n").unwrap();
        assert_eq!(lexed.end, Pos { line: 2, col: 5 });
        assert_eq!(lex("").unwrap().end, Pos { line: 1, col: 1 });
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        assert_eq!(positions("é b"), [(1, 1), (1, 3)]);
    }

    #[test]
    fn quote_token_round_trips() {
        for text in ["plain", "a b", "#x", "a\\b", "tab\there", "ü=1", "-"] {
            assert_eq!(texts(&quote_token(text)), [text], "{text:?}");
        }
    }

    #[test]
    fn oversized_table_is_refused() {
        let mut text = "x ".repeat(MAX_TABLE_BYTES / 2);
        text.push_str("tail");
        let fault = lex(&text).unwrap_err();
        assert_eq!(fault.token.as_deref(), Some("tail"));
    }
}
