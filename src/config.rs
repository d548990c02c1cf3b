//! Configuration: a YAML file plus environment variables, the environment winning.
//!
//! With no file and no environment at all the gateway still starts: in-memory stores, Langfuse
//! export off, upstream `https://api.openai.com/v1` in `openai` mode, listening on
//! `127.0.0.1:4000`. Unknown keys and bad values are rejected at start with a message naming
//! the key and the file line.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use llmgate_core::{
    catalog::{Catalog, Limits, ModelSpec},
    ext::{Secret, UpstreamMode, UpstreamTarget},
};
use serde::Deserialize;

/// The embedded default upstream.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.openai.com/v1";

/// A configuration error, with the file line where one is known.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

// === The file ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    engine: Option<Engine>,
    request_timeout_secs: Option<f64>,
    drain_timeout_secs: Option<f64>,
    body_limit_bytes: Option<usize>,
    upstreams: Option<BTreeMap<String, UpstreamFile>>,
    default_upstream: Option<String>,
    #[serde(default)]
    models: Vec<ModelSpec>,
    redis: Option<RedisFile>,
    langfuse: Option<LangfuseFile>,
    encoded_base_url: Option<EncodedBaseUrlFile>,
    auth: Option<AuthFile>,
    rate_limit: Option<RateLimitFile>,
    insertion_id: Option<InsertionIdFile>,
    metrics: Option<MetricsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    listen: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    url: String,
    #[serde(default)]
    mode: UpstreamMode,
    api_key_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisFile {
    url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LangfuseFile {
    host: Option<String>,
    secrets_path: Option<PathBuf>,
    api: Option<LangfuseApi>,
    emit: Option<Emit>,
    #[serde(default)]
    export: ExportSettings,
    trace_name: Option<String>,
    environment: Option<String>,
    release: Option<String>,
    version: Option<String>,
    capture_bytes: Option<usize>,
}

/// What every exported trace carries (`langfuse.trace_name`, `environment`, `release`,
/// `version`, `capture_bytes`).
#[derive(Clone, Debug, Default)]
pub struct TraceSettings {
    /// The trace name (default `chat-completion`).
    pub trace_name: Option<String>,
    /// Langfuse `environment` (lower-case letters, digits, `-`, `_`).
    pub environment: Option<String>,
    /// Langfuse `release`.
    pub release: Option<String>,
    /// Langfuse `version`.
    pub version: Option<String>,
    /// How much of a request's input and output a span keeps (bytes; default 32 KiB; the cut is
    /// marked).
    pub capture_bytes: Option<usize>,
}

/// How the Langfuse exporter batches (defaults like the official SDKs).
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSettings {
    /// Spans per export request.
    pub batch_max_spans: usize,
    /// The longest a span waits for its batch, in milliseconds.
    pub batch_delay_ms: u64,
    /// Spans queued at most; past it new spans are dropped and counted.
    pub queue_max_spans: usize,
    /// How long one export request may take before it counts as failed and is retried.
    pub timeout_ms: u64,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self { batch_max_spans: 512, batch_delay_ms: 5000, queue_max_spans: 2048, timeout_ms: 30_000 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EncodedBaseUrlFile {
    #[serde(default)]
    allow: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    api_keys: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    max_wait_seconds: Option<f64>,
    on_redis_outage: Option<OutagePolicy>,
    replicas: Option<u32>,
}

/// What rate limiting does while Redis is unreachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutagePolicy {
    /// Per-process limits divided by the replica count.
    #[default]
    FailOpen,
    /// Every model counts as limited.
    FailClosed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InsertionIdFile {
    prefix: Option<String>,
    ttl_secs: Option<u64>,
    record_timeout_ms: Option<u64>,
}

/// Which engine hosts the stack and talks to the upstreams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// hyper host and hyper upstream.
    #[default]
    Hyper,
    /// Pingora host and Pingora upstream (feature `pingora`).
    Pingora,
}

/// Which Langfuse read API the traces endpoints use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LangfuseApi {
    /// The legacy `/api/public/traces` API.
    V3,
    /// `/api/public/v2/observations`.
    #[default]
    V4,
}

/// What the Langfuse layer exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Emit {
    /// Traces, generations and events.
    All,
    /// Only the request span and the fallback events.
    Events,
    /// Nothing.
    Off,
}

