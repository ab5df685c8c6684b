//! Realtime sessions (WebSocket) through termination: the OpenAI Python
//! SDK's client over an HTTP/1.1 upgrade, and a hyper h2 client over an
//! HTTP/2 extended CONNECT (RFC 8441), against the mock provider's Realtime
//! API (`mock_realtime`), asserting on what the provider's own log got.
use tollgate_tests::{
    TestNode,
    mock_realtime::RESPONSE_WORDS,
    node::PROVIDER_HOST,
    require_privileged,
    sdk::{run_app, run_python_with, sdk},
};

/// The OpenAI Python SDK's Realtime client through termination: the
/// WebSocket upgrade passes, frames flow both ways, and one record per
/// session carries the usage of each `response.done` the provider sent.
/// A session under a budget too small for a second response is ended with
/// a Realtime `error` event (code `budget_exhausted`) and a close frame, one
/// over its rule's requests a minute likewise (`rate_limited`); a denied
/// one is refused at the handshake.
#[test]
fn python_openai_sdk_realtime_sessions_are_metered_and_budgeted() {
    let Some(python) = sdk(
        "python_openai_sdk_realtime_sessions_are_metered_and_budgeted",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(
        "policy:\n  rules:\n    - {name: no-preview, models: [\"*-preview\"], action: deny}\n    - name: voice-budget\n      models: [gpt-realtime-mini]\n      action: allow\n      budget: {daily_usd: 0.003}\n    - name: voice-limited\n      models: [gpt-realtime-1.5]\n      action: allow\n      limits: {requests_per_minute: 2}\n    - {name: voice, operations: [realtime], action: allow}\n",
    );
    let got = run_python_with(
        &node,
        &python,
        "openai_realtime_client.py",
        &[
            "gpt-realtime:2",
            "gpt-realtime-mini:3",
            "gpt-4o-realtime-preview:1",
            "gpt-realtime-1.5:3",
        ],
    );
    let words = tollgate_tests::mock_realtime::RESPONSE_WORDS.concat();
    let s = &got["sessions"];
    // What both sides recorded, for any failure below.
    let diag = format!(
        "{got}\nrecords: {:?}\nprovider: {:?}",
        node.connections(),
        node.mock_requests()
    );
    assert_eq!(s[0]["texts"], serde_json::json!([words, words]), "{diag}");
    assert_eq!(s[0]["errors"], serde_json::json!([]), "{diag}");
    assert_eq!(s[0]["session_model"], "gpt-realtime", "{diag}");
    // The budgeted session: two responses (the budget is not reached after
    // the first: 0.0018 of 0.003 USD), then the budget ends it before a third.
    assert_eq!(s[1]["texts"], serde_json::json!([words, words]), "{diag}");
    assert_eq!(s[1]["errors"][0]["code"], "budget_exhausted", "{diag}");
    assert!(
        s[1]["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("voice-budget"),
        "{diag}"
    );

    // A denied session is refused at the handshake: the SDK raises.
    assert!(
        s[2]["closed"].as_str().unwrap().contains("HTTP 403"),
        "{diag}"
    );

    // The limited session: two requests a minute, the session's start and
    // its first response's renewal; the second response's renewal is refused.
    assert_eq!(s[3]["texts"], serde_json::json!([words, words]), "{diag}");
    assert_eq!(s[3]["errors"][0]["code"], "rate_limited", "{diag}");

    let recs = node.wait_requests(4);
    let limited = &recs[3];
    assert_eq!(
        limited["reason"], "rule:voice-limited:requests",
        "{limited}"
    );
    assert_eq!(limited["result"], "rate_limited", "{limited}");
    assert_eq!(limited["realtime"]["responses"], 2, "{limited}");
    assert!(limited["retry_after_ms"].as_u64().unwrap() > 0, "{limited}");
    assert_eq!(recs[2]["reason"], "rule:no-preview", "{:?}", recs[2]);
    assert_eq!(recs[2]["result"], "denied", "{:?}", recs[2]);
    let usage = tollgate_agent_usage();
    let free = &recs[0];
    assert_eq!(free["operation"], "realtime", "{free}");
    assert_eq!(free["model"], "gpt-realtime", "{free}");
    assert_eq!(free["reason"], "rule:voice", "{free}");
    assert_eq!(free["status"], 101, "{free}");
    assert_eq!(free["result"], "ok", "{free}");
    assert_eq!(free["realtime"]["responses"], 2, "{free}");
    assert_eq!(free["realtime"]["ended_by"], "client", "{free}");
    for u in free["realtime"]["response_usage"].as_array().unwrap() {
        assert_eq!(u, &usage, "{free}");
    }
    assert_eq!(free["usage"]["input_tokens"], 2 * 180, "{free}");
    assert_eq!(free["usage"]["output_tokens"], 2 * 73, "{free}");
    assert_eq!(free["usage"]["audio_output_tokens"], 2 * 60, "{free}");
    assert!(free["cost_usd"].as_f64().unwrap() > 0.0, "{free}");
    assert!(!free.to_string().contains("sk-test-python-realtime"));
    let budgeted = &recs[1];
    assert_eq!(
        budgeted["reason"], "rule:voice-budget:budget_daily",
        "{budgeted}"
    );
    assert_eq!(budgeted["result"], "budget_exhausted", "{budgeted}");
    assert_eq!(budgeted["realtime"]["responses"], 2, "{budgeted}");
    assert_eq!(budgeted["realtime"]["ended_by"], "policy", "{budgeted}");
    assert_eq!(budgeted["usage"]["input_tokens"], 2 * 180, "{budgeted}");

    // The provider's own record: three upgrades (with the workload's key, no
    // rule injects one), six response.done sent: no third response was
    // asked for in the budgeted or the limited session.
    let log = node.mock_requests();
    let upgrades: Vec<_> = log.iter().filter(|r| r["upgrade"] == "websocket").collect();
    assert_eq!(
        upgrades.len(),
        3,
        "the denied session never reached it: {log:?}"
    );
    assert!(
        upgrades[0]["request"]
            .as_str()
            .unwrap()
            .starts_with("GET /v1/realtime?model=gpt-realtime ")
    );
    assert_eq!(upgrades[0]["credential"], "Bearer sk-test-python-realtime");
    let done = log
        .iter()
        .filter(|r| r["realtime_response_done"].is_string())
        .count();
    assert_eq!(done, 6, "{log:?}");
}

/// A provider that never answers the handshake: the workload gets a 504
/// after `tls.upstream_response_timeout` (the SDK raises at once, not after
/// its own open timeout), recorded as `upstream_timeout`.
#[test]
fn a_realtime_handshake_the_provider_never_answers_ends_in_a_504() {
    let Some(python) = sdk(
        "a_realtime_handshake_the_provider_never_answers_ends_in_a_504",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(
        "tls: {upstream_response_timeout: 1s}\npolicy:\n  rules:\n    - {name: voice, operations: [realtime], action: allow}\n",
    );
    let started = std::time::Instant::now();
    let got = run_python_with(
        &node,
        &python,
        "openai_realtime_client.py",
        &["mock-late:1"],
    );
    let took = started.elapsed();
    let s = &got["sessions"][0];
    assert!(
        s["closed"].as_str().is_some_and(|c| c.contains("HTTP 504")),
        "{got}\nrecords: {:?}",
        node.connections()
    );
    assert!(took < std::time::Duration::from_secs(9), "{took:?}: {got}");
    let recs = node.wait_requests(1);
    assert_eq!(recs[0]["result"], "upstream_timeout", "{:?}", recs[0]);
    assert_eq!(recs[0]["status"], 504, "{:?}", recs[0]);
    assert!(
        recs[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("upstream_response_timeout")),
        "{:?}",
        recs[0]
    );
}

/// The usage Tollgate records for one mock Realtime response.
fn tollgate_agent_usage() -> serde_json::Value {
    serde_json::json!({
        "input_tokens": 180, "output_tokens": 73, "cached_input_tokens": 64,
        "reasoning_tokens": 0, "audio_input_tokens": 56, "audio_output_tokens": 60,
        "estimated": false
    })
}

/// A client that opens its session with an HTTP/2 extended CONNECT gets the
/// same session: the agent's h2 listener allows extended CONNECT, admits
/// the stream like an upgrade (rule, model from the URL, credential
/// injected, budget), asks the provider with an HTTP/1.1 upgrade of its own
/// (its key, the accept checked), answers the stream 200 and relays frames.
/// The permessage-deflate the client offers is not passed on (frames are
/// relayed decoded), so none is negotiated. A budget that the first response
/// spends ends that session with an `error` event and a close frame 1008.
/// A plain CONNECT (a tunnel) is refused with a 405 and reaches nothing.
#[test]
fn an_h2_client_opens_a_realtime_session_with_extended_connect() {
    if !require_privileged("an_h2_client_opens_a_realtime_session_with_extended_connect") {
        return;
    }
    let mut node = TestNode::new(1);
    let key = node.dir.join("realtime-key");
    std::fs::write(&key, "sk-node-held-realtime\n").unwrap();
    node.start_agent(&format!(
        "policy:\n  rules:\n    - name: voice-budget\n      models: [gpt-realtime-mini]\n      action: allow\n      budget: {{daily_usd: 0.0015}}\n    - {{name: voice, operations: [realtime], action: allow, credential_file: {}}}\n",
        key.display()
    ));
    let client = |model: &str, responses: &str| {
        let ca = node.node_ca_cert();
        let args = [ca.to_str().unwrap(), PROVIDER_HOST, model, responses];
        let bin = env!("CARGO_BIN_EXE_tollgate-realtime-h2-client");
        run_app(&node, node.pods[0].app(&node.pod_hosts_file(), bin, &args))
    };
    let words = RESPONSE_WORDS.concat();
    let free = client("gpt-realtime", "2");
    let diag = || {
        format!(
            "records: {:?}\nprovider: {:?}",
            node.connections(),
            node.mock_requests()
        )
    };
    assert_eq!(free["alpn"], "h2", "{free}");
    assert_eq!(free["status"], 200, "{free}\n{}", diag());
    assert_eq!(free["extensions"], serde_json::Value::Null, "{free}");
    assert_eq!(
        free["texts"],
        serde_json::json!([words, words]),
        "{free}\n{}",
        diag()
    );
    assert_eq!(free["session_model"], "gpt-realtime", "{free}");
    assert_eq!(free["errors"], serde_json::json!([]), "{free}");
    assert_eq!(free["closed"], serde_json::Value::Null, "{free}");

    let budgeted = client("gpt-realtime-mini", "3");
    assert_eq!(
        budgeted["texts"],
        serde_json::json!([words]),
        "{budgeted}\n{}",
        diag()
    );
    assert_eq!(
        budgeted["errors"][0]["code"], "budget_exhausted",
        "{budgeted}"
    );
    assert!(
        budgeted["closed"]
            .as_str()
            .unwrap_or_default()
            .contains("Policy"),
        "a close frame 1008: {budgeted}"
    );

    // A plain CONNECT (a tunnel through the terminated connection) is refused.
    let tunnel = client("--tunnel", "0");
    assert_eq!(tunnel["status"], 405, "{tunnel}");
    assert!(
        tunnel["body"]
            .as_str()
            .unwrap()
            .contains("does not tunnel CONNECT"),
        "{tunnel}"
    );

    let recs = node.wait_requests(3);
    assert_eq!(recs[2]["method"], "CONNECT", "{:?}", recs[2]);
    assert_eq!(recs[2]["result"], "client_error", "{:?}", recs[2]);
    let usage = tollgate_agent_usage();
    let r = &recs[0];
    assert_eq!(r["operation"], "realtime", "{r}");
    assert_eq!(r["client_http"], "HTTP/2.0", "{r}");
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["reason"], "rule:voice", "{r}");
    assert_eq!(r["credential_injected"], true, "{r}");
    assert_eq!(r["realtime"]["responses"], 2, "{r}");
    assert_eq!(r["realtime"]["ended_by"], "client", "{r}");
    for u in r["realtime"]["response_usage"].as_array().unwrap() {
        assert_eq!(u, &usage, "{r}");
    }
    assert_eq!(r["usage"]["input_tokens"], 2 * 180, "{r}");
    let b = &recs[1];
    assert_eq!(b["reason"], "rule:voice-budget:budget_daily", "{b}");
    assert_eq!(b["result"], "budget_exhausted", "{b}");
    assert_eq!(b["realtime"]["responses"], 1, "{b}");

    // The provider's own record: two HTTP/1.1 upgrades, no extension
    // offered, three response.done sent.
    let log = node.mock_requests();
    let upgrades: Vec<_> = log.iter().filter(|r| r["upgrade"] == "websocket").collect();
    assert_eq!(upgrades.len(), 2, "{log:?}");
    assert!(!format!("{log:?}").contains("CONNECT"), "{log:?}");
    for u in &upgrades {
        assert!(u["request"].as_str().unwrap().ends_with("HTTP/1.1"), "{u}");
        assert_eq!(u["extensions"], "", "{u}");
        assert_eq!(u["host"], PROVIDER_HOST, "{u}");
    }
    // The node's key where the rule injects one, the workload's elsewhere.
    assert_eq!(upgrades[0]["credential"], "Bearer sk-node-held-realtime");
    assert_eq!(upgrades[1]["credential"], "Bearer sk-test-h2-realtime");
    let done = log
        .iter()
        .filter(|r| r["realtime_response_done"].is_string())
        .count();
    assert_eq!(done, 3, "{log:?}");
}
