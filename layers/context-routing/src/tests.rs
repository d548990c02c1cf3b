use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, GatewayBody, GatewayError, body,
    catalog::{Catalog, ModelSpec},
    ext::{
        BodyEdits, FallbackEvent, FallbackEventSink, FallbackEvents, LlmRequest, ModelChoice, TokenEstimate,
        UpstreamMode,
    },
    json::parse_chat_body,
};
use serde_json::{Value, json};
use tower::{Layer, ServiceBuilder, ServiceExt, service_fn};

use super::*;
use crate::estimate::{Method, RequestEstimator, Tokenizer};

// === helpers ===

fn spec(name: &str, window: u64, fallbacks: &[&str]) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        context_window: Some(window),
        fallbacks: fallbacks.iter().map(|f| f.to_string()).collect(),
        ..ModelSpec::default()
    }
}

/// Models with the bytes-based estimate (⌈bytes / 3⌉), so the numbers are easy to check.
fn catalog() -> Arc<Catalog> {
    Arc::new(Catalog::new([
        spec("small", 100, &["mid", "big"]),
        spec("tiny-chain", 100, &["mid"]),
        spec("huge", 100_000, &[]),
        spec("mid", 1_000, &[]),
        spec("big", 10_000, &[]),
        spec("gpt-4o", 128_000, &[]),
    ]))
}

#[derive(Default)]
struct Events(Mutex<Vec<FallbackEvent>>);

impl FallbackEventSink for Events {
    fn record(&self, event: FallbackEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// What the upstream saw of one attempt.
#[derive(Clone, Debug)]
struct Seen {
    model: String,
    choice: Option<ModelChoice>,
    estimate: Option<TokenEstimate>,
    has_edits: bool,
    body: Bytes,
}

fn chat(body: Value, events: Option<&Arc<Events>>) -> Request<GatewayBody> {
    let raw = Bytes::from(body.to_string());
    let json = parse_chat_body(&raw).unwrap();
    let mut req = Request::new(body::full(raw.clone()));
    req.extensions_mut().insert(LlmRequest::new(raw, json));
    if let Some(events) = events {
        req.extensions_mut().insert(FallbackEvents(events.clone() as Arc<dyn FallbackEventSink>));
    }
    req
}

/// A user message of `n` bytes of text.
fn sized(model: &str, n: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "a".repeat(n)}]})
}

/// The bytes estimate of `sized(_, n)`: ⌈(4 + n) / 3⌉ + 3 (message) + 3 (reply).
fn bytes_estimate(n: u64) -> u64 {
    (4 + n).div_ceil(3) + 6
}

type Answer = Arc<dyn Fn(&Seen) -> Response<GatewayBody> + Send + Sync>;

fn ok() -> Answer {
    Arc::new(|_| Response::new(body::full("ok")))
}

/// An upstream that records what it saw and answers with `answer`.
fn upstream(
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Answer,
) -> impl tower::Service<
    Request<GatewayBody>,
    Response = Response<GatewayBody>,
    Error = BoxError,
    Future = impl Future<Output = Result<Response<GatewayBody>, BoxError>> + Send,
> + Clone
+ Send
+ 'static {
    service_fn(move |req: Request<GatewayBody>| {
        let seen = seen.clone();
        let answer = answer.clone();
        async move {
            let ext = req.extensions();
            let request = ext.get::<LlmRequest>().cloned();
            let edits = ext.get::<BodyEdits>().cloned();
            let body = match &request {
                Some(r) => llmgate_core::json::encode(r, edits.as_ref(), UpstreamMode::OpenAi),
                None => Bytes::new(),
            };
            let sent: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let entry = Seen {
                model: sent["model"].as_str().unwrap_or_default().to_string(),
                choice: ext.get::<ModelChoice>().cloned(),
                estimate: ext.get::<TokenEstimate>().copied(),
                has_edits: edits.is_some(),
                body: req.into_body().collect().await?.to_bytes(),
            };
            let response = answer(&entry);
            seen.lock().unwrap().push(entry);
            Ok::<_, BoxError>(response)
        }
    })
}

