//! Each provider's response parser (JSON bodies, SSE streams and AWS
//! event-stream frames) over arbitrary bytes: never panics or overflows,
//! whatever the token counts or frame lengths.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_agent::providers::ResponseParser;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let api = tollgate_fuzz::api(sel);
    let content_type = match sel >> 6 {
        3 => "application/vnd.amazon.eventstream",
        2 => "text/event-stream",
        _ => "application/json",
    };
    let mut p = ResponseParser::new(api, content_type, u64::from(sel) * 1000);
    for part in rest.chunks(usize::from(sel % 32) + 1) {
        p.feed(part);
    }
    let info = p.finish();
    // Totals a budget would add up stay representable.
    let u = info.usage;
    let _ = u
        .input_tokens
        .checked_add(u.output_tokens)
        .map(|t| t.checked_add(u.cached_input_tokens));
});
