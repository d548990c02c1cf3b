//! The Pingora host: a pingora-core server (HTTP/1.1 and h2c) in front of any Tower service over
//! `GatewayBody` that never fails.
//!
//! It implements pingora's [`HttpServerApp`] directly, not `ServeHttp` (which must build the
//! whole response before returning, so it cannot stream): for each request it reads the head,
//! streams the request body into a [`GatewayBody`], calls the Tower stack, writes the response
//! head, then each body frame as it comes (SSE is never buffered), and hands the connection back
//! for keep-alive.
//!
//! **Where things run.** Everything runs on the caller's tokio runtime, as with the hyper host:
//! this host accepts on the caller's listener and runs each connection through pingora-core's
//! [`ServerApp`] (its HTTP/1.1 and h2 protocol code, keep-alive and h2c detection), calling the
//! stack in the connection's task (a clone per request, as the hyper host does; the service is
//! `Send` but not `Sync`, so the shared original sits behind a mutex). What the stack spawns
//! (insertion records, usage taps, rate-limit corrections) lands on the caller's runtime, which
//! outlives connections. Pingora's `Server` (its own runtimes and listener) is not used, after
//! measuring the alternatives (`docs/performance.md`, "The Pingora host's threads"): with it, the
//! stack either runs on the caller's runtime behind a hand-off per request (a queue and a frame
//! channel; or cross-runtime wake-ups, at 1.5× the CPU per request) or on Pingora's runtimes,
//! which drop every task, background records included, when they stop. Without it the
//! throughput is the same within noise and 1,000 open streams take ~80 MiB less (no 64 KiB
//! socket read buffer per connection). A connection gets a small write buffer instead
//! (the `connection` module), so a response head and its body leave in one write.
//!
//! **Shutdown.** When `shutdown` resolves, the listener is closed, idle keep-alive connections
//! are closed at once (h2 ones get a GOAWAY), responses in progress are sent with
//! `Connection: close`, and in-flight requests and streams get up to `drain` to finish; then the
//! remaining connections are closed.
//!
//! ```no_run
//! use std::time::Duration;
//! use llmgate_core::{GatewayBody, RescueLayer};
//! use llmgate_pingora::serve_pingora;
//! use tower::{Layer, service_fn};
//!
//! async fn run() -> std::io::Result<()> {
//!     let service = RescueLayer::new().layer(service_fn(|_req: http::Request<GatewayBody>| async {
//!         Ok::<_, llmgate_core::BoxError>(http::Response::new(llmgate_core::body::full("hello")))
//!     }));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//!     let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//!     serve_pingora(listener, service, shutdown, Duration::from_secs(30)).await;
//!     Ok(())
//! }
//! ```

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Version, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use llmgate_core::{BoxError, GatewayBody, body, body::HostedService, forward::strip_hop_by_hop};
use pingora_core::{
    apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp},
    protocols::http::ServerSession,
    server::ShutdownWatch,
};
use tokio::{
    net::TcpListener,
    sync::{Notify, mpsc, watch},
    task::JoinSet,
};
use tower::ServiceExt;

use crate::connection::Buffered;

/// Serves `service` on `listener` with a Pingora server until `shutdown` resolves, then drains
/// in-flight requests and streams for up to `drain`.
///
/// The same shape as the hyper engine's `serve`; see [`PingoraHost`] for the knobs.
/// Returns once the in-flight requests have finished or the drain timeout passed, with the
/// remaining connections closed.
pub async fn serve_pingora<S>(listener: TcpListener, service: S, shutdown: impl Future<Output = ()>, drain: Duration)
where
    S: HostedService,
{
    PingoraHost::new().serve(listener, service, shutdown, drain).await
}

/// A Pingora host with its options.
#[derive(Clone, Debug)]
pub struct PingoraHost {
    h2c: bool,
}

impl Default for PingoraHost {
    fn default() -> Self {
        Self::new()
    }
}

// === impl PingoraHost ===

impl PingoraHost {
    /// h2c on (as the hyper host).
    pub fn new() -> Self {
        Self { h2c: true }
    }

    /// Accept HTTP/2 with prior knowledge on the plain-text port (default on).
    pub fn h2c(mut self, on: bool) -> Self {
        self.h2c = on;
        self
    }

