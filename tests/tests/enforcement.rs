//! Enforcement attacked from a pod, asserting on what the providers (the
//! mock's own echo) received: a call moved along a failover chain never
//! carries one provider's key to another.
use std::time::Duration;

use tollgate_tests::{
    TestNode, node::PROVIDER_HOST, node::governed_node, process::wait_until, require_privileged,
};

/// curl's output with response headers; the workload sends its own key
/// (`Bearer sk-test-secret`).
fn post(node: &TestNode, pod: usize, body: &str) -> String {
    node.pods[pod].chat(&node.node_ca_cert(), body, &[])
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

#[test]
fn a_model_rule_is_not_bypassed_by_hiding_the_model() {
    if !require_privileged("a_model_rule_is_not_bypassed_by_hiding_the_model") {
        return;
    }
    let mut node = TestNode::new(1);
    node.start_agent(
        r#"policy:
  default: allow
  rules:
    - {name: minis, models: ["*-mini"], action: allow}
    - {name: rest, action: deny, message: only mini models}
"#,
    );
    let send = |path: &str, body: &str| {
        let out = node.pods[0]
            .https_post_command(&node.node_ca_cert(), PROVIDER_HOST, path, body)
            .arg("-i")
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A batch names no model at the top: the model rule refuses it instead
    // of letting the default allow it.
    let out = send(
        "/v1/batches",
        r#"{"input_file_id":"file-abc","endpoint":"/v1/chat/completions","completion_window":"24h"}"#,
    );
    assert!(out.contains(" 403"), "{out}");
    assert!(out.contains("rule:minis:model_unreadable"), "{out}");
    // Anthropic-style message batches: the models sit inside the requests.
    let out = send(
        "/v1/messages/batches",
        r#"{"requests":[{"custom_id":"a","params":{"model":"gpt-4o","max_tokens":10,"messages":[]}}]}"#,
    );
    assert!(out.contains(" 403"), "{out}");
    // Control: a listed model goes through and reaches the provider.
    let out = send(
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","messages":[]}"#,
    );
    assert!(out.contains(" 200"), "{out}");

    let got = wait_until(Duration::from_secs(5), || {
        let r = node.provider_requests();
        (!r.is_empty()).then_some(r)
    })
    .expect("the control call reached the mock");
    assert_eq!(got.len(), 1, "only the control call may arrive: {got:?}");
    assert!(
        got[0]["request"]
            .as_str()
            .unwrap_or("")
            .contains("/v1/chat/completions")
    );
    let recs = node.wait_requests(3);
    let refused: Vec<_> = recs.iter().filter(|r| r["result"] == "denied").collect();
    assert_eq!(refused.len(), 2, "{recs:?}");
    assert!(
        refused
            .iter()
            .all(|r| r["reason"] == "rule:minis:model_unreadable")
    );
    // Recorded as what they are: batch calls, not `other`.
    assert!(
        refused.iter().all(|r| r["operation"] == "batch"),
        "{refused:?}"
    );
}

/// Run `DODGING_CLIENT` in `mode` as an application of pod 0 (its netns
/// and cgroup), trusting the node CA; returns what it printed.
fn dodge(node: &TestNode, mode: &str) -> String {
    let pod = &node.pods[0];
    let out = pod
        .netns
        .command_in_cgroup("python3", Some(&pod.cgroup))
        .args(["-c", DODGING_CLIENT, mode])
        .arg(node.node_ca_cert())
        .output()
        .expect("run python3");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A TLS client that speaks to the provider address in a way meant to dodge
/// termination: `late` waits past the agent's ClientHello timeout before
/// its ClientHello; `split` sends its ClientHello in two TLS records. It
/// prints `TERMINATED <request id>` when Tollgate answered (its leaf was
/// accepted and the response carries Tollgate's request id), `FAILED …`
/// otherwise.
const DODGING_CLIENT: &str = r#"
import socket, ssl, sys, time
mode, ca = sys.argv[1], sys.argv[2]
host, addr = "api.openai.com", ("10.77.0.2", 8443)
ctx = ssl.create_default_context(cafile=ca)
try:
    s = socket.create_connection(addr, timeout=5)
    if mode == "late":
        time.sleep(1.5)
        t = ctx.wrap_socket(s, server_hostname=host)
    else:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname=host)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        rec = out.read()
        body = rec[5:]
        half = len(body) // 2
        s.sendall(rec[:3] + half.to_bytes(2, "big") + body[:half]
                  + rec[:3] + (len(body) - half).to_bytes(2, "big") + body[half:])
        while True:
            data = s.recv(65536)
            if not data:
                raise OSError("closed during the handshake")
            inc.write(data)
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            finally:
                pending = out.read()
                if pending:
                    s.sendall(pending)
        class T:
            def sendall(self, b):
                obj.write(b); s.sendall(out.read())
            def recv(self, n):
                while True:
                    try:
                        return obj.read(n)
                    except ssl.SSLWantReadError:
                        d = s.recv(65536)
                        if not d:
                            return b""
                        inc.write(d)
        t = T()
    body = b'{"model":"gpt-4o-mini","messages":[]}'
    t.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n"
              b"content-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n" % len(body) + body)
    resp = b""
    while True:
        d = t.recv(65536)
        if not d:
            break
        resp += d
    ids = [l for l in resp.split(b"\r\n") if l.lower().startswith(b"x-tollgate-request-id")]
    print("TERMINATED" if ids else "FAILED no tollgate answer", resp[:200])
except Exception as e:
    print("FAILED", type(e).__name__, e)
"#;

#[test]
fn a_governed_connection_cannot_dodge_termination() {
    if !require_privileged("a_governed_connection_cannot_dodge_termination") {
        return;
    }
    let mut node = TestNode::new(1);
    node.start_agent(
        r#"tls:
  client_hello_timeout: 500ms
policy:
  rules:
    - {name: rpm, action: allow, limits: {requests_per_minute: 100}}
"#,
    );
    // A ClientHello split over two TLS records is read whole and terminated.
    let out = dodge(&node, "split");
    assert!(out.starts_with("TERMINATED"), "split ClientHello: {out}");
    // Late: past the ClientHello timeout the connection is refused, not relayed.
    let out = dodge(&node, "late");
    assert!(out.starts_with("FAILED"), "late ClientHello: {out}");
    // A server name no provider lists, on a provider address (fronting):
    // refused. `-k`: had it been relayed, the mock would have answered.
    let pod = &node.pods[0];
    let curl = pod
        .netns
        .command_in_cgroup("curl", Some(&pod.cgroup))
        .args(["-sSk", "-m", "5", "--resolve"])
        .arg(format!(
            "fronted.example.com:8443:{}",
            tollgate_tests::node::UPSTREAM_V4
        ))
        .arg("https://fronted.example.com:8443/v1/models")
        .output()
        .unwrap();
    assert!(!curl.status.success(), "{curl:?}");

    let refused = wait_until(Duration::from_secs(5), || {
        let r: Vec<_> = node
            .connections()
            .into_iter()
            .filter(|r| r["reason"] == "rule:rpm:unterminated")
            .collect();
        (r.len() >= 2).then_some(r)
    })
    .unwrap_or_else(|| panic!("two refusals expected: {:?}", node.connections()));
    assert!(
        refused
            .iter()
            .all(|r| r["decision"] == "deny" && r["result"] == "denied")
    );
    assert!(
        refused
            .iter()
            .any(|r| r["tls"]["sni"] == "fronted.example.com"),
        "the fronted name is audited: {refused:?}"
    );
    // What reached the provider: only the terminated (split) call.
    let got = node.provider_requests();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["model"], "gpt-4o-mini", "{got:?}");
}