fn context_error() -> Response<GatewayBody> {
    let body = r#"{"error":{"message":"This model's maximum context length is 100 tokens.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    let mut response = Response::new(body::full(body));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response.headers_mut().insert("x-upstream", http::HeaderValue::from_static("1"));
    response
}

async fn text(response: Response<GatewayBody>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

// === default catalogue ===

#[test]
fn default_catalog_has_the_spec_models_and_no_policy() {
    let models = default_catalog();
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    for name in [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-4.1-mini",
        "o1",
        "o1-mini",
        "gpt-3.5-turbo",
        "gemini/gemini-2.5-pro",
        "gemini/gemini-2.5-flash",
        "gemini/gemini-2.5-flash-lite",
        "gemini/gemini-1.5-flash",
    ] {
        assert!(names.contains(&name), "{name} missing");
    }
    let catalog = Catalog::new(models.clone());
    for model in &models {
        let window = model.context_window.unwrap();
        assert!(model.max_output_tokens.is_some() && model.pricing.is_some(), "{}", model.name);
        assert!(window > 0, "{}", model.name);
        // Facts only: a built-in entry never reroutes or refuses anything by itself.
        assert_eq!(model.limits, Default::default(), "no limits by default: {}", model.name);
        assert!(model.fallbacks.is_empty(), "no fallbacks by default: {}", model.name);
    }
    assert_eq!(catalog.get("gpt-4.1").unwrap().context_window, Some(1_047_576));
    let mini = catalog.get("gpt-4o-mini").unwrap().pricing.unwrap();
    assert_eq!((mini.input_per_1m, mini.output_per_1m), (0.15, 0.60));
    // A config overrides by name.
    let mut merged = Catalog::new(default_catalog());
    merged.extend([spec("gpt-4o", 64_000, &[])]);
    assert_eq!(merged.get("gpt-4o").unwrap().context_window, Some(64_000));
    assert_eq!(merged.iter().count(), 11);
}

// === proactive ===

#[tokio::test]
async fn fits_untouched_and_fast_path_skips_the_tokenizer() {
    let seen = Arc::default();
    let layer = ContextRoutingLayer::new(catalog());
    let stats = layer.stats();
    let svc = ServiceBuilder::new().layer(layer).service(upstream(Arc::clone(&seen), ok()));
    let events = Arc::new(Events::default());
    let body = json!({"model": "gpt-4o", "max_tokens": 50,
        "messages": [{"role": "user", "content": "word ".repeat(800)}]});
    let request = chat(body.clone(), Some(&events));
    let bound = RequestEstimator::new(body.as_object().unwrap()).bound();
    let response = svc.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].model, "gpt-4o");
    assert!(seen[0].choice.is_none() && !seen[0].has_edits);
    assert_eq!(seen[0].body, body.to_string());
    assert_eq!(seen[0].estimate, Some(TokenEstimate { tokens: bound, estimated: true }));
    assert!(events.0.lock().unwrap().is_empty());
    let stats = stats.snapshot();
    assert_eq!((stats.estimated, stats.fast_path, stats.tokenized), (1, 1, 0));
}

#[tokio::test]
async fn past_the_bound_the_tokenizer_counts() {
    let seen = Arc::default();
    let catalog = Arc::new(Catalog::new([spec("gpt-4o", 20, &[]), spec("gpt-4.1", 1_000, &[])]));
    let layer = ContextRoutingLayer::new(catalog);
    let stats = layer.stats();
    let svc = layer.layer(upstream(Arc::clone(&seen), ok()));
    // "Hello world" is 2 o200k tokens: 3 + 1 ("user") + 2 + 3 = 9 ≤ 20, while the bound is
    // 3 + 4 + 11 + 3 = 21 > 20.
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello world"}]});
    svc.oneshot(chat(body, None)).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].model, "gpt-4o");
    assert_eq!(seen[0].estimate, Some(TokenEstimate { tokens: 9, estimated: false }));
    assert_eq!((stats.snapshot().fast_path, stats.snapshot().tokenized), (0, 1));
}

