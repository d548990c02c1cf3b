//! Reading traces back from Langfuse (spec `langfuse.md` §7), for `/traces` and `llmgate report`.
//!
//! [`V3Reader`] uses the legacy `GET /api/public/traces[/{id}]` (gone on v4 `events_only`
//! deployments and on Cloud after 2026-11-16); [`V4Reader`] uses
//! `GET /api/public/v2/observations` with a `filter` and groups the rows by trace. Both return
//! [`Trace`] (the fields of gateway.md §9) and share the process's pooled [`LangfuseClient`].
//! Data shows up late (spec §8): callers poll; a trace not there yet is `Ok(None)` or absent
//! from a list, not an error.

use std::{
    collections::HashMap,
    fmt,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::Full;
use llmgate_core::ext::LangfuseKeys;
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    BoxFuture, LangfuseClient, client,
    timestamp::{iso_millis, parse_timestamp, rfc3339},
};

/// Largest response read (Cloud caps responses at 5 MB).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
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
    fn window(&self) -> (SystemTime, SystemTime) {
        let to = self.to.unwrap_or_else(|| SystemTime::now() + Duration::from_secs(60));
        let from = self.from.unwrap_or_else(|| to.checked_sub(DEFAULT_WINDOW).unwrap_or(UNIX_EPOCH));
        (from, to)
    }

    /// The same filters with other tags (e.g. one `insertion_id:` tag) and another limit.
    pub fn with_tags(&self, tags: Vec<String>, limit: Option<usize>) -> Self {
        Self { tags, limit, ..self.clone() }
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

async fn get_json(client: &LangfuseClient, keys: &LangfuseKeys, url: String) -> Result<Option<Value>, ReadError> {
    let err = |status: Option<u16>, message: String| ReadError { status, message };
    let auth = client::basic_auth(keys).ok_or_else(|| err(None, "invalid Langfuse keys".into()))?;
    let request = Request::builder()
        .method(Method::GET)
        .uri(&url)
        .header(header::AUTHORIZATION, auth)
        .header(header::ACCEPT, "application/json")
        .header("x-langfuse-sdk-name", "llmgate")
        .body(Full::new(Bytes::new()))
        .map_err(|e| err(None, e.to_string()))?;
    let response = client.send(request).await.map_err(|e| err(None, e.to_string()))?;
    let status = response.status();
    let body = client::read_capped(response.into_body(), MAX_RESPONSE)
        .await
        .map_err(|e| err(Some(status.as_u16()), e.to_string()))?;
    if status == http::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    if !status.is_success() {
        let message = parsed
            .as_ref()
            .and_then(|v| v.get("message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned());
        return Err(err(Some(status.as_u16()), message));
    }
    parsed.map(Some).ok_or_else(|| err(Some(status.as_u16()), "response is not JSON".into()))
}

fn query_string<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, &v);
    }
    s.finish()
}

