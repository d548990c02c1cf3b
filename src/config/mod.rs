//! Configuration: a YAML file plus environment variables, the environment winning.
//!
//! With no file and no environment at all the gateway still starts: in-memory stores, Langfuse
//! export off, upstream `https://api.openai.com/v1` in `openai` mode, listening on
//! `127.0.0.1:4000`. Unknown keys, repeated keys and bad values are refused at start.
//!
//! [`Config`] is nested by section ([`ServerSettings`], [`UpstreamSettings`],
//! [`ModelSettings`], [`RedisSettings`], [`LangfuseSettings`], [`RateLimitSettings`],
//! [`InsertionIdSettings`], [`AuthSettings`], [`EncodedBaseUrlSettings`], [`LogSettings`]);
//! the YAML keys are flat as documented in the README. Each section builds its own component
//! from the layer crates' types (`RateLimitSettings::layer`, `LangfuseSettings::exporter`,
//! `AuthSettings::provider`, …); the enums of the file are the layers' own
//! (`llmgate_rate_limit_fallback::OutagePolicy`, `llmgate_langfuse::Emit`).
//!
//! # Errors
//!
//! Every error about the file reads `{file}:{line}:{column}: {key path}: {message}`, e.g.
//! `llmgate.yaml:14:15: models[1].upstream: model 'b': unknown upstream 'x'`: the line and
//! column of the offending value (of the key, for an unknown key), and its path with list
//! indices. This holds for parse and type errors and for the checks made after parsing. An
//! error about the environment names the variable instead.
//!
//! # The YAML crate
//!
//! `serde-saphyr` (replacing `serde_yaml`, deprecated and unmaintained): maintained, pure Rust
//! and panic-free on any input (with budgets against alias bombs and deep nesting), it gives
//! every error its line and column and any value its span (`Spanned`), and it refuses
//! duplicate keys. `serde_path_to_error` wraps its deserializer for the key path of a parse
//! or type error. `config/source.rs` says how errors found after parsing are placed.

mod sections;
mod source;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use llmgate_core::{
    catalog::{Limits, ModelSpec},
    ext::{AccountInfo, ProjectAccess, Secret, UpstreamMode, UpstreamTarget},
};
use llmgate_credentials::{GatewayKey, KeyDigest};
use llmgate_langfuse::Emit;
use llmgate_rate_limit_fallback::{DEFAULT_LEASE_SLICE, OutagePolicy};
use rustls::pki_types::{
    CertificateDer,
    pem::{self, PemObject},
};
use serde::Deserialize;

pub use sections::{
    AuthSettings, CaFile, EncodedBaseUrlSettings, Engine, ExportSettings, ExternalAuthSettings, InsertionIdSettings,
    LangfuseApi, LangfuseSettings, LogSettings, ModelOrigin, ModelSettings, PINGORA_NOT_BUILT, RateLimitMode,
    RateLimitSettings, RedisSettings, RolloutLogSettings, ServerSettings, TraceSettings, UpstreamSettings,
};
use source::Source;

/// The embedded default upstream.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.openai.com/v1";

/// A configuration error: for the file, `{file}:{line}:{column}: {key path}: {message}`; for
/// the environment, the variable and the message.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

