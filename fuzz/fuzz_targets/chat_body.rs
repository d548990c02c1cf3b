//! The chat-body model/metadata rewrite: whatever `parse_chat_body` accepts, `encode` with a
//! model edit, a tag-bearing metadata edit and a removal gives valid JSON carrying the edits,
//! in both upstream modes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use llmgate_core::{
    ext::{BodyEdits, EditScope, LlmRequest, UpstreamMode},
    json::{encode, parse_chat_body},
};
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let raw = Bytes::copy_from_slice(data);
    let Ok(json) = parse_chat_body(&raw) else { return };
    let request = LlmRequest::new(raw.clone(), json.clone());
    for mode in [UpstreamMode::OpenAi, UpstreamMode::LiteLlm] {
        // No edits: valid JSON (the client's bytes, or the body without metadata.tags).
        let plain: Value = serde_json::from_slice(&encode(&request, None, mode)).expect("valid JSON without edits");
        assert!(plain.is_object());

        let mut edits = BodyEdits::default();
        edits.set("model", json!("fuzz-model"), EditScope::Always);
        edits.set("metadata", json!({"tags": ["rollout_id:r", "insertion_id:x"]}), EditScope::Mode(UpstreamMode::LiteLlm));
        edits.remove("base_url", EditScope::Mode(UpstreamMode::OpenAi));
        let out = encode(&request, Some(&edits), mode);
        let out: Value = serde_json::from_slice(&out).expect("valid JSON with edits");
        let object = out.as_object().expect("an object");
        assert_eq!(object["model"], "fuzz-model");
        match mode {
            UpstreamMode::LiteLlm => assert_eq!(object["metadata"]["tags"][1], "insertion_id:x"),
            UpstreamMode::OpenAi => {
                assert!(!object.contains_key("base_url"));
                assert!(object.get("metadata").and_then(|m| m.get("tags")).is_none(), "tags never reach openai");
            }
        }
        // Every other key of the client's body is still there.
        for key in json.keys() {
            if !["model", "metadata", "base_url"].contains(&key.as_str()) {
                assert!(object.contains_key(key), "{key} lost");
            }
        }
    }
});
