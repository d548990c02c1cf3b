//! The resolved sections of a [`Config`](super::Config), each building the component the stack
//! needs from the layer crates' own types.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use llmgate_core::{
    BoxError, GatewayBody,
    catalog::{Catalog, Limits, ModelSpec},
    ext::{Secret, UpstreamTarget},
};
use llmgate_credentials::{
    AuthProvider, BaseUrlAllowlist, ExternalAuth, FirstOf, GatewayKey, NoAuth, Projects, Reloadable, Secrets,
    StaticApiKeys,
};
use llmgate_insertion_id::{InsertionIdLayer, InsertionStore, MemoryStore, RedisStore};
use llmgate_langfuse::{
    DEFAULT_MAX_CONCURRENT_EXPORTS, DEFAULT_MAX_QUEUE_SPANS, Emit, ExporterConfig, LangfuseClient, LangfuseExporter,
    LangfuseLayer, LangfuseReader, V3Reader, V4Reader,
};
use llmgate_rate_limit_fallback::{
    DEFAULT_LEASE_SLICE, LeasedRateStore, MemoryRateStore, OutagePolicy, RateLimitFallbackLayer, RateStore,
    RedisRateStore,
};
use llmgate_rollout_logs::{
    DEFAULT_MAX_ENTRIES, DEFAULT_MAX_ENTRY_BYTES, DEFAULT_PREFIX, LogStore, MemoryLogStore, RedisLogStore,
    RolloutLogService,
};
use redis::aio::ConnectionLike;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::{redis::RedisConnection, target::Targets};

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

/// What `--engine pingora` (or `engine: pingora`) answers on a build without the `pingora`
/// feature: how to get a build that has it.
pub const PINGORA_NOT_BUILT: &str = "engine pingora is not in this build: it is the cargo feature `pingora` \
     (building it needs cmake), e.g. `cargo run --release --features pingora -- serve --engine pingora`";

impl Engine {
    /// Whether this build can run the engine: `Err` with [`PINGORA_NOT_BUILT`] for Pingora on a
    /// build without the `pingora` feature.
    pub fn check_built(self) -> Result<(), &'static str> {
        match self {
            Engine::Pingora if !cfg!(feature = "pingora") => Err(PINGORA_NOT_BUILT),
            _ => Ok(()),
        }
    }
}

/// The server: `listen`, `engine`, `request_timeout_secs`, `drain_timeout_secs`,
/// `body_limit_bytes`, `metrics.listen`.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The engine (`engine`, or `llmgate serve --engine`).
    pub engine: Engine,
    /// Connect and response-head timeout for upstream calls, and the longest silence inside a
    /// stream (`REQUEST_TIMEOUT`).
    pub request_timeout: Duration,
    /// How long graceful shutdown waits for in-flight requests and streams.
    pub drain_timeout: Duration,
    /// The chat request body limit.
    pub body_limit: usize,
    /// A second listener serving only `GET /metrics`, without auth (`metrics.listen`).
    pub metrics_listen: Option<SocketAddr>,
}

/// The upstreams (`upstreams`, `default_upstream`, and the `LITELLM_URL`/`UPSTREAM_URL`/
/// `UPSTREAM_MODE` environment).
#[derive(Clone, Debug)]
pub struct UpstreamSettings {
    /// Upstreams by name.
    pub targets: BTreeMap<String, UpstreamTarget>,
    /// The upstream used for unknown models and the catch-all; always one of `targets`.
    pub default: String,
    /// The private authorities an upstream trusts on top of the built-in roots
    /// (`upstreams.<name>.ca_file`), by upstream name.
    pub ca_files: BTreeMap<String, CaFile>,
}

/// An upstream's `ca_file`: the engines trust its certificates for that upstream's TLS
/// connections (also those to a client-chosen `encoded_base_url` routed through it), on top of
/// the built-in roots.
#[derive(Clone, Debug)]
pub struct CaFile {
    /// As configured.
    pub path: PathBuf,
    /// The file's certificates (DER), in order; at least one, each usable as a root.
    pub certificates: Vec<CertificateDer<'static>>,
}

