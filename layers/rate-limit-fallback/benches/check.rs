//! Cost of one budget check per request: in-process, in Redis (one EVALSHA round trip to a
//! real redis-server on loopback, started by test-support), and on a lease of that Redis budget
//! (a script call per lease, made in the background, and at least once per cooldown refresh).

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use llmgate_core::catalog::Limits;
use llmgate_rate_limit_fallback::{LeasedRateStore, MemoryRateStore, RateStore, RedisRateStore};
use llmgate_test_support::redis::RedisServer;

// Limits high enough that every check is allowed and consumes all three budgets.
const LIMITS: Limits = Limits { rpm: Some(u64::MAX / 4), tpm: Some(u64::MAX / 4), rpd: Some(u64::MAX / 4) };

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    // The rpm log of the memory store grows with the limit, so use a short window there.
    let memory: Arc<dyn RateStore> = Arc::new(MemoryRateStore::new().window(Duration::from_millis(100)));
    c.bench_function("check/memory", |b| {
        b.to_async(&runtime).iter(|| async { black_box(memory.check("openai/gpt-4o-mini", &LIMITS, 100).await) })
    });

    let server = RedisServer::start();
    let conn =
        runtime.block_on(async { redis::Client::open(server.url()).unwrap().get_connection_manager().await.unwrap() });
    let redis: Arc<dyn RateStore> = Arc::new(RedisRateStore::new(conn.clone()).window(Duration::from_millis(100)));
    c.bench_function("check/redis", |b| {
        b.to_async(&runtime).iter(|| async { black_box(redis.check("openai/gpt-4o-mini", &LIMITS, 100).await) })
    });

    let leased: Arc<dyn RateStore> =
        Arc::new(LeasedRateStore::new(RedisRateStore::new(conn).window(Duration::from_millis(100))));
    c.bench_function("check/redis-lease", |b| {
        b.to_async(&runtime).iter(|| async { black_box(leased.check("openai/gpt-4o-mini", &LIMITS, 100).await) })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
