//! Client authentication: the [`AuthProvider`] trait, its two implementations and [`AuthLayer`].

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderMap, Request, header, request::Parts};
use llmgate_core::{BoxError, GatewayError, ext::AccountInfo};
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

/// Admits requests with `Authorization: Bearer <key>` for one of a fixed set of keys
/// (`auth.api_keys` in the config); anything else is 401.
///
/// The presented key is compared with **every** configured key in constant time (no early
/// exit on a match or on the first differing byte), so timing reveals neither which key
/// matched nor how much of one did. The account id of a match is the configured name, or
/// `api-key-<n>` (1-based position) for keys given without one.
#[derive(Clone)]
pub struct StaticApiKeys {
    keys: Arc<[(AccountInfo, Box<[u8]>)]>,
}

impl StaticApiKeys {
    /// The given keys, named `api-key-1`, `api-key-2`, … Empty keys are ignored.
    pub fn new<I, K>(keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: AsRef<str>,
    {
        Self::with_accounts(keys.into_iter().enumerate().map(|(i, key)| (format!("api-key-{}", i + 1), key)))
    }

    /// The given `(account_id, key)` pairs. Empty keys are ignored.
    pub fn with_accounts<I, A, K>(keys: I) -> Self
    where
        I: IntoIterator<Item = (A, K)>,
        A: Into<String>,
        K: AsRef<str>,
    {
        let keys = keys
            .into_iter()
            .filter(|(_, key)| !key.as_ref().trim().is_empty())
            .map(|(account, key)| (AccountInfo { account_id: account.into() }, key.as_ref().trim().as_bytes().into()))
            .collect();
        Self { keys }
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
            return Err(GatewayError::Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>'".into()));
        };
        let mut found: Option<usize> = None;
        let mut matched_any = 0u8;
        for (index, (_, key)) in self.keys.iter().enumerate() {
            let equal = constant_time_eq(presented.as_bytes(), key);
            // Record the first match without branching on the comparison itself.
            let take = equal & !matched_any & 1;
            matched_any |= equal;
            if std::hint::black_box(take) == 1 {
                found = Some(index);
            }
        }
        match found.and_then(|index| self.keys.get(index)) {
            Some((account, _)) => Ok(account.clone()),
            None => Err(GatewayError::Unauthorized("Invalid API key".into())),
        }
    }
}

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
        f.debug_struct("StaticApiKeys").field("keys", &self.keys.len()).finish_non_exhaustive()
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
}

impl AuthLayer {
    /// A layer asking `provider`.
    pub fn new(provider: Arc<dyn AuthProvider>) -> Self {
        Self { provider }
    }

    /// A layer that admits everyone ([`NoAuth`]).
    pub fn no_auth() -> Self {
        Self::new(Arc::new(NoAuth))
    }
}

impl Default for AuthLayer {
    fn default() -> Self {
        Self::no_auth()
    }
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, provider: self.provider.clone() }
    }
}

/// Asks the [`AuthProvider`] before calling the inner service; inserts [`AccountInfo`] when
/// the provider returns one, refuses with the provider's error otherwise. A provider whose
/// credential is the gateway's own ([`AuthProvider::consumes_authorization`]) has the
/// `Authorization` header removed here, so it is never forwarded.
///
/// **Requires:** nothing. **Provides:** `AccountInfo` (when known).
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    provider: Arc<dyn AuthProvider>,
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

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready service moves into the future; the clone stays for the next call.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        let provider = self.provider.clone();
        let (mut parts, body) = req.into_parts();
        Box::pin(async move {
            let account = provider.authenticate(&parts).await?;
            if let Some(account) = account {
                parts.extensions.insert(account);
            }
            if provider.consumes_authorization() {
                parts.headers.remove(header::AUTHORIZATION);
            }
            ready.call(Request::from_parts(parts, body)).await.map_err(Into::into)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use http::{HeaderValue, Response, StatusCode};
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
                Ok::<_, Infallible>(req.headers().contains_key(header::AUTHORIZATION))
            }));
            let req = Request::get("/v1/models").header(header::AUTHORIZATION, "Bearer sk-gw").body(()).unwrap();
            svc.oneshot(req).await.unwrap()
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

    #[tokio::test]
    async fn custom_provider_can_be_async_and_see_the_head() {
        struct ByPath;
        impl AuthProvider for ByPath {
            fn authenticate<'a>(&'a self, request: &'a Parts) -> AuthFuture<'a> {
                Box::pin(async move {
                    tokio::task::yield_now().await;
                    if request.uri.path() == "/chat/completions" {
                        Ok(Some(AccountInfo { account_id: "by-path".into() }))
                    } else {
                        Err(GatewayError::Unauthorized("no".into()))
                    }
                })
            }
        }
        assert_eq!(call(AuthLayer::new(Arc::new(ByPath)), None).await.unwrap().1, "by-path");
    }
}
