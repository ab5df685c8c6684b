//! MCP (Model Context Protocol) servers, as far as governing a workload's
//! calls needs them: JSON-RPC 2.0 messages over streamable HTTP (a POST per
//! message, answered as JSON or as a stream of server-sent events), and the
//! older HTTP+SSE transport (messages POSTed, answers on an event stream).
//!
//! What a workload's message asks — its method, and the tool, resource or
//! prompt it names — is read here (`read_request`), for the policy and the
//! record; what the server answers is read, and its tool lists filtered,
//! by `mcp_response`. Both protocol generations are understood: the
//! session-based one (`initialize`, `Mcp-Session-Id`) and the stateless
//! 2026 one (`server/discover`, client information in every request's
//! `_meta`, the `Mcp-Method` and `Mcp-Name` headers).
use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{Adapter, Api, Operation, ParseState, RateLimitHint, RequestInfo, Upstream, sse};

/// The adapter: every message to an MCP server is one `mcp` operation with
/// no model; responses carry no token usage.
#[derive(Debug)]
pub struct Mcp;

impl Adapter for Mcp {
    fn api(&self) -> Api {
        Api::Mcp
    }

    fn request(&self, _path: &str, _query: &str, _body: Option<&Value>) -> RequestInfo {
        RequestInfo {
            operation: Operation::Mcp,
            model: None,
            stream: false,
        }
    }

    fn on_json(&self, _: &mut ParseState, _: &Value) {}

    fn on_event(&self, _: &mut ParseState, _: &sse::SseEvent) {}

    fn set_model(&self, _: &mut String, _: &mut Map<String, Value>, _: &str) -> bool {
        false
    }

    fn cap_output(&self, _: Upstream<'_>, _: &str, _: &mut Map<String, Value>, _: u64) -> bool {
        false
    }

    /// Remote MCP servers take OAuth bearer tokens (MCP authorization).
    fn credential(&self, _: Upstream<'_>, key: &str) -> (&'static str, String) {
        ("authorization", format!("Bearer {key}"))
    }

    /// An error the proxy answers at the HTTP level (a body too large, an
    /// unreachable server): a JSON-RPC error without an id, which MCP
    /// clients report as the transport's failure. Refusals of a call the
    /// policy decided are answered with the call's id instead
    /// (`error_response`).
    fn error_body(
        &self,
        status: u16,
        message: &str,
        code: &str,
        retry: Option<Duration>,
    ) -> String {
        let _ = status;
        error_response(&[Value::Null], REFUSED, message, code, retry)
    }

    fn rate_limit_headers(&self, _: &RateLimitHint<'_>) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// JSON-RPC error codes of Tollgate's own answers (the implementation-
/// defined server-error range, -32000 to -32099).
pub const DENIED: i64 = -32041;
pub const RATE_LIMITED: i64 = -32042;
pub const REFUSED: i64 = -32043;
/// JSON-RPC's own: the body is not JSON, or not a JSON-RPC message.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;

/// Longest name, URI or version kept in a record (MCP tool names are at
/// most 128 characters; a URI can be anything).
const MAX_NAME: usize = 256;

/// A client or server as it names itself (`clientInfo`, `serverInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
}

/// One JSON-RPC message of the workload's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// The request's id; None for a notification or a response.
    pub id: Option<Value>,
    /// None for a response (to a request of the server's: sampling,
    /// elicitation, roots).
    pub method: Option<String>,
    /// `tools/call`: the tool.
    pub tool: Option<String>,
    /// `resources/read`, `resources/subscribe`: the resource's URI.
    pub resource: Option<String>,
    /// `prompts/get`: the prompt.
    pub prompt: Option<String>,
    /// `tools/call`: bytes of its `arguments` as JSON.
    pub argument_bytes: Option<u64>,
    /// `initialize`'s `clientInfo`, or the 2026 protocol's
    /// `_meta["io.modelcontextprotocol/clientInfo"]`.
    pub client: Option<Peer>,
    pub protocol_version: Option<String>,
}

impl Message {
    pub fn is_request(&self) -> bool {
        self.id.is_some() && self.method.is_some()
    }
}

/// Why a POSTed body is refused before any rule sees it: what cannot be
/// read cannot be decided, and a server may read it differently.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("the body is not JSON")]
    NotJson,
    #[error("the body is not a JSON-RPC message (an object with `method`, or `result`/`error`)")]
    NotJsonRpc,
    #[error("the `{header}` header says `{said}` but the message says `{body}`")]
    HeaderMismatch {
        header: &'static str,
        said: String,
        body: String,
    },
}

/// The messages of a POSTed body: one JSON-RPC message, or a batch (an
/// array, as the 2025-03-26 protocol allowed).
pub fn read_request(body: &[u8]) -> Result<Vec<Message>, Unreadable> {
    let v: Value = serde_json::from_slice(body).map_err(|_| Unreadable::NotJson)?;
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(message).collect(),
        Value::Object(_) => Ok(vec![message(&v)?]),
        _ => Err(Unreadable::NotJsonRpc),
    }
}

