//! Kubernetes workload identity end to end: the agent's kube-rs watcher
//! talks to a fixture API server (same code path as in a cluster: a
//! kubeconfig, bearer token, list+watch of this node's pods, owner lookups),
//! and the pod metadata reaches audit records, metrics and policy selectors.
use std::time::Duration;

use serde_json::json;
use tollgate_tests::{
    TestNode,
    kube_api::{FixtureApi, pod_object},
    node::PROVIDER_HOST,
    process::wait_until,
    require_privileged,
};

const NODE: &str = "tollgate-test-node";

fn call(node: &TestNode, pod: usize) -> String {
    node.pods[pod].chat(
        &node.node_ca_cert(),
        r#"{"model":"gpt-4o-mini","messages":[]}"#,
        &[],
    )
}

fn config(node: &TestNode, api: &FixtureApi, wait: &str) -> String {
    format!(
        r#"node_name: {NODE}
kubernetes:
  kubeconfig: {}
  metadata_wait: {wait}
policy:
  default: allow
  rules:
    - name: no-batch
      match: {{namespaces: [batch]}}
      action: deny
      message: batch jobs may not call LLM providers
    - name: chat
      match: {{workloads: ["Deployment/chat"], labels: {{app: chat}}, service_accounts: [chat]}}
      action: allow
      max_output_tokens: 64
"#,
        api.kubeconfig(&node.dir).display()
    )
}

#[test]
fn pod_metadata_from_the_api_server_reaches_records_metrics_and_policy() {
    if !require_privileged("pod_metadata_from_the_api_server_reaches_records_metrics_and_policy") {
        return;
    }
    let mut node = TestNode::new(3);
    let api = FixtureApi::start(node.node.bind_tcp("127.0.0.1:0"));
    api.add_parent(
        "ReplicaSet",
        "team-a",
        "chat-6f7d9c",
        Some(("Deployment", "chat")),
    );
    api.apply_pod(pod_object(
        &node.pods[0].uid,
        "team-a",
        "chat-6f7d9c-x2x9k",
        NODE,
        "chat",
        Some(("ReplicaSet", "chat-6f7d9c")),
        json!({"app": "chat", "pod-template-hash": "6f7d9c"}),
    ));
    api.add_parent("Job", "batch", "nightly-2900", Some(("CronJob", "nightly")));
    api.apply_pod(pod_object(
        &node.pods[1].uid,
        "batch",
        "nightly-2900-abcde",
        NODE,
        "default",
        Some(("Job", "nightly-2900")),
        json!({}),
    ));
    // Another node's pod: not this agent's business (field selector).
    api.apply_pod(pod_object(
        "11111111-2222-4333-8444-555555555555",
        "team-a",
        "elsewhere",
        "other-node",
        "default",
        None,
        json!({}),
    ));
    let cfg = config(&node, &api, "10s");
    node.start_agent(&cfg);

    // Selected by namespace: denied with the rule's message.
    let out = call(&node, 1);
    assert!(out.contains(" 403"), "{out}");
    assert!(
        out.contains("batch jobs may not call LLM providers"),
        "{out}"
    );
    // Selected by owner Deployment (through its ReplicaSet), labels and
    // service account: allowed and capped by that rule.
    let out = call(&node, 0);
    assert!(out.contains(" 200"), "{out}");
    assert!(out.contains("x-mock-max-completion-tokens: 64"), "{out}");

    let recs = node.wait_requests(2);
    let by_uid = |uid: &str| {
        recs.iter()
            .find(|r| r["workload"]["pod_uid"] == uid)
            .unwrap_or_else(|| panic!("no record of {uid}: {recs:?}"))
            .clone()
    };
    let chat = by_uid(&node.pods[0].uid);
    assert_eq!(
        chat["workload"]["kubernetes"],
        json!({"namespace": "team-a", "pod": "chat-6f7d9c-x2x9k",
               "workload": {"kind": "Deployment", "name": "chat"},
               "service_account": "chat", "node": NODE}),
        "{chat}"
    );
    assert_eq!(chat["reason"], "rule:chat");
    let batch = by_uid(&node.pods[1].uid);
    assert_eq!(
        batch["workload"]["kubernetes"]["workload"],
        json!({"kind": "CronJob", "name": "nightly"}),
        "{batch}"
    );
    assert_eq!(batch["reason"], "rule:no-batch");

    // A pod the API server reports only after its first connection began:
    // the connection waits for the metadata (kubernetes.metadata_wait).
    let late = node.pods[2]
        .https_post_command(
            &node.node_ca_cert(),
            PROVIDER_HOST,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run curl");
    // The connection is held, waiting for the pod's metadata…
    let uid = node.pods[2].uid.clone();
    wait_until(Duration::from_secs(10), || {
        node.agent_log()
            .lines()
            .any(|l| l.contains("waiting for this pod's metadata") && l.contains(&uid))
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the late pod's connection never waited:\n{}",
            node.agent_log()
        )
    });
    // …which then arrives.
    api.apply_pod(pod_object(
        &node.pods[2].uid,
        "team-b",
        "solo",
        NODE,
        "default",
        None,
        json!({}),
    ));
    let mut late = late;
    let status = wait_until(Duration::from_secs(15), || late.try_wait().ok().flatten());
    assert!(
        status.is_some_and(|s| s.success()),
        "the late pod's call: {status:?}\n{}",
        node.agent_log()
    );
    let recs = node.wait_requests(3);
    let solo = recs
        .iter()
        .find(|r| r["workload"]["pod_uid"] == node.pods[2].uid.as_str())
        .expect("record of the late pod");
    assert_eq!(solo["workload"]["kubernetes"]["namespace"], "team-b");
    assert_eq!(
        solo["workload"]["kubernetes"]["workload"],
        json!({"kind": "Pod", "name": "solo"})
    );

    let metrics = node.metrics();
    assert!(
        metrics.contains(
            "tollgate_requests_total{model=\"gpt-4o-mini-2024-07-18\",namespace=\"team-a\",pod=\"chat-6f7d9c-x2x9k\",provider=\"openai\",result=\"ok\",status_class=\"2xx\",workload=\"Deployment/chat\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_kubernetes_pods 3"),
        "this node's three pods, not the other node's: {metrics}"
    );
    let reqs = api.requests();
    assert!(
        reqs.iter().any(|r| r.contains("watch=true")
            && r.contains(&format!("fieldSelector=spec.nodeName%3D{NODE}"))),
        "the watch asks for this node's pods only: {reqs:?}"
    );
    assert!(
        reqs.iter()
            .any(|r| r.starts_with("GET /apis/apps/v1/namespaces/team-a/replicasets/chat-6f7d9c")),
        "{reqs:?}"
    );
}

