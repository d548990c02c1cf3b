//! The Pingora upstream: pingora-core's pooled HTTP connector (HTTP/1.1; h2 over TLS where the
//! upstream offers it, or h2 with prior knowledge) behind the same `tower::Service` shape as the
//! hyper engine's `HyperUpstream`.
//!
//! It forwards to the [`UpstreamTarget`] in the request's extensions (or the default one), joins
//! URLs with [`join_url`], strips hop-by-hop headers both ways, answers `502`
//! ([`GatewayError::UpstreamUnavailable`]) and `504` ([`GatewayError::UpstreamTimeout`]) like the
//! hyper upstream, and streams both bodies. What pingora-core 0.9 needs on top:
//!
//! - **DNS first.** `HttpPeer::new` resolves synchronously and panics on a name that does not
//!   resolve, so the host is resolved with `tokio::net::lookup_host` (cached for a short TTL) and
//!   the peer is built from a `SocketAddr`.
//! - **`Host`.** Pingora writes the request head as given: the request line carries only the
//!   path and query, `Host` is set to the upstream authority (h2 derives `:authority` from it),
//!   and the body framing (`content-length` or chunked) is set explicitly.
//! - **Version.** The response version is reset to HTTP/1.1, so an HTTP/1.0 upstream never leaks
//!   its version to the client.
//! - **Reuse.** A session goes back to the pool only once its body was read to the end; a body
//!   dropped early closes the connection.
//! - **`Send` but not `Sync`.** Client sessions are not `Sync`, so the response body implements
//!   `http_body::Body` over the session and is boxed as an `UnsyncBoxBody` ([`GatewayBody`]).
//! - **TLS.** `https` upstreams go over rustls (ring), verified like the hyper engine: the same
//!   Mozilla roots (`webpki-root-certs`, the certificate form of hyper's `webpki-roots`), TLS 1.2
//!   and 1.3, SNI = the URL's host, ALPN `h2` then `http/1.1`; certificate and host name
//!   verification are always on, and the platform's trust store is never read. An upstream may
//!   trust more roots ([`PingoraUpstreamBuilder::extra_roots`], e.g. a private authority) on top
//!   of those. pingora-core builds a verifier from a peer's roots for each new connection (not
//!   for a pooled one); connections verified with different roots never share a pool. A
//!   certificate that fails verification is a `502` that says why (`invalid peer certificate:
//!   UnknownIssuer`, `… not valid for name …`).
//!
//! ```no_run
//! use std::time::Duration;
//! use llmgate_pingora::PingoraUpstream;
//! use llmgate_core::ext::{UpstreamMode, UpstreamTarget};
//!
//! let target = UpstreamTarget {
//!     name: "local".into(),
//!     base_url: "http://127.0.0.1:8000/v1".into(),
//!     mode: UpstreamMode::OpenAi,
//!     api_key: None,
//! };
//! let upstream = PingoraUpstream::builder(target).timeout(Duration::from_secs(30)).build();
//! # let _ = upstream;
//! ```

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header, uri::Authority};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, GatewayBody, GatewayError, body,
    ext::UpstreamTarget,
    forward::{IdleTimeout, join_url, strip_hop_by_hop},
};
use pingora_core::{
    ErrorType,
    connectors::{ConnectorOptions, http::Connector},
    protocols::{ALPN, http::client::HttpSession, tls::CaType},
    tls::{CertificateDer, CertificateError, RootCertStore, RusTlsError},
    upstreams::peer::HttpPeer,
    utils::tls::WrappedX509,
};
use tokio::time::Instant;
use tower::Service;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

/// Request bodies with a known size up to this are held until the response head arrives, so a
/// request that hit a pooled connection the upstream had just closed can be sent once more.
const REPLAY_LIMIT: u64 = 4 << 20;

/// Forwards requests over pingora-core's connector. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PingoraUpstream {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    default_target: UpstreamTarget,
    timeout: Duration,
    pool_idle_timeout: Duration,
    h2c: bool,
    dns: Dns,
    /// The roots of upstreams without extra ones.
    default_trust: Trust,
    /// The roots of upstreams with extra ones, by upstream name.
    trust: HashMap<Arc<str>, Trust>,
}

/// The roots a TLS connection is verified with, and the pool group of the connections they
/// verified (so a connection is only reused under the roots that accepted it).
struct Trust {
    roots: Arc<CaType>,
    group: u64,
}

