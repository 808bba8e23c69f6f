//! Numbers, sizes and durations as written in tables, and their canonical spelling.

use std::time::Duration;

/// Why a number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NumError {
    /// Not of the expected form (not decimal digits, unknown suffix or unit).
    Malformed,
    /// Well formed but larger than a u64 holds.
    Overflow,
}

/// A plain decimal: ASCII digits only, no sign, no base prefix.
pub(crate) fn parse_decimal(text: &str) -> Result<u64, NumError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumError::Malformed);
    }
    // Only digits: the one way left for `parse` to fail is overflow.
    text.parse::<u64>().map_err(|_| NumError::Overflow)
}

/// True if `text` is a plain decimal (whatever its size).
pub(crate) fn is_decimal(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// Binary multiples for size suffixes, largest first (the order canonical spelling tries them).
const SIZE_SUFFIXES: [(char, u64); 4] = [
    ('t', 1 << 40),
    ('g', 1 << 30),
    ('m', 1 << 20),
    ('k', 1 << 10),
];

/// Bytes: a decimal, optionally followed by one suffix `k`, `m`, `g` or `t` (either case), each a
/// binary multiple (`1k` = 1024).
pub(crate) fn parse_size_bytes(text: &str) -> Result<u64, NumError> {
    let Some(last) = text.chars().last() else {
        return Err(NumError::Malformed);
    };
    if last.is_ascii_digit() {
        return parse_decimal(text);
    }
    let lower = last.to_ascii_lowercase();
    let multiplier = SIZE_SUFFIXES
        .iter()
        .find(|(suffix, _)| *suffix == lower)
        .map(|(_, m)| *m)
        .ok_or(NumError::Malformed)?;
    let digits = text.strip_suffix(last).ok_or(NumError::Malformed)?;
    parse_decimal(digits)?
        .checked_mul(multiplier)
        .ok_or(NumError::Overflow)
}

/// The shortest exact spelling of `bytes`: the largest suffix that divides it, else plain.
pub(crate) fn format_size_bytes(bytes: u64) -> String {
    if bytes != 0 {
        for (suffix, multiplier) in SIZE_SUFFIXES {
            if bytes.is_multiple_of(multiplier) {
                return format!("{}{suffix}", bytes / multiplier);
            }
        }
    }
    bytes.to_string()
}

/// Duration units in milliseconds, largest first.
const DURATION_UNITS: [(&str, u64); 4] = [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)];

/// A duration: a decimal followed by a unit `ms`, `s`, `m` (minutes) or `h`. A bare `0` is
/// accepted (zero needs no unit). Resolution is one millisecond.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, NumError> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let digits_len = text.bytes().take_while(u8::is_ascii_digit).count();
    let (digits, unit) = text
        .split_at_checked(digits_len)
        .ok_or(NumError::Malformed)?;
    let unit_ms = DURATION_UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, ms)| *ms)
        .ok_or(NumError::Malformed)?;
    let ms = parse_decimal(digits)?
        .checked_mul(unit_ms)
        .ok_or(NumError::Overflow)?;
    Ok(Duration::from_millis(ms))
}

/// The shortest exact spelling of `duration` in whole milliseconds (sub-millisecond parts, which
/// the parser never produces, are dropped).
pub(crate) fn format_duration(duration: Duration) -> String {
    // Saturate: a Duration above u64::MAX ms cannot come from the parser.
    let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return "0".to_owned();
    }
    for (unit, unit_ms) in DURATION_UNITS {
        if ms.is_multiple_of(unit_ms) {
            return format!("{}{unit}", ms / unit_ms);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        assert_eq!(parse_decimal("0"), Ok(0));
        assert_eq!(parse_decimal("007"), Ok(7));
        assert_eq!(parse_decimal("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_decimal("18446744073709551616"),
            Err(NumError::Overflow)
        );
        for bad in ["", "+1", "-1", "0x10", "1_000", "1.5", "١"] {
            assert_eq!(parse_decimal(bad), Err(NumError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_bytes("100"), Ok(100));
        assert_eq!(parse_size_bytes("1k"), Ok(1024));
        assert_eq!(parse_size_bytes("100M"), Ok(100 << 20));
        assert_eq!(parse_size_bytes("2g"), Ok(2 << 30));
        assert_eq!(parse_size_bytes("3T"), Ok(3 << 40));
        assert_eq!(parse_size_bytes("16777215t"), Ok(16_777_215 << 40));
        assert_eq!(parse_size_bytes("16777216t"), Err(NumError::Overflow));
        for bad in ["", "k", "10x", "10kb", "10 k", "1.5m", "-1k"] {
            assert_eq!(parse_size_bytes(bad), Err(NumError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn size_spelling_is_shortest_and_exact() {
        assert_eq!(format_size_bytes(0), "0");
        assert_eq!(format_size_bytes(1000), "1000");
        assert_eq!(format_size_bytes(1024), "1k");
        assert_eq!(format_size_bytes(3 << 20), "3m");
        assert_eq!(format_size_bytes(1 << 40), "1t");
        assert_eq!(format_size_bytes(u64::MAX), u64::MAX.to_string());
        for bytes in [1, 512, 4096, 1 << 33, (1 << 33) + 1024, u64::MAX - 1023] {
            assert_eq!(parse_size_bytes(&format_size_bytes(bytes)), Ok(bytes));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(
            parse_duration("18446744073709551615h"),
            Err(NumError::Overflow)
        );
        for bad in ["", "30", "s", "1.5s", "10sec", "10S", "1d", "-1s", "1 s"] {
            assert_eq!(parse_duration(bad), Err(NumError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn duration_spelling_is_shortest_and_exact() {
        assert_eq!(format_duration(Duration::ZERO), "0");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        for ms in [1, 999, 1000, 60_000, 3_600_001, u64::MAX] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
