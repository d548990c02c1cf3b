//! Per-attempt target resolution: which upstream serves the attempt's model.
//!
//! Reads [`ModelChoice`] (or the body's `model`), looks the model up in the catalogue and
//! writes the [`UpstreamTarget`]: the model's upstream, else the default. A catalogue
//! `upstream_model` becomes the `model` sent upstream. An allowed `encoded_base_url`
//! ([`BaseUrlOverride`]) replaces the base URL of an `openai`-mode target, and then the
//! server-side key is withheld: it is never sent to a host the client chose.

use std::{
    collections::BTreeMap,
    sync::Arc,
    task::{Context, Poll},
};

use http::Request;
use llmgate_core::{
    catalog::Catalog,
    ext::{BaseUrlOverride, BodyEdits, EditScope, LlmRequest, ModelChoice, UpstreamMode, UpstreamTarget},
};
use tower::{Layer, Service};

/// The upstreams a gateway knows and the catalogue that maps models onto them.
#[derive(Debug)]
pub struct Targets {
    /// Upstreams by name.
    pub upstreams: BTreeMap<String, UpstreamTarget>,
    /// The name of the default upstream (must be in `upstreams`).
    pub default_upstream: String,
    /// The model catalogue.
    pub catalog: Arc<Catalog>,
}

impl Targets {
    /// The target for `model` (the default upstream for unknown models).
    pub fn for_model(&self, model: Option<&str>) -> Option<&UpstreamTarget> {
        let spec = model.and_then(|m| self.catalog.get(m));
        let name = spec.and_then(|s| s.upstream.as_deref()).unwrap_or(&self.default_upstream);
        self.upstreams.get(name).or_else(|| self.upstreams.get(&self.default_upstream))
    }
}

/// Layer that applies [`ResolveTarget`].
#[derive(Clone, Debug)]
pub struct ResolveTargetLayer {
    targets: Arc<Targets>,
}

impl ResolveTargetLayer {
    /// A resolver over `targets`.
    pub fn new(targets: Arc<Targets>) -> Self {
        Self { targets }
    }
}

impl<S> Layer<S> for ResolveTargetLayer {
    type Service = ResolveTarget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResolveTarget { inner, targets: self.targets.clone() }
    }
}

/// Writes the [`UpstreamTarget`] of the current attempt.
#[derive(Clone, Debug)]
pub struct ResolveTarget<S> {
    inner: S,
    targets: Arc<Targets>,
}

impl<S, B> Service<Request<B>> for ResolveTarget<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let extensions = req.extensions_mut();
        let model: Option<Arc<str>> = match extensions.get::<ModelChoice>() {
            Some(choice) => Some(choice.current.clone()),
            None => extensions.get::<LlmRequest>().and_then(|r| r.model()).map(Into::into),
        };
        if let Some(target) = self.targets.for_model(model.as_deref()) {
            let mut target = target.clone();
            if let Some(BaseUrlOverride(url)) = extensions.get::<BaseUrlOverride>()
                && target.mode == UpstreamMode::OpenAi
            {
                target.base_url = url.clone();
                target.api_key = None;
            }
            let upstream_model = model
                .as_deref()
                .and_then(|m| self.targets.catalog.get(m))
                .and_then(|spec| spec.upstream_model.clone().filter(|u| *u != spec.name));
            if let Some(upstream_model) = upstream_model {
                let mut edits = extensions.remove::<BodyEdits>().unwrap_or_default();
                edits.set("model", upstream_model.into(), EditScope::Always);
                extensions.insert(edits);
            }
            extensions.insert(target);
        }
        self.inner.call(req)
    }
}
