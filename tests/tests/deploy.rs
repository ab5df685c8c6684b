//! The Helm chart and the plain manifests: rendered (see
//! `tollgate_tests::chart`), checked against the Kubernetes JSON schemas
//! (kubernetes-validate, strict: unknown fields fail), and checked for what
//! the agent needs and must not have: minimal capabilities, host mounts,
//! probes on the metrics port, read-only RBAC, a config the agent accepts.
//! No API server runs here, so nothing is applied to a cluster.
use std::{path::PathBuf, process::Command};

use serde::Deserialize;
use serde_yaml::Value;
use tollgate_tests::chart::{chart_dir, manifests_file, render};

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("valid YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// kubernetes-validate from the test virtualenv, or None (skip) outside CI.
fn validator() -> Option<PathBuf> {
    let p = tollgate_tests::e2e_dir().join("venv/bin/kubernetes-validate");
    tollgate_tests::require_installed("schema validation", &[&p]).then_some(p)
}

fn validate_schemas(yaml: &str, name: &str) {
    let Some(v) = validator() else {
        return;
    };
    let file = std::env::temp_dir().join(format!("tollgate-{name}-{}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(v)
        .args(["-k", "1.33.0", "--strict", "--quiet"])
        .arg(&file)
        .output()
        .expect("run kubernetes-validate");
    let _ = std::fs::remove_file(&file);
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} fails the Kubernetes schemas:\n{report}"
    );
    // The only kinds without a bundled schema are the Prometheus
    // Operator's CRDs, checked by hand below.
    for line in report
        .lines()
        .filter(|l| l.contains("Couldn't find schema"))
    {
        assert!(
            line.contains("PodMonitor") || line.contains("PrometheusRule"),
            "{line}"
        );
    }
}

#[test]
fn plain_manifests_are_the_chart_rendered_with_its_defaults() {
    let rendered = render(&chart_dir(), "tollgate", "tollgate-system", "").unwrap();
    let file = std::fs::read_to_string(manifests_file()).unwrap();
    // Past the header comment `cargo xtask manifests` puts first.
    let committed = &file[file.find("---\n").expect("documents")..];
    assert!(
        rendered == committed,
        "deploy/manifests/tollgate.yaml is out of date with the chart: run `cargo xtask manifests`"
    );
}

#[test]
fn manifests_pass_the_schemas_and_grant_only_what_the_agent_needs() {
    let yaml = std::fs::read_to_string(manifests_file()).unwrap();
    validate_schemas(&yaml, "manifests");
    let d = docs(&yaml);

    let ds = find(&d, "DaemonSet");
    assert_eq!(ds.len(), 1);
    let ds = ds[0];
    let pod = &ds["spec"]["template"]["spec"];
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&ds["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(
        pod["hostPID"], true,
        "listeners are opened through /proc/<pid>/ns/net"
    );
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert!(
        pod["tolerations"]
            .as_sequence()
            .is_some_and(|t| !t.is_empty()),
        "runs on tainted nodes too"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let mut caps = strs(&sc["capabilities"]["add"]);
    caps.sort();
    assert_eq!(
        caps,
        [
            "BPF",
            "NET_ADMIN",
            "PERFMON",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "SYS_RESOURCE"
        ],
        "the capabilities deploy/README.md justifies, no more"
    );
    for r in ["requests", "limits"] {
        assert!(c["resources"][r].is_mapping(), "resources.{r}");
    }
    let env = c["env"].as_sequence().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
        "the pod watch's field selector needs the node name"
    );
    let port = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("metrics port");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    let host_paths: Vec<String> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str().map(str::to_string))
        .collect();
    for p in ["/sys/fs/cgroup", "/sys/fs/bpf", "/sys/kernel/btf"] {
        assert!(
            host_paths.iter().any(|h| h == p),
            "host mount {p}: {host_paths:?}"
        );
    }
    let sa = find(&d, "ServiceAccount");
    assert_eq!(pod["serviceAccountName"], sa[0]["metadata"]["name"]);

    // RBAC: read-only, and only what the pod watch and owner lookups use.
    let role = find(&d, "ClusterRole")[0];
    for rule in role["rules"].as_sequence().unwrap() {
        let verbs = strs(&rule["verbs"]);
        let resources = strs(&rule["resources"]);
        assert!(
            verbs
                .iter()
                .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
            "{rule:?}"
        );
        assert!(
            resources
                .iter()
                .all(|r| ["pods", "replicasets", "jobs"].contains(&r.as_str())),
            "{rule:?}"
        );
    }
    let binding = find(&d, "ClusterRoleBinding")[0];
    assert_eq!(binding["subjects"][0]["name"], sa[0]["metadata"]["name"]);

    // Metrics Service selects the agent pods on the named port.
    let svc = find(&d, "Service")[0];
    assert_eq!(&svc["spec"]["selector"], labels);
    assert_eq!(svc["spec"]["ports"][0]["port"], port["containerPort"]);

    // The ConfigMap's config is one the agent accepts.
    let cm = find(&d, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "tollgate-config")
        .expect("config map");
    let cfg = cm["data"]["config.yaml"].as_str().unwrap();
    let file = std::env::temp_dir().join(format!("tollgate-cm-{}.yaml", std::process::id()));
    std::fs::write(&file, cfg).unwrap();
    let out = Command::new(tollgate_tests::node::agent_bin())
        .arg("check-config")
        .arg(&file)
        .output()
        .expect("run tollgate check-config");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "the chart's config is rejected:\n{cfg}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        cfg.contains("metrics:\n  listen: \"0.0.0.0:9464\""),
        "{cfg}"
    );
}

