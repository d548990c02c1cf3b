//! The per-request trace: what the request path keeps (ids, the trace-level values, the
//! fallback events and the generations that finished before the root), the [`TraceRecord`] it
//! hands to the exporter in one queue message, and the spans the exporter task writes from it:
//! the trace-level attributes, the records' spans (`crate::record`) and the fallback events.
//!
//! The flow is one way: the layers write a trace, the trace is made of records, records are
//! written as spans (`crate::span`), and the exporter only sees [`WriteSpans`].

use std::{
    sync::{Arc, Mutex, OnceLock, atomic::AtomicU32},
    time::SystemTime,
};

use llmgate_core::ext::{FallbackEvent, FallbackEventSink, InsertionId, LangfuseKeys, LlmRequest, RolloutTags};
use serde_json::Value;

use crate::{
    LangfuseExporter,
    exporter::{Batch, WriteSpans},
    io::Input,
    record::{GenerationRecord, RootRecord, Started, TraceScope},
    settings::LayerConfig,
    span::{Attributes, Level, SpanParts, new_span_id},
};

/// Request extension written by [`LangfuseLayer`](crate::LangfuseLayer) and read by
/// [`LangfuseAttemptLayer`](crate::LangfuseAttemptLayer): the request's trace.
///
/// Kept in this crate (not in `llmgate-core`) because only these two layers use it; other code
/// may read [`TraceContext::trace_id_hex`] and [`TraceContext::traceparent`].
#[derive(Clone)]
pub struct TraceContext(pub(crate) Arc<TraceInner>);

/// The request path's side of a trace. Its spans are built by the exporter task from
/// [`TraceData`] and the records handed over when the root finishes.
pub(crate) struct TraceInner {
    pub data: Arc<TraceData>,
    exporter: LangfuseExporter,
    keys: LangfuseKeys,
    /// Attempt numbers when no `ModelChoice` says.
    pub attempts: AtomicU32,
    collected: Mutex<Collected>,
}

/// What waits for the root span, so that a request's spans go in one queue message.
#[derive(Default)]
struct Collected {
    events: Vec<(FallbackEvent, SystemTime)>,
    generations: Vec<GenerationRecord>,
    root_sent: bool,
}

/// What a trace's spans are built from, shared by the request path and the queued records.
/// Holds only bounded copies, so a full queue pins no request body.
pub(crate) struct TraceData {
    pub trace_id: [u8; 16],
    /// Drawn when first needed: by the exporter task when the first span is built, or on the
    /// request path for a `traceparent` (`litellm` mode).
    root_span_id: OnceLock<[u8; 8]>,
    pub config: Arc<LayerConfig>,
    insertion_id: Option<InsertionId>,
    rollout_tags: Option<RolloutTags>,
    client_tags: Vec<String>,
    user: Option<String>,
    session: Option<String>,
    /// The request's messages, bounded when written.
    pub input: Input,
    pub started: Started,
}

impl std::fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceContext").field("trace_id", &self.trace_id_hex()).finish()
    }
}

impl TraceContext {
    /// The trace id as Langfuse shows it: 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.0.data.trace_id)
    }

    /// A W3C `traceparent` naming this trace and its root span (sampled): an upstream that
    /// traces (LiteLLM's OpenTelemetry callbacks) puts its spans under the root, in this trace.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-01", hex(&self.0.data.trace_id), hex(self.0.data.root_span_id()))
    }

    pub(crate) fn new(
        config: &Arc<LayerConfig>,
        exporter: &LangfuseExporter,
        keys: LangfuseKeys,
        request: Option<&LlmRequest>,
        insertion_id: Option<&InsertionId>,
        rollout_tags: Option<&RolloutTags>,
    ) -> Self {
        let trace_id = match insertion_id {
            Some(id) => *id.0.as_bytes(),
            None => *uuid::Uuid::now_v7().as_bytes(),
        };
        let json = request.map(LlmRequest::json);
        let short = |v: Option<&Value>| {
            v.and_then(Value::as_str).filter(|s| !s.is_empty() && s.len() <= MAX_TAG_LEN).map(str::to_owned)
        };
        let data = TraceData {
            trace_id,
            root_span_id: OnceLock::new(),
            config: config.clone(),
            insertion_id: insertion_id.copied(),
            rollout_tags: rollout_tags.cloned(),
            client_tags: request.map_or_else(Vec::new, |r| {
                r.client_tags().filter(|t| t.len() <= MAX_TAG_LEN).map(str::to_owned).collect()
            }),
            user: short(json.and_then(|j| j.get("user"))),
            session: short(json.and_then(|j| j.get("metadata")).and_then(|m| m.get("session_id"))),
            input: Input::capture(request, config.capture_limit),
            started: Started::now(),
        };
        Self(Arc::new(TraceInner {
            data: Arc::new(data),
            exporter: exporter.clone(),
            keys,
            attempts: AtomicU32::new(0),
            collected: Mutex::default(),
        }))
    }
}

impl TraceInner {
    /// Hands the root span over with everything collected so far, as one queue message.
    pub(crate) fn finish_root(&self, root: RootRecord) {
        let (generations, events) = {
            let mut collected = self.collected.lock().unwrap_or_else(|p| p.into_inner());
            collected.root_sent = true;
            (std::mem::take(&mut collected.generations), std::mem::take(&mut collected.events))
        };
        self.enqueue(Some(root), generations, events);
    }

