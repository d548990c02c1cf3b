//! Insertion ids for Eval Protocol rollouts: mint, tag, record.
//!
//! On a request whose [`RouteMeta`](llmgate_core::ext::RouteMeta) carries rollout ids,
//! [`InsertionIdLayer`]
//!
//! 1. mints a UUIDv7 insertion id and puts it in the request as
//!    [`InsertionId`](llmgate_core::ext::InsertionId), with the six
//!    [`RolloutTags`](llmgate_core::ext::RolloutTags) in the original gateway's order
//!    (`rollout_id:`, `insertion_id:`, `invocation_id:`, `experiment_id:`, `run_id:`, `row_id:`);
//! 2. sets the `metadata` body edit for `litellm` upstreams: the client's `metadata` with `tags` =
//!    the client's tags followed by the six (other keys untouched). `openai` upstreams get no
//!    tags (`EncodeJson` drops a client's `metadata.tags` there; Langfuse gets them from the
//!    extension);
//! 3. returns the id in an `x-insertion-id` response header;
//! 4. records the id in an [`InsertionStore`] once the completion succeeded, **before the client
//!    sees the end of the response**: the head of a 2xx response goes out at once and only the
//!    frame that completes its body waits for the record: the frame with `data: [DONE]` (or the
//!    end of the stream) of a `text/event-stream`, the last frame of any other body (known from
//!    its `content-length`, else the end of the stream). Nothing is recorded on 4xx/5xx, on a
//!    body that breaks, or when the body is dropped before that frame arrived; a record under
//!    way when the client leaves is finished (the completion was whole). Records are group
//!    committed: one writer has at most one store write under way, and every record that came
//!    due meanwhile goes in the next one (no timer: alone, a record is written at once). A store
//!    slower than `record_timeout` (250 ms) does not delay the response further: the id goes to a
//!    bounded background queue that retries with capped exponential backoff until the store
//!    takes it (failures are logged at error level and counted in [`Counters`]).
//!
//! Requests without rollout ids pass through untouched.
//!
//! **Requires:** `RouteMeta` (optional: without it nothing happens), `LlmRequest` (optional:
//! without it no body edit is made), an `Unpin` response body (the head of a JSON response waits
//! for its first frame, read ahead). **Provides:** `InsertionId`, `RolloutTags`, `BodyEdits`
//! (`metadata`, scoped to `litellm`), the `x-insertion-id` response header.
//!
//! Stores: [`MemoryStore`] (sharded, in process) and [`RedisStore`] (single node or Redis
//! Cluster: a batch is one pipeline with one `SADD` of all its ids per rollout and one
//! `EXPIRE`).
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use http::{Request, Response};
//! use http_body_util::BodyExt;
//! use llmgate_core::{body, ext::{RolloutIds, RolloutTags, RouteKind, RouteMeta}, GatewayBody};
//! use llmgate_insertion_id::{InsertionIdLayer, InsertionStore, MemoryStore};
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let store = Arc::new(MemoryStore::new());
//! let svc = ServiceBuilder::new()
//!     .layer(InsertionIdLayer::new(store.clone()))
//!     .service(service_fn(|req: Request<GatewayBody>| async move {
//!         let tags = req.extensions().get::<RolloutTags>().unwrap();
//!         assert_eq!(tags.0[0], "rollout_id:r1");
//!         let mut response = Response::new(body::full(r#"{"choices":[]}"#));
//!         response.headers_mut().insert("content-type", "application/json".parse().unwrap());
//!         Ok::<_, llmgate_core::BoxError>(response)
//!     }));
//!
//! let mut req = Request::new(body::full(""));
//! req.extensions_mut().insert(RouteMeta {
//!     kind: RouteKind::ChatCompletions,
//!     project: None,
//!     rollout: Some(RolloutIds {
//!         rollout_id: "r1".into(),
//!         invocation_id: "i1".into(),
//!         experiment_id: "e1".into(),
//!         run_id: "u1".into(),
//!         row_id: "w1".into(),
//!     }),
//!     encoded_base_url: None,
//! });
//! let response = svc.oneshot(req).await.unwrap();
//! let id = response.headers()["x-insertion-id"].to_str().unwrap().to_owned();
//! // The body's last frame waits for the record: a client that has the whole completion
//! // knows its id is stored.
//! response.into_body().collect().await.unwrap();
//! assert_eq!(store.members("r1").await.unwrap(), vec![id]);
//! # }
//! ```
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

mod body;
mod layer;
mod recorder;
mod redis_store;
mod store;

pub use body::RecordBody;
pub use layer::{
    DEFAULT_RECORD_TIMEOUT, INSERTION_ID_HEADER, InsertionId, InsertionIdLayer, ResponseFuture, litellm_metadata,
    rollout_tags,
};
pub use recorder::{
    Counters, CountersSnapshot, DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_QUEUE_CAPACITY, DEFAULT_RETRY_MAX, DEFAULT_RETRY_MIN,
    MAX_BATCH,
};
pub use redis_store::{CONNECTION_TIMEOUT, RESPONSE_TIMEOUT, RedisStore};
pub use store::{DEFAULT_TTL, Insertion, InsertionStore, MemoryStore, StoreFuture};
