//! `GET [/v1][/project_id/{p}]/traces` and `…/traces/pointwise` (spec gateway.md §7–§9): the
//! Langfuse traces of a rollout, all of them or a clear "not yet".
//!
//! **Completeness.** `expected` = the rollout's insertion ids from the [`InsertionStore`];
//! `found` = the `insertion_id:` tags of the traces read back. The first pass lists the
//! request's tags and filters (capped by `limit`); every later pass re-queries each missing id
//! **on its own** ([`LangfuseReader::find_insertion`]: by trace id or by its `insertion_id:`
//! tag; one query with several such tags means "all of them" and matches nothing, the
//! original's bug), with bounded parallelism. Between passes: exponential backoff from
//! [`DEFAULT_BACKOFF_BASE`], capped, with jitter; at most `max_retries` passes; and an overall
//! deadline ([`DEFAULT_DEADLINE`]) so a request never hangs longer.
//!
//! **Status codes** (bodies `{"detail": "…"}` as the original's, which clients parse): 200
//! complete; 404 incomplete after the passes, unknown project, rollout without recorded ids;
//! 400 pointwise without a `rollout_id:` tag, malformed timestamps, `max_retries=0` without a
//! rollout; 422 a query parameter of the wrong type; 502 when Langfuse keeps failing (its
//! status and message), at once for answers a retry cannot change (400, 401, 403, 404); 504
//! when Langfuse did not answer before the deadline; 503 when the insertion-id store fails.
//!
//! Every wait is a `tokio` timer and every read goes through the reader's pooled client: the
//! runtime is never blocked.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use http::{Request, Response, StatusCode};
use llmgate_core::{
    BoxError, GatewayBody, GatewayError,
    body::json_response,
    ext::{LangfuseKeys, RouteKind, RouteMeta},
};
use llmgate_credentials::Projects;
use llmgate_insertion_id::InsertionStore;
use llmgate_langfuse::{
    LangfuseReader, Observation, ReadError, Trace, TraceQuery, reader::drop_shadowed_traces, timestamp::parse_timestamp,
};
use serde_json::{Value, json};
use tokio::{task::JoinSet, time::Instant};
use tower::Service;

/// How long one request may take at most, whatever `max_retries` says.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// The first backoff between passes (then doubled each pass).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest backoff between passes.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How many missing ids (or trace details) are read at once.
pub const DEFAULT_PARALLELISM: usize = 8;
/// `max_retries` above this is taken as this (the deadline bounds the passes anyway).
const MAX_PASSES: u32 = 50;
/// `sleep_between_gets` above this is taken as this.
const MAX_SLEEP_BETWEEN_GETS: f64 = 30.0;

/// The traces service: answers the two trace routes (dispatched on [`RouteMeta`]).
///
/// Cheap to clone; every clone shares the reader, the projects and the store.
#[derive(Clone)]
pub struct TracesService {
    reader: Arc<dyn LangfuseReader>,
    projects: Arc<Projects>,
    store: Arc<dyn InsertionStore>,
    settings: Settings,
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    deadline: Duration,
    backoff_base: Duration,
    backoff_cap: Duration,
    parallelism: usize,
    require_generation: bool,
}

impl Settings {
    /// `base · 2^(pass-1)`, capped (before jitter).
    fn full_backoff(&self, pass: u32) -> Duration {
        self.backoff_base.saturating_mul(1u32 << pass.saturating_sub(1).min(20)).min(self.backoff_cap)
    }
}

impl TracesService {
    /// Reads through `reader` with the keys of `projects`, expecting the ids in `store`.
    /// Defaults: 60 s deadline, backoff from 1 s capped at 10 s, 8 reads at once, and a trace
    /// counts as a completion only once its generation is there.
    pub fn new(reader: Arc<dyn LangfuseReader>, projects: Arc<Projects>, store: Arc<dyn InsertionStore>) -> Self {
        Self {
            reader,
            projects,
            store,
            settings: Settings {
                deadline: DEFAULT_DEADLINE,
                backoff_base: DEFAULT_BACKOFF_BASE,
                backoff_cap: DEFAULT_BACKOFF_CAP,
                parallelism: DEFAULT_PARALLELISM,
                require_generation: true,
            },
        }
    }

