//! Unmodified applications using the official SDKs (OpenAI and Anthropic for
//! Python, OpenAI for Node.js) with their default base URLs, inside a pod.
//! They trust the node CA only through their standard environment variables;
//! Tollgate terminates, forwards to the (mock) provider, and records what the
//! provider reported, per pod.
use std::time::Duration;

use tollgate_tests::{
    TestNode, clients_dir,
    mock_llm::{self, ANTHROPIC_USAGE, OPENAI_USAGE, STREAM_WORDS},
    process::wait_until,
    sdk::{run_app, run_python, sdk},
};

/// `sdk::run_node` trusting the node CA.
fn run_node(
    node: &TestNode,
    pod: usize,
    modules: &std::path::Path,
    script: &str,
) -> serde_json::Value {
    tollgate_tests::sdk::run_node(node, pod, modules, script, &node.node_ca_cert())
}

fn assert_recorded(
    recs: &[serde_json::Value],
    provider: &str,
    pod_uid: &str,
    input: u64,
    output: u64,
    secret: &str,
) {
    for r in recs {
        assert_eq!(r["provider"], provider, "{r}");
        assert_eq!(r["workload"]["pod_uid"], pod_uid, "{r}");
        assert_eq!(r["usage"]["input_tokens"], input, "{r}");
        assert_eq!(r["usage"]["output_tokens"], output, "{r}");
        assert_eq!(r["usage"]["estimated"], false, "{r}");
        assert_eq!(r["result"], "ok", "{r}");
        assert!(
            !r.to_string().contains(secret),
            "API keys never reach the audit log"
        );
    }
    assert_eq!(
        recs.iter().filter(|r| r["stream"] == true).count(),
        1,
        "one streamed call: {recs:?}"
    );
}

#[test]
fn python_openai_sdk() {
    let Some(python) = sdk("python_openai_sdk", "venv/bin/python") else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent("");
    let pod = &node.pods[0];
    let got = run_python(&node, &python, "openai_client.py");
    assert_eq!(got["content"], STREAM_WORDS.concat());
    assert_eq!(got["stream_text"], STREAM_WORDS.concat());
    assert_eq!(got["prompt_tokens"], OPENAI_USAGE.input);
    assert_eq!(got["stream_prompt_tokens"], OPENAI_USAGE.input);
    assert_recorded(
        &node.wait_requests(2),
        "openai",
        &pod.uid,
        OPENAI_USAGE.input,
        OPENAI_USAGE.output,
        "sk-test-python-openai",
    );
}

