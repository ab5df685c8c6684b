//! Exact usage for OpenAI-style streams that did not ask for it.
//!
//! An OpenAI chat/completions stream reports token usage only when the
//! request sets `stream_options.include_usage`; most apps do not (the SDKs'
//! default), and without it the proxy could only estimate. So the proxy asks
//! for it (`ask`), and takes back out of the stream what asking added
//! (`UsageChunkFilter`): the usage-only chunk before `[DONE]` (its `choices`
//! is empty, and an app that reads `choices[0]` of every chunk would break
//! on it) and the `"usage":null` member the provider then adds to every
//! other chunk. The workload receives, byte for byte, the events it would
//! have received without Tollgate.
//!
//! Hand-written on purpose, like `sse`: the filter must edit a stream as it
//! is relayed, one event at a time, and must leave every other byte as the
//! provider sent it — re-serialising each chunk with serde_json would
//! reorder keys and reformat numbers. Values are located with serde_json's
//! `RawValue` (exact spans of the input), so only the framing around one
//! known member is handled here. Fuzzed (`fuzz/fuzz_targets/stream_usage.rs`).
use std::borrow::Cow;

use hyper::body::Bytes;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value, value::RawValue};

/// Longest stretch without an event boundary the filter holds back. Provider
/// events are a few KiB; past this the stream is passed through unfiltered
/// (correct bytes, possibly with the usage chunk) rather than held.
const MAX_PENDING: usize = 1 << 20;

/// What `ask` adds when the body has no `stream_options` at all.
const INCLUDE_USAGE_MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// How a request body is made to ask for usage (the adapter decides from
/// the parsed body, `Adapter::stream_usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// The body has no `stream_options`: one member goes in after the
    /// opening brace, nothing else is touched or re-serialised.
    Insert,
    /// `stream_options` is there without `include_usage: true`: set it.
    Set,
}

/// `body` (a JSON object) asking for usage; None when it is not one.
pub fn ask(body: &[u8], how: Ask) -> Option<Vec<u8>> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    let empty = body[start + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_none_or(|b| *b == b'}');
    if how == Ask::Insert && body[start] == b'{' && !empty {
        let mut out = Vec::with_capacity(body.len() + INCLUDE_USAGE_MEMBER.len());
        out.extend_from_slice(&body[..=start]);
        out.extend_from_slice(INCLUDE_USAGE_MEMBER);
        out.extend_from_slice(&body[start + 1..]);
        return Some(out);
    }
    let mut v: Value = serde_json::from_slice(body).ok()?;
    set_include_usage(v.as_object_mut()?);
    serde_json::to_vec(&v).ok()
}

/// Set `stream_options.include_usage` in a body being rewritten anyway.
pub fn set_include_usage(obj: &mut Map<String, Value>) {
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if !opts.is_object() {
        *opts = Value::Object(Map::new());
    }
    if let Some(o) = opts.as_object_mut() {
        o.insert("include_usage".into(), Value::Bool(true));
    }
}

/// Takes out of a relayed SSE stream what asking for usage added. Fed the
/// provider's bytes as they come; returns what the workload gets now.
/// Complete events pass at once; a partial one waits for its end.
#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    pending: Vec<u8>,
    /// Gave up (an over-long event): everything passes as it is.
    passthrough: bool,
    /// Usage-only chunks taken out, and chunks edited (for tests and logs).
    pub dropped: u64,
    pub edited: u64,
}

impl UsageChunkFilter {
    pub fn feed(&mut self, chunk: Bytes) -> Bytes {
        if self.passthrough {
            return chunk;
        }
        let held = !self.pending.is_empty();
        // The usual case: whole events, none of them touched by asking.
        if !held && last_boundary(&chunk) == Some(chunk.len()) && !mentions_usage(&chunk) {
            return chunk;
        }
        self.pending.extend_from_slice(&chunk);
        let Some(end) = last_boundary(&self.pending) else {
            if self.pending.len() > MAX_PENDING {
                self.passthrough = true;
                return Bytes::from(std::mem::take(&mut self.pending));
            }
            return Bytes::new();
        };
        let rest = self.pending.split_off(end);
        let events = std::mem::replace(&mut self.pending, rest);
        Bytes::from(self.filter_events(&events))
    }

