//! The terminating proxy with real LLM wire formats: what the mock provider
//! reports as usage is what Tollgate records, per pod, for JSON and streamed
//! responses, and per provider even when providers share an address.
use std::time::Duration;

use tollgate_tests::{
    TestNode,
    mock_llm::{
        self, ANTHROPIC_MODEL, ANTHROPIC_USAGE, GEMINI_MODEL, GEMINI_THOUGHTS, GEMINI_USAGE,
        OPENAI_MODEL, OPENAI_USAGE, SLOW_CHUNK_DELAY, STREAM_WORDS,
    },
    node::{ANTHROPIC_HOST, BACKUP_HOST, GEMINI_HOST, PROVIDER_HOST, governed_node},
    require_privileged,
};

/// The value of the metric line starting with `series` (name and labels), if any.
fn metric(m: &str, series: &str) -> Option<f64> {
    m.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn assert_close(got: &serde_json::Value, want: f64, what: &str) {
    let g = got
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {got}"));
    assert!((g - want).abs() < 1e-9, "{what}: {g} != {want}");
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
    let Some(node) = governed_node("openai_chat_usage_is_recorded_for_json_and_streams", 2, "")
    else {
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

    let recs = node.wait_requests(2);
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
        assert!(!r["node"].as_str().unwrap_or_default().is_empty(), "{r}");
        assert_eq!(r["id"].as_str().map(str::len), Some(36), "UUID: {r}");
        assert_eq!(r["decision"], "allow");
        assert_eq!(r["reason"], "default");
        assert_eq!(r["provider_request_id"], "req_mock");
        // gpt-4o-mini in the shipped table: input 0.15, cached 0.075, output 0.60 $/M.
        let u = &OPENAI_USAGE;
        let cost =
            ((u.input - u.cached) as f64 * 0.15 + u.cached as f64 * 0.075 + u.output as f64 * 0.60)
                / 1e6;
        assert_close(&r["cost_usd"], cost, "cost_usd");
        assert!(
            r.get("request_body").is_none(),
            "bodies only when configured: {r}"
        );
    }
    assert_ne!(recs[0]["id"], recs[1]["id"]);
    assert!(recs[1]["ttft_ms"].as_u64().is_some());

    let m = node.metrics();
    let line = |kind: &str, n: u64| {
        format!(
            "tollgate_tokens_total{{model=\"{OPENAI_MODEL}\",namespace=\"\",pod=\"{0}\",provider=\"openai\",token_type=\"{kind}\",workload=\"{0}\"}} {n}",
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
    let u = &OPENAI_USAGE;
    let cost =
        ((u.input - u.cached) as f64 * 0.15 + u.cached as f64 * 0.075 + u.output as f64 * 0.60)
            / 1e6;
    let spent = metric(
        &m,
        &format!(
            "tollgate_cost_usd_total{{model=\"{OPENAI_MODEL}\",namespace=\"\",pod=\"{0}\",provider=\"openai\",workload=\"{0}\"}}",
            pod.uid
        ),
    )
    .unwrap_or_else(|| panic!("no cost metric: {m}"));
    assert!((spent - 2.0 * cost).abs() < 1e-9, "{spent}");
    assert_eq!(
        metric(
            &m,
            "tollgate_decisions_total{decision=\"allow\",provider=\"openai\",reason=\"default\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(metric(&m, "tollgate_active_streams"), Some(0.0), "{m}");
}

#[test]
fn a_stream_that_did_not_ask_for_usage_is_counted_exactly_and_relayed_unchanged() {
    let Some(node) = governed_node(
        "a_stream_that_did_not_ask_for_usage_is_counted_exactly_and_relayed_unchanged",
        2,
        "",
    ) else {
        return;
    };
    let pod = &node.pods[1];
    let got = ok_stdout(&pod.https_post(
        &node.node_ca_cert(),
        PROVIDER_HOST,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#,
    ));
    // The provider was asked for usage (its own log)...
    let asked = node.provider_requests();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(
        asked[0]["stream_options"]["include_usage"], true,
        "{asked:?}"
    );
    // ...and the workload got, byte for byte, the stream it sends to a
    // request that did not ask: no usage-only chunk, no "usage":null.
    assert_eq!(got, mock_llm::openai_stream_events(false).concat());
    assert_ne!(
        mock_llm::openai_stream_events(true).concat(),
        got,
        "what the provider sent differs"
    );
    let r = &node.wait_requests(1)[0];
    assert_eq!(r["usage"]["estimated"], false, "{r}");
    assert_eq!(r["usage"]["input_tokens"], OPENAI_USAGE.input, "{r}");
    assert_eq!(r["usage"]["output_tokens"], OPENAI_USAGE.output, "{r}");
    assert_eq!(r["stream_usage_asked"], true, "{r}");
    assert_eq!(
        r["workload"]["pod_uid"],
        pod.uid.as_str(),
        "second pod's call is the second pod's"
    );
}

/// A provider left at `stream_usage: leave` (the default for an
/// OpenAI-compatible provider that is not OpenAI's): the stream carries no
/// usage, and an OpenAI model's tokens are counted with its own encoding,
/// not at four characters a token.
#[test]
fn a_stream_without_usage_is_estimated_with_the_models_tokenizer() {
    let Some(node) = governed_node(
        "a_stream_without_usage_is_estimated_with_the_models_tokenizer",
        1,
        "",
    ) else {
        return;
    };
    let prompt = "Say hello to the tokenizer, politely";
    let body = format!(
        r#"{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    let got = ok_stdout(&node.pods[0].https_post(
        &node.node_ca_cert(),
        BACKUP_HOST,
        "/v1/chat/completions",
        &body,
    ));
    assert_eq!(got, mock_llm::openai_stream_events(false).concat());
    let asked = node.provider_requests();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0]["stream_options"].is_null(),
        "left as it was: {asked:?}"
    );
    let o200k = tiktoken_rs::o200k_base().unwrap();
    let tokens = |s: &str| o200k.encode_ordinary(s).len() as u64;
    let r = &node.wait_requests(1)[0];
    assert_eq!(r["provider"], "backup", "{r}");
    assert_eq!(r["usage"]["estimated"], true, "{r}");
    assert_eq!(r["usage"]["estimated_with"], "o200k_base", "{r}");
    // What the mock streamed, counted by the encoding itself...
    let streamed = STREAM_WORDS.concat();
    assert_eq!(r["usage"]["output_tokens"], tokens(&streamed), "{r}");
    assert_ne!(
        tokens(&streamed),
        (streamed.len() as u64).div_ceil(4),
        "the test tells the two estimates apart"
    );
    // ...and the prompt, with OpenAI's framing of one chat message (4) and the reply (3).
    assert_eq!(r["usage"]["input_tokens"], tokens(prompt) + 4 + 3, "{r}");
}

#[test]
fn anthropic_on_a_shared_address_is_attributed_by_server_name() {
    let Some(node) = governed_node(
        "anthropic_on_a_shared_address_is_attributed_by_server_name",
        2,
        "",
    ) else {
        return;
    };
    let pod = &node.pods[0];
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let sse =
        ok_stdout(&pod.https_post(&node.node_ca_cert(), ANTHROPIC_HOST, "/v1/messages", body));
    assert!(sse.contains("event: message_stop"), "{sse}");
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hi"}]}"#;
    ok_stdout(&pod.https_post(&node.node_ca_cert(), ANTHROPIC_HOST, "/v1/messages", body));
    for r in node.wait_requests(2) {
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
    node.start_agent("tls:\n  stream_idle_timeout: 1s\n  max_request_body: 2048\n");
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

    // Over tls.max_request_body: refused by the proxy, provider-shaped.
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    let out = pod.https_post(&ca, PROVIDER_HOST, path, &big);
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("max_request_body"), "{body}");

    let recs = node.wait_requests(4);
    let too_big = recs
        .iter()
        .find(|r| r["result"] == "request_too_large")
        .unwrap_or_else(|| panic!("no request_too_large record: {recs:?}"));
    assert_eq!(too_big["status"], 413);
    assert_eq!(too_big["decision"], "deny");
    assert_eq!(too_big["reason"], "request_too_large");
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
    for (kind, n) in [
        ("status_5xx", 1.0),
        ("upstream_error", 1.0),
        ("upstream_idle_timeout", 1.0),
    ] {
        let series =
            format!("tollgate_upstream_errors_total{{kind=\"{kind}\",provider=\"openai\"}}");
        assert_eq!(metric(&m, &series), Some(n), "{series}: {m}");
    }
    assert_eq!(
        metric(
            &m,
            "tollgate_decisions_total{decision=\"deny\",provider=\"openai\",reason=\"request_too_large\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn gemini_usage_is_recorded_and_query_keys_and_bodies_redacted() {
    if !require_privileged("gemini_usage_is_recorded_and_query_keys_and_bodies_redacted") {
        return;
    }
    let mut node = TestNode::new(1);
    node.start_agent("audit:\n  capture: {headers: true, bodies: true, max_body_bytes: 64}\n");
    let ca = node.node_ca_cert();
    let pod = &node.pods[0];
    let body = r#"{"contents":[{"role":"user","parts":[{"text":"Say hello, and then a long sentence to be truncated"}]}]}"#;
    let base = format!("/v1beta/models/{GEMINI_MODEL}");
    let json = ok_stdout(&pod.https_post(
        &ca,
        GEMINI_HOST,
        &format!("{base}:generateContent?key=AIza-test-secret"),
        body,
    ));
    assert!(json.contains("usageMetadata"), "{json}");
    let sse = ok_stdout(&pod.https_post(
        &ca,
        GEMINI_HOST,
        &format!("{base}:streamGenerateContent?alt=sse&key=AIza-test-secret"),
        body,
    ));
    assert_eq!(sse.matches("data: ").count(), STREAM_WORDS.len(), "{sse}");

    let recs = node.wait_requests(2);
    let u = &GEMINI_USAGE;
    for (r, stream) in recs.iter().zip([false, true]) {
        assert_eq!(r["provider"], "gemini", "{r}");
        assert_eq!(r["operation"], "generate_content", "{r}");
        assert_eq!(r["model"], GEMINI_MODEL);
        assert_eq!(r["response_model"], GEMINI_MODEL);
        assert_eq!(r["stream"], stream);
        assert_eq!(r["usage"]["input_tokens"], u.input, "{r}");
        assert_eq!(r["usage"]["output_tokens"], u.output + GEMINI_THOUGHTS);
        assert_eq!(r["usage"]["reasoning_tokens"], GEMINI_THOUGHTS);
        assert_eq!(r["usage"]["cached_input_tokens"], u.cached);
        // gemini-2.5-flash: input 0.30, cached 0.03, output 2.50 $/M.
        let cost = ((u.input - u.cached) as f64 * 0.30
            + u.cached as f64 * 0.03
            + (u.output + GEMINI_THOUGHTS) as f64 * 2.50)
            / 1e6;
        assert_close(&r["cost_usd"], cost, "cost_usd");
        let path = r["path"].as_str().unwrap();
        assert!(path.contains("key=[REDACTED]"), "{path}");
        assert_eq!(r["request_headers"]["authorization"], "[REDACTED]", "{r}");
        assert_eq!(r["request_headers"]["content-type"], "application/json");
        let req_body = r["request_body"].as_str().unwrap();
        assert!(req_body.starts_with(r#"{"contents":"#), "{req_body}");
        assert!(
            req_body.ends_with("bytes]"),
            "truncated to 64 bytes: {req_body}"
        );
        assert!(
            r["response_body"].as_str().unwrap().contains("candidates"),
            "{r}"
        );
    }
    let log = std::fs::read_to_string(node.connection_log()).unwrap();
    assert!(
        !log.contains("AIza-test-secret"),
        "API keys never reach the log"
    );
    assert!(!log.contains("sk-test-secret"));
}

/// A slow provider stream reaches the workload event by event, as it is
/// produced (no buffering in the proxy), and counts as an active stream
/// while it flows.
#[test]
fn slow_streams_are_relayed_event_by_event() {
    if !require_privileged("slow_streams_are_relayed_event_by_event") {
        return;
    }
    use std::io::BufRead;
    let mut node = TestNode::new(1);
    node.start_agent("");
    let pod = &node.pods[0];
    let mut curl = pod.https_post_command(
        &node.node_ca_cert(),
        PROVIDER_HOST,
        "/v1/chat/completions",
        r#"{"model":"mock-slow","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    );
    let mut child = curl
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run curl");
    let started = std::time::Instant::now();
    let mut arrivals = Vec::new();
    let mut active_mid_stream = None;
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.expect("read curl output");
        if line.starts_with("data: ") {
            arrivals.push(started.elapsed());
            if arrivals.len() == 2 {
                active_mid_stream = metric(&node.metrics(), "tollgate_active_streams");
            }
        }
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(arrivals.len(), 8, "every event arrives: {arrivals:?}");
    // The mock writes one event every SLOW_CHUNK_DELAY; had the proxy
    // buffered the response, they would arrive together at the end.
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread >= SLOW_CHUNK_DELAY * 7 / 2,
        "events arrive as they are produced, not at once: {arrivals:?}"
    );
    assert_eq!(
        active_mid_stream,
        Some(1.0),
        "an active stream while it flows"
    );
    let r = &node.wait_requests(1)[0];
    assert_eq!(r["usage"]["output_tokens"], OPENAI_USAGE.output, "{r}");
    assert_eq!(
        metric(&node.metrics(), "tollgate_active_streams"),
        Some(0.0)
    );
}
