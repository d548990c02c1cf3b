//! The Redis store: one Lua script per attempt checks and consumes rpm, tpm and rpd of a model
//! and its cooldown atomically, on the server's clock, so every replica shares one budget.
//!
//! Keys are hash-tagged per model (`llmgate:rl:{<model>}:rpm` and its sum `…:rpm:sum`, `…:tpm`,
//! `…:rpd`, `…:cool`, and `…:cool:<scope>` for a client scope's cooldown, the scope being a
//! digest, never a key), so one script's keys share a Redis Cluster slot. Scripts go out as
//! `EVALSHA` and are loaded on `NOSCRIPT` ([`redis::Script::invoke_async`]).
//!
//! **TPM corrections are batched per model**, without a timer: a correction adds its difference
//! to its model's pending sum; the first one to find no write under way writes every pending
//! sum (one script call per model, sent together) and keeps doing so until nothing is pending,
//! while the others return at once. The layer makes corrections on a task of their own, so none
//! of this is on a request's path; at low rates each correction is written at once, alone.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, LazyLock, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::future::join_all;
use llmgate_core::catalog::Limits;
use redis::{RedisResult, Script, aio::ConnectionLike};

use crate::{
    memory::MemoryRateStore,
    store::{
        BoxFuture, Cooldowns, DAY, Decision, LimitKind, RateStore, StoreHealth, WINDOW, day_and_rest, divide_limits,
    },
};

/// The rpm log, shared by [`CHECK_LUA`] and [`LEASE_LUA`]: KEYS[1] is a sorted set of grants
/// scored by when they were made (ms), each member `<requests>:<unique id>` (one request per
/// per-request check, a whole lease's requests in one entry), and KEYS[2] the sum of their
/// requests, so counting costs O(1) however large a lease is. Both keys expire together, one
/// window after the last grant; a sum that is missing (evicted, or a log written by a release
/// without it) is summed again from the entries. A sum whose log alone was evicted counts
/// requests that are gone until it expires: fewer admitted, never more.
macro_rules! rpm_log_lua {
    () => {
        r"
local function grant_size(member) return tonumber(string.match(member, '^(%d+):')) or 1 end
local rpm_total, rpm_dirty = nil, false
local function rpm_used(now, window)
  local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window)
  rpm_total = tonumber(redis.call('GET', KEYS[2]) or '')
  if rpm_total == nil then
    rpm_total = 0
    for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do rpm_total = rpm_total + grant_size(m) end
    rpm_dirty = rpm_total > 0
  end
  if #old > 0 then
    for _, m in ipairs(old) do rpm_total = rpm_total - grant_size(m) end
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
    rpm_dirty = true
  end
  if rpm_total < 0 then rpm_total = 0 end
  return rpm_total
end
local function rpm_retry(rpm, now, window)
  if rpm <= 0 then return window end
  local free, from = rpm_total - rpm + 1, 0
  while true do
    local e = redis.call('ZRANGE', KEYS[1], from, from + 15, 'WITHSCORES')
    if #e == 0 then return window end
    for i = 1, #e, 2 do
      free = free - grant_size(e[i])
      if free <= 0 then return tonumber(e[i + 1]) + window - now end
    end
    from = from + 16
  end
end
local function rpm_add(now, window, n, id)
  redis.call('ZADD', KEYS[1], now, string.format('%d:%s', n, id))
  redis.call('PEXPIRE', KEYS[1], window)
  rpm_total, rpm_dirty = rpm_total + n, true
end
local function rpm_save(window)
  if not rpm_dirty then return end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl == -2 then redis.call('DEL', KEYS[2]) return end
  if ttl < 1 then ttl = window end
  redis.call('SET', KEYS[2], tostring(rpm_total), 'PX', ttl)
end
"
    };
}