    /// Whatever is held when the stream ends (an unterminated last event),
    /// passed as it is.
    pub fn finish(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.pending))
    }

    /// True while bytes are held back for an event's end.
    pub fn holds(&self) -> bool {
        !self.pending.is_empty()
    }

    fn filter_events(&mut self, events: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(events.len());
        let mut start = 0;
        for end in super::sse::event_ends(events) {
            let block = &events[start..end];
            start = end;
            match edit_event(block) {
                Edit::Keep => out.extend_from_slice(block),
                Edit::Drop => {
                    // The event goes, not blank lines before it: whether they
                    // open this block or end the last one depends only on
                    // where the network cut the stream.
                    out.extend_from_slice(leading_blank_lines(block));
                    self.dropped += 1;
                }
                Edit::Replace(b) => {
                    self.edited += 1;
                    out.extend_from_slice(&b);
                }
            }
        }
        out.extend_from_slice(&events[start..]);
        out
    }
}

/// The blank lines (`\n` or `\r\n`) a block starts with.
fn leading_blank_lines(block: &[u8]) -> &[u8] {
    let mut i = 0;
    loop {
        match block[i..] {
            [b'\n', ..] => i += 1,
            [b'\r', b'\n', ..] => i += 2,
            _ => return &block[..i],
        }
    }
}

fn mentions_usage(b: &[u8]) -> bool {
    b.windows(7).any(|w| w == b"\"usage\"")
}

fn last_boundary(b: &[u8]) -> Option<usize> {
    super::sse::event_ends(b).last()
}

#[derive(Debug, PartialEq, Eq)]
enum Edit {
    Keep,
    Drop,
    Replace(Vec<u8>),
}

/// One event block (its lines and the blank line ending it). Only an event
/// with exactly one `data:` line holding a JSON object is ever changed.
fn edit_event(block: &[u8]) -> Edit {
    if !mentions_usage(block) {
        return Edit::Keep;
    }
    let mut data = None;
    let mut offset = 0;
    for line in block.split_inclusive(|b| *b == b'\n') {
        if let Some(v) = line.strip_prefix(b"data:") {
            if data.is_some() {
                return Edit::Keep; // a multi-line data field: not a chunk we made
            }
            let lead = usize::from(v.first() == Some(&b' '));
            let v = &v[lead..];
            let len = v.len()
                - v.iter()
                    .rev()
                    .take_while(|b| matches!(b, b'\n' | b'\r'))
                    .count();
            data = Some((offset + 5 + lead, len));
        }
        offset += line.len();
    }
    let Some((at, len)) = data else {
        return Edit::Keep;
    };
    let Ok(json) = std::str::from_utf8(&block[at..at + len]) else {
        return Edit::Keep;
    };
    match edit_chunk(json) {
        Chunk::Keep => Edit::Keep,
        Chunk::UsageOnly => Edit::Drop,
        Chunk::Without(s) => {
            let mut b = Vec::with_capacity(block.len());
            b.extend_from_slice(&block[..at]);
            b.extend_from_slice(s.as_bytes());
            b.extend_from_slice(&block[at + len..]);
            Edit::Replace(b)
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    Keep,
    /// The chunk `include_usage` adds: no choices, a usage object.
    UsageOnly,
    /// The chunk with its `"usage":null` member taken out.
    Without(String),
}

/// A JSON object's top-level members, in order, each value as its exact span.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = m.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    out.push(e);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn edit_chunk(json: &str) -> Chunk {
    let Ok(Members(members)) = serde_json::from_str::<Members>(json) else {
        return Chunk::Keep;
    };
    let get = |k: &str| members.iter().find(|(n, _)| n == k).map(|(_, v)| v.get());
    let Some(usage) = get("usage") else {
        return Chunk::Keep;
    };
    if usage.starts_with('{') && get("choices").is_some_and(is_empty_array) {
        return Chunk::UsageOnly;
    }
    if usage != "null" {
        return Chunk::Keep;
    }
    // The value's span in `json` (RawValue borrows from it).
    let vs = usage.as_ptr() as usize - json.as_ptr() as usize;
    match without_member(json.as_bytes(), vs, vs + usage.len()) {
        Some(s) => Chunk::Without(s),
        None => Chunk::Keep,
    }
}

fn is_empty_array(raw: &str) -> bool {
    raw.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|inner| inner.trim().is_empty())
}