fn string(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// A raw string that holds JSON becomes that JSON; other strings stay strings.
fn parse_io(v: Option<&Value>) -> Value {
    match v {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        Some(v) => v.clone(),
        None => Value::Null,
    }
}

fn observation(v: &Value) -> Observation {
    Observation {
        id: string(v, "id").unwrap_or_default(),
        kind: string(v, "type").unwrap_or_default(),
        name: string(v, "name"),
        start_time: rfc3339(string(v, "startTime")),
        end_time: rfc3339(string(v, "endTime")),
        input: parse_io(v.get("input")),
        output: parse_io(v.get("output")),
        parent_observation_id: string(v, "parentObservationId"),
        level: string(v, "level"),
        metadata: v.get("metadata").cloned().unwrap_or(Value::Null),
        model: string(v, "providedModelName").or_else(|| string(v, "model")),
        usage_details: v.get("usageDetails").cloned().unwrap_or(Value::Null),
        cost_details: v.get("costDetails").cloned().unwrap_or(Value::Null),
    }
}

fn strip_dashes(id: &str) -> String {
    id.chars().filter(|c| *c != '-').collect()
}

// === V3Reader ===

/// The legacy v3 read API.
#[derive(Clone, Debug)]
pub struct V3Reader {
    client: LangfuseClient,
    host: String,
    page_size: usize,
}

impl V3Reader {
    /// Reads from `host` through `client`.
    pub fn new(client: LangfuseClient, host: impl Into<String>) -> Self {
        Self { client, host: host.into().trim_end_matches('/').to_owned(), page_size: 100 }
    }

    /// Traces per page (1–100, default 100).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n.clamp(1, 100);
        self
    }

    fn v3_trace(v: &Value) -> Trace {
        Trace {
            id: string(v, "id").unwrap_or_default(),
            name: string(v, "name"),
            user_id: string(v, "userId"),
            session_id: string(v, "sessionId"),
            tags: v
                .get("tags")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default(),
            timestamp: rfc3339(string(v, "timestamp")),
            input: parse_io(v.get("input")),
            output: parse_io(v.get("output")),
            metadata: v.get("metadata").cloned().unwrap_or(Value::Null),
            observations: v
                .get("observations")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter(|o| o.is_object()).map(observation).collect())
                .unwrap_or_default(),
        }
    }
}

impl LangfuseReader for V3Reader {
    fn list_traces<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        query: &'a TraceQuery,
    ) -> BoxFuture<'a, Result<Vec<Trace>, ReadError>> {
        Box::pin(async move {
            let (from, to) = query.window();
            let limit = query.limit.unwrap_or(usize::MAX);
            if limit == 0 {
                return Ok(Vec::new());
            }
            // One page size for the whole walk (pages are offsets of it).
            let page_size = self.page_size.min(limit);
            let mut traces = Vec::new();
            let mut page = 1u64;
            loop {
                let mut pairs: Vec<(&str, String)> = query.tags.iter().map(|t| ("tags", t.clone())).collect();
                pairs.push(("page", page.to_string()));
                pairs.push(("limit", page_size.to_string()));
                pairs.push(("orderBy", "timestamp.desc".to_owned()));
                pairs.push(("fromTimestamp", iso_millis(from)));
                pairs.push(("toTimestamp", iso_millis(to)));
                for (key, value) in [
                    ("userId", &query.user_id),
                    ("sessionId", &query.session_id),
                    ("name", &query.name),
                    ("environment", &query.environment),
                    ("version", &query.version),
                    ("release", &query.release),
                    ("fields", &query.fields),
                ] {
                    if let Some(value) = value {
                        pairs.push((key, value.clone()));
                    }
                }
                let url = format!("{}/api/public/traces?{}", self.host, query_string(pairs));
                let Some(body) = get_json(&self.client, keys, url).await? else {
                    return Err(ReadError { status: Some(404), message: "the v3 traces API is not available".into() });
                };
                let data = body.get("data").and_then(Value::as_array).cloned().unwrap_or_default();
                traces.extend(data.iter().map(Self::v3_trace));
                let total_pages =
                    body.get("meta").and_then(|m| m.get("totalPages")).and_then(Value::as_u64).unwrap_or(0);
                if data.is_empty() || page >= total_pages || traces.len() >= limit {
                    break;
                }
                page += 1;
            }
            traces.truncate(limit);
            Ok(drop_shadowed_traces(traces))
        })
    }

    fn get_trace<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        trace_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Trace>, ReadError>> {
        Box::pin(async move {
            let id = strip_dashes(trace_id);
            let encoded: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
            let url = format!("{}/api/public/traces/{encoded}", self.host);
            Ok(get_json(&self.client, keys, url).await?.map(|v| Self::v3_trace(&v)))
        })
    }

    fn find_insertion<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        insertion_id: &'a str,
        query: &'a TraceQuery,
    ) -> BoxFuture<'a, Result<Option<Trace>, ReadError>> {
        Box::pin(async move {
            // The trace id is one request instead of a list and a detail; it ignores the other
            // filters, so it is used only when there are none.
            let filtered =
                [&query.user_id, &query.session_id, &query.name, &query.environment, &query.version, &query.release]
                    .iter()
                    .any(|f| f.is_some());
            if !filtered
                && let Some(trace) = self.get_trace(keys, insertion_id).await?
                && trace.has_generation()
            {
                return Ok(Some(trace));
            }
            find_by_tag(self, keys, insertion_id, query).await
        })
    }
}

