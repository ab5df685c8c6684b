//! What Tollgate counts is what the provider served, however a call ends:
//! a client that leaves before the response headers is still recorded and
//! charged; concurrent calls cannot overspend a budget (this node, and two
//! agents sharing Redis); a budgeted rule refuses a model it cannot price;
//! and after `kill -9` every call the provider served has exactly one record.
use std::{process::Stdio, time::Duration};

use tollgate_tests::{
    TestNode,
    mock_llm::{OPENAI_USAGE, THINK},
    node::PROVIDER_HOST,
    process::wait_until,
    require_privileged,
};

/// `mock-*` priced like gpt-4o-mini (the mock answers as gpt-4o-mini, which
/// is what the record's cost is billed as).
const MOCK_PRICES: &str =
    "pricing:\n  models:\n    - {match: \"mock-*\", input: 0.15, output: 0.6}\n";

/// A slow stream (~2.4 s) whose reservation exceeds its real cost: 100
/// characters of input (25 tokens estimated) and at most 10 output tokens.
fn slow_call() -> String {
    format!(
        r#"{{"model":"mock-slow","stream":true,"stream_options":{{"include_usage":true}},"max_tokens":10,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(100)
    )
}

/// Worst case the proxy reserves for `slow_call` at MOCK_PRICES.
const SLOW_RESERVATION: f64 = (25.0 * 0.15 + 10.0 * 0.6) / 1e6;
/// What one mock call costs (gpt-4o-mini: 18 fresh + 5 cached input at
/// half price, 7 output).
const CALL_COST: f64 = (18.0 * 0.15 + 5.0 * 0.075 + 7.0 * 0.6) / 1e6;

