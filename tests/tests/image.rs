//! The agent's container image (deploy/image/Containerfile, built with
//! buildah) run under Debian's podman exactly as the chart's DaemonSet runs
//! it — capabilities, no privilege escalation, read-only root, hostPID,
//! host network, the host mounts, the args — every flag derived from the
//! rendered DaemonSet, governing a pod of the test node: a call from the
//! pod is terminated, reaches the provider, and is recorded.
use std::{path::PathBuf, process::Command, time::Duration};

use serde_yaml::Value;
use tollgate_tests::{
    TestNode,
    cgroups::cgroup2_mount,
    chart::{chart_dir, render},
    node::{PROVIDER_HOST, agent_bin},
    process::wait_until,
    require_installed, require_privileged,
    yaml::merge_yaml,
};

fn daemonset() -> Value {
    let yaml = render(&chart_dir(), "tollgate", "tollgate-system", "").unwrap();
    yaml.split("\n---\n")
        .map(|d| serde_yaml::from_str::<Value>(d.trim_start_matches("---\n")).unwrap())
        .find(|d| d["kind"] == "DaemonSet")
        .expect("the chart renders a DaemonSet")
}

fn chart_config() -> String {
    let yaml = render(&chart_dir(), "tollgate", "tollgate-system", "").unwrap();
    yaml.split("\n---\n")
        .map(|d| serde_yaml::from_str::<Value>(d.trim_start_matches("---\n")).unwrap())
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "tollgate-config")
        .unwrap()["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_string()
}

fn tools_present(test: &str) -> bool {
    require_installed(
        test,
        &[
            "/usr/bin/podman".as_ref(),
            "/usr/bin/buildah".as_ref(),
            "/usr/sbin/runc".as_ref(),
        ],
    )
}

