//! Leases against a real redis-server: two and three replicas share one budget within the
//! stated bound (never more than the limit within the window the leases were taken in; at most
//! limit + replicas × slice over any window), a replica that dies returns nothing and the bound
//! still holds, and released leases go back to the others.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use llmgate_core::catalog::Limits;
use llmgate_rate_limit_fallback::{Decision, LeasedRateStore, LimitKind, RateStore, RedisRateStore};
use llmgate_test_support::redis::RedisServer;
use redis::aio::ConnectionManager;
use tokio::time::Instant;

use crate::redis::manager;

const RPM_50: Limits = Limits { rpm: Some(50), tpm: Some(1_000_000), rpd: Some(10_000) };

async fn replica(server: &RedisServer, slice: f64) -> Arc<LeasedRateStore<ConnectionManager>> {
    Arc::new(LeasedRateStore::new(RedisRateStore::new(manager(&server.url()).await)).slice(slice))
}

/// `per_replica` concurrent checks on each replica; how many each allowed.
async fn hammer(replicas: &[Arc<LeasedRateStore<ConnectionManager>>], model: &str, per_replica: usize) -> Vec<usize> {
    let tasks: Vec<Vec<_>> = replicas
        .iter()
        .map(|store| {
            (0..per_replica)
                .map(|_| {
                    let (store, model) = (store.clone(), model.to_owned());
                    tokio::spawn(async move { store.check(&model, &RPM_50, 10).await.is_allowed() })
                })
                .collect()
        })
        .collect();
    let mut allowed = Vec::new();
    for replica in tasks {
        let mut n = 0;
        for task in replica {
            n += usize::from(task.await.unwrap());
        }
        allowed.push(n);
    }
    allowed
}

