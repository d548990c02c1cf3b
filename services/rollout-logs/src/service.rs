//! [`RolloutLogService`]: the `/logs` and `/status` routes over a [`LogStore`].

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use chrono::Utc;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use llmgate_core::{
    GatewayBody, GatewayError,
    body::{full, json_response},
    ext::{RouteKind, RouteMeta},
    json::read_body,
};
use serde_json::{Value, json};
use tower_service::Service;

use crate::{
    entry::{self, RUNNING},
    query::{LogSearch, status_rollout_id},
    store::{LogStore, RolloutKey},
};

/// The default bound on one stored entry, in bytes.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 64 * 1024;
/// The default limit on a `POST /logs` body, in bytes.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// Serves `POST /logs`, `GET /logs` and `GET /status` (told apart by [`RouteMeta`]) over a
/// [`LogStore`]. Cheap to clone; clones share the store and the counters.
#[derive(Clone)]
pub struct RolloutLogService {
    store: Arc<dyn LogStore>,
    max_entry_bytes: usize,
    body_limit: usize,
    default_scope: Arc<str>,
    counters: Arc<Counters>,
}

impl RolloutLogService {
    /// Serves the logs in `store`; entries up to 64 KiB, bodies up to 1 MiB, no default scope.
    pub fn new(store: Arc<dyn LogStore>) -> Self {
        Self {
            store,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            body_limit: DEFAULT_BODY_LIMIT,
            default_scope: Arc::from(""),
            counters: Arc::default(),
        }
    }

    /// Sets the bound on one stored entry: a larger one is refused with 400.
    pub fn max_entry_bytes(mut self, bytes: usize) -> Self {
        self.max_entry_bytes = bytes;
        self
    }

    /// Sets the limit on a `POST /logs` body: past it, 413 (the body is not read further).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The scope of a request without `project_id` in its path: the default project's id, so
    /// that `/logs` and `/project_id/{default}/logs` are the same log. Without it, such
    /// requests share the scope `""`.
    pub fn default_scope(mut self, project_id: impl Into<Arc<str>>) -> Self {
        self.default_scope = project_id.into();
        self
    }

    /// What it counted.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }
}

impl Service<Request<GatewayBody>> for RolloutLogService {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The store is shared and always ready; each call waits on its own future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.handle(req).await) })
    }
}

impl RolloutLogService {
    async fn handle(&self, req: Request<GatewayBody>) -> Response<GatewayBody> {
        let Some(meta) = req.extensions().get::<RouteMeta>() else {
            return detail(StatusCode::NOT_FOUND, "Not Found".into());
        };
        let scope = meta.project.clone().unwrap_or_else(|| self.default_scope.to_string());
        match (meta.kind, req.method()) {
            (RouteKind::Logs, &Method::POST) => self.write(&scope, req.into_body()).await,
            (RouteKind::Logs, &Method::GET) => self.search(&scope, req.uri().query()).await,
            (RouteKind::Status, &Method::GET) => self.status(&scope, req.uri().query()).await,
            (RouteKind::Logs, _) => method_not_allowed("GET, POST"),
            (RouteKind::Status, _) => method_not_allowed("GET"),
            _ => detail(StatusCode::NOT_FOUND, "Not Found".into()),
        }
    }

    /// `POST /logs`: the entry is stored under each of its rollouts before the 200; a store
    /// failure answers 503 so that a 2xx always means stored.
    async fn write(&self, scope: &str, body: GatewayBody) -> Response<GatewayBody> {
        let counters = &self.counters;
        // Boxed here: inside the async fn, the `Send` proof of `Limited`'s error conversion hits
        // a higher-ranked inference limitation of async blocks.
        let read: Pin<Box<dyn Future<Output = Result<Bytes, GatewayError>> + Send>> =
            Box::pin(read_body(body, self.body_limit));
        let bytes = match read.await {
            Ok(bytes) => bytes,
            Err(error) => {
                counters.rejected.fetch_add(1, Relaxed);
                return detail(error.status(), error.to_string());
            }
        };
        let entry = match entry::parse(&bytes, Utc::now(), self.max_entry_bytes) {
            Ok(entry) => entry,
            Err(message) => {
                counters.rejected.fetch_add(1, Relaxed);
                return detail(StatusCode::BAD_REQUEST, message);
            }
        };
        let mut evicted = 0;
        for rollout_id in &entry.rollout_ids {
            let key = RolloutKey { scope, rollout_id };
            match self.store.append(key, &entry.json, entry.has_status).await {
                Ok(n) => evicted += n,
                Err(error) => {
                    counters.failed.fetch_add(1, Relaxed);
                    tracing::warn!(rollout_id, "rollout log store: append failed: {error}");
                    return unavailable(&error);
                }
            }
        }
        counters.written.fetch_add(1, Relaxed);
        counters.evicted.fetch_add(evicted, Relaxed);
        json_response(
            StatusCode::OK,
            &json!({"status": "stored", "rollout_ids": entry.rollout_ids, "evicted": evicted}),
        )
    }

