//! Issue 6 through the reference proxy: rate-limit fallback (local limits, upstream 429s,
//! cooldowns, quota exhaustion, exhausted chains, shared budgets across processes on Redis and
//! Redis Cluster, Redis outages, streaming) and the `GET /stats` counters; issue 15: a 429
//! cools down only the credentials and endpoint that earned it, and the built-in catalogue
//! never moves a request to another model.
//!
//! The `reason` of the `rate_limit_fallback` events is checked by the Langfuse tests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use llmgate::mock_upstream::{MockOptions, MockUpstream};
use llmgate_test_support::redis::{RedisCluster, RedisServer};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::support::{child::ChildGateway, *};

const CHAT: &str = "/v1/chat/completions";

// === helpers ===

/// A chat request for `model` with a short prompt.
async fn chat(url: &str, model: &str, headers: &[(&str, &str)]) -> Reply {
    post_json(url, headers, &chat_body(model, false)).await
}

/// A chat body whose prompt is `words` five-byte words long.
fn big_body(model: &str, words: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "word ".repeat(words)}]})
}

/// The `model` of every chat request the mock received, in order.
fn models_seen(mock: &MockUpstream) -> Vec<String> {
    mock.requests()
        .iter()
        .filter(|r| r.uri.ends_with("/chat/completions"))
        .map(|r| r.json()["model"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// `GET /stats` of the gateway at `base` (`http://host:port`).
async fn stats(base: &str) -> Value {
    let reply = send(Method::GET, &format!("{base}/stats"), &[], "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

fn base(gw: &TestGateway) -> String {
    gw.url("")
}

/// The `Retry-After` header as seconds.
fn retry_after(reply: &Reply) -> u64 {
    let value = reply.headers.get("retry-after").unwrap_or_else(|| panic!("no Retry-After: {:?}", reply.headers));
    value.to_str().unwrap().parse().unwrap_or_else(|e| panic!("Retry-After {value:?}: {e}"))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Seconds until the next 00:00 UTC.
fn secs_to_midnight_utc() -> u64 {
    86_400 - unix_now() % 86_400
}

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) for `unix` seconds.
fn http_date(unix: u64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil date from days since the epoch (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The counters a test checks, as one JSON object (the rest of the snapshot is ignored).
fn counters(stats: &Value, names: &[&str]) -> Value {
    Value::Object(names.iter().map(|n| (n.to_string(), stats[*n].clone())).collect())
}

/// The config lines that put both stores on `redis`.
fn redis_yaml(redis: &RedisServer) -> String {
    format!("redis: {{url: \"{}\"}}\n", redis.url())
}

const MAIN_COUNTERS: &[&str] =
    &["total_requests", "primary_requests", "fallback_requests", "rate_limit_fallbacks", "rate_limit_waits"];

// === local limits ===

async fn rpm_limit_falls_back_to_the_next_model(store: &str) {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(
        &mock,
        &format!("{store}{}", "models:\n  - {name: alpha, limits: {rpm: 2}, fallbacks: [beta]}\n  - {name: beta}\n"),
    )
    .await;
    for _ in 0..3 {
        let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    assert_eq!(models_seen(&mock), ["alpha", "alpha", "beta"]);
    let stats = stats(&base(&gw)).await;
    assert_eq!(
        counters(&stats, MAIN_COUNTERS),
        json!({"total_requests": 3, "primary_requests": 2, "fallback_requests": 1,
               "rate_limit_fallbacks": 1, "rate_limit_waits": 0})
    );
    let rate = stats["fallback_rate_percent"].as_f64().unwrap();
    assert!((rate - 100.0 / 3.0).abs() < 0.01, "{rate}");
}

async fn tpm_limit_falls_back_after_a_big_prompt(store: &str) {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(
        &mock,
        &format!("{store}{}", "models:\n  - {name: alpha, context_window: 1000000, limits: {tpm: 1000}, fallbacks: [beta]}\n  - {name: beta}\n"),
    )
    .await;
    // ~2,000 tokens: the full bucket lets one request through (it needs at most the whole
    // budget), which leaves the bucket empty for the rest of the minute.
    let reply = post_json(&gw.url(CHAT), &[], &big_body("alpha", 1600)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = post_json(&gw.url(CHAT), &[], &big_body("alpha", 1600)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // Even a short prompt finds no tokens left; rpm is unlimited, so tokens are what refuse.
    let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(models_seen(&mock), ["alpha", "beta", "beta"]);
    assert_eq!(
        counters(&stats(&base(&gw)).await, MAIN_COUNTERS),
        json!({"total_requests": 3, "primary_requests": 1, "fallback_requests": 2,
               "rate_limit_fallbacks": 2, "rate_limit_waits": 0})
    );
}

async fn rpd_limit_falls_back_and_an_exhausted_day_waits_for_midnight_utc(store: &str) {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(
        &mock,
        &format!("{store}{}", "models:\n  - {name: alpha, limits: {rpd: 1}, fallbacks: [beta]}\n  - {name: beta}\n  - {name: solo, limits: {rpd: 1}}\n"),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
    }
    assert_eq!(models_seen(&mock), ["alpha", "beta"]);

    // A model with no chain: the day is used up, so the client is told to come back at the
    // daily reset (00:00 UTC), not in a minute.
    assert_eq!(chat(&gw.url(CHAT), "solo", &[]).await.status, StatusCode::OK);
    let before = secs_to_midnight_utc();
    let reply = chat(&gw.url(CHAT), "solo", &[]).await;
    let after = secs_to_midnight_utc();
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    if after <= before {
        let retry = retry_after(&reply);
        assert!((after..=before + 1).contains(&retry), "Retry-After {retry}, midnight in {after}..{before} s");
    }
    assert_eq!(models_seen(&mock), ["alpha", "beta", "solo"]);
    assert_eq!(
        counters(&stats(&base(&gw)).await, MAIN_COUNTERS),
        json!({"total_requests": 4, "primary_requests": 2, "fallback_requests": 1,
               "rate_limit_fallbacks": 2, "rate_limit_waits": 0})
    );
}

#[tokio::test]
async fn rpm_limit_falls_back_in_memory() {
    rpm_limit_falls_back_to_the_next_model("").await;
}

#[tokio::test]
async fn rpm_limit_falls_back_on_redis() {
    let redis = RedisServer::start();
    rpm_limit_falls_back_to_the_next_model(&redis_yaml(&redis)).await;
}

#[tokio::test]
async fn tpm_limit_falls_back_in_memory() {
    tpm_limit_falls_back_after_a_big_prompt("").await;
}

#[tokio::test]
async fn tpm_limit_falls_back_on_redis() {
    let redis = RedisServer::start();
    tpm_limit_falls_back_after_a_big_prompt(&redis_yaml(&redis)).await;
}

#[tokio::test]
async fn rpd_limit_falls_back_in_memory() {
    rpd_limit_falls_back_and_an_exhausted_day_waits_for_midnight_utc("").await;
}

#[tokio::test]
async fn rpd_limit_falls_back_on_redis() {
    let redis = RedisServer::start();
    rpd_limit_falls_back_and_an_exhausted_day_waits_for_midnight_utc(&redis_yaml(&redis)).await;
}

// === upstream 429s ===

#[tokio::test]
async fn upstream_429_within_max_wait_waits_then_succeeds_on_the_same_model() {
    // Every 2nd chat request is answered 429 with `Retry-After: 1`.
    let mock = MockUpstream::start(MockOptions { rate_limit_every: Some(2), ..MockOptions::default() }).await.unwrap();
    let gw = TestGateway::in_front_of(
        &mock,
        "rate_limit: {max_wait_seconds: 2}\nmodels:\n  - {name: alpha, fallbacks: [beta]}\n  - {name: beta}\n",
    )
    .await;
    assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
    let started = std::time::Instant::now();
    let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["model"], "alpha");
    // The retry waited for the `Retry-After` (a lower bound only: it cannot come sooner).
    assert!(started.elapsed() >= Duration::from_secs(1), "retried after {:?}", started.elapsed());
    assert_eq!(models_seen(&mock), ["alpha", "alpha", "alpha"]);
    let stats = stats(&base(&gw)).await;
    assert_eq!(
        counters(&stats, MAIN_COUNTERS),
        json!({"total_requests": 2, "primary_requests": 2, "fallback_requests": 0,
               "rate_limit_fallbacks": 0, "rate_limit_waits": 1})
    );
    assert_eq!(stats["upstream_429s"], 1);
}

#[tokio::test]
async fn upstream_429_longer_than_max_wait_falls_back_at_once() {
    let mock = MockUpstream::start(MockOptions { rate_limit_every: Some(2), ..MockOptions::default() }).await.unwrap();
    let gw = TestGateway::in_front_of(
        &mock,
        "rate_limit: {max_wait_seconds: 0.5}\nmodels:\n  - {name: alpha, fallbacks: [beta]}\n  - {name: beta}\n",
    )
    .await;
    assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
    let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["model"], "beta");
    assert_eq!(models_seen(&mock), ["alpha", "alpha", "beta"]);
    assert_eq!(
        counters(&stats(&base(&gw)).await, MAIN_COUNTERS),
        json!({"total_requests": 2, "primary_requests": 1, "fallback_requests": 1,
               "rate_limit_fallbacks": 1, "rate_limit_waits": 0})
    );
}

#[tokio::test]
async fn retry_after_cools_the_model_down_for_the_next_requests() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(
        &mock,
        "models:\n  - {name: alpha, fallbacks: [beta]}\n  - {name: beta}\n  - {name: solo}\n",
    )
    .await;
    let fail =
        [("x-mock-fail", "alpha=429:rate_limit_exceeded,solo=429:rate_limit_exceeded"), ("x-mock-retry-after", "30")];
    let reply = chat(&gw.url(CHAT), "alpha", &fail).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["model"], "beta");
    // The next requests carry no failure header: they go straight to the fallback.
    for _ in 0..3 {
        let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["model"], "beta");
    }
    assert_eq!(models_seen(&mock), ["alpha", "beta", "beta", "beta", "beta"]);

    // A model with no chain: the client gets the upstream's wait, and so does the next client,
    // which is refused without a call upstream.
    let reply = chat(&gw.url(CHAT), "solo", &fail).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert!((29..=30).contains(&retry_after(&reply)), "{:?}", reply.headers);
    let reply = chat(&gw.url(CHAT), "solo", &[]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert!((25..=30).contains(&retry_after(&reply)), "{:?}", reply.headers);
    assert_eq!(models_seen(&mock).iter().filter(|m| *m == "solo").count(), 1);

    let stats = stats(&base(&gw)).await;
    assert_eq!(
        counters(&stats, MAIN_COUNTERS),
        json!({"total_requests": 6, "primary_requests": 0, "fallback_requests": 4,
               "rate_limit_fallbacks": 6, "rate_limit_waits": 0})
    );
    assert_eq!(
        counters(&stats, &["upstream_429s", "cooldowns_active"]),
        json!({"upstream_429s": 2, "cooldowns_active": 2})
    );
}

#[tokio::test]
async fn the_cooldown_is_shared_by_every_gateway_on_one_redis() {
    let mock = mock().await;
    let redis = RedisServer::start();
    let yaml = format!("{}models:\n  - {{name: alpha, fallbacks: [beta]}}\n  - {{name: beta}}\n", redis_yaml(&redis));
    let (one, two) = (TestGateway::in_front_of(&mock, &yaml).await, TestGateway::in_front_of(&mock, &yaml).await);
    let fail = [("x-mock-fail", "alpha=429:rate_limit_exceeded"), ("x-mock-retry-after", "30")];
    assert_eq!(chat(&one.url(CHAT), "alpha", &fail).await.json()["model"], "beta");
    // The other gateway never saw the 429, but its next requests skip alpha all the same.
    for _ in 0..2 {
        let reply = chat(&two.url(CHAT), "alpha", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["model"], "beta");
    }
    assert_eq!(models_seen(&mock), ["alpha", "beta", "beta", "beta"]);
    assert_eq!(
        counters(&stats(&base(&two)).await, &["rate_limit_fallbacks", "upstream_429s"]),
        json!({"rate_limit_fallbacks": 2, "upstream_429s": 0})
    );
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_wait() {
    let mock = MockUpstream::start(MockOptions { rate_limit_every: Some(2), ..MockOptions::default() }).await.unwrap();
    let gw = TestGateway::in_front_of(
        &mock,
        "rate_limit: {max_wait_seconds: 2}\nmodels:\n  - {name: alpha, fallbacks: [beta]}\n  - {name: beta}\n",
    )
    .await;
    assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
    let req = request(
        Method::POST,
        &gw.url(CHAT),
        &[("content-type", "application/json")],
        chat_body("alpha", false).to_string(),
    );
    let client = tokio::spawn(open(req));
    // The second request got its 429 (`Retry-After: 1`): the gateway is waiting. The client leaves.
    within(async {
        while stats(&base(&gw)).await["rate_limit_waits"] != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(mock.chat_requests(), 2);
    client.abort();
    // Past the `Retry-After`: a wait that went on would have sent the retry by now.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(mock.chat_requests(), 2, "{:?}", models_seen(&mock));
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_honoured() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "models:\n  - {name: solo}\n").await;
    let date = http_date(unix_now() + 40);
    let reply = chat(&gw.url(CHAT), "solo", &[("x-mock-status", "429"), ("x-mock-retry-after", &date)]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert!((35..=41).contains(&retry_after(&reply)), "{date}: {:?}", reply.headers);
}

#[tokio::test]
async fn a_short_cooldown_ends_and_the_model_is_used_again() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "models:\n  - {name: alpha, fallbacks: [beta]}\n  - {name: beta}\n").await;
    let started = std::time::Instant::now();
    let fail = [("x-mock-fail", "alpha=429:rate_limit_exceeded"), ("x-mock-retry-after", "1")];
    assert_eq!(chat(&gw.url(CHAT), "alpha", &fail).await.json()["model"], "beta");
    within(async {
        loop {
            if chat(&gw.url(CHAT), "alpha", &[]).await.json()["model"] == "alpha" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Not before the `Retry-After` (a lower bound only).
    assert!(started.elapsed() >= Duration::from_secs(1), "alpha again after {:?}", started.elapsed());
}

#[tokio::test]
async fn quota_exhaustion_cools_the_model_down_until_the_daily_reset() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(
        &mock,
        "models:\n  - {name: alpha, fallbacks: [beta]}\n  - {name: beta}\n  - {name: solo}\n",
    )
    .await;
    // The quota 429 says `Retry-After: 1`, but a quota does not come back in a second.
    let fail =
        [("x-mock-fail", "alpha=429:insufficient_quota,solo=429:insufficient_quota"), ("x-mock-retry-after", "1")];
    let reply = chat(&gw.url(CHAT), "alpha", &fail).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["model"], "beta");

    let before = secs_to_midnight_utc();
    let reply = chat(&gw.url(CHAT), "solo", &fail).await;
    let after = secs_to_midnight_utc();
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    if after <= before && after > 5 {
        let retry = retry_after(&reply);
        assert!((after..=before + 1).contains(&retry), "Retry-After {retry}, midnight in {after}..{before} s");
    }

    // Well past the `Retry-After` of 1 s, the model is still cooling down.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
    assert_eq!(reply.json()["model"], "beta");
    let reply = chat(&gw.url(CHAT), "solo", &[]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    if secs_to_midnight_utc() > 5 {
        assert!(retry_after(&reply) > 5, "{:?}", reply.headers);
    }
    assert_eq!(models_seen(&mock), ["alpha", "beta", "solo", "beta"]);
    let stats = stats(&base(&gw)).await;
    assert_eq!(
        counters(&stats, &["upstream_429s", "cooldowns_active"]),
        json!({"upstream_429s": 2, "cooldowns_active": 2})
    );
}

// === chains ===

#[tokio::test]
async fn an_exhausted_chain_is_an_openai_429_with_retry_after_and_the_models_tried() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(
        &mock,
        "models:\n  - {name: alpha, limits: {rpm: 1}, fallbacks: [beta]}\n  - {name: beta, limits: {rpm: 1}}\n",
    )
    .await;
    assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
    assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
    let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert!(reply.headers["content-type"].to_str().unwrap().starts_with("application/json"));
    let retry = retry_after(&reply);
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["code"], "rate_limit_exceeded");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("alpha") && message.contains("beta"), "{message}");
    assert!(message.find("alpha") < message.find("beta"), "tried in chain order: {message}");
    assert_eq!(models_seen(&mock), ["alpha", "beta"]);
    let stats = stats(&base(&gw)).await;
    assert_eq!(
        counters(&stats, MAIN_COUNTERS),
        json!({"total_requests": 3, "primary_requests": 1, "fallback_requests": 1,
               "rate_limit_fallbacks": 3, "rate_limit_waits": 0})
    );
    assert_eq!(stats["chains_exhausted"], 1);
}

#[tokio::test]
async fn a_request_rerouted_for_context_never_falls_back_to_a_window_too_small() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(
        &mock,
        "models:
  - {name: tiny, context_window: 50, fallbacks: [mid]}
  - {name: mid, context_window: 2000, limits: {rpm: 0}, fallbacks: [small, big]}
  - {name: small, context_window: 60}
  - {name: big, context_window: 100000}
",
    )
    .await;
    // ~100 tokens: too large for tiny, so context routing picks mid; mid has no budget, and
    // small's window is too small for the request: big answers.
    let reply = post_json(&gw.url(CHAT), &[], &big_body("tiny", 80)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(models_seen(&mock), ["big"]);
    let stats = stats(&base(&gw)).await;
    assert_eq!(
        counters(&stats, &["total_requests", "fallback_requests", "context_fallbacks", "rate_limit_fallbacks"]),
        json!({"total_requests": 1, "fallback_requests": 1, "context_fallbacks": 1, "rate_limit_fallbacks": 1})
    );
}

/// 100 requests to each model with unlimited limits (`null`, `-1`, absent) all reach that model;
/// their only fallback refuses everything, so a wrongly blocked request would be a 429.
async fn unlimited_never_blocks(store: &str) {
    let mock = mock().await;
    let yaml = format!(
        "{store}models:
  - {{name: u-null, limits: {{rpm: null, tpm: null, rpd: null}}, fallbacks: [never]}}
  - {{name: u-minus-one, limits: {{rpm: -1, tpm: -1, rpd: -1}}, fallbacks: [never]}}
  - {{name: u-absent, fallbacks: [never]}}
  - {{name: never, limits: {{rpm: 0, tpm: 0, rpd: 0}}}}
"
    );
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let url = gw.url(CHAT);
    for model in ["u-null", "u-minus-one", "u-absent"] {
        let mut tasks = JoinSet::new();
        for _ in 0..100 {
            let url = url.clone();
            // A prompt of ~1,000 tokens: tpm is exercised too.
            tasks.spawn(async move { post_json(&url, &[], &big_body(model, 800)).await.status });
        }
        while let Some(status) = tasks.join_next().await {
            assert_eq!(status.unwrap(), StatusCode::OK, "{model}");
        }
    }
    let seen = models_seen(&mock);
    assert_eq!(seen.len(), 300);
    for model in ["u-null", "u-minus-one", "u-absent"] {
        assert_eq!(seen.iter().filter(|m| *m == model).count(), 100, "{model}");
    }
    let stats = stats(&base(&gw)).await;
    assert_eq!(
        counters(&stats, MAIN_COUNTERS),
        json!({"total_requests": 300, "primary_requests": 300, "fallback_requests": 0,
               "rate_limit_fallbacks": 0, "rate_limit_waits": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unlimited_limits_never_block_in_memory() {
    unlimited_never_blocks("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unlimited_limits_never_block_on_redis() {
    let redis = RedisServer::start();
    unlimited_never_blocks(&redis_yaml(&redis)).await;
}

// === streaming ===

#[tokio::test]
async fn streaming_falls_back_before_the_first_byte() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(
        &mock,
        "models:\n  - {name: alpha, fallbacks: [beta]}\n  - {name: beta}\n  - {name: gamma, limits: {rpm: 0}, fallbacks: [beta]}\n",
    )
    .await;
    // The primary answers 429: the client sees only the fallback's stream.
    let reply =
        post_json(&gw.url(CHAT), &[("x-mock-fail", "alpha=429:rate_limit_exceeded")], &chat_body("alpha", true)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.headers["content-type"], "text/event-stream");
    let text = reply.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("rate_limit_exceeded") && !text.contains("Rate limit"), "{text}");
    let chunks: Vec<Value> = text
        .split("\n\n")
        .filter_map(|event| event.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert!(chunks.len() >= 2, "{text}");
    assert!(chunks.iter().all(|c| c["model"] == "beta"), "{text}");
    assert_eq!(models_seen(&mock), ["alpha", "beta"]);

    // A local limit: the stream comes from the fallback, and it is streamed, not buffered (the
    // second chunk would come after ten minutes).
    let req = request(
        Method::POST,
        &gw.url(CHAT),
        &[("content-type", "application/json"), ("x-mock-chunks", "2"), ("x-mock-chunk-delay-ms", "600000")],
        chat_body("gamma", true).to_string(),
    );
    let response = open(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = within(body.frame()).await.unwrap().unwrap().into_data().unwrap();
    let first = String::from_utf8_lossy(&first);
    assert!(first.contains("tok0") && first.contains("\"model\":\"beta\""), "{first}");
    drop(body);
    assert_eq!(models_seen(&mock), ["alpha", "beta", "beta"]);
}

#[tokio::test]
async fn a_stream_that_fails_midway_is_not_retried() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "models:\n  - {name: alpha, fallbacks: [beta]}\n  - {name: beta}\n").await;
    let req = request(
        Method::POST,
        &gw.url(CHAT),
        // A pause between chunks lets the head and the first chunk reach the client before the cut.
        &[("content-type", "application/json"), ("x-mock-cut-after", "2"), ("x-mock-chunk-delay-ms", "100")],
        chat_body("alpha", true).to_string(),
    );
    let response = open(req).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    while let Some(frame) = within(body.frame()).await {
        match frame {
            Ok(frame) => text.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap_or_default())),
            Err(_) => break,
        }
    }
    assert!(text.contains("tok0") && !text.contains("[DONE]"), "{text}");
    assert_eq!(models_seen(&mock), ["alpha"], "the client already has bytes of alpha's answer");
    assert_eq!(
        counters(&stats(&base(&gw)).await, MAIN_COUNTERS),
        json!({"total_requests": 1, "primary_requests": 1, "fallback_requests": 0,
               "rate_limit_fallbacks": 0, "rate_limit_waits": 0})
    );
}

// === stats ===

#[tokio::test]
async fn stats_count_a_scripted_mix() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(
        &mock,
        "models:
  - {name: alpha, context_window: 100000, limits: {rpm: 2}, fallbacks: [beta]}
  - {name: beta, context_window: 100000}
  - {name: tiny, context_window: 50, fallbacks: [beta]}
  - {name: solo, context_window: 100000, limits: {rpm: 1}}
",
    )
    .await;
    let url = gw.url(CHAT);
    let ok = |reply: Reply, model: &str| {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["model"], model);
    };
    ok(chat(&url, "alpha", &[]).await, "alpha"); // primary
    ok(chat(&url, "alpha", &[]).await, "alpha"); // primary
    ok(chat(&url, "alpha", &[]).await, "beta"); // rpm fallback
    ok(chat(&url, "beta", &[]).await, "beta"); // primary
    ok(post_json(&url, &[], &big_body("tiny", 100)).await, "beta"); // context fallback
    ok(chat(&url, "not-in-any-catalogue", &[]).await, "not-in-any-catalogue"); // untouched
    ok(chat(&url, "solo", &[]).await, "solo"); // primary
    assert_eq!(chat(&url, "solo", &[]).await.status, StatusCode::TOO_MANY_REQUESTS); // rpm, no chain
    let reply = chat(&url, "beta", &[("x-mock-fail", "beta=429:rate_limit_exceeded")]).await; // upstream 429, no chain
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);

    let stats = stats(&base(&gw)).await;
    assert_eq!(
        counters(
            &stats,
            &[
                "total_requests",
                "primary_requests",
                "fallback_requests",
                "rate_limit_fallbacks",
                "rate_limit_waits",
                "context_fallbacks",
                "upstream_429s",
                "chains_exhausted",
                "store_outages",
            ]
        ),
        json!({
            "total_requests": 9,
            "primary_requests": 5,
            "fallback_requests": 2,
            "rate_limit_fallbacks": 3,
            "rate_limit_waits": 0,
            "context_fallbacks": 1,
            "upstream_429s": 1,
            "chains_exhausted": 2,
            "store_outages": 0,
        })
    );
    let rate = stats["fallback_rate_percent"].as_f64().unwrap();
    assert!((rate - 200.0 / 9.0).abs() < 0.01, "{rate}");
}

// === Redis outages ===

const OUTAGE_MODELS: &str = "models:
  - {name: alpha, limits: {rpm: 4}, fallbacks: [beta]}
  - {name: beta}
";

// The outage policy as the per-request script (`mode: exact`) applies it; with leases, what a
// replica holds is spent first (`lease::*` in the rate-limit crate).
#[tokio::test]
async fn redis_killed_with_fail_closed_refuses() {
    let mock = mock().await;
    let mut redis = RedisServer::start();
    let yaml = format!(
        "redis: {{url: \"{}\"}}\nrate_limit: {{on_redis_outage: fail_closed, mode: exact}}\n{OUTAGE_MODELS}",
        redis.url()
    );
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
    redis.kill();
    for _ in 0..2 {
        let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
        assert!(reply.headers.contains_key("retry-after"));
        assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
    }
    assert_eq!(models_seen(&mock), ["alpha"], "nothing goes upstream while the budget cannot be checked");
    let snapshot = stats(&base(&gw)).await;
    assert!(snapshot["store_outages"].as_u64().unwrap() >= 1, "{snapshot}");
    assert_eq!(snapshot["store_in_outage"], true, "{snapshot}");

    // Redis back: requests are served again.
    redis.restart();
    within(async {
        while chat(&gw.url(CHAT), "alpha", &[]).await.status != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(stats(&base(&gw)).await["store_in_outage"], false);
}

#[tokio::test]
async fn redis_killed_with_fail_open_serves_on_per_process_budgets() {
    let mock = mock().await;
    let mut redis = RedisServer::start();
    // Two replicas share rpm 4: during the outage this process allows 2 a minute.
    let yaml = format!(
        "redis: {{url: \"{}\"}}\nrate_limit: {{on_redis_outage: fail_open, replicas: 2, mode: exact}}\n{OUTAGE_MODELS}",
        redis.url()
    );
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
    redis.kill();
    for _ in 0..3 {
        let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    assert_eq!(models_seen(&mock), ["alpha", "alpha", "alpha", "beta"]);
    let snapshot = stats(&base(&gw)).await;
    assert_eq!(snapshot["store_outages"], 1, "one outage, however many failed calls: {snapshot}");
    assert!(snapshot["store_errors"].as_u64().unwrap() >= 3, "{snapshot}");
    assert_eq!(snapshot["store_in_outage"], true, "{snapshot}");
}

/// Two proxy processes on one Redis (or Redis Cluster) URL: a burst of 200 requests, in four
/// waves of 50 spread over both, gets exactly 50 answers from the upstream (rpm 50, no chain).
async fn two_processes_share_one_budget(redis_url: &str) {
    let mock = mock().await;
    // `fail_closed`: a Redis error can only lower the count, never hide a budget that is not shared.
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: openai}}\nredis: {{url: \"{redis_url}\"}}
rate_limit: {{on_redis_outage: fail_closed}}
models:
  - {{name: shared, limits: {{rpm: 50}}}}
  - {{name: warmup}}
",
        mock.url()
    );
    let gateways = [
        ChildGateway::spawn(&yaml, &[("LOG_LEVEL", "warn")], &[]).await,
        ChildGateway::spawn(&yaml, &[("LOG_LEVEL", "warn")], &[]).await,
    ];
    // Each process connects to Redis (lazily) before the burst.
    for gw in &gateways {
        let reply = chat(&gw.url(CHAT), "warmup", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{} / {}", reply.text(), gw.log());
    }

    let mut ok = [0usize; 2];
    let mut refused = [0usize; 2];
    for _wave in 0..4 {
        let mut tasks = JoinSet::new();
        for i in 0..50 {
            let which = i % 2;
            let url = gateways[which].url(CHAT);
            tasks.spawn(async move { (which, chat(&url, "shared", &[]).await) });
        }
        while let Some(done) = tasks.join_next().await {
            let (which, reply) = done.unwrap();
            match reply.status {
                StatusCode::OK => ok[which] += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
                    assert!(reply.headers.contains_key("retry-after"));
                    refused[which] += 1;
                }
                other => panic!("unexpected {other}: {}", reply.text()),
            }
        }
    }
    assert_eq!(ok[0] + ok[1], 50, "200s per process: {ok:?}");
    assert_eq!(refused[0] + refused[1], 150, "429s per process: {refused:?}");
    assert!(ok[0] > 0 && ok[1] > 0, "both processes served part of the budget: {ok:?}");
    assert_eq!(models_seen(&mock).iter().filter(|m| *m == "shared").count(), 50);
    for gw in &gateways {
        let snapshot = stats(&gw.url("")).await;
        assert_eq!(snapshot["store_errors"], 0, "{snapshot}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_one_redis_never_exceed_rpm_50_together() {
    let redis = RedisServer::start();
    two_processes_share_one_budget(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_a_three_node_redis_cluster_never_exceed_rpm_50_together() {
    let cluster = RedisCluster::start(3);
    let nodes: Vec<String> = cluster.urls().iter().map(|u| u.trim_start_matches("redis://").to_string()).collect();
    two_processes_share_one_budget(&format!("redis+cluster://{}", nodes.join(","))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_a_redis_outage_once_per_outage() {
    let mock = mock().await;
    let mut redis = RedisServer::start();
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: openai}}\nredis: {{url: \"{}\"}}
rate_limit: {{on_redis_outage: fail_open}}
models:
  - {{name: alpha, limits: {{rpm: 100}}}}
",
        mock.url(),
        redis.url()
    );
    let gw = ChildGateway::spawn(&yaml, &[("LOG_LEVEL", "warn")], &[]).await;
    let unreachable = |log: &str| log.lines().filter(|l| l.contains("rate-limit store: Redis unreachable")).count();
    assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
    assert_eq!(unreachable(&gw.log()), 0, "{}", gw.log());

    redis.kill();
    // Requests go on being served (fail_open); with leases the first ones are served from the
    // replica's slice and only a top-up meets the outage, so keep asking until one does.
    within(async {
        while unreachable(&gw.log()) < 1 {
            let reply = chat(&gw.url(CHAT), "alpha", &[]).await;
            assert_eq!(reply.status, StatusCode::OK, "fail_open serves: {}", reply.text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let log = gw.log();
    assert_eq!(unreachable(&log), 1, "{log}");
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("Redis unreachable")), "{log}");
    assert_eq!(stats(&gw.url("")).await["store_outages"], 1);

    // Back, then gone again: a second outage, a second warning.
    redis.restart();
    within(async {
        while stats(&gw.url("")).await["store_in_outage"] == true {
            assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(gw.log().contains("Redis reachable again"), "{}", gw.log());
    redis.kill();
    // As above; the log goes through a writer thread, so the line can also trail the response.
    within(async {
        while unreachable(&gw.log()) < 2 {
            assert_eq!(chat(&gw.url(CHAT), "alpha", &[]).await.status, StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(unreachable(&gw.log()), 2, "{}", gw.log());
    assert_eq!(stats(&gw.url("")).await["store_outages"], 2);
}

// === whose cooldown: the credentials and endpoint that earned the 429 (issue 15) ===

/// The mock's 429 body for `model` (`x-mock-fail: model=429:rate_limit_exceeded`).
fn mock_429_body(model: &str) -> Value {
    json!({"error": {"message": format!("Rate limit reached for {model}"), "type": "mock_error", "param": null,
        "code": "rate_limit_exceeded"}})
}

/// The `authorization` header of every chat request the mock received, in order.
fn keys_seen(mock: &MockUpstream) -> Vec<String> {
    mock.requests()
        .iter()
        .filter(|r| r.uri.ends_with("/chat/completions"))
        .map(|r| r.headers.get("authorization").map_or("-", |v| v.to_str().unwrap()).to_string())
        .collect()
}

#[tokio::test]
async fn a_429_earned_with_a_clients_own_key_is_that_clients_alone() {
    // No `models:` and no server-side key: the built-in catalogue is active and every client's
    // own `Authorization` goes upstream. Two projects.
    let mock = mock().await;
    let dir = TempDir::new();
    let secrets = dir.0.join("secrets.yaml");
    std::fs::write(
        &secrets,
        "langfuse_keys:\n  p1: {public_key: pk-lf-1, secret_key: sk-lf-1}\n  p2: {public_key: pk-lf-2, secret_key: sk-lf-2}\ndefault_project_id: p1\n",
    )
    .unwrap();
    let gw = TestGateway::in_front_of(&mock, &format!("langfuse: {{secrets_path: \"{}\"}}\n", secrets.display())).await;
    let (p1, p2) = (gw.url("/v1/project_id/p1/chat/completions"), gw.url("/v1/project_id/p2/chat/completions"));
    let fail = [("x-mock-fail", "gpt-4o=429:rate_limit_exceeded"), ("x-mock-retry-after", "30")];
    let a = ("authorization", "Bearer sk-client-a");
    let reply = chat(&p1, "gpt-4o", &[a, fail[0], fail[1]]).await;
    // The provider's own answer, status, `Retry-After` and body, not a rewritten one; and no
    // move to a model nobody configured.
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert_eq!(reply.json(), mock_429_body("gpt-4o"));
    assert_eq!(reply.headers["retry-after"], "30");
    assert_eq!(models_seen(&mock), ["gpt-4o"]);

    // A client of another project, with its own key, right after: it reaches the upstream and
    // is served.
    let reply = chat(&p2, "gpt-4o", &[("authorization", "Bearer sk-client-b")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["model"], "gpt-4o");
    // So is one of the same project that sends no key at all.
    let reply = chat(&p1, "gpt-4o", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(models_seen(&mock), ["gpt-4o", "gpt-4o", "gpt-4o"]);
    assert_eq!(keys_seen(&mock), ["Bearer sk-client-a", "Bearer sk-client-b", "-"]);

    // The key that earned the 429 is cooling down, whichever project it comes through: its
    // next request is answered at once.
    let reply = chat(&p2, "gpt-4o", &[a]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert!((25..=30).contains(&retry_after(&reply)), "{:?}", reply.headers);
    assert_eq!(mock.chat_requests(), 3, "{:?}", models_seen(&mock));
    let stats = stats(&base(&gw)).await;
    assert_eq!(
        counters(&stats, &["upstream_429s", "cooldowns_active", "fallback_requests"]),
        json!({"upstream_429s": 1, "cooldowns_active": 1, "fallback_requests": 0})
    );
}

#[tokio::test]
async fn a_clients_own_key_429_walks_the_configured_chain_for_that_client_only() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "models:\n  - {name: alpha, fallbacks: [beta]}\n  - {name: beta}\n").await;
    let fail = [("x-mock-fail", "alpha=429:rate_limit_exceeded"), ("x-mock-retry-after", "30")];
    let reply = chat(&gw.url(CHAT), "alpha", &[("authorization", "Bearer sk-a"), fail[0], fail[1]]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["model"], "beta", "a configured fallback still serves the client");
    // Another key is not affected; the first key goes straight to its fallback.
    let reply = chat(&gw.url(CHAT), "alpha", &[("authorization", "Bearer sk-b")]).await;
    assert_eq!(reply.json()["model"], "alpha");
    let reply = chat(&gw.url(CHAT), "alpha", &[("authorization", "Bearer sk-a")]).await;
    assert_eq!(reply.json()["model"], "beta");
    assert_eq!(models_seen(&mock), ["alpha", "beta", "alpha", "beta"]);
    assert_eq!(keys_seen(&mock), ["Bearer sk-a", "Bearer sk-a", "Bearer sk-b", "Bearer sk-a"]);
}

/// URL-safe base64, padded.
fn b64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
        out.extend(std::iter::repeat_n('=', 3 - chunk.len()));
    }
    out
}

#[tokio::test]
async fn a_429_at_a_client_chosen_base_url_is_that_endpoints_alone() {
    let configured = mock().await;
    let chosen = mock().await;
    // The configured upstream has a server-side key; it is never sent to the chosen host.
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: openai, api_key_env: MOCK_KEY}}\nencoded_base_url: {{allow: [\"{}\"]}}\n",
        configured.url(),
        chosen.url()
    );
    let gw = TestGateway::start(&yaml, &[("MOCK_KEY", "sk-server")]).await;
    let ids = "/rollout_id/r1/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1";
    let own_endpoint = gw.url(&format!("/v1{ids}/encoded_base_url/{}/chat/completions", b64(&chosen.url())));
    let fail = [("x-mock-fail", "gpt-4o=429:rate_limit_exceeded"), ("x-mock-retry-after", "30")];
    let reply = chat(&own_endpoint, "gpt-4o", &fail).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert_eq!(reply.json(), mock_429_body("gpt-4o"));
    assert_eq!(reply.headers["retry-after"], "30");
    assert_eq!(models_seen(&chosen), ["gpt-4o"]);

    // The configured upstream, right after: served, with the same model.
    let reply = chat(&gw.url(CHAT), "gpt-4o", &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(models_seen(&configured), ["gpt-4o"]);
    assert_eq!(keys_seen(&configured), ["Bearer sk-server"]);
    // Another client at the same host with its own key is another scope.
    let reply = chat(&own_endpoint, "gpt-4o", &[("authorization", "Bearer sk-client-b")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(models_seen(&chosen), ["gpt-4o", "gpt-4o"]);
    assert_eq!(keys_seen(&chosen), ["-", "Bearer sk-client-b"]);
    // The endpoint that earned the 429, with the same (no) credentials: cooling down.
    let reply = chat(&own_endpoint, "gpt-4o", &[]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    assert_eq!(chosen.chat_requests(), 2);
}

#[tokio::test]
async fn a_server_key_429_cools_the_model_down_for_every_client_across_gateways() {
    let mock = mock().await;
    let redis = RedisServer::start();
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: openai, api_key_env: MOCK_KEY}}\n{}models:\n  - {{name: alpha, fallbacks: [beta]}}\n  - {{name: beta}}\n",
        mock.url(),
        redis_yaml(&redis)
    );
    let env = [("MOCK_KEY", "sk-server")];
    let (one, two) = (TestGateway::start(&yaml, &env).await, TestGateway::start(&yaml, &env).await);
    // The client's own header is replaced by the server-side key: the 429 is the gateway's.
    let fail = [("x-mock-fail", "alpha=429:rate_limit_exceeded"), ("x-mock-retry-after", "30")];
    let reply = chat(&one.url(CHAT), "alpha", &[("authorization", "Bearer sk-a"), fail[0], fail[1]]).await;
    assert_eq!(reply.json()["model"], "beta");
    for key in ["Bearer sk-b", "Bearer sk-c"] {
        let reply = chat(&two.url(CHAT), "alpha", &[("authorization", key)]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["model"], "beta");
    }
    assert_eq!(models_seen(&mock), ["alpha", "beta", "beta", "beta"]);
    assert!(keys_seen(&mock).iter().all(|k| k == "Bearer sk-server"), "{:?}", keys_seen(&mock));
}

#[tokio::test]
async fn a_clients_own_key_cooldown_follows_it_across_gateways_on_one_redis() {
    let mock = mock().await;
    let redis = RedisServer::start();
    let yaml = redis_yaml(&redis);
    let (one, two) = (TestGateway::in_front_of(&mock, &yaml).await, TestGateway::in_front_of(&mock, &yaml).await);
    let fail = [("x-mock-fail", "gpt-4o=429:rate_limit_exceeded"), ("x-mock-retry-after", "30")];
    let reply = chat(&one.url(CHAT), "gpt-4o", &[("authorization", "Bearer sk-a"), fail[0], fail[1]]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json(), mock_429_body("gpt-4o"));
    let reply = chat(&two.url(CHAT), "gpt-4o", &[("authorization", "Bearer sk-a")]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
    let reply = chat(&two.url(CHAT), "gpt-4o", &[("authorization", "Bearer sk-b")]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(models_seen(&mock), ["gpt-4o", "gpt-4o"]);
    assert_eq!(keys_seen(&mock), ["Bearer sk-a", "Bearer sk-b"]);
    // Nothing in Redis names the key itself.
    let mut conn = redis::Client::open(redis.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await.unwrap();
    assert!(keys.iter().any(|k| k.contains(":cool")), "{keys:?}");
    assert!(keys.iter().all(|k| !k.contains("sk-a")), "{keys:?}");
}

// === the built-in catalogue never reroutes (issue 15) ===

#[tokio::test]
async fn without_models_a_429_never_moves_gpt_4o_to_another_model() {
    let mock = mock().await;
    let gw = TestGateway::in_front_of(&mock, "").await;
    for model in ["gpt-4o", "gpt-4o-mini", "o1-mini", "gpt-3.5-turbo"] {
        let fail = format!("{model}=429:rate_limit_exceeded");
        let reply = chat(&gw.url(CHAT), model, &[("x-mock-fail", &fail), ("x-mock-retry-after", "30")]).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{model}: {}", reply.text());
    }
    assert_eq!(models_seen(&mock), ["gpt-4o", "gpt-4o-mini", "o1-mini", "gpt-3.5-turbo"]);
}