#[test]
fn unreachable_api_server_is_retried_and_records_stay_truthful() {
    if !require_privileged("unreachable_api_server_is_retried_and_records_stay_truthful") {
        return;
    }
    let mut node = TestNode::new(1);
    let api = FixtureApi::start(node.node.bind_tcp("127.0.0.1:0"));
    api.set_failing(true);
    api.apply_pod(pod_object(
        &node.pods[0].uid,
        "team-a",
        "chat-6f7d9c-x2x9k",
        NODE,
        "chat",
        // Its ReplicaSet is unknown to the API server: the Deployment is
        // inferred from the pod-template-hash label.
        Some(("ReplicaSet", "chat-6f7d9c")),
        json!({"app": "chat", "pod-template-hash": "6f7d9c"}),
    ));
    // The agent starts and governs without the API server.
    let cfg = config(&node, &api, "300ms");
    node.start_agent(&cfg);
    // One keep-alive connection for two calls: one before the API server
    // is back, one after.
    let script = format!(
        r#"
import http.client, json, ssl, sys
ctx = ssl.create_default_context(cafile="{ca}")
c = http.client.HTTPSConnection("{PROVIDER_HOST}", {port}, context=ctx, timeout=10)
for i in range(2):
    if i == 1:
        sys.stdin.readline()
    c.request("POST", "/v1/chat/completions", json.dumps({{"model": "gpt-4o-mini", "messages": []}}),
              {{"content-type": "application/json"}})
    r = c.getresponse(); r.read()
    print(json.dumps({{"status": r.status, "local": list(c.sock.getsockname())}}), flush=True)
"#,
        ca = node.node_ca_cert().display(),
        port = tollgate_tests::node::TLS_PORT,
    );
    let mut session = node.pods[0]
        .app(&node.pod_hosts_file(), "python3", &["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(session.stdout.take().unwrap()));
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["status"], 200, "{first}");
    let recs = node.wait_requests(1);
    // Attributed by what the kernel knows (pod UID), never guessed.
    assert_eq!(recs[0]["workload"]["pod_uid"], node.pods[0].uid.as_str());
    assert!(
        recs[0]["workload"].get("kubernetes").is_none(),
        "{}",
        recs[0]
    );
    assert_eq!(recs[0]["reason"], "default", "selectors need metadata");
    let errors = wait_until(Duration::from_secs(5), || {
        let m = node.metrics();
        m.lines()
            .find_map(|l| l.strip_prefix("tollgate_kubernetes_watch_errors_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n > 0)
    });
    assert!(
        errors.is_some(),
        "watch errors are counted: {}",
        node.metrics()
    );
    assert!(
        node.agent_log()
            .contains("cannot list/watch this node's pods"),
        "{}",
        node.agent_log()
    );

    // finds it, and the next call, on the same connection, is attributed.
    // finds it, and the next call is attributed.
    api.set_failing(false);
    let synced = wait_until(Duration::from_secs(20), || {
        node.metrics()
            .contains("tollgate_kubernetes_pods 1")
            .then_some(())
    });
    assert!(synced.is_some(), "{}", node.agent_log());
    // The next call on the same connection is named.
    std::io::Write::write_all(session.stdin.as_mut().unwrap(), b"go\n").unwrap();
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(second["status"], 200, "{second}");
    assert_eq!(first["local"], second["local"], "same connection");
    assert!(session.wait().unwrap().success());
    let recs = node.wait_requests(2);
    assert_eq!(recs[1]["workload"]["kubernetes"]["namespace"], "team-a");
    assert_eq!(
        recs[1]["workload"]["kubernetes"]["workload"],
        json!({"kind": "Deployment", "name": "chat"})
    );
    assert_eq!(recs[1]["reason"], "rule:chat");
}
