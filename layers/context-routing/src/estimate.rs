//! The token estimate of a chat request: input plus requested output.
//!
//! # What is counted
//!
//! - **Messages**, OpenAI's cookbook rule: [`TOKENS_PER_MESSAGE`] per message, plus the tokens of
//!   its `role`, its content, its `name` (plus [`TOKENS_PER_NAME`]), its `tool_call_id`, and of
//!   each tool call's function `name` and `arguments` (plus [`TOKENS_PER_TOOL_CALL`]), or of the
//!   legacy `function_call`; then [`REPLY_PRIMING`] once for the reply.
//! - **Content**: a string, or a list of parts: `text` (and `refusal`) parts count their text,
//!   `image_url` parts a flat estimate (below). Other parts (audio, files) are not counted.
//! - **Definitions**: each `tools` / `functions` entry and an object `response_format`, counted
//!   as their compact JSON serialisation (OpenAI renders them differently, at a similar size).
//! - A legacy `prompt` (string or list of strings).
//! - **Output**: `max_completion_tokens`, else `max_tokens`, else nothing.
//!
//! **Images** count a flat [`IMAGE_TOKENS_LOW`] (85) with `"detail": "low"`, else
//! [`IMAGE_TOKENS_HIGH`] (765): OpenAI's rule for a high-detail 512×512-tile image of
//! 1024×1024 (85 base + 4 tiles × 170). Larger images can cost more; the gateway does not
//! download images to find out.
//!
//! # Tokenizers
//!
//! [`Tokenizer::for_model`] picks `o200k_base` for gpt-4o, gpt-4.1, gpt-4.5, gpt-5 and the
//! o-series, `cl100k_base` for gpt-4 and gpt-3.5 (tiktoken's tables from `tiktoken-rs`, counted by a
//! compact counter of this crate, loaded once), and for
//! every other model a bytes-based estimate: **⌈text bytes / 3⌉**, deliberately conservative
//! (English averages about 4 bytes per token on current tokenizers, code and non-Latin scripts
//! fewer), plus the same overheads.
//!
//! # Fast path
//!
//! Every token of a byte-level BPE covers at least one byte, so the tokens of a text are at
//! most its UTF-8 byte count. One pass over the parsed request, without tokenizing or
//! allocating, gives the **bound**: the bytes of every counted text (exactly the texts the
//! tokenizer would see, JSON definitions measured by a counting writer) plus the overheads,
//! images and requested output. When the bound fits the window the request fits, and it is not
//! tokenized at all; the estimate is then the bound, marked `estimated`.
//!
//! # Sampling huge texts
//!
//! Tokenizing is ~25 ms per MiB. A request whose bound passes the window is first counted with
//! every text over [`SAMPLE_ABOVE`] (64 KiB) **sampled**: [`SAMPLE_SLICES`] slices spread evenly
//! over the text are tokenized and their tokens per byte extrapolated to the whole text (marked
//! `estimated`; a slice cut inside a word counts a token more, so the error leans high). Only
//! when that count lands within [`SAMPLE_MARGIN`] (⅛) of the window, where the routing decision
//! could flip, is the request counted exactly. A 1 MiB prompt far over (or under) its window is
//! decided in about a millisecond; exact counts near the window's edge are kept.

use std::{io, sync::OnceLock};

use llmgate_core::{catalog::ModelSpec, ext::TokenEstimate};
use serde_json::{Map, Value};

use crate::bpe::{CL100K_PATTERN, TokenCounter};

/// Tokens every message costs besides its fields (OpenAI cookbook, gpt-3.5 and later).
pub const TOKENS_PER_MESSAGE: u64 = 3;
/// Extra tokens of a message's `name`.
pub const TOKENS_PER_NAME: u64 = 1;
/// Tokens that prime the reply, once per request with messages.
pub const REPLY_PRIMING: u64 = 3;
/// Tokens every tool call costs besides its name and arguments (an estimate).
pub const TOKENS_PER_TOOL_CALL: u64 = 3;
/// A low-detail image.
pub const IMAGE_TOKENS_LOW: u64 = 85;
/// A high-detail or `auto` image, counted as one 1024×1024 image (85 + 4 × 170).
pub const IMAGE_TOKENS_HIGH: u64 = 765;
/// Bytes per token of the bytes-based estimate.
pub const BYTES_PER_TOKEN: u64 = 3;
/// Texts longer than this (bytes) are counted on a sample first.
pub const SAMPLE_ABOVE: usize = 64 * 1024;
/// Slices tokenized per sampled text.
pub const SAMPLE_SLICES: usize = 16;
/// Bytes per slice (at most; cut back to a character boundary).
pub const SAMPLE_SLICE_BYTES: usize = 2 * 1024;
/// A sampled count this close to the window (a fraction of it: `window / SAMPLE_MARGIN`) is
/// redone exactly.
pub const SAMPLE_MARGIN: u64 = 8;