// === The file (its keys are a contract: see the README) ===

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
    rollout_logs: Option<RolloutLogsFile>,
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
    ca_file: Option<PathBuf>,
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
    #[serde(default)]
    keys: Vec<KeyFile>,
    external: Option<ExternalAuthFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    name: String,
    key: Option<String>,
    key_sha256: Option<String>,
    projects: Option<Vec<String>>,
    limits: Option<Limits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExternalAuthFile {
    url: String,
    timeout_ms: Option<u64>,
    cache_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    max_wait_seconds: Option<f64>,
    on_redis_outage: Option<OutagePolicy>,
    replicas: Option<u32>,
    mode: Option<RateLimitMode>,
    lease_slice: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InsertionIdFile {
    prefix: Option<String>,
    ttl_secs: Option<u64>,
    record_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RolloutLogsFile {
    prefix: Option<String>,
    ttl_secs: Option<u64>,
    max_entries: Option<usize>,
    max_entry_bytes: Option<usize>,
}

// === The resolved configuration ===

/// The configuration the gateway runs with, by section.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listening, the engine, timeouts, the body limit, the metrics listener.
    pub server: ServerSettings,
    /// The upstreams and the default one.
    pub upstreams: UpstreamSettings,
    /// The configured models over the built-in catalogue.
    pub models: ModelSettings,
    /// Redis, if any.
    pub redis: RedisSettings,
    /// Langfuse export and reads.
    pub langfuse: LangfuseSettings,
    /// Rate limiting.
    pub rate_limit: RateLimitSettings,
    /// Insertion ids.
    pub insertion_id: InsertionIdSettings,
    /// Rollout logs and status (`/logs`, `/status`).
    pub rollout_logs: RolloutLogSettings,
    /// The gateway's own API keys.
    pub auth: AuthSettings,
    /// The `encoded_base_url` allowlist.
    pub encoded_base_url: EncodedBaseUrlSettings,
    /// Logging.
    pub log: LogSettings,
    /// The file it was loaded from, if any: a secrets reload re-reads its `auth.api_keys`.
    pub file: Option<PathBuf>,
}

impl Config {
    /// The default upstream's target.
    pub fn default_target(&self) -> &UpstreamTarget {
        self.upstreams.default_target()
    }

    /// Loads `path` (if any) and applies the environment read through `env`.
    pub fn load(path: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("{}: cannot read config: {e}", path.display())))?;
                Ok(Config { file: Some(path.to_owned()), ..Self::from_yaml(&text, path, env)? })
            }
            None => Self::resolve(FileConfig::default(), &Source::none(), env),
        }
    }

    /// Parses YAML `text` (errors name `origin`, the line and the key path) and applies the
    /// environment.
    pub fn from_yaml(text: &str, origin: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let source = Source::file(origin, text);
        let file: FileConfig = if text.trim().is_empty() { FileConfig::default() } else { source.parse()? };
        Self::resolve(file, &source, env)
    }

    fn resolve(file: FileConfig, src: &Source<'_>, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let upstreams = upstreams(file.upstreams.as_ref(), file.default_upstream.as_deref(), src, &env)?;
        let server = server(&file, src, &env)?;
        let insertion_id = insertion_id(file.insertion_id);
        Ok(Config {
            server,
            models: models(file.models, &upstreams, src)?,
            upstreams,
            redis: RedisSettings { url: redis_url(file.redis, &env).map(Secret::new) },
            langfuse: langfuse(file.langfuse, &env),
            rate_limit: rate_limit(file.rate_limit, src)?,
            rollout_logs: rollout_logs(file.rollout_logs, &insertion_id, src)?,
            insertion_id,
            auth: auth(file.auth, src)?,
            encoded_base_url: EncodedBaseUrlSettings::new(file.encoded_base_url.map(|e| e.allow).unwrap_or_default())
                .map_err(|(index, error)| {
                src.error(&format!("encoded_base_url.allow[{index}]"), error)
            })?,
            log: LogSettings {
                filter: env("RUST_LOG")
                    .or_else(|| env("LOG_LEVEL").map(|l| l.to_ascii_lowercase()))
                    .unwrap_or_else(|| "info".into()),
            },
            file: None,
        })
    }

    /// What `check-config` prints: the effective settings, secrets redacted.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let mut line = |s: String| {
            out.push_str(&s);
            out.push('\n');
        };
        line(format!("listen: {} (engine {:?})", self.server.listen, self.server.engine));
        line(format!(
            "request_timeout: {:?}, drain_timeout: {:?}, body_limit: {} bytes",
            self.server.request_timeout, self.server.drain_timeout, self.server.body_limit
        ));
        for (name, target) in &self.upstreams.targets {
            let default = if *name == self.upstreams.default { " (default)" } else { "" };
            let key =
                if target.api_key.is_some() { ", server-side API key" } else { ", client's Authorization forwarded" };
            let ca = self.upstreams.ca_files.get(name).map_or(String::new(), |ca| {
                format!(", also trusts {} ({} certificate(s))", ca.path.display(), ca.certificates.len())
            });
            line(format!("upstream {name}{default}: {} mode {:?}{key}{ca}", target.base_url, target.mode));
        }
        self.describe_catalog(&mut line);
        line(format!("stores: {}", if self.redis.url.is_some() { "Redis" } else { "in-memory (no Redis configured)" }));
        line(match &self.langfuse.host {
            Some(host) => {
                format!("langfuse: {host}, read API {:?}, secrets {:?}", self.langfuse.api, self.langfuse.secrets_path)
            }
            None => "langfuse: export off (no LANGFUSE_HOST or langfuse.host)".into(),
        });
        line(format!(
            "auth: {}",
            match (self.auth.keys.len(), &self.auth.external) {
                (0, None) => "none".to_string(),
                (n, None) => format!("{n} gateway key(s)"),
                (n, Some(external)) => format!("{n} gateway key(s), then the identity service {}", external.url),
            }
        ));
        for key in &self.auth.keys {
            let projects = match &key.account.projects {
                ProjectAccess::All => "every project".to_string(),
                ProjectAccess::Only(projects) => format!("projects {}", projects.join(", ")),
            };
            line(format!(
                "  key {}: {projects}{}",
                key.account.account_id,
                if key.account.limits.is_some() { ", own limits" } else { "" }
            ));
        }
        line(format!("encoded_base_url allowlist: {:?}", self.encoded_base_url.allow));
        line(format!("rate_limit.max_wait_seconds: {}", self.rate_limit.max_wait.as_secs_f64()));
        line(format!("rate_limit.mode: {:?} (lease_slice {})", self.rate_limit.mode, self.rate_limit.lease_slice));
        let logs = &self.rollout_logs;
        line(format!(
            "rollout_logs: {} entries per rollout, {} bytes per entry, ttl {:?}",
            logs.max_entries, logs.max_entry_bytes, logs.ttl
        ));
        out
    }

    /// The catalogue part of [`describe`](Self::describe): one line per entry with its origin,
    /// then the fallbacks that are active.
    fn describe_catalog(&self, line: &mut impl FnMut(String)) {
        let entries = self.models.entries();
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
                model.upstream.as_deref().unwrap_or(&self.upstreams.default)
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

fn server(
    file: &FileConfig,
    src: &Source<'_>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ServerSettings, ConfigError> {
    let host = env("HOST");
    let port = env("PORT");
    let listen = match (file.listen.as_deref(), host, port) {
        (_, Some(h), Some(p)) => listen_addr(&format!("{}:{p}", bracket(&h)))?,
        (Some(listen), None, None) => {
            listen.parse().map_err(|e| src.error("listen", format!("invalid `listen` {listen:?}: {e}")))?
        }
        (Some(listen), h, p) => {
            let addr: SocketAddr =
                listen.parse().map_err(|e| src.error("listen", format!("invalid `listen` {listen:?}: {e}")))?;
            let host = h.unwrap_or_else(|| addr.ip().to_string());
            let port = p.unwrap_or_else(|| addr.port().to_string());
            listen_addr(&format!("{}:{port}", bracket(&host)))?
        }
        (None, h, p) => listen_addr(&format!(
            "{}:{}",
            bracket(&h.unwrap_or_else(|| "127.0.0.1".into())),
            p.unwrap_or_else(|| "4000".into())
        ))?,
    };
    let request_timeout = match env("REQUEST_TIMEOUT") {
        Some(v) => seconds("REQUEST_TIMEOUT", &v)?,
        None => positive_secs(file.request_timeout_secs, 300.0, "request_timeout_secs", src)?,
    };
    if let Some(engine) = file.engine {
        engine.check_built().map_err(|message| src.error("engine", message))?;
    }
    let metrics_listen = match file.metrics.as_ref().and_then(|m| m.listen.as_deref()) {
        Some(text) => Some(
            text.parse::<SocketAddr>()
                .map_err(|e| src.error("metrics.listen", format!("invalid `metrics.listen` {text:?}: {e}")))?,
        ),
        None => None,
    };
    Ok(ServerSettings {
        listen,
        engine: file.engine.unwrap_or_default(),
        request_timeout,
        drain_timeout: positive_secs(file.drain_timeout_secs, 30.0, "drain_timeout_secs", src)?,
        body_limit: file.body_limit_bytes.unwrap_or(llmgate_core::json::DEFAULT_BODY_LIMIT),
        metrics_listen,
    })
}

/// The listen address made of `HOST`/`PORT` (and `listen`).
fn listen_addr(text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|e| ConfigError(format!("invalid listen address {text:?} (HOST/PORT/listen): {e}")))
}

