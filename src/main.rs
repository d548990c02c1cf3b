//! `llmgate`: the reference proxy.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use llmgate::{
    Gateway,
    config::Config,
    mock_upstream::{MockOptions, MockUpstream},
};

// The proxy allocates per request (headers, JSON, spans) on several threads at once: glibc
// malloc cost a fifth of its CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "llmgate", version, about = "An LLM gateway built from composable Tower layers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Run a bare proxy hop: the same upstream and host as `serve`, no layers. The baseline of
    /// the end-to-end benchmark (`scripts/bench.sh`); reads the same config (listen address,
    /// upstream URL, timeouts, engine).
    BareProxy(ServeArgs),
    /// Validate a config and print what `serve` would run.
    CheckConfig {
        /// The YAML config file.
        #[arg(long, env = "LLMGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run the OpenAI-compatible mock upstream used by tests, the quickstart and benchmarks.
    MockUpstream {
        /// Port to listen on (0 picks one).
        #[arg(long, default_value_t = 4010)]
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Delay before every response head, in milliseconds.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Content chunks per streamed response.
        #[arg(long, default_value_t = 5)]
        chunks: usize,
        /// Pause between streamed chunks, in milliseconds.
        #[arg(long, default_value_t = 0)]
        chunk_delay_ms: u64,
        /// Answer every Nth chat request with 429.
        #[arg(long)]
        rate_limit_every: Option<u64>,
    },
    /// Read a gateway key on standard input and print the `key_sha256` value that holds it in
    /// the config (`auth.keys[].key_sha256`; `sha256:<value>` in `auth.api_keys`).
    HashKey,
    /// Print the fallback report of a project, read back from Langfuse.
    Report {
        /// The project (the secrets file's default when omitted).
        #[arg(long)]
        project: Option<String>,
        /// How far back to look: e.g. 7d, 24h, 90m.
        #[arg(long, default_value = "7d", value_parser = llmgate::report::parse_since)]
        since: Duration,
        /// Output format.
        #[arg(long, value_enum, default_value_t = llmgate::report::Format::Table)]
        format: llmgate::report::Format,
        /// The YAML config file (for the Langfuse host, read API and secrets file).
        #[arg(long, env = "LLMGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// What `serve` and `bare-proxy` read.
#[derive(clap::Args)]
struct ServeArgs {
    /// The YAML config file (optional: embedded defaults otherwise).
    #[arg(long, env = "LLMGATE_CONFIG")]
    config: Option<PathBuf>,
    /// The engine: hyper (default) or pingora; overrides the config's `engine`.
    #[arg(long, value_enum)]
    engine: Option<llmgate::config::Engine>,
}

fn main() -> ExitCode {
    heap_in_small_pages();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("llmgate: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("llmgate: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Keeps the heap in 4 KiB pages. mimalloc asks Linux for transparent huge pages on its arenas,
/// so each 2 MiB that holds one live object stays resident: with 1,000 open streams the proxy
/// peaked ~30 MiB higher with them, at no measurable gain in CPU per request
/// (docs/performance.md, "Memory"). An operator who sets `MIMALLOC_ALLOW_THP` decides instead
/// (mimalloc reads it when the process starts).
fn heap_in_small_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none()
        && let Err(error) = nix::sys::prctl::set_thp_disable(true)
    {
        eprintln!("llmgate: could not turn transparent huge pages off ({error}); memory use will be higher");
    }
}

fn load(config: Option<PathBuf>) -> Result<Config, llmgate::config::ConfigError> {
    Config::load(config.as_deref(), &|name| std::env::var(name).ok())
}

/// The config for `serve` and `bare-proxy`, with the engine flag applied (and refused when this
/// build lacks the engine), and logging started (keep the guard until exit).
fn load_for_serving(
    ServeArgs { config, engine }: ServeArgs,
) -> Result<(Config, tracing_appender::non_blocking::WorkerGuard), llmgate::core::BoxError> {
    let mut config = load(config)?;
    if let Some(engine) = engine {
        engine.check_built()?;
        config.server.engine = engine;
    }
    let guard = init_logging(&config.log.filter);
    Ok((config, guard))
}

async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    llmgate_hyper::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))
}

/// Starts logging to stdout through a writer thread, so a request never waits for stdout; the
/// guard flushes what is queued when dropped (at exit). Lines are dropped, never waited for,
/// when the writer falls 128 000 lines behind.
fn init_logging(filter: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // pingora-core traces raw request heads, `authorization` included: when anything traces,
    // its HTTP protocol module stops at debug.
    let traces = filter.max_level_hint().is_none_or(|level| level == tracing_subscriber::filter::LevelFilter::TRACE);
    let filter = match "pingora_core::protocols::http=debug".parse() {
        Ok(cap) if traces => filter.add_directive(cap),
        _ => filter,
    };
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    if std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
    guard
}

async fn run(command: Command) -> Result<(), llmgate::core::BoxError> {
    match command {
        Command::CheckConfig { config } => {
            let config = load(config)?;
            let description = config.describe();
            // Building the stack checks what the file alone cannot: the secrets file, the
            // allowlist entries, the Redis URL.
            Gateway::from_config(config).await?;
            print!("configuration OK\n{description}");
            Ok(())
        }
        Command::Serve(args) => {
            let (config, _log) = load_for_serving(args)?;
            let listen = config.server.listen;
            let gateway = Gateway::from_config(config).await?;
            let listener = bind(listen).await?;
            tracing::info!("llmgate listening on http://{}", listener.local_addr()?);
            gateway.serve(listener, shutdown_signal()).await;
            Ok(())
        }
        Command::BareProxy(args) => {
            let (config, _log) = load_for_serving(args)?;
            let service = llmgate::serve::bare_service(&config)?;
            let listener = bind(config.server.listen).await?;
            tracing::info!(
                "bare proxy hop (no layers) listening on http://{} → {}",
                listener.local_addr()?,
                config.default_target().base_url
            );
            let server = &config.server;
            llmgate::serve::serve_on(server.engine, listener, service, shutdown_signal(), server.drain_timeout).await;
            Ok(())
        }
        Command::MockUpstream { port, host, delay_ms, chunks, chunk_delay_ms, rate_limit_every } => {
            let _log = init_logging("info");
            let options = MockOptions {
                delay: Duration::from_millis(delay_ms),
                chunks,
                chunk_delay: Duration::from_millis(chunk_delay_ms),
                rate_limit_every,
            };
            let mock = MockUpstream::start_on(SocketAddr::new(host, port), options).await?;
            println!("mock upstream listening on {}", mock.url());
            shutdown_signal().await;
            Ok(())
        }
        Command::HashKey => {
            let mut key = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut key)?;
            if key.trim().is_empty() {
                return Err("hash-key: no key on standard input (e.g. `printf %s \"$KEY\" | llmgate hash-key`)".into());
            }
            println!("{}", llmgate_credentials::KeyDigest::of(&key).to_hex());
            Ok(())
        }
        Command::Report { project, since, format, config } => {
            llmgate::report::run(load(config)?, project, since, format).await
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
