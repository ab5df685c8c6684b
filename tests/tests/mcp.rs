//! MCP servers governed per workload: the official MCP Python SDK's client
//! in a pod, against a remote MCP server built with the same SDK
//! (streamable HTTP over TLS) at an `mcp_servers` host. Tollgate
//! terminates, decides each JSON-RPC call by the rules' `mcp`, filters the
//! tool lists, limits calls per tool, and records each call; the server's
//! own log of the tools it ran is what the assertions trust.
use std::time::Duration;

use tollgate_tests::{
    TestNode, clients_dir,
    node::{MCP_HOST, MCP_PORT, UPSTREAM_V4_ALT},
    process::{Proc, wait_until},
    sdk::{run_python_with, sdk},
};

const CONFIG: &str = "mcp_servers:\n  - name: tools\n    hosts: [mcp.tools.test]\n    ports: [9443]\n\
policy:\n  default: deny\n  rules:\n    - name: tools\n      mcp: {servers: [tools], tools: {allow: [add, \"read_*\"]}}\n      action: allow\n      limits: {requests_per_minute: 2}\n";

/// The SDK's MCP server, in the upstream namespace at MCP_HOST's address,
/// serving `transport` (`streamable-http` or `sse`).
fn start_server(
    node: &TestNode,
    python: &std::path::Path,
    transport: &str,
) -> (Proc, std::path::PathBuf) {
    let log = node.dir.join("mcp-server-ran.jsonl");
    let dir = node.dir.display().to_string();
    let server = Proc::spawn(
        "mcp-server",
        node.upstream.command(python.to_str().unwrap()).args([
            clients_dir().join("mcp_server.py").to_str().unwrap(),
            UPSTREAM_V4_ALT,
            &MCP_PORT.to_string(),
            &format!("{dir}/upstream.crt"),
            &format!("{dir}/upstream.key"),
            log.to_str().unwrap(),
            transport,
        ]),
    );
    let up = wait_until(Duration::from_secs(20), || {
        let probe = format!(
            "import socket; socket.create_connection(('{UPSTREAM_V4_ALT}', {MCP_PORT}), 1)"
        );
        let ok = node
            .upstream
            .command("python3")
            .args(["-c", &probe])
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        ok.success().then_some(())
    });
    assert!(up.is_some(), "the MCP server did not come up");
    (server, log)
}