    /// Serves `service` on `listener`; see [`serve_pingora`].
    pub async fn serve<S>(self, listener: TcpListener, service: S, shutdown: impl Future<Output = ()>, drain: Duration)
    where
        S: HostedService,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut options = HttpServerOptions::default();
        options.h2c = self.h2c;
        let in_flight = Arc::new(InFlight::default());
        let app = Arc::new(App { service: Mutex::new(service), in_flight: in_flight.clone(), options });
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some(_) = connections.join_next() => continue,
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let (app, stop) = (app.clone(), stop_rx.clone());
            connections.spawn(async move {
                // A connection kept alive comes back for its next request (h1).
                let mut next = app.process_new(Box::new(Buffered::from(stream)), &stop).await;
                while let Some(stream) = next {
                    next = app.process_new(stream, &stop).await;
                }
            });
        }
        drop(listener);
        tracing::info!("shutting down: draining in-flight requests for up to {:?}", drain);
        // Closes idle connections and turns keep-alive off for responses still to come.
        let _ = stop_tx.send(true);
        if tokio::time::timeout(drain, in_flight.idle()).await.is_err() {
            tracing::warn!("drain timeout passed; closing the remaining connections");
        }
        // Dropping the set closes what is left (connections idle before their first byte).
        drop(connections);
    }
}

// === Shutdown ===

/// Requests in progress (from the request head to the last byte of the response).
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

// === The app ===

type ResponseFuture = Pin<Box<dyn Future<Output = Result<http::Response<GatewayBody>, Infallible>> + Send>>;

/// The request body as the stack sees it, fed by the Pingora side.
struct RequestBody {
    rx: mpsc::Receiver<Result<Option<Bytes>, BoxError>>,
    remaining: Option<u64>,
    done: bool,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(Some(data)))) => {
                if let Some(remaining) = self.remaining.as_mut() {
                    *remaining = remaining.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Ok(None))) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                self.done = true;
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err("the client's request body ended early".into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// Resolves when the client went away (h1: EOF or a reset; h2: the stream or connection reset)
/// with `true`; with `false` when the watch must stop without that meaning a disconnect (h1: the
/// client sent bytes after its request, a pipelined request this host does not keep). Otherwise
/// pending: it only reads when the socket is readable, never spins.
///
/// On h1 call it only once the request body was read to the end (it reads the connection).
async fn client_gone(session: &mut ServerSession) -> bool {
    match session.read_body_or_idle(true).await {
        Ok(_) => false,
        Err(error) => matches!(
            error.etype(),
            pingora_core::ErrorType::ConnectionClosed
                | pingora_core::ErrorType::ReadError
                | pingora_core::ErrorType::H2Error
        ),
    }
}

/// Reads the client's request body into `tx`; `true` when it was read to the end.
async fn feed_request_body(session: &mut ServerSession, tx: mpsc::Sender<Result<Option<Bytes>, BoxError>>) -> bool {
    loop {
        match session.read_request_body().await {
            Ok(Some(data)) => {
                if tx.send(Ok(Some(data))).await.is_err() {
                    return false;
                }
            }
            Ok(None) => {
                let _ = tx.send(Ok(None)).await;
                return true;
            }
            Err(error) => {
                let _ = tx.send(Err(error.into())).await;
                return false;
            }
        }
    }
}

struct App<S> {
    /// Cloned for each request; behind a mutex because a service need not be `Sync`.
    service: Mutex<S>,
    in_flight: Arc<InFlight>,
    options: HttpServerOptions,
}

impl<S: HostedService> HttpServerApp for App<S> {
    fn process_new_http<'life0, 'life1, 'async_trait>(
        self: &'life0 Arc<Self>,
        session: ServerSession,
        shutdown: &'life1 ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(self.handle(session, shutdown))
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.options)
    }
}

