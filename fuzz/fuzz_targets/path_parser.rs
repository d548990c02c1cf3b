//! The path parser: never panics; what it accepts is a route whose values carry no `/` and no
//! control character, and parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    let first = llmgate_path_metadata::parse(path);
    if let Ok(Some(meta)) = &first {
        let mut values: Vec<&str> = meta.project.iter().map(String::as_str).collect();
        if let Some(r) = &meta.rollout {
            values.extend([&r.rollout_id, &r.invocation_id, &r.experiment_id, &r.run_id, &r.row_id].map(String::as_str));
        }
        for v in values {
            assert!(!v.is_empty() && !v.contains('/') && !v.chars().any(char::is_control), "{path:?} gave {v:?}");
            assert!(v != "." && v != "..", "{path:?} gave a dot segment");
        }
    }
    let again = llmgate_path_metadata::parse(path);
    assert_eq!(format!("{first:?}"), format!("{again:?}"));
});
