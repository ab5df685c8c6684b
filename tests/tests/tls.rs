//! TLS on the redirected path: relayed by server name when no provider
//! serves it, terminated and forwarded (h1 and h2, pooled h2 upstream) for
//! provider hosts, and relayed for a workload that rejects the node CA.
use std::time::Duration;

use tollgate_tests::{
    node::{
        PROVIDER_HOST, PROVIDER_PORT, Route, TLS_PORT, UPSTREAM_V4, governed_node, peer_ip, route,
    },
    pod::{CURL_ENDS, curl_answer},
    process::wait_until,
};

#[test]
fn tls_to_a_host_the_provider_does_not_serve_is_relayed_with_its_server_name() {
    let Some(node) = governed_node(
        "tls_to_a_host_the_provider_does_not_serve_is_relayed_with_its_server_name",
        1,
        "policy: {foreign_hosts: [other.example.com]}",
    ) else {
        return;
    };
    let pod = &node.pods[0];
    // A provider address, but a server name that is not one of its hosts
    // (one the policy lets through: others are refused, see enforcement.rs):
    // never terminated (no certificate is minted for it); relayed as bytes.
    // The plaintext mock answers a ClientHello with an alert, so curl fails.
    let out = pod
        .netns
        .command_in_cgroup("curl", Some(&pod.cgroup))
        .args([
            "-sS",
            "-m",
            "5",
            "--resolve",
            &format!("other.example.com:{PROVIDER_PORT}:{UPSTREAM_V4}"),
        ])
        .arg(format!(
            "https://other.example.com:{PROVIDER_PORT}/v1/models"
        ))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the plaintext mock speaks no TLS");
    let recs = node.wait_connections(1);
    let r = &recs[0];
    assert_eq!(r["client_protocol"], "tls", "{r}");
    assert_eq!(r["tls"]["sni"], "other.example.com", "{r}");
    assert!(
        r["tls"]["alpn"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p == "http/1.1")),
        "{r}"
    );
    assert_eq!(r["workload"]["pod_uid"], pod.uid.as_str());
    // Plain HTTP is recorded as such.
    pod.curl(&format!("http://{UPSTREAM_V4}:{PROVIDER_PORT}/v1/models"))
        .unwrap();
    let recs = node.wait_connections(2);
    assert_eq!(recs[1]["client_protocol"], "plaintext", "{}", recs[1]);
    assert!(recs[1].get("tls").is_none());
}

