//! Issue 11, the bad-input table, through the reference proxy: every hostile or broken request
//! gets its documented status and an OpenAI-style JSON error, nothing panics, and nothing that
//! must be refused reaches the upstream (counted with `mock.requests()`).
//!
//! docs/reliability.md lists the same table in prose.

use http::{Method, StatusCode};
use llmgate::mock_upstream::MockUpstream;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const CHAT: &str = "/chat/completions";
const IDS: &str = "/rollout_id/rb/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1";
const ALLOWED: &str = "https://api.example.com/v1";

/// URL-safe base64 with padding.
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        out.push_str(&"=".repeat(3 - chunk.len()));
    }
    out
}

/// The gateway every row runs against: a small body limit, one API key, one allowed base URL.
async fn setup() -> (MockUpstream, TestGateway) {
    let mock = mock().await;
    let yaml = format!(
        "body_limit_bytes: 4096\nauth: {{api_keys: [\"gw-key\"]}}\nencoded_base_url: {{allow: [\"{ALLOWED}\"]}}\n"
    );
    let gw = TestGateway::in_front_of(&mock, &yaml).await;
    (mock, gw)
}

const AUTH: (&str, &str) = ("authorization", "Bearer gw-key");

/// Asserts an OpenAI-style error `{"error": {"message", "type", "code"}}` and returns the message.
fn openai_error(reply: &Reply, what: &str) -> String {
    let body: serde_json::Value =
        serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", reply.text()));
    let error = &body["error"];
    assert!(error["type"].is_string() && error["code"].is_string(), "{what}: not an OpenAI error: {body}");
    error["message"].as_str().unwrap_or_else(|| panic!("{what}: no message: {body}")).to_string()
}

/// One row: a request, the status it must get, a substring of the message (empty: any).
struct Row {
    what: &'static str,
    method: Method,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    status: StatusCode,
    needle: &'static str,
}

fn row(
    what: &'static str,
    path: impl Into<String>,
    body: impl Into<Vec<u8>>,
    status: StatusCode,
    needle: &'static str,
) -> Row {
    Row {
        what,
        method: Method::POST,
        path: path.into(),
        headers: vec![("content-type", "application/json"), AUTH],
        body: body.into(),
        status,
        needle,
    }
}

