//! Issue 11, the fault suite: a slow Redis, Redis killed and restarted under a mix of traffic,
//! upstreams answering garbage, clients that go away, Langfuse and Redis failing together, and
//! SIGTERM to the binary under load. For each, what the client gets, and the invariant: every
//! completion that got a 2xx (and a complete body) has its insertion id in the store once Redis
//! is reachable again, nothing for the failed ones. Every test runs on the suite's engine
//! (`LLMGATE_TEST_ENGINE`), the child-process ones included.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Waker},
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use llmgate::mock_upstream::MockUpstream;
use llmgate_core::{
    BoxError, GatewayBody, body,
    ext::{RolloutIds, RouteKind, RouteMeta},
};
use llmgate_insertion_id::{Insertion, InsertionIdLayer, InsertionStore, MemoryStore, StoreFuture};
use llmgate_test_support::{langfuse::Fault, redis::RedisServer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
};
use tower::{Layer, ServiceExt};

use crate::support::{child::ChildGateway, *};

const CHAT: &str = "/chat/completions";

fn rollout(r: &str) -> String {
    format!("/rollout_id/{r}/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1{CHAT}")
}

fn smembers(redis: &RedisServer, key: &str) -> Option<BTreeSet<String>> {
    let client = redis::Client::open(redis.url()).ok()?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).ok()?;
    redis::cmd("SMEMBERS").arg(key).query::<Vec<String>>(&mut conn).ok().map(|v| v.into_iter().collect())
}

/// What one request ended as: a 2xx with a complete body (and its id), or anything else.
enum Ended {
    Completed(String),
    Failed,
}

