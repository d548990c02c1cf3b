//! An OpenAI-compatible fake upstream for tests, the README quickstart and the benchmarks.
//!
//! `POST …/chat/completions` answers a chat completion, as JSON or (with `"stream": true`) as
//! SSE chunks, with a usage block (in the stream only when the request sets
//! `stream_options.include_usage`, as OpenAI does). Any other request is echoed back as JSON
//! (`method`, `path`, `query`, `headers`, `body`). The latest [`KEPT_REQUESTS`] requests are kept.
//!
//! Behaviour can be steered per process ([`MockOptions`]) or per request with headers:
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-delay-ms` | wait before the response head |
//! | `x-mock-chunks`, `x-mock-chunk-delay-ms` | number of SSE content chunks and the pause between them |
//! | `x-mock-status`, `x-mock-error-code` | answer this status with an OpenAI error body of this code |
//! | `x-mock-retry-after` | `Retry-After` on that error |
//! | `x-mock-fail` | `model=status[:code],…`: fail only for these models |
//! | `x-mock-hang` | never answer |
//! | `x-mock-cut-after` | end an SSE stream abruptly (connection reset) after this many chunks |
//! | `x-mock-tool-call` | answer a JSON completion with a call of this tool instead of text |

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, channel::Channel};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use llmgate_core::{BoxError, GatewayBody, body};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// Process-wide behaviour of the mock.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Wait before every response head.
    pub delay: Duration,
    /// Content chunks per SSE response.
    pub chunks: usize,
    /// Pause between SSE chunks.
    pub chunk_delay: Duration,
    /// Answer every Nth chat request with 429 (`Retry-After: 1`).
    pub rate_limit_every: Option<u64>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self { delay: Duration::ZERO, chunks: 5, chunk_delay: Duration::ZERO, rate_limit_every: None }
    }
}

/// A request the mock received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Method.
    pub method: String,
    /// The HTTP version it came over (HTTP/2 once h2 was negotiated or spoken with prior
    /// knowledge).
    pub version: http::Version,
    /// Path and query.
    pub uri: String,
    /// Headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct State {
    options: MockOptions,
    /// The last [`KEPT_REQUESTS`] requests: a long benchmark or soak must not grow the mock.
    requests: Mutex<VecDeque<RecordedRequest>>,
    chat_count: AtomicU64,
}

/// How many of the latest requests the mock keeps for [`MockUpstream::requests`].
pub const KEPT_REQUESTS: usize = 10_000;

/// A running mock upstream.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// Starts the mock on `127.0.0.1` with a free port.
    pub async fn start(options: MockOptions) -> std::io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), options).await
    }

    /// Starts the mock on `addr`.
    pub async fn start_on(addr: SocketAddr, options: MockOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State { options, ..State::default() });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(Self { addr, state, task })
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as an upstream: `http://{addr}/v1`.
    pub fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The requests received so far (the latest [`KEPT_REQUESTS`]), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Chat requests received so far.
    pub fn chat_requests(&self) -> u64 {
        self.state.chat_count.load(Ordering::SeqCst)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, state.clone()));
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn header_num(headers: &HeaderMap, name: &str) -> Option<u64> {
    header(headers, name).and_then(|v| v.parse().ok())
}

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Response<GatewayBody>, Infallible> {
    let (parts, incoming) = req.into_parts();
    let body = incoming.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let uri = parts.uri.path_and_query().map_or("/".to_string(), |p| p.to_string());
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        version: parts.version,
        uri: uri.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    {
        let mut requests = state.requests.lock().unwrap_or_else(|p| p.into_inner());
        if requests.len() == KEPT_REQUESTS {
            requests.pop_front();
        }
        requests.push_back(recorded);
    }
    let headers = &parts.headers;
    if headers.contains_key("x-mock-hang") {
        std::future::pending::<()>().await;
    }
    let delay = header_num(headers, "x-mock-delay-ms").map_or(state.options.delay, Duration::from_millis);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if parts.method != http::Method::POST || !parts.uri.path().ends_with("/chat/completions") {
        return Ok(json(StatusCode::OK, &echo(&parts, &uri, &body)));
    }
    let n = state.chat_count.fetch_add(1, Ordering::SeqCst) + 1;
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = request.get("model").and_then(Value::as_str).unwrap_or("mock-model").to_string();
    if let Some(response) = injected_failure(
        headers,
        &model,
        state.options.rate_limit_every.is_some_and(|every| every > 0 && n.is_multiple_of(every)),
    ) {
        return Ok(response);
    }
    let prompt_tokens = prompt_tokens(&request);
    if request.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        let chunks = header_num(headers, "x-mock-chunks").map_or(state.options.chunks, |c| c as usize);
        let chunk_delay =
            header_num(headers, "x-mock-chunk-delay-ms").map_or(state.options.chunk_delay, Duration::from_millis);
        let include_usage = request.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
        let cut_after = header_num(headers, "x-mock-cut-after").map(|c| c as usize);
        return Ok(stream(model, n, chunks, chunk_delay, include_usage, cut_after, prompt_tokens));
    }
    let content = "This is a mock completion.";
    let completion_tokens = content.split_whitespace().count() as u64;
    let (message, finish_reason) = match header(headers, "x-mock-tool-call") {
        Some(tool) => (
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": format!("call_mock_{n}"), "type": "function",
                "function": {"name": tool, "arguments": "{\"city\":\"Paris\"}"}}]}),
            "tool_calls",
        ),
        None => (json!({"role": "assistant", "content": content}), "stop"),
    };
    Ok(json(
        StatusCode::OK,
        &json!({
            "id": format!("chatcmpl-mock-{n}"),
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
        }),
    ))
}

