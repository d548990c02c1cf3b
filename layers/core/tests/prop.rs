//! Property tests: the SSE scanner finds the same usage however a stream is split, and body
//! encoding always yields valid JSON equal to the client's body plus the edits of the mode.

use bytes::Bytes;
use llmgate_core::{
    ext::{BodyEdits, EditScope, LlmRequest, UpstreamMode},
    json::{encode, parse_chat_body},
    usage::{SseScanner, Usage},
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

// === SSE ===

/// An OpenAI-style stream: `n` content chunks (some with `"usage": null`), one usage chunk,
/// optionally `[DONE]`; CRLF or LF line ends.
fn stream() -> impl Strategy<Value = (Vec<u8>, Usage, bool)> {
    (prop::collection::vec("\\PC{0,30}", 0..8), 0u64..1_000_000, 0u64..1_000_000, any::<bool>(), any::<bool>()).prop_map(
        |(contents, input, output, done, crlf)| {
            let eol = if crlf { "\r\n" } else { "\n" };
            let mut text = String::new();
            for (i, content) in contents.iter().enumerate() {
                let chunk = json!({"choices": [{"delta": {"content": content}}], "usage": if i % 2 == 0 { Value::Null } else { json!(null) }});
                text.push_str(&format!("data: {chunk}{eol}{eol}"));
            }
            let usage = json!({"choices": [], "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output}});
            text.push_str(&format!("data: {usage}{eol}{eol}"));
            if done {
                text.push_str(&format!("data: [DONE]{eol}{eol}"));
            }
            (text.into_bytes(), Usage { input, output, total: input + output }, done)
        },
    )
}

fn scan(parts: &[&[u8]]) -> (Option<Usage>, bool) {
    let mut scanner = SseScanner::default();
    for part in parts {
        scanner.feed(part);
    }
    scanner.finish();
    (scanner.usage(), scanner.saw_done())
}

/// Splits `bytes` at the given cut points (taken modulo the length, sorted).
fn split<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.sort_unstable();
    let mut parts = Vec::new();
    let mut start = 0;
    for cut in cuts {
        parts.push(&bytes[start..cut]);
        start = cut;
    }
    parts.push(&bytes[start..]);
    parts
}

// === Body encoding ===

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Short floats keep the cases readable; long ones are checked below.
        (-1_000_000i64..1_000_000).prop_map(|n| Value::from(n as f64 / 8.0)),
        "\\PC{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const KEYS: [&str; 6] = ["model", "temperature", "metadata", "langfuse_secret_key", "base_url", "extra"];

fn body() -> impl Strategy<Value = Map<String, Value>> {
    let metadata = prop::option::of((prop::option::of(prop::collection::vec("\\PC{0,8}", 0..4)), any::<bool>()));
    (
        "\\PC{0,20}",
        prop::collection::btree_map("[a-z_]{1,12}", json_value(), 0..6),
        metadata,
        prop::collection::vec(json_value(), 0..3),
    )
        .prop_map(|(model, extra, metadata, messages)| {
            let mut map = Map::new();
            map.insert("model".into(), Value::from(model));
            map.insert("messages".into(), Value::Array(messages));
            for (k, v) in extra {
                if !["model", "messages", "metadata"].contains(&k.as_str()) {
                    map.insert(k, v);
                }
            }
            if let Some((tags, other)) = metadata {
                let mut m = Map::new();
                if let Some(tags) = tags {
                    m.insert("tags".into(), json!(tags));
                }
                if other {
                    m.insert("session".into(), json!("s"));
                }
                map.insert("metadata".into(), Value::Object(m));
            }
            map
        })
}

#[derive(Debug, Clone)]
enum Edit {
    Set(usize, Value, EditScope),
    Remove(usize, EditScope),
}

fn scope() -> impl Strategy<Value = EditScope> {
    prop_oneof![
        Just(EditScope::Always),
        Just(EditScope::Mode(UpstreamMode::OpenAi)),
        Just(EditScope::Mode(UpstreamMode::LiteLlm)),
    ]
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (0..KEYS.len(), json_value(), scope()).prop_map(|(k, v, s)| Edit::Set(k, v, s)),
        (0..KEYS.len(), scope()).prop_map(|(k, s)| Edit::Remove(k, s)),
    ];
    prop::collection::vec(edit, 0..6)
}

/// What `encode` must produce: the body with the mode's edits applied (per key and scope the
/// last edit counts; across scopes the later-registered one wins), then in `openai` mode the
/// client's `metadata.tags` dropped when `metadata` was not edited.
fn expected(body: &Map<String, Value>, edits: &BodyEdits, mode: UpstreamMode) -> Map<String, Value> {
    let mut out = body.clone();
    let mut edited = Vec::new();
    for (key, value) in edits.for_mode(mode) {
        edited.push(key);
        match value {
            Some(v) => {
                out.insert(key.to_string(), v.clone());
            }
            None => {
                out.remove(key);
            }
        }
    }
    if mode == UpstreamMode::OpenAi
        && !edited.contains(&"metadata")
        && let Some(Value::Object(m)) = out.get_mut("metadata")
        && m.contains_key("tags")
    {
        m.remove("tags");
        if m.is_empty() {
            out.remove("metadata");
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn the_scanner_finds_the_same_usage_however_the_stream_is_split(
        (bytes, usage, done) in stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let whole = scan(&[&bytes]);
        prop_assert_eq!(whole, (Some(usage), done));
        let parts = split(&bytes, &cuts);
        prop_assert_eq!(scan(&parts), whole);
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        prop_assert_eq!(scan(&bytewise), whole);
    }

    #[test]
    fn the_scanner_never_panics_on_arbitrary_bytes(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
    ) {
        let parts: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        let _ = scan(&parts);
    }

    #[test]
    fn parse_chat_body_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_chat_body(&bytes);
    }

    #[test]
    fn encoding_yields_the_body_plus_the_edits(body in body(), list in edits(), openai in any::<bool>()) {
        let mode = if openai { UpstreamMode::OpenAi } else { UpstreamMode::LiteLlm };
        let raw = Bytes::from(serde_json::to_vec(&Value::Object(body.clone())).unwrap());
        let parsed = parse_chat_body(&raw).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let body = parsed.clone();
        let request = LlmRequest::new(raw.clone(), parsed);
        let mut edits = BodyEdits::default();
        for edit in &list {
            match edit {
                Edit::Set(k, v, s) => edits.set(KEYS[*k], v.clone(), *s),
                Edit::Remove(k, s) => edits.remove(KEYS[*k], *s),
            }
        }
        let out = encode(&request, Some(&edits), mode);
        let got: Value = serde_json::from_slice(&out)
            .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {}", String::from_utf8_lossy(&out))))?;
        let want = Value::Object(expected(&body, &edits, mode));
        prop_assert_eq!(&got, &want);
        // No edits and nothing to strip: the client's bytes, untouched.
        if !edits.any_for(mode) && got == Value::Object(body.clone()) {
            prop_assert_eq!(encode(&request, None, mode), raw);
        }
    }
}

/// serde_json is built with `float_roundtrip`: a re-encoded body keeps every float exactly.
#[test]
fn floats_survive_a_re_encoding_exactly() {
    let raw = Bytes::from_static(b"{\"model\":\"m\",\"messages\":[],\"x\":4.019241233914542e299}");
    let parsed = parse_chat_body(&raw).unwrap();
    let request = LlmRequest::new(raw.clone(), parsed);
    let mut edits = BodyEdits::default();
    edits.set("model", json!("other"), EditScope::Always);
    let out: Value = serde_json::from_slice(&encode(&request, Some(&edits), UpstreamMode::OpenAi)).unwrap();
    assert_eq!(out["x"].as_f64(), Some(4.019241233914542e299));
}
