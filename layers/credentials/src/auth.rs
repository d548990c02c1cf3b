//! Client authentication: the [`AuthProvider`] trait, its two implementations and [`AuthLayer`].

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
};

use http::{HeaderMap, Request, Response, header, request::Parts};
use llmgate_core::{
    BoxError, GatewayError,
    ext::{AccountInfo, ProjectAccess, RouteKind, RouteMeta},
};

use crate::{reload::Reloadable, secrets::Projects};
use tower_layer::Layer;
use tower_service::Service;

/// The future an [`AuthProvider`] returns.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Option<AccountInfo>, GatewayError>> + Send + 'a>>;

/// Decides whether a request may proceed, and who sent it.
///
/// `Ok(Some(info))` admits the request and records [`AccountInfo`]; `Ok(None)` admits it
/// anonymously; `Err(e)` refuses it (typically `GatewayError::Unauthorized`, a 401). The
/// provider sees the request head only: it runs before the body is read.
pub trait AuthProvider: Send + Sync + 'static {
    /// Authenticates one request.
    fn authenticate<'a>(&'a self, request: &'a Parts) -> AuthFuture<'a>;

    /// Whether the `Authorization` header is this gateway's own credential: then [`Auth`]
    /// removes it once accepted, so it never reaches an upstream (which gets its own keys).
    /// `false` by default: the client's header is its provider key and goes on.
    fn consumes_authorization(&self) -> bool {
        false
    }
}

// === NoAuth ===

/// Admits everyone, anonymously (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoAuth;

impl AuthProvider for NoAuth {
    fn authenticate<'a>(&'a self, _request: &'a Parts) -> AuthFuture<'a> {
        Box::pin(std::future::ready(Ok(None)))
    }
}

// === StaticApiKeys ===

/// The SHA-256 digest of a gateway key: what the configuration may hold instead of the key
/// (`key_sha256`, `sha256:…`), and what a presented key is compared with.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// The digest of `key` (surrounding whitespace ignored, as in a presented bearer token).
    pub fn of(key: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.trim().as_bytes());
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest.as_ref());
        Self(bytes)
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Result<Self, String> {
        let hex = hex.trim();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a SHA-256 key digest is 64 hex digits (`llmgate hash-key` prints one)".into());
        }
        let mut bytes = [0; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks(2)) {
            let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
            *byte = digit(pair[0]) << 4 | digit(pair[1]);
        }
        Ok(Self(bytes))
    }

    /// 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Digests are not secrets, but a digest of a weak key can be guessed: kept out of logs too.
impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(…)")
    }
}

/// One gateway key: its name (what logs and metrics show), its digest, the projects it may use
/// and its own limits.
#[derive(Clone, Debug)]
pub struct GatewayKey {
    /// Who it is, as logs and metrics show it.
    pub account: AccountInfo,
    /// The digest of the key.
    pub digest: KeyDigest,
}

/// Admits requests with `Authorization: Bearer <key>` for one of a fixed set of keys
/// (`auth.keys` and `auth.api_keys` in the config); anything else is 401.
///
/// Only digests are kept (a plain key in the config is digested at load). A presented key is
/// digested once and compared with **every** configured digest in constant time (no early exit
/// on a match or on the first differing byte), so timing reveals neither which key matched nor
/// how much of one did.
#[derive(Clone)]
pub struct StaticApiKeys {
    keys: Arc<[GatewayKey]>,
}

impl StaticApiKeys {
    /// The given keys, for every project, named `api-key-1`, `api-key-2`, … Empty keys are
    /// ignored.
    pub fn new<I, K>(keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        Self::with_accounts(keys.into_iter().enumerate().map(|(i, key)| (format!("api-key-{}", i + 1), key)))
    }

    /// The given `(account_id, key)` pairs, for every project. Empty keys are ignored.
    pub fn with_accounts<I, A, K>(keys: I) -> Self
    where
        I: IntoIterator<Item = (A, K)>,
        A: Into<String>,
        K: AsRef<str>,
    {
        Self::from_keys(
            keys.into_iter()
                .filter(|(_, key)| !key.as_ref().trim().is_empty())
                .map(|(account, key)| GatewayKey {
                    account: AccountInfo::unrestricted(account),
                    digest: KeyDigest::of(key.as_ref()),
                })
                .collect::<Vec<_>>(),
        )
    }

