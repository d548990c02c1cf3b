//! Typed request and response extensions: the only way layers talk to each other.
//!
//! Each type says which layer writes it and which read it. A layer that finds an optional
//! extension missing skips its work; one that needs a missing extension fails closed with
//! [`GatewayError::MissingContext`](crate::GatewayError::MissingContext).
//!
//! | Extension | Written by | Read by |
//! |---|---|---|
//! | [`RouteMeta`] | path-metadata | credentials, insertion-id, routes |
//! | [`AccountInfo`] (also on the response) | auth (credentials) | auth (project checks), rate-limit-fallback (per-key limits), metrics and logs (the key's name) |
//! | [`LlmRequest`] | `DecodeJson` | every chat layer, `EncodeJson` |
//! | [`BodyEdits`] | credentials, insertion-id, routing layers | `EncodeJson` |
//! | [`Project`] | credentials | langfuse |
//! | [`BaseUrlOverride`] | credentials | target resolution |
//! | [`ClientScope`] | credentials | credentials (upstream key), rate-limit-fallback |
//! | [`InsertionId`], [`RolloutTags`] | insertion-id | langfuse |
//! | [`ModelChoice`] | routing layers | target resolution, langfuse, metrics |
//! | [`UpstreamTarget`] | target resolution | credentials (upstream key), `EncodeJson`, upstream |
//! | [`FallbackEvents`] | langfuse | routing layers |
//! | [`TokenEstimate`] | context-routing | rate-limit-fallback, langfuse |
//! | response: [`ServedBy`] | rate-limit-fallback | langfuse, metrics, logging |
//! | response: [`CredentialScope`] | credentials (upstream key) | rate-limit-fallback |
//! | response: [`UsageOutcome`](crate::usage::UsageOutcome) | whichever layer taps first | insertion-id, langfuse, rate limits, metrics |

use std::{fmt, sync::Arc};

use bytes::Bytes;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::catalog::Limits;

// === RouteMeta ===

/// What the path says about a request, parsed once by the path-metadata layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteMeta {
    /// Which kind of route this is.
    pub kind: RouteKind,
    /// The `project_id` path segment, if any.
    pub project: Option<String>,
    /// The five rollout ids, present together or not at all.
    pub rollout: Option<RolloutIds>,
    /// The raw `encoded_base_url` segment, if any (decoded by the credentials layer).
    pub encoded_base_url: Option<String>,
}

/// The kinds of route the gateway knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// `…/chat/completions`.
    ChatCompletions,
    /// `…/traces`.
    Traces,
    /// `…/traces/pointwise`.
    TracesPointwise,
    /// `…/logs`: a rollout's log entries (`POST` writes one, `GET` searches them).
    Logs,
    /// `…/status`: a rollout's newest status.
    Status,
}

impl RouteKind {
    /// Whether the route answers errors as `{"detail": "…"}` (the traces, logs and status
    /// routes, as the original gateway's, whose clients parse it) rather than OpenAI-style.
    pub fn answers_detail(self) -> bool {
        !matches!(self, Self::ChatCompletions)
    }
}

/// The five ids of an Eval Protocol rollout route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutIds {
    /// `rollout_id`.
    pub rollout_id: String,
    /// `invocation_id`.
    pub invocation_id: String,
    /// `experiment_id`.
    pub experiment_id: String,
    /// `run_id`.
    pub run_id: String,
    /// `row_id`.
    pub row_id: String,
}

// === AccountInfo ===

/// Who the auth provider says the caller is, and what it may use. Never holds a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountInfo {
    /// The account id: a gateway key's configured name, or the identity an external provider
    /// gave. Shown in logs and metrics.
    pub account_id: String,
    /// The projects it may use.
    pub projects: ProjectAccess,
    /// Its own rate limits, counted over every model it uses, if any.
    pub limits: Option<Limits>,
}

impl AccountInfo {
    /// An account that may use every project, without limits of its own.
    pub fn unrestricted(account_id: impl Into<String>) -> Self {
        Self { account_id: account_id.into(), projects: ProjectAccess::All, limits: None }
    }
}

/// The projects an account may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProjectAccess {
    /// Every project (`projects: ["*"]`, and every `auth.api_keys` key).
    All,
    /// These projects only.
    Only(Arc<[String]>),
}

impl ProjectAccess {
    /// Whether `project` may be used.
    pub fn allows(&self, project: &str) -> bool {
        match self {
            Self::All => true,
            Self::Only(projects) => projects.iter().any(|p| p == project),
        }
    }

    /// The one project of an account bound to exactly one.
    pub fn single(&self) -> Option<&str> {
        match self {
            Self::Only(projects) if projects.len() == 1 => projects.first().map(String::as_str),
            _ => None,
        }
    }
}

// === Secret ===

/// A string that never shows in `Debug` or `Display` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Self(value.into())
    }

    /// The secret value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

