//! A Langfuse stand-in (spec `langfuse.md` §10): OTLP/HTTP ingestion plus the v3 and v4 read
//! endpoints, on an ephemeral loopback port, with fault switches. Test code only.
//!
//! ```no_run
//! # async fn f() {
//! use llmgate_test_support::langfuse::{LangfuseStandIn, Fault};
//! let lf = LangfuseStandIn::start().await;
//! lf.add_project("p1", "pk-lf-1", "sk-lf-1");
//! lf.set_fault(Fault::Status(503));
//! // ... export ...
//! lf.set_fault(Fault::None);
//! lf.wait_for(|s| s.observations("p1").len() == 2).await;
//! # }
//! ```

#![allow(clippy::result_large_err, clippy::collapsible_if)]

use std::{
    collections::HashMap,
    convert::Infallible,
    io::Read as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, TimeZone as _, Utc};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value as AV},
    trace::v1::status::StatusCode as OtelStatus,
};
use prost::Message as _;
use serde_json::{Map, Value, json};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle, time::Instant};

/// What the ingestion endpoint does instead of its job.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Work normally.
    #[default]
    None,
    /// Answer this status with a JSON message.
    Status(u16),
    /// Answer 429 with `Retry-After: <secs>` and Langfuse's rate-limit body.
    RateLimited { retry_after_secs: u64 },
    /// Never answer.
    Hang,
}

/// One stored observation, after Langfuse's attribute mapping.
#[derive(Clone, Debug)]
pub struct StoredObservation {
    pub project_id: String,
    pub trace_id: String,
    pub id: String,
    pub parent_observation_id: Option<String>,
    /// `SPAN`, `GENERATION`, `EVENT`, …
    pub kind: String,
    pub name: String,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    pub completion_start_time: Option<String>,
    pub level: String,
    pub status_message: Option<String>,
    pub input: Option<String>,
    pub output: Option<String>,
    pub model: Option<String>,
    pub model_parameters: Option<Value>,
    pub usage_details: Map<String, Value>,
    pub cost_details: Map<String, Value>,
    pub metadata: Map<String, Value>,
    pub trace_name: Option<String>,
    pub tags: Vec<String>,
    pub trace_metadata: Map<String, Value>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub environment: String,
    pub release: Option<String>,
    pub version: Option<String>,
    /// The raw span attributes as JSON (arrays stay arrays), to check the wire shape.
    pub attributes: Map<String, Value>,
    /// `langfuse.internal.as_root="true"`: a root for the trace's fields although it has a parent.
    pub as_root: bool,
    pub visible_at: Instant,
}

impl StoredObservation {
    /// A span with no parent, or one marked `langfuse.internal.as_root="true"` (spec §4).
    pub fn is_root(&self) -> bool {
        self.parent_observation_id.is_none() || self.as_root
    }
}

/// A received export request (accepted or not).
#[derive(Clone, Debug)]
pub struct ExportRecord {
    pub status: u16,
    pub at: Instant,
    pub content_type: String,
    pub gzip: bool,
    pub ingestion_version: Option<String>,
    pub sdk_name: Option<String>,
    pub project_id: Option<String>,
    pub spans: usize,
}

/// What the stand-in holds; read it with [`LangfuseStandIn::state`] or [`LangfuseStandIn::wait_for`].
#[derive(Default, Debug)]
pub struct State {
    projects: Vec<(String, String, String)>,
    pub stored: Vec<StoredObservation>,
    pub exports: Vec<ExportRecord>,
}

impl State {
    /// Observations of `project_id` (visible or not), in arrival order.
    pub fn observations(&self, project_id: &str) -> Vec<&StoredObservation> {
        self.stored.iter().filter(|o| o.project_id == project_id).collect()
    }

    /// Export requests that reached the ingestion endpoint.
    pub fn export_requests(&self) -> usize {
        self.exports.len()
    }

    /// Export requests answered 200.
    pub fn accepted_exports(&self) -> usize {
        self.exports.iter().filter(|e| e.status == 200).count()
    }
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    fault: Mutex<Fault>,
    visibility_delay: Mutex<Duration>,
    /// Bumped to close every open connection.
    connections: watch::Sender<u64>,
}

impl Shared {
    fn touch(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// The stand-in server.
pub struct LangfuseStandIn {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for LangfuseStandIn {
    fn drop(&mut self) {
        if let Some(task) = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        self.shared.connections.send_modify(|v| *v += 1);
    }
}

impl LangfuseStandIn {
    /// Starts on `127.0.0.1:0`.
    pub async fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind the Langfuse stand-in")
    }

    /// Starts on `addr` (port 0 picks one).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            fault: Mutex::new(Fault::None),
            visibility_delay: Mutex::new(Duration::ZERO),
            connections: watch::channel(0).0,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self { addr, shared, accept: Mutex::new(Some(accept)) })
    }

    /// `http://127.0.0.1:<port>` (the `LANGFUSE_HOST`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers a project and its key pair.
    pub fn add_project(&self, id: &str, public_key: &str, secret_key: &str) {
        self.lock().projects.push((id.into(), public_key.into(), secret_key.into()));
    }