    /// The given keys, each with its projects and limits.
    pub fn from_keys(keys: impl Into<Arc<[GatewayKey]>>) -> Self {
        Self { keys: keys.into() }
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is configured (then every request is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The account of `headers`' bearer token, or 401.
    pub fn check(&self, headers: &HeaderMap) -> Result<AccountInfo, GatewayError> {
        let Some(presented) = bearer_token(headers) else {
            return Err(GatewayError::Unauthorized(MISSING_KEY.into()));
        };
        self.find(&KeyDigest::of(presented)).cloned().ok_or_else(|| GatewayError::Unauthorized(INVALID_KEY.into()))
    }

    /// The account whose key has `digest`, compared with every key in constant time.
    fn find(&self, digest: &KeyDigest) -> Option<&AccountInfo> {
        let mut found: Option<usize> = None;
        let mut matched_any = 0u8;
        for (index, key) in self.keys.iter().enumerate() {
            let equal = constant_time_eq(&digest.0, &key.digest.0);
            // Record the first match without branching on the comparison itself.
            let take = equal & !matched_any & 1;
            matched_any |= equal;
            if std::hint::black_box(take) == 1 {
                found = Some(index);
            }
        }
        found.and_then(|index| self.keys.get(index)).map(|key| &key.account)
    }
}

/// The 401 message without a bearer token.
pub(crate) const MISSING_KEY: &str = "Missing API key: send it as 'Authorization: Bearer <key>'";
/// The 401 message for a key nobody knows.
pub(crate) const INVALID_KEY: &str = "Invalid API key";

impl AuthProvider for StaticApiKeys {
    fn authenticate<'a>(&'a self, request: &'a Parts) -> AuthFuture<'a> {
        Box::pin(std::future::ready(self.check(&request.headers).map(Some)))
    }

    /// The bearer is the gateway's key, not a provider key.
    fn consumes_authorization(&self) -> bool {
        true
    }
}

impl fmt::Debug for StaticApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|k| k.account.account_id.as_str()).collect();
        f.debug_struct("StaticApiKeys").field("keys", &names).finish_non_exhaustive()
    }
}

/// `1` when `a == b`, else `0`, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> u8 {
    let mut diff = u8::from(a.len() != b.len());
    for (i, y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(!*y);
        diff |= x ^ y;
    }
    let diff = std::hint::black_box(diff);
    // 1 iff diff == 0.
    (((u16::from(diff)).wrapping_sub(1) >> 8) & 1) as u8
}

/// The client's bearer token: the `Authorization` value after a case-insensitive `Bearer `,
/// trimmed; `None` when absent, not a bearer token, not visible ASCII or empty.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case("bearer ") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

// === AuthLayer ===

/// Layer that applies [`Auth`] with a shared [`AuthProvider`].
///
/// Place it before the body is read, so an unauthenticated client cannot make the gateway
/// buffer a body; it guards every route except `/health`.
///
/// ```
/// use std::sync::Arc;
/// use http::{header, Request, Response, StatusCode};
/// use llmgate_core::{ext::AccountInfo, BoxError, GatewayError};
/// use llmgate_credentials::{AuthLayer, StaticApiKeys};
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(AuthLayer::new(Arc::new(StaticApiKeys::with_accounts([("team-a", "sk-gw-1")]))))
///     .service(service_fn(|req: Request<()>| async move {
///         let account = req.extensions().get::<AccountInfo>().unwrap().account_id.clone();
///         Ok::<_, BoxError>(Response::new(account))
///     }));
///
/// let ok = Request::get("/v1/models").header(header::AUTHORIZATION, "Bearer sk-gw-1").body(()).unwrap();
/// assert_eq!(svc.clone().oneshot(ok).await.unwrap().into_body(), "team-a");
///
/// let error = svc.oneshot(Request::get("/v1/models").body(()).unwrap()).await.unwrap_err();
/// assert_eq!(GatewayError::find(&*error).unwrap().status(), StatusCode::UNAUTHORIZED);
/// # }
/// ```
#[derive(Clone)]
pub struct AuthLayer {
    provider: Arc<dyn AuthProvider>,
    projects: Option<Reloadable<Projects>>,
    whole_gateway: bool,
    refusals: Arc<Refusals>,
}

impl AuthLayer {
    /// A layer asking `provider`.
    pub fn new(provider: Arc<dyn AuthProvider>) -> Self {
        Self { provider, projects: None, whole_gateway: false, refusals: Arc::default() }
    }

