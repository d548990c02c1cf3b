//! Tower layer that recognises the gateway's route spellings.
//!
//! [`PathMetadataLayer`] parses the request path against one route table (see [`parse`]),
//! stores the result as a [`RouteMeta`](llmgate_core::ext::RouteMeta) request extension and
//! rewrites chat routes to the plain upstream path `/chat/completions` (query string kept).
//!
//! | Kind | Spellings | Method |
//! |---|---|---|
//! | chat | `[/v1][/project_id/{p}][/rollout_id/{r}/invocation_id/{i}/experiment_id/{e}/run_id/{u}/row_id/{w}[/encoded_base_url/{b}]]/chat/completions` | `POST` |
//! | traces | `[/v1][/project_id/{p}]/traces` | `GET` |
//! | pointwise | `[/v1][/project_id/{p}]/traces/pointwise` | `GET` |
//!
//! - The five ids go together, in that order; `encoded_base_url` only follows them.
//! - Plain `/chat/completions` and `/v1/chat/completions` are chat routes too (default
//!   project, no rollout).
//! - **Near-misses** (a missing id, a wrong order, a trailing slash, …) are not routes: no
//!   `RouteMeta`, nothing rewritten, the request passes through untouched to whatever
//!   handles the rest (the catch-all).
//! - **Segments** are percent-decoded. A value that is empty, `.` or `..`, holds `/` (e.g.
//!   from `%2F`) or a control character, is not valid percent-encoding or UTF-8, or would
//!   make its tag (`rollout_id:` + value, …) longer than 200 characters is refused with
//!   `GatewayError::BadRequest` naming the segment (`project_id` is capped at 200 characters,
//!   `encoded_base_url` at 4096). A `:` inside a value is fine: tags split on the first colon.
//! - **Methods.** A chat route with a method other than `POST` is refused with
//!   `GatewayError::MethodNotAllowed { allow: "POST" }`, a trace or status route with one other
//!   than `GET` with `allow: "GET"`, a logs route with one other than `GET` or `POST` with
//!   `allow: "GET, POST"` (the rescue layer renders 405 and the `Allow` header). Segment errors
//!   are checked first.
//! - **The shape of a refusal.** The layer returns its refusals as a `RouteRefusal` (the
//!   `GatewayError` and the route's kind), so that the rescue layer answers an OpenAI error on
//!   a chat route and `{"detail": "…"}` on a traces, logs or status route, the shape the
//!   original gateway's clients parse there.
//! - A request that already carries a `RouteMeta` passes through untouched.
//!
//! **Requires:** nothing. **Provides:** `RouteMeta` (routes only). Refusals are returned as
//! `Err` (a boxed [`GatewayError`](llmgate_core::GatewayError)) without boxing the future.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use llmgate_core::{ext::RouteMeta, BoxError, GatewayError};
//! use llmgate_path_metadata::PathMetadataLayer;
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(PathMetadataLayer::new())
//!     .service(service_fn(|req: Request<String>| async move {
//!         let meta = req.extensions().get::<RouteMeta>().cloned();
//!         let rollout = meta.and_then(|m| m.rollout).map(|r| r.rollout_id).unwrap_or_default();
//!         Ok::<_, BoxError>(Response::new(format!("{} {rollout}", req.uri().path())))
//!     }));
//!
//! let path = "/rollout_id/r1/invocation_id/i/experiment_id/e/run_id/u/row_id/w/chat/completions";
//! let response = svc.clone().oneshot(Request::post(path).body(String::new()).unwrap()).await.unwrap();
//! assert_eq!(response.into_body(), "/chat/completions r1");
//!
//! // A near-miss (no `row_id`) passes through untouched.
//! let near = "/rollout_id/r1/invocation_id/i/experiment_id/e/run_id/u/chat/completions";
//! let response = svc.clone().oneshot(Request::post(near).body(String::new()).unwrap()).await.unwrap();
//! assert_eq!(response.into_body(), format!("{near} "));
//!
//! // A malformed segment is refused before the inner service runs.
//! let error = svc.oneshot(Request::post("/project_id/%00/chat/completions").body(String::new()).unwrap())
//!     .await
//!     .unwrap_err();
//! let error = GatewayError::find(&*error).unwrap();
//! assert_eq!(error.status(), StatusCode::BAD_REQUEST);
//! assert!(error.to_string().contains("'project_id'"));
//! # }
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

mod route;
mod service;

