//! [`ProjectLayer`]: the request's project, its Langfuse keys and the `encoded_base_url`.

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Extensions, HeaderMap, Request};
use llmgate_core::{
    BoxError, GatewayError,
    ext::{BaseUrlOverride, BodyEdits, EditScope, Project, RouteMeta, UpstreamMode},
};
use serde_json::Value;
use tower_layer::Layer;
use tower_service::Service;

use llmgate_core::future::ResponseFuture;

use crate::{base_url::BaseUrlAllowlist, reload::Reloadable, scope::client_scope, secrets::Projects};

/// `LANGFUSE_HOST`'s default.
pub const DEFAULT_LANGFUSE_HOST: &str = "https://cloud.langfuse.com";

const LITELLM: EditScope = EditScope::Mode(UpstreamMode::LiteLlm);

// === ProjectLayer ===

/// Layer that applies [`ProjectService`].
#[derive(Clone)]
pub struct ProjectLayer {
    config: Arc<Config>,
}

#[derive(Clone)]
struct Config {
    projects: Reloadable<Projects>,
    langfuse_host: Arc<str>,
    allowlist: BaseUrlAllowlist,
}

impl ProjectLayer {
    /// A layer resolving projects from `projects` (an `Arc<Projects>`, or a [`Reloadable`] to
    /// swap them while it runs), with the default Langfuse host and an empty `encoded_base_url`
    /// allowlist (every override refused).
    pub fn new(projects: impl Into<Reloadable<Projects>>) -> Self {
        Self {
            config: Arc::new(Config {
                projects: projects.into(),
                langfuse_host: DEFAULT_LANGFUSE_HOST.into(),
                allowlist: BaseUrlAllowlist::empty(),
            }),
        }
    }

    /// The Langfuse host written into `litellm`-mode bodies (`LANGFUSE_HOST`).
    pub fn langfuse_host(mut self, url: impl Into<Arc<str>>) -> Self {
        self.config_mut(|c| c.langfuse_host = url.into());
        self
    }

    /// The `encoded_base_url.allow` entries. An entry that does not parse is logged at error
    /// level and allows nothing; validate the config with [`BaseUrlAllowlist::parse`] at start
    /// (and pass the result to [`allowlist`](Self::allowlist)) to refuse it instead.
    pub fn base_url_allowlist(self, entries: Vec<String>) -> Self {
        let valid: Vec<&String> = entries
            .iter()
            .filter(|entry| match BaseUrlAllowlist::parse([entry]) {
                Ok(_) => true,
                Err(error) => {
                    tracing::error!(%error, "ignoring an encoded_base_url.allow entry");
                    false
                }
            })
            .collect();
        self.allowlist(BaseUrlAllowlist::parse(valid).unwrap_or_default())
    }

    /// An already parsed allowlist.
    pub fn allowlist(mut self, allowlist: BaseUrlAllowlist) -> Self {
        self.config_mut(|c| c.allowlist = allowlist);
        self
    }

    fn config_mut(&mut self, f: impl FnOnce(&mut Config)) {
        f(Arc::make_mut(&mut self.config));
    }
}

impl fmt::Debug for ProjectLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectLayer")
            .field("projects", &self.projects)
            .field("langfuse_host", &self.langfuse_host)
            .field("allowlist", &self.allowlist)
            .finish()
    }
}

impl<S> Layer<S> for ProjectLayer {
    type Service = ProjectService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ProjectService { inner, config: self.config.clone() }
    }
}

// === ProjectService ===

/// Resolves the request's project and its `encoded_base_url`.
///
/// **Requires:** nothing (reads [`RouteMeta`] when present; without it the request is taken to
/// name no project and no base URL). **Provides:** [`Project`], [`BaseUrlOverride`],
/// [`ClientScope`](llmgate_core::ext::ClientScope), [`BodyEdits`] (`langfuse_public_key`, `langfuse_secret_key`,
/// `langfuse_host`, `base_url`, all scoped to `litellm` mode).
///
/// 1. Project: the path's `project_id`, or the default. A named project that is not
///    configured is `NotFound("Project 'x' not found")` (404). No project named and no secrets
///    configured: no `Project`, the request goes on.
/// 2. `encoded_base_url`: decoded and checked against the allowlist (400 / 403, see
///    [`BaseUrlAllowlist::check`]).
/// 3. [`ClientScope`](llmgate_core::ext::ClientScope): the digest of the client's `Authorization` and chosen base URL
///    ([`client_scope`](crate::client_scope)), when it sent either, so that the routing layers
///    know which cooldowns concern this client.
#[derive(Clone)]
pub struct ProjectService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> ProjectService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for ProjectService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectService").field("inner", &self.inner).field("config", &self.config).finish()
    }
}

