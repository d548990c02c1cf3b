//! Choosing the model a request fits.

use std::sync::Arc;

use llmgate_core::catalog::{Catalog, ModelSpec};

use crate::estimate::{Estimate, RequestEstimator};

/// Where a request that does not fit `from` goes.
#[derive(Clone, Debug)]
pub(crate) struct Choice {
    /// The model chosen.
    pub(crate) spec: Arc<ModelSpec>,
    /// Its context window.
    pub(crate) window: u64,
    /// The request's estimate for it.
    pub(crate) estimate: Estimate,
}

/// The first model of `from`'s `fallbacks` chain whose window is larger than `above` and fits
/// the request. `from` itself is never chosen, nor any model outside its chain: a request only
/// goes where the operator said it may.
pub(crate) fn choose(
    catalog: &Catalog,
    from: &ModelSpec,
    above: u64,
    estimator: &mut RequestEstimator<'_>,
) -> Option<Choice> {
    from.fallbacks.iter().filter_map(|name| catalog.get(name)).find_map(|spec| {
        let window = spec.context_window.filter(|w| *w > above)?;
        if spec.name == from.name {
            return None;
        }
        let estimate = estimator.estimate_for(spec);
        estimate.fits(window).then(|| Choice { spec: spec.clone(), window, estimate })
    })
}

/// The largest context window of `spec` and its `fallbacks` chain.
pub(crate) fn largest_window(catalog: &Catalog, spec: &ModelSpec) -> u64 {
    let chain = spec.fallbacks.iter().filter_map(|name| catalog.get(name)).filter_map(|s| s.context_window);
    spec.context_window.into_iter().chain(chain).max().unwrap_or(0)
}

/// Whether any catalogue model has a window larger than `window` (a reactive fallback could
/// exist).
pub(crate) fn any_larger(catalog: &Catalog, window: u64) -> bool {
    catalog.iter().any(|s| s.context_window.is_some_and(|w| w > window))
}