impl UpstreamSettings {
    /// The default upstream's target.
    pub fn default_target(&self) -> &UpstreamTarget {
        // `Config::load` guarantees the default upstream exists.
        &self.targets[&self.default]
    }

    /// What `ResolveTarget` resolves a model's upstream with.
    pub fn targets(&self, catalog: Arc<Catalog>) -> Targets {
        Targets { upstreams: self.targets.clone(), default_upstream: self.default.clone(), catalog }
    }
}

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

/// The models: the config's `models` list over the built-in catalogue.
#[derive(Clone, Debug, Default)]
pub struct ModelSettings {
    /// Models configured in the file (extending the built-in catalogue; see
    /// [`catalog`](Self::catalog)).
    pub configured: Vec<ModelSpec>,
}

impl ModelSettings {
    /// The effective catalogue, each entry with its origin: the built-in entries (in their
    /// order; a config entry of the same name replaces one whole), then the config's other
    /// entries in file order.
    ///
    /// Built-in entries carry facts only (window, output cap, price): their `fallbacks` and
    /// `limits` are always empty, so no built-in entry reroutes, refuses or limits a request by
    /// itself. Only a configured `fallbacks` list moves a request to another model.
    pub fn entries(&self) -> Vec<(ModelSpec, ModelOrigin)> {
        let configured = |name: &str| self.configured.iter().find(|m| m.name == name);
        let mut entries: Vec<(ModelSpec, ModelOrigin)> = llmgate_context_routing::default_catalog()
            .into_iter()
            .map(|builtin| match configured(&builtin.name) {
                Some(model) => (model.clone(), ModelOrigin::ConfigOverridesBuiltIn),
                None => {
                    (ModelSpec { fallbacks: Vec::new(), limits: Limits::default(), ..builtin }, ModelOrigin::BuiltIn)
                }
            })
            .collect();
        for model in &self.configured {
            if !entries.iter().any(|(m, _)| m.name == model.name) {
                entries.push((model.clone(), ModelOrigin::Config));
            }
        }
        entries
    }

    /// The catalogue the routing layers, the cost calculation and the metrics use
    /// ([`entries`](Self::entries) without the origins).
    pub fn catalog(&self) -> Catalog {
        Catalog::new(self.entries().into_iter().map(|(model, _)| model))
    }
}

/// Redis (`redis.url`, or `REDIS_URL`, or `REDIS_HOST`/`REDIS_PORT`/`REDIS_PASSWORD`).
#[derive(Clone, Debug, Default)]
pub struct RedisSettings {
    /// The Redis URL, if any (else in-memory stores).
    pub url: Option<Secret>,
}

impl RedisSettings {
    /// One shared connection (lazy: a Redis that is down at start fails no request), or `None`
    /// without Redis.
    pub fn connect(&self) -> Result<Option<RedisConnection>, BoxError> {
        match &self.url {
            Some(url) => Ok(Some(RedisConnection::open(url.expose())?)),
            None => Ok(None),
        }
    }
}

/// Insertion ids (`insertion_id`).
#[derive(Clone, Debug)]
pub struct InsertionIdSettings {
    /// The key prefix in Redis.
    pub prefix: String,
    /// How long an id stays recorded.
    pub ttl: Duration,
    /// How long a response waits for its insertion record before going on.
    pub record_timeout: Duration,
}

impl Default for InsertionIdSettings {
    fn default() -> Self {
        Self { prefix: String::new(), ttl: Duration::from_secs(86_400), record_timeout: Duration::from_millis(250) }
    }
}

impl InsertionIdSettings {
    /// The insertion store: in Redis over `redis`, else in memory.
    pub fn store(&self, redis: Option<&RedisConnection>) -> Arc<dyn InsertionStore> {
        let prefix = self.prefix.as_str();
        match redis {
            None => Arc::new(MemoryStore::new().ttl(self.ttl)),
            Some(RedisConnection::Single(conn)) => Arc::new(RedisStore::new(conn.clone()).prefix(prefix).ttl(self.ttl)),
            Some(RedisConnection::Cluster(conn)) => {
                Arc::new(RedisStore::new(conn.clone()).prefix(prefix).ttl(self.ttl))
            }
        }
    }