    /// The longest a request may take.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.settings.deadline = deadline;
        self
    }

    /// The backoff between passes: `base`, doubled each pass, at most `cap`, with jitter (a
    /// wait is between half and all of that).
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.settings.backoff_base = base;
        self.settings.backoff_cap = cap.max(base);
        self
    }

    /// How many missing ids (or trace details) are read at once (at least 1).
    pub fn parallelism(mut self, n: usize) -> Self {
        self.settings.parallelism = n.max(1);
        self
    }

    /// Whether a trace counts as a completion only once it holds a `GENERATION` (default on).
    /// Turn it off when nobody exports generations (`langfuse.emit: events` in front of an
    /// `openai` upstream); keep it on otherwise, so that a root span seen before its generation,
    /// or llmgate's events-only trace seen before LiteLLM's, is not taken for the completion.
    pub fn require_generation(mut self, on: bool) -> Self {
        self.settings.require_generation = on;
        self
    }
}

impl Service<Request<GatewayBody>> for TracesService {
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let this = self.clone();
        let meta = req.extensions().get::<RouteMeta>().cloned();
        let query = req.uri().query().map(str::to_owned);
        // A GET's body is not read.
        drop(req);
        Box::pin(async move { Ok(this.handle(meta, query.as_deref()).await) })
    }
}

// === request ===

fn detail(status: StatusCode, message: impl Into<String>) -> Response<GatewayBody> {
    json_response(status, &json!({"detail": message.into()}))
}

/// The query parameters of gateway.md §7.1.
#[derive(Debug, Default)]
struct Params {
    tags: Vec<String>,
    project_id: Option<String>,
    limit: Option<u64>,
    sample_size: Option<u64>,
    user_id: Option<String>,
    session_id: Option<String>,
    name: Option<String>,
    environment: Option<String>,
    version: Option<String>,
    release: Option<String>,
    fields: Option<String>,
    hours_back: Option<u64>,
    from_timestamp: Option<String>,
    to_timestamp: Option<String>,
    sleep_between_gets: Option<f64>,
    max_retries: Option<u64>,
}

/// `%XX` and `+` decoding of one query component.
fn decode_component(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Params {
    fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut p = Self::default();
        for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (key, value) = (decode_component(key), decode_component(value));
            let text = || (!value.is_empty()).then(|| value.clone());
            let int = || -> Result<Option<u64>, String> {
                if value.is_empty() {
                    return Ok(None);
                }
                value.trim().parse::<u64>().map(Some).map_err(|_| {
                    format!("Invalid value for query parameter '{key}': '{value}' is not a non-negative integer")
                })
            };
            match key.as_str() {
                "tags" => p.tags.push(value.clone()),
                "project_id" => p.project_id = text(),
                "limit" => p.limit = int()?,
                "sample_size" => p.sample_size = int()?,
                "user_id" => p.user_id = text(),
                "session_id" => p.session_id = text(),
                "name" => p.name = text(),
                "environment" => p.environment = text(),
                "version" => p.version = text(),
                "release" => p.release = text(),
                "fields" => p.fields = text(),
                "hours_back" => p.hours_back = int()?,
                "from_timestamp" => p.from_timestamp = text(),
                "to_timestamp" => p.to_timestamp = text(),
                "max_retries" => p.max_retries = int()?,
                "sleep_between_gets" if !value.is_empty() => {
                    let secs = value.trim().parse::<f64>().ok().filter(|s| s.is_finite()).ok_or_else(|| {
                        format!("Invalid value for query parameter 'sleep_between_gets': '{value}' is not a number")
                    })?;
                    p.sleep_between_gets = Some(secs);
                }
                _ => {}
            }
        }
        Ok(p)
    }
}

