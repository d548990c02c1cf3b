//! Reading traces back from Langfuse (spec `langfuse.md` §7), for `/traces` and `llmgate report`.
//!
//! [`V3Reader`] uses the legacy `GET /api/public/traces[/{id}]` (gone on v4 `events_only`
//! deployments and on Cloud after 2026-11-16); [`V4Reader`] uses
//! `GET /api/public/v2/observations` with a `filter` and groups the rows by trace. Both return
//! [`Trace`] (the fields of gateway.md §9) and share the process's pooled
//! [`LangfuseClient`](crate::LangfuseClient). Data shows up late (spec §8): callers poll; a
//! trace not there yet is `Ok(None)` or absent from a list, not an error.
//!
//! This module holds what the callers see: the [`LangfuseReader`] trait, the query and the
//! normalised [`Trace`]. Each API version is its own module (`v3`, `v4`); `api` holds what both
//! send and read: the authenticated GET and the observation as both versions write it, read
//! with `serde` into typed structs.

use std::{
    collections::HashMap,
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use llmgate_core::ext::LangfuseKeys;
use serde::Serialize;
use serde_json::Value;

use crate::{BoxFuture, timestamp::parse_timestamp};

mod api;
mod v3;
mod v4;

pub use v3::V3Reader;
pub use v4::V4Reader;

/// Window of a query without bounds.
const DEFAULT_WINDOW: Duration = Duration::from_secs(30 * 86_400);

/// What to list. The simple filters are exact matches and are passed to Langfuse (v3 query
/// parameters; v4 simple parameters, a `traceName` filter, and `release` checked on the rows).
#[derive(Clone, Debug, Default)]
pub struct TraceQuery {
    /// The trace must carry every one of these tags.
    pub tags: Vec<String>,
    /// Start of the window (`>=`); default 30 days before `to`.
    pub from: Option<SystemTime>,
    /// End of the window (`<`); default now plus a minute.
    pub to: Option<SystemTime>,
    /// Stop after this many traces.
    pub limit: Option<usize>,
    /// `userId`.
    pub user_id: Option<String>,
    /// `sessionId`.
    pub session_id: Option<String>,
    /// The trace name.
    pub name: Option<String>,
    /// `environment`.
    pub environment: Option<String>,
    /// `version`.
    pub version: Option<String>,
    /// `release`.
    pub release: Option<String>,
    /// v3 `fields` (comma list of `core`, `io`, `scores`, `observations`, `metrics`); on v4 they
    /// are mapped to field groups (v4 group names pass through), and the groups the grouping
    /// needs are always asked for.
    pub fields: Option<String>,
}

impl TraceQuery {
    /// `from` and `to`, with their defaults.
    fn window(&self) -> (SystemTime, SystemTime) {
        let to = self.to.unwrap_or_else(|| SystemTime::now() + Duration::from_secs(60));
        let from = self.from.unwrap_or_else(|| to.checked_sub(DEFAULT_WINDOW).unwrap_or(UNIX_EPOCH));
        (from, to)
    }

    /// The same filters with other tags (e.g. one `insertion_id:` tag) and another limit.
    pub fn with_tags(&self, tags: Vec<String>, limit: Option<usize>) -> Self {
        Self { tags, limit, ..self.clone() }
    }

    /// The exact-match filters, by the names of Langfuse's query parameters.
    fn filters(&self) -> [(&'static str, &Option<String>); 6] {
        [
            ("userId", &self.user_id),
            ("sessionId", &self.session_id),
            ("name", &self.name),
            ("environment", &self.environment),
            ("version", &self.version),
            ("release", &self.release),
        ]
    }
}

/// One trace, normalised (gateway.md §9 `TraceResponse`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Trace {
    /// Trace id.
    pub id: String,
    /// Trace name.
    pub name: Option<String>,
    /// `userId`.
    pub user_id: Option<String>,
    /// `sessionId`.
    pub session_id: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Trace timestamp (RFC 3339).
    pub timestamp: Option<String>,
    /// Input (of the trace, or of its root observation on v4).
    pub input: Value,
    /// Output.
    pub output: Value,
    /// Metadata.
    pub metadata: Value,
    /// Full observations (empty in a v3 list; fetch the detail for them).
    pub observations: Vec<Observation>,
}

/// One observation (gateway.md §9 `ObservationResponse`, plus what the report needs).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Observation {
    /// Observation id.
    pub id: String,
    /// `SPAN`, `GENERATION`, `EVENT`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// Name.
    pub name: Option<String>,
    /// Start (RFC 3339).
    pub start_time: Option<String>,
    /// End (RFC 3339).
    pub end_time: Option<String>,
    /// Input.
    pub input: Value,
    /// Output.
    pub output: Value,
    /// Parent observation.
    pub parent_observation_id: Option<String>,
    /// Level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Metadata.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub metadata: Value,
    /// Model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Usage details.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub usage_details: Value,
    /// Cost details.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub cost_details: Value,
}