/// KEYS: rpm, rpm sum, tpm, rpd, cool[, a second cool]. ARGV: rpm, tpm, tokens, rpd (-1 =
/// unlimited), day boundary offset ms, unique member, window ms. Returns `{kind,
/// retry_after_ms}` as strings, kind `ok` when allowed. The cooldown keys are the model's shared
/// one and/or a client scope's (see [`Cooldowns`]); the later end counts.
const CHECK_LUA: &str = concat!(
    rpm_log_lua!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, tokens, rpd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local offset, window = tonumber(ARGV[5]), tonumber(ARGV[7])
local cool = tonumber(redis.call('GET', KEYS[5]) or '0') or 0
if KEYS[6] then
  local other = tonumber(redis.call('GET', KEYS[6]) or '0') or 0
  if other > cool then cool = other end
end
if cool > now then return {'cooldown', tostring(cool - now)} end
local why, wait = nil, 0
local function refuse(kind, w)
  if w < 1 then w = 1 end
  if why == nil or w > wait then why, wait = kind, w end
end
if rpm >= 0 and rpm_used(now, window) >= rpm then refuse('rpm', rpm_retry(rpm, now, window)) end
local level = 0
if tpm >= 0 then
  local b = redis.call('HMGET', KEYS[3], 'level', 'ts')
  level = tonumber(b[1]) or tpm
  local ts = tonumber(b[2]) or now
  if now > ts then level = level + (now - ts) * tpm / window end
  if level > tpm then level = tpm end
  local need = math.min(tokens, tpm)
  if level < need then
    if tpm == 0 then refuse('tpm', window) else refuse('tpm', math.ceil((need - level) * window / tpm)) end
  end
end
local day = math.floor((now - offset) / 86400000)
local to_next_day = (day + 1) * 86400000 + offset - now
local count = 0
if rpd >= 0 then
  local d = redis.call('HMGET', KEYS[4], 'day', 'count')
  if tonumber(d[1]) == day then count = tonumber(d[2]) or 0 end
  if count >= rpd then refuse('rpd', to_next_day) end
end
if why ~= nil then
  rpm_save(window)
  return {why, tostring(wait)}
end
if rpm >= 0 then
  rpm_add(now, window, 1, ARGV[6])
  rpm_save(window)
end
if tpm >= 0 then
  redis.call('HSET', KEYS[3], 'level', tostring(level - tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[3], window * 2)
end
if rpd >= 0 then
  redis.call('HSET', KEYS[4], 'day', tostring(day), 'count', tostring(count + 1))
  redis.call('PEXPIRE', KEYS[4], to_next_day + 60000)
end
return {'ok', '0'}
"
);

/// KEYS: tpm. ARGV: tpm, tokens to take (negative gives back), window ms.
const CORRECT_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tpm, delta, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'level', 'ts')
local level = tonumber(b[1]) or tpm
local ts = tonumber(b[2]) or now
if now > ts then level = level + (now - ts) * tpm / window end
if level > tpm then level = tpm end
level = level - delta
if level < -tpm then level = -tpm end
if level > tpm then level = tpm end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], window * 2)
return tostring(level)
";

