//! `llmgate report`: the fallback report (spec `fallback-tracking.md` §11.1).
//!
//! Reads the fallback events (`rate_limit_fallback`, `context_length_fallback`) and the
//! generations of a window back from Langfuse and prints five analyses:
//! 1. fallbacks by type and model pair per day (day descending, count descending);
//! 2. context fallbacks per pair: count, average `estimated_tokens`, average
//!    `original_max_context` and `fallback_max_context`;
//! 3. cost impact per (type, pair): distinct traces with such an event, and the sum and average
//!    of `cost_usd` over the generations of those traces;
//! 4. success rate per (type, pair): the share of those traces with at least one generation
//!    whose level is not `ERROR`;
//! 5. latency of primary vs fallback generations (`is_primary`): count, average, p50, p95 of
//!    `latency_seconds` (else end − start). Percentiles are nearest-rank.
//!
//! The analysis is [`analyse`], a pure function over observations; [`render`] formats it as a
//! table, JSON or CSV.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http_body_util::Full;
use llmgate_core::BoxError;
use llmgate_credentials::Projects;
use llmgate_langfuse::{
    LangfuseClient,
    reader::{LangfuseReader, ObservationSelector, ReadError, TracedObservation},
    timestamp::{iso_millis, parse_timestamp},
};
use serde::Serialize;
use serde_json::Value;

use crate::config::Config;

/// The rate-limit fallback event name.
pub const RATE_LIMIT_EVENT: &str = "rate_limit_fallback";
/// The context-length fallback event name.
pub const CONTEXT_EVENT: &str = "context_length_fallback";

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text tables.
    #[default]
    Table,
    /// One JSON document.
    Json,
    /// CSV, one block per section (each with its header row), blank line between.
    Csv,
}

/// Section 1: fallbacks of one type and pair on one day.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DailyFallbacks {
    /// UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// The event name.
    #[serde(rename = "type")]
    pub kind: String,
    /// `original_model`.
    pub original_model: String,
    /// `fallback_model`.
    pub fallback_model: String,
    /// Events.
    pub count: u64,
}

/// Section 2: context fallbacks of one pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContextFallbacks {
    /// `original_model`.
    pub original_model: String,
    /// `fallback_model`.
    pub fallback_model: String,
    /// Events.
    pub count: u64,
    /// Average `estimated_tokens` (of the events that carry it).
    pub avg_estimated_tokens: Option<f64>,
    /// Average `original_max_context`.
    pub avg_original_max_context: Option<f64>,
    /// Average `fallback_max_context`.
    pub avg_fallback_max_context: Option<f64>,
}

/// Section 3: cost of the traces with a fallback of one type and pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostImpact {
    /// The event name.
    #[serde(rename = "type")]
    pub kind: String,
    /// `original_model`.
    pub original_model: String,
    /// `fallback_model`.
    pub fallback_model: String,
    /// Distinct traces with such an event.
    pub traces: u64,
    /// Generations of those traces with a cost.
    pub generations: u64,
    /// Sum of their `cost_usd`.
    pub total_cost_usd: f64,
    /// Average `cost_usd` per generation.
    pub avg_cost_usd: Option<f64>,
}

/// Section 4: success of the fallbacks of one type and pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SuccessRate {
    /// The event name.
    #[serde(rename = "type")]
    pub kind: String,
    /// `original_model`.
    pub original_model: String,
    /// `fallback_model`.
    pub fallback_model: String,
    /// Events.
    pub fallbacks: u64,
    /// Distinct traces with such an event.
    pub traces: u64,
    /// Of those, traces with at least one generation whose level is not `ERROR`.
    pub successful_traces: u64,
    /// `successful_traces / traces`, in percent.
    pub success_rate_pct: Option<f64>,
}

/// Section 5: latency of primary or fallback generations.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Latency {
    /// `primary` or `fallback`.
    pub kind: String,
    /// Generations.
    pub count: u64,
    /// Average, seconds.
    pub avg_seconds: Option<f64>,
    /// Median (nearest rank), seconds.
    pub p50_seconds: Option<f64>,
    /// 95th percentile (nearest rank), seconds.
    pub p95_seconds: Option<f64>,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// The project.
    pub project: String,
    /// Window start (RFC 3339).
    pub from: String,
    /// Window end (RFC 3339).
    pub to: String,
    /// Section 1.
    pub fallbacks_by_day: Vec<DailyFallbacks>,
    /// Section 2.
    pub context_fallbacks: Vec<ContextFallbacks>,
    /// Section 3.
    pub cost_impact: Vec<CostImpact>,
    /// Section 4.
    pub success_rate: Vec<SuccessRate>,
    /// Section 5: `primary` then `fallback`.
    pub latency: Vec<Latency>,
}

