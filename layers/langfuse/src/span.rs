//! Writing OTLP spans with Langfuse's attribute mapping (spec `langfuse.md` §4–§6).
//!
//! **Hand-made on purpose.** Spans are written straight into the protobuf bytes of an export
//! (the fields prost would write, in its order), not built as `Span` structs first: the
//! attributes a request's spans share are encoded once and copied, and no per-attribute
//! `String` is made or dropped. The `record` bench measures it, and `spans_are_what_prost_writes`
//! checks it byte for byte against prost. The wire primitives (varints, keys) are prost's
//! [`prost::encoding`].

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

/// A string attribute, for the prost-built parts of an export (resource, scope).
pub(crate) fn kv_str(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(Value::StringValue(value.to_owned())) }),
        key_strindex: 0,
    }
}

/// Nanoseconds since the Unix epoch.
pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
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

// === protobuf ===

/// Every field written here has a number below 16: its key is one byte.
const KEY_LEN: usize = 1;

/// Bytes a length-delimited field with `len` bytes of content takes, key and length included.
pub(crate) fn field_len(len: usize) -> usize {
    KEY_LEN + encoded_len_varint(len as u64) + len
}

/// Writes a length-delimited field's key and length; its `len` bytes of content follow.
pub(crate) fn len_field_head(out: &mut Vec<u8>, field: u32, len: usize) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
}

pub(crate) fn len_field(out: &mut Vec<u8>, field: u32, content: &[u8]) {
    len_field_head(out, field, content.len());
    out.extend_from_slice(content);
}

/// A span's attributes (`Span.attributes`, field 9), encoded as they are added.
#[derive(Clone, Default)]
pub(crate) struct Attributes(Vec<u8>);

impl Attributes {
    /// Room for `bytes` of attributes (a span's own hold the bodies: growing would copy them).
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Self(Vec::with_capacity(bytes))
    }

    /// A string attribute.
    pub(crate) fn str(&mut self, key: &str, value: &str) {
        // KeyValue { key = 1, value = 2: AnyValue { string_value = 1 } }
        let any = field_len(value.len());
        self.key_value_head(key, any);
        len_field(&mut self.0, 1, value.as_bytes());
    }

    /// An array-of-strings attribute.
    pub(crate) fn str_array<'a>(&mut self, key: &str, values: impl IntoIterator<Item = &'a str, IntoIter: Clone>) {
        // AnyValue { array_value = 5: ArrayValue { values = 1: AnyValue { string_value = 1 } } }
        let values = values.into_iter();
        let array: usize = values.clone().map(|v| field_len(field_len(v.len()))).sum();
        self.key_value_head(key, field_len(array));
        len_field_head(&mut self.0, 5, array);
        for value in values {
            len_field_head(&mut self.0, 1, field_len(value.len()));
            len_field(&mut self.0, 1, value.as_bytes());
        }
    }

    /// The `KeyValue` up to its `AnyValue`'s content, which is `any` bytes long.
    fn key_value_head(&mut self, key: &str, any: usize) {
        len_field_head(&mut self.0, 9, field_len(key.len()) + field_len(any));
        len_field(&mut self.0, 1, key.as_bytes());
        len_field_head(&mut self.0, 2, any);
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Langfuse's level of an observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Default,
    Warning,
    Error,
}

/// The parts every span has.
pub(crate) struct SpanParts<'a> {
    pub trace_id: &'a [u8; 16],
    pub span_id: &'a [u8; 8],
    pub parent: Option<&'a [u8; 8]>,
    pub name: &'a str,
    pub start: SystemTime,
    pub end: SystemTime,
    pub level: Level,
    pub status_message: Option<String>,
}

/// `Span.kind`: `SPAN_KIND_INTERNAL`.
const KIND_INTERNAL: u64 = 1;
/// `Status.code`: `STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;