/// A lease ([`crate::LeasedRateStore`]): hands back what an earlier lease did not use, then
/// takes up to `want` requests (rpm and rpd together) and between `tokens_need` and
/// `tokens_want` tpm tokens, all or nothing per budget as [`CHECK_LUA`] would for one request.
/// KEYS: rpm, rpm sum, tpm, rpd, cool. ARGV: rpm, tpm, rpd (-1 = unlimited), want,
/// tokens_want, tokens_need, day boundary offset ms, lease id, window ms, requests handed back
/// (rpd), tokens handed back (negative: spent beyond a lease, taken now), then pairs of an rpm
/// log entry and how many of its requests go back. Returns `{kind, retry_after_ms, granted,
/// tokens, valid_ms}` as strings: kind `ok` (granted may be 0 when `want` is), or the budget
/// that refused (`cooldown` included); `valid_ms` is the time to the next day boundary.
/// A grant is one rpm log entry whatever its size, so the call costs the same for 1 request
/// or 100,000 (one entry per request cost ~3 µs of Redis CPU per request: docs/performance.md).
const LEASE_LUA: &str = concat!(
    rpm_log_lua!(),
    r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm, rpd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want, twant, tneed = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local offset, id, window = tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
local back_rpd, back_tpm = tonumber(ARGV[10]), tonumber(ARGV[11])
local day = math.floor((now - offset) / 86400000)
local to_next_day = (day + 1) * 86400000 + offset - now
if rpm >= 0 then
  rpm_used(now, window)
  for i = 12, #ARGV - 1, 2 do
    local member, back = ARGV[i], tonumber(ARGV[i + 1]) or 0
    local score = redis.call('ZSCORE', KEYS[1], member)
    if score and back > 0 then
      local size = grant_size(member)
      back = math.min(back, size)
      redis.call('ZREM', KEYS[1], member)
      if size > back then
        redis.call('ZADD', KEYS[1], score, string.format('%d:%s', size - back, string.match(member, '^%d+:(.*)$')))
      end
      rpm_total, rpm_dirty = math.max(rpm_total - back, 0), true
    end
  end
end
local count = 0
if rpd >= 0 then
  local d = redis.call('HMGET', KEYS[4], 'day', 'count')
  if tonumber(d[1]) == day then count = tonumber(d[2]) or 0 end
  if back_rpd > 0 then
    count = math.max(count - back_rpd, 0)
    redis.call('HSET', KEYS[4], 'day', tostring(day), 'count', tostring(count))
    redis.call('PEXPIRE', KEYS[4], to_next_day + 60000)
  end
end
local level = 0
if tpm >= 0 then
  local b = redis.call('HMGET', KEYS[3], 'level', 'ts')
  level = tonumber(b[1]) or tpm
  local ts = tonumber(b[2]) or now
  if now > ts then level = level + (now - ts) * tpm / window end
  level = math.min(level + back_tpm, tpm)
  if back_tpm ~= 0 then
    redis.call('HSET', KEYS[3], 'level', tostring(level), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[3], window * 2)
  end
end
local cool = tonumber(redis.call('GET', KEYS[5]) or '0') or 0
local function answer(reply)
  rpm_save(window)
  return reply
end
if cool > now then return answer({'cooldown', tostring(cool - now), '0', '0', '0'}) end
if want <= 0 and twant <= 0 then return answer({'ok', '0', '0', '0', tostring(to_next_day)}) end
local grant, why, wait = want, nil, 0
local function refuse(kind, w)
  if w < 1 then w = 1 end
  if why == nil or w > wait then why, wait = kind, w end
end
if rpm >= 0 and want > 0 then
  if rpm_total + grant > rpm then grant = rpm - rpm_total end
  if grant <= 0 then refuse('rpm', rpm_retry(rpm, now, window)) end
end
if rpd >= 0 and want > 0 then
  if count + grant > rpd then grant = rpd - count end
  if grant <= 0 then refuse('rpd', to_next_day) end
end
local tokens = 0
if tpm >= 0 and twant > 0 then
  local need = math.min(tneed, tpm)
  if level < need then
    if tpm == 0 then refuse('tpm', window) else refuse('tpm', math.ceil((need - level) * window / tpm)) end
  else
    tokens = math.max(tneed, math.min(twant, math.floor(level)))
  end
end
if why ~= nil then return answer({why, tostring(wait), '0', '0', '0'}) end
if rpm >= 0 and grant > 0 then rpm_add(now, window, grant, id) end
if rpd >= 0 and grant > 0 then
  redis.call('HSET', KEYS[4], 'day', tostring(day), 'count', tostring(count + grant))
  redis.call('PEXPIRE', KEYS[4], to_next_day + 60000)
end
if tpm >= 0 and tokens > 0 then
  redis.call('HSET', KEYS[3], 'level', tostring(level - tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[3], window * 2)
end
return answer({'ok', '0', string.format('%d', grant), tostring(tokens), tostring(to_next_day)})
"
);

/// KEYS: cool. ARGV: duration ms. Extends, never shortens.
const COOL_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[1])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if now + ms > cur then redis.call('SET', KEYS[1], tostring(now + ms), 'PX', ms) end
return 1
";

static CHECK: LazyLock<Script> = LazyLock::new(|| Script::new(CHECK_LUA));
static CORRECT: LazyLock<Script> = LazyLock::new(|| Script::new(CORRECT_LUA));
static COOL: LazyLock<Script> = LazyLock::new(|| Script::new(COOL_LUA));
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(LEASE_LUA));

/// What a lease asks for and hands back (see [`LEASE_LUA`]).
pub(crate) struct LeaseAsk<'a> {
    pub(crate) id: &'a str,
    pub(crate) want: u64,
    pub(crate) tokens_want: u64,
    pub(crate) tokens_need: u64,
    pub(crate) back_requests: u64,
    pub(crate) back_tokens: i64,
    /// rpm log entries and how many of their requests go back.
    pub(crate) back_entries: &'a [(String, u64)],
}

/// What a lease call answered.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LeaseReply {
    /// Granted (`requests` may be 0 when none were asked); valid until the next day boundary
    /// at most (`valid`).
    Granted { requests: u64, tokens: u64, valid: Duration },
    /// Nothing taken.
    Refused { limited_by: LimitKind, retry_after: Duration },
}

