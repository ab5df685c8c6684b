//! What an MCP server answers, read as it is relayed: the outcome of the
//! workload's call (result, JSON-RPC error, or a tool's own error), the
//! server's name, the messages the server sent of its own (progress,
//! sampling requests), and — the one edit — the tools of a tool list the
//! policy would not let this workload call, taken out, so a workload is
//! shown only what it may use.
//!
//! A JSON answer is held whole (MCP answers are small; bounded) and
//! passed on once read; an event stream passes event by event, each
//! complete event at once, unchanged unless it is a tool list that lost
//! tools.
use std::sync::Arc;

use hyper::body::Bytes;
use serde::Serialize;
use serde_json::Value;

use super::{
    mcp::{Peer, peer},
    sse,
};

/// Whether the workload may call a tool of this server (the policy's
/// answer for a `tools/call` of it).
pub type Visible = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Largest JSON answer, or single event, held to be read and filtered.
pub const MAX_HELD: usize = 16 * 1024 * 1024;

/// How the server answered the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A JSON-RPC result.
    Result,
    /// A JSON-RPC error.
    Error,
    /// A `tools/call` result with `isError: true` (the tool failed; the
    /// protocol did not).
    ToolError,
}

/// What the answer said, for the record.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Answered {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<Peer>,
    /// Tools in the tool lists answered, as the server sent them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools_listed: Option<u32>,
    /// Of those, the ones taken out (the policy denies them this workload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools_hidden: Option<u32>,
    /// Requests and notifications of the server's own in the answer.
    #[serde(skip_serializing_if = "is_zero")]
    pub server_messages: u32,
    /// The older HTTP+SSE transport: where its event stream's `endpoint`
    /// event tells the client to POST its messages.
    #[serde(skip)]
    pub endpoint: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A tool list too large to be read cannot be filtered, and is not passed
/// on unfiltered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the MCP server's answer holds more than {MAX_HELD} bytes before it can be read; \
     a tool list that large is not passed on unfiltered"
)]
pub struct TooLarge;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Json,
    Events,
    /// Neither: passed as it is (an empty 202, an error page).
    Opaque,
}

pub struct ResponseReader {
    framing: Framing,
    /// The ids of the workload's requests, whose answers are looked for.
    ids: Vec<Value>,
    visible: Option<Visible>,
    held: Vec<u8>,
    /// Over the bound with nothing to filter: the rest passes unread.
    passthrough: bool,
    pub answered: Answered,
}

impl std::fmt::Debug for ResponseReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseReader")
            .field("framing", &self.framing)
            .field("held", &self.held.len())
            .field("answered", &self.answered)
            .finish()
    }
}

impl ResponseReader {
    /// `content_type` of the answer; `ids` of the requests it answers;
    /// `visible` filters tool lists (None: every tool is shown).
    pub fn new(content_type: &str, ids: Vec<Value>, visible: Option<Visible>) -> Self {
        let framing = if content_type.starts_with("text/event-stream") {
            Framing::Events
        } else if content_type.starts_with("application/json") || content_type.is_empty() {
            Framing::Json
        } else {
            Framing::Opaque
        };
        Self {
            framing,
            ids,
            visible,
            held: Vec::new(),
            passthrough: false,
            answered: Answered::default(),
        }
    }

    /// The server's bytes in; what the workload gets now out.
    pub fn feed(&mut self, chunk: Bytes) -> Result<Bytes, TooLarge> {
        if self.passthrough || self.framing == Framing::Opaque {
            return Ok(chunk);
        }
        if self.held.len() + chunk.len() > MAX_HELD {
            if self.visible.is_some() {
                return Err(TooLarge);
            }
            self.passthrough = true;
            let mut out = std::mem::take(&mut self.held);
            out.extend_from_slice(&chunk);
            return Ok(Bytes::from(out));
        }
        self.held.extend_from_slice(&chunk);
        if self.framing == Framing::Json {
            return Ok(Bytes::new());
        }
        let Some(end) = sse::event_ends(&self.held).last() else {
            return Ok(Bytes::new());
        };
        let rest = self.held.split_off(end);
        let events = std::mem::replace(&mut self.held, rest);
        Ok(Bytes::from(self.events(&events)))
    }

    /// The end of the answer: what was held, read and passed on.
    pub fn finish(&mut self) -> Bytes {
        let held = std::mem::take(&mut self.held);
        if self.passthrough {
            return Bytes::from(held);
        }
        match self.framing {
            Framing::Opaque => Bytes::from(held),
            // An unterminated last event is read like a complete one.
            Framing::Events => Bytes::from(self.events(&held)),
            Framing::Json => match serde_json::from_slice::<Value>(&held) {
                Ok(mut v) => {
                    if self.read(&mut v) {
                        Bytes::from(v.to_string())
                    } else {
                        Bytes::from(held)
                    }
                }
                Err(_) => Bytes::from(held),
            },
        }
    }

