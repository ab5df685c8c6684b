//! Admission without a socket: every refusal, every rewrite, and the order
//! of the steps, against local limit and budget stores.
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use hyper::body::Bytes;
use prometheus::IntCounter;

use super::*;
use crate::{
    policy::{PolicyConfig, budgets::Budgets},
    providers::{Api, adapter},
};

fn enforcer() -> Enforcer {
    let errors = || IntCounter::new("errors", "state errors").unwrap();
    Enforcer::new(
        Arc::new(LimitStore::new(None, errors())),
        Arc::new(BudgetStore::new(Budgets::default(), None, errors())),
    )
}

fn policy(yaml: &str) -> Policy {
    let cfg: PolicyConfig = serde_yaml::from_str(yaml).unwrap();
    let providers = ["openai", "anthropic", "gemini"].map(String::from);
    Policy::new(&cfg, &providers).unwrap()
}

fn workload() -> Workload {
    Workload {
        cgroup: "/kubepods/pod-a".into(),
        pod_uid: Some("uid-a".into()),
        ..Default::default()
    }
}

/// A JSON request of `api` to `target` with `body`, and the headers a
/// workload sends (its own key among them).
struct Req {
    api: Api,
    provider: &'static str,
    host: &'static str,
    target: &'static str,
    body: String,
    headers: HeaderMap,
    mcp_tools: Option<Vec<String>>,
}

fn chat(body: &str) -> Req {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer sk-workload"),
    );
    Req {
        api: Api::Openai,
        provider: "openai",
        host: "api.openai.com",
        target: "/v1/chat/completions",
        body: body.into(),
        headers,
        mcp_tools: None,
    }
}

/// A `tools/call` of `tool` (None: another MCP message) to MCP server `tools`.
fn mcp_call(tool: Option<&str>) -> Req {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let body = match tool {
        Some(t) => format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{t}","arguments":{{}}}}}}"#
        ),
        None => r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#.to_string(),
    };
    Req {
        api: Api::Mcp,
        provider: "tools",
        host: "mcp.tools.test",
        target: "/mcp",
        body,
        headers,
        mcp_tools: Some(tool.map(String::from).into_iter().collect()),
    }
}

fn mcp_policy(yaml: &str) -> Policy {
    let cfg: PolicyConfig = serde_yaml::from_str(yaml).unwrap();
    let providers = ["openai", "tools", "other"].map(String::from);
    Policy::with_mcp(&cfg, &providers, &["tools".into(), "other".into()]).unwrap()
}

async fn admit(e: &Enforcer, p: &Policy, r: Req) -> (Seen, Verdict) {
    let w = workload();
    let mut seen = Seen::default();
    let c = Candidate {
        id: "call-1",
        method: "POST",
        subject: Subject {
            workload: &w,
            comm: "app",
        },
        to: Upstream {
            provider: r.provider,
            host: r.host,
        },
        adapter: adapter(r.api),
        asks_stream_usage: true,
        target: r.target.into(),
        headers: r.headers,
        body: Bytes::from(r.body),
        mcp_tools: r.mcp_tools,
    };
    let prices = PriceTable::new(&Default::default()).unwrap();
    let v = e.admit(p, &prices, c, &mut seen).await;
    (seen, v)
}

fn body_json(a: &Admitted) -> serde_json::Value {
    serde_json::from_slice(&a.body).unwrap()
}

const GPT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#;

#[tokio::test]
async fn allowed_untouched_when_the_rule_changes_nothing() {
    let (seen, v) = admit(&enforcer(), &policy("default: allow"), chat(GPT)).await;
    let a = v.unwrap();
    assert_eq!(seen.reason, "default");
    assert_eq!(seen.info.operation, "chat");
    assert_eq!(seen.info.model.as_deref(), Some("gpt-4o"));
    assert_eq!(seen.input_chars, 5);
    assert_eq!(a.body, Bytes::from(GPT), "sent as received");
    assert_eq!(a.headers["authorization"], "Bearer sk-workload");
    assert!(a.routed_model.is_none() && a.capped_output_tokens.is_none());
    assert!(!a.credential_injected && a.hold.is_none() && a.budget.is_none());
}