/// A failed read: Langfuse's status (none for a transport error) and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadError {
    /// HTTP status from Langfuse.
    pub status: Option<u16>,
    /// Langfuse's `message`, or the transport error.
    pub message: String,
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "Langfuse answered {status}: {}", self.message),
            None => write!(f, "Langfuse unreachable: {}", self.message),
        }
    }
}

impl std::error::Error for ReadError {}

/// A Langfuse read back end.
pub trait LangfuseReader: Send + Sync + 'static {
    /// Traces carrying all of `query.tags`, newest first. When several traces carry the same
    /// `insertion_id:` tag, llmgate's own events-only trace of that insertion (LiteLLM-mode
    /// exports: its trace id is the insertion id, and LiteLLM wrote the completion under its own
    /// trace id) is left out, so each insertion is one trace.
    fn list_traces<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        query: &'a TraceQuery,
    ) -> BoxFuture<'a, Result<Vec<Trace>, ReadError>>;

    /// One trace with its observations; `Ok(None)` while it is not (yet) there. Dashes in the
    /// id are ignored (an insertion id is a trace id).
    fn get_trace<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        trace_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Trace>, ReadError>>;

    /// Whether [`list_traces`](Self::list_traces) returns the observations too (v4). When not
    /// (v3), fetch each listed trace with [`get_trace`](Self::get_trace) for them.
    fn lists_full_traces(&self) -> bool {
        false
    }

    /// The trace of one insertion id, with its observations; `Ok(None)` while it is not there.
    ///
    /// Looked up on its own by its `insertion_id:` tag, with `query`'s other filters and window
    /// (a query with several `insertion_id:` tags means "all of them" and matches nothing).
    /// [`V3Reader`] first tries the trace id (the insertion id without dashes: llmgate exported
    /// the trace itself) and falls back to the tag when that trace has no generation (LiteLLM
    /// wrote the completion under its own trace id).
    fn find_insertion<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        insertion_id: &'a str,
        query: &'a TraceQuery,
    ) -> BoxFuture<'a, Result<Option<Trace>, ReadError>> {
        Box::pin(find_by_tag(self, keys, insertion_id, query))
    }

    /// The observations matching any of `selectors` that started in `window` (`from <= start <
    /// to`), each with its trace id, for `llmgate report`. `progress` is called with the number
    /// of observations (or traces, on v3) read so far, after every page.
    ///
    /// The default walks [`list_traces`](Self::list_traces) over the window (with
    /// [`get_trace`](Self::get_trace) per trace when the list has no observations) and keeps
    /// the matching observations; [`V4Reader`] queries the observations API once per selector.
    fn list_observations<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        selectors: &'a [ObservationSelector],
        window: (SystemTime, SystemTime),
        progress: &'a (dyn Fn(usize) + Send + Sync),
    ) -> BoxFuture<'a, Result<Vec<TracedObservation>, ReadError>> {
        Box::pin(async move {
            let query = TraceQuery { from: Some(window.0), to: Some(window.1), ..TraceQuery::default() };
            let listed = self.list_traces(keys, &query).await?;
            let mut out = Vec::new();
            for (n, trace) in listed.into_iter().enumerate() {
                let trace =
                    if self.lists_full_traces() { Some(trace) } else { self.get_trace(keys, &trace.id).await? };
                progress(n + 1);
                let Some(trace) = trace else {
                    continue;
                };
                for o in trace.observations {
                    let started = o.start_time.as_deref().and_then(parse_timestamp);
                    let in_window = started.is_some_and(|t| t >= window.0 && t < window.1);
                    if in_window && selectors.iter().any(|s| s.matches(&o)) {
                        out.push(TracedObservation { trace_id: trace.id.clone(), observation: o });
                    }
                }
            }
            Ok(out)
        })
    }
}

/// Which observations [`LangfuseReader::list_observations`] lists: a type and, optionally, an
/// exact name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservationSelector {
    /// `EVENT`, `GENERATION`, …
    pub kind: String,
    /// Exact name; any name when `None`.
    pub name: Option<String>,
}