#[test]
fn chart_options_render_valid_manifests() {
    let overrides = r#"
podMonitor: {enabled: true, interval: 15s, labels: {release: kps}}
prometheusRule: {enabled: true, labels: {release: kps}}
grafanaDashboard: {enabled: true, namespace: monitoring}
providerKeysSecretName: tollgate-provider-keys
trustBundle:
  certificate: "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----"
  namespaces: [team-a, team-b]
cgroup: {podsSubtree: kubepods}
"#;
    let yaml = render(&chart_dir(), "tg", "ops", overrides).unwrap();
    validate_schemas(&yaml, "chart-options");
    let d = docs(&yaml);
    let ds = find(&d, "DaemonSet")[0];
    let pm = find(&d, "PodMonitor");
    assert_eq!(pm.len(), 1);
    assert_eq!(
        pm[0]["spec"]["selector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
    assert_eq!(pm[0]["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm[0]["metadata"]["namespace"], "ops");
    assert_eq!(pm[0]["metadata"]["labels"]["release"], "kps");
    // The PrometheusRule carries files/alerts.yaml as it is (the file the
    // observability test loads into a real Prometheus).
    let rules = find(&d, "PrometheusRule");
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0]["metadata"]["labels"]["release"], "kps");
    let file: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("files/alerts.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rules[0]["spec"], file);
    assert!(file["groups"][0]["rules"].as_sequence().unwrap().len() >= 5);
    // The dashboard ConfigMap, labelled for Grafana's sidecar, holds the JSON.
    let dash = find(&d, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "tollgate-dashboard")
        .expect("dashboard ConfigMap");
    assert_eq!(dash["metadata"]["namespace"], "monitoring");
    assert_eq!(dash["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: serde_json::Value =
        serde_json::from_str(dash["data"]["tollgate.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "tollgate-overview");
    // The scraper presents the token the agent requires (the default).
    let auth = &pm[0]["spec"]["podMetricsEndpoints"][0]["authorization"];
    assert_eq!(auth["type"], "Bearer");
    assert_eq!(auth["credentials"]["name"], "tollgate-metrics-token");
    assert_eq!(auth["credentials"]["key"], "token");
    let bundles: Vec<_> = find(&d, "ConfigMap")
        .into_iter()
        .filter(|c| c["metadata"]["name"] == "tollgate-ca")
        .collect();
    assert_eq!(bundles.len(), 2);
    assert_eq!(bundles[1]["metadata"]["namespace"], "team-b");
    assert!(
        bundles[0]["data"]["ca.crt"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----\nMIIBfake")
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "tollgate-provider-keys")
    );
    let cm = find(&d, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "tollgate-config")
        .unwrap();
    let config = cm["data"]["config.yaml"].as_str().unwrap();
    assert!(config.contains("cgroup_root: /host/cgroup/kubepods\n"));
    assert!(
        config.contains("bearer_token_file: /etc/tollgate/metrics/token"),
        "{config}"
    );
    assert!(
        pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|v| v["secret"]["secretName"] == "tollgate-metrics-token"),
        "the token Secret is mounted"
    );
}

#[test]
fn readme_install_section_matches_the_chart() {
    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    for needle in [
        "helm install tollgate deploy/helm/tollgate",
        "kubectl apply -f deploy/manifests/tollgate.yaml",
        "kubectl -n tollgate-system create secret generic tollgate-node-ca --from-file=",
    ] {
        assert!(readme.contains(needle), "README lacks `{needle}`");
    }
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    // Every `--set key=` the README shows is a value the chart has.
    for set in readme.split("--set ").skip(1) {
        let key = set.split('=').next().unwrap();
        let mut v = &values;
        for part in key.split('.') {
            v = &v[part];
        }
        assert!(
            !v.is_null(),
            "README sets `{key}`, which values.yaml does not have"
        );
    }
}
