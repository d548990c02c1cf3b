//! The route table and the pure parser built on it.

use http::{Method, Request, Uri, uri::PathAndQuery};
use llmgate_core::{
    GatewayError, RouteRefusal,
    ext::{RolloutIds, RouteKind, RouteMeta},
};

/// The longest tag Langfuse accepts, in characters (`rollout_id:` + value and so on).
pub const MAX_TAG_CHARS: usize = 200;
/// The longest `project_id` value accepted, in characters.
pub const MAX_PROJECT_CHARS: usize = 200;
/// The longest `encoded_base_url` value accepted, in characters.
pub const MAX_ENCODED_BASE_URL_CHARS: usize = 4096;

/// The path every chat route is rewritten to.
pub const CHAT_PATH: &str = "/chat/completions";

// === The route table ===

/// One piece of a route pattern.
#[derive(Clone, Copy)]
enum Part {
    /// A literal segment.
    Lit(&'static str),
    /// One segment captured as a parameter.
    Param(Param),
    /// A group that is present as a whole or absent as a whole.
    Opt(&'static [Part]),
}

/// The path parameters a route can carry (the index into [`Captures`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Param {
    Project = 0,
    Rollout = 1,
    Invocation = 2,
    Experiment = 3,
    Run = 4,
    Row = 5,
    EncodedBaseUrl = 6,
}

impl Param {
    /// The segment name, as in the path and in error messages.
    const fn name(self) -> &'static str {
        match self {
            Self::Project => "project_id",
            Self::Rollout => "rollout_id",
            Self::Invocation => "invocation_id",
            Self::Experiment => "experiment_id",
            Self::Run => "run_id",
            Self::Row => "row_id",
            Self::EncodedBaseUrl => "encoded_base_url",
        }
    }
}

struct Route {
    kind: RouteKind,
    pattern: &'static [Part],
}

use Part::{Lit, Opt};

const V1: Part = Opt(&[Lit("v1")]);
const PROJECT: Part = Opt(&[Lit("project_id"), Part::Param(Param::Project)]);
/// The five ids, all or none, in this order, optionally followed by the encoded base URL.
const ROLLOUT: Part = Opt(&[
    Lit("rollout_id"),
    Part::Param(Param::Rollout),
    Lit("invocation_id"),
    Part::Param(Param::Invocation),
    Lit("experiment_id"),
    Part::Param(Param::Experiment),
    Lit("run_id"),
    Part::Param(Param::Run),
    Lit("row_id"),
    Part::Param(Param::Row),
    Opt(&[Lit("encoded_base_url"), Part::Param(Param::EncodedBaseUrl)]),
]);

/// Every route spelling of the gateway, in one place.
///
/// | Kind | Pattern |
/// |---|---|
/// | chat | `[/v1][/project_id/{p}][/rollout_id/{r}/invocation_id/{i}/experiment_id/{e}/run_id/{u}/row_id/{w}[/encoded_base_url/{b}]]/chat/completions` |
/// | traces | `[/v1][/project_id/{p}]/traces` |
/// | pointwise | `[/v1][/project_id/{p}]/traces/pointwise` |
/// | logs | `[/v1][/project_id/{p}]/logs` |
/// | status | `[/v1][/project_id/{p}]/status` |
const ROUTES: &[Route] = &[
    Route { kind: RouteKind::ChatCompletions, pattern: &[V1, PROJECT, ROLLOUT, Lit("chat"), Lit("completions")] },
    Route { kind: RouteKind::Traces, pattern: &[V1, PROJECT, Lit("traces")] },
    Route { kind: RouteKind::TracesPointwise, pattern: &[V1, PROJECT, Lit("traces"), Lit("pointwise")] },
    Route { kind: RouteKind::Logs, pattern: &[V1, PROJECT, Lit("logs")] },
    Route { kind: RouteKind::Status, pattern: &[V1, PROJECT, Lit("status")] },
];

/// The most segments any route has: `v1`, project (2), ids (10), base URL (2), `chat/completions`.
const MAX_SEGMENTS: usize = 17;

