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
//! when Langfuse did not answer before the deadline; 503 when the insertion-id store fails;
//! **500 at once** (after the first pass, without waiting out the others) when a rollout is
//! incomplete and the gateway's exporter lost spans of that rollout ([`SpanLosses`], shared
//! with the Langfuse exporter by the proxy): the missing completions can never arrive, and the
//! failure is the gateway's own, not Langfuse's (hence not 502). The detail names the loss.
//!
//! Every wait is a `tokio` timer and every read goes through the reader's pooled client: the
//! runtime is never blocked.
//!
//! `params` parses the query, `poll` reads Langfuse pass after pass, `render` writes the
//! answers; this module ties them together.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use llmgate_core::{
    BoxError, GatewayBody, GatewayError,
    ext::{RouteKind, RouteMeta},
    losses::SpanLosses,
};
use llmgate_credentials::{Projects, Reloadable};
use llmgate_insertion_id::InsertionStore;
use llmgate_langfuse::LangfuseReader;
use tokio::time::Instant;
use tower::Service;

use self::{
    params::Params,
    poll::{Answer, Settings},
    render::detail,
};

mod params;
mod poll;
mod render;

/// How long one request may take at most, whatever `max_retries` says.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// The first backoff between passes (then doubled each pass).
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest backoff between passes.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(10);
/// How many missing ids (or trace details) are read at once.
pub const DEFAULT_PARALLELISM: usize = 8;

/// The traces service: answers the two trace routes (dispatched on [`RouteMeta`]).
///
/// Cheap to clone; every clone shares the reader, the projects and the store.
#[derive(Clone)]
pub struct TracesService {
    reader: Arc<dyn LangfuseReader>,
    projects: Reloadable<Projects>,
    store: Arc<dyn InsertionStore>,
    losses: Option<SpanLosses>,
    settings: Settings,
}

impl TracesService {
    /// Reads through `reader` with the keys of `projects` (an `Arc<Projects>`, or a
    /// [`Reloadable`] that a secrets reload swaps), expecting the ids in `store`.
    /// Defaults: 60 s deadline, backoff from 1 s capped at 10 s, 8 reads at once, and a trace
    /// counts as a completion only once its generation is there.
    pub fn new(
        reader: Arc<dyn LangfuseReader>,
        projects: impl Into<Reloadable<Projects>>,
        store: Arc<dyn InsertionStore>,
    ) -> Self {
        Self {
            reader,
            projects: projects.into(),
            store,
            losses: None,
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

    /// The spans the Langfuse exporter lost, per rollout ([`LangfuseExporter::losses`]): an
    /// incomplete rollout with losses is answered 500 at once.
    ///
    /// [`LangfuseExporter::losses`]: llmgate_langfuse::LangfuseExporter::losses
    pub fn span_losses(mut self, losses: SpanLosses) -> Self {
        self.losses = Some(losses);
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

impl TracesService {
    async fn handle(&self, meta: Option<RouteMeta>, query: Option<&str>) -> Response<GatewayBody> {
        let pointwise = meta.as_ref().is_some_and(|m| m.kind == RouteKind::TracesPointwise);
        let params = match Params::parse(query) {
            Ok(p) => p,
            Err(message) => return detail(StatusCode::UNPROCESSABLE_ENTITY, message),
        };
        // The path's project wins over the query's.
        let named = meta.and_then(|m| m.project).or_else(|| params.project_id.clone());
        let project = match self.projects.current().resolve(named.as_deref()) {
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
        let job = match params.into_job(project, Instant::now() + self.settings.deadline) {
            Ok(job) => job,
            Err(message) => return detail(StatusCode::BAD_REQUEST, message),
        };
        let answer = match &job.rollout {
            _ if pointwise => self.pointwise(&job).await,
            Some(rollout) => self.rollout(&job, rollout).await,
            None => self.listing(&job).await,
        };
        match answer {
            Answer::Traces(traces) => render::answer(&job, traces),
            Answer::Refused(status, message) => detail(status, message),
            Answer::Failed(failure) => render::failed(failure, self.settings.deadline),
        }
    }
}

/// A uniform number in `[0, 1)` from the OS's randomness (via a v4 UUID).
fn random_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}
