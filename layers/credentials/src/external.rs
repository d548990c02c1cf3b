//! [`ExternalAuth`]: bearer tokens checked by an identity service over HTTP, and
//! [`FirstOf`], which asks providers in turn (static keys first, then the service).
//!
//! Why an HTTP check rather than JWTs: it is what a platform team already runs (an
//! introspection or "who is this token" endpoint in front of its identity system), it sees
//! revocations at once (a JWT stays valid until it expires), and it needs no key management in
//! the gateway. The answers are cached, so a busy client costs one call per `cache_ttl`.
//!
//! # The protocol
//!
//! `GET {url}` with the client's `Authorization` header, within `timeout`:
//!
//! - `200` with `{"name": "team-a", "projects": ["proj_a"] | ["*"], "limits": {"rpm": …,
//!   "tpm": …, "rpd": …}}` (`limits` optional): admitted as that account;
//! - `401`, `403` or `404`: the token is not valid: 401 to the client;
//! - anything else (another status, a body that is not that JSON, a timeout, no connection):
//!   503 to the client. It **fails closed**: an unanswered check never lets a request through.
//!
//! Admissions and refusals are cached for `cache_ttl` (refusals for at most 5 s, so a new token
//! works quickly), keyed by the token's SHA-256 digest; failures are not cached.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header, request::Parts};
use http_body::Body;
use llmgate_core::{
    BoxError, GatewayBody, GatewayError,
    catalog::Limits,
    ext::{AccountInfo, ProjectAccess},
    json::read_body,
};
use serde::Deserialize;
use tokio::time::Instant;
use tower_service::Service;

use crate::auth::{AuthFuture, AuthProvider, INVALID_KEY, KeyDigest, MISSING_KEY, bearer_token};

/// The default timeout of one check.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default lifetime of a cached answer.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
/// The longest a refusal is cached.
const REFUSAL_TTL: Duration = Duration::from_secs(5);
/// The most answers cached; past it, expired ones go, then all.
const CACHE_CAPACITY: usize = 10_000;
/// The largest identity answer read.
const ANSWER_LIMIT: usize = 64 * 1024;

/// An [`AuthProvider`] asking an identity service (see the module docs), over any HTTP client
/// service `C` (the proxy passes its pooled hyper client).
pub struct ExternalAuth<C> {
    client: C,
    url: Uri,
    timeout: Duration,
    cache_ttl: Duration,
    cache: Arc<Mutex<HashMap<KeyDigest, Cached>>>,
}

#[derive(Clone)]
struct Cached {
    account: Option<AccountInfo>,
    expires_at: Instant,
}

/// The identity service's answer.
#[derive(Deserialize)]
struct Identity {
    name: String,
    projects: Vec<String>,
    #[serde(default)]
    limits: Option<Limits>,
}

impl<C> ExternalAuth<C> {
    /// Checks tokens at `url` through `client`, with a 2 s timeout and a 60 s cache.
    pub fn new(client: C, url: Uri) -> Self {
        Self { client, url, timeout: DEFAULT_TIMEOUT, cache_ttl: DEFAULT_CACHE_TTL, cache: Arc::default() }
    }

    /// The longest one check may take; past it the request gets a 503.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long an answer is reused (refusals: at most 5 s). Zero turns the cache off.
    pub fn cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    fn cached(&self, digest: &KeyDigest) -> Option<Option<AccountInfo>> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.get(digest).filter(|c| c.expires_at > Instant::now()).map(|c| c.account.clone())
    }

    fn remember(&self, digest: KeyDigest, account: Option<AccountInfo>) {
        let ttl = if account.is_some() { self.cache_ttl } else { self.cache_ttl.min(REFUSAL_TTL) };
        if ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHE_CAPACITY {
            cache.retain(|_, c| c.expires_at > now);
            if cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
        }
        cache.insert(digest, Cached { account, expires_at: now + ttl });
    }
}

/// The future of [`IdentityClient::fetch`]: the status and body, or why there are none.
pub type FetchFuture = Pin<Box<dyn Future<Output = Result<(StatusCode, Bytes), String>> + Send>>;

/// What [`ExternalAuth`] needs of its HTTP client: any cloneable `tower::Service` over
/// [`GatewayBody`] whose futures are `Send` (the proxy's pooled hyper client is one). Blanket
/// implemented; the bounds are spelled out once, here.
pub trait IdentityClient: Clone + Send + Sync + 'static {
    /// Sends `request`; its status and body (at most 64 KiB), or why not.
    fn fetch(&self, request: Request<GatewayBody>) -> FetchFuture;
}

