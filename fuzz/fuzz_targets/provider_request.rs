//! Request parsing (operation, model, stream flag, limits) for each API over
//! arbitrary paths and bodies, and the rewrites (model, output cap) of the
//! path and body: never panics, and a rewritten model reads back.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tollgate_agent::providers::{Upstream, adapter, parse_request};

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
    let a = adapter(api);
    let mut rewritten = path.to_string();
    let mut map = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => Default::default(),
    };
    let model = "us.vendor.model-v1:0/x y";
    let to = Upstream {
        provider: "p",
        host: "h",
    };
    let _ = a.cap_output(to, &rewritten, &mut map, 7);
    if a.set_model(&mut rewritten, &mut map, model) {
        let again = serde_json::to_vec(&map).unwrap_or_default();
        let _ = parse_request(api, &rewritten, &again);
    }
});
