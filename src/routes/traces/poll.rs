//! Polling Langfuse until it has what a request asks for: passes with exponential backoff and
//! jitter between them, bounded parallel reads within a pass, an overall deadline.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    time::Duration,
};

use http::StatusCode;
use llmgate_langfuse::{ReadError, Trace, reader::drop_shadowed_traces};
use tokio::{task::JoinSet, time::Instant};

use super::{TracesService, params::Job, random_unit};

/// How the passes are paced.
#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    pub deadline: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub parallelism: usize,
    pub require_generation: bool,
}

impl Settings {
    /// `base · 2^(pass-1)`, capped (before jitter).
    fn full_backoff(&self, pass: u32) -> Duration {
        self.backoff_base.saturating_mul(1u32 << pass.saturating_sub(1).min(20)).min(self.backoff_cap)
    }
}

/// What a request comes to.
pub(super) enum Answer {
    /// 200 with these traces.
    Traces(Vec<Trace>),
    /// A `{"detail"}` answer of the request's own (400, 404, 503).
    Refused(StatusCode, String),
    /// The reads stopped without an answer.
    Failed(Failure),
}

/// Why the reads stopped without an answer.
pub(super) enum Failure {
    /// Langfuse answered an error (or could not be reached).
    Langfuse(ReadError),
    /// The deadline passed during a read.
    Deadline,
}

/// A retry may change these answers; not 400/401/403/404 (wrong keys, wrong API version).
fn retryable(e: &ReadError) -> bool {
    match e.status {
        None => true,
        Some(s) => s == 408 || s == 429 || s >= 500,
    }
}

/// One pass of a request's reads; `Ok(Some)` once it found what it looks for.
trait Pass: Send {
    type Found;

    fn run(&mut self) -> impl Future<Output = Result<Option<Self::Found>, ReadError>> + Send;
}

impl TracesService {
    /// Runs `pass` up to `max_retries` times, waiting before each but the first, until it finds
    /// what it looks for (`Ok(Some)`). A read error that a retry cannot change, or the deadline,
    /// ends it at once. `Ok(None)`: nothing found, and the last pass did not fail.
    async fn poll<P: Pass>(&self, job: &Job, pass: &mut P) -> Result<Option<P::Found>, Failure> {
        let mut last = None;
        for n in 0..job.max_retries {
            if n > 0 && !self.wait_before(n, job.deadline).await {
                break;
            }
            match tokio::time::timeout_at(job.deadline, pass.run()).await {
                Err(_) => return Err(Failure::Deadline),
                Ok(Ok(Some(found))) => return Ok(Some(found)),
                Ok(Ok(None)) => last = None,
                Ok(Err(e)) if retryable(&e) => last = Some(e),
                Ok(Err(e)) => return Err(Failure::Langfuse(e)),
            }
        }
        last.map_or(Ok(None), |e| Err(Failure::Langfuse(e)))
    }

    /// The wait before pass `pass` (1, 2, …): `base · 2^(pass-1)`, capped, with equal jitter.
    fn wait_for_pass(&self, pass: u32) -> Duration {
        let half = self.settings.full_backoff(pass) / 2;
        half + half.mul_f64(random_unit())
    }

    /// Waits before pass `pass`; `false` when that wait would end past the deadline.
    async fn wait_before(&self, pass: u32, deadline: Instant) -> bool {
        let wait = self.wait_for_pass(pass);
        if Instant::now() + wait >= deadline {
            return false;
        }
        tokio::time::sleep(wait).await;
        true
    }

    fn counts(&self, trace: &Trace) -> bool {
        trace.insertion_id().is_some() && (!self.settings.require_generation || trace.has_generation())
    }

