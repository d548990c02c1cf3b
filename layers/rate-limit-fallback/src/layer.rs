//! The layer and its service: check the budget per attempt, wait a little or walk the chain.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, GatewayBody, GatewayError, body,
    catalog::{Catalog, Limits, ModelSpec},
    ext::{
        AccountInfo, BodyEdits, ClientScope, CredentialScope, EditScope, FallbackEvent, FallbackEvents, LlmRequest,
        ModelChoice, ServedBy, TokenEstimate, UpstreamMode,
    },
    usage,
};
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    classify::{Upstream429, classify_429, retry_after},
    stats::Stats,
    store::{Cooldowns, Decision, RateStore},
};

/// How much of an upstream 429 body is read to classify it.
pub const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Layer that applies [`RateLimitFallback`].
#[derive(Clone)]
pub struct RateLimitFallbackLayer {
    catalog: Arc<Catalog>,
    store: Arc<dyn RateStore>,
    max_wait: Duration,
    max_attempts: u32,
    default_retry_after: Duration,
    stats: Arc<Stats>,
}

// === impl RateLimitFallbackLayer ===

impl RateLimitFallbackLayer {
    /// A layer over `catalog`'s limits and chains, with budgets in `store`: no waiting
    /// (`max_wait` 0), at most 5 upstream attempts per request.
    pub fn new(catalog: Arc<Catalog>, store: Arc<dyn RateStore>) -> Self {
        Self {
            catalog,
            stats: Arc::new(Stats::new(store.clone())),
            store,
            max_wait: Duration::ZERO,
            max_attempts: 5,
            default_retry_after: Duration::from_secs(60),
        }
    }

    /// The longest wait for budget accepted before falling back (`max_wait_seconds`).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// The most upstream attempts per request (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The cooldown after an upstream 429 that names no wait (default 60 s).
    pub fn default_retry_after(mut self, after: Duration) -> Self {
        self.default_retry_after = after;
        self
    }

    /// The counters (shared by every service this layer makes).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }
}

impl std::fmt::Debug for RateLimitFallbackLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitFallbackLayer")
            .field("max_wait", &self.max_wait)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RateLimitFallbackLayer {
    type Service = RateLimitFallback<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitFallback { inner, config: Arc::new(self.clone()) }
    }
}

/// Sends each chat request to the first model of its chain that has budget; see the crate docs.
#[derive(Clone)]
pub struct RateLimitFallback<S> {
    inner: S,
    config: Arc<RateLimitFallbackLayer>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for RateLimitFallback<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitFallback").field("inner", &self.inner).field("config", &self.config).finish()
    }
}

// === impl RateLimitFallback ===

impl<S, F> Service<Request<GatewayBody>> for RateLimitFallback<S>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Future = F> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<Response<GatewayBody>, S::Error>> + Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        // The ready service moves into the future; the clone stays for the next call.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(route(self.config.clone(), ready, req))
    }
}

/// One request: the account's own budget (when its key has limits), then the models'.
async fn route<S, F>(
    config: Arc<RateLimitFallbackLayer>,
    mut inner: S,
    req: Request<GatewayBody>,
) -> Result<Response<GatewayBody>, BoxError>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Future = F> + Send + 'static,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<Response<GatewayBody>, S::Error>> + Send + 'static,
{
    let Some(llm) = req.extensions().get::<LlmRequest>().cloned() else {
        // Not a parsed chat request: nothing to route.
        return inner.call(req).await.map_err(Into::into);
    };
    Stats::bump(&config.stats.total_requests);
    // Without an estimate from context routing, a rough one: 4 bytes per token.
    let estimate = req.extensions().get::<TokenEstimate>().map(|e| e.tokens);
    let tokens = estimate.unwrap_or(llm.raw().len() as u64 / 4);
    let Some((bucket, limits)) = req.extensions().get::<AccountInfo>().and_then(account_budget) else {
        return walk(&config, inner, req, llm, estimate, tokens).await;
    };
    // Counted over every model the account uses, so checked before any of them; a key's
    // refusal is its own 429, not a reason to try another model.
    let mut waited = Duration::ZERO;
    while let Decision::Limited { retry_after, .. } = config.store.check(&bucket, &limits, tokens).await {
        if waited + retry_after > config.max_wait {
            let account = bucket.trim_start_matches(ACCOUNT_BUCKET).to_string();
            return Err(GatewayError::AccountRateLimited { account, retry_after: Some(retry_after) }.into());
        }
        Stats::bump(&config.stats.rate_limit_waits);
        tokio::time::sleep(retry_after).await;
        waited += retry_after;
    }
    let mut response = walk(&config, inner, req, llm, estimate, tokens).await?;
    correct_tpm(&config, &mut response, bucket, limits, tokens);
    Ok(response)
}