// Each tokenizer takes a few hundred ms to load (and ~50 MB while it does, ~4 MB after):
// loaded on first need only.
static O200K: OnceLock<Option<TokenCounter>> = OnceLock::new();
static CL100K: OnceLock<Option<TokenCounter>> = OnceLock::new();

fn load<E: std::fmt::Display>(
    name: &str,
    tables: fn() -> Result<tiktoken_rs::CoreBPE, E>,
    pattern: &str,
) -> Option<TokenCounter> {
    let counter = match tables() {
        Ok(bpe) => TokenCounter::new(&bpe, pattern),
        Err(error) => Err(error.to_string()),
    };
    match counter {
        Ok(counter) => Some(counter),
        Err(error) => {
            tracing::error!(%error, "could not load the {name} tokenizer; using the bytes-based estimate");
            None
        }
    }
}

/// Loads both tokenizers now (~4 MB each once loaded, a sizeable fraction of a second), so that the first
/// request that needs one does not pay for it. Call it off the async runtime's worker threads.
/// Without it each loads when first needed, on tokio's blocking pool (see the crate docs).
pub fn warm_up() {
    for tokenizer in [Tokenizer::O200k, Tokenizer::Cl100k] {
        tokenizer.load();
    }
}

// === Tokenizer ===

/// How a model's tokens are counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tokenizer {
    /// `o200k_base`: gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, o4.
    O200k,
    /// `cl100k_base`: gpt-4, gpt-3.5.
    Cl100k,
    /// ⌈bytes / 3⌉: every other model.
    Bytes,
}

impl Tokenizer {
    /// The tokenizer of `model` (the name sent upstream, with any `provider/` prefix).
    pub fn for_name(model: &str) -> Self {
        let base = model.rsplit('/').next().unwrap_or(model).to_ascii_lowercase();
        let starts = |prefixes: &[&str]| prefixes.iter().any(|p| base.starts_with(p));
        if starts(&["gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4"]) {
            Self::O200k
        } else if starts(&["gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada-002"]) {
            Self::Cl100k
        } else {
            Self::Bytes
        }
    }

    /// The tokenizer of a catalogue model: by its `upstream_model`, else its name.
    pub fn for_model(spec: &ModelSpec) -> Self {
        Self::for_name(spec.upstream_model.as_deref().unwrap_or(&spec.name))
    }

    /// The tokenizer's tables, loaded on first use (blocking).
    fn bpe(self) -> Option<&'static TokenCounter> {
        match self {
            Self::O200k => O200K
                .get_or_init(|| load("o200k_base", tiktoken_rs::o200k_base, tiktoken_rs::O200K_BASE_PAT_STR))
                .as_ref(),
            Self::Cl100k => {
                CL100K.get_or_init(|| load("cl100k_base", tiktoken_rs::cl100k_base, CL100K_PATTERN)).as_ref()
            }
            Self::Bytes => None,
        }
    }

    /// Whether every tokenizer is loaded, so that counting never waits for a load.
    pub fn all_loaded() -> bool {
        O200K.get().is_some() && CL100K.get().is_some()
    }

    /// Whether counting with this tokenizer would not wait for its tables to load (always for
    /// [`Tokenizer::Bytes`], which has none).
    pub fn is_loaded(self) -> bool {
        match self {
            Self::O200k => O200K.get().is_some(),
            Self::Cl100k => CL100K.get().is_some(),
            Self::Bytes => true,
        }
    }

    /// Loads the tables now, if not yet (blocking: a few hundred ms; ~4 MB each once loaded).
    pub fn load(self) {
        let _ = self.bpe();
    }
}

