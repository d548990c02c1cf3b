//! One behaviour suite, run against every `RateStore`.

use std::{sync::Arc, time::Duration};

use llmgate_core::catalog::Limits;
use llmgate_rate_limit_fallback::{Cooldowns, Decision, LimitKind, MemoryRateStore, RateStore};

fn limits(rpm: Option<u64>, tpm: Option<u64>, rpd: Option<u64>) -> Limits {
    Limits { rpm, tpm, rpd }
}

fn refused(decision: Decision) -> (LimitKind, Duration) {
    match decision {
        Decision::Limited { limited_by, retry_after } => (limited_by, retry_after),
        Decision::Allowed => panic!("expected a refusal"),
    }
}

/// Runs every behaviour on `store`; model names are prefixed with `ns` so that suites sharing a
/// Redis do not meet. `window` is the store's rpm/tpm window; `sleep` waits (paused or real).
pub(crate) async fn run(store: Arc<dyn RateStore>, ns: &str, window: Duration) {
    let m = |name: &str| format!("{ns}/{name}");

    // rpm: exactly `rpm` allowed, then refused with a wait within the window.
    let l = limits(Some(3), None, None);
    for _ in 0..3 {
        assert_eq!(store.check(&m("rpm"), &l, 1).await, Decision::Allowed);
    }
    let (kind, wait) = refused(store.check(&m("rpm"), &l, 1).await);
    assert_eq!(kind, LimitKind::Rpm);
    assert!(wait > Duration::ZERO && wait <= window, "rpm wait {wait:?}");

    // Zero means zero.
    let (kind, _) = refused(store.check(&m("zero"), &limits(Some(0), None, None), 1).await);
    assert_eq!(kind, LimitKind::Rpm);

    // tpm: the estimate is reserved; a refused check consumes nothing (not even rpm).
    let l = limits(Some(2), Some(100), None);
    assert_eq!(store.check(&m("tpm"), &l, 80).await, Decision::Allowed);
    let (kind, wait) = refused(store.check(&m("tpm"), &l, 80).await);
    assert_eq!(kind, LimitKind::Tpm);
    assert!(wait > Duration::ZERO && wait <= window, "tpm wait {wait:?}");
    assert_eq!(store.check(&m("tpm"), &l, 10).await, Decision::Allowed, "the refused check took rpm");
    let (kind, _) = refused(store.check(&m("tpm"), &l, 1).await);
    assert_eq!(kind, LimitKind::Rpm);

    // tpm correction gives back what the estimate over-reserved.
    let l = limits(None, Some(100), None);
    assert_eq!(store.check(&m("correct"), &l, 90).await, Decision::Allowed);
    assert!(!store.check(&m("correct"), &l, 80).await.is_allowed());
    store.correct_tokens(&m("correct"), &l, 90, 10).await;
    assert_eq!(store.check(&m("correct"), &l, 80).await, Decision::Allowed);
    // ... and takes what it under-reserved.
    store.correct_tokens(&m("correct"), &l, 80, 100).await;
    assert!(!store.check(&m("correct"), &l, 50).await.is_allowed());

    // rpd: refused until the daily boundary.
    let l = limits(None, None, Some(2));
    for _ in 0..2 {
        assert_eq!(store.check(&m("rpd"), &l, 1).await, Decision::Allowed);
    }
    let (kind, wait) = refused(store.check(&m("rpd"), &l, 1).await);
    assert_eq!(kind, LimitKind::Rpd);
    let reset = store.until_daily_reset();
    let diff = wait.abs_diff(reset);
    assert!(diff < Duration::from_secs(5), "rpd wait {wait:?} vs reset {reset:?}");

    // The longest wait names the limit when several refuse.
    let l = limits(Some(1), None, Some(1));
    assert_eq!(store.check(&m("both"), &l, 1).await, Decision::Allowed);
    let (kind, _) = refused(store.check(&m("both"), &l, 1).await);
    assert_eq!(kind, LimitKind::Rpd);

    // Unlimited never blocks, whatever the estimate.
    let unlimited = Limits::default();
    for _ in 0..500 {
        assert_eq!(store.check(&m("free"), &unlimited, 10_000_000).await, Decision::Allowed);
    }

    // Cooldowns refuse with their own reason, only for that model, and never get shorter.
    store.cool_down(&m("cool"), Duration::from_secs(30)).await;
    store.cool_down(&m("cool"), Duration::from_secs(1)).await;
    let (kind, wait) = refused(store.check(&m("cool"), &unlimited, 1).await);
    assert_eq!(kind, LimitKind::Cooldown);
    assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "cooldown {wait:?}");
    assert_eq!(store.check(&m("warm"), &unlimited, 1).await, Decision::Allowed);

    // A client scope's cooldown refuses only the checks naming that scope, on that model.
    store.cool_down_scope(&m("scoped"), "aaaa", Duration::from_secs(30)).await;
    store.cool_down_scope(&m("scoped"), "aaaa", Duration::from_secs(1)).await;
    assert_eq!(store.check(&m("scoped"), &unlimited, 1).await, Decision::Allowed);
    let other = Cooldowns::SharedAndScope("bbbb");
    assert_eq!(store.check_with(&m("scoped"), other, &unlimited, 1).await, Decision::Allowed);
    for cooldowns in [Cooldowns::SharedAndScope("aaaa"), Cooldowns::Scope("aaaa")] {
        let (kind, wait) = refused(store.check_with(&m("scoped"), cooldowns, &unlimited, 1).await);
        assert_eq!(kind, LimitKind::Cooldown, "{cooldowns:?}");
        assert!(wait > Duration::from_secs(25) && wait <= Duration::from_secs(30), "scoped cooldown {wait:?}");
    }
    assert_eq!(store.check_with(&m("warm"), Cooldowns::Scope("aaaa"), &unlimited, 1).await, Decision::Allowed);
    // The shared cooldown applies unless the check names only a scope (a client's own endpoint).
    let (kind, _) = refused(store.check_with(&m("cool"), Cooldowns::SharedAndScope("bbbb"), &unlimited, 1).await);
    assert_eq!(kind, LimitKind::Cooldown);
    assert_eq!(store.check_with(&m("cool"), Cooldowns::Scope("bbbb"), &unlimited, 1).await, Decision::Allowed);
    // Both apply: the later end counts.
    store.cool_down_scope(&m("cool"), "cccc", Duration::from_secs(60)).await;
    let (_, wait) = refused(store.check_with(&m("cool"), Cooldowns::SharedAndScope("cccc"), &unlimited, 1).await);
    assert!(wait > Duration::from_secs(55), "{wait:?}");

    // The window slides: after it, rpm and tpm are back.
    let l = limits(Some(1), Some(10), None);
    assert_eq!(store.check(&m("slide"), &l, 10).await, Decision::Allowed);
    assert!(!store.check(&m("slide"), &l, 10).await.is_allowed());
    tokio::time::sleep(window + window / 4).await;
    assert_eq!(store.check(&m("slide"), &l, 10).await, Decision::Allowed);
}