impl Trust {
    /// The built-in roots and `extra`.
    fn new(extra: Vec<WrappedX509>, group: u64) -> Self {
        let builtin = webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().filter_map(|der| root(der).ok());
        Self { roots: Arc::from(builtin.chain(extra).collect::<Vec<_>>()), group }
    }
}

/// A root as pingora-core holds it, checked by webpki as rustls will use it (a root it refused
/// would fail every handshake of its peer).
fn root(der: &CertificateDer<'_>) -> Result<WrappedX509, RusTlsError> {
    RootCertStore::empty().add(der.clone())?;
    WrappedX509::try_new(der.to_vec(), |raw| X509Certificate::from_der(raw).map(|(_, cert)| cert))
        .map_err(|_| RusTlsError::InvalidCertificate(CertificateError::BadEncoding))
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust").field("roots", &self.roots.len()).field("group", &self.group).finish()
    }
}

/// Builds a [`PingoraUpstream`].
#[derive(Debug)]
pub struct PingoraUpstreamBuilder {
    default_target: UpstreamTarget,
    timeout: Duration,
    pool_size: usize,
    pool_idle_timeout: Duration,
    h2c: bool,
    dns_ttl: Duration,
    trust: HashMap<Arc<str>, Trust>,
}

// === impl PingoraUpstreamBuilder ===

impl PingoraUpstreamBuilder {
    /// Bounds connecting, sending the request and receiving the response head, and the silence
    /// allowed between two frames of a streamed response body (default 600 s, like the config).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Idle connections kept per upstream address (default 128).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size;
        self
    }

    /// How long an idle pooled connection is kept (default 90 s, as the hyper client).
    pub fn pool_idle_timeout(mut self, idle: Duration) -> Self {
        self.pool_idle_timeout = idle;
        self
    }

    /// Speak h2 with prior knowledge (h2c) to plain-HTTP upstreams (default off: HTTP/1.1).
    pub fn h2c(mut self, on: bool) -> Self {
        self.h2c = on;
        self
    }

    /// How long a resolved address is reused (default 30 s). IP literals are never looked up.
    pub fn dns_ttl(mut self, ttl: Duration) -> Self {
        self.dns_ttl = ttl;
        self
    }

    /// Also trusts `roots` (DER CA certificates, e.g. a private authority's) for the TLS
    /// connections of the upstream named `upstream` (the [`UpstreamTarget::name`] of a request,
    /// whatever its base URL), on top of the built-in roots. A certificate that rustls or
    /// pingora-core cannot use is an error here, never at connect time.
    pub fn extra_roots(mut self, upstream: &str, roots: &[CertificateDer<'static>]) -> Result<Self, RusTlsError> {
        let roots = roots.iter().map(root).collect::<Result<Vec<_>, _>>()?;
        let group = self.trust.len() as u64 + 1;
        self.trust.insert(upstream.into(), Trust::new(roots, group));
        Ok(self)
    }

    /// The upstream.
    pub fn build(self) -> PingoraUpstream {
        let mut options = ConnectorOptions::new(self.pool_size);
        // Every TLS peer carries its own roots (`Trust`), so the connector's store stays empty:
        // the platform's is never read, and a bad one (`SSL_CERT_FILE`) cannot fail the build.
        options.ca_file = Some("/dev/null".into());
        let connector = Connector::new(Some(options));
        PingoraUpstream {
            inner: Arc::new(Inner {
                connector,
                default_target: self.default_target,
                timeout: self.timeout,
                pool_idle_timeout: self.pool_idle_timeout,
                h2c: self.h2c,
                dns: Dns { ttl: self.dns_ttl, cache: RwLock::default() },
                default_trust: Trust::new(Vec::new(), 0),
                trust: self.trust,
            }),
        }
    }
}

// === impl PingoraUpstream ===

impl PingoraUpstream {
    /// An upstream with its own pool; `timeout` as in [`PingoraUpstreamBuilder::timeout`].
    pub fn new(default_target: UpstreamTarget, timeout: Duration) -> Self {
        Self::builder(default_target).timeout(timeout).build()
    }

    /// A builder with the defaults.
    pub fn builder(default_target: UpstreamTarget) -> PingoraUpstreamBuilder {
        PingoraUpstreamBuilder {
            default_target,
            timeout: Duration::from_secs(600),
            pool_size: 128,
            pool_idle_timeout: Duration::from_secs(90),
            h2c: false,
            dns_ttl: Duration::from_secs(30),
            trust: HashMap::new(),
        }
    }
}