/// A script's `{kind, retry_after_ms}` as a refusal.
fn refusal(kind: &str, wait_ms: &str) -> (LimitKind, Duration) {
    let wait_ms = wait_ms.parse::<f64>().unwrap_or(0.0).max(0.0);
    let retry_after = Duration::from_secs_f64(wait_ms / 1000.0).max(Duration::from_millis(1));
    let limited_by = match kind {
        "rpm" => LimitKind::Rpm,
        "tpm" => LimitKind::Tpm,
        "rpd" => LimitKind::Rpd,
        _ => LimitKind::Cooldown,
    };
    (limited_by, retry_after)
}

/// A limit as a script argument (-1: unlimited).
fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX))
}

/// What a [`RedisRateStore`] does while Redis is unreachable (in a config: `fail_open`,
/// `fail_closed`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutagePolicy {
    /// Keep serving on per-process budgets: the limits divided by the replica count.
    #[default]
    FailOpen,
    /// Treat every model as limited.
    FailClosed,
}

/// A [`RateStore`] in Redis (or Redis Cluster), shared by every replica.
///
/// `C` is any async connection that is cheap to clone: `redis::aio::ConnectionManager`
/// (reconnects; give it a response timeout) or `redis::cluster_async::ClusterConnection`.
pub struct RedisRateStore<C> {
    conn: C,
    prefix: Arc<str>,
    policy: OutagePolicy,
    replicas: u32,
    day_boundary: Duration,
    window: Duration,
    timeout: Duration,
    local: MemoryRateStore,
    member_prefix: String,
    seq: AtomicU64,
    errors: AtomicU64,
    outages: AtomicU64,
    in_outage: AtomicBool,
    corrections: Corrections,
}

// === Corrections ===

/// TPM corrections not written yet: the sum of their differences per model.
#[derive(Default)]
struct Corrections {
    pending: Mutex<HashMap<String, Correction>>,
    /// Whether a caller is writing them.
    writing: AtomicBool,
}

/// The pending tokens to take from one model's bucket (negative: to give back).
#[derive(Clone, Copy)]
struct Correction {
    limits: Limits,
    delta: i64,
}

impl Corrections {
    fn add(&self, model: &str, limits: Limits, delta: i64) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        match pending.get_mut(model) {
            Some(correction) => {
                correction.delta = correction.delta.saturating_add(delta);
                correction.limits = limits;
            }
            None => {
                pending.insert(model.to_owned(), Correction { limits, delta });
            }
        }
    }

    fn take(&self) -> HashMap<String, Correction> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn is_empty(&self) -> bool {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
    }

    /// Becomes the writer unless one is at work (it will take what was added).
    fn start_writing(&self) -> Option<WritingGuard<'_>> {
        (!self.writing.swap(true, Ordering::AcqRel)).then(|| WritingGuard(&self.writing))
    }
}

/// The writer's turn; ends on drop (also when its future is dropped mid-write).
struct WritingGuard<'a>(&'a AtomicBool);

impl Drop for WritingGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

// === impl RedisRateStore ===

