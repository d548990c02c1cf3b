//! The model catalogue shared by the routing layers and the cost calculation.
//!
//! One entry per model: its context window, output cap, limits, pricing, fallback chain and the
//! upstream that serves it. A model the catalogue does not know passes through untouched.

use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Deserializer};

/// One model of the catalogue.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The name clients use.
    pub name: String,
    /// The upstream that serves it (default: the default upstream).
    #[serde(default)]
    pub upstream: Option<String>,
    /// The name sent upstream, if it differs from `name`.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// Context window in tokens.
    #[serde(default)]
    pub context_window: Option<u64>,
    /// Output cap in tokens.
    #[serde(default)]
    pub max_output_tokens: Option<u64>,
    /// Rate limits; absent means unlimited.
    #[serde(default)]
    pub limits: Limits,
    /// Price in USD per million tokens; absent means unknown (no cost recorded).
    #[serde(default)]
    pub pricing: Option<Pricing>,
    /// The fallback chain, in order.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

/// Rate limits of a model. `None` (written `null`, `-1` or left out) is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    #[serde(default, deserialize_with = "limit")]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[serde(default, deserialize_with = "limit")]
    pub tpm: Option<u64>,
    /// Requests per day.
    #[serde(default, deserialize_with = "limit")]
    pub rpd: Option<u64>,
}

fn limit<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    match Option::<i64>::deserialize(deserializer)? {
        None | Some(-1) => Ok(None),
        Some(n) if n >= 0 => Ok(Some(n as u64)),
        Some(n) => {
            Err(serde::de::Error::custom(format!("invalid limit {n}: use a count, or null or -1 for unlimited")))
        }
    }
}

/// Price in USD per million tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// USD per million input tokens.
    pub input_per_1m: f64,
    /// USD per million output tokens.
    pub output_per_1m: f64,
}

/// The cost of one call in USD.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Input cost.
    pub input: f64,
    /// Output cost.
    pub output: f64,
    /// Input plus output.
    pub total: f64,
}

impl Pricing {
    /// The cost of `input` and `output` tokens.
    pub fn cost(&self, input: u64, output: u64) -> Cost {
        let input = input as f64 / 1e6 * self.input_per_1m;
        let output = output as f64 / 1e6 * self.output_per_1m;
        Cost { input, output, total: input + output }
    }
}

/// The models a gateway knows, by name.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    models: HashMap<String, Arc<ModelSpec>>,
    order: Vec<Arc<ModelSpec>>,
}

impl Catalog {
    /// A catalogue of `models`; a later entry of the same name replaces an earlier one.
    pub fn new(models: impl IntoIterator<Item = ModelSpec>) -> Self {
        let mut catalog = Self::default();
        catalog.extend(models);
        catalog
    }

    /// Adds or replaces models.
    pub fn extend(&mut self, models: impl IntoIterator<Item = ModelSpec>) {
        for model in models {
            let model = Arc::new(model);
            match self.order.iter_mut().find(|m| m.name == model.name) {
                Some(slot) => *slot = model.clone(),
                None => self.order.push(model.clone()),
            }
            self.models.insert(model.name.clone(), model);
        }
    }

    /// The model called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<ModelSpec>> {
        self.models.get(name)
    }

    /// Every model, in the order first defined.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelSpec>> {
        self.order.iter()
    }

    /// Whether the catalogue is empty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_matches_the_guides_example() {
        let cost = Pricing { input_per_1m: 0.15, output_per_1m: 0.6 }.cost(1000, 500);
        assert!((cost.total - 0.00045).abs() < 1e-12);
    }

    #[test]
    fn minus_one_and_null_are_unlimited() {
        let limits: Limits = serde_json::from_str(r#"{"rpm": -1, "tpm": null, "rpd": 5}"#).unwrap();
        assert_eq!(limits, Limits { rpm: None, tpm: None, rpd: Some(5) });
        assert!(serde_json::from_str::<Limits>(r#"{"rpm": -2}"#).is_err());
    }
}
