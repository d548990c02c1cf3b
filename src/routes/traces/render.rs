//! The answers, in the original's shapes (clients parse them): 200 `{project_id, total_traces,
//! traces}` with gateway.md §9's `TraceResponse` and `ObservationResponse` field for field, and
//! `{"detail": "…"}` for everything else.

use std::time::Duration;

use http::{Response, StatusCode};
use llmgate_core::{GatewayBody, body::json_response};
use llmgate_langfuse::{Observation, Trace};
use serde::Serialize;
use serde_json::{Value, json};

use super::{params::Job, poll::Failure, random_unit};

/// `{"detail": message}`.
pub(super) fn detail(status: StatusCode, message: impl Into<String>) -> Response<GatewayBody> {
    json_response(status, &json!({"detail": message.into()}))
}

/// 502 when Langfuse keeps failing (its status and message), 504 past the deadline.
pub(super) fn failed(failure: Failure, deadline: Duration) -> Response<GatewayBody> {
    match failure {
        Failure::Langfuse(e) => {
            tracing::warn!(status = ?e.status, message = %e.message, "traces: Langfuse keeps failing");
            detail(StatusCode::BAD_GATEWAY, format!("Failed to fetch traces from Langfuse: {e}"))
        }
        Failure::Deadline => {
            detail(StatusCode::GATEWAY_TIMEOUT, format!("Langfuse did not answer within {} s", deadline.as_secs_f64()))
        }
    }
}

/// 200 `{project_id, total_traces, traces}`, sampled to `sample_size`.
pub(super) fn answer(job: &Job, mut traces: Vec<Trace>) -> Response<GatewayBody> {
    if let Some(n) = job.sample_size
        && traces.len() > n
    {
        sample(&mut traces, n);
    }
    let body = TracesResponse {
        project_id: &job.project_id,
        total_traces: traces.len(),
        traces: traces.iter().map(TraceResponse::from).collect(),
    };
    // Cannot fail: plain structs with string keys.
    json_response(StatusCode::OK, &serde_json::to_value(&body).unwrap_or_default())
}

/// Keeps a uniform random sample of `n` traces (partial Fisher–Yates), in random order like
/// Python's `random.sample`.
fn sample(traces: &mut Vec<Trace>, n: usize) {
    let len = traces.len();
    for i in 0..n.min(len) {
        let j = i + ((random_unit() * (len - i) as f64) as usize).min(len - i - 1);
        traces.swap(i, j);
    }
    traces.truncate(n);
}

#[derive(Serialize)]
struct TracesResponse<'a> {
    project_id: &'a str,
    total_traces: usize,
    traces: Vec<TraceResponse<'a>>,
}

/// gateway.md §9 `TraceResponse`, field for field.
#[derive(Serialize)]
struct TraceResponse<'a> {
    id: &'a str,
    name: &'a Option<String>,
    user_id: &'a Option<String>,
    session_id: &'a Option<String>,
    tags: &'a [String],
    timestamp: &'a Option<String>,
    input: &'a Value,
    output: &'a Value,
    metadata: &'a Value,
    observations: Vec<ObservationResponse<'a>>,
}

impl<'a> From<&'a Trace> for TraceResponse<'a> {
    fn from(t: &'a Trace) -> Self {
        Self {
            id: &t.id,
            name: &t.name,
            user_id: &t.user_id,
            session_id: &t.session_id,
            tags: &t.tags,
            timestamp: &t.timestamp,
            input: &t.input,
            output: &t.output,
            metadata: &t.metadata,
            observations: t.observations.iter().map(ObservationResponse::from).collect(),
        }
    }
}

/// gateway.md §9 `ObservationResponse`, field for field.
#[derive(Serialize)]
struct ObservationResponse<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    name: &'a Option<String>,
    start_time: &'a Option<String>,
    end_time: &'a Option<String>,
    input: &'a Value,
    output: &'a Value,
    parent_observation_id: &'a Option<String>,
}

impl<'a> From<&'a Observation> for ObservationResponse<'a> {
    fn from(o: &'a Observation) -> Self {
        Self {
            id: &o.id,
            kind: &o.kind,
            name: &o.name,
            start_time: &o.start_time,
            end_time: &o.end_time,
            input: &o.input,
            output: &o.output,
            parent_observation_id: &o.parent_observation_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn sample_keeps_n_distinct_traces() {
        let mut traces: Vec<Trace> = (0..10).map(|i| Trace { id: i.to_string(), ..Default::default() }).collect();
        sample(&mut traces, 3);
        assert_eq!(traces.len(), 3);
        let ids: HashSet<_> = traces.iter().map(|t| t.id.clone()).collect();
        assert_eq!(ids.len(), 3);
    }

    /// The structs write what the `json!` objects they replace wrote.
    #[test]
    fn responses_are_the_objects_they_replace() {
        let o = Observation {
            id: "o1".into(),
            kind: "GENERATION".into(),
            name: Some("llm_call_x".into()),
            start_time: Some("2026-11-21T16:30:22.000Z".into()),
            input: json!([{"role": "user", "content": "hi"}]),
            level: Some("ERROR".into()),
            ..Default::default()
        };
        let t = Trace {
            id: "t1".into(),
            tags: vec!["a".into()],
            output: json!("x"),
            metadata: json!({"k": 1.5}),
            observations: vec![o.clone()],
            ..Default::default()
        };
        let expected = json!({
            "id": t.id, "name": t.name, "user_id": t.user_id, "session_id": t.session_id, "tags": t.tags,
            "timestamp": t.timestamp, "input": t.input, "output": t.output, "metadata": t.metadata,
            "observations": [{
                "id": o.id, "type": o.kind, "name": o.name, "start_time": o.start_time, "end_time": o.end_time,
                "input": o.input, "output": o.output, "parent_observation_id": o.parent_observation_id,
            }],
        });
        assert_eq!(serde_json::to_string(&TraceResponse::from(&t)).unwrap(), expected.to_string());
    }
}
