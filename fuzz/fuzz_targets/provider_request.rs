//! Request parsing (operation, model, stream flag, limits) for each API over
//! arbitrary paths and bodies: never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_agent::providers::parse_request;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let api = tollgate_fuzz::api(sel);
    // The path is the bytes up to the first newline; the body the rest.
    let (path, body) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let path = String::from_utf8_lossy(path);
    let _ = parse_request(api, &path, body);
});
