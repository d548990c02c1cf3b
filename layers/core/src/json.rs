//! Read the chat request body once, parse it once, and write it back once per attempt.
//!
//! [`DecodeJsonLayer`] reads the body behind a size limit (413 past it), parses it into a JSON
//! object (400 otherwise) and stores it as [`LlmRequest`]. Layers below change the body only
//! through [`BodyEdits`]. [`EncodeJsonLayer`], just above the upstream, writes the body for the
//! current attempt: the client's bytes untouched when nothing applies, else one serialisation
//! with the edits of the attempt's upstream mode applied. Before an `openai`-mode upstream the
//! client's `metadata.tags` is dropped: OpenAI rejects list-valued metadata, and the tags reach
//! Langfuse through llmgate's own export.
//!
//! ```
//! use http::{Request, Response};
//! use http_body_util::BodyExt;
//! use llmgate_core::{body, ext::{BodyEdits, EditScope}, DecodeJsonLayer, EncodeJsonLayer};
//! use tower::{layer::layer_fn, service_fn, ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let svc = ServiceBuilder::new()
//!     .layer(DecodeJsonLayer::new())
//!     // A layer of your own between decode and encode edits the body through `BodyEdits`.
//!     .map_request(|mut req: Request<llmgate_core::GatewayBody>| {
//!         let mut edits = BodyEdits::default();
//!         edits.set("model", "small-model".into(), EditScope::Always);
//!         req.extensions_mut().insert(edits);
//!         req
//!     })
//!     .layer(EncodeJsonLayer::new())
//!     .service(service_fn(|req: Request<llmgate_core::GatewayBody>| async move {
//!         Ok::<_, llmgate_core::BoxError>(Response::new(req.into_body()))
//!     }));
//! let response = svc.oneshot(Request::new(body::full(r#"{"model":"big","n":1}"#))).await.unwrap();
//! let sent = response.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(sent, r#"{"model":"small-model","n":1}"#);
//! # }
//! ```

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};
use tower_layer::Layer;
use tower_service::Service;

use crate::{
    BoxError, GatewayBody, GatewayError, body,
    ext::{BodyEdits, LlmRequest, UpstreamMode, UpstreamTarget},
};

/// The default request body limit: 32 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 32 * 1024 * 1024;

// === DecodeJson ===

/// Layer that applies [`DecodeJson`].
#[derive(Clone, Copy, Debug)]
pub struct DecodeJsonLayer {
    limit: usize,
}

impl DecodeJsonLayer {
    /// A decoder with the default limit of 32 MiB.
    pub const fn new() -> Self {
        Self { limit: DEFAULT_BODY_LIMIT }
    }

    /// Sets the body limit in bytes.
    pub const fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

impl Default for DecodeJsonLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for DecodeJsonLayer {
    type Service = DecodeJson<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeJson { inner, limit: self.limit }
    }
}

/// Reads the request body once behind a limit and stores it parsed as [`LlmRequest`].
#[derive(Clone, Debug)]
pub struct DecodeJson<S> {
    inner: S,
    limit: usize,
}

impl<S, F, B, ResBody> Service<Request<B>> for DecodeJson<S>
where
    S: Service<Request<GatewayBody>, Response = Response<ResBody>, Future = F> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    // Naming the future (rather than bounding `S::Future`) sidesteps a higher-ranked `Send`
    // inference limitation of async blocks.
    F: Future<Output = Result<Response<ResBody>, S::Error>> + Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
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
        let limit = self.limit;
        let (mut parts, body) = req.into_parts();
        let checked = check_headers(&parts.headers, limit);
        Box::pin(async move {
            checked?;
            let (raw, json) = read_json(body, limit).await?;
            parts.extensions.insert(LlmRequest::new(raw.clone(), json));
            ready.call(Request::from_parts(parts, body::full(raw))).await.map_err(Into::into)
        })
    }
}

/// Refuses a chat body before reading it: 415 when compressed, 413 when its declared length
/// is past `limit`.
pub fn check_headers(headers: &http::HeaderMap, limit: usize) -> Result<(), GatewayError> {
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING)
        && encoding.as_bytes() != b"identity"
    {
        return Err(GatewayError::UnsupportedMediaType(
            "Compressed request bodies are not supported on chat routes; send the JSON body uncompressed".into(),
        ));
    }
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::PayloadTooLarge { limit: Some(limit) });
    }
    Ok(())
}

