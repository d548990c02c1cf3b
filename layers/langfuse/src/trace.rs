//! The per-request trace: ids, trace-level attributes, the fallback event buffer.

use std::{
    sync::{Arc, Mutex, atomic::AtomicU32},
    time::SystemTime,
};

use llmgate_core::ext::{FallbackEvent, FallbackEventSink, InsertionId, LangfuseKeys, LlmRequest, RolloutTags};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde_json::Value;
use tokio::time::Instant;

use crate::{
    LangfuseExporter,
    layer::{Emit, LayerConfig},
    span::{bounded_text, kv_str, kv_str_array},
};

/// Request extension written by [`LangfuseLayer`](crate::LangfuseLayer) and read by
/// [`LangfuseAttemptLayer`](crate::LangfuseAttemptLayer): the request's trace.
///
/// Kept in this crate (not in `llmgate-core`) because only these two layers use it; other code
/// may read [`TraceContext::trace_id_hex`], e.g. to pass it to LiteLLM as `metadata.trace_id`.
#[derive(Clone)]
pub struct TraceContext(pub(crate) Arc<TraceInner>);

pub(crate) struct TraceInner {
    pub trace_id: [u8; 16],
    pub root_span_id: [u8; 8],
    pub keys: LangfuseKeys,
    pub exporter: LangfuseExporter,
    pub emit: Emit,
    pub capture_limit: usize,
    /// Attributes that go on every span (spec §5 rule 1).
    pub trace_attributes: Vec<KeyValue>,
    /// The bounded request body.
    pub input: String,
    pub started: SystemTime,
    pub started_at: Instant,
    pub events: Arc<EventBuffer>,
    /// Attempt numbers when no `ModelChoice` says.
    pub attempts: AtomicU32,
}

impl std::fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceContext").field("trace_id", &self.trace_id_hex()).finish()
    }
}

impl TraceContext {
    /// The trace id as Langfuse shows it: 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.0.trace_id)
    }

    /// The root span's id, 16 hex characters.
    pub fn root_span_id_hex(&self) -> String {
        hex(&self.0.root_span_id)
    }

    /// Converts a monotonic instant of this request into wall-clock time.
    pub(crate) fn wall(&self, at: Instant) -> SystemTime {
        self.0.started + at.saturating_duration_since(self.0.started_at)
    }

    pub(crate) fn new(
        config: &LayerConfig,
        keys: LangfuseKeys,
        request: Option<&LlmRequest>,
        insertion_id: Option<&InsertionId>,
        rollout_tags: Option<&RolloutTags>,
    ) -> Self {
        let trace_id = match insertion_id {
            Some(id) => *id.0.as_bytes(),
            None => *uuid::Uuid::now_v7().as_bytes(),
        };
        let input = request
            .map_or_else(String::new, |r| bounded_text(r.raw(), config.capture_limit, r.raw().len() as u64, false));
        Self(Arc::new(TraceInner {
            trace_id,
            root_span_id: crate::span::new_span_id(),
            keys,
            exporter: config.exporter.clone(),
            emit: config.emit,
            capture_limit: config.capture_limit,
            trace_attributes: trace_attributes(config, request, insertion_id, rollout_tags),
            input,
            started: SystemTime::now(),
            started_at: Instant::now(),
            events: Arc::new(EventBuffer::default()),
            attempts: AtomicU32::new(0),
        }))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Longest tag, user or session value sent (the official SDKs reject longer ones).
const MAX_TAG_LEN: usize = 200;

fn trace_attributes(
    config: &LayerConfig,
    request: Option<&LlmRequest>,
    insertion_id: Option<&InsertionId>,
    rollout_tags: Option<&RolloutTags>,
) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(16);
    attrs.push(kv_str("langfuse.trace.name", config.trace_name.to_string()));
    let mut tags: Vec<String> = Vec::new();
    if let Some(request) = request {
        tags.extend(request.client_tags().filter(|t| t.len() <= MAX_TAG_LEN).map(str::to_owned));
    }
    if let Some(rollout) = rollout_tags {
        for tag in rollout.0.iter() {
            tags.push(tag.clone());
            if let Some((key, value)) = tag.split_once(':') {
                attrs.push(kv_str(format!("langfuse.trace.metadata.{key}"), value.to_owned()));
            }
        }
    }
    if let Some(id) = insertion_id
        && !attrs.iter().any(|kv| kv.key == "langfuse.trace.metadata.insertion_id")
    {
        attrs.push(kv_str("langfuse.trace.metadata.insertion_id", id.0.to_string()));
    }
    if !tags.is_empty() {
        attrs.push(kv_str_array("langfuse.trace.tags", tags));
    }
    if let Some(json) = request.map(LlmRequest::json) {
        if let Some(user) = json.get("user").and_then(Value::as_str).filter(|u| !u.is_empty() && u.len() <= MAX_TAG_LEN)
        {
            attrs.push(kv_str("user.id", user.to_owned()));
        }
        let session = json.get("metadata").and_then(|m| m.get("session_id")).and_then(Value::as_str);
        if let Some(session) = session.filter(|s| !s.is_empty() && s.len() <= MAX_TAG_LEN) {
            attrs.push(kv_str("session.id", session.to_owned()));
        }
    }
    for (key, value) in [
        ("langfuse.environment", &config.environment),
        ("langfuse.release", &config.release),
        ("langfuse.version", &config.version),
    ] {
        if let Some(value) = value {
            attrs.push(kv_str(key, value.to_string()));
        }
    }
    attrs
}

// === EventBuffer ===

/// The request's fallback events, installed as [`FallbackEvents`](llmgate_core::ext::FallbackEvents).
#[derive(Default)]
pub(crate) struct EventBuffer {
    events: Mutex<Vec<(FallbackEvent, SystemTime)>>,
}

impl EventBuffer {
    pub(crate) fn take(&self) -> Vec<(FallbackEvent, SystemTime)> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl FallbackEventSink for EventBuffer {
    fn record(&self, event: FallbackEvent) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a routing loop cannot grow it without limit.
        if events.len() < 64 {
            events.push((event, SystemTime::now()));
        }
    }
}

/// The metadata JSON of a fallback event, with exactly the keys of fallback-tracking.md §8.
pub(crate) fn event_metadata(event: &FallbackEvent) -> Value {
    match event {
        FallbackEvent::RateLimit { original_model, fallback_model, reason } => serde_json::json!({
            "original_model": original_model,
            "fallback_model": fallback_model,
            "reason": reason,
        }),
        FallbackEvent::ContextLength {
            original_model,
            fallback_model,
            estimated_tokens,
            original_max_context,
            fallback_max_context,
        } => serde_json::json!({
            "original_model": original_model,
            "fallback_model": fallback_model,
            "estimated_tokens": estimated_tokens,
            "original_max_context": original_max_context,
            "fallback_max_context": fallback_max_context,
        }),
    }
}
