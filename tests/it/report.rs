//! Issue 9, `llmgate report`: known fallback events and generations pushed into the Langfuse
//! stand-in (OTLP JSON, the way llmgate's exporter encodes them), read back through both read
//! APIs; the report's numbers must match exactly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use llmgate::report::{self, Format};
use llmgate_langfuse::timestamp::iso_millis;
use serde_json::{Value, json};

use crate::support::*;

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos().to_string()
}

struct Span {
    trace: u8,
    id: u8,
    kind: &'static str,
    name: String,
    start: SystemTime,
    end: SystemTime,
    level: Option<&'static str>,
    model: Option<&'static str>,
    metadata: Value,
}

fn event(trace: u8, id: u8, name: &str, at: SystemTime, metadata: Value) -> Span {
    Span { trace, id, kind: "event", name: name.into(), start: at, end: at, level: None, model: None, metadata }
}

/// A generation of `model`; `latency` in metadata unless `None` (then end − start counts).
#[allow(clippy::too_many_arguments)]
fn generation(
    trace: u8,
    id: u8,
    model: &'static str,
    at: SystemTime,
    cost: f64,
    is_primary: bool,
    latency: Option<f64>,
    ok: bool,
) -> Span {
    let mut metadata = json!({"cost_usd": cost, "is_primary": is_primary});
    if let Some(l) = latency {
        metadata["latency_seconds"] = json!(l);
    }
    Span {
        trace,
        id,
        kind: "generation",
        name: format!("llm_call_{model}"),
        start: at,
        end: at + Duration::from_millis(500),
        level: (!ok).then_some("ERROR"),
        model: Some(model),
        metadata,
    }
}