    fn events(&mut self, events: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(events.len());
        let mut start = 0;
        let ends: Vec<usize> = sse::event_ends(events).collect();
        let last = if ends.last() == Some(&events.len()) || events.is_empty() {
            None
        } else {
            Some(events.len())
        };
        for end in ends.into_iter().chain(last) {
            let block = &events[start..end];
            start = end;
            match self.event(block) {
                Some(edited) => out.extend_from_slice(&edited),
                None => out.extend_from_slice(block),
            }
        }
        out
    }

    /// One event: read; Some when it had to be rewritten.
    fn event(&mut self, block: &[u8]) -> Option<Vec<u8>> {
        let mut event = None;
        let mut p = sse::SseParser::default();
        p.feed(block, |e| event = Some(e.clone()));
        // An event without its blank line yet (the stream's last).
        p.feed(b"\n\n", |e| event = Some(e.clone()));
        let event = event?;
        if event.event == "endpoint" {
            self.answered.endpoint = Some(super::mcp::bounded(event.data.trim()));
            return None;
        }
        let mut v: Value = serde_json::from_str(&event.data).ok()?;
        if !self.read(&mut v) {
            return None;
        }
        Some(rewrite_data(block, &v.to_string()))
    }

    /// Read one JSON-RPC message (or batch); true when tools were taken out.
    fn read(&mut self, v: &mut Value) -> bool {
        match v {
            Value::Array(items) => {
                let mut changed = false;
                for item in items {
                    changed |= self.read(item);
                }
                changed
            }
            Value::Object(o) => {
                // A request or notification of the server's own. Its tool
                // list, if it (invalidly) has one, is filtered all the
                // same: a client may read any message with a result as one.
                let servers = o.contains_key("method");
                if servers {
                    self.answered.server_messages += 1;
                }
                let ours = !servers && o.get("id").is_some_and(|id| self.ids.contains(id));
                if let Some(e) = o.get("error")
                    && ours
                {
                    self.answered.outcome = Some(Outcome::Error);
                    self.answered.error_code = e.get("code").and_then(Value::as_i64);
                }
                let Some(result) = o.get_mut("result") else {
                    return false;
                };
                if ours && self.answered.outcome.is_none() {
                    let tool_failed = result.get("isError").and_then(Value::as_bool) == Some(true);
                    self.answered.outcome = Some(if tool_failed {
                        Outcome::ToolError
                    } else {
                        Outcome::Result
                    });
                    let server = result.get("serverInfo").or_else(|| {
                        result
                            .get("_meta")
                            .and_then(|m| m.get("io.modelcontextprotocol/serverInfo"))
                    });
                    if let Some(s) = server.and_then(peer) {
                        self.answered.server = Some(s);
                    }
                }
                self.filter_tools(result)
            }
            _ => false,
        }
    }

    /// A tool list (`result.tools`): count it, and take out what the
    /// workload may not call. True when something was taken out.
    fn filter_tools(&mut self, result: &mut Value) -> bool {
        let Some(tools) = result.get_mut("tools").and_then(Value::as_array_mut) else {
            return false;
        };
        let before = tools.len() as u32;
        *self.answered.tools_listed.get_or_insert(0) += before;
        let Some(visible) = &self.visible else {
            return false;
        };
        tools.retain(|t| {
            t.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| visible(n))
        });
        let hidden = before - tools.len() as u32;
        *self.answered.tools_hidden.get_or_insert(0) += hidden;
        hidden > 0
    }
}