// === The resolved configuration ===

/// Where an entry of the effective catalogue comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelOrigin {
    /// Built into llmgate (`llmgate-context-routing`'s default catalogue): window, output cap
    /// and price only; never a fallback chain or a limit.
    BuiltIn,
    /// The config's `models` list, a name the built-in catalogue does not have.
    Config,
    /// The config's `models` list, replacing the built-in entry of the same name whole.
    ConfigOverridesBuiltIn,
}

impl fmt::Display for ModelOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BuiltIn => "built-in",
            Self::Config => "config",
            Self::ConfigOverridesBuiltIn => "config, overrides built-in",
        })
    }
}

/// The configuration the gateway runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// A second listener serving only `GET /metrics`, without auth (`metrics.listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// The engine (`engine`, or `llmgate serve --engine`).
    pub engine: Engine,
    /// Connect and response-head timeout for upstream calls (`REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// How long graceful shutdown waits for in-flight requests and streams.
    pub drain_timeout: Duration,
    /// The chat request body limit.
    pub body_limit: usize,
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, UpstreamTarget>,
    /// The upstream used for unknown models and the catch-all.
    pub default_upstream: String,
    /// Models configured in the file (extending the built-in catalogue; see [`Config::catalog`]).
    pub models: Vec<ModelSpec>,
    /// The Redis URL, if any (else in-memory stores).
    pub redis_url: Option<Secret>,
    /// The Langfuse host, if any.
    pub langfuse_host: Option<String>,
    /// The secrets file with per-project Langfuse keys.
    pub secrets_path: Option<PathBuf>,
    /// The Langfuse read API.
    pub langfuse_api: LangfuseApi,
    /// What to export to Langfuse; `None` means by upstream mode (all for openai, events for litellm).
    pub emit: Option<Emit>,
    /// How the Langfuse exporter batches.
    pub langfuse_export: ExportSettings,
    /// What every exported trace carries.
    pub langfuse_trace: TraceSettings,
    /// Allowed `encoded_base_url` prefixes.
    pub encoded_base_url_allow: Vec<String>,
    /// Static API keys; empty means no auth.
    pub api_keys: Vec<Secret>,
    /// The longest wait for a rate limit before falling back.
    pub max_wait: Duration,
    /// What rate limiting does while Redis is unreachable.
    pub on_redis_outage: OutagePolicy,
    /// How many gateway replicas share the limits (divides them under `fail_open`).
    pub replicas: u32,
    /// Insertion-id key prefix.
    pub insertion_prefix: String,
    /// Insertion-id set TTL.
    pub insertion_ttl: Duration,
    /// How long a response waits for its insertion record before going on.
    pub record_timeout: Duration,
    /// The log filter (`LOG_LEVEL`, or `RUST_LOG` when set).
    pub log_filter: String,
}

impl Config {
    /// The default upstream's target.
    pub fn default_target(&self) -> &UpstreamTarget {
        // `load` guarantees the default upstream exists.
        &self.upstreams[&self.default_upstream]
    }

