//! The hyper upstream: a pooled `hyper-util` client (HTTP/1.1 and h2, TLS via rustls,
//! TCP_NODELAY) that streams both directions.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, Uri, Version, header};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use llmgate_core::{
    BoxError, GatewayBody, GatewayError, body,
    ext::UpstreamTarget,
    forward::{IdleTimeout, join_url, strip_hop_by_hop},
};
use tower::Service;

/// The client type of the hyper upstream (also used for Langfuse and other outbound calls).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, GatewayBody>;

/// A pooled HTTP/1.1 + h2 client with TLS (webpki roots) and TCP_NODELAY.
pub fn http_client<B>(connect_timeout: Duration) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .unwrap_or_else(|_| hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(90)).build(https)
}

/// Forwards requests to the [`UpstreamTarget`] in their extensions, or to the default one.
#[derive(Clone)]
pub struct HyperUpstream {
    client: HttpClient,
    default_target: Arc<UpstreamTarget>,
    timeout: Duration,
}

impl HyperUpstream {
    /// An upstream with its own pooled client; `timeout` bounds connecting and the response
    /// head, and the silence allowed between two frames of a streamed body.
    pub fn new(default_target: UpstreamTarget, timeout: Duration) -> Self {
        Self::with_client(http_client(timeout), default_target, timeout)
    }

    /// An upstream over an existing client.
    pub fn with_client(client: HttpClient, default_target: UpstreamTarget, timeout: Duration) -> Self {
        Self { client, default_target: Arc::new(default_target), timeout }
    }
}

impl Service<Request<GatewayBody>> for HyperUpstream {
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The pooled client is always ready; connections are made per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let target = parts.extensions.get::<UpstreamTarget>().unwrap_or(&self.default_target);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let url = join_url(&target.base_url, path);
        let client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            parts.uri = url
                .parse::<Uri>()
                .map_err(|e| GatewayError::UpstreamUnavailable(format!("invalid upstream URL {url}: {e}")))?;
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(header::HOST);
            parts.version = Version::HTTP_11;
            let request = Request::from_parts(parts, body);
            let response = match tokio::time::timeout(timeout, client.request(request)).await {
                Err(_) => return Err(GatewayError::UpstreamTimeout(Some(timeout)).into()),
                Ok(Err(error)) => return Err(upstream_error(&error).into()),
                Ok(Ok(response)) => response,
            };
            let (mut parts, incoming) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.version = Version::HTTP_11;
            Ok(Response::from_parts(parts, body::boxed(IdleTimeout::new(incoming, timeout))))
        })
    }
}

/// A transport failure, described with its causes (the client's own message is only "client error").
fn upstream_error(error: &hyper_util::client::legacy::Error) -> GatewayError {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_connect() && message.contains("timed out") {
        return GatewayError::UpstreamTimeout(None);
    }
    GatewayError::UpstreamUnavailable(message)
}