    /// Switches the ingestion endpoint's behaviour.
    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
        self.shared.touch();
    }

    /// Data becomes readable this long after ingestion.
    pub fn set_visibility_delay(&self, delay: Duration) {
        *self.shared.visibility_delay.lock().unwrap_or_else(|p| p.into_inner()) = delay;
    }

    /// Stops listening and closes every open connection: clients get "connection refused".
    pub fn refuse(&self) {
        if let Some(task) = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
        self.shared.connections.send_modify(|v| *v += 1);
    }

    /// Listens again on the same port.
    pub async fn resume(&self) {
        let mut slot = self.accept.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return;
        }
        // The aborted accept task drops its listener at its next poll; retry until the port is free.
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        *slot = Some(tokio::spawn(accept_loop(listener, self.shared.clone())));
    }

    /// Locks the state.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state.
    pub fn state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock())
    }

    /// Waits until `cond` holds (checked on every change), panicking after 30 s.
    pub async fn wait_for(&self, mut cond: impl FnMut(&State) -> bool) {
        let mut rx = self.shared.changed.subscribe();
        let wait = async {
            loop {
                if cond(&self.lock()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), wait).await.is_err() {
            panic!("Langfuse stand-in: condition not met within 30 s; state: {:#?}", self.lock().exports);
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let mut closed = shared.connections.subscribe();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = closed.changed() => {}
            }
        });
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("ct"));
    r
}

fn message(status: StatusCode, text: impl Into<String>) -> Response<Full<Bytes>> {
    json_response(status, json!({"message": text.into()}))
}

/// The project of a Basic auth header.
fn authenticate(state: &State, req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (pk, sk) = decoded.split_once(':')?;
    state.projects.iter().find(|(_, p, s)| p == pk && s == sk).map(|(id, _, _)| id.clone())
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let project = authenticate(&shared.state.lock().unwrap_or_else(|p| p.into_inner()), &req);
    match (req.method(), path.as_str()) {
        (&Method::POST, "/api/public/otel/v1/traces") => ingest(shared, req, project).await,
        (&Method::GET, p) if p.starts_with("/api/public/") => {
            let Some(project) = project else {
                return message(
                    StatusCode::UNAUTHORIZED,
                    "Invalid credentials. Confirm that you've configured the correct host.",
                );
            };
            let query: Vec<(String, String)> = req
                .uri()
                .query()
                .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                .unwrap_or_default();
            let state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let visible: Vec<&StoredObservation> =
                state.stored.iter().filter(|o| o.project_id == project && o.visible_at <= now).collect();
            let result = if p == "/api/public/traces" {
                v3_list(&visible, &query)
            } else if let Some(id) = p.strip_prefix("/api/public/traces/") {
                v3_get(&visible, id)
            } else if p == "/api/public/v2/observations" {
                v4_observations(&visible, &query)
            } else {
                Err(message(StatusCode::NOT_FOUND, "Route not found"))
            };
            result.unwrap_or_else(|e| e)
        }
        _ => message(StatusCode::NOT_FOUND, "Route not found"),
    }
}

// === ingestion ===

async fn ingest(shared: &Shared, req: Request<Incoming>, project: Option<String>) -> Response<Full<Bytes>> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut record = ExportRecord {
        status: 0,
        at: Instant::now(),
        content_type: header("content-type").unwrap_or_default(),
        gzip: header("content-encoding").is_some_and(|e| e.eq_ignore_ascii_case("gzip")),
        ingestion_version: header("x-langfuse-ingestion-version"),
        sdk_name: header("x-langfuse-sdk-name"),
        project_id: project.clone(),
        spans: 0,
    };
    let fault = shared.fault.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let answer = |shared: &Shared, mut record: ExportRecord, response: Response<Full<Bytes>>| {
        record.status = response.status().as_u16();
        shared.state.lock().unwrap_or_else(|p| p.into_inner()).exports.push(record);
        shared.touch();
        response
    };
    match fault {
        Fault::None => {}
        Fault::Hang => {
            record.status = 0;
            shared.state.lock().unwrap_or_else(|p| p.into_inner()).exports.push(record.clone());
            shared.touch();
            std::future::pending::<()>().await;
        }
        Fault::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return answer(shared, record, message(status, "stand-in fault"));
        }
        Fault::RateLimited { retry_after_secs } => {
            let mut r = json_response(
                StatusCode::TOO_MANY_REQUESTS,
                json!({"message": "Rate limit exceeded", "code": "rate_limited",
                       "details": {"retryAfterSeconds": retry_after_secs, "limit": 1000, "remaining": 0}}),
            );
            r.headers_mut().insert(header::RETRY_AFTER, retry_after_secs.to_string().parse().expect("ra"));
            return answer(shared, record, r);
        }
    }
    let Some(project) = project else {
        return answer(shared, record, message(StatusCode::UNAUTHORIZED, "Invalid credentials"));
    };
    if let Some(v) = &record.ingestion_version {
        match v.trim().parse::<u32>() {
            Ok(n) if n <= 4 => {}
            _ => {
                return answer(
                    shared,
                    record,
                    message(StatusCode::BAD_REQUEST, "Invalid x-langfuse-ingestion-version header"),
                );
            }
        }
    }
    let json_body = if record.content_type.starts_with("application/x-protobuf") {
        false
    } else if record.content_type.starts_with("application/json") {
        true
    } else {
        return answer(shared, record, message(StatusCode::BAD_REQUEST, "Unsupported content type"));
    };
    let Ok(body) = req.into_body().collect().await.map(|c| c.to_bytes()) else {
        return answer(shared, record, message(StatusCode::BAD_REQUEST, "Failed to read body"));
    };
    let body = if record.gzip {
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut out).is_err() {
            return answer(shared, record, message(StatusCode::BAD_REQUEST, "Failed to decompress body"));
        }
        Bytes::from(out)
    } else {
        body
    };
    let parsed = if json_body {
        decode_json(&body)
    } else {
        ExportTraceServiceRequest::decode(&body[..]).map_err(|e| e.to_string())
    };
    let request = match parsed {
        Ok(r) => r,
        Err(e) => {
            return answer(shared, record, message(StatusCode::BAD_REQUEST, format!("Failed to parse request: {e}")));
        }
    };
    let visible_at = Instant::now() + *shared.visibility_delay.lock().unwrap_or_else(|p| p.into_inner());
    let observations = match map_request(&project, &request, visible_at) {
        Ok(o) => o,
        Err(e) => return answer(shared, record, message(StatusCode::BAD_REQUEST, e)),
    };
    record.spans = observations.len();
    record.status = 200;
    {
        let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
        state.stored.extend(observations);
        state.exports.push(record);
    }
    shared.touch();
    json_response(StatusCode::OK, json!({}))
}

