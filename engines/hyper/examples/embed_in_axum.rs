//! The path-metadata and insertion-id layers on an existing axum router.
//!
//! `PathMetadataLayer` must run before axum's routing (it rewrites every chat route spelling to
//! `/chat/completions`), so the layers wrap the whole `Router` rather than going through
//! `Router::layer` (which runs after routing). `RescueLayer` renders refusals (a malformed
//! segment, a wrong method) as OpenAI JSON errors. The example serves on an ephemeral port,
//! calls itself three times and exits.
//!
//! ```sh
//! cargo run -p llmgate-hyper --example embed_in_axum
//! ```

use std::sync::Arc;

use axum::{Json, Router, ServiceExt, extract::Request, routing::post};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use llmgate_core::{
    BoxError, GatewayBody, RescueLayer, body,
    ext::{InsertionId, RolloutTags, RouteMeta},
};
use llmgate_insertion_id::{InsertionIdLayer, InsertionStore, MemoryStore};
use llmgate_path_metadata::PathMetadataLayer;
use serde_json::{Value, json};
use tower::ServiceBuilder;

/// Your handler: the layers left what the path said in the request extensions.
async fn chat(req: Request) -> Json<Value> {
    let ext = req.extensions();
    let meta = ext.get::<RouteMeta>();
    Json(json!({
        "path_seen_by_handler": req.uri().path(),
        "project": meta.and_then(|m| m.project.clone()),
        "rollout_id": meta.and_then(|m| m.rollout.as_ref()).map(|r| r.rollout_id.clone()),
        "insertion_id": ext.get::<InsertionId>().map(|id| id.0.to_string()),
        "tags": ext.get::<RolloutTags>().map(|t| t.0.to_vec()),
        "choices": [],
    }))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The existing application.
    let router = Router::new().route("/chat/completions", post(chat));

    let store = Arc::new(MemoryStore::new());
    let app = ServiceBuilder::new()
        .map_response(|r: http::Response<GatewayBody>| r.map(axum::body::Body::new))
        .layer(RescueLayer::new())
        .map_response(|r: http::Response<_>| r.map(body::boxed))
        .layer(PathMetadataLayer::new())
        .layer(InsertionIdLayer::new(store.clone()))
        .service(router);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, ServiceExt::<Request>::into_make_service(app)).await });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for (method, path) in [
        ("POST", "/v1/rollout_id/r1/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1/chat/completions"),
        ("POST", "/v1/project_id/p1/chat/completions"),
        ("GET", "/rollout_id/r1/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1/chat/completions"),
    ] {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"model":"m","messages":[]}"#)))?;
        let response = client.request(request).await?;
        let status = response.status();
        let id = response.headers().get("x-insertion-id").cloned();
        let text = response.into_body().collect().await?.to_bytes();
        println!("{method} {path}\n  → {status}, x-insertion-id: {id:?}\n  {}", String::from_utf8_lossy(&text));
    }
    // A 2xx JSON response is recorded before it is returned.
    println!("recorded for rollout r1: {:?}", store.members("r1").await?);
    Ok(())
}