// === Estimate ===

/// How an [`Estimate`] was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The fast-path upper bound (bytes plus overheads); nothing was tokenized.
    Bound,
    /// The model's own tokenizer.
    Tokenizer,
    /// The model's own tokenizer on a sample of the huge texts, extrapolated.
    Sampled,
    /// The bytes-based estimate.
    Bytes,
}

/// A request's size in tokens for one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Input plus requested output.
    pub tokens: u64,
    /// How it was computed.
    pub method: Method,
}

impl Estimate {
    /// The request extension: `estimated` unless counted by the model's tokenizer.
    pub fn token_estimate(&self) -> TokenEstimate {
        TokenEstimate { tokens: self.tokens, estimated: self.method != Method::Tokenizer }
    }

    /// Whether it fits `window`.
    pub fn fits(&self, window: u64) -> bool {
        self.tokens <= window
    }
}

/// Estimates one request for any number of models, tokenizing each family at most once.
///
/// ```
/// use llmgate_context_routing::estimate::{Method, RequestEstimator, Tokenizer};
///
/// let body = serde_json::json!({"model": "gpt-4o", "max_tokens": 10,
///     "messages": [{"role": "user", "content": "Hello world"}]});
/// let mut estimator = RequestEstimator::new(body.as_object().unwrap());
/// // 3 (message) + "user" (4 bytes) + "Hello world" (11 bytes) + 3 (reply) + 10 (output)
/// assert_eq!(estimator.bound(), 31);
/// let fast = estimator.estimate(Tokenizer::O200k, Some(128_000));
/// assert_eq!(fast.method, Method::Bound);
/// let exact = estimator.estimate(Tokenizer::O200k, Some(20));
/// assert_eq!((exact.tokens, exact.method), (3 + 1 + 2 + 3 + 10, Method::Tokenizer));
/// ```
#[derive(Debug)]
pub struct RequestEstimator<'a> {
    json: &'a Map<String, Value>,
    size: Size,
    o200k: Option<Count>,
    cl100k: Option<Count>,
    tokenized: u32,
    load_waits: u32,
}

/// A tokenizer's count of the texts.
#[derive(Clone, Copy, Debug)]
struct Count {
    tokens: u64,
    sampled: bool,
}

/// The result of the bound pass.
#[derive(Clone, Copy, Debug, Default)]
struct Size {
    /// Bytes of every counted text.
    text_bytes: u64,
    /// Overheads, images and requested output: the same for every tokenizer.
    fixed: u64,
}

impl<'a> RequestEstimator<'a> {
    /// Measures `json` (one pass, no tokenizing).
    pub fn new(json: &'a Map<String, Value>) -> Self {
        let mut size = Size::default();
        walk(json, &mut |piece| match piece {
            Piece::Text(text) => size.text_bytes += text.len() as u64,
            Piece::Json(value) => size.text_bytes += json_len(value),
            Piece::Tokens(n) => size.fixed = size.fixed.saturating_add(n),
        });
        size.fixed = size.fixed.saturating_add(requested_output(json));
        Self { json, size, o200k: None, cl100k: None, tokenized: 0, load_waits: 0 }
    }

    /// The fast-path upper bound: no tokenizer counts more.
    pub fn bound(&self) -> u64 {
        self.size.text_bytes.saturating_add(self.size.fixed)
    }

    /// Bytes of the texts a tokenizer would have to read.
    pub fn text_bytes(&self) -> u64 {
        self.size.text_bytes
    }

    /// How many times this estimator ran a tokenizer over the request.
    pub fn tokenizer_runs(&self) -> u32 {
        self.tokenized
    }

    /// How many times this estimator needed a tokenizer whose tables were not loaded yet (and
    /// so waited for them).
    pub fn tokenizer_load_waits(&self) -> u32 {
        self.load_waits
    }

