//! [`UpstreamAuthLayer`]: the upstream credentials of one attempt.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response, header};
use llmgate_core::{
    BoxError, GatewayError,
    ext::{
        BaseUrlOverride, BodyEdits, ClientScope, CredentialScope, EditScope, LlmRequest, UpstreamMode, UpstreamTarget,
    },
};
use pin_project_lite::pin_project;
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use llmgate_core::future::ResponseFuture;

use crate::{auth::bearer_token, scope::client_scope};

const LITELLM: EditScope = EditScope::Mode(UpstreamMode::LiteLlm);

/// Models whose `litellm`-mode body gets the client's key as `api_key` (as the original does).
pub const API_KEY_MODEL_PREFIX: &str = "fireworks_ai";

// === UpstreamAuthLayer ===

/// Layer that applies [`UpstreamAuth`]. Place it **per attempt**, inside the fallback loop,
/// after the layer that writes [`UpstreamTarget`].
///
/// ```
/// use http::{header, Request, Response};
/// use llmgate_core::{ext::{Secret, UpstreamMode, UpstreamTarget}, BoxError};
/// use llmgate_credentials::UpstreamAuthLayer;
/// use tower::{service_fn, ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let svc = ServiceBuilder::new()
///     .layer(UpstreamAuthLayer::new())
///     .service(service_fn(|req: Request<()>| async move {
///         let auth = req.headers()[header::AUTHORIZATION].to_str().unwrap().to_owned();
///         Ok::<_, BoxError>(Response::new(auth))
///     }));
///
/// let mut req = Request::post("/chat/completions")
///     .header(header::AUTHORIZATION, "Bearer sk-client")
///     .body(())
///     .unwrap();
/// req.extensions_mut().insert(UpstreamTarget {
///     name: "openai".into(),
///     base_url: "https://api.openai.com/v1".into(),
///     mode: UpstreamMode::OpenAi,
///     api_key: Some(Secret::new("sk-server")),
/// });
/// assert_eq!(svc.oneshot(req).await.unwrap().into_body(), "Bearer sk-server");
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct UpstreamAuthLayer {
    _priv: (),
}

impl UpstreamAuthLayer {
    /// A new layer.
    pub const fn new() -> Self {
        Self { _priv: () }
    }
}

impl<S> Layer<S> for UpstreamAuthLayer {
    type Service = UpstreamAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UpstreamAuth { inner }
    }
}

// === UpstreamAuth ===

/// Sets the credentials of one upstream attempt.
///
/// - **Header.** If [`UpstreamTarget::api_key`] is set (the upstream's `api_key_env`), the
///   `Authorization` header becomes `Bearer <that key>` (marked sensitive); otherwise the
///   client's `Authorization` is forwarded as it came.
/// - **Body (`litellm` mode only).** When the attempt's model (the `model` body edit if any,
///   else the client's `model`) starts with `fireworks_ai`, the body edit `api_key` is set to
///   the client's bearer token, scoped to `litellm` mode. For any other model no `api_key`
///   edit of this layer remains (an earlier one is undone, restoring the client's own value).
///   Nothing is added for an attempt whose [`UpstreamTarget`] is in `openai` mode.
/// - **Scope.** The response carries [`CredentialScope`]: `Client` (with the request's
///   [`ClientScope`] id) when the attempt sent anything the client chose: its own
///   `Authorization` (no server-side key applies), its token as the body's `api_key`, or its
///   `encoded_base_url` ([`BaseUrlOverride`]) as endpoint; else `Gateway` (a configured
///   upstream with the server-side key, or with no key at all). A provider's 429 then cools down
///   only what earned it.
///
/// **Requires:** nothing (without [`UpstreamTarget`] the client's header is forwarded and the
/// `litellm`-scoped edit is still decided, for `EncodeJson`'s default mode; without
/// [`ClientScope`] the scope is computed here).
/// **Provides:** the `Authorization` header, [`BodyEdits`] `api_key`, response
/// [`CredentialScope`].
#[derive(Clone, Debug)]
pub struct UpstreamAuth<S> {
    inner: S,
}

impl<S> UpstreamAuth<S> {
    /// Wraps `inner`.
    pub const fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for UpstreamAuth<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = UpstreamAuthFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match prepare(&mut req) {
            Ok(scope) => UpstreamAuthFuture { inner: ResponseFuture::future(self.inner.call(req)), scope: Some(scope) },
            Err(error) => UpstreamAuthFuture { inner: ResponseFuture::refused(error), scope: None },
        }
    }
}