    /// Loads `path` (if any) and applies the environment read through `env`.
    pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("{}: cannot read config: {e}", path.display())))?;
                Self::from_yaml(&text, path, env)
            }
            None => Self::resolve(FileConfig::default(), None, env),
        }
    }

    /// Parses YAML `text` (errors name `origin` and the line) and applies the environment.
    pub fn from_yaml(text: &str, origin: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let file: FileConfig = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError(format!("{}: {e}", origin.display())))?
        };
        Self::resolve(file, Some((origin.to_path_buf(), text.to_string())), env)
    }

    fn resolve(
        file: FileConfig,
        text: Option<(PathBuf, String)>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let at = |key: &str, value: &str| locate(text.as_ref(), key, value);
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());

        let host = env("HOST");
        let port = env("PORT");
        let listen_text = match (file.listen.as_deref(), host, port) {
            (_, Some(h), Some(p)) => format!("{}:{p}", bracket(&h)),
            (Some(listen), None, None) => listen.to_string(),
            (Some(listen), h, p) => {
                let addr: SocketAddr = listen
                    .parse()
                    .map_err(|e| ConfigError(format!("{}invalid `listen` {listen:?}: {e}", at("listen", listen))))?;
                let host = h.unwrap_or_else(|| addr.ip().to_string());
                let port = p.unwrap_or_else(|| addr.port().to_string());
                format!("{}:{port}", bracket(&host))
            }
            (None, h, p) => {
                format!("{}:{}", bracket(&h.unwrap_or_else(|| "127.0.0.1".into())), p.unwrap_or_else(|| "4000".into()))
            }
        };
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|e| ConfigError(format!("invalid listen address {listen_text:?} (HOST/PORT/listen): {e}")))?;

        let request_timeout = match env("REQUEST_TIMEOUT") {
            Some(v) => seconds("REQUEST_TIMEOUT", &v)?,
            None => positive_secs(file.request_timeout_secs, 300.0, "request_timeout_secs", &at)?,
        };
        let drain_timeout = positive_secs(file.drain_timeout_secs, 30.0, "drain_timeout_secs", &at)?;

        let mut upstreams = BTreeMap::new();
        for (name, upstream) in file.upstreams.iter().flatten() {
            let api_key = match &upstream.api_key_env {
                Some(var) => Some(Secret::new(env(var).ok_or_else(|| {
                    ConfigError(format!(
                        "{}upstream '{name}': api_key_env names {var}, which is not set",
                        at("api_key_env", var)
                    ))
                })?)),
                None => None,
            };
            let url = base_url(&upstream.url)
                .map_err(|e| ConfigError(format!("{}upstream '{name}': {e}", at("url", &upstream.url))))?;
            upstreams.insert(
                name.clone(),
                UpstreamTarget { name: name.as_str().into(), base_url: url.into(), mode: upstream.mode, api_key },
            );
        }
        let default_upstream = file.default_upstream.clone().unwrap_or_else(|| {
            if upstreams.len() == 1 { upstreams.keys().next().cloned().unwrap_or_default() } else { "default".into() }
        });
        let env_url = env("LITELLM_URL")
            .map(|u| (u, UpstreamMode::LiteLlm))
            .or_else(|| env("UPSTREAM_URL").map(|u| (u, UpstreamMode::OpenAi)));
        let env_mode = match env("UPSTREAM_MODE") {
            Some(m) => Some(match m.to_ascii_lowercase().as_str() {
                "openai" => UpstreamMode::OpenAi,
                "litellm" => UpstreamMode::LiteLlm,
                other => {
                    return Err(ConfigError(format!("UPSTREAM_MODE must be openai or litellm, not {other:?}")));
                }
            }),
            None => None,
        };
        match upstreams.get_mut(&default_upstream) {
            Some(target) => {
                if let Some((url, _)) = &env_url {
                    target.base_url =
                        base_url(url).map_err(|e| ConfigError(format!("LITELLM_URL/UPSTREAM_URL: {e}")))?.into();
                }
                if let Some(mode) = env_mode {
                    target.mode = mode;
                }
            }
            None if file.upstreams.as_ref().is_some_and(|u| !u.is_empty()) || file.default_upstream.is_some() => {
                return Err(ConfigError(format!(
                    "{}default_upstream '{default_upstream}' is not one of the configured upstreams",
                    at("default_upstream", &default_upstream)
                )));
            }
            None => {
                let (url, mode) = env_url.unwrap_or_else(|| (DEFAULT_UPSTREAM_URL.into(), UpstreamMode::OpenAi));
                let url = base_url(&url).map_err(|e| ConfigError(format!("LITELLM_URL/UPSTREAM_URL: {e}")))?;
                upstreams.insert(
                    default_upstream.clone(),
                    UpstreamTarget {
                        name: default_upstream.as_str().into(),
                        base_url: url.into(),
                        mode: env_mode.unwrap_or(mode),
                        api_key: None,
                    },
                );
            }
        }

        let mut names = std::collections::HashSet::new();
        for model in &file.models {
            if !names.insert(model.name.as_str()) {
                return Err(ConfigError(format!("{}model '{}' is defined twice", at("name", &model.name), model.name)));
            }
            if let Some(up) = &model.upstream
                && !upstreams.contains_key(up)
            {
                return Err(ConfigError(format!(
                    "{}model '{}': unknown upstream '{up}'",
                    at("upstream", up),
                    model.name
                )));
            }
        }

        let redis_url = match env("REDIS_URL") {
            Some(url) => Some(url),
            None => match env("REDIS_HOST") {
                Some(host) => {
                    let port = env("REDIS_PORT").unwrap_or_else(|| "6379".into());
                    Some(match env("REDIS_PASSWORD") {
                        Some(password) => format!("redis://:{password}@{host}:{port}"),
                        None => format!("redis://{host}:{port}"),
                    })
                }
                None => file.redis.as_ref().map(|r| r.url.clone()),
            },
        };

        let langfuse = file.langfuse.as_ref();
        // `try_from_secs_f64` refuses NaN, negative and out-of-range values (a plain
        // `from_secs_f64` panics on them).
        let max_wait = match file.rate_limit.as_ref().and_then(|r| r.max_wait_seconds) {
            Some(s) => Duration::try_from_secs_f64(s).map_err(|_| {
                ConfigError(format!(
                    "{}rate_limit.max_wait_seconds must be a number of seconds ≥ 0, not {s}",
                    at("max_wait_seconds", &s.to_string())
                ))
            })?,
            None => Duration::ZERO,
        };
        let insertion = file.insertion_id.as_ref();
        let log_filter = env("RUST_LOG")
            .or_else(|| env("LOG_LEVEL").map(|l| l.to_ascii_lowercase()))
            .unwrap_or_else(|| "info".into());

        if file.engine == Some(Engine::Pingora) && !cfg!(feature = "pingora") {
            return Err(ConfigError(format!(
                "{}engine: pingora needs a build with the `pingora` feature",
                at("engine", "pingora")
            )));
        }
        let metrics_listen =
            match file.metrics.as_ref().and_then(|m| m.listen.as_deref()) {
                Some(text) => Some(text.parse::<SocketAddr>().map_err(|e| {
                    ConfigError(format!("{}invalid `metrics.listen` {text:?}: {e}", at("listen", text)))
                })?),
                None => None,
            };
        Ok(Config {
            listen,
            metrics_listen,
            engine: file.engine.unwrap_or_default(),
            request_timeout,
            drain_timeout,
            body_limit: file.body_limit_bytes.unwrap_or(llmgate_core::json::DEFAULT_BODY_LIMIT),
            upstreams,
            default_upstream,
            models: file.models,
            redis_url: redis_url.map(Secret::new),
            langfuse_host: env("LANGFUSE_HOST").or_else(|| langfuse.and_then(|l| l.host.clone())),
            secrets_path: env("SECRETS_PATH")
                .map(PathBuf::from)
                .or_else(|| langfuse.and_then(|l| l.secrets_path.clone())),
            langfuse_api: langfuse.and_then(|l| l.api).unwrap_or_default(),
            emit: langfuse.and_then(|l| l.emit),
            langfuse_export: langfuse.map(|l| l.export).unwrap_or_default(),
            langfuse_trace: langfuse
                .map(|l| TraceSettings {
                    trace_name: l.trace_name.clone(),
                    environment: l.environment.clone(),
                    release: l.release.clone(),
                    version: l.version.clone(),
                    capture_bytes: l.capture_bytes,
                })
                .unwrap_or_default(),
            encoded_base_url_allow: file.encoded_base_url.map(|e| e.allow).unwrap_or_default(),
            api_keys: file.auth.map(|a| a.api_keys.into_iter().map(Secret::new).collect()).unwrap_or_default(),
            max_wait,
            on_redis_outage: file.rate_limit.as_ref().and_then(|r| r.on_redis_outage).unwrap_or_default(),
            replicas: file.rate_limit.as_ref().and_then(|r| r.replicas).unwrap_or(1).max(1),
            insertion_prefix: insertion.and_then(|i| i.prefix.clone()).unwrap_or_default(),
            insertion_ttl: Duration::from_secs(insertion.and_then(|i| i.ttl_secs).unwrap_or(86_400)),
            record_timeout: Duration::from_millis(insertion.and_then(|i| i.record_timeout_ms).unwrap_or(250)),
            log_filter,
        })
    }

    /// The effective catalogue, each entry with its origin: the built-in entries (in their
    /// order; a config entry of the same name replaces one whole), then the config's other
    /// entries in file order.
    ///
    /// Built-in entries carry facts only (window, output cap, price): their `fallbacks` and
    /// `limits` are always empty, so no built-in entry reroutes, refuses or limits a request by
    /// itself. Only a configured `fallbacks` list moves a request to another model.
    pub fn catalog_entries(&self) -> Vec<(ModelSpec, ModelOrigin)> {
        let configured = |name: &str| self.models.iter().find(|m| m.name == name);
        let mut entries: Vec<(ModelSpec, ModelOrigin)> = llmgate_context_routing::default_catalog()
            .into_iter()
            .map(|builtin| match configured(&builtin.name) {
                Some(model) => (model.clone(), ModelOrigin::ConfigOverridesBuiltIn),
                None => {
                    (ModelSpec { fallbacks: Vec::new(), limits: Limits::default(), ..builtin }, ModelOrigin::BuiltIn)
                }
            })
            .collect();
        for model in &self.models {
            if !entries.iter().any(|(m, _)| m.name == model.name) {
                entries.push((model.clone(), ModelOrigin::Config));
            }
        }
        entries
    }

    /// The catalogue the routing layers, the cost calculation and the metrics use
    /// ([`catalog_entries`](Self::catalog_entries) without the origins).
    pub fn catalog(&self) -> Catalog {
        Catalog::new(self.catalog_entries().into_iter().map(|(model, _)| model))
    }

    /// What `check-config` prints: the effective settings, secrets redacted.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("listen: {} (engine {:?})", self.listen, self.engine));
        line(format!(
            "request_timeout: {:?}, drain_timeout: {:?}, body_limit: {} bytes",
            self.request_timeout, self.drain_timeout, self.body_limit
        ));
        for (name, target) in &self.upstreams {
            let default = if *name == self.default_upstream { " (default)" } else { "" };
            let key =
                if target.api_key.is_some() { ", server-side API key" } else { ", client's Authorization forwarded" };
            line(format!("upstream {name}{default}: {} mode {:?}{key}", target.base_url, target.mode));
        }
        self.describe_catalog(&mut line);
        line(format!("stores: {}", if self.redis_url.is_some() { "Redis" } else { "in-memory (no Redis configured)" }));
        line(match &self.langfuse_host {
            Some(host) => {
                format!("langfuse: {host}, read API {:?}, secrets {:?}", self.langfuse_api, self.secrets_path)
            }
            None => "langfuse: export off (no LANGFUSE_HOST or langfuse.host)".into(),
        });
        line(format!(
            "auth: {}",
            if self.api_keys.is_empty() {
                "none".to_string()
            } else {
                format!("{} static API key(s)", self.api_keys.len())
            }
        ));
        line(format!("encoded_base_url allowlist: {:?}", self.encoded_base_url_allow));
        line(format!("rate_limit.max_wait_seconds: {}", self.max_wait.as_secs_f64()));
        out
    }

    /// The catalogue part of [`describe`](Self::describe): one line per entry with its origin,
    /// then the fallbacks that are active.
    fn describe_catalog(&self, line: &mut impl FnMut(String)) {
        let entries = self.catalog_entries();
        let builtin = entries.iter().filter(|(_, o)| *o == ModelOrigin::BuiltIn).count();
        line(format!(
            "models: {} entries, {} from the config, {builtin} built-in (built-in entries set windows and prices \
             only: they never move a request to another model and never limit it)",
            entries.len(),
            entries.len() - builtin
        ));
        let limit = |name: &str, value: Option<u64>| value.map(|n| format!(" {name} {n}"));
        for (model, origin) in &entries {
            let mut text = format!(
                "  {} [{origin}] upstream {}",
                model.name,
                model.upstream.as_deref().unwrap_or(&self.default_upstream)
            );
            if let Some(sent) = model.upstream_model.as_deref().filter(|u| *u != model.name) {
                text.push_str(&format!(" (sent as {sent})"));
            }
            if let Some(window) = model.context_window {
                text.push_str(&format!(", window {window}"));
            }
            if let Some(output) = model.max_output_tokens {
                text.push_str(&format!(", max output {output}"));
            }
            let limits: String =
                [limit("rpm", model.limits.rpm), limit("tpm", model.limits.tpm), limit("rpd", model.limits.rpd)]
                    .into_iter()
                    .flatten()
                    .collect();
            if !limits.is_empty() {
                text.push_str(&format!(", limits{limits}"));
            }
            if let Some(price) = model.pricing {
                text.push_str(&format!(", ${}/${} per 1M in/out", price.input_per_1m, price.output_per_1m));
            }
            if !model.fallbacks.is_empty() {
                text.push_str(&format!(", fallbacks: {}", model.fallbacks.join(", ")));
            }
            line(text);
        }
        let known = |name: &str| entries.iter().any(|(m, _)| m.name == name);
        let active: Vec<String> = entries
            .iter()
            .filter(|(m, _)| !m.fallbacks.is_empty())
            .map(|(m, _)| {
                let chain: Vec<String> =
                    m.fallbacks
                        .iter()
                        .map(|f| {
                            if known(f) {
                                f.clone()
                            } else {
                                format!("{f} (not in the catalogue: no window, no limits)")
                            }
                        })
                        .collect();
                format!("{} → {}", m.name, chain.join(", "))
            })
            .collect();
        line(format!("fallbacks active: {}", if active.is_empty() { "none".to_string() } else { active.join("; ") }));
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() }
}