fn message(v: &Value) -> Result<Message, Unreadable> {
    let o = v.as_object().ok_or(Unreadable::NotJsonRpc)?;
    let method = match o.get("method") {
        Some(Value::String(m)) => Some(m.clone()),
        Some(_) => return Err(Unreadable::NotJsonRpc),
        None if o.contains_key("result") || o.contains_key("error") => None,
        None => return Err(Unreadable::NotJsonRpc),
    };
    let id = o
        .get("id")
        .filter(|id| id.is_string() || id.is_number())
        .cloned();
    let params = o.get("params").unwrap_or(&Value::Null);
    let name = |key: &str| params.get(key).and_then(Value::as_str).map(bounded);
    let mut m = Message {
        id,
        method,
        ..Default::default()
    };
    match m.method.as_deref() {
        Some("tools/call") => {
            m.tool = Some(name("name").ok_or(Unreadable::NotJsonRpc)?);
            m.argument_bytes = Some(
                params
                    .get("arguments")
                    .map_or(0, |a| a.to_string().len() as u64),
            );
        }
        Some("resources/read" | "resources/subscribe" | "resources/unsubscribe") => {
            m.resource = name("uri");
        }
        Some("prompts/get") => m.prompt = name("name"),
        Some("initialize") => {
            m.client = params.get("clientInfo").and_then(peer);
            m.protocol_version = name("protocolVersion");
        }
        _ => {}
    }
    let meta = params.get("_meta");
    if m.client.is_none() {
        m.client = meta
            .and_then(|x| x.get("io.modelcontextprotocol/clientInfo"))
            .and_then(peer);
    }
    if m.protocol_version.is_none() {
        m.protocol_version = meta
            .and_then(|x| x.get("io.modelcontextprotocol/protocolVersion"))
            .and_then(Value::as_str)
            .map(bounded);
    }
    Ok(m)
}

/// The 2026 protocol repeats a request's method and tool in headers
/// (`Mcp-Method`, `Mcp-Name`) for servers and gateways that route on
/// them. The policy decides by the body; a header that says otherwise
/// could make the server run what the policy did not decide, so the two
/// must agree. `header` returns a request header's value.
pub fn check_headers<'h>(
    messages: &[Message],
    header: impl Fn(&str) -> Option<&'h str>,
) -> Result<(), Unreadable> {
    let [m] = messages else {
        // A batch has no per-message headers to compare.
        return Ok(());
    };
    let named = m
        .tool
        .as_deref()
        .or(m.prompt.as_deref())
        .or(m.resource.as_deref());
    for (h, body) in [("mcp-method", m.method.as_deref()), ("mcp-name", named)] {
        if let Some(said) = header(h)
            && Some(said) != body
        {
            return Err(Unreadable::HeaderMismatch {
                header: h,
                said: said.to_string(),
                body: body.unwrap_or("(nothing)").to_string(),
            });
        }
    }
    Ok(())
}

/// A JSON-RPC error answer to each request id in `ids` (one object, or an
/// array for a batch), the MCP error shape a client raises as an error of
/// the call (the Python SDK's `MCPError`). `reason` is Tollgate's (the
/// record's), `retry` when the call may be tried again later.
pub fn error_response(
    ids: &[Value],
    code: i64,
    message: &str,
    reason: &str,
    retry: Option<Duration>,
) -> String {
    let one = |id: &Value| {
        let mut data = json!({"reason": reason});
        if let Some(r) = retry {
            data["retry_after_ms"] = json!(r.as_millis() as u64);
        }
        json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message, "data": data}})
    };
    match ids {
        [id] => one(id).to_string(),
        _ => Value::Array(ids.iter().map(one).collect()).to_string(),
    }
}

pub(crate) fn peer(v: &Value) -> Option<Peer> {
    Some(Peer {
        name: bounded(v.get("name")?.as_str()?),
        version: v
            .get("version")
            .and_then(Value::as_str)
            .map(bounded)
            .unwrap_or_default(),
    })
}

pub(crate) fn bounded(s: &str) -> String {
    if s.len() <= MAX_NAME {
        return s.to_string();
    }
    let mut end = MAX_NAME;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The `method` label of `tollgate_mcp_calls_total`: the protocol's own
/// methods by name, any other `other`, so a workload cannot grow the
/// label set. `http` is the HTTP method, for what has no JSON-RPC method.
pub fn method_label(method: Option<&str>, http: &str) -> &'static str {
    const KNOWN: [&str; 18] = [
        "initialize",
        "ping",
        "server/discover",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "tasks/get",
        "tasks/list",
        "tasks/result",
        "tasks/cancel",
    ];
    match method {
        Some(m) => {
            KNOWN
                .iter()
                .copied()
                .find(|k| *k == m)
                .unwrap_or(if m.starts_with("notifications/") {
                    "notification"
                } else {
                    "other"
                })
        }
        None if http == "GET" => "stream",
        None if http == "DELETE" => "session_end",
        None => "response",
    }
}

