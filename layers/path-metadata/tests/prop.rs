//! Property tests of the path parser: it never panics, and every valid route round-trips.

use llmgate_core::ext::RouteKind;
use llmgate_path_metadata::parse;
use proptest::prelude::*;

/// A segment value: printable, no `/`, not `.`/`..`, within every tag limit.
fn value() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_:~ .,;=+@!$*'()é中-]{1,40}".prop_filter("not a dot segment", |v| v != "." && v != "..")
}

/// Percent-encodes every byte but unreserved ASCII, or (when `all`) every byte.
fn encode(value: &str, all: bool) -> String {
    value
        .bytes()
        .map(|b| {
            if !all && (b.is_ascii_alphanumeric() || b"-_~:".contains(&b)) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Route {
    v1: bool,
    project: Option<String>,
    ids: Option<[String; 5]>,
    base: Option<String>,
    kind: RouteKind,
    encode_all: bool,
}

fn route() -> impl Strategy<Value = Route> {
    let ids = prop::option::of([value(), value(), value(), value(), value()]);
    let base = prop::option::of("[A-Za-z0-9_=-]{1,60}");
    let kind = prop_oneof![
        Just(RouteKind::ChatCompletions),
        Just(RouteKind::Traces),
        Just(RouteKind::TracesPointwise),
        Just(RouteKind::Logs),
        Just(RouteKind::Status),
    ];
    (any::<bool>(), prop::option::of(value()), ids, base, kind, any::<bool>()).prop_map(
        |(v1, project, ids, base, kind, encode_all)| {
            // Trace routes have no ids; the base URL needs the ids.
            let ids = if kind == RouteKind::ChatCompletions { ids } else { None };
            let base = if ids.is_some() { base } else { None };
            Route { v1, project, ids, base, kind, encode_all }
        },
    )
}

impl Route {
    fn path(&self) -> String {
        let mut path = String::new();
        if self.v1 {
            path.push_str("/v1");
        }
        if let Some(p) = &self.project {
            path.push_str(&format!("/project_id/{}", encode(p, self.encode_all)));
        }
        if let Some(ids) = &self.ids {
            for (name, v) in ["rollout_id", "invocation_id", "experiment_id", "run_id", "row_id"].iter().zip(ids) {
                path.push_str(&format!("/{name}/{}", encode(v, self.encode_all)));
            }
        }
        if let Some(b) = &self.base {
            path.push_str(&format!("/encoded_base_url/{b}"));
        }
        path.push_str(match self.kind {
            RouteKind::ChatCompletions => "/chat/completions",
            RouteKind::Traces => "/traces",
            RouteKind::TracesPointwise => "/traces/pointwise",
            RouteKind::Logs => "/logs",
            RouteKind::Status => "/status",
        });
        path
    }
}

/// Strings made of the route vocabulary, near-misses galore.
fn vocabulary_path() -> impl Strategy<Value = String> {
    let word = prop_oneof![
        Just("v1".to_string()),
        Just("project_id".to_string()),
        Just("rollout_id".to_string()),
        Just("invocation_id".to_string()),
        Just("experiment_id".to_string()),
        Just("run_id".to_string()),
        Just("row_id".to_string()),
        Just("encoded_base_url".to_string()),
        Just("chat".to_string()),
        Just("completions".to_string()),
        Just("traces".to_string()),
        Just("pointwise".to_string()),
        Just(String::new()),
        Just("%".to_string()),
        Just("%2F".to_string()),
        Just("%00".to_string()),
        Just("..".to_string()),
        "\\PC{0,8}",
    ];
    prop::collection::vec(word, 0..20).prop_map(|words| format!("/{}", words.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn never_panics_on_any_text(path in "\\PC{0,200}") {
        let _ = parse(&path);
    }

    #[test]
    fn never_panics_on_route_like_paths(path in vocabulary_path()) {
        let _ = parse(&path);
    }

    #[test]
    fn valid_routes_round_trip(route in route()) {
        let path = route.path();
        // A project-only chat route needs the project; the bare `/v1` or `/` chat route has none.
        let meta = parse(&path).map_err(|e| TestCaseError::fail(format!("{path}: {e}")))?;
        let meta = meta.ok_or_else(|| TestCaseError::fail(format!("{path}: not a route")))?;
        prop_assert_eq!(meta.kind, route.kind);
        prop_assert_eq!(meta.project.as_ref(), route.project.as_ref());
        prop_assert_eq!(meta.encoded_base_url.as_ref(), route.base.as_ref());
        match (&meta.rollout, &route.ids) {
            (None, None) => {}
            (Some(got), Some(ids)) => {
                prop_assert_eq!(&got.rollout_id, &ids[0]);
                prop_assert_eq!(&got.invocation_id, &ids[1]);
                prop_assert_eq!(&got.experiment_id, &ids[2]);
                prop_assert_eq!(&got.run_id, &ids[3]);
                prop_assert_eq!(&got.row_id, &ids[4]);
            }
            (got, want) => prop_assert!(false, "{}: rollout {:?} vs {:?}", path, got, want),
        }
    }

    #[test]
    fn a_slash_or_control_character_in_any_value_is_refused_never_accepted(
        route in route().prop_filter("has ids", |r| r.ids.is_some()),
        which in 0usize..5,
        bad in prop_oneof![Just("%2F"), Just("%2f"), Just("%00"), Just("%0A"), Just("%1B"), Just("%7F")],
    ) {
        let mut ids = route.ids.clone().unwrap_or_default();
        ids[which] = format!("a{bad}b");
        // Build by hand: the bad value is already encoded.
        let good = Route { ids: None, base: None, project: None, v1: route.v1, kind: RouteKind::ChatCompletions, encode_all: false };
        let mut path = if good.v1 { "/v1".to_string() } else { String::new() };
        for (i, (name, v)) in ["rollout_id", "invocation_id", "experiment_id", "run_id", "row_id"].iter().zip(&ids).enumerate() {
            let v = if i == which { v.clone() } else { encode(v, false) };
            path.push_str(&format!("/{name}/{v}"));
        }
        path.push_str("/chat/completions");
        prop_assert!(parse(&path).is_err(), "{} was accepted", path);
    }
}