fn upstreams(
    file: Option<&BTreeMap<String, UpstreamFile>>,
    default: Option<&str>,
    src: &Source<'_>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<UpstreamSettings, ConfigError> {
    let mut targets = BTreeMap::new();
    let mut ca_files = BTreeMap::new();
    for (name, upstream) in file.into_iter().flatten() {
        if let Some(path) = &upstream.ca_file {
            let certificates = load_ca_file(path).map_err(|e| {
                src.error(
                    &format!("upstreams.{name}.ca_file"),
                    format!("upstream '{name}': ca_file {}: {e}", path.display()),
                )
            })?;
            ca_files.insert(name.clone(), CaFile { path: path.clone(), certificates });
        }
        let api_key = match &upstream.api_key_env {
            Some(var) => Some(Secret::new(env(var).ok_or_else(|| {
                src.error(
                    &format!("upstreams.{name}.api_key_env"),
                    format!("upstream '{name}': api_key_env names {var}, which is not set"),
                )
            })?)),
            None => None,
        };
        let url = base_url(&upstream.url)
            .map_err(|e| src.error(&format!("upstreams.{name}.url"), format!("upstream '{name}': {e}")))?;
        targets.insert(
            name.clone(),
            UpstreamTarget { name: name.as_str().into(), base_url: url.into(), mode: upstream.mode, api_key },
        );
    }
    let default_upstream = default.map(str::to_string).unwrap_or_else(|| {
        if targets.len() == 1 { targets.keys().next().cloned().unwrap_or_default() } else { "default".into() }
    });
    let env_url = env("LITELLM_URL")
        .map(|u| (u, UpstreamMode::LiteLlm))
        .or_else(|| env("UPSTREAM_URL").map(|u| (u, UpstreamMode::OpenAi)));
    let env_mode = match env("UPSTREAM_MODE") {
        Some(m) => Some(match m.to_ascii_lowercase().as_str() {
            "openai" => UpstreamMode::OpenAi,
            "litellm" => UpstreamMode::LiteLlm,
            other => return Err(ConfigError(format!("UPSTREAM_MODE must be openai or litellm, not {other:?}"))),
        }),
        None => None,
    };
    match targets.get_mut(&default_upstream) {
        Some(target) => {
            if let Some((url, _)) = &env_url {
                target.base_url =
                    base_url(url).map_err(|e| ConfigError(format!("LITELLM_URL/UPSTREAM_URL: {e}")))?.into();
            }
            if let Some(mode) = env_mode {
                target.mode = mode;
            }
        }
        None if file.is_some_and(|u| !u.is_empty()) || default.is_some() => {
            // Without `default_upstream`, the upstreams are at fault: several and none named.
            let path = if default.is_some() { "default_upstream" } else { "upstreams" };
            return Err(src
                .error(path, format!("default_upstream '{default_upstream}' is not one of the configured upstreams")));
        }
        None => {
            let (url, mode) = env_url.unwrap_or_else(|| (DEFAULT_UPSTREAM_URL.into(), UpstreamMode::OpenAi));
            let url = base_url(&url).map_err(|e| ConfigError(format!("LITELLM_URL/UPSTREAM_URL: {e}")))?;
            targets.insert(
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
    Ok(UpstreamSettings { targets, default: default_upstream, ca_files })
}

/// The most a `ca_file` may hold (a bundle of every public root is under 300 KiB).
const CA_FILE_LIMIT: u64 = 4 << 20;

/// The certificates of a PEM file, each checked as rustls will use it: as a root.
fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use std::io::Read;
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(CA_FILE_LIMIT + 1).read_to_end(&mut pem))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if pem.len() as u64 > CA_FILE_LIMIT {
        return Err(format!("it is larger than {} MiB", CA_FILE_LIMIT >> 20));
    }
    let certificates = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| {
        // Never the offending text: the path may name a file of secrets by mistake.
        let why = match e {
            pem::Error::MissingSectionEnd { .. } => "a block has no -----END line".to_string(),
            pem::Error::IllegalSectionStart { .. } => "a -----BEGIN line is malformed".to_string(),
            pem::Error::Base64Decode(_) => "a block is not valid base64".to_string(),
            other => other.to_string(),
        };
        format!("not a PEM certificate file: {why}")
    })?;
    if certificates.is_empty() {
        return Err("not a PEM certificate file: no -----BEGIN CERTIFICATE----- block".into());
    }
    for (index, certificate) in certificates.iter().enumerate() {
        rustls::RootCertStore::empty()
            .add(certificate.clone())
            .map_err(|e| format!("certificate {} cannot be a root: {e}", index + 1))?;
    }
    Ok(certificates)
}

