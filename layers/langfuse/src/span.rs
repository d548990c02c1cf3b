//! Building OTLP spans with Langfuse's attribute mapping (spec `langfuse.md` §4–§6).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, ArrayValue, KeyValue, any_value::Value},
    trace::v1::{Span, Status, span::SpanKind, status::StatusCode},
};

/// A string attribute.
pub fn kv_str(key: impl Into<String>, value: impl Into<String>) -> KeyValue {
    kv(key, Value::StringValue(value.into()))
}

/// A bool attribute.
pub fn kv_bool(key: impl Into<String>, value: bool) -> KeyValue {
    kv(key, Value::BoolValue(value))
}

/// An array-of-strings attribute.
pub fn kv_str_array(key: impl Into<String>, values: impl IntoIterator<Item = String>) -> KeyValue {
    let values = values.into_iter().map(|s| AnyValue { value: Some(Value::StringValue(s)) }).collect();
    kv(key, Value::ArrayValue(ArrayValue { values }))
}

fn kv(key: impl Into<String>, value: Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(value) }), key_strindex: 0 }
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

/// `2026-11-21T16:30:22.123Z`.
pub fn iso_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_millis())
}

/// Howard Hinnant's days → civil date.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A bounded text copy of `bytes`: the longest valid UTF-8 prefix within `limit`, and when
/// cut, a marker saying how much was kept of how much.
pub fn bounded_text(bytes: &[u8], limit: usize, total: u64, already_truncated: bool) -> String {
    let cut = bytes.len() > limit || already_truncated;
    let head = &bytes[..bytes.len().min(limit)];
    let head = match std::str::from_utf8(head) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default(),
    };
    if cut {
        format!("{head}…[truncated by llmgate: {} of {} bytes]", head.len(), total.max(bytes.len() as u64))
    } else {
        head.to_owned()
    }
}

/// Random non-zero 8-byte span id.
pub(crate) fn new_span_id() -> [u8; 8] {
    let uuid = uuid::Uuid::new_v4();
    let mut id = [0u8; 8];
    id.copy_from_slice(&uuid.as_bytes()[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// Langfuse's level of an observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Default,
    Warning,
    Error,
}

/// The parts every span shares.
pub(crate) struct SpanParts<'a> {
    pub trace_id: &'a [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<&'a [u8; 8]>,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub level: Level,
    pub status_message: Option<String>,
}

impl SpanParts<'_> {
    /// The span with `attributes` (trace-level ones already included by the caller) plus level
    /// and status.
    pub(crate) fn build(self, mut attributes: Vec<KeyValue>) -> Span {
        let level = match self.level {
            Level::Default => None,
            Level::Warning => Some("WARNING"),
            Level::Error => Some("ERROR"),
        };
        if let Some(level) = level {
            attributes.push(kv_str("langfuse.observation.level", level));
        }
        if let Some(message) = &self.status_message {
            attributes.push(kv_str("langfuse.observation.status_message", message.clone()));
        }
        let status = match self.level {
            Level::Error => {
                Some(Status { message: self.status_message.unwrap_or_default(), code: StatusCode::Error as i32 })
            }
            _ => None,
        };
        Span {
            trace_id: self.trace_id.to_vec(),
            span_id: self.span_id.to_vec(),
            parent_span_id: self.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name: self.name,
            kind: SpanKind::Internal as i32,
            start_time_unix_nano: unix_nanos(self.start),
            end_time_unix_nano: unix_nanos(self.end.max(self.start)),
            attributes,
            status,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_formats_millis() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_451_422_123);
        assert_eq!(iso_millis(t), "2026-11-23T16:30:22.123Z");
        assert_eq!(iso_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn truncation_is_marked_and_utf8_safe() {
        assert_eq!(bounded_text(b"hello", 10, 5, false), "hello");
        let s = bounded_text("héllo".as_bytes(), 2, 6, false);
        assert_eq!(s, "h…[truncated by llmgate: 1 of 6 bytes]");
    }
}