    /// The estimate for a model counted by `tokenizer` with context `window` (if known): the
    /// bound when it fits the window, else the tokenizer's count, sampled when that is far
    /// enough from the window (see the [module docs](self)); the bytes estimate for
    /// [`Tokenizer::Bytes`]. Counts are kept, so each tokenizer runs at most twice (sampled,
    /// then exact).
    pub fn estimate(&mut self, tokenizer: Tokenizer, window: Option<u64>) -> Estimate {
        let fixed = self.size.fixed;
        let mut no_slot = None;
        let slot = match tokenizer {
            Tokenizer::O200k => &mut self.o200k,
            Tokenizer::Cl100k => &mut self.cl100k,
            Tokenizer::Bytes => &mut no_slot,
        };
        let bytes_estimate = Estimate {
            tokens: self.size.text_bytes.div_ceil(BYTES_PER_TOKEN).saturating_add(fixed),
            method: Method::Bytes,
        };
        if tokenizer == Tokenizer::Bytes {
            return bytes_estimate;
        }
        // The bound needs no tables: a request that fits by it never loads a tokenizer.
        let bound = self.size.text_bytes.saturating_add(fixed);
        if slot.is_none() && window.is_none_or(|w| bound <= w) {
            return Estimate { tokens: bound, method: Method::Bound };
        }
        if !tokenizer.is_loaded() {
            self.load_waits += 1;
        }
        let Some(bpe) = tokenizer.bpe() else {
            return bytes_estimate;
        };
        let decides = |count: &Count| {
            !count.sampled || window.is_none_or(|w| count.tokens.saturating_add(fixed).abs_diff(w) > w / SAMPLE_MARGIN)
        };
        let count = match *slot {
            Some(count) if decides(&count) => count,
            Some(_) => {
                self.tokenized += 1;
                *slot.insert(count(self.json, bpe, false))
            }
            None => {
                self.tokenized += 1;
                let sampled = count(self.json, bpe, true);
                if decides(&sampled) {
                    *slot.insert(sampled)
                } else {
                    self.tokenized += 1;
                    *slot.insert(count(self.json, bpe, false))
                }
            }
        };
        let method = if count.sampled { Method::Sampled } else { Method::Tokenizer };
        Estimate { tokens: count.tokens.saturating_add(fixed), method }
    }

    /// The estimate for a catalogue model, by its tokenizer and window.
    pub fn estimate_for(&mut self, spec: &ModelSpec) -> Estimate {
        self.estimate(Tokenizer::for_model(spec), spec.context_window)
    }
}

/// The estimate of `json` for `spec`: the function the layer runs (and the benchmark measures).
pub fn estimate(json: &Map<String, Value>, spec: &ModelSpec) -> Estimate {
    RequestEstimator::new(json).estimate_for(spec)
}

/// `max_completion_tokens`, else `max_tokens`, else 0.
fn requested_output(json: &Map<String, Value>) -> u64 {
    ["max_completion_tokens", "max_tokens"].iter().find_map(|key| json.get(*key).and_then(Value::as_u64)).unwrap_or(0)
}

/// The tokens of every counted text (without the fixed part); with `sample`, texts over
/// [`SAMPLE_ABOVE`] are counted on a sample.
fn count(json: &Map<String, Value>, bpe: &TokenCounter, sample: bool) -> Count {
    let mut total = Count { tokens: 0, sampled: false };
    let mut add = |text: &str| {
        let (tokens, sampled) = match sample && text.len() > SAMPLE_ABOVE {
            true => (count_sample(text, bpe), true),
            false => (bpe.count(text) as u64, false),
        };
        total.tokens = total.tokens.saturating_add(tokens);
        total.sampled |= sampled;
    };
    walk(json, &mut |piece| match piece {
        Piece::Text(text) => add(text),
        Piece::Json(value) => add(&value.to_string()),
        Piece::Tokens(_) => {}
    });
    total
}