/// `json` without the member `"usage": <value at vs..ve>` and one comma
/// beside it. None when the framing is not the plain one (an escaped key).
fn without_member(json: &[u8], vs: usize, ve: usize) -> Option<String> {
    let ws = |b: &u8| b.is_ascii_whitespace();
    let mut i = vs;
    while i > 0 && ws(&json[i - 1]) {
        i -= 1;
    }
    i = i.checked_sub(1).filter(|&c| json[c] == b':')?;
    while i > 0 && ws(&json[i - 1]) {
        i -= 1;
    }
    let ks = i.checked_sub(7).filter(|&k| &json[k..i] == b"\"usage\"")?;
    let mut after = ve;
    while after < json.len() && ws(&json[after]) {
        after += 1;
    }
    let (from, to) = if json.get(after) == Some(&b',') {
        (ks, after + 1)
    } else {
        let mut before = ks;
        while before > 0 && ws(&json[before - 1]) {
            before -= 1;
        }
        match before.checked_sub(1) {
            Some(mut c) if json[c] == b',' => {
                while c > 0 && ws(&json[c - 1]) {
                    c -= 1;
                }
                (c, ve)
            }
            _ => (ks, ve), // the only member
        }
    };
    let mut out = Vec::with_capacity(json.len());
    out.extend_from_slice(&json[..from]);
    out.extend_from_slice(&json[to..]);
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASKED: &str = include_str!("fixtures/openai_chat_stream.sse");

    /// The stream as the provider sends it without `include_usage`.
    fn unasked() -> String {
        ASKED
            .split_inclusive("\n\n")
            .filter(|e| !e.contains("\"choices\":[]"))
            .map(|e| e.replace(",\"usage\":null", ""))
            .collect()
    }

    fn filter_in(chunks: &[&[u8]]) -> (String, UsageChunkFilter) {
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&f.feed(Bytes::copy_from_slice(c)));
        }
        out.extend_from_slice(&f.finish());
        (String::from_utf8(out).unwrap(), f)
    }

    #[test]
    fn the_workload_gets_the_stream_it_would_have_got() {
        let (out, f) = filter_in(&[ASKED.as_bytes()]);
        assert_eq!(out, unasked());
        assert_eq!((f.dropped, f.edited), (1, 4));
        // However the network cuts it.
        for size in [1, 3, 7, 64, 333] {
            let chunks: Vec<&[u8]> = ASKED.as_bytes().chunks(size).collect();
            assert_eq!(filter_in(&chunks).0, unasked(), "chunks of {size}");
        }
    }

    #[test]
    fn blank_lines_before_a_dropped_chunk_survive_any_cut() {
        // Found by the fuzzer: a cut just after an event's end made the
        // extra blank line part of the usage-only block, which then took it
        // along; uncut, the blank line was a block of its own and stayed.
        for blank in ["\n", "\r\n", "\n\r\n"] {
            let stream = format!(
                "data: {{\"a\":1}}\n\n{blank}data: {{\"choices\":[],\"usage\":{{}}}}\n\ndata: [DONE]\n\n"
            );
            let want = format!("data: {{\"a\":1}}\n\n{blank}data: [DONE]\n\n");
            let b = stream.as_bytes();
            assert_eq!(filter_in(&[b]).0, want, "{blank:?} uncut");
            for cut in 1..b.len() {
                let (out, f) = filter_in(&[&b[..cut], &b[cut..]]);
                assert_eq!(out, want, "{blank:?} cut at {cut}");
                assert_eq!(f.dropped, 1);
            }
        }
    }

    #[test]
    fn a_stream_asking_nothing_passes_untouched_and_uncopied() {
        let plain = unasked();
        let mut f = UsageChunkFilter::default();
        let b = Bytes::from(plain.clone());
        let out = f.feed(b.clone());
        assert_eq!(
            out.as_ptr(),
            b.as_ptr(),
            "whole events are passed as they came"
        );
        assert_eq!(out, plain.as_bytes());
    }

    #[test]
    fn chunk_edits_table() {
        use Chunk::*;
        let cases: &[(&str, Chunk)] = &[
            (r#"{"a":1,"usage":null}"#, Without(r#"{"a":1}"#.into())),
            (r#"{"usage":null,"a":1}"#, Without(r#"{"a":1}"#.into())),
            (
                r#"{ "a" : 1 , "usage" : null }"#,
                Without(r#"{ "a" : 1 }"#.into()),
            ),
            (
                r#"{"a":1,"usage":null,"b":[1.50,1e3]}"#,
                Without(r#"{"a":1,"b":[1.50,1e3]}"#.into()),
            ),
            (r#"{"usage":null}"#, Without("{}".into())),
            (r#"{"choices":[],"usage":{"prompt_tokens":1}}"#, UsageOnly),
            (r#"{"choices":[ ],"usage":{"prompt_tokens":1}}"#, UsageOnly),
            // Usage in a chunk with choices (some providers): the workload
            // may read it; left alone.
            (
                r#"{"choices":[{"index":0}],"usage":{"prompt_tokens":1}}"#,
                Keep,
            ),
            (r#"{"a":{"usage":null}}"#, Keep),
            (r#"{"us\u0061ge":null}"#, Keep),
            (r#"[1,2]"#, Keep),
            (r#"{"usage":null"#, Keep),
            (r#"{"a":"\"usage\":null"}"#, Keep),
        ];
        for (json, want) in cases {
            assert_eq!(&edit_chunk(json), want, "{json}");
        }
    }

    #[test]
    fn other_event_shapes_are_kept() {
        for block in [
            "event: x\ndata: {\"usage\":null,\n\n",
            "data: {\"a\":1,\ndata: \"usage\":null}\n\n",
            ": comment \"usage\"\n\n",
        ] {
            assert_eq!(edit_event(block.as_bytes()), Edit::Keep, "{block:?}");
        }
        // CRLF framing and an event name are kept around the edit.
        let e = edit_event(b"event: chunk\r\ndata: {\"a\":1,\"usage\":null}\r\n\r\n");
        assert_eq!(
            e,
            Edit::Replace(b"event: chunk\r\ndata: {\"a\":1}\r\n\r\n".to_vec())
        );
    }

    #[test]
    fn an_endless_event_is_passed_not_held() {
        let mut f = UsageChunkFilter::default();
        let big = vec![b'x'; MAX_PENDING + 1];
        let out = f.feed(Bytes::from(big.clone()));
        assert_eq!(out.len(), big.len());
        assert!(!f.holds());
        assert_eq!(
            f.feed(Bytes::from_static(b"data: {\"usage\":null}\n\n"))
                .len(),
            22
        );
    }

    #[test]
    fn asking_inserts_one_member_or_sets_it() {
        let b = br#"{"model":"m","stream":true,"messages":[]}"#;
        let out = ask(b, Ask::Insert).unwrap();
        assert_eq!(
            out,
            br#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"messages":[]}"#
        );
        let b = br#"  {"stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
        let v: Value = serde_json::from_slice(&ask(b, Ask::Set).unwrap()).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        let b = br#"{"stream":true,"stream_options":null}"#;
        let v: Value = serde_json::from_slice(&ask(b, Ask::Set).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(
            ask(b"{ }", Ask::Insert).unwrap(),
            br#"{"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(ask(b"[1]", Ask::Set), None);
        assert_eq!(ask(b"{nope", Ask::Set), None);
    }
}