impl fmt::Debug for PingoraUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PingoraUpstream")
            .field("default_upstream", &self.inner.default_target.name)
            .field("timeout", &self.inner.timeout)
            .field("h2c", &self.inner.h2c)
            .finish_non_exhaustive()
    }
}

impl Service<Request<GatewayBody>> for PingoraUpstream {
    type Response = Response<GatewayBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The pool is always ready; connections are made per request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let target = parts.extensions.get::<UpstreamTarget>().unwrap_or(&self.inner.default_target);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let url = join_url(&target.base_url, path);
        let upstream = target.name.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let timeout = inner.timeout;
            match tokio::time::timeout(timeout, inner.clone().forward(parts, body, url, &upstream)).await {
                Err(_) => Err(GatewayError::UpstreamTimeout(Some(timeout)).into()),
                Ok(result) => result,
            }
        })
    }
}

/// The outgoing request body: held (replayable) or streamed.
enum Outgoing {
    Held(Bytes),
    Streamed(Option<GatewayBody>),
}

type ClientSession = HttpSession;

/// Why an exchange failed, and whether it may be retried on a fresh connection.
struct Failed {
    error: BoxError,
    /// Nothing reached the upstream application yet (a stale pooled connection).
    retryable: bool,
}

impl Inner {
    /// Sends the request and reads the response head (bounded by the caller's timeout).
    async fn forward(
        self: Arc<Self>,
        mut parts: http::request::Parts,
        body: GatewayBody,
        url: String,
        upstream: &str,
    ) -> Result<Response<GatewayBody>, BoxError> {
        let uri = url
            .parse::<Uri>()
            .map_err(|e| GatewayError::UpstreamUnavailable(format!("invalid upstream URL {url}: {e}")))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| GatewayError::UpstreamUnavailable(format!("invalid upstream URL {url}: no host")))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(GatewayError::UpstreamUnavailable(format!("invalid upstream URL {url}")).into()),
        };
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        // pingora-core skips certificate verification for an empty SNI: never let one through.
        if host.is_empty() {
            return Err(GatewayError::UpstreamUnavailable(format!("invalid upstream URL {url}: no host")).into());
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = self.dns.resolve(host, port).await?;
        let mut peer = HttpPeer::new(addr, tls, host.to_string());
        peer.options.connection_timeout = Some(self.timeout);
        peer.options.write_timeout = Some(self.timeout);
        if tls {
            let trust = self.trust.get(upstream).unwrap_or(&self.default_trust);
            peer.options.ca = Some(trust.roots.clone());
            peer.group_key = trust.group;
            peer.options.verify_cert = true;
            peer.options.verify_hostname = true;
            peer.options.alpn = ALPN::H2H1;
        } else if self.h2c {
            peer.options.alpn = ALPN::H2;
        }

        // The request head as pingora writes it: origin-form request line, `Host` = upstream.
        strip_hop_by_hop(&mut parts.headers);
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| GatewayError::UpstreamUnavailable(format!("invalid upstream host {authority}: {e}")))?;
        parts.headers.insert(header::HOST, host);
        parts.uri = uri.path_and_query().map_or_else(|| Uri::from_static("/"), |p| Uri::from(p.clone()));
        parts.version = Version::HTTP_11;
        let method = parts.method.clone();
        let size = body.size_hint().exact();
        let mut outgoing = match size {
            _ if body.is_end_stream() => Outgoing::Held(Bytes::new()),
            Some(n) if n <= REPLAY_LIMIT => Outgoing::Held(body.collect().await?.to_bytes()),
            _ => Outgoing::Streamed(Some(body)),
        };
        let size = match &outgoing {
            Outgoing::Held(bytes) => Some(bytes.len() as u64),
            Outgoing::Streamed(_) => size,
        };

        let mut attempt = 0;
        let session = loop {
            attempt += 1;
            let (mut session, reused) =
                self.connector.get_http_session(&peer).await.map_err(|e| connect_error(&e, &authority))?;
            let head = request_head(&parts, &session, &method, size);
            match exchange(&mut session, head, &mut outgoing).await {
                Ok(()) => break session,
                Err(failed) if failed.retryable && reused && attempt == 1 => {
                    tracing::debug!(upstream = %authority, error = %failed.error, "pooled connection failed; retrying once");
                }
                Err(failed) => return Err(failed.error),
            }
        };

        let response = session
            .response_header()
            .ok_or_else(|| GatewayError::UpstreamUnavailable(format!("{authority} sent no response head")))?;
        let mut head = response.as_owned_parts();
        let no_body = method == Method::HEAD
            || head.status.is_informational()
            || matches!(head.status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
        let length = if no_body || head.headers.contains_key(header::TRANSFER_ENCODING) {
            None
        } else {
            head.headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        strip_hop_by_hop(&mut head.headers);
        head.version = Version::HTTP_11;
        let body = PingoraBody::new(Conn { session, peer, pool: self.clone() }, length, no_body);
        Ok(Response::from_parts(head, body::boxed(IdleTimeout::new(body, self.timeout))))
    }
}