    /// The insertion-id layer over `store`.
    pub fn layer(&self, store: Arc<dyn InsertionStore>) -> InsertionIdLayer {
        InsertionIdLayer::new(store).record_timeout(self.record_timeout)
    }
}

/// Rollout logs and status (`rollout_logs`).
#[derive(Clone, Debug)]
pub struct RolloutLogSettings {
    /// The key prefix in Redis.
    pub prefix: String,
    /// How long a rollout's log lives after its last write (default: `insertion_id.ttl_secs`).
    pub ttl: Duration,
    /// Entries kept per rollout (the oldest go first; the latest status stays).
    pub max_entries: usize,
    /// The bound on one stored entry (400 past it).
    pub max_entry_bytes: usize,
}

impl Default for RolloutLogSettings {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.into(),
            ttl: Duration::from_secs(86_400),
            max_entries: DEFAULT_MAX_ENTRIES,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
        }
    }
}

impl RolloutLogSettings {
    /// The log store: in Redis over `redis` (shared by the replicas), else in memory.
    pub fn store(&self, redis: Option<&RedisConnection>) -> Arc<dyn LogStore> {
        let (prefix, ttl, max_entries) = (self.prefix.as_str(), self.ttl, self.max_entries);
        match redis {
            None => Arc::new(MemoryLogStore::new().ttl(ttl).max_entries(max_entries)),
            Some(RedisConnection::Single(conn)) => {
                Arc::new(RedisLogStore::new(conn.clone()).prefix(prefix).ttl(ttl).max_entries(max_entries))
            }
            Some(RedisConnection::Cluster(conn)) => {
                Arc::new(RedisLogStore::new(conn.clone()).prefix(prefix).ttl(ttl).max_entries(max_entries))
            }
        }
    }

    /// The `/logs` and `/status` service over `store`: request bodies up to `body_limit`, and
    /// requests without a project in their path in the scope of `default_project`.
    pub fn service(
        &self,
        store: Arc<dyn LogStore>,
        body_limit: usize,
        default_project: Option<&str>,
    ) -> RolloutLogService {
        let service = RolloutLogService::new(store).max_entry_bytes(self.max_entry_bytes).body_limit(body_limit);
        match default_project {
            Some(project) => service.default_scope(project),
            None => service,
        }
    }
}

/// Rate limiting (`rate_limit`).
#[derive(Clone, Debug)]
pub struct RateLimitSettings {
    /// The longest wait for a rate limit before falling back.
    pub max_wait: Duration,
    /// What rate limiting does while Redis is unreachable.
    pub on_redis_outage: OutagePolicy,
    /// How many gateway replicas share the limits (divides them under `fail_open`).
    pub replicas: u32,
    /// How the replicas share the limits in Redis.
    pub mode: RateLimitMode,
    /// The share of each limit one lease takes (`lease` mode).
    pub lease_slice: f64,
}

/// How replicas share rate limits in Redis (`rate_limit.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitMode {
    /// Each replica takes leases of `lease_slice` × each limit and spends them locally: most
    /// checks make no round trip; over-admission at most `replicas × slice` per window.
    #[default]
    Lease,
    /// One script call per check: exact, one round trip per attempt.
    Exact,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            max_wait: Duration::ZERO,
            on_redis_outage: OutagePolicy::default(),
            replicas: 1,
            mode: RateLimitMode::default(),
            lease_slice: DEFAULT_LEASE_SLICE,
        }
    }
}

impl RateLimitSettings {
    /// The rate store: in Redis over `redis` (shared by the replicas), else in process.
    pub fn store(&self, redis: Option<&RedisConnection>) -> Arc<dyn RateStore> {
        match redis {
            None => Arc::new(MemoryRateStore::new()),
            Some(RedisConnection::Single(conn)) => self.shared(conn.clone()),
            Some(RedisConnection::Cluster(conn)) => self.shared(conn.clone()),
        }
    }