/// `text`'s tokens extrapolated from [`SAMPLE_SLICES`] slices spread evenly over it.
fn count_sample(text: &str, bpe: &TokenCounter) -> u64 {
    let floor = |mut i: usize| {
        while !text.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let stride = text.len() / SAMPLE_SLICES;
    let (mut bytes, mut tokens) = (0u64, 0u64);
    for slice in 0..SAMPLE_SLICES {
        let start = floor(slice * stride);
        let end = floor((start + SAMPLE_SLICE_BYTES).min(text.len()));
        bytes += (end - start) as u64;
        tokens += bpe.count(&text[start..end]) as u64;
    }
    if bytes == 0 {
        return 0;
    }
    // Rounded up; u128 keeps `tokens × len` exact.
    (u128::from(tokens) * text.len() as u128).div_ceil(u128::from(bytes)) as u64
}

// === The walk ===

enum Piece<'a> {
    /// A text to tokenize.
    Text(&'a str),
    /// A definition, tokenized as its compact JSON.
    Json(&'a Value),
    /// Tokens that do not depend on the tokenizer.
    Tokens(u64),
}

/// Calls `f` with every counted piece of the request, in a fixed order.
fn walk<'a>(json: &'a Map<String, Value>, f: &mut impl FnMut(Piece<'a>)) {
    if let Some(messages) = json.get("messages").and_then(Value::as_array) {
        for message in messages.iter().filter_map(Value::as_object) {
            f(Piece::Tokens(TOKENS_PER_MESSAGE));
            if let Some(role) = message.get("role").and_then(Value::as_str) {
                f(Piece::Text(role));
            }
            content(message.get("content"), f);
            if let Some(refusal) = message.get("refusal").and_then(Value::as_str) {
                f(Piece::Text(refusal));
            }
            if let Some(name) = message.get("name").and_then(Value::as_str) {
                f(Piece::Text(name));
                f(Piece::Tokens(TOKENS_PER_NAME));
            }
            if let Some(id) = message.get("tool_call_id").and_then(Value::as_str) {
                f(Piece::Text(id));
            }
            let calls = message.get("tool_calls").and_then(Value::as_array);
            for call in calls.into_iter().flatten() {
                f(Piece::Tokens(TOKENS_PER_TOOL_CALL));
                function(call.get("function"), f);
            }
            if let Some(call) = message.get("function_call") {
                f(Piece::Tokens(TOKENS_PER_TOOL_CALL));
                function(Some(call), f);
            }
        }
        if !messages.is_empty() {
            f(Piece::Tokens(REPLY_PRIMING));
        }
    }
    match json.get("prompt") {
        Some(Value::String(prompt)) => f(Piece::Text(prompt)),
        Some(Value::Array(prompts)) => prompts.iter().filter_map(Value::as_str).for_each(|p| f(Piece::Text(p))),
        _ => {}
    }
    for key in ["tools", "functions"] {
        if let Some(definitions) = json.get(key).and_then(Value::as_array) {
            definitions.iter().for_each(|d| f(Piece::Json(d)));
        }
    }
    if let Some(format) = json.get("response_format").filter(|v| v.is_object()) {
        f(Piece::Json(format));
    }
}

fn content<'a>(content: Option<&'a Value>, f: &mut impl FnMut(Piece<'a>)) {
    match content {
        Some(Value::String(text)) => f(Piece::Text(text)),
        Some(Value::Array(parts)) => {
            for part in parts {
                match part {
                    Value::String(text) => f(Piece::Text(text)),
                    Value::Object(part) => match part.get("type").and_then(Value::as_str) {
                        Some("text" | "input_text") => {
                            if let Some(text) = part.get("text").and_then(Value::as_str) {
                                f(Piece::Text(text));
                            }
                        }
                        Some("refusal") => {
                            if let Some(text) = part.get("refusal").and_then(Value::as_str) {
                                f(Piece::Text(text));
                            }
                        }
                        Some("image_url" | "input_image") => f(Piece::Tokens(image(part))),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

fn image(part: &Map<String, Value>) -> u64 {
    let detail =
        part.get("image_url").and_then(|i| i.get("detail")).or_else(|| part.get("detail")).and_then(Value::as_str);
    if detail == Some("low") { IMAGE_TOKENS_LOW } else { IMAGE_TOKENS_HIGH }
}

fn function<'a>(function: Option<&'a Value>, f: &mut impl FnMut(Piece<'a>)) {
    let Some(function) = function.and_then(Value::as_object) else {
        return;
    };
    for key in ["name", "arguments"] {
        if let Some(text) = function.get(key).and_then(Value::as_str) {
            f(Piece::Text(text));
        }
    }
}

/// The length of `value`'s compact JSON, without building it.
fn json_len(value: &Value) -> u64 {
    struct Counter(u64);
    impl io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    fn bpe_count(tokenizer: Tokenizer, text: &str) -> u64 {
        let json = obj(json!({"prompt": text}));
        let mut estimator = RequestEstimator::new(&json);
        let estimate = estimator.estimate(tokenizer, Some(0));
        assert_eq!(estimate.method, Method::Tokenizer);
        estimate.tokens
    }

    // Counts computed once with tiktoken (tiktoken-rs 0.12.1, `encode_ordinary`); the first two
    // are also the widely published cl100k counts.
    #[test]
    fn tokenizers_match_known_counts() {
        let texts: [(&str, u64, u64); 4] = [
            ("Hello world", 2, 2),
            ("The quick brown fox jumps over the lazy dog.", 10, 10),
            ("fn main() { println!(\"hi\"); }", 9, 9),
            ("Ünïcödé — 日本語のテキスト", 12, 16),
        ];
        for (text, o200k, cl100k) in texts {
            assert_eq!(bpe_count(Tokenizer::O200k, text), o200k, "o200k {text:?}");
            assert_eq!(bpe_count(Tokenizer::Cl100k, text), cl100k, "cl100k {text:?}");
        }
    }

    #[test]
    fn tokenizer_families() {
        for (name, want) in [
            ("gpt-4o", Tokenizer::O200k),
            ("openai/gpt-4o-mini", Tokenizer::O200k),
            ("gpt-4.1-mini", Tokenizer::O200k),
            ("o1-mini", Tokenizer::O200k),
            ("o3", Tokenizer::O200k),
            ("gpt-4-turbo", Tokenizer::Cl100k),
            ("gpt-3.5-turbo", Tokenizer::Cl100k),
            ("gemini/gemini-2.5-pro", Tokenizer::Bytes),
            ("claude-3-5-sonnet", Tokenizer::Bytes),
        ] {
            assert_eq!(Tokenizer::for_name(name), want, "{name}");
        }
        let aliased =
            ModelSpec { name: "fast".into(), upstream_model: Some("gpt-4o-mini".into()), ..ModelSpec::default() };
        assert_eq!(Tokenizer::for_model(&aliased), Tokenizer::O200k);
    }

    #[test]
    fn counts_every_part_of_a_chat_request() {
        let json = obj(json!({
            "model": "gpt-4o",
            "max_completion_tokens": 100,
            "max_tokens": 7,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "name": "ann", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "look", "arguments": "{\"q\":1}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "a cat"}
            ],
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]
        }));
        let tool = json!({"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}});
        let texts = [
            "system",
            "Be brief.",
            "user",
            "What is this?",
            "ann",
            "assistant",
            "look",
            "{\"q\":1}",
            "tool",
            "a cat",
            "c1",
        ];
        let text_bytes: u64 = texts.iter().map(|t| t.len() as u64).sum::<u64>() + tool.to_string().len() as u64;
        let fixed = 4 * TOKENS_PER_MESSAGE
            + TOKENS_PER_NAME
            + TOKENS_PER_TOOL_CALL
            + IMAGE_TOKENS_LOW
            + IMAGE_TOKENS_HIGH
            + REPLY_PRIMING
            + 100;
        let mut estimator = RequestEstimator::new(&json);
        assert_eq!(estimator.text_bytes(), text_bytes);
        assert_eq!(estimator.bound(), text_bytes + fixed);

        let bpe = Tokenizer::O200k.bpe().unwrap();
        let text_tokens: u64 =
            texts.iter().map(|t| bpe.count(t) as u64).sum::<u64>() + bpe.count(&tool.to_string()) as u64;
        let exact = estimator.estimate(Tokenizer::O200k, Some(1));
        assert_eq!(exact, Estimate { tokens: text_tokens + fixed, method: Method::Tokenizer });
        assert!(!exact.token_estimate().estimated);

        let bytes = estimator.estimate(Tokenizer::Bytes, Some(1));
        assert_eq!(bytes.tokens, text_bytes.div_ceil(3) + fixed);
        assert!(bytes.token_estimate().estimated);
    }

    #[test]
    fn fast_path_does_not_tokenize_and_slow_path_tokenizes_once() {
        let text = "word ".repeat(800); // 4,000 bytes
        let json = obj(json!({"messages": [{"role": "user", "content": text}]}));
        let mut estimator = RequestEstimator::new(&json);
        let fast = estimator.estimate(Tokenizer::O200k, Some(128_000));
        assert_eq!(fast.method, Method::Bound);
        assert_eq!(fast.tokens, estimator.bound());
        assert!(fast.token_estimate().estimated);
        assert_eq!(estimator.tokenizer_runs(), 0);

        let slow = estimator.estimate(Tokenizer::O200k, Some(1_000));
        assert_eq!(slow.method, Method::Tokenizer);
        assert!(slow.tokens < fast.tokens);
        let again = estimator.estimate(Tokenizer::O200k, Some(500));
        assert_eq!(again, slow);
        assert_eq!(estimator.tokenizer_runs(), 1);
    }

    /// Varied prose-like text of about `bytes` bytes (a fixed pseudo-random word order).
    fn prose(bytes: usize) -> String {
        use rand::{Rng, SeedableRng};
        let words = ["the", "model", "routes", "a", "prompt", "to", "Übergröße", "where", "it", "fits,", "数据", "\n"];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut text = String::with_capacity(bytes + 16);
        while text.len() < bytes {
            text.push_str(words[rng.random_range(0..words.len())]);
            text.push(' ');
        }
        text
    }

    #[test]
    fn huge_texts_far_from_the_window_are_sampled_near_it_counted() {
        let json = obj(json!({"messages": [{"role": "user", "content": prose(256 * 1024)}]}));
        let bpe = Tokenizer::O200k.bpe().unwrap();
        let fixed = RequestEstimator::new(&json).size.fixed;
        let exact = Estimate { tokens: count(&json, bpe, false).tokens + fixed, method: Method::Tokenizer };

        // Far over a small window: the sample decides, close to the exact count.
        let mut estimator = RequestEstimator::new(&json);
        let sampled = estimator.estimate(Tokenizer::O200k, Some(exact.tokens / 4));
        assert_eq!(sampled.method, Method::Sampled);
        assert!(sampled.token_estimate().estimated);
        let error = sampled.tokens.abs_diff(exact.tokens) as f64 / exact.tokens as f64;
        assert!(error < 0.03, "sampled {} vs exact {}", sampled.tokens, exact.tokens);
        assert_eq!(estimator.tokenizer_runs(), 1);
        // Far under a larger window, the same sample serves.
        assert_eq!(estimator.estimate(Tokenizer::O200k, Some(exact.tokens * 4)), sampled);
        assert_eq!(estimator.tokenizer_runs(), 1);
        // Near a window, the exact count decides (and is kept).
        assert_eq!(estimator.estimate(Tokenizer::O200k, Some(exact.tokens)), exact);
        assert_eq!(estimator.estimate(Tokenizer::O200k, Some(exact.tokens / 4)), exact);
        assert_eq!(estimator.tokenizer_runs(), 2);

        // Near the window from the start: sampled, then counted exactly.
        let mut estimator = RequestEstimator::new(&json);
        assert_eq!(estimator.estimate(Tokenizer::O200k, Some(exact.tokens - 1)), exact);
        assert_eq!(estimator.tokenizer_runs(), 2);
    }

    #[test]
    fn bound_is_never_below_the_count() {
        let samples = [
            json!({"messages": [{"role": "user", "content": "\u{1F600}\u{1F600} 日本語 aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}]}),
            json!({"messages": [{"role": "user", "content": " ".repeat(300)}], "tools": [{"x": 1e2, "y": [1.5, -0.0]}]}),
            json!({"messages": [], "prompt": ["a", "b\n\n\nc"]}),
        ];
        for sample in samples {
            let json = obj(sample);
            let mut estimator = RequestEstimator::new(&json);
            for tokenizer in [Tokenizer::O200k, Tokenizer::Cl100k, Tokenizer::Bytes] {
                let count = estimator.estimate(tokenizer, Some(0));
                assert!(count.tokens <= estimator.bound(), "{tokenizer:?}");
            }
        }
    }

    #[test]
    fn odd_shapes_do_not_panic() {
        for value in [
            json!({}),
            json!({"messages": [1, "x", null, {"content": [1, {"type": 3}, {"type": "text"}]}]}),
            json!({"messages": [{"tool_calls": [{"function": "x"}], "function_call": 3}], "tools": "x", "max_tokens": -1}),
        ] {
            let json = obj(value);
            let mut estimator = RequestEstimator::new(&json);
            let _ = estimator.estimate(Tokenizer::O200k, Some(0));
        }
    }
}