type Captures<'a> = [Option<&'a str>; 7];

/// What is left to match after the current group.
struct Cont<'c> {
    parts: &'static [Part],
    next: Option<&'c Cont<'c>>,
}

/// Backtracking match of `parts` (then the continuation) against all of `segs`.
fn matches<'a>(parts: &'static [Part], next: Option<&Cont<'_>>, segs: &[&'a str], caps: &mut Captures<'a>) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return match next {
            Some(cont) => matches(cont.parts, cont.next, segs, caps),
            None => segs.is_empty(),
        };
    };
    match *first {
        Lit(literal) => match segs.split_first() {
            Some((seg, tail)) if *seg == literal => matches(rest, next, tail, caps),
            _ => false,
        },
        Part::Param(param) => {
            let Some((seg, tail)) = segs.split_first() else {
                return false;
            };
            let slot = param as usize;
            let saved = caps[slot];
            caps[slot] = Some(seg);
            if matches(rest, next, tail, caps) {
                true
            } else {
                caps[slot] = saved;
                false
            }
        }
        Opt(group) => {
            let cont = Cont { parts: rest, next };
            matches(group, Some(&cont), segs, caps) || matches(rest, next, segs, caps)
        }
    }
}

/// The last literal of a route pattern (every route ends in one).
fn last_literal(route: &Route) -> Option<&'static str> {
    match route.pattern.last() {
        Some(Lit(literal)) => Some(literal),
        _ => None,
    }
}

// === parse ===

/// Parses a request path against the route table.
///
/// - `Ok(Some(meta))`: the path is one of the gateway's routes;
/// - `Ok(None)`: it is not (near-misses included: a missing id, a wrong order, a trailing
///   slash); such requests belong to the catch-all, untouched;
/// - `Err(GatewayError::BadRequest)`: the path is a route but a segment value is malformed
///   (empty, `/` or a control character after percent-decoding, `.`/`..`, bad percent-encoding
///   or UTF-8, too long for its tag). The message names the segment, never echoes the value.
///
/// ```
/// use llmgate_core::ext::RouteKind;
///
/// let meta = llmgate_path_metadata::parse("/v1/project_id/p1/traces").unwrap().unwrap();
/// assert_eq!(meta.kind, RouteKind::Traces);
/// assert_eq!(meta.project.as_deref(), Some("p1"));
/// assert!(llmgate_path_metadata::parse("/v1/models").unwrap().is_none());
/// ```
pub fn parse(path: &str) -> Result<Option<RouteMeta>, GatewayError> {
    parse_route(path).map_err(|refusal| refusal.error)
}

/// [`parse`], its refusal kept with the route's kind.
fn parse_route(path: &str) -> Result<Option<RouteMeta>, RouteRefusal> {
    let Some(path) = path.strip_prefix('/') else {
        return Ok(None);
    };
    let mut segs: [&str; MAX_SEGMENTS] = [""; MAX_SEGMENTS];
    let mut len = 0;
    for seg in path.split('/') {
        if len == MAX_SEGMENTS {
            return Ok(None);
        }
        segs[len] = seg;
        len += 1;
    }
    let segs = &segs[..len];
    let Some(last) = segs.last() else {
        return Ok(None);
    };
    for route in ROUTES {
        if last_literal(route) != Some(*last) {
            continue;
        }
        let mut caps: Captures<'_> = [None; 7];
        if matches(route.pattern, None, segs, &mut caps) {
            return build(route.kind, &caps).map(Some).map_err(|error| RouteRefusal { route: route.kind, error });
        }
    }
    Ok(None)
}

fn build(kind: RouteKind, caps: &Captures<'_>) -> Result<RouteMeta, GatewayError> {
    let value = |param: Param| caps[param as usize].map(|raw| decode(param, raw)).transpose();
    let project = value(Param::Project)?;
    let rollout = match value(Param::Rollout)? {
        Some(rollout_id) => Some(RolloutIds {
            rollout_id,
            invocation_id: required(value(Param::Invocation)?, Param::Invocation)?,
            experiment_id: required(value(Param::Experiment)?, Param::Experiment)?,
            run_id: required(value(Param::Run)?, Param::Run)?,
            row_id: required(value(Param::Row)?, Param::Row)?,
        }),
        None => None,
    };
    let encoded_base_url = value(Param::EncodedBaseUrl)?;
    Ok(RouteMeta { kind, project, rollout, encoded_base_url })
}

