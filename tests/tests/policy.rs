//! The policy engine with real clients in the test node: deny by model and
//! by provider (with and without TLS termination), model aliases and output
//! caps as the provider receives them, observe (relay) for a workload that
//! does not trust the node CA, and reloads — a bad one keeps the running
//! policy, a good one applies without a restart.
use std::time::Duration;

use tollgate_tests::{
    TestNode,
    node::{ANTHROPIC_HOST, PROVIDER_HOST},
    process::wait_until,
    require_privileged,
};

/// Records of `kind` (`request`, or None for connection records), waiting for `n`.
fn records(node: &TestNode, kind: Option<&str>, n: usize) -> Vec<serde_json::Value> {
    wait_until(Duration::from_secs(5), || {
        let r: Vec<_> = node
            .connections()
            .into_iter()
            .filter(|r| r.get("kind").and_then(|k| k.as_str()) == kind)
            .collect();
        (r.len() >= n).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "expected {n} {kind:?} records: {:?}\n{}",
            node.connections(),
            node.agent_log()
        )
    })
}

fn rules(node: &TestNode) -> String {
    format!(
        r#"policy:
  default: allow
  rules:
    - name: no-frontier
      match: {{pod_uids: ["{p0}"]}}
      models: ["gpt-4o"]
      action: deny
      message: this team uses gpt-4o-mini
    - name: capped
      match: {{pod_uids: ["{p0}"]}}
      providers: [openai]
      action: allow
      max_output_tokens: 32
      model_aliases: {{fast: gpt-4o-mini}}
      max_request_bytes: 2000
      headers: {{remove: [x-drop-me], set: {{openai-project: proj_tollgate}}}}
    - name: legacy-observe
      match: {{pod_uids: ["{p1}"]}}
      action: observe
    - name: no-anthropic
      providers: [anthropic]
      action: deny
      message: Anthropic is not approved here
"#,
        p0 = node.pods[0].uid,
        p1 = node.pods[1].uid
    )
}

/// A call trusting only the provider's own certificate (the test upstream
/// CA): it succeeds only if the connection is relayed, not terminated.
fn relayed_post(node: &TestNode, pod: usize, host: &str) -> std::process::Output {
    let path = if host == ANTHROPIC_HOST {
        "/v1/messages"
    } else {
        "/v1/chat/completions"
    };
    node.pods[pod].https_post(
        &node.dir.join("upstream-ca.crt"),
        host,
        path,
        r#"{"model":"gpt-4o","max_tokens":10,"messages":[]}"#,
    )
}