fn models(
    configured: Vec<ModelSpec>,
    upstreams: &UpstreamSettings,
    src: &Source<'_>,
) -> Result<ModelSettings, ConfigError> {
    let mut names = HashSet::new();
    for (index, model) in configured.iter().enumerate() {
        if !names.insert(model.name.as_str()) {
            return Err(src.error(&format!("models[{index}].name"), format!("model '{}' is defined twice", model.name)));
        }
        if let Some(up) = &model.upstream
            && !upstreams.targets.contains_key(up)
        {
            return Err(src.error(
                &format!("models[{index}].upstream"),
                format!("model '{}': unknown upstream '{up}'", model.name),
            ));
        }
    }
    Ok(ModelSettings { configured })
}

fn redis_url(file: Option<RedisFile>, env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    match env("REDIS_URL") {
        Some(url) => Some(url),
        None => match env("REDIS_HOST") {
            Some(host) => {
                let port = env("REDIS_PORT").unwrap_or_else(|| "6379".into());
                Some(match env("REDIS_PASSWORD") {
                    Some(password) => format!("redis://:{password}@{host}:{port}"),
                    None => format!("redis://{host}:{port}"),
                })
            }
            None => file.map(|r| r.url),
        },
    }
}

fn langfuse(file: Option<LangfuseFile>, env: &dyn Fn(&str) -> Option<String>) -> LangfuseSettings {
    let host = env("LANGFUSE_HOST");
    let secrets_path = env("SECRETS_PATH").map(PathBuf::from);
    let Some(l) = file else {
        return LangfuseSettings { host, secrets_path, ..LangfuseSettings::default() };
    };
    LangfuseSettings {
        host: host.or(l.host),
        secrets_path: secrets_path.or(l.secrets_path),
        api: l.api.unwrap_or_default(),
        emit: l.emit.unwrap_or_default(),
        export: l.export,
        trace: TraceSettings {
            trace_name: l.trace_name,
            environment: l.environment,
            release: l.release,
            version: l.version,
            capture_bytes: l.capture_bytes,
        },
    }
}