    fn shared<C: ConnectionLike + Clone + Send + Sync + 'static>(&self, conn: C) -> Arc<dyn RateStore> {
        let redis = RedisRateStore::new(conn).policy(self.on_redis_outage).replicas(self.replicas);
        match self.mode {
            RateLimitMode::Lease => Arc::new(LeasedRateStore::new(redis).slice(self.lease_slice)),
            RateLimitMode::Exact => Arc::new(redis),
        }
    }

    /// The rate-limit and fallback layer over `catalog` and `store`.
    pub fn layer(&self, catalog: Arc<Catalog>, store: Arc<dyn RateStore>) -> RateLimitFallbackLayer {
        RateLimitFallbackLayer::new(catalog, store).max_wait(self.max_wait)
    }
}

/// Which Langfuse read API the traces endpoints and `llmgate report` use (`langfuse.api`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LangfuseApi {
    /// The legacy `/api/public/traces` API.
    V3,
    /// `/api/public/v2/observations`.
    #[default]
    V4,
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

/// How the Langfuse exporter batches (`langfuse.export`; batch size and delay like the official
/// SDKs, a larger queue and parallel exports so a burst drops nothing).
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
    /// Exports built and sent at once (of one project or several).
    pub concurrent_exports: usize,
}

impl Default for ExportSettings {
    fn default() -> Self {
        Self {
            batch_max_spans: 512,
            batch_delay_ms: 5000,
            queue_max_spans: DEFAULT_MAX_QUEUE_SPANS,
            timeout_ms: 30_000,
            concurrent_exports: DEFAULT_MAX_CONCURRENT_EXPORTS,
        }
    }
}

/// Langfuse (`langfuse`, `LANGFUSE_HOST`, `SECRETS_PATH`).
#[derive(Clone, Debug, Default)]
pub struct LangfuseSettings {
    /// The Langfuse host, if any (export and the traces endpoints off without).
    pub host: Option<String>,
    /// The secrets file with the projects and their Langfuse keys.
    pub secrets_path: Option<PathBuf>,
    /// The read API.
    pub api: LangfuseApi,
    /// What to export ([`Emit::ByUpstream`] when the config says nothing).
    pub emit: Emit,
    /// How the exporter batches.
    pub export: ExportSettings,
    /// What every exported trace carries.
    pub trace: TraceSettings,
}

impl LangfuseSettings {
    /// The projects of the secrets file (none without one).
    pub fn projects(&self) -> Result<Projects, BoxError> {
        Ok(match &self.secrets_path {
            Some(path) => Projects::from(Secrets::load(path).map_err(|e| e.describe(path))?),
            None => Projects::empty(),
        })
    }

    /// The exporter, sending through `client`; `None` without a host or with `emit: off`.
    pub fn exporter(&self, client: LangfuseClient) -> Option<LangfuseExporter> {
        let host = self.host.as_deref().filter(|_| self.emit != Emit::Off)?;
        let export = self.export;
        let config = ExporterConfig::new(host)
            .max_batch_spans(export.batch_max_spans)
            .schedule_delay(Duration::from_millis(export.batch_delay_ms))
            .max_queue_spans(export.queue_max_spans)
            .max_concurrent_exports(export.concurrent_exports)
            .export_timeout(Duration::from_millis(export.timeout_ms));
        Some(LangfuseExporter::spawn(config, client))
    }

    /// The Langfuse layer exporting to `exporter`, with what every trace carries.
    pub fn layer(&self, exporter: LangfuseExporter) -> LangfuseLayer {
        let trace = &self.trace;
        let mut layer = LangfuseLayer::new(exporter).emit(self.emit);
        if let Some(name) = &trace.trace_name {
            layer = layer.trace_name(name.as_str());
        }
        if let Some(environment) = &trace.environment {
            layer = layer.environment(environment.as_str());
        }
        if let Some(release) = &trace.release {
            layer = layer.release(release.as_str());
        }
        if let Some(version) = &trace.version {
            layer = layer.version(version.as_str());
        }
        if let Some(bytes) = trace.capture_bytes {
            layer = layer.capture_limit(bytes);
        }
        layer
    }