/// curl's output with response headers (`-i`).
fn post_with_headers(node: &TestNode, pod: usize, host: &str, body: &str) -> String {
    let out = node.pods[pod]
        .https_post_command(&node.node_ca_cert(), host, "/v1/chat/completions", body)
        .args(["-i", "-H", "x-drop-me: secret-team-header"])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rules_deny_rewrite_cap_and_observe_per_workload() {
    if !require_privileged("rules_deny_rewrite_cap_and_observe_per_workload") {
        return;
    }
    let mut node = TestNode::new(2);
    node.start_agent(&rules(&node));

    // Denied model: a provider-shaped 403 with the rule's message.
    let out = post_with_headers(
        &node,
        0,
        PROVIDER_HOST,
        r#"{"model":"gpt-4o","messages":[]}"#,
    );
    assert!(
        out.starts_with("HTTP/1.1 403") || out.starts_with("HTTP/2 403"),
        "{out}"
    );
    assert!(out.contains("this team uses gpt-4o-mini"), "{out}");
    assert!(out.contains("\"code\":\"rule:no-frontier\""), "{out}");

    // Alias and cap: the provider receives the real model and the capped limit.
    let out = post_with_headers(
        &node,
        0,
        PROVIDER_HOST,
        r#"{"model":"fast","max_tokens":1000,"messages":[]}"#,
    );
    assert!(out.contains(" 200"), "{out}");
    assert!(out.contains("x-mock-model: gpt-4o-mini"), "{out}");
    assert!(out.contains("x-mock-max-tokens: 32"), "{out}");
    assert!(
        out.contains("x-mock-openai-project: proj_tollgate"),
        "{out}"
    );
    assert!(
        !out.contains("x-mock-drop-me"),
        "removed header reached the provider: {out}"
    );
    // Over the rule's body limit: 413 before anything is sent.
    let big = format!(
        r#"{{"model":"fast","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(3000)
    );
    let out = post_with_headers(&node, 0, PROVIDER_HOST, &big);
    assert!(out.contains(" 413"), "{out}");
    assert!(out.contains("policy rule:capped allows"), "{out}");

    // Denied provider, connection terminated: Anthropic's own error shape.
    let out = post_with_headers(
        &node,
        0,
        ANTHROPIC_HOST,
        r#"{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[]}"#,
    );
    assert!(out.contains(" 403"), "{out}");
    assert!(out.contains("\"permission_error\""), "{out}");
    assert!(out.contains("Anthropic is not approved here"), "{out}");

    // Observe: pod 1's connection is relayed, not terminated — it works with
    // the provider's own certificate (the test upstream CA), no node CA trust.
    let out = relayed_post(&node, 1, PROVIDER_HOST);
    assert!(
        out.status.success(),
        "observe relays to the provider: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let reqs = records(&node, Some("request"), 4);
    let by_model = |m: &str| {
        reqs.iter()
            .find(|r| r["model"] == m)
            .unwrap_or_else(|| panic!("no record for {m}: {reqs:?}"))
    };
    let denied = by_model("gpt-4o");
    assert_eq!(denied["decision"], "deny", "{denied}");
    assert_eq!(denied["reason"], "rule:no-frontier");
    assert_eq!(denied["status"], 403);
    let capped = by_model("fast");
    assert_eq!(capped["decision"], "allow");
    assert_eq!(capped["reason"], "rule:capped");
    assert_eq!(capped["routed_model"], "gpt-4o-mini");
    assert_eq!(capped["capped_output_tokens"], 32);
    let anthropic = by_model("claude-sonnet-4-5");
    assert_eq!(anthropic["reason"], "rule:no-anthropic");

    let conns = records(&node, None, 1);
    let observed = conns
        .iter()
        .find(|r| r["workload"]["pod_uid"] == node.pods[1].uid.as_str())
        .unwrap_or_else(|| panic!("no relayed connection of pod 1: {conns:?}"));
    assert_eq!(observed["decision"], "observe", "{observed}");
    assert_eq!(observed["reason"], "rule:legacy-observe");
    assert_eq!(observed["tls"]["sni"], PROVIDER_HOST);
    assert!(observed["bytes_received"].as_u64().unwrap() > 0);

    let m = node.metrics();
    for series in [
        "tollgate_decisions_total{decision=\"deny\",provider=\"openai\",reason=\"rule:no-frontier\"} 1",
        "tollgate_decisions_total{decision=\"allow\",provider=\"openai\",reason=\"rule:capped\"} 1",
        "tollgate_decisions_total{decision=\"observe\",provider=\"openai\",reason=\"rule:legacy-observe\"} 1",
        "tollgate_policy_rules 4",
    ] {
        assert!(m.contains(series), "{series}\n{m}");
    }
}

#[test]
fn deny_holds_without_tls_termination() {
    if !require_privileged("deny_holds_without_tls_termination") {
        return;
    }
    let mut node = TestNode::new(2);
    // No node CA: nothing is terminated, yet the deny rule closes the connection.
    node.start_agent(&format!(
        "tls:\n  ca_dir: \"\"\n{}",
        rules(&node).replace("pod_uids: [\"", "pod_uids: [\"x")
    ));
    let out = relayed_post(&node, 0, ANTHROPIC_HOST);
    assert!(!out.status.success(), "denied: the connection is closed");
    // Another provider is allowed and relayed.
    let ok = relayed_post(&node, 0, PROVIDER_HOST);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let conns = records(&node, None, 2);
    let denied = conns
        .iter()
        .find(|r| r["result"] == "denied")
        .unwrap_or_else(|| panic!("no denied connection: {conns:?}"));
    assert_eq!(denied["provider"], "anthropic");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["reason"], "rule:no-anthropic");
    assert_eq!(denied["bytes_sent"], 0, "nothing reached the provider");
}

#[test]
fn a_bad_reload_keeps_the_running_policy_and_a_good_one_applies() {
    if !require_privileged("a_bad_reload_keeps_the_running_policy_and_a_good_one_applies") {
        return;
    }
    let mut node = TestNode::new(1);
    let deny = "policy:\n  rules:\n    - {name: no-gpt4o, models: [gpt-4o], action: deny}\n";
    node.start_agent(deny);
    let status = |node: &TestNode| {
        let out = post_with_headers(
            node,
            0,
            PROVIDER_HOST,
            r#"{"model":"gpt-4o","messages":[]}"#,
        );
        out.lines().next().unwrap_or_default().to_string()
    };
    assert!(status(&node).contains("403"));

    // Invalid: an unknown provider. Signalled at once with SIGHUP.
    node.write_agent_config(
        "policy:\n  rules:\n    - {name: no-gpt4o, providers: [openia], action: deny}\n",
    );
    node.agent.as_ref().unwrap().signal(libc::SIGHUP);
    let rejected = wait_until(Duration::from_secs(5), || {
        node.metrics()
            .contains("tollgate_config_reloads_total{result=\"rejected\"}")
            .then_some(())
    });
    assert!(rejected.is_some(), "{}", node.agent_log());
    assert!(node.agent_log().contains("policy.rules[0].providers[0]"));
    assert!(status(&node).contains("403"), "the running policy stays");

    // Valid: no rules. Picked up from the file change alone.
    node.write_agent_config("policy:\n  rules: []\n");
    let applied = wait_until(Duration::from_secs(10), || {
        node.metrics()
            .contains("tollgate_config_reloads_total{result=\"applied\"} 1")
            .then_some(())
    });
    assert!(applied.is_some(), "{}", node.agent_log());
    assert!(status(&node).contains("200"), "{}", node.agent_log());
}

#[test]
fn injected_credentials_replace_the_workloads_and_follow_the_secret() {
    if !require_privileged("injected_credentials_replace_the_workloads_and_follow_the_secret") {
        return;
    }
    let mut node = TestNode::new(1);
    let key = node.dir.join("secret/openai-key");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    std::fs::write(&key, "sk-real-injected-1\n").unwrap();
    node.start_agent(&format!(
        "policy:\n  rules:\n    - {{name: team-key, providers: [openai], action: allow, credential_file: {}}}\n",
        key.display()
    ));
    let call = |node: &TestNode| {
        post_with_headers(
            node,
            0,
            PROVIDER_HOST,
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
    };
    let out = call(&node);
    assert!(
        out.contains("x-mock-credential: Bearer sk-real-injected-1"),
        "{out}"
    );
    assert!(
        !out.contains("sk-test-secret"),
        "the workload's key is not forwarded: {out}"
    );

    // The Secret changes: the next call carries the new key, no restart.
    std::fs::write(&key, "sk-real-injected-22\n").unwrap();
    let out = call(&node);
    assert!(
        out.contains("x-mock-credential: Bearer sk-real-injected-22"),
        "{out}"
    );

    // The Secret disappears: refused with a clear error, never the workload's key.
    std::fs::remove_file(&key).unwrap();
    let out = call(&node);
    assert!(out.contains(" 503"), "{out}");
    assert!(
        out.contains("credential of policy rule:team-key is unavailable"),
        "{out}"
    );

    let recs = records(&node, Some("request"), 3);
    assert!(
        recs[..2].iter().all(|r| r["credential_injected"] == true),
        "{recs:?}"
    );
    let log = std::fs::read_to_string(node.connection_log()).unwrap() + &node.agent_log();
    assert!(!log.contains("sk-real-injected"), "keys never reach a log");
}

#[test]
fn budgets_refuse_when_spent_warn_at_the_soft_share_and_survive_a_restart() {
    if !require_privileged("budgets_refuse_when_spent_warn_at_the_soft_share_and_survive_a_restart")
    {
        return;
    }
    let mut node = TestNode::new(1);
    let state = node.dir.join("state/budgets.json");
    // A mock chat call costs 7.275e-6 USD (gpt-4o-mini list price): the
    // third call spends the 2e-5 budget; half of it warns.
    let config = format!(
        "budget_state_file: {}\npolicy:\n  rules:\n    - name: budgeted\n      action: allow\n      budget: {{daily_usd: 0.00002, soft_percent: 50}}\n",
        state.display()
    );
    node.start_agent(&config);
    let call = |node: &TestNode| {
        post_with_headers(
            node,
            0,
            PROVIDER_HOST,
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
    };
    for i in 0..3 {
        let out = call(&node);
        assert!(out.contains(" 200"), "call {i}: {out}");
    }
    // Spend is charged when a call ends: wait for the third record.
    records(&node, Some("request"), 3);
    let out = call(&node);
    assert!(out.contains(" 429"), "{out}");
    assert!(
        out.contains("daily budget of policy rule:budgeted is spent"),
        "{out}"
    );
    assert!(out.to_ascii_lowercase().contains("retry-after:"), "{out}");

    let m = node.metrics();
    assert!(
        m.contains(
            "tollgate_budget_soft_limit_reached_total{period=\"daily\",rule=\"rule:budgeted\"} 1"
        ),
        "{m}"
    );
    assert!(m.contains("tollgate_budget_spent_usd{key=\""), "{m}");
    assert!(node.agent_log().contains("budget soft limit reached"));

    // `tollgate status` shows the spend.
    let status = node
        .node
        .command(&tollgate_tests::node::agent_bin())
        .args(["status", "--addr", "127.0.0.1:9464"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        text.contains("rule:budgeted") && text.contains(&node.pods[0].uid),
        "{text}"
    );

    // Restart (SIGTERM saves the spend): still refused.
    assert_eq!(
        node.agent
            .as_mut()
            .unwrap()
            .terminate(Duration::from_secs(15)),
        Some(true)
    );
    assert!(state.exists(), "spend saved at shutdown");
    node.start_agent(&config);
    let out = call(&node);
    assert!(out.contains(" 429"), "the budget survives a restart: {out}");
}

#[test]
fn failover_moves_a_failing_call_to_an_equivalent_target_never_mid_stream() {
    if !require_privileged("failover_moves_a_failing_call_to_an_equivalent_target_never_mid_stream")
    {
        return;
    }
    let mut node = TestNode::new(1);
    node.start_agent(
        r#"policy:
  failover:
    - name: mini
      targets:
        - {provider: openai, model: mock-500}
        - {provider: backup, model: gpt-4o-mini}
      backoff: 10ms
    - name: cut
      targets:
        - {provider: openai, model: mock-cut}
        - {provider: backup, model: gpt-4o-mini}
      backoff: 10ms
  rules:
    - {name: cut-rule, models: [mock-cut], action: allow, failover: cut}
    - {name: chat, action: allow, failover: mini}
"#,
    );
    // The primary answers 500: the call is served by the backup, with the
    // backup's model; the workload sees one successful response.
    let out = post_with_headers(
        &node,
        0,
        PROVIDER_HOST,
        r#"{"model":"mock-500","messages":[]}"#,
    );
    assert!(out.contains(" 200"), "{out}");
    assert!(out.contains("x-mock-model: gpt-4o-mini"), "{out}");
    // Cut mid-stream: already streaming, so no failover; the workload gets
    // what was sent, then the error.
    let out = post_with_headers(
        &node,
        0,
        PROVIDER_HOST,
        r#"{"model":"mock-cut","stream":true,"messages":[]}"#,
    );
    assert!(out.contains(" 200") && out.contains("Hello"), "{out}");
    // Not a declared target: never moved.
    let out = post_with_headers(
        &node,
        0,
        PROVIDER_HOST,
        r#"{"model":"gpt-4o","messages":[]}"#,
    );
    assert!(out.contains("x-mock-model: gpt-4o\r"), "{out}");

    let recs = records(&node, Some("request"), 3);
    let by_model = |m: &str| {
        recs.iter()
            .find(|r| r["model"] == m)
            .unwrap_or_else(|| panic!("no record for {m}: {recs:?}"))
    };
    let moved = by_model("mock-500");
    assert_eq!(moved["served_by"], "backup", "{moved}");
    assert_eq!(moved["status"], 200);
    assert_eq!(
        moved["upstream"],
        format!(
            "{}:{}",
            tollgate_tests::node::UPSTREAM_V4_BACKUP,
            tollgate_tests::node::TLS_PORT
        )
    );
    let attempts = moved["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{moved}");
    assert_eq!(attempts[0]["provider"], "openai");
    assert_eq!(attempts[0]["status"], 500);
    assert_eq!(attempts[0]["result"], "retried");
    assert_eq!(attempts[1]["provider"], "backup");
    assert_eq!(attempts[1]["model"], "gpt-4o-mini");
    assert_eq!(attempts[1]["status"], 200);

    let cut = by_model("mock-cut");
    assert_eq!(cut["attempts"].as_array().unwrap().len(), 1, "{cut}");
    assert!(cut.get("served_by").is_none());
    assert_eq!(cut["result"], "upstream_error");

    let plain = by_model("gpt-4o");
    assert!(
        plain.get("attempts").is_none() && plain.get("served_by").is_none(),
        "{plain}"
    );
}

#[test]
fn two_agents_share_one_budget_through_redis_and_decide_locally_without_it() {
    if !require_privileged(
        "two_agents_share_one_budget_through_redis_and_decide_locally_without_it",
    ) {
        return;
    }
    let mut redis = tollgate_tests::redis::RedisServer::start("shared-budget");
    // Two nodes (two agents), one global budget of 2e-5 USD; a call costs 7.275e-6.
    let config = format!(
        "state: {{backend: redis, redis_url: \"{}\", timeout: 300ms}}\npolicy:\n  rules:\n    - name: shared-rate\n      providers: [anthropic]\n      action: allow\n      limits: {{per: global, requests_per_minute: 3}}\n    - name: shared\n      action: allow\n      budget: {{per: global, daily_usd: 0.00002}}\n",
        redis.url()
    );
    let mut a = TestNode::new(1);
    a.start_agent(&config);
    let mut b = TestNode::new(1);
    b.start_agent(&config);
    let call = |node: &TestNode| {
        post_with_headers(
            node,
            0,
            PROVIDER_HOST,
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
    };
    for node in [&a, &a, &b] {
        let out = call(node);
        assert!(out.contains(" 200"), "{out}");
    }
    // Node A spent 1.5e-5 itself; with B's call the shared total passes 2e-5.
    let refused = wait_until(Duration::from_secs(5), || {
        call(&a).contains(" 429").then_some(())
    });
    assert!(
        refused.is_some(),
        "node A must see node B's spend:\n{}",
        a.agent_log()
    );
    assert!(call(&b).contains(" 429"));
    assert!(a.agent_log().contains("budgets are shared through Redis"));

    // One rate limit for both nodes: 3 requests a minute in all.
    let anthropic = |node: &TestNode| {
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}"#;
        post_with_headers(node, 0, ANTHROPIC_HOST, body)
    };
    for node in [&a, &b, &a] {
        assert!(anthropic(node).contains(" 200"));
    }
    let out = anthropic(&b);
    assert!(out.contains(" 429"), "node B sees node A's requests: {out}");
    assert!(
        out.contains("anthropic-ratelimit-requests-limit: 3"),
        "{out}"
    );

    // Redis goes away: decisions continue with each node's own spend.
    redis.stop();
    let out = call(&a);
    assert!(
        out.contains(" 200"),
        "A's own spend is under the budget: {out}"
    );
    assert!(anthropic(&a).contains(" 200"), "A's own bucket is full");
    let m = a.metrics();
    assert!(!m.contains("tollgate_state_errors_total 0"), "{m}");
    assert!(m.contains("tollgate_state_errors_total"), "{m}");
    assert!(
        a.agent_log().contains("shared budget state unavailable"),
        "{}",
        a.agent_log()
    );
}
