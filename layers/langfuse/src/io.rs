//! A trace's input and output, in the shapes LiteLLM's `langfuse_otel` callback writes, so that
//! a reader cannot tell llmgate's trace from LiteLLM's (eval-protocol takes a trace's output as
//! the conversation's final assistant message; a whole `chat.completion` body reads to it as
//! `content: None`):
//!
//! - **input**: the request's `messages`, a JSON array;
//! - **output**: the assistant message, `{"role", "content"}` (content left out when null, as
//!   LiteLLM does), plus OpenAI's `tool_calls` when the model called tools. LiteLLM writes tool
//!   calls as a separate list instead, which eval-protocol's converter reads as messages without
//!   them; the assistant message keeps them.
//!
//! Both are bounded by the capture limit with the cut marked inside the strings, so they stay
//! valid JSON. Streams are assembled by the usage tap as they pass (`AssembledMessage`).

use llmgate_core::{ext::LlmRequest, usage::AssembledMessage};
use serde_json::{Map, Value};

/// The marker appended to a cut text.
fn marker(kept: u64, total: u64) -> String {
    format!("…[truncated by llmgate: {kept} of {total} bytes]")
}

/// A bounded text copy of `bytes`: the longest valid UTF-8 prefix within `limit`, and when
/// cut, a marker saying how much was kept of how much.
pub(crate) fn bounded_text(bytes: &[u8], limit: usize, total: u64, already_truncated: bool) -> String {
    let cut = bytes.len() > limit || already_truncated;
    let head = &bytes[..bytes.len().min(limit)];
    let head = match std::str::from_utf8(head) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default(),
    };
    if cut { format!("{head}{}", marker(head.len() as u64, total.max(bytes.len() as u64))) } else { head.to_owned() }
}

/// A request's input, as kept until the exporter writes it.
pub(crate) enum Input {
    /// No chat request.
    None,
    /// A body within the capture limit: shared, and bounded on the exporter's task.
    Shared(LlmRequest),
    /// A larger body: its messages bounded on the request path (the work is bounded by the
    /// limit, not by the body), so no large body stays queued.
    Bounded(String),
}

impl Input {
    pub(crate) fn capture(request: Option<&LlmRequest>, limit: usize) -> Self {
        match request {
            None => Self::None,
            Some(request) if request.raw().len() <= limit => Self::Shared(request.clone()),
            Some(request) => Self::Bounded(messages_text(request.json(), limit)),
        }
    }

    /// The input attribute's text.
    pub(crate) fn text(&self, limit: usize) -> String {
        match self {
            Self::None => String::new(),
            Self::Shared(request) => {
                raw_messages(request.raw()).unwrap_or_else(|| messages_text(request.json(), limit))
            }
            Self::Bounded(text) => text.clone(),
        }
    }
}

/// The client's own `messages` text, sliced out of a body within the limit: a scan of the bytes,
/// no copy of the parsed tree and no re-encoding (the bench's full stack spent its exporter's
/// CPU there). `None` when the body has no `messages` to slice.
fn raw_messages(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Messages<'a> {
        #[serde(borrow)]
        messages: Option<&'a serde_json::value::RawValue>,
    }
    let parsed: Messages<'_> = serde_json::from_slice(body).ok()?;
    parsed.messages.map(|raw| raw.get().to_owned())
}

/// `messages` as a JSON array, its strings bounded to `limit` bytes in all.
fn messages_text(body: &Map<String, Value>, limit: usize) -> String {
    let messages = body.get("messages").unwrap_or(&Value::Null);
    bounded(messages, &mut limit.clone()).to_string()
}

/// Keys whose values are kept whole: a message without its role reads as another message.
const KEPT_WHOLE: [&str; 2] = ["role", "type"];