#[tokio::test]
async fn a_stream_without_usage_is_made_to_ask_for_it() {
    let e = enforcer();
    let p = policy("default: allow");
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let (_, v) = admit(&e, &p, chat(body)).await;
    let a = v.unwrap();
    assert!(a.asked_stream_usage);
    assert_eq!(
        a.body,
        Bytes::from(
            r#"{"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[]}"#
        ),
        "one member in, nothing else touched"
    );
    // Already asking, or not a stream: sent as received.
    for body in [
        r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        GPT,
    ] {
        let a = admit(&e, &p, chat(body)).await.1.unwrap();
        assert!(!a.asked_stream_usage);
        assert_eq!(a.body, Bytes::from(body.to_string()));
    }
    // With an alias rewriting the body anyway, usage is asked in the same pass.
    let p = policy(
        "default: allow\nrules:\n  - {name: alias, model_aliases: {fast: gpt-4o-mini}, action: allow}",
    );
    let a = admit(
        &e,
        &p,
        chat(r#"{"model":"fast","stream":true,"messages":[]}"#),
    )
    .await
    .1
    .unwrap();
    assert!(a.asked_stream_usage);
    let v = body_json(&a);
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn a_body_declared_json_that_is_not_is_refused() {
    let e = enforcer();
    let p = policy("default: allow");
    for (body, empty) in [("", true), ("{\"model\":", false)] {
        let (seen, v) = admit(&e, &p, chat(body)).await;
        assert!(
            matches!(v, Err(Refusal::NotJson { empty: e }) if e == empty),
            "{body:?}"
        );
        assert_eq!(seen.reason, "", "refused before any rule");
    }
    // Not declared JSON: not refused for it (and passed as it came).
    let mut r = chat("plain");
    r.headers.remove("content-type");
    assert!(admit(&e, &p, r).await.1.is_ok());
}

#[tokio::test]
async fn a_denied_model_is_refused_with_the_rules_reason() {
    let p = policy(
        "default: allow\nrules:\n  - {name: no-4o, models: [\"gpt-4o*\"], action: deny, message: use the mini}",
    );
    let (seen, v) = admit(&enforcer(), &p, chat(GPT)).await;
    match v {
        Err(Refusal::Denied { rule, message }) => {
            assert_eq!(
                (rule.as_str(), message.as_str()),
                ("rule:no-4o", "use the mini")
            );
        }
        other => panic!("{:?}", other.err()),
    }
    assert_eq!(seen.reason, "rule:no-4o");
    assert_eq!(
        seen.info.model.as_deref(),
        Some("gpt-4o"),
        "recorded anyway"
    );
}

#[tokio::test]
async fn aliases_and_caps_rewrite_in_each_apis_terms() {
    let p = policy(
        "default: allow\nrules:\n  - {name: r, model_aliases: {fast: gpt-4o-mini, flash: gemini-2.5-flash}, max_output_tokens: 256, action: allow}",
    );
    let e = enforcer();
    let (_, v) = admit(&e, &p, chat(r#"{"model":"fast","max_tokens":4000}"#)).await;
    let a = v.unwrap();
    assert_eq!(a.routed_model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(a.capped_output_tokens, Some(256));
    let b = body_json(&a);
    assert_eq!(
        (b["model"].as_str(), b["max_tokens"].as_u64()),
        (Some("gpt-4o-mini"), Some(256))
    );
    // Gemini names the model in the path and caps in generationConfig.
    let mut r = chat(r#"{"contents":[]}"#);
    r.api = Api::Gemini;
    r.provider = "gemini";
    r.host = "generativelanguage.googleapis.com";
    r.target = "/v1beta/models/flash:generateContent?alt=sse";
    let (seen, v) = admit(&e, &p, r).await;
    let a = v.unwrap();
    assert_eq!(
        seen.info.model.as_deref(),
        Some("flash"),
        "the requested model is recorded"
    );
    assert_eq!(
        a.target,
        "/v1beta/models/gemini-2.5-flash:generateContent?alt=sse"
    );
    assert_eq!(body_json(&a)["generationConfig"]["maxOutputTokens"], 256);
}

#[tokio::test]
async fn a_body_over_the_rules_size_is_refused_after_rewriting() {
    let p =
        policy("default: allow\nrules:\n  - {name: small, max_request_bytes: 20, action: allow}");
    let (_, v) = admit(&enforcer(), &p, chat(GPT)).await;
    match v {
        Err(Refusal::OverRuleSize { rule, size, max }) => {
            assert_eq!((rule.as_str(), size, max), ("rule:small", GPT.len(), 20));
        }
        other => panic!("{:?}", other.err()),
    }
}

#[tokio::test]
async fn header_rules_apply() {
    let p = policy(
        "default: allow\nrules:\n  - {name: h, headers: {remove: [x-trace], set: {x-team: blue}}, action: allow}",
    );
    let mut r = chat(GPT);
    r.headers.insert("x-trace", HeaderValue::from_static("1"));
    let a = admit(&enforcer(), &p, r).await.1.unwrap();
    assert!(a.headers.get("x-trace").is_none());
    assert_eq!(a.headers["x-team"], "blue");
}

#[tokio::test]
async fn the_rules_key_replaces_the_workloads_or_the_call_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("openai");
    std::fs::write(&key, "sk-node\n").unwrap();
    let p = policy(&format!(
        "default: allow\nrules:\n  - {{name: k, credential_file: {}, action: allow}}",
        key.display()
    ));
    let e = enforcer();
    let a = admit(&e, &p, chat(GPT)).await.1.unwrap();
    assert!(a.credential_injected);
    assert_eq!(a.headers["authorization"], "Bearer sk-node");
    std::fs::remove_file(&key).unwrap();
    match admit(&e, &p, chat(GPT)).await.1 {
        Err(Refusal::CredentialUnavailable { rule }) => assert_eq!(rule, "rule:k"),
        other => panic!("{:?}", other.err()),
    }
}

#[tokio::test]
async fn a_spent_budget_refuses_before_limits_are_taken() {
    let p = policy(
        "default: allow\nrules:\n  - {name: b, budget: {daily_usd: 1.0}, limits: {requests_per_minute: 1}, action: allow}",
    );
    let e = enforcer();
    // Within budget: admitted, charged to the workload's key, one request held.
    let a = admit(&e, &p, chat(GPT)).await.1.unwrap();
    let b = a
        .budget
        .as_ref()
        .expect("the call carries its budget")
        .key
        .clone();
    assert_eq!((b.rule.as_str(), b.key.as_str()), ("rule:b", "uid-a"));
    assert!(a.hold.is_some(), "the one request a minute is taken");
    e.budgets
        .local
        .charge(&b, 2.0, time::OffsetDateTime::now_utc());
    match admit(&e, &p, chat(GPT)).await.1 {
        Err(Refusal::BudgetSpent { rule, spent }) => {
            assert_eq!((rule.as_str(), spent.period), ("rule:b", "daily"));
        }
        other => panic!("{:?}", other.err()),
    }
    drop(a);
}

#[tokio::test]
async fn a_budget_reserves_the_worst_case_and_refuses_what_it_cannot_price() {
    let p =
        policy("default: allow\nrules:\n  - {name: b, budget: {daily_usd: 1.0}, action: allow}");
    let e = enforcer();
    // gpt-4o: $2.50 in, $10 out per million; 5 chars ≈ 2 tokens in, 1000 out asked.
    let body =
        r#"{"model":"gpt-4o","max_tokens":1000,"messages":[{"role":"user","content":"hello"}]}"#;
    let a = admit(&e, &p, chat(body)).await.1.unwrap();
    let held = a.budget.as_ref().unwrap().reserved_usd;
    assert!(
        (held - (2.0 * 2.5 + 1000.0 * 10.0) / 1e6).abs() < 1e-12,
        "{held}"
    );
    // An unpriced model under a budget: refused, naming the model.
    match admit(&e, &p, chat(r#"{"model":"my-finetune-7","messages":[]}"#))
        .await
        .1
    {
        Err(Refusal::Unpriced { rule, model, .. }) => {
            assert_eq!(
                (rule.as_str(), model.as_deref()),
                ("rule:b", Some("my-finetune-7"))
            );
        }
        other => panic!("{:?}", other.err()),
    }
    // Without a budget the same model passes (nothing to spend from).
    let open = policy("default: allow");
    assert!(
        admit(
            &e,
            &open,
            chat(r#"{"model":"my-finetune-7","messages":[]}"#)
        )
        .await
        .1
        .is_ok()
    );
    // A dropped call (never sent) gives its reservation back.
    drop(a);
    assert!(
        e.budgets
            .local
            .rows(time::OffsetDateTime::now_utc())
            .is_empty()
    );
}

#[tokio::test]
async fn limits_refuse_with_which_and_when() {
    let p = policy(
        "default: allow\nrules:\n  - {name: rpm, limits: {requests_per_minute: 1}, action: allow}",
    );
    let e = enforcer();
    let first = admit(&e, &p, chat(GPT)).await.1.unwrap();
    match admit(&e, &p, chat(GPT)).await.1 {
        Err(Refusal::RateLimited { rule, limited }) => {
            assert_eq!(
                (rule.as_str(), limited.which, limited.limit),
                ("rule:rpm", "requests", 1)
            );
            assert!(limited.retry_after > std::time::Duration::ZERO);
        }
        other => panic!("{:?}", other.err()),
    }
    drop(first);
}

#[tokio::test]
async fn output_is_reserved_up_to_the_cap_the_policy_applied() {
    // 300 output tokens a minute: a cap of 200 reserves 200, so one call
    // fits and a second (while the first holds its reservation) does not;
    // without the cap the request's own 100 would let three through.
    let p = policy(
        "default: allow\nrules:\n  - {name: o, max_output_tokens: 200, limits: {output_tokens_per_minute: 300}, action: allow}",
    );
    let e = enforcer();
    let body = r#"{"model":"gpt-4o","max_tokens":100}"#;
    let first = admit(&e, &p, chat(body)).await.1.unwrap();
    assert_eq!(first.capped_output_tokens, None, "100 is under the cap");
    let second = admit(&e, &p, chat(body)).await.1.unwrap();
    let third = admit(&e, &p, chat(body)).await.1.unwrap();
    assert!(
        matches!(
            admit(&e, &p, chat(body)).await.1,
            Err(Refusal::RateLimited { .. })
        ),
        "three reservations of 100 fill 300"
    );
    drop((first, second, third));
    let p = policy(
        "default: allow\nrules:\n  - {name: c, max_output_tokens: 200, limits: {output_tokens_per_minute: 300}, action: allow}",
    );
    let open = r#"{"model":"gpt-4o"}"#;
    let first = admit(&e, &p, chat(open)).await.1.unwrap();
    assert_eq!(first.capped_output_tokens, Some(200));
    assert!(
        matches!(
            admit(&e, &p, chat(open)).await.1,
            Err(Refusal::RateLimited { .. })
        ),
        "the cap (200), not the default estimate, was reserved: 100 left"
    );
}

#[test]
fn keys_per_workload_pod_namespace_and_global() {
    let w = workload();
    assert_eq!(Enforcer::key_for(&w, LimitKey::Pod), "uid-a");
    assert_eq!(
        Enforcer::key_for(&w, LimitKey::Workload),
        "uid-a",
        "no metadata: the pod"
    );
    assert_eq!(Enforcer::key_for(&w, LimitKey::Namespace), "uid-a");
    assert_eq!(Enforcer::key_for(&w, LimitKey::Global), "");
}

#[tokio::test]
async fn mcp_calls_are_decided_by_tool_and_limited_per_tool() {
    let e = enforcer();
    let p = mcp_policy(
        "default: deny\nrules:\n  - name: tools\n    mcp: {servers: [tools], tools: {allow: [\"read_*\", add], deny: [read_secrets]}}\n    action: allow\n    limits: {requests_per_minute: 2}\n",
    );
    let refused = |v: &Verdict| match v {
        Err(Refusal::Denied { rule, message }) => Some((rule.clone(), message.clone())),
        _ => None,
    };
    // Listing is not a tool call: allowed, and not counted.
    for _ in 0..5 {
        let (seen, v) = admit(&e, &p, mcp_call(None)).await;
        assert_eq!(seen.info.operation, "mcp");
        assert!(v.unwrap().hold.is_none(), "a listing holds no limit");
    }
    let (_, v) = admit(&e, &p, mcp_call(Some("delete_repo"))).await;
    assert_eq!(
        refused(&v),
        Some((
            "rule:tools".into(),
            "tool `delete_repo` is not allowed by policy rule `tools`".into()
        ))
    );
    let (_, v) = admit(&e, &p, mcp_call(Some("read_secrets"))).await;
    assert!(refused(&v).is_some(), "deny wins over allow");
    // Two calls a minute of each tool: the third `add` waits, `read_file` does not.
    for _ in 0..2 {
        assert!(admit(&e, &p, mcp_call(Some("add"))).await.1.is_ok());
    }
    let (seen, v) = admit(&e, &p, mcp_call(Some("add"))).await;
    assert!(
        matches!(v, Err(Refusal::RateLimited { .. })),
        "{:?}",
        seen.reason
    );
    assert!(admit(&e, &p, mcp_call(Some("read_file"))).await.1.is_ok());
    // Another server is not this rule's: the default denies it.
    let mut other = mcp_call(Some("add"));
    other.provider = "other";
    let (seen, v) = admit(&e, &p, other).await;
    assert_eq!(seen.reason, "default");
    assert!(refused(&v).unwrap().1.contains("`mcp` call"));
}

/// A Converse call to Bedrock, signed by the workload (SigV4) or carrying
/// a Bedrock API key.
fn bedrock(sigv4: bool) -> Req {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let auth = if sigv4 {
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261203/us-east-1/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature=0123"
    } else {
        "Bearer ABSK-workload-key"
    };
    headers.insert("authorization", HeaderValue::from_static(auth));
    headers.insert(
        "x-amz-security-token",
        HeaderValue::from_static("session-token"),
    );
    Req {
        api: Api::Bedrock,
        provider: "bedrock",
        host: "bedrock-runtime.us-east-1.amazonaws.com",
        target: "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse",
        body: r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#.into(),
        headers,
        mcp_tools: None,
    }
}

fn bedrock_policy(yaml: &str) -> Policy {
    let cfg: PolicyConfig = serde_yaml::from_str(yaml).unwrap();
    Policy::new(&cfg, &["bedrock".to_string()]).unwrap()
}

#[tokio::test]
async fn a_bedrock_call_the_workload_signed_is_never_changed_under_its_signature() {
    let key = std::env::temp_dir().join(format!("tollgate-bedrock-key-{}", std::process::id()));
    std::fs::write(&key, "ABSK-node-held\n").unwrap();
    let haiku45 = "us.anthropic.claude-haiku-4-5-20251001-v1:0";
    let cases: Vec<(String, bool, Option<&str>)> = vec![
        // Nothing changed: the signed call goes as it came.
        ("default: allow".into(), true, None),
        (format!("rules:\n  - {{name: r, action: allow, model_aliases: {{\"anthropic.claude-3-5-haiku-20241022-v1:0\": \"{haiku45}\"}}}}"), true, Some("routes it to model")),
        ("rules:\n  - {name: r, action: allow, max_output_tokens: 100}".into(), true, Some("caps its output")),
        ("rules:\n  - {name: r, action: allow, headers: {set: {x-amz-date: \"20200101T000000Z\"}}}".into(), true, Some("signed header `x-amz-date`")),
        // A header the signature does not cover may change.
        ("rules:\n  - {name: r, action: allow, headers: {set: {x-team: a}}}".into(), true, None),
        // No signature to break: a Bedrock API key, or the rule's own key.
        ("rules:\n  - {name: r, action: allow, max_output_tokens: 100}".into(), false, None),
        (format!("rules:\n  - {{name: r, action: allow, max_output_tokens: 100, credential_file: {}}}", key.display()), true, None),
    ];
    for (yaml, sigv4, refused) in cases {
        let (seen, v) = admit(&enforcer(), &bedrock_policy(&yaml), bedrock(sigv4)).await;
        assert_eq!(
            seen.info.model.as_deref(),
            Some("anthropic.claude-3-5-haiku-20241022-v1:0")
        );
        match (refused, v) {
            (None, Ok(_)) => {}
            (Some(want), Err(Refusal::Unsignable { rule, change })) => {
                assert_eq!(rule, "rule:r", "{yaml}");
                assert!(change.contains(want), "{yaml}: {change}");
            }
            (want, got) => panic!(
                "{yaml} (sigv4 {sigv4}): want refusal {want:?}, got {:?}",
                got.err()
            ),
        }
    }
    // The rule's key replaces the signature and the workload's session token.
    let yaml = format!(
        "rules:\n  - {{name: r, action: allow, credential_file: {}}}",
        key.display()
    );
    let (_, v) = admit(&enforcer(), &bedrock_policy(&yaml), bedrock(true)).await;
    let a = v.unwrap();
    assert_eq!(a.headers["authorization"], "Bearer ABSK-node-held");
    assert!(!a.headers.contains_key("x-amz-security-token"));
    let _ = std::fs::remove_file(&key);
}