/// A JSON-RPC id as the record shows it.
pub fn id_text(id: &Value) -> String {
    match id {
        Value::String(s) => bounded(s),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read_for_what_they_name() {
        // body, method, tool, resource-or-prompt
        type Row = (
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
            Option<&'static str>,
        );
        let table: &[Row] = &[
            (
                r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"add","arguments":{"a":1}}}"#,
                Some("tools/call"),
                Some("add"),
                None,
            ),
            (
                r#"{"jsonrpc":"2.0","id":"r","method":"resources/read","params":{"uri":"file:///etc/x"}}"#,
                Some("resources/read"),
                None,
                Some("file:///etc/x"),
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"review"}}"#,
                Some("prompts/get"),
                None,
                Some("review"),
            ),
            (
                r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
                Some("notifications/initialized"),
                None,
                None,
            ),
            (
                r#"{"jsonrpc":"2.0","id":9,"result":{"content":[]}}"#,
                None,
                None,
                None,
            ),
        ];
        for (body, method, tool, named) in table {
            let m = &read_request(body.as_bytes()).unwrap()[0];
            assert_eq!(m.method.as_deref(), *method, "{body}");
            assert_eq!(m.tool.as_deref(), *tool, "{body}");
            assert_eq!(
                m.resource.as_deref().or(m.prompt.as_deref()),
                *named,
                "{body}"
            );
        }
        let m = &read_request(
            br#"{"id":3,"method":"tools/call","params":{"name":"t","arguments":{"a":1}}}"#,
        )
        .unwrap()[0];
        assert_eq!(m.argument_bytes, Some(7));
        assert!(m.is_request());
    }

    #[test]
    fn both_protocol_generations_name_the_client() {
        let old = br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","clientInfo":{"name":"claude-code","version":"2.1"},"capabilities":{}}}"#;
        let m = &read_request(old).unwrap()[0];
        assert_eq!(m.client.as_ref().unwrap().name, "claude-code");
        assert_eq!(m.protocol_version.as_deref(), Some("2025-06-18"));
        let new = br#"{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"mcp","version":"0.1.0"}}}}"#;
        let m = &read_request(new).unwrap()[0];
        assert_eq!(
            m.client,
            Some(Peer {
                name: "mcp".into(),
                version: "0.1.0".into()
            })
        );
        assert_eq!(m.protocol_version.as_deref(), Some("2026-07-28"));
    }

    #[test]
    fn what_cannot_be_decided_is_unreadable() {
        for (body, want) in [
            (&b"not json"[..], Unreadable::NotJson),
            (b"[]", Unreadable::NotJsonRpc),
            (b"42", Unreadable::NotJsonRpc),
            (br#"{"id":1}"#, Unreadable::NotJsonRpc),
            (br#"{"id":1,"method":7}"#, Unreadable::NotJsonRpc),
            // A tool call must name its tool: a rule over tools could not decide it.
            (
                br#"{"id":1,"method":"tools/call","params":{}}"#,
                Unreadable::NotJsonRpc,
            ),
            (br#"[{"id":1,"method":"ping"}, 5]"#, Unreadable::NotJsonRpc),
        ] {
            assert_eq!(
                read_request(body),
                Err(want),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let batch =
            read_request(br#"[{"id":1,"method":"ping"},{"method":"notifications/x"}]"#).unwrap();
        assert_eq!(batch.len(), 2);
        assert!(batch[0].is_request() && !batch[1].is_request());
    }

    #[test]
    fn routing_headers_must_agree_with_the_body() {
        let m = read_request(br#"{"id":1,"method":"tools/call","params":{"name":"add"}}"#).unwrap();
        let headers = |pairs: &'static [(&'static str, &'static str)]| {
            move |h: &str| pairs.iter().find(|(k, _)| *k == h).map(|(_, v)| *v)
        };
        assert_eq!(check_headers(&m, headers(&[])), Ok(()));
        assert_eq!(
            check_headers(
                &m,
                headers(&[("mcp-method", "tools/call"), ("mcp-name", "add")])
            ),
            Ok(())
        );
        assert!(matches!(
            check_headers(&m, headers(&[("mcp-name", "delete_repo")])),
            Err(Unreadable::HeaderMismatch {
                header: "mcp-name",
                ..
            })
        ));
        assert!(matches!(
            check_headers(&m, headers(&[("mcp-method", "tools/list")])),
            Err(Unreadable::HeaderMismatch {
                header: "mcp-method",
                ..
            })
        ));
    }

    #[test]
    fn refusals_answer_each_request_id() {
        let v: Value = serde_json::from_str(&error_response(
            &[json!(7)],
            DENIED,
            "tollgate: no",
            "rule:r",
            Some(Duration::from_secs(2)),
        ))
        .unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["code"], DENIED);
        assert_eq!(v["error"]["data"]["retry_after_ms"], 2000);
        let v: Value = serde_json::from_str(&error_response(
            &[json!(1), json!("b")],
            DENIED,
            "m",
            "r",
            None,
        ))
        .unwrap();
        assert_eq!(v[1]["id"], "b");
    }

    #[test]
    fn names_are_bounded_on_a_char_boundary() {
        let long = "é".repeat(200);
        let b = bounded(&long);
        assert!(b.len() <= MAX_NAME && b.chars().all(|c| c == 'é'));
    }
}
