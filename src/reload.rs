//! Reloading the secrets without a restart: the secrets file (the projects' Langfuse keys) and
//! the config file's gateway keys (`auth.api_keys`, `auth.keys`), on `SIGHUP` and whenever the
//! secrets file's content changes (read every [`POLL_INTERVAL`]). Everything read is validated
//! first and swapped in together, or nothing is: a file that does not parse or validate leaves
//! the keys in force, is logged (the error names keys and lines, never values) and counted
//! (`llmgate_secrets_reloads_total{outcome="error"}`). A request in flight keeps the keys it
//! started with. Every other setting applies at the next start (docs/operations.md).
//!
//! Polling rather than file-system events: a Kubernetes secret volume replaces a symlink, a
//! bind mount from a macOS host delivers no inotify events, and an editor saves by renaming;
//! reading a small file every two seconds sees all of them alike.

use std::{collections::HashSet, future::Future, path::Path, sync::Arc, time::Duration};

use llmgate_core::BoxError;
use llmgate_credentials::{Projects, Reloadable, StaticApiKeys};

use crate::{config::Config, metrics::Metrics};

/// How often the secrets file is read for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// The handles the stack reads the secrets through, which a reload swaps.
#[derive(Clone)]
pub struct SecretHandles {
    /// The projects and their Langfuse keys (the secrets file).
    pub projects: Reloadable<Projects>,
    /// The gateway keys (`auth.api_keys`, `auth.keys`); `None` when it started without any.
    pub gateway_keys: Option<Reloadable<StaticApiKeys>>,
    /// Their names, the `key` label's values in the metrics.
    pub key_names: Reloadable<HashSet<String>>,
}

/// What a reload reads (the files `config` names) and swaps (the handles).
#[derive(Clone)]
pub struct SecretsReload {
    config: Arc<Config>,
    handles: SecretHandles,
    metrics: Arc<Metrics>,
}

/// The secrets read and validated, not yet swapped in.
struct Read {
    projects: Projects,
    gateway_keys: Option<(StaticApiKeys, HashSet<String>)>,
}

impl SecretsReload {
    /// Reloads into `handles` what `config` names, counting into `metrics`.
    pub fn new(config: Arc<Config>, handles: SecretHandles, metrics: Arc<Metrics>) -> Self {
        Self { config, handles, metrics }
    }

    /// Re-reads and swaps in the secrets, or keeps those in force when anything is wrong
    /// (logged, counted). Blocking (it reads files). `cause` goes to the log.
    pub fn reload(&self, cause: &str) -> Result<(), BoxError> {
        let outcome = self.read().map(|Read { projects, gateway_keys }| {
            let counts = (projects.len(), gateway_keys.as_ref().map_or(0, |(keys, _)| keys.len()));
            self.handles.projects.replace(projects);
            if let (Some(handle), Some((keys, names))) = (&self.handles.gateway_keys, gateway_keys) {
                handle.replace(keys);
                self.handles.key_names.replace(names);
            }
            counts
        });
        match outcome {
            Ok((projects, gateway_keys)) => {
                self.metrics.count_secrets_reload("ok");
                tracing::info!(cause, projects, gateway_keys, "secrets reloaded");
                Ok(())
            }
            Err(error) => {
                self.metrics.count_secrets_reload("error");
                tracing::error!(cause, %error, "secrets reload refused: the secrets in force stay");
                Err(error)
            }
        }
    }

    /// The secrets file's projects and the config file's gateway keys (`None` when it started
    /// without any), all validated.
    fn read(&self) -> Result<Read, BoxError> {
        let projects = self.config.langfuse.projects()?;
        let Some(file) = &self.config.file else {
            return Ok(Read { projects, gateway_keys: None });
        };
        let auth = Config::load(Some(file), &|name| std::env::var(name).ok())?.auth;
        match (&self.handles.gateway_keys, auth.static_keys()) {
            (Some(_), Some(keys)) => Ok(Read { projects, gateway_keys: Some((keys, auth.key_names())) }),
            (None, None) => Ok(Read { projects, gateway_keys: None }),
            (Some(_), None) => Err("auth: no gateway keys left; removing them all needs a restart".into()),
            (None, Some(_)) => Err("auth: gateway keys added to a gateway started without any need a restart".into()),
        }
    }

    /// Reloads on `SIGHUP` and when the secrets file's content changes, until dropped. Listens
    /// for `SIGHUP` from the call on (no longer its default action: ending the process).
    pub fn watch(self) -> impl Future<Output = ()> + Send {
        let mut hangups = Hangups::listen();
        async move {
            let secrets_path = self.config.langfuse.secrets_path.clone();
            let mut seen = read_bytes(secrets_path.as_deref()).await;
            let mut poll = tokio::time::interval(POLL_INTERVAL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let (cause, asked) = tokio::select! {
                    () = hangups.next() => ("SIGHUP", true),
                    _ = poll.tick() => ("the secrets file changed", false),
                };
                let now = read_bytes(secrets_path.as_deref()).await;
                let changed = now != seen;
                seen = now;
                if asked || changed {
                    let reload = self.clone();
                    // A refusal is logged and counted by `reload`.
                    let _ = tokio::task::spawn_blocking(move || reload.reload(cause)).await;
                }
            }
        }
    }
}

/// The file's content (`None` when it cannot be read: a reload then says why).
async fn read_bytes(path: Option<&Path>) -> Option<Vec<u8>> {
    tokio::fs::read(path?).await.ok()
}

/// The process's `SIGHUP`s.
struct Hangups(#[cfg(unix)] Option<tokio::signal::unix::Signal>, #[cfg(not(unix))] ());

impl Hangups {
    fn listen() -> Self {
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Self(Some(signal)),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP: the secrets reload on file changes only");
                Self(None)
            }
        }
        #[cfg(not(unix))]
        Self(())
    }

    /// Resolves on the next `SIGHUP`; never where there is none to listen to.
    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.0 {
            if signal.recv().await.is_some() {
                return;
            }
            self.0 = None;
        }
        std::future::pending().await
    }
}
