//! TLS uprobes (README "TLS uprobes"): a pod that does not trust the node
//! CA runs the official OpenAI Python SDK, trusting only the provider's own
//! CA. Its calls are relayed untouched, and read at its libssl: one record
//! per call with the model and the usage the provider served.
use std::{
    io::{BufRead, BufReader, Write},
    process::Stdio,
    time::Duration,
};

use tollgate_tests::{
    TestNode, clients_dir,
    mock_llm::{OPENAI_USAGE, STREAM_WORDS},
    process::wait_until,
    sdk::{run_app, run_node, sdk},
};

/// The node's config: TLS uprobes on, pod 0's provider calls relayed
/// (`action: observe`, as for a pod known not to trust the CA).
fn config(node: &TestNode) -> String {
    format!(
        "tls_uprobes: {{enabled: true}}\npolicy:\n  rules:\n    - name: untrusting\n      match: {{pod_uids: [\"{}\"]}}\n      action: observe\n",
        node.pods[0].uid
    )
}

/// `tests/clients/tls_uprobe_client.py` in pod 0, trusting only the
/// provider's own CA.
fn client(node: &TestNode, python: &std::path::Path, args: &[&str]) -> std::process::Command {
    let script = clients_dir().join("tls_uprobe_client.py");
    let mut argv = vec![script.to_str().unwrap()];
    argv.extend_from_slice(args);
    let mut cmd = node.pods[0].app(&node.pod_hosts_file(), python.to_str().unwrap(), &argv);
    cmd.env("SSL_CERT_FILE", node.dir.join("upstream-ca.crt"));
    cmd
}

/// The request records read at a TLS library, once there are `n`.
fn uprobe_records(node: &TestNode, n: usize) -> Vec<serde_json::Value> {
    wait_until(Duration::from_secs(10), || {
        let r: Vec<_> = node
            .request_records()
            .into_iter()
            .filter(|r| r["observed_via"] == "tls_uprobe")
            .collect();
        (r.len() >= n).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "{n} tls_uprobe records: {:?}\n{}\n{}",
            node.connections(),
            node.metrics(),
            node.agent_log()
        )
    })
}

