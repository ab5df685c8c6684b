//! Provider discovery from the DNS answers pods receive: the kernel program
//! on `cgroup_skb/ingress` learns an address that only the pod's own
//! resolver returned (through a CNAME chain), so the pod's very first
//! connection to it is redirected; the address expires with its TTL.
use std::{fs, time::Duration};

use tollgate_tests::{
    TestNode,
    node::{PROVIDER_HOST, PROVIDER_PORT, Route, UPSTREAM_V4_ALT, route},
    pod::{CURL_ENDS, curl_answer},
    require_privileged,
};

/// Run `curl url` as an application of pod 0 whose /etc/resolv.conf names
/// `dns` (and whose /etc/hosts knows no provider), like a pod using its
/// cluster DNS.
fn curl_with_dns(node: &TestNode, dns: &str, url: &str) -> Result<serde_json::Value, String> {
    let resolv = node.dir.join("pod-resolv.conf");
    fs::write(
        &resolv,
        format!("nameserver {dns}\noptions attempts:1 timeout:2\n"),
    )
    .unwrap();
    let hosts = node.dir.join("pod-hosts-plain");
    fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let pod = &node.pods[0];
    let out = pod
        .netns
        .command_in_cgroup("unshare", Some(&pod.cgroup))
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} /etc/resolv.conf && mount --bind {} /etc/hosts && exec curl -sS -m 5 -w '{CURL_ENDS}' {url}",
            resolv.display(),
            hosts.display()
        ))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    curl_answer(&out.stdout)
}

#[test]
fn first_connection_to_an_address_only_the_pod_resolved_is_redirected() {
    if !require_privileged("first_connection_to_an_address_only_the_pod_resolved_is_redirected") {
        return;
    }
    let mut node = TestNode::new(2);
    node.start_agent("");
    let pod = &node.pods[0];
    // The pod's nameserver (its /etc/resolv.conf, as kubelet writes it).
    let gateway = pod.ip4.replace(".2", ".1");

    // The agent's own resolver never returns UPSTREAM_V4_ALT: a connection
    // to it goes straight to the provider, unseen.
    let direct = pod
        .curl(&format!(
            "http://{UPSTREAM_V4_ALT}:{PROVIDER_PORT}/v1/models"
        ))
        .expect("direct call");
    assert_eq!(route(&direct), Route::Direct, "{direct}");

    // The pod's DNS server (on its gateway) answers the provider name with a
    // CNAME chain ending at that address, TTL 1 s.
    let (_, _pod_dns) = node.pod_resolver(
        0,
        &[
            "--local-ttl=1".to_string(),
            format!("--host-record=edge.cdn.test,{UPSTREAM_V4_ALT}"),
            format!("--cname={PROVIDER_HOST},provider.cdn.test"),
            "--cname=provider.cdn.test,edge.cdn.test".to_string(),
        ],
    );

    // First connection after the pod resolved the name: redirected.
    let answer = curl_with_dns(
        &node,
        &gateway,
        &format!("http://{PROVIDER_HOST}:{PROVIDER_PORT}/v1/models"),
    )
    .unwrap_or_else(|e| panic!("call by name: {e}\n{}", node.agent_log()));
    assert_eq!(
        route(&answer),
        Route::Agent,
        "not redirected: {answer}\n{}",
        node.metrics()
    );
    let recs = node.wait_connections(1);
    assert_eq!(recs[0]["provider"], "openai", "{:?}", recs[0]);
    assert_eq!(
        recs[0]["destination"],
        format!("{UPSTREAM_V4_ALT}:{PROVIDER_PORT}"),
        "{:?}",
        recs[0]
    );
    let m = node.metrics();
    assert!(
        m.lines().any(
            |l| l.starts_with("tollgate_ebpf_events{event=\"dns_learned\"}") && !l.ends_with(" 0")
        ),
        "{m}"
    );
    // Learned for the namespace that asked, not for the node: another pod's
    // connection to the same address goes straight on.
    let other = node.pods[1]
        .curl(&format!(
            "http://{UPSTREAM_V4_ALT}:{PROVIDER_PORT}/v1/models"
        ))
        .expect("the other pod's direct call");
    assert_eq!(
        route(&other),
        Route::Direct,
        "an address pod 1 learned redirected pod 2: {other}"
    );

    // TTL 1 s (min_ttl 1 s, stale_grace 0 s in the test config): after it,
    // the address is forgotten and a connection to it is direct again.
    std::thread::sleep(Duration::from_millis(2500));
    let direct = pod
        .curl(&format!(
            "http://{UPSTREAM_V4_ALT}:{PROVIDER_PORT}/v1/models"
        ))
        .expect("direct call after expiry");
    assert_eq!(
        route(&direct),
        Route::Direct,
        "learned address outlived its TTL"
    );
}
