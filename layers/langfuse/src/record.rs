//! What the request path hands to the exporter (one [`TraceRecord`] per request, in one queue
//! message), and the OTLP spans the exporter task builds from it (spec `langfuse.md` §6.2).
//!
//! The request path only copies what it must keep (bounded bodies, a few small strings) and
//! shares the rest; the attributes, JSON strings, bounded texts and span ids are made here, on
//! the exporter's task, and written straight into the export's protobuf bytes.

use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;
use http::StatusCode;
use llmgate_core::{
    catalog::Catalog,
    ext::{FallbackEvent, ServedBy},
    usage::{Outcome, StreamEnd, Usage},
};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::{
    exporter::Batch,
    span::{Attributes, Level, SpanParts, bounded_text, iso_millis, new_span_id},
    trace::{TraceData, event_metadata},
};

/// Bytes of an error body quoted in a status message.
const STATUS_DETAIL: usize = 512;

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
    body: Captured,
}

impl OutcomeRecord {
    fn new(o: &Outcome, limit: usize) -> Self {
        // A stream is assembled from all of it (the tap bounds it); of any other body only the
        // head is read.
        let keep = if o.sse { usize::MAX } else { limit.max(STATUS_DETAIL) };
        Self {
            usage: o.usage,
            end: o.end.clone(),
            sse: o.sse,
            first_frame_at: o.first_frame_at,
            body: Captured::head(&o.captured, keep, o.bytes, o.truncated),
        }
    }

    /// The recorded output: the JSON body, or for SSE the assembled message, bounded.
    fn output(&self, limit: usize) -> String {
        if self.sse
            && let Some(assembled) = assemble_sse(&self.body.bytes)
        {
            let text = assembled.to_string();
            let cut = text.len() > limit || self.body.truncated;
            return if cut { bounded_text(text.as_bytes(), limit, text.len() as u64, true) } else { text };
        }
        self.body.text(limit)
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
    pub started: SystemTime,
    pub started_at: Instant,
}

/// One generation's record.
pub(crate) struct GenerationRecord {
    pub start: AttemptStart,
    pub ended: Ended,
}

/// A request's spans, as one queue message: the root (absent for a generation that finished
/// after it), the generations and the fallback events.
pub(crate) struct TraceRecord {
    pub data: Arc<TraceData>,
    pub root: Option<RootRecord>,
    pub generations: Vec<GenerationRecord>,
    pub events: Vec<(FallbackEvent, SystemTime)>,
}

impl TraceRecord {
    /// Spans this record becomes (the queue counts spans).
    pub(crate) fn span_count(&self) -> usize {
        usize::from(self.root.is_some()) + self.generations.len() + self.events.len()
    }