/// Parses `7d`, `24h`, `90m`, `30s`, `2w`.
pub fn parse_since(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("invalid duration '{s}' (use e.g. 7d, 24h, 90m)"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(format!("invalid duration unit in '{s}' (use s, m, h, d or w)")),
    };
    n.checked_mul(unit_secs).map(Duration::from_secs).ok_or_else(|| format!("duration '{s}' is too large"))
}

fn meta<'a>(o: &'a TracedObservation, key: &str) -> Option<&'a Value> {
    o.observation.metadata.get(key)
}

fn meta_str(o: &TracedObservation, key: &str) -> String {
    match meta(o, key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// A number, or a string holding one (metadata values may come back stringified).
fn number(v: Option<&Value>) -> Option<f64> {
    match v? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|f| f.is_finite())
}

fn boolean(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn average(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

fn seconds_between(start: Option<&str>, end: Option<&str>) -> Option<f64> {
    let (start, end) = (parse_timestamp(start?)?, parse_timestamp(end?)?);
    Some(end.duration_since(start).ok()?.as_secs_f64())
}

type Key = (String, String, String);

/// The five analyses over the observations of a window: `events` are the fallback events,
/// `generations` the generations (of any trace).
pub fn analyse(
    project: &str,
    (from, to): (SystemTime, SystemTime),
    events: &[TracedObservation],
    generations: &[TracedObservation],
) -> Report {
    let key = |e: &TracedObservation| -> Key {
        (e.observation.name.clone().unwrap_or_default(), meta_str(e, "original_model"), meta_str(e, "fallback_model"))
    };
    let fallback_events: Vec<&TracedObservation> = events
        .iter()
        .filter(|e| matches!(e.observation.name.as_deref(), Some(RATE_LIMIT_EVENT | CONTEXT_EVENT)))
        .collect();

    // 1. By type, pair and day.
    let mut daily: HashMap<(String, Key), u64> = HashMap::new();
    for e in &fallback_events {
        let day = e.observation.start_time.as_deref().and_then(|t| t.get(..10)).unwrap_or("").to_owned();
        *daily.entry((day, key(e))).or_default() += 1;
    }
    let mut fallbacks_by_day: Vec<DailyFallbacks> = daily
        .into_iter()
        .map(|((day, (kind, original_model, fallback_model)), count)| DailyFallbacks {
            day,
            kind,
            original_model,
            fallback_model,
            count,
        })
        .collect();
    fallbacks_by_day.sort_by(|a, b| {
        b.day.cmp(&a.day).then(b.count.cmp(&a.count)).then_with(|| {
            (&a.kind, &a.original_model, &a.fallback_model).cmp(&(&b.kind, &b.original_model, &b.fallback_model))
        })
    });

    // 2. Context fallbacks per pair.
    let mut context: BTreeMap<(String, String), [Vec<f64>; 3]> = BTreeMap::new();
    let mut context_count: HashMap<(String, String), u64> = HashMap::new();
    for e in fallback_events.iter().filter(|e| e.observation.name.as_deref() == Some(CONTEXT_EVENT)) {
        let pair = (meta_str(e, "original_model"), meta_str(e, "fallback_model"));
        *context_count.entry(pair.clone()).or_default() += 1;
        let sums = context.entry(pair).or_default();
        for (i, k) in ["estimated_tokens", "original_max_context", "fallback_max_context"].iter().enumerate() {
            if let Some(v) = number(meta(e, k)) {
                sums[i].push(v);
            }
        }
    }
    let mut context_fallbacks: Vec<ContextFallbacks> = context
        .into_iter()
        .map(|((original_model, fallback_model), [est, orig, fb])| ContextFallbacks {
            count: context_count.get(&(original_model.clone(), fallback_model.clone())).copied().unwrap_or(0),
            original_model,
            fallback_model,
            avg_estimated_tokens: average(&est),
            avg_original_max_context: average(&orig),
            avg_fallback_max_context: average(&fb),
        })
        .collect();
    context_fallbacks.sort_by_key(|c| std::cmp::Reverse(c.count));

    // 3 and 4. Per (type, pair): events, distinct traces, their generations.
    let mut by_trace: HashMap<&str, Vec<&TracedObservation>> = HashMap::new();
    for g in generations {
        by_trace.entry(g.trace_id.as_str()).or_default().push(g);
    }
    let mut pairs: BTreeMap<Key, (u64, BTreeSet<&str>)> = BTreeMap::new();
    for e in &fallback_events {
        let entry = pairs.entry(key(e)).or_default();
        entry.0 += 1;
        if !e.trace_id.is_empty() {
            entry.1.insert(e.trace_id.as_str());
        }
    }
    let mut cost_impact = Vec::new();
    let mut success_rate = Vec::new();
    for ((kind, original_model, fallback_model), (fallbacks, traces)) in pairs {
        let mut costs = Vec::new();
        let mut successful = 0u64;
        for t in &traces {
            let gens = by_trace.get(t).map(Vec::as_slice).unwrap_or_default();
            costs.extend(gens.iter().filter_map(|g| {
                number(meta(g, "cost_usd")).or_else(|| number(g.observation.cost_details.get("total")))
            }));
            if gens.iter().any(|g| g.observation.level.as_deref() != Some("ERROR")) {
                successful += 1;
            }
        }
        let n = traces.len() as u64;
        cost_impact.push(CostImpact {
            kind: kind.clone(),
            original_model: original_model.clone(),
            fallback_model: fallback_model.clone(),
            traces: n,
            generations: costs.len() as u64,
            total_cost_usd: costs.iter().sum(),
            avg_cost_usd: average(&costs),
        });
        success_rate.push(SuccessRate {
            kind,
            original_model,
            fallback_model,
            fallbacks,
            traces: n,
            successful_traces: successful,
            success_rate_pct: (n > 0).then(|| successful as f64 * 100.0 / n as f64),
        });
    }
    cost_impact.sort_by(|a, b| b.total_cost_usd.total_cmp(&a.total_cost_usd));
    success_rate.sort_by_key(|s| std::cmp::Reverse(s.fallbacks));

    // 5. Latency, primary vs fallback.
    let (mut primary, mut fallback) = (Vec::new(), Vec::new());
    for g in generations {
        let Some(is_primary) = boolean(meta(g, "is_primary")) else {
            continue;
        };
        let latency = number(meta(g, "latency_seconds"))
            .or_else(|| seconds_between(g.observation.start_time.as_deref(), g.observation.end_time.as_deref()));
        if let Some(latency) = latency {
            if is_primary { primary.push(latency) } else { fallback.push(latency) }
        }
    }
    let latency = [("primary", primary), ("fallback", fallback)]
        .into_iter()
        .map(|(kind, mut values)| {
            values.sort_by(f64::total_cmp);
            Latency {
                kind: kind.to_owned(),
                count: values.len() as u64,
                avg_seconds: average(&values),
                p50_seconds: percentile(&values, 50.0),
                p95_seconds: percentile(&values, 95.0),
            }
        })
        .collect();

    Report {
        project: project.to_owned(),
        from: iso_millis(from),
        to: iso_millis(to),
        fallbacks_by_day,
        context_fallbacks,
        cost_impact,
        success_rate,
        latency,
    }
}

/// Reads the window's fallback events and generations through `reader` and analyses them.
pub async fn build(
    reader: &dyn LangfuseReader,
    keys: &llmgate_core::ext::LangfuseKeys,
    project: &str,
    window: (SystemTime, SystemTime),
    progress: &(dyn Fn(usize) + Send + Sync),
) -> Result<Report, ReadError> {
    let selectors = [
        ObservationSelector::named("EVENT", RATE_LIMIT_EVENT),
        ObservationSelector::named("EVENT", CONTEXT_EVENT),
        ObservationSelector::kind("GENERATION"),
    ];
    let rows = reader.list_observations(keys, &selectors, window, progress).await?;
    let (generations, events): (Vec<TracedObservation>, Vec<TracedObservation>) =
        rows.into_iter().partition(|o| o.observation.kind.eq_ignore_ascii_case("GENERATION"));
    Ok(analyse(project, window, &events, &generations))
}

/// The report of `project` over the last `since`, read from the Langfuse of `config`.
pub async fn collect(config: &Config, project: Option<&str>, since: Duration) -> Result<Report, BoxError> {
    let langfuse = &config.langfuse;
    let client = LangfuseClient::new(llmgate_hyper::http_client::<Full<Bytes>>(config.server.request_timeout));
    let reader = langfuse.reader(client).ok_or("no Langfuse host configured (langfuse.host or LANGFUSE_HOST)")?;
    let secrets =
        langfuse.secrets_path.as_deref().ok_or("no secrets file configured (langfuse.secrets_path or SECRETS_PATH)")?;
    let projects = Projects::load(secrets).map_err(|e| e.describe(secrets))?;
    let project = projects.resolve(project)?.ok_or("no project: name one with --project")?;
    let now = SystemTime::now();
    let window = (now.checked_sub(since).unwrap_or(SystemTime::UNIX_EPOCH), now + Duration::from_secs(60));
    let tty = std::io::stderr().is_terminal();
    let progress = move |n: usize| {
        if tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\rreading Langfuse: {n} read");
            let _ = err.flush();
        }
    };
    let report = build(reader.as_ref(), &project.langfuse, &project.id, window, &progress).await;
    if tty {
        eprintln!();
    }
    Ok(report?)
}

/// `llmgate report`: prints the report of `project` over the last `since` to stdout.
pub async fn run(config: Config, project: Option<String>, since: Duration, format: Format) -> Result<(), BoxError> {
    let report = collect(&config, project.as_deref(), since).await?;
    let text = render(&report, format)?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v}")).unwrap_or_default()
}

/// The sections as (title, header, rows).
/// A section: title, header, rows.
type Section = (&'static str, Vec<&'static str>, Vec<Vec<String>>);

fn sections(r: &Report) -> Vec<Section> {
    vec![
        (
            "fallbacks_by_day",
            vec!["day", "type", "original_model", "fallback_model", "count"],
            r.fallbacks_by_day
                .iter()
                .map(|x| {
                    vec![
                        x.day.clone(),
                        x.kind.clone(),
                        x.original_model.clone(),
                        x.fallback_model.clone(),
                        x.count.to_string(),
                    ]
                })
                .collect(),
        ),
        (
            "context_fallbacks",
            vec![
                "original_model",
                "fallback_model",
                "count",
                "avg_estimated_tokens",
                "avg_original_max_context",
                "avg_fallback_max_context",
            ],
            r.context_fallbacks
                .iter()
                .map(|x| {
                    vec![
                        x.original_model.clone(),
                        x.fallback_model.clone(),
                        x.count.to_string(),
                        opt(x.avg_estimated_tokens),
                        opt(x.avg_original_max_context),
                        opt(x.avg_fallback_max_context),
                    ]
                })
                .collect(),
        ),
        (
            "cost_impact",
            vec!["type", "original_model", "fallback_model", "traces", "generations", "total_cost_usd", "avg_cost_usd"],
            r.cost_impact
                .iter()
                .map(|x| {
                    vec![
                        x.kind.clone(),
                        x.original_model.clone(),
                        x.fallback_model.clone(),
                        x.traces.to_string(),
                        x.generations.to_string(),
                        format!("{}", x.total_cost_usd),
                        opt(x.avg_cost_usd),
                    ]
                })
                .collect(),
        ),
        (
            "success_rate",
            vec![
                "type",
                "original_model",
                "fallback_model",
                "fallbacks",
                "traces",
                "successful_traces",
                "success_rate_pct",
            ],
            r.success_rate
                .iter()
                .map(|x| {
                    vec![
                        x.kind.clone(),
                        x.original_model.clone(),
                        x.fallback_model.clone(),
                        x.fallbacks.to_string(),
                        x.traces.to_string(),
                        x.successful_traces.to_string(),
                        opt(x.success_rate_pct),
                    ]
                })
                .collect(),
        ),
        (
            "latency",
            vec!["kind", "count", "avg_seconds", "p50_seconds", "p95_seconds"],
            r.latency
                .iter()
                .map(|x| {
                    vec![
                        x.kind.clone(),
                        x.count.to_string(),
                        opt(x.avg_seconds),
                        opt(x.p50_seconds),
                        opt(x.p95_seconds),
                    ]
                })
                .collect(),
        ),
    ]
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
}

/// Formats the report.
pub fn render(report: &Report, format: Format) -> Result<String, BoxError> {
    let mut out = String::new();
    match format {
        Format::Json => {
            out = serde_json::to_string_pretty(report)?;
            out.push('\n');
        }
        Format::Csv => {
            for (i, (title, header, rows)) in sections(report).into_iter().enumerate() {
                if i > 0 {
                    out.push('\n');
                }
                let _ = writeln!(out, "section,{}", header.join(","));
                for row in rows {
                    let fields: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
                    let _ = writeln!(out, "{title},{}", fields.join(","));
                }
            }
        }
        Format::Table => {
            let _ =
                writeln!(out, "Fallback report for project {} from {} to {}", report.project, report.from, report.to);
            for (title, header, rows) in sections(report) {
                let _ = writeln!(out, "\n== {title} ==");
                if rows.is_empty() {
                    let _ = writeln!(out, "(none)");
                    continue;
                }
                let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
                for row in &rows {
                    for (w, f) in widths.iter_mut().zip(row) {
                        *w = (*w).max(f.chars().count());
                    }
                }
                let line = |fields: Vec<&str>| -> String {
                    let cells: Vec<String> =
                        fields.iter().zip(&widths).map(|(f, w)| format!("{f:<w$}", w = *w)).collect();
                    cells.join("  ").trim_end().to_owned()
                };
                let _ = writeln!(out, "{}", line(header.clone()));
                for row in &rows {
                    let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parses_units() {
        assert_eq!(parse_since("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_since("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_since("90m"), Ok(Duration::from_secs(5400)));
        assert!(parse_since("7").is_err() && parse_since("d").is_err() && parse_since("7y").is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), Some(2.0));
        assert_eq!(percentile(&v, 95.0), Some(4.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