/// The prefix of an account's budget in the rate store, apart from every model name.
const ACCOUNT_BUCKET: &str = "@account/";

/// The bucket and limits of an account that has limits of its own.
fn account_budget(account: &AccountInfo) -> Option<(Arc<str>, Limits)> {
    let limits = account.limits.filter(|l| l.rpm.is_some() || l.tpm.is_some() || l.rpd.is_some())?;
    Some((Arc::from(format!("{ACCOUNT_BUCKET}{}", account.account_id)), limits))
}

/// The loop over a chat request's candidate models.
async fn walk<S, F>(
    config: &Arc<RateLimitFallbackLayer>,
    mut inner: S,
    req: Request<GatewayBody>,
    llm: LlmRequest,
    estimate: Option<u64>,
    tokens: u64,
) -> Result<Response<GatewayBody>, BoxError>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Future = F> + Send + 'static,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<Response<GatewayBody>, S::Error>> + Send + 'static,
{
    let stats = &config.stats;
    let entry = req.extensions().get::<ModelChoice>().cloned();
    if entry.as_ref().is_some_and(|c| !c.is_primary()) {
        Stats::bump(&stats.context_fallbacks);
    }
    let current: Option<Arc<str>> = match &entry {
        Some(choice) => Some(choice.current.clone()),
        None => llm.model().map(Arc::from),
    };
    let spec = current.as_deref().and_then(|m| config.catalog.get(m)).cloned();
    let (Some(current), Some(spec)) = (current, spec) else {
        // No model or one the catalogue does not know: one untouched attempt.
        let requested_primary = entry.as_ref().is_none_or(ModelChoice::is_primary);
        let response = inner.call(req).await.map_err(Into::into)?;
        Stats::bump(if requested_primary { &stats.primary_requests } else { &stats.fallback_requests });
        return Ok(response);
    };
    let requested = entry.map_or_else(|| current.clone(), |c| c.requested);
    let events = req.extensions().get::<FallbackEvents>().cloned();
    // The cooldowns that concern this client: the shared ones, unless it chose the endpoint,
    // and those its own credentials earned.
    let client = req.extensions().get::<ClientScope>().cloned();
    let cooldowns = match &client {
        None => Cooldowns::Shared,
        Some(scope) if scope.endpoint => Cooldowns::Scope(scope.id.as_str()),
        Some(scope) => Cooldowns::SharedAndScope(scope.id.as_str()),
    };
    let (parts, _client_body) = req.into_parts();
    let had_model_edit = parts
        .extensions
        .get::<BodyEdits>()
        .is_some_and(|e| e.for_mode(UpstreamMode::OpenAi).any(|(k, _)| k == "model"));

    let candidates = candidates(&config.catalog, &spec, current, estimate);
    let mut tried: Vec<String> = Vec::new();
    let mut soonest: Option<Duration> = None;
    let mut given_up: Option<(Arc<str>, &'static str)> = None;
    let mut attempts: u32 = 0;
    // The latest provider 429 earned with the client's own credentials or endpoint, and the
    // latest one earned with the gateway's: the answer when nothing else can be done (see the
    // end of the chain).
    let mut own_429: Option<(http::response::Parts, Bytes, Arc<str>)> = None;
    let mut gateway_429: Option<(http::response::Parts, Bytes, Arc<str>)> = None;

    'candidates: for (model, limits) in candidates {
        if attempts >= config.max_attempts {
            break;
        }
        if let Some((from, reason)) = given_up.take()
            && let Some(events) = &events
        {
            events.record(FallbackEvent::RateLimit {
                original_model: from.to_string(),
                fallback_model: model.to_string(),
                reason,
            });
        }
        tried.push(model.to_string());
        let mut waited = Duration::ZERO;
        loop {
            if let Decision::Limited { limited_by, retry_after } =
                config.store.check_with(&model, cooldowns, &limits, tokens).await
            {
                if waited + retry_after <= config.max_wait {
                    Stats::bump(&stats.rate_limit_waits);
                    tokio::time::sleep(retry_after).await;
                    waited += retry_after;
                    continue;
                }
                soonest = Some(soonest.map_or(retry_after, |s| s.min(retry_after)));
                Stats::bump(&stats.rate_limit_fallbacks);
                given_up = Some((model, limited_by.reason()));
                continue 'candidates;
            }

            if attempts > 0 {
                std::future::poll_fn(|cx| inner.poll_ready(cx)).await.map_err(Into::into)?;
            }
            attempts += 1;
            let mut attempt = parts.clone();
            attempt.extensions.insert(ModelChoice {
                requested: requested.clone(),
                current: model.clone(),
                attempt: attempts,
            });
            if had_model_edit || llm.model() != Some(&*model) {
                let mut edits = attempt.extensions.get::<BodyEdits>().cloned().unwrap_or_default();
                edits.set("model", Value::String(model.to_string()), EditScope::Always);
                attempt.extensions.insert(edits);
            }
            let request = Request::from_parts(attempt, body::full(llm.raw().clone()));
            let response = inner.call(request).await.map_err(Into::into)?;

            if response.status() != StatusCode::TOO_MANY_REQUESTS {
                return Ok(served(config, response, &requested, &model, &limits, tokens, attempts));
            }

            // Upstream 429: cool down what earned it (the model for everyone when the gateway's
            // own credentials did, else only the client's scope), then wait or move on.
            Stats::bump(&stats.upstream_429s);
            let (head, body) = response.into_parts();
            let after = retry_after(&head.headers, SystemTime::now());
            let error_body = read_capped(body, ERROR_BODY_LIMIT).await;
            let (cooldown, reason) = match classify_429(&error_body) {
                Upstream429::Quota => (config.store.until_daily_reset(), "upstream_quota"),
                Upstream429::Transient => (after.unwrap_or(config.default_retry_after), "upstream_429"),
            };
            match head.extensions.get::<CredentialScope>() {
                Some(CredentialScope::Client(scope)) => {
                    tracing::debug!(
                        %model, %scope, ?cooldown, reason,
                        "upstream 429 on the client's own credentials or endpoint; cooling down that scope only"
                    );
                    config.store.cool_down_scope(&model, scope.as_str(), cooldown).await;
                    stats.cooled_down(&Arc::from(format!("{model} {scope}")), cooldown);
                    own_429 = Some((head, error_body, model.clone()));
                }
                Some(CredentialScope::Gateway) | None => {
                    tracing::debug!(%model, ?cooldown, reason, "upstream 429; cooling the model down");
                    config.store.cool_down(&model, cooldown).await;
                    stats.cooled_down(&model, cooldown);
                    gateway_429 = Some((head, error_body, model.clone()));
                }
            }
            if reason == "upstream_429" && waited + cooldown <= config.max_wait && attempts < config.max_attempts {
                Stats::bump(&stats.rate_limit_waits);
                tokio::time::sleep(cooldown).await;
                waited += cooldown;
                continue;
            }
            soonest = Some(soonest.map_or(cooldown, |s| s.min(cooldown)));
            Stats::bump(&stats.rate_limit_fallbacks);
            given_up = Some((model, reason));
            continue 'candidates;
        }
    }

    Stats::bump(&stats.chains_exhausted);
    // The provider's own 429 reaches the client when its own credentials earned it, or when no
    // other model was tried (nothing was rerouted, so a summary of the chain would only hide
    // the provider's text); after a walk down a configured chain the gateway's 429 names the
    // models tried.
    let provider_429 = own_429.or_else(|| gateway_429.filter(|_| tried.len() == 1));
    if let Some((mut head, error_body, model)) = provider_429 {
        // The provider's own answer: its status, headers and error text, with the gateway's
        // `Retry-After` (the cooldown it applies: a quota lasts until the daily reset, an HTTP
        // date becomes seconds), as on its own 429s.
        head.headers.remove(header::CONTENT_LENGTH);
        head.headers.remove(header::TRANSFER_ENCODING);
        if let Some(after) = soonest {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            head.headers.insert(header::RETRY_AFTER, http::HeaderValue::from(secs.max(1)));
        }
        let upstream = upstream_of(config, &head.extensions, &model);
        head.extensions.insert(ServedBy { model, upstream, attempts });
        return Ok(Response::from_parts(head, body::full(error_body)));
    }
    Err(GatewayError::RateLimited { retry_after: soonest, tried }.into())
}

