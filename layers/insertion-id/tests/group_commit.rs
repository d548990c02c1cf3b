//! Group commit against a real redis-server: records that come due while a write is under way
//! share the next write, each completion still waits for its own record, and a failed group
//! write is retried until every id is stored.

use std::{
    collections::BTreeSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::future::join_all;
use http::{Request, Response};
use http_body_util::BodyExt;
use llmgate_core::{
    BoxError, GatewayBody, body,
    ext::{RolloutIds, RouteKind, RouteMeta},
};
use llmgate_insertion_id::{Insertion, InsertionIdLayer, InsertionStore, RedisStore, StoreFuture};
use llmgate_test_support::redis::RedisServer;
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tower::{Layer, ServiceExt, service_fn};

fn request(rollout_id: &str) -> Request<GatewayBody> {
    let mut req = Request::post("/chat/completions").body(body::full("{}")).unwrap();
    req.extensions_mut().insert(RouteMeta {
        kind: RouteKind::ChatCompletions,
        project: None,
        rollout: Some(RolloutIds {
            rollout_id: rollout_id.into(),
            invocation_id: "inv".into(),
            experiment_id: "exp".into(),
            run_id: "run".into(),
            row_id: "row".into(),
        }),
        encoded_base_url: None,
    });
    req
}

/// A `RedisStore` that notes the size of every write; the first write waits until the test
/// opens the gate, and the first `failures` writes fail without reaching Redis.
struct Observed {
    redis: RedisStore<ConnectionManager>,
    gate: watch::Sender<bool>,
    failures: AtomicUsize,
    writes: Mutex<Vec<usize>>,
    calls: watch::Sender<usize>,
}

impl Observed {
    fn new(redis: RedisStore<ConnectionManager>, gated: bool, failures: usize) -> Arc<Self> {
        Arc::new(Self {
            redis,
            gate: watch::channel(!gated).0,
            failures: AtomicUsize::new(failures),
            writes: Mutex::default(),
            calls: watch::channel(0).0,
        })
    }

    fn writes(&self) -> Vec<usize> {
        self.writes.lock().unwrap().clone()
    }
}

impl InsertionStore for Observed {
    fn record_all<'a>(&'a self, insertions: &'a [Insertion]) -> StoreFuture<'a, ()> {
        self.writes.lock().unwrap().push(insertions.len());
        let first = *self.calls.borrow() == 0;
        self.calls.send_modify(|calls| *calls += 1);
        let mut gate = self.gate.subscribe();
        Box::pin(async move {
            if first {
                gate.wait_for(|open| *open).await?;
            }
            if self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err("connection reset by peer".into());
            }
            self.redis.record_all(insertions).await
        })
    }

    fn members<'a>(&'a self, rollout_id: &'a str) -> StoreFuture<'a, Vec<String>> {
        self.redis.members(rollout_id)
    }
}

