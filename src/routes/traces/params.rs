//! The query parameters of gateway.md §7.1, parsed as the original did, and resolved with the
//! request's project into a [`Job`].

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use llmgate_core::ext::{LangfuseKeys, Project};
use llmgate_langfuse::{TraceQuery, timestamp::parse_timestamp};
use tokio::time::Instant;

/// `max_retries` above this is taken as this (the deadline bounds the passes anyway).
const MAX_PASSES: u32 = 50;
/// `sleep_between_gets` above this is taken as this.
const MAX_SLEEP_BETWEEN_GETS: f64 = 30.0;

/// The query parameters of gateway.md §7.1.
#[derive(Debug, Default)]
pub(super) struct Params {
    pub tags: Vec<String>,
    pub project_id: Option<String>,
    pub limit: Option<u64>,
    pub sample_size: Option<u64>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub name: Option<String>,
    pub environment: Option<String>,
    pub version: Option<String>,
    pub release: Option<String>,
    pub fields: Option<String>,
    pub hours_back: Option<u64>,
    pub from_timestamp: Option<String>,
    pub to_timestamp: Option<String>,
    pub sleep_between_gets: Option<f64>,
    pub max_retries: Option<u64>,
}

/// What one request asks, resolved.
pub(super) struct Job {
    pub project_id: String,
    pub keys: LangfuseKeys,
    pub query: Arc<TraceQuery>,
    pub rollout: Option<String>,
    pub sample_size: Option<usize>,
    pub sleep_between_gets: Duration,
    pub max_retries: u32,
    pub deadline: Instant,
}

impl Params {
    /// `application/x-www-form-urlencoded` pairs; an empty value is no value, an unknown name is
    /// ignored, a number that is not one is an error message (422).
    pub(super) fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut p = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let text = || (!value.is_empty()).then(|| value.to_string());
            let int = || -> Result<Option<u64>, String> {
                if value.is_empty() {
                    return Ok(None);
                }
                value.trim().parse::<u64>().map(Some).map_err(|_| {
                    format!("Invalid value for query parameter '{key}': '{value}' is not a non-negative integer")
                })
            };
            match &*key {
                "tags" => p.tags.push(value.to_string()),
                "project_id" => p.project_id = text(),
                "limit" => p.limit = int()?,
                "sample_size" => p.sample_size = int()?,
                "user_id" => p.user_id = text(),
                "session_id" => p.session_id = text(),
                "name" => p.name = text(),
                "environment" => p.environment = text(),
                "version" => p.version = text(),
                "release" => p.release = text(),
                "fields" => p.fields = text(),
                "hours_back" => p.hours_back = int()?,
                "from_timestamp" => p.from_timestamp = text(),
                "to_timestamp" => p.to_timestamp = text(),
                "max_retries" => p.max_retries = int()?,
                "sleep_between_gets" if !value.is_empty() => {
                    let secs = value.trim().parse::<f64>().ok().filter(|s| s.is_finite()).ok_or_else(|| {
                        format!("Invalid value for query parameter 'sleep_between_gets': '{value}' is not a number")
                    })?;
                    p.sleep_between_gets = Some(secs);
                }
                _ => {}
            }
        }
        Ok(p)
    }

    /// The job for `project`, to finish by `deadline`; a malformed timestamp is an error
    /// message (400). Defaults: `limit` 100, `max_retries` 3, the window `hours_back` hours up to
    /// now when neither timestamp is given.
    pub(super) fn into_job(self, project: Project, deadline: Instant) -> Result<Job, String> {
        let mut from = timestamp("from_timestamp", self.from_timestamp.as_deref())?;
        let mut to = timestamp("to_timestamp", self.to_timestamp.as_deref())?;
        if from.is_none()
            && to.is_none()
            && let Some(hours) = self.hours_back
        {
            // UTC (the original used naive local time).
            let now = SystemTime::now();
            to = Some(now);
            from = Some(
                now.checked_sub(Duration::from_secs(hours.saturating_mul(3600))).unwrap_or(SystemTime::UNIX_EPOCH),
            );
        }
        let rollout = self.tags.iter().find_map(|t| t.strip_prefix("rollout_id:")).map(str::to_owned);
        let to_usize = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let query = TraceQuery {
            tags: self.tags,
            from,
            to,
            limit: Some(self.limit.map_or(100, to_usize)),
            user_id: self.user_id,
            session_id: self.session_id,
            name: self.name,
            environment: self.environment,
            version: self.version,
            release: self.release,
            fields: self.fields,
        };
        let sleep = self.sleep_between_gets.unwrap_or(0.0).clamp(0.0, MAX_SLEEP_BETWEEN_GETS);
        Ok(Job {
            project_id: project.id.to_string(),
            keys: project.langfuse,
            query: Arc::new(query),
            rollout,
            sample_size: self.sample_size.map(to_usize),
            sleep_between_gets: Duration::from_secs_f64(sleep),
            max_retries: u32::try_from(self.max_retries.unwrap_or(3)).unwrap_or(u32::MAX).min(MAX_PASSES),
            deadline,
        })
    }
}

/// The timestamp parameter `name`, if given.
fn timestamp(name: &str, value: Option<&str>) -> Result<Option<SystemTime>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    match parse_timestamp(value) {
        Some(t) => Ok(Some(t)),
        None => Err(format!("Invalid {name} '{value}': expected ISO 8601, e.g. 2026-11-21T16:30:22Z")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoded value of `name=<raw>`.
    fn decode_component(raw: &str) -> String {
        Params::parse(Some(&format!("name={raw}"))).unwrap().name.unwrap_or_default()
    }

    #[test]
    fn query_parameters_parse_like_the_original() {
        let p = Params::parse(Some(
            "tags=rollout_id%3Ar1&tags=a+b&limit=5&sample_size=2&user_id=u&hours_back=6&sleep_between_gets=0.1&max_retries=4&fields=core,io&project_id=",
        ))
        .unwrap();
        assert_eq!(p.tags, vec!["rollout_id:r1", "a b"]);
        assert_eq!((p.limit, p.sample_size, p.hours_back, p.max_retries), (Some(5), Some(2), Some(6), Some(4)));
        assert_eq!(p.user_id.as_deref(), Some("u"));
        assert_eq!(p.fields.as_deref(), Some("core,io"));
        assert_eq!(p.project_id, None, "an empty value is no value");
        assert_eq!(p.sleep_between_gets, Some(0.1));
        assert!(Params::parse(Some("limit=x")).is_err());
        assert!(Params::parse(Some("limit=-1")).is_err());
        assert!(Params::parse(Some("sleep_between_gets=nan")).is_err());
        assert_eq!(decode_component("%zz%4"), "%zz%4");
        assert_eq!(decode_component("%C3%A9"), "é");
    }
}