impl<S, B> Service<Request<B>> for ProjectService<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        match self.config.prepare(&parts.headers, &mut parts.extensions) {
            Ok(()) => ResponseFuture::future(self.inner.call(Request::from_parts(parts, body))),
            Err(error) => ResponseFuture::refused(error),
        }
    }
}

impl Config {
    fn prepare(&self, headers: &HeaderMap, extensions: &mut Extensions) -> Result<(), GatewayError> {
        let meta = extensions.get::<RouteMeta>();
        let project = self.projects.current().resolve(meta.and_then(|m| m.project.as_deref()))?;
        let base_url = meta
            .and_then(|m| m.encoded_base_url.as_deref())
            .map(|encoded| self.allowlist.check(encoded))
            .transpose()?;
        if let Some(scope) = client_scope(headers, base_url.clone().map(BaseUrlOverride).as_ref()) {
            extensions.insert(scope);
        }
        if project.is_none() && base_url.is_none() {
            return Ok(());
        }
        let edits = extensions.get_or_insert_default::<BodyEdits>();
        if let Some(project) = &project {
            let keys = &project.langfuse;
            edits.set("langfuse_public_key", Value::from(&*keys.public_key), LITELLM);
            edits.set("langfuse_secret_key", Value::from(keys.secret_key.expose()), LITELLM);
            edits.set("langfuse_host", Value::from(&*self.langfuse_host), LITELLM);
        }
        if let Some(url) = &base_url {
            edits.set("base_url", Value::from(&**url), LITELLM);
        }
        if let Some(project) = project {
            extensions.insert::<Project>(project);
        }
        if let Some(url) = base_url {
            extensions.insert(BaseUrlOverride(url));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::convert::Infallible;

    use base64::{Engine as _, engine::general_purpose::URL_SAFE};
    use bytes::Bytes;
    use http::{Response, StatusCode};
    use llmgate_core::{
        body,
        ext::{ClientScope, LlmRequest, RolloutIds, RouteKind},
        json::encode,
    };
    use tower::{ServiceExt, service_fn};

    use super::*;
    use crate::Secrets;

    const YAML: &str = "langfuse_keys:\n  p1: {public_key: pk-lf-1, secret_key: sk-lf-1}\n  p2: {public_key: pk-lf-2, secret_key: sk-lf-2}\ndefault_project_id: p1\n";

    fn projects() -> Arc<Projects> {
        Arc::new(Projects::from(Secrets::from_yaml_str(YAML).unwrap()))
    }

    fn meta(project: Option<&str>, encoded_base_url: Option<String>) -> RouteMeta {
        RouteMeta {
            kind: RouteKind::ChatCompletions,
            project: project.map(Into::into),
            rollout: Some(RolloutIds {
                rollout_id: "r".into(),
                invocation_id: "i".into(),
                experiment_id: "e".into(),
                run_id: "u".into(),
                row_id: "w".into(),
            }),
            encoded_base_url,
        }
    }

    /// Runs `layer` over a request with `meta` and returns the extensions the inner service saw.
    async fn run(layer: ProjectLayer, meta: Option<RouteMeta>) -> Result<Extensions, BoxError> {
        let svc = layer.layer(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(req.extensions().clone()))
        }));
        let mut req = Request::post("/chat/completions").body(()).unwrap();
        if let Some(meta) = meta {
            req.extensions_mut().insert(meta);
        }
        Ok(svc.oneshot(req).await?.into_body())
    }

    fn body_for(extensions: &Extensions, mode: UpstreamMode) -> String {
        let raw = Bytes::from_static(br#"{"model":"m","base_url":"client"}"#);
        let request = LlmRequest::new(raw.clone(), serde_json::from_slice(&raw).unwrap());
        String::from_utf8(encode(&request, extensions.get::<BodyEdits>(), mode).to_vec()).unwrap()
    }

    #[tokio::test]
    async fn default_and_named_projects() {
        let layer = ProjectLayer::new(projects()).langfuse_host("https://lf.example");
        let seen = run(layer.clone(), Some(meta(None, None))).await.unwrap();
        assert_eq!(seen.get::<Project>().map(|p| &*p.id), Some("p1"));
        let seen = run(layer.clone(), Some(meta(Some("p2"), None))).await.unwrap();
        assert_eq!(seen.get::<Project>().map(|p| &*p.id), Some("p2"));
        assert_eq!(
            body_for(&seen, UpstreamMode::LiteLlm),
            r#"{"model":"m","base_url":"client","langfuse_public_key":"pk-lf-2","langfuse_secret_key":"sk-lf-2","langfuse_host":"https://lf.example"}"#
        );
        assert_eq!(body_for(&seen, UpstreamMode::OpenAi), r#"{"model":"m","base_url":"client"}"#);
        // No RouteMeta at all: the default project.
        let seen = run(layer, None).await.unwrap();
        assert_eq!(seen.get::<Project>().map(|p| &*p.id), Some("p1"));
    }

    #[tokio::test]
    async fn unknown_project_is_404_naming_only_it() {
        let error = run(ProjectLayer::new(projects()), Some(meta(Some("nope"), None))).await.unwrap_err();
        let error = GatewayError::find(&*error).unwrap();
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(error.to_string(), "Project 'nope' not found");
    }

    #[tokio::test]
    async fn no_secrets_configured() {
        let layer = ProjectLayer::new(Arc::new(Projects::empty()));
        let seen = run(layer.clone(), Some(meta(None, None))).await.unwrap();
        assert!(seen.get::<Project>().is_none());
        assert!(seen.get::<BodyEdits>().is_none());
        let error = run(layer, Some(meta(Some("p1"), None))).await.unwrap_err();
        assert!(matches!(GatewayError::find(&*error), Some(GatewayError::NotFound(_))));
    }

    #[tokio::test]
    async fn encoded_base_url_allowed() {
        let layer = ProjectLayer::new(Arc::new(Projects::empty()))
            .base_url_allowlist(vec!["https://api.fireworks.ai/inference".into(), "not a url".into()]);
        let url = "https://api.fireworks.ai/inference/v1";
        let seen = run(layer, Some(meta(None, Some(URL_SAFE.encode(url))))).await.unwrap();
        assert_eq!(seen.get::<BaseUrlOverride>(), Some(&BaseUrlOverride(url.into())));
        assert_eq!(body_for(&seen, UpstreamMode::LiteLlm), format!(r#"{{"model":"m","base_url":"{url}"}}"#));
        assert_eq!(body_for(&seen, UpstreamMode::OpenAi), r#"{"model":"m","base_url":"client"}"#);
    }

    #[tokio::test]
    async fn encoded_base_url_refusals() {
        let closed = ProjectLayer::new(projects());
        let error = run(closed, Some(meta(None, Some(URL_SAFE.encode("https://api.fireworks.ai"))))).await.unwrap_err();
        let error = GatewayError::find(&*error).unwrap();
        assert_eq!(error.status(), StatusCode::FORBIDDEN);
        assert!(error.to_string().contains("encoded_base_url.allow"), "{error}");

        let open = ProjectLayer::new(projects()).base_url_allowlist(vec!["https://api.fireworks.ai".into()]);
        let error = run(open.clone(), Some(meta(None, Some("%%%".into())))).await.unwrap_err();
        let error = GatewayError::find(&*error).unwrap();
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert!(error.to_string().starts_with("Invalid encoded_base_url: "), "{error}");

        let error =
            run(open, Some(meta(None, Some(URL_SAFE.encode("http://169.254.169.254/latest"))))).await.unwrap_err();
        assert_eq!(GatewayError::find(&*error).unwrap().status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn the_clients_credentials_and_endpoint_become_its_scope() {
        let layer = ProjectLayer::new(Arc::new(Projects::empty()))
            .base_url_allowlist(vec!["https://api.fireworks.ai/inference".into()]);
        let svc = layer.layer(service_fn(|req: Request<()>| async move {
            Ok::<_, Infallible>(Response::new(req.extensions().get::<ClientScope>().cloned()))
        }));
        let scope = |auth: Option<&str>, encoded: Option<String>| {
            let svc = svc.clone();
            let mut req = Request::post("/chat/completions").body(()).unwrap();
            if let Some(auth) = auth {
                req.headers_mut().insert(http::header::AUTHORIZATION, auth.parse().unwrap());
            }
            req.extensions_mut().insert(meta(None, encoded));
            async move { svc.oneshot(req).await.unwrap().into_body() }
        };
        assert_eq!(scope(None, None).await, None);
        let key = scope(Some("Bearer sk-a"), None).await.unwrap();
        assert!(!key.endpoint);
        assert_eq!(scope(Some("Bearer sk-a"), None).await.unwrap(), key);
        let url = URL_SAFE.encode("https://api.fireworks.ai/inference/v1");
        let endpoint = scope(None, Some(url.clone())).await.unwrap();
        assert!(endpoint.endpoint);
        let both = scope(Some("Bearer sk-a"), Some(url)).await.unwrap();
        assert!(both.endpoint && both.id != key.id && both.id != endpoint.id);
    }

    #[tokio::test]
    async fn refusal_does_not_call_inner() {
        let svc = ProjectLayer::new(projects()).layer(service_fn(|_req: Request<()>| async {
            panic!("inner service called");
            #[allow(unreachable_code)]
            Ok::<_, Infallible>(Response::new(body::empty()))
        }));
        let mut req = Request::post("/").body(()).unwrap();
        req.extensions_mut().insert(meta(Some("x"), None));
        assert!(svc.oneshot(req).await.is_err());
    }

    #[test]
    fn debug_shows_no_keys() {
        let layer = ProjectLayer::new(projects());
        let text = format!("{layer:?} {:?}", layer.layer(()));
        assert!(!text.contains("sk-lf") && !text.contains("pk-lf"), "{text}");
    }
}