impl<C, F, RB> IdentityClient for C
where
    C: Service<Request<GatewayBody>, Response = Response<RB>, Future = F> + Clone + Send + Sync + 'static,
    C::Error: Into<BoxError>,
    // Naming the future (rather than bounding `C::Future`) sidesteps a higher-ranked `Send`
    // inference limitation of async blocks.
    F: Future<Output = Result<Response<RB>, C::Error>> + Send + 'static,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    fn fetch(&self, request: Request<GatewayBody>) -> FetchFuture {
        let mut client = self.clone();
        Box::pin(async move {
            std::future::poll_fn(|cx| client.poll_ready(cx)).await.map_err(|e| e.into().to_string())?;
            let response = client.call(request).await.map_err(|e| e.into().to_string())?;
            let status = response.status();
            let body = read_body(response.into_body(), ANSWER_LIMIT).await.map_err(|e| e.to_string())?;
            Ok((status, body))
        })
    }
}

impl<C: IdentityClient> ExternalAuth<C> {
    /// Asks the service about `authorization`: `Ok(Some)` admitted, `Ok(None)` refused, `Err`
    /// the service could not answer.
    async fn ask(&self, authorization: HeaderValue) -> Result<Option<AccountInfo>, String> {
        let mut request = Request::new(llmgate_core::body::empty());
        *request.method_mut() = Method::GET;
        *request.uri_mut() = self.url.clone();
        request.headers_mut().insert(header::AUTHORIZATION, authorization);
        request.headers_mut().insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let (status, body) = match tokio::time::timeout(self.timeout, self.client.fetch(request)).await {
            Ok(answer) => answer?,
            Err(_) => return Err(format!("no answer within {} ms", self.timeout.as_millis())),
        };
        match status {
            StatusCode::OK => {
                let identity: Identity =
                    serde_json::from_slice(&body).map_err(|e| format!("its answer is not an identity: {e}"))?;
                Ok(Some(identity.into_account()))
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => Ok(None),
            other => Err(format!("it answered {other}")),
        }
    }
}

impl Identity {
    fn into_account(self) -> AccountInfo {
        let projects = if self.projects.iter().any(|p| p == "*") {
            ProjectAccess::All
        } else {
            ProjectAccess::Only(self.projects.into())
        };
        AccountInfo { account_id: self.name, projects, limits: self.limits }
    }
}

impl<C: IdentityClient> AuthProvider for ExternalAuth<C> {
    fn authenticate<'a>(&'a self, request: &'a Parts) -> AuthFuture<'a> {
        Box::pin(async move {
            let Some(token) = bearer_token(&request.headers) else {
                return Err(GatewayError::Unauthorized(MISSING_KEY.into()));
            };
            let digest = KeyDigest::of(token);
            let answer = match self.cached(&digest) {
                Some(answer) => answer,
                None => {
                    // The token is visible ASCII (`bearer_token` checked it).
                    let authorization = HeaderValue::try_from(format!("Bearer {token}"))
                        .map_err(|_| GatewayError::Unauthorized(INVALID_KEY.into()))?;
                    match self.ask(authorization).await {
                        Ok(answer) => {
                            self.remember(digest, answer.clone());
                            answer
                        }
                        Err(why) => {
                            tracing::error!("the authentication service at {} failed: {why}", self.url);
                            return Err(GatewayError::ServiceUnavailable(
                                "The authentication service is unavailable; try again".into(),
                            ));
                        }
                    }
                }
            };
            answer.map(Some).ok_or_else(|| GatewayError::Unauthorized(INVALID_KEY.into()))
        })
    }

    /// The bearer is a gateway credential, not a provider key.
    fn consumes_authorization(&self) -> bool {
        true
    }
}

impl<C> fmt::Debug for ExternalAuth<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalAuth")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("cache_ttl", &self.cache_ttl)
            .finish_non_exhaustive()
    }
}

// === FirstOf ===

/// Asks each provider in turn: the first to admit decides; a 401 goes on to the next; any
/// other refusal (403, 503) ends the search. The last 401 is the answer when none admits.
pub struct FirstOf(Vec<Arc<dyn AuthProvider>>);

impl FirstOf {
    /// Asks `providers` in this order.
    pub fn new(providers: Vec<Arc<dyn AuthProvider>>) -> Self {
        Self(providers)
    }
}

impl AuthProvider for FirstOf {
    fn authenticate<'a>(&'a self, request: &'a Parts) -> AuthFuture<'a> {
        Box::pin(async move {
            let mut refusal = GatewayError::Unauthorized(INVALID_KEY.into());
            for provider in &self.0 {
                match provider.authenticate(request).await {
                    Err(error @ GatewayError::Unauthorized(_)) => refusal = error,
                    answer => return answer,
                }
            }
            Err(refusal)
        })
    }

