//! Grammar: tokens to [`Target`]s, with every rule checked where the token is (TABLE.md has the
//! grammar and the rules in prose; keep the two in step).
//!
//! The replicator's parameter list is self-delimiting: every list starts with a type keyword and
//! a count, fallbehind tokens have the form `key=value`, and after a complete slink the next
//! token is a slink type (a word: the target goes on), a start sector (a number: the next target
//! begins) or the end of the table. The parser therefore reads the table as one token stream and
//! needs one token of lookahead, never a line break.

use std::path::PathBuf;

use super::error::{Fault, Note, Pos};
use super::lexer::{push_note, Lexed, Token};
use super::model::{
    DeviceParams, DirtyLogParams, DirtyLogSync, DownWait, Fallbehind, Policy, PolicyMode,
    ReplogMode, ReplogParams, SlinkParams, Target, Transport, MAX_SECTORS, MAX_SLINKS,
    MIN_REGION_SECTORS,
};
use super::units::{is_decimal, parse_decimal, parse_duration, parse_size_bytes, NumError};

/// Parses all targets of a lexed table.
pub(crate) fn parse_targets(lexed: Lexed) -> Result<(Vec<Target>, Vec<Note>), Fault> {
    let mut parser = Parser {
        tokens: &lexed.tokens,
        next: 0,
        end: lexed.end,
        notes: lexed.notes,
    };
    let targets = parser.table()?;
    Ok((targets, parser.notes))
}

struct Parser<'t> {
    tokens: &'t [Token],
    next: usize,
    /// Just after the last token: where "found end of table" points.
    end: Pos,
    notes: Vec<Note>,
}

/// What is remembered of an earlier slink of the same target, for the cross-slink rules.
struct SeenSlink {
    slink_nr: u8,
    nr_pos: Pos,
    dev_nr: u32,
    dev_nr_pos: Pos,
}

fn fault(token: &Token, expected: impl Into<String>) -> Fault {
    Fault {
        pos: token.pos,
        token: Some(token.text.clone()),
        expected: expected.into(),
    }
}

/// A decimal in `min..=max`; `what` names it in the error (the range is added).
fn number_in(token: &Token, what: &str, min: u64, max: u64) -> Result<u64, Fault> {
    match parse_decimal(&token.text) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) | Err(NumError::Overflow) => {
            Err(fault(token, format!("{what} between {min} and {max}")))
        }
        Err(NumError::Malformed) => Err(fault(token, format!("{what} (a decimal number)"))),
    }
}

/// Exactly the decimal `n`; `expected` is the whole error text.
fn number_eq(token: &Token, n: u64, expected: &str) -> Result<(), Fault> {
    match parse_decimal(&token.text) {
        Ok(m) if m == n => Ok(()),
        _ => Err(fault(token, expected)),
    }
}