async fn upstream(_req: Request<GatewayBody>) -> Result<Response<GatewayBody>, BoxError> {
    let mut response = Response::new(body::full(r#"{"choices":[]}"#));
    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    Ok(response)
}

/// A Redis server, a store on it whose first write waits at the gate, and a layer that waits
/// for its records as long as the test needs.
fn gated_store() -> (RedisServer, Arc<Observed>, InsertionIdLayer) {
    let server = RedisServer::start();
    let store = Observed::new(RedisStore::single_node(server.url()).unwrap(), true, 0);
    let layer = InsertionIdLayer::new(store.clone()).record_timeout(Duration::from_secs(3600));
    (server, store, layer)
}

/// Sends one rollout completion through `layer` and reads it whole; its insertion id.
/// `started` counts the completions that began: in the same poll, a completion runs from there
/// to handing its record to the writer.
async fn complete(layer: InsertionIdLayer, rollout_id: String, started: Arc<AtomicUsize>) -> String {
    started.fetch_add(1, Ordering::SeqCst);
    let response = layer.layer(service_fn(upstream)).oneshot(request(&rollout_id)).await.unwrap();
    let id = response.headers()["x-insertion-id"].to_str().unwrap().to_owned();
    response.into_body().collect().await.unwrap();
    id
}

async fn stored(store: &Observed, rollouts: &[String]) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for rollout in rollouts {
        all.extend(store.members(rollout).await.unwrap());
    }
    all
}

/// One write is under way (held at the gate) while 99 more completions come due: those 99 are
/// written together by the next write, one `SADD` per rollout, and none of them reaches its
/// client before that write is done.
///
/// A current-thread runtime makes the order exact: a spawned completion runs, without pausing,
/// from its start to handing its record to the writer. (`spawn_local`: rustc cannot prove the
/// completion's future `Send` through the boxed body's `dyn Error`.)
#[tokio::test]
async fn records_due_during_a_write_share_the_next_one() {
    tokio::task::LocalSet::new().run_until(share_the_next_write()).await;
}

async fn share_the_next_write() {
    let (_server, store, layer) = gated_store();
    let rollouts: Vec<String> = (0..4).map(|i| format!("group-{i}")).collect();
    let started = Arc::new(AtomicUsize::new(0));

    let first = tokio::task::spawn_local(complete(layer.clone(), rollouts[0].clone(), started.clone()));
    store.calls.subscribe().wait_for(|calls| *calls == 1).await.unwrap();
    let rest: Vec<_> = (0..99)
        .map(|i| {
            tokio::task::spawn_local(complete(layer.clone(), rollouts[i % rollouts.len()].clone(), started.clone()))
        })
        .collect();
    while started.load(Ordering::SeqCst) < 100 {
        tokio::task::yield_now().await;
    }
    // Every completion waits for its record: no client has its last byte, nothing is stored.
    assert!(!first.is_finished() && rest.iter().all(|task| !task.is_finished()));
    assert!(stored(&store, &rollouts).await.is_empty());
    assert_eq!(store.writes(), [1]);

    store.gate.send_replace(true);
    let mut ids = BTreeSet::from([first.await.unwrap()]);
    for task in rest {
        ids.insert(task.await.unwrap());
    }
    assert_eq!(ids.len(), 100);
    assert_eq!(stored(&store, &rollouts).await, ids);
    assert_eq!(store.writes(), [1, 99]);
    let counters = layer.counters().snapshot();
    assert_eq!((counters.recorded, counters.writes, counters.failed, counters.retried), (100, 2, 0, 0));
}

/// When a write returns with records waiting, the writer lets the tasks that are ready run
/// before it takes the next group: a completion that becomes ready as the write returns (here:
/// the one waiting for the first completion to finish) joins the record that waited, instead
/// of following it in a write of its own. With nothing waiting, the next record is written at
/// once (the first write here).
#[tokio::test]
async fn records_ready_when_a_write_returns_join_the_waiting_ones() {
    tokio::task::LocalSet::new().run_until(join_the_waiting_ones()).await;
}

async fn join_the_waiting_ones() {
    let (_server, store, layer) = gated_store();
    let rollouts = ["ready-0".to_owned()];
    let started = Arc::new(AtomicUsize::new(0));

    let first = tokio::task::spawn_local(complete(layer.clone(), rollouts[0].clone(), started.clone()));
    store.calls.subscribe().wait_for(|calls| *calls == 1).await.unwrap();
    let waiting = tokio::task::spawn_local(complete(layer.clone(), rollouts[0].clone(), started.clone()));
    let ready = tokio::task::spawn_local({
        let (layer, rollout, started) = (layer.clone(), rollouts[0].clone(), started.clone());
        async move {
            let first = first.await.unwrap();
            (first, complete(layer, rollout, started).await)
        }
    });
    while started.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    assert_eq!(store.writes(), [1]);

    store.gate.send_replace(true);
    let (first, ready) = ready.await.unwrap();
    let ids = BTreeSet::from([first, waiting.await.unwrap(), ready]);
    assert_eq!(ids.len(), 3);
    assert_eq!(stored(&store, &rollouts).await, ids);
    assert_eq!(store.writes(), [1, 2]);
}

/// Many concurrent completions on a multi-thread runtime, with the first writes failing: every
/// id ends up stored, the failed ones through the retry queue, none dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_group_writes_are_retried_until_every_id_is_stored() {
    let server = RedisServer::start();
    let store = Observed::new(RedisStore::single_node(server.url()).unwrap(), false, 3);
    let layer = InsertionIdLayer::new(store.clone())
        .record_timeout(Duration::from_secs(3600))
        .retry_backoff(Duration::from_millis(1), Duration::from_millis(10));
    let rollouts: Vec<String> = (0..8).map(|i| format!("retry-{i}")).collect();
    let started = Arc::new(AtomicUsize::new(0));
    let completions = (0..200).map(|i| complete(layer.clone(), rollouts[i % rollouts.len()].clone(), started.clone()));
    let ids: BTreeSet<String> = join_all(completions).await.into_iter().collect();
    assert!(layer.flush(tokio::time::Instant::now() + Duration::from_secs(3600)).await);
    assert_eq!(stored(&store, &rollouts).await, ids);
    let counters = layer.counters().snapshot();
    assert_eq!((counters.recorded, counters.dropped, counters.pending), (200, 0, 0));
    assert!(counters.retried >= 1 && counters.failed >= 3, "{counters:?}");
    // Every write carried at least one id, and together they carried each id at least once.
    let writes = store.writes();
    assert!(writes.iter().all(|&n| n >= 1) && writes.iter().sum::<usize>() >= 200 + 3);
}
