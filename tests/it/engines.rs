//! The two engines side by side: the same test body runs against the hyper host + hyper upstream
//! and the Pingora host + Pingora upstream, with a small stack (`Rescue` over the upstream) so
//! that what is compared is the engines themselves.
#![cfg(feature = "pingora")]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use llmgate::{
    core::{
        BoxError, GatewayBody, RescueLayer,
        ext::{UpstreamMode, UpstreamTarget},
    },
    stack::GatewayService,
};
use llmgate_hyper::HyperUpstream;
use llmgate_pingora::PingoraUpstream;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tower::{Service, ServiceBuilder, util::BoxCloneService};

use crate::support::*;

/// Which engine serves and forwards: its host and its upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Hyper,
    Pingora,
}

/// A proxy on an ephemeral port: `Rescue` over the engine's upstream, on the engine's host.
pub struct EngineProxy {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl EngineProxy {
    pub async fn start(engine: Engine, base_url: &str, timeout: Duration, drain: Duration) -> Self {
        let target = UpstreamTarget {
            name: "test".into(),
            base_url: base_url.into(),
            mode: UpstreamMode::OpenAi,
            api_key: None,
        };
        let service = match engine {
            Engine::Hyper => stack(HyperUpstream::new(target, timeout)),
            Engine::Pingora => stack(PingoraUpstream::new(target, timeout)),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async {
            let _ = rx.await;
        };
        let task = match engine {
            Engine::Hyper => tokio::spawn(llmgate_hyper::serve(listener, service, shutdown, drain)),
            Engine::Pingora => tokio::spawn(llmgate_pingora::serve_pingora(listener, service, shutdown, drain)),
        };
        Self { addr, shutdown: Some(tx), task }
    }

    pub async fn in_front_of(engine: Engine, base_url: &str) -> Self {
        Self::start(engine, base_url, Duration::from_secs(10), Duration::from_secs(10)).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts graceful shutdown and returns the serving task, which ends after the drain.
    pub fn begin_shutdown(&mut self) -> &mut JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        &mut self.task
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn stack<U>(upstream: U) -> GatewayService
where
    U: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = BoxError> + Clone + Send + 'static,
    U::Future: Send + 'static,
{
    BoxCloneService::new(ServiceBuilder::new().layer(RescueLayer::new()).service(upstream))
}

/// One `#[tokio::test]` per engine for each parameterised test body.
macro_rules! per_engine {
    ($($name:ident),* $(,)?) => {
        mod hyper {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Engine::Hyper).await
            })*
        }
        mod pingora {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                super::$name(super::Engine::Pingora).await
            })*
        }
    };
}

per_engine!(
    json_passthrough,
    catch_all_streams_a_request_body_of_unknown_size,
    sse_reaches_the_client_before_the_upstream_finishes,
    upstream_host_that_does_not_resolve_is_a_502,
    connection_refused_is_a_502,
    https_upstream_without_tls_is_a_502,
    http10_upstream_still_answers_the_client_in_http11,
    upstream_timeout_is_a_504,
    graceful_shutdown_finishes_an_in_flight_stream,
    graceful_shutdown_closes_idle_connections_at_once,
    h2c_clients_are_served,
    upstream_connections_are_reused,
    expect_100_continue_is_answered,
);

async fn json_passthrough(engine: Engine) {
    let mock = mock().await;
    let proxy = EngineProxy::in_front_of(engine, &mock.url()).await;
    let body = chat_body("gpt-test", false);
    // Several requests: pooled upstream connections and client keep-alive are reused.
    for _ in 0..3 {
        let reply = post_json(&proxy.url("/v1/chat/completions"), &[("x-custom", "1")], &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["usage"]["total_tokens"], 8);
        assert_eq!(reply.headers["content-type"], "application/json");
        assert_eq!(reply.headers["content-length"], reply.body.len().to_string().as_str());
        assert_eq!(reply.headers.get_all("date").iter().count(), 1);
        assert!(reply.headers.get("transfer-encoding").is_none());
        let seen = mock.requests().pop().unwrap();
        assert_eq!(seen.uri, "/v1/chat/completions");
        assert_eq!(seen.json(), body);
        assert_eq!(seen.headers["host"], mock.addr().to_string().as_str(), "Host is the upstream's");
        assert_eq!(seen.headers["x-custom"], "1");
        assert_eq!(seen.headers["content-length"], seen.body.len().to_string().as_str());
    }
    let reply = send(Method::GET, &proxy.url("/v1/models?limit=3"), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["uri"], "/v1/models?limit=3");
    assert_eq!(reply.json()["method"], "GET");
}

