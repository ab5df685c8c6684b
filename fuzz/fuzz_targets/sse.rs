//! The server-sent-events parser over arbitrary bytes in arbitrary chunks:
//! never panics, and chunking does not change the events it reports.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_agent::providers::sse::SseParser;

fn events(data: &[u8], chunk: usize) -> Vec<(String, String)> {
    let mut p = SseParser::default();
    let mut out = Vec::new();
    for part in data.chunks(chunk) {
        p.feed(part, |e| {
            out.push((e.event.to_string(), e.data.to_string()))
        });
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let whole = events(rest, rest.len().max(1));
    let chunked = events(rest, usize::from(split % 16) + 1);
    assert_eq!(whole, chunked, "chunk boundaries changed the events");
});