/// What one request asks, resolved.
struct Job {
    project_id: String,
    keys: LangfuseKeys,
    query: Arc<TraceQuery>,
    rollout: Option<String>,
    sample_size: Option<usize>,
    sleep_between_gets: Duration,
    max_retries: u32,
    deadline: Instant,
}

/// Why the reads stopped without an answer.
enum Failure {
    /// Langfuse answered an error (or could not be reached).
    Langfuse(ReadError),
    /// The deadline passed during a read.
    Deadline,
}

/// A retry may change these answers; not 400/401/403/404 (wrong keys, wrong API version).
fn retryable(e: &ReadError) -> bool {
    match e.status {
        None => true,
        Some(s) => s == 408 || s == 429 || s >= 500,
    }
}

impl TracesService {
    async fn handle(&self, meta: Option<RouteMeta>, query: Option<&str>) -> Response<GatewayBody> {
        let pointwise = meta.as_ref().is_some_and(|m| m.kind == RouteKind::TracesPointwise);
        let params = match Params::parse(query) {
            Ok(p) => p,
            Err(message) => return detail(StatusCode::UNPROCESSABLE_ENTITY, message),
        };
        // The path's project wins over the query's.
        let named = meta.and_then(|m| m.project).or_else(|| params.project_id.clone());
        let project = match self.projects.resolve(named.as_deref()) {
            Ok(Some(project)) => project,
            Ok(None) => {
                return detail(
                    StatusCode::NOT_FOUND,
                    "No project configured: the trace routes need a secrets file with Langfuse keys",
                );
            }
            Err(GatewayError::NotFound(message)) => return detail(StatusCode::NOT_FOUND, message),
            Err(other) => return detail(other.status(), other.to_string()),
        };
        let mut from = match params.from_timestamp.as_deref().map(|s| (s, parse_timestamp(s))) {
            Some((s, None)) => {
                return detail(
                    StatusCode::BAD_REQUEST,
                    format!("Invalid from_timestamp '{s}': expected ISO 8601, e.g. 2026-11-21T16:30:22Z"),
                );
            }
            Some((_, t)) => t,
            None => None,
        };
        let mut to = match params.to_timestamp.as_deref().map(|s| (s, parse_timestamp(s))) {
            Some((s, None)) => {
                return detail(
                    StatusCode::BAD_REQUEST,
                    format!("Invalid to_timestamp '{s}': expected ISO 8601, e.g. 2026-11-21T16:30:22Z"),
                );
            }
            Some((_, t)) => t,
            None => None,
        };
        if from.is_none()
            && to.is_none()
            && let Some(hours) = params.hours_back
        {
            // UTC (the original used naive local time).
            let now = SystemTime::now();
            to = Some(now);
            from = Some(
                now.checked_sub(Duration::from_secs(hours.saturating_mul(3600))).unwrap_or(SystemTime::UNIX_EPOCH),
            );
        }
        let rollout = params.tags.iter().find_map(|t| t.strip_prefix("rollout_id:")).map(str::to_owned);
        let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let query = TraceQuery {
            tags: params.tags,
            from,
            to,
            limit: Some(params.limit.map_or(100, to_usize)),
            user_id: params.user_id,
            session_id: params.session_id,
            name: params.name,
            environment: params.environment,
            version: params.version,
            release: params.release,
            fields: params.fields,
        };
        let sleep = params.sleep_between_gets.unwrap_or(0.0).clamp(0.0, MAX_SLEEP_BETWEEN_GETS);
        let job = Job {
            project_id: project.id.to_string(),
            keys: project.langfuse,
            query: Arc::new(query),
            rollout,
            sample_size: params.sample_size.map(to_usize),
            sleep_between_gets: Duration::from_secs_f64(sleep),
            max_retries: u32::try_from(params.max_retries.unwrap_or(3)).unwrap_or(u32::MAX).min(MAX_PASSES),
            deadline: Instant::now() + self.settings.deadline,
        };
        if pointwise {
            self.pointwise(job).await
        } else if job.rollout.is_some() {
            self.rollout(job).await
        } else {
            self.listing(job).await
        }
    }

