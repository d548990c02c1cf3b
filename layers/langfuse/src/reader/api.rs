//! What both read back ends send and read: an authenticated GET on one Langfuse host, decoded
//! into the caller's `serde` type, and the observation as both API versions write it (a v3
//! trace's `observations[]`, a v4 row).

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use llmgate_core::ext::LangfuseKeys;
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::Value;

use super::{Observation, ReadError};
use crate::{LangfuseClient, client, timestamp::rfc3339};

/// Largest response read (Cloud caps responses at 5 MB).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

// === impl Api ===

/// One Langfuse host, read through the process's pooled client.
#[derive(Clone, Debug)]
pub(super) struct Api {
    client: LangfuseClient,
    host: String,
}

impl Api {
    pub(super) fn new(client: LangfuseClient, host: impl Into<String>) -> Self {
        Self { client, host: host.into().trim_end_matches('/').to_owned() }
    }

    /// `GET {host}{path}?{query}` with the project's keys, its JSON body read as `T`;
    /// `Ok(None)` on 404 (not there yet, or no such API). Another error status is an error with
    /// Langfuse's `message`.
    pub(super) async fn get<T: DeserializeOwned>(
        &self,
        keys: &LangfuseKeys,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Option<T>, ReadError> {
        let err =
            |status: Option<StatusCode>, message: String| ReadError { status: status.map(|s| s.as_u16()), message };
        let url = match query {
            [] => format!("{}{path}", self.host),
            query => format!("{}{path}?{}", self.host, query_string(query)),
        };
        let auth = client::basic_auth(keys).ok_or_else(|| err(None, "invalid Langfuse keys".into()))?;
        let request = Request::builder()
            .method(Method::GET)
            .uri(&url)
            .header(header::AUTHORIZATION, auth)
            .header(header::ACCEPT, "application/json")
            .header("x-langfuse-sdk-name", "llmgate")
            .body(Full::new(Bytes::new()))
            .map_err(|e| err(None, e.to_string()))?;
        let response = self.client.send(request).await.map_err(|e| err(None, e.to_string()))?;
        let status = response.status();
        let body = client::read_capped(response.into_body(), MAX_RESPONSE)
            .await
            .map_err(|e| err(Some(status), e.to_string()))?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            #[derive(Deserialize)]
            struct ErrorBody {
                message: String,
            }
            let message = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(body) => body.message,
                Err(_) => String::from_utf8_lossy(&body[..body.len().min(1024)]).into_owned(),
            };
            return Err(err(Some(status), message));
        }
        serde_json::from_slice(&body).map(Some).map_err(|e| {
            let message = if e.is_data() { format!("unexpected response: {e}") } else { "response is not JSON".into() };
            err(Some(status), message)
        })
    }

    /// One page of a listing at `path`: there, a 404 means the API itself is missing
    /// (`missing` says which).
    pub(super) async fn page<T: DeserializeOwned>(
        &self,
        keys: &LangfuseKeys,
        path: &str,
        query: &[(&str, String)],
        missing: &str,
    ) -> Result<T, ReadError> {
        self.get(keys, path, query).await?.ok_or_else(|| ReadError { status: Some(404), message: missing.into() })
    }
}

fn query_string(pairs: &[(&str, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

// === impl ObservationRow ===

/// An observation as Langfuse writes it: the fields of v3's `ObservationsView` and v4's
/// `ObservationV2` that llmgate reads (a field of a group not asked for is absent: `None`,
/// `Null`, empty).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(super) struct ObservationRow {
    #[serde(deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(rename = "type", deserialize_with = "null_as_default")]
    pub kind: String,
    pub name: Option<String>,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub input: Value,
    pub output: Value,
    pub parent_observation_id: Option<String>,
    pub level: Option<String>,
    pub metadata: Value,
    /// v4 (`model` group).
    pub provided_model_name: Option<String>,
    /// v3.
    pub model: Option<String>,
    pub usage_details: Value,
    pub cost_details: Value,
    pub trace_id: Option<String>,
    /// v4 (`basic` group).
    pub is_root_observation: Option<bool>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    /// v4 (`trace_context` group): the trace's tags, name and release on each row.
    #[serde(deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    pub trace_name: Option<String>,
    pub release: Option<String>,
}

impl ObservationRow {
    /// The normalised observation: RFC 3339 times, JSON input and output.
    pub(super) fn into_observation(self) -> Observation {
        Observation {
            id: self.id,
            kind: self.kind,
            name: self.name,
            start_time: rfc3339(self.start_time),
            end_time: rfc3339(self.end_time),
            input: parse_io(self.input),
            output: parse_io(self.output),
            parent_observation_id: self.parent_observation_id,
            level: self.level,
            metadata: self.metadata,
            model: self.provided_model_name.or(self.model),
            usage_details: self.usage_details,
            cost_details: self.cost_details,
        }
    }
}

/// A raw string that holds JSON becomes that JSON (v4 writes input and output as strings);
/// other values stay as they are.
pub(super) fn parse_io(v: Value) -> Value {
    match v {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        v => v,
    }
}

/// `null` read as the type's default (Langfuse writes `null` for an empty field).
pub(super) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}