// === V4Reader ===

/// The v4 observations API (also Cloud's).
#[derive(Clone, Debug)]
pub struct V4Reader {
    client: LangfuseClient,
    host: String,
    page_size: usize,
}

const V4_FIELDS: &str = "core,basic,time,io,metadata,model,usage,trace_context";
/// Field groups of the report's reads (events and generations, spec `langfuse.md` §7.3).
const REPORT_FIELDS: &str = "core,basic,model,usage,metadata,metrics,trace_context";
/// Metadata keys the report reads in full.
const REPORT_METADATA: &str = "original_model,fallback_model,reason,estimated_tokens,original_max_context,\
                               fallback_max_context,cost_usd,is_primary,latency_seconds";

/// The v4 field groups for a v3 `fields` list: `core` → `metadata` (plus the groups always
/// asked for), `io` → `io`, `observations` → `time,model,usage`, `metrics` → `metrics`,
/// `scores` → nothing; v4 group names pass through, unknown names are dropped.
fn v4_fields(fields: Option<&str>) -> String {
    const V4_GROUPS: &[&str] =
        &["core", "basic", "time", "io", "metadata", "model", "usage", "prompt", "metrics", "trace_context"];
    let Some(fields) = fields.filter(|f| !f.trim().is_empty()) else {
        return V4_FIELDS.to_owned();
    };
    // What grouping into traces needs: ids and parents, trace name, user, session, tags.
    let mut groups: Vec<&str> = vec!["core", "basic", "trace_context"];
    for item in fields.split(',').map(str::trim) {
        let add: &[&str] = match item {
            "core" => &["metadata"],
            "observations" => &["time", "model", "usage"],
            other => V4_GROUPS.iter().find(|g| **g == other).map_or(&[], std::slice::from_ref),
        };
        for g in add {
            if !groups.contains(g) {
                groups.push(g);
            }
        }
    }
    groups.join(",")
}

impl V4Reader {
    /// Reads from `host` through `client`.
    pub fn new(client: LangfuseClient, host: impl Into<String>) -> Self {
        Self { client, host: host.into().trim_end_matches('/').to_owned(), page_size: 1000 }
    }

