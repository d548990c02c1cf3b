//! What the request path keeps of a root span or a generation until the exporter writes it,
//! and the OTLP span the exporter task writes from it (spec `langfuse.md` §6.2).
//!
//! The request path only copies what it must keep (bounded bodies, a few small strings) and
//! shares the rest; the attributes, JSON strings, bounded texts and span ids are made here, on
//! the exporter's task, and written straight into the export's protobuf bytes. A record knows
//! its trace only through the [`TraceScope`] it is written in: the trace (`crate::trace`)
//! uses records, not the other way round.

use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;
use http::StatusCode;
use llmgate_core::{
    catalog::Catalog,
    ext::ServedBy,
    usage::{AssembledMessage, Outcome, StreamEnd, Usage},
};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::{
    io::{self, bounded_text},
    span::{Attributes, Level, SpanParts, new_span_id},
    timestamp::iso_millis,
};

/// Bytes of an error body quoted in a status message.
const STATUS_DETAIL: usize = 512;
/// First guess of a span's own attributes besides the input: an output and the metadata.
const OWN_ROOM: usize = 4096;

/// When something started, on both clocks: the wall clock for the span, the monotonic one to
/// measure from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Started {
    pub wall: SystemTime,
    pub at: Instant,
}

impl Started {
    pub(crate) fn now() -> Self {
        Self { wall: SystemTime::now(), at: Instant::now() }
    }

    /// The wall-clock time of `at`, an instant after the start.
    pub(crate) fn wall(&self, at: Instant) -> SystemTime {
        self.wall + at.saturating_duration_since(self.at)
    }
}

/// What a record's span takes from its trace.
pub(crate) struct TraceScope<'a> {
    pub trace_id: &'a [u8; 16],
    pub root_span_id: &'a [u8; 8],
    /// The trace's (and root span's) name.
    pub name: &'a str,
    /// When the request, and so the root span, started.
    pub started: Started,
    /// The attributes every span of the trace carries.
    pub shared: &'a Attributes,
    /// The `input` attribute's text.
    pub input: &'a str,
    pub capture_limit: usize,
}

/// The head of a body, kept as bytes: text is made from it on the exporter's task.
#[derive(Default)]
pub(crate) struct Captured {
    bytes: Bytes,
    /// Bytes the whole body had.
    total: u64,
    /// Whether `bytes` is shorter than the body.
    truncated: bool,
}

impl Captured {
    /// At most `keep` bytes of `bytes`: shared when they fit, else a copy of the head, so a
    /// queued record never pins a large buffer.
    pub(crate) fn head(bytes: &Bytes, keep: usize, total: u64, truncated: bool) -> Self {
        if bytes.len() <= keep {
            Self { bytes: bytes.clone(), total, truncated }
        } else {
            Self { bytes: Bytes::copy_from_slice(&bytes[..keep]), total, truncated: true }
        }
    }

    fn text(&self, limit: usize) -> String {
        bounded_text(&self.bytes, limit, self.total, self.truncated)
    }
}

/// The parts of a body's [`Outcome`] a span uses.
pub(crate) struct OutcomeRecord {
    usage: Option<Usage>,
    end: StreamEnd,
    sse: bool,
    first_frame_at: Option<Instant>,
    /// The head of the body (error details; the output when no message was found).
    body: Captured,
    /// The assistant message (JSON or assembled from the stream), bounded by the tap.
    message: Option<AssembledMessage>,
}

impl OutcomeRecord {
    fn new(o: &Outcome, limit: usize) -> Self {
        Self {
            usage: o.usage,
            end: o.end.clone(),
            sse: o.sse,
            first_frame_at: o.first_frame_at,
            body: Captured::head(&o.captured, limit.max(STATUS_DETAIL), o.bytes, o.truncated),
            message: o.assembled.clone(),
        }
    }

    /// The recorded output: the assistant message, else the body's head (an error body, or a
    /// body that is no chat completion), bounded.
    fn output(&self, limit: usize) -> String {
        match &self.message {
            Some(message) => io::message_text(message),
            None => self.body.text(limit),
        }
    }
}

/// How a root or an attempt ended.
pub(crate) struct Ended {
    at: Instant,
    status: Option<StatusCode>,
    outcome: Option<OutcomeRecord>,
    error: Option<String>,
}