// === LlmRequest ===

/// The chat request body, read once and parsed once. Immutable: changes are [`BodyEdits`].
///
/// Cloning is a reference-count bump, so a fallback attempt costs no copy and no re-parse.
#[derive(Clone)]
pub struct LlmRequest(Arc<LlmRequestInner>);

struct LlmRequestInner {
    raw: Bytes,
    json: Map<String, Value>,
}

impl LlmRequest {
    /// Wraps a parsed body and the bytes it was parsed from.
    pub fn new(raw: Bytes, json: Map<String, Value>) -> Self {
        Self(Arc::new(LlmRequestInner { raw, json }))
    }

    /// The bytes as the client sent them.
    pub fn raw(&self) -> &Bytes {
        &self.0.raw
    }

    /// The parsed body.
    pub fn json(&self) -> &Map<String, Value> {
        &self.0.json
    }

    /// The `model` the client asked for.
    pub fn model(&self) -> Option<&str> {
        self.0.json.get("model").and_then(Value::as_str)
    }

    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.0.json.get("stream").and_then(Value::as_bool).unwrap_or(false)
    }

    /// The client's own `metadata.tags` (strings only).
    pub fn client_tags(&self) -> impl Iterator<Item = &str> {
        self.0
            .json
            .get("metadata")
            .and_then(|m| m.get("tags"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
    }
}

impl fmt::Debug for LlmRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Prompts are user data: show the shape, not the content.
        f.debug_struct("LlmRequest")
            .field("bytes", &self.0.raw.len())
            .field("model", &self.model())
            .field("stream", &self.is_stream())
            .finish()
    }
}

// === UpstreamMode, UpstreamTarget ===

/// How an upstream wants gateway data delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    /// An OpenAI-compatible API: nothing gateway-specific goes into the body.
    #[default]
    #[serde(rename = "openai")]
    OpenAi,
    /// A LiteLLM proxy: tags, Langfuse keys and the like go into the body.
    #[serde(rename = "litellm")]
    LiteLlm,
}

/// Where the current attempt goes.
#[derive(Clone, Debug)]
pub struct UpstreamTarget {
    /// The upstream's configured name.
    pub name: Arc<str>,
    /// The base URL; routes are joined to it.
    pub base_url: Arc<str>,
    /// The body conventions of this upstream.
    pub mode: UpstreamMode,
    /// The server-side key that replaces the client's `Authorization`, if configured.
    pub api_key: Option<Secret>,
}

// === BodyEdits ===

/// Which upstream modes a body edit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditScope {
    /// Every attempt.
    Always,
    /// Only attempts to an upstream of this mode.
    Mode(UpstreamMode),
}

/// Top-level body changes, applied by `EncodeJson` once per attempt, for that attempt's mode.
///
/// Edits are kept apart from the parsed body so that a fallback attempt, which may go to an
/// upstream of another mode, starts from the client's body and applies only what fits.
#[derive(Clone, Debug, Default)]
pub struct BodyEdits {
    edits: Vec<BodyEdit>,
}

#[derive(Clone, Debug)]
struct BodyEdit {
    key: &'static str,
    value: Option<Value>,
    scope: EditScope,
}

impl BodyEdits {
    /// Sets top-level `key` to `value` (replacing an earlier edit of the same key and scope).
    pub fn set(&mut self, key: &'static str, value: Value, scope: EditScope) {
        self.put(key, Some(value), scope);
    }

    /// Removes top-level `key`.
    pub fn remove(&mut self, key: &'static str, scope: EditScope) {
        self.put(key, None, scope);
    }

    fn put(&mut self, key: &'static str, value: Option<Value>, scope: EditScope) {
        match self.edits.iter_mut().find(|e| e.key == key && e.scope == scope) {
            Some(edit) => edit.value = value,
            None => self.edits.push(BodyEdit { key, value, scope }),
        }
    }

    /// The edits that apply to `mode`, later ones winning; `None` as value means remove.
    pub fn for_mode(&self, mode: UpstreamMode) -> impl Iterator<Item = (&'static str, Option<&Value>)> {
        self.edits
            .iter()
            .filter(move |e| e.scope == EditScope::Always || e.scope == EditScope::Mode(mode))
            .map(|e| (e.key, e.value.as_ref()))
    }

    /// Whether any edit applies to `mode`.
    pub fn any_for(&self, mode: UpstreamMode) -> bool {
        self.for_mode(mode).next().is_some()
    }
}

// === Project ===

/// The resolved project of a request and its Langfuse keys (`Debug` redacts the secret).
#[derive(Clone, Debug)]
pub struct Project {
    /// The project id.
    pub id: Arc<str>,
    /// The project's Langfuse keys.
    pub langfuse: LangfuseKeys,
}