/// OTLP/JSON: rejects non-array `attributes`/`events`, then decodes with the proto types.
fn decode_json(body: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    for rs in value.get("resourceSpans").and_then(Value::as_array).into_iter().flatten() {
        for ss in rs.get("scopeSpans").and_then(Value::as_array).into_iter().flatten() {
            for span in ss.get("spans").and_then(Value::as_array).into_iter().flatten() {
                for key in ["attributes", "events"] {
                    if span.get(key).is_some_and(|a| !a.is_array()) {
                        return Err(format!("span {key} must be an array"));
                    }
                }
            }
        }
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

fn any_to_json(v: &AnyValue) -> Value {
    match &v.value {
        Some(AV::StringValue(s)) => Value::String(s.clone()),
        Some(AV::BoolValue(b)) => Value::Bool(*b),
        Some(AV::IntValue(i)) => json!(i),
        Some(AV::DoubleValue(d)) => json!(d),
        Some(AV::ArrayValue(a)) => Value::Array(a.values.iter().map(any_to_json).collect()),
        Some(AV::KvlistValue(kv)) => {
            // Langfuse turns kvlists into JSON strings.
            let map: Map<String, Value> = kv
                .values
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(Value::Null, any_to_json)))
                .collect();
            Value::String(Value::Object(map).to_string())
        }
        Some(AV::BytesValue(b)) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        _ => Value::Null,
    }
}

fn attrs_to_map(attrs: &[KeyValue]) -> Map<String, Value> {
    attrs
        .iter()
        .filter(|kv| !kv.key.split('.').any(|seg| matches!(seg, "__proto__" | "constructor" | "prototype")))
        .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(Value::Null, any_to_json)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn nanos_to_time(n: u64) -> DateTime<Utc> {
    // Millisecond precision, as Langfuse stores.
    Utc.timestamp_millis_opt((n / 1_000_000) as i64).single().unwrap_or_default()
}

fn tags_of(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a.iter().map(|t| t.as_str().map_or_else(|| t.to_string(), str::to_owned)).collect(),
        Value::String(s) if s.starts_with('[') => {
            serde_json::from_str::<Vec<String>>(s).unwrap_or_else(|_| vec![s.clone()])
        }
        Value::String(s) if s.contains(',') => s.split(',').map(|t| t.trim().to_owned()).collect(),
        Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

fn normalise_environment(env: &str) -> String {
    let lower = env.to_lowercase();
    let stripped = lower.strip_prefix("langfuse-").or_else(|| lower.strip_prefix("langfuse_")).unwrap_or(&lower);
    let cut: String = stripped.chars().take(40).collect();
    if !cut.is_empty() && cut.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_') {
        cut
    } else {
        "default".into()
    }
}

/// Langfuse's `hasMeaningfulValue`: not null, not "", not an empty array or object.
fn meaningful(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

/// Langfuse's `ObservationTypeMapperRegistry`, in priority order: `langfuse.observation.type`,
/// OpenInference `openinference.span.kind`, `gen_ai.operation.name`, GenAI tool attributes,
/// then any model attribute (→ generation); otherwise a span.
fn observation_type(a: &Map<String, Value>) -> String {
    let mapped = |key: &str, table: &[(&str, &str)]| {
        let value = a.get(key).and_then(Value::as_str)?;
        table.iter().find(|(seen, _)| *seen == value).map(|(_, ty)| (*ty).to_owned())
    };
    const LANGFUSE: &[(&str, &str)] = &[
        ("span", "SPAN"),
        ("generation", "GENERATION"),
        ("event", "EVENT"),
        ("embedding", "EMBEDDING"),
        ("agent", "AGENT"),
        ("tool", "TOOL"),
        ("chain", "CHAIN"),
        ("retriever", "RETRIEVER"),
        ("guardrail", "GUARDRAIL"),
        ("evaluator", "EVALUATOR"),
    ];
    const OPENINFERENCE: &[(&str, &str)] = &[
        ("CHAIN", "CHAIN"),
        ("RETRIEVER", "RETRIEVER"),
        ("LLM", "GENERATION"),
        ("EMBEDDING", "EMBEDDING"),
        ("AGENT", "AGENT"),
        ("TOOL", "TOOL"),
        ("GUARDRAIL", "GUARDRAIL"),
        ("EVALUATOR", "EVALUATOR"),
    ];
    const GEN_AI_OPERATION: &[(&str, &str)] = &[
        ("chat", "GENERATION"),
        ("completion", "GENERATION"),
        ("text_completion", "GENERATION"),
        ("generate_content", "GENERATION"),
        ("generate", "GENERATION"),
        ("embeddings", "EMBEDDING"),
        ("invoke_agent", "AGENT"),
        ("create_agent", "AGENT"),
        ("execute_tool", "TOOL"),
    ];
    if let Some(ty) = mapped("langfuse.observation.type", LANGFUSE)
        .or_else(|| mapped("openinference.span.kind", OPENINFERENCE))
        .or_else(|| mapped("gen_ai.operation.name", GEN_AI_OPERATION))
    {
        return ty;
    }
    if meaningful(a.get("gen_ai.tool.name")) || meaningful(a.get("gen_ai.tool.call.id")) {
        return "TOOL".into();
    }
    const MODEL_KEYS: &[&str] = &[
        "langfuse.observation.model.name",
        "gen_ai.request.model",
        "gen_ai.response.model",
        "llm.model_name",
        "model",
    ];
    if MODEL_KEYS.iter().any(|k| meaningful(a.get(*k))) {
        return "GENERATION".into();
    }
    "SPAN".into()
}

/// A value as Langfuse reads it into a string field: strings as they are, others as JSON.
fn as_text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

/// The first of `keys` whose value is meaningful, as text.
fn first_text(a: &Map<String, Value>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| a.get(*k).filter(|v| meaningful(Some(v))).map(as_text))
}

/// Input/output: `langfuse.observation.*` (or `langfuse.trace.*` on a root), then the
/// OpenInference `input.value`/`output.value`, then OTel GenAI `gen_ai.input.messages` /
/// `gen_ai.output.messages`. The pair comes from the first source that has either.
fn input_output(a: &Map<String, Value>, root: bool) -> (Option<String>, Option<String>) {
    let get = |k: &str| a.get(k).filter(|v| meaningful(Some(v))).map(as_text);
    let mut sources: Vec<(&str, &str)> = Vec::new();
    if root {
        let input = get("langfuse.trace.input").or_else(|| get("langfuse.observation.input"));
        let output = get("langfuse.trace.output").or_else(|| get("langfuse.observation.output"));
        if input.is_some() || output.is_some() {
            return (input, output);
        }
    } else {
        sources.push(("langfuse.observation.input", "langfuse.observation.output"));
    }
    sources.push(("input.value", "output.value"));
    sources.push(("gen_ai.input.messages", "gen_ai.output.messages"));
    for (i, o) in sources {
        let (input, output) = (get(i), get(o));
        if input.is_some() || output.is_some() {
            return (input, output);
        }
    }
    (None, None)
}

/// `langfuse.observation.usage_details` (a JSON object string), else `gen_ai.usage.*` (not
/// `.cost`) and `llm.token_count.*`, with `prompt_tokens`/`input_tokens`/`prompt` → `input`,
/// `completion_tokens`/`output_tokens`/`completion` → `output`, `total_tokens` → `total`.
fn usage_details(a: &Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Object(m)) =
        a.get("langfuse.observation.usage_details").and_then(Value::as_str).and_then(|j| serde_json::from_str(j).ok())
    {
        return m;
    }
    let mut out = Map::new();
    for (k, v) in a {
        let Some(key) = k
            .strip_prefix("gen_ai.usage.")
            .filter(|rest| *rest != "cost")
            .or_else(|| k.strip_prefix("llm.token_count."))
        else {
            continue;
        };
        let key = match key {
            "prompt_tokens" | "input_tokens" | "prompt" => "input",
            "completion_tokens" | "output_tokens" | "completion" => "output",
            "total_tokens" => "total",
            other => other,
        };
        let number = match v {
            Value::Number(n) => Some(n.clone()),
            Value::String(s) => s.trim().parse::<f64>().ok().and_then(serde_json::Number::from_f64),
            _ => None,
        };
        if let Some(n) = number {
            let n = match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => json!(f as i64),
                _ => Value::Number(n),
            };
            out.insert(key.into(), n);
        }
    }
    out
}

