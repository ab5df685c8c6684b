//! Exhaustion, attacked from a pod: a flood of maximal request bodies is
//! held to the node-wide bound (the rest get a 503 with `retry-after`, the
//! agent's memory stays bounded, another pod is served), and one pod's
//! connections are capped so they cannot starve the others.
use std::{process::Stdio, time::Duration};

use tollgate_tests::{
    TestNode,
    node::governed_node,
    node::{PROVIDER_HOST, TLS_PORT, UPSTREAM_V4},
    require_privileged,
};

/// The agent's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// The HTTP status curl printed last (`-w %{http_code}`) and the headers it dumped.
fn status_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn a_flood_of_large_bodies_is_bounded_and_other_pods_are_served() {
    if !require_privileged("a_flood_of_large_bodies_is_bounded_and_other_pods_are_served") {
        return;
    }
    const MIB: usize = 1024 * 1024;
    let mut node = TestNode::new(2);
    // A 64 MiB node-wide bound; `mock-late` answers after 30 s, so an
    // admitted body is held until the 3 s response timeout.
    node.start_agent(&format!(
        "tls: {{max_request_body: {}, max_buffered_bytes: {}, upstream_response_timeout: 3s}}",
        32 * MIB,
        64 * MIB
    ));
    let body = node.dir.join("big.json");
    let filler = "x".repeat(30 * MIB);
    std::fs::write(
        &body,
        format!(r#"{{"model":"mock-late","messages":[{{"role":"user","content":"{filler}"}}]}}"#),
    )
    .unwrap();
    drop(filler);
    let agent_pid = node.agent.as_ref().unwrap().pid();
    let before = peak_rss_kib(agent_pid);

    // Pod 1 sends eight 30 MiB bodies at once: 240 MiB against 64.
    let pod = &node.pods[0];
    let flood: Vec<_> = (0..8)
        .map(|_| {
            pod.netns
                .command_in_cgroup("curl", Some(&pod.cgroup))
                .args(["-sS", "-m", "20", "--cacert"])
                .arg(node.node_ca_cert())
                .args([
                    "--resolve",
                    &format!("{PROVIDER_HOST}:{TLS_PORT}:{UPSTREAM_V4}"),
                ])
                .args(["-H", "content-type: application/json"])
                .args(["--data-binary", &format!("@{}", body.display())])
                .arg(format!(
                    "https://{PROVIDER_HOST}:{TLS_PORT}/v1/chat/completions"
                ))
                .args(["-D", "-", "-o", "/dev/null", "-w", "\n%{http_code}"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // The refused ones come back at once; the admitted ones wait for the timeout.
    std::thread::sleep(Duration::from_millis(1500));
    // Pod 2's ordinary call is served meanwhile.
    let other = node.pods[1].chat(
        &node.node_ca_cert(),
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    );
    assert!(
        other.contains(" 200"),
        "another pod was not served during the flood:\n{other}\n{}",
        node.agent_log()
    );
    let outs: Vec<_> = flood
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let statuses: Vec<String> = outs.iter().map(status_of).collect();
    let grew_mib = peak_rss_kib(agent_pid).saturating_sub(before) / 1024;
    eprintln!("answers {statuses:?}; the agent's peak RSS grew by {grew_mib} MiB");
    let refused: Vec<_> = outs.iter().filter(|o| status_of(o) == "503").collect();
    assert!(!refused.is_empty(), "nothing was refused: {statuses:?}");
    assert!(
        statuses.iter().all(|s| s == "503" || s == "504"),
        "each big body was refused (503) or held until the provider timed out (504): {statuses:?}"
    );
    for o in &refused {
        let head = String::from_utf8_lossy(&o.stdout).to_ascii_lowercase();
        assert!(head.contains("retry-after: 1"), "{head}");
    }
    // Memory: the bound and its slack, not eight bodies' worth (240 MiB+).
    assert!(
        grew_mib < 200,
        "the agent grew by {grew_mib} MiB under a 64 MiB bound"
    );
    let m = node.metrics();
    assert!(m.contains("result=\"overloaded\""), "{m}");
}

/// Open `n` connections to a provider address and keep them; print how
/// many the far side closed within a second (`closed held`).
const HOLDER: &str = r#"
import socket, sys, time
ip, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.create_connection((ip, 443), timeout=3)
    socks.append(s)
time.sleep(1)
closed = 0
for s in socks:
    s.settimeout(0.2)
    try:
        if s.recv(1) == b"":
            closed += 1
    except socket.timeout:
        pass
    except ConnectionResetError:
        closed += 1
print(closed, n - closed)
"#;

#[test]
fn one_pods_connections_are_capped_and_the_others_are_served() {
    let Some(node) = governed_node(
        "one_pods_connections_are_capped_and_the_others_are_served",
        2,
        "proxy: {max_connections_per_namespace: 4}",
    ) else {
        return;
    };
    let held = node.pods[0].python(HOLDER, &[tollgate_tests::node::UPSTREAM_V4, "6"]);
    assert_eq!(held.trim(), "2 4", "four held, two closed");
    // The cap is per namespace: pod 2 is served.
    let other = node.pods[1].chat(
        &node.node_ca_cert(),
        r#"{"model":"gpt-4o-mini","messages":[]}"#,
        &[],
    );
    assert!(other.contains(" 200"), "{other}");
    assert!(
        node.metrics()
            .contains("result=\"over_capacity\",workload=\"unknown\"} 2"),
        "{}",
        node.metrics()
    );
}

/// Headers and the start of a 1000-byte body over TLS, then nothing:
/// prints the status line that comes back.
const TRICKLE: &str = r#"
import socket, ssl, sys
ca, host, ip, port = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((ip, int(port)), timeout=10), server_hostname=host)
s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() +
          b"\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":")
print(s.recv(4096).split(b"\r\n")[0].decode())
"#;

#[test]
fn a_body_trickled_to_hold_memory_is_cut_off() {
    let Some(node) = governed_node(
        "a_body_trickled_to_hold_memory_is_cut_off",
        1,
        "tls: {request_body_timeout: 1s}",
    ) else {
        return;
    };
    let ca = node.node_ca_cert();
    let status = node.pods[0].python(
        TRICKLE,
        &[
            ca.to_str().unwrap(),
            PROVIDER_HOST,
            UPSTREAM_V4,
            &TLS_PORT.to_string(),
        ],
    );
    assert_eq!(status.trim(), "HTTP/1.1 408 Request Timeout");
    let recs = node.wait_requests(1);
    assert_eq!(recs[0]["reason"], "request_body_timeout", "{recs:?}");
    assert!(
        node.provider_requests().is_empty(),
        "nothing reached the provider"
    );
}

#[test]
fn the_metric_series_of_a_pod_that_went_are_dropped() {
    let Some(mut node) = governed_node(
        "the_metric_series_of_a_pod_that_went_are_dropped",
        2,
        "metrics: {pod_series_grace: 1s}",
    ) else {
        return;
    };
    let call = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    for pod in &node.pods {
        assert!(pod.chat(&node.node_ca_cert(), call, &[]).contains(" 200"));
    }
    let (gone, stays) = (node.pods[0].uid.clone(), node.pods[1].uid.clone());
    let m = node.metrics();
    assert!(m.contains(&gone) && m.contains(&stays), "{m}");
    // Pod 1 goes (its processes end, its namespace is deleted).
    drop(node.pods.remove(0));
    let dropped = tollgate_tests::process::wait_until(Duration::from_secs(15), || {
        (!node.metrics().contains(&gone)).then_some(())
    });
    assert!(dropped.is_some(), "{}", node.metrics());
    assert!(
        node.metrics().contains(&stays),
        "the pod still running keeps its series"
    );
}

#[test]
fn a_request_head_past_the_bound_is_refused_and_not_forwarded() {
    let Some(node) = governed_node(
        "a_request_head_past_the_bound_is_refused_and_not_forwarded",
        1,
        "",
    ) else {
        return;
    };
    let call = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let ca = node.node_ca_cert();
    let header = |n: usize| format!("x-padding: {}", "p".repeat(n));
    // Within tls.max_request_head (8 KiB by default): served.
    let fits = node.pods[0].chat(&ca, call, &["--http1.1", "-H", &header(6000)]);
    assert!(fits.contains(" 200"), "{fits}");
    // Past it: refused by the HTTP/1 server, the provider never asked.
    let big = node.pods[0].chat(&ca, call, &["--http1.1", "-H", &header(12000)]);
    assert!(big.starts_with("HTTP/1.1 431"), "{big}");
    assert_eq!(
        node.provider_requests().len(),
        1,
        "only the call within the bound reached the provider"
    );
}