/// The event `block` with its data replaced by `data` (one line: JSON as
/// serialised has no newline); its other fields (`event`, `id`, `retry`)
/// kept, so a client's resumption from an event id still works.
fn rewrite_data(block: &[u8], data: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(block);
    let mut out = String::with_capacity(data.len() + 64);
    let mut placed = false;
    for line in text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)) {
        if line.is_empty() {
            continue;
        }
        if line == "data" || line.starts_with("data:") {
            if !placed {
                out.push_str("data: ");
                out.push_str(data);
                out.push('\n');
                placed = true;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LIST: &str = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"add","inputSchema":{}},{"name":"delete_repo","inputSchema":{}}]}}"#;

    fn only_add() -> Option<Visible> {
        Some(Arc::new(|t: &str| t == "add"))
    }

    fn run(reader: &mut ResponseReader, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&reader.feed(Bytes::copy_from_slice(c)).unwrap());
        }
        out.extend_from_slice(&reader.finish());
        out
    }

    #[test]
    fn a_json_tool_list_loses_the_tools_the_workload_may_not_call() {
        let mut r = ResponseReader::new("application/json", vec![json!(2)], only_add());
        let out = run(&mut r, &[&LIST.as_bytes()[..30], &LIST.as_bytes()[30..]]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 1);
        assert_eq!(v["result"]["tools"][0]["name"], "add");
        assert_eq!(r.answered.tools_listed, Some(2));
        assert_eq!(r.answered.tools_hidden, Some(1));
        assert_eq!(r.answered.outcome, Some(Outcome::Result));
        // Nothing to hide: the bytes pass as they came.
        let mut r = ResponseReader::new("application/json", vec![json!(2)], None);
        assert_eq!(run(&mut r, &[LIST.as_bytes()]), LIST.as_bytes());
    }

    #[test]
    fn an_event_stream_is_filtered_event_by_event_and_keeps_its_ids() {
        let stream = format!(
            "event: message\nid: e1\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{}}}}\n\n\
             event: message\nid: e2\ndata: {LIST}\n\n"
        );
        let whole = {
            let mut r = ResponseReader::new("text/event-stream", vec![json!(2)], only_add());
            let out = run(&mut r, &[stream.as_bytes()]);
            assert_eq!(r.answered.server_messages, 1);
            assert_eq!(r.answered.tools_hidden, Some(1));
            out
        };
        let text = String::from_utf8(whole.clone()).unwrap();
        assert!(
            text.starts_with("event: message\nid: e1\ndata: {\"jsonrpc\""),
            "{text}"
        );
        assert!(text.contains("id: e2\ndata: {"), "{text}");
        assert!(!text.contains("delete_repo"), "{text}");
        assert!(text.ends_with("\n\n"));
        // Byte by byte: the same bytes out.
        let mut r = ResponseReader::new("text/event-stream", vec![json!(2)], only_add());
        let bytes: Vec<&[u8]> = stream.as_bytes().chunks(1).collect();
        assert_eq!(run(&mut r, &bytes), whole);
    }

    #[test]
    fn outcomes_of_the_call_are_told_apart() {
        for (body, want, code) in [
            (
                r#"{"jsonrpc":"2.0","id":3,"result":{"content":[],"isError":false}}"#,
                Outcome::Result,
                None,
            ),
            (
                r#"{"jsonrpc":"2.0","id":3,"result":{"content":[],"isError":true}}"#,
                Outcome::ToolError,
                None,
            ),
            (
                r#"{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"bad"}}"#,
                Outcome::Error,
                Some(-32602),
            ),
        ] {
            let mut r = ResponseReader::new("application/json", vec![json!(3)], None);
            run(&mut r, &[body.as_bytes()]);
            assert_eq!(r.answered.outcome, Some(want), "{body}");
            assert_eq!(r.answered.error_code, code, "{body}");
        }
        // Another request's answer is not this call's.
        let mut r = ResponseReader::new("application/json", vec![json!(4)], None);
        run(&mut r, &[br#"{"jsonrpc":"2.0","id":3,"result":{}}"#]);
        assert_eq!(r.answered.outcome, None);
    }

    #[test]
    fn the_server_names_itself_in_either_generation() {
        for body in [
            r#"{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18","serverInfo":{"name":"gh","version":"1"}}}"#,
            r#"{"jsonrpc":"2.0","id":0,"result":{"_meta":{"io.modelcontextprotocol/serverInfo":{"name":"gh","version":"1"}}}}"#,
        ] {
            let mut r = ResponseReader::new("application/json", vec![json!(0)], None);
            run(&mut r, &[body.as_bytes()]);
            assert_eq!(r.answered.server.as_ref().unwrap().name, "gh", "{body}");
        }
    }

    #[test]
    fn a_tool_list_too_large_to_read_is_not_passed_unfiltered() {
        let mut r = ResponseReader::new("application/json", vec![json!(2)], only_add());
        let big = Bytes::from(vec![b' '; MAX_HELD + 1]);
        assert_eq!(r.feed(big.clone()), Err(TooLarge));
        // With nothing to filter it passes, unread.
        let mut r = ResponseReader::new("application/json", vec![json!(2)], None);
        assert_eq!(r.feed(big.clone()).unwrap().len(), big.len());
        assert_eq!(
            r.feed(Bytes::from_static(b"x")).unwrap(),
            Bytes::from_static(b"x")
        );
    }

    #[test]
    fn the_older_transport_names_its_endpoint() {
        let mut r = ResponseReader::new("text/event-stream", vec![], only_add());
        let stream = b"event: endpoint\r\ndata: /messages/?session_id=ab12\r\n\r\n";
        assert_eq!(run(&mut r, &[stream]), stream, "passed as it came");
        assert_eq!(
            r.answered.endpoint.as_deref(),
            Some("/messages/?session_id=ab12")
        );
    }

    #[test]
    fn a_tool_list_in_any_message_is_filtered() {
        // Found by fuzzing: a message with both `method` and `result`.
        let odd = r#"{"jsonrpc":"2.0","method":"notifications/x","id":"a","result":{"tools":[{"name":"delete_repo"},{"name":"add"}]}}"#;
        let mut r = ResponseReader::new("application/json", vec![json!("a")], only_add());
        let out = String::from_utf8(run(&mut r, &[odd.as_bytes()])).unwrap();
        assert!(!out.contains("delete_repo"), "{out}");
    }

    #[test]
    fn garbage_passes_unchanged_and_never_panics() {
        for ct in ["application/json", "text/event-stream", "text/html", ""] {
            let mut r = ResponseReader::new(ct, vec![json!(1)], only_add());
            let junk: &[u8] = b"\xff\xfe{\"result\":{\"tools\":5}}\n\ndata: [1,2\n\ndata: {\"result\":{\"tools\":[7,{\"name\":3}]}}\n\n";
            let out = run(&mut r, &[junk]);
            assert!(!out.is_empty(), "{ct}");
        }
    }
}
