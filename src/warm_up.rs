//! Warm start: what the gateway loads in the background once it serves (the tokenizers its
//! fallback chains need, see `ContextRoutingLayer::tokenizers_needed`), so that no request
//! waits for it, and whether that is done (`GET /ready`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use llmgate_context_routing::ContextRoutingLayer;

/// The warm-up of one gateway. Ready at once when there is nothing to load.
pub struct WarmUp {
    context: ContextRoutingLayer,
    started: AtomicBool,
    ready: AtomicBool,
}

impl WarmUp {
    /// The warm-up of the context-routing layer `context`.
    pub fn new(context: ContextRoutingLayer) -> Self {
        let nothing_to_load = context.tokenizers_needed().is_empty();
        Self { context, started: AtomicBool::new(nothing_to_load), ready: AtomicBool::new(nothing_to_load) }
    }

    /// Starts loading on tokio's blocking pool (once; later calls do nothing).
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let warm_up = self.clone();
        tracing::info!(tokenizers = ?warm_up.context.tokenizers_needed(), "warming up: loading the tokenizers of the fallback chains");
        tokio::task::spawn_blocking(move || {
            let began = Instant::now();
            warm_up.context.warm_up();
            warm_up.ready.store(true, Ordering::Release);
            tracing::info!(elapsed_ms = began.elapsed().as_millis() as u64, "warm-up done: ready");
        });
    }

    /// Whether the warm-up is done.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}