impl Ended {
    /// With the body's outcome, or without one when the call failed (`error`).
    pub(crate) fn new(
        status: Option<StatusCode>,
        outcome: Option<&Outcome>,
        error: Option<String>,
        limit: usize,
    ) -> Self {
        Self {
            at: outcome.map_or_else(Instant::now, |o| o.ended_at),
            status,
            outcome: outcome.map(|o| OutcomeRecord::new(o, limit)),
            error,
        }
    }

    /// Level and status message from the status, the body's end and a transport error.
    fn judge(&self, client_facing: bool) -> (Level, Option<String>) {
        if let Some(error) = &self.error {
            return (Level::Error, Some(error.clone()));
        }
        if let Some(status) = self.status.filter(|s| s.is_client_error() || s.is_server_error()) {
            let detail = self.outcome.as_ref().map(|o| o.body.text(STATUS_DETAIL)).filter(|d| !d.is_empty());
            let message = match detail {
                Some(detail) => format!("HTTP {}: {detail}", status.as_u16()),
                None => format!("HTTP {}", status.as_u16()),
            };
            return (Level::Error, Some(message));
        }
        match self.outcome.as_ref().map(|o| &o.end) {
            Some(StreamEnd::Error(e)) => (Level::Error, Some(format!("response body failed: {e}"))),
            Some(StreamEnd::Cancelled) if client_facing => {
                (Level::Warning, Some("the client went away before the end of the response".into()))
            }
            Some(StreamEnd::Cancelled) => (Level::Warning, Some("the response was not read to its end".into())),
            _ => (Level::Default, None),
        }
    }
}

/// The root span's record.
pub(crate) struct RootRecord {
    pub ended: Ended,
    pub served: Option<ServedBy>,
}

/// What is known about an attempt when it starts.
pub(crate) struct AttemptStart {
    pub model: Arc<str>,
    /// Prices and upstream model names, looked up when the span is built.
    pub catalog: Option<Arc<Catalog>>,
    /// The request's model parameters, in the order Langfuse shows them.
    pub parameters: Vec<(&'static str, Value)>,
    pub is_primary: bool,
    pub attempt: u32,
    pub started: Started,
}

/// One generation's record.
pub(crate) struct GenerationRecord {
    pub start: AttemptStart,
    pub ended: Ended,
}

impl RootRecord {
    /// Appends the root span.
    pub(crate) fn write(&self, scope: &TraceScope<'_>, out: &mut Vec<u8>) {
        let ended = &self.ended;
        let (level, status_message) = ended.judge(true);
        let mut own = Attributes::with_capacity(OWN_ROOM + scope.input.len());
        own.str("langfuse.observation.type", "span");
        own.str("langfuse.observation.input", scope.input);
        if let Some(o) = &ended.outcome {
            own.str("langfuse.observation.output", &o.output(scope.capture_limit));
        }
        if ended.status.is_some() || self.served.is_some() {
            let served = self.served.as_ref();
            let metadata = RootMetadata {
                http_status: ended.status.map(|s| s.as_u16()),
                served_by_model: served.map(|s| &*s.model),
                upstream: served.map(|s| &*s.upstream),
                attempts: served.map(|s| s.attempts),
            };
            own.str("langfuse.observation.metadata", &json_string(&metadata));
        }
        let parts = SpanParts {
            trace_id: scope.trace_id,
            span_id: scope.root_span_id,
            parent: None,
            name: scope.name,
            start: scope.started.wall,
            end: scope.started.wall(ended.at),
            level,
            status_message,
        };
        parts.write(scope.shared, own, out);
    }
}

impl GenerationRecord {
    /// Appends the generation's span, a child of the root.
    pub(crate) fn write(&self, scope: &TraceScope<'_>, out: &mut Vec<u8>) {
        let (start, ended) = (&self.start, &self.ended);
        let spec = start.catalog.as_deref().and_then(|c| c.get(&start.model));
        let upstream_model = spec.and_then(|s| s.upstream_model.as_deref()).unwrap_or(&start.model);
        let (level, status_message) = ended.judge(false);
        let mut own = Attributes::with_capacity(OWN_ROOM + scope.input.len());
        own.str("langfuse.observation.type", "generation");
        own.str("langfuse.observation.model.name", upstream_model);
        own.str("langfuse.observation.model.parameters", &json_string(&Parameters(&start.parameters)));
        own.str("langfuse.observation.input", scope.input);
        let mut cost = None;
        if let Some(o) = &ended.outcome {
            own.str("langfuse.observation.output", &o.output(scope.capture_limit));
            if let Some(u) = o.usage {
                let usage = Details { input: u.input, output: u.output, total: u.total };
                own.str("langfuse.observation.usage_details", &json_string(&usage));
                if let Some(pricing) = spec.and_then(|s| s.pricing) {
                    let c = pricing.cost(u.input, u.output);
                    let details = Details { input: c.input, output: c.output, total: c.total };
                    own.str("langfuse.observation.cost_details", &json_string(&details));
                    cost = Some(details);
                }
            }
            if o.sse
                && let Some(first) = o.first_frame_at
            {
                own.str("langfuse.observation.completion_start_time", &iso_millis(start.started.wall(first)));
            }
        }
        let metadata = GenerationMetadata {
            cost_usd: cost.as_ref().map(|c| c.total),
            input_cost_usd: cost.as_ref().map(|c| c.input),
            output_cost_usd: cost.as_ref().map(|c| c.output),
            is_primary: start.is_primary,
            latency_seconds: ended.at.saturating_duration_since(start.started.at).as_secs_f64(),
            http_status: ended.status.map(|s| s.as_u16()),
            attempt: start.attempt,
            model: &start.model,
        };
        own.str("langfuse.observation.metadata", &json_string(&metadata));
        let parts = SpanParts {
            trace_id: scope.trace_id,
            span_id: &new_span_id(),
            parent: Some(scope.root_span_id),
            name: &format!("llm_call_{}", start.model.replace('/', "_")),
            start: start.started.wall,
            end: start.started.wall(ended.at),
            level,
            status_message,
        };
        parts.write(scope.shared, own, out);
    }
}

// === JSON strings (spec §5 rule 5), written straight from these structs, keys in this order ===

/// `usage_details` and `cost_details`.
#[derive(Serialize)]
struct Details<T> {
    input: T,
    output: T,
    total: T,
}

/// The root span's `metadata`.
#[derive(Serialize)]
struct RootMetadata<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    served_by_model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
}