    /// `/traces` without a `rollout_id:` tag: the filtered listing, no completeness check.
    pub(super) async fn listing(&self, job: &Job) -> Answer {
        if job.max_retries == 0 {
            return Answer::Refused(
                StatusCode::BAD_REQUEST,
                "max_retries=0 runs no pass: give max_retries >= 1 (or a rollout_id: tag)".into(),
            );
        }
        match self.poll(job, &mut ListingPass { service: self, job }).await {
            Ok(Some(traces)) => Answer::Traces(drop_shadowed_traces(traces)),
            Ok(None) => Answer::Failed(Failure::Deadline),
            Err(failure) => Answer::Failed(failure),
        }
    }

    /// `/traces` with a `rollout_id:` tag: every expected insertion id, or 404.
    pub(super) async fn rollout(&self, job: &Job, rollout: &str) -> Answer {
        let members = match self.store.members(rollout).await {
            Ok(m) => m,
            Err(e) => return store_unavailable(e),
        };
        // Normalised key (lower-case hex, no dashes) → the id as recorded.
        let expected: HashMap<String, String> = members.into_iter().map(|id| (key(&id), id)).collect();
        if expected.is_empty() {
            return Answer::Refused(
                StatusCode::NOT_FOUND,
                format!("No expected insertion_ids found in Redis for rollout '{rollout}'. Returning empty traces."),
            );
        }
        let mut pass = RolloutPass {
            service: self,
            job,
            rollout,
            expected: &expected,
            state: Collected::default(),
            listed: false,
        };
        let outcome = self.poll(job, &mut pass).await;
        let state = pass.state;
        let found = || expected.keys().filter(|k| state.found.contains(*k)).count();
        match outcome {
            Ok(Some(RolloutEnd::Complete)) => Answer::Traces(drop_shadowed_traces(state.traces)),
            Ok(Some(RolloutEnd::Lost(lost))) => Answer::Refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "Incomplete traces for rollout_id '{rollout}': Found {}/{} completions, and the rest can never \
                     arrive: the gateway lost {lost} of this rollout's Langfuse spans (export queue full, or an \
                     export Langfuse refused or that failed after its retries; see the gateway's log and \
                     llmgate_langfuse_spans_total).",
                    found(),
                    expected.len()
                ),
            ),
            Err(failure) => Answer::Failed(failure),
            Ok(None) => Answer::Refused(
                StatusCode::NOT_FOUND,
                format!(
                    "Incomplete traces for rollout_id '{rollout}': Found {}/{} completions.",
                    found(),
                    expected.len()
                ),
            ),
        }
    }

    /// `/traces/pointwise`: the newest insertion id of the rollout, and only its trace.
    pub(super) async fn pointwise(&self, job: &Job) -> Answer {
        let Some(rollout) = job.rollout.as_deref() else {
            return Answer::Refused(
                StatusCode::BAD_REQUEST,
                "Pointwise needs a 'rollout_id:<id>' tag, e.g. ?tags=rollout_id:abc".into(),
            );
        };
        let members = match self.store.members(rollout).await {
            Ok(m) => m,
            Err(e) => return store_unavailable(e),
        };
        // UUIDv7s sort by time: the greatest is the newest.
        let Some(latest) = members.into_iter().max_by_key(|id| (uuid::Uuid::parse_str(id).ok(), id.to_lowercase()))
        else {
            return Answer::Refused(
                StatusCode::NOT_FOUND,
                format!("No insertion_ids found in Redis for rollout '{rollout}'. Cannot determine latest trace."),
            );
        };
        match self.poll(job, &mut PointwisePass { service: self, job, insertion_id: &latest }).await {
            Ok(Some(trace)) => Answer::Traces(vec![trace]),
            Err(failure) => Answer::Failed(failure),
            Ok(None) => Answer::Refused(
                StatusCode::NOT_FOUND,
                format!("Failed to fetch latest trace for rollout '{rollout}' after {} retries", job.max_retries),
            ),
        }
    }

    /// One listing with the request's tags and filters, capped by `limit`; on v3 each listed
    /// trace is then read in full (a pause of `sleep_between_gets` before each read). Traces
    /// read so far are in `out` even when it fails.
    async fn list_pass(&self, job: &Job, out: &mut Vec<Trace>, listed_ok: &mut bool) -> Result<(), ReadError> {
        let listed = self.reader.list_traces(&job.keys, &job.query).await?;
        *listed_ok = true;
        if self.reader.lists_full_traces() {
            out.extend(listed);
            return Ok(());
        }
        let ids: Vec<String> = listed.into_iter().map(|t| t.id).collect();
        let mut order: HashMap<String, usize> = HashMap::new();
        for (i, id) in ids.iter().enumerate() {
            order.entry(id.clone()).or_insert(i);
        }
        let reader = self.reader.clone();
        let keys = job.keys.clone();
        let mut details: Vec<(usize, Trace)> = Vec::new();
        let result = self
            .bounded(
                job,
                ids,
                |id| {
                    let reader = reader.clone();
                    let keys = keys.clone();
                    async move { reader.get_trace(&keys, &id).await }
                },
                |trace: Trace| {
                    let at = order.get(&trace.id).copied().unwrap_or(usize::MAX);
                    details.push((at, trace));
                },
            )
            .await;
        details.sort_by_key(|(at, _)| *at);
        out.extend(details.into_iter().map(|(_, t)| t));
        result
    }

    /// Re-reads each missing id on its own.
    async fn requery_pass(&self, job: &Job, missing: Vec<String>, state: &mut Collected) -> Result<(), ReadError> {
        let reader = self.reader.clone();
        let keys = job.keys.clone();
        let query = job.query.clone();
        let mut found = Vec::new();
        let result = self
            .bounded(
                job,
                missing,
                |id| {
                    let (reader, keys, query) = (reader.clone(), keys.clone(), query.clone());
                    async move { reader.find_insertion(&keys, &id, &query).await }
                },
                |trace: Trace| found.push(trace),
            )
            .await;
        for t in found {
            state.add(t, self);
        }
        result
    }

    /// Runs `read` for each id, `parallelism` at a time (one at a time, each after a pause,
    /// when `sleep_between_gets` is set), handing each trace to `each`. The first error that
    /// is not retryable wins; else the last retryable one; the reads all run either way.
    async fn bounded<F, Fut>(
        &self,
        job: &Job,
        ids: Vec<String>,
        read: F,
        mut each: impl FnMut(Trace),
    ) -> Result<(), ReadError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<Option<Trace>, ReadError>> + Send + 'static,
    {
        let mut error: Option<ReadError> = None;
        let mut keep = |r: Result<Option<Trace>, ReadError>, error: &mut Option<ReadError>| match r {
            Ok(Some(t)) => each(t),
            Ok(None) => {}
            Err(e) => {
                if error.as_ref().is_none_or(retryable) {
                    *error = Some(e);
                }
            }
        };
        if !job.sleep_between_gets.is_zero() {
            for id in ids {
                tokio::time::sleep(job.sleep_between_gets).await;
                keep(read(id).await, &mut error);
            }
        } else {
            let mut set = JoinSet::new();
            let mut ids = ids.into_iter();
            loop {
                while set.len() < self.settings.parallelism {
                    let Some(id) = ids.next() else { break };
                    set.spawn(read(id));
                }
                let Some(joined) = set.join_next().await else { break };
                let r = joined
                    .unwrap_or_else(|e| Err(ReadError { status: None, message: format!("read task failed: {e}") }));
                keep(r, &mut error);
            }
        }
        error.map_or(Ok(()), Err)
    }
}

