//! One test suite, run against every `InsertionStore`: memory, a single redis-server, and a
//! 3-node Redis Cluster (real processes on ephemeral ports).

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use llmgate_insertion_id::{Insertion, InsertionStore, MemoryStore, RedisStore};
use llmgate_test_support::redis::{RedisCluster, RedisServer};
use redis::aio::ConnectionLike;

fn sorted(ids: Vec<String>) -> Vec<String> {
    ids.into_iter().collect::<BTreeSet<_>>().into_iter().collect()
}

/// The shared suite. `ns` keeps runs against one server apart.
async fn suite(store: Arc<dyn InsertionStore>, ns: &str) {
    let r1 = format!("{ns}rollout-1");
    let r2 = format!("{ns}rollout-2");

    // Unknown rollout: empty.
    assert!(store.members(&r1).await.unwrap().is_empty());

    // Records form a set: duplicates collapse, rollouts stay apart.
    store.record(&r1, "a").await.unwrap();
    store.record(&r1, "b").await.unwrap();
    store.record(&r1, "a").await.unwrap();
    store.record(&r2, "c").await.unwrap();
    assert_eq!(sorted(store.members(&r1).await.unwrap()), ["a", "b"]);
    assert_eq!(store.members(&r2).await.unwrap(), ["c"]);

    // Rollout ids are opaque strings (colons, spaces, unicode).
    let odd = format!("{ns}weird:id with space/é");
    store.record(&odd, "x").await.unwrap();
    assert_eq!(store.members(&odd).await.unwrap(), ["x"]);

    // Concurrent records on one rollout all land.
    let r3 = format!("{ns}rollout-3");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = store.clone();
            let r3 = r3.clone();
            tokio::spawn(async move { store.record(&r3, &format!("id-{i:02}")).await.unwrap() })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let expected: Vec<String> = (0..50).map(|i| format!("id-{i:02}")).collect();
    assert_eq!(sorted(store.members(&r3).await.unwrap()), expected);

    // One write of many ids over many rollouts (on a cluster: keys in many hash slots).
    let batch: Vec<Insertion> = (0..60)
        .map(|i| Insertion {
            rollout_id: Arc::from(format!("{ns}batch-{}", i % 20)),
            insertion_id: Arc::from(format!("id-{i:02}")),
        })
        .collect();
    store.record_all(&batch).await.unwrap();
    for r in 0..20 {
        let expected: Vec<String> = (0..3).map(|k| format!("id-{:02}", r + 20 * k)).collect();
        assert_eq!(sorted(store.members(&format!("{ns}batch-{r}")).await.unwrap()), expected);
    }
}

#[tokio::test]
async fn memory_store_passes_the_suite() {
    suite(Arc::new(MemoryStore::new()), "").await;
    suite(Arc::new(MemoryStore::with_shards(1)), "").await;
}

#[tokio::test]
async fn redis_single_node_passes_the_suite() {
    let server = RedisServer::start();
    let store = RedisStore::single_node(server.url()).unwrap();
    suite(Arc::new(store.clone()), "").await;
    // Same data, read by a prefixed store: not visible; the suite also passes with a prefix.
    let prefixed = store.clone().prefix("llmgate:ins:");
    assert!(prefixed.members("rollout-1").await.unwrap().is_empty());
    suite(Arc::new(prefixed), "").await;
}

#[tokio::test]
async fn redis_cluster_passes_the_suite() {
    let cluster = RedisCluster::start(3);
    let store = RedisStore::cluster(cluster.urls()).unwrap();
    suite(Arc::new(store.clone()), "").await;
    // Keys that hash to all three nodes' slots.
    for i in 0..30 {
        let rollout = format!("spread-{i}");
        store.record(&rollout, "id").await.unwrap();
        assert_eq!(store.members(&rollout).await.unwrap(), ["id"]);
    }
}

async fn query<T: redis::FromRedisValue>(conn: &mut impl ConnectionLike, args: &[&str]) -> T {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query_async(conn).await.unwrap()
}

