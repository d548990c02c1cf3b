//! Recognising an upstream's "context length exceeded" error.
//!
//! One table, matched against the error body of a 400: the error **code** first
//! (`error.code`, or a top-level `code`), then the **message** (`error.message`, or the whole
//! body when it is not JSON), case-insensitively.

use serde_json::Value;

/// Error codes that mean the input did not fit the model's context window.
pub const CONTEXT_CODES: &[&str] = &[
    // OpenAI (and the OpenAI-compatible servers that copy it: vLLM, LiteLLM, Azure).
    "context_length_exceeded",
    // Mistral, some proxies.
    "context_window_exceeded",
    "model_context_window_exceeded",
];

/// Phrases of error messages that mean the same, by provider.
pub const CONTEXT_PHRASES: &[&str] = &[
    // OpenAI: "This model's maximum context length is 128000 tokens. However, …"
    "maximum context length",
    "context_length_exceeded",
    // Anthropic: "prompt is too long: 210000 tokens > 200000 maximum"
    "prompt is too long",
    // Bedrock / Cohere / vLLM
    "input is too long",
    "exceeds the context window",
    "too many tokens",
    // Gemini: "The input token count (…) exceeds the maximum number of tokens allowed (…)"
    "exceeds the maximum number of tokens",
    // LiteLLM's exception class in its messages
    "contextwindowexceedederror",
];

/// Whether an upstream error body says the context length was exceeded.
pub fn is_context_length_error(body: &[u8]) -> bool {
    let json = serde_json::from_slice::<Value>(body).ok();
    // Gemini's REST API sometimes wraps the error in a list.
    let root = match &json {
        Some(Value::Array(items)) => items.first(),
        other => other.as_ref(),
    };
    let error = root.and_then(|r| r.get("error"));
    let code = error.and_then(|e| e.get("code")).or_else(|| root.and_then(|r| r.get("code"))).and_then(Value::as_str);
    if code.is_some_and(|c| CONTEXT_CODES.iter().any(|k| c.eq_ignore_ascii_case(k))) {
        return true;
    }
    let message = error
        .and_then(|e| e.get("message").or(Some(e)))
        .and_then(Value::as_str)
        .or_else(|| root.and_then(|r| r.get("message")).and_then(Value::as_str));
    let text = match message {
        Some(message) => message.to_ascii_lowercase(),
        None => String::from_utf8_lossy(body).to_ascii_lowercase(),
    };
    CONTEXT_PHRASES.iter().any(|p| text.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_providers() {
        for body in [
            r#"{"error":{"message":"x","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#,
            r#"{"error":{"message":"This model's maximum context length is 16385 tokens. However, your messages resulted in 20000 tokens.","code":null}}"#,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#,
            r#"{"error":{"code":400,"message":"The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#,
            r#"[{"error":{"code":400,"message":"The input token count exceeds the maximum number of tokens allowed","status":"INVALID_ARGUMENT"}}]"#,
            r#"{"object":"error","message":"Input is too long for requested model.","code":"validation_error"}"#,
            r#"{"error":"litellm.ContextWindowExceededError: blah"}"#,
            "upstream said: Too many tokens in request",
        ] {
            assert!(is_context_length_error(body.as_bytes()), "{body}");
        }
    }

    #[test]
    fn ignores_other_errors() {
        for body in [
            r#"{"error":{"message":"Invalid value for 'temperature'","code":"invalid_value"}}"#,
            r#"{"error":{"message":"Incorrect API key provided","code":"invalid_api_key"}}"#,
            "",
            "Bad Request",
        ] {
            assert!(!is_context_length_error(body.as_bytes()), "{body}");
        }
    }
}
