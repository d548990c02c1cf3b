//! Forwarding helpers every upstream engine shares: joining a base URL and a request path, the
//! header hygiene of a proxy hop (hop-by-hop headers dropped in both directions, framing
//! headers recomputed by the engine rather than forwarded stale; the query string is kept), and
//! the idle timeout of a streamed response body ([`IdleTimeout`]); and the one reader of a
//! response's `Retry-After` ([`retry_after`]) that every layer asking an upstream or Langfuse
//! for a wait uses.

use std::{
    future::Future as _,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::{BoxError, GatewayError};

/// Joins a base URL and a request path (with its query) without doubling a shared prefix:
/// `http://h/v1` + `/v1/models` → `http://h/v1/models`; `http://h/v1` + `/chat/completions` →
/// `http://h/v1/chat/completions`; `http://h` + `/v1/models` → `http://h/v1/models`.
pub fn join_url(base: &str, path_and_query: &str) -> String {
    let base = base.trim_end_matches('/');
    let base_path = base
        .find("://")
        .and_then(|scheme_end| base[scheme_end + 3..].find('/').map(|i| &base[scheme_end + 3 + i..]))
        .unwrap_or("");
    let path = path_and_query.split(['?', '#']).next().unwrap_or("");
    let shares_prefix = !base_path.is_empty()
        && path.starts_with(base_path)
        && matches!(path.as_bytes().get(base_path.len()), None | Some(b'/'));
    let origin = &base[..base.len() - base_path.len()];
    if shares_prefix { format!("{origin}{path_and_query}") } else { format!("{base}{path_and_query}") }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the framing
/// headers the engine recomputes.
const HOP_BY_HOP: [header::HeaderName; 8] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
];

/// Drops hop-by-hop headers, those named in `Connection`, and `content-length` (the engine
/// derives it from the body's exact size when there is one).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| name.trim().parse().ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The wait a response asks for: `retry-after-ms` (milliseconds, as OpenAI and Azure send), else
/// `Retry-After` in seconds or as an HTTP date (relative to `now`; a date in the past is no
/// wait). `None` when neither is there or readable; callers bound the result.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && let Ok(wait) = Duration::try_from_secs_f64(ms / 1000.0)
    {
        return Some(wait);
    }
    let value = header(header::RETRY_AFTER.as_str())?;
    match value.parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs).ok(),
        Err(_) => httpdate::parse_http_date(value).ok().map(|at| at.duration_since(now).unwrap_or(Duration::ZERO)),
    }
}

pin_project! {
    /// A response body that fails when the upstream sends nothing for `idle`, so a stalled
    /// stream ends with an error instead of hanging the client.
    ///
    /// Hand-made rather than tower-http's `TimeoutBody`, which does the same but does not pass
    /// `size_hint` and `is_end_stream` on: a body of known length would lose its
    /// `content-length` (and the insertion-id layer its end-by-length watch).
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        idle: Duration,
        timer: Pin<Box<Sleep>>,
    }
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Duration) -> Self {
        Self { inner, idle, timer: Box::pin(tokio::time::sleep(idle)) }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer.as_mut().reset(Instant::now() + *this.idle);
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(GatewayError::UpstreamTimeout(Some(*this.idle)).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Every frame split, early end and error: the size hint stays the inner body's, and
        /// consistent.
        #[test]
        fn idle_timeout_size_hint_is_consistent(script in llmgate_test_support::body::scripts(200)) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let _entered = runtime.enter();
            let body = IdleTimeout::new(script.body(), Duration::from_secs(60));
            let played = llmgate_test_support::body::check_size_hints(body, &script);
            if script.ends_cleanly() {
                proptest::prop_assert_eq!(played.data, script.data());
            }
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let read = |pairs: &[(&'static str, &str)]| {
            let mut headers = HeaderMap::new();
            for (k, v) in pairs {
                headers.insert(*k, v.parse().unwrap());
            }
            retry_after(&headers, now)
        };
        assert_eq!(read(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(read(&[("retry-after", " 1.5 ")]), Some(Duration::from_millis(1500)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(read(&[("retry-after", &date)]), Some(Duration::from_secs(30)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(read(&[("retry-after", &past)]), Some(Duration::ZERO));
        assert_eq!(read(&[("retry-after-ms", "250"), ("retry-after", "7")]), Some(Duration::from_millis(250)));
        for bad in ["-1", "NaN", "1e300", "soon"] {
            assert_eq!(read(&[("retry-after", bad)]), None, "{bad}");
        }
        assert_eq!(read(&[]), None);
    }

    #[test]
    fn joins_without_doubling_the_shared_prefix() {
        assert_eq!(join_url("http://h/v1", "/v1/models"), "http://h/v1/models");
        assert_eq!(join_url("http://h", "/v1/models?x=1"), "http://h/v1/models?x=1");
        assert_eq!(join_url("http://h/v1/", "/chat/completions"), "http://h/v1/chat/completions");
        assert_eq!(join_url("http://h/v1", "/v10/x"), "http://h/v1/v10/x");
        assert_eq!(join_url("http://h:8/api/v1", "/api/v1?q"), "http://h:8/api/v1?q");
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "5"),
            ("transfer-encoding", "chunked"),
            ("content-length", "3"),
            ("x-kept", "1"),
        ] {
            headers.insert(k, v.parse().unwrap());
        }
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
    }
}