#[tokio::test]
async fn too_large_goes_to_the_first_chain_model_that_fits_with_exact_event() {
    for stream in [false, true] {
        let seen = Arc::default();
        let layer = ContextRoutingLayer::new(catalog());
        let stats = layer.stats();
        let svc = layer.layer(upstream(Arc::clone(&seen), ok()));
        let events = Arc::new(Events::default());
        let mut body = sized("small", 400);
        body["stream"] = json!(stream);
        let response = svc.oneshot(chat(body, Some(&events))).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);

        let estimate = bytes_estimate(400); // 141 > 100
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].model, "mid", "stream={stream}");
        assert_eq!(seen[0].choice, Some(ModelChoice { requested: "small".into(), current: "mid".into(), attempt: 1 }));
        assert_eq!(seen[0].estimate, Some(TokenEstimate { tokens: estimate, estimated: true }));
        assert_eq!(
            *events.0.lock().unwrap(),
            vec![FallbackEvent::ContextLength {
                original_model: "small".into(),
                fallback_model: "mid".into(),
                estimated_tokens: estimate,
                original_max_context: 100,
                fallback_max_context: 1_000,
            }]
        );
        assert_eq!(stats.snapshot().proactive_fallbacks, 1);
    }
}

#[tokio::test]
async fn never_routes_outside_the_configured_chain() {
    // 3,000 bytes → 1,008 tokens: more than `mid` (the whole chain of `tiny-chain`). `big`
    // would fit, but it is not in the chain: refused, nothing sent.
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let svc = ContextRoutingLayer::new(catalog()).layer(upstream(Arc::clone(&seen), ok()));
    let events = Arc::new(Events::default());
    let err = svc.oneshot(chat(sized("tiny-chain", 3_000), Some(&events))).await.unwrap_err();
    assert_eq!(
        GatewayError::find(&*err),
        Some(&GatewayError::ContextLengthExceeded {
            estimate: bytes_estimate(3_000),
            max: 1_000,
            model: "tiny-chain".into(),
        })
    );
    assert!(seen.lock().unwrap().is_empty());
    assert!(events.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn too_large_without_configured_fallbacks_goes_unchanged() {
    // `mid` has no chain: `big` and `huge` would fit, but nobody made them its fallback.
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let layer = ContextRoutingLayer::new(catalog());
    let stats = layer.stats();
    let svc = layer.layer(upstream(Arc::clone(&seen), ok()));
    let events = Arc::new(Events::default());
    let body = sized("mid", 3_000);
    let response = svc.oneshot(chat(body.clone(), Some(&events))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].model, "mid");
    assert!(seen[0].choice.is_none() && !seen[0].has_edits);
    assert_eq!(seen[0].body, body.to_string());
    assert_eq!(seen[0].estimate, Some(TokenEstimate { tokens: bytes_estimate(3_000), estimated: true }));
    assert!(events.0.lock().unwrap().is_empty());
    let stats = stats.snapshot();
    assert_eq!((stats.unrouted, stats.rejected, stats.proactive_fallbacks), (1, 0, 0));
}

#[tokio::test]
async fn nothing_fits_is_refused_without_calling_upstream() {
    let calls = Arc::new(AtomicUsize::new(0));
    // Bytes-estimated models only: o200k packs 400,000 × "a" into far fewer tokens, and
    // `gpt-4o` would take it.
    let catalog = Arc::new(Catalog::new(catalog().iter().filter(|s| s.name != "gpt-4o").map(|s| (**s).clone())));
    let layer = ContextRoutingLayer::new(catalog);
    let stats = layer.stats();
    let counted = Arc::clone(&calls);
    let svc = layer.layer(service_fn(move |_req: Request<GatewayBody>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(Response::new(body::empty())) }
    }));
    let events = Arc::new(Events::default());
    let err = svc.oneshot(chat(sized("small", 400_000), Some(&events))).await.unwrap_err();
    assert_eq!(
        GatewayError::find(&*err),
        Some(&GatewayError::ContextLengthExceeded {
            estimate: bytes_estimate(400_000),
            // The largest window of `small` and its chain (`huge` is not in it).
            max: 10_000,
            model: "small".into(),
        })
    );
    let response = GatewayError::find(&*err).unwrap().to_response();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert!(events.0.lock().unwrap().is_empty());
    assert_eq!(stats.snapshot().rejected, 1);
}