/// Removes the container on drop (also after a panic).
struct Container(String);
impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "5", &self.0])
            .output();
    }
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it_and_governs_a_pod() {
    const NAME: &str = "the_image_runs_as_the_daemonset_runs_it_and_governs_a_pod";
    if !require_privileged(NAME) || !tools_present(NAME) {
        return;
    }
    let node = TestNode::new(1);
    let tag = format!("localhost/tollgate:test-{}", node.id);
    tollgate_tests::image::build(agent_bin().as_ref(), &tag, &node.dir.join("image"))
        .unwrap_or_else(|e| panic!("{e}"));
    struct Image(String);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = Command::new("podman").args(["rmi", "-f", &self.0]).output();
        }
    }
    let _image = Image(tag.clone());

    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let sc = &container["securityContext"];
    let name = format!("tollgate-test-{}", node.id);
    // crun refuses hybrid cgroup hosts ("cgroups in hybrid mode not
    // supported"), runc runs them; this sandbox's hard rlimits are below
    // podman's defaults and raising them needs CAP_SYS_RESOURCE, which it
    // lacks — Kubernetes sets neither, so neither is part of the DaemonSet.
    let mut run = Command::new("podman");
    run.args(["--runtime", "runc", "run", "-d", "--name", &name])
        .args([
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ]);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    run.arg("--cap-drop=all");
    for cap in sc["capabilities"]["add"].as_sequence().unwrap() {
        run.arg(format!("--cap-add={}", cap.as_str().unwrap()));
    }
    if sc["allowPrivilegeEscalation"] == false {
        run.arg("--security-opt=no-new-privileges");
    }
    if sc["readOnlyRootFilesystem"] == true {
        run.arg("--read-only");
    }
    if pod["hostPID"] == true {
        run.arg("--pid=host");
    }
    // The test node's "host" network is its node namespace.
    if pod["hostNetwork"] == true {
        run.arg(format!("--network=ns:{}", node.node.path()));
    }
    // Volumes: each mount of the DaemonSet, from the test node's equivalent.
    let volumes = pod["volumes"].as_sequence().unwrap();
    let config_dir = node.dir.join("container");
    let audit_dir = config_dir.join("var-log-tollgate");
    let state_dir = config_dir.join("var-lib-tollgate");
    let token_dir = config_dir.join("metrics-token");
    for d in [&audit_dir, &state_dir, &token_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(token_dir.join("token"), "container-test-token\n").unwrap();
    let governed_rel = node
        .governed
        .strip_prefix(cgroup2_mount())
        .unwrap()
        .display()
        .to_string();
    let bpffs_dir = format!("/sys/fs/bpf/tollgate-test-{}", node.id);
    // The chart's config, pointed at this test node: its cgroup subtree, its
    // providers and DNS server, its provider CA; no API server here.
    let config = merge_yaml(
        &chart_config(),
        &format!(
            "cgroup_root: /host/cgroup/{governed_rel}\nbpffs_dir: {bpffs_dir}\n\
             kubernetes: {{mode: off}}\ndns: {{servers: [\"127.0.0.1\"]}}\n\
             tls: {{extra_roots: [/etc/tollgate/upstream-ca.crt], system_roots: false}}\n\
             providers:\n  - {{name: openai, hosts: [{PROVIDER_HOST}], ports: [443, 8443]}}\n"
        ),
    );
    let config_file = config_dir.join("config.yaml");
    std::fs::write(&config_file, &config).unwrap();
    for m in container["volumeMounts"].as_sequence().unwrap() {
        let vol = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("every mount has its volume");
        let source: PathBuf = match m["name"].as_str().unwrap() {
            "config" => config_file.clone(),
            "node-ca" => node.node_ca(),
            "metrics-token" => token_dir.clone(),
            "cgroup" => cgroup2_mount(),
            "audit" => audit_dir.clone(),
            "state" => state_dir.clone(),
            other => {
                let host = vol["hostPath"]["path"]
                    .as_str()
                    .unwrap_or_else(|| panic!("volume {other}: not a hostPath; teach this test"));
                PathBuf::from(host)
            }
        };
        let mut opts = Vec::new();
        if m["readOnly"] == true {
            opts.push("ro");
        }
        if m["mountPropagation"] == "HostToContainer" {
            opts.push("rslave");
        }
        let target = m["mountPath"].as_str().unwrap();
        run.arg("-v").arg(format!(
            "{}:{target}{}{}",
            source.display(),
            if opts.is_empty() { "" } else { ":" },
            opts.join(",")
        ));
    }
    run.arg("-v").arg(format!(
        "{}:/etc/tollgate/upstream-ca.crt:ro",
        node.dir.join("upstream-ca.crt").display()
    ));
    for e in container["env"].as_sequence().unwrap() {
        if e["name"] == "NODE_NAME" {
            run.args(["-e", "NODE_NAME=container-test-node"]);
        }
    }
    run.arg(&tag);
    for a in container["args"].as_sequence().unwrap() {
        run.arg(a.as_str().unwrap());
    }
    let out = run.output().unwrap();
    assert!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _container = Container(name.clone());
    let logs = || {
        let o = Command::new("podman")
            .args(["logs", &name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    };
    let running = wait_until(Duration::from_secs(30), || {
        logs().contains("tollgate is running").then_some(())
    });
    assert!(
        running.is_some(),
        "agent in the container did not start:\n{}",
        logs()
    );
    // Its listener is up in the pod's namespace (entered through hostPID's /proc).
    let listening = wait_until(Duration::from_secs(15), || {
        logs()
            .contains("listening in workload namespace")
            .then_some(())
    });
    assert!(listening.is_some(), "{}", logs());

    let out = node.pods[0].chat(
        &node.node_ca_cert(),
        r#"{"model":"gpt-4o-mini","messages":[]}"#,
        &[],
    );
    assert!(out.contains(" 200"), "{out}\n{}", logs());
    // Recorded in the audit log on the host path the DaemonSet mounts.
    let audit = audit_dir.join("audit.jsonl");
    let record = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&audit)
            .ok()?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["kind"] == "request")
    })
    .unwrap_or_else(|| panic!("no request record in {}:\n{}", audit.display(), logs()));
    assert_eq!(record["node"], "container-test-node");
    assert_eq!(record["workload"]["pod_uid"], node.pods[0].uid.as_str());
    assert_eq!(record["result"], "ok");
    assert_eq!(record["usage"]["input_tokens"], 23);
    // The provider saw the call (its own log), from the pod's address.
    let mock = std::fs::read_to_string(node.dir.join("mock-requests.jsonl")).unwrap_or_default();
    assert!(mock.contains("/v1/chat/completions"), "{mock}");
    // Logs are JSON lines (stdout of a container is not a terminal).
    assert!(
        logs()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "{}",
        logs()
    );
}