fn rate_limit(file: Option<RateLimitFile>, src: &Source<'_>) -> Result<RateLimitSettings, ConfigError> {
    let Some(file) = file else {
        return Ok(RateLimitSettings::default());
    };
    // `try_from_secs_f64` refuses NaN, negative and out-of-range values (a plain
    // `from_secs_f64` panics on them).
    let max_wait = match file.max_wait_seconds {
        Some(s) => Duration::try_from_secs_f64(s).map_err(|_| {
            src.error("rate_limit.max_wait_seconds", format!("must be a number of seconds ≥ 0, not {s}"))
        })?,
        None => Duration::ZERO,
    };
    let lease_slice = match file.lease_slice {
        Some(f) if f > 0.0 && f <= 1.0 => f,
        Some(f) => return Err(src.error("rate_limit.lease_slice", format!("must be a share in (0, 1], not {f}"))),
        None => DEFAULT_LEASE_SLICE,
    };
    Ok(RateLimitSettings {
        max_wait,
        on_redis_outage: file.on_redis_outage.unwrap_or_default(),
        replicas: file.replicas.unwrap_or(1).max(1),
        mode: file.mode.unwrap_or_default(),
        lease_slice,
    })
}

fn insertion_id(file: Option<InsertionIdFile>) -> InsertionIdSettings {
    let default = InsertionIdSettings::default();
    let Some(file) = file else {
        return default;
    };
    InsertionIdSettings {
        prefix: file.prefix.unwrap_or(default.prefix),
        ttl: file.ttl_secs.map(Duration::from_secs).unwrap_or(default.ttl),
        record_timeout: file.record_timeout_ms.map(Duration::from_millis).unwrap_or(default.record_timeout),
    }
}

/// `auth`: `api_keys` (every project, named `api-key-<n>`) and `keys` become one key table of
/// digests (a plain key is digested here and not kept); `external` the identity service.
fn auth(file: Option<AuthFile>, src: &Source<'_>) -> Result<AuthSettings, ConfigError> {
    let Some(file) = file else {
        return Ok(AuthSettings::default());
    };
    let mut keys = Vec::new();
    for (i, entry) in file.api_keys.iter().enumerate() {
        let path = format!("auth.api_keys[{i}]");
        let digest = match entry.trim().strip_prefix("sha256:") {
            Some(hex) => KeyDigest::from_hex(hex).map_err(|e| src.error(&path, e))?,
            None if entry.trim().is_empty() => continue,
            None => KeyDigest::of(entry),
        };
        keys.push(GatewayKey { account: AccountInfo::unrestricted(format!("api-key-{}", i + 1)), digest });
    }
    for (i, entry) in file.keys.into_iter().enumerate() {
        let path = |key: &str| format!("auth.keys[{i}].{key}");
        if entry.name.trim().is_empty() {
            return Err(src.error(&path("name"), "must not be empty"));
        }
        if keys.iter().any(|k: &GatewayKey| k.account.account_id == entry.name) {
            return Err(src.error(&path("name"), format!("'{}' names two keys", entry.name)));
        }
        let digest = match (&entry.key, &entry.key_sha256) {
            (Some(key), None) if !key.trim().is_empty() => KeyDigest::of(key),
            (None, Some(hex)) => KeyDigest::from_hex(hex.trim().trim_start_matches("sha256:"))
                .map_err(|e| src.error(&path("key_sha256"), e))?,
            (Some(_), None) => return Err(src.error(&path("key"), "must not be empty")),
            _ => return Err(src.error(&format!("auth.keys[{i}]"), "give exactly one of `key` and `key_sha256`")),
        };
        let projects = match entry.projects {
            Some(projects) if projects.iter().any(|p| p == "*") => ProjectAccess::All,
            Some(projects) if !projects.is_empty() => ProjectAccess::Only(projects.into()),
            _ => return Err(src.error(&path("projects"), "list the projects the key may use, or [\"*\"] for all")),
        };
        let account = AccountInfo { account_id: entry.name, projects, limits: entry.limits };
        keys.push(GatewayKey { account, digest });
    }
    if let Some(dup) = keys.iter().enumerate().find_map(|(i, k)| keys[..i].iter().find(|o| o.digest == k.digest)) {
        return Err(src.error("auth", format!("two entries hold the same key (one is '{}')", dup.account.account_id)));
    }
    let external = match file.external {
        Some(external) => Some(ExternalAuthSettings {
            url: external
                .url
                .parse::<http::Uri>()
                .ok()
                .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
                .ok_or_else(|| src.error("auth.external.url", "must be an http(s) URL"))?,
            timeout: external.timeout_ms.map_or(llmgate_credentials::DEFAULT_TIMEOUT, Duration::from_millis),
            cache_ttl: external.cache_secs.map_or(llmgate_credentials::DEFAULT_CACHE_TTL, Duration::from_secs),
        }),
        None => None,
    };
    Ok(AuthSettings { keys, external })
}