#[tokio::test]
async fn unknown_model_passes_untouched() {
    let seen = Arc::default();
    let svc = ContextRoutingLayer::new(catalog()).layer(upstream(Arc::clone(&seen), ok()));
    let body = sized("nobody-knows", 1_000_000);
    svc.oneshot(chat(body.clone(), None)).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].model, "nobody-knows");
    assert!(seen[0].choice.is_none() && seen[0].estimate.is_none() && !seen[0].has_edits);
    assert_eq!(seen[0].body, body.to_string());
}

#[tokio::test]
async fn large_requests_are_estimated_on_the_blocking_pool() {
    let seen = Arc::default();
    let catalog = Arc::new(Catalog::new([spec("gpt-4o", 1_000, &["gpt-4.1"]), spec("gpt-4.1", 1_000_000, &[])]));
    let layer = ContextRoutingLayer::new(catalog).offload_threshold(0);
    let stats = layer.stats();
    let svc = layer.layer(upstream(Arc::clone(&seen), ok()));
    svc.oneshot(chat(sized("gpt-4o", 20_000), None)).await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].model, "gpt-4.1");
    // 20,000 × "a" is far fewer o200k tokens than bytes, yet more than 1,000.
    let estimate = seen[0].estimate.unwrap();
    assert!(!estimate.estimated && estimate.tokens > 1_000 && estimate.tokens < 20_000);
    assert_eq!(stats.snapshot().tokenized, 1);
}

// === reactive ===

#[tokio::test]
async fn upstream_context_error_is_retried_once_on_a_larger_model() {
    let seen = Arc::default();
    let answer: Answer =
        Arc::new(|s: &Seen| if s.model == "small" { context_error() } else { Response::new(body::full("ok")) });
    let layer = ContextRoutingLayer::new(catalog());
    let stats = layer.stats();
    let svc = layer.layer(upstream(Arc::clone(&seen), answer));
    let events = Arc::new(Events::default());
    let body = sized("small", 30); // 18 tokens: fits `small` by the estimate
    let response = svc.oneshot(chat(body.clone(), Some(&events))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(text(response).await, "ok");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].model, "small");
    assert_eq!(seen[1].model, "mid");
    assert_eq!(seen[1].choice, Some(ModelChoice { requested: "small".into(), current: "mid".into(), attempt: 2 }));
    // The re-sent body is the client's bytes (the `model` edit is applied by `EncodeJson`).
    assert_eq!(serde_json::from_slice::<Value>(&seen[1].body).unwrap(), body);
    assert_eq!(
        *events.0.lock().unwrap(),
        vec![FallbackEvent::ContextLength {
            original_model: "small".into(),
            fallback_model: "mid".into(),
            estimated_tokens: bytes_estimate(30),
            original_max_context: 100,
            fallback_max_context: 1_000,
        }]
    );
    assert_eq!(stats.snapshot().reactive_fallbacks, 1);
}

#[tokio::test]
async fn reactive_fallback_happens_only_once() {
    let seen = Arc::default();
    let answer: Answer = Arc::new(|_| context_error());
    let svc = ContextRoutingLayer::new(catalog()).layer(upstream(Arc::clone(&seen), answer));
    let response = svc.oneshot(chat(sized("small", 30), None)).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let models: Vec<String> = seen.lock().unwrap().iter().map(|s| s.model.clone()).collect();
    assert_eq!(models, ["small", "mid"]);
}