/// A copy of `value` whose strings together keep at most `budget` bytes; a cut string ends
/// with the marker. Values of `role` and `type` are kept whole (and not counted).
pub(crate) fn bounded(value: &Value, budget: &mut usize) -> Value {
    match value {
        Value::String(s) if s.len() <= *budget => {
            *budget -= s.len();
            value.clone()
        }
        Value::String(s) => {
            let mut end = *budget;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            *budget = 0;
            Value::String(format!("{}{}", &s[..end], marker(end as u64, s.len() as u64)))
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| bounded(v, budget)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let kept =
                        if KEPT_WHOLE.contains(&k.as_str()) && v.is_string() { v.clone() } else { bounded(v, budget) };
                    (k.clone(), kept)
                })
                .collect(),
        ),
        _ => value.clone(),
    }
}

/// The output attribute's text: the assistant message.
pub(crate) fn message_text(message: &AssembledMessage) -> String {
    let mut out = Map::new();
    out.insert("role".into(), Value::from(message.role.as_deref().unwrap_or("assistant")));
    let cut = message.truncated().then(|| marker(message.kept_bytes, message.text_bytes));
    match (&message.content, &cut) {
        (Some(content), Some(cut)) if message.tool_calls.is_empty() => {
            out.insert("content".into(), Value::from(format!("{content}{cut}")));
        }
        (Some(content), _) => _ = out.insert("content".into(), Value::from(content.as_str())),
        (None, _) => {}
    }
    if !message.tool_calls.is_empty() {
        let last = message.tool_calls.len() - 1;
        let calls = message.tool_calls.iter().enumerate().map(|(i, call)| {
            let mut arguments = call.arguments.clone();
            if i == last
                && let Some(cut) = &cut
            {
                arguments.push_str(cut);
            }
            serde_json::json!({
                "id": call.id,
                "type": call.kind.as_deref().unwrap_or("function"),
                "function": {"name": call.name, "arguments": arguments},
            })
        });
        out.insert("tool_calls".into(), Value::Array(calls.collect()));
    }
    Value::Object(out).to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn truncation_is_marked_and_utf8_safe() {
        assert_eq!(bounded_text(b"hello", 10, 5, false), "hello");
        let s = bounded_text("héllo".as_bytes(), 2, 6, false);
        assert_eq!(s, "h…[truncated by llmgate: 1 of 6 bytes]");
    }

    #[test]
    fn bounded_keeps_valid_json_and_marks_the_cut() {
        let messages = json!([{"role": "system", "content": "abcdef"}, {"role": "user", "content": "ghij"}]);
        assert_eq!(bounded(&messages, &mut 10), messages);
        let out = bounded(&messages, &mut 2);
        assert_eq!(
            out,
            json!([{"role": "system", "content": format!("ab{}", marker(2, 6))},
                   {"role": "user", "content": marker(0, 4)}])
        );
    }

    #[test]
    fn raw_messages_are_the_clients_own_text() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"a \"quoted\" \u00e9"}],"stream":true}"#;
        let text = raw_messages(body).unwrap();
        assert_eq!(text, r#"[{"role":"user","content":"a \"quoted\" \u00e9"}]"#);
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap()[0]["content"], "a \"quoted\" é");
        assert_eq!(raw_messages(br#"{"model":"m"}"#), None);
        assert_eq!(raw_messages(b"not json"), None);
    }

    #[test]
    fn bounded_cuts_at_a_character_boundary() {
        let mut budget = 2;
        let out = bounded(&json!("é€"), &mut budget);
        assert_eq!(out, json!(format!("é{}", marker(2, 5))));
    }

    #[test]
    fn message_text_is_litellm_shaped() {
        let choices =
            json!([{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]);
        let message = AssembledMessage::from_completion(&choices, 1024).unwrap();
        assert_eq!(message_text(&message), r#"{"role":"assistant","content":"hello"}"#);

        let choices = json!([{"message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]}}]);
        let message = AssembledMessage::from_completion(&choices, 1024).unwrap();
        let out: Value = serde_json::from_str(&message_text(&message)).unwrap();
        assert_eq!(
            out,
            json!({"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": "{\"x\":1}"}}]})
        );

        let choices = json!([{"message": {"role": "assistant", "content": "0123456789"}}]);
        let message = AssembledMessage::from_completion(&choices, 4).unwrap();
        let out: Value = serde_json::from_str(&message_text(&message)).unwrap();
        assert_eq!(out["content"], format!("0123{}", marker(4, 10)));
    }
}
