//! The v4 observations API, also Cloud's (spec `langfuse.md` §7.3): `GET
//! /api/public/v2/observations` lists observations, newest first, page after page by cursor.
//! There is no trace endpoint: a trace is its observations grouped by `traceId`, its tags, name,
//! user and session read from the rows' trace context, its input and output from its root.

use std::{
    collections::{HashMap, HashSet},
    ops::ControlFlow,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use llmgate_core::ext::LangfuseKeys;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    LangfuseReader, ObservationSelector, ReadError, Trace, TraceQuery, TracedObservation,
    api::{Api, ObservationRow, null_as_default, parse_io},
    drop_shadowed_traces, strip_dashes,
};
use crate::{
    BoxFuture, LangfuseClient,
    timestamp::{iso_millis, rfc3339},
};

const OBSERVATIONS_PATH: &str = "/api/public/v2/observations";
const V4_FIELDS: &str = "core,basic,time,io,metadata,model,usage,trace_context";
/// Metadata keys the trace reads read in full.
const TRACE_METADATA: &str = "insertion_id,original_model,fallback_model,reason";
/// Field groups of the report's reads (events and generations, spec `langfuse.md` §7.3).
const REPORT_FIELDS: &str = "core,basic,model,usage,metadata,metrics,trace_context";
/// Metadata keys the report reads in full.
const REPORT_METADATA: &str = "original_model,fallback_model,reason,estimated_tokens,original_max_context,\
                               fallback_max_context,cost_usd,is_primary,latency_seconds";

/// The v4 observations API (also Cloud's).
#[derive(Clone, Debug)]
pub struct V4Reader {
    api: Api,
    page_size: usize,
}

/// The v4 field groups for a v3 `fields` list: `core` → `metadata` (plus the groups always
/// asked for), `io` → `io`, `observations` → `time,model,usage`, `metrics` → `metrics`,
/// `scores` → nothing; v4 group names pass through, unknown names are dropped.
fn v4_fields(fields: Option<&str>) -> String {
    const V4_GROUPS: &[&str] =
        &["core", "basic", "time", "io", "metadata", "model", "usage", "prompt", "metrics", "trace_context"];
    let Some(fields) = fields.filter(|f| !f.trim().is_empty()) else {
        return V4_FIELDS.to_owned();
    };
    // What grouping into traces needs: ids and parents, trace name, user, session, tags.
    let mut groups: Vec<&str> = vec!["core", "basic", "trace_context"];
    for item in fields.split(',').map(str::trim) {
        let add: &[&str] = match item {
            "core" => &["metadata"],
            "observations" => &["time", "model", "usage"],
            other => V4_GROUPS.iter().find(|g| **g == other).map_or(&[], std::slice::from_ref),
        };
        for g in add {
            if !groups.contains(g) {
                groups.push(g);
            }
        }
    }
    groups.join(",")
}

impl V4Reader {
    /// Reads from `host` through `client`.
    pub fn new(client: LangfuseClient, host: impl Into<String>) -> Self {
        Self { api: Api::new(client, host), page_size: 1000 }
    }

