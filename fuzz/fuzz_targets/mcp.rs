//! MCP messages and answers over arbitrary bytes: reading a workload's
//! message never panics; an answer read without a filter passes byte for
//! byte in any chunking; with a filter, chunking does not change the
//! events the workload gets, and no tool list it gets names a hidden tool.
#![no_main]
use std::sync::Arc;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use tollgate_agent::providers::{
    mcp,
    mcp_response::{ResponseReader, Visible},
    sse::SseParser,
};

fn read(data: &[u8], content_type: &str, chunk: usize, visible: Option<Visible>) -> Vec<u8> {
    let mut r = ResponseReader::new(content_type, vec![json!(1), json!("a")], visible);
    let mut out = Vec::new();
    for part in data.chunks(chunk) {
        out.extend_from_slice(&r.feed(Bytes::copy_from_slice(part)).expect("small answers"));
    }
    out.extend_from_slice(&r.finish());
    out
}

fn events(b: &[u8]) -> Vec<String> {
    let mut p = SseParser::default();
    let mut out = Vec::new();
    p.feed(b, |e| out.push(e.data.clone()));
    p.feed(b"\n\n", |e| out.push(e.data.clone()));
    out
}

/// No `result.tools` list anywhere in `v` names a hidden tool.
fn hides(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.iter().all(hides),
        Value::Object(o) => {
            let listed = o
                .get("result")
                .and_then(|r| r.get("tools"))
                .and_then(Value::as_array)
                .is_none_or(|tools| {
                    tools.iter().all(|t| {
                        t.get("name")
                            .and_then(Value::as_str)
                            .is_some_and(|n| !n.contains('x'))
                    })
                });
            listed
        }
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    if let Ok(messages) = mcp::read_request(rest) {
        let _ = mcp::check_headers(&messages, |_| Some("x"));
    }
    let chunk = usize::from(split % 32) + 1;
    let hide_x: Visible = Arc::new(|t: &str| !t.contains('x'));
    for ct in ["application/json", "text/event-stream"] {
        assert_eq!(read(rest, ct, chunk, None), rest, "{ct}: no filter, no change");
        let whole = read(rest, ct, rest.len().max(1), Some(hide_x.clone()));
        let chunked = read(rest, ct, chunk, Some(hide_x.clone()));
        if ct == "application/json" {
            assert_eq!(whole, chunked, "chunking changed the answer");
            if let Ok(v) = serde_json::from_slice::<Value>(&whole) {
                assert!(hides(&v), "a hidden tool was listed");
            }
        } else {
            assert_eq!(events(&whole), events(&chunked), "chunking changed the events");
            for e in events(&whole) {
                if let Ok(v) = serde_json::from_str::<Value>(&e) {
                    assert!(hides(&v), "a hidden tool was listed: {e}");
                }
            }
        }
    }
});