/// Reads and parses a chat body: 413 past `limit`, 400 for anything that is not a JSON object
/// with sensible `model` and `messages`.
pub async fn read_json<B>(body: B, limit: usize) -> Result<(Bytes, Map<String, Value>), GatewayError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let raw = read_body(body, limit).await?;
    Ok((raw.clone(), parse_chat_body(&raw)?))
}

/// Reads a whole request body: 413 past `limit` (nothing more is read), 400 when the body
/// breaks.
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, GatewayError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if crate::rescue::caused_by::<http_body_util::LengthLimitError>(&error) => {
            Err(GatewayError::PayloadTooLarge { limit: Some(limit) })
        }
        Err(error) => Err(GatewayError::bad_request(format!("Could not read the request body: {error}"))),
    }
}

/// Parses a chat body into a JSON object and checks the fields every layer relies on.
pub fn parse_chat_body(raw: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(GatewayError::bad_request("Request body is empty; expected a JSON object"));
    }
    let json = match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(map)) => map,
        Ok(_) => {
            return Err(GatewayError::bad_request("Request body must be a JSON object"));
        }
        Err(error) => {
            return Err(GatewayError::bad_request(format!("Invalid JSON in request body: {error}")));
        }
    };
    if json.get("model").is_some_and(|m| !m.is_string()) {
        return Err(GatewayError::bad_request("'model' must be a string"));
    }
    if json.get("messages").is_some_and(|m| !m.is_array()) {
        return Err(GatewayError::bad_request("'messages' must be a list"));
    }
    if let Some(metadata) = json.get("metadata") {
        let Some(metadata) = metadata.as_object() else {
            return Err(GatewayError::bad_request("'metadata' must be an object"));
        };
        if metadata.get("tags").is_some_and(|t| !t.is_array()) {
            return Err(GatewayError::bad_request("'metadata.tags' must be a list"));
        }
    }
    Ok(json)
}

// === EncodeJson ===

/// Layer that applies [`EncodeJson`].
#[derive(Clone, Copy, Debug, Default)]
pub struct EncodeJsonLayer {
    default_mode: UpstreamMode,
}

impl EncodeJsonLayer {
    /// An encoder that assumes `openai` mode when no [`UpstreamTarget`] says otherwise.
    pub const fn new() -> Self {
        Self { default_mode: UpstreamMode::OpenAi }
    }

    /// The mode assumed when the request carries no [`UpstreamTarget`].
    pub const fn default_mode(mut self, mode: UpstreamMode) -> Self {
        self.default_mode = mode;
        self
    }
}

impl<S> Layer<S> for EncodeJsonLayer {
    type Service = EncodeJson<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EncodeJson { inner, default_mode: self.default_mode }
    }
}

/// Writes the body of the current attempt from [`LlmRequest`] and [`BodyEdits`].
#[derive(Clone, Debug)]
pub struct EncodeJson<S> {
    inner: S,
    default_mode: UpstreamMode,
}

impl<S, B> Service<Request<B>> for EncodeJson<S>
where
    S: Service<Request<GatewayBody>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let Some(request) = parts.extensions.get::<LlmRequest>() else {
            return self.inner.call(Request::from_parts(parts, body::boxed(body)));
        };
        let mode = parts.extensions.get::<UpstreamTarget>().map_or(self.default_mode, |t| t.mode);
        let bytes = encode(request, parts.extensions.get::<BodyEdits>(), mode);
        drop(body);
        parts.headers.remove(header::TRANSFER_ENCODING);
        parts.headers.remove(header::CONTENT_ENCODING);
        parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.inner.call(Request::from_parts(parts, body::full(bytes)))
    }
}

