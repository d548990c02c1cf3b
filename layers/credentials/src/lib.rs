//! Tower layers for credentials.
//!
//! - [`ProjectLayer`]: the request's project and its Langfuse keys from the secrets file
//!   ([`Secrets`], [`Projects`]); the `encoded_base_url` override, decoded and checked against
//!   an allowlist ([`BaseUrlAllowlist`]).
//! - [`AuthLayer`]: client authentication through an [`AuthProvider`] ([`NoAuth`] by default,
//!   [`StaticApiKeys`] for `auth.keys` and `auth.api_keys`, [`ExternalAuth`] for an identity
//!   service), and the projects an account may use (403 for another's).
//! - [`Reloadable`]: the projects and the API keys, swapped while requests run (secrets rotated
//!   without a restart); each request keeps what it started with.
//! - [`UpstreamAuthLayer`]: per upstream attempt, the `Authorization` header (the client's, or
//!   the upstream's server-side key) and, in `litellm` mode for `fireworks_ai*` models, the
//!   `api_key` body field; the response says whose credentials the attempt used
//!   ([`CredentialScope`](llmgate_core::ext::CredentialScope)).
//! - [`client_scope`]: the digest of a client's own credentials and chosen endpoint
//!   ([`ClientScope`](llmgate_core::ext::ClientScope)), written by [`ProjectLayer`]. A provider
//!   429 earned with them cools down only them (the rate-limit layer keys its cooldown by this
//!   digest, never by the key); one earned with the gateway's own credentials at a configured
//!   upstream cools the model down for everyone.
//!
//! Body additions (`langfuse_*`, `base_url`, `api_key`) are [`BodyEdits`] scoped to `litellm`
//! mode, applied per attempt by `EncodeJson`; in `openai` mode nothing reaches the body. Keys
//! never appear in `Debug` output, errors or logs ([`Secret`](llmgate_core::ext::Secret)).
//!
//! | Layer | Requires | Provides |
//! |---|---|---|
//! | `AuthLayer` | — | `AccountInfo` |
//! | `ProjectLayer` | (`RouteMeta`) | `Project`, `BaseUrlOverride`, `ClientScope`, `BodyEdits` |
//! | `UpstreamAuthLayer` | (`UpstreamTarget`, `LlmRequest`, `BodyEdits`, `ClientScope`, `BaseUrlOverride`) | `Authorization`, `BodyEdits`, response `CredentialScope` |
//!
//! # Example
//!
//! [`ProjectLayer`] around a service that reads the resolved project:
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response, StatusCode};
//! use llmgate_core::{ext::{Project, RouteKind, RouteMeta}, BoxError, GatewayError};
//! use llmgate_credentials::{ProjectLayer, Projects, Secrets};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let secrets = Secrets::from_yaml_str(
//!     "langfuse_keys: {p1: {public_key: pk-lf-1, secret_key: sk-lf-1}}\ndefault_project_id: p1\n",
//! ).unwrap();
//! let svc = ServiceBuilder::new()
//!     .layer(ProjectLayer::new(Arc::new(Projects::from(secrets))).langfuse_host("https://cloud.langfuse.com"))
//!     .service(service_fn(|req: Request<()>| async move {
//!         let project = req.extensions().get::<Project>().map(|p| p.id.to_string());
//!         Ok::<_, BoxError>(Response::new(project.unwrap_or_default()))
//!     }));
//!
//! // No project in the path: the default.
//! let response = svc.clone().oneshot(Request::new(())).await.unwrap();
//! assert_eq!(response.into_body(), "p1");
//!
//! // An unknown project named in the path: 404.
//! let mut req = Request::new(());
//! req.extensions_mut().insert(RouteMeta {
//!     kind: RouteKind::ChatCompletions,
//!     project: Some("other".into()),
//!     rollout: None,
//!     encoded_base_url: None,
//! });
//! let error = svc.oneshot(req).await.unwrap_err();
//! assert_eq!(GatewayError::find(&*error).unwrap().status(), StatusCode::NOT_FOUND);
//! # }
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

mod auth;
mod base_url;
mod external;
mod project;
mod reload;
mod scope;
mod secrets;
mod upstream_auth;

pub use auth::{
    Auth, AuthFuture, AuthLayer, AuthProvider, GatewayKey, KeyDigest, NoAuth, Refusals, StaticApiKeys, bearer_token,
};
pub use base_url::{AllowlistError, BaseUrlAllowlist, decode_base_url};
pub use external::{DEFAULT_CACHE_TTL, DEFAULT_TIMEOUT, ExternalAuth, FetchFuture, FirstOf, IdentityClient};
pub use llmgate_core::future::ResponseFuture;
pub use project::{DEFAULT_LANGFUSE_HOST, ProjectLayer, ProjectService};
pub use reload::Reloadable;
pub use scope::client_scope;
pub use secrets::{Projects, Secrets, SecretsError};
pub use upstream_auth::{API_KEY_MODEL_PREFIX, UpstreamAuth, UpstreamAuthFuture, UpstreamAuthLayer};

#[doc(no_inline)]
pub use llmgate_core::ext::BodyEdits;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use llmgate_core::ext::Secret;
    use tower_layer::Layer;

    use super::*;

    /// Every credential-holding type of this crate, formatted with `{:?}`, shows no key.
    #[test]
    fn debug_never_shows_a_secret() {
        let yaml =
            "langfuse_keys: {p1: {public_key: pk-lf-PUBLIC, secret_key: sk-lf-SECRET}}\ndefault_project_id: p1\n";
        let secrets = Secrets::from_yaml_str(yaml).unwrap();
        let projects = Arc::new(Projects::from(secrets.clone()));
        let layer = ProjectLayer::new(projects.clone()).base_url_allowlist(vec!["https://api.example.com".into()]);
        let keys = StaticApiKeys::with_accounts([("a", "sk-gw-SECRET")]);
        let texts = [
            format!("{secrets:?}"),
            format!("{projects:?}"),
            format!("{layer:?}"),
            format!("{:?}", layer.layer(())),
            format!("{keys:?}"),
            format!("{:?}", AuthLayer::new(Arc::new(keys.clone()))),
            format!("{:?}", AuthLayer::new(Arc::new(keys)).layer(())),
            format!("{:?}", UpstreamAuthLayer::new()),
            format!("{:?}", Secret::new("sk-lf-SECRET")),
            format!(
                "{:?}",
                Secrets::from_yaml_str("langfuse_keys: {p1: sk-lf-SECRET}\ndefault_project_id: p1\n").unwrap_err()
            ),
        ];
        for text in texts {
            assert!(!text.contains("SECRET") && !text.contains("PUBLIC"), "{text}");
        }
    }
}
