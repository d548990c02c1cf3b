//! Issue 11, the fault suite: a slow Redis, Redis killed and restarted under a mix of traffic,
//! upstreams answering garbage, and SIGTERM to the binary under load. For each, what the client
//! gets, and the invariant: every completion that got a 2xx (and a complete body) has its
//! insertion id in the store once Redis is reachable again, nothing for the failed ones.

use std::{collections::BTreeSet, time::Duration};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use llmgate_test_support::redis::RedisServer;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::support::{child::ChildGateway, *};

const CHAT: &str = "/chat/completions";

fn rollout(r: &str) -> String {
    format!("/rollout_id/{r}/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1{CHAT}")
}

fn smembers(redis: &RedisServer, key: &str) -> Option<BTreeSet<String>> {
    let client = redis::Client::open(redis.url()).ok()?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2)).ok()?;
    redis::cmd("SMEMBERS").arg(key).query::<Vec<String>>(&mut conn).ok().map(|v| v.into_iter().collect())
}

/// What one request ended as: a 2xx with a complete body (and its id), or anything else.
enum Ended {
    Completed(String),
    Failed,
}

/// Sends one chat request with `headers` and reads the whole body; a body error counts as failed.
async fn attempt(url: &str, headers: &[(&str, &str)], stream: bool) -> Ended {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let req = request(Method::POST, url, &all, chat_body("gpt-test", stream).to_string());
    // A stream whose upstream resets at once can fail before the head reaches the client
    // (hyper aborts the connection when the first body poll errors): a failure all the same.
    let Ok(response) = within(client().request(req)).await else { return Ended::Failed };
    let status = response.status();
    let id = response.headers().get("x-insertion-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = within(response.into_body().collect()).await;
    match (status.is_success(), body, id) {
        (true, Ok(body), Some(id)) => {
            let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
            if stream {
                assert!(text.ends_with("data: [DONE]\n\n"), "a complete stream: {text}");
            }
            Ended::Completed(id)
        }
        (true, Ok(_), None) => panic!("a 2xx on a rollout route without an x-insertion-id"),
        _ => Ended::Failed,
    }
}

// === Redis ===

#[tokio::test]
async fn a_slow_redis_never_fails_a_completion_and_every_id_lands_once_it_answers() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let mock = mock().await;
    let yaml = format!("redis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n", redis.url());
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let url = gw.url(&rollout("slow"));
    let mut ids = BTreeSet::new();
    if let Ended::Completed(id) = attempt(&url, &[], false).await {
        ids.insert(id);
    }

    // Redis blocks for 2 s; requests keep being answered meanwhile.
    let port_url = redis.url();
    let sleeper = std::thread::spawn(move || {
        let mut conn = redis::Client::open(port_url).unwrap().get_connection().unwrap();
        redis::cmd("DEBUG").arg("SLEEP").arg(2).query::<()>(&mut conn)
    });
    let blocked = loop {
        // Wait until the server is inside DEBUG SLEEP (a PING then hangs).
        if redis.command(&["PING"]).is_none() {
            break true;
        }
        if sleeper.is_finished() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for stream in [false, true, false, true] {
        match attempt(&url, &[], stream).await {
            Ended::Completed(id) => {
                ids.insert(id);
            }
            Ended::Failed => panic!("a slow Redis failed a completion"),
        }
    }
    sleeper.join().unwrap().expect("DEBUG SLEEP ran (enable-debug-command local)");
    assert!(blocked || ids.len() == 5, "the sleep was observed or everything already passed");
    eventually("every id recorded once Redis answers", || smembers(&redis, "slow") == Some(ids.clone())).await;
    assert_eq!(ids.len(), 5);
}

#[tokio::test]
async fn redis_killed_mid_run_under_mixed_traffic_keeps_exactly_the_completed_ids() {
    // Persistence on, so that what was recorded before the crash survives it.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mock = mock().await;
    let yaml = format!("redis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n", redis.url());
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let url = gw.url(&rollout("mix"));
    // The mix: JSON and SSE successes, upstream 500s and 429s, streams cut midway.
    let kinds: [(&[(&str, &str)], bool); 6] = [
        (&[], false),
        (&[], true),
        (&[("x-mock-status", "500")], false),
        (&[("x-mock-status", "503")], true),
        (&[("x-mock-cut-after", "2"), ("x-mock-chunks", "5")], true),
        (&[("x-mock-chunks", "3")], true),
    ];
    let mut completed = BTreeSet::new();
    let mut failed = 0;
    for round in 0..4 {
        if round == 1 {
            redis.kill();
        }
        if round == 3 {
            redis.restart();
        }
        let runs = kinds.iter().map(|(headers, stream)| attempt(&url, headers, *stream));
        for ended in futures_join_all(runs).await {
            match ended {
                Ended::Completed(id) => assert!(completed.insert(id), "ids are unique"),
                Ended::Failed => failed += 1,
            }
        }
    }
    assert_eq!(completed.len(), 4 * 3, "three successes per round");
    assert_eq!(failed, 4 * 3, "three failures per round");
    let settled = within(async {
        loop {
            let now = smembers(&redis, "mix");
            if now.as_ref() == Some(&completed) || now.as_ref().is_some_and(|n| !n.is_subset(&completed)) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let stored = settled.await;
    assert_eq!(stored.as_ref(), Some(&completed), "exactly the completed ids are stored");
    // And it stays that way (nothing late for the failed ones): a last success lands alone.
    let Ended::Completed(last) = attempt(&url, &[], false).await else { panic!("serving") };
    completed.insert(last);
    eventually("the last id too", || smembers(&redis, "mix") == Some(completed.clone())).await;
}

/// `join_all` without the futures crate: runs the futures concurrently on the test runtime.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future,
{
    let futures: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    let mut futures: Vec<Option<_>> = futures.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("finished")).collect()
}

// === Upstream garbage ===

/// A one-shot-per-connection upstream that writes `answer` (raw bytes) and closes.
async fn garbage_upstream(answer: Vec<u8>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                // Read the request head (and whatever body arrived with it), then answer.
                let mut buf = vec![0u8; 64 * 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(&answer).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upstream_answering_garbage_gets_a_json_error_or_a_broken_stream_and_no_record() {
    let redis = RedisServer::start();
    let sse_head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunk = |s: &str| format!("{:x}\r\n{s}\r\n", s.len());
    let cases: Vec<(&str, Vec<u8>, Option<StatusCode>)> = vec![
        ("not HTTP at all", b"hello, this is not http\r\n\r\n".to_vec(), Some(StatusCode::BAD_GATEWAY)),
        ("nothing, then close", Vec::new(), Some(StatusCode::BAD_GATEWAY)),
        (
            "gigantic response headers",
            format!("HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\n{{}}", "a".repeat(1 << 20)).into_bytes(),
            Some(StatusCode::BAD_GATEWAY),
        ),
        (
            "an SSE stream cut without its last chunk",
            format!("{sse_head}{}", chunk("data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n")).into_bytes(),
            None,
        ),
    ];
    let mut rollouts = Vec::new();
    for (i, (what, answer, status)) in cases.into_iter().enumerate() {
        let addr = garbage_upstream(answer).await;
        let yaml = format!(
            "upstreams:\n  bad: {{url: \"http://{addr}/v1\", mode: openai}}\nredis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n",
            redis.url()
        );
        let gw = TestGateway::start(&yaml, &[]).await;
        let key = format!("garbage{i}");
        let url = gw.url(&rollout(&key));
        rollouts.push((what, key));
        let response = open(request(
            Method::POST,
            &url,
            &[("content-type", "application/json")],
            chat_body("gpt-test", true).to_string(),
        ))
        .await;
        let got = response.status();
        let body = within(response.into_body().collect()).await;
        match status {
            Some(expected) => {
                assert_eq!(got, expected, "{what}");
                let body = body.unwrap_or_else(|e| panic!("{what}: a complete error body: {e}")).to_bytes();
                let json: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{what}: JSON error ({e}): {body:?}"));
                assert!(json["error"]["message"].is_string(), "{what}: {json}");
            }
            None => {
                assert_eq!(got, StatusCode::OK, "{what}: the head was already a 200");
                assert!(body.is_err(), "{what}: the client sees the body break, not a clean end");
            }
        }
    }
    // A success, so we know recording works, then: only it is stored.
    let mock = mock().await;
    let yaml = format!("redis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n", redis.url());
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    let Ended::Completed(ok) = attempt(&gw.url(&rollout("garbage")), &[], false).await else { panic!("serving") };
    eventually("the success is stored", || smembers(&redis, "garbage") == Some(BTreeSet::from([ok.clone()]))).await;
    for (what, key) in rollouts {
        assert_eq!(smembers(&redis, &key), Some(BTreeSet::new()), "{what}: nothing recorded");
    }
}

#[tokio::test]
#[ignore = "bug: llmgate-insertion-id records a non-SSE 2xx as soon as its head arrives (layer.rs, FutureState::Rollout), so a JSON body the upstream cuts short is recorded although the client got a broken body"]
async fn a_json_body_cut_short_is_not_recorded() {
    let redis = RedisServer::start();
    let addr = garbage_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":".to_vec(),
    )
    .await;
    let yaml = format!(
        "upstreams:\n  bad: {{url: \"http://{addr}/v1\", mode: openai}}\nredis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n",
        redis.url()
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    let url = gw.url(&rollout("cutjson"));
    let response = open(request(
        Method::POST,
        &url,
        &[("content-type", "application/json")],
        chat_body("gpt-test", false).to_string(),
    ))
    .await;
    assert_eq!(response.status(), StatusCode::OK, "the head was a 200");
    assert!(within(response.into_body().collect()).await.is_err(), "the client sees the body break");
    // A later success on the same rollout, so the store has settled when we look.
    let mock = mock().await;
    let yaml = format!("redis: {{url: \"{}\"}}\n", redis.url());
    let good = TestGateway::in_front_of(&mock, &yaml).await;
    let Ended::Completed(ok) = attempt(&good.url(&rollout("cutjson")), &[], false).await else { panic!("serving") };
    eventually("the success is stored", || smembers(&redis, "cutjson").is_some_and(|s| s.contains(&ok))).await;
    assert_eq!(smembers(&redis, "cutjson"), Some(BTreeSet::from([ok])), "only the success");
}

#[tokio::test]
async fn a_non_json_2xx_body_is_passed_through_and_counts_as_a_completion() {
    let redis = RedisServer::start();
    let addr = garbage_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\nconnection: close\r\n\r\nnot json!"
            .to_vec(),
    )
    .await;
    let yaml = format!(
        "upstreams:\n  bad: {{url: \"http://{addr}/v1\", mode: openai}}\nredis: {{url: \"{}\"}}\ninsertion_id: {{record_timeout_ms: 100}}\n",
        redis.url()
    );
    let gw = TestGateway::start(&yaml, &[]).await;
    let reply = post_json(&gw.url(&rollout("nj")), &[], &chat_body("gpt-test", false)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"not json!", "passed through unchanged");
    let id = reply.headers["x-insertion-id"].to_str().unwrap().to_string();
    // The client got a 2xx with a complete body: by the invariant its id is recorded.
    eventually("the id of the 2xx is stored", || smembers(&redis, "nj") == Some(BTreeSet::from([id.clone()]))).await;
}

// === SIGTERM under load ===

#[tokio::test]
async fn sigterm_under_load_lets_every_in_flight_request_finish_then_exits() {
    let redis = RedisServer::start();
    let mock = mock().await;
    let yaml = format!(
        "upstreams:\n  mock: {{url: \"{}\", mode: openai}}\nredis: {{url: \"{}\"}}\ndrain_timeout_secs: 20\n",
        mock.url(),
        redis.url()
    );
    let gw = ChildGateway::spawn(&yaml, &[("LOG_LEVEL", "info")], &[]).await;
    let url = gw.url(&rollout("term"));
    // 20 slow requests (streams and JSON) whose heads have arrived; the bodies are still coming.
    let mut in_flight = Vec::new();
    for i in 0..20 {
        let stream = i % 2 == 0;
        let headers: Vec<(&str, &str)> = if stream {
            vec![("content-type", "application/json"), ("x-mock-chunks", "5"), ("x-mock-chunk-delay-ms", "100")]
        } else {
            vec![("content-type", "application/json")]
        };
        let response = open(request(Method::POST, &url, &headers, chat_body("gpt-test", stream).to_string())).await;
        assert_eq!(response.status(), StatusCode::OK);
        let id = response.headers()["x-insertion-id"].to_str().unwrap().to_string();
        in_flight.push(tokio::spawn(async move {
            let body = within(response.into_body().collect()).await.expect("the body finishes").to_bytes();
            (id, stream, body)
        }));
    }
    gw.sigterm();
    let mut ids = BTreeSet::new();
    for task in in_flight {
        let (id, stream, body) = task.await.unwrap();
        let text = String::from_utf8_lossy(&body);
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "a stream cut by SIGTERM: {text}");
        } else {
            assert!(serde_json::from_slice::<serde_json::Value>(&body).is_ok(), "{text}");
        }
        ids.insert(id);
    }
    let mut gw = gw;
    let status = gw.wait_exit().await;
    assert!(status.success(), "clean exit: {status:?} {}", gw.log());
    // New connections are refused once it has exited.
    assert!(std::net::TcpStream::connect(("127.0.0.1", gw.port)).is_err());
    // Every 2xx finished before the exit was recorded.
    assert_eq!(smembers(&redis, "term"), Some(ids), "{}", gw.log());
}