/// `tollgate_ebpf_events{event="<event>"}` now.
fn kernel_event(node: &TestNode, event: &str) -> u64 {
    let needle = format!("tollgate_ebpf_events{{event=\"{event}\"}} ");
    node.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn python_openai_sdk_not_trusting_the_node_ca_is_read_at_its_tls_library() {
    let Some(python) = sdk(
        "python_openai_sdk_not_trusting_the_node_ca_is_read_at_its_tls_library",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(&config(&node));
    let pod_uid = node.pods[0].uid.clone();

    let got = run_app(&node, client(&node, &python, &["calls"]));
    let words = STREAM_WORDS.concat();
    assert_eq!(got["content"], words, "{got}");
    assert_eq!(got["stream_text"], words);
    assert_eq!(got["prompt_tokens"], OPENAI_USAGE.input);
    assert_eq!(got["stream_prompt_tokens"], OPENAI_USAGE.input);
    assert_eq!(got["plain_stream_text"], words);
    assert!(got["plain_stream_usage"].is_null(), "{got}");

    // What the provider received: the workload's own requests, untouched
    // (the stream that did not ask for usage still does not).
    let served = node.mock_requests_where(|l| l.starts_with("POST /v1/chat/completions"));
    assert_eq!(served.len(), 3, "{served:?}");
    assert_eq!(
        served[1]["stream_options"]["include_usage"], true,
        "{served:?}"
    );
    assert!(
        served[2]["stream_options"].is_null(),
        "not rewritten: {served:?}"
    );

    let recs = uprobe_records(&node, 3);
    assert_eq!(recs.len(), 3, "one record per call: {recs:?}");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["provider"], "openai", "{r}");
        assert_eq!(r["workload"]["pod_uid"], pod_uid.as_str(), "{r}");
        assert_eq!(r["decision"], "observe", "{r}");
        assert_eq!(r["model"], "gpt-4o-mini", "{r}");
        assert_eq!(r["method"], "POST", "{r}");
        assert_eq!(r["path"], "/v1/chat/completions", "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(
            r["request_bytes"], served[i]["body_bytes"],
            "the body the provider received: {r}"
        );
        assert!(r["cost_usd"].as_f64().unwrap_or(0.0) > 0.0, "priced: {r}");
        assert!(
            !r.to_string().contains("sk-test-uprobe-openai"),
            "the API key never reaches the audit log"
        );
    }
    let streams: Vec<bool> = recs.iter().map(|r| r["stream"] == true).collect();
    assert_eq!(streams, [false, true, true], "{recs:?}");
    for r in &recs[..2] {
        assert_eq!(r["usage"]["input_tokens"], OPENAI_USAGE.input, "{r}");
        assert_eq!(r["usage"]["output_tokens"], OPENAI_USAGE.output, "{r}");
        assert_eq!(r["usage"]["estimated"], false, "{r}");
    }
    assert_eq!(
        recs[2]["usage"]["estimated"], true,
        "a stream that does not ask for usage reports none; relayed, it cannot be asked: {:?}",
        recs[2]
    );
    // The relayed connections are still recorded as such.
    let relayed = node
        .connections()
        .into_iter()
        .filter(|r| r.get("kind").is_none() && r["decision"] == "observe")
        .count();
    assert!(relayed >= 1, "{:?}", node.connections());
    let m = node.metrics();
    let tokens: Vec<&str> = m
        .lines()
        .filter(|l| {
            l.starts_with("tollgate_tokens_total{")
                && l.contains("provider=\"openai\"")
                && l.contains(&format!("pod=\"{pod_uid}\""))
        })
        .collect();
    assert!(
        tokens.iter().any(|l| l.contains("token_type=\"input\"")),
        "token metrics per workload as for terminated calls:\n{m}"
    );
}

#[test]
fn node_openai_sdk_not_trusting_the_node_ca_is_read_at_its_tls_library() {
    let Some(modules) = sdk(
        "node_openai_sdk_not_trusting_the_node_ca_is_read_at_its_tls_library",
        "node/node_modules/openai",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(&config(&node));
    let ca = node.dir.join("upstream-ca.crt");
    let got = run_node(&node, 0, &modules, "openai_client.mjs", &ca);
    let words = STREAM_WORDS.concat();
    assert_eq!(got["content"], words, "{got}");
    assert_eq!(got["stream_text"], words);
    assert_eq!(got["stream_prompt_tokens"], OPENAI_USAGE.input);
    let served = node.mock_requests_where(|l| l.starts_with("POST /v1/chat/completions"));
    assert_eq!(served.len(), 2, "{served:?}");
    let recs = uprobe_records(&node, 2);
    assert_eq!(recs.len(), 2, "one record per call: {recs:?}");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["comm"], "node", "{r}");
        assert_eq!(r["model"], "gpt-4o-mini", "{r}");
        assert_eq!(r["stream"], i == 1, "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["usage"]["input_tokens"], OPENAI_USAGE.input, "{r}");
        assert_eq!(r["usage"]["output_tokens"], OPENAI_USAGE.output, "{r}");
        assert_eq!(r["usage"]["estimated"], false, "{r}");
        assert_eq!(r["request_bytes"], served[i]["body_bytes"], "{r}");
    }
}

