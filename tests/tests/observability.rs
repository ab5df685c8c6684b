//! What a platform team plugs into the agent: a real Prometheus (Debian's)
//! scraping it in the test node, loaded with the shipped alert rules
//! (deploy/helm/tollgate/files/alerts.yaml), queried with every query of the
//! shipped Grafana dashboard (files/dashboard.json) after real traffic; and
//! the agent's logs as a log collector reads them; and OpenTelemetry spans
//! as an OTLP receiver decodes them.
use std::{path::PathBuf, time::Duration};

use tollgate_tests::{
    TestNode,
    chart::chart_dir,
    kube_api::{FixtureApi, pod_object},
    otlp_receiver::OtlpReceiver,
    process::wait_until,
    prometheus::{PROMETHEUS_BIN, PROMTOOL_BIN, Prometheus, metric_names_in},
    require_installed, require_privileged,
};

fn alerts_file() -> PathBuf {
    chart_dir().join("files/alerts.yaml")
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("files/dashboard.json")).unwrap(),
    )
    .expect("dashboard.json is JSON")
}

/// Prometheus's binaries are installed (else skip, or fail in CI).
fn prometheus_installed(test: &str) -> bool {
    require_installed(test, &[PROMETHEUS_BIN.as_ref(), PROMTOOL_BIN.as_ref()])
}

/// A dashboard query as Grafana sends it over a short range: its
/// variables at "All", its range and rate interval at one minute.
fn as_grafana_sends_it(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$namespace", ".*")
        .replace("$workload", ".*")
}

/// A chat call from pod `pod`, trusting the node CA: curl's `-i` output.
fn post(node: &TestNode, pod: usize, body: &str) -> String {
    node.pods[pod].chat(&node.node_ca_cert(), body, &[])
}