impl SpanParts<'_> {
    /// Appends the span as a `ScopeSpans.spans` entry (field 2): the request's `shared`
    /// attributes, then its `own`, then level and status message.
    pub(crate) fn write(self, shared: &Attributes, mut own: Attributes, out: &mut Vec<u8>) {
        let level = match self.level {
            Level::Default => None,
            Level::Warning => Some("WARNING"),
            Level::Error => Some("ERROR"),
        };
        if let Some(level) = level {
            own.str("langfuse.observation.level", level);
        }
        if let Some(message) = &self.status_message {
            own.str("langfuse.observation.status_message", message);
        }
        // An error's status: { message = 2 (when not empty), code = 3 }.
        let message = self.status_message.as_deref().unwrap_or_default();
        let status = (self.level == Level::Error)
            .then(|| if message.is_empty() { 0 } else { field_len(message.len()) } + KEY_LEN + encoded_len_varint(STATUS_ERROR));
        let (start, end) = (unix_nanos(self.start), unix_nanos(self.end.max(self.start)));
        let len = field_len(16)
            + field_len(8)
            + self.parent.map_or(0, |_| field_len(8))
            + if self.name.is_empty() { 0 } else { field_len(self.name.len()) }
            + KEY_LEN
            + encoded_len_varint(KIND_INTERNAL)
            + if start == 0 { 0 } else { 9 }
            + if end == 0 { 0 } else { 9 }
            + shared.len()
            + own.len()
            + status.map_or(0, field_len);
        out.reserve(field_len(len));
        len_field_head(out, 2, len);
        len_field(out, 1, self.trace_id);
        len_field(out, 2, self.span_id);
        if let Some(parent) = self.parent {
            len_field(out, 4, parent);
        }
        if !self.name.is_empty() {
            len_field(out, 5, self.name.as_bytes());
        }
        encode_key(6, WireType::Varint, out);
        encode_varint(KIND_INTERNAL, out);
        for (field, nanos) in [(7, start), (8, end)] {
            if nanos != 0 {
                encode_key(field, WireType::SixtyFourBit, out);
                out.extend_from_slice(&nanos.to_le_bytes());
            }
        }
        out.extend_from_slice(&shared.0);
        out.extend_from_slice(&own.0);
        if let Some(status) = status {
            len_field_head(out, 15, status);
            if !message.is_empty() {
                len_field(out, 2, message.as_bytes());
            }
            encode_key(3, WireType::Varint, out);
            encode_varint(STATUS_ERROR, out);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use opentelemetry_proto::tonic::{
        common::v1::ArrayValue,
        trace::v1::{ScopeSpans, Span, Status, span::SpanKind, status::StatusCode},
    };
    use std::time::Duration;

    use prost::Message as _;

    use super::*;

    #[test]
    fn varint_lengths_match_the_encoding() {
        for v in [0, 1, 127, 128, 16_383, 16_384, 1 << 35, u64::MAX] {
            let mut out = Vec::new();
            encode_varint(v, &mut out);
            assert_eq!(out.len(), encoded_len_varint(v), "{v}");
        }
    }

    fn string(key: &str, value: &str) -> KeyValue {
        kv_str(key, value)
    }

    /// The bytes written decode to the span prost would have sent, and are prost's bytes.
    #[test]
    fn spans_are_what_prost_writes() {
        let long = "é".repeat(200);
        let tags = ["a".to_owned(), String::new(), long.clone()];
        let mut shared = Attributes::default();
        shared.str("langfuse.trace.name", "chat-completion");
        shared.str_array("langfuse.trace.tags", tags.iter().map(String::as_str));
        let start = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let cases = [
            (None, Level::Default, None, start),
            (Some([9u8; 8]), Level::Warning, Some("went away".to_owned()), start + Duration::from_millis(5)),
            (Some([9u8; 8]), Level::Error, Some(long.clone()), start + Duration::from_secs(1)),
            (None, Level::Error, Some(String::new()), UNIX_EPOCH),
        ];
        for (parent, level, status_message, end) in cases {
            let mut own = Attributes::default();
            own.str("langfuse.observation.input", &long);
            own.str("langfuse.observation.output", "");
            let mut out = Vec::new();
            let parts = SpanParts {
                trace_id: &[7; 16],
                span_id: &[3; 8],
                parent: parent.as_ref(),
                name: "llm_call_x",
                start: UNIX_EPOCH.max(end.min(start)),
                end,
                level,
                status_message: status_message.clone(),
            };
            parts.write(&shared, own, &mut out);

            let mut attributes = vec![
                string("langfuse.trace.name", "chat-completion"),
                KeyValue {
                    key: "langfuse.trace.tags".into(),
                    value: Some(AnyValue {
                        value: Some(Value::ArrayValue(ArrayValue {
                            values: tags
                                .iter()
                                .map(|t| AnyValue { value: Some(Value::StringValue(t.clone())) })
                                .collect(),
                        })),
                    }),
                    key_strindex: 0,
                },
                string("langfuse.observation.input", &long),
                string("langfuse.observation.output", ""),
            ];
            match level {
                Level::Default => {}
                Level::Warning => attributes.push(string("langfuse.observation.level", "WARNING")),
                Level::Error => attributes.push(string("langfuse.observation.level", "ERROR")),
            }
            if let Some(message) = &status_message {
                attributes.push(string("langfuse.observation.status_message", message));
            }
            let span_start = UNIX_EPOCH.max(end.min(start));
            let expected = Span {
                trace_id: vec![7; 16],
                span_id: vec![3; 8],
                parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
                name: "llm_call_x".into(),
                kind: SpanKind::Internal as i32,
                start_time_unix_nano: unix_nanos(span_start),
                end_time_unix_nano: unix_nanos(end.max(span_start)),
                attributes,
                status: (level == Level::Error).then(|| Status {
                    message: status_message.clone().unwrap_or_default(),
                    code: StatusCode::Error as i32,
                }),
                ..Default::default()
            };
            let decoded = ScopeSpans::decode(out.as_slice()).unwrap();
            assert_eq!(decoded.spans, vec![expected.clone()]);
            let prost = ScopeSpans { spans: vec![expected], ..Default::default() }.encode_to_vec();
            assert_eq!(out, prost, "byte for byte");
        }
    }
}
