//! The legacy v3 read API (spec `langfuse.md` §7.1–§7.2): `GET /api/public/traces` lists
//! traces page by page (their observations as ids only), `GET /api/public/traces/{id}` reads
//! one with its observations.

use llmgate_core::ext::LangfuseKeys;
use serde::{Deserialize, de::IgnoredAny};
use serde_json::Value;

use super::{
    LangfuseReader, ReadError, Trace, TraceQuery,
    api::{Api, ObservationRow, null_as_default, parse_io},
    drop_shadowed_traces, find_by_tag, strip_dashes,
};
use crate::{
    BoxFuture, LangfuseClient,
    timestamp::{iso_millis, rfc3339},
};

const TRACES_PATH: &str = "/api/public/traces";

/// The legacy v3 read API.
#[derive(Clone, Debug)]
pub struct V3Reader {
    api: Api,
    page_size: usize,
}

impl V3Reader {
    /// Reads from `host` through `client`.
    pub fn new(client: LangfuseClient, host: impl Into<String>) -> Self {
        Self { api: Api::new(client, host), page_size: 100 }
    }

    /// Traces per page (1–100, default 100).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n.clamp(1, 100);
        self
    }
}

impl LangfuseReader for V3Reader {
    fn list_traces<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        query: &'a TraceQuery,
    ) -> BoxFuture<'a, Result<Vec<Trace>, ReadError>> {
        Box::pin(async move {
            let (from, to) = query.window();
            let limit = query.limit.unwrap_or(usize::MAX);
            if limit == 0 {
                return Ok(Vec::new());
            }
            // One page size for the whole walk (pages are offsets of it).
            let page_size = self.page_size.min(limit);
            let mut traces = Vec::new();
            let mut page = 1u64;
            loop {
                let mut pairs: Vec<(&str, String)> = query.tags.iter().map(|t| ("tags", t.clone())).collect();
                pairs.push(("page", page.to_string()));
                pairs.push(("limit", page_size.to_string()));
                pairs.push(("orderBy", "timestamp.desc".to_owned()));
                pairs.push(("fromTimestamp", iso_millis(from)));
                pairs.push(("toTimestamp", iso_millis(to)));
                for (key, value) in query.filters().into_iter().chain([("fields", &query.fields)]) {
                    if let Some(value) = value {
                        pairs.push((key, value.clone()));
                    }
                }
                let body: TracesPage =
                    self.api.page(keys, TRACES_PATH, &pairs, "the v3 traces API is not available").await?;
                let empty = body.data.is_empty();
                traces.extend(body.data.into_iter().map(V3Trace::into_trace));
                if empty || page >= body.meta.total_pages || traces.len() >= limit {
                    break;
                }
                page += 1;
            }
            traces.truncate(limit);
            Ok(drop_shadowed_traces(traces))
        })
    }

    fn get_trace<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        trace_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<Trace>, ReadError>> {
        Box::pin(async move {
            let id = strip_dashes(trace_id);
            let encoded: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
            let trace: Option<V3Trace> = self.api.get(keys, &format!("{TRACES_PATH}/{encoded}"), &[]).await?;
            Ok(trace.map(V3Trace::into_trace))
        })
    }

    fn find_insertion<'a>(
        &'a self,
        keys: &'a LangfuseKeys,
        insertion_id: &'a str,
        query: &'a TraceQuery,
    ) -> BoxFuture<'a, Result<Option<Trace>, ReadError>> {
        Box::pin(async move {
            // The trace id is one request instead of a list and a detail; it ignores the other
            // filters, so it is used only when there are none.
            let filtered = query.filters().iter().any(|(_, f)| f.is_some());
            if !filtered
                && let Some(trace) = self.get_trace(keys, insertion_id).await?
                && trace.has_generation()
            {
                return Ok(Some(trace));
            }
            find_by_tag(self, keys, insertion_id, query).await
        })
    }
}

// === response shapes ===

/// `Traces`: a page of `TraceWithDetails`.
#[derive(Deserialize)]
struct TracesPage {
    #[serde(default, deserialize_with = "null_as_default")]
    data: Vec<V3Trace>,
    #[serde(default, deserialize_with = "null_as_default")]
    meta: PageMeta,
}

/// `utilsMetaResponse`, the part of it the walk needs.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct PageMeta {
    total_pages: u64,
}

/// `TraceWithDetails` (in a list) or `TraceWithFullDetails` (read by id).
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct V3Trace {
    #[serde(deserialize_with = "null_as_default")]
    id: String,
    name: Option<String>,
    user_id: Option<String>,
    session_id: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    tags: Vec<String>,
    timestamp: Option<String>,
    input: Value,
    output: Value,
    metadata: Value,
    #[serde(deserialize_with = "null_as_default")]
    observations: Vec<ObservationEntry>,
}

/// A list holds observation ids, a trace read by id the observations themselves.
#[derive(Deserialize)]
#[serde(untagged)]
enum ObservationEntry {
    Full(Box<ObservationRow>),
    Id(IgnoredAny),
}

impl V3Trace {
    fn into_trace(self) -> Trace {
        Trace {
            id: self.id,
            name: self.name,
            user_id: self.user_id,
            session_id: self.session_id,
            tags: self.tags,
            timestamp: rfc3339(self.timestamp),
            input: parse_io(self.input),
            output: parse_io(self.output),
            metadata: self.metadata,
            observations: self
                .observations
                .into_iter()
                .filter_map(|o| match o {
                    ObservationEntry::Full(row) => Some(row.into_observation()),
                    ObservationEntry::Id(_) => None,
                })
                .collect(),
        }
    }
}
