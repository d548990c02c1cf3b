//! The SSE scanner and usage extraction: never panics, and feeding the same bytes in pieces
//! finds the same usage and `[DONE]` as feeding them whole (inputs stay below the 64 KiB line
//! limit, where splitting may legitimately differ).
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmgate_core::usage::{SseScanner, Usage};

fn scan<'a>(parts: impl Iterator<Item = &'a [u8]>) -> (Option<Usage>, bool) {
    let mut scanner = SseScanner::default();
    for part in parts {
        scanner.feed(part);
    }
    scanner.finish();
    (scanner.usage(), scanner.saw_done())
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() || data.len() > 32 * 1024 {
        return;
    }
    // The first byte picks the piece size; the rest is the stream.
    let (size, stream) = (usize::from(data[0]) % 17 + 1, &data[1..]);
    let whole = scan(std::iter::once(stream));
    let pieces = scan(stream.chunks(size));
    assert_eq!(whole, pieces, "piece size {size}");
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(stream) {
        let _ = Usage::from_json(&value);
    }
});