    /// Rows per page (1–1000, default 1000).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n.clamp(1, 1000);
        self
    }

    /// All rows matching `filter` (and the simple parameters `simple`) in the window,
    /// following the cursor; stops early once more than `max_traces` traces were seen.
    async fn rows(
        &self,
        keys: &LangfuseKeys,
        filter: Value,
        simple: &[(&'static str, String)],
        fields: &str,
        (from, to): (SystemTime, SystemTime),
        max_traces: Option<usize>,
    ) -> Result<Vec<Value>, ReadError> {
        let mut rows: Vec<Value> = Vec::new();
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut pairs = vec![
                ("fromStartTime", iso_millis(from)),
                ("toStartTime", iso_millis(to)),
                ("limit", self.page_size.to_string()),
                ("fields", fields.to_owned()),
                ("expandMetadata", "insertion_id,original_model,fallback_model,reason".to_owned()),
                ("filter", filter.to_string()),
            ];
            pairs.extend(simple.iter().cloned());
            if let Some(cursor) = cursor.take() {
                pairs.push(("cursor", cursor));
            }
            let url = format!("{}/api/public/v2/observations?{}", self.host, query_string(pairs));
            let Some(body) = get_json(&self.client, keys, url).await? else {
                return Err(ReadError {
                    status: Some(404),
                    message: "the v2 observations API is not available".into(),
                });
            };
            if let Some(data) = body.get("data").and_then(Value::as_array) {
                for row in data {
                    if let Some(trace_id) = string(row, "traceId") {
                        seen.insert(trace_id);
                    }
                    rows.push(row.clone());
                }
            }
            if max_traces.is_some_and(|max| seen.len() > max) {
                return Ok(rows);
            }
            match body.get("meta").and_then(|m| m.get("cursor")).and_then(Value::as_str) {
                Some(next) if !next.is_empty() => cursor = Some(next.to_owned()),
                _ => return Ok(rows),
            }
        }
    }

    /// Groups rows (newest first) into traces, in order of each trace's newest row.
    fn group(rows: Vec<Value>) -> Vec<Trace> {
        let mut order: Vec<String> = Vec::new();
        let mut groups: HashMap<String, Vec<Value>> = HashMap::new();
        for row in rows {
            let Some(trace_id) = string(&row, "traceId") else {
                continue;
            };
            let group = groups.entry(trace_id.clone()).or_insert_with(|| {
                order.push(trace_id.clone());
                Vec::new()
            });
            group.push(row);
        }
        order
            .into_iter()
            .filter_map(|id| {
                let mut rows = groups.remove(&id)?;
                rows.sort_by_key(|r| string(r, "startTime"));
                let root = rows
                    .iter()
                    .find(|r| r.get("isRootObservation").and_then(Value::as_bool) == Some(true))
                    .or_else(|| rows.iter().find(|r| r.get("parentObservationId").is_none_or(Value::is_null)))
                    .or(rows.first())?;
                let any = |key: &str| rows.iter().find_map(|r| string(r, key));
                let mut tags: Vec<String> = Vec::new();
                for r in &rows {
                    for t in r.get("tags").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
                        if !tags.iter().any(|x| x == t) {
                            tags.push(t.to_owned());
                        }
                    }
                }
                Some(Trace {
                    id,
                    name: any("traceName"),
                    user_id: any("userId"),
                    session_id: any("sessionId"),
                    tags,
                    timestamp: rfc3339(string(root, "startTime")),
                    input: parse_io(root.get("input")),
                    output: parse_io(root.get("output")),
                    metadata: root.get("metadata").cloned().unwrap_or(Value::Null),
                    observations: rows.iter().map(observation).collect(),
                })
            })
            .collect()
    }
}

/// The window to look for a trace in: around the UUIDv7 timestamp when the id is one.
fn window_for(trace_id: &str) -> (SystemTime, SystemTime) {
    if let Ok(uuid) = uuid::Uuid::parse_str(trace_id)
        && uuid.get_version_num() == 7
        && let Some(ts) = uuid.get_timestamp()
    {
        let (secs, nanos) = ts.to_unix();
        let at = UNIX_EPOCH + Duration::new(secs, nanos);
        let day = Duration::from_secs(86_400);
        return (at.checked_sub(day).unwrap_or(UNIX_EPOCH), at + day);
    }
    TraceQuery::default().window()
}