    /// A layer that admits everyone ([`NoAuth`]).
    pub fn no_auth() -> Self {
        Self::new(Arc::new(NoAuth))
    }

    /// The projects whose default a request without a project uses (see [`Auth`]): an
    /// `Arc<Projects>`, or the [`Reloadable`] a secrets reload swaps.
    pub fn projects(mut self, projects: impl Into<Reloadable<Projects>>) -> Self {
        self.projects = Some(projects.into());
        self
    }

    /// For a route that shows every project's data at once (`/stats`, `/metrics`): only
    /// accounts that may use every project pass, others get a 403.
    pub fn whole_gateway(mut self) -> Self {
        self.whole_gateway = true;
        self
    }

    /// The refusals counted so far (shared by every clone and by the layers made with
    /// [`whole_gateway`](Self::whole_gateway) from one of them).
    pub fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }
}

impl Default for AuthLayer {
    fn default() -> Self {
        Self::no_auth()
    }
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer").field("whole_gateway", &self.whole_gateway).finish_non_exhaustive()
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, layer: self.clone() }
    }
}

/// Asks the [`AuthProvider`] before calling the inner service, then applies the account's
/// project rules; inserts [`AccountInfo`] into the request and the response when the provider
/// returns one, refuses otherwise. A provider whose credential is the gateway's own
/// ([`AuthProvider::consumes_authorization`]) has the `Authorization` header removed here, so
/// it is never forwarded.
///
/// The project rules, for an account limited to some projects:
///
/// - a project named by the request (its path's `project_id`; for the trace routes also the
///   `project_id` query parameter) that the account does not hold: 403;
/// - no project named, on a gateway route: an account with exactly one project uses it (it
///   becomes the request's [`RouteMeta`] project); one that holds the default project uses the
///   default; any other: 403 (it must name one);
/// - the catch-all (no [`RouteMeta`]) names no project's data: any account passes;
/// - a [`whole_gateway`](AuthLayer::whole_gateway) route: 403.
///
/// Every refusal is counted in [`Refusals`] and logged as one `llmgate::audit` line (the
/// account's name, never its key).
///
/// **Requires:** (`RouteMeta`). **Provides:** `AccountInfo` (when known), on the response too.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S> Auth<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> fmt::Debug for Auth<S>
where
    S: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl<S, B, ResBody> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, BoxError>> + Send>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready service moves into the future; the clone stays for the next call.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let (mut parts, body) = req.into_parts();
        Box::pin(async move {
            let account = match layer.provider.authenticate(&parts).await {
                Ok(account) => account,
                Err(error) => return Err(layer.refuse(&parts, None, error).into()),
            };
            if let Some(account) = &account
                && let Err(error) = layer.apply_projects(account, &mut parts)
            {
                return Err(layer.refuse(&parts, Some(account), error).into());
            }
            if layer.provider.consumes_authorization() {
                parts.headers.remove(header::AUTHORIZATION);
            }
            if let Some(account) = &account {
                parts.extensions.insert(account.clone());
            }
            let mut response = ready.call(Request::from_parts(parts, body)).await.map_err(Into::into)?;
            if let Some(account) = account {
                response.extensions_mut().insert(account);
            }
            Ok(response)
        })
    }
}

impl AuthLayer {
    /// The project rules of [`Auth`] for `account`.
    fn apply_projects(&self, account: &AccountInfo, parts: &mut Parts) -> Result<(), GatewayError> {
        let ProjectAccess::Only(held) = &account.projects else {
            return Ok(());
        };
        if self.whole_gateway {
            return Err(GatewayError::Forbidden(
                "This API key is limited to its projects; this route shows every project's data".into(),
            ));
        }
        let Some(meta) = parts.extensions.get_mut::<RouteMeta>() else {
            return Ok(());
        };
        let traces = matches!(meta.kind, RouteKind::Traces | RouteKind::TracesPointwise);
        let named = meta.project.clone().or_else(|| traces.then(|| query_project(parts.uri.query())).flatten());
        match named {
            Some(project) if account.projects.allows(&project) => Ok(()),
            Some(project) => Err(GatewayError::Forbidden(format!("This API key may not use project '{project}'"))),
            None => {
                if let Some(single) = account.projects.single() {
                    meta.project = Some(single.to_owned());
                    return Ok(());
                }
                let projects = self.projects.as_ref().map(Reloadable::current);
                let default = projects.as_deref().and_then(Projects::default_project).map(|p| &*p.id);
                if default.is_some_and(|default| held.iter().any(|p| p == default)) {
                    Ok(())
                } else {
                    Err(GatewayError::Forbidden(
                        "This API key holds several projects: name one in the path (/project_id/{project}/…)".into(),
                    ))
                }
            }
        }
    }