    /// Rows per page (1–1000, default 1000).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n.clamp(1, 1000);
        self
    }

    /// Reads the observations that started in the window, with the field groups `fields`, the
    /// metadata keys `expand` in full, and the parameters `more`, page after page: each page's
    /// rows go to `page` until the last page, or until `page` has enough.
    async fn walk(
        &self,
        keys: &LangfuseKeys,
        (from, to): (SystemTime, SystemTime),
        (fields, expand): (&str, &str),
        more: Vec<(&'static str, String)>,
        mut page: impl FnMut(Vec<ObservationRow>) -> ControlFlow<()>,
    ) -> Result<(), ReadError> {
        let mut pairs = vec![
            ("fromStartTime", iso_millis(from)),
            ("toStartTime", iso_millis(to)),
            ("limit", self.page_size.to_string()),
            ("fields", fields.to_owned()),
            ("expandMetadata", expand.to_owned()),
        ];
        pairs.extend(more);
        loop {
            let body: ObservationsPage =
                self.api.page(keys, OBSERVATIONS_PATH, &pairs, "the v2 observations API is not available").await?;
            if page(body.data).is_break() {
                return Ok(());
            }
            match body.meta.cursor {
                Some(next) if !next.is_empty() => match pairs.last_mut() {
                    Some((key, cursor)) if *key == "cursor" => *cursor = next,
                    _ => pairs.push(("cursor", next)),
                },
                _ => return Ok(()),
            }
        }
    }

    /// All rows matching `filter` (and the simple parameters `simple`) in the window,
    /// following the cursor; stops early once more than `max_traces` traces were seen.
    async fn rows(
        &self,
        keys: &LangfuseKeys,
        filter: Value,
        simple: Vec<(&'static str, String)>,
        fields: &str,
        window: (SystemTime, SystemTime),
        max_traces: Option<usize>,
    ) -> Result<Vec<ObservationRow>, ReadError> {
        let mut rows = Vec::new();
        let mut seen: HashSet<String> = HashSet::new();
        let mut more = vec![("filter", filter.to_string())];
        more.extend(simple);
        self.walk(keys, window, (fields, TRACE_METADATA), more, |page| {
            seen.extend(page.iter().filter_map(|row| row.trace_id.clone()));
            rows.extend(page);
            if max_traces.is_some_and(|max| seen.len() > max) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .await?;
        Ok(rows)
    }

    /// Groups rows (newest first) into traces, in order of each trace's newest row.
    fn group(rows: Vec<ObservationRow>) -> Vec<Trace> {
        let mut order: Vec<String> = Vec::new();
        let mut groups: HashMap<String, Vec<ObservationRow>> = HashMap::new();
        for row in rows {
            let Some(trace_id) = row.trace_id.clone() else {
                continue;
            };
            groups
                .entry(trace_id.clone())
                .or_insert_with(|| {
                    order.push(trace_id);
                    Vec::new()
                })
                .push(row);
        }
        order
            .into_iter()
            .filter_map(|id| {
                let mut rows = groups.remove(&id)?;
                rows.sort_by(|a, b| a.start_time.cmp(&b.start_time));
                let root = rows
                    .iter()
                    .find(|r| r.is_root_observation == Some(true))
                    .or_else(|| rows.iter().find(|r| r.parent_observation_id.is_none()))
                    .or(rows.first())?;
                let any = |field: fn(&ObservationRow) -> &Option<String>| rows.iter().find_map(|r| field(r).clone());
                let mut tags: Vec<String> = Vec::new();
                for tag in rows.iter().flat_map(|r| &r.tags) {
                    if !tags.contains(tag) {
                        tags.push(tag.clone());
                    }
                }
                Some(Trace {
                    id,
                    name: any(|r| &r.trace_name),
                    user_id: any(|r| &r.user_id),
                    session_id: any(|r| &r.session_id),
                    tags,
                    timestamp: rfc3339(root.start_time.clone()),
                    input: parse_io(root.input.clone()),
                    output: parse_io(root.output.clone()),
                    metadata: root.metadata.clone(),
                    observations: rows.into_iter().map(ObservationRow::into_observation).collect(),
                })
            })
            .collect()
    }
}

/// The window to look for a trace in: around the UUIDv7 timestamp when the id is one.
fn window_for(trace_id: &str) -> (SystemTime, SystemTime) {
    if let Ok(uuid) = uuid::Uuid::parse_str(trace_id)
        && uuid.get_version_num() == 7
        && let Some(ts) = uuid.get_timestamp()
    {
        let (secs, nanos) = ts.to_unix();
        let at = UNIX_EPOCH + Duration::new(secs, nanos);
        let day = Duration::from_secs(86_400);
        return (at.checked_sub(day).unwrap_or(UNIX_EPOCH), at + day);
    }
    TraceQuery::default().window()
}

impl LangfuseReader for V4Reader {
    fn list_traces<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        query: &'a TraceQuery,
    ) -> BoxFuture<'a, Result<Vec<Trace>, ReadError>> {
        Box::pin(async move {
            let limit = query.limit.unwrap_or(usize::MAX);
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut conditions = Vec::new();
            if !query.tags.is_empty() {
                conditions
                    .push(json!({"type": "arrayOptions", "column": "tags", "operator": "all of", "value": query.tags}));
            }
            if let Some(name) = &query.name {
                conditions.push(json!({"type": "string", "column": "traceName", "operator": "=", "value": name}));
            }
            // The name is a filter condition (above), the release is checked on the rows (below).
            let simple: Vec<(&'static str, String)> = query
                .filters()
                .into_iter()
                .filter(|(key, _)| !matches!(*key, "name" | "release"))
                .filter_map(|(key, value)| Some((key, value.clone()?)))
                .collect();
            // Without a tag the listing is unbounded: stop after `limit` traces. With tags every
            // row is read, so no trace comes back cut.
            let max_traces = query.tags.is_empty().then_some(limit);
            let fields = v4_fields(query.fields.as_deref());
            let rows = self.rows(keys, Value::Array(conditions), simple, &fields, query.window(), max_traces).await?;
            let rows = match &query.release {
                Some(release) => {
                    let keep: HashSet<String> = rows
                        .iter()
                        .filter(|r| r.release.as_ref() == Some(release))
                        .filter_map(|r| r.trace_id.clone())
                        .collect();
                    rows.into_iter().filter(|r| r.trace_id.as_ref().is_some_and(|t| keep.contains(t))).collect()
                }
                None => rows,
            };
            let mut traces = drop_shadowed_traces(Self::group(rows));
            traces.truncate(limit);
            Ok(traces)
        })
    }

    fn lists_full_traces(&self) -> bool {
        true
    }

    fn list_observations<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        selectors: &'a [ObservationSelector],
        window: (SystemTime, SystemTime),
        progress: &'a (dyn Fn(usize) + Send + Sync),
    ) -> BoxFuture<'a, Result<Vec<TracedObservation>, ReadError>> {
        Box::pin(async move {
            let mut out: Vec<TracedObservation> = Vec::new();
            for selector in selectors {
                let mut more = vec![("type", selector.kind.to_ascii_uppercase())];
                if let Some(name) = &selector.name {
                    more.push(("name", name.clone()));
                }
                self.walk(keys, window, (REPORT_FIELDS, REPORT_METADATA), more, |page| {
                    out.extend(page.into_iter().map(|row| TracedObservation {
                        trace_id: row.trace_id.clone().unwrap_or_default(),
                        observation: row.into_observation(),
                    }));
                    progress(out.len());
                    ControlFlow::Continue(())
                })
                .await?;
            }
            Ok(out)
        })
    }

    fn get_trace<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        trace_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Trace>, ReadError>> {
        Box::pin(async move {
            let id = strip_dashes(trace_id);
            let filter = json!([{"type": "string", "column": "traceId", "operator": "=", "value": id}]);
            let rows = self.rows(keys, filter, Vec::new(), V4_FIELDS, window_for(trace_id), None).await?;
            Ok(Self::group(rows).into_iter().next())
        })
    }
}

// === response shapes ===

/// `ObservationsV2Response`.
#[derive(Deserialize)]
struct ObservationsPage {
    #[serde(default, deserialize_with = "null_as_default")]
    data: Vec<ObservationRow>,
    #[serde(default, deserialize_with = "null_as_default")]
    meta: CursorMeta,
}

/// Its `meta`: no cursor on the last page.
#[derive(Default, Deserialize)]
#[serde(default)]
struct CursorMeta {
    cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_fields_map_the_v3_names() {
        assert_eq!(v4_fields(None), V4_FIELDS);
        assert_eq!(v4_fields(Some("core")), "core,basic,trace_context,metadata");
        assert_eq!(
            v4_fields(Some("core,io,observations,scores")),
            "core,basic,trace_context,metadata,io,time,model,usage"
        );
        assert_eq!(v4_fields(Some("usage,bogus")), "core,basic,trace_context,usage");
    }
}