fn nested(depth: usize) -> String {
    format!("{{\"model\":\"m\",\"messages\":[],\"x\":{}{}}}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn every_row_of_the_bad_input_table_gets_its_status_and_an_openai_error_and_never_reaches_the_upstream() {
    let (mock, gw) = setup().await;
    let rollout = format!("{IDS}{CHAT}");
    let base = |bytes: &[u8]| format!("{IDS}/encoded_base_url/{}{CHAT}", b64(bytes));
    let mut big = b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 8192));
    big.extend_from_slice(b"\"}]}");
    let mut invalid_utf8 = b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"".to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    invalid_utf8.extend_from_slice(b"\"}]}");

    let rows = vec![
        row("malformed JSON", &rollout, "{\"model\": ", StatusCode::BAD_REQUEST, "Invalid JSON"),
        row("not JSON at all", &rollout, "hello", StatusCode::BAD_REQUEST, "Invalid JSON"),
        row("empty body", &rollout, "", StatusCode::BAD_REQUEST, ""),
        row("a JSON array", &rollout, "[1,2]", StatusCode::BAD_REQUEST, "must be a JSON object"),
        row("a JSON string", &rollout, "\"s\"", StatusCode::BAD_REQUEST, "must be a JSON object"),
        row("JSON null", &rollout, "null", StatusCode::BAD_REQUEST, "must be a JSON object"),
        row(
            "a number too large for f64",
            &rollout,
            "{\"model\":\"m\",\"messages\":[],\"n\":1e400}",
            StatusCode::BAD_REQUEST,
            "Invalid JSON",
        ),
        row("nesting past serde_json's depth limit", &rollout, nested(1_000), StatusCode::BAD_REQUEST, "Invalid JSON"),
        row("invalid UTF-8 in a string", &rollout, invalid_utf8, StatusCode::BAD_REQUEST, "Invalid JSON"),
        row(
            "messages not a list",
            &rollout,
            "{\"model\":\"m\",\"messages\":\"hi\"}",
            StatusCode::BAD_REQUEST,
            "'messages' must be a list",
        ),
        row(
            "model not a string",
            &rollout,
            "{\"model\":42,\"messages\":[]}",
            StatusCode::BAD_REQUEST,
            "'model' must be a string",
        ),
        row(
            "metadata not an object",
            &rollout,
            "{\"model\":\"m\",\"metadata\":[1]}",
            StatusCode::BAD_REQUEST,
            "'metadata' must be an object",
        ),
        row(
            "metadata.tags not a list",
            &rollout,
            "{\"model\":\"m\",\"metadata\":{\"tags\":\"t\"}}",
            StatusCode::BAD_REQUEST,
            "'metadata.tags' must be a list",
        ),
        row("trailing garbage", &rollout, "{\"model\":\"m\"} x", StatusCode::BAD_REQUEST, "Invalid JSON"),
        row("body over the limit", &rollout, big, StatusCode::PAYLOAD_TOO_LARGE, ""),
        row(
            "%2F inside a segment",
            format!("/rollout_id/a%2Fb/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1{CHAT}"),
            "{}",
            StatusCode::BAD_REQUEST,
            "'rollout_id'",
        ),
        row(
            "`..` as a segment (encoded)",
            format!("/rollout_id/%2E%2E/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1{CHAT}"),
            "{}",
            StatusCode::BAD_REQUEST,
            "'rollout_id'",
        ),
        row(
            "NUL in a segment",
            format!("/rollout_id/a%00b/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1{CHAT}"),
            "{}",
            StatusCode::BAD_REQUEST,
            "'rollout_id'",
        ),
        row(
            "a control character in a segment",
            format!("/rollout_id/r/invocation_id/a%1Bb/experiment_id/e1/run_id/u1/row_id/w1{CHAT}"),
            "{}",
            StatusCode::BAD_REQUEST,
            "'invocation_id'",
        ),
        row(
            "invalid percent-encoding",
            format!("/project_id/%zz{CHAT}"),
            "{}",
            StatusCode::BAD_REQUEST,
            "'project_id'",
        ),
        row(
            "invalid base64",
            format!("{IDS}/encoded_base_url/!!!!{CHAT}"),
            "{}",
            StatusCode::BAD_REQUEST,
            "Invalid encoded_base_url",
        ),
        row(
            "base64 of invalid UTF-8",
            base(&[0xff, 0xfe, 0xfd]),
            "{}",
            StatusCode::BAD_REQUEST,
            "Invalid encoded_base_url",
        ),
        row("file: base URL", base(b"file:///etc/passwd"), "{}", StatusCode::FORBIDDEN, "not allowed"),
        row("localhost base URL", base(b"http://localhost:80/v1"), "{}", StatusCode::FORBIDDEN, "not allowed"),
        row(
            "link-local metadata base URL",
            base(b"http://169.254.169.254/latest/meta-data"),
            "{}",
            StatusCode::FORBIDDEN,
            "not allowed",
        ),
        row(
            "look-alike host",
            base(b"https://api.example.com.evil.net/v1"),
            "{}",
            StatusCode::FORBIDDEN,
            "not allowed",
        ),
        row(
            "unknown project",
            format!("/v1/project_id/nope{CHAT}"),
            "{\"model\":\"m\",\"messages\":[]}",
            StatusCode::NOT_FOUND,
            "'nope'",
        ),
        Row {
            headers: vec![("content-type", "application/json")],
            ..row("no API key", &rollout, "{}", StatusCode::UNAUTHORIZED, "")
        },
        Row {
            headers: vec![("content-type", "application/json"), ("authorization", "Bearer wrong")],
            ..row("wrong API key", &rollout, "{}", StatusCode::UNAUTHORIZED, "")
        },
        Row { method: Method::GET, ..row("GET on a chat route", &rollout, "", StatusCode::METHOD_NOT_ALLOWED, "") },
        Row {
            method: Method::DELETE,
            ..row("DELETE on a chat route", format!("/v1{CHAT}"), "", StatusCode::METHOD_NOT_ALLOWED, "")
        },
        Row {
            headers: vec![("content-type", "application/json"), ("content-encoding", "gzip"), AUTH],
            ..row("a compressed chat body", &rollout, "{}", StatusCode::UNSUPPORTED_MEDIA_TYPE, "")
        },
    ];
    for r in rows {
        let reply = send(r.method.clone(), &gw.url(&r.path), &r.headers, r.body.clone()).await;
        assert_eq!(reply.status, r.status, "{}: {}", r.what, reply.text());
        let message = openai_error(&reply, r.what);
        assert!(message.contains(r.needle), "{}: {message}", r.what);
        assert!(reply.headers.get("x-insertion-id").is_none(), "{}: no insertion id on a refusal", r.what);
        if r.status == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(reply.headers["allow"], "POST", "{}", r.what);
        }
    }
    assert_eq!(mock.requests().len(), 0, "no refused request reached the upstream: {:?}", mock.requests());

    // The gateway still serves after all of it.
    let reply = post_json(&gw.url(&rollout), &[AUTH], &chat_body("gpt-test", false)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[tokio::test]
async fn accepted_odd_shapes_are_forwarded_untouched_and_the_upstream_decides() {
    // Past the shape checks (object; `model` a string; `messages` a list; `metadata` an object
    // with a `tags` list) the gateway does not validate the OpenAI schema: these reach the
    // upstream as sent.
    let (mock, gw) = setup().await;
    for (what, body) in [
        ("messages missing", json!({"model": "gpt-test"})),
        ("messages of odd items", json!({"model": "gpt-test", "messages": [1, null, "x"]})),
        ("a huge integer", json!({"model": "gpt-test", "messages": [], "seed": 18446744073709551615u64})),
        ("a negative huge integer", json!({"model": "gpt-test", "messages": [], "seed": -9223372036854775808i64})),
        ("moderate nesting", serde_json::from_str(&nested(100)).unwrap()),
    ] {
        let before = mock.requests().len();
        let reply = post_json(&gw.url(&format!("{IDS}{CHAT}")), &[AUTH], &body).await;
        assert!(
            reply.status.is_success() || reply.status.is_client_error(),
            "{what}: {} {}",
            reply.status,
            reply.text()
        );
        assert!(serde_json::from_slice::<serde_json::Value>(&reply.body).is_ok(), "{what}: a JSON answer");
        assert_eq!(mock.requests().len(), before + 1, "{what}: forwarded once");
        let sent = mock.requests().pop().unwrap().json();
        for (key, value) in body.as_object().unwrap() {
            assert_eq!(&sent[key], value, "{what}: {key} unchanged");
        }
    }
}

/// Writes `head` and then `body` in chunked framing over a raw socket; returns the raw answer.
async fn raw_exchange(gw: &TestGateway, head: &str, chunks: &[Vec<u8>]) -> String {
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in chunks {
        if stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.is_err()
            || stream.write_all(chunk).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break; // the gateway answered early and closed
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = within(stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_chunked_body_without_content_length_that_grows_past_the_limit_is_a_413() {
    let (mock, gw) = setup().await;
    let head = format!(
        "POST {IDS}{CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer gw-key\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    let mut chunks = vec![b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"".to_vec()];
    chunks.extend((0..16).map(|_| vec![b'x'; 1024]));
    chunks.push(b"\"}]}".to_vec());
    let answer = raw_exchange(&gw, &head, &chunks).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(body.contains("\"error\""), "an OpenAI error: {answer}");
    assert_eq!(mock.requests().len(), 0);

    // A chunked body under the limit is fine.
    let small = vec![serde_json::to_vec(&chat_body("gpt-test", false)).unwrap()];
    let answer = raw_exchange(&gw, &head, &small).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn oversized_headers_are_refused_without_reaching_the_upstream_and_the_gateway_keeps_serving() {
    let (mock, gw) = setup().await;
    for (what, extra) in [
        ("one 1 MiB header", format!("x-big: {}\r\n", "a".repeat(1 << 20))),
        ("ten thousand headers", (0..10_000).map(|i| format!("x-h{i}: v\r\n")).collect::<String>()),
    ] {
        let head = format!(
            "POST {IDS}{CHAT} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer gw-key\r\ncontent-length: 2\r\n{extra}connection: close\r\n\r\n{{}}"
        );
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let _ = stream.write_all(head.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = within(stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        // hyper answers 431 (or closes the connection) before any service runs.
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{what}: {answer}");
    }
    assert_eq!(mock.requests().len(), 0);
    let reply = post_json(&gw.url(&format!("{IDS}{CHAT}")), &[AUTH], &chat_body("gpt-test", false)).await;
    assert_eq!(reply.status, StatusCode::OK, "still serving");
}

#[tokio::test]
async fn raw_control_characters_and_dot_segments_in_the_request_line_never_reach_the_upstream_as_chat() {
    let (mock, gw) = setup().await;
    for target in [
        format!("/rollout_id/../invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1{CHAT}"),
        format!("/rollout_id/a\x01b/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1{CHAT}"),
        format!("/rollout_id/a\x00b/invocation_id/i1/experiment_id/e1/run_id/u1/row_id/w1{CHAT}"),
    ] {
        let request = format!(
            "POST {target} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer gw-key\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{{}}"
        );
        let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let _ = stream.write_all(request.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = within(stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        // A literal `..` is a valid segment character sequence: it must be refused as a chat
        // segment (400); raw control bytes are refused by the HTTP parser (400, or closed).
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{target:?}: {answer}");
    }
    assert_eq!(mock.requests().len(), 0, "{:?}", mock.requests());
}
