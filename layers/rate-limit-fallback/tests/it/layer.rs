//! The layer against `service_fn` upstreams, on the paused clock.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, DecodeJsonLayer, GatewayBody, GatewayError, body,
    catalog::{Catalog, Limits, ModelSpec},
    ext::{
        BodyEdits, ClientScope, CredentialScope, FallbackEvent, FallbackEventSink, FallbackEvents, ModelChoice,
        ScopeId, ServedBy, TokenEstimate, UpstreamMode,
    },
};
use llmgate_rate_limit_fallback::{MemoryRateStore, RateLimitFallbackLayer, RateStore, Stats, TokioClock};
use tower::{ServiceBuilder, ServiceExt, service_fn, util::BoxCloneService};

type Svc = BoxCloneService<Request<GatewayBody>, Response<GatewayBody>, BoxError>;

#[derive(Default)]
struct Sink(Mutex<Vec<FallbackEvent>>);

impl FallbackEventSink for Sink {
    fn record(&self, event: FallbackEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// A scripted response: status, headers, body.
type Scripted = (u16, Vec<(&'static str, String)>, String);
/// An upstream call: the attempt's model and the `model` body edit.
type Call = (String, Option<String>);

/// A scripted upstream: per model, a queue of (status, headers, body); then 200 with usage.
#[derive(Clone, Default)]
struct Upstream {
    script: Arc<Mutex<HashMap<String, VecDeque<Scripted>>>>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Upstream {
    fn then(&self, model: &str, status: u16, headers: &[(&'static str, &str)], body: &str) {
        let headers = headers.iter().map(|(k, v)| (*k, v.to_string())).collect();
        self.script.lock().unwrap().entry(model.into()).or_default().push_back((status, headers, body.into()));
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().iter().map(|(m, _)| m.clone()).collect()
    }
}

struct Harness {
    svc: Svc,
    upstream: Upstream,
    sink: Arc<Sink>,
    stats: Arc<Stats>,
    store: Arc<MemoryRateStore>,
}

fn spec(name: &str, limits: Limits, fallbacks: &[&str]) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        limits,
        fallbacks: fallbacks.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn rpm(n: u64) -> Limits {
    Limits { rpm: Some(n), tpm: None, rpd: None }
}

fn harness_with(
    models: Vec<ModelSpec>,
    store: MemoryRateStore,
    configure: impl FnOnce(RateLimitFallbackLayer) -> RateLimitFallbackLayer,
) -> Harness {
    let upstream = Upstream::default();
    let sink = Arc::new(Sink::default());
    let store = Arc::new(store);
    let layer = configure(RateLimitFallbackLayer::new(Arc::new(Catalog::new(models)), store.clone()));
    let stats = layer.stats();
    let up = upstream.clone();
    let events = FallbackEvents(sink.clone());
    let svc = ServiceBuilder::new()
        .layer(DecodeJsonLayer::new())
        .map_request(move |mut req: Request<GatewayBody>| {
            req.extensions_mut().insert(events.clone());
            req
        })
        .layer(layer)
        .service(service_fn(move |req: Request<GatewayBody>| {
            let up = up.clone();
            async move {
                let model = req.extensions().get::<ModelChoice>().map(|c| c.current.to_string()).unwrap_or_default();
                // Like the credentials layer with no server-side key: a client that brought
                // credentials or an endpoint sent them.
                let scope = req.extensions().get::<ClientScope>().map(|s| CredentialScope::Client(s.id.clone()));
                let edited = req.extensions().get::<BodyEdits>().and_then(|e| {
                    e.for_mode(UpstreamMode::OpenAi)
                        .find(|(k, _)| *k == "model")
                        .and_then(|(_, v)| v.and_then(|v| v.as_str()).map(str::to_string))
                });
                up.calls.lock().unwrap().push((model.clone(), edited));
                let next = up.script.lock().unwrap().get_mut(&model).and_then(VecDeque::pop_front);
                let (status, headers, text) = next.unwrap_or_else(|| {
                    (
                        200,
                        vec![],
                        r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#.into(),
                    )
                });
                let mut response = Response::new(body::full(text));
                *response.status_mut() = StatusCode::from_u16(status).unwrap();
                response.headers_mut().insert("content-type", "application/json".parse().unwrap());
                for (k, v) in headers {
                    response.headers_mut().insert(k, v.parse().unwrap());
                }
                if let Some(scope) = scope {
                    response.extensions_mut().insert(scope);
                }
                Ok::<_, BoxError>(response)
            }
        }));
    Harness { svc: BoxCloneService::new(svc), upstream, sink, stats, store }
}

fn harness(models: Vec<ModelSpec>) -> Harness {
    harness_with(models, MemoryRateStore::new(), |l| l)
}

fn chat(model: &str) -> Request<GatewayBody> {
    Request::new(body::full(format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)))
}

impl Harness {
    async fn send(&self, req: Request<GatewayBody>) -> Result<Response<GatewayBody>, BoxError> {
        self.svc.clone().oneshot(req).await
    }

    /// Sends, reads the body, and returns the model that served.
    async fn served(&self, model: &str) -> String {
        let response = self.send(chat(model)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let served = response.extensions().get::<ServedBy>().unwrap().model.to_string();
        response.into_body().collect().await.unwrap();
        served
    }

    fn events(&self) -> Vec<(String, String, &'static str)> {
        self.sink
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|e| match e {
                FallbackEvent::RateLimit { original_model, fallback_model, reason } => {
                    (original_model.clone(), fallback_model.clone(), *reason)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    fn stat(&self, name: &str) -> serde_json::Value {
        self.stats.snapshot()[name].clone()
    }
}

fn ev(a: &str, b: &str, reason: &'static str) -> (String, String, &'static str) {
    (a.into(), b.into(), reason)
}

#[tokio::test(start_paused = true)]
async fn rpm_limit_falls_back_with_reason_rpm() {
    let h = harness(vec![spec("a", rpm(1), &["b"]), spec("b", Limits::default(), &[])]);
    assert_eq!(h.served("a").await, "a");
    assert_eq!(h.served("a").await, "b");
    assert_eq!(h.events(), vec![ev("a", "b", "rpm")]);
    // The fallback attempt carried the model edit; the primary did not need one.
    let calls = h.upstream.calls.lock().unwrap().clone();
    assert_eq!(calls, vec![("a".into(), None), ("b".into(), Some("b".into()))]);
    let snap = h.stats.snapshot();
    assert_eq!(snap["total_requests"], 2);
    assert_eq!(snap["primary_requests"], 1);
    assert_eq!(snap["fallback_requests"], 1);
    assert_eq!(snap["rate_limit_fallbacks"], 1);
    assert_eq!(snap["fallback_rate_percent"], 50.0);
}

#[tokio::test(start_paused = true)]
async fn tpm_limit_falls_back_with_reason_tpm_and_usage_corrects_it() {
    let tpm = Limits { rpm: None, tpm: Some(100), rpd: None };
    let h = harness(vec![spec("a", tpm, &["b"]), spec("b", Limits::default(), &[])]);
    let with_estimate = |tokens| {
        let mut req = chat("a");
        req.extensions_mut().insert(TokenEstimate { tokens, estimated: true });
        req
    };
    // DecodeJson keeps extensions, so the estimate reaches the layer.
    let r = h.send(with_estimate(90)).await.unwrap();
    assert_eq!(r.extensions().get::<ServedBy>().unwrap().model.as_ref(), "a");
    let r2 = h.send(with_estimate(90)).await.unwrap();
    assert_eq!(r2.extensions().get::<ServedBy>().unwrap().model.as_ref(), "b");
    assert_eq!(h.events(), vec![ev("a", "b", "tpm")]);
    // The first response's real usage (5 tokens) gives back 85 of the 90 reserved.
    r.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let r3 = h.send(with_estimate(90)).await.unwrap();
    assert_eq!(r3.extensions().get::<ServedBy>().unwrap().model.as_ref(), "a");
}

#[tokio::test(start_paused = true)]
async fn rpd_limit_falls_back_with_reason_rpd() {
    let rpd = Limits { rpm: None, tpm: None, rpd: Some(2) };
    let h = harness(vec![spec("a", rpd, &["b"]), spec("b", Limits::default(), &[])]);
    assert_eq!(h.served("a").await, "a");
    assert_eq!(h.served("a").await, "a");
    assert_eq!(h.served("a").await, "b");
    assert_eq!(h.events(), vec![ev("a", "b", "rpd")]);
}

#[tokio::test(start_paused = true)]
async fn waits_within_max_wait_then_succeeds() {
    let h =
        harness_with(vec![spec("a", rpm(1), &["b"]), spec("b", Limits::default(), &[])], MemoryRateStore::new(), |l| {
            l.max_wait(Duration::from_secs(61))
        });
    let start = tokio::time::Instant::now();
    assert_eq!(h.served("a").await, "a");
    assert_eq!(h.served("a").await, "a");
    assert!(start.elapsed() >= Duration::from_secs(60), "the second request waited for the window");
    assert_eq!(h.stat("rate_limit_waits"), 1);
    assert!(h.events().is_empty());
    assert_eq!(h.upstream.calls(), ["a", "a"]);
}

#[tokio::test(start_paused = true)]
async fn a_wait_longer_than_max_wait_falls_back_at_once() {
    let h =
        harness_with(vec![spec("a", rpm(1), &["b"]), spec("b", Limits::default(), &[])], MemoryRateStore::new(), |l| {
            l.max_wait(Duration::from_secs(10))
        });
    assert_eq!(h.served("a").await, "a");
    let start = tokio::time::Instant::now();
    assert_eq!(h.served("a").await, "b");
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(h.stat("rate_limit_waits"), 0);
}

/// `req` from a client that brought its own key (`endpoint`: and chose the endpoint).
fn as_client(mut req: Request<GatewayBody>, id: &str, endpoint: bool) -> Request<GatewayBody> {
    req.extensions_mut().insert(ClientScope { id: ScopeId::new(id), endpoint });
    req
}

#[tokio::test(start_paused = true)]
async fn a_429_on_a_clients_own_credentials_is_that_clients_and_comes_back_as_the_provider_sent_it() {
    let free = Limits::default();
    let h = harness(vec![spec("solo", free, &[]), spec("a", free, &["b"]), spec("b", free, &[])]);
    let provider = r#"{"error":{"message":"slow down, key k1","type":"requests","code":"rate_limit_exceeded"}}"#;
    h.upstream.then("solo", 429, &[("retry-after", "5"), ("x-ratelimit-remaining-requests", "0")], provider);
    let response = h.send(as_client(chat("solo"), "k1", false)).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "5");
    assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(response.extensions().get::<ServedBy>().unwrap().model.as_ref(), "solo");
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), provider);
    assert_eq!(h.stat("chains_exhausted"), 1);

    // Other clients, with another key or none, still reach the model.
    let served = |r: Response<GatewayBody>| r.extensions().get::<ServedBy>().unwrap().model.to_string();
    assert_eq!(served(h.send(as_client(chat("solo"), "k2", false)).await.unwrap()), "solo");
    assert_eq!(h.served("solo").await, "solo");
    // The key that earned it is cooling down: refused without a call.
    let error = h.send(as_client(chat("solo"), "k1", false)).await.unwrap_err();
    assert!(matches!(GatewayError::find(&*error), Some(GatewayError::RateLimited { .. })));
    assert_eq!(h.upstream.calls(), ["solo", "solo", "solo"]);

    // A configured chain still serves that client; the others keep the model.
    h.upstream.then("a", 429, &[("retry-after", "5")], r#"{"error":{"code":"rate_limit_exceeded"}}"#);
    assert_eq!(served(h.send(as_client(chat("a"), "k1", false)).await.unwrap()), "b");
    assert_eq!(served(h.send(as_client(chat("a"), "k2", false)).await.unwrap()), "a");
    assert_eq!(served(h.send(as_client(chat("a"), "k1", false)).await.unwrap()), "b");
    assert_eq!(h.events(), vec![ev("a", "b", "upstream_429"), ev("a", "b", "cooldown")]);
    assert_eq!(h.stat("cooldowns_active"), 2);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(served(h.send(as_client(chat("solo"), "k1", false)).await.unwrap()), "solo");
    assert_eq!(h.stat("cooldowns_active"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_shared_cooldown_does_not_concern_a_client_chosen_endpoint() {
    let h = harness(vec![spec("solo", Limits::default(), &[])]);
    // A 429 with the gateway's credentials (no scope on the response): everyone's. No other
    // model was tried, so the provider's own answer comes back.
    h.upstream.then("solo", 429, &[("retry-after", "30")], r#"{"error":{"code":"rate_limit_exceeded"}}"#);
    let response = h.send(chat("solo")).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "30");
    // A client key that may go to the same upstream is refused; its own endpoint is not.
    assert!(h.send(as_client(chat("solo"), "k1", false)).await.is_err());
    let response = h.send(as_client(chat("solo"), "k1e", true)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(h.upstream.calls(), ["solo", "solo"]);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_and_cools_the_model_down_for_the_next_requests() {
    let h = harness(vec![spec("a", Limits::default(), &["b"]), spec("b", Limits::default(), &[])]);
    h.upstream.then("a", 429, &[("retry-after", "5")], r#"{"error":{"code":"rate_limit_exceeded"}}"#);
    assert_eq!(h.served("a").await, "b");
    assert_eq!(h.served("a").await, "b");
    assert_eq!(h.events(), vec![ev("a", "b", "upstream_429"), ev("a", "b", "cooldown")]);
    // "a" was not asked again while cooling down.
    assert_eq!(h.upstream.calls(), ["a", "b", "b"]);
    assert_eq!(h.stat("cooldowns_active"), 1);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(h.served("a").await, "a");
    assert_eq!(h.stat("upstream_429s"), 1);
    assert_eq!(h.stat("cooldowns_active"), 0);
}

#[tokio::test(start_paused = true)]
async fn provider_reset_headers_and_waiting_on_an_upstream_429() {
    let h = harness_with(
        vec![spec("a", Limits::default(), &["b"]), spec("b", Limits::default(), &[])],
        MemoryRateStore::new(),
        |l| l.max_wait(Duration::from_secs(3)),
    );
    h.upstream.then("a", 429, &[("x-ratelimit-reset-requests", "2s"), ("x-ratelimit-remaining-requests", "0")], "{}");
    let start = tokio::time::Instant::now();
    assert_eq!(h.served("a").await, "a");
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(h.upstream.calls(), ["a", "a"]);
    assert_eq!(h.stat("rate_limit_waits"), 1);
    assert!(h.events().is_empty());
}

#[tokio::test(start_paused = true)]
async fn quota_429_cools_down_until_the_daily_reset() {
    let midnight = Duration::from_secs(20_000 * 86_400);
    let clock = Arc::new(TokioClock::starting_at(midnight - Duration::from_secs(100)));
    let h = harness_with(
        vec![spec("a", Limits::default(), &["b"]), spec("b", Limits::default(), &[])],
        MemoryRateStore::with_clock(clock),
        |l| l,
    );
    let quota = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","code":"insufficient_quota"}}"#;
    h.upstream.then("a", 429, &[("retry-after", "1")], quota);
    assert_eq!(h.served("a").await, "b");
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(h.served("a").await, "b", "a quota 429 is not over after Retry-After");
    tokio::time::sleep(Duration::from_secs(50)).await;
    assert_eq!(h.served("a").await, "a", "the cooldown ends at the daily reset");
    assert_eq!(h.events(), vec![ev("a", "b", "upstream_quota"), ev("a", "b", "cooldown")]);
}

#[tokio::test(start_paused = true)]
async fn exhausted_chain_is_a_429_with_the_soonest_retry_after_and_the_models_tried() {
    let h = harness(vec![spec("a", rpm(1), &["b", "c"]), spec("b", Limits::default(), &[]), spec("c", rpm(0), &[])]);
    assert_eq!(h.served("a").await, "a");
    h.upstream.then("b", 429, &[("retry-after", "7")], "{}");
    let error = h.send(chat("a")).await.unwrap_err();
    let Some(GatewayError::RateLimited { retry_after, tried }) = GatewayError::find(&*error) else {
        panic!("{error}");
    };
    assert_eq!(tried, &["a", "b", "c"]);
    assert_eq!(*retry_after, Some(Duration::from_secs(7)));
    let response = GatewayError::find(&*error).unwrap().to_response();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(h.events(), vec![ev("a", "b", "rpm"), ev("b", "c", "upstream_429")]);
    assert_eq!(h.stat("rate_limit_fallbacks"), 3);
    assert_eq!(h.stat("chains_exhausted"), 1);
}

#[tokio::test(start_paused = true)]
async fn unlimited_limits_never_block() {
    let h = harness(vec![spec("a", Limits::default(), &["b"]), spec("b", Limits::default(), &[])]);
    for _ in 0..300 {
        let mut req = chat("a");
        req.extensions_mut().insert(TokenEstimate { tokens: 5_000_000, estimated: true });
        let response = h.send(req).await.unwrap();
        assert_eq!(response.extensions().get::<ServedBy>().unwrap().model.as_ref(), "a");
    }
    assert!(h.events().is_empty());
    assert_eq!(h.stat("primary_requests"), 300);
}

#[tokio::test(start_paused = true)]
async fn never_falls_back_to_a_window_too_small_and_keeps_the_context_choice() {
    let mut small = spec("small", Limits::default(), &[]);
    small.context_window = Some(8_000);
    let mut big = spec("big", Limits::default(), &[]);
    big.context_window = Some(200_000);
    let mut a = spec("a", rpm(0), &["small", "big"]);
    a.context_window = Some(128_000);
    let h = harness(vec![a, small, big]);
    // Context routing already moved the request from "tiny" to "a".
    let mut req = chat("tiny");
    req.extensions_mut().insert(TokenEstimate { tokens: 50_000, estimated: false });
    req.extensions_mut().insert(ModelChoice { requested: "tiny".into(), current: "a".into(), attempt: 1 });
    let response = h.send(req).await.unwrap();
    assert_eq!(response.extensions().get::<ServedBy>().unwrap().model.as_ref(), "big");
    assert_eq!(h.upstream.calls(), ["big"]);
    assert_eq!(h.events(), vec![ev("a", "big", "rpm")]);
    let snap = h.stats.snapshot();
    assert_eq!(snap["context_fallbacks"], 1);
    assert_eq!(snap["fallback_requests"], 1);
}

#[tokio::test(start_paused = true)]
async fn unknown_models_and_non_chat_requests_pass_through_once() {
    let h = harness(vec![spec("a", rpm(0), &[])]);
    let response = h.send(chat("unknown")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(h.upstream.calls(), [""], "no ModelChoice for an unknown model");
    assert!(h.events().is_empty());
    // Other statuses are returned as they are.
    let h = harness(vec![spec("a", Limits::default(), &["b"])]);
    h.upstream.then("a", 500, &[], "boom");
    let response = h.send(chat("a")).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(h.upstream.calls(), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn the_wait_is_cancelled_when_the_client_goes_away() {
    let h =
        harness_with(vec![spec("a", rpm(1), &[])], MemoryRateStore::new(), |l| l.max_wait(Duration::from_secs(120)));
    assert_eq!(h.served("a").await, "a");
    let pending = h.send(chat("a"));
    let gone = tokio::time::timeout(Duration::from_secs(1), pending).await;
    assert!(gone.is_err(), "still waiting for budget");
    tokio::time::sleep(Duration::from_secs(120)).await;
    // The dropped request never reached the upstream and consumed no budget.
    assert_eq!(h.upstream.calls(), ["a"]);
    assert!(h.store.check("a", &rpm(1), 1).await.is_allowed());
}
