//! The query strings of `GET /logs` and `GET /status`, as eval-protocol's adapters send them
//! (`tags` repeated, `limit`, `hours_back`, `program`; `rollout_id`).

use chrono::{DateTime, TimeDelta, Utc};

use crate::entry::{Filter, ROLLOUT_TAG, timestamp};

/// The default `limit` of `GET /logs` (the adapters' own default).
pub const DEFAULT_LIMIT: usize = 100;

/// A `GET /logs` search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogSearch {
    /// The rollout whose log is read: the first `rollout_id:` tag.
    pub rollout_id: String,
    /// What an entry must match (all the tags, the program, the time window).
    pub filter: Filter,
    /// How many entries at most, newest first.
    pub limit: usize,
}

impl LogSearch {
    /// Parses the query of `GET /logs` received at `now`. The error is the `detail` of a 400.
    pub fn parse(query: Option<&str>, now: DateTime<Utc>) -> Result<Self, String> {
        let mut filter = Filter::default();
        let mut limit = DEFAULT_LIMIT;
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*key {
                "tags" => filter.tags.push(value.into_owned()),
                "program" => filter.program = Some(value.into_owned()),
                "limit" => {
                    limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("'limit' must be a positive integer, not '{value}'"))?;
                }
                "hours_back" => {
                    let hours = value
                        .parse::<f64>()
                        .ok()
                        .filter(|h| h.is_finite() && *h > 0.0)
                        .ok_or_else(|| format!("'hours_back' must be a positive number, not '{value}'"))?;
                    // Past what a timestamp can hold, the window is everything.
                    filter.since = TimeDelta::try_milliseconds((hours * 3_600_000.0).min(i64::MAX as f64) as i64)
                        .and_then(|window| now.checked_sub_signed(window))
                        .map(timestamp);
                }
                _ => {}
            }
        }
        let rollout_id = filter
            .tags
            .iter()
            .filter_map(|tag| tag.strip_prefix(ROLLOUT_TAG))
            .find(|id| !id.is_empty())
            .ok_or("Searching logs needs a 'tags=rollout_id:<id>' parameter")?
            .to_owned();
        Ok(Self { rollout_id, filter, limit })
    }
}

/// The `rollout_id` of a `GET /status` query. The error is the `detail` of a 400.
pub fn status_rollout_id(query: Option<&str>) -> Result<String, String> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, value)| key == "rollout_id" && !value.is_empty())
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| "A status request needs a 'rollout_id' parameter".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-05T08:00:00Z").unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_adapters_search_parses() {
        let search = LogSearch::parse(
            Some("tags=rollout_id%3Ar1&tags=run_id%3Au&limit=5&hours_back=24&program=eval_protocol&x=y"),
            now(),
        )
        .unwrap();
        assert_eq!(search.rollout_id, "r1");
        assert_eq!(search.filter.tags, ["rollout_id:r1", "run_id:u"]);
        assert_eq!(search.filter.program.as_deref(), Some("eval_protocol"));
        assert_eq!(search.filter.since.as_deref(), Some("2026-12-04T08:00:00.000000Z"));
        assert_eq!(search.limit, 5);
        let search = LogSearch::parse(Some("tags=rollout_id:r:with:colons&hours_back=1e300"), now()).unwrap();
        assert_eq!((search.rollout_id.as_str(), search.limit, search.filter.since), ("r:with:colons", 100, None));
    }

    #[test]
    fn bad_searches_say_why() {
        for (query, expected) in [
            (None, "needs a 'tags=rollout_id:<id>'"),
            (Some("tags=run_id:u"), "needs a 'tags=rollout_id:<id>'"),
            (Some("tags=rollout_id:"), "needs a 'tags=rollout_id:<id>'"),
            (Some("tags=rollout_id:r&limit=0"), "'limit' must be a positive integer"),
            (Some("tags=rollout_id:r&limit=-1"), "'limit' must be a positive integer"),
            (Some("tags=rollout_id:r&hours_back=x"), "'hours_back' must be a positive number"),
            (Some("tags=rollout_id:r&hours_back=NaN"), "'hours_back' must be a positive number"),
        ] {
            let error = LogSearch::parse(query, now()).unwrap_err();
            assert!(error.contains(expected), "{query:?}: {error}");
        }
    }

    #[test]
    fn status_needs_a_rollout_id() {
        assert_eq!(status_rollout_id(Some("rollout_id=a%20b")).unwrap(), "a b");
        assert!(status_rollout_id(Some("rollout_id=")).is_err());
        assert!(status_rollout_id(None).is_err());
    }
}
