//! The clouds' workload identities as node-held credentials, each exchanged
//! at the mock's token services, which verify what the real ones would:
//! Google workload identity federation (a Kubernetes token exchanged at
//! STS, then for a service account's token by impersonation), a GCE/GKE
//! node's metadata server, Entra ID's federated token (AKS workload
//! identity) — and Bedrock failover between regions, each attempt signed
//! for its own endpoint with its target's credential.
use tollgate_tests::{
    TestNode, mock_bedrock as bedrock, mock_entra as entra, mock_google as google,
    node::{AZURE_HOST, BEDROCK_WEST_HOST, PROVIDER_PORT, UPSTREAM_V4, VERTEX_HOSTS},
    observed::requests_where,
    require_privileged,
    sdk::{boto3, sdk},
};

const GEMINI_PATH: &str = "/v1/projects/tollgate-test/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent";
const GEMINI_BODY: &str = r#"{"contents":[{"role":"user","parts":[{"text":"Say hello"}]}]}"#;

/// The provider's record of each Vertex call (the mock's own log).
fn vertex_calls(node: &TestNode) -> Vec<serde_json::Value> {
    node.mock_requests_where(|l| l.contains("/publishers/"))
}

/// A workload identity federation configuration (what `gcloud iam
/// workload-identity-pools create-cred-config` writes, pointed at the
/// mock): the projected token file is exchanged at STS, the federated
/// token for the service account's own token (living 3 s), which each
/// Vertex call carries. Over ~6 s the token is fetched again before it
/// expires; the federated token itself never reaches Vertex (the mock
/// refuses it), and the token file is read again for each exchange.
#[test]
fn vertex_tokens_from_workload_identity_federation_are_impersonated_and_renewed() {
    const NAME: &str =
        "vertex_tokens_from_workload_identity_federation_are_impersonated_and_renewed";
    if !require_privileged(NAME) {
        return;
    }
    let mut node = TestNode::new(1);
    let token = node.dir.join("k8s-token");
    std::fs::write(&token, google::SUBJECT_TOKEN).unwrap();
    let config = serde_json::json!({
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": google::POOL_AUDIENCE,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": format!("https://{UPSTREAM_V4}/v1/token"),
        "service_account_impersonation_url": format!(
            "https://{UPSTREAM_V4}/v1/projects/-/serviceAccounts/{}:generateAccessToken",
            google::ACCOUNT
        ),
        "credential_source": {"file": token, "format": {"type": "text"}},
    });
    let file = node.dir.join("federation.json");
    std::fs::write(&file, config.to_string()).unwrap();
    node.start_agent(&format!(
        "policy:\n  rules:\n    - {{name: federated, providers: [vertex], action: allow, credential_file: {}}}\n",
        file.display()
    ));
    let started = std::time::Instant::now();
    for i in 0..6 {
        let out = node.pods[0].https_post(
            &node.node_ca_cert(),
            VERTEX_HOSTS[0],
            GEMINI_PATH,
            GEMINI_BODY,
        );
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
    let calls = vertex_calls(&node);
    let log = node.mock_requests();
    let exchanges: Vec<_> = log
        .iter()
        .filter(|r| r["request"] == "POST /v1/token")
        .collect();
    let impersonations = requests_where(&log, |l| l.ends_with(":generateAccessToken"));
    assert_eq!(calls.len(), 6, "{log:?}");
    for c in &calls {
        assert_eq!(c["token_valid"], true, "a token Vertex refuses: {c}");
        let credential = c["credential"].as_str().unwrap_or("");
        assert!(
            credential.starts_with("Bearer ya29.mock-") && !credential.contains("federated"),
            "{c}"
        );
    }
    assert!(
        exchanges
            .iter()
            .chain(&impersonations)
            .all(|g| g["token_grant"] == true),
        "{exchanges:?} {impersonations:?}"
    );
    assert_eq!(exchanges.len(), impersonations.len(), "{log:?}");
    let tokens: std::collections::BTreeSet<_> =
        calls.iter().map(|c| c["credential"].as_str()).collect();
    eprintln!(
        "6 calls over {spent:?}: {} exchanges, {} tokens",
        exchanges.len(),
        tokens.len()
    );
    // Tokens live 3 s, fetched again after 80 %: over ~6 s at least two,
    // and fewer than one per call.
    assert!(
        tokens.len() >= 2 && exchanges.len() <= 4,
        "{} exchanges, {tokens:?} over {spent:?}",
        exchanges.len()
    );
    let recs = node.wait_requests(6);
    for r in &recs {
        assert_eq!(r["credential_injected"], true, "{r}");
        assert!(!r.to_string().contains(google::SUBJECT_TOKEN), "{r}");
    }
}

/// The node's metadata server (Vertex) and Entra ID's federated token
/// (Azure OpenAI) as credentials: the metadata server is asked with
/// `Metadata-Flavor: Google` over plain HTTP, and Entra's client
/// credentials grant carries the projected token as its client assertion
/// (no secret). Each provider gets only the token its service issued, and
/// the workload's own key is gone.
#[test]
fn metadata_server_and_entra_federated_tokens_stand_in_for_the_workloads_keys() {
    const NAME: &str = "metadata_server_and_entra_federated_tokens_stand_in_for_the_workloads_keys";
    if !require_privileged(NAME) {
        return;
    }
    let mut node = TestNode::new(1);
    let metadata = node.dir.join("metadata.json");
    std::fs::write(
        &metadata,
        serde_json::json!({"type": "metadata_server", "host": format!("{UPSTREAM_V4}:{PROVIDER_PORT}")})
            .to_string(),
    )
    .unwrap();
    let token = node.dir.join("azure-identity-token");
    std::fs::write(&token, entra::FEDERATED_TOKEN).unwrap();
    let app = node.dir.join("entra-federated.json");
    std::fs::write(
        &app,
        serde_json::json!({"tenantId": entra::TENANT, "clientId": entra::APP_ID,
            "federatedTokenFile": token, "authorityHost": format!("https://{UPSTREAM_V4}")})
        .to_string(),
    )
    .unwrap();
    node.start_agent(&format!(
        "policy:\n  rules:\n    - {{name: gce, providers: [vertex], action: allow, credential_file: {}}}\n    - {{name: aks, providers: [azure], action: allow, credential_file: {}}}\n",
        metadata.display(),
        app.display()
    ));
    let pod = &node.pods[0];
    let out = pod.https_post(
        &node.node_ca_cert(),
        VERTEX_HOSTS[0],
        GEMINI_PATH,
        GEMINI_BODY,
    );
    let vertex = String::from_utf8_lossy(&out.stdout).into_owned();
    let out = pod.https_post(
        &node.node_ca_cert(),
        AZURE_HOST,
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        r#"{"messages":[{"role":"user","content":"Say hello"}]}"#,
    );
    let azure = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = node.mock_requests();
    let diag = || format!("{vertex}\n{azure}\nprovider: {log:?}\n{}", node.agent_log());
    assert!(vertex.contains("usageMetadata"), "{}", diag());
    assert!(azure.contains("\"choices\""), "{}", diag());

    let asked = requests_where(&log, |l| l.starts_with("GET /computeMetadata/"));
    assert_eq!(asked.len(), 1, "{}", diag());
    assert_eq!(asked[0]["token_grant"], true, "{}", diag());
    let calls = vertex_calls(&node);
    assert_eq!(calls.len(), 1, "{}", diag());
    assert_eq!(calls[0]["token_valid"], true, "{}", diag());
    assert_eq!(
        calls[0]["credential"],
        asked[0]["issued"]
            .as_str()
            .map(|t| format!("Bearer {t}"))
            .unwrap_or_default(),
        "{}",
        diag()
    );

    let grants = requests_where(&log, |l| l.ends_with("/oauth2/v2.0/token"));
    assert_eq!(grants.len(), 1, "{}", diag());
    assert_eq!(grants[0]["token_grant"], true, "{}", diag());
    let chat = requests_where(&log, |l| l.contains("/chat/completions"));
    assert_eq!(chat.len(), 1, "{}", diag());
    assert_eq!(chat[0]["token_valid"], true, "{}", diag());
    assert_eq!(
        chat[0]["credential"],
        "Bearer eyJ0.mock-entra-1",
        "{}",
        diag()
    );
    for r in node.wait_requests(2) {
        assert_eq!(r["credential_injected"], true, "{r}");
        assert!(!r.to_string().contains(entra::FEDERATED_TOKEN), "{r}");
    }
}

/// A Bedrock failover chain across regions: boto3 signs with the
/// workload's keys for us-east-1; the chain's first target (there) is
/// signed with its own static keys and throttled (429), and the call moves
/// to us-west-2, signed again for that endpoint and region with that
/// target's own credential (a web identity exchanged at STS). The provider
/// verifies each signature for the host it arrived at; boto3 sees one
/// answer. A call that is not one of the chain's targets goes as the
/// workload signed it.
#[test]
fn bedrock_failover_moves_a_throttled_call_to_another_region_signed_for_it() {
    let Some(python) = sdk(
        "bedrock_failover_moves_a_throttled_call_to_another_region_signed_for_it",
        "venv/bin/python",
    ) else {
        return;
    };
    let mut node = TestNode::new(1);
    let (east_key, east_secret) = bedrock::KEYS[1];
    let east = node.dir.join("east-keys.json");
    std::fs::write(
        &east,
        serde_json::json!({"Version": 1, "AccessKeyId": east_key, "SecretAccessKey": east_secret})
            .to_string(),
    )
    .unwrap();
    let token = node.dir.join("web-identity-token");
    std::fs::write(&token, bedrock::WEB_IDENTITY_TOKEN).unwrap();
    let west = node.dir.join("west-identity.json");
    std::fs::write(
        &west,
        serde_json::json!({"RoleArn": bedrock::ROLE_ARN, "WebIdentityTokenFile": token,
            "StsEndpoint": format!("https://{UPSTREAM_V4}/sts")})
        .to_string(),
    )
    .unwrap();
    node.start_agent(&format!(
        "policy:\n  failover:\n    - name: regions\n      backoff: 10ms\n      targets:\n        - {{provider: bedrock, model: {}, credential_file: {}}}\n        - {{provider: bedrock-west, model: \"{}\", credential_file: {}}}\n  rules:\n    - {{name: chat, providers: [bedrock, bedrock-west], action: allow, failover: regions}}\n",
        bedrock::THROTTLED,
        east.display(),
        bedrock::HAIKU,
        west.display()
    ));
    let calls = [
        format!("converse={}", bedrock::THROTTLED),
        format!("converse_stream={}", bedrock::THROTTLED),
        format!("converse={}", bedrock::HAIKU),
    ];
    let args: Vec<&str> = calls.iter().map(String::as_str).collect();
    let got = boto3(&node, &python, &args, bedrock::KEYS[0]);
    let log: Vec<_> = node
        .mock_requests()
        .into_iter()
        .filter(|r| r["bedrock"].is_string())
        .collect();
    let diag = || format!("{got}\nprovider: {log:?}\n{}", node.agent_log());
    for s in got["calls"].as_array().unwrap() {
        assert_eq!(s["text"], bedrock::WORDS.concat(), "{s}\n{}", diag());
    }
    // Each moved call: throttled at us-east-1 under the first target's
    // keys, then served at us-west-2 under the second's temporary keys.
    assert_eq!(log.len(), 5, "{}", diag());
    for pair in log[..4].chunks(2) {
        let (first, moved) = (&pair[0], &pair[1]);
        assert_eq!(first["model"], bedrock::THROTTLED, "{}", diag());
        assert_eq!(first["signed_by"], east_key, "{}", diag());
        assert!(
            first["host"]
                .as_str()
                .is_some_and(|h| h.starts_with(bedrock::HOST)),
            "{}",
            diag()
        );
        assert_eq!(moved["model"], bedrock::HAIKU, "{}", diag());
        assert!(
            moved["host"]
                .as_str()
                .is_some_and(|h| h.starts_with(BEDROCK_WEST_HOST)),
            "{}",
            diag()
        );
        assert!(
            moved["signed_by"]
                .as_str()
                .is_some_and(|k| k.starts_with("ASIATOLLGATE")),
            "signed for us-west-2 with the target's keys: {}",
            diag()
        );
    }
    // Not a target of the chain: as the workload signed it.
    assert_eq!(log[4]["model"], bedrock::HAIKU, "{}", diag());
    assert_eq!(log[4]["signed_by"], bedrock::KEYS[0].0, "{}", diag());

    let recs = node.wait_requests(3);
    let moved: Vec<_> = recs
        .iter()
        .filter(|r| r["model"] == bedrock::THROTTLED)
        .collect();
    assert_eq!(moved.len(), 2, "{recs:?}");
    for r in &moved {
        assert_eq!(r["served_by"], "bedrock-west", "{r}");
        assert_eq!(r["usage"]["output_tokens"], bedrock::OUTPUT_TOKENS, "{r}");
        let attempts = r["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{r}");
        assert_eq!(
            (&attempts[0]["status"], &attempts[0]["result"]),
            (&serde_json::json!(429), &serde_json::json!("retried")),
            "{r}"
        );
        assert_eq!(attempts[1]["model"], bedrock::HAIKU, "{r}");
        assert!(!r.to_string().contains(east_secret), "{r}");
    }
}