    /// Counts and logs a refusal; hands the error back.
    fn refuse(&self, parts: &Parts, account: Option<&AccountInfo>, error: GatewayError) -> GatewayError {
        let key = account.map_or("unknown", |a| a.account_id.as_str());
        let reason = match (&error, account) {
            (GatewayError::Forbidden(_), _) => "project",
            (GatewayError::Unauthorized(message), _) if message == MISSING_KEY => "missing_key",
            (GatewayError::Unauthorized(_), _) => "invalid_key",
            _ => "unavailable",
        };
        self.refusals.count(key, reason);
        tracing::warn!(
            target: "llmgate::audit",
            key,
            reason,
            status = error.status().as_u16(),
            method = %parts.method,
            path = parts.uri.path(),
            "request refused: {error}"
        );
        error
    }
}

/// The `project_id` query parameter of a trace route.
fn query_project(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(key, value)| key == "project_id" && !value.is_empty())
        .map(|(_, value)| value.into_owned())
}

// === Refusals ===

/// Refused requests by account name (`unknown` when the key is) and reason (`missing_key`,
/// `invalid_key`, `project`, `unavailable`), read at scrape time.
#[derive(Debug, Default)]
pub struct Refusals(Mutex<BTreeMap<(String, &'static str), u64>>);

impl Refusals {
    fn count(&self, key: &str, reason: &'static str) {
        // Refusals are rare: a lock per refusal is fine, and it is never held across an await.
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry((key.to_owned(), reason)).or_default() += 1;
    }

    /// `((account, reason), count)` for every pair seen.
    pub fn snapshot(&self) -> Vec<((String, &'static str), u64)> {
        let counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use http::{HeaderValue, StatusCode};
    use tower::{ServiceExt, service_fn};

    use super::*;

    fn headers(authorization: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    #[test]
    fn constant_time_eq_is_eq() {
        for (a, b) in [("", ""), ("a", "a"), ("abc", "abc"), ("abc", "abd"), ("abc", "ab"), ("ab", "abc"), ("", "a")] {
            assert_eq!(constant_time_eq(a.as_bytes(), b.as_bytes()) == 1, a == b, "{a} {b}");
        }
        // A presented key that is the configured key's prefix padded with its complement.
        assert_eq!(constant_time_eq(&[0x00], &[0x00, 0xff]), 0);
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer_token(&headers(Some("Bearer sk-1"))), Some("sk-1"));
        assert_eq!(bearer_token(&headers(Some("bearer  sk-1 "))), Some("sk-1"));
        assert_eq!(bearer_token(&headers(Some("Basic sk-1"))), None);
        assert_eq!(bearer_token(&headers(Some("Bearer "))), None);
        assert_eq!(bearer_token(&headers(Some("Bearer"))), None);
        assert_eq!(bearer_token(&headers(None)), None);
    }

    #[test]
    fn static_keys() {
        let keys =
            StaticApiKeys::with_accounts([("alice", "sk-alice"), ("bob", "sk-bob"), ("dup", "sk-bob"), ("empty", " ")]);
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.check(&headers(Some("Bearer sk-alice"))).unwrap().account_id, "alice");
        assert_eq!(keys.check(&headers(Some("Bearer sk-bob"))).unwrap().account_id, "bob");
        for bad in [
            None,
            Some("Bearer sk-ali"),
            Some("Bearer sk-alicex"),
            Some("sk-alice"),
            Some("Bearer "),
            Some("Basic sk-alice"),
        ] {
            let error = keys.check(&headers(bad)).unwrap_err();
            assert_eq!(error.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
            assert!(!error.to_string().contains("sk-"), "{error}");
        }
        let numbered = StaticApiKeys::new(["k1", "k2"]);
        assert_eq!(numbered.check(&headers(Some("Bearer k2"))).unwrap().account_id, "api-key-2");
        assert!(StaticApiKeys::new(Vec::<String>::new()).check(&headers(Some("Bearer "))).is_err());
        assert!(!format!("{keys:?}").contains("sk-"));
    }

    async fn call(layer: AuthLayer, authorization: Option<&str>) -> Result<(StatusCode, String), BoxError> {
        let svc = layer.layer(service_fn(|req: Request<()>| async move {
            let account = req.extensions().get::<AccountInfo>().map(|a| a.account_id.clone()).unwrap_or_default();
            Ok::<_, Infallible>(Response::new(account))
        }));
        let mut builder = Request::post("/chat/completions");
        if let Some(value) = authorization {
            builder = builder.header(header::AUTHORIZATION, value);
        }
        let response = svc.oneshot(builder.body(()).unwrap()).await?;
        Ok((response.status(), response.into_body()))
    }

    #[tokio::test]
    async fn the_gateways_own_key_is_consumed_a_provider_key_goes_on() {
        let forwarded = |layer: AuthLayer| async move {
            let svc = layer.layer(service_fn(|req: Request<()>| async move {
                Ok::<_, Infallible>(Response::new(req.headers().contains_key(header::AUTHORIZATION)))
            }));
            let req = Request::get("/v1/models").header(header::AUTHORIZATION, "Bearer sk-gw").body(()).unwrap();
            svc.oneshot(req).await.unwrap().into_body()
        };
        assert!(!forwarded(AuthLayer::new(Arc::new(StaticApiKeys::new(["sk-gw"])))).await);
        assert!(forwarded(AuthLayer::no_auth()).await);
    }

    #[tokio::test]
    async fn layer_admits_and_refuses() {
        let keys = AuthLayer::new(Arc::new(StaticApiKeys::with_accounts([("alice", "sk-alice")])));
        assert_eq!(call(keys.clone(), Some("Bearer sk-alice")).await.unwrap(), (StatusCode::OK, "alice".into()));
        for bad in [None, Some("Bearer nope")] {
            let error = call(keys.clone(), bad).await.unwrap_err();
            let error = GatewayError::find(&*error).unwrap();
            assert!(matches!(error, GatewayError::Unauthorized(_)));
            assert_eq!(error.to_response().status(), StatusCode::UNAUTHORIZED);
        }
        assert_eq!(call(AuthLayer::default(), None).await.unwrap(), (StatusCode::OK, String::new()));
    }

    #[test]
    fn digests_read_and_write_hex() {
        let digest = KeyDigest::of(" sk-team-a\n");
        assert_eq!(digest, KeyDigest::of("sk-team-a"));
        assert_eq!(KeyDigest::from_hex(&digest.to_hex()).unwrap(), digest);
        assert_eq!(KeyDigest::from_hex(&digest.to_hex().to_uppercase()).unwrap(), digest);
        // SHA-256("test"), as `printf test | sha256sum` prints it.
        assert_eq!(KeyDigest::of("test").to_hex(), "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63)] {
            assert!(KeyDigest::from_hex(bad).is_err(), "{bad}");
        }
        assert!(!format!("{digest:?}").contains(&digest.to_hex()[..8]));
    }

    fn key(name: &str, secret: &str, projects: &[&str]) -> GatewayKey {
        let projects = if projects == ["*"] {
            ProjectAccess::All
        } else {
            ProjectAccess::Only(projects.iter().map(|p| p.to_string()).collect())
        };
        GatewayKey {
            account: AccountInfo { account_id: name.into(), projects, limits: None },
            digest: KeyDigest::of(secret),
        }
    }

    /// Calls a layer over a service that answers the request's project, for `path` (with the
    /// `RouteMeta` of `kind` when a route) and `key`.
    async fn project_of(
        layer: &AuthLayer,
        kind: Option<RouteKind>,
        uri: &str,
        project: Option<&str>,
        key: &str,
    ) -> Result<String, GatewayError> {
        let svc = layer.layer(service_fn(|req: Request<()>| async move {
            let project = req.extensions().get::<RouteMeta>().and_then(|m| m.project.clone());
            Ok::<_, Infallible>(Response::new(project.unwrap_or_else(|| "-".into())))
        }));
        let mut req = Request::get(uri).header(header::AUTHORIZATION, format!("Bearer {key}")).body(()).unwrap();
        if let Some(kind) = kind {
            req.extensions_mut().insert(RouteMeta {
                kind,
                project: project.map(Into::into),
                rollout: None,
                encoded_base_url: None,
            });
        }
        match svc.oneshot(req).await {
            Ok(response) => Ok(response.into_body()),
            Err(error) => Err(GatewayError::find(&*error).unwrap().clone()),
        }
    }

    #[tokio::test]
    async fn keys_are_bound_to_their_projects() {
        let secrets = crate::Secrets::from_yaml_str(
            "langfuse_keys: {p1: {public_key: a, secret_key: b}, p2: {public_key: c, secret_key: d}}\ndefault_project_id: p1\n",
        )
        .unwrap();
        let keys = StaticApiKeys::from_keys(vec![
            key("solo", "sk-solo", &["p2"]),
            key("pair", "sk-pair", &["p1", "p3"]),
            key("other-pair", "sk-other", &["p2", "p3"]),
            key("all", "sk-all", &["*"]),
        ]);
        let layer = AuthLayer::new(Arc::new(keys)).projects(Arc::new(crate::Projects::from(secrets)));
        let chat = Some(RouteKind::ChatCompletions);
        let traces = Some(RouteKind::Traces);
        let forbidden = |r: Result<String, GatewayError>| matches!(r, Err(GatewayError::Forbidden(_)));

        // Named projects: held or 403 (the message names only the project asked for).
        assert_eq!(project_of(&layer, chat, "/c", Some("p2"), "sk-solo").await.unwrap(), "p2");
        let refused = project_of(&layer, chat, "/c", Some("p1"), "sk-solo").await.unwrap_err();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        assert_eq!(refused.to_string(), "This API key may not use project 'p1'");
        assert!(forbidden(project_of(&layer, chat, "/c", Some("nope"), "sk-solo").await));
        assert_eq!(project_of(&layer, chat, "/c", Some("p3"), "sk-pair").await.unwrap(), "p3");
        assert_eq!(project_of(&layer, chat, "/c", Some("p9"), "sk-all").await.unwrap(), "p9");
        // The trace routes' query parameter counts as naming one.
        assert!(forbidden(project_of(&layer, traces, "/traces?project_id=p1", None, "sk-solo").await));
        // (Admitted: the trace service reads the query's project itself.)
        assert_eq!(project_of(&layer, traces, "/traces?project_id=p%32", None, "sk-solo").await.unwrap(), "-");

        // No project: the single one, else the default when held, else 403.
        assert_eq!(project_of(&layer, chat, "/c", None, "sk-solo").await.unwrap(), "p2");
        assert_eq!(project_of(&layer, traces, "/traces", None, "sk-solo").await.unwrap(), "p2");
        assert_eq!(project_of(&layer, chat, "/c", None, "sk-pair").await.unwrap(), "-");
        assert!(forbidden(project_of(&layer, chat, "/c", None, "sk-other").await));
        assert_eq!(project_of(&layer, chat, "/c", None, "sk-all").await.unwrap(), "-");

        // The catch-all names no project; a whole-gateway route needs every project.
        assert_eq!(project_of(&layer, None, "/v1/models", None, "sk-solo").await.unwrap(), "-");
        let stats = layer.clone().whole_gateway();
        assert!(forbidden(project_of(&stats, None, "/stats", None, "sk-pair").await));
        assert_eq!(project_of(&stats, None, "/stats", None, "sk-all").await.unwrap(), "-");

        // Refusals are counted by name and reason; an unknown key is `unknown`.
        assert!(project_of(&layer, chat, "/c", None, "sk-nobody").await.is_err());
        let refusals = layer.refusals().snapshot();
        assert!(refusals.contains(&(("solo".into(), "project"), 3)), "{refusals:?}");
        assert!(refusals.contains(&(("unknown".into(), "invalid_key"), 1)), "{refusals:?}");
    }

    #[tokio::test]
    async fn custom_provider_can_be_async_and_see_the_head() {
        struct ByPath;
        impl AuthProvider for ByPath {
            fn authenticate<'a>(&'a self, request: &'a Parts) -> AuthFuture<'a> {
                Box::pin(async move {
                    tokio::task::yield_now().await;
                    if request.uri.path() == "/chat/completions" {
                        Ok(Some(AccountInfo::unrestricted("by-path")))
                    } else {
                        Err(GatewayError::Unauthorized("no".into()))
                    }
                })
            }
        }
        assert_eq!(call(AuthLayer::new(Arc::new(ByPath)), None).await.unwrap().1, "by-path");
    }
}
