//! `cargo xtask demo`: a miniature Kubernetes node on this machine, its four
//! pods running an unmodified app on the official OpenAI Python SDK (default
//! base URL, default retries), the agent governing them under a demo policy,
//! and the table a platform engineer wants: per workload, calls, models,
//! tokens, cost and decisions, from the agent's audit log.
//!
//! The provider is the test suite's mock (over TLS, with the usage a real
//! provider reports); pod metadata comes from a fixture API server through
//! the agent's real Kubernetes watch. Everything lives in network namespaces
//! and cgroups that are removed on exit.
use std::{collections::BTreeMap, process::Command};

use serde_json::{Value, json};
use tollgate_tests::{
    TestNode, clients_dir, e2e_dir,
    kube_api::{FixtureApi, pod_object},
    node::{PROVIDER_HOST, UPSTREAM_V4},
    require_privileged,
};

const NODE: &str = "demo-node";

/// One demo workload: where it runs, what its app does, what it shows.
struct Workload {
    namespace: &'static str,
    deployment: &'static str,
    /// demo_app.py arguments (model, calls, [stream]).
    args: &'static [&'static str],
    /// Trusts the node CA (else only the provider's own CA: observed).
    trusts_node_ca: bool,
    shows: &'static str,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        namespace: "team-a",
        deployment: "chat",
        args: &["gpt-4o-mini", "3", "stream"],
        trusts_node_ca: true,
        shows: "within its limits: every call allowed and counted, one streamed",
    },
    Workload {
        namespace: "team-b",
        deployment: "summarizer",
        args: &["gpt-4o-mini", "12"],
        trusts_node_ca: true,
        shows: "over its token limit: Tollgate answers 429 + retry-after, the SDK waits and succeeds",
    },
    Workload {
        namespace: "research",
        deployment: "eval",
        args: &["gpt-4o", "2"],
        trusts_node_ca: true,
        shows: "asks for a model its namespace may not use: denied with the rule's message",
    },
    Workload {
        namespace: "legacy",
        deployment: "reports",
        args: &["gpt-4o-mini", "2"],
        trusts_node_ca: false,
        shows: "does not trust the node CA: its calls are relayed (observed) and audited by bytes",
    },
];

const POLICY: &str = r#"policy:
  default: allow
  rules:
    - name: no-frontier-models-in-research
      match: {namespaces: [research]}
      models: ["gpt-4o"]
      action: deny
      message: research uses gpt-4o-mini; ask the platform team for gpt-4o
    - name: summarizer-token-limit
      match: {namespaces: [team-b]}
      action: allow
      limits: {input_tokens_per_minute: 240}
    - name: chat
      match: {namespaces: [team-a]}
      action: allow
      max_output_tokens: 256
"#;

fn main() {
    if !require_privileged("demo") {
        std::process::exit(1);
    }
    let python = e2e_dir().join("venv/bin/python");
    if !python.exists() {
        eprintln!(
            "demo: {} is missing: run `cargo xtask setup` (it installs the pinned SDKs)",
            python.display()
        );
        std::process::exit(1);
    }
    println!("Building a miniature node: four pod network namespaces and kubelet-shaped cgroups,");
    println!(
        "a mock LLM provider answering as {PROVIDER_HOST} over TLS at {UPSTREAM_V4}, and a fixture"
    );
    println!("Kubernetes API server that names the pods.\n");
    let mut node = TestNode::new(WORKLOADS.len() as u32);
    let api = FixtureApi::start(node.node.bind_tcp("127.0.0.1:0"));
    for (i, w) in WORKLOADS.iter().enumerate() {
        let rs = format!("{}-5d8f7c", w.deployment);
        api.add_parent(
            "ReplicaSet",
            w.namespace,
            &rs,
            Some(("Deployment", w.deployment)),
        );
        api.apply_pod(pod_object(
            &node.pods[i].uid,
            w.namespace,
            &format!("{rs}-{i}x7q"),
            NODE,
            "default",
            Some(("ReplicaSet", &rs)),
            json!({"app": w.deployment}),
        ));
    }
    let config = format!(
        "node_name: {NODE}\nkubernetes:\n  kubeconfig: {}\n  metadata_wait: 5s\n{POLICY}",
        api.kubeconfig(&node.dir).display()
    );
    println!(
        "Starting `tollgate run` with the demo policy (the rest of the config is the test node's):\n"
    );
    for line in POLICY.lines() {
        println!("    {line}");
    }
    node.start_agent(&config);
    println!("\nThe agent is attached and listening inside every pod's network namespace.\n");

    let mut answers = Vec::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let mut args = vec![clients_dir().join("demo_app.py").display().to_string()];
        args.extend(w.args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = node.pods[i].app(&node.pod_hosts_file(), python.to_str().unwrap(), &args);
        let ca = if w.trusts_node_ca {
            node.node_ca_cert()
        } else {
            node.dir.join("upstream-ca.crt")
        };
        cmd.env("SSL_CERT_FILE", &ca);
        println!(
            "{}/{}: python demo_app.py {} — {}",
            w.namespace,
            w.deployment,
            w.args.join(" "),
            w.shows
        );
        let answer = run(cmd);
        println!("    the app saw: {}", app_summary(&answer));
        answers.push(answer);
    }

    // Every call's record is in (the untrusting app's first attempt is a
    // rejected TLS connection, then relayed ones).
    std::thread::sleep(std::time::Duration::from_millis(500));
    let records = node.connections();
    println!("\nWhat Tollgate recorded, per workload (from the audit log):\n");
    print!("{}", table(&records, &node));
    println!(
        "\nAudit log (one JSON line per call or connection; removed with the node on exit): {}",
        node.connection_log().display()
    );
    println!("Metrics: http://127.0.0.1:9464/metrics in the node's network namespace, e.g.:\n");
    for line in node.metrics().lines().filter(|l| {
        (l.starts_with("tollgate_cost_usd_total")
            || l.starts_with("tollgate_tokens_total")
            || l.starts_with("tollgate_decisions_total{"))
            && !l.ends_with(" 0")
    }) {
        println!("    {line}");
    }
    println!("\nRemoving the node (namespaces, cgroups, processes).");
}