async fn catch_all_streams_a_request_body_of_unknown_size(engine: Engine) {
    let mock = mock().await;
    let proxy = EngineProxy::in_front_of(engine, &mock.url()).await;
    let echo = put_streamed_body(&proxy.url("/v1/files/abc?purpose=x")).await;
    assert_eq!(echo["body"], "one two three");
    assert_eq!(echo["uri"], "/v1/files/abc?purpose=x");
    assert_eq!(echo["headers"]["transfer-encoding"], "chunked");
}

async fn sse_reaches_the_client_before_the_upstream_finishes(engine: Engine) {
    let mock = mock().await;
    let proxy = EngineProxy::in_front_of(engine, &mock.url()).await;
    // The second chunk comes after ten minutes: a buffering engine would hang here.
    let req = request(
        Method::POST,
        &proxy.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-mock-chunks", "2"), ("x-mock-chunk-delay-ms", "600000")],
        chat_body("gpt-test", true).to_string(),
    );
    let response = open(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response.headers().get("content-length").is_none());
    let mut body = response.into_body();
    let first = within(body.frame()).await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("tok0"), "{first:?}");
}

async fn upstream_host_that_does_not_resolve_is_a_502(engine: Engine) {
    let proxy = EngineProxy::in_front_of(engine, "http://no-such-host.invalid/v1").await;
    // Twice: the first failure must not have taken a worker down.
    for _ in 0..2 {
        let reply = post_json(&proxy.url("/v1/chat/completions"), &[], &chat_body("m", false)).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        assert_eq!(reply.headers["content-type"], "application/json");
        assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    }
}

async fn connection_refused_is_a_502(engine: Engine) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let proxy = EngineProxy::in_front_of(engine, &format!("http://{closed}/v1")).await;
    let reply = post_json(&proxy.url("/v1/chat/completions"), &[], &chat_body("m", false)).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    let reply = send(Method::GET, &proxy.url("/v1/models"), &[], "").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
}

async fn https_upstream_without_tls_is_a_502(engine: Engine) {
    // A plain-text port behind an https URL: both engines fail the TLS handshake and say so.
    let mock = mock().await;
    let proxy = EngineProxy::in_front_of(engine, &format!("https://{}/v1", mock.addr())).await;
    let reply = post_json(&proxy.url("/v1/chat/completions"), &[], &chat_body("m", false)).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    let message = reply.json()["error"]["message"].as_str().unwrap().to_string();
    let expected = format!(
        "Upstream unavailable: TLS handshake with {} failed: received corrupt message of type InvalidContentType",
        mock.addr()
    );
    assert_eq!(message, expected);
    assert_eq!(mock.requests().len(), 0);
}

/// A raw-TCP upstream that answers every request with an HTTP/1.0, close-delimited response.
async fn http10_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let reply =
                    "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"ok\":true,\"from\":\"http/1.0\"}";
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

async fn http10_upstream_still_answers_the_client_in_http11(engine: Engine) {
    let upstream = http10_upstream().await;
    let proxy = EngineProxy::in_front_of(engine, &format!("http://{upstream}/v1")).await;
    for _ in 0..2 {
        let response = open(request(Method::GET, &proxy.url("/v1/models"), &[], "")).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), Version::HTTP_11, "the upstream's HTTP/1.0 must not leak");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = within(response.into_body().collect()).await.expect("body").to_bytes();
        assert_eq!(&body[..], br#"{"ok":true,"from":"http/1.0"}"#);
    }
    // And on the wire: the status line the client reads says HTTP/1.1.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    within(stream.read_to_end(&mut raw)).await.unwrap();
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
}

async fn upstream_timeout_is_a_504(engine: Engine) {
    let mock = mock().await;
    let proxy = EngineProxy::start(engine, &mock.url(), Duration::from_millis(300), Duration::from_secs(10)).await;
    let reply = post_json(&proxy.url("/v1/chat/completions"), &[("x-mock-hang", "1")], &chat_body("m", false)).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
}

async fn graceful_shutdown_finishes_an_in_flight_stream(engine: Engine) {
    let mock = mock().await;
    let mut proxy = EngineProxy::in_front_of(engine, &mock.url()).await;
    let req = request(
        Method::POST,
        &proxy.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-mock-chunks", "5"), ("x-mock-chunk-delay-ms", "100")],
        chat_body("gpt-test", true).to_string(),
    );
    let response = open(req).await;
    let mut body = response.into_body();
    let first = within(body.frame()).await.unwrap().unwrap();
    assert!(first.is_data());
    let addr = proxy.addr;
    let serving = proxy.begin_shutdown();
    let rest = within(body.collect()).await.expect("the stream finishes").to_bytes();
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"), "{rest:?}");
    within(serving).await.expect("the server ends after the drain");
    assert!(TcpStream::connect(addr).await.is_err(), "no longer accepting");
}