/// `langfuse.observation.model.parameters`, else OpenInference's `llm.invocation_parameters`
/// (both JSON object strings), else `gen_ai.request.*` (not `.model`); values other than
/// strings and numbers become JSON strings, as Langfuse keeps them.
fn model_parameters(a: &Map<String, Value>) -> Option<Value> {
    let sanitise = |m: Map<String, Value>| {
        Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let v = if v.is_string() || v.is_number() { v } else { Value::String(v.to_string()) };
                    (k, v)
                })
                .collect(),
        )
    };
    for key in ["langfuse.observation.model.parameters", "llm.invocation_parameters"] {
        if let Some(Value::Object(m)) = a.get(key).and_then(Value::as_str).and_then(|j| serde_json::from_str(j).ok()) {
            return Some(sanitise(m));
        }
    }
    let from_request: Map<String, Value> = a
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("gen_ai.request.").filter(|p| *p != "model").map(|p| (p.into(), v.clone())))
        .collect();
    (!from_request.is_empty()).then(|| sanitise(from_request))
}

/// Attribute keys that Langfuse consumes as input/output and so leaves out of
/// `metadata.attributes`.
fn is_io_attribute(k: &str) -> bool {
    matches!(k, "input.value" | "output.value" | "gen_ai.input.messages" | "gen_ai.output.messages")
        || ["gen_ai.prompt", "gen_ai.completion", "llm.input_messages", "llm.output_messages"]
            .iter()
            .any(|p| k.starts_with(p))
}