fn otlp(spans: &[Span]) -> Value {
    let spans: Vec<Value> = spans
        .iter()
        .map(|s| {
            let mut attributes = vec![
                json!({"key": "langfuse.observation.type", "value": {"stringValue": s.kind}}),
                json!({"key": "langfuse.observation.metadata", "value": {"stringValue": s.metadata.to_string()}}),
            ];
            if let Some(level) = s.level {
                attributes.push(json!({"key": "langfuse.observation.level", "value": {"stringValue": level}}));
            }
            if let Some(model) = s.model {
                attributes.push(json!({"key": "langfuse.observation.model.name", "value": {"stringValue": model}}));
            }
            json!({
                "traceId": format!("{:032x}", 0xabc0_0000_u128 + u128::from(s.trace)),
                "spanId": format!("{:016x}", 0x1000_u64 * u64::from(s.trace) + u64::from(s.id)),
                "name": s.name,
                "kind": 1,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": attributes,
                "status": {},
            })
        })
        .collect();
    json!({"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"scope": {"name": "test"}, "spans": spans}]}]})
}

#[tokio::test]
async fn the_report_matches_the_events_and_generations_in_langfuse() {
    let now = SystemTime::now();
    let recent = now - Duration::from_secs(3600);
    let older = now - Duration::from_secs(2 * 86_400);
    let ms = |t: SystemTime, n: u64| t + Duration::from_millis(n);
    let rate = |o: &str, f: &str| json!({"original_model": o, "fallback_model": f, "reason": "upstream_429"});
    let context = |est: u64, orig: u64, fb: u64| {
        json!({"original_model": "tiny", "fallback_model": "big", "estimated_tokens": est,
               "original_max_context": orig, "fallback_max_context": fb})
    };
    let spans = vec![
        // Trace 1: rate-limit fallback gpt-a → gpt-b, recent.
        generation(1, 1, "gpt-a", recent, 0.0, true, Some(1.0), false),
        generation(1, 2, "gpt-b", ms(recent, 10), 0.5, false, Some(2.0), true),
        event(1, 3, "rate_limit_fallback", ms(recent, 20), rate("gpt-a", "gpt-b")),
        // Trace 2: the same pair, two days ago.
        generation(2, 1, "gpt-a", older, 0.0, true, Some(3.0), false),
        generation(2, 2, "gpt-b", ms(older, 10), 1.5, false, Some(4.0), true),
        event(2, 3, "rate_limit_fallback", ms(older, 20), rate("gpt-a", "gpt-b")),
        // Trace 3: context fallback tiny → big that worked.
        generation(3, 1, "big", ms(recent, 100), 0.25, false, Some(3.0), true),
        event(3, 2, "context_length_fallback", ms(recent, 110), context(150, 100, 1000)),
        // Trace 4: context fallback whose only generation failed.
        generation(4, 1, "big", ms(recent, 200), 0.75, false, Some(5.0), false),
        event(4, 2, "context_length_fallback", ms(recent, 210), context(250, 100, 2000)),
        // Trace 5: a plain primary request; its latency is end − start (0.5 s).
        generation(5, 1, "gpt-a", ms(recent, 300), 0.1, true, None, true),
        // Trace 6: outside the window.
        generation(6, 1, "gpt-b", now - Duration::from_secs(10 * 86_400), 9.0, false, Some(9.0), true),
        event(6, 2, "rate_limit_fallback", now - Duration::from_secs(10 * 86_400), rate("gpt-a", "gpt-b")),
    ];

    for api in ["v3", "v4"] {
        let (standin, dir, secrets) = langfuse_with_two_projects().await;
        let auth = format!("Basic {}", base64(b"pk-lf-1:sk-lf-1"));
        let reply = send(
            Method::POST,
            &format!("{}/api/public/otel/v1/traces", standin.url()),
            &[("content-type", "application/json"), ("authorization", &auth)],
            otlp(&spans).to_string(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", String::from_utf8_lossy(&reply.body));
        assert_eq!(standin.state(|s| s.observations("p1").len()), spans.len());

        let yaml =
            format!("langfuse: {{host: \"{}\", secrets_path: \"{}\", api: {api}}}\n", standin.url(), secrets.display());
        let config = llmgate::config::Config::from_yaml(&yaml, &dir.0.join("config.yaml"), &|_| None).unwrap();
        let got = within(report::collect(&config, Some("p1"), Duration::from_secs(7 * 86_400))).await.unwrap();
        let json: Value = serde_json::from_str(&report::render(&got, Format::Json).unwrap()).unwrap();

        let day = |t: SystemTime| iso_millis(t)[..10].to_string();
        assert_eq!(json["project"], "p1", "{api}");
        assert_eq!(
            json["fallbacks_by_day"],
            json!([
                {"day": day(recent), "type": "context_length_fallback", "original_model": "tiny", "fallback_model": "big", "count": 2},
                {"day": day(recent), "type": "rate_limit_fallback", "original_model": "gpt-a", "fallback_model": "gpt-b", "count": 1},
                {"day": day(older), "type": "rate_limit_fallback", "original_model": "gpt-a", "fallback_model": "gpt-b", "count": 1},
            ]),
            "{api}"
        );
        assert_eq!(
            json["context_fallbacks"],
            json!([{"original_model": "tiny", "fallback_model": "big", "count": 2, "avg_estimated_tokens": 200.0,
                    "avg_original_max_context": 100.0, "avg_fallback_max_context": 1500.0}]),
            "{api}"
        );
        assert_eq!(
            json["cost_impact"],
            json!([
                {"type": "rate_limit_fallback", "original_model": "gpt-a", "fallback_model": "gpt-b", "traces": 2,
                 "generations": 4, "total_cost_usd": 2.0, "avg_cost_usd": 0.5},
                {"type": "context_length_fallback", "original_model": "tiny", "fallback_model": "big", "traces": 2,
                 "generations": 2, "total_cost_usd": 1.0, "avg_cost_usd": 0.5},
            ]),
            "{api}"
        );
        let mut rates = json["success_rate"].as_array().unwrap().clone();
        rates.sort_by_key(|r| r["type"].as_str().unwrap().to_string());
        assert_eq!(
            rates,
            vec![
                json!({"type": "context_length_fallback", "original_model": "tiny", "fallback_model": "big",
                       "fallbacks": 2, "traces": 2, "successful_traces": 1, "success_rate_pct": 50.0}),
                json!({"type": "rate_limit_fallback", "original_model": "gpt-a", "fallback_model": "gpt-b",
                       "fallbacks": 2, "traces": 2, "successful_traces": 2, "success_rate_pct": 100.0}),
            ],
            "{api}"
        );
        assert_eq!(
            json["latency"],
            json!([
                {"kind": "primary", "count": 3, "avg_seconds": 1.5, "p50_seconds": 1.0, "p95_seconds": 3.0},
                {"kind": "fallback", "count": 4, "avg_seconds": 3.5, "p50_seconds": 3.0, "p95_seconds": 5.0},
            ]),
            "{api}"
        );

        // The other formats carry the same rows.
        let csv = report::render(&got, Format::Csv).unwrap();
        assert!(csv.contains("cost_impact,rate_limit_fallback,gpt-a,gpt-b,2,4,2,0.5\n"), "{csv}");
        let table = report::render(&got, Format::Table).unwrap();
        assert!(table.contains("== latency ==") && table.contains("fallback"), "{table}");
    }
}

#[tokio::test]
async fn an_unknown_project_or_a_missing_langfuse_is_an_error() {
    let (standin, dir, secrets) = langfuse_with_two_projects().await;
    let yaml = format!("langfuse: {{host: \"{}\", secrets_path: \"{}\"}}\n", standin.url(), secrets.display());
    let config = llmgate::config::Config::from_yaml(&yaml, &dir.0.join("config.yaml"), &|_| None).unwrap();
    let empty = within(report::collect(&config, None, Duration::from_secs(86_400))).await.unwrap();
    assert_eq!(empty.project, "p1", "the default project");
    assert!(empty.fallbacks_by_day.is_empty() && empty.latency.iter().all(|l| l.count == 0));
    assert!(within(report::collect(&config, Some("nope"), Duration::from_secs(60))).await.is_err());
    let bare = llmgate::config::Config::from_yaml("{}\n", &dir.0.join("config.yaml"), &|_| None).unwrap();
    assert!(within(report::collect(&bare, Some("p1"), Duration::from_secs(60))).await.is_err());
}
