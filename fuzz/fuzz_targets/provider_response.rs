//! Each provider's response parser (JSON bodies and SSE streams) over
//! arbitrary bytes: never panics or overflows, whatever the token counts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_agent::providers::ResponseParser;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let api = tollgate_fuzz::api(sel);
    let content_type = if sel & 0x80 != 0 {
        "text/event-stream"
    } else {
        "application/json"
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