/// Langfuse's attribute mapping (spec §4), for the attributes llmgate and common SDKs use,
/// LiteLLM's `langfuse_otel` (OpenInference `llm.*` attributes) included.
fn map_request(
    project: &str,
    request: &ExportTraceServiceRequest,
    visible_at: Instant,
) -> Result<Vec<StoredObservation>, String> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let resource = rs.resource.as_ref().map(|r| attrs_to_map(&r.attributes)).unwrap_or_default();
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                if span.trace_id.len() != 16 || span.trace_id.iter().all(|b| *b == 0) {
                    return Err("Invalid traceId".into());
                }
                if span.span_id.len() != 8 || span.span_id.iter().all(|b| *b == 0) {
                    return Err("Invalid spanId".into());
                }
                let a = attrs_to_map(&span.attributes);
                let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_owned);
                let first = |keys: &[&str]| keys.iter().find_map(|k| s(k));
                let parent = (!span.parent_span_id.is_empty()).then(|| hex(&span.parent_span_id));
                let as_root = a.get("langfuse.internal.as_root").is_some_and(|v| as_text(v) == "true");
                let is_root = parent.is_none() || as_root;
                let kind = observation_type(&a);
                let mut metadata = Map::new();
                if let Some(Value::Object(m)) =
                    s("langfuse.observation.metadata").and_then(|j| serde_json::from_str(&j).ok())
                {
                    metadata.extend(m);
                }
                let mut trace_metadata = Map::new();
                for key in ["langfuse.trace.metadata", "langfuse.metadata"] {
                    if let Some(Value::Object(m)) = s(key).and_then(|j| serde_json::from_str(&j).ok()) {
                        trace_metadata.extend(m);
                        break;
                    }
                }
                let mut unmapped = Map::new();
                for (k, v) in &a {
                    if let Some(key) = k.strip_prefix("langfuse.observation.metadata.") {
                        metadata.insert(key.into(), v.clone());
                    } else if let Some(key) = k
                        .strip_prefix("langfuse.trace.metadata.")
                        .or_else(|| k.strip_prefix("langfuse.metadata."))
                        .or_else(|| {
                            k.strip_prefix("ai.telemetry.metadata.")
                                .filter(|key| !matches!(*key, "userId" | "sessionId" | "tags" | "langfusePrompt"))
                        })
                    {
                        trace_metadata.insert(key.into(), v.clone());
                    } else if !k.starts_with("langfuse.")
                        && !matches!(k.as_str(), "user.id" | "session.id")
                        && !is_io_attribute(k)
                    {
                        unmapped.insert(k.clone(), v.clone());
                    }
                }
                if !unmapped.is_empty() {
                    metadata.insert("attributes".into(), Value::Object(unmapped));
                }
                if !resource.is_empty() {
                    metadata.insert("resourceAttributes".into(), Value::Object(resource.clone()));
                }
                let tags = [
                    "langfuse.trace.tags",
                    "langfuse.tags",
                    "langfuse.observation.metadata.langfuse_tags",
                    "langfuse.trace.metadata.langfuse_tags",
                    "ai.telemetry.metadata.tags",
                    "tag.tags",
                ]
                .iter()
                .find_map(|k| a.get(*k).filter(|v| meaningful(Some(v))))
                .map(tags_of)
                .unwrap_or_default();
                let (input, output) = input_output(&a, is_root);
                let json_obj = |k: &str| match s(k).and_then(|j| serde_json::from_str::<Value>(&j).ok()) {
                    Some(Value::Object(m)) => m,
                    _ => Map::new(),
                };
                let mut cost_details = json_obj("langfuse.observation.cost_details");
                if cost_details.is_empty() {
                    if let Some(c) = a.get("gen_ai.usage.cost").or_else(|| a.get("llm.cost.total")) {
                        cost_details.insert("total".into(), c.clone());
                    }
                }
                let status = span.status.as_ref();
                let level = s("langfuse.observation.level").unwrap_or_else(|| {
                    if status.is_some_and(|st| st.code == OtelStatus::Error as i32) {
                        "ERROR".into()
                    } else {
                        "DEFAULT".into()
                    }
                });
                let status_message = s("langfuse.observation.status_message")
                    .or_else(|| status.map(|st| st.message.clone()).filter(|m| !m.is_empty()));
                let resource_str = |k: &str| resource.get(k).and_then(Value::as_str).map(str::to_owned);
                let environment =
                    first(&["langfuse.environment", "deployment.environment.name", "deployment.environment"])
                        .or_else(|| resource_str("deployment.environment.name"))
                        .or_else(|| resource_str("deployment.environment"))
                        .map_or_else(|| "default".into(), |e| normalise_environment(&e));
                let (start, end) = match (span.start_time_unix_nano, span.end_time_unix_nano) {
                    (0, 0) => (0, 0),
                    (0, e) => (e, e),
                    (st, 0) => (st, st),
                    (st, e) => (st, e),
                };
                out.push(StoredObservation {
                    project_id: project.into(),
                    trace_id: hex(&span.trace_id),
                    id: hex(&span.span_id),
                    parent_observation_id: parent,
                    kind,
                    name: span.name.clone(),
                    start_time: nanos_to_time(start),
                    end_time: nanos_to_time(end),
                    completion_start_time: s("langfuse.observation.completion_start_time"),
                    level,
                    status_message,
                    input,
                    output,
                    model: first_text(
                        &a,
                        &[
                            "langfuse.observation.model.name",
                            "gen_ai.response.model",
                            "ai.model.id",
                            "gen_ai.request.model",
                            "llm.response.model",
                            "llm.model_name",
                            "model",
                        ],
                    ),
                    model_parameters: model_parameters(&a),
                    usage_details: usage_details(&a),
                    cost_details,
                    metadata,
                    trace_name: s("langfuse.trace.name").or_else(|| is_root.then(|| span.name.clone())),
                    tags,
                    trace_metadata,
                    user_id: first_text(
                        &a,
                        &[
                            "langfuse.user.id",
                            "user.id",
                            "langfuse.observation.metadata.langfuse_user_id",
                            "langfuse.trace.metadata.langfuse_user_id",
                            "ai.telemetry.metadata.userId",
                        ],
                    ),
                    session_id: first_text(
                        &a,
                        &[
                            "langfuse.session.id",
                            "session.id",
                            "gen_ai.conversation.id",
                            "langfuse.observation.metadata.langfuse_session_id",
                            "langfuse.trace.metadata.langfuse_session_id",
                            "ai.telemetry.metadata.sessionId",
                        ],
                    ),
                    environment,
                    release: s("langfuse.release").or_else(|| resource_str("langfuse.release")),
                    version: s("langfuse.version").or_else(|| resource_str("service.version")),
                    attributes: a,
                    as_root,
                    visible_at,
                });
            }
        }
    }
    Ok(out)
}

// === read endpoints ===

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_time(v: &str) -> Result<DateTime<Utc>, Response<Full<Bytes>>> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| message(StatusCode::BAD_REQUEST, format!("Invalid datetime: {v}")))
}