    /// Writes the spans into `batch`: generations, root, events (the order they finished in).
    pub(crate) fn write(self, batch: &mut Batch) {
        let data = &self.data;
        let shared = data.attributes();
        let input = data.input.text(data.config.capture_limit);
        for generation in &self.generations {
            batch.span(|out| generation.write(data, &shared, &input, out));
        }
        if let Some(root) = &self.root {
            batch.span(|out| root.write(data, &shared, &input, out));
        }
        for (event, at) in &self.events {
            let mut own = Attributes::default();
            own.str("langfuse.observation.type", "event");
            own.str("langfuse.observation.metadata", &event_metadata(event).to_string());
            let parts = SpanParts {
                trace_id: &data.trace_id,
                span_id: &new_span_id(),
                parent: Some(data.root_span_id()),
                name: event.name(),
                start: *at,
                end: *at,
                level: Level::Warning,
                status_message: None,
            };
            batch.span(|out| parts.write(&shared, own, out));
        }
    }
}

impl RootRecord {
    fn write(&self, data: &TraceData, shared: &Attributes, input: &str, out: &mut Vec<u8>) {
        let ended = &self.ended;
        let (level, status_message) = ended.judge(true);
        let mut own = Attributes::default();
        own.str("langfuse.observation.type", "span");
        own.str("langfuse.observation.input", input);
        if let Some(o) = &ended.outcome {
            own.str("langfuse.observation.output", &o.output(data.config.capture_limit));
        }
        let mut metadata = Map::new();
        if let Some(status) = ended.status {
            metadata.insert("http_status".into(), status.as_u16().into());
        }
        if let Some(served) = &self.served {
            metadata.insert("served_by_model".into(), served.model.as_ref().into());
            metadata.insert("upstream".into(), served.upstream.as_ref().into());
            metadata.insert("attempts".into(), served.attempts.into());
        }
        if !metadata.is_empty() {
            own.str("langfuse.observation.metadata", &Value::Object(metadata).to_string());
        }
        let parts = SpanParts {
            trace_id: &data.trace_id,
            span_id: data.root_span_id(),
            parent: None,
            name: &data.config.trace_name,
            start: data.started,
            end: data.wall(ended.at),
            level,
            status_message,
        };
        parts.write(shared, own, out);
    }
}

impl GenerationRecord {
    fn write(&self, data: &TraceData, shared: &Attributes, input: &str, out: &mut Vec<u8>) {
        let (start, ended) = (&self.start, &self.ended);
        let spec = start.catalog.as_deref().and_then(|c| c.get(&start.model));
        let upstream_model = spec.and_then(|s| s.upstream_model.as_deref()).unwrap_or(&start.model);
        let parameters: Map<String, Value> =
            start.parameters.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
        let (level, status_message) = ended.judge(false);
        let mut own = Attributes::default();
        own.str("langfuse.observation.type", "generation");
        own.str("langfuse.observation.model.name", upstream_model);
        own.str("langfuse.observation.model.parameters", &Value::Object(parameters).to_string());
        own.str("langfuse.observation.input", input);
        let mut metadata = Map::new();
        if let Some(o) = &ended.outcome {
            own.str("langfuse.observation.output", &o.output(data.config.capture_limit));
            if let Some(u) = o.usage {
                own.str(
                    "langfuse.observation.usage_details",
                    &json!({"input": u.input, "output": u.output, "total": u.total}).to_string(),
                );
                if let Some(pricing) = spec.and_then(|s| s.pricing) {
                    let cost = pricing.cost(u.input, u.output);
                    own.str(
                        "langfuse.observation.cost_details",
                        &json!({"input": cost.input, "output": cost.output, "total": cost.total}).to_string(),
                    );
                    metadata.insert("cost_usd".into(), json!(cost.total));
                    metadata.insert("input_cost_usd".into(), json!(cost.input));
                    metadata.insert("output_cost_usd".into(), json!(cost.output));
                }
            }
            if o.sse
                && let Some(first) = o.first_frame_at
            {
                let first = start.started + first.saturating_duration_since(start.started_at);
                own.str("langfuse.observation.completion_start_time", &iso_millis(first));
            }
        }
        metadata.insert("is_primary".into(), start.is_primary.into());
        metadata.insert(
            "latency_seconds".into(),
            json!(ended.at.saturating_duration_since(start.started_at).as_secs_f64()),
        );
        if let Some(status) = ended.status {
            metadata.insert("http_status".into(), status.as_u16().into());
        }
        metadata.insert("attempt".into(), start.attempt.into());
        metadata.insert("model".into(), start.model.as_ref().into());
        own.str("langfuse.observation.metadata", &Value::Object(metadata).to_string());
        let parts = SpanParts {
            trace_id: &data.trace_id,
            span_id: &new_span_id(),
            parent: Some(data.root_span_id()),
            name: &format!("llm_call_{}", start.model.replace('/', "_")),
            start: start.started,
            end: start.started + ended.at.saturating_duration_since(start.started_at),
            level,
            status_message,
        };
        parts.write(shared, own, out);
    }
}

/// Joins the `choices[0].delta.content` of OpenAI chunks into one assistant message.
fn assemble_sse(captured: &[u8]) -> Option<Value> {
    let mut content = String::new();
    let mut finish_reason = Value::Null;
    let mut seen = false;
    for line in captured.split(|b| *b == b'\n') {
        let Some(data) = line.strip_prefix(b"data:") else {
            continue;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            continue;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
            continue;
        };
        let Some(choice) = chunk.get("choices").and_then(|c| c.get(0)) else {
            continue;
        };
        seen = true;
        if let Some(text) = choice.get("delta").and_then(|d| d.get("content")).and_then(Value::as_str) {
            content.push_str(text);
        }
        if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
            finish_reason = reason.clone();
        }
    }
    seen.then(|| json!({"role": "assistant", "content": content, "finish_reason": finish_reason}))
}