    /// The read back end of the configured API, reading through `client`; `None` without a
    /// host.
    pub fn reader(&self, client: LangfuseClient) -> Option<Arc<dyn LangfuseReader>> {
        let host = self.host.as_deref()?;
        Some(match self.api {
            LangfuseApi::V3 => Arc::new(V3Reader::new(client, host)),
            LangfuseApi::V4 => Arc::new(V4Reader::new(client, host)),
        })
    }
}

/// The `encoded_base_url` allowlist.
#[derive(Clone, Debug, Default)]
pub struct EncodedBaseUrlSettings {
    /// The allowed base URLs as configured.
    pub allow: Vec<String>,
    /// The same, parsed (checked when the config is loaded).
    allowlist: BaseUrlAllowlist,
}

impl EncodedBaseUrlSettings {
    /// Parses `allow`; an error names the index of the entry at fault.
    pub(super) fn new(allow: Vec<String>) -> Result<Self, (usize, String)> {
        let allowlist = BaseUrlAllowlist::parse(allow.iter()).map_err(|error| {
            (allow.iter().position(|entry| *entry == error.entry).unwrap_or_default(), error.to_string())
        })?;
        Ok(Self { allow, allowlist })
    }

    /// The allowlist the project layer checks `encoded_base_url` against.
    pub fn allowlist(&self) -> BaseUrlAllowlist {
        self.allowlist.clone()
    }
}

/// The gateway's own API keys and identity service (`auth`).
#[derive(Clone, Debug, Default)]
pub struct AuthSettings {
    /// `auth.api_keys` (every project) then `auth.keys`, as digests; empty means no keys.
    pub keys: Vec<GatewayKey>,
    /// `auth.external`: the identity service asked for tokens that are not gateway keys.
    pub external: Option<ExternalAuthSettings>,
}

/// `auth.external`.
#[derive(Clone, Debug)]
pub struct ExternalAuthSettings {
    /// Where tokens are checked (`GET`, the client's `Authorization`).
    pub url: http::Uri,
    /// The longest one check may take (then 503).
    pub timeout: Duration,
    /// How long an answer is reused.
    pub cache_ttl: Duration,
}

impl AuthSettings {
    /// The gateway keys (`auth.api_keys` and `auth.keys`); `None` without any.
    pub fn static_keys(&self) -> Option<StaticApiKeys> {
        (!self.keys.is_empty()).then(|| StaticApiKeys::from_keys(self.keys.clone()))
    }

    /// The gateway keys' names (what metrics label requests and refusals with).
    pub fn key_names(&self) -> HashSet<String> {
        self.keys.iter().map(|k| k.account.account_id.clone()).collect()
    }

    /// The auth provider: the gateway keys (`keys`, the handle a secrets reload swaps), then the
    /// identity service; nobody checked when neither is configured.
    pub fn provider(&self, keys: Option<&Reloadable<StaticApiKeys>>) -> Arc<dyn AuthProvider> {
        let keys = keys.map(|keys| Arc::new(keys.clone()) as Arc<dyn AuthProvider>);
        let external: Option<Arc<dyn AuthProvider>> = self.external.as_ref().map(|e| {
            let client = llmgate_hyper::http_client::<GatewayBody>(e.timeout);
            Arc::new(ExternalAuth::new(client, e.url.clone()).timeout(e.timeout).cache_ttl(e.cache_ttl)) as _
        });
        match (keys, external) {
            (None, None) => Arc::new(NoAuth),
            (Some(one), None) | (None, Some(one)) => one,
            (Some(keys), Some(external)) => Arc::new(FirstOf::new(vec![keys, external])),
        }
    }
}

/// Logging (`LOG_LEVEL`, `RUST_LOG`; `LOG_FORMAT` is read where logging starts).
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// The log filter (`LOG_LEVEL`, or `RUST_LOG` when set; default `info`).
    pub filter: String,
}