#[test]
fn alert_rules_pass_promtool() {
    if !prometheus_installed("alert_rules_pass_promtool") {
        return;
    }
    let out = std::process::Command::new(PROMTOOL_BIN)
        .args(["check", "rules"])
        .arg(alerts_file())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_real_prometheus_answers_every_dashboard_query_and_alert_from_the_agent() {
    const NAME: &str = "a_real_prometheus_answers_every_dashboard_query_and_alert_from_the_agent";
    if !require_privileged(NAME) || !prometheus_installed(NAME) {
        return;
    }
    let mut node = TestNode::new(2);
    // The default format: json, since the log is a file.
    node.log_format = "auto";
    let state = node.dir.join("state/budgets.json");
    // A mock chat call costs 7.275e-6 USD; the budget's soft share (1 % of
    // 0.001 USD) is passed on the second call, its limit never.
    node.start_agent(&format!(
        r#"budget_state_file: {state}
policy:
  default: allow
  rules:
    - name: no-frontier
      match: {{pod_uids: ["{p1}"]}}
      models: ["gpt-4o"]
      action: deny
    - name: team-budget
      match: {{pod_uids: ["{p0}"]}}
      action: allow
      budget: {{daily_usd: 0.001, soft_percent: 1}}
"#,
        state = state.display(),
        p0 = node.pods[0].uid,
        p1 = node.pods[1].uid,
    ));
    let prom = Prometheus::start(
        &node.node,
        &node.dir.join("prometheus"),
        "127.0.0.1:9464",
        &[&alerts_file()],
    );

    // Traffic that every panel has something to show for: plain and
    // streamed calls, an upstream 500, a refusal.
    for _ in 0..3 {
        let out = post(&node, 0, r#"{"model":"gpt-4o-mini","messages":[]}"#);
        assert!(
            out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/2 200"),
            "{out}"
        );
    }
    let out = post(
        &node,
        0,
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
    );
    assert!(out.contains("data: [DONE]"), "{out}");
    // (From the pod without a budget: a budget refuses unpriced models.)
    let out = post(&node, 1, r#"{"model":"mock-500","messages":[]}"#);
    assert!(out.contains(" 500"), "{out}");
    let out = post(&node, 1, r#"{"model":"gpt-4o","messages":[]}"#);
    assert!(out.contains(" 403"), "{out}");

    // Scraped: the last call's refusal and the stream's first token are in.
    let scraped = wait_until(Duration::from_secs(30), || {
        (!prom
            .query("tollgate_decisions_total{decision=\"deny\"}")
            .is_empty()
            && !prom
                .query("gen_ai_server_time_to_first_token_seconds_count")
                .is_empty())
        .then_some(())
    });
    assert!(scraped.is_some(), "the calls never reached Prometheus");
    // Rates over a minute need two samples after the calls.
    std::thread::sleep(Duration::from_secs(3));

    // Every dashboard query returns series from the scrape.
    let dash = dashboard();
    let mut empty = Vec::new();
    let mut queries = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = as_grafana_sends_it(target["expr"].as_str().unwrap());
            queries += 1;
            if prom.query(&expr).is_empty() {
                empty.push(format!("{}: {expr}", panel["title"]));
            }
        }
    }
    // The variables' `label_values(selector, label)` find values.
    for var in dash["templating"]["list"].as_array().unwrap() {
        let Some(q) = var["query"]["query"].as_str() else {
            continue;
        };
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {q} is not label_values(…)"));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        let expr = as_grafana_sends_it(&format!("count by ({}) ({selector})", label.trim()));
        queries += 1;
        if prom.query(&expr).is_empty() {
            empty.push(format!("variable {}: {expr}", var["name"]));
        }
    }
    assert!(queries >= 15, "{queries} queries");
    assert!(
        empty.is_empty(),
        "dashboard queries without series:\n{}",
        empty.join("\n")
    );

    // Every alert is evaluated without error, reading metrics the agent exports.
    let names = prom.metric_names();
    let evaluated = wait_until(Duration::from_secs(20), || {
        let v = prom.api("/api/v1/rules", &[])?;
        let rules: Vec<serde_json::Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        rules.iter().all(|r| r["health"] == "ok").then_some(rules)
    })
    .unwrap_or_else(|| {
        panic!(
            "alert rules unhealthy: {:?}",
            prom.api("/api/v1/rules", &[])
        )
    });
    assert!(evaluated.len() >= 9, "{} rules", evaluated.len());
    for rule in &evaluated {
        for metric in metric_names_in(rule["query"].as_str().unwrap()) {
            assert!(
                names.contains(&metric),
                "alert {} reads {metric}, which the agent does not export",
                rule["name"]
            );
        }
    }
    assert_eq!(prom.query("tollgate_ready")[0]["value"][1], "1");

    // The budget passed its soft share: that alert fires, from the real counter.
    let fired = wait_until(Duration::from_secs(20), || {
        prom.alerts()
            .contains(&("TollgateBudgetSoftLimitReached".into(), "firing".into()))
            .then_some(())
    });
    assert!(fired.is_some(), "alerts: {:?}", prom.alerts());

    // Logs: one JSON object per line into the file, no terminal escapes.
    let log = node.agent_log();
    assert!(!log.contains('\u{1b}'), "escape codes in the log file");
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines > 3, "{log}");

    // The agent goes away: its down alert becomes pending (2 minutes before firing).
    // (Dropping the agent's process guard SIGKILLs and reaps it.)
    drop(node.agent.take());
    let pending = wait_until(Duration::from_secs(20), || {
        prom.alerts()
            .iter()
            .any(|(n, s)| n == "TollgateAgentDown" && (s == "pending" || s == "firing"))
            .then_some(())
    });
    assert!(pending.is_some(), "alerts: {:?}", prom.alerts());
}

/// OTLP export: one span per call, following the GenAI semantic
/// conventions, as the official protobuf definitions decode it on the
/// receiver's side, and equal to the call's audit record. A collector that
/// refuses costs the calls nothing; the spans it lost are counted.
#[test]
fn every_call_is_exported_as_an_opentelemetry_span_matching_its_audit_record() {
    const NAME: &str = "every_call_is_exported_as_an_opentelemetry_span_matching_its_audit_record";
    if !require_privileged(NAME) {
        return;
    }
    let mut node = TestNode::new(2);
    let receiver = OtlpReceiver::start(node.node.bind_tcp("127.0.0.1:0"));
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
        "otlp-node",
        "default",
        Some(("ReplicaSet", "chat-6f7d9c")),
        serde_json::json!({}),
    ));
    node.start_agent(&format!(
        r#"node_name: otlp-node
kubernetes: {{kubeconfig: {kubeconfig}, metadata_wait: 5s}}
otlp:
  endpoint: "http://{addr}"
  headers: {{authorization: "Bearer otlp-secret"}}
  batch_delay: 100ms
  timeout: 2s
policy:
  rules:
    - {{name: no-gpt4o, models: [gpt-4o], action: deny}}
"#,
        kubeconfig = api.kubeconfig(&node.dir).display(),
        addr = receiver.addr,
    ));
    assert!(post(&node, 0, r#"{"model":"gpt-4o-mini","messages":[]}"#).contains(" 200"));
    let out = post(
        &node,
        0,
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
    );
    assert!(out.contains("data: [DONE]"), "{out}");
    assert!(post(&node, 1, r#"{"model":"gpt-4o","messages":[]}"#).contains(" 403"));

    let records = node.wait_requests(3);
    let spans = wait_until(Duration::from_secs(15), || {
        let s = receiver.spans();
        (s.len() >= 3).then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "spans received: {:?}\nrequests: {:?}\n{}",
            receiver.spans(),
            receiver.requests(),
            node.agent_log()
        )
    });
    assert_eq!(spans.len(), 3, "one span per call: {spans:?}");
    for (path, content_type, auth) in receiver.requests() {
        assert_eq!(path, "/v1/traces");
        assert_eq!(content_type, "application/x-protobuf");
        assert_eq!(auth, "Bearer otlp-secret");
    }
    for r in &records {
        let id = r["id"].as_str().unwrap();
        let s = spans
            .iter()
            .find(|s| s.attributes["tollgate.call.id"] == id)
            .unwrap_or_else(|| panic!("no span for record {r}: {spans:?}"));
        let a = &s.attributes;
        assert_eq!(s.kind, 3, "SPAN_KIND_CLIENT");
        assert_eq!(s.name, format!("chat {}", r["model"].as_str().unwrap()));
        assert_eq!(a["gen_ai.operation.name"], "chat");
        assert_eq!(a["gen_ai.provider.name"], r["provider"]);
        assert_eq!(a["gen_ai.request.model"], r["model"]);
        assert_eq!(a["server.address"], r["host"]);
        assert_eq!(a["http.response.status_code"], r["status"]);
        assert_eq!(a["tollgate.decision"], r["decision"]);
        assert_eq!(
            s.end_unix_nano - s.start_unix_nano,
            r["duration_ms"].as_u64().unwrap() * 1_000_000
        );
        assert_eq!(s.resource["service.name"], "tollgate");
        assert_eq!(s.resource["k8s.node.name"], "otlp-node");
        if r["decision"] == "allow" {
            assert_eq!(a["gen_ai.response.model"], r["response_model"]);
            assert_eq!(a["gen_ai.usage.input_tokens"], r["usage"]["input_tokens"]);
            assert_eq!(a["gen_ai.usage.output_tokens"], r["usage"]["output_tokens"]);
            assert_eq!(a["tollgate.cost_usd"], r["cost_usd"]);
            assert_eq!(a["k8s.namespace.name"], "team-a");
            assert_eq!(a["k8s.pod.name"], "chat-6f7d9c-x2x9k");
            assert_eq!(a["k8s.deployment.name"], "chat");
            assert_eq!(s.status_code, 0, "unset: not an error");
        } else {
            assert_eq!(r["status"], 403);
            assert_eq!(a["k8s.pod.uid"], node.pods[1].uid.as_str());
            assert!(a.contains_key("error.type"), "{a:?}");
            assert_eq!(s.status_code, 2, "STATUS_CODE_ERROR");
        }
    }
    let exported = wait_until(Duration::from_secs(5), || {
        node.metrics()
            .contains("tollgate_otlp_spans_total{result=\"exported\"} 3")
            .then_some(())
    });
    assert!(exported.is_some(), "{}", node.metrics());

    // The collector refuses: calls go on as before, the lost spans are counted.
    receiver.set_refusing(true);
    assert!(post(&node, 0, r#"{"model":"gpt-4o-mini","messages":[]}"#).contains(" 200"));
    let failed = wait_until(Duration::from_secs(15), || {
        node.metrics()
            .contains("tollgate_otlp_spans_total{result=\"failed\"} 1")
            .then_some(())
    });
    assert!(failed.is_some(), "{}\n{}", node.metrics(), node.agent_log());
    assert_eq!(receiver.spans().len(), 3);
}

/// `tollgate top` against a live agent, on a real terminal (a tmux pane),
/// read as a person would: the workload's row appears and follows new calls.
#[test]
fn tollgate_top_shows_a_live_agents_workloads_in_a_terminal() {
    const NAME: &str = "tollgate_top_shows_a_live_agents_workloads_in_a_terminal";
    if !require_privileged(NAME) {
        return;
    }
    let node = tollgate_tests::node::governed_node(
        NAME,
        1,
        "policy:\n  rules:\n    - {name: no-gpt4o, models: [gpt-4o], action: deny}\n",
    )
    .unwrap();
    for _ in 0..2 {
        assert!(post(&node, 0, r#"{"model":"gpt-4o-mini","messages":[]}"#).contains(" 200"));
    }
    let session = format!("tg-top-{}", node.id);
    let tmux = |args: &[&str]| {
        std::process::Command::new("tmux")
            .args(args)
            .output()
            .expect("run tmux (cargo xtask setup installs it)")
    };
    let command = format!(
        "nsenter --net={} {} top --addr 127.0.0.1:9464",
        node.node.path(),
        tollgate_tests::node::agent_bin()
    );
    let started = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "180",
        "-y",
        "40",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = std::process::Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .output();
        }
    }
    let _kill = Kill(session.clone());
    let pane = || {
        String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned()
    };
    let uid = node.pods[0].uid.clone();
    let row = |calls: &str| {
        let p = pane();
        p.lines()
            .find(|l| l.contains(&uid))
            .filter(|l| l.split_whitespace().nth(4) == Some(calls))
            .map(|_| p.clone())
    };
    let first = wait_until(Duration::from_secs(15), || row("2"));
    let first = first.unwrap_or_else(|| panic!("pane:\n{}", pane()));
    assert!(
        first.contains("calls/s") && first.contains("REFUSED"),
        "{first}"
    );
    // New calls (and a refusal) show up on the next redraws.
    for _ in 0..2 {
        assert!(post(&node, 0, r#"{"model":"gpt-4o-mini","messages":[]}"#).contains(" 200"));
    }
    assert!(post(&node, 0, r#"{"model":"gpt-4o","messages":[]}"#).contains(" 403"));
    let later = wait_until(Duration::from_secs(15), || row("5"))
        .unwrap_or_else(|| panic!("pane:\n{}", pane()));
    assert!(later.contains("rule:no-gpt4o"), "{later}");
    assert!(!later.contains('\u{1b}'), "a pane holds text, not escapes");
}
