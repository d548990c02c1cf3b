//! Every series the operations guide's PromQL, the Grafana dashboard and the alert rules
//! (`deploy/prometheus/alerts.yml`) name is one `/metrics` exports; the guide's alerts are the
//! rules'.

use http::{Method, StatusCode};

use crate::support::*;

/// The alert rules' expressions, by alert name.
fn alert_rules() -> Vec<(String, String)> {
    let rules: serde_json::Value =
        serde_saphyr::from_str(include_str!("../../deploy/prometheus/alerts.yml")).expect("the rules are YAML");
    let groups = rules["groups"].as_array().expect("groups");
    groups
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("rules").iter())
        .map(|rule| {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            (name.to_string(), rule["expr"].as_str().expect("every rule has an expr").trim().to_string())
        })
        .collect()
}

/// The PromQL blocks of `docs/operations.md`.
fn documented_promql() -> Vec<String> {
    let doc = include_str!("../../docs/operations.md");
    doc.split("```").skip(1).step_by(2).map(|block| block.trim_start_matches("promql").trim().to_string()).collect()
}

#[test]
fn the_guides_alerts_are_the_rules_file() {
    let rules = alert_rules();
    let names: Vec<&str> = rules.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["LlmgateHighFallbackRate", "LlmgateExpensiveFallbacks", "LlmgateFrequentContextFallbacks"]);
    let documented = documented_promql();
    for (name, expr) in &rules {
        assert!(documented.contains(expr), "{name}: `{expr}` is not one of docs/operations.md's PromQL blocks");
    }
}

/// The metric names in `docs/operations.md`'s code blocks, in the Grafana dashboard's
/// expressions (which must parse as JSON) and in the alert rules.
fn documented_series() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../docs/grafana-dashboard.json")).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "the dashboard has the widgets");
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .map(|t| t["expr"].as_str().expect("every target has an expr").to_string())
        .collect();
    let promql = documented_promql().into_iter().chain(exprs).chain(alert_rules().into_iter().map(|(_, expr)| expr));
    let mut names: Vec<String> = promql
        .flat_map(|block| {
            block
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("llmgate_"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn every_promql_expression_names_exported_series() {
    let mock = mock().await;
    let models = "models:\n  - {name: gpt-a, context_window: 100000, pricing: {input_per_1m: 1, output_per_1m: 1}, fallbacks: [gpt-b]}\n  - {name: gpt-b, context_window: 100000, pricing: {input_per_1m: 1, output_per_1m: 1}}\n  - {name: tiny, context_window: 20, fallbacks: [gpt-a]}\n";
    let (standin, _dir, secrets) = langfuse_with_two_projects().await;
    let langfuse = format!("langfuse: {{host: \"{}\", secrets_path: \"{}\"}}\n", standin.url(), secrets.display());
    let gw = TestGateway::in_front_of(&mock, &format!("{models}{langfuse}")).await;
    let fail = [("x-mock-fail", "gpt-a=429:rate_limit_exceeded")];
    let rollout = "/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/w/chat/completions";
    assert_eq!(post_json(&gw.url(rollout), &fail, &chat_body("gpt-a", true)).await.status, StatusCode::OK);
    let big = serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "word ".repeat(50)}]});
    assert_eq!(post_json(&gw.url("/v1/chat/completions"), &[], &big).await.status, StatusCode::OK);
    let text = send(Method::GET, &gw.url("/metrics"), &[], "").await.text();
    let exported: Vec<&str> =
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
    let names = documented_series();
    assert!(names.len() >= 5, "the code blocks name the series: {names:?}");
    for name in names {
        assert!(exported.contains(&name.as_str()), "`{name}` is in docs/operations.md but not in /metrics:\n{text}");
    }
}
