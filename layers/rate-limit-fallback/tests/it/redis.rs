//! The Redis store: the shared suite, one budget across connections and on a Cluster, outages.

use std::{sync::Arc, time::Duration};

use llmgate_core::catalog::Limits;
use llmgate_rate_limit_fallback::{Decision, LimitKind, OutagePolicy, RateStore, RedisRateStore};
use llmgate_test_support::redis::{RedisCluster, RedisServer};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub(crate) async fn manager(url: &str) -> ConnectionManager {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)))
        .set_number_of_retries(1);
    redis::Client::open(url).unwrap().get_connection_manager_with_config(config).await.unwrap()
}

#[tokio::test]
async fn redis_store_passes_the_suite() {
    let server = RedisServer::start();
    // Long enough that refills between two checks cannot hide a refusal on a loaded machine.
    let window = Duration::from_millis(1500);
    let store = RedisRateStore::new(manager(&server.url()).await).window(window);
    crate::suite::run(Arc::new(store), "redis", window).await;
}

#[tokio::test]
async fn script_is_reloaded_after_script_flush() {
    let server = RedisServer::start();
    let store = RedisRateStore::new(manager(&server.url()).await);
    let l = Limits { rpm: Some(2), tpm: None, rpd: None };
    assert_eq!(store.check("m", &l, 1).await, Decision::Allowed);
    assert_eq!(server.command(&["SCRIPT", "FLUSH"]).as_deref(), Some("+OK"));
    assert_eq!(store.check("m", &l, 1).await, Decision::Allowed);
    assert!(!store.check("m", &l, 1).await.is_allowed());
    assert_eq!(store.health().errors, 0);
    // The keys are hash-tagged by model.
    assert_eq!(server.command(&["EXISTS", "llmgate:rl:{m}:rpm"]).as_deref(), Some(":1"));
}