/// Start `n` calls from pod 0 of `node` at once; wait for all to end and
/// for each node's audit log to hold their `n` records (a record is written
/// after the client got its last byte, so curl's exit alone is not enough).
fn concurrent_calls(nodes: &[(&TestNode, usize)], body: &str) {
    let mut children = Vec::new();
    for (node, n) in nodes {
        for _ in 0..*n {
            let child = node.pods[0]
                .https_post_command(
                    &node.node_ca_cert(),
                    PROVIDER_HOST,
                    "/v1/chat/completions",
                    body,
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run curl");
            children.push(child);
        }
    }
    for mut c in children {
        let _ = c.wait();
    }
    for (node, n) in nodes {
        node.wait_requests_within(*n, Duration::from_secs(15));
    }
}

/// The cost recorded for calls the provider answered, and their number.
fn spent(node: &TestNode) -> (f64, usize) {
    let recs: Vec<_> = node
        .request_records()
        .into_iter()
        .filter(|r| r["decision"] == "allow")
        .collect();
    let cost = recs.iter().filter_map(|r| r["cost_usd"].as_f64()).sum();
    (cost, recs.len())
}

/// This node's daily budget spend, from its metrics (one budget configured).
fn daily_budget_spent(node: &TestNode) -> f64 {
    let m = node.metrics();
    m.lines()
        .find(|l| l.starts_with("tollgate_budget_spent_usd{") && l.contains("period=\"daily\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no budget spend: {m}"))
}

fn served(node: &TestNode) -> usize {
    node.mock_requests()
        .iter()
        .filter(|r| r["model"] == "mock-slow")
        .count()
}

#[test]
fn a_client_that_leaves_before_the_headers_is_recorded_and_charged() {
    if !require_privileged("a_client_that_leaves_before_the_headers_is_recorded_and_charged") {
        return;
    }
    let mut node = TestNode::new(1);
    node.start_agent(&format!(
        "{MOCK_PRICES}policy:\n  rules:\n    - {{name: budgeted, action: allow, budget: {{daily_usd: 1.0}}}}\n"
    ));
    // The provider thinks for 1.5 s; the client gives up after 0.5 s.
    let out = node.pods[0]
        .https_post_command(
            &node.node_ca_cert(),
            PROVIDER_HOST,
            "/v1/chat/completions",
            r#"{"model":"mock-think","messages":[{"role":"user","content":"Say hello"}]}"#,
        )
        .args(["-m", "0.5"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the client gave up before the answer"
    );
    let recs = node.wait_requests_within(1, THINK + Duration::from_secs(5));
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r["result"], "client_disconnected", "{r}");
    assert_eq!(r["status"], 200, "{r}");
    // The provider's answer was read for its exact usage, and charged.
    assert_eq!(r["usage"]["estimated"], false, "{r}");
    assert_eq!(r["usage"]["input_tokens"], OPENAI_USAGE.input, "{r}");
    assert_eq!(r["usage"]["output_tokens"], OPENAI_USAGE.output, "{r}");
    assert!(r["cost_usd"].as_f64().unwrap() > 0.0, "{r}");
    let spent = daily_budget_spent(&node);
    assert!(
        (spent - r["cost_usd"].as_f64().unwrap()).abs() < 1e-12,
        "{spent} {r}"
    );
    assert_eq!(served(&node), 0);
    assert_eq!(
        node.mock_requests()
            .iter()
            .filter(|q| q["model"] == "mock-think")
            .count(),
        1,
        "the provider served it once"
    );
}

#[test]
fn calls_of_clients_that_left_are_finished_up_to_a_bound() {
    if !require_privileged("calls_of_clients_that_left_are_finished_up_to_a_bound") {
        return;
    }
    const BOUND: usize = 16;
    const CALLS: usize = 40;
    let mut node = TestNode::new(1);
    // The provider answers after 30 s, the proxy waits 5 s for it; each
    // client gives up after 2 s: every call is abandoned while the provider
    // works, and BOUND of them are kept going.
    node.start_agent(&format!(
        "tls: {{upstream_response_timeout: 5s, max_abandoned_calls: {BOUND}}}"
    ));
    let mut children: Vec<_> = (0..CALLS)
        .map(|_| {
            node.pods[0]
                .https_post_command(
                    &node.node_ca_cert(),
                    PROVIDER_HOST,
                    "/v1/chat/completions",
                    r#"{"model":"mock-late","messages":[]}"#,
                )
                .args(["-m", "2"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in &mut children {
        let _ = c.wait();
    }
    let sent = node
        .mock_requests()
        .iter()
        .filter(|r| r["model"] == "mock-late")
        .count();
    assert_eq!(
        sent, CALLS,
        "every call reached the provider before its client left"
    );
    let recs = node.wait_requests_within(CALLS, Duration::from_secs(15));
    let cancelled = recs
        .iter()
        .filter(|r| {
            r["result"] == "client_disconnected"
                && r["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("max_abandoned_calls"))
        })
        .count();
    let finished = recs
        .iter()
        .filter(|r| r["result"] == "upstream_timeout")
        .count();
    eprintln!("{CALLS} abandoned calls: {finished} finished, {cancelled} cancelled");
    assert_eq!(recs.len(), CALLS, "one record per call the provider got");
    assert_eq!((finished, cancelled), (BOUND, CALLS - BOUND), "{recs:?}");
}

#[test]
fn concurrent_calls_cannot_overspend_a_budget() {
    if !require_privileged("concurrent_calls_cannot_overspend_a_budget") {
        return;
    }
    let budget = 10.0 * CALL_COST;
    let mut node = TestNode::new(1);
    node.start_agent(&format!(
        "{MOCK_PRICES}policy:\n  rules:\n    - {{name: budgeted, action: allow, budget: {{per: global, daily_usd: {budget}}}}}\n"
    ));
    concurrent_calls(&[(&node, 50)], &slow_call());
    let (cost, calls) = spent(&node);
    eprintln!(
        "50 concurrent calls, budget {budget:.3e} (10 calls): {calls} admitted, spent {cost:.3e}"
    );
    assert!(
        cost <= budget + SLOW_RESERVATION,
        "spent {cost} of {budget}"
    );
    assert!((1..50).contains(&calls), "{calls} admitted");
    assert_eq!(
        served(&node),
        calls,
        "the provider served exactly the admitted calls"
    );
    // The refused ones were told to retry shortly (committed, not spent).
    let refused: Vec<_> = node
        .request_records()
        .into_iter()
        .filter(|r| r["result"] == "budget_exhausted")
        .collect();
    assert_eq!(refused.len(), 50 - calls, "{refused:?}");
    let why = refused[0]["error"].as_str().unwrap_or_default();
    assert!(why.contains("committed to calls in flight"), "{why}");
}

#[test]
fn two_agents_sharing_redis_cannot_overspend_a_budget() {
    if !require_privileged("two_agents_sharing_redis_cannot_overspend_a_budget") {
        return;
    }
    let redis = tollgate_tests::redis::RedisServer::start("reserved-budget");
    let budget = 10.0 * CALL_COST;
    let config = format!(
        "{MOCK_PRICES}state: {{backend: redis, redis_url: \"{}\", timeout: 1s}}\npolicy:\n  rules:\n    - {{name: shared, action: allow, budget: {{per: global, daily_usd: {budget}}}}}\n",
        redis.url()
    );
    let mut a = TestNode::new(1);
    a.start_agent(&config);
    let mut b = TestNode::new(1);
    b.start_agent(&config);
    concurrent_calls(&[(&a, 25), (&b, 25)], &slow_call());
    let ((cost_a, calls_a), (cost_b, calls_b)) = (spent(&a), spent(&b));
    let cost = cost_a + cost_b;
    eprintln!(
        "25+25 concurrent calls on two agents, budget {budget:.3e}: {calls_a}+{calls_b} admitted, spent {cost:.3e}"
    );
    assert!(
        cost <= budget + SLOW_RESERVATION,
        "spent {cost} of {budget}"
    );
    assert!(calls_a + calls_b < 50);
    assert_eq!(served(&a), calls_a);
    assert_eq!(served(&b), calls_b);
    for node in [&a, &b] {
        let m = node.metrics();
        assert!(
            m.contains("tollgate_state_errors_total 0"),
            "Redis answered every decision: {m}"
        );
    }
}

#[test]
fn after_kill_9_every_call_the_provider_served_has_exactly_one_record() {
    if !require_privileged("after_kill_9_every_call_the_provider_served_has_exactly_one_record") {
        return;
    }
    const DONE: usize = 5;
    const IN_FLIGHT: usize = 20;
    let mut node = TestNode::new(1);
    let config = format!(
        "{MOCK_PRICES}policy:\n  rules:\n    - {{name: budgeted, action: allow, budget: {{daily_usd: 1.0}}}}\n"
    );
    node.start_agent(&config);
    // Calls that complete before the crash...
    concurrent_calls(&[(&node, DONE)], r#"{"model":"gpt-4o-mini","messages":[]}"#);
    node.wait_requests(DONE);
    // ...and twenty streams in flight (mock-slow: ~2.4 s each) when it is killed.
    let body = slow_call();
    let mut streams: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            node.pods[0]
                .https_post_command(
                    &node.node_ca_cert(),
                    PROVIDER_HOST,
                    "/v1/chat/completions",
                    &body,
                )
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_until(Duration::from_secs(10), || {
        (served(&node) == IN_FLIGHT).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{} of {IN_FLIGHT} streams reached the provider",
            served(&node)
        )
    });
    node.kill_agent();
    for s in &mut streams {
        let _ = s.wait();
    }
    let served_calls = node
        .mock_requests_where(|l| l.contains("/chat/completions"))
        .len();
    let before = node.request_records().len();
    node.start_agent(&config);
    assert_eq!(served_calls, DONE + IN_FLIGHT);
    let recs = node.wait_requests_within(served_calls, Duration::from_secs(10));
    eprintln!(
        "kill -9 with {IN_FLIGHT} streams in flight: {before} records before the restart, {} after",
        recs.len()
    );
    // Exactly one record per call the provider served: no call lost, none twice.
    let ids: std::collections::HashSet<_> = recs.iter().map(|r| r["id"].to_string()).collect();
    assert_eq!(ids.len(), recs.len(), "a call recorded twice");
    assert_eq!(recs.len(), served_calls, "{recs:?}");
    let restarted: Vec<_> = recs
        .iter()
        .filter(|r| r["result"] == "agent_restarted")
        .collect();
    let completed: Vec<_> = recs.iter().filter(|r| r["result"] == "ok").collect();
    assert_eq!(restarted.len() + completed.len(), served_calls, "{recs:?}");
    assert!(
        restarted.len() >= IN_FLIGHT - 2,
        "{} restarted",
        restarted.len()
    );
    // Completed calls carry what the provider reported...
    let input: u64 = completed
        .iter()
        .map(|r| r["usage"]["input_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(input, completed.len() as u64 * OPENAI_USAGE.input);
    // ...the others their estimate, priced and charged.
    for r in &restarted {
        assert_eq!(r["usage"]["estimated"], true, "{r}");
        assert_eq!(r["usage"]["input_tokens"], 25, "{r}");
        assert!(r["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{r}");
        assert_eq!(r["reason"], "rule:budgeted", "{r}");
    }
    assert!(
        node.agent_log().contains("recorded as agent_restarted"),
        "{}",
        node.agent_log()
    );
    let spent = daily_budget_spent(&node);
    let charged: f64 = restarted
        .iter()
        .filter_map(|r| r["cost_usd"].as_f64())
        .sum();
    assert!(
        spent >= charged - 1e-12,
        "the restarted calls are charged: {spent} < {charged}"
    );
}

#[test]
fn a_budgeted_rule_refuses_a_model_it_cannot_price() {
    if !require_privileged("a_budgeted_rule_refuses_a_model_it_cannot_price") {
        return;
    }
    let mut node = TestNode::new(1);
    node.start_agent(
        "policy:\n  rules:\n    - {name: budgeted, action: allow, budget: {daily_usd: 5}}\n",
    );
    let out = node.pods[0].chat(
        &node.node_ca_cert(),
        r#"{"model":"my-finetune-7","messages":[]}"#,
        &[],
    );
    assert!(out.contains(" 403"), "{out}");
    assert!(
        out.contains("no price for model `my-finetune-7`") && out.contains("pricing.models"),
        "says what is wrong and what to do: {out}"
    );
    assert!(
        node.provider_requests().is_empty(),
        "nothing reached the provider"
    );
    let r = &node.wait_requests(1)[0];
    assert_eq!(r["reason"], "rule:budgeted:unpriced_model", "{r}");
}
