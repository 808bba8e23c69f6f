//! The link emulator's control language: one command per line, parsed by a pure function.
//!
//! ```text
//! delay 50ms          one-way delay (RTT = 2 x delay)
//! jitter 5ms          +- random delay per chunk (order kept)
//! rate 100mbit        per-direction rate limit: <n>[k|m|g]bit, or <n> bytes/s; `rate off`
//! stall 2s | on | off hold all traffic (connections stay open)
//! partition 5s | on   drop every connection and refuse new ones
//! reset               drop every connection now (RST)
//! heal                end stall and partition
//! corrupt N [both]    flip one byte every N bytes client->server (or both ways); `corrupt off`
//! status              counters and settings
//! ```

use std::time::Duration;

/// One parsed control command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Delay(Duration),
    Jitter(Duration),
    /// Bytes per second per direction; `None` is unlimited.
    Rate(Option<u64>),
    /// `None` holds until `stall off` or `heal`.
    Stall(Option<Duration>),
    StallOff,
    /// `None` lasts until `heal`.
    Partition(Option<Duration>),
    Reset,
    Heal,
    Corrupt {
        every_bytes: Option<u64>,
        both: bool,
    },
    Status,
    Help,
}

/// Parses `50ms`, `2s`, `1.5s`, `250us`, `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("duration {s:?} needs a unit (us, ms, s, m)"))?;
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad number in duration {s:?}"))?;
    let secs = match unit {
        "us" => v / 1e6,
        "ms" => v / 1e3,
        "s" => v,
        "m" | "min" => v * 60.0,
        _ => return Err(format!("unknown duration unit {unit:?} in {s:?}")),
    };
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range (0 to 1 day)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a rate into bytes per second: `100mbit`, `1gbit`, `500kbit`, `8000bit`, or a plain
/// number of bytes per second; `off` is unlimited.
pub fn parse_rate(s: &str) -> Result<Option<u64>, String> {
    let s = s.trim().to_ascii_lowercase();
    if s == "off" || s == "none" || s == "unlimited" {
        return Ok(None);
    }
    let (num, mult_bits) = if let Some(n) = s.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = s.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix("bit") {
        (n, 1.0)
    } else {
        (s.as_str(), 8.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("bad rate {s:?}: <n>[k|m|g]bit or bytes/s or off"))?;
    let bytes = v * mult_bits / 8.0;
    if !bytes.is_finite() || !(1000.0..=1e12).contains(&bytes) {
        return Err(format!("rate {s:?} out of range (1 kB/s to 1 TB/s)"));
    }
    Ok(Some(bytes as u64))
}

fn arg<'a>(words: &[&'a str], i: usize, what: &str) -> Result<&'a str, String> {
    words
        .get(i)
        .copied()
        .ok_or_else(|| format!("missing {what}"))
}

/// Parses one control line.
pub fn parse(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some(&verb) = words.first() else {
        return Err("empty command (try `help`)".into());
    };
    let want = |n: usize| -> Result<(), String> {
        if words.len() > n {
            Err(format!("too many arguments for `{verb}`"))
        } else {
            Ok(())
        }
    };
    let cmd = match verb {
        "delay" => {
            want(2)?;
            Command::Delay(parse_duration(arg(&words, 1, "delay")?)?)
        }
        "jitter" => {
            want(2)?;
            Command::Jitter(parse_duration(arg(&words, 1, "jitter")?)?)
        }
        "rate" => {
            want(2)?;
            Command::Rate(parse_rate(arg(&words, 1, "rate")?)?)
        }
        "stall" => {
            want(2)?;
            match words.get(1).copied() {
                None | Some("on") => Command::Stall(None),
                Some("off") => Command::StallOff,
                Some(d) => Command::Stall(Some(parse_duration(d)?)),
            }
        }
        "partition" => {
            want(2)?;
            match words.get(1).copied() {
                None | Some("on") => Command::Partition(None),
                Some(d) => Command::Partition(Some(parse_duration(d)?)),
            }
        }
        "reset" => {
            want(1)?;
            Command::Reset
        }
        "heal" => {
            want(1)?;
            Command::Heal
        }
        "corrupt" => {
            want(3)?;
            let every = arg(&words, 1, "corruption interval in bytes, or off")?;
            let both = match words.get(2).copied() {
                None | Some("fwd") => false,
                Some("both") => true,
                Some(other) => return Err(format!("corrupt direction {other:?}: fwd or both")),
            };
            let every_bytes = if every == "off" {
                None
            } else {
                let n: u64 = every
                    .parse()
                    .map_err(|_| format!("bad corruption interval {every:?}"))?;
                if n == 0 {
                    return Err("corruption interval must be at least 1 byte".into());
                }
                Some(n)
            };
            Command::Corrupt { every_bytes, both }
        }
        "status" => Command::Status,
        "help" => Command::Help,
        other => return Err(format!("unknown command {other:?} (try `help`)")),
    };
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100mbit"), Ok(Some(12_500_000)));
        assert_eq!(parse_rate("1gbit"), Ok(Some(125_000_000)));
        assert_eq!(parse_rate("1Gbit"), Ok(Some(125_000_000)));
        assert_eq!(parse_rate("1000000"), Ok(Some(1_000_000)));
        assert_eq!(parse_rate("off"), Ok(None));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("1bit").is_err());
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse("partition 5s"),
            Ok(Command::Partition(Some(Duration::from_secs(5))))
        );
        assert_eq!(
            parse("delay 50ms"),
            Ok(Command::Delay(Duration::from_millis(50)))
        );
        assert_eq!(parse("rate 100mbit"), Ok(Command::Rate(Some(12_500_000))));
        assert_eq!(parse("  reset "), Ok(Command::Reset));
        assert_eq!(parse("heal"), Ok(Command::Heal));
        assert_eq!(parse("stall"), Ok(Command::Stall(None)));
        assert_eq!(parse("stall off"), Ok(Command::StallOff));
        assert_eq!(
            parse("corrupt 1000 both"),
            Ok(Command::Corrupt {
                every_bytes: Some(1000),
                both: true
            })
        );
        assert_eq!(
            parse("corrupt off"),
            Ok(Command::Corrupt {
                every_bytes: None,
                both: false
            })
        );
        assert!(parse("corrupt 0").is_err());
        assert!(parse("reset now").is_err());
        assert!(parse("").is_err());
        assert!(parse("fly").is_err());
    }
}