/// `rollout_logs`; the TTL follows `insertion_id.ttl_secs` unless set.
fn rollout_logs(
    file: Option<RolloutLogsFile>,
    insertion_id: &InsertionIdSettings,
    src: &Source<'_>,
) -> Result<RolloutLogSettings, ConfigError> {
    let default = RolloutLogSettings { ttl: insertion_id.ttl, ..RolloutLogSettings::default() };
    let Some(file) = file else {
        return Ok(default);
    };
    let positive = |key: &str, value: Option<usize>, default: usize| match value {
        Some(0) => Err(src.error(&format!("rollout_logs.{key}"), "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    Ok(RolloutLogSettings {
        prefix: file.prefix.unwrap_or(default.prefix),
        ttl: file.ttl_secs.map(Duration::from_secs).unwrap_or(default.ttl),
        max_entries: positive("max_entries", file.max_entries, default.max_entries)?,
        max_entry_bytes: positive("max_entry_bytes", file.max_entry_bytes, default.max_entry_bytes)?,
    })
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

/// A positive number of seconds at `key`, or `default` without one.
fn positive_secs(value: Option<f64>, default: f64, key: &str, src: &Source<'_>) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(Duration::from_secs_f64(default)),
        Some(s)
            if s > 0.0
                && let Ok(duration) = Duration::try_from_secs_f64(s) =>
        {
            Ok(duration)
        }
        Some(s) => Err(src.error(key, format!("must be a positive number of seconds, not {s}"))),
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

#[cfg(test)]
mod tests {
    use llmgate_core::catalog::Limits;

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
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(&*config.default_target().base_url, DEFAULT_UPSTREAM_URL);
        assert_eq!(config.default_target().mode, UpstreamMode::OpenAi);
        assert_eq!(config.server.request_timeout, Duration::from_secs(300));
        assert!(config.redis.url.is_none() && config.langfuse.host.is_none());
        assert_eq!(config.langfuse.emit, Emit::ByUpstream);
        assert_eq!(config.rate_limit.on_redis_outage, OutagePolicy::FailOpen);
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
        assert_eq!(config.server.listen.to_string(), "0.0.0.0:4100");
        assert_eq!(&*config.default_target().base_url, "http://litellm:4000");
        assert_eq!(config.default_target().mode, UpstreamMode::LiteLlm);
        assert_eq!(config.server.request_timeout, Duration::from_millis(2500));
        assert_eq!(config.redis.url.unwrap().expose(), "redis://:pw@r:6379");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_line() {
        let text = "listen: \"127.0.0.1:1\"\nupstreams:\n  a:\n    url: http://a\n    colour: red\n";
        let err = parse(text, &no_env).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:5:5: upstreams.a.colour: unknown field `colour`"), "{err}");

        let err =
            parse("upstreams:\n  a: {url: \"http://a\"}\ndefault_upstream: b\n", &no_env).unwrap_err().to_string();
        assert_eq!(
            err,
            "test.yaml:3:19: default_upstream: default_upstream 'b' is not one of the configured upstreams"
        );

        let err = parse("langfuse: {host: \"http://l\", colour: red}\n", &no_env).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:1:30: langfuse.colour: unknown field `colour`"), "{err}");

        let err = parse("models:\n  - name: m\n    limits: {rpm: -5}\n", &no_env).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:3:19: models[0].limits.rpm: ") && err.contains("invalid limit -5"), "{err}");
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
rate_limit: {max_wait_seconds: 2, on_redis_outage: fail_closed, mode: exact, lease_slice: 0.1}
"#;
        let env = |k: &str| (k == "OPENAI_API_KEY").then(|| "sk-x".to_string());
        let config = parse(text, &env).unwrap();
        assert_eq!(config.upstreams.default, "litellm");
        assert_eq!(config.upstreams.targets["openai"].api_key.as_ref().unwrap().expose(), "sk-x");
        assert_eq!(config.models.configured[0].limits.rpm, Some(500));
        assert_eq!(config.langfuse.api, LangfuseApi::V3);
        assert_eq!(config.langfuse.emit, Emit::Events);
        assert_eq!(config.langfuse.trace.environment.as_deref(), Some("staging"));
        assert_eq!(config.langfuse.trace.capture_bytes, Some(1024));
        assert_eq!(config.rate_limit.on_redis_outage, OutagePolicy::FailClosed);
        assert_eq!((config.rate_limit.mode, config.rate_limit.lease_slice), (RateLimitMode::Exact, 0.1));
        assert!(!config.describe().contains("sk-x"));
        let empty = |_: &str| None;
        assert_eq!(parse("models: []\n", &empty).unwrap().rate_limit.mode, RateLimitMode::Lease, "the default");
        for slice in ["0", "1.5", "-0.1", ".nan"] {
            let error = parse(&format!("rate_limit: {{lease_slice: {slice}}}\n"), &empty).unwrap_err().to_string();
            assert!(error.contains("rate_limit.lease_slice"), "{slice}: {error}");
        }
    }

    #[test]
    fn the_catalogue_says_where_each_entry_comes_from_and_built_ins_never_route() {
        let text = "models:\n  - {name: gpt-4o, fallbacks: [gpt-4o-mini]}\n  - {name: mine, limits: {rpm: 3}}\n";
        let config = parse(text, &no_env).unwrap();
        let entries = config.models.entries();
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
        let catalog = config.models.catalog();
        assert_eq!(catalog.get("gpt-4o").unwrap().context_window, None);
        assert_eq!(catalog.get("gpt-4o").unwrap().fallbacks, ["gpt-4o-mini"]);
        let described = config.describe();
        assert!(described.contains("fallbacks active: gpt-4o → gpt-4o-mini\n"), "{described}");
        assert!(parse("", &no_env).unwrap().describe().contains("fallbacks active: none\n"));
    }

    #[test]
    fn a_repeated_key_is_reported_at_its_own_entry() {
        // `name: a` again in the third model: its line, not the first model's.
        let text = "models:\n  - name: a\n    upstream: u\n  - name: b\n    upstream: u\n  - name: a\n";
        let err = parse(&format!("upstreams:\n  u: {{url: \"http://u\"}}\n{text}"), &no_env).unwrap_err();
        assert_eq!(err.to_string(), "test.yaml:8:11: models[2].name: model 'a' is defined twice");

        // The second model's `upstream`, though the first one has an `upstream:` line too.
        let text = "upstreams:\n  u: {url: \"http://u\"}\nmodels:\n  - name: a\n    upstream: u\n  - name: b\n    \
                    upstream: v\n  - name: c\n    upstream: u\n";
        let err = parse(text, &no_env).unwrap_err();
        assert_eq!(err.to_string(), "test.yaml:7:15: models[1].upstream: model 'b': unknown upstream 'v'");

        // Flow style, all on one line: the column tells the entries apart.
        let text = "upstreams: {u: {url: \"http://u\"}}\nmodels: [{name: a, upstream: u}, {name: b, upstream: v}]\n";
        let err = parse(text, &no_env).unwrap_err();
        assert_eq!(err.to_string(), "test.yaml:2:54: models[1].upstream: model 'b': unknown upstream 'v'");
    }

    #[test]
    fn a_type_error_deep_in_a_list_names_its_path_and_line() {
        let text = "models:\n  - name: a\n  - name: b\n  - name: c\n    limits:\n      rpm: lots\n";
        let err = parse(text, &no_env).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:6:12: models[2].limits.rpm: "), "{err}");

        let text = "upstreams:\n  a: {url: \"http://a\"}\n  litellm:\n    url: \"http://l\"\n    mode: lite\n";
        let err = parse(text, &no_env).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:5:11: upstreams.litellm.mode: unknown variant `lite`"), "{err}");

        let err = parse("models:\n  - name: a\n    fallbacks: b\n", &no_env).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:3:16: models[0].fallbacks: "), "{err}");

        let err = parse("rate_limit:\n  on_redis_outage: fail_sometimes\n", &no_env).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:2:20: rate_limit.on_redis_outage: unknown variant"), "{err}");
        // `emit` takes the documented values only; leaving it out is what "by upstream" means.
        let err = parse("langfuse:\n  emit: by_upstream\n", &no_env).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:2:9: langfuse.emit: unknown variant `by_upstream`"), "{err}");
    }

    #[test]
    fn checks_after_parsing_name_the_line_and_key_path() {
        let cases = [
            ("listen: \"127.0.0.1:1\"\ndrain_timeout_secs: -1\n", "test.yaml:2:21: drain_timeout_secs: "),
            ("request_timeout_secs: 0\n", "test.yaml:1:23: request_timeout_secs: "),
            ("rate_limit:\n  replicas: 2\n  max_wait_seconds: -3\n", "test.yaml:3:21: rate_limit.max_wait_seconds: "),
            ("listen: nowhere\n", "test.yaml:1:9: listen: invalid `listen`"),
            ("metrics: {listen: \"x:y\"}\n", "test.yaml:1:19: metrics.listen: invalid `metrics.listen`"),
            (
                "upstreams:\n  a: {url: \"http://a\"}\n  b: {url: \"ftp://b\"}\ndefault_upstream: a\n",
                "test.yaml:3:12: upstreams.b.url: upstream 'b': URL \"ftp://b\" must start with",
            ),
            (
                "upstreams:\n  a:\n    url: \"http://a\"\n    api_key_env: UNSET_KEY\n",
                "test.yaml:4:18: upstreams.a.api_key_env: upstream 'a': api_key_env names UNSET_KEY, which is not set",
            ),
            (
                "encoded_base_url:\n  allow:\n    - \"https://a.example/v1\"\n    - \"https://b.example/../v1\"\n",
                "test.yaml:4:7: encoded_base_url.allow[1]: invalid encoded_base_url.allow entry",
            ),
            // Two upstreams and no `default_upstream`: the upstreams are at fault.
            (
                "upstreams:\n  a: {url: \"http://a\"}\n  b: {url: \"http://b\"}\n",
                "test.yaml:2:3: upstreams: default_upstream 'default' is not one of the configured upstreams",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text, &no_env).unwrap_err().to_string();
            assert!(err.starts_with(expected), "{text:?}\n  got {err}\n want {expected}");
        }
    }

    #[test]
    fn syntax_errors_and_duplicate_keys_name_the_line() {
        let err = parse("listen: \"127.0.0.1:1\"\nupstreams: [\n", &no_env).unwrap_err().to_string();
        assert!(err.starts_with("test.yaml:"), "{err}");
        let err = parse("listen: \"127.0.0.1:1\"\nlisten: \"127.0.0.1:2\"\n", &no_env).unwrap_err().to_string();
        assert_eq!(err, "test.yaml:2:1: duplicate mapping key: listen");
        let err = parse("upstreams:\n  a: {url: \"http://a\"}\n  a: {url: \"http://b\"}\n", &no_env).unwrap_err();
        assert_eq!(err.to_string(), "test.yaml:3:3: upstreams: duplicate mapping key: a");
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let env = |k: &str| (k == "REQUEST_TIMEOUT").then(|| "soon".to_string());
        let err = parse("request_timeout_secs: 5\n", &env).unwrap_err().to_string();
        assert_eq!(err, "REQUEST_TIMEOUT must be a positive number of seconds, not \"soon\"");
        let env = |k: &str| (k == "UPSTREAM_MODE").then(|| "grpc".to_string());
        let err = Config::load(None, &env).unwrap_err().to_string();
        assert_eq!(err, "UPSTREAM_MODE must be openai or litellm, not \"grpc\"");
    }

    #[test]
    fn a_ca_file_is_read_at_start_and_a_bad_one_names_the_file_and_key() {
        let dir = std::env::temp_dir().join(format!("llmgate-config-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap().pem();
        let upstream = |path: &str| format!("upstreams:\n  a:\n    url: \"https://a\"\n    ca_file: \"{path}\"\n");

        // Two certificates (a bundle): both trusted, and `check-config` says so.
        let bundle = write("bundle.pem", &format!("{ca}{ca}"));
        let config = parse(&upstream(&bundle), &no_env).unwrap();
        assert_eq!(config.upstreams.ca_files["a"].certificates.len(), 2);
        assert!(
            config.describe().contains(&format!("also trusts {bundle} (2 certificate(s))")),
            "{}",
            config.describe()
        );

        let missing = dir.join("missing.pem").display().to_string();
        let cases = [
            (missing.clone(), format!("ca_file {missing}: cannot read it: ")),
            (dir.display().to_string(), format!("ca_file {}: cannot read it: ", dir.display())),
            (write("text.pem", "hello\n"), "no -----BEGIN CERTIFICATE----- block".into()),
            (write("key.pem", &key.serialize_pem()), "no -----BEGIN CERTIFICATE----- block".into()),
            (
                write("bad.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                "certificate 1 cannot be a root: ".into(),
            ),
            (
                write("broken.pem", "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
                "not a PEM certificate file: a block is not valid base64".into(),
            ),
            (
                write("cut.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n"),
                "not a PEM certificate file: a block has no -----END line".into(),
            ),
        ];
        for (path, expected) in cases {
            let err = parse(&upstream(&path), &no_env).unwrap_err().to_string();
            assert!(err.starts_with("test.yaml:4:14: upstreams.a.ca_file: upstream 'a': "), "{err}");
            assert!(err.contains(&expected), "{err}\n want {expected}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