fn seconds(name: &str, value: &str) -> Result<Duration, ConfigError> {
    match value.trim().parse::<f64>() {
        Ok(s)
            if s > 0.0
                && let Ok(duration) = Duration::try_from_secs_f64(s) =>
        {
            Ok(duration)
        }
        _ => Err(ConfigError(format!("{name} must be a positive number of seconds, not {value:?}"))),
    }
}

fn positive_secs(
    value: Option<f64>,
    default: f64,
    key: &str,
    at: &dyn Fn(&str, &str) -> String,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(Duration::from_secs_f64(default)),
        Some(s)
            if s > 0.0
                && let Ok(duration) = Duration::try_from_secs_f64(s) =>
        {
            Ok(duration)
        }
        Some(s) => {
            Err(ConfigError(format!("{}{key} must be a positive number of seconds, not {s}", at(key, &s.to_string()))))
        }
    }
}

/// Checks a base URL: http or https, a host, no query; the trailing slash is dropped.
pub fn base_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("URL {url:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("URL {url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("URL {url:?} must not have a query string"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// `"{file}:{line}: "` for the first line that sets `key` to `value`, or the first line naming
/// `key`; empty without a file. Used for errors serde cannot place (cross-references, env).
fn locate(text: Option<&(PathBuf, String)>, key: &str, value: &str) -> String {
    let Some((path, text)) = text else {
        return String::new();
    };
    let names_key = |l: &str| {
        let l = l.trim_start().trim_start_matches("- ");
        l.starts_with(key) && l[key.len()..].trim_start().starts_with(':')
    };
    let line =
        text.lines().position(|l| names_key(l) && l.contains(value)).or_else(|| text.lines().position(names_key));
    match line {
        Some(n) => format!("{}: line {}: ", path.display(), n + 1),
        None => format!("{}: ", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Config::from_yaml(text, Path::new("test.yaml"), env)
    }

    #[test]
    fn embedded_defaults() {
        let config = Config::load(None, &no_env).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(&*config.default_target().base_url, DEFAULT_UPSTREAM_URL);
        assert_eq!(config.default_target().mode, UpstreamMode::OpenAi);
        assert_eq!(config.request_timeout, Duration::from_secs(300));
        assert!(config.redis_url.is_none() && config.langfuse_host.is_none());
    }

    #[test]
    fn env_wins_over_file() {
        let text = "listen: \"0.0.0.0:9000\"\nrequest_timeout_secs: 10\n";
        let env = |k: &str| match k {
            "PORT" => Some("4100".to_string()),
            "LITELLM_URL" => Some("http://litellm:4000/".to_string()),
            "REQUEST_TIMEOUT" => Some("2.5".to_string()),
            "REDIS_HOST" => Some("r".to_string()),
            "REDIS_PASSWORD" => Some("pw".to_string()),
            _ => None,
        };
        let config = parse(text, &env).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:4100");
        assert_eq!(&*config.default_target().base_url, "http://litellm:4000");
        assert_eq!(config.default_target().mode, UpstreamMode::LiteLlm);
        assert_eq!(config.request_timeout, Duration::from_millis(2500));
        assert_eq!(config.redis_url.unwrap().expose(), "redis://:pw@r:6379");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let text = "listen: \"127.0.0.1:1\"\nupstreams:\n  a:\n    url: http://a\n    colour: red\n";
        let err = parse(text, &no_env).unwrap_err().to_string();
        assert!(err.contains("colour") && err.contains("line 5"), "{err}");

        let err =
            parse("upstreams:\n  a: {url: \"http://a\"}\ndefault_upstream: b\n", &no_env).unwrap_err().to_string();
        assert!(err.contains("default_upstream 'b'") && err.contains("line 3"), "{err}");

        let err = parse("langfuse: {host: \"http://l\", colour: red}\n", &no_env).unwrap_err().to_string();
        assert!(err.contains("colour") && err.contains("line 1"), "{err}");

        let err = parse("models:\n  - name: m\n    limits: {rpm: -5}\n", &no_env).unwrap_err().to_string();
        assert!(err.contains("invalid limit -5") && err.contains("line 3"), "{err}");
    }

    #[test]
    fn full_example_parses() {
        let text = r#"
listen: "127.0.0.1:4000"
request_timeout_secs: 60
upstreams:
  openai: {url: "https://api.openai.com/v1", mode: openai, api_key_env: OPENAI_API_KEY}
  litellm: {url: "http://localhost:4001", mode: litellm}
default_upstream: litellm
models:
  - name: gpt-4o
    upstream: openai
    upstream_model: gpt-4o-2024-08-06
    context_window: 128000
    max_output_tokens: 16384
    limits: {rpm: 500, tpm: null, rpd: -1}
    pricing: {input_per_1m: 2.5, output_per_1m: 10}
    fallbacks: [gpt-4o-mini]
redis: {url: "redis://127.0.0.1:6379"}
langfuse: {host: "https://cloud.langfuse.com", secrets_path: secrets.yaml, api: v3, emit: events, environment: staging, capture_bytes: 1024}
encoded_base_url: {allow: ["https://api.fireworks.ai/inference/v1"]}
auth: {api_keys: ["k1"]}
rate_limit: {max_wait_seconds: 2}
"#;
        let env = |k: &str| (k == "OPENAI_API_KEY").then(|| "sk-x".to_string());
        let config = parse(text, &env).unwrap();
        assert_eq!(config.default_upstream, "litellm");
        assert_eq!(config.upstreams["openai"].api_key.as_ref().unwrap().expose(), "sk-x");
        assert_eq!(config.models[0].limits.rpm, Some(500));
        assert_eq!(config.langfuse_api, LangfuseApi::V3);
        assert_eq!(config.emit, Some(Emit::Events));
        assert_eq!(config.langfuse_trace.environment.as_deref(), Some("staging"));
        assert_eq!(config.langfuse_trace.capture_bytes, Some(1024));
        assert!(!config.describe().contains("sk-x"));
    }

    #[test]
    fn the_catalogue_says_where_each_entry_comes_from_and_built_ins_never_route() {
        let text = "models:\n  - {name: gpt-4o, fallbacks: [gpt-4o-mini]}\n  - {name: mine, limits: {rpm: 3}}\n";
        let config = parse(text, &no_env).unwrap();
        let entries = config.catalog_entries();
        let origin = |name: &str| entries.iter().find(|(m, _)| m.name == name).map(|(_, o)| *o);
        assert_eq!(origin("gpt-4o"), Some(ModelOrigin::ConfigOverridesBuiltIn));
        assert_eq!(origin("mine"), Some(ModelOrigin::Config));
        assert_eq!(origin("gpt-4.1"), Some(ModelOrigin::BuiltIn));
        assert_eq!(entries.last().map(|(m, _)| m.name.as_str()), Some("mine"));
        for (model, origin) in &entries {
            if *origin == ModelOrigin::BuiltIn {
                assert!(model.fallbacks.is_empty() && model.limits == Limits::default(), "{}", model.name);
                assert!(model.context_window.is_some() && model.pricing.is_some(), "{}", model.name);
            }
        }
        // The config entry replaces the built-in one whole: no window unless it says one.
        let catalog = config.catalog();
        assert_eq!(catalog.get("gpt-4o").unwrap().context_window, None);
        assert_eq!(catalog.get("gpt-4o").unwrap().fallbacks, ["gpt-4o-mini"]);
        let described = config.describe();
        assert!(described.contains("fallbacks active: gpt-4o → gpt-4o-mini\n"), "{described}");
        assert!(parse("", &no_env).unwrap().describe().contains("fallbacks active: none\n"));
    }
}