/// A Langfuse project's key pair.
#[derive(Clone, Debug)]
pub struct LangfuseKeys {
    /// `pk-lf-…` (not secret, but only shown where needed).
    pub public_key: Arc<str>,
    /// `sk-lf-…`.
    pub secret_key: Secret,
}

/// A per-request upstream base URL taken from an allowed `encoded_base_url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrlOverride(pub Arc<str>);

// === ScopeId, ClientScope, CredentialScope ===

/// A digest that names credentials or an endpoint without revealing them (the credentials
/// layer writes 32 hex digits of a SHA-256), safe to put in store keys and logs.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeId(Arc<str>);

impl ScopeId {
    /// Wraps an already computed digest. Never pass a secret: the id ends up in store keys.
    pub fn new(digest: impl Into<Arc<str>>) -> Self {
        Self(digest.into())
    }

    /// The digest.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ScopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeId({})", self.0)
    }
}

impl fmt::Display for ScopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a client brought that can reach a provider: its own `Authorization` (when the gateway
/// does not consume it as its own key) and the `encoded_base_url` it chose, as one digest.
/// Absent when the client brought neither.
///
/// Written on the request before the routing layers, so that they can tell, before an
/// attempt, which cooldowns apply to this client (see [`CredentialScope`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientScope {
    /// The digest of the client's credentials and endpoint.
    pub id: ScopeId,
    /// Whether the client chose the endpoint (`encoded_base_url`): every attempt then goes to
    /// it, never to a configured upstream's host.
    pub endpoint: bool,
}

/// Response extension: whose credentials and endpoint an upstream attempt used, so that a
/// provider's 429 cools down only what earned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialScope {
    /// A configured upstream's host with the gateway's own credentials (its server-side key, or
    /// none at all): shared by every client, and by every replica.
    Gateway,
    /// Something the client chose: its own key was sent (header, or `api_key` in the body), or
    /// the attempt went to its `encoded_base_url`. The id is the request's [`ClientScope`] id.
    Client(ScopeId),
}

// === InsertionId, RolloutTags ===

/// The UUIDv7 minted for a completion on a rollout route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InsertionId(pub Uuid);

/// The six rollout tags, in order: `rollout_id:`, `insertion_id:`, `invocation_id:`,
/// `experiment_id:`, `run_id:`, `row_id:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutTags(pub Arc<[String]>);

// === ModelChoice, TokenEstimate, ServedBy ===

/// The model of the current attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelChoice {
    /// The model the client asked for.
    pub requested: Arc<str>,
    /// The model of this attempt.
    pub current: Arc<str>,
    /// Attempt number, from 1.
    pub attempt: u32,
}

impl ModelChoice {
    /// Whether this attempt uses the requested model.
    pub fn is_primary(&self) -> bool {
        self.requested == self.current
    }
}

/// The estimated size of a request in tokens (input plus requested output).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenEstimate {
    /// Tokens.
    pub tokens: u64,
    /// `true` when counted by a rough rule rather than the model's tokenizer.
    pub estimated: bool,
}

/// Response extension: which model and upstream answered, after how many attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedBy {
    /// The model that answered.
    pub model: Arc<str>,
    /// The upstream that answered.
    pub upstream: Arc<str>,
    /// Attempts made, this one included.
    pub attempts: u32,
}

// === FallbackEvents ===

/// A fallback decision, recorded as a Langfuse event by whoever holds the sink.
#[derive(Clone, Debug, PartialEq)]
pub enum FallbackEvent {
    /// `rate_limit_fallback`.
    RateLimit {
        /// The model that was given up.
        original_model: String,
        /// The model used instead.
        fallback_model: String,
        /// `rpm`, `tpm`, `rpd`, `upstream_429`, `upstream_quota` or `cooldown`.
        reason: &'static str,
    },
    /// `context_length_fallback`.
    ContextLength {
        /// The model the request did not fit.
        original_model: String,
        /// The model used instead.
        fallback_model: String,
        /// The estimate that did not fit.
        estimated_tokens: u64,
        /// The window of the original model.
        original_max_context: u64,
        /// The window of the fallback model.
        fallback_max_context: u64,
    },
}

impl FallbackEvent {
    /// The Langfuse event name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::RateLimit { .. } => "rate_limit_fallback",
            Self::ContextLength { .. } => "context_length_fallback",
        }
    }
}

/// Where fallback events go. Implementations must not block.
pub trait FallbackEventSink: Send + Sync + 'static {
    /// Records one event.
    fn record(&self, event: FallbackEvent);
}

/// A handle to the request's fallback event sink.
#[derive(Clone)]
pub struct FallbackEvents(pub Arc<dyn FallbackEventSink>);

impl FallbackEvents {
    /// Records `event`.
    pub fn record(&self, event: FallbackEvent) {
        self.0.record(event);
    }
}

impl fmt::Debug for FallbackEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FallbackEvents")
    }
}
