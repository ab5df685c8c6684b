//! The clouds' model endpoints through Tollgate, with their official SDKs
//! inside a pod: AWS Bedrock's runtime with boto3 (`bedrock-runtime`),
//! against the mock runtime (`mock_bedrock`), which verifies every
//! request's SigV4 signature as AWS would; Vertex AI with google-genai and
//! AnthropicVertex, and service-account tokens from the mock's OAuth token
//! endpoint (`mock_google`), which verifies the grant's signature.
use tollgate_tests::{
    TestNode, mock_bedrock as bedrock,
    node::VERTEX_HOSTS,
    sdk::{boto3, run_app, sdk},
};

use bedrock::{HAIKU, HAIKU_US};

/// boto3's Converse, ConverseStream, InvokeModel and
/// InvokeModelWithResponseStream go through termination signed with the
/// workload's own keys: the provider verifies each signature (so Tollgate
/// changed nothing it covers), and the audit log counts each call's usage
/// as the mock served it — from JSON, from Bedrock's token-count headers and
/// from the event-stream frames boto3 itself read. A denied model is
/// refused with AWS's error shape (boto3 raises AccessDeniedException with
/// the rule's message); a rule that would reroute a signed call refuses it
/// instead of breaking its signature. Neither reaches the provider.
#[test]
fn boto3_bedrock_calls_are_governed_and_counted_under_the_workloads_signature() {
    let Some(python) = sdk(
        "boto3_bedrock_calls_are_governed_and_counted_under_the_workloads_signature",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    node.start_agent(
        "policy:\n  rules:\n    - {name: no-opus, models: [\"*claude-opus*\"], action: deny, message: opus is not for this team}\n    - name: reroute\n      models: [\"anthropic.claude-3-haiku-20240307-v1:0\"]\n      action: allow\n      model_aliases: {\"anthropic.claude-3-haiku-20240307-v1:0\": \"anthropic.claude-3-5-haiku-20241022-v1:0\"}\n    - {name: bedrock, providers: [bedrock], action: allow, budget: {daily_usd: 1.0}}\n",
    );
    let calls = [
        format!("converse={HAIKU}"),
        format!("converse_stream={HAIKU_US}"),
        format!("invoke={HAIKU}"),
        format!("invoke_stream={HAIKU_US}"),
        "converse=us.anthropic.claude-opus-4-1-20250805-v1:0".to_string(),
        "converse=anthropic.claude-3-haiku-20240307-v1:0".to_string(),
    ];
    let args: Vec<&str> = calls.iter().map(String::as_str).collect();
    let got = boto3(&node, &python, &args, bedrock::KEYS[0]);
    let seen = got["calls"].as_array().unwrap();
    let diag = || {
        format!(
            "{got}\nrecords: {:?}\nprovider: {:?}",
            node.connections(),
            node.mock_requests()
        )
    };
    let words = bedrock::WORDS.concat();
    for s in &seen[..4] {
        assert_eq!(s["text"], words.as_str(), "{s}\n{}", diag());
    }
    // What boto3 parsed: the mock's usage, in each call's own terms.
    assert_eq!(seen[0]["usage"]["inputTokens"], bedrock::INPUT_TOKENS);
    assert_eq!(seen[1]["usage"]["outputTokens"], bedrock::OUTPUT_TOKENS);
    assert_eq!(seen[2]["usage"]["input_tokens"], bedrock::INPUT_TOKENS);
    assert_eq!(seen[3]["usage"]["outputTokenCount"], bedrock::OUTPUT_TOKENS);
    assert_eq!(seen[4]["error"], "AccessDeniedException", "{}", diag());
    assert_eq!(seen[4]["status"], 403);
    assert!(
        seen[4]["message"]
            .as_str()
            .unwrap()
            .contains("opus is not for this team")
    );
    assert_eq!(seen[5]["error"], "AccessDeniedException", "{}", diag());
    assert!(
        seen[5]["message"].as_str().unwrap().contains("SigV4"),
        "{}",
        seen[5]
    );

    let recs = node.wait_requests(6);
    let cost = (21.0 * 0.80 + 4.0 * 0.08 + 7.0 * 4.0) / 1e6;
    for (i, (model, stream)) in [
        (HAIKU, false),
        (HAIKU_US, true),
        (HAIKU, false),
        (HAIKU_US, true),
    ]
    .iter()
    .enumerate()
    {
        let r = &recs[i];
        assert_eq!(r["provider"], "bedrock", "{r}");
        assert_eq!(r["operation"], "chat", "{r}");
        assert_eq!(r["model"], *model, "{r}");
        assert_eq!(r["stream"], *stream, "{r}");
        assert_eq!(r["decision"], "allow", "{r}");
        assert_eq!(r["reason"], "rule:bedrock", "{r}");
        assert_eq!(
            r["usage"]["input_tokens"],
            bedrock::INPUT_TOKENS + bedrock::CACHED_TOKENS,
            "{r}"
        );
        assert_eq!(
            r["usage"]["cached_input_tokens"],
            bedrock::CACHED_TOKENS,
            "{r}"
        );
        assert_eq!(r["usage"]["output_tokens"], bedrock::OUTPUT_TOKENS, "{r}");
        assert_eq!(r["usage"]["estimated"], false, "{r}");
        let c = r["cost_usd"].as_f64().unwrap();
        assert!((c - cost).abs() < 1e-12, "{c} vs {cost}: {r}");
        assert!(
            !r.to_string().contains(bedrock::KEYS[0].1),
            "no secret in the record"
        );
    }
    assert_eq!(recs[4]["reason"], "rule:no-opus", "{:?}", recs[4]);
    assert_eq!(
        recs[5]["reason"], "rule:reroute:unsignable",
        "{:?}",
        recs[5]
    );

    // The provider's own record: the four allowed calls, each signature
    // valid and made with the workload's key; nothing of the refused two.
    let log: Vec<_> = node
        .mock_requests()
        .into_iter()
        .filter(|r| r["bedrock"].is_string())
        .collect();
    let actions: Vec<_> = log.iter().map(|r| r["bedrock"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "converse",
            "converse-stream",
            "invoke",
            "invoke-with-response-stream"
        ],
        "{log:?}"
    );
    for r in &log {
        assert_eq!(r["signed_by"], bedrock::KEYS[0].0, "{r}");
        assert_eq!(r["host"], bedrock::HOST, "{r}");
    }
    assert_eq!(log[1]["model"], HAIKU_US);
}

/// Pods hold no AWS keys: a rule whose `credential_file` holds the node's
/// AWS keys (JSON) re-signs each call it allows with SigV4 after its
/// rewrites (here an output cap), and one holding a Bedrock API key sends
/// that instead. boto3 runs with placeholder keys the provider does not
/// know; the provider verifies every signature it gets as made with the
/// node's key, and receives the capped limits.
#[test]
fn bedrock_calls_are_re_signed_with_node_held_aws_keys() {
    let Some(python) = sdk(
        "bedrock_calls_are_re_signed_with_node_held_aws_keys",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    let (key, secret) = bedrock::KEYS[1];
    let keys = node.dir.join("aws-keys.json");
    std::fs::write(
        &keys,
        format!(
            "{{\"Version\": 1, \"AccessKeyId\": \"{key}\", \"SecretAccessKey\": \"{secret}\"}}\n"
        ),
    )
    .unwrap();
    let api_key = node.dir.join("bedrock-api-key");
    std::fs::write(&api_key, "ABSK-node-held-test-key\n").unwrap();
    node.start_agent(&format!(
        "policy:\n  rules:\n    - {{name: api-key, models: [\"*nova*\"], action: allow, credential_file: {}}}\n    - {{name: node-keys, providers: [bedrock], action: allow, max_output_tokens: 32, credential_file: {}}}\n",
        api_key.display(),
        keys.display()
    ));
    let calls = [
        format!("converse={HAIKU}"),
        format!("converse_stream={HAIKU_US}"),
        format!("invoke={HAIKU}"),
        format!("invoke_stream={HAIKU_US}"),
        "converse=us.amazon.nova-pro-v1:0".to_string(),
    ];
    let args: Vec<&str> = calls.iter().map(String::as_str).collect();
    let got = boto3(
        &node,
        &python,
        &args,
        ("AKIDPLACEHOLDER", "not-a-real-secret"),
    );
    let diag = || {
        format!(
            "{got}\nrecords: {:?}\nprovider: {:?}",
            node.connections(),
            node.mock_requests()
        )
    };
    for s in got["calls"].as_array().unwrap() {
        assert_eq!(s["text"], bedrock::WORDS.concat(), "{s}\n{}", diag());
    }
    let recs = node.wait_requests(5);
    for r in &recs[..4] {
        assert_eq!(r["reason"], "rule:node-keys", "{r}");
        assert_eq!(r["credential_injected"], true, "{r}");
        assert_eq!(r["usage"]["output_tokens"], bedrock::OUTPUT_TOKENS, "{r}");
        assert!(!r.to_string().contains(secret), "no secret in the record");
    }
    assert_eq!(recs[4]["reason"], "rule:api-key", "{:?}", recs[4]);

    let log: Vec<_> = node
        .mock_requests()
        .into_iter()
        .filter(|r| r["bedrock"].is_string())
        .collect();
    assert_eq!(log.len(), 5, "{log:?}");
    for r in &log[..4] {
        // Signed with the node's key (the placeholder one would fail), and
        // signed after the cap: the capped body is what the signature covers.
        assert_eq!(r["signed_by"], key, "{r}");
        assert_eq!(r["max_tokens"], 32, "{r}");
    }
    assert_eq!(
        log[4]["credential"], "Bearer ABSK-node-held-test-key",
        "{:?}",
        log[4]
    );
    assert_eq!(log[4]["signed_by"], serde_json::Value::Null);
}

/// Vertex AI with its official SDKs in a pod: google-genai (`vertexai=True`)
/// calls Gemini, AnthropicVertex calls Claude, each on its regional
/// endpoint with a placeholder OAuth token. Tollgate reads each publisher's
/// API from the path (model, stream), counts what the mock served, puts the
/// node-held token in place of the workload's, and refuses a denied model
/// in Google's error shape (the Anthropic SDK raises PermissionDeniedError).
#[test]
fn vertex_ai_sdks_are_governed_with_a_node_held_token() {
    use tollgate_tests::mock_llm::{ANTHROPIC_USAGE, GEMINI_THOUGHTS, GEMINI_USAGE, STREAM_WORDS};
    let Some(python) = sdk(
        "vertex_ai_sdks_are_governed_with_a_node_held_token",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    let token = node.dir.join("vertex-token");
    std::fs::write(&token, "ya29.node-held-test-token\n").unwrap();
    node.start_agent(&format!(
        "policy:\n  rules:\n    - {{name: no-opus, models: [\"claude-opus*\"], action: deny, message: opus is not for this team}}\n    - {{name: vertex, providers: [vertex], action: allow, credential_file: {}}}\n",
        token.display()
    ));
    let mut cmd = node.pods[0].app(
        &node.pod_hosts_file(),
        python.to_str().unwrap(),
        &[tollgate_tests::clients_dir()
            .join("vertex_client.py")
            .to_str()
            .unwrap()],
    );
    cmd.env("SSL_CERT_FILE", node.node_ca_cert());
    let got = run_app(&node, cmd);
    let diag = || {
        format!(
            "{got}\nrecords: {:?}\nprovider: {:?}",
            node.connections(),
            node.mock_requests()
        )
    };
    let words = STREAM_WORDS.concat();
    for k in ["gemini", "gemini_stream", "claude", "claude_stream"] {
        assert_eq!(got[k]["text"], words.as_str(), "{k}: {}", diag());
    }
    assert_eq!(got["gemini_stream"]["prompt_tokens"], GEMINI_USAGE.input);
    assert_eq!(
        got["claude_stream"]["output_tokens"],
        ANTHROPIC_USAGE.output
    );
    assert_eq!(
        got["denied"]["class"],
        "PermissionDeniedError",
        "{}",
        diag()
    );
    assert!(
        got["denied"]["message"]
            .as_str()
            .unwrap()
            .contains("opus is not for this team")
    );

    let recs = node.wait_requests(5);
    let expect = [
        ("gemini-2.5-flash", "generate_content", false),
        ("gemini-2.5-flash", "generate_content", true),
        ("claude-sonnet-4-5@20250929", "messages", false),
        ("claude-sonnet-4-5@20250929", "messages", true),
    ];
    for (r, (model, op, stream)) in recs.iter().zip(expect) {
        assert_eq!(r["provider"], "vertex", "{r}");
        assert_eq!(r["model"], model, "{r}");
        assert_eq!(r["operation"], op, "{r}");
        assert_eq!(r["stream"], stream, "{r}");
        assert_eq!(r["credential_injected"], true, "{r}");
        assert_eq!(r["usage"]["estimated"], false, "{r}");
        assert!(r["cost_usd"].as_f64().unwrap() > 0.0, "priced: {r}");
    }
    for r in &recs[..2] {
        assert_eq!(r["usage"]["input_tokens"], GEMINI_USAGE.input, "{r}");
        assert_eq!(
            r["usage"]["output_tokens"],
            GEMINI_USAGE.output + GEMINI_THOUGHTS,
            "{r}"
        );
    }
    for r in &recs[2..4] {
        assert_eq!(
            r["usage"]["input_tokens"],
            ANTHROPIC_USAGE.input + ANTHROPIC_USAGE.cached,
            "{r}"
        );
        assert_eq!(r["usage"]["output_tokens"], ANTHROPIC_USAGE.output, "{r}");
    }
    assert_eq!(recs[4]["reason"], "rule:no-opus", "{:?}", recs[4]);

    // The provider's own record: four calls on the two regional hosts, each
    // with the node's token, none with the workload's; the denied one absent.
    let log: Vec<_> = node.mock_requests_where(|l| l.contains("/publishers/"));
    assert_eq!(log.len(), 4, "{log:?}");
    for r in &log {
        assert_eq!(r["credential"], "Bearer ya29.node-held-test-token", "{r}");
    }
    let hosts: Vec<_> = log
        .iter()
        .map(|r| r["host"].as_str().unwrap_or_default())
        .collect();
    assert!(
        hosts[0].starts_with("us-central1-aiplatform")
            && hosts[3].starts_with("us-east5-aiplatform"),
        "{hosts:?}"
    );
}

/// A service-account key as the rule's credential: Tollgate signs the JWT
/// bearer grant with the account's key, exchanges it at the key's
/// `token_uri` (the mock's, which verifies the signature and issues tokens
/// living 3 s) and sends the token in place of the workload's. Calls over
/// 8 s see the token fetched again before it expires — every call the
/// provider got carried a valid one — and not once per call.
#[test]
fn vertex_tokens_from_a_service_account_are_fetched_again_before_they_expire() {
    use tollgate_tests::{mock_google, node::UPSTREAM_V4, require_privileged};
    if !require_privileged(
        "vertex_tokens_from_a_service_account_are_fetched_again_before_they_expire",
    ) {
        return;
    }
    let mut node = TestNode::new(1);
    let pem = node.dir.join("google-sa.pem");
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&pem)
        .output()
        .expect("run openssl (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = serde_json::json!({
        "type": "service_account", "project_id": "tollgate-test", "private_key_id": "k1",
        "private_key": std::fs::read_to_string(&pem).unwrap(),
        "client_email": mock_google::ACCOUNT,
        "token_uri": format!("https://{UPSTREAM_V4}/token"),
    });
    let sa = node.dir.join("service-account.json");
    std::fs::write(&sa, key.to_string()).unwrap();
    node.start_agent(&format!(
        "policy:\n  rules:\n    - {{name: vertex, providers: [vertex], action: allow, credential_file: {}}}\n",
        sa.display()
    ));
    let path = "/v1/projects/tollgate-test/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent";
    let body = r#"{"contents":[{"role":"user","parts":[{"text":"Say hello"}]}]}"#;
    let started = std::time::Instant::now();
    for i in 0..8 {
        let out = node.pods[0].https_post(&node.node_ca_cert(), VERTEX_HOSTS[0], path, body);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("usageMetadata"),
            "call {i}: {text}\n{}\nprovider: {:?}",
            node.agent_log(),
            node.mock_requests()
        );
        std::thread::sleep(std::time::Duration::from_millis(1000));
    }
    let spent = started.elapsed();
    let log = node.mock_requests();
    let calls = tollgate_tests::observed::requests_where(&log, |l| l.contains("/publishers/"));
    let grants: Vec<_> = log
        .iter()
        .filter(|r| r["request"] == "POST /token")
        .collect();
    assert_eq!(calls.len(), 8, "{log:?}");
    for c in &calls {
        assert_eq!(
            c["token_valid"], true,
            "an expired token reached the provider: {c}"
        );
    }
    assert!(
        grants.iter().all(|g| g["token_grant"] == true),
        "{grants:?}"
    );
    let tokens: std::collections::BTreeSet<_> = calls
        .iter()
        .map(|c| c["credential"].as_str().unwrap())
        .collect();
    // Tokens live 3 s and are fetched again after 80 % of that: over ~8 s,
    // at least three, and far fewer than one per call.
    let lifetimes = spent.as_secs_f64() / mock_google::TOKEN_LIFETIME.as_secs_f64();
    eprintln!(
        "8 calls over {spent:?} ({lifetimes:.1} token lifetimes): {} grants, {} tokens",
        grants.len(),
        tokens.len()
    );
    assert!(
        tokens.len() >= 3 && grants.len() <= 6,
        "{} grants, {tokens:?} over {spent:?} ({lifetimes:.1} lifetimes)",
        grants.len()
    );
    assert!(
        !node
            .connections()
            .iter()
            .any(|r| r.to_string().contains("PRIVATE KEY"))
    );
}