    /// Keeps a generation for the root's message, or sends it alone when the root already went.
    pub(crate) fn finish_generation(&self, generation: GenerationRecord) {
        {
            let mut collected = self.collected.lock().unwrap_or_else(|p| p.into_inner());
            if !collected.root_sent {
                collected.generations.push(generation);
                return;
            }
        }
        self.enqueue(None, vec![generation], Vec::new());
    }

    fn enqueue(
        &self,
        root: Option<RootRecord>,
        generations: Vec<GenerationRecord>,
        events: Vec<(FallbackEvent, SystemTime)>,
    ) {
        let record = TraceRecord { data: self.data.clone(), root, generations, events };
        self.exporter.enqueue_spans(&self.keys, Box::new(record));
    }
}

impl Drop for TraceInner {
    /// A request dropped before its response (the client went away) records no root; its
    /// finished generations are still sent, as each was sent when it finished before.
    fn drop(&mut self) {
        let collected = self.collected.get_mut().unwrap_or_else(|p| p.into_inner());
        if !collected.root_sent && !collected.generations.is_empty() {
            let generations = std::mem::take(&mut collected.generations);
            self.enqueue(None, generations, Vec::new());
        }
    }
}

impl FallbackEventSink for TraceInner {
    fn record(&self, event: FallbackEvent) {
        let mut collected = self.collected.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a routing loop cannot grow it without limit. Events after the root span
        // was handed over have no message to go in.
        if !collected.root_sent && collected.events.len() < 64 {
            collected.events.push((event, SystemTime::now()));
        }
    }
}

impl TraceData {
    /// The root span's id, the same for every message of this trace.
    pub(crate) fn root_span_id(&self) -> &[u8; 8] {
        self.root_span_id.get_or_init(new_span_id)
    }

    /// Attributes that go on every span (spec §5 rule 1), encoded once per record.
    pub(crate) fn attributes(&self) -> Attributes {
        let config = &self.config;
        let mut attrs = Attributes::default();
        attrs.str("langfuse.trace.name", &config.trace_name);
        let rollout: &[String] = self.rollout_tags.as_ref().map_or(&[], |r| &r.0);
        let mut has_insertion_id = false;
        for (key, value) in rollout.iter().filter_map(|tag| tag.split_once(':')) {
            attrs.str(&format!("langfuse.trace.metadata.{key}"), value);
            has_insertion_id |= key == "insertion_id";
        }
        if let Some(id) = self.insertion_id
            && !has_insertion_id
        {
            attrs.str("langfuse.trace.metadata.insertion_id", &id.0.to_string());
        }
        if !self.client_tags.is_empty() || !rollout.is_empty() {
            let tags = self.client_tags.iter().chain(rollout).map(String::as_str);
            attrs.str_array("langfuse.trace.tags", tags);
        }
        if let Some(user) = &self.user {
            attrs.str("user.id", user);
        }
        if let Some(session) = &self.session {
            attrs.str("session.id", session);
        }
        for (key, value) in [
            ("langfuse.environment", &config.environment),
            ("langfuse.release", &config.release),
            ("langfuse.version", &config.version),
        ] {
            if let Some(value) = value {
                attrs.str(key, value);
            }
        }
        attrs
    }
}

// === impl TraceRecord ===

/// A request's spans, as one queue message: the root (absent for a generation that finished
/// after it), the generations and the fallback events.
pub(crate) struct TraceRecord {
    data: Arc<TraceData>,
    root: Option<RootRecord>,
    generations: Vec<GenerationRecord>,
    events: Vec<(FallbackEvent, SystemTime)>,
}

impl WriteSpans for TraceRecord {
    fn span_count(&self) -> usize {
        usize::from(self.root.is_some()) + self.generations.len() + self.events.len()
    }

    fn rollout(&self) -> Option<RolloutTags> {
        self.data.rollout_tags.clone()
    }

    /// Generations, root, events (the order they finished in).
    fn write_spans(self: Box<Self>, batch: &mut Batch) {
        let data = &self.data;
        let shared = data.attributes();
        let input = data.input.text(data.config.capture_limit);
        let scope = TraceScope {
            trace_id: &data.trace_id,
            root_span_id: data.root_span_id(),
            name: &data.config.trace_name,
            started: data.started,
            shared: &shared,
            input: &input,
            capture_limit: data.config.capture_limit,
        };
        for generation in &self.generations {
            batch.span(|out| generation.write(&scope, out));
        }
        if let Some(root) = &self.root {
            batch.span(|out| root.write(&scope, out));
        }
        for (event, at) in &self.events {
            let mut own = Attributes::default();
            own.str("langfuse.observation.type", "event");
            own.str("langfuse.observation.metadata", &event_metadata(event).to_string());
            let parts = SpanParts {
                trace_id: scope.trace_id,
                span_id: &new_span_id(),
                parent: Some(scope.root_span_id),
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

/// The metadata JSON of a fallback event, with exactly the keys of fallback-tracking.md §8.
fn event_metadata(event: &FallbackEvent) -> Value {
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