pin_project! {
    /// The response future of [`UpstreamAuth`]: the inner response with its [`CredentialScope`].
    pub struct UpstreamAuthFuture<F> {
        #[pin]
        inner: ResponseFuture<F>,
        scope: Option<CredentialScope>,
    }
}

impl<F, RB, E> Future for UpstreamAuthFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<RB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = std::task::ready!(this.inner.poll(cx));
        if let (Ok(response), Some(scope)) = (&mut result, this.scope.take()) {
            response.extensions_mut().insert(scope);
        }
        Poll::Ready(result)
    }
}

/// Sets the attempt's credentials; returns whose they are.
fn prepare<B>(req: &mut Request<B>) -> Result<CredentialScope, GatewayError> {
    let target = req.extensions().get::<UpstreamTarget>();
    let server_key = target.and_then(|t| t.api_key.as_ref()).map(|key| authorization(key.expose())).transpose()?;
    let openai = target.is_some_and(|t| t.mode == UpstreamMode::OpenAi);
    let mut client_key_in_body = false;
    if !openai {
        let client_token = bearer_token(req.headers()).map(str::to_owned);
        client_key_in_body = body_api_key(req.extensions_mut(), client_token);
    }
    let client_header = server_key.is_none() && req.headers().contains_key(header::AUTHORIZATION);
    let client_endpoint = req.extensions().get::<BaseUrlOverride>().is_some();
    let scope = if client_header || client_key_in_body || client_endpoint {
        let id = match req.extensions().get::<ClientScope>() {
            Some(scope) => Some(scope.id.clone()),
            None => client_scope(req.headers(), req.extensions().get::<BaseUrlOverride>()).map(|s| s.id),
        };
        id.map_or(CredentialScope::Gateway, CredentialScope::Client)
    } else {
        CredentialScope::Gateway
    };
    if let Some(value) = server_key {
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    Ok(scope)
}

fn authorization(key: &str) -> Result<HeaderValue, GatewayError> {
    let mut value = HeaderValue::try_from(format!("Bearer {key}"))
        .map_err(|_| GatewayError::Internal("The upstream's API key is not a valid header value".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Decides the `litellm`-scoped `api_key` edit of this attempt; `true` when it carries the
/// client's token.
fn body_api_key(extensions: &mut http::Extensions, client_token: Option<String>) -> bool {
    let edits = extensions.get::<BodyEdits>();
    let edited_model = edits.and_then(|e| {
        e.for_mode(UpstreamMode::LiteLlm).filter(|(key, _)| *key == "model").last().map(|(_, value)| value)
    });
    let model = match edited_model {
        Some(value) => value.and_then(Value::as_str),
        None => extensions.get::<LlmRequest>().and_then(LlmRequest::model),
    };
    let wants_key = model.is_some_and(|m| m.starts_with(API_KEY_MODEL_PREFIX));
    let has_edit = edits.is_some_and(|e| e.for_mode(UpstreamMode::LiteLlm).any(|(key, _)| key == "api_key"));
    match (wants_key, client_token) {
        (true, Some(token)) => {
            extensions.get_or_insert_default::<BodyEdits>().set("api_key", Value::String(token), LITELLM);
            return true;
        }
        _ if has_edit => {
            // Undo an edit left by an earlier attempt: back to what the client sent.
            let original = extensions.get::<LlmRequest>().and_then(|r| r.json().get("api_key").cloned());
            let edits = extensions.get_or_insert_default::<BodyEdits>();
            match original {
                Some(value) => edits.set("api_key", value, LITELLM),
                None => edits.remove("api_key", LITELLM),
            }
        }
        _ => {}
    }
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::Response;
    use llmgate_core::{ext::Secret, json::encode};
    use tower::{ServiceExt, service_fn};

    use super::*;

    fn target(mode: UpstreamMode, key: Option<&str>) -> UpstreamTarget {
        UpstreamTarget { name: "u".into(), base_url: "http://up".into(), mode, api_key: key.map(Secret::new) }
    }

    fn llm(body: &'static str) -> LlmRequest {
        LlmRequest::new(Bytes::from_static(body.as_bytes()), serde_json::from_str(body).unwrap())
    }

    /// A chat request with the client's `Authorization`, the parsed body and the attempt's target.
    fn chat_request(target: Option<UpstreamTarget>, client_auth: Option<&str>, body: &'static str) -> Request<()> {
        let mut builder = Request::post("/chat/completions");
        if let Some(value) = client_auth {
            builder = builder.header(header::AUTHORIZATION, value);
        }
        let mut req = builder.body(()).unwrap();
        req.extensions_mut().insert(llm(body));
        if let Some(target) = target {
            req.extensions_mut().insert(target);
        }
        req
    }

    /// Runs the layer; returns (Authorization seen, body for the target's mode).
    async fn run(
        target: Option<UpstreamTarget>,
        client_auth: Option<&str>,
        body: &'static str,
        edits: Option<BodyEdits>,
    ) -> (Option<String>, String) {
        let mode = target.as_ref().map_or(UpstreamMode::LiteLlm, |t| t.mode);
        let svc = UpstreamAuthLayer::new().layer(service_fn(move |req: Request<()>| async move {
            let auth = req.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap().to_owned());
            let request = req.extensions().get::<LlmRequest>().unwrap();
            let sent = encode(request, req.extensions().get::<BodyEdits>(), mode);
            Ok::<_, Infallible>(Response::new((auth, String::from_utf8(sent.to_vec()).unwrap())))
        }));
        let mut req = chat_request(target, client_auth, body);
        if let Some(edits) = edits {
            req.extensions_mut().insert(edits);
        }
        svc.oneshot(req).await.unwrap().into_body()
    }

    #[tokio::test]
    async fn forwards_client_authorization_by_default() {
        let (auth, body) =
            run(Some(target(UpstreamMode::OpenAi, None)), Some("Bearer sk-client"), r#"{"model":"gpt-4o"}"#, None)
                .await;
        assert_eq!(auth.as_deref(), Some("Bearer sk-client"));
        assert_eq!(body, r#"{"model":"gpt-4o"}"#);
        let (auth, _) = run(None, None, r#"{"model":"gpt-4o"}"#, None).await;
        assert_eq!(auth, None);
    }

    #[tokio::test]
    async fn server_side_key_replaces_authorization() {
        let (auth, _) = run(
            Some(target(UpstreamMode::OpenAi, Some("sk-server"))),
            Some("Bearer sk-client"),
            r#"{"model":"m"}"#,
            None,
        )
        .await;
        assert_eq!(auth.as_deref(), Some("Bearer sk-server"));
        let (auth, _) =
            run(Some(target(UpstreamMode::OpenAi, Some("sk-server"))), None, r#"{"model":"m"}"#, None).await;
        assert_eq!(auth.as_deref(), Some("Bearer sk-server"));
    }

    #[tokio::test]
    async fn fireworks_models_get_api_key_in_litellm_mode_only() {
        let fw = r#"{"model":"fireworks_ai/accounts/fireworks/models/x"}"#;
        let (_, body) = run(Some(target(UpstreamMode::LiteLlm, None)), Some("Bearer sk-client"), fw, None).await;
        assert_eq!(body, r#"{"model":"fireworks_ai/accounts/fireworks/models/x","api_key":"sk-client"}"#);
        // The client's token even when the server-side key replaces the header.
        let (auth, body) =
            run(Some(target(UpstreamMode::LiteLlm, Some("sk-server"))), Some("Bearer sk-client"), fw, None).await;
        assert_eq!(auth.as_deref(), Some("Bearer sk-server"));
        assert!(body.contains(r#""api_key":"sk-client""#), "{body}");
        // openai mode: nothing.
        let (_, body) = run(Some(target(UpstreamMode::OpenAi, None)), Some("Bearer sk-client"), fw, None).await;
        assert_eq!(body, fw);
        // Other models: nothing.
        let (_, body) =
            run(Some(target(UpstreamMode::LiteLlm, None)), Some("Bearer sk-client"), r#"{"model":"gpt-4o"}"#, None)
                .await;
        assert_eq!(body, r#"{"model":"gpt-4o"}"#);
        // No bearer token: nothing.
        let (_, body) = run(Some(target(UpstreamMode::LiteLlm, None)), None, fw, None).await;
        assert_eq!(body, fw);
    }

    #[tokio::test]
    async fn the_attempts_model_edit_decides() {
        // The routing layer moved the request to a Fireworks model.
        let mut edits = BodyEdits::default();
        edits.set("model", "fireworks_ai/m".into(), EditScope::Always);
        let (_, body) =
            run(Some(target(UpstreamMode::LiteLlm, None)), Some("Bearer k"), r#"{"model":"gpt-4o"}"#, Some(edits))
                .await;
        assert_eq!(body, r#"{"model":"fireworks_ai/m","api_key":"k"}"#);

        // Moved away from one, with a stale edit from an earlier attempt: undone, client's value back.
        let mut edits = BodyEdits::default();
        edits.set("model", "gpt-4o".into(), EditScope::Always);
        edits.set("api_key", "k".into(), LITELLM);
        let (_, body) = run(
            Some(target(UpstreamMode::LiteLlm, None)),
            Some("Bearer k"),
            r#"{"model":"fireworks_ai/m","api_key":"mine"}"#,
            Some(edits.clone()),
        )
        .await;
        assert_eq!(body, r#"{"model":"gpt-4o","api_key":"mine"}"#);
        let (_, body) = run(
            Some(target(UpstreamMode::LiteLlm, None)),
            Some("Bearer k"),
            r#"{"model":"fireworks_ai/m"}"#,
            Some(edits),
        )
        .await;
        assert_eq!(body, r#"{"model":"gpt-4o"}"#);
    }

    /// Runs the layer; returns the response's `CredentialScope`.
    async fn scope_of(
        target: Option<UpstreamTarget>,
        client_auth: Option<&str>,
        body: &'static str,
        base_url: Option<&str>,
    ) -> Option<CredentialScope> {
        let svc = UpstreamAuthLayer::new()
            .layer(service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) }));
        let mut req = chat_request(target, client_auth, body);
        if let Some(url) = base_url {
            let url = BaseUrlOverride(url.into());
            let scope = client_scope(req.headers(), Some(&url)).unwrap();
            req.extensions_mut().insert(scope);
            req.extensions_mut().insert(url);
        }
        svc.oneshot(req).await.unwrap().extensions().get::<CredentialScope>().cloned()
    }

    #[tokio::test]
    async fn the_response_says_whose_credentials_the_attempt_used() {
        let gpt = r#"{"model":"gpt-4o"}"#;
        let id = |auth: &str, url: Option<&str>| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::AUTHORIZATION, auth.parse().unwrap());
            let url = url.map(|u| BaseUrlOverride(u.into()));
            CredentialScope::Client(client_scope(&headers, url.as_ref()).unwrap().id)
        };
        let openai = |key| Some(target(UpstreamMode::OpenAi, key));
        // The client's own key goes upstream: its scope.
        assert_eq!(scope_of(openai(None), Some("Bearer sk-a"), gpt, None).await, Some(id("Bearer sk-a", None)));
        // The server-side key replaces it, or nobody sends any: the gateway's.
        assert_eq!(
            scope_of(openai(Some("sk-s")), Some("Bearer sk-a"), gpt, None).await,
            Some(CredentialScope::Gateway)
        );
        assert_eq!(scope_of(openai(None), None, gpt, None).await, Some(CredentialScope::Gateway));
        // An endpoint the client chose is the client's, with or without a key.
        let url = "https://api.example.com/v1";
        let endpoint_only = scope_of(openai(None), None, gpt, Some(url)).await.unwrap();
        assert!(matches!(endpoint_only, CredentialScope::Client(_)));
        assert_eq!(
            scope_of(openai(None), Some("Bearer sk-a"), gpt, Some(url)).await,
            Some(id("Bearer sk-a", Some(url)))
        );
        // litellm: the client's token as the body's `api_key` is the client's key.
        let fw = r#"{"model":"fireworks_ai/x"}"#;
        let litellm = Some(target(UpstreamMode::LiteLlm, Some("sk-s")));
        assert_eq!(scope_of(litellm.clone(), Some("Bearer sk-a"), fw, None).await, Some(id("Bearer sk-a", None)));
        assert_eq!(scope_of(litellm, Some("Bearer sk-a"), gpt, None).await, Some(CredentialScope::Gateway));
    }

    #[tokio::test]
    async fn bad_server_key_fails_closed_without_echo() {
        let svc = UpstreamAuthLayer::new()
            .layer(service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) }));
        let mut req = Request::post("/").body(()).unwrap();
        req.extensions_mut().insert(target(UpstreamMode::OpenAi, Some("sk-bad\nkey")));
        let error = svc.oneshot(req).await.unwrap_err();
        let error = GatewayError::find(&*error).unwrap();
        assert!(matches!(error, GatewayError::Internal(_)));
        assert!(!error.to_string().contains("sk-bad"));
    }
}