/// The model itself, then its `fallbacks` in order (each once), skipping fallbacks whose
/// context window is smaller than the request's estimate. A fallback the catalogue does not
/// know has no limits and no known window.
fn candidates(
    catalog: &Catalog,
    spec: &ModelSpec,
    current: Arc<str>,
    estimate: Option<u64>,
) -> Vec<(Arc<str>, Limits)> {
    let mut out: Vec<(Arc<str>, Limits)> = vec![(current, spec.limits)];
    for name in &spec.fallbacks {
        if out.iter().any(|(m, _)| **m == **name) {
            continue;
        }
        let fallback = catalog.get(name);
        let window = fallback.and_then(|f| f.context_window);
        if let (Some(estimate), Some(window)) = (estimate, window)
            && window < estimate
        {
            continue;
        }
        out.push((Arc::from(name.as_str()), fallback.map(|f| f.limits).unwrap_or_default()));
    }
    out
}

/// Finishes a response that is passed on: counters, `ServedBy`, the tpm correction.
fn served(
    config: &RateLimitFallbackLayer,
    mut response: Response<GatewayBody>,
    requested: &Arc<str>,
    model: &Arc<str>,
    limits: &Limits,
    tokens: u64,
    attempts: u32,
) -> Response<GatewayBody> {
    let stats = &config.stats;
    Stats::bump(if requested == model { &stats.primary_requests } else { &stats.fallback_requests });
    correct_tpm(config, &mut response, model.clone(), *limits, tokens);
    let upstream = upstream_of(config, response.extensions(), model);
    response.extensions_mut().insert(ServedBy { model: model.clone(), upstream, attempts });
    response
}

