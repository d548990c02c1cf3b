//! The container recipe (issue 20): what can be checked without pulling or running an image.
//! The compose file's llmgate configuration passes `llmgate check-config`, its environment names
//! are the README's, its LiteLLM is configured like the seed's `config_no_cache.yaml`, and the
//! Dockerfile builds the README's way and runs unprivileged with a health check.

use std::{collections::BTreeMap, path::Path, process::Command};

use serde_json::{Value, json};

use crate::support::TempDir;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// A compose value with its `${NAME:-default}` interpolations resolved to their defaults.
fn interpolated(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').map(|i| start + i).expect("closed ${");
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, default)| default));
        rest = &rest[end + 1..];
    }
    out + rest
}

/// The names in the first column of the README's environment table.
fn readme_env_names() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let table = readme.split("| env | meaning | default |").nth(1).expect("the README's environment table");
    table
        .lines()
        .skip(1)
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| line.split('|').nth(1))
        .flat_map(|column| column.split('`').skip(1).step_by(2))
        .map(|name| name.split('=').next().unwrap_or_default().to_string())
        .filter(|name| name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .collect()
}

/// `host:container[:mode]` volumes as (container, host) paths, the host relative to the root.
fn volumes(service: &Value) -> BTreeMap<String, String> {
    service["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| {
            let mut parts = v.as_str().expect("short volume syntax").split(':');
            let host = parts.next().unwrap().trim_start_matches("./").to_string();
            (parts.next().expect("a container path").to_string(), host)
        })
        .collect()
}

#[test]
fn the_compose_files_llmgate_configuration_passes_check_config() {
    let compose = yaml("compose.yaml");
    let llmgate = &compose["services"]["llmgate"];
    let env: BTreeMap<String, String> = llmgate["environment"]
        .as_object()
        .expect("an environment map")
        .iter()
        .map(|(name, value)| (name.clone(), interpolated(value.as_str().expect("string values"))))
        .collect();
    let mounts = volumes(llmgate);
    let config_path = &env["LLMGATE_CONFIG"];
    let config_file = mounts.get(config_path).unwrap_or_else(|| panic!("{config_path} is not mounted: {mounts:?}"));
    let config = yaml(config_file);

    // Every name is the README's, or one the config file names for an upstream key.
    let upstream_keys: Vec<&str> =
        config["upstreams"].as_object().into_iter().flatten().filter_map(|(_, u)| u["api_key_env"].as_str()).collect();
    let documented = readme_env_names();
    assert!(documented.len() >= 10, "{documented:?}");
    for name in env.keys() {
        assert!(
            documented.contains(name) || upstream_keys.contains(&name.as_str()),
            "compose.yaml sets {name}, which is neither in the README's table {documented:?} nor an api_key_env of {config_file}"
        );
    }

    // check-config with the container's paths on this machine: the config as mounted, the
    // secrets directory holding the example file.
    let secrets_dir = TempDir::new();
    std::fs::copy(Path::new(ROOT).join("deploy/compose/secrets.example.yaml"), secrets_dir.0.join("secrets.yaml"))
        .unwrap();
    let on_this_machine = |value: &str| -> String {
        for (container, host) in &mounts {
            if let Some(rest) = value.strip_prefix(container.as_str()) {
                let host = match host.as_str() {
                    "deploy/compose/secrets" => secrets_dir.0.clone(),
                    other => Path::new(ROOT).join(other),
                };
                return format!("{}{rest}", host.display());
            }
        }
        value.to_string()
    };
    let output = Command::new(env!("CARGO_BIN_EXE_llmgate"))
        .arg("check-config")
        .env_clear()
        .envs(env.iter().map(|(name, value)| (name, on_this_machine(value))))
        .output()
        .expect("run llmgate check-config");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.starts_with("configuration OK"), "{stdout}");
    assert!(stdout.contains("http://litellm:4001"), "{stdout}");
    assert!(stdout.contains("stores: Redis"), "{stdout}");
}

#[test]
fn the_compose_files_litellm_is_the_seeds() {
    let compose = yaml("compose.yaml");
    let litellm = &compose["services"]["litellm"];
    let mounts = volumes(litellm);
    let command: Vec<&str> = litellm["command"].as_array().expect("command").iter().filter_map(Value::as_str).collect();
    let config_at = command.iter().position(|a| *a == "--config").map(|i| command[i + 1]).expect("--config");
    assert_eq!(
        yaml(&mounts[config_at]),
        json!({
            "model_list": [{"model_name": "*", "litellm_params": {"model": "*"}}],
            "litellm_settings": {"callbacks": ["langfuse_otel"], "drop_params": true},
            "general_settings": {"allow_client_side_credentials": true},
        })
    );
    let mut services: Vec<&String> = compose["services"].as_object().unwrap().keys().collect();
    services.sort();
    assert_eq!(services, ["litellm", "llmgate", "redis"]);
}

#[test]
fn the_dockerfile_builds_the_readmes_way_and_runs_unprivileged() {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).unwrap();
    let instructions: Vec<&str> =
        dockerfile.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let from: Vec<&&str> = instructions.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 2, "a build stage and a runtime stage: {from:?}");
    assert!(from[0].ends_with(" AS build") && !from[1].contains("rust"), "{from:?}");
    // The README's run command's build: release, default features (no cmake).
    assert!(include_str!("../../README.md").contains("cargo run --release -- serve"));
    assert!(instructions.iter().any(|l| l.starts_with("RUN cargo build --release --locked --bin llmgate")));
    assert!(!instructions.iter().any(|l| l.contains("--features") || l.contains("cmake")), "{dockerfile}");
    let user = instructions.iter().rfind(|l| l.starts_with("USER ")).expect("a USER");
    assert!(!user.ends_with(" root") && !user.ends_with(" 0"), "{user}");
    let healthcheck = dockerfile.split("HEALTHCHECK").nth(1).expect("a HEALTHCHECK");
    assert!(healthcheck.lines().take(2).collect::<String>().contains("/health"), "{healthcheck}");
    // Config and secrets are mounted, never in the image or its build context.
    let ignored = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).unwrap();
    for path in ["target/", "deploy/compose/secrets/", "**/secrets.yaml"] {
        assert!(ignored.lines().any(|l| l == path), "{path} is not in .dockerignore");
    }
    assert!(!instructions.iter().any(|l| l.starts_with("COPY") && l.contains("secrets")), "{dockerfile}");
}