    /// The wait before pass `pass` (1, 2, …): `base · 2^(pass-1)`, capped, with equal jitter.
    fn wait_for_pass(&self, pass: u32) -> Duration {
        let half = self.settings.full_backoff(pass) / 2;
        half + half.mul_f64(random_unit())
    }

    /// Waits before pass `pass`; `false` when that wait would end past the deadline.
    async fn wait_before(&self, pass: u32, deadline: Instant) -> bool {
        let wait = self.wait_for_pass(pass);
        if Instant::now() + wait >= deadline {
            return false;
        }
        tokio::time::sleep(wait).await;
        true
    }

    fn counts(&self, trace: &Trace) -> bool {
        trace.insertion_id().is_some() && (!self.settings.require_generation || trace.has_generation())
    }

    fn failed(&self, failure: Failure) -> Response<GatewayBody> {
        match failure {
            Failure::Langfuse(e) => {
                tracing::warn!(status = ?e.status, message = %e.message, "traces: Langfuse keeps failing");
                detail(StatusCode::BAD_GATEWAY, format!("Failed to fetch traces from Langfuse: {e}"))
            }
            Failure::Deadline => detail(
                StatusCode::GATEWAY_TIMEOUT,
                format!("Langfuse did not answer within {} s", self.settings.deadline.as_secs_f64()),
            ),
        }
    }

    /// `/traces` without a `rollout_id:` tag: the filtered listing, no completeness check.
    async fn listing(&self, job: Job) -> Response<GatewayBody> {
        if job.max_retries == 0 {
            return detail(
                StatusCode::BAD_REQUEST,
                "max_retries=0 runs no pass: give max_retries >= 1 (or a rollout_id: tag)",
            );
        }
        let mut last = None;
        for pass in 0..job.max_retries {
            if pass > 0 && !self.wait_before(pass, job.deadline).await {
                break;
            }
            let mut traces = Vec::new();
            let mut listed = false;
            match tokio::time::timeout_at(job.deadline, self.list_pass(&job, &mut traces, &mut listed)).await {
                Err(_) => return self.failed(Failure::Deadline),
                Ok(Ok(())) => return self.answer(&job, drop_shadowed_traces(traces)),
                Ok(Err(e)) if retryable(&e) => last = Some(e),
                Ok(Err(e)) => return self.failed(Failure::Langfuse(e)),
            }
        }
        self.failed(last.map_or(Failure::Deadline, Failure::Langfuse))
    }