impl LangfuseReader for V4Reader {
    fn list_traces<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        query: &'a TraceQuery,
    ) -> BoxFuture<'a, Result<Vec<Trace>, ReadError>> {
        Box::pin(async move {
            let limit = query.limit.unwrap_or(usize::MAX);
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut conditions = Vec::new();
            if !query.tags.is_empty() {
                conditions
                    .push(json!({"type": "arrayOptions", "column": "tags", "operator": "all of", "value": query.tags}));
            }
            if let Some(name) = &query.name {
                conditions.push(json!({"type": "string", "column": "traceName", "operator": "=", "value": name}));
            }
            let mut simple: Vec<(&'static str, String)> = Vec::new();
            for (key, value) in [
                ("userId", &query.user_id),
                ("sessionId", &query.session_id),
                ("environment", &query.environment),
                ("version", &query.version),
            ] {
                if let Some(value) = value {
                    simple.push((key, value.clone()));
                }
            }
            // Without a tag the listing is unbounded: stop after `limit` traces. With tags every
            // row is read, so no trace comes back cut.
            let max_traces = query.tags.is_empty().then_some(limit);
            let rows = self
                .rows(
                    keys,
                    Value::Array(conditions),
                    &simple,
                    &v4_fields(query.fields.as_deref()),
                    query.window(),
                    max_traces,
                )
                .await?;
            let rows = match &query.release {
                Some(release) => {
                    let keep: std::collections::HashSet<String> = rows
                        .iter()
                        .filter(|r| string(r, "release").as_deref() == Some(release.as_str()))
                        .filter_map(|r| string(r, "traceId"))
                        .collect();
                    rows.into_iter().filter(|r| string(r, "traceId").is_some_and(|t| keep.contains(&t))).collect()
                }
                None => rows,
            };
            let mut traces = drop_shadowed_traces(Self::group(rows));
            traces.truncate(limit);
            Ok(traces)
        })
    }

    fn lists_full_traces(&self) -> bool {
        true
    }

    fn list_observations<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        selectors: &'a [ObservationSelector],
        (from, to): (SystemTime, SystemTime),
        progress: &'a (dyn Fn(usize) + Send + Sync),
    ) -> BoxFuture<'a, Result<Vec<TracedObservation>, ReadError>> {
        Box::pin(async move {
            let mut out: Vec<TracedObservation> = Vec::new();
            for selector in selectors {
                let mut cursor: Option<String> = None;
                loop {
                    let mut pairs = vec![
                        ("type", selector.kind.to_ascii_uppercase()),
                        ("fromStartTime", iso_millis(from)),
                        ("toStartTime", iso_millis(to)),
                        ("limit", self.page_size.to_string()),
                        ("fields", REPORT_FIELDS.to_owned()),
                        ("expandMetadata", REPORT_METADATA.to_owned()),
                    ];
                    if let Some(name) = &selector.name {
                        pairs.push(("name", name.clone()));
                    }
                    if let Some(cursor) = cursor.take() {
                        pairs.push(("cursor", cursor));
                    }
                    let url = format!("{}/api/public/v2/observations?{}", self.host, query_string(pairs));
                    let Some(body) = get_json(&self.client, keys, url).await? else {
                        return Err(ReadError {
                            status: Some(404),
                            message: "the v2 observations API is not available".into(),
                        });
                    };
                    for row in body.get("data").and_then(Value::as_array).into_iter().flatten() {
                        let trace_id = string(row, "traceId").unwrap_or_default();
                        out.push(TracedObservation { trace_id, observation: observation(row) });
                    }
                    progress(out.len());
                    match body.get("meta").and_then(|m| m.get("cursor")).and_then(Value::as_str) {
                        Some(next) if !next.is_empty() => cursor = Some(next.to_owned()),
                        _ => break,
                    }
                }
            }
            Ok(out)
        })
    }

    fn get_trace<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        trace_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Trace>, ReadError>> {
        Box::pin(async move {
            let id = strip_dashes(trace_id);
            let filter = json!([{"type": "string", "column": "traceId", "operator": "=", "value": id}]);
            let rows = self.rows(keys, filter, &[], V4_FIELDS, window_for(trace_id), None).await?;
            Ok(Self::group(rows).into_iter().next())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_fields_map_the_v3_names() {
        assert_eq!(v4_fields(None), V4_FIELDS);
        assert_eq!(v4_fields(Some("core")), "core,basic,trace_context,metadata");
        assert_eq!(
            v4_fields(Some("core,io,observations,scores")),
            "core,basic,trace_context,metadata,io,time,model,usage"
        );
        assert_eq!(v4_fields(Some("usage,bogus")), "core,basic,trace_context,usage");
    }

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
