//! A log entry: the writer's body, checked once and turned into the JSON that is stored and
//! listed back, and the few fields a search reads from a stored entry.
//!
//! The writer is eval-protocol's `FireworksTracingHttpHandler`; its body is
//! `{"program", "status": {"code", "message", "details"} | null, "message", "tags": […],
//! "extras": {…}}`. The stored entry is what `GET /logs` lists and what the adapters read:
//! `{"timestamp", "severity", "program", "message", "tags", "status", "extras"}`, where
//! `timestamp` is the gateway's receive time (the writer's own is in `extras.timestamp`) and
//! `severity` is `extras.level` (`INFO` without one). A status code is kept as sent, known to
//! eval-protocol or not.

use std::borrow::Cow;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The tag that names a rollout.
pub const ROLLOUT_TAG: &str = "rollout_id:";
/// The status code eval-protocol's processor polls on (`RUNNING`).
pub const RUNNING: i64 = 101;

/// A checked entry, ready to store.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEntry {
    /// The stored JSON.
    pub json: Bytes,
    /// The rollouts it belongs to: its `rollout_id:` tags, deduplicated, in order.
    pub rollout_ids: Vec<String>,
    /// Whether it carries a status (and so may be the rollout's newest status).
    pub has_status: bool,
}

/// Checks a writer's `body` received at `now` and builds the stored entry, at most
/// `max_bytes` long. The error says what is wrong, for a `400 {"detail": …}`.
pub fn parse(body: &[u8], now: DateTime<Utc>, max_bytes: usize) -> Result<NewEntry, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("The log body is not valid JSON: {e}"))?;
    let Value::Object(mut fields) = value else {
        return Err("The log body must be a JSON object".into());
    };
    let tags = match fields.remove("tags") {
        Some(Value::Array(tags)) => tags
            .into_iter()
            .map(|tag| match tag {
                Value::String(tag) => Ok(tag),
                _ => Err("'tags' must be a list of strings"),
            })
            .collect::<Result<Vec<_>, _>>()?,
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err("'tags' must be a list of strings".into()),
    };
    let mut rollout_ids: Vec<String> = Vec::new();
    for id in tags.iter().filter_map(|tag| tag.strip_prefix(ROLLOUT_TAG)) {
        if !id.is_empty() && !rollout_ids.iter().any(|known| known == id) {
            rollout_ids.push(id.to_owned());
        }
    }
    if rollout_ids.is_empty() {
        return Err("A log entry needs a 'rollout_id:<id>' tag".into());
    }
    let message = optional_string(&mut fields, "message", "message")?.unwrap_or_default();
    let program = optional_string(&mut fields, "program", "program")?;
    let status = match fields.remove("status") {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Object(status)) => checked_status(status)?,
        Some(_) => return Err("'status' must be an object with an integer 'code', or null".into()),
    };
    let extras = match fields.remove("extras") {
        None | Some(Value::Null) => None,
        Some(Value::Object(extras)) => Some(extras),
        Some(_) => return Err("'extras' must be an object or null".into()),
    };
    let severity = extras.as_ref().and_then(|e| e.get("level")).and_then(Value::as_str).unwrap_or("INFO").to_owned();
    let has_status = !status.is_null();
    let entry = json!({
        "timestamp": timestamp(now),
        "severity": severity,
        "program": program,
        "message": message,
        "tags": tags,
        "status": status,
        "extras": extras,
    });
    // Writing a `Value` into a Vec cannot fail.
    let json = serde_json::to_vec(&entry).unwrap_or_default();
    if json.len() > max_bytes {
        return Err(format!(
            "The log entry is {} bytes; entries are limited to {max_bytes} bytes (rollout_logs.max_entry_bytes)",
            json.len()
        ));
    }
    Ok(NewEntry { json: Bytes::from(json), rollout_ids, has_status })
}

/// `{"code": <integer as sent>, "message": "…", "details": […]}`.
fn checked_status(mut status: Map<String, Value>) -> Result<Value, String> {
    let code = match status.remove("code") {
        Some(Value::Number(code)) if code.is_i64() || code.is_u64() => code,
        _ => return Err("'status.code' must be an integer".into()),
    };
    let message = optional_string(&mut status, "message", "status.message")?;
    let details = match status.remove("details") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(details)) => details,
        Some(_) => return Err("'status.details' must be a list or null".into()),
    };
    Ok(json!({"code": code, "message": message.unwrap_or_default(), "details": details}))
}

/// The string field `key` (absent or null allowed), called `name` in an error.
fn optional_string(fields: &mut Map<String, Value>, key: &str, name: &str) -> Result<Option<String>, String> {
    match fields.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("'{name}' must be a string")),
    }
}

/// The stored timestamp format: RFC 3339 in UTC with microseconds, fixed width, so that
/// timestamps compare as strings in time order.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