/// Sends one chat request with `headers` and reads the whole body; a body error counts as failed.
async fn attempt(url: &str, headers: &[(&str, &str)], stream: bool) -> Ended {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let req = request(Method::POST, url, &all, chat_body("gpt-test", stream).to_string());
    // A stream whose upstream resets at once can fail before the head reaches the client
    // (hyper aborts the connection when the first body poll errors): a failure all the same.
    let Ok(response) = within(client().request(req)).await else { return Ended::Failed };
    let status = response.status();
    let id = response.headers().get("x-insertion-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = within(response.into_body().collect()).await;
    match (status.is_success(), body, id) {
        (true, Ok(body), Some(id)) => {
            let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
            if stream {
                assert!(text.ends_with("data: [DONE]\n\n"), "a complete stream: {text}");
            }
            Ended::Completed(id)
        }
        (true, Ok(_), None) => panic!("a 2xx on a rollout route without an x-insertion-id"),
        _ => Ended::Failed,
    }
}

// === Redis ===

#[tokio::test]
async fn a_slow_redis_never_fails_a_completion_and_every_id_lands_once_it_answers() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let mock = mock().await;
    let yaml = format!("redis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n", redis.url());
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let url = gw.url(&rollout("slow"));
    let mut ids = BTreeSet::new();
    if let Ended::Completed(id) = attempt(&url, &[], false).await {
        ids.insert(id);
    }

    // Redis blocks for 3 s; requests keep being answered meanwhile.
    let port_url = redis.url();
    let sleeper = std::thread::spawn(move || {
        let mut conn = redis::Client::open(port_url).unwrap().get_connection().unwrap();
        redis::cmd("DEBUG").arg("SLEEP").arg(3).query::<()>(&mut conn)
    });
    let asleep = loop {
        if redis_is_asleep(&redis) {
            break true;
        }
        if sleeper.is_finished() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(asleep, "Redis never seen inside DEBUG SLEEP: {:?}", sleeper.join());
    for stream in [false, true, false, true] {
        match attempt(&url, &[], stream).await {
            Ended::Completed(id) => {
                ids.insert(id);
            }
            Ended::Failed => panic!("a slow Redis failed a completion"),
        }
    }
    sleeper.join().unwrap().expect("DEBUG SLEEP ran (enable-debug-command local)");
    // The slow path was taken: at least the first record during the sleep gave up in line.
    assert!(metric(&gw, r#"llmgate_insertion_records_total{outcome="retried"}"#).await >= 1.0);
    eventually("every id recorded once Redis answers", || smembers(&redis, "slow") == Some(ids.clone())).await;
    assert_eq!(ids.len(), 5);
}

/// Whether Redis is inside a `DEBUG SLEEP`: a `PING` gets no answer within 200 ms.
fn redis_is_asleep(redis: &RedisServer) -> bool {
    use std::io::{Read, Write};
    let Ok(mut socket) = std::net::TcpStream::connect(("127.0.0.1", redis.port())) else { return false };
    if socket.set_read_timeout(Some(Duration::from_millis(200))).is_err() || socket.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 16];
    matches!(socket.read(&mut reply), Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
}

/// The value of one series in the gateway's `/metrics` (0 when absent).
async fn metric(gw: &TestGateway, series: &str) -> f64 {
    let text = send(Method::GET, &gw.url("/metrics"), &[], "").await.text();
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test]
async fn redis_killed_mid_run_under_mixed_traffic_keeps_exactly_the_completed_ids() {
    // Persistence on, so that what was recorded before the crash survives it.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mock = mock().await;
    let yaml = format!("redis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n", redis.url());
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let url = gw.url(&rollout("mix"));
    // The mix: JSON and SSE successes, upstream 500s and 429s, streams cut midway.
    let kinds: [(&[(&str, &str)], bool); 6] = [
        (&[], false),
        (&[], true),
        (&[("x-mock-status", "500")], false),
        (&[("x-mock-status", "503")], true),
        (&[("x-mock-cut-after", "2"), ("x-mock-chunks", "5")], true),
        (&[("x-mock-chunks", "3")], true),
    ];
    let mut completed = BTreeSet::new();
    let mut failed = 0;
    for round in 0..4 {
        if round == 1 {
            redis.kill();
        }
        if round == 3 {
            redis.restart();
        }
        let runs = kinds.iter().map(|(headers, stream)| attempt(&url, headers, *stream));
        for ended in futures_join_all(runs).await {
            match ended {
                Ended::Completed(id) => assert!(completed.insert(id), "ids are unique"),
                Ended::Failed => failed += 1,
            }
        }
    }
    assert_eq!(completed.len(), 4 * 3, "three successes per round");
    assert_eq!(failed, 4 * 3, "three failures per round");
    let settled = within(async {
        loop {
            let now = smembers(&redis, "mix");
            if now.as_ref() == Some(&completed) || now.as_ref().is_some_and(|n| !n.is_subset(&completed)) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let stored = settled.await;
    assert_eq!(stored.as_ref(), Some(&completed), "exactly the completed ids are stored");
    // And it stays that way (nothing late for the failed ones): a last success lands alone.
    let Ended::Completed(last) = attempt(&url, &[], false).await else { panic!("serving") };
    completed.insert(last);
    eventually("the last id too", || smembers(&redis, "mix") == Some(completed.clone())).await;
}

/// `join_all` without the futures crate: runs the futures concurrently on the test runtime.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future,
{
    let futures: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut futures: Vec<Option<_>> = futures.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("finished")).collect()
}

// === Upstream garbage ===

/// A one-shot-per-connection upstream that writes `answer` (raw bytes) and closes.
async fn garbage_upstream(answer: Vec<u8>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                // Read the request head (and whatever body arrived with it), then answer.
                let mut buf = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(&answer).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_answering_garbage_gets_a_json_error_or_a_broken_stream_and_no_record() {
    let redis = RedisServer::start();
    let sse_head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
    let cases: Vec<(&str, Vec<u8>, Option<StatusCode>)> = vec![
        ("not HTTP at all", b"hello, this is not http\r\n\r\n".to_vec(), Some(StatusCode::BAD_GATEWAY)),
        ("nothing, then close", Vec::new(), Some(StatusCode::BAD_GATEWAY)),
        (
            "gigantic response headers",
            format!("HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\n{{}}", "a".repeat(1 << 20)).into_bytes(),
            Some(StatusCode::BAD_GATEWAY),
        ),
        (
            "an SSE stream cut without its last chunk",
            format!("{sse_head}{}", chunk("data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n")).into_bytes(),
            None,
        ),
    ];
    let mut rollouts = Vec::new();
    for (i, (what, answer, status)) in cases.into_iter().enumerate() {
        let addr = garbage_upstream(answer).await;
        let yaml = format!(
            "upstreams:\n  bad: {{url: \"http://{addr}/v1\", mode: openai}}\nredis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n",
            redis.url()
        );
        let gw = TestGateway::start(&yaml, &[]).await;
        let key = format!("garbage{i}");
        let url = gw.url(&rollout(&key));
        rollouts.push((what, key));
        let response = open(request(
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            chat_body("gpt-test", true).to_string(),
        ))
        .await;
        let got = response.status();
        let body = within(response.into_body().collect()).await;
        match status {
            Some(expected) => {
                assert_eq!(got, expected, "{what}");
                let body = body.unwrap_or_else(|e| panic!("{what}: a complete error body: {e}")).to_bytes();
                let json: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{what}: JSON error ({e}): {body:?}"));
                assert!(json["error"]["message"].is_string(), "{what}: {json}");
            }
            None => {
                assert_eq!(got, StatusCode::OK, "{what}: the head was already a 200");
                assert!(body.is_err(), "{what}: the client sees the body break, not a clean end");
            }
        }
    }
    // A success, so we know recording works, then: only it is stored.
    let mock = mock().await;
    let yaml = format!("redis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n", redis.url());
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let Ended::Completed(ok) = attempt(&gw.url(&rollout("garbage")), &[], false).await else { panic!("serving") };
    eventually("the success is stored", || smembers(&redis, "garbage") == Some(BTreeSet::from([ok.clone()]))).await;
    for (what, key) in rollouts {
        assert_eq!(smembers(&redis, &key), Some(BTreeSet::new()), "{what}: nothing recorded");
    }
}

#[tokio::test]
async fn a_json_body_cut_short_is_not_recorded() {
    let redis = RedisServer::start();
    let addr = garbage_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":".to_vec(),
    )
    .await;
    let yaml = format!(
        "upstreams:\n  bad: {{url: \"http://{addr}/v1\", mode: openai}}\nredis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n",
        redis.url()
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    let url = gw.url(&rollout("cutjson"));
    let response = open(request(
        Method::POST,
        &url,
        &[("content-type", "application/json")],
        chat_body("gpt-test", false).to_string(),
    ))
    .await;
    assert_eq!(response.status(), StatusCode::OK, "the head was a 200");
    assert!(within(response.into_body().collect()).await.is_err(), "the client sees the body break");
    // A later success on the same rollout, so the store has settled when we look.
    let mock = mock().await;
    let yaml = format!("redis: {{url: \"{}\"}}\n", redis.url());
    let good = TestGateway::in_front_of(&mock, &yaml).await;
    let Ended::Completed(ok) = attempt(&good.url(&rollout("cutjson")), &[], false).await else { panic!("serving") };
    eventually("the success is stored", || smembers(&redis, "cutjson").is_some_and(|s| s.contains(&ok))).await;
    assert_eq!(smembers(&redis, "cutjson"), Some(BTreeSet::from([ok])), "only the success");
}

#[tokio::test]
async fn a_non_json_2xx_body_is_passed_through_and_counts_as_a_completion() {
    let redis = RedisServer::start();
    let addr = garbage_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot json!"
            .to_vec(),
    )
    .await;
    let yaml = format!(
        "upstreams:\n  bad: {{url: \"http://{addr}/v1\", mode: openai}}\nredis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n",
        redis.url()
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    let reply = post_json(&gw.url(&rollout("nj")), &[], &chat_body("gpt-test", false)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"not json!", "passed through unchanged");
    let id = reply.headers["x-insertion-id"].to_str().unwrap().to_string();
    // The client got a 2xx with a complete body: by the invariant its id is recorded.
    eventually("the id of the 2xx is stored", || smembers(&redis, "nj") == Some(BTreeSet::from([id.clone()]))).await;
}

// === Clients that go away ===
//
// The rule (docs/reliability.md): a completion counts once the gateway has all of it from the
// upstream. A client that leaves before then cancels the upstream call and nothing is recorded;
// one that leaves after it (while the end of the body waits for the record, or unread in its
// socket) has its id recorded, like any completion the upstream finished.

/// A TCP relay between the gateway and a server (the mock upstream, Redis). It keeps a copy of
/// what the gateway sent, can hold traffic back in both directions, and counts the connections
/// the gateway closed while the server's side was still open: calls the gateway cancelled (a
/// finished call leaves its pooled connection open).
struct Relay {
    addr: SocketAddr,
    shared: Arc<RelayShared>,
    task: tokio::task::JoinHandle<()>,
}

struct RelayShared {
    target: SocketAddr,
    cancelled: AtomicUsize,
    sent: Mutex<Vec<u8>>,
    hold: watch::Sender<bool>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(RelayShared {
            target,
            cancelled: AtomicUsize::new(0),
            sent: Mutex::default(),
            hold: watch::channel(false).0,
        });
        let task = tokio::spawn(relay_connections(listener, shared.clone()));
        Self { addr, shared, task }
    }

    /// Connections the gateway closed while the server still had its side open.
    fn cancelled(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Whether the gateway has sent `needle` (on any connection).
    fn has_sent(&self, needle: &str) -> bool {
        contains(&self.shared.sent.lock().unwrap(), needle.as_bytes())
    }

    /// Holds back (or lets through again) what is in flight in both directions.
    fn hold(&self, hold: bool) {
        self.shared.hold.send_replace(hold);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_connections(listener: TcpListener, shared: Arc<RelayShared>) {
    while let Ok((gateway, _)) = listener.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(shared.target).await else { return };
            let (from_gateway, to_gateway) = gateway.into_split();
            let (from_server, to_server) = server.into_split();
            let server_closed = Arc::new(AtomicBool::new(false));
            let answers =
                tokio::spawn(pump(from_server, to_gateway, shared.hold.subscribe(), None, server_closed.clone()));
            pump(from_gateway, to_server, shared.hold.subscribe(), Some(&shared.sent), Arc::default()).await;
            if !server_closed.load(Ordering::SeqCst) {
                shared.cancelled.fetch_add(1, Ordering::SeqCst);
            }
            answers.abort();
        });
    }
}

/// Copies `from` to `to` until either side closes (setting `source_closed` when `from` did),
/// keeping what arrives while the hold is on for later; keeps a copy in `log`.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut hold: watch::Receiver<bool>,
    log: Option<&Mutex<Vec<u8>>>,
    source_closed: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = Vec::new();
    loop {
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    source_closed.store(true, Ordering::SeqCst);
                    return;
                }
                Ok(n) => {
                    if let Some(log) = log {
                        log.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
            },
            released = async { hold.wait_for(|held| !held).await.is_ok() }, if !pending.is_empty() => {
                if !released || to.write_all(&pending).await.is_err() {
                    return;
                }
                pending.clear();
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// A chat client on its own socket, so that the test decides when it goes away: dropping it
/// closes the connection.
struct RawClient {
    socket: TcpStream,
    received: Vec<u8>,
}

impl RawClient {
    async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], stream: bool) -> Self {
        let body = chat_body("gpt-test", stream).to_string();
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket.write_all(head.as_bytes()).await.unwrap();
        socket.write_all(body.as_bytes()).await.unwrap();
        Self { socket, received: Vec::new() }
    }

    /// Reads until `needle` has arrived (fails if the gateway closes first, or after 20 s).
    async fn read_until(&mut self, needle: &str) {
        within(async {
            let mut buf = [0u8; 8192];
            while !contains(&self.received, needle.as_bytes()) {
                let n = self.socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before {needle:?}: {}", String::from_utf8_lossy(&self.received));
                self.received.extend_from_slice(&buf[..n]);
            }
        })
        .await
    }

    /// The `x-insertion-id` of the response head read so far.
    fn insertion_id(&self) -> String {
        let text = String::from_utf8_lossy(&self.received);
        text.split("\r\n")
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("x-insertion-id").then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no x-insertion-id in {text}"))
    }
}

/// A gateway recording into `redis`, in front of the mock behind a relay.
async fn behind_relay(redis: &RedisServer) -> (MockUpstream, Relay, TestGateway) {
    let mock = mock().await;
    let relay = Relay::start(mock.addr()).await;
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"http://{}/v1\", mode: openai}}\nredis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n",
        relay.addr,
        redis.url()
    );
    (mock, relay, TestGateway::start(&yaml, &[]).await)
}

#[tokio::test]
async fn clients_leaving_before_the_head_cancel_the_upstream_call_and_nothing_is_recorded() {
    let redis = RedisServer::start();
    let (mock, relay, gw) = behind_relay(&redis).await;
    let path = rollout("left-early");
    // JSON and SSE requests the upstream takes a minute to answer.
    let mut clients = Vec::new();
    for stream in [false, true, false, true] {
        clients.push(RawClient::post(gw.addr, &path, &[("x-mock-delay-ms", "60000")], stream).await);
    }
    eventually("the upstream is working on all four", || mock.requests().len() == 4).await;
    drop(clients);
    eventually("the gateway cancelled the four upstream calls", || relay.cancelled() == 4).await;
    // It keeps serving, and only the completion a client got is recorded.
    let Ended::Completed(ok) = attempt(&gw.url(&path), &[], false).await else { panic!("serving") };
    eventually("only the success is stored", || smembers(&redis, "left-early") == Some(BTreeSet::from([ok.clone()])))
        .await;
}

#[tokio::test]
async fn clients_leaving_mid_stream_cancel_the_upstream_stream_and_nothing_is_recorded() {
    let redis = RedisServer::start();
    let (_mock, relay, gw) = behind_relay(&redis).await;
    let path = rollout("left-mid");
    // Two thousand chunks 20 ms apart: forty seconds, unless the gateway cancels them.
    let slow = [("x-mock-chunks", "2000"), ("x-mock-chunk-delay-ms", "20")];
    let mut clients = Vec::new();
    let mut left = BTreeSet::new();
    for _ in 0..4 {
        let mut client = RawClient::post(gw.addr, &path, &slow, true).await;
        client.read_until("tok1 ").await;
        left.insert(client.insertion_id());
        clients.push(client);
    }
    drop(clients);
    eventually("the gateway cancelled the four upstream streams", || relay.cancelled() == 4).await;
    eventually("counted as cancelled by the client", || {
        gw.metric("llmgate_chat_responses_total", &[r#"end="cancelled""#]) == 4
    })
    .await;
    let Ended::Completed(ok) = attempt(&gw.url(&path), &[], true).await else { panic!("serving") };
    eventually("only the success is stored", || smembers(&redis, "left-mid") == Some(BTreeSet::from([ok.clone()])))
        .await;
    assert_eq!(left.len(), 4);
    assert!(!left.contains(&ok));
}

#[tokio::test]
async fn a_client_leaving_after_the_upstream_finished_is_recorded() {
    let redis = RedisServer::start();
    let store = Relay::start(SocketAddr::from(([127, 0, 0, 1], redis.port()))).await;
    let mock = mock().await;
    // A long in-line record, so what completes each response waits for it while the relay holds it.
    let yaml = format!("redis: {{url: \"redis://{}\"}}\ninsertion_id: {{record_timeout_ms: 10000}}\n", store.addr);
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let Ended::Completed(first) = attempt(&gw.url(&rollout("late-warm-up")), &[], false).await else {
        panic!("serving")
    };
    eventually("the store is connected", || smembers(&redis, "late-warm-up") == Some(BTreeSet::from([first.clone()])))
        .await;
    store.hold(true);
    let mut left = Vec::new();
    for (stream, key) in [(false, "late-json"), (true, "late-sse")] {
        let mut client = RawClient::post(gw.addr, &rollout(key), &[], stream).await;
        if stream {
            // A stream's head and chunks go out; its `[DONE]` waits for the record. (A JSON
            // response's head leaves with its body, after the record.)
            client.read_until("\"usage\"").await;
        }
        // The record is sent only once the gateway has the whole completion. The client leaves
        // before it got the end.
        eventually("the record is under way", || store.has_sent(key)).await;
        left.push((key, stream.then(|| client.insertion_id())));
        drop(client);
    }
    store.hold(false);
    for (key, id) in left {
        eventually("recorded", || smembers(&redis, key).is_some_and(|ids| ids.len() == 1)).await;
        if let Some(id) = id {
            assert_eq!(smembers(&redis, key), Some(BTreeSet::from([id])));
        }
    }
}

/// A store whose writes wait until it is opened, as while a Redis connection is being set up: a
/// write dropped before then never reaches it.
struct GatedStore {
    inner: MemoryStore,
    open: watch::Sender<bool>,
    started: AtomicUsize,
}

impl InsertionStore for GatedStore {
    fn record_all<'a>(&'a self, insertions: &'a [Insertion]) -> StoreFuture<'a, ()> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.subscribe();
        Box::pin(async move {
            let _ = open.wait_for(|open| *open).await;
            self.inner.record_all(insertions).await
        })
    }

    fn members<'a>(&'a self, rollout_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        self.inner.members(rollout_id)
    }
}

/// The same rule where the store write has not left the gateway yet (a Redis connection being
/// set up): the layer itself, since no socket shows that moment.
#[tokio::test]
async fn a_record_under_way_is_kept_when_the_client_leaves() {
    let store = Arc::new(GatedStore { inner: MemoryStore::new(), open: watch::channel(false).0, started: 0.into() });
    let upstream = tower::service_fn(|_: Request<GatewayBody>| async {
        let mut response = Response::new(body::full("data: {\"choices\":[]}\n\ndata: [DONE]\n\n"));
        response.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
        Ok::<_, BoxError>(response)
    });
    let service = InsertionIdLayer::new(store.clone()).record_timeout(Duration::from_secs(10)).layer(upstream);
    let mut request = Request::new(body::full(""));
    request.extensions_mut().insert(RouteMeta {
        kind: RouteKind::ChatCompletions,
        project: None,
        rollout: Some(RolloutIds {
            rollout_id: "r1".into(),
            invocation_id: "i1".into(),
            experiment_id: "e1".into(),
            run_id: "u1".into(),
            row_id: "w1".into(),
        }),
        encoded_base_url: None,
    });
    let response = service.oneshot(request).await.unwrap();
    let id = response.headers()["x-insertion-id"].to_str().unwrap().to_string();
    let mut body = response.into_body();
    // The one frame holds `[DONE]`: the whole completion is there, and it waits for its record.
    let polled = Pin::new(&mut body).poll_frame(&mut Context::from_waker(Waker::noop()));
    assert!(polled.is_pending(), "the end waits for the record");
    // The record is handed to the layer's writer task, which starts the store write.
    within(async {
        while store.started.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    drop(body);
    store.open.send_replace(true);
    within(async {
        while !store.inner.members("r1").await.unwrap().contains(&id) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

// === Langfuse and Redis failing together ===

/// How the Langfuse stand-in fails.
#[derive(Debug)]
enum LangfuseDown {
    Fault(Fault),
    Refusing,
}

#[tokio::test]
async fn langfuse_and_redis_failing_together_hold_no_client_and_lose_nothing() {
    for down in [LangfuseDown::Fault(Fault::Status(500)), LangfuseDown::Fault(Fault::Hang), LangfuseDown::Refusing] {
        let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
        let (standin, _dir, secrets) = langfuse_with_two_projects().await;
        let mock = mock().await;
        let yaml = format!(
            "redis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\nlangfuse: {{host: \"{}\", secrets_path: \"{}\", export: {{batch_delay_ms: 20, timeout_ms: 1000}}}}\n",
            redis.url(),
            standin.url(),
            secrets.display()
        );
        let gw = TestGateway::in_front_of(&mock, &yaml).await;
        let url = gw.url(&rollout("both"));
        match &down {
            LangfuseDown::Fault(fault) => standin.set_fault(fault.clone()),
            LangfuseDown::Refusing => standin.refuse(),
        }
        let mut ids = BTreeSet::new();
        // Langfuse down; then Redis killed as well; then Redis back while Langfuse is still down.
        for round in 0..3 {
            match round {
                1 => redis.kill(),
                2 => redis.restart(),
                _ => {}
            }
            for stream in [false, true, false, true] {
                // `attempt` fails the test after 20 s: a client held by either fault shows here.
                match attempt(&url, &[], stream).await {
                    Ended::Completed(id) => assert!(ids.insert(id)),
                    Ended::Failed => panic!("{down:?}, round {round}: a client was not served"),
                }
            }
        }
        eventually("every id lands once Redis is back", || smembers(&redis, "both") == Some(ids.clone())).await;
        match &down {
            LangfuseDown::Fault(_) => standin.set_fault(Fault::None),
            LangfuseDown::Refusing => standin.resume().await,
        }
        // Every completion's trace (its id without dashes) arrives once Langfuse recovers.
        let traces: BTreeSet<String> = ids.iter().map(|id| id.replace('-', "")).collect();
        within(standin.wait_for(|state| {
            let exported: BTreeSet<String> =
                state.stored.iter().filter(|o| o.kind == "GENERATION").map(|o| o.trace_id.clone()).collect();
            traces.is_subset(&exported)
        }))
        .await;
        assert_eq!(ids.len(), 12, "{down:?}");
    }
}

// === SIGTERM under load ===

#[tokio::test]
async fn sigterm_under_load_lets_every_in_flight_request_finish_then_exits() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: openai}}\nredis: {{url: \"{}\"}}\ndrain_timeout_secs: 20\n",
        mock.url(),
        redis.url()
    );
    let gw = ChildGateway::spawn(&yaml, &[("LOG_LEVEL", "info")], &[]).await;
    let url = gw.url(&rollout("term"));
    // 20 slow requests (streams and JSON) whose heads have arrived; the bodies are still coming.
    let mut in_flight = Vec::new();
    for i in 0..20 {
        let stream = i % 2 == 0;
        let headers: Vec<(&str, &str)> = if stream {
            vec![("content-type", "application/json"), ("x-mock-chunks", "5"), ("x-mock-chunk-delay-ms", "100")]
        } else {
            vec![("content-type", "application/json")]
        };
        let response = open(request(Method::POST, &url, &headers, chat_body("gpt-test", stream).to_string())).await;
        assert_eq!(response.status(), StatusCode::OK);
        let id = response.headers()["x-insertion-id"].to_str().unwrap().to_string();
        in_flight.push(tokio::spawn(async move {
            let body = within(response.into_body().collect()).await.expect("the body finishes").to_bytes();
            (id, stream, body)
        }));
    }
    gw.sigterm();
    let mut ids = BTreeSet::new();
    for task in in_flight {
        let (id, stream, body) = task.await.unwrap();
        let text = String::from_utf8_lossy(&body);
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "a stream cut by SIGTERM: {text}");
        } else {
            assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok(), "{text}");
        }
        ids.insert(id);
    }
    let mut gw = gw;
    let status = gw.wait_exit().await;
    assert!(status.success(), "clean exit: {status:?} {}", gw.log());
    // New connections are refused once it has exited.
    assert!(std::net::TcpStream::connect(("127.0.0.1", gw.port)).is_err());
    // Every 2xx finished before the exit was recorded.
    assert_eq!(smembers(&redis, "term"), Some(ids), "{}", gw.log());
}

/// Issue 15 (defect 1): a small upstream error with a `content-length`, for a model in the
/// catalogue (whose error bodies context routing reads and replays), reaches the client whole on
/// a rollout route (insertion ids watch its end) — it used to panic in a size hint and drop the
/// connection. No panic is counted.
#[tokio::test]
async fn a_small_upstream_error_for_a_catalogued_model_reaches_the_client() {
    let mock = mock().await;
    let gw = TestGateway::start(&format!("upstreams:\n  mock: {{url: \"{}\", mode: openai}}\n", mock.url()), &[]).await;
    for stream in [false, true] {
        for (status, code) in [("400", "invalid_request_error"), ("401", "invalid_api_key"), ("500", "server_error")] {
            let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream});
            let reply = post_json(
                &gw.url(&format!("{}{CHAT}", rollout("r-small-error"))),
                &[("x-mock-status", status), ("x-mock-error-code", code)],
                &body,
            )
            .await;
            assert_eq!(reply.status.as_str(), status, "{}", reply.text());
            assert_eq!(reply.json()["error"]["code"], code, "the provider's error body: {}", reply.text());
        }
    }
    assert_eq!(metric(&gw, "llmgate_panics_total").await, 0.0);
}