#[tokio::test(start_paused = true)]
async fn memory_store_passes_the_suite() {
    run(Arc::new(MemoryRateStore::new()), "mem", Duration::from_secs(60)).await;
}

#[tokio::test(start_paused = true)]
async fn memory_rpd_resets_at_the_configured_boundary() {
    use llmgate_rate_limit_fallback::TokioClock;
    let midnight = Duration::from_secs(20_000 * 86_400);
    let seven = Duration::from_secs(7 * 3600);
    // 10 s before 07:00 UTC, with days starting at 07:00.
    let clock = Arc::new(TokioClock::starting_at(midnight + seven - Duration::from_secs(10)));
    let store = MemoryRateStore::with_clock(clock).day_boundary(seven);
    let l = limits(None, None, Some(1));
    assert_eq!(store.check("m", &l, 1).await, Decision::Allowed);
    let (kind, wait) = refused(store.check("m", &l, 1).await);
    assert_eq!((kind, wait), (LimitKind::Rpd, Duration::from_secs(10)));
    assert_eq!(store.until_daily_reset(), Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(store.check("m", &l, 1).await, Decision::Allowed);
    assert!(!store.check("m", &l, 1).await.is_allowed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_is_exact_under_concurrency() {
    let store = Arc::new(MemoryRateStore::new());
    let l = limits(Some(50), None, None);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.check("m", &l, 1).await.is_allowed() })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += usize::from(task.await.unwrap());
    }
    assert_eq!(allowed, 50);
}