#[test]
fn governed_https_is_terminated_and_forwarded_over_h1_and_h2() {
    let Some(node) = governed_node(
        "governed_https_is_terminated_and_forwarded_over_h1_and_h2",
        1,
        "",
    ) else {
        return;
    };
    let pod = &node.pods[0];
    let ca = node.node_ca_cert();
    let call = |extra: &[&str]| {
        pod.netns
            .command_in_cgroup("curl", Some(&pod.cgroup))
            .args(["-sS", "-m", "10", "--cacert", ca.to_str().unwrap()])
            .args([
                "--resolve",
                &format!("{PROVIDER_HOST}:{TLS_PORT}:{UPSTREAM_V4}"),
            ])
            .args(["-H", "Authorization: Bearer sk-test-not-a-real-key"])
            .args(["-w", CURL_ENDS])
            .args(extra)
            .arg(format!(
                "https://{PROVIDER_HOST}:{TLS_PORT}/v1/models?limit=2"
            ))
            .output()
            .unwrap()
    };
    let mut upstream_peers = Vec::new();
    for (i, flag) in ["--http1.1", "--http2"].into_iter().enumerate() {
        let out = call(&[flag]);
        assert!(
            out.status.success(),
            "{flag}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            node.agent_log()
        );
        let a = curl_answer(&out.stdout).unwrap();
        assert_eq!(route(&a), Route::Agent, "forwarded by the agent: {a}");
        assert_eq!(
            peer_ip(&a),
            pod.ip4,
            "the agent's provider connection leaves from the pod's namespace: {a}"
        );
        upstream_peers.push(a["peer"].clone());
        assert_eq!(
            a["sni"], PROVIDER_HOST,
            "upstream TLS carries the provider name: {a}"
        );
        assert_eq!(a["host"], format!("{PROVIDER_HOST}:{TLS_PORT}"), "{a}");
        assert_eq!(
            a["request"], "GET /v1/models?limit=2 HTTP/1.1",
            "providers are spoken to in HTTP/1.1 (the mock offers h2 too), whatever the workload spoke: {a}"
        );
        assert_eq!(
            a["saw_authorization"], true,
            "credentials pass through (no injection configured)"
        );

        let recs = wait_until(Duration::from_secs(5), || {
            let r: Vec<_> = node
                .connections()
                .into_iter()
                .filter(|r| r["kind"] == "request")
                .collect();
            (r.len() > i).then_some(r)
        })
        .expect("a request record");
        let r = &recs[i];
        assert_eq!(r["method"], "GET");
        assert_eq!(r["path"], "/v1/models?limit=2");
        assert_eq!(r["status"], 200);
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["host"], PROVIDER_HOST);
        assert_eq!(r["upstream"], format!("{UPSTREAM_V4}:{TLS_PORT}"));
        assert_eq!(
            r["client_http"],
            if flag == "--http2" {
                "HTTP/2.0"
            } else {
                "HTTP/1.1"
            },
            "{r}"
        );
        assert_eq!(r["workload"]["pod_uid"], pod.uid.as_str());
        assert!(r["response_bytes"].as_u64().unwrap() > 100, "{r}");
        let line = serde_json::to_string(r).unwrap();
        assert!(
            !line.contains("sk-test-not-a-real-key"),
            "credentials never reach the audit log"
        );
    }
    assert_eq!(
        upstream_peers[0], upstream_peers[1],
        "two workload connections, one pooled provider connection"
    );

    // A client that does not trust the node CA (it trusts the provider's own
    // CA only) rejects the leaf: that call fails, and its next calls to the
    // host are relayed untouched instead of broken again.
    let upstream_ca = node.dir.join("upstream-ca.crt");
    let untrusting = || {
        pod.netns
            .command_in_cgroup("curl", Some(&pod.cgroup))
            .args(["-sS", "-m", "5", "--cacert", upstream_ca.to_str().unwrap()])
            .args(["-w", CURL_ENDS])
            .args([
                "--resolve",
                &format!("{PROVIDER_HOST}:{TLS_PORT}:{UPSTREAM_V4}"),
            ])
            .arg(format!("https://{PROVIDER_HOST}:{TLS_PORT}/v1/models"))
            .output()
            .unwrap()
    };
    let first = untrusting();
    assert!(!first.status.success(), "the node CA's leaf is rejected");
    let second = untrusting();
    assert!(
        second.status.success(),
        "then relayed: {}\n{}",
        String::from_utf8_lossy(&second.stderr),
        node.agent_log()
    );
    let a = curl_answer(&second.stdout).unwrap();
    assert_eq!(route(&a), Route::Agent, "still through the agent: {a}");
    assert_eq!(
        a["local"],
        format!("{UPSTREAM_V4}:{TLS_PORT}"),
        "relayed only to the dialled address: {a}"
    );
    assert_eq!(peer_ip(&a), pod.ip4, "from the pod's namespace: {a}");
    let m = node.metrics();
    assert!(m.contains("result=\"client_rejected_ca\""), "{m}");
    let conns = node.connections();
    let relayed = conns
        .iter()
        .find(|r| r["reason"] == "ca_rejected")
        .unwrap_or_else(|| panic!("no relayed connection record: {conns:?}"));
    assert_eq!(relayed["decision"], "observe");
    assert_eq!(relayed["tls"]["sni"], PROVIDER_HOST);
    assert!(node.agent_log().contains("rejected the node CA"));
}