// === passes ===

/// `/traces` without a rollout: one listing.
struct ListingPass<'a> {
    service: &'a TracesService,
    job: &'a Job,
}

impl Pass for ListingPass<'_> {
    type Found = Vec<Trace>;

    async fn run(&mut self) -> Result<Option<Vec<Trace>>, ReadError> {
        let mut traces = Vec::new();
        self.service.list_pass(self.job, &mut traces, &mut false).await?;
        Ok(Some(traces))
    }
}

/// `/traces` with a rollout: the listing until it succeeds, then each missing id on its own,
/// until every expected id is found.
struct RolloutPass<'a> {
    service: &'a TracesService,
    job: &'a Job,
    rollout: &'a str,
    /// Normalised key (lower-case hex, no dashes) → the id as recorded.
    expected: &'a HashMap<String, String>,
    state: Collected,
    listed: bool,
}

/// How the passes of a rollout end early.
enum RolloutEnd {
    /// Every expected id was found.
    Complete,
    /// Some are missing and the gateway lost this many of the rollout's spans: no later pass
    /// can find them.
    Lost(u64),
}

impl Pass for RolloutPass<'_> {
    type Found = RolloutEnd;

    async fn run(&mut self) -> Result<Option<RolloutEnd>, ReadError> {
        let (service, job) = (self.service, self.job);
        let result = if self.listed {
            let missing: Vec<String> = self
                .expected
                .iter()
                .filter(|(k, _)| !self.state.found.contains(*k))
                .map(|(_, id)| id.clone())
                .collect();
            service.requery_pass(job, missing, &mut self.state).await
        } else {
            let mut traces = Vec::new();
            let result = service.list_pass(job, &mut traces, &mut self.listed).await;
            // What was read counts even when a detail read failed; the listing is not
            // repeated once it succeeded (missing ids are then read on their own).
            for t in traces {
                self.state.add(t, service);
            }
            result
        };
        match result {
            Err(e) if !retryable(&e) => Err(e),
            _ if self.expected.keys().all(|k| self.state.found.contains(k)) => Ok(Some(RolloutEnd::Complete)),
            result => {
                let lost = service.losses.as_ref().map_or(0, |losses| losses.lost(self.rollout));
                result.map(|()| (lost > 0).then_some(RolloutEnd::Lost(lost)))
            }
        }
    }
}