/// A raw-TCP HTTP/1.1 upstream: `GET …/held` starts a chunked SSE stream that ends only once
/// `release` is sent; anything else is a `content-length` "ok". Connections are kept alive.
async fn held_stream_upstream() -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (release, released) = oneshot::channel::<()>();
    let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let released = released.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    while !pending.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => pending.extend_from_slice(&buf[..read]),
                        }
                    }
                    let end = pending.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head: Vec<u8> = pending.drain(..end).collect();
                    if !head.starts_with(b"GET /v1/held ") {
                        if stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let first = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n";
                    if stream.write_all(first).await.is_err() {
                        return;
                    }
                    if let Some(released) = released.lock().await.take() {
                        let _ = released.await;
                    }
                    if stream.write_all(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, release)
}

async fn graceful_shutdown_closes_idle_connections_at_once(engine: Engine) {
    let (upstream, release) = held_stream_upstream().await;
    // A drain longer than the hang guard: an idle connection held until the drain ends fails.
    let base_url = format!("http://{upstream}/v1");
    let mut proxy = EngineProxy::start(engine, &base_url, Duration::from_secs(10), Duration::from_secs(60)).await;
    // A keep-alive connection that was served once and now waits for its next request.
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.ends_with(b"\r\n\r\nok") {
        let n = within(idle.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed before the answer: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // A stream in flight, held open by the upstream until released.
    let response = open(request(Method::GET, &proxy.url("/v1/held"), &[], "")).await;
    let mut body = response.into_body();
    let first = within(body.frame()).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: 1\n\n");

    let serving = proxy.begin_shutdown();
    // The idle connection is closed while the stream is still held: at the start of the drain.
    let closed = within(idle.read(&mut buf)).await;
    assert!(matches!(closed, Ok(0) | Err(_)), "the idle connection is still open: {closed:?}");
    release.send(()).unwrap();
    let rest = within(body.collect()).await.expect("the stream finishes").to_bytes();
    assert_eq!(&rest[..], b"data: [DONE]\n\n");
    within(serving).await.expect("the server ends after the drain");
}

async fn h2c_clients_are_served(engine: Engine) {
    let mock = mock().await;
    let proxy = EngineProxy::in_front_of(engine, &mock.url()).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let req = request(
        Method::POST,
        &proxy.url("/v1/chat/completions"),
        &[("content-type", "application/json"), ("x-mock-chunks", "3")],
        chat_body("gpt-test", true).to_string(),
    );
    let response = within(client.request(req)).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), Version::HTTP_2);
    let text = within(response.into_body().collect()).await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("tok2") && text.ends_with("data: [DONE]\n\n"), "{text}");
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen.headers["host"], mock.addr().to_string().as_str());
}

/// A raw-TCP HTTP/1.1 upstream that keeps connections alive and counts them; it answers with
/// a `content-length` body and a chunked body in turn.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 1024];
                for n in 0.. {
                    while !pending.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => pending.extend_from_slice(&buf[..read]),
                        }
                    }
                    let end = pending.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    pending.drain(..end);
                    let reply: &[u8] = if n % 2 == 0 {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    } else {
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                    };
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

async fn upstream_connections_are_reused(engine: Engine) {
    let (upstream, accepted) = counting_upstream().await;
    let proxy = EngineProxy::in_front_of(engine, &format!("http://{upstream}/v1")).await;
    for _ in 0..6 {
        let reply = send(Method::GET, &proxy.url("/v1/models"), &[], "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(&reply.body[..], b"ok");
    }
    // A session goes back to the pool once its body was read to the end (both framings).
    let connections = accepted.load(Ordering::SeqCst);
    assert!(connections < 6, "{connections} upstream connections for 6 sequential requests");
}

async fn expect_100_continue_is_answered(engine: Engine) {
    let mock = mock().await;
    let proxy = EngineProxy::in_front_of(engine, &mock.url()).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let head =
        "PUT /v1/files/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("100 Continue") {
        let n = within(stream.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed before 100 Continue: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    stream.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    within(stream.read_to_end(&mut rest)).await.unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("200 OK") && rest.contains(r#""body":"hello""#), "{rest}");
}