impl ObservationSelector {
    /// Observations of this type, any name.
    pub fn kind(kind: impl Into<String>) -> Self {
        Self { kind: kind.into(), name: None }
    }

    /// Observations of this type and name.
    pub fn named(kind: impl Into<String>, name: impl Into<String>) -> Self {
        Self { kind: kind.into(), name: Some(name.into()) }
    }

    /// Whether `o` is one of them.
    pub fn matches(&self, o: &Observation) -> bool {
        o.kind.eq_ignore_ascii_case(&self.kind) && self.name.as_ref().is_none_or(|n| o.name.as_ref() == Some(n))
    }
}

/// An observation with the id of its trace.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TracedObservation {
    /// Trace id.
    pub trace_id: String,
    /// The observation.
    pub observation: Observation,
}

/// How many traces one insertion's tag query reads (one, plus the duplicates to drop).
const INSERTION_LIMIT: usize = 10;

/// [`LangfuseReader::find_insertion`] by the `insertion_id:` tag: the best of the traces that
/// carry it (one with a generation, then not llmgate's own events-only trace).
async fn find_by_tag<R: LangfuseReader + ?Sized>(
    reader: &R,
    keys: &LangfuseKeys,
    insertion_id: &str,
    query: &TraceQuery,
) -> Result<Option<Trace>, ReadError> {
    let query = query.with_tags(vec![format!("insertion_id:{insertion_id}")], Some(INSERTION_LIMIT));
    let traces = reader.list_traces(keys, &query).await?;
    let hex = strip_dashes(insertion_id);
    let best = traces
        .into_iter()
        .max_by_key(|t| (t.has_generation(), t.id != hex))
        .filter(|t| t.insertion_id().is_some_and(|i| strip_dashes(i) == hex));
    match best {
        Some(trace) if !reader.lists_full_traces() => reader.get_trace(keys, &trace.id).await,
        other => Ok(other),
    }
}

impl Trace {
    /// The value of the trace's first `insertion_id:` tag.
    pub fn insertion_id(&self) -> Option<&str> {
        self.tags.iter().find_map(|t| t.strip_prefix("insertion_id:"))
    }

    /// Whether one of its observations is a `GENERATION`.
    pub fn has_generation(&self) -> bool {
        self.observations.iter().any(|o| o.kind == "GENERATION")
    }
}

/// Leaves out llmgate's own events-only trace of an insertion when another trace carries the
/// same `insertion_id:` tag (spec `langfuse.md` §6: LiteLLM-mode exports that did not join
/// LiteLLM's trace). Order is kept.
pub fn drop_shadowed_traces(mut traces: Vec<Trace>) -> Vec<Trace> {
    let mut count: HashMap<String, usize> = HashMap::new();
    for t in &traces {
        if let Some(id) = t.insertion_id() {
            *count.entry(strip_dashes(id)).or_default() += 1;
        }
    }
    traces.retain(|t| match t.insertion_id().map(strip_dashes) {
        Some(hex) => !(count.get(&hex).copied().unwrap_or(0) > 1 && t.id == hex && !t.has_generation()),
        None => true,
    });
    traces
}

/// An insertion or trace id as Langfuse's trace id: without dashes.
fn strip_dashes(id: &str) -> String {
    id.chars().filter(|c| *c != '-').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(id: &str, insertion: &str, generation: bool) -> Trace {
        let kind = if generation { "GENERATION" } else { "SPAN" };
        Trace {
            id: id.into(),
            tags: vec!["rollout_id:r".into(), format!("insertion_id:{insertion}")],
            observations: vec![Observation { id: "o".into(), kind: kind.into(), ..Default::default() }],
            ..Default::default()
        }
    }

    #[test]
    fn an_events_only_duplicate_of_an_insertion_is_dropped() {
        let a = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        let hex_a = strip_dashes(a);
        let b = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c";
        let traces = vec![trace(&hex_a, a, false), trace("litellm-trace", a, true), trace(&strip_dashes(b), b, false)];
        let kept: Vec<String> = drop_shadowed_traces(traces).into_iter().map(|t| t.id).collect();
        assert_eq!(kept, vec!["litellm-trace".to_string(), strip_dashes(b)], "alone, an events-only trace stays");
        // llmgate's own trace with its generation (openai mode) is never dropped.
        let traces = vec![trace(&hex_a, a, true), trace("other", a, true)];
        assert_eq!(drop_shadowed_traces(traces).len(), 2);
    }
}
