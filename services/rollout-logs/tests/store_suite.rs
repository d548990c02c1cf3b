//! One suite, run against every `LogStore`: memory, a single redis-server, a 3-node Redis
//! Cluster (real processes on ephemeral ports), and two stores on one Redis (two replicas).

use std::sync::Arc;

use bytes::Bytes;
use llmgate_rollout_logs::{LogStore, MemoryLogStore, RedisLogStore, RolloutKey};
use llmgate_test_support::redis::{RedisCluster, RedisServer};

fn key<'a>(scope: &'a str, rollout_id: &'a str) -> RolloutKey<'a> {
    RolloutKey { scope, rollout_id }
}

/// `writer` and `reader` may be two replicas' stores over one backend. `max_entries` is 3.
async fn suite(writer: Arc<dyn LogStore>, reader: Arc<dyn LogStore>) {
    let r1 = key("", "rollout-1");
    assert_eq!(reader.read(r1).await.unwrap().entries.len(), 0);
    assert_eq!(reader.latest_status(r1).await.unwrap(), None);

    // Newest first; the status is the newest status-bearing entry.
    let entry = |s: &str| Bytes::from(s.to_owned());
    assert_eq!(writer.append(r1, &entry("running"), true).await.unwrap(), 0);
    writer.append(r1, &entry("log-1"), false).await.unwrap();
    assert_eq!(reader.latest_status(r1).await.unwrap(), Some(entry("running")));
    writer.append(r1, &entry("finished"), true).await.unwrap();
    let log = reader.read(r1).await.unwrap();
    assert_eq!(log.entries, [entry("finished"), entry("log-1"), entry("running")]);
    assert_eq!((log.latest_status, log.evicted), (Some(entry("finished")), 0));

    // Past the bound the oldest go and are counted; the latest status stays.
    assert_eq!(writer.append(r1, &entry("log-2"), false).await.unwrap(), 1);
    assert_eq!(writer.append(r1, &entry("log-3"), false).await.unwrap(), 1);
    assert_eq!(writer.append(r1, &entry("log-4"), false).await.unwrap(), 1);
    let log = reader.read(r1).await.unwrap();
    assert_eq!(log.entries, [entry("log-4"), entry("log-3"), entry("log-2")]);
    assert_eq!((log.latest_status, log.evicted), (Some(entry("finished")), 3));

    // Scopes (projects) and rollouts stay apart; ids are opaque (colons, braces, unicode).
    for other in [key("proj", "rollout-1"), key("", "rollout-2"), key("", "{rollout-1}")] {
        assert_eq!(reader.read(other).await.unwrap().entries.len(), 0, "{other:?}");
    }
    let odd = key("p-é", "weird:id with }{ space/é");
    writer.append(odd, &entry("x"), true).await.unwrap();
    assert_eq!(reader.read(odd).await.unwrap().entries, [entry("x")]);
    assert_eq!(reader.latest_status(odd).await.unwrap(), Some(entry("x")));

    // Concurrent appends on one rollout all land (or are counted as evicted).
    let r3 = key("", "rollout-3");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.append(key("", "rollout-3"), &Bytes::from(format!("{i}")), i == 7).await })
        })
        .collect();
    let mut evicted = 0;
    for task in tasks {
        evicted += task.await.unwrap().unwrap();
    }
    let log = reader.read(r3).await.unwrap();
    assert_eq!((log.entries.len(), log.evicted, evicted), (3, 17, 17));
    assert_eq!(log.latest_status, Some(Bytes::from("7")));
}

#[tokio::test]
async fn memory_store_passes_the_suite() {
    let store = Arc::new(MemoryLogStore::new().max_entries(3));
    suite(store.clone(), store).await;
}

#[tokio::test]
async fn redis_single_node_passes_the_suite_across_two_replicas() {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let replica = || async { RedisLogStore::new(client.get_connection_manager().await.unwrap()).max_entries(3) };
    suite(Arc::new(replica().await), Arc::new(replica().await)).await;
    // Both keys carry the TTL.
    let ttl = server.command(&["TTL", "llmgate:rollout_logs:{/rollout-1}:entries"]);
    assert!(ttl.as_deref().is_some_and(|t| t.starts_with(':') && t != ":-1" && t != ":-2"), "{ttl:?}");
    let ttl = server.command(&["TTL", "llmgate:rollout_logs:{/rollout-1}:meta"]);
    assert!(ttl.as_deref().is_some_and(|t| t.starts_with(':') && t != ":-1" && t != ":-2"), "{ttl:?}");
}

#[tokio::test]
async fn redis_cluster_passes_the_suite() {
    let cluster = RedisCluster::start(3);
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let store = RedisLogStore::new(client.get_async_connection().await.unwrap()).max_entries(3).prefix("logs:");
    let store = Arc::new(store);
    suite(store.clone(), store.clone()).await;
    // Rollouts that hash to every node's slots.
    for i in 0..30 {
        let id = format!("spread-{i}");
        let rollout = key("p", &id);
        store.append(rollout, &Bytes::from("e"), true).await.unwrap();
        assert_eq!(store.read(rollout).await.unwrap().entries, [Bytes::from("e")]);
    }
}