    /// Every provider's bearer is the gateway's own when each says so.
    fn consumes_authorization(&self) -> bool {
        self.0.iter().all(|p| p.consumes_authorization())
    }
}

impl fmt::Debug for FirstOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("FirstOf").field(&self.0.len()).finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use llmgate_core::body;
    use tower::service_fn;

    use super::*;
    use crate::StaticApiKeys;

    /// An identity service answering by token: `admit-*` 200, `stall` never, `boom` 500,
    /// `junk` a body that is not an identity, anything else 401. Counts its calls.
    fn service(calls: Arc<AtomicUsize>) -> ExternalAuth<impl IdentityClient> {
        let client = service_fn(move |req: Request<GatewayBody>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let token = bearer_token(req.headers()).unwrap_or_default().to_string();
            async move {
                let reply = |status: StatusCode, text: &str| {
                    let mut response = Response::new(body::full(text.to_string()));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                };
                match token.as_str() {
                    "admit-solo" => {
                        reply(StatusCode::OK, r#"{"name": "team-a", "projects": ["p1"], "limits": {"rpm": 5}}"#)
                    }
                    "admit-all" => reply(StatusCode::OK, r#"{"name": "ops", "projects": ["*"]}"#),
                    "stall" => std::future::pending().await,
                    "boom" => reply(StatusCode::INTERNAL_SERVER_ERROR, "down"),
                    "junk" => reply(StatusCode::OK, r#"{"name": "no projects"}"#),
                    _ => reply(StatusCode::UNAUTHORIZED, "no"),
                }
            }
        });
        ExternalAuth::new(client, Uri::from_static("http://identity.test/verify")).timeout(Duration::from_millis(500))
    }

    fn head(token: &str) -> Parts {
        Request::get("/").header(header::AUTHORIZATION, format!("Bearer {token}")).body(()).unwrap().into_parts().0
    }

    #[tokio::test(start_paused = true)]
    async fn admits_refuses_and_fails_closed() {
        let calls = Arc::new(AtomicUsize::new(0));
        let auth = service(calls.clone());
        let account = auth.authenticate(&head("admit-solo")).await.unwrap().unwrap();
        assert_eq!(account.account_id, "team-a");
        assert_eq!(account.projects, ProjectAccess::Only(vec!["p1".to_string()].into()));
        assert_eq!(account.limits, Some(Limits { rpm: Some(5), tpm: None, rpd: None }));
        assert_eq!(auth.authenticate(&head("admit-all")).await.unwrap().unwrap().projects, ProjectAccess::All);
        let status = |r: Result<Option<AccountInfo>, GatewayError>| r.unwrap_err().status();
        assert_eq!(status(auth.authenticate(&head("wrong")).await), StatusCode::UNAUTHORIZED);
        assert_eq!(
            status(auth.authenticate(&Request::get("/").body(()).unwrap().into_parts().0).await),
            StatusCode::UNAUTHORIZED
        );
        // Never an open door: a timeout, a 500 and a malformed answer are 503s.
        for token in ["stall", "boom", "junk"] {
            assert_eq!(status(auth.authenticate(&head(token)).await), StatusCode::SERVICE_UNAVAILABLE, "{token}");
        }
        assert!(auth.consumes_authorization());
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_cached_failures_are_not() {
        let calls = Arc::new(AtomicUsize::new(0));
        let auth = service(calls.clone()).cache_ttl(Duration::from_secs(60));
        for _ in 0..3 {
            auth.authenticate(&head("admit-solo")).await.unwrap();
            auth.authenticate(&head("wrong")).await.unwrap_err();
            auth.authenticate(&head("boom")).await.unwrap_err();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2 + 3);
        // A refusal is kept 5 s, an admission the whole TTL.
        tokio::time::advance(Duration::from_secs(6)).await;
        auth.authenticate(&head("admit-solo")).await.unwrap();
        auth.authenticate(&head("wrong")).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        tokio::time::advance(Duration::from_secs(60)).await;
        auth.authenticate(&head("admit-solo")).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn first_of_asks_static_keys_then_the_service() {
        let calls = Arc::new(AtomicUsize::new(0));
        let providers: Vec<Arc<dyn AuthProvider>> =
            vec![Arc::new(StaticApiKeys::with_accounts([("local", "sk-local")])), Arc::new(service(calls.clone()))];
        let both = FirstOf::new(providers);
        assert_eq!(both.authenticate(&head("sk-local")).await.unwrap().unwrap().account_id, "local");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(both.authenticate(&head("admit-all")).await.unwrap().unwrap().account_id, "ops");
        assert_eq!(both.authenticate(&head("wrong")).await.unwrap_err().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(both.authenticate(&head("boom")).await.unwrap_err().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(both.consumes_authorization());
    }
}