/// `curl -k` from pod 0 to a provider address with the server name `host`
/// (not a provider's): had the agent relayed it, the mock answers.
fn fronted(node: &TestNode, host: &str) -> std::process::Output {
    let pod = &node.pods[0];
    pod.netns
        .command_in_cgroup("curl", Some(&pod.cgroup))
        .args(["-sSk", "-m", "5", "--resolve"])
        .arg(format!("{host}:8443:{}", tollgate_tests::node::UPSTREAM_V4))
        .arg(format!("https://{host}:8443/v1/models"))
        .output()
        .unwrap()
}

#[test]
fn a_provider_address_is_no_way_to_another_site() {
    // A plain allow policy: nothing per request, so nothing to skip — but a
    // server name no provider lists is still another site (domain fronting).
    let Some(node) = governed_node(
        "a_provider_address_is_no_way_to_another_site",
        1,
        "policy: {default: allow}",
    ) else {
        return;
    };
    let out = fronted(&node, "fronted.example.com");
    assert!(!out.status.success(), "{out:?}");
    let recs = node.wait_connections(1);
    assert_eq!(recs[0]["reason"], "default:foreign_host", "{recs:?}");
    assert_eq!(recs[0]["decision"], "deny", "{recs:?}");
    assert_eq!(recs[0]["tls"]["sni"], "fronted.example.com", "{recs:?}");
    let sent = |sni: &str| {
        node.mock_requests()
            .iter()
            .filter(|r| r["sni"] == sni)
            .count()
    };
    assert_eq!(
        sent("fronted.example.com"),
        0,
        "the fronted site was reached"
    );

    // The operator lets one such name through: relayed, audited, answered.
    node.write_agent_config("policy: {default: allow, foreign_hosts: [\"*.shared-cdn.example\"]}");
    wait_until(Duration::from_secs(10), || {
        node.metrics()
            .contains("tollgate_config_reloads_total{result=\"applied\"} 1")
            .then_some(())
    })
    .expect("the policy reloads");
    let out = fronted(&node, "www.shared-cdn.example");
    assert!(out.status.success(), "{out:?}\n{}", node.agent_log());
    assert_eq!(sent("www.shared-cdn.example"), 1);
    let out = fronted(&node, "fronted.example.com");
    assert!(!out.status.success(), "other names stay refused: {out:?}");
}

#[test]
fn a_bad_provider_entry_costs_one_call_not_the_node() {
    if !require_privileged("a_bad_provider_entry_costs_one_call_not_the_node") {
        return;
    }
    let mut node = TestNode::new(1);
    // `bare` has addresses but no host name: no certificate can be checked
    // against it, so a call failed over to it cannot be sent.
    node.start_agent(&format!(
        r#"providers:
  - {{name: openai, hosts: [{PROVIDER_HOST}], ports: [443, 8443]}}
  - {{name: bare, addresses: ["{backup}"], ports: [8443], api: openai}}
policy:
  failover:
    - name: to-bare
      targets:
        - {{provider: openai, model: mock-500}}
        - {{provider: bare, model: gpt-4o-mini}}
      backoff: 10ms
  rules:
    - {{name: fo, action: allow, failover: to-bare}}
"#,
        backup = tollgate_tests::node::UPSTREAM_V4_BACKUP
    ));
    let out = post(&node, 0, r#"{"model":"mock-500","messages":[]}"#);
    assert!(out.contains(" 502"), "{out}\n{}", node.agent_log());
    assert!(out.contains("cannot be dialled"), "{out}");
    // The next calls are served: nothing was poisoned.
    for _ in 0..3 {
        let out = post(&node, 0, r#"{"model":"gpt-4o-mini","messages":[]}"#);
        assert!(out.contains(" 200"), "{out}\n{}", node.agent_log());
    }
}