    /// `/traces` with a `rollout_id:` tag: every expected insertion id, or 404.
    async fn rollout(&self, job: Job) -> Response<GatewayBody> {
        let rollout = job.rollout.clone().unwrap_or_default();
        let members = match self.store.members(&rollout).await {
            Ok(m) => m,
            Err(e) => return detail(StatusCode::SERVICE_UNAVAILABLE, format!("Insertion-id store unavailable: {e}")),
        };
        // Normalised key (lower-case hex, no dashes) → the id as recorded.
        let expected: HashMap<String, String> = members.into_iter().map(|id| (key(&id), id)).collect();
        if expected.is_empty() {
            return detail(
                StatusCode::NOT_FOUND,
                format!("No expected insertion_ids found in Redis for rollout '{rollout}'. Returning empty traces."),
            );
        }
        let mut state = Collected::default();
        let mut listed = false;
        let mut last: Option<Failure> = None;
        for pass in 0..job.max_retries {
            if pass > 0 && !self.wait_before(pass, job.deadline).await {
                break;
            }
            let result = if listed {
                let missing: Vec<String> =
                    expected.iter().filter(|(k, _)| !state.found.contains(*k)).map(|(_, id)| id.clone()).collect();
                tokio::time::timeout_at(job.deadline, self.requery_pass(&job, missing, &mut state)).await
            } else {
                let mut traces = Vec::new();
                let r = tokio::time::timeout_at(job.deadline, self.list_pass(&job, &mut traces, &mut listed)).await;
                // What was read counts even when a detail read failed; the listing is not
                // repeated once it succeeded (missing ids are then read on their own).
                for t in traces {
                    state.add(t, self);
                }
                r
            };
            match result {
                Err(_) => {
                    last = Some(Failure::Deadline);
                    break;
                }
                Ok(Ok(())) => last = None,
                Ok(Err(e)) if retryable(&e) => last = Some(Failure::Langfuse(e)),
                Ok(Err(e)) => return self.failed(Failure::Langfuse(e)),
            }
            if expected.keys().all(|k| state.found.contains(k)) {
                return self.answer(&job, drop_shadowed_traces(state.traces));
            }
        }
        if let Some(failure) = last {
            return self.failed(failure);
        }
        let n = expected.keys().filter(|k| state.found.contains(*k)).count();
        detail(
            StatusCode::NOT_FOUND,
            format!("Incomplete traces for rollout_id '{rollout}': Found {n}/{} completions.", expected.len()),
        )
    }

    /// `/traces/pointwise`: the newest insertion id of the rollout, and only its trace.
    async fn pointwise(&self, job: Job) -> Response<GatewayBody> {
        let Some(rollout) = job.rollout.clone() else {
            return detail(
                StatusCode::BAD_REQUEST,
                "Pointwise needs a 'rollout_id:<id>' tag, e.g. ?tags=rollout_id:abc",
            );
        };
        let members = match self.store.members(&rollout).await {
            Ok(m) => m,
            Err(e) => return detail(StatusCode::SERVICE_UNAVAILABLE, format!("Insertion-id store unavailable: {e}")),
        };
        // UUIDv7s sort by time: the greatest is the newest.
        let Some(latest) = members.into_iter().max_by_key(|id| (uuid::Uuid::parse_str(id).ok(), id.to_lowercase()))
        else {
            return detail(
                StatusCode::NOT_FOUND,
                format!("No insertion_ids found in Redis for rollout '{rollout}'. Cannot determine latest trace."),
            );
        };
        let mut last: Option<Failure> = None;
        for pass in 0..job.max_retries {
            if pass > 0 && !self.wait_before(pass, job.deadline).await {
                break;
            }
            let read = self.reader.find_insertion(&job.keys, &latest, &job.query);
            match tokio::time::timeout_at(job.deadline, read).await {
                Err(_) => {
                    last = Some(Failure::Deadline);
                    break;
                }
                Ok(Ok(Some(trace))) if self.counts(&trace) => return self.answer(&job, vec![trace]),
                Ok(Ok(_)) => last = None,
                Ok(Err(e)) if retryable(&e) => last = Some(Failure::Langfuse(e)),
                Ok(Err(e)) => return self.failed(Failure::Langfuse(e)),
            }
        }
        if let Some(failure) = last {
            return self.failed(failure);
        }
        detail(
            StatusCode::NOT_FOUND,
            format!("Failed to fetch latest trace for rollout '{rollout}' after {} retries", job.max_retries),
        )
    }