/// Run an app to completion; its one JSON line (or its failure, shown).
fn run(mut cmd: Command) -> Value {
    match cmd.output() {
        Ok(out) if out.status.success() => serde_json::from_slice(out.stdout.trim_ascii())
            .unwrap_or_else(|_| json!({"failed": String::from_utf8_lossy(&out.stdout)})),
        Ok(out) => {
            json!({"failed": String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")})
        }
        Err(e) => json!({"failed": e.to_string()}),
    }
}

fn app_summary(a: &Value) -> String {
    if let Some(f) = a["failed"].as_str() {
        return format!("the app failed: {f}");
    }
    let mut s = format!("{} answers in {} s", a["ok"], a["seconds"]);
    for e in a["errors"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "; {} ({}): {}",
            e["class"].as_str().unwrap_or("?"),
            e["status"],
            e["message"].as_str().unwrap_or("")
        ));
    }
    s
}

#[derive(Default)]
struct Row {
    calls: u64,
    models: std::collections::BTreeSet<String>,
    input: u64,
    output: u64,
    cost: f64,
    decisions: BTreeMap<String, u64>,
    relayed_bytes: u64,
    /// The longest `retry-after` Tollgate told the app to wait, in ms.
    retry_after_ms: u64,
}

/// The workload a record names: `namespace/Kind/name` from the pod's
/// Kubernetes metadata, else its pod UID.
fn workload_of(r: &Value) -> String {
    let k = &r["workload"]["kubernetes"];
    match (
        k["namespace"].as_str(),
        k["workload"]["kind"].as_str(),
        k["workload"]["name"].as_str(),
    ) {
        (Some(ns), Some(kind), Some(name)) => format!("{ns}/{kind}/{name}"),
        _ => r["workload"]["pod_uid"].as_str().unwrap_or("?").to_string(),
    }
}

fn table(records: &[Value], node: &TestNode) -> String {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for r in records {
        // The agent's own connections (none here) and other cgroups aside.
        if !node
            .pods
            .iter()
            .any(|p| r["workload"]["pod_uid"] == p.uid.as_str())
        {
            continue;
        }
        let row = rows.entry(workload_of(r)).or_default();
        if r["kind"] == "request" {
            row.calls += 1;
            // The model the app asked for (metrics name the one that answered).
            if let Some(m) = r["model"].as_str() {
                row.models.insert(m.to_string());
            }
            row.input += r["usage"]["input_tokens"].as_u64().unwrap_or(0);
            row.output += r["usage"]["output_tokens"].as_u64().unwrap_or(0);
            row.cost += r["cost_usd"].as_f64().unwrap_or(0.0);
            let what = match r["result"].as_str().unwrap_or("?") {
                "ok" => "allowed".to_string(),
                other => other.to_string(),
            };
            *row.decisions.entry(what).or_default() += 1;
            row.retry_after_ms = row
                .retry_after_ms
                .max(r["retry_after_ms"].as_u64().unwrap_or(0));
        } else if r["result"] != "terminated" {
            // A connection Tollgate did not terminate: relayed, refused or
            // a TLS handshake the app rejected.
            let what = match (r["result"].as_str(), r["decision"].as_str()) {
                (Some("ok"), Some("observe")) => format!(
                    "connection relayed, observed ({})",
                    r["reason"].as_str().unwrap_or("?")
                ),
                (Some("client_rejected_ca"), _) => "TLS handshake rejected the node CA".into(),
                (Some(res), _) => format!("connection {res}"),
                _ => "connection ?".into(),
            };
            row.relayed_bytes +=
                r["bytes_sent"].as_u64().unwrap_or(0) + r["bytes_received"].as_u64().unwrap_or(0);
            *row.decisions.entry(what).or_default() += 1;
        }
    }
    let mut out = format!(
        "{:<34} {:>5} {:<12} {:>6} {:>6} {:>11}  {}\n",
        "namespace/workload", "calls", "models", "input", "output", "cost USD", "decisions"
    );
    for (name, r) in &rows {
        let models: Vec<_> = r.models.iter().cloned().collect();
        let mut decisions: Vec<String> = r
            .decisions
            .iter()
            .map(|(d, n)| format!("{d} ×{n}"))
            .collect();
        if r.retry_after_ms > 0 {
            decisions.push(format!(
                "told to retry after ≤ {:.1} s",
                r.retry_after_ms as f64 / 1000.0
            ));
        }
        if r.relayed_bytes > 0 {
            decisions.push(format!("{} bytes relayed, not parsed", r.relayed_bytes));
        }
        out.push_str(&format!(
            "{:<34} {:>5} {:<12} {:>6} {:>6} {:>11.8}  {}\n",
            name,
            r.calls,
            if models.is_empty() {
                "-".into()
            } else {
                models.join(",")
            },
            r.input,
            r.output,
            r.cost,
            decisions.join(", ")
        ));
    }
    out
}
