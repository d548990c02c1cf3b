//! The rollout log writer's body: whatever `entry::parse` accepts is within its bound, names
//! its rollouts, and reads back through the search filter and the status view; nothing panics.
#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use llmgate_rollout_logs::entry::{Filter, ROLLOUT_TAG, parse, status_of};

fuzz_target!(|data: &[u8]| {
    let Some((&bound, body)) = data.split_first() else { return };
    let max = usize::from(bound) * 16;
    let Ok(entry) = parse(body, DateTime::<Utc>::UNIX_EPOCH, max) else { return };
    assert!(entry.json.len() <= max);
    assert!(!entry.rollout_ids.is_empty());
    let tags = entry.rollout_ids.iter().map(|r| format!("{ROLLOUT_TAG}{r}")).collect();
    assert!(Filter { tags, ..Filter::default() }.keeps(&entry.json));
    let (status, _) = status_of(&entry.json);
    assert_eq!(entry.has_status, status.is_object());
});