/// The table captures the five ids together; this only guards that invariant.
fn required(value: Option<String>, param: Param) -> Result<String, GatewayError> {
    value.ok_or_else(|| invalid(param, "is missing"))
}

fn invalid(param: Param, why: &str) -> GatewayError {
    GatewayError::BadRequest(format!("Invalid path segment '{}': {why}", param.name()))
}

/// Percent-decodes and checks one segment value.
fn decode(param: Param, raw: &str) -> Result<String, GatewayError> {
    let value = if raw.contains('%') { percent_decode(param, raw)? } else { raw.to_owned() };
    if value.is_empty() {
        return Err(invalid(param, "must not be empty"));
    }
    if value == "." || value == ".." {
        return Err(invalid(param, "must not be '.' or '..'"));
    }
    if value.contains('/') {
        return Err(invalid(param, "must not contain '/'"));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(param, "must not contain control characters"));
    }
    let chars = value.chars().count();
    match param {
        Param::Project if chars > MAX_PROJECT_CHARS => {
            Err(invalid(param, &format!("must be at most {MAX_PROJECT_CHARS} characters")))
        }
        Param::EncodedBaseUrl if chars > MAX_ENCODED_BASE_URL_CHARS => {
            Err(invalid(param, &format!("must be at most {MAX_ENCODED_BASE_URL_CHARS} characters")))
        }
        Param::Project | Param::EncodedBaseUrl => Ok(value),
        _ if param.name().len() + 1 + chars > MAX_TAG_CHARS => Err(invalid(
            param,
            &format!("its tag '{}:…' would be longer than {MAX_TAG_CHARS} characters", param.name()),
        )),
        _ => Ok(value),
    }
}

fn percent_decode(param: Param, raw: &str) -> Result<String, GatewayError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|b| hex(*b));
            let lo = bytes.get(i + 2).and_then(|b| hex(*b));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(invalid(param, "has malformed percent-encoding"));
            };
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| invalid(param, "is not valid UTF-8 after percent-decoding"))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

// === apply ===

/// What [`PathMetadata`](crate::PathMetadata) does to a request, for use without the layer
/// (e.g. in an axum `map_request`).
///
/// If the request has no [`RouteMeta`] yet and its path is a route: checks the method (chat
/// routes take `POST`, trace and status routes `GET`, log routes `GET` or `POST`; otherwise
/// `MethodNotAllowed`), inserts the
/// [`RouteMeta`] and, for chat routes, rewrites the URI path to `/chat/completions` keeping
/// the query string. Anything else is left untouched. A request that already carries a
/// [`RouteMeta`] is left untouched too, so applying it twice is harmless.
pub fn apply<B>(req: &mut Request<B>) -> Result<(), GatewayError> {
    apply_route(req).map_err(|refusal| refusal.error)
}

/// [`apply`], its refusal kept with the route's kind: what the layer returns, so that the
/// rescue layer answers in the route's shape (`{"detail"}` on traces, logs and status routes).
pub(crate) fn apply_route<B>(req: &mut Request<B>) -> Result<(), RouteRefusal> {
    if req.extensions().get::<RouteMeta>().is_some() {
        return Ok(());
    }
    let Some(meta) = parse_route(req.uri().path())? else {
        return Ok(());
    };
    let route = meta.kind;
    let refuse = |error| RouteRefusal { route, error };
    match route {
        RouteKind::ChatCompletions => {
            if req.method() != Method::POST {
                return Err(refuse(GatewayError::MethodNotAllowed { allow: "POST" }));
            }
            *req.uri_mut() = rewrite_to_chat(req.uri()).map_err(refuse)?;
        }
        RouteKind::Traces | RouteKind::TracesPointwise | RouteKind::Status => {
            if req.method() != Method::GET {
                return Err(refuse(GatewayError::MethodNotAllowed { allow: "GET" }));
            }
        }
        RouteKind::Logs => {
            if req.method() != Method::GET && req.method() != Method::POST {
                return Err(refuse(GatewayError::MethodNotAllowed { allow: "GET, POST" }));
            }
        }
    }
    req.extensions_mut().insert(meta);
    Ok(())
}

