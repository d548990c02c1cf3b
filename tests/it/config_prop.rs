//! Property tests of the config loader: `Config::from_yaml` never panics, on arbitrary text and
//! on YAML made of the real keys with arbitrary values; what it accepts it describes.

use std::path::Path;

use llmgate::config::Config;
use proptest::prelude::*;

fn env(name: &str) -> Option<String> {
    match name {
        "KEY_SET" => Some("sk-x".into()),
        _ => None,
    }
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("~".to_string()),
        Just("true".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1e309".to_string()),
        Just("-0.0".to_string()),
        Just("nan".to_string()),
        Just(".inf".to_string()),
        Just("18446744073709551616".to_string()),
        Just("\"127.0.0.1:0\"".to_string()),
        Just("\"[::1]:99999\"".to_string()),
        Just("\"http://127.0.0.1:1/v1\"".to_string()),
        Just("\"file:///etc/passwd\"".to_string()),
        Just("\"\"".to_string()),
        Just("KEY_SET".to_string()),
        Just("KEY_UNSET".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("*anchor".to_string()),
        Just("!!binary aGk=".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        "[a-z:/._-]{0,12}",
    ]
}

fn key() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "listen",
        "request_timeout_secs",
        "drain_timeout_secs",
        "body_limit_bytes",
        "default_upstream",
        "url",
        "mode",
        "api_key_env",
        "host",
        "secrets_path",
        "api",
        "emit",
        "allow",
        "api_keys",
        "max_wait_seconds",
        "on_redis_outage",
        "replicas",
        "prefix",
        "ttl_secs",
        "record_timeout_ms",
        "name",
        "upstream",
        "context_window",
        "limits",
        "rpm",
        "fallbacks",
        "pricing",
        "ca_file",
        "unknown_key",
    ])
}

/// YAML of the real top-level sections, nested a little, with arbitrary values.
fn yamlish() -> impl Strategy<Value = String> {
    let section = prop::sample::select(vec![
        "upstreams",
        "models",
        "redis",
        "langfuse",
        "encoded_base_url",
        "auth",
        "rate_limit",
        "insertion_id",
        "listen",
        "request_timeout_secs",
        "body_limit_bytes",
        "default_upstream",
    ]);
    let entry = || (key(), scalar()).prop_map(|(k, v)| format!("{k}: {v}"));
    let body = prop_oneof![
        scalar().prop_map(|v| format!(" {v}")),
        prop::collection::vec(entry(), 0..4).prop_map(|e| format!(" {{{}}}", e.join(", "))),
        prop::collection::vec(entry(), 0..4).prop_map(|e| format!("\n  - {{{}}}", e.join(", "))),
        (key(), prop::collection::vec(entry(), 0..4)).prop_map(|(name, e)| format!("\n  {name}: {{{}}}", e.join(", "))),
    ];
    prop::collection::vec((section, body), 0..6)
        .prop_map(|s| s.into_iter().map(|(k, b)| format!("{k}:{b}\n")).collect())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_arbitrary_text(text in "\\PC{0,300}") {
        let _ = Config::from_yaml(&text, Path::new("fuzz.yaml"), &env);
    }

    #[test]
    fn never_panics_on_config_shaped_yaml(text in yamlish()) {
        if let Ok(config) = Config::from_yaml(&text, Path::new("fuzz.yaml"), &env) {
            // Whatever is accepted can be described and has its default upstream.
            let _ = config.describe();
            let _ = config.default_target();
        }
    }
}

/// Found by the property test: durations too large for `Duration` are refused with an error
/// naming the key, never a panic.
#[test]
fn durations_out_of_range_are_refused() {
    for text in [
        "rate_limit: {max_wait_seconds: 18446744073709551616}\n",
        "request_timeout_secs: 1e300\n",
        "drain_timeout_secs: 1e300\n",
    ] {
        let Err(error) = Config::from_yaml(text, Path::new("big.yaml"), &env) else {
            panic!("{text}: accepted");
        };
        let key = text.split([':', '{']).find(|k| k.ends_with("seconds") || k.ends_with("secs")).unwrap_or_default();
        assert!(error.to_string().contains(key.trim()), "{text}: {error}");
    }
    let env_timeout = |name: &str| (name == "REQUEST_TIMEOUT").then(|| "1e300".to_string());
    assert!(Config::from_yaml("", Path::new("env.yaml"), &env_timeout).is_err());
}