/// Azure OpenAI with Entra ID: a rule's `credential_file` holding an
/// application's client secret (as `az ad sp create-for-rbac` prints it)
/// is exchanged at Entra's token endpoint (the mock's, which checks the
/// secret and the Cognitive Services scope) for a bearer token, which each
/// call carries in place of the workload's `api-key`; the token is fetched
/// once for both calls.
#[test]
fn azure_openai_calls_carry_an_entra_token_in_place_of_the_api_key() {
    use tollgate_tests::{
        mock_entra as entra,
        mock_llm::{OPENAI_USAGE, STREAM_WORDS},
        node::UPSTREAM_V4,
        sdk::run_python,
    };
    let Some(python) = sdk(
        "azure_openai_calls_carry_an_entra_token_in_place_of_the_api_key",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    let app = node.dir.join("entra-app.json");
    let secret = serde_json::json!({
        "appId": entra::APP_ID, "displayName": "tollgate", "password": entra::SECRET,
        "tenant": entra::TENANT, "authority": format!("https://{UPSTREAM_V4}"),
    });
    std::fs::write(&app, secret.to_string()).unwrap();
    node.start_agent(&format!(
        "policy:\n  rules:\n    - {{name: azure, providers: [azure], action: allow, credential_file: {}}}\n",
        app.display()
    ));
    let got = run_python(&node, &python, "azure_client.py");
    let diag = || {
        format!(
            "{got}\nrecords: {:?}\nprovider: {:?}",
            node.connections(),
            node.mock_requests()
        )
    };
    assert_eq!(got["content"], STREAM_WORDS.concat(), "{}", diag());
    assert_eq!(got["stream_text"], STREAM_WORDS.concat(), "{}", diag());
    let recs = node.wait_requests(2);
    for r in &recs {
        assert_eq!(r["provider"], "azure", "{r}");
        assert_eq!(r["credential_injected"], true, "{r}");
        assert_eq!(r["usage"]["input_tokens"], OPENAI_USAGE.input, "{r}");
        assert!(!r.to_string().contains(entra::SECRET));
    }
    let log = node.mock_requests();
    let calls = tollgate_tests::observed::requests_where(&log, |l| l.contains("/chat/completions"));
    let grants: Vec<_> = log
        .iter()
        .filter(|r| r["token_grant"].is_boolean())
        .collect();
    assert_eq!(calls.len(), 2, "{log:?}");
    for c in &calls {
        assert_eq!(c["credential"], "Bearer eyJ0.mock-entra-1", "{c}");
        assert_eq!(c["token_valid"], true, "{c}");
        assert_eq!(c["api_key"], false, "the workload's api-key went on: {c}");
    }
    assert_eq!(grants.len(), 1, "one token for both calls: {grants:?}");
    assert_eq!(grants[0]["token_grant"], true, "{grants:?}");
}

/// Bedrock with an AWS web identity (EKS's IRSA shape: a role and a
/// projected service-account token file) as the rule's credential: Tollgate
/// exchanges the token at STS (`AssumeRoleWithWebIdentity`, the mock's,
/// which issues temporary keys living 3 s) and signs each call with the
/// current keys. Over ~8 s of calls the keys are renewed before they expire
/// — the mock refuses expired ones — and not once per call.
#[test]
fn bedrock_calls_are_signed_with_keys_from_sts_web_identity_renewed_before_expiry() {
    use tollgate_tests::node::UPSTREAM_V4;
    let Some(python) = sdk(
        "bedrock_calls_are_signed_with_keys_from_sts_web_identity_renewed_before_expiry",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    let token = node.dir.join("web-identity-token");
    std::fs::write(&token, format!("{}\n", bedrock::WEB_IDENTITY_TOKEN)).unwrap();
    let identity = node.dir.join("web-identity.json");
    let cfg = serde_json::json!({
        "RoleArn": bedrock::ROLE_ARN, "WebIdentityTokenFile": token,
        "StsEndpoint": format!("https://{UPSTREAM_V4}/sts"),
    });
    std::fs::write(&identity, cfg.to_string()).unwrap();
    node.start_agent(&format!(
        "policy:\n  rules:\n    - {{name: irsa, providers: [bedrock], action: allow, credential_file: {}}}\n",
        identity.display()
    ));
    let mut calls = Vec::new();
    for _ in 0..8 {
        calls.push(format!("converse={HAIKU}"));
        calls.push("sleep=1".to_string());
    }
    let args: Vec<&str> = calls.iter().map(String::as_str).collect();
    let got = boto3(
        &node,
        &python,
        &args,
        ("AKIDPLACEHOLDER", "not-a-real-secret"),
    );
    let log = node.mock_requests();
    for s in got["calls"].as_array().unwrap() {
        assert_eq!(
            s["text"],
            bedrock::WORDS.concat(),
            "{s}\n{log:?}\n{}",
            node.agent_log()
        );
    }
    let signed: Vec<_> = log.iter().filter(|r| r["bedrock"].is_string()).collect();
    let grants: Vec<_> = log.iter().filter(|r| r["request"] == "POST /sts").collect();
    assert_eq!(signed.len(), 8, "{log:?}");
    let keys: std::collections::BTreeSet<_> = signed
        .iter()
        .map(|r| {
            r["signed_by"]
                .as_str()
                .unwrap_or_else(|| panic!("unsigned: {r}"))
        })
        .collect();
    assert!(
        keys.iter().all(|k| k.starts_with("ASIATOLLGATE")),
        "{keys:?}"
    );
    assert!(
        grants.iter().all(|g| g["token_grant"] == true),
        "{grants:?}"
    );
    eprintln!(
        "8 calls over ~8 s: {} STS exchanges, {} keys",
        grants.len(),
        keys.len()
    );
    assert!(
        keys.len() >= 3 && grants.len() <= 6,
        "{} exchanges, {keys:?}",
        grants.len()
    );
}