impl<S: HostedService> App<S> {
    async fn handle(&self, mut session: ServerSession, shutdown: &ShutdownWatch) -> Option<ReusedHttpStream> {
        let read = if session.is_http2() {
            session.read_request().await
        } else {
            // An h1 connection waiting for its next request is idle: close it as soon as the
            // drain begins, as hyper's graceful shutdown does (h2 gets a GOAWAY from pingora).
            let mut stopping = shutdown.clone();
            tokio::select! {
                biased;
                read = session.read_request() => read,
                _ = stopping.wait_for(|&stop| stop) => return None,
            }
        };
        match read {
            Ok(true) => {}
            Ok(false) => return None,
            Err(error) => {
                tracing::debug!(%error, "reading a request head failed");
                return None;
            }
        }
        let _in_flight = self.in_flight.enter();
        session.set_keepalive(if *shutdown.borrow() { None } else { Some(60) });
        let h1 = !session.is_http2();
        let request_head = session.req_header();
        let client_version = request_head.version;
        let parts = request_head.as_owned_parts();
        let method = parts.method.clone();

        let (body, feeder) = if session.is_body_empty() {
            (body::empty(), None)
        } else {
            let remaining = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .filter(|_| !parts.headers.contains_key(header::TRANSFER_ENCODING))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            let (tx, rx) = mpsc::channel(4);
            (body::boxed(RequestBody { rx, remaining, done: false }), Some(tx))
        };
        let service = self.service.lock().unwrap_or_else(PoisonError::into_inner).clone();
        // Boxed so that the connection's future sees no `dyn Error` lifetimes in its `Send`
        // check (as in the hyper host).
        let mut call: ResponseFuture = Box::pin(service.oneshot(Request::from_parts(parts, body)));

        // Feed the request body until the response head arrives.
        let mut body_read = feeder.is_none();
        let response = match feeder {
            None => None,
            Some(tx) => {
                // hyper answers `Expect: 100-continue` when the body is first read; so do we.
                let expects_continue = session
                    .get_header(header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                if expects_continue && h1 && session.write_continue_response().await.is_err() {
                    return None;
                }
                let feed = feed_request_body(&mut session, tx);
                tokio::pin!(feed);
                tokio::select! {
                    response = &mut call => Some(response),
                    complete = &mut feed => {
                        body_read = complete;
                        None
                    }
                }
            }
        };
        // From here on, watch the client: a disconnect drops the pending call and the response
        // body, as hyper does (nothing the call waits for, a retry or a rate-limit wait, happens
        // on its behalf; the usage tap reports a cancellation). On h1 the connection can only be
        // read once the request body is done; an h2 stream reset is seen either way.
        let mut watching = body_read || !h1;
        let response = match response {
            Some(response) => response,
            None => loop {
                tokio::select! {
                    response = &mut call => break response,
                    gone = client_gone(&mut session), if watching => {
                        if gone {
                            tracing::debug!("the client went away before the response head");
                            return None;
                        }
                        watching = false;
                        session.set_keepalive(None);
                    }
                }
            },
        };
        let response = match response {
            Ok(response) => response,
            Err(never) => match never {},
        };
        if !body_read {
            // The rest of the request body was never read: this connection cannot be reused.
            session.set_keepalive(None);
        }
        let (mut parts, mut body) = response.into_parts();
        let end = body.is_end_stream();
        let exact = body.size_hint().exact();

        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        let bodiless = method == Method::HEAD
            || parts.status.is_informational()
            || matches!(parts.status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
        if !bodiless {
            match exact {
                Some(length) => {
                    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
                }
                // Chunked keeps the connection reusable and lets each frame go out at once.
                None if h1 && client_version != Version::HTTP_10 => {
                    parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
                }
                None => {}
            }
        }
        if let Err(error) = session.write_response_header(Box::new(parts.into())).await {
            tracing::debug!(%error, "writing a response head failed");
            return None;
        }
        if end {
            if session.write_response_body(Bytes::new(), true).await.is_err() {
                return None;
            }
        } else {
            // Bytes of a `content-length` body still to write. The write that completes the body
            // hands the client the whole response, and a keep-alive client sends its next request
            // right away: stop watching before that write, or the watch would read that request
            // (pingora: "sent data after end of body") and the connection would not be reused.
            let mut unwritten = exact.filter(|_| !bodiless);
            loop {
                let frame = tokio::select! {
                    frame = body.frame() => frame,
                    gone = client_gone(&mut session), if watching => {
                        if gone {
                            tracing::debug!("the client went away mid-response");
                            return None;
                        }
                        watching = false;
                        session.set_keepalive(None);
                        continue;
                    }
                };
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    // The stream failed midway: close the connection without finishing the
                    // body, so the client sees a cut stream rather than a complete one.
                    Some(Err(error)) => {
                        tracing::debug!(%error, "the response body failed midway");
                        if h1 {
                            // What the client was given so far (the head, part of a body with
                            // a length) is still in the connection's write buffer: send it first.
                            session.shutdown().await;
                        }
                        return None;
                    }
                    None => {
                        if session.write_response_body(Bytes::new(), true).await.is_err() {
                            return None;
                        }
                        break;
                    }
                };
                match frame.into_data() {
                    Ok(data) => {
                        if let Some(left) = unwritten.as_mut() {
                            *left = left.saturating_sub(data.len() as u64);
                            if *left == 0 {
                                watching = false;
                            }
                        }
                        if let Err(error) = session.write_response_body(data, false).await {
                            tracing::debug!(%error, "the client went away mid-response");
                            return None;
                        }
                        // Finish at once, not on the next poll of a body that has nothing left.
                        if body.is_end_stream() {
                            if session.write_response_body(Bytes::new(), true).await.is_err() {
                                return None;
                            }
                            break;
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = session.write_response_trailers(trailers).await;
                        }
                    }
                }
            }
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, settings)),
            Ok(None) => None,
            Err(error) => {
                tracing::debug!(%error, "finishing a response failed");
                None
            }
        }
    }
}