/// Within one window: never more than the limit; fewer by at most what the replicas may still
/// hold (a slice each).
async fn share_one_budget(n: usize, slice: f64, slice_requests: usize) {
    let server = RedisServer::start();
    let mut replicas = Vec::new();
    for _ in 0..n {
        replicas.push(replica(&server, slice).await);
    }
    let allowed: usize = hammer(&replicas, "m", 100).await.iter().sum();
    assert!(allowed <= 50, "{n} replicas admitted {allowed} > rpm 50");
    assert!(allowed + n * slice_requests >= 50, "{n} replicas admitted only {allowed}");
    for store in &replicas {
        assert_eq!(store.health().errors, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_budget_within_the_bound() {
    share_one_budget(2, 0.05, 2).await;
    share_one_budget(2, 0.2, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_share_one_budget_within_the_bound() {
    share_one_budget(3, 0.05, 2).await;
    share_one_budget(3, 0.2, 10).await;
}

/// A replica that takes a lease of 10, admits one and dies never hands the other 9 back: the
/// others get what Redis has left (40), and all together stay within the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_dies_returns_nothing_and_the_bound_holds() {
    let server = RedisServer::start();
    let dying = replica(&server, 0.2).await;
    assert_eq!(dying.check("m", &RPM_50, 10).await, Decision::Allowed);
    drop(dying);
    let (a, b) = (replica(&server, 0.2).await, replica(&server, 0.2).await);
    let allowed: usize = hammer(&[a, b], "m", 100).await.iter().sum();
    assert!(allowed <= 40, "the survivors admitted {allowed}, more than the 40 Redis had left");
    assert!(allowed + 2 * 10 >= 40, "the survivors admitted only {allowed}");
}

/// What a replica holds goes back on release: the next replica gets all that is left.
#[tokio::test]
async fn released_leases_go_back_to_the_others() {
    for release in [false, true] {
        let server = RedisServer::start();
        let first = replica(&server, 0.2).await;
        assert_eq!(first.check("m", &RPM_50, 10).await, Decision::Allowed);
        let conn = manager(&server.url()).await;
        let rpd = || async {
            let count: u64 =
                redis::cmd("HGET").arg("llmgate:rl:{m}:rpd").arg("count").query_async(&mut conn.clone()).await.unwrap();
            count
        };
        assert_eq!(rpd().await, 10, "a lease of 10 requests counts for the day");
        if release {
            first.release().await;
            // Only the request admitted is left on the day's count.
            assert_eq!(rpd().await, 1);
        }
        // One after the other: the second replica admits until Redis and its lease are empty.
        let second = replica(&server, 0.2).await;
        let mut allowed = 0;
        while second.check("m", &RPM_50, 10).await.is_allowed() {
            allowed += 1;
        }
        assert_eq!(allowed, if release { 49 } else { 40 }, "released: {release}");
    }
}

/// Three replicas checking without pause across several short windows: over every window the
/// admitted requests stay within limit + replicas × slice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_any_window_three_replicas_stay_within_limit_plus_their_slices() {
    const WINDOW: Duration = Duration::from_millis(500);
    const RPM: u64 = 20;
    const SLICE: usize = 4; // 20 % of 20
    let server = RedisServer::start();
    let limits = Limits { rpm: Some(RPM), tpm: None, rpd: None };
    let admitted = Arc::new(Mutex::new(Vec::new()));
    let until = Instant::now() + WINDOW * 4;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let redis = RedisRateStore::new(manager(&server.url()).await).window(WINDOW);
        let store = Arc::new(LeasedRateStore::new(redis).slice(0.2).cooldown_refresh(Duration::from_millis(20)));
        for _ in 0..4 {
            let (store, admitted) = (store.clone(), admitted.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    if store.check("m", &limits, 1).await.is_allowed() {
                        admitted.lock().unwrap().push(Instant::now());
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut times = admitted.lock().unwrap().clone();
    times.sort();
    assert!(times.len() as u64 > RPM * 2, "too few admitted to test anything: {}", times.len());
    let bound = RPM as usize + 3 * SLICE;
    for (i, start) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|t| **t < *start + WINDOW).count();
        assert!(in_window <= bound, "{in_window} admitted within one window from {i}: bound {bound}");
    }
}

/// A cooldown another replica starts reaches a replica that holds a whole budget's lease once
/// its copy is read again (`cooldown_refresh`), long before the lease runs out; the replica that
/// started it refuses at once.
#[tokio::test]
async fn a_cooldown_reaches_a_replica_that_holds_a_lease() {
    let server = RedisServer::start();
    let redis = RedisRateStore::new(manager(&server.url()).await);
    let holder = LeasedRateStore::new(redis).slice(1.0).cooldown_refresh(Duration::from_millis(50));
    assert_eq!(holder.check("m", &RPM_50, 10).await, Decision::Allowed, "the holder now has 49 in hand");
    let other = replica(&server, 0.2).await;
    other.cool_down("m", Duration::from_secs(30)).await;
    assert!(matches!(other.check("m", &RPM_50, 10).await, Decision::Limited { limited_by: LimitKind::Cooldown, .. }));
    let mut spent = 0;
    loop {
        match holder.check("m", &RPM_50, 10).await {
            Decision::Allowed => spent += 1,
            Decision::Limited { limited_by, .. } => {
                assert_eq!(limited_by, LimitKind::Cooldown);
                break;
            }
        }
        assert!(spent < 49, "the lease ran out before the cooldown was read");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A lease is one entry of the rpm log whatever its size, with the log's sum beside it: a
/// generous limit costs Redis no more than a small one.
#[tokio::test]
async fn a_lease_is_one_rpm_log_entry_whatever_its_size() {
    let server = RedisServer::start();
    let store = replica(&server, 0.05).await;
    let generous = Limits { rpm: Some(1_000_000_000), tpm: None, rpd: None };
    assert_eq!(store.check("m", &generous, 1).await, Decision::Allowed);
    let mut conn = manager(&server.url()).await;
    let entries: Vec<String> =
        redis::cmd("ZRANGE").arg("llmgate:rl:{m}:rpm").arg(0).arg(-1).query_async(&mut conn).await.unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].starts_with("50000000:"), "{entries:?}");
    let sum: u64 = redis::cmd("GET").arg("llmgate:rl:{m}:rpm:sum").query_async(&mut conn).await.unwrap();
    assert_eq!(sum, 50_000_000);
}

/// Exact mode's per-request checks and leases count in one rpm log: an exact store admits what
/// a lease left, and its retry-after is when the oldest grant leaves the window.
#[tokio::test]
async fn exact_checks_and_leases_share_one_rpm_log() {
    let server = RedisServer::start();
    let window = Duration::from_secs(3);
    let limits = Limits { rpm: Some(50), tpm: None, rpd: None };
    let exact = RedisRateStore::new(manager(&server.url()).await).window(window);
    assert_eq!(exact.check("m", &limits, 1).await, Decision::Allowed);
    let leased = LeasedRateStore::new(RedisRateStore::new(manager(&server.url()).await).window(window)).slice(0.2);
    assert_eq!(leased.check("m", &limits, 1).await, Decision::Allowed, "a lease of 10 taken");
    let mut allowed = 0;
    while exact.check("m", &limits, 1).await.is_allowed() {
        allowed += 1;
    }
    assert_eq!(allowed, 39, "50 - 1 exact - 10 leased");
    match exact.check("m", &limits, 1).await {
        Decision::Limited { limited_by: LimitKind::Rpm, retry_after } => {
            assert!(retry_after <= window && retry_after > window / 2, "{retry_after:?}")
        }
        other => panic!("{other:?}"),
    }
    // The lease's 9 unused requests go back on release and free 9 places.
    leased.release().await;
    let mut freed = 0;
    while exact.check("m", &limits, 1).await.is_allowed() {
        freed += 1;
    }
    assert_eq!(freed, 9);
}

/// The log's sum is rebuilt from its entries when it is missing (evicted, or a log written by an
/// older release that kept none), so counting never starts from zero on a full log.
#[tokio::test]
async fn a_missing_rpm_sum_is_rebuilt_from_the_entries() {
    let server = RedisServer::start();
    let limits = Limits { rpm: Some(20), tpm: None, rpd: None };
    let leased = replica(&server, 0.5).await;
    assert_eq!(leased.check("m", &limits, 1).await, Decision::Allowed, "a lease of 10 taken");
    assert_eq!(server.command(&["DEL", "llmgate:rl:{m}:rpm:sum"]).as_deref(), Some(":1"));
    // An entry in the old format (one request, no count) counts one.
    assert_eq!(server.command(&["ZADD", "llmgate:rl:{m}:rpm", "99999999999999", "old-member"]).as_deref(), Some(":1"));
    let exact = RedisRateStore::new(manager(&server.url()).await);
    let mut allowed = 0;
    while exact.check("m", &limits, 1).await.is_allowed() {
        allowed += 1;
    }
    assert_eq!(allowed, 9, "20 - 10 leased - 1 old entry");
}

/// TPM corrections are settled in the lease without a Redis call, and reach the shared bucket
/// when the lease goes back: the bucket then holds what was really used.
#[tokio::test]
async fn tpm_corrections_are_settled_in_the_lease_and_reach_redis_with_it() {
    let server = RedisServer::start();
    // A long window: the bucket's refill during the test is a few tokens.
    let redis = || async { RedisRateStore::new(manager(&server.url()).await).window(Duration::from_secs(3600)) };
    let limits = Limits { rpm: None, tpm: Some(1_000), rpd: None };
    let replica = LeasedRateStore::new(redis().await).slice(1.0);
    // The lease takes the whole bucket; the request is estimated at 100 tokens and used 10.
    assert_eq!(replica.check("m", &limits, 100).await, Decision::Allowed);
    replica.correct_tokens("m", &limits, 100, 10).await;
    // Another request estimated at 800 fits in what the lease still holds (990).
    assert_eq!(replica.check("m", &limits, 800).await, Decision::Allowed);
    replica.correct_tokens("m", &limits, 800, 900).await;
    replica.release().await;
    // 10 + 900 used: 90 left in the shared bucket.
    let exact = redis().await;
    assert_eq!(exact.check("m", &limits, 90).await, Decision::Allowed);
    assert!(!exact.check("m", &limits, 20).await.is_allowed());
}
