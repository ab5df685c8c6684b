//! The usage-chunk filter over arbitrary bytes in arbitrary chunks: never
//! panics, chunking does not change what the workload receives, it only
//! ever takes bytes out, and a stream that never mentions usage passes
//! byte for byte.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate_agent::providers::stream_usage::UsageChunkFilter;

fn filtered(data: &[u8], chunk: usize) -> Vec<u8> {
    let mut f = UsageChunkFilter::default();
    let mut out = Vec::new();
    for part in data.chunks(chunk) {
        out.extend_from_slice(&f.feed(Bytes::copy_from_slice(part)));
    }
    out.extend_from_slice(&f.finish());
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let whole = filtered(rest, rest.len().max(1));
    let chunked = filtered(rest, usize::from(split % 32) + 1);
    assert_eq!(whole, chunked, "chunk boundaries changed the stream");
    assert!(whole.len() <= rest.len(), "the filter only takes out");
    if !rest.windows(7).any(|w| w == b"\"usage\"") {
        assert_eq!(whole, rest, "nothing to take out: untouched");
    }
});