/// Builds the pingora request head for this session's protocol.
fn request_head(
    parts: &http::request::Parts,
    session: &ClientSession,
    method: &Method,
    size: Option<u64>,
) -> http::request::Parts {
    let mut parts = parts.clone();
    let h1 = session.as_http1().is_some();
    match size {
        // Methods that usually carry no body get no `content-length: 0` (as hyper does).
        Some(0) if matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE) => {
        }
        Some(n) => {
            parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None if h1 => {
            parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        None => {}
    }
    parts
}

/// Writes the request, then reads the response head (skipping informational responses).
async fn exchange(
    session: &mut ClientSession,
    head: http::request::Parts,
    outgoing: &mut Outgoing,
) -> Result<(), Failed> {
    let unsent = |e: Box<pingora_core::Error>| Failed { error: transport_error(&e), retryable: true };
    session.write_request_header(Box::new(head.into())).await.map_err(unsent)?;
    match outgoing {
        Outgoing::Held(bytes) => {
            if !bytes.is_empty() {
                session.write_request_body(bytes.clone(), true).await.map_err(unsent)?;
            }
            session.finish_request_body().await.map_err(unsent)?;
        }
        Outgoing::Streamed(body) => {
            let Some(mut body) = body.take() else {
                return Err(Failed {
                    error: GatewayError::Internal("request body already sent".into()).into(),
                    retryable: false,
                });
            };
            let sent = |e: Box<pingora_core::Error>| Failed { error: transport_error(&e), retryable: false };
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|error| Failed { error, retryable: false })?;
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    session.write_request_body(data, false).await.map_err(sent)?;
                }
            }
            session.finish_request_body().await.map_err(sent)?;
        }
    }
    let retryable = matches!(outgoing, Outgoing::Held(_));
    loop {
        session.read_response_header().await.map_err(|e| Failed {
            error: transport_error(&e),
            retryable: retryable && e.etype() == &ErrorType::ConnectionClosed,
        })?;
        match session.response_header().map(|h| h.status) {
            Some(status) if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS => continue,
            _ => return Ok(()),
        }
    }
}

/// A connect failure: a timeout is a 504, anything else a 502 (a failed TLS handshake says why
/// in rustls's words, as the hyper engine does).
fn connect_error(error: &pingora_core::Error, authority: &Authority) -> BoxError {
    match error.etype() {
        ErrorType::ConnectTimedout => GatewayError::UpstreamTimeout(None).into(),
        ErrorType::TLSHandshakeFailure => {
            let text = error.to_string();
            GatewayError::UpstreamUnavailable(format!(
                "TLS handshake with {authority} failed: {}",
                handshake_reason(&text)
            ))
            .into()
        }
        _ => GatewayError::UpstreamUnavailable(format!("cannot connect to {authority}: {error}")).into(),
    }
}

/// The rustls reason of a failed handshake, which pingora-core keeps only inside its error text
/// (`… tls connect error cause: {reason}, SNI: {host} …`); the whole text where it has another
/// shape.
fn handshake_reason(text: &str) -> &str {
    text.split_once("tls connect error cause: ")
        .and_then(|(_, rest)| rest.split_once(", SNI: "))
        .map_or(text, |(reason, _)| reason)
}

/// A failure on an established connection.
fn transport_error(error: &pingora_core::Error) -> BoxError {
    match error.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout => {
            GatewayError::UpstreamTimeout(None).into()
        }
        _ => GatewayError::UpstreamUnavailable(error.to_string()).into(),
    }
}

// === DNS ===

/// Resolves upstream hosts off the runtime, with a small TTL cache (never in `HttpPeer::new`).
struct Dns {
    ttl: Duration,
    cache: RwLock<HashMap<(String, u16), (SocketAddr, Instant)>>,
}