    /// `GET /logs`: the rollout's entries that pass the filter, newest first, at most `limit`,
    /// and how many the bound evicted. The latest status is listed even when evicted.
    async fn search(&self, scope: &str, query: Option<&str>) -> Response<GatewayBody> {
        let search = match LogSearch::parse(query, Utc::now()) {
            Ok(search) => search,
            Err(message) => return detail(StatusCode::BAD_REQUEST, message),
        };
        let key = RolloutKey { scope, rollout_id: &search.rollout_id };
        let log = match self.store.read(key).await {
            Ok(log) => log,
            Err(error) => {
                tracing::warn!(rollout_id = search.rollout_id, "rollout log store: read failed: {error}");
                return unavailable(&error);
            }
        };
        // An evicted status is older than every kept entry: it goes last.
        let evicted_status = log.latest_status.filter(|status| !log.entries.contains(status));
        let kept = log
            .entries
            .iter()
            .chain(evicted_status.as_ref())
            .filter(|entry| search.filter.keeps(entry))
            .take(search.limit);
        // The stored entries are JSON already: the answer is spliced, not re-encoded.
        let mut body = BytesMut::from(&b"{\"entries\":["[..]);
        for (i, entry) in kept.enumerate() {
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(entry);
        }
        body.put_slice(format!("],\"evicted\":{}}}", log.evicted).as_bytes());
        json_bytes(StatusCode::OK, body.freeze())
    }

    /// `GET /status`: the newest status-bearing entry's status and extras, `null` before one.
    async fn status(&self, scope: &str, query: Option<&str>) -> Response<GatewayBody> {
        let rollout_id = match status_rollout_id(query) {
            Ok(rollout_id) => rollout_id,
            Err(message) => return detail(StatusCode::BAD_REQUEST, message),
        };
        let polls = &self.counters.polls;
        let latest = match self.store.latest_status(RolloutKey { scope, rollout_id: &rollout_id }).await {
            Ok(latest) => latest,
            Err(error) => {
                polls[PollOutcome::Failed as usize].fetch_add(1, Relaxed);
                tracing::warn!(rollout_id, "rollout log store: status read failed: {error}");
                return unavailable(&error);
            }
        };
        let (status, extras) = latest.as_deref().map_or((Value::Null, Value::Null), entry::status_of);
        let outcome = match status.get("code").and_then(Value::as_i64) {
            None => PollOutcome::None,
            Some(RUNNING) => PollOutcome::Running,
            Some(_) => PollOutcome::Ended,
        };
        polls[outcome as usize].fetch_add(1, Relaxed);
        json_response(StatusCode::OK, &json!({"rollout_id": rollout_id, "status": status, "extras": extras}))
    }
}

fn detail(status: StatusCode, message: String) -> Response<GatewayBody> {
    json_response(status, &json!({"detail": message}))
}

fn unavailable(error: &llmgate_core::BoxError) -> Response<GatewayBody> {
    detail(StatusCode::SERVICE_UNAVAILABLE, format!("The rollout log store is unavailable: {error}"))
}

fn method_not_allowed(allow: &'static str) -> Response<GatewayBody> {
    let mut response = detail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed".into());
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn json_bytes(status: StatusCode, body: Bytes) -> Response<GatewayBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

// === Counters ===

/// How a status poll ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollOutcome {
    /// The rollout has no status yet.
    None,
    /// Its newest status is RUNNING (101).
    Running,
    /// Its newest status is any other code: the poller stops.
    Ended,
    /// The store failed (503).
    Failed,
}

impl PollOutcome {
    /// Every outcome, in `Counters::polls` order.
    pub const ALL: [PollOutcome; 4] = [Self::None, Self::Running, Self::Ended, Self::Failed];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Running => "running",
            Self::Ended => "ended",
            Self::Failed => "failed",
        }
    }
}

/// What the service counted, read at scrape time.
#[derive(Debug, Default)]
pub struct Counters {
    /// Entries stored (a groupwise entry counts once).
    pub written: AtomicU64,
    /// Entries refused (400, 413).
    pub rejected: AtomicU64,
    /// Old entries evicted to keep a rollout within its bound.
    pub evicted: AtomicU64,
    /// Entries not stored because the store failed (503).
    pub failed: AtomicU64,
    /// Status polls, by [`PollOutcome`] (indexed by its value).
    pub polls: [AtomicU64; 4],
}