    /// One listing with the request's tags and filters, capped by `limit`; on v3 each listed
    /// trace is then read in full (a pause of `sleep_between_gets` before each read). Traces
    /// read so far are in `out` even when it fails.
    async fn list_pass(&self, job: &Job, out: &mut Vec<Trace>, listed_ok: &mut bool) -> Result<(), ReadError> {
        let listed = self.reader.list_traces(&job.keys, &job.query).await?;
        *listed_ok = true;
        if self.reader.lists_full_traces() {
            out.extend(listed);
            return Ok(());
        }
        let ids: Vec<String> = listed.into_iter().map(|t| t.id).collect();
        let mut order: HashMap<String, usize> = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            order.entry(id.clone()).or_insert(i);
        }
        let reader = self.reader.clone();
        let keys = job.keys.clone();
        let mut details: Vec<(usize, Trace)> = Vec::new();
        let result = self
            .bounded(
                job,
                ids,
                |id| {
                    let reader = reader.clone();
                    let keys = keys.clone();
                    async move { reader.get_trace(&keys, &id).await }
                },
                |trace: Trace| {
                    let at = order.get(&trace.id).copied().unwrap_or(usize::MAX);
                    details.push((at, trace));
                },
            )
            .await;
        details.sort_by_key(|(at, _)| *at);
        out.extend(details.into_iter().map(|(_, t)| t));
        result
    }

    /// Re-reads each missing id on its own.
    async fn requery_pass(&self, job: &Job, missing: Vec<String>, state: &mut Collected) -> Result<(), ReadError> {
        let reader = self.reader.clone();
        let keys = job.keys.clone();
        let query = job.query.clone();
        let mut found = Vec::new();
        let result = self
            .bounded(
                job,
                missing,
                |id| {
                    let (reader, keys, query) = (reader.clone(), keys.clone(), query.clone());
                    async move { reader.find_insertion(&keys, &id, &query).await }
                },
                |trace: Trace| found.push(trace),
            )
            .await;
        for t in found {
            state.add(t, self);
        }
        result
    }

    /// Runs `read` for each id, `parallelism` at a time (one at a time, each after a pause,
    /// when `sleep_between_gets` is set), handing each trace to `each`. The first error that
    /// is not retryable wins; else the last retryable one; the reads all run either way.
    async fn bounded<F, Fut>(
        &self,
        job: &Job,
        ids: Vec<String>,
        read: F,
        mut each: impl FnMut(Trace),
    ) -> Result<(), ReadError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Option<Trace>, ReadError>> + Send + 'static,
    {
        let mut error: Option<ReadError> = None;
        let mut keep = |r: Result<Option<Trace>, ReadError>, error: &mut Option<ReadError>| match r {
            Ok(Some(t)) => each(t),
            Ok(None) => {}
            Err(e) => {
                if error.as_ref().is_none_or(retryable) {
                    *error = Some(e);
                }
            }
        };
        if !job.sleep_between_gets.is_zero() {
            for id in ids {
                tokio::time::sleep(job.sleep_between_gets).await;
                keep(read(id).await, &mut error);
            }
        } else {
            let mut set = JoinSet::new();
            let mut ids = ids.into_iter();
            loop {
                while set.len() < self.settings.parallelism {
                    let Some(id) = ids.next() else { break };
                    set.spawn(read(id));
                }
                let Some(joined) = set.join_next().await else { break };
                let r = joined
                    .unwrap_or_else(|e| Err(ReadError { status: None, message: format!("read task failed: {e}") }));
                keep(r, &mut error);
            }
        }
        error.map_or(Ok(()), Err)
    }

    /// 200 `{project_id, total_traces, traces}`, sampled to `sample_size`.
    fn answer(&self, job: &Job, mut traces: Vec<Trace>) -> Response<GatewayBody> {
        if let Some(n) = job.sample_size
            && traces.len() > n
        {
            sample(&mut traces, n);
        }
        let traces: Vec<Value> = traces.iter().map(trace_json).collect();
        json_response(
            StatusCode::OK,
            &json!({"project_id": job.project_id, "total_traces": traces.len(), "traces": traces}),
        )
    }
}

/// Traces read back so far, and the insertion ids they complete.
#[derive(Default)]
struct Collected {
    traces: Vec<Trace>,
    found: HashSet<String>,
}