/// `/traces/pointwise`: one insertion's trace, once it counts as a completion.
struct PointwisePass<'a> {
    service: &'a TracesService,
    job: &'a Job,
    insertion_id: &'a str,
}

impl Pass for PointwisePass<'_> {
    type Found = Trace;

    async fn run(&mut self) -> Result<Option<Trace>, ReadError> {
        let (service, job) = (self.service, self.job);
        let trace = service.reader.find_insertion(&job.keys, self.insertion_id, &job.query).await?;
        Ok(trace.filter(|t| service.counts(t)))
    }
}

fn store_unavailable(e: impl std::fmt::Display) -> Answer {
    Answer::Refused(StatusCode::SERVICE_UNAVAILABLE, format!("Insertion-id store unavailable: {e}"))
}

/// Traces read back so far, and the insertion ids they complete.
#[derive(Default)]
struct Collected {
    traces: Vec<Trace>,
    found: HashSet<String>,
}

impl Collected {
    /// Adds (or replaces, by trace id) a trace, counting its insertion id when it is complete.
    fn add(&mut self, trace: Trace, service: &TracesService) {
        if service.counts(&trace)
            && let Some(id) = trace.insertion_id()
        {
            self.found.insert(key(id));
        }
        match self.traces.iter_mut().find(|t| t.id == trace.id) {
            Some(slot) => *slot = trace,
            None => self.traces.push(trace),
        }
    }
}

/// An insertion id as a set key: lower-case, no dashes.
fn key(id: &str) -> String {
    id.chars().filter(|c| *c != '-').flat_map(char::to_lowercase).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::traces::DEFAULT_DEADLINE;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let s = Settings {
            deadline: DEFAULT_DEADLINE,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(10),
            parallelism: 1,
            require_generation: true,
        };
        let full = |pass: u32| s.full_backoff(pass);
        assert_eq!(full(1), Duration::from_secs(1));
        assert_eq!(full(3), Duration::from_secs(4));
        assert_eq!(full(40), Duration::from_secs(10));
        for _ in 0..100 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