/// 200 concurrent checks from two stores on two connections, rpm 50: exactly 50 pass.
async fn shared_budget<C>(a: RedisRateStore<C>, b: RedisRateStore<C>, model: &str)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    let (a, b) = (Arc::new(a), Arc::new(b));
    let l = Limits { rpm: Some(50), tpm: Some(1_000_000), rpd: Some(10_000) };
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store: Arc<dyn RateStore> = if i % 2 == 0 { a.clone() } else { b.clone() };
            let model = model.to_string();
            tokio::spawn(async move { store.check(&model, &l, 10).await })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Decision::Allowed => allowed += 1,
            Decision::Limited { limited_by, .. } => assert_eq!(limited_by, LimitKind::Rpm),
        }
    }
    assert_eq!(allowed, 50, "two stores together must not exceed rpm 50");
    assert_eq!(a.health().errors + b.health().errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_share_one_budget() {
    let server = RedisServer::start();
    let a = RedisRateStore::new(manager(&server.url()).await);
    let b = RedisRateStore::new(manager(&server.url()).await);
    shared_budget(a, b, "openai/gpt-4o-mini").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_stores_share_one_budget_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let connect =
        || async { redis::cluster::ClusterClient::new(cluster.urls()).unwrap().get_async_connection().await.unwrap() };
    let (ca, cb) = (connect().await, connect().await);
    // Several models, so the keys land on several nodes.
    for model in ["openai/gpt-4o-mini", "gemini/gemini-2.5-pro", "m3", "m4", "m5"] {
        shared_budget(RedisRateStore::new(ca.clone()), RedisRateStore::new(cb.clone()), model).await;
    }
}

async fn wait_for_recovery<C>(store: &RedisRateStore<C>, l: &Limits)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    for _ in 0..200 {
        store.check("probe", l, 1).await;
        if !store.health().in_outage {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the store did not recover after the restart");
}

#[tokio::test]
async fn redis_outage_fail_open_uses_divided_local_limits_and_is_counted() {
    let mut server = RedisServer::start();
    let store = RedisRateStore::new(manager(&server.url()).await).policy(OutagePolicy::FailOpen).replicas(2);
    let l = Limits { rpm: Some(4), tpm: None, rpd: None };
    assert_eq!(store.check("m", &l, 1).await, Decision::Allowed);
    assert_eq!(store.health().outages, 0);

    server.kill();
    // rpm 4 over 2 replicas: this process may use 2 per minute on its own.
    assert_eq!(store.check("m", &l, 1).await, Decision::Allowed);
    assert_eq!(store.check("m", &l, 1).await, Decision::Allowed);
    assert!(matches!(store.check("m", &l, 1).await, Decision::Limited { limited_by: LimitKind::Rpm, .. }));
    let health = store.health();
    assert!(health.in_outage);
    assert_eq!(health.outages, 1, "one outage, however many failed calls");
    assert!(health.errors >= 3);

    server.restart();
    wait_for_recovery(&store, &Limits::default()).await;
    assert_eq!(store.health().outages, 1);
    server.kill();
    store.check("m2", &l, 1).await;
    assert_eq!(store.health().outages, 2, "a new outage after recovery counts again");
}

#[tokio::test]
async fn redis_outage_fail_closed_refuses_and_is_counted() {
    let mut server = RedisServer::start();
    let store = RedisRateStore::new(manager(&server.url()).await).policy(OutagePolicy::FailClosed);
    let l = Limits::default();
    assert_eq!(store.check("m", &l, 1).await, Decision::Allowed);
    server.kill();
    for _ in 0..3 {
        let decision = store.check("m", &l, 1).await;
        assert!(matches!(decision, Decision::Limited { limited_by: LimitKind::Unavailable, .. }), "{decision:?}");
    }
    assert_eq!(store.health().outages, 1);
    assert!(store.health().errors >= 3);
    server.restart();
    wait_for_recovery(&store, &l).await;
    assert_eq!(store.check("m", &l, 1).await, Decision::Allowed);
}

/// Through the layer: Redis dies mid-run, `fail_closed` refuses with a 429 and the stats show it.
#[tokio::test]
async fn layer_applies_fail_closed_when_redis_dies() {
    use http::{Request, Response};
    use llmgate_core::{
        BoxError, DecodeJsonLayer, GatewayBody, GatewayError, body,
        catalog::{Catalog, ModelSpec},
    };
    use llmgate_rate_limit_fallback::RateLimitFallbackLayer;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    let mut server = RedisServer::start();
    let store = RedisRateStore::new(manager(&server.url()).await).policy(OutagePolicy::FailClosed);
    let catalog = Catalog::new([
        ModelSpec { name: "a".into(), fallbacks: vec!["b".into()], ..Default::default() },
        ModelSpec { name: "b".into(), ..Default::default() },
    ]);
    let layer = RateLimitFallbackLayer::new(Arc::new(catalog), Arc::new(store));
    let stats = layer.stats();
    let svc = ServiceBuilder::new()
        .layer(DecodeJsonLayer::new())
        .layer(layer)
        .service(service_fn(|_req: Request<GatewayBody>| async { Ok::<_, BoxError>(Response::new(body::full("{}"))) }));
    let chat = || Request::new(body::full(r#"{"model":"a","messages":[]}"#));
    assert!(svc.clone().oneshot(chat()).await.is_ok());

    server.kill();
    let error = svc.clone().oneshot(chat()).await.unwrap_err();
    let Some(GatewayError::RateLimited { tried, .. }) = GatewayError::find(&*error) else { panic!("{error}") };
    assert_eq!(tried, &["a", "b"]);
    let snap = stats.snapshot();
    assert_eq!(snap["store_outages"], 1);
    assert_eq!(snap["store_in_outage"], true);
    assert!(snap["store_errors"].as_u64().unwrap() >= 2);
}

/// Script calls Redis ran, by `INFO commandstats`.
async fn evalsha_calls(conn: &mut ConnectionManager) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(conn).await.unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// 200 tpm corrections made at once on two models are written as a few script calls (one per
/// model per batch), and every one of them is applied.
///
/// The 200 are polled in one pass (on a current-thread runtime nothing else runs meanwhile):
/// the first correction writes alone; the 199 others, made while it is under way, are summed
/// per model and written by its next round.
#[tokio::test]
async fn concurrent_tpm_corrections_are_batched_per_model_and_all_applied() {
    let server = RedisServer::start();
    // A long window: the refill during the test is a few tokens.
    let store = RedisRateStore::new(manager(&server.url()).await).window(Duration::from_secs(3600));
    let l = Limits { rpm: None, tpm: Some(10_000), rpd: None };
    for model in ["a", "b"] {
        assert_eq!(store.check(model, &l, 10_000).await, Decision::Allowed, "{model}: the bucket is now empty");
    }
    // Loads the correction script (a first `EVALSHA` answers `NOSCRIPT`).
    store.correct_tokens("warm-up", &l, 1, 2).await;
    let mut stats = manager(&server.url()).await;
    let before = evalsha_calls(&mut stats).await;
    // Each request estimated 100 tokens and used 50: 100 × 50 given back per model.
    let mut corrections: Vec<_> =
        (0..200).map(|i| store.correct_tokens(if i % 2 == 0 { "a" } else { "b" }, &l, 100, 50)).collect();
    std::future::poll_fn(|cx| {
        corrections.retain_mut(|correction| correction.as_mut().poll(cx).is_pending());
        if corrections.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    let calls = evalsha_calls(&mut stats).await - before;
    assert_eq!(calls, 3, "one alone, then one per model for the other 199");
    for model in ["a", "b"] {
        assert_eq!(store.check(model, &l, 5_000).await, Decision::Allowed, "{model}: 5,000 tokens given back");
        assert!(!store.check(model, &l, 1_000).await.is_allowed(), "{model}: and no more");
    }
    assert_eq!(store.health().errors, 0);
}