/// The body of one attempt: the client's bytes when nothing applies to `mode`, else one
/// serialisation of the parsed body with the edits applied.
pub fn encode(request: &LlmRequest, edits: Option<&BodyEdits>, mode: UpstreamMode) -> Bytes {
    let strip_tags =
        mode == UpstreamMode::OpenAi && request.json().get("metadata").and_then(|m| m.get("tags")).is_some();
    let has_edits = edits.is_some_and(|e| e.any_for(mode));
    if !strip_tags && !has_edits {
        return request.raw().clone();
    }
    let edited = Edited { json: request.json(), edits, mode, strip_tags };
    let mut out = Vec::with_capacity(request.raw().len() + 256);
    match serde_json::to_writer(&mut out, &edited) {
        Ok(()) => Bytes::from(out),
        // Serialising a parsed `Value` with string keys cannot fail; keep the client's bytes.
        Err(_) => request.raw().clone(),
    }
}

/// The parsed body seen through the edits of one mode, serialised without copying the body.
struct Edited<'a> {
    json: &'a Map<String, Value>,
    edits: Option<&'a BodyEdits>,
    mode: UpstreamMode,
    strip_tags: bool,
}

impl Edited<'_> {
    /// The last edit of `key` for this mode: `Some(None)` removes the key.
    fn edit(&self, key: &str) -> Option<Option<&Value>> {
        self.edits?.for_mode(self.mode).filter(|(k, _)| *k == key).last().map(|(_, v)| v)
    }
}

impl Serialize for Edited<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in self.json {
            match self.edit(key) {
                Some(Some(edited)) => map.serialize_entry(key, edited)?,
                Some(None) => {}
                None if self.strip_tags && key == "metadata" => {
                    if let Some(object) = value.as_object() {
                        let rest: Map<String, Value> =
                            object.iter().filter(|(k, _)| *k != "tags").map(|(k, v)| (k.clone(), v.clone())).collect();
                        if !rest.is_empty() {
                            map.serialize_entry(key, &rest)?;
                        }
                    }
                }
                None => map.serialize_entry(key, value)?,
            }
        }
        if let Some(edits) = self.edits {
            // Keys the client did not send, once each, last edit winning.
            let mut added: Vec<&str> = Vec::new();
            for (key, _) in edits.for_mode(self.mode) {
                if self.json.contains_key(key) || added.contains(&key) {
                    continue;
                }
                added.push(key);
                if let Some(Some(value)) = self.edit(key) {
                    map.serialize_entry(key, value)?;
                }
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext::EditScope;

    fn request(raw: &'static str) -> LlmRequest {
        LlmRequest::new(Bytes::from_static(raw.as_bytes()), parse_chat_body(raw.as_bytes()).unwrap())
    }

    #[test]
    fn untouched_body_is_the_clients_bytes() {
        let req = request(r#"{ "model" : "m" }"#);
        assert_eq!(encode(&req, None, UpstreamMode::OpenAi), req.raw());
    }

    #[test]
    fn edits_apply_per_mode_and_keep_key_order() {
        let req = request(r#"{"model":"a","metadata":{"tags":["t"],"k":"v"},"x":1}"#);
        let mut edits = BodyEdits::default();
        edits.set("model", "b".into(), EditScope::Always);
        edits.set("langfuse_host", "h".into(), EditScope::Mode(UpstreamMode::LiteLlm));
        edits.remove("x", EditScope::Mode(UpstreamMode::LiteLlm));
        let openai = encode(&req, Some(&edits), UpstreamMode::OpenAi);
        assert_eq!(openai, r#"{"model":"b","metadata":{"k":"v"},"x":1}"#);
        let litellm = encode(&req, Some(&edits), UpstreamMode::LiteLlm);
        assert_eq!(litellm, r#"{"model":"b","metadata":{"tags":["t"],"k":"v"},"langfuse_host":"h"}"#);
    }

    #[test]
    fn openai_mode_drops_metadata_holding_only_tags() {
        let req = request(r#"{"model":"a","metadata":{"tags":["t"]}}"#);
        assert_eq!(encode(&req, None, UpstreamMode::OpenAi), r#"{"model":"a"}"#);
    }

    #[test]
    fn rejects_bad_shapes() {
        for bad in ["", "  ", "[1]", "{", r#"{"model":1}"#, r#"{"messages":{}}"#, r#"{"metadata":{"tags":"x"}}"#] {
            assert!(parse_chat_body(bad.as_bytes()).is_err(), "{bad}");
        }
        let deep = "[".repeat(200) + &"]".repeat(200);
        let nested = format!(r#"{{"a":{deep}}}"#);
        assert!(parse_chat_body(nested.as_bytes()).is_err());
    }
}
