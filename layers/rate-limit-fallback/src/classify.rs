//! Reading an upstream 429: how long to wait, and whether it is a quota exhaustion.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// What kind of 429 the upstream sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream429 {
    /// A per-minute style limit: wait for `Retry-After` (or the provider's reset headers).
    Transient,
    /// A daily/monthly quota is used up: cool down until the reset.
    Quota,
}

/// THE table: rules tried in order on the lower-cased error body; the first rule whose every
/// needle occurs decides. Rules that say "transient" stop a later, looser quota rule (Gemini's
/// per-minute `RESOURCE_EXHAUSTED` also says "exceeded your current quota").
const RULES: &[(&[&str], Upstream429)] = &[
    // OpenAI: billing quota, hard limit.
    (&["insufficient_quota"], Upstream429::Quota),
    (&["billing_hard_limit_reached"], Upstream429::Quota),
    // Google (Gemini / Vertex): RESOURCE_EXHAUSTED names the quota it ran out of.
    (&["resource_exhausted", "perday"], Upstream429::Quota),
    (&["resource_exhausted", "per day"], Upstream429::Quota),
    (&["resource_exhausted", "daily"], Upstream429::Quota),
    (&["resource_exhausted", "permonth"], Upstream429::Quota),
    (&["resource_exhausted"], Upstream429::Transient),
    // Generic wordings.
    (&["exceeded your current quota"], Upstream429::Quota),
    (&["quota exceeded", "daily"], Upstream429::Quota),
    (&["quota exceeded", "per day"], Upstream429::Quota),
    (&["quota exceeded", "monthly"], Upstream429::Quota),
    (&["quota exceeded", "per month"], Upstream429::Quota),
    (&["daily limit"], Upstream429::Quota),
    (&["daily quota"], Upstream429::Quota),
    (&["monthly limit"], Upstream429::Quota),
    (&["monthly quota"], Upstream429::Quota),
];

/// Classifies a 429 by its (capped) error body.
pub fn classify_429(body: &[u8]) -> Upstream429 {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    RULES
        .iter()
        .find(|(needles, _)| needles.iter().all(|n| text.contains(n)))
        .map_or(Upstream429::Transient, |(_, class)| *class)
}

/// The wait a 429 asks for: `retry-after-ms`, `Retry-After` (seconds or an HTTP date), else the
/// provider's `x-ratelimit-reset-requests` / `-tokens` (`1s`, `6m0s`, `20ms`), preferring the
/// one whose `x-ratelimit-remaining-*` is 0, else the longer one.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(wait) = llmgate_core::forward::retry_after(headers, now) {
        return Some(wait.min(Duration::from_secs_f64(DAY_SECS)));
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let requests = header("x-ratelimit-reset-requests").and_then(parse_go_duration);
    let tokens = header("x-ratelimit-reset-tokens").and_then(parse_go_duration);
    let exhausted = |name: &str| header(name) == Some("0");
    match (requests, tokens) {
        (Some(r), _) if exhausted("x-ratelimit-remaining-requests") && !exhausted("x-ratelimit-remaining-tokens") => {
            Some(r)
        }
        (_, Some(t)) if exhausted("x-ratelimit-remaining-tokens") && !exhausted("x-ratelimit-remaining-requests") => {
            Some(t)
        }
        (r, t) => r.into_iter().chain(t).max(),
    }
}

const DAY_SECS: f64 = 86_400.0;

/// Parses a Go-style duration as OpenAI sends it: `1s`, `6m0s`, `20ms`, `1h2m3.5s`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let factor = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * factor;
    }
    (total.is_finite() && total <= DAY_SECS * 31.0).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_go_duration("1h2m3.5s"), Some(Duration::from_millis(3_723_500)));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("abc"), None);
        assert_eq!(parse_go_duration("5x"), None);
        assert_eq!(parse_go_duration("s"), None);
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        headers.insert("retry-after", date.parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(30)));

        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-reset-requests", "1s".parse().unwrap());
        headers.insert("x-ratelimit-reset-tokens", "6m0s".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(360)));
        headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        headers.insert("x-ratelimit-remaining-tokens", "100".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn quota_table() {
        let openai = br#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert_eq!(classify_429(openai), Upstream429::Quota);
        let gemini_day = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"You exceeded your current quota","details":[{"violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]}}"#;
        assert_eq!(classify_429(gemini_day), Upstream429::Quota);
        let gemini_minute = br#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"You exceeded your current quota","details":[{"violations":[{"quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}]}]}}"#;
        assert_eq!(classify_429(gemini_minute), Upstream429::Transient);
        let rpm = br#"{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded"}}"#;
        assert_eq!(classify_429(rpm), Upstream429::Transient);
        assert_eq!(classify_429(b"\xff\xfe not json"), Upstream429::Transient);
        assert_eq!(classify_429(b"Daily quota exceeded for this key"), Upstream429::Quota);
    }
}
