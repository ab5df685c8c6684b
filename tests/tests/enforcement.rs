//! Enforcement attacked from a pod, asserting on what the providers (the
//! mock's own echo) received: a call moved along a failover chain never
//! carries one provider's key to another.
use std::time::Duration;

use tollgate_tests::{TestNode, node::PROVIDER_HOST, process::wait_until, require_privileged};

/// curl's output with response headers; the workload sends its own key
/// (`Bearer sk-test-secret`).
fn post(node: &TestNode, pod: usize, body: &str) -> String {
    let out = node.pods[pod]
        .https_post_command(
            &node.node_ca_cert(),
            PROVIDER_HOST,
            "/v1/chat/completions",
            body,
        )
        .arg("-i")
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The credential header the answering provider echoed (empty: none came).
fn credential_received(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("x-mock-credential:"))
        .unwrap_or_else(|| panic!("no credential echo in {out}"))
        .trim()
        .to_string()
}

#[test]
fn failover_never_sends_a_key_to_another_provider() {
    if !require_privileged("failover_never_sends_a_key_to_another_provider") {
        return;
    }
    let mut node = TestNode::new(2);
    let openai_key = node.dir.join("openai.key");
    let backup_key = node.dir.join("backup.key");
    std::fs::write(&openai_key, "sk-openai-rule-key\n").unwrap();
    std::fs::write(&backup_key, "sk-backup-own-key\n").unwrap();
    let (p0, p1) = (node.pods[0].uid.clone(), node.pods[1].uid.clone());
    node.start_agent(&format!(
        r#"policy:
  failover:
    - name: keyless-backup
      targets:
        - {{provider: openai, model: mock-500}}
        - {{provider: backup, model: gpt-4o-mini}}
      backoff: 10ms
    - name: keyed-backup
      targets:
        - {{provider: openai, model: mock-500}}
        - {{provider: backup, model: gpt-4o-mini, credential_file: {backup}}}
      backoff: 10ms
  rules:
    - {{name: rule-key, match: {{pod_uids: ["{p0}"]}}, action: allow, credential_file: {openai}, failover: keyless-backup}}
    - {{name: own-key, match: {{pod_uids: ["{p1}"]}}, action: allow, failover: keyed-backup}}
"#,
        openai = openai_key.display(),
        backup = backup_key.display(),
    ));
    let body = r#"{"model":"mock-500","messages":[]}"#;

    // The primary answers 500 and the call moves to `backup`, which has no
    // key of its own: neither the rule's OpenAI key nor the workload's key
    // may reach it.
    let out = post(&node, 0, body);
    assert!(
        out.contains(" 200") && out.contains("x-mock-model: gpt-4o-mini"),
        "{out}"
    );
    let got = credential_received(&out);
    assert_eq!(got, "", "the backup received a credential: {got}\n{out}");

    // A target with its own key gets exactly that key.
    let out = post(&node, 1, body);
    assert!(out.contains(" 200"), "{out}");
    assert_eq!(
        credential_received(&out),
        "Bearer sk-backup-own-key",
        "{out}"
    );

    // The call's own target still gets the rule's key (not moved).
    let out = post(&node, 0, r#"{"model":"gpt-4o","messages":[]}"#);
    assert_eq!(
        credential_received(&out),
        "Bearer sk-openai-rule-key",
        "{out}"
    );

    // Both moved calls were recorded as served by the backup.
    let served = wait_until(Duration::from_secs(5), || {
        let n = node
            .connections()
            .iter()
            .filter(|r| r["kind"] == "request" && r["served_by"] == "backup")
            .count();
        (n >= 2).then_some(n)
    });
    assert_eq!(served, Some(2), "{:?}", node.connections());
}