/// Policy as an SDK meets it: a denied model raises the SDK's own
/// PermissionDeniedError with the rule's message; over the rate limit, the
/// SDK's built-in retry waits as Tollgate's `retry-after` says, then succeeds.
#[test]
fn python_openai_sdk_obeys_policy() {
    let Some(python) = sdk("python_openai_sdk_obeys_policy", "venv/bin/python") else {
        return;
    };
    let mut node = TestNode::new(1);
    // 2 requests a minute: the third waits ~30 s… too long for a test; 12 a
    // minute refills one every 5 s. The client sends 1 denied + 3 allowed.
    node.start_agent(
        "policy:\n  rules:\n    - {name: no-gpt4o, models: [gpt-4o], action: deny, message: use gpt-4o-mini}\n    - name: sdk-limit\n      action: allow\n      limits: {requests_per_minute: 12}\n",
    );
    // Spend the bucket down to 2 from outside the SDK, so its third call is limited.
    let pod = &node.pods[0];
    for _ in 0..10 {
        let out = pod.https_post(
            &node.node_ca_cert(),
            tollgate_tests::node::PROVIDER_HOST,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        );
        assert!(out.status.success());
    }
    let got = run_python(&node, &python, "openai_policy_client.py");
    let denied = &got["denied"];
    assert_eq!(denied["class"], "PermissionDeniedError", "{got}");
    assert_eq!(denied["status"], 403);
    assert!(
        denied["message"]
            .as_str()
            .unwrap()
            .contains("use gpt-4o-mini"),
        "{got}"
    );
    assert_eq!(got["content"], STREAM_WORDS.concat());
    let d: Vec<f64> = got["durations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(d[0] < 2.0 && d[1] < 2.0, "within the limit: {d:?}");
    let recs = node.connections();
    let limited: Vec<_> = recs
        .iter()
        .filter(|r| r["result"] == "rate_limited")
        .collect();
    assert!(!limited.is_empty(), "{recs:?}");
    // The SDK's own backoff without a hint is 0.5-1 s; with Tollgate's
    // `retry-after-ms` it waits what it was told (the record says what).
    let told = limited[0]["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms") as f64
        / 1000.0;
    assert!(
        d[2] >= told - 0.05,
        "the SDK waited out retry-after ({told} s) before succeeding: {d:?}"
    );
    assert_eq!(limited[0]["reason"], "rule:sdk-limit:requests");
    assert_eq!(limited[0]["status"], 429);
}

/// A rule that allows chat only: the SDK's chat call goes through, its file
/// upload and batch creation raise the SDK's PermissionDeniedError naming
/// the kind of call, and the provider receives the chat call alone.
#[test]
fn python_openai_sdk_batch_and_files_refused_by_a_chat_only_rule() {
    let Some(python) = sdk(
        "python_openai_sdk_batch_and_files_refused_by_a_chat_only_rule",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(
        "policy:\n  default: deny\n  rules:\n    - {name: chat-only, operations: [chat], action: allow}\n",
    );
    let got = run_python(&node, &python, "openai_batch_client.py");
    assert_eq!(got["chat"], STREAM_WORDS.concat(), "{got}");
    for (call, op) in [("upload", "files"), ("batch", "batch")] {
        let r = &got[call];
        assert_eq!(r["class"], "PermissionDeniedError", "{call}: {got}");
        assert_eq!(r["status"], 403, "{call}: {got}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .contains(&format!("no policy rule allows this `{op}` call")),
            "{call}: {got}"
        );
    }
    let recs = node.wait_requests(3);
    let ops: Vec<(&str, &str)> = recs
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap(),
                r["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [("chat", "ok"), ("files", "denied"), ("batch", "denied")],
        "{recs:?}"
    );
    // What the provider received over TLS: the chat call, nothing of the batch.
    let seen: Vec<String> = node
        .mock_requests()
        .iter()
        .filter(|r| r["sni"].is_string())
        .map(|r| r["request"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("POST /v1/chat/completions"), "{seen:?}");
}

/// Model rules decide a batch upload by the models its JSONL names: an
/// input of mini models is uploaded, one line asking for gpt-4o refuses the
/// whole file with the rule's message, and the provider never receives it.
#[test]
fn python_openai_sdk_batch_uploads_are_decided_by_the_models_inside() {
    let Some(python) = sdk(
        "python_openai_sdk_batch_uploads_are_decided_by_the_models_inside",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(
        "policy:\n  rules:\n    - {name: minis, models: [\"*-mini\"], action: allow}\n    - {name: no-frontier, models: [\"*\"], action: deny, message: batch jobs use mini models}\n",
    );
    let got = run_python(&node, &python, "openai_batch_upload_client.py");
    assert_eq!(got["minis"], serde_json::Value::Null, "{got}");
    assert_eq!(got["frontier"]["class"], "PermissionDeniedError", "{got}");
    assert!(
        got["frontier"]["message"]
            .as_str()
            .unwrap()
            .contains("batch jobs use mini models"),
        "{got}"
    );
    let recs = node.wait_requests(2);
    let (ok, refused) = (&recs[0], &recs[1]);
    assert_eq!(ok["operation"], "files", "{ok}");
    assert_eq!(ok["reason"], "rule:minis", "{ok}");
    assert_eq!(ok["batch_input"]["purpose"], "batch", "{ok}");
    assert_eq!(ok["batch_input"]["filename"], "minis.jsonl", "{ok}");
    assert_eq!(ok["batch_input"]["lines"], 2, "{ok}");
    assert_eq!(
        ok["batch_input"]["models"],
        serde_json::json!(["gpt-4o-mini"]),
        "{ok}"
    );
    assert_eq!(refused["reason"], "rule:no-frontier", "{refused}");
    assert_eq!(refused["result"], "denied", "{refused}");
    assert_eq!(
        refused["batch_input"]["models"],
        serde_json::json!(["gpt-4o-mini", "gpt-4o"]),
        "{refused}"
    );
    // What the provider received: the mini upload, whole, and nothing else.
    let seen: Vec<_> = node
        .mock_requests()
        .into_iter()
        .filter(|r| r["sni"].is_string())
        .collect();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0]["request"]
            .as_str()
            .unwrap()
            .starts_with("POST /v1/files "),
        "{seen:?}"
    );
    assert_eq!(seen[0]["body_bytes"], ok["request_bytes"], "{seen:?}");
}

#[test]
fn python_anthropic_sdk() {
    let Some(python) = sdk("python_anthropic_sdk", "venv/bin/python") else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent("");
    let pod = &node.pods[0];
    let got = run_python(&node, &python, "anthropic_client.py");
    assert_eq!(got["content"], STREAM_WORDS.concat());
    assert_eq!(got["stream_text"], STREAM_WORDS.concat());
    assert_eq!(got["stream_output_tokens"], ANTHROPIC_USAGE.output);
    let input = ANTHROPIC_USAGE.input + ANTHROPIC_USAGE.cached;
    assert_recorded(
        &node.wait_requests(2),
        "anthropic",
        &pod.uid,
        input,
        ANTHROPIC_USAGE.output,
        "sk-ant-test-python",
    );
}

/// The Anthropic SDK raises its own PermissionDeniedError and RateLimitError
/// from Tollgate's Anthropic-shaped answers.
#[test]
fn python_anthropic_sdk_sees_policy_errors() {
    let Some(python) = sdk("python_anthropic_sdk_sees_policy_errors", "venv/bin/python") else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(
        "policy:\n  rules:\n    - {name: no-opus, models: [\"claude-opus*\"], action: deny, message: opus is not approved}\n    - {name: slow, action: allow, limits: {requests_per_minute: 1}}\n",
    );
    let got = run_python(&node, &python, "anthropic_policy_client.py");
    assert_eq!(got["denied"]["class"], "PermissionDeniedError", "{got}");
    assert_eq!(got["denied"]["status"], 403);
    assert!(
        got["denied"]["message"]
            .as_str()
            .unwrap()
            .contains("opus is not approved"),
        "{got}"
    );
    assert_eq!(got["limited"]["class"], "RateLimitError", "{got}");
    assert_eq!(got["limited"]["status"], 429);
    assert_eq!(got["limited"]["limit"], "1");
    let wait: u64 = got["limited"]["retry_after"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{got}");
}

#[test]
fn node_openai_sdk() {
    let Some(modules) = sdk("node_openai_sdk", "node/node_modules/openai") else {
        return;
    };
    let mut node = TestNode::new(2);
    node.start_agent("");
    // The second pod, to show attribution is per pod.
    let pod = &node.pods[1];
    let got = run_node(&node, 1, &modules, "openai_client.mjs");
    assert_eq!(got["content"], STREAM_WORDS.concat());
    assert_eq!(got["stream_text"], STREAM_WORDS.concat());
    assert_eq!(got["stream_prompt_tokens"], OPENAI_USAGE.input);
    assert_recorded(
        &node.wait_requests(2),
        "openai",
        &pod.uid,
        OPENAI_USAGE.input,
        OPENAI_USAGE.output,
        "sk-test-node-openai",
    );
}

/// What most apps do — stream without `stream_options` — with the official
/// SDKs of both languages: each receives exactly the stream the provider
/// sends such a request (no usage-only chunk to trip `choices[0]`, no
/// `"usage":null`), while the provider was asked for usage (its own log)
/// and every call is recorded with its exact usage, not an estimate.
#[test]
fn default_sdk_streams_are_counted_exactly_and_reach_the_app_unchanged() {
    let test = "default_sdk_streams_are_counted_exactly_and_reach_the_app_unchanged";
    let Some(python) = sdk(test, "venv/bin/python") else {
        return;
    };
    let Some(modules) = sdk(test, "node/node_modules/openai") else {
        return;
    };
    let mut node = TestNode::new(2);
    node.start_agent("");
    let py = run_python(&node, &python, "openai_default_stream.py");
    let js = run_node(&node, 1, &modules, "openai_default_stream.mjs");
    let unasked = mock_llm::openai_stream_events(false);
    for (sdk, got) in [("python", &py), ("node", &js)] {
        assert_eq!(got["text"], STREAM_WORDS.concat(), "{sdk}: {got}");
        assert_eq!(
            got["chunks"],
            unasked.len() - 1,
            "{sdk}: every chunk but [DONE]: {got}"
        );
        assert_eq!(
            got["raw"],
            unasked.concat(),
            "{sdk}: the stream as sent unasked"
        );
    }
    let asked: Vec<_> = node.mock_requests_where(|l| l.contains("/chat/completions"));
    assert_eq!(asked.len(), 4, "{asked:?}");
    for r in &asked {
        assert_eq!(r["stream_options"]["include_usage"], true, "{r}");
    }
    let recs = node.wait_requests(4);
    for (pod, key) in [(0, "sk-test-python-default"), (1, "sk-test-node-default")] {
        let mine: Vec<_> = recs
            .iter()
            .filter(|r| r["workload"]["pod_uid"] == node.pods[pod].uid.as_str())
            .cloned()
            .collect();
        assert_eq!(mine.len(), 2, "{recs:?}");
        for r in &mine {
            assert_eq!(r["usage"]["input_tokens"], OPENAI_USAGE.input, "{r}");
            assert_eq!(r["usage"]["output_tokens"], OPENAI_USAGE.output, "{r}");
            assert_eq!(r["usage"]["estimated"], false, "{r}");
            assert_eq!(r["stream_usage_asked"], true, "{r}");
            assert_eq!(r["result"], "ok", "{r}");
            assert!(
                !r.to_string().contains(key),
                "keys never reach the audit log"
            );
        }
    }
}

/// Observe mode without TLS trust: an SDK that trusts only the provider's
/// own CA rejects the node CA's leaf once; Tollgate then relays that
/// workload's connections untouched, so the SDK's default retry and every
/// later call work, and each connection is still recorded with the pod and
/// the server name.
#[test]
fn python_openai_sdk_without_the_node_ca_still_works_and_is_audited() {
    let Some(python) = sdk(
        "python_openai_sdk_without_the_node_ca_still_works_and_is_audited",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent("");
    let pod = &node.pods[0];
    let mut cmd = pod.app(
        &node.pod_hosts_file(),
        python.to_str().unwrap(),
        &[clients_dir()
            .join("openai_untrusting_client.py")
            .to_str()
            .unwrap()],
    );
    cmd.env("SSL_CERT_FILE", node.dir.join("upstream-ca.crt"));
    let got = run_app(&node, cmd);
    assert_eq!(
        got["contents"],
        serde_json::json!([STREAM_WORDS.concat(), STREAM_WORDS.concat()])
    );
    let conns = wait_until(Duration::from_secs(5), || {
        let c: Vec<_> = node
            .connections()
            .into_iter()
            .filter(|r| r["reason"] == "ca_rejected")
            .collect();
        (!c.is_empty()).then_some(c)
    })
    .unwrap_or_else(|| panic!("no relayed connection: {:?}", node.connections()));
    for r in &conns {
        assert_eq!(r["decision"], "observe", "{r}");
        assert_eq!(r["workload"]["pod_uid"], pod.uid.as_str(), "{r}");
        assert_eq!(r["tls"]["sni"], tollgate_tests::node::PROVIDER_HOST, "{r}");
        assert!(r["bytes_sent"].as_u64().unwrap() > 0, "{r}");
        assert!(r["bytes_received"].as_u64().unwrap() > 0, "{r}");
    }
    assert_eq!(
        node.agent_log().matches("rejected the node CA").count(),
        1,
        "logged once, with the hint: {}",
        node.agent_log()
    );
}