/// Once the response's usage is known, corrects the tpm budget of `bucket` (a model, or an
/// account) from the estimated `tokens` to the real count. Nothing to do without a tpm limit.
fn correct_tpm(
    config: &RateLimitFallbackLayer,
    response: &mut Response<GatewayBody>,
    bucket: Arc<str>,
    limits: Limits,
    tokens: u64,
) {
    if limits.tpm.is_none() {
        return;
    }
    let store = config.store.clone();
    usage::tap(response, 0).subscribe(move |outcome| {
        let Some(used) = outcome.usage else { return };
        // Never block the task that polls the body: correct on a task of its own.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { store.correct_tokens(&bucket, &limits, tokens, used.total).await });
        }
    });
}

/// The upstream that answered for `model`: as an inner layer said, else the catalogue's.
fn upstream_of(config: &RateLimitFallbackLayer, extensions: &http::Extensions, model: &str) -> Arc<str> {
    extensions
        .get::<ServedBy>()
        .map(|s| s.upstream.clone())
        .or_else(|| config.catalog.get(model).and_then(|s| s.upstream.as_deref()).map(Arc::from))
        .unwrap_or_else(|| Arc::from("default"))
}

/// Reads at most `limit` bytes of a body; a failing body gives what was read.
async fn read_capped(mut body: GatewayBody, limit: usize) -> Bytes {
    let mut out = Vec::new();
    while out.len() < limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = limit - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    Bytes::from(out)
}