/// A generation's `metadata`.
#[derive(Serialize)]
struct GenerationMetadata<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_cost_usd: Option<f64>,
    is_primary: bool,
    latency_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_status: Option<u16>,
    attempt: u32,
    model: &'a str,
}

/// `model.parameters`: an object in the order of the list.
struct Parameters<'a>(&'a [(&'static str, Value)]);

impl Serialize for Parameters<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// Serialising these types cannot fail (string keys, no user `Serialize` impl that errors).
fn json_string(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The structs write what the `json!` objects they replace wrote.
    #[test]
    fn json_strings_are_the_objects_they_replace() {
        let (input, output, total) = (0.000_15, 1e-7, f64::NAN);
        let cost = Details { input, output, total };
        assert_eq!(json_string(&cost), json!({"input": input, "output": output, "total": total}).to_string());
        let usage = Details { input: 1u64, output: 2, total: u64::MAX };
        assert_eq!(json_string(&usage), json!({"input": 1, "output": 2, "total": u64::MAX}).to_string());
        let metadata = GenerationMetadata {
            cost_usd: Some(total),
            input_cost_usd: Some(input),
            output_cost_usd: Some(output),
            is_primary: false,
            latency_seconds: 1.5,
            http_status: Some(429),
            attempt: 2,
            model: "a/\"b\"",
        };
        let expected = json!({"cost_usd": total, "input_cost_usd": input, "output_cost_usd": output,
            "is_primary": false, "latency_seconds": 1.5, "http_status": 429, "attempt": 2, "model": "a/\"b\""});
        assert_eq!(json_string(&metadata), expected.to_string());
        let bare = GenerationMetadata {
            cost_usd: None,
            input_cost_usd: None,
            output_cost_usd: None,
            http_status: None,
            ..metadata
        };
        let expected = json!({"is_primary": false, "latency_seconds": 1.5, "attempt": 2, "model": "a/\"b\""});
        assert_eq!(json_string(&bare), expected.to_string());
        let root =
            RootMetadata { http_status: Some(200), served_by_model: Some("m"), upstream: Some("u"), attempts: Some(3) };
        let expected = json!({"http_status": 200, "served_by_model": "m", "upstream": "u", "attempts": 3});
        assert_eq!(json_string(&root), expected.to_string());
        let params =
            [("temperature", json!(0.2)), ("stop", json!(["a", "b"])), ("response_format", json!({"type": "x"}))];
        let expected = json!({"temperature": 0.2, "stop": ["a", "b"], "response_format": {"type": "x"}});
        assert_eq!(json_string(&Parameters(&params)), expected.to_string());
    }
}
