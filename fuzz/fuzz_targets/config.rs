//! The config loader: never panics on any text; what it accepts it can describe.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmgate::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = |name: &str| (name == "KEY_SET").then(|| "sk-x".to_string());
    if let Ok(config) = Config::from_yaml(text, std::path::Path::new("fuzz.yaml"), &env) {
        let _ = config.describe();
        let _ = config.default_target();
    }
});