impl<'t> Parser<'t> {
    fn peek(&self) -> Option<&'t Token> {
        self.tokens.get(self.next)
    }

    /// The next token; at the end of the table, an error saying what was `expected`.
    fn take(&mut self, expected: &str) -> Result<&'t Token, Fault> {
        match self.tokens.get(self.next) {
            Some(token) => {
                self.next += 1;
                Ok(token)
            }
            None => Err(Fault {
                pos: self.end,
                token: None,
                expected: expected.to_owned(),
            }),
        }
    }

    fn table(&mut self) -> Result<Vec<Target>, Fault> {
        let mut targets = Vec::new();
        let mut next_start = 0;
        while self.peek().is_some() {
            let target = self.target(next_start)?;
            next_start = target.start_sectors + target.length_sectors;
            targets.push(target);
        }
        if targets.is_empty() {
            return Err(Fault {
                pos: self.end,
                token: None,
                expected: "a target `<start> <length> replicator ...`".to_owned(),
            });
        }
        Ok(targets)
    }

    fn target(&mut self, expected_start: u64) -> Result<Target, Fault> {
        let token = self.take("the start sector of a target")?;
        let start = number_in(token, "a start sector", 0, MAX_SECTORS)?;
        if start != expected_start {
            let expected = if expected_start == 0 {
                "start sector 0 (the first target starts the device)".to_owned()
            } else {
                format!(
                    "start sector {expected_start} (the end of the previous target: targets leave no gaps), or the \
                     end of the table"
                )
            };
            return Err(fault(token, expected));
        }
        let token = self.take("the length of the target in sectors")?;
        let length = number_in(token, "a length in sectors", 1, MAX_SECTORS - start)?;
        let token = self.take("target type `replicator`")?;
        if token.text != "replicator" {
            return Err(fault(token, "target type `replicator`"));
        }
        let replog = self.replog()?;
        let mut seen: Vec<SeenSlink> = Vec::new();
        let mut slinks = Vec::new();
        loop {
            // After a complete slink, a number starts the next target.
            match self.peek() {
                None if !slinks.is_empty() => break,
                Some(token) if !slinks.is_empty() && is_decimal(&token.text) => break,
                _ => {}
            }
            let (slink, seen_slink) = self.slink(&seen)?;
            slinks.push(slink);
            seen.push(seen_slink);
        }
        Ok(Target {
            start_sectors: start,
            length_sectors: length,
            replog,
            slinks,
        })
    }

    /// `<default|replog> <#2..4> <path> <dev_start> [<auto|create|open> [<size>]]`
    fn replog(&mut self) -> Result<ReplogParams, Fault> {
        const TYPE: &str = "replog type `default` (alias `replog`)";
        let token = self.take(TYPE)?;
        if !matches!(token.text.as_str(), "default" | "replog") {
            return Err(fault(token, TYPE));
        }
        let count_token = self.take("the replog parameter count 2, 3 or 4")?;
        let count = number_in(count_token, "a replog parameter count", 2, 4)?;
        let path = PathBuf::from(&self.take("the replog's backing store path")?.text);
        let token = self.take("the replog header offset in sectors")?;
        let dev_start = number_in(token, "a replog header offset in sectors", 0, MAX_SECTORS)?;
        let mut mode = ReplogMode::Open;
        let mut mode_token = None;
        if count >= 3 {
            const MODE: &str = "replog mode `auto`, `create` or `open`";
            let token = self.take(MODE)?;
            mode = match token.text.as_str() {
                "auto" => ReplogMode::Auto,
                "create" => ReplogMode::Create,
                "open" => ReplogMode::Open,
                _ => return Err(fault(token, MODE)),
            };
            mode_token = Some(token);
        }
        let mut size = None;
        if count == 4 {
            match self.peek() {
                // Seed compatibility (TABLE.md, "Counts"): the seed's `open` example keeps the
                // count 4 of the `create` example without a size. Only `open` (where a size is
                // optional) and only when a slink type follows, so the reading is unique.
                Some(next)
                    if mode == ReplogMode::Open
                        && matches!(next.text.as_str(), "local" | "tcp") =>
                {
                    push_note(
                        &mut self.notes,
                        count_token.pos,
                        format!(
                            "replog count 4 but `open` is followed by `{}`, not a size: read as 3 parameters \
                             (seed compatibility); write `3`",
                            next.text
                        ),
                    );
                }
                _ => {
                    let token = self.take("the replog size in sectors")?;
                    let max = MAX_SECTORS - dev_start;
                    size = Some(number_in(token, "a replog size in sectors", 1, max)?);
                }
            }
        }
        if let (None, Some(token)) = (size, mode_token) {
            if mode != ReplogMode::Open {
                return Err(fault(
                    token,
                    "`open` (to create a replog, `create` and `auto` need a size: count 4 and the size in sectors)",
                ));
            }
        }
        Ok(ReplogParams {
            path,
            dev_start_sectors: dev_start,
            mode,
            size_sectors: size,
        })
    }

    /// One slink: `local <#> <slink_nr> <policy> [<fallbehind>...]` or
    /// `tcp <#> <slink_nr> <policy> [<fallbehind>...] <host:port>`, then `2 <dev_nr> <path>`,
    /// then the dirty log.
    fn slink(&mut self, seen: &[SeenSlink]) -> Result<(SlinkParams, SeenSlink), Fault> {
        let slink_type = if seen.is_empty() {
            "slink type `local` or `tcp`"
        } else {
            "slink type `local` or `tcp`, or the start sector of the next target"
        };
        let type_token = self.take(slink_type)?;
        let is_tcp = match type_token.text.as_str() {
            "local" => false,
            "tcp" => true,
            _ => return Err(fault(type_token, slink_type)),
        };
        let count_token = self.take("the slink parameter count")?;
        let count = number_in(
            count_token,
            "a slink parameter count",
            0,
            u64::from(u8::MAX),
        )?;

        let nr_token = self.take("a slink number")?;
        let slink_nr = number_in(nr_token, "a slink number", 0, u64::from(MAX_SLINKS - 1))?;
        let slink_nr = u8::try_from(slink_nr).map_err(|_| fault(nr_token, "a slink number"))?;
        if seen.is_empty() && slink_nr != 0 {
            return Err(fault(
                nr_token,
                "slink number 0 (the first slink of a target is the local site, slink 0)",
            ));
        }
        if let Some(earlier) = seen.iter().find(|s| s.slink_nr == slink_nr) {
            return Err(fault(
                nr_token,
                format!(
                    "a slink number not used before in this target (slink {slink_nr} is at {}:{})",
                    earlier.nr_pos.line, earlier.nr_pos.col
                ),
            ));
        }
        if slink_nr == 0 && is_tcp {
            return Err(fault(
                type_token,
                "`local` for slink 0 (slink 0 is the local site)",
            ));
        }

        let policy_token = self.take("a policy `sync`, `async` or `stall`")?;
        let mode = match policy_token.text.as_str() {
            "sync" | "synchronous" => PolicyMode::Sync,
            "async" | "asynchronous" => PolicyMode::Async,
            "stall" => PolicyMode::Stall,
            _ => return Err(fault(policy_token, "a policy `sync`, `async` or `stall`")),
        };
        let (fallbehind, down_wait, fallbehind_count) = self.fallbehind(mode, is_tcp)?;

        let transport = if is_tcp {
            let token = self.take("the remote address `host:port`")?;
            Transport::Tcp {
                addr: tcp_addr(token)?,
            }
        } else {
            Transport::Local
        };
        // Seed compatibility (TABLE.md, "Counts"): the fallbehind thresholds belong to the
        // policy parameter, so a count may leave them out (`local 2 0 async ios=0`) or count
        // every token (`local 3 0 async ios=0`, the canonical form).
        let base = if is_tcp { 3 } else { 2 };
        if count != base && count != base + fallbehind_count {
            let expected = if fallbehind_count == 0 {
                format!("slink parameter count {base}")
            } else {
                format!(
                    "slink parameter count {base} (fallbehind not counted) or {} (fallbehind counted)",
                    base + fallbehind_count
                )
            };
            return Err(fault(count_token, expected));
        }

        let token = self.take("the device parameter count `2`")?;
        number_eq(token, 2, "device parameter count `2` (`2 <dev_nr> <path>`)")?;
        let dev_nr_token = self.take("a device number")?;
        let dev_nr = number_in(dev_nr_token, "a device number", 0, u64::from(u32::MAX))?;
        let dev_nr = u32::try_from(dev_nr).map_err(|_| fault(dev_nr_token, "a device number"))?;
        if let Some(first) = seen.first() {
            if first.dev_nr != dev_nr {
                return Err(fault(
                    dev_nr_token,
                    format!(
                        "device number {} (as for slink {} at {}:{}; all slinks of a target carry one device)",
                        first.dev_nr, first.slink_nr, first.dev_nr_pos.line, first.dev_nr_pos.col
                    ),
                ));
            }
        }
        let path_what = if is_tcp {
            "the device name at the remote site"
        } else {
            "the device path"
        };
        let path = self.take(path_what)?.text.clone();
        let dirty_log = self.dirty_log()?;

        let slink = SlinkParams {
            transport,
            slink_nr,
            policy: Policy {
                mode,
                fallbehind,
                down_wait,
            },
            device: DeviceParams { dev_nr, path },
            dirty_log,
        };
        let seen_slink = SeenSlink {
            slink_nr,
            nr_pos: nr_token.pos,
            dev_nr,
            dev_nr_pos: dev_nr_token.pos,
        };
        Ok((slink, seen_slink))
    }

    /// Policy tokens after the policy: every following token of the form `key=value`, the
    /// fallbehind thresholds and `down_wait=` (tcp slinks). Returns them and how many tokens
    /// there were.
    fn fallbehind(
        &mut self,
        mode: PolicyMode,
        is_tcp: bool,
    ) -> Result<(Fallbehind, Option<DownWait>, u64), Fault> {
        const KEYS: &str =
            "fallbehind `ios=N`, `size=BYTES` or `timeout=DURATION`, or `down_wait=DURATION|forever`";
        let mut fallbehind = Fallbehind::default();
        let mut down_wait = None;
        let mut seen: [Option<Pos>; 4] = [None; 4];
        let mut count = 0;
        while let Some(token) = self.peek().filter(|t| t.text.contains('=')) {
            self.next += 1;
            count += 1;
            let (key, value) = token
                .text
                .split_once('=')
                .unwrap_or((token.text.as_str(), ""));
            if mode == PolicyMode::Sync && key != "down_wait" {
                return Err(fault(
                    token,
                    "no fallbehind threshold after `sync` (a sync slink never falls behind)",
                ));
            }
            let slot = match key {
                "ios" => 0,
                "size" => 1,
                "timeout" => 2,
                "down_wait" => 3,
                _ => return Err(fault(token, KEYS)),
            };
            if let Some(Some(earlier)) = seen.get(slot) {
                return Err(fault(
                    token,
                    format!(
                        "each fallbehind key once (`{key}=` is already given at {}:{})",
                        earlier.line, earlier.col
                    ),
                ));
            }
            if let Some(entry) = seen.get_mut(slot) {
                *entry = Some(token.pos);
            }
            // A threshold of 0 means "no bound" (the seed gives the local slink `ios=0`).
            match key {
                "down_wait" => {
                    if !is_tcp {
                        return Err(fault(
                            token,
                            "no `down_wait=` on a `local` slink (only a `tcp` site's link goes down)",
                        ));
                    }
                    down_wait = Some(if value == "forever" {
                        DownWait::Forever
                    } else {
                        DownWait::For(parse_duration(value).map_err(|e| {
                            fault(
                                token,
                                describe(
                                    e,
                                    "`down_wait=DURATION` with DURATION a number and unit ms, s, m or h (0: \
                                     not at all), or `down_wait=forever`",
                                    "`down_wait=DURATION` with DURATION in milliseconds",
                                ),
                            )
                        })?)
                    });
                }
                "ios" => {
                    let ios = parse_decimal(value).map_err(|e| {
                        fault(
                            token,
                            describe(
                                e,
                                "`ios=N` with N a number of writes (0: no bound)",
                                "`ios=N` with N",
                            ),
                        )
                    })?;
                    fallbehind.ios = Some(ios).filter(|&n| n != 0);
                }
                "size" => {
                    let bytes = parse_size_bytes(value).map_err(|e| {
                        fault(
                            token,
                            describe(
                                e,
                                "`size=BYTES` with BYTES a number with optional suffix k, m, g or t (binary \
                                 multiples; 0: no bound)",
                                "`size=BYTES` with BYTES",
                            ),
                        )
                    })?;
                    fallbehind.bytes = Some(bytes).filter(|&n| n != 0);
                }
                _ => {
                    let timeout = parse_duration(value).map_err(|e| {
                        fault(
                            token,
                            describe(
                                e,
                                "`timeout=DURATION` with DURATION a number and unit ms, s, m or h (0: no bound)",
                                "`timeout=DURATION` with DURATION in milliseconds",
                            ),
                        )
                    })?;
                    fallbehind.timeout = Some(timeout).filter(|d| !d.is_zero());
                }
            }
        }
        Ok((fallbehind, down_wait, count))
    }

    /// `- 0` | `core <1|2> <region> [sync|nosync]` | `disk <2|3> <region> <path> [sync|nosync]`
    fn dirty_log(&mut self) -> Result<DirtyLogParams, Fault> {
        const TYPE: &str = "dirty log type `-`, `core` or `disk`";
        let type_token = self.take(TYPE)?;
        let count_token = self.take("the dirty log parameter count")?;
        match type_token.text.as_str() {
            "-" => {
                number_eq(count_token, 0, "dirty log parameter count `0` after `-`")?;
                Ok(DirtyLogParams::None)
            }
            "core" => {
                let count = number_in(count_token, "a `core` dirty log parameter count", 1, 2)?;
                let region_sectors = self.region()?;
                let sync = if count == 2 {
                    self.dirty_log_sync()?
                } else {
                    DirtyLogSync::Default
                };
                Ok(DirtyLogParams::Core {
                    region_sectors,
                    sync,
                })
            }
            "disk" => {
                let count = number_in(count_token, "a `disk` dirty log parameter count", 2, 3)?;
                let region_sectors = self.region()?;
                let path = PathBuf::from(&self.take("the dirty log path")?.text);
                let sync = if count == 3 {
                    self.dirty_log_sync()?
                } else {
                    DirtyLogSync::Default
                };
                Ok(DirtyLogParams::Disk {
                    region_sectors,
                    path,
                    sync,
                })
            }
            _ => Err(fault(type_token, TYPE)),
        }
    }

    fn region(&mut self) -> Result<u64, Fault> {
        let token = self.take("the region size in sectors")?;
        let what =
            format!("a region size in sectors: a power of two, at least {MIN_REGION_SECTORS}");
        match parse_decimal(&token.text) {
            Ok(n) if n >= MIN_REGION_SECTORS && n.is_power_of_two() => Ok(n),
            _ => Err(fault(token, what)),
        }
    }

    fn dirty_log_sync(&mut self) -> Result<DirtyLogSync, Fault> {
        let token = self.take("`sync` or `nosync`")?;
        match token.text.as_str() {
            "sync" => Ok(DirtyLogSync::ForceResync),
            "nosync" => Ok(DirtyLogSync::AssumeInSync),
            _ => Err(fault(token, "`sync` or `nosync`")),
        }
    }
}

/// Error text for a refused fallbehind value: the form, or the bound on overflow.
fn describe(error: NumError, form: &str, overflow_prefix: &str) -> String {
    match error {
        NumError::Malformed => form.to_owned(),
        NumError::Overflow => format!("{overflow_prefix} at most {}", u64::MAX),
    }
}

/// `host:port` or `[ipv6]:port`, port 1..=65535. The host is not resolved here.
fn tcp_addr(token: &Token) -> Result<String, Fault> {
    const ADDR: &str = "a remote address `host:port` (IPv6 as `[addr]:port`, port 1 to 65535)";
    let (host, port) = token
        .text
        .rsplit_once(':')
        .ok_or_else(|| fault(token, ADDR))?;
    let host_ok = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .is_some_and(|ip| !ip.is_empty() && ip.contains(':')),
        None => !host.is_empty() && !host.contains(':') && !host.contains(']'),
    };
    let port_ok = matches!(parse_decimal(port), Ok(p) if (1..=u64::from(u16::MAX)).contains(&p));
    if host_ok && port_ok {
        Ok(token.text.clone())
    } else {
        Err(fault(token, ADDR))
    }
}