/// The tools the server ran, from its own log.
fn ran(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["tool"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn mcp_sdk_client_sees_only_allowed_tools_and_denied_calls_fail() {
    let test = "mcp_sdk_client_sees_only_allowed_tools_and_denied_calls_fail";
    let Some(python) = sdk(test, "venv/bin/python") else {
        return;
    };
    let mut node = TestNode::new(1);
    let (_server, log) = start_server(&node, &python, "streamable-http");
    node.start_agent(CONFIG);
    let url = format!("https://{MCP_HOST}:{MCP_PORT}/mcp");
    let got = run_python_with(
        &node,
        &python,
        "mcp_client.py",
        &[&url, "add", "read_file:3", "delete_repo"],
    );

    // The workload is shown the tools it may call, and nothing else.
    assert_eq!(
        got["tools"],
        serde_json::json!(["add", "read_file"]),
        "{got}"
    );
    let calls = got["calls"].as_array().unwrap();
    assert_eq!(calls[0]["text"], "3", "{got}");
    assert_eq!(calls[1]["text"], "contents of README.md", "{got}");
    assert_eq!(calls[2]["text"], "contents of README.md", "{got}");
    // Two calls a minute of each tool: the third read_file is refused.
    assert_eq!(calls[3]["error"], "MCPError", "{got}");
    assert!(
        calls[3]["message"].as_str().unwrap().contains("limit"),
        "{got}"
    );
    // A denied tool raises the SDK's MCP error with the policy's message.
    assert_eq!(calls[4]["error"], "MCPError", "{got}");
    assert!(
        calls[4]["message"]
            .as_str()
            .unwrap()
            .contains("tool `delete_repo` is not allowed by policy rule `tools`"),
        "{got}"
    );
    // Resources and prompts are not tool calls: allowed by the rule.
    assert_eq!(got["resource"], "note today", "{got}");
    assert_eq!(got["prompt"], "Please review: x = 1", "{got}");
    // The server ran exactly what was allowed.
    assert_eq!(ran(&log), ["add", "read_file", "read_file"]);

    // One record per call, with the workload's identity.
    let recs: Vec<serde_json::Value> = wait_until(Duration::from_secs(5), || {
        let r: Vec<_> = node
            .request_records()
            .into_iter()
            .filter(|r| r["operation"] == "mcp")
            .collect();
        (r.iter()
            .filter(|r| r["mcp"]["method"] == "tools/call")
            .count()
            >= 5)
            .then_some(r)
    })
    .unwrap_or_else(|| panic!("MCP records: {:?}", node.request_records()));
    let pod_uid = &node.pods[0].uid;
    for r in &recs {
        assert_eq!(r["provider"], "tools", "{r}");
        assert_eq!(r["workload"]["pod_uid"], pod_uid.as_str(), "{r}");
        assert_eq!(r["host"], MCP_HOST, "{r}");
    }
    let call = |tool: &str| -> Vec<&serde_json::Value> {
        recs.iter().filter(|r| r["mcp"]["tool"] == tool).collect()
    };
    let add = call("add")[0];
    assert_eq!(add["decision"], "allow", "{add}");
    assert_eq!(add["mcp"]["outcome"], "result", "{add}");
    assert_eq!(add["mcp"]["client"]["name"], "mcp", "{add}");
    assert_eq!(add["mcp"]["server"]["name"], "tollgate-test-tools", "{add}");
    assert!(add["mcp"]["argument_bytes"].as_u64().unwrap() > 0, "{add}");
    let denied = call("delete_repo")[0];
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(denied["reason"], "rule:tools", "{denied}");
    assert_eq!(
        denied["status"], 200,
        "answered as a JSON-RPC error: {denied}"
    );
    let limited = call("read_file")[2];
    assert_eq!(limited["result"], "rate_limited", "{limited}");
    assert_eq!(limited["reason"], "rule:tools:requests", "{limited}");
    let list = recs
        .iter()
        .find(|r| r["mcp"]["method"] == "tools/list")
        .unwrap_or_else(|| panic!("no tools/list record: {recs:?}"));
    assert_eq!(list["mcp"]["tools_listed"], 3, "{list}");
    assert_eq!(list["mcp"]["tools_hidden"], 1, "{list}");
    for method in ["resources/read", "prompts/get"] {
        assert!(
            recs.iter().any(|r| r["mcp"]["method"] == method),
            "{method}: {recs:?}"
        );
    }

    let m = node.metrics();
    for series in [
        "result=\"ok\",server=\"tools\",tool=\"add\"",
        "result=\"denied\",server=\"tools\",tool=\"delete_repo\"",
        "result=\"rate_limited\",server=\"tools\",tool=\"read_file\"",
    ] {
        assert!(
            m.lines().any(|l| l.starts_with("tollgate_mcp_calls_total")
                && l.contains("method=\"tools/call\"")
                && l.contains(series)),
            "{series} not in:\n{}",
            m.lines()
                .filter(|l| l.contains("mcp"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// What a pod's own client sends to reach a denied tool anyway: a batch
/// that hides it behind an allowed call, routing headers that name another
/// tool, a body that is not JSON-RPC, and a plain call. Each is refused and
/// the server never runs the tool.
#[test]
fn mcp_denied_tools_stay_denied_however_the_call_is_dressed() {
    let test = "mcp_denied_tools_stay_denied_however_the_call_is_dressed";
    let Some(python) = sdk(test, "venv/bin/python") else {
        return;
    };
    let mut node = TestNode::new(1);
    let (_server, log) = start_server(&node, &python, "streamable-http");
    node.start_agent(CONFIG);
    let script = r#"
import http.client, json, ssl, sys
ca, host, addr, port = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
def post(body, headers={}):
    c = http.client.HTTPSConnection(addr, int(port), context=ctx)
    c.sock = ctx.wrap_socket(__import__("socket").create_connection((addr, int(port))), server_hostname=host)
    h = {"content-type": "application/json", "accept": "application/json, text/event-stream",
         "host": host, "mcp-protocol-version": "2026-07-28"}
    h.update(headers)
    c.request("POST", "/mcp", body=body, headers=h)
    r = c.getresponse()
    return {"status": r.status, "body": r.read().decode(errors="replace")}
call = lambda i, tool: {"jsonrpc": "2.0", "id": i, "method": "tools/call",
                        "params": {"name": tool, "arguments": {"name": "prod"}}}
out = {
    "batch": post(json.dumps([call(1, "add"), call(2, "delete_repo")])),
    "header": post(json.dumps(call(3, "delete_repo")), {"mcp-method": "tools/call", "mcp-name": "add"}),
    "garbage": post('{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"delete_repo"'),
    "plain": post(json.dumps(call(5, "delete_repo")), {"mcp-session-id": "s-123"}),
    "session": "sha256:" + __import__("hashlib").sha256(b"s-123").hexdigest()[:16],
}
print(json.dumps(out))
"#;
    let pod = &node.pods[0];
    let out = pod.python(
        script,
        &[
            node.node_ca_cert().to_str().unwrap(),
            MCP_HOST,
            UPSTREAM_V4_ALT,
            &MCP_PORT.to_string(),
        ],
    );
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let body = |k: &str| -> serde_json::Value {
        serde_json::from_str(got[k]["body"].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{k}: {e}: {got}"))
    };
    // The batch is refused whole, each request with its own error.
    let batch = body("batch");
    assert_eq!(got["batch"]["status"], 200, "{got}");
    assert_eq!(batch[0]["id"], 1, "{got}");
    assert_eq!(batch[1]["id"], 2, "{got}");
    assert!(
        batch[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("delete_repo"),
        "{got}"
    );
    for k in ["header", "garbage"] {
        assert_eq!(got[k]["status"], 400, "{k}: {got}");
        assert!(
            body(k)["error"]["code"].as_i64().unwrap() < -32000,
            "{k}: {got}"
        );
    }
    assert!(
        body("header")["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mcp-name"),
        "{got}"
    );
    assert_eq!(body("plain")["id"], 5, "{got}");
    assert_eq!(body("plain")["error"]["code"], -32041, "{got}");
    // The server's own log: nothing reached it (not even the batch's `add`).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        ran(&log),
        Vec::<String>::new(),
        "agent log:\n{}",
        node.agent_log()
    );
    let recs = node.wait_requests(4);
    assert!(recs.iter().all(|r| r["decision"] == "deny"), "{recs:?}");
    let unreadable = recs
        .iter()
        .filter(|r| r["reason"] == "mcp_unreadable")
        .count();
    assert_eq!(unreadable, 2, "{recs:?}");
    // The session is recorded by a digest of its id, never the id itself.
    let plain = recs.iter().find(|r| r["mcp"]["id"] == "5").unwrap();
    assert_eq!(plain["mcp"]["session"], got["session"], "{plain}");
    assert!(!plain.to_string().contains("s-123"), "{plain}");
}

/// The older HTTP+SSE transport (answers on the event stream a GET opened,
/// POSTs answered 202): the tool list on the stream is filtered, and a
/// refused call's error reaches the client on its stream, so the SDK
/// raises it instead of waiting out its timeout.
#[test]
fn mcp_sdk_client_over_the_older_sse_transport_is_governed_too() {
    let test = "mcp_sdk_client_over_the_older_sse_transport_is_governed_too";
    let Some(python) = sdk(test, "venv/bin/python") else {
        return;
    };
    let mut node = TestNode::new(1);
    let (_server, log) = start_server(&node, &python, "sse");
    node.start_agent(CONFIG);
    let url = format!("https://{MCP_HOST}:{MCP_PORT}/sse");
    let got = run_python_with(
        &node,
        &python,
        "mcp_client.py",
        &[&url, "add", "delete_repo"],
    );
    assert_eq!(
        got["tools"],
        serde_json::json!(["add", "read_file"]),
        "{got}"
    );
    assert_eq!(got["calls"][0]["text"], "3", "{got}");
    assert_eq!(got["calls"][1]["error"], "MCPError", "{got}");
    assert!(
        got["calls"][1]["message"]
            .as_str()
            .unwrap()
            .contains("tool `delete_repo` is not allowed"),
        "{got}"
    );
    assert_eq!(got["resource"], "note today", "{got}");
    assert_eq!(ran(&log), ["add"]);
    let recs = node.wait_requests(1);
    let denied = recs
        .iter()
        .find(|r| r["mcp"]["tool"] == "delete_repo")
        .unwrap_or_else(|| panic!("{recs:?}"));
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(denied["status"], 202, "answered on the stream: {denied}");
}