pub use llmgate_core::future::ResponseFuture;
pub use route::{CHAT_PATH, MAX_ENCODED_BASE_URL_CHARS, MAX_PROJECT_CHARS, MAX_TAG_CHARS, apply, parse};
pub use service::{PathMetadata, PathMetadataLayer};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::{
        convert::Infallible,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    use bytes::Bytes;
    use http::{Request, Response, StatusCode, header};
    use http_body_util::BodyExt;
    use llmgate_core::{GatewayBody, GatewayError, RescueLayer, body, ext::RouteKind, ext::RouteMeta};
    use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

    use super::*;

    /// A stack that records what the inner service saw: `path|kind|project`.
    fn stack(
        calls: Arc<AtomicUsize>,
    ) -> impl tower::Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = Infallible> + Clone {
        ServiceBuilder::new().layer(RescueLayer::new()).layer(PathMetadataLayer::new()).service(service_fn(
            move |req: Request<GatewayBody>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    let meta = req.extensions().get::<RouteMeta>();
                    let seen = format!(
                        "{}|{:?}|{}",
                        req.uri(),
                        meta.map(|m| m.kind),
                        meta.and_then(|m| m.project.clone()).unwrap_or_default()
                    );
                    Ok::<_, Infallible>(Response::new(body::full(seen)))
                }
            },
        ))
    }

    async fn send(method: &str, uri: &str) -> (StatusCode, http::HeaderMap, Bytes, usize) {
        let calls = Arc::new(AtomicUsize::new(0));
        let request = Request::builder().method(method).uri(uri).body(body::empty()).unwrap();
        let response = stack(calls.clone()).oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        (parts.status, parts.headers, body.collect().await.unwrap().to_bytes(), calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn chat_route_is_rewritten_and_tagged() {
        let (status, _, body, calls) =
            send("POST", "/v1/project_id/p9/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/w/encoded_base_url/aGk/chat/completions?x=1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "/chat/completions?x=1|Some(ChatCompletions)|p9");
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn plain_chat_paths_are_chat_routes() {
        for path in ["/chat/completions", "/v1/chat/completions"] {
            let (_, _, body, _) = send("POST", path).await;
            assert_eq!(body, "/chat/completions|Some(ChatCompletions)|", "{path}");
        }
    }

    #[tokio::test]
    async fn traces_keep_their_path() {
        let (_, _, body, _) = send("GET", "/v1/project_id/p/traces/pointwise?tags=rollout_id:r").await;
        assert_eq!(body, "/v1/project_id/p/traces/pointwise?tags=rollout_id:r|Some(TracesPointwise)|p");
        let (_, _, body, _) = send("GET", "/traces").await;
        assert_eq!(body, format!("/traces|{:?}|", Some(RouteKind::Traces)));
    }

    #[tokio::test]
    async fn near_miss_passes_through_untouched_with_any_method() {
        for method in ["GET", "POST", "HEAD", "OPTIONS", "DELETE"] {
            let path = "/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/chat/completions?q";
            let (status, _, body, calls) = send(method, path).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, format!("{path}|None|"));
            assert_eq!(calls, 1);
        }
    }

    #[tokio::test]
    async fn wrong_method_is_405_with_allow() {
        let (status, headers, body, calls) = send("GET", "/project_id/p/chat/completions").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "POST");
        assert!(std::str::from_utf8(&body).unwrap().contains("method_not_allowed"));
        assert_eq!(calls, 0);
        // The traces, logs and status routes answer in the original's `{"detail"}` shape.
        for (method, path, allow) in [("POST", "/v1/traces", "GET"), ("PUT", "/logs", "GET, POST")] {
            let (status, headers, body, calls) = send(method, path).await;
            assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(headers[header::ALLOW], allow);
            assert_eq!(&body[..], br#"{"detail":"Method Not Allowed"}"#);
            assert_eq!(calls, 0);
        }
    }

    #[tokio::test]
    async fn a_malformed_segment_on_a_detail_route_is_a_detail_400() {
        for path in ["/project_id/a%2Fb/traces", "/v1/project_id/%00/logs", "/project_id/./status"] {
            let (status, _, body, calls) = send("GET", path).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(json["detail"].as_str().unwrap().contains("'project_id'"), "{path}: {json}");
            assert_eq!(calls, 0);
        }
    }

    #[tokio::test]
    async fn malformed_segment_is_400_naming_it() {
        let (status, _, body, calls) =
            send("POST", "/rollout_id/r/invocation_id/i/experiment_id/e/run_id/a%2Fb/row_id/w/chat/completions").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("'run_id'"), "{message}");
        assert_eq!(calls, 0);
    }

    #[tokio::test]
    async fn errors_are_boxed_gateway_errors() {
        let svc = PathMetadataLayer::new()
            .layer(service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(())) }));
        let error = svc.oneshot(Request::post("/project_id/../chat/completions").body(()).unwrap()).await.unwrap_err();
        assert!(matches!(GatewayError::find(&*error), Some(GatewayError::BadRequest(_))));
    }
}
