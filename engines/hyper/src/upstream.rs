//! The hyper upstream: a pooled `hyper-util` client (HTTP/1.1 and h2, TLS via rustls,
//! TCP_NODELAY) that streams both directions.
//!
//! TLS: rustls with ring, TLS 1.2 and 1.3, the webpki (Mozilla) roots, SNI = the URL's host, ALPN
//! `h2` then `http/1.1`, certificate and host name verification always on. An upstream may trust
//! more roots ([`HyperUpstream::with_extra_roots`], e.g. a private authority) on top of those; a
//! certificate that fails verification is a `502` that says why (`invalid peer certificate:
//! UnknownIssuer`, `… not valid for name …`).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response, Uri, Version, header};
use hyper_rustls::{ConfigBuilderExt, HttpsConnector};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use llmgate_core::{
    BoxError, GatewayBody, GatewayError, body,
    ext::UpstreamTarget,
    forward::{IdleTimeout, join_url, strip_hop_by_hop},
};
use rustls::{ClientConfig, RootCertStore, pki_types::CertificateDer};
use tower::Service;

/// The client type of the hyper upstream (also used for Langfuse and other outbound calls).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, GatewayBody>;

/// A pooled HTTP/1.1 + h2 client with TLS (webpki roots) and TCP_NODELAY.
pub fn http_client<B>(connect_timeout: Duration) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    // Without extra roots this cannot fail (ring has TLS 1.2 and 1.3); the process's default
    // provider would be the fallback.
    let tls = tls_config(&[]).unwrap_or_else(|_| ClientConfig::builder().with_webpki_roots().with_no_client_auth());
    client_over(connect_timeout, tls)
}

/// [`http_client`] that also trusts `extra_roots` (DER CA certificates) on top of the webpki
/// roots; an error names a certificate rustls cannot use as a root.
pub fn http_client_trusting<B>(
    connect_timeout: Duration,
    extra_roots: &[CertificateDer<'static>],
) -> Result<Client<HttpsConnector<HttpConnector>, B>, rustls::Error>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    Ok(client_over(connect_timeout, tls_config(extra_roots)?))
}

/// ring, TLS 1.2 and 1.3, the webpki roots and `extra_roots` (the connector adds ALPN).
fn tls_config(extra_roots: &[CertificateDer<'static>]) -> Result<ClientConfig, rustls::Error> {
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for root in extra_roots {
        roots.add(root.clone())?;
    }
    Ok(ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn client_over<B>(connect_timeout: Duration, tls: ClientConfig) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
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
    /// The clients of upstreams with extra roots, by upstream name (each with its own pool).
    trusting: Arc<HashMap<Arc<str>, HttpClient>>,
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
        Self { client, trusting: Arc::default(), default_target: Arc::new(default_target), timeout }
    }

    /// Also trusts `roots` (DER CA certificates, e.g. a private authority's) for the requests to
    /// the upstream named `upstream` (the [`UpstreamTarget::name`] of a request, whatever its
    /// base URL), on top of the webpki roots; those requests get a client and pool of their own.
    /// An error names a certificate rustls cannot use as a root.
    pub fn with_extra_roots(
        mut self,
        upstream: &str,
        roots: &[CertificateDer<'static>],
    ) -> Result<Self, rustls::Error> {
        let client = http_client_trusting(self.timeout, roots)?;
        Arc::make_mut(&mut self.trusting).insert(upstream.into(), client);
        Ok(self)
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
        let client = self.trusting.get(&target.name).unwrap_or(&self.client).clone();
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
                Ok(Err(error)) => return Err(upstream_error(&error, &url).into()),
                Ok(Ok(response)) => response,
            };
            let (mut parts, incoming) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            parts.version = Version::HTTP_11;
            Ok(Response::from_parts(parts, body::boxed(IdleTimeout::new(incoming, timeout))))
        })
    }
}

/// A transport failure, described with its causes (the client's own message is only "client error");
/// a failed TLS handshake says why in rustls's words, as the Pingora engine does.
fn upstream_error(error: &hyper_util::client::legacy::Error, url: &str) -> GatewayError {
    if error.is_connect()
        && let Some(tls) = tls_error(error)
    {
        let authority = url.parse::<Uri>().ok().and_then(|uri| uri.authority().cloned());
        let authority = authority.as_ref().map_or(url, |a| a.as_str());
        return GatewayError::UpstreamUnavailable(format!("TLS handshake with {authority} failed: {tls}"));
    }
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

/// The rustls error among `error`'s causes (hyper-rustls wraps tokio-rustls's `io::Error`, which
/// wraps it, in another `io::Error`).
fn tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cause = std::error::Error::source(error);
    while let Some(current) = cause {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = match current.downcast_ref::<std::io::Error>() {
            // An `io::Error`'s `source` skips the error it wraps.
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmgate_core::ext::UpstreamMode;

    #[test]
    fn extra_roots_must_be_usable_as_roots() {
        let target = UpstreamTarget {
            name: "public".into(),
            base_url: "https://api.example.com/v1".into(),
            mode: UpstreamMode::OpenAi,
            api_key: None,
        };
        let upstream = HyperUpstream::new(target, Duration::from_secs(5));
        let not_a_certificate = CertificateDer::from(vec![0x30, 0x03, 1, 2, 3]);
        assert!(upstream.clone().with_extra_roots("private", &[not_a_certificate]).is_err());
        let root = webpki_root_certs::TLS_SERVER_ROOT_CERTS[0].clone();
        let upstream = upstream.with_extra_roots("private", &[root]).unwrap();
        assert_eq!(upstream.trusting.len(), 1);
        assert!(upstream.trusting.contains_key("private"));
    }
}