fn echo(parts: &http::request::Parts, uri: &str, body: &Bytes) -> Value {
    let headers: HashMap<&str, &str> =
        parts.headers.iter().filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))).collect();
    json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "uri": uri,
        "headers": headers,
        "body": String::from_utf8_lossy(body),
    })
}

/// A roughly plausible prompt size: a quarter of the message text's bytes.
fn prompt_tokens(request: &Value) -> u64 {
    let bytes: usize = request
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| m.get("content").map_or(0, |c| c.as_str().map_or_else(|| c.to_string().len(), str::len)))
        .sum();
    (bytes as u64).div_ceil(4).max(1)
}

fn injected_failure(headers: &HeaderMap, model: &str, rate_limited: bool) -> Option<Response<GatewayBody>> {
    let from_fail_list = header(headers, "x-mock-fail").and_then(|list| {
        list.split(',').find_map(|entry| {
            let (m, spec) = entry.trim().split_once('=')?;
            (m == model).then(|| {
                let (status, code) = spec.split_once(':').unwrap_or((spec, ""));
                (status.parse::<u16>().ok(), (!code.is_empty()).then(|| code.to_string()))
            })
        })
    });
    let (status, code) = match from_fail_list {
        Some((status, code)) => (status?, code),
        None => match header_num(headers, "x-mock-status") {
            Some(status) => (status as u16, header(headers, "x-mock-error-code").map(str::to_string)),
            None if rate_limited => (429, Some("rate_limit_exceeded".to_string())),
            None => return None,
        },
    };
    let status = StatusCode::from_u16(status).ok()?;
    let code = code.unwrap_or_else(|| "mock_error".into());
    let message = match code.as_str() {
        "context_length_exceeded" => format!(
            "This model's maximum context length is 1000 tokens. However, your messages resulted in more tokens. ({model})"
        ),
        "insufficient_quota" => {
            "You exceeded your current quota, please check your plan and billing details.".to_string()
        }
        "rate_limit_exceeded" => format!("Rate limit reached for {model}"),
        other => format!("mock error {other}"),
    };
    let mut response =
        json(status, &json!({"error": {"message": message, "type": "mock_error", "param": null, "code": code}}));
    if status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = header(headers, "x-mock-retry-after").unwrap_or("1");
        if let Ok(value) = retry_after.parse() {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    Some(response)
}

#[allow(clippy::too_many_arguments)]
fn stream(
    model: String,
    n: u64,
    chunks: usize,
    chunk_delay: Duration,
    include_usage: bool,
    cut_after: Option<usize>,
    prompt_tokens: u64,
) -> Response<GatewayBody> {
    let (mut tx, channel) = Channel::<Bytes, BoxError>::new(4);
    tokio::spawn(async move {
        let id = format!("chatcmpl-mock-{n}");
        for i in 0..chunks {
            if cut_after == Some(i) {
                tx.abort("mock: stream cut".into());
                return;
            }
            if i > 0 && !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            let chunk = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
                "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]});
            if tx.send_data(Bytes::from(format!("data: {chunk}\n\n"))).await.is_err() {
                return;
            }
        }
        if include_usage {
            let completion = chunks as u64;
            let usage = json!({"id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}});
            if tx.send_data(Bytes::from(format!("data: {usage}\n\n"))).await.is_err() {
                return;
            }
        }
        let _ = tx.send_data(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut response = Response::new(body::boxed(channel));
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    response.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    response
}

fn json(status: StatusCode, value: &Value) -> Response<GatewayBody> {
    body::json_response(status, value)
}
