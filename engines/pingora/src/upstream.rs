//! The Pingora upstream: pingora-core's pooled HTTP connector (HTTP/1.1, or h2 with prior
//! knowledge) behind the same `tower::Service` shape as the hyper engine's `HyperUpstream`.
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
//! - **No TLS.** pingora-core is built without a TLS backend here: an `https` upstream is a `502`
//!   that says so (use the hyper engine for those).
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
    protocols::{ALPN, http::client::HttpSession},
    upstreams::peer::HttpPeer,
};
use tokio::time::Instant;
use tower::Service;

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

    /// The upstream.
    pub fn build(self) -> PingoraUpstream {
        let connector = Connector::new(Some(ConnectorOptions::new(self.pool_size)));
        PingoraUpstream {
            inner: Arc::new(Inner {
                connector,
                default_target: self.default_target,
                timeout: self.timeout,
                pool_idle_timeout: self.pool_idle_timeout,
                h2c: self.h2c,
                dns: Dns { ttl: self.dns_ttl, cache: RwLock::default() },
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
        let inner = self.inner.clone();
        Box::pin(async move {
            let timeout = inner.timeout;
            match tokio::time::timeout(timeout, inner.clone().forward(parts, body, url)).await {
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
    ) -> Result<Response<GatewayBody>, BoxError> {
        let uri = url
            .parse::<Uri>()
            .map_err(|e| GatewayError::UpstreamUnavailable(format!("invalid upstream URL {url}: {e}")))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| GatewayError::UpstreamUnavailable(format!("invalid upstream URL {url}: no host")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(GatewayError::UpstreamUnavailable(format!(
                    "https upstream {authority} is not supported by the Pingora engine in this build \
                     (pingora-core has no TLS backend); use the hyper engine"
                ))
                .into());
            }
            _ => return Err(GatewayError::UpstreamUnavailable(format!("invalid upstream URL {url}")).into()),
        }
        let addr = self.dns.resolve(&authority).await?;
        let mut peer = HttpPeer::new(addr, false, authority.host().to_string());
        peer.options.connection_timeout = Some(self.timeout);
        peer.options.write_timeout = Some(self.timeout);
        if self.h2c {
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

/// A connect failure: a timeout is a 504, anything else a 502.
fn connect_error(error: &pingora_core::Error, authority: &Authority) -> BoxError {
    match error.etype() {
        ErrorType::ConnectTimedout => GatewayError::UpstreamTimeout(None).into(),
        _ => GatewayError::UpstreamUnavailable(format!("cannot connect to {authority}: {error}")).into(),
    }
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
    async fn resolve(&self, authority: &Authority) -> Result<SocketAddr, BoxError> {
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
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