// === Reading stored entries ===

/// The fields of a stored entry that a search filters on.
#[derive(Deserialize)]
struct Filtered<'a> {
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(borrow)]
    program: Option<Cow<'a, str>>,
    #[serde(borrow)]
    tags: Vec<Cow<'a, str>>,
}

/// What a search keeps: entries holding every tag of `tags`, of `program` when given, at or
/// after `since` (a [`timestamp`]) when given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Every one of these tags.
    pub tags: Vec<String>,
    /// The entry's program.
    pub program: Option<String>,
    /// The oldest timestamp kept.
    pub since: Option<String>,
}

impl Filter {
    /// Whether the stored entry `json` passes. An entry that does not parse (written by
    /// something else into the same keys) never does.
    pub fn keeps(&self, json: &[u8]) -> bool {
        let Ok(entry) = serde_json::from_slice::<Filtered<'_>>(json) else {
            return false;
        };
        self.since.as_deref().is_none_or(|since| *entry.timestamp >= *since)
            && self.program.as_deref().is_none_or(|program| entry.program.as_deref() == Some(program))
            && self.tags.iter().all(|tag| entry.tags.iter().any(|t| t == tag))
    }
}

/// The `status` and `extras` of a stored entry, as `GET /status` answers them.
pub fn status_of(json: &[u8]) -> (Value, Value) {
    #[derive(Deserialize)]
    struct StatusFields {
        #[serde(default)]
        status: Value,
        #[serde(default)]
        extras: Value,
    }
    serde_json::from_slice::<StatusFields>(json).map_or((Value::Null, Value::Null), |e| (e.status, e.extras))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-05T08:00:00.5Z").unwrap().with_timezone(&Utc)
    }

    fn stored(entry: &NewEntry) -> Value {
        serde_json::from_slice(&entry.json).unwrap()
    }

    #[test]
    fn the_handlers_body_becomes_an_entry() {
        let body = br#"{"program": "eval_protocol", "status": {"code": 100, "message": "done", "details": [{"a": 1}]},
            "message": "Rollout r1 ended", "tags": ["rollout_id:r1", "experiment_id:e", "run_id:u", "rollout_id:r2", "rollout_id:r1"],
            "extras": {"answer": 42, "logger_name": "x", "level": "WARNING", "timestamp": "t"}}"#;
        let entry = parse(body, now(), 65536).unwrap();
        assert_eq!(entry.rollout_ids, ["r1", "r2"]);
        assert!(entry.has_status);
        assert_eq!(
            stored(&entry),
            json!({
                "timestamp": "2026-12-05T08:00:00.500000Z",
                "severity": "WARNING",
                "program": "eval_protocol",
                "message": "Rollout r1 ended",
                "tags": ["rollout_id:r1", "experiment_id:e", "run_id:u", "rollout_id:r2", "rollout_id:r1"],
                "status": {"code": 100, "message": "done", "details": [{"a": 1}]},
                "extras": {"answer": 42, "logger_name": "x", "level": "WARNING", "timestamp": "t"},
            })
        );
    }

    #[test]
    fn minimal_and_unknown_codes_are_kept_as_sent() {
        let entry = parse(br#"{"tags": ["rollout_id:r"], "status": {"code": 777}}"#, now(), 1024).unwrap();
        let stored = stored(&entry);
        assert_eq!(stored["status"], json!({"code": 777, "message": "", "details": []}));
        assert_eq!(stored["severity"], "INFO");
        assert_eq!(stored["message"], "");
        assert_eq!(stored["program"], Value::Null);
        let entry = parse(br#"{"tags": ["rollout_id:r"], "status": null, "extras": null}"#, now(), 1024).unwrap();
        assert!(!entry.has_status);
    }

    #[test]
    fn bad_bodies_say_what_is_wrong() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "not valid JSON"),
            (b"[1]", "must be a JSON object"),
            (br#"{"tags": "rollout_id:r"}"#, "'tags' must be a list of strings"),
            (br#"{"tags": [1]}"#, "'tags' must be a list of strings"),
            (br#"{"tags": ["experiment_id:e"]}"#, "needs a 'rollout_id:<id>' tag"),
            (br#"{"tags": ["rollout_id:"]}"#, "needs a 'rollout_id:<id>' tag"),
            (br#"{"message": "m"}"#, "needs a 'rollout_id:<id>' tag"),
            (br#"{"tags": ["rollout_id:r"], "message": 3}"#, "'message' must be a string"),
            (br#"{"tags": ["rollout_id:r"], "program": {}}"#, "'program' must be a string"),
            (br#"{"tags": ["rollout_id:r"], "status": 100}"#, "'status' must be an object"),
            (br#"{"tags": ["rollout_id:r"], "status": {"code": "100"}}"#, "'status.code' must be an integer"),
            (br#"{"tags": ["rollout_id:r"], "status": {"code": 1.5}}"#, "'status.code' must be an integer"),
            (br#"{"tags": ["rollout_id:r"], "status": {"message": "m"}}"#, "'status.code' must be an integer"),
            (
                br#"{"tags": ["rollout_id:r"], "status": {"code": 1, "message": 2}}"#,
                "'status.message' must be a string",
            ),
            (br#"{"tags": ["rollout_id:r"], "status": {"code": 1, "details": {}}}"#, "'status.details' must be a list"),
            (br#"{"tags": ["rollout_id:r"], "extras": []}"#, "'extras' must be an object"),
        ];
        for (body, expected) in cases {
            let error = parse(body, now(), 1024).unwrap_err();
            assert!(error.contains(expected), "{}: {error}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn an_entry_over_its_bound_is_refused() {
        let body = format!(r#"{{"tags": ["rollout_id:r"], "message": "{}"}}"#, "x".repeat(300));
        let size = parse(body.as_bytes(), now(), 1 << 20).unwrap().json.len();
        assert!(parse(body.as_bytes(), now(), size).is_ok());
        let error = parse(body.as_bytes(), now(), size - 1).unwrap_err();
        assert!(error.contains(&format!("{size} bytes")) && error.contains("max_entry_bytes"), "{error}");
    }

    #[test]
    fn filters_match_every_tag_the_program_and_the_time() {
        let entry = parse(
            br#"{"program": "eval_protocol", "tags": ["rollout_id:r", "run_id:u"], "message": "m"}"#,
            now(),
            1024,
        )
        .unwrap();
        let keeps = |filter: Filter| filter.keeps(&entry.json);
        assert!(keeps(Filter::default()));
        assert!(keeps(Filter { tags: vec!["rollout_id:r".into(), "run_id:u".into()], ..Filter::default() }));
        assert!(!keeps(Filter { tags: vec!["rollout_id:r".into(), "run_id:v".into()], ..Filter::default() }));
        assert!(keeps(Filter { program: Some("eval_protocol".into()), ..Filter::default() }));
        assert!(!keeps(Filter { program: Some("other".into()), ..Filter::default() }));
        assert!(keeps(Filter { since: Some(timestamp(now())), ..Filter::default() }));
        let later = now() + chrono::Duration::microseconds(1);
        assert!(!keeps(Filter { since: Some(timestamp(later)), ..Filter::default() }));
        assert!(!Filter::default().keeps(b"garbage"));
    }

    #[test]
    fn status_and_extras_of_a_stored_entry() {
        let entry =
            parse(br#"{"tags": ["rollout_id:r"], "status": {"code": 13}, "extras": {"k": 1}}"#, now(), 1024).unwrap();
        let (status, extras) = status_of(&entry.json);
        assert_eq!(status["code"], 13);
        assert_eq!(extras, json!({"k": 1}));
        assert_eq!(status_of(b"{}"), (Value::Null, Value::Null));
    }

    /// Any JSON-ish body: values drawn from the field types the parser meets, right or wrong.
    fn field_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
            prop_oneof![Just("rollout_id:r".to_string()), Just("rollout_id:".to_string()), ".{0,12}"]
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("code".to_string()),
                        Just("message".to_string()),
                        Just("details".to_string()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        let keys =
            prop_oneof![Just("tags"), Just("status"), Just("message"), Just("program"), Just("extras"), Just("other")];
        prop_oneof![
            prop::collection::btree_map(keys, field_value(), 0..6).prop_map(|m| serde_json::to_vec(
                &m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<Map<_, _>>()
            )
            .unwrap()),
            prop::collection::vec(any::<u8>(), 0..64),
        ]
    }

    proptest! {
        /// Any body is either refused with a message or stored as an entry that is within the
        /// bound, names its rollouts, and reads back through the filter and the status view.
        #[test]
        fn never_panics_and_what_is_stored_reads_back(body in body(), max in 0usize..400) {
            match parse(&body, now(), max) {
                Err(message) => prop_assert!(!message.is_empty()),
                Ok(entry) => {
                    prop_assert!(entry.json.len() <= max);
                    prop_assert!(!entry.rollout_ids.is_empty());
                    let tags: Vec<String> = entry.rollout_ids.iter().map(|r| format!("{ROLLOUT_TAG}{r}")).collect();
                    let filter = Filter { tags, ..Filter::default() };
                    prop_assert!(filter.keeps(&entry.json));
                    let (status, _) = status_of(&entry.json);
                    prop_assert_eq!(entry.has_status, status.is_object());
                    if let Value::Object(status) = status {
                        prop_assert!(status["code"].is_i64() || status["code"].is_u64());
                    }
                }
            }
        }
    }
}