/// `uri` with its path replaced by `/chat/completions` (scheme, authority, query kept).
fn rewrite_to_chat(uri: &Uri) -> Result<Uri, GatewayError> {
    let path_and_query = match uri.query() {
        Some(query) => PathAndQuery::try_from(format!("{CHAT_PATH}?{query}"))
            .map_err(|_| GatewayError::bad_request("Invalid query string"))?,
        None => PathAndQuery::from_static(CHAT_PATH),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|_| GatewayError::Internal("Could not rewrite the request URI".into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ids(r: &str, i: &str, e: &str, u: &str, w: &str) -> RolloutIds {
        RolloutIds {
            rollout_id: r.into(),
            invocation_id: i.into(),
            experiment_id: e.into(),
            run_id: u.into(),
            row_id: w.into(),
        }
    }

    const IDS: &str = "rollout_id/r1/invocation_id/inv1/experiment_id/exp1/run_id/run1/row_id/row1";

    fn ok(path: &str) -> RouteMeta {
        match parse(path) {
            Ok(Some(meta)) => meta,
            other => panic!("{path}: {other:?}"),
        }
    }

    fn err(path: &str) -> String {
        match parse(path) {
            Err(GatewayError::BadRequest(message)) => message,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn every_chat_spelling() {
        for v1 in ["", "/v1"] {
            for project in [None, Some("p1")] {
                let prefix = format!("{v1}{}", project.map(|p| format!("/project_id/{p}")).unwrap_or_default());
                // Plain or project-only.
                let meta = ok(&format!("{prefix}/chat/completions"));
                assert_eq!(
                    meta,
                    RouteMeta {
                        kind: RouteKind::ChatCompletions,
                        project: project.map(Into::into),
                        rollout: None,
                        encoded_base_url: None
                    }
                );
                // Full metadata.
                let meta = ok(&format!("{prefix}/{IDS}/chat/completions"));
                assert_eq!(meta.project.as_deref(), project);
                assert_eq!(meta.rollout, Some(ids("r1", "inv1", "exp1", "run1", "row1")));
                assert_eq!(meta.encoded_base_url, None);
                // Full metadata and base URL.
                let meta = ok(&format!("{prefix}/{IDS}/encoded_base_url/aHR0cHM6Ly9h==/chat/completions"));
                assert_eq!(meta.kind, RouteKind::ChatCompletions);
                assert_eq!(meta.project.as_deref(), project);
                assert_eq!(meta.rollout, Some(ids("r1", "inv1", "exp1", "run1", "row1")));
                assert_eq!(meta.encoded_base_url.as_deref(), Some("aHR0cHM6Ly9h=="));
            }
        }
    }

    #[test]
    fn every_traces_logs_and_status_spelling() {
        for v1 in ["", "/v1"] {
            for project in [None, Some("p1")] {
                let prefix = format!("{v1}{}", project.map(|p| format!("/project_id/{p}")).unwrap_or_default());
                for (suffix, kind) in [
                    ("traces", RouteKind::Traces),
                    ("traces/pointwise", RouteKind::TracesPointwise),
                    ("logs", RouteKind::Logs),
                    ("status", RouteKind::Status),
                ] {
                    let meta = ok(&format!("{prefix}/{suffix}"));
                    assert_eq!(meta.kind, kind);
                    assert_eq!(meta.project.as_deref(), project);
                    assert_eq!(meta.rollout, None);
                }
            }
        }
    }

    #[test]
    fn near_misses_are_not_routes() {
        for path in [
            "",
            "*",
            "/",
            "/health",
            "/v1/models",
            "/completions",
            "/chat/completions/",
            "/v1/chat",
            "/v2/chat/completions",
            "/v1/v1/chat/completions",
            // A missing id.
            "/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/chat/completions",
            "/invocation_id/i/experiment_id/e/run_id/u/row_id/w/chat/completions",
            // Wrong order.
            "/invocation_id/i/rollout_id/r/experiment_id/e/run_id/u/row_id/w/chat/completions",
            "/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/w/project_id/p/chat/completions",
            "/project_id/p/v1/chat/completions",
            // A base URL without the ids.
            "/encoded_base_url/aGk=/chat/completions",
            "/project_id/p/encoded_base_url/aGk=/chat/completions",
            // A project without value.
            "/project_id/chat/completions",
            // Ids on trace routes are not a spelling of the original.
            "/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/w/traces",
            "/traces/pointwise/x",
            "/traces/",
            "/TRACES",
            "/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/chat/completions",
        ] {
            assert_eq!(parse(path), Ok(None), "{path}");
        }
    }

    #[test]
    fn values_that_look_like_keywords_are_values() {
        let meta = ok("/project_id/rollout_id/chat/completions");
        assert_eq!(meta.project.as_deref(), Some("rollout_id"));
        let meta = ok("/project_id/v1/traces");
        assert_eq!(meta.project.as_deref(), Some("v1"));
        let meta = ok(
            "/rollout_id/row_id/invocation_id/chat/experiment_id/run_id/run_id/x/row_id/completions/chat/completions",
        );
        assert_eq!(meta.rollout, Some(ids("row_id", "chat", "run_id", "x", "completions")));
    }

    #[test]
    fn segments_are_percent_decoded() {
        let meta = ok(
            "/project_id/my%20project/rollout_id/a%3Ab/invocation_id/%C3%A9/experiment_id/e:f/run_id/u/row_id/w/encoded_base_url/aGk%3D/chat/completions",
        );
        assert_eq!(meta.project.as_deref(), Some("my project"));
        assert_eq!(meta.rollout, Some(ids("a:b", "é", "e:f", "u", "w")));
        assert_eq!(meta.encoded_base_url.as_deref(), Some("aGk="));
        // A `%2F` decodes to `/` inside one segment: not a route boundary, and refused.
        assert!(err("/project_id/a%2Fb/chat/completions").contains("'project_id'"));
    }

    #[test]
    fn malformed_segments_name_the_segment() {
        let cases: &[(&str, &str, &str)] = &[
            ("/project_id//chat/completions", "project_id", "empty"),
            ("/project_id/%2f/traces", "project_id", "'/'"),
            ("/project_id/./traces", "project_id", "'.' or '..'"),
            ("/project_id/%2E%2E/traces", "project_id", "'.' or '..'"),
            (
                "/rollout_id/%00/invocation_id/i/experiment_id/e/run_id/u/row_id/w/chat/completions",
                "rollout_id",
                "control",
            ),
            (
                "/rollout_id/r/invocation_id/a%0Ab/experiment_id/e/run_id/u/row_id/w/chat/completions",
                "invocation_id",
                "control",
            ),
            (
                "/rollout_id/r/invocation_id/i/experiment_id/%7F/run_id/u/row_id/w/chat/completions",
                "experiment_id",
                "control",
            ),
            ("/rollout_id/r/invocation_id/i/experiment_id/e/run_id/%zz/row_id/w/chat/completions", "run_id", "percent"),
            ("/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/%FF/chat/completions", "row_id", "UTF-8"),
            ("/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/%4/chat/completions", "row_id", "percent"),
            (
                "/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/w/encoded_base_url//chat/completions",
                "encoded_base_url",
                "empty",
            ),
        ];
        for (path, segment, why) in cases {
            let message = err(path);
            assert!(message.contains(&format!("'{segment}'")), "{path}: {message}");
            assert!(message.contains(why), "{path}: {message}");
        }
    }

    #[test]
    fn tag_length_limit_is_exact() {
        // `rollout_id:` is 11 characters: a 189-character value makes a 200-character tag.
        let at = "é".repeat(189);
        let over = "x".repeat(190);
        let path =
            |r: &str| format!("/rollout_id/{r}/invocation_id/i/experiment_id/e/run_id/u/row_id/w/chat/completions");
        assert_eq!(ok(&path(&at)).rollout.map(|r| r.rollout_id), Some(at.clone()));
        assert!(err(&path(&over)).contains("'rollout_id'"));
        // `row_id:` is 7 characters.
        let row =
            |w: &str| format!("/rollout_id/r/invocation_id/i/experiment_id/e/run_id/u/row_id/{w}/chat/completions");
        assert!(parse(&row(&"x".repeat(193))).is_ok_and(|m| m.is_some()));
        assert!(err(&row(&"x".repeat(194))).contains("'row_id'"));
        // The limit counts decoded characters, not percent-encoded bytes.
        let encoded = "%C3%A9".repeat(189);
        assert!(parse(&path(&encoded)).is_ok_and(|m| m.is_some()));
        // Project and base URL have their own caps.
        assert!(err(&format!("/project_id/{}/traces", "p".repeat(201))).contains("'project_id'"));
    }

    #[test]
    fn apply_checks_methods_and_rewrites_chat_uris() {
        let mut req = Request::post(format!("http://gw:4000/v1/project_id/p/{IDS}/chat/completions?a=1&b=%2F"))
            .body(())
            .unwrap_or_default();
        apply(&mut req).unwrap();
        assert_eq!(req.uri().to_string(), "http://gw:4000/chat/completions?a=1&b=%2F");
        assert_eq!(req.extensions().get::<RouteMeta>().and_then(|m| m.project.as_deref()), Some("p"));

        let mut req = Request::get("/project_id/p/chat/completions").body(()).unwrap_or_default();
        assert_eq!(apply(&mut req), Err(GatewayError::MethodNotAllowed { allow: "POST" }));
        let mut req = Request::put("/traces").body(()).unwrap_or_default();
        assert_eq!(apply(&mut req), Err(GatewayError::MethodNotAllowed { allow: "GET" }));
        let mut req = Request::head("/v1/traces/pointwise").body(()).unwrap_or_default();
        assert_eq!(apply(&mut req), Err(GatewayError::MethodNotAllowed { allow: "GET" }));
        let mut req = Request::post("/status").body(()).unwrap_or_default();
        assert_eq!(apply(&mut req), Err(GatewayError::MethodNotAllowed { allow: "GET" }));
        let mut req = Request::delete("/v1/logs").body(()).unwrap_or_default();
        assert_eq!(apply(&mut req), Err(GatewayError::MethodNotAllowed { allow: "GET, POST" }));
        for mut req in [Request::get("/logs"), Request::post("/project_id/p/logs"), Request::get("/v1/status")]
            .map(|r| r.body(()).unwrap_or_default())
        {
            apply(&mut req).unwrap();
            assert!(req.extensions().get::<RouteMeta>().is_some());
        }

        // Trace routes keep their path.
        let mut req = Request::get("/v1/traces?tags=rollout_id:r").body(()).unwrap_or_default();
        apply(&mut req).unwrap();
        assert_eq!(req.uri(), "/v1/traces?tags=rollout_id:r");

        // Applying twice keeps the first metadata.
        let mut req = Request::post("/project_id/p/chat/completions").body(()).unwrap_or_default();
        apply(&mut req).unwrap();
        apply(&mut req).unwrap();
        assert_eq!(req.extensions().get::<RouteMeta>().and_then(|m| m.project.as_deref()), Some("p"));

        // Near-misses: untouched, any method.
        let mut req = Request::delete("/row_id/w/chat/completions?x").body(()).unwrap_or_default();
        apply(&mut req).unwrap();
        assert_eq!(req.uri(), "/row_id/w/chat/completions?x");
        assert!(req.extensions().get::<RouteMeta>().is_none());
    }
}