impl<C> RedisRateStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// A store on `conn`: policy `fail_open` with 1 replica, days at 00:00 UTC, keys under
    /// `llmgate:rl`, 1 s per Redis call.
    pub fn new(conn: C) -> Self {
        Self {
            conn,
            prefix: "llmgate:rl".into(),
            policy: OutagePolicy::FailOpen,
            replicas: 1,
            day_boundary: Duration::ZERO,
            window: WINDOW,
            timeout: Duration::from_secs(1),
            local: MemoryRateStore::new(),
            member_prefix: uuid::Uuid::new_v4().simple().to_string(),
            seq: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            outages: AtomicU64::new(0),
            in_outage: AtomicBool::new(false),
            corrections: Corrections::default(),
        }
    }

    /// The outage policy.
    pub fn policy(mut self, policy: OutagePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many replicas share the budget (the divisor of `fail_open` limits).
    pub fn replicas(mut self, replicas: u32) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// Days (for rpd) start `offset` after 00:00 UTC.
    pub fn day_boundary(mut self, offset: Duration) -> Self {
        self.day_boundary = offset;
        self.local = MemoryRateStore::new().day_boundary(offset).window(self.window);
        self
    }

    /// The rpm/tpm window (default 60 s; shorter only for tests).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window.max(Duration::from_millis(1));
        self.local = MemoryRateStore::new().day_boundary(self.day_boundary).window(self.window);
        self
    }

    /// The longest a Redis call may take before it counts as failed (default 1 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The key prefix (default `llmgate:rl`).
    pub fn key_prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The key of one budget of `model`, hash-tagged by model.
    pub fn key(&self, model: &str, what: &str) -> String {
        format!("{}:{{{model}}}:{what}", self.prefix)
    }

    /// The key of the cooldown of `model` for one client `scope` (a digest).
    pub fn scope_key(&self, model: &str, scope: &str) -> String {
        format!("{}:{{{model}}}:cool:{scope}", self.prefix)
    }

    async fn run<T>(&self, call: impl Future<Output = RedisResult<T>>) -> Option<T> {
        let outcome = match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        };
        match outcome {
            Ok(value) => {
                if self.in_outage.load(Ordering::Relaxed) && self.in_outage.swap(false, Ordering::AcqRel) {
                    tracing::warn!("rate-limit store: Redis reachable again; shared budgets restored");
                }
                Some(value)
            }
            Err(error) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                if !self.in_outage.swap(true, Ordering::AcqRel) {
                    self.outages.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        %error,
                        policy = ?self.policy,
                        replicas = self.replicas,
                        "rate-limit store: Redis unreachable; applying the outage policy until it recovers"
                    );
                }
                None
            }
        }
    }

    async fn check_redis(
        &self,
        model: &str,
        cooldowns: Cooldowns<'_>,
        limits: &Limits,
        tokens: u64,
    ) -> Option<Decision> {
        let as_arg = limit_arg;
        let member = format!("{}-{}", self.member_prefix, self.seq.fetch_add(1, Ordering::Relaxed));
        let mut conn = self.conn.clone();
        let mut invocation = CHECK.prepare_invoke();
        invocation
            .key(self.key(model, "rpm"))
            .key(self.key(model, "rpm:sum"))
            .key(self.key(model, "tpm"))
            .key(self.key(model, "rpd"));
        match cooldowns {
            Cooldowns::Shared => invocation.key(self.key(model, "cool")),
            Cooldowns::SharedAndScope(scope) => {
                invocation.key(self.key(model, "cool")).key(self.scope_key(model, scope))
            }
            Cooldowns::Scope(scope) => invocation.key(self.scope_key(model, scope)),
        };
        invocation
            .arg(as_arg(limits.rpm))
            .arg(as_arg(limits.tpm))
            .arg(tokens)
            .arg(as_arg(limits.rpd))
            .arg(self.day_boundary.as_millis() as u64 % DAY.as_millis() as u64)
            .arg(member)
            .arg(self.window.as_millis() as u64);
        let reply: (String, String) = self.run(invocation.invoke_async(&mut conn)).await?;
        if reply.0 == "ok" {
            return Some(Decision::Allowed);
        }
        let (limited_by, retry_after) = refusal(&reply.0, &reply.1);
        Some(Decision::Limited { limited_by, retry_after })
    }

    /// One lease call for `model` (`None`: Redis unreachable).
    pub(crate) async fn lease(&self, model: &str, limits: &Limits, ask: &LeaseAsk<'_>) -> Option<LeaseReply> {
        let mut conn = self.conn.clone();
        let mut invocation = LEASE.prepare_invoke();
        invocation
            .key(self.key(model, "rpm"))
            .key(self.key(model, "rpm:sum"))
            .key(self.key(model, "tpm"))
            .key(self.key(model, "rpd"))
            .key(self.key(model, "cool"))
            .arg(limit_arg(limits.rpm))
            .arg(limit_arg(limits.tpm))
            .arg(limit_arg(limits.rpd))
            .arg(ask.want)
            .arg(ask.tokens_want)
            .arg(ask.tokens_need)
            .arg(self.day_boundary.as_millis() as u64 % DAY.as_millis() as u64)
            .arg(ask.id)
            .arg(self.window.as_millis() as u64)
            .arg(ask.back_requests)
            .arg(ask.back_tokens);
        for (entry, requests) in ask.back_entries {
            invocation.arg(entry).arg(requests);
        }
        let reply: (String, String, String, String, String) = self.run(invocation.invoke_async(&mut conn)).await?;
        if reply.0 != "ok" {
            let (limited_by, retry_after) = refusal(&reply.0, &reply.1);
            return Some(LeaseReply::Refused { limited_by, retry_after });
        }
        let number = |text: &str| text.parse::<f64>().map_or(0, |n| n.max(0.0) as u64);
        Some(LeaseReply::Granted {
            requests: number(&reply.2),
            tokens: number(&reply.3),
            valid: Duration::from_millis(number(&reply.4)),
        })
    }

    /// The decision during an outage: the policy's.
    pub(crate) fn outage_decision(
        &self,
        model: &str,
        cooldowns: Cooldowns<'_>,
        limits: &Limits,
        tokens: u64,
    ) -> Decision {
        match self.policy {
            OutagePolicy::FailOpen => {
                self.local.check_now_with(model, cooldowns, &divide_limits(limits, self.replicas), tokens)
            }
            OutagePolicy::FailClosed => {
                Decision::Limited { limited_by: LimitKind::Unavailable, retry_after: Duration::from_secs(1) }
            }
        }
    }

    /// The rpm/tpm window.
    pub(crate) fn window_len(&self) -> Duration {
        self.window
    }

    /// Writes pending corrections until none is left, unless another caller is at it.
    async fn write_corrections(&self) {
        let Some(mut turn) = self.corrections.start_writing() else { return };
        loop {
            let batch = self.corrections.take();
            if batch.is_empty() {
                drop(turn);
                // A correction added between `take` and the end of the turn found a writer at
                // work and left it to us.
                match self.corrections.start_writing() {
                    Some(again) if !self.corrections.is_empty() => turn = again,
                    _ => return,
                }
                continue;
            }
            join_all(batch.iter().map(|(model, correction)| self.write_correction(model, *correction))).await;
        }
    }

    /// One model's summed correction: one script call, or the local budgets during an outage.
    async fn write_correction(&self, model: &str, correction: Correction) {
        let Some(tpm) = correction.limits.tpm else { return };
        let mut conn = self.conn.clone();
        let mut invocation = CORRECT.prepare_invoke();
        invocation.key(self.key(model, "tpm")).arg(tpm).arg(correction.delta).arg(self.window.as_millis() as u64);
        let done: Option<String> = self.run(invocation.invoke_async(&mut conn)).await;
        if done.is_none() {
            let taken = correction.delta.unsigned_abs();
            let (estimated, actual) = if correction.delta >= 0 { (0, taken) } else { (taken, 0) };
            self.local.correct_now(model, &divide_limits(&correction.limits, self.replicas), estimated, actual);
        }
    }

    /// Redis health: errors and outages so far.
    pub fn health_now(&self) -> StoreHealth {
        StoreHealth {
            errors: self.errors.load(Ordering::Relaxed),
            outages: self.outages.load(Ordering::Relaxed),
            in_outage: self.in_outage.load(Ordering::Relaxed),
        }
    }
}

