//! The terminating proxy with real LLM wire formats: what the mock provider
//! reports as usage is what Tollgate records, per pod, for JSON and streamed
//! responses, and per provider even when providers share an address.
use std::time::Duration;

use tollgate_tests::{
    TestNode,
    mock_llm::{ANTHROPIC_MODEL, ANTHROPIC_USAGE, OPENAI_MODEL, OPENAI_USAGE, STREAM_WORDS},
    node::{ANTHROPIC_HOST, PROVIDER_HOST},
    process::wait_until,
    require_privileged,
};

fn node_with_agent(test: &str) -> Option<TestNode> {
    if !require_privileged(test) {
        return None;
    }
    let mut node = TestNode::new(2);
    node.start_agent("");
    Some(node)
}

/// The request records so far, waiting for at least `n`.
fn requests(node: &TestNode, n: usize) -> Vec<serde_json::Value> {
    wait_until(Duration::from_secs(5), || {
        let r: Vec<_> = node
            .connections()
            .into_iter()
            .filter(|r| r["kind"] == "request")
            .collect();
        (r.len() >= n).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "expected {n} request records: {:?}\n{}",
            node.connections(),
            node.agent_log()
        )
    })
}

fn ok_stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn openai_chat_usage_is_recorded_for_json_and_streams() {
    let Some(node) = node_with_agent("openai_chat_usage_is_recorded_for_json_and_streams") else {
        return;
    };
    let ca = node.node_ca_cert();
    let pod = &node.pods[0];
    let path = "/v1/chat/completions";

    let json = ok_stdout(&pod.https_post(
        &ca,
        PROVIDER_HOST,
        path,
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#,
    ));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        STREAM_WORDS.concat(),
        "response passes through unchanged"
    );

    let sse = ok_stdout(&pod.https_post(
        &ca,
        PROVIDER_HOST,
        path,
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello"}]}"#,
    ));
    assert_eq!(
        sse.matches("data: ").count(),
        STREAM_WORDS.len() + 4,
        "every SSE event arrives: {sse}"
    );
    assert!(sse.ends_with("data: [DONE]\n\n"));

    let recs = requests(&node, 2);
    for (r, stream) in recs.iter().zip([false, true]) {
        assert_eq!(r["provider"], "openai", "{r}");
        assert_eq!(r["operation"], "chat");
        assert_eq!(r["model"], "gpt-4o-mini");
        assert_eq!(r["response_model"], OPENAI_MODEL);
        assert_eq!(r["stream"], stream);
        assert_eq!(r["status"], 200);
        assert_eq!(r["result"], "ok", "{r}");
        let u = &r["usage"];
        assert_eq!(u["input_tokens"], OPENAI_USAGE.input, "{r}");
        assert_eq!(u["output_tokens"], OPENAI_USAGE.output);
        assert_eq!(u["cached_input_tokens"], OPENAI_USAGE.cached);
        assert_eq!(u["estimated"], false);
        assert_eq!(r["workload"]["pod_uid"], pod.uid.as_str());
        assert!(
            !r.to_string().contains("sk-test-secret"),
            "credentials never reach the audit log"
        );
    }
    assert!(recs[1]["ttft_ms"].as_u64().is_some());

    let m = node.metrics();
    let line = |kind: &str, n: u64| {
        format!(
            "tollgate_tokens_total{{model=\"{OPENAI_MODEL}\",provider=\"openai\",token_type=\"{kind}\",workload=\"{}\"}} {n}",
            pod.uid
        )
    };
    assert!(m.contains(&line("input", 2 * OPENAI_USAGE.input)), "{m}");
    assert!(m.contains(&line("output", 2 * OPENAI_USAGE.output)), "{m}");
    assert!(
        m.contains("gen_ai_client_token_usage_bucket{gen_ai_token_type=\"input\""),
        "{m}"
    );
    assert!(!m.contains("sk-test-secret"));
}

#[test]
fn stream_without_usage_is_estimated_from_the_text() {
    let Some(node) = node_with_agent("stream_without_usage_is_estimated_from_the_text") else {
        return;
    };
    let pod = &node.pods[1];
    ok_stdout(&pod.https_post(
        &node.node_ca_cert(),
        PROVIDER_HOST,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#,
    ));
    let r = &requests(&node, 1)[0];
    assert_eq!(r["usage"]["estimated"], true, "{r}");
    let chars = STREAM_WORDS.concat().len() as u64;
    assert_eq!(r["usage"]["output_tokens"], chars.div_ceil(4), "{r}");
    assert_eq!(
        r["workload"]["pod_uid"],
        pod.uid.as_str(),
        "second pod's call is the second pod's"
    );
}

