//! The harness: start the gateway and the mock upstream in-process, talk to them over HTTP.

pub mod child;

use std::{future::Future, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use llmgate::{
    Gateway,
    config::Config,
    metrics::Metrics,
    mock_upstream::{MockOptions, MockUpstream},
};
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// The engine the suite runs on: `LLMGATE_TEST_ENGINE=hyper|pingora` (default hyper).
/// `scripts/test.sh` runs the integration suite once per engine.
pub fn test_engine() -> llmgate::config::Engine {
    match std::env::var("LLMGATE_TEST_ENGINE").as_deref() {
        Ok("pingora") => llmgate::config::Engine::Pingora,
        _ => llmgate::config::Engine::Hyper,
    }
}

/// Builds a gateway from `yaml` with `env` as its whole environment, on the suite's engine.
async fn build(yaml: &str, env: &[(&str, &str)]) -> Gateway {
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut config = Config::from_yaml(yaml, Path::new("test.yaml"), &lookup).expect("valid test config");
    config.server.engine = test_engine();
    Gateway::from_config(config).await.expect("gateway builds")
}

/// A gateway serving on an ephemeral port.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestGateway {
    /// Starts a gateway with `yaml` as its config file and `env` as its whole environment.
    pub async fn start(yaml: &str, env: &[(&str, &str)]) -> Self {
        Self::serve(build(yaml, env).await).await
    }

    /// Serves `gateway` on an ephemeral port.
    async fn serve(gateway: Gateway) -> Self {
        let metrics = gateway.metrics().clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(listener, async {
            let _ = rx.await;
        }));
        Self { addr, metrics, shutdown: Some(tx), task }
    }

    /// A gateway in front of `mock` (openai mode) with extra YAML appended.
    pub async fn in_front_of(mock: &MockUpstream, extra_yaml: &str) -> Self {
        let yaml = format!("upstreams:\n  mock: {{url: \"{}\", mode: openai}}\n{extra_yaml}", mock.url());
        Self::start(&yaml, &[]).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The sum of the samples of the Prometheus series `name` (as `GET /metrics` renders it)
    /// whose labels include each of `labels`, e.g. `metric("llmgate_tokens_total",
    /// &[r#"direction="input""#])`; 0 when there is none.
    pub fn metric(&self, name: &str, labels: &[&str]) -> u64 {
        metric_in(&self.metrics.render(), name, labels)
    }

    /// Starts graceful shutdown and returns the serving task, which ends after the drain.
    pub fn begin_shutdown(&mut self) -> &mut JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        &mut self.task
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The sum of the samples of the series `name` in the Prometheus text `text` whose labels include
/// each of `labels` (see [`TestGateway::metric`]); 0 when there is none.
pub fn metric_in(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            series_name == name && labels.iter().all(|l| series_labels.contains(l))
        })
        .map(|(_, value)| value.parse::<f64>().unwrap_or_else(|_| panic!("not a number in {name}: {value}")) as u64)
        .sum()
}

pub async fn mock() -> MockUpstream {
    MockUpstream::start(MockOptions::default()).await.expect("mock starts")
}

/// A real HTTP client (hyper-util's pooled client).
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn request(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(body.into())).expect("request")
}

/// Sends a request and reads the whole response.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    let response = open(request(method, url, headers, body)).await;
    let (parts, body) = response.into_parts();
    let body = within(body.collect()).await.expect("body").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

/// POSTs JSON.
pub async fn post_json(url: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(Method::POST, url, &all, body.to_string()).await
}

/// Sends a request and returns the response head with the body still streaming.
pub async fn open(req: Request<Full<Bytes>>) -> Response<Incoming> {
    within(client().request(req)).await.expect("response")
}

/// A guard against hangs (not a timing assertion): fails the test after 20 s.
pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), future).await.expect("did not finish within 20 s")
}

/// Polls `condition` until it holds (fails after 20 s).
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// PUTs `one two three` to `url` as a body of unknown size (three frames, no content-length)
/// and returns what the mock echoes of it.
pub async fn put_streamed_body(url: &str) -> Value {
    use http_body_util::channel::Channel;
    let (mut tx, channel) = Channel::<Bytes, llmgate_core::BoxError>::new(1);
    tokio::spawn(async move {
        for part in ["one ", "two ", "three"] {
            if tx.send_data(Bytes::from_static(part.as_bytes())).await.is_err() {
                return;
            }
        }
    });
    let client: Client<_, llmgate_core::GatewayBody> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::put(url).body(channel.boxed_unsync()).expect("request");
    let response = within(client.request(req)).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    serde_json::from_slice(&within(response.into_body().collect()).await.expect("body").to_bytes()).expect("JSON echo")
}

pub fn chat_body(model: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
        "stream_options": {"include_usage": true},
    })
}

// === traces (issue 7) ===

impl TestGateway {
    /// Like [`TestGateway::start`] (no environment), also handing back the gateway's
    /// insertion-id store, so a test can record ids Langfuse never sees.
    pub async fn start_with_store(yaml: &str) -> (Self, Arc<dyn llmgate_insertion_id::InsertionStore>) {
        let gateway = build(yaml, &[]).await;
        let store = gateway.insertion_store().clone();
        (Self::serve(gateway).await, store)
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("llmgate-it-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Langfuse stand-in with projects `p1` and `p2`, and a secrets file naming both (`p1` the
/// default) in a temporary directory.
pub async fn langfuse_with_two_projects()
-> (llmgate_test_support::langfuse::LangfuseStandIn, TempDir, std::path::PathBuf) {
    let standin = llmgate_test_support::langfuse::LangfuseStandIn::start().await;
    standin.add_project("p1", "pk-lf-1", "sk-lf-1");
    standin.add_project("p2", "pk-lf-2", "sk-lf-2");
    let dir = TempDir::new();
    let secrets = dir.0.join("secrets.yaml");
    std::fs::write(
        &secrets,
        "langfuse_keys:\n  p1: {public_key: pk-lf-1, secret_key: sk-lf-1}\n  p2: {public_key: pk-lf-2, secret_key: sk-lf-2}\ndefault_project_id: p1\n",
    )
    .expect("write secrets");
    (standin, dir, secrets)
}