impl<C> fmt::Debug for RedisRateStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateStore")
            .field("prefix", &self.prefix)
            .field("policy", &self.policy)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

impl<C> RateStore for RedisRateStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn check_with<'a>(
        &'a self,
        model: &'a str,
        cooldowns: Cooldowns<'a>,
        limits: &'a Limits,
        tokens: u64,
    ) -> BoxFuture<'a, Decision> {
        Box::pin(async move {
            match self.check_redis(model, cooldowns, limits, tokens).await {
                Some(decision) => decision,
                None => self.outage_decision(model, cooldowns, limits, tokens),
            }
        })
    }

    fn correct_tokens<'a>(
        &'a self,
        model: &'a str,
        limits: &'a Limits,
        estimated: u64,
        actual: u64,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if limits.tpm.is_none() || estimated == actual {
                return;
            }
            let delta =
                i64::try_from(actual).unwrap_or(i64::MAX).saturating_sub(i64::try_from(estimated).unwrap_or(i64::MAX));
            self.corrections.add(model, *limits, delta);
            self.write_corrections().await;
        })
    }

    fn cool_down<'a>(&'a self, model: &'a str, duration: Duration) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // The local store keeps the cooldown too, for a `fail_open` outage.
            self.local.cool_down_now(model, duration);
            let ms = (duration.as_millis() as u64).max(1);
            let mut conn = self.conn.clone();
            let mut invocation = COOL.prepare_invoke();
            invocation.key(self.key(model, "cool")).arg(ms);
            let _: Option<i64> = self.run(invocation.invoke_async(&mut conn)).await;
        })
    }

    fn cool_down_scope<'a>(&'a self, model: &'a str, scope: &'a str, duration: Duration) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.local.cool_down_scope_now(model, scope, duration);
            let ms = (duration.as_millis() as u64).max(1);
            let mut conn = self.conn.clone();
            let mut invocation = COOL.prepare_invoke();
            invocation.key(self.scope_key(model, scope)).arg(ms);
            let _: Option<i64> = self.run(invocation.invoke_async(&mut conn)).await;
        })
    }

    fn until_daily_reset(&self) -> Duration {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        day_and_rest(unix, self.day_boundary).1
    }

    fn health(&self) -> StoreHealth {
        self.health_now()
    }
}