fn io_value(s: &Option<String>) -> Value {
    match s {
        Some(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
        None => Value::Null,
    }
}

fn cost_total(o: &StoredObservation) -> f64 {
    o.cost_details.get("total").and_then(Value::as_f64).unwrap_or(0.0)
}

/// A trace assembled from its observations (root first).
struct TraceView<'a> {
    id: String,
    obs: Vec<&'a StoredObservation>,
}

impl TraceView<'_> {
    fn root(&self) -> Option<&StoredObservation> {
        self.obs.iter().copied().find(|o| o.is_root())
    }
    fn timestamp(&self) -> DateTime<Utc> {
        self.root().map(|r| r.start_time).or_else(|| self.obs.iter().map(|o| o.start_time).min()).unwrap_or_default()
    }
    fn first<T>(&self, f: impl Fn(&StoredObservation) -> Option<T>) -> Option<T> {
        self.root().and_then(&f).or_else(|| self.obs.iter().find_map(|o| f(o)))
    }
    fn tags(&self) -> Vec<String> {
        let mut tags: Vec<String> = Vec::new();
        for o in &self.obs {
            for t in &o.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
        tags
    }
    fn json(&self, full: bool) -> Value {
        let mut metadata = Map::new();
        for o in &self.obs {
            for (k, v) in &o.trace_metadata {
                metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let end = self.obs.iter().map(|o| o.end_time).max().unwrap_or_default();
        let ts0 = self.timestamp();
        let observations: Vec<Value> = if full {
            self.obs.iter().map(|o| v3_observation(o)).collect()
        } else {
            self.obs.iter().map(|o| Value::String(o.id.clone())).collect()
        };
        json!({
            "id": self.id,
            "projectId": self.obs.first().map(|o| o.project_id.clone()),
            "timestamp": ts(&ts0),
            "name": self.first(|o| o.trace_name.clone()),
            "input": self.root().map_or(Value::Null, |r| io_value(&r.input)),
            "output": self.root().map_or(Value::Null, |r| io_value(&r.output)),
            "sessionId": self.first(|o| o.session_id.clone()),
            "release": self.first(|o| o.release.clone()),
            "version": self.first(|o| o.version.clone()),
            "userId": self.first(|o| o.user_id.clone()),
            "metadata": metadata,
            "tags": self.tags(),
            "public": false,
            "bookmarked": false,
            "environment": self.first(|o| Some(o.environment.clone())).unwrap_or_else(|| "default".into()),
            "htmlPath": format!("/project/x/traces/{}", self.id),
            "latency": (end - ts0).num_milliseconds() as f64 / 1000.0,
            "totalCost": self.obs.iter().map(|o| cost_total(o)).sum::<f64>(),
            "observations": observations,
            "scores": [],
            "createdAt": ts(&ts0),
            "updatedAt": ts(&ts0),
            "externalId": null,
        })
    }
}

fn v3_observation(o: &StoredObservation) -> Value {
    let u = |k: &str| o.usage_details.get(k).and_then(Value::as_u64).unwrap_or(0);
    json!({
        "id": o.id, "traceId": o.trace_id, "type": o.kind, "name": o.name,
        "startTime": ts(&o.start_time), "endTime": ts(&o.end_time),
        "completionStartTime": o.completion_start_time, "model": o.model,
        "modelParameters": o.model_parameters, "input": io_value(&o.input), "output": io_value(&o.output),
        "metadata": o.metadata, "version": o.version,
        "usage": {"input": u("input"), "output": u("output"), "total": u("total"), "unit": "TOKENS"},
        "usageDetails": o.usage_details, "costDetails": o.cost_details,
        "level": o.level, "statusMessage": o.status_message, "parentObservationId": o.parent_observation_id,
        "promptId": null, "promptName": null, "promptVersion": null, "environment": o.environment,
        "modelId": null, "inputPrice": null, "outputPrice": null, "totalPrice": null,
        "calculatedInputCost": o.cost_details.get("input"), "calculatedOutputCost": o.cost_details.get("output"),
        "calculatedTotalCost": o.cost_details.get("total"),
        "latency": (o.end_time - o.start_time).num_milliseconds() as f64 / 1000.0,
        "timeToFirstToken": null,
    })
}

fn group_traces<'a>(obs: &[&'a StoredObservation]) -> Vec<TraceView<'a>> {
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Vec<&'a StoredObservation>> = HashMap::new();
    for o in obs {
        groups
            .entry(o.trace_id.clone())
            .or_insert_with(|| {
                order.push(o.trace_id.clone());
                Vec::new()
            })
            .push(o);
    }
    order.into_iter().map(|id| TraceView { obs: groups.remove(&id).unwrap_or_default(), id }).collect()
}

type Reply = Result<Response<Full<Bytes>>, Response<Full<Bytes>>>;

