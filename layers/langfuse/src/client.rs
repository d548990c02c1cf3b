//! The one pooled HTTP client the exporter and the readers share.

use std::{fmt, future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::Connect},
    rt::TokioExecutor,
};
use llmgate_core::{BoxError, GatewayBody};

/// A boxed, `Send` future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that sends one HTTP request. Implemented for hyper-util's pooled legacy
/// [`Client`] with any connector, so the root crate can pass its TLS-capable client.
pub trait SendRequest: Send + Sync + 'static {
    /// Sends `request` and returns the response head with a streaming body.
    fn send(&self, request: Request<Full<Bytes>>) -> BoxFuture<'static, Result<Response<GatewayBody>, BoxError>>;
}

impl<C> SendRequest for Client<C, Full<Bytes>>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    fn send(&self, request: Request<Full<Bytes>>) -> BoxFuture<'static, Result<Response<GatewayBody>, BoxError>> {
        let fut = self.request(request);
        Box::pin(async move {
            let response = fut.await?;
            Ok(response.map(|b| b.map_err(Into::<BoxError>::into).boxed_unsync()))
        })
    }
}

/// A cheap-to-clone handle to the process's pooled HTTP client.
#[derive(Clone)]
pub struct LangfuseClient(Arc<dyn SendRequest>);

impl LangfuseClient {
    /// A pooled plain-HTTP client (tests, or a Langfuse behind a local TLS terminator).
    pub fn http() -> Self {
        Self::new(Client::builder(TokioExecutor::new()).build_http())
    }

    /// Wraps any client, e.g. `Client::builder(..).build(hyper_rustls::HttpsConnector)`.
    pub fn new(client: impl SendRequest) -> Self {
        Self(Arc::new(client))
    }

    /// Sends one request.
    pub fn send(&self, request: Request<Full<Bytes>>) -> BoxFuture<'static, Result<Response<GatewayBody>, BoxError>> {
        self.0.send(request)
    }
}

impl fmt::Debug for LangfuseClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LangfuseClient")
    }
}

/// `Basic base64(public_key:secret_key)`.
pub(crate) fn basic_auth(keys: &llmgate_core::ext::LangfuseKeys) -> Option<http::HeaderValue> {
    use base64::Engine as _;
    let raw = format!("{}:{}", keys.public_key, keys.secret_key.expose());
    let mut value =
        http::HeaderValue::try_from(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// Reads at most `limit` bytes of a body; the rest is dropped.
pub(crate) async fn read_capped(body: GatewayBody, limit: usize) -> Result<Bytes, BoxError> {
    let mut body = body;
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out.freeze())
}