impl Collected {
    /// Adds (or replaces, by trace id) a trace, counting its insertion id when it is complete.
    fn add(&mut self, trace: Trace, service: &TracesService) {
        if service.counts(&trace)
            && let Some(id) = trace.insertion_id()
        {
            self.found.insert(key(id));
        }
        match self.traces.iter_mut().find(|t| t.id == trace.id) {
            Some(slot) => *slot = trace,
            None => self.traces.push(trace),
        }
    }
}

/// An insertion id as a set key: lower-case, no dashes.
fn key(id: &str) -> String {
    id.chars().filter(|c| *c != '-').flat_map(char::to_lowercase).collect()
}

/// A uniform number in `[0, 1)` from the OS's randomness (via a v4 UUID).
fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

/// Keeps a uniform random sample of `n` traces (partial Fisher–Yates), in random order like
/// Python's `random.sample`.
fn sample(traces: &mut Vec<Trace>, n: usize) {
    let len = traces.len();
    for i in 0..n.min(len) {
        let j = i + ((random_unit() * (len - i) as f64) as usize).min(len - i - 1);
        traces.swap(i, j);
    }
    traces.truncate(n);
}

/// gateway.md §9 `TraceResponse`, field for field.
fn trace_json(t: &Trace) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "user_id": t.user_id,
        "session_id": t.session_id,
        "tags": t.tags,
        "timestamp": t.timestamp,
        "input": t.input,
        "output": t.output,
        "metadata": t.metadata,
        "observations": t.observations.iter().map(observation_json).collect::<Vec<_>>(),
    })
}

/// gateway.md §9 `ObservationResponse`, field for field.
fn observation_json(o: &Observation) -> Value {
    json!({
        "id": o.id,
        "type": o.kind,
        "name": o.name,
        "start_time": o.start_time,
        "end_time": o.end_time,
        "input": o.input,
        "output": o.output,
        "parent_observation_id": o.parent_observation_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_parse_like_the_original() {
        let p = Params::parse(Some(
            "tags=rollout_id%3Ar1&tags=a+b&limit=5&sample_size=2&user_id=u&hours_back=6&sleep_between_gets=0.1&max_retries=4&fields=core,io&project_id=",
        ))
        .unwrap();
        assert_eq!(p.tags, vec!["rollout_id:r1", "a b"]);
        assert_eq!((p.limit, p.sample_size, p.hours_back, p.max_retries), (Some(5), Some(2), Some(6), Some(4)));
        assert_eq!(p.user_id.as_deref(), Some("u"));
        assert_eq!(p.fields.as_deref(), Some("core,io"));
        assert_eq!(p.project_id, None, "an empty value is no value");
        assert_eq!(p.sleep_between_gets, Some(0.1));
        assert!(Params::parse(Some("limit=x")).is_err());
        assert!(Params::parse(Some("limit=-1")).is_err());
        assert!(Params::parse(Some("sleep_between_gets=nan")).is_err());
        assert_eq!(decode_component("%zz%4"), "%zz%4");
        assert_eq!(decode_component("%C3%A9"), "é");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let s = Settings {
            deadline: DEFAULT_DEADLINE,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(10),
            parallelism: 1,
            require_generation: true,
        };
        let full = |pass: u32| s.full_backoff(pass);
        assert_eq!(full(1), Duration::from_secs(1));
        assert_eq!(full(3), Duration::from_secs(4));
        assert_eq!(full(40), Duration::from_secs(10));
        for _ in 0..100 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn sample_keeps_n_distinct_traces() {
        let mut traces: Vec<Trace> = (0..10).map(|i| Trace { id: i.to_string(), ..Default::default() }).collect();
        sample(&mut traces, 3);
        assert_eq!(traces.len(), 3);
        let ids: HashSet<_> = traces.iter().map(|t| t.id.clone()).collect();
        assert_eq!(ids.len(), 3);
    }
}
