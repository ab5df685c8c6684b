//! TLS 1.3 session tickets on terminated connections (`tls.session_tickets`).
//! The Python `websockets` client behind the OpenAI SDK's Realtime API reads
//! its TLS socket from one thread while another writes the handshake
//! request; a ticket the proxy sends right after the TLS handshake can land
//! during that write and lose the request (about one session in a hundred
//! then hangs until its open timeout). By default Tollgate sends none.
use tollgate_tests::{
    TestNode,
    sdk::{run_python_with, sdk},
};

const RULES: &str =
    "policy:\n  rules:\n    - {name: voice, operations: [realtime], action: allow}\n";

/// By default: no ticket reaches the client, and 150 Realtime sessions in a
/// row all open. With tickets, measured here: 1 session of 450 hung (and 3
/// runs in 34 of `realtime.rs` under CPU load); 5 to 10 of 500 between the
/// same client and Python's own TLS server, none of 1500 without tickets.
#[test]
fn without_tickets_every_realtime_session_of_the_python_sdk_opens() {
    let Some(python) = sdk(
        "without_tickets_every_realtime_session_of_the_python_sdk_opens",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(RULES);
    let got = run_python_with(&node, &python, "openai_realtime_opens.py", &["150"]);
    assert_eq!(got["tls"], "TLSv1.3", "{got}");
    assert_eq!(got["ticket"], false, "{got}");
    assert_eq!(got["failures"], serde_json::json!([]), "{got}");
    assert_eq!(got["opened"], 150, "{got}");
    // The provider's own log: one upgrade per session.
    let upgrades = node
        .mock_requests()
        .iter()
        .filter(|r| r["upgrade"] == "websocket")
        .count();
    assert_eq!(upgrades, 150);
}

/// `tls.session_tickets: 2` sends them again (for clients that resume).
#[test]
fn session_tickets_are_sent_when_configured() {
    let Some(python) = sdk(
        "session_tickets_are_sent_when_configured",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(&format!("tls: {{session_tickets: 2}}\n{RULES}"));
    let got = run_python_with(&node, &python, "openai_realtime_opens.py", &["1"]);
    assert_eq!(got["tls"], "TLSv1.3", "{got}");
    assert_eq!(got["ticket"], true, "{got}");
}