#[tokio::test]
async fn other_400s_and_no_larger_model_pass_the_error_on_byte_for_byte() {
    let original = text(context_error()).await;
    // No model larger than `gpt-4o` (128,000) in the catalogue.
    for (model, answer) in [
        ("gpt-4o", Arc::new(|_: &Seen| context_error()) as Answer),
        (
            "small",
            Arc::new(|_: &Seen| {
                let mut r = Response::new(body::full(r#"{"error":{"code":"invalid_value"}}"#));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }),
        ),
    ] {
        let seen = Arc::default();
        let events = Arc::new(Events::default());
        let svc = ContextRoutingLayer::new(catalog()).layer(upstream(Arc::clone(&seen), answer));
        let response = svc.oneshot(chat(sized(model, 30), Some(&events))).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(seen.lock().unwrap().len(), 1, "{model}");
        assert!(events.0.lock().unwrap().is_empty());
        let headers = response.headers().clone();
        let bytes = text(response).await;
        if model == "gpt-4o" {
            assert_eq!(bytes, original);
            assert_eq!(headers["x-upstream"], "1");
        } else {
            assert_eq!(bytes, r#"{"error":{"code":"invalid_value"}}"#);
        }
    }
}

#[tokio::test]
async fn reactive_off_passes_the_error_on() {
    let seen = Arc::default();
    let answer: Answer = Arc::new(|_| context_error());
    let svc = ContextRoutingLayer::new(catalog()).reactive(false).layer(upstream(Arc::clone(&seen), answer));
    let response = svc.oneshot(chat(sized("small", 30), None)).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn without_llm_request_the_layer_is_transparent() {
    let seen = Arc::default();
    let svc = ContextRoutingLayer::new(catalog()).layer(upstream(Arc::clone(&seen), ok()));
    let response = svc.oneshot(Request::new(body::full("raw"))).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen.lock().unwrap()[0].body, "raw");
}

// === warm-up ===

#[test]
fn the_tokenizers_needed_are_those_of_fallback_chains() {
    let needed = |models: Vec<ModelSpec>| ContextRoutingLayer::new(Arc::new(Catalog::new(models))).tokenizers_needed();
    // No chain (the built-in catalogue's case): nothing to load, whatever the models.
    assert_eq!(needed(crate::default_catalog()), []);
    assert_eq!(needed(vec![spec("gpt-4o", 128_000, &[]), spec("gpt-4", 8_192, &[])]), []);
    // Bytes-estimated models need no tables.
    assert_eq!(needed(vec![spec("small", 100, &["big"]), spec("big", 1_000, &[])]), []);
    // A chain needs its model's tokenizer and its members' (each once).
    assert_eq!(
        needed(vec![spec("gpt-4o-mini", 100, &["gpt-4", "big"]), spec("gpt-4", 8_192, &[]), spec("big", 1_000, &[])]),
        [Tokenizer::O200k, Tokenizer::Cl100k]
    );
    assert_eq!(
        needed(vec![spec("small", 100, &["gpt-4o"]), spec("gpt-4o", 128_000, &["gpt-4.1"])]),
        [Tokenizer::O200k]
    );
    // A chain member the catalogue does not know, or a model without a window, needs nothing.
    let no_window = ModelSpec { name: "gpt-4".into(), fallbacks: vec!["gpt-4o".into()], ..ModelSpec::default() };
    assert_eq!(needed(vec![spec("small", 100, &["gpt-4o"]), no_window]), []);
}

#[test]
fn warm_up_loads_what_is_needed() {
    let layer = ContextRoutingLayer::new(Arc::new(Catalog::new([
        spec("gpt-4o-mini", 100, &["gpt-4o"]),
        spec("gpt-4o", 128_000, &[]),
    ])));
    layer.warm_up();
    assert!(Tokenizer::O200k.is_loaded());
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word ".repeat(100)}]});
    let mut estimator = RequestEstimator::new(body.as_object().unwrap());
    let estimate = estimator.estimate(Tokenizer::O200k, Some(100));
    assert_eq!(
        (estimate.method, estimator.tokenizer_runs(), estimator.tokenizer_load_waits()),
        (Method::Tokenizer, 1, 0)
    );
}
