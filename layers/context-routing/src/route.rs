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
/// the request, else the catalogue model with the smallest such window (catalogue order on
/// ties). `from` itself is never chosen.
pub(crate) fn choose(
    catalog: &Catalog,
    from: &ModelSpec,
    above: u64,
    estimator: &mut RequestEstimator<'_>,
) -> Option<Choice> {
    let mut candidate = |spec: &Arc<ModelSpec>| -> Option<Choice> {
        let window = spec.context_window.filter(|w| *w > above)?;
        if spec.name == from.name {
            return None;
        }
        let estimate = estimator.estimate_for(spec);
        estimate.fits(window).then(|| Choice { spec: spec.clone(), window, estimate })
    };
    if let Some(choice) = from.fallbacks.iter().filter_map(|name| catalog.get(name)).find_map(&mut candidate) {
        return Some(choice);
    }
    // Smallest window first: windows are checked without estimating, so only the models that
    // could win are estimated.
    let mut by_window: Vec<&Arc<ModelSpec>> =
        catalog.iter().filter(|s| s.context_window.is_some_and(|w| w > above) && s.name != from.name).collect();
    by_window.sort_by_key(|s| s.context_window);
    by_window.into_iter().find_map(candidate)
}

/// The largest context window of the catalogue.
pub(crate) fn largest_window(catalog: &Catalog) -> u64 {
    catalog.iter().filter_map(|s| s.context_window).max().unwrap_or(0)
}

/// Whether any catalogue model has a window larger than `window` (a reactive fallback could
/// exist).
pub(crate) fn any_larger(catalog: &Catalog, window: u64) -> bool {
    catalog.iter().any(|s| s.context_window.is_some_and(|w| w > window))
}