impl Dns {
    /// `host` without IPv6 brackets.
    async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, BoxError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let key = (host.to_ascii_lowercase(), port);
        if let Ok(cache) = self.cache.read()
            && let Some((addr, at)) = cache.get(&key)
            && at.elapsed() < self.ttl
        {
            return Ok(*addr);
        }
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| GatewayError::UpstreamUnavailable(format!("cannot resolve upstream host {host}: {e}")))?
            .next()
            .ok_or_else(|| GatewayError::UpstreamUnavailable(format!("upstream host {host} has no address")))?;
        if let Ok(mut cache) = self.cache.write() {
            if cache.len() > 1024 {
                cache.clear();
            }
            cache.insert(key, (addr, Instant::now()));
        }
        Ok(addr)
    }
}

// === impl PingoraBody ===

/// A client session with what it takes to give it back to the pool.
struct Conn {
    session: ClientSession,
    peer: HttpPeer,
    pool: Arc<Inner>,
}

impl Conn {
    /// Returns the session to the pool (only called once the body was read to the end).
    fn release(self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let Conn { session, peer, pool } = self;
            pool.connector.release_http_session(session, &peer, Some(pool.pool_idle_timeout)).await;
        });
    }
}

type ReadFuture = Pin<Box<dyn Future<Output = (Box<Conn>, pingora_core::Result<Option<Bytes>>)> + Send>>;

enum State {
    Idle(Box<Conn>),
    Reading(ReadFuture),
    Done,
}

/// The response body, read straight from the session (`Send`, not `Sync`).
struct PingoraBody {
    state: State,
    remaining: Option<u64>,
}

impl PingoraBody {
    fn new(mut conn: Conn, length: Option<u64>, no_body: bool) -> Self {
        if no_body || conn.session.response_done() {
            conn.release();
            return Self { state: State::Done, remaining: Some(0) };
        }
        Self { state: State::Idle(Box::new(conn)), remaining: length }
    }
}

impl Body for PingoraBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Done => return Poll::Ready(None),
                State::Idle(mut conn) => {
                    self.state = State::Reading(Box::pin(async move {
                        let read = conn.session.read_response_body().await;
                        (conn, read)
                    }));
                }
                State::Reading(mut read) => {
                    let (mut conn, result) = match read.as_mut().poll(cx) {
                        Poll::Pending => {
                            self.state = State::Reading(read);
                            return Poll::Pending;
                        }
                        Poll::Ready(done) => done,
                    };
                    match result {
                        Ok(Some(data)) => {
                            if conn.session.response_done() {
                                conn.release();
                            } else {
                                self.state = State::Idle(conn);
                            }
                            if let Some(remaining) = self.remaining.as_mut() {
                                *remaining = remaining.saturating_sub(data.len() as u64);
                            }
                            if data.is_empty() {
                                continue;
                            }
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                        Ok(None) => {
                            conn.release();
                            return Poll::Ready(None);
                        }
                        // The session is dropped: a connection that failed mid-body is not reused.
                        Err(error) => return Poll::Ready(Some(Err(transport_error(&error)))),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.state, self.remaining) {
            (State::Done, _) => SizeHint::with_exact(0),
            (_, Some(remaining)) => SizeHint::with_exact(remaining),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmgate_core::ext::UpstreamMode;

    fn builder() -> PingoraUpstreamBuilder {
        let target = UpstreamTarget {
            name: "public".into(),
            base_url: "https://api.example.com/v1".into(),
            mode: UpstreamMode::OpenAi,
            api_key: None,
        };
        PingoraUpstream::builder(target)
    }

    #[test]
    fn extra_roots_are_added_to_the_built_in_ones_for_their_upstream_only() {
        let builtin = webpki_root_certs::TLS_SERVER_ROOT_CERTS;
        let extra = [builtin[0].clone(), builtin[1].clone()];
        let upstream = builder().extra_roots("private", &extra).unwrap().extra_roots("other", &extra[..1]).unwrap();
        let inner = upstream.build().inner;
        assert_eq!(inner.default_trust.roots.len(), builtin.len(), "every built-in root loads");
        assert_eq!(inner.trust["private"].roots.len(), builtin.len() + 2);
        assert_eq!(inner.trust["other"].roots.len(), builtin.len() + 1);
        let groups = [inner.default_trust.group, inner.trust["private"].group, inner.trust["other"].group];
        assert!(groups[0] != groups[1] && groups[1] != groups[2] && groups[0] != groups[2], "{groups:?}");
    }

    #[test]
    fn a_root_that_is_not_a_certificate_is_refused_when_given() {
        let error = builder().extra_roots("private", &[CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])]).unwrap_err();
        assert!(matches!(error, RusTlsError::InvalidCertificate(_)), "{error:?}");
    }
}