#[test]
fn a_non_provider_tls_connection_of_a_probed_process_is_not_read() {
    let Some(python) = sdk(
        "a_non_provider_tls_connection_of_a_probed_process_is_not_read",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(&config(&node));
    let (cert, key) = (node.dir.join("upstream.crt"), node.dir.join("upstream.key"));
    let mut child = client(
        &node,
        &python,
        &["local", cert.to_str().unwrap(), key.to_str().unwrap()],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "probed", "{}", node.agent_log());
    // The provider call's record is in: the process is probed.
    wait_until(Duration::from_secs(10), || {
        node.request_records()
            .iter()
            .any(|r| r["observed_via"] == "tls_uprobe")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the provider call read first: {}", node.agent_log()));
    // TLS calls left unread: on a socket that is not a redirected one
    // (`tls_unmapped`), or on one not on the capture list (`tls_skipped`).
    let unread =
        |node: &TestNode| kernel_event(node, "tls_unmapped") + kernel_event(node, "tls_skipped");
    let chunks = kernel_event(&node, "tls_chunks");
    let skipped = unread(&node);
    assert!(chunks > 0);

    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let got: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(got["local_round_trips"], 20, "{got}");

    // 20 writes and reads each way on both ends of the local connection went
    // through the probes; none of it was copied.
    let skipped_now = wait_until(Duration::from_secs(5), || {
        let s = unread(&node);
        (s >= skipped + 80).then_some(s)
    })
    .unwrap_or_else(|| panic!("probed calls counted: {}", node.metrics()));
    assert!(skipped_now >= skipped + 80);
    assert_eq!(
        kernel_event(&node, "tls_chunks"),
        chunks,
        "no plaintext of a non-provider connection reached the ring buffer"
    );
    assert!(
        !std::fs::read_to_string(node.connection_log())
            .unwrap()
            .contains("not-a-provider-secret"),
        "nor any record"
    );
}

/// Pod 0 runs `calls` calls, then (once `log_says` is in the agent's log)
/// two more: the pooled connection must have been closed, a new connect
/// refused (EPERM), and the provider reached by neither. Pod 1 (rule
/// `untrusting`, no quota) is served meanwhile.
fn blocked_after(test: &str, quota: &str, calls: &str, log_says: &str) {
    let Some(python) = sdk(test, "venv/bin/python") else {
        return;
    };
    let mut node = TestNode::new(2);
    let cfg = format!(
        "tls_uprobes: {{enabled: true}}\npolicy:\n  rules:\n    - name: untrusting-quota\n      match: {{pod_uids: [\"{}\"]}}\n      action: observe\n      {quota}\n    - name: untrusting\n      match: {{pod_uids: [\"{}\"]}}\n      action: observe\n",
        node.pods[0].uid, node.pods[1].uid
    );
    node.start_agent(&cfg);
    let mut child = client(&node, &python, &["blocked", calls])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "called", "{}", node.agent_log());
    wait_until(Duration::from_secs(10), || {
        node.agent_log().contains(log_says).then_some(())
    })
    .unwrap_or_else(|| panic!("{log_says}: {}", node.agent_log()));
    let served_before = node
        .mock_requests_where(|l| l.starts_with("POST /v1/chat/completions"))
        .len();
    assert_eq!(served_before.to_string(), calls);

    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let got: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(
        got["pooled"]["ok"], false,
        "the open connection was closed: {got}"
    );
    assert_eq!(got["fresh"]["ok"], false, "{got}");
    assert!(
        got["fresh"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Operation not permitted"),
        "a new connection is refused at connect(): {got}"
    );
    assert!(kernel_event(&node, "refused_quota") >= 1);
    assert_eq!(
        node.mock_requests_where(|l| l.starts_with("POST /v1/chat/completions"))
            .len(),
        served_before,
        "neither call reached the provider"
    );
    let closed = node
        .connections()
        .into_iter()
        .filter(|r| r["result"] == "quota_exhausted")
        .count();
    assert_eq!(
        closed,
        1,
        "the open connection's record says why: {:?}",
        node.connections()
    );

    // Another pod is not affected: its calls go through, read as before.
    let script = clients_dir().join("tls_uprobe_client.py");
    let mut cmd = node.pods[1].app(
        &node.pod_hosts_file(),
        python.to_str().unwrap(),
        &[script.to_str().unwrap(), "calls"],
    );
    cmd.env("SSL_CERT_FILE", node.dir.join("upstream-ca.crt"));
    let other = run_app(&node, cmd);
    assert_eq!(other["content"], STREAM_WORDS.concat(), "{other}");
    let pod1 = |n: &TestNode| {
        n.request_records()
            .into_iter()
            .filter(|r| r["workload"]["pod_uid"] == n.pods[1].uid.as_str())
            .count()
    };
    wait_until(Duration::from_secs(5), || (pod1(&node) >= 3).then_some(()))
        .unwrap_or_else(|| panic!("pod 1's calls recorded: {:?}", node.request_records()));
    assert_eq!(pod1(&node), 3);
}

#[test]
fn a_budget_spent_by_uprobe_read_calls_refuses_the_workload_at_connect() {
    // One call costs more than this: pod 0's first call spends it.
    blocked_after(
        "a_budget_spent_by_uprobe_read_calls_refuses_the_workload_at_connect",
        "budget: {per: workload, daily_usd: 0.000001}",
        "1",
        "budget spent by calls read with TLS uprobes",
    );
}

#[test]
fn a_token_limit_exceeded_by_uprobe_read_calls_refuses_the_workload_at_connect() {
    // A call has 23 input tokens: the first fits in 30 a minute, the
    // second does not.
    blocked_after(
        "a_token_limit_exceeded_by_uprobe_read_calls_refuses_the_workload_at_connect",
        "limits: {per: workload, input_tokens_per_minute: 30}",
        "2",
        "went over its rule's limit",
    );
}

#[test]
fn curl_over_http2_not_trusting_the_node_ca_is_read_at_its_tls_library() {
    if !tollgate_tests::require_privileged(
        "curl_over_http2_not_trusting_the_node_ca_is_read_at_its_tls_library",
    ) {
        return;
    }
    let mut node = TestNode::new(1);
    node.start_agent(&config(&node));
    let pod = &node.pods[0];
    let ca = node.dir.join("upstream-ca.crt");
    let post = |body: &str| {
        pod.netns
            .command_in_cgroup("curl", Some(&pod.cgroup))
            .args([
                "-sS",
                "-m",
                "10",
                "--http2",
                "--cacert",
                ca.to_str().unwrap(),
            ])
            .args(["--resolve", "api.openai.com:443:10.77.0.2"])
            .args(["-H", "content-type: application/json", "-d", body])
            .arg("https://api.openai.com/v1/chat/completions")
            .output()
            .unwrap()
    };
    let plain = post(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#);
    let streamed = post(
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#,
    );
    for out in [&plain, &streamed] {
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.agent_log()
        );
    }
    assert!(String::from_utf8_lossy(&streamed.stdout).contains("[DONE]"));
    let served = node.mock_requests_where(|l| l.starts_with("POST /v1/chat/completions"));
    assert_eq!(served.len(), 2, "{served:?}");
    assert!(
        served.iter().all(|r| r["request"]
            .as_str()
            .unwrap_or_default()
            .ends_with("HTTP/2.0")),
        "curl spoke HTTP/2 to the provider, through the relay: {served:?}"
    );
    let recs = uprobe_records(&node, 2);
    assert_eq!(recs.len(), 2, "{recs:?}");
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["client_http"], "HTTP/2.0", "{r}");
        assert_eq!(r["comm"], "curl", "{r}");
        assert_eq!(r["host"], "api.openai.com", "{r}");
        assert_eq!(r["model"], "gpt-4o-mini", "{r}");
        assert_eq!(r["stream"], i == 1, "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["usage"]["input_tokens"], OPENAI_USAGE.input, "{r}");
        assert_eq!(r["usage"]["output_tokens"], OPENAI_USAGE.output, "{r}");
        assert_eq!(r["usage"]["estimated"], false, "{r}");
        assert_eq!(r["request_bytes"], served[i]["body_bytes"], "{r}");
    }
}
