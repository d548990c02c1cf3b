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

use crate::{BoxFuture, LangfuseClient, client, span::iso_millis};

/// Largest response read (Cloud caps responses at 5 MB).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// Window of a query without bounds.
const DEFAULT_WINDOW: Duration = Duration::from_secs(30 * 86_400);

/// What to list.
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
}

impl TraceQuery {
    fn window(&self) -> (SystemTime, SystemTime) {
        let to = self.to.unwrap_or_else(|| SystemTime::now() + Duration::from_secs(60));
        let from = self.from.unwrap_or_else(|| to.checked_sub(DEFAULT_WINDOW).unwrap_or(UNIX_EPOCH));
        (from, to)
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
    /// Traces carrying all of `query.tags`, newest first.
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
        start_time: string(v, "startTime"),
        end_time: string(v, "endTime"),
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
            timestamp: string(v, "timestamp"),
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
            let mut traces = Vec::new();
            let mut page = 1u64;
            loop {
                let mut pairs: Vec<(&str, String)> = query.tags.iter().map(|t| ("tags", t.clone())).collect();
                pairs.push(("page", page.to_string()));
                pairs.push(("limit", self.page_size.to_string()));
                pairs.push(("fromTimestamp", iso_millis(from)));
                pairs.push(("toTimestamp", iso_millis(to)));
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
            Ok(traces)
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

    /// All rows matching `filter` in the window, following the cursor.
    async fn rows(
        &self,
        keys: &LangfuseKeys,
        filter: Value,
        (from, to): (SystemTime, SystemTime),
    ) -> Result<Vec<Value>, ReadError> {
        let mut rows = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut pairs = vec![
                ("fromStartTime", iso_millis(from)),
                ("toStartTime", iso_millis(to)),
                ("limit", self.page_size.to_string()),
                ("fields", V4_FIELDS.to_owned()),
                ("expandMetadata", "insertion_id,original_model,fallback_model,reason".to_owned()),
                ("filter", filter.to_string()),
            ];
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
                rows.extend(data.iter().cloned());
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
                    timestamp: string(root, "startTime"),
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
            let filter = json!([{"type": "arrayOptions", "column": "tags", "operator": "all of", "value": query.tags}]);
            let rows = self.rows(keys, filter, query.window()).await?;
            let mut traces = Self::group(rows);
            traces.truncate(query.limit.unwrap_or(usize::MAX));
            Ok(traces)
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
            let rows = self.rows(keys, filter, window_for(trace_id)).await?;
            Ok(Self::group(rows).into_iter().next())
        })
    }
}