fn v3_list(obs: &[&StoredObservation], query: &[(String, String)]) -> Reply {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    let page: usize =
        get("page").map_or(Ok(1), str::parse).map_err(|_| message(StatusCode::BAD_REQUEST, "Invalid page"))?;
    let limit: usize =
        get("limit").map_or(Ok(50), str::parse).map_err(|_| message(StatusCode::BAD_REQUEST, "Invalid limit"))?;
    if page == 0 || limit == 0 || limit > 100 {
        return Err(message(StatusCode::BAD_REQUEST, "page must be >= 1 and limit 1-100"));
    }
    let mut tags: Vec<String> = Vec::new();
    let tag_values: Vec<&str> = query.iter().filter(|(k, _)| k == "tags").map(|(_, v)| v.as_str()).collect();
    if tag_values.len() == 1 {
        tags.extend(tag_values[0].split(',').map(str::to_owned));
    } else {
        tags.extend(tag_values.iter().map(|s| (*s).to_owned()));
    }
    let from = get("fromTimestamp").map(parse_time).transpose()?;
    let to = get("toTimestamp").map(parse_time).transpose()?;
    let mut traces: Vec<TraceView<'_>> = group_traces(obs)
        .into_iter()
        .filter(|t| {
            let tt = t.tags();
            tags.iter().all(|x| tt.contains(x))
                && from.is_none_or(|f| t.timestamp() >= f)
                && to.is_none_or(|e| t.timestamp() < e)
                && get("userId").is_none_or(|u| t.first(|o| o.user_id.clone()).as_deref() == Some(u))
                && get("sessionId").is_none_or(|u| t.first(|o| o.session_id.clone()).as_deref() == Some(u))
                && get("name").is_none_or(|u| t.first(|o| o.trace_name.clone()).as_deref() == Some(u))
        })
        .collect();
    let (field, desc) = match get("orderBy") {
        None => ("timestamp", true),
        Some(o) => match o.rsplit_once('.') {
            Some((f, "asc")) => (f, false),
            Some((f, "desc")) => (f, true),
            _ => return Err(message(StatusCode::BAD_REQUEST, "Invalid orderBy")),
        },
    };
    match field {
        "timestamp" => traces.sort_by_key(|t| t.timestamp()),
        "id" => traces.sort_by(|a, b| a.id.cmp(&b.id)),
        "name" => traces.sort_by_key(|t| t.first(|o| o.trace_name.clone())),
        "userId" => traces.sort_by_key(|t| t.first(|o| o.user_id.clone())),
        "sessionId" => traces.sort_by_key(|t| t.first(|o| o.session_id.clone())),
        _ => return Err(message(StatusCode::BAD_REQUEST, "Invalid orderBy field")),
    }
    if desc {
        traces.reverse();
    }
    let total = traces.len();
    let data: Vec<Value> = traces.iter().skip((page - 1) * limit).take(limit).map(|t| t.json(false)).collect();
    Ok(json_response(
        StatusCode::OK,
        json!({"data": data, "meta": {"page": page, "limit": limit, "totalItems": total, "totalPages": total.div_ceil(limit)}}),
    ))
}

fn v3_get(obs: &[&StoredObservation], id: &str) -> Reply {
    let mine: Vec<&StoredObservation> = obs.iter().copied().filter(|o| o.trace_id == id).collect();
    if mine.is_empty() {
        return Err(message(StatusCode::NOT_FOUND, format!("Trace {id} not found within authorized project")));
    }
    let view = TraceView { id: id.into(), obs: mine };
    Ok(json_response(StatusCode::OK, view.json(true)))
}

const GROUPS: &[&str] =
    &["core", "basic", "time", "io", "metadata", "model", "usage", "prompt", "metrics", "trace_context"];

fn v4_row(o: &StoredObservation, groups: &[&str]) -> Value {
    let mut row = json!({
        "id": o.id, "traceId": o.trace_id, "startTime": ts(&o.start_time), "endTime": ts(&o.end_time),
        "projectId": o.project_id, "parentObservationId": o.parent_observation_id, "type": o.kind,
        "modelId": null, "inputPrice": null, "outputPrice": null, "totalPrice": null,
    });
    let Some(map) = row.as_object_mut() else {
        return row;
    };
    let mut add = |v: Value| {
        if let Value::Object(m) = v {
            map.extend(m);
        }
    };
    for g in groups {
        match *g {
            "basic" => add(json!({"name": o.name, "level": o.level, "statusMessage": o.status_message,
                "version": o.version, "environment": o.environment, "bookmarked": false, "public": false,
                "userId": o.user_id, "sessionId": o.session_id, "isRootObservation": o.is_root()})),
            "time" => add(json!({"completionStartTime": o.completion_start_time,
                "createdAt": ts(&o.start_time), "updatedAt": ts(&o.end_time)})),
            "io" => add(json!({"input": o.input, "output": o.output})),
            "metadata" => add(json!({"metadata": o.metadata})),
            "model" => add(
                json!({"providedModelName": o.model, "internalModelId": null, "modelParameters": o.model_parameters}),
            ),
            "usage" => add(json!({"usageDetails": o.usage_details, "costDetails": o.cost_details,
                "totalCost": cost_total(o), "usagePricingTierName": null})),
            "prompt" => add(json!({"promptId": null, "promptName": null, "promptVersion": null})),
            "metrics" => add(
                json!({"latency": (o.end_time - o.start_time).num_milliseconds() as f64 / 1000.0, "timeToFirstToken": null}),
            ),
            "trace_context" => add(json!({"tags": o.tags, "release": o.release, "traceName": o.trace_name})),
            _ => {}
        }
    }
    row
}

fn column_string(o: &StoredObservation, column: &str) -> Option<Option<String>> {
    Some(match column {
        "id" => Some(o.id.clone()),
        "type" => Some(o.kind.clone()),
        "name" => Some(o.name.clone()),
        "traceId" => Some(o.trace_id.clone()),
        "environment" => Some(o.environment.clone()),
        "level" => Some(o.level.clone()),
        "statusMessage" => o.status_message.clone(),
        "version" => o.version.clone(),
        "userId" => o.user_id.clone(),
        "sessionId" => o.session_id.clone(),
        "traceName" => o.trace_name.clone(),
        "model" => o.model.clone(),
        "parentObservationId" => o.parent_observation_id.clone(),
        _ => return None,
    })
}