/// The exact data on the server: key name, type, members, TTL.
async fn assert_redis_layout<C: ConnectionLike + Clone + Send + Sync + 'static>(store: RedisStore<C>) {
    let mut conn = store.connection().clone();

    // Default: the bare rollout id as key, TTL 86400, reset on every record.
    store.record("r-layout", "01890a5d-ac96-774b-bcce-b302099a8057").await.unwrap();
    assert_eq!(query::<String>(&mut conn, &["TYPE", "r-layout"]).await, "set");
    let members: Vec<String> = query(&mut conn, &["SMEMBERS", "r-layout"]).await;
    assert_eq!(members, ["01890a5d-ac96-774b-bcce-b302099a8057"]);
    let _: () = query(&mut conn, &["EXPIRE", "r-layout", "10"]).await;
    assert_eq!(query::<i64>(&mut conn, &["TTL", "r-layout"]).await, 10);
    store.record("r-layout", "second").await.unwrap();
    let ttl: i64 = query(&mut conn, &["TTL", "r-layout"]).await;
    assert!((86_390..=86_400).contains(&ttl), "TTL reset to 86400, got {ttl}");
    assert_eq!(query::<i64>(&mut conn, &["SCARD", "r-layout"]).await, 2);

    // Prefix and TTL are configurable.
    let custom = store.clone().prefix("ep:").ttl(Duration::from_secs(120));
    custom.record("r-custom", "id-1").await.unwrap();
    assert_eq!(query::<i64>(&mut conn, &["EXISTS", "r-custom"]).await, 0);
    let members: Vec<String> = query(&mut conn, &["SMEMBERS", "ep:r-custom"]).await;
    assert_eq!(members, ["id-1"]);
    let ttl: i64 = query(&mut conn, &["TTL", "ep:r-custom"]).await;
    assert!((110..=120).contains(&ttl), "TTL 120, got {ttl}");

    // Data written by the original gateway (bare key, plain SADD) is readable.
    let _: () = query(&mut conn, &["SADD", "r-legacy", "old-1", "old-2"]).await;
    assert_eq!(sorted(store.members("r-legacy").await.unwrap()), ["old-1", "old-2"]);
}

#[tokio::test]
async fn redis_single_node_layout_and_ttl() {
    let server = RedisServer::start();
    assert_redis_layout(RedisStore::single_node(server.url()).unwrap()).await;
}

#[tokio::test]
async fn redis_cluster_layout_and_ttl() {
    let cluster = RedisCluster::start(3);
    assert_redis_layout(RedisStore::cluster(cluster.urls()).unwrap()).await;
}

#[tokio::test]
async fn redis_single_node_down_at_start_then_up() {
    let mut server = RedisServer::start();
    server.kill();
    // Construction does not touch the network.
    let store = RedisStore::single_node(server.url()).unwrap();
    assert!(store.record("r", "a").await.is_err());
    server.restart();
    store.record("r", "a").await.unwrap();
    assert_eq!(store.members("r").await.unwrap(), ["a"]);
}

#[tokio::test]
async fn redis_cluster_down_at_start_then_up() {
    let mut cluster = RedisCluster::start(3);
    for node in cluster.nodes() {
        node.kill();
    }
    // Construction does not wait for the cluster; calls fail while it is down.
    let store = RedisStore::cluster(cluster.urls()).unwrap();
    assert!(store.record("r", "a").await.is_err());
    // The nodes come back with their cluster config (nodes.conf in their directories).
    for node in cluster.nodes() {
        node.restart();
    }
    // The connection reconnects to the initial nodes on a later call; the cluster may take a
    // moment to agree on its state again, so retry (bounded) like the layer's worker does.
    let mut result = Err("not tried".into());
    for _ in 0..200 {
        result = store.record("r", "a").await;
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    result.unwrap();
    assert_eq!(store.members("r").await.unwrap(), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn memory_store_honours_ttl() {
    let store = MemoryStore::with_shards(2).ttl(Duration::from_secs(100));
    store.record("r", "a").await.unwrap();
    tokio::time::advance(Duration::from_secs(60)).await;
    // A write resets the TTL of the whole set.
    store.record("r", "b").await.unwrap();
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(sorted(store.members("r").await.unwrap()), ["a", "b"]);
    tokio::time::advance(Duration::from_secs(41)).await;
    assert!(store.members("r").await.unwrap().is_empty());
    // An expired set starts afresh.
    store.record("r", "c").await.unwrap();
    assert_eq!(store.members("r").await.unwrap(), ["c"]);
    // Other rollouts expire on their own schedule (and get swept on writes).
    store.record("s", "x").await.unwrap();
    tokio::time::advance(Duration::from_secs(101)).await;
    store.record("t", "y").await.unwrap();
    assert!(store.members("r").await.unwrap().is_empty());
    assert!(store.members("s").await.unwrap().is_empty());
    assert_eq!(store.members("t").await.unwrap(), ["y"]);
}
