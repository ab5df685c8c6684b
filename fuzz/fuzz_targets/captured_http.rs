//! Captured plaintext (TLS uprobes) read back as calls, HTTP/1.1 or HTTP/2
//! (told by the first bytes): never panics on any bytes in either
//! direction, and where the kernel cut the stream into records does not
//! change the calls read from it.
#![no_main]
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use tollgate_agent::{
    providers::Api,
    uprobe::exchange::{Dir, Exchange, Finished},
};

type Summary = (String, String, u16, u64, u64, bool, u64, u64, Option<String>);

fn summary(f: &Finished) -> Summary {
    (
        f.method.clone(),
        f.target.clone(),
        f.status,
        f.request_bytes,
        f.response_bytes,
        f.complete,
        f.response.usage.input_tokens,
        f.response.usage.output_tokens,
        f.request.model.clone(),
    )
}

fn calls(requests: &[u8], responses: &[u8], chunk: usize) -> Vec<Summary> {
    let mut x = Exchange::new(Api::Openai);
    let now = Instant::now();
    let mut done = Vec::new();
    for part in requests.chunks(chunk) {
        x.feed(Dir::Write, part, now, &mut done);
    }
    for part in responses.chunks(chunk) {
        x.feed(Dir::Read, part, now, &mut done);
    }
    x.end(now, &mut done);
    done.iter().map(summary).collect()
}

fuzz_target!(|data: &[u8]| {
    let [chunk, split, rest @ ..] = data else {
        return;
    };
    let at = rest.len() * usize::from(*split) / 256;
    let (requests, responses) = rest.split_at(at);
    let whole = calls(requests, responses, rest.len().max(1));
    let cut = calls(requests, responses, usize::from(chunk % 64) + 1);
    assert_eq!(whole, cut, "record boundaries changed the calls");
});