#[test]
fn anthropic_on_a_shared_address_is_attributed_by_server_name() {
    let Some(node) = node_with_agent("anthropic_on_a_shared_address_is_attributed_by_server_name")
    else {
        return;
    };
    let pod = &node.pods[0];
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let sse =
        ok_stdout(&pod.https_post(&node.node_ca_cert(), ANTHROPIC_HOST, "/v1/messages", body));
    assert!(sse.contains("event: message_stop"), "{sse}");
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}"#;
    ok_stdout(&pod.https_post(&node.node_ca_cert(), ANTHROPIC_HOST, "/v1/messages", body));
    for r in requests(&node, 2) {
        assert_eq!(
            r["provider"], "anthropic",
            "attributed by server name, not by the shared address: {r}"
        );
        assert_eq!(r["operation"], "messages");
        assert_eq!(r["response_model"], ANTHROPIC_MODEL);
        assert_eq!(
            r["usage"]["input_tokens"],
            ANTHROPIC_USAGE.input + ANTHROPIC_USAGE.cached,
            "{r}"
        );
        assert_eq!(r["usage"]["cached_input_tokens"], ANTHROPIC_USAGE.cached);
        assert_eq!(r["usage"]["output_tokens"], ANTHROPIC_USAGE.output);
        assert_eq!(r["usage"]["estimated"], false);
    }
}

#[test]
fn upstream_faults_reach_the_client_and_partial_usage_is_recorded() {
    if !require_privileged("upstream_faults_reach_the_client_and_partial_usage_is_recorded") {
        return;
    }
    let mut node = TestNode::new(1);
    node.start_agent("tls:\n  stream_idle_timeout: 1s\n");
    let ca = node.node_ca_cert();
    let pod = &node.pods[0];
    let path = "/v1/chat/completions";
    let call = |model: &str| {
        let body = format!(
            r#"{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"Say hello"}}]}}"#
        );
        let started = std::time::Instant::now();
        let out = pod.https_post(&ca, PROVIDER_HOST, path, &body);
        (out, started.elapsed())
    };

    // A provider error passes through as the provider sent it.
    let (out, _) = call("mock-500");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("server_error"), "{body}");

    // Cut mid-stream: the client gets what was sent, then an error; the
    // usage of what it got is recorded (estimated, no usage event came).
    let (out, _) = call("mock-cut");
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.contains(STREAM_WORDS[1]),
        "the partial stream reaches the client: {got}"
    );
    assert!(!got.contains(STREAM_WORDS[2]));

    // Stalled mid-stream: ended by the idle timeout, not hung for 30 s.
    let (out, took) = call("mock-stall");
    assert!(String::from_utf8_lossy(&out.stdout).contains(STREAM_WORDS[1]));
    assert!(
        took < Duration::from_secs(8),
        "a stalled provider must not hold the client: {took:?}"
    );

    let recs = requests(&node, 3);
    let by_model = |m: &str| {
        recs.iter()
            .find(|r| r["model"] == m)
            .unwrap_or_else(|| panic!("no record for {m}: {recs:?}"))
    };
    let r = by_model("mock-500");
    assert_eq!(r["status"], 500);
    assert_eq!(
        r["result"], "ok",
        "a provider error is a completed call: {r}"
    );
    let partial_chars = (STREAM_WORDS[0].len() + STREAM_WORDS[1].len()) as u64;
    for (m, result) in [
        ("mock-cut", "upstream_error"),
        ("mock-stall", "upstream_idle_timeout"),
    ] {
        let r = by_model(m);
        assert_eq!(r["result"], result, "{r}");
        assert_eq!(r["usage"]["estimated"], true, "{r}");
        assert_eq!(
            r["usage"]["output_tokens"],
            partial_chars.div_ceil(4),
            "{r}"
        );
    }
    let m = node.metrics();
    assert!(m.contains("result=\"upstream_idle_timeout\""), "{m}");
}