/// One `filter` condition; `Err` for what Langfuse would reject.
fn condition_matches(o: &StoredObservation, c: &Value) -> Result<bool, String> {
    let ty = c.get("type").and_then(Value::as_str).ok_or("filter condition without type")?;
    let column = c.get("column").and_then(Value::as_str).ok_or("filter condition without column")?;
    let op = c.get("operator").and_then(Value::as_str).ok_or("filter condition without operator")?;
    let value = c.get("value").ok_or("filter condition without value")?;
    match ty {
        "arrayOptions" => {
            if !matches!(column, "tags" | "traceTags") {
                return Err(format!("unsupported arrayOptions column {column}"));
            }
            let wanted: Vec<&str> = value
                .as_array()
                .ok_or("arrayOptions value must be an array")?
                .iter()
                .filter_map(Value::as_str)
                .collect();
            Ok(match op {
                "all of" => wanted.iter().all(|w| o.tags.iter().any(|t| t == w)),
                "any of" => wanted.iter().any(|w| o.tags.iter().any(|t| t == w)),
                "none of" => !wanted.iter().any(|w| o.tags.iter().any(|t| t == w)),
                _ => return Err(format!("invalid operator {op}")),
            })
        }
        "string" | "stringOptions" | "categoryOptions" => {
            let actual = column_string(o, column).ok_or_else(|| format!("unknown column {column}"))?;
            let actual = actual.unwrap_or_default();
            Ok(match (op, value) {
                ("=", Value::String(v)) => &actual == v,
                ("contains", Value::String(v)) => actual.contains(v.as_str()),
                ("does not contain", Value::String(v)) => !actual.contains(v.as_str()),
                ("starts with", Value::String(v)) => actual.starts_with(v.as_str()),
                ("ends with", Value::String(v)) => actual.ends_with(v.as_str()),
                ("any of", Value::Array(vs)) => vs.iter().any(|v| v.as_str() == Some(&actual)),
                ("none of", Value::Array(vs)) => !vs.iter().any(|v| v.as_str() == Some(&actual)),
                _ => return Err(format!("invalid operator {op} for {ty}")),
            })
        }
        "datetime" => {
            let t =
                parse_time(value.as_str().ok_or("datetime value must be a string")?).map_err(|_| "invalid datetime")?;
            let actual = match column {
                "startTime" => o.start_time,
                "endTime" => o.end_time,
                _ => return Err(format!("unknown datetime column {column}")),
            };
            Ok(match op {
                ">" => actual > t,
                "<" => actual < t,
                ">=" => actual >= t,
                "<=" => actual <= t,
                _ => return Err(format!("invalid operator {op}")),
            })
        }
        "stringObject" => {
            let key = c.get("key").and_then(Value::as_str).ok_or("stringObject without key")?;
            let actual = o.metadata.get(key).map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
            Ok(match (op, value.as_str()) {
                ("=", Some(v)) => actual.as_deref() == Some(v),
                ("contains", Some(v)) => actual.is_some_and(|a| a.contains(v)),
                _ => return Err(format!("invalid operator {op}")),
            })
        }
        "boolean" if column == "isRootObservation" => {
            let v = value.as_bool().ok_or("boolean value")?;
            Ok(match op {
                "=" => o.is_root() == v,
                "<>" => o.is_root() != v,
                _ => return Err(format!("invalid operator {op}")),
            })
        }
        _ => Err(format!("unsupported filter type {ty}")),
    }
}

fn v4_observations(obs: &[&StoredObservation], query: &[(String, String)]) -> Reply {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    let bad = |m: String| message(StatusCode::BAD_REQUEST, m);
    if get("parseIoAsJson") == Some("true") {
        return Err(bad("parseIoAsJson is no longer supported".into()));
    }
    let limit: usize = get("limit").map_or(Ok(50), str::parse).map_err(|_| bad("Invalid limit".into()))?;
    if limit == 0 || limit > 1000 {
        return Err(bad("limit must be 1-1000".into()));
    }
    let mut groups: Vec<&str> = vec!["core"];
    for g in get("fields").unwrap_or("core,basic").split(',').map(str::trim).filter(|g| !g.is_empty()) {
        if !GROUPS.contains(&g) {
            return Err(bad(format!("Invalid field group {g}")));
        }
        groups.push(g);
    }
    let offset: usize = match get("cursor") {
        None => 0,
        Some(c) => base64::engine::general_purpose::STANDARD
            .decode(c)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("Invalid cursor".into()))?,
    };
    let filter: Vec<Value> = match get("filter") {
        Some(f) => serde_json::from_str(f).map_err(|e| bad(format!("Invalid filter: {e}")))?,
        None => Vec::new(),
    };
    let from = get("fromStartTime").map(parse_time).transpose()?;
    let to = get("toStartTime").map(parse_time).transpose()?;
    let simple: Vec<(&str, &str)> =
        ["type", "name", "traceId", "userId", "sessionId", "level", "version", "environment"]
            .into_iter()
            .filter_map(|k| get(k).map(|v| (k, v)))
            .collect();
    let is_root = get("isRootObservation").map(|v| v == "true");
    let mut rows: Vec<&StoredObservation> = Vec::new();
    for o in obs {
        let mut keep = from.is_none_or(|f| o.start_time >= f) && to.is_none_or(|t| o.start_time < t);
        keep &= is_root.is_none_or(|r| o.is_root() == r);
        for (k, v) in &simple {
            // Filter conditions on the same column take precedence over simple parameters.
            if filter.iter().any(|c| c.get("column").and_then(Value::as_str) == Some(k)) {
                continue;
            }
            keep &= column_string(o, k).flatten().as_deref() == Some(*v);
        }
        for c in &filter {
            keep &= condition_matches(o, c).map_err(bad)?;
        }
        if keep {
            rows.push(o);
        }
    }
    rows.sort_by(|a, b| b.start_time.cmp(&a.start_time).then_with(|| b.id.cmp(&a.id)));
    let page: Vec<Value> = rows.iter().skip(offset).take(limit).map(|o| v4_row(o, &groups)).collect();
    let next = offset + page.len();
    let meta = if next < rows.len() {
        json!({"cursor": base64::engine::general_purpose::STANDARD.encode(next.to_string())})
    } else {
        json!({})
    };
    Ok(json_response(StatusCode::OK, json!({"data": page, "meta": meta})))
}
