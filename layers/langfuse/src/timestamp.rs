//! Timestamps as Langfuse and the trace routes write them: ISO 8601 in, RFC 3339 UTC with
//! milliseconds out. The calendar is chrono's; this module only says which shapes are taken.

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, Timelike as _, Utc};

/// `2026-11-21T16:30:22.123Z` (UTC, milliseconds; a time before 1970 is written as 1970).
pub fn iso_millis(t: SystemTime) -> String {
    DateTime::<Utc>::from(t.max(UNIX_EPOCH)).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The shapes of a timestamp's date and time that `fromisoformat` takes (`d` a digit, `T` the
/// separator: `T`, `t` or a space), longest first, with the chrono format that reads each.
/// chrono's numeric fields also take fewer digits (`2026-1-21`); `fromisoformat` does not.
const SHAPES: [(&str, &str); 3] =
    [("dddd-dd-ddTdd:dd:dd", "%Y-%m-%dT%H:%M:%S"), ("dddd-dd-ddTdd:dd", "%Y-%m-%dT%H:%M"), ("dddd-dd-dd", "%Y-%m-%d")];

/// The offsets taken after a time (`±` a sign); chrono's `%#z` reads them.
const OFFSETS: [&str; 5] = ["Z", "z", "±dd", "±dddd", "±dd:dd"];

/// Whether `s` starts with `shape`.
fn has_shape(s: &str, shape: &str) -> bool {
    s.len() >= shape.len()
        && s.bytes().zip(shape.bytes()).all(|(c, want)| match want {
            b'd' => c.is_ascii_digit(),
            b'T' => matches!(c, b'T' | b't' | b' '),
            want => c == want,
        })
}

/// Whether `s` is one of [`OFFSETS`].
fn is_offset(s: &str) -> bool {
    OFFSETS.iter().any(|offset| match offset.strip_prefix('±') {
        Some(digits) => s.len() == digits.len() + 1 && s.starts_with(['+', '-']) && has_shape(&s[1..], digits),
        None => s == *offset,
    })
}

/// Parses an ISO-8601 timestamp the way Python's `datetime.fromisoformat` (3.11) takes it:
/// `YYYY-MM-DD`, then optionally `T` or a space and `HH:MM[:SS[.fraction]]`, then optionally
/// `Z` or an offset `±HH[:MM]`. A timestamp without an offset is UTC. `None` when malformed.
pub fn parse_timestamp(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (shape, format) = SHAPES.into_iter().find(|(shape, _)| has_shape(s, shape))?;
    let (head, mut tail) = s.split_at(shape.len());
    if tail.is_empty() && shape.len() == 10 {
        let date = NaiveDate::parse_from_str(head, format).ok()?;
        return Some(date.and_time(NaiveTime::MIN).and_utc().into());
    }
    if shape.len() == 10 {
        return None;
    }
    // chrono wants its own separators: `T` between date and time, `.` before a fraction.
    let mut text = format!("{}T{}", &head[..10], &head[11..]);
    let mut format = format.to_owned();
    if shape.len() == 19
        && let Some(fraction) = tail.strip_prefix(['.', ','])
    {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        text = format!("{text}.{}", &fraction[..digits]);
        format.push_str("%.f");
        tail = &fraction[digits..];
    }
    let at = if tail.is_empty() {
        NaiveDateTime::parse_from_str(&text, &format).ok()?.and_utc()
    } else if is_offset(tail) {
        DateTime::parse_from_str(&format!("{text}{tail}"), &format!("{format}%#z")).ok()?.to_utc()
    } else {
        return None;
    };
    // chrono reads a leap second (`:60`); `fromisoformat` does not.
    (at.nanosecond() < 1_000_000_000).then(|| at.into())
}

/// A Langfuse timestamp as RFC 3339 UTC with milliseconds (`2026-11-21T16:30:22.000Z`); what
/// does not parse is kept as it came.
pub(crate) fn rfc3339(v: Option<String>) -> Option<String> {
    v.map(|s| match parse_timestamp(&s) {
        Some(t) if t >= UNIX_EPOCH => iso_millis(t),
        _ => s,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn secs(t: Option<SystemTime>) -> Option<u64> {
        t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs())
    }

    #[test]
    fn iso_formats_millis() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_451_422_123);
        assert_eq!(iso_millis(t), "2026-11-23T16:30:22.123Z");
        assert_eq!(iso_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn timestamps_parse_like_fromisoformat() {
        assert_eq!(secs(parse_timestamp("2026-11-21T16:30:22Z")), Some(1_795_278_622));
        assert_eq!(secs(parse_timestamp("2026-11-21 16:30:22+00:00")), Some(1_795_278_622));
        assert_eq!(secs(parse_timestamp("2026-11-21T18:30:22+02:00")), Some(1_795_278_622));
        assert_eq!(secs(parse_timestamp("2026-11-21T16:30:22.123456")), Some(1_795_278_622));
        assert_eq!(secs(parse_timestamp("2026-11-21T16:30")), Some(1_795_278_600));
        assert_eq!(secs(parse_timestamp("2026-11-21")), Some(1_795_219_200));
        assert_eq!(secs(parse_timestamp("2024-02-29T00:00:00-0130")), Some(1_709_170_200));
        assert_eq!(
            parse_timestamp("2026-11-21T16:30:22.123Z").map(iso_millis).as_deref(),
            Some("2026-11-21T16:30:22.123Z")
        );
        for bad in [
            "",
            "yesterday",
            "2026-13-01",
            "2026-02-30",
            "2025-02-29",
            "2026-11-21T25:00",
            "2026-11-21T16:30:22+2",
            "2026-11-21X16:30",
            "2026-11-21T16:30:22.Z",
            "2026-1-21",
            "2026-11-21T16:30:22 junk",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
        assert_eq!(rfc3339(Some("2026-11-21 16:30:22+00:00".into())).as_deref(), Some("2026-11-21T16:30:22.000Z"));
        assert_eq!(rfc3339(Some("not a time".into())).as_deref(), Some("not a time"));
    }
}
