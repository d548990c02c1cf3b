//! What a [`LangfuseLayer`](crate::LangfuseLayer) is set to record. Its own module because the
//! layer writes it and every queued trace shares it: below both, so neither imports the other.

use std::sync::Arc;

/// How much a stack exports (in a config: `all`, `events`, `off`; leaving it out means
/// [`Emit::ByUpstream`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Emit {
    /// Root span, generations and events.
    All,
    /// Root span and events only (LiteLLM records the generations).
    Events,
    /// Nothing.
    Off,
    /// `All` for attempts to an `openai`-mode upstream, `Events` for `litellm` ones (the
    /// attempt's `UpstreamTarget` decides; no target counts as `openai`). Not a config
    /// value: it is what no `emit` means.
    #[default]
    #[serde(skip)]
    ByUpstream,
}

/// Default bound of the recorded input and output (32 KiB each).
pub const DEFAULT_CAPTURE_LIMIT: usize = 32 * 1024;

/// The layer's settings; the queued records share them.
#[derive(Clone)]
pub(crate) struct LayerConfig {
    pub trace_name: Arc<str>,
    pub emit: Emit,
    pub capture_limit: usize,
    pub environment: Option<Arc<str>>,
    pub release: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
}

impl Default for LayerConfig {
    /// Trace name `chat-completion`, [`Emit::ByUpstream`], 32 KiB input/output bounds.
    fn default() -> Self {
        Self {
            trace_name: Arc::from("chat-completion"),
            emit: Emit::default(),
            capture_limit: DEFAULT_CAPTURE_LIMIT,
            environment: None,
            release: None,
            version: None,
        }
    }
}
