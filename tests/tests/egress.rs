//! In-pod egress, attacked from a pod: the agent's provider connections are
//! made inside the workload's own network namespace, so the pod's egress
//! rules hold for calls through the agent, no pod rides another pod's
//! connections, a forged DNS answer is not learned, and an address a
//! pod's resolver did teach opens nothing the pod could not reach alone. Asserted on what the far side received (the mock's request
//! log, a listener's accept queue), not on the agent's account of it.
use std::{
    io::ErrorKind,
    path::Path,
    time::{Duration, Instant},
};

use tollgate_tests::{
    TestNode,
    netns::run_ok,
    node::governed_node,
    node::{ANTHROPIC_HOST, NODE_UPSTREAM_V4, PROVIDER_HOST, TLS_PORT, UPSTREAM_V4},
    pod::Pod,
};

/// Load an nftables ruleset (`rules`, nft syntax) inside a namespace of the test node.
fn nft(ns: &tollgate_tests::netns::Netns, dir: &Path, name: &str, rules: &str) {
    let file = dir.join(format!("{name}.nft"));
    std::fs::write(&file, rules).unwrap();
    run_ok(ns.command("nft").arg("-f").arg(&file));
}

/// A chat call from `pod` to `host` on the mock's TLS port at `addr`,
/// trusting the node CA; curl's `-i` output.
fn chat(node: &TestNode, pod: &Pod, host: &str, addr: &str) -> String {
    let out = pod
        .netns
        .command_in_cgroup("curl", Some(&pod.cgroup))
        .args(["-sS", "-i", "-m", "10", "--cacert"])
        .arg(node.node_ca_cert())
        .args(["--resolve", &format!("{host}:{TLS_PORT}:{addr}")])
        .args(["-H", "content-type: application/json"])
        .args(["-H", "authorization: Bearer sk-test-secret"])
        .args([
            "--data-binary",
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        ])
        .arg(format!("https://{host}:{TLS_PORT}/v1/chat/completions"))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn peer_ip_of(request: &serde_json::Value) -> String {
    let peer = request["peer"].as_str().unwrap_or_default();
    peer.rsplit_once(':')
        .map(|(ip, _)| ip.to_string())
        .unwrap_or_default()
}

#[test]
fn a_pods_egress_rules_hold_for_its_calls_through_the_agent() {
    let Some(node) = governed_node(
        "a_pods_egress_rules_hold_for_its_calls_through_the_agent",
        2,
        "",
    ) else {
        return;
    };
    // Pod 2 may not reach the provider address: its own firewall says so.
    nft(
        &node.pods[1].netns,
        &node.dir,
        "pod2-egress",
        &format!(
            "table inet egress {{\n  chain out {{\n    type filter hook output priority 0;\n    ip daddr {UPSTREAM_V4} tcp dport {{ 443, {TLS_PORT} }} reject with tcp reset\n  }}\n}}\n"
        ),
    );

    let allowed = chat(&node, &node.pods[0], PROVIDER_HOST, UPSTREAM_V4);
    assert!(
        allowed.starts_with("HTTP/2 200") || allowed.contains(" 200"),
        "{allowed}"
    );
    // Through the agent, after pod 1's call has left a pooled provider
    // connection: pod 2 may not use it, its own connection is refused.
    let blocked = chat(&node, &node.pods[1], PROVIDER_HOST, UPSTREAM_V4);
    assert!(
        blocked.contains(" 502") || blocked.contains(" 504"),
        "the egress drop did not hold through the agent:\n{blocked}\n{}",
        node.agent_log()
    );
    let relayed = node.pods[1].curl(&format!("http://{UPSTREAM_V4}:443/v1/models"));
    assert!(
        relayed.is_err(),
        "a relayed connection got out: {relayed:?}"
    );

    let requests = node.mock_requests();
    let peers: Vec<String> = requests.iter().map(peer_ip_of).collect();
    assert!(
        peers.contains(&node.pods[0].ip4),
        "the provider saw pod 1's own address: {peers:?}"
    );
    assert!(
        !peers.contains(&node.pods[1].ip4) && !peers.contains(&NODE_UPSTREAM_V4.to_string()),
        "the provider received a call from pod 2 or from the node: {peers:?}"
    );
    let records = node.wait_requests(2);
    assert!(
        records
            .iter()
            .any(|r| r["workload"]["pod_uid"] == node.pods[1].uid.as_str() && r["outcome"] != "ok"),
        "pod 2's call is recorded as failed: {records:?}"
    );
}

/// A DNS answer sent by the pod to itself from port 53 (what a hostile
/// tenant can always do): `name A ip`, TTL 300 s.
const FORGE_DNS: &str = r#"
import socket, struct, sys
name, ip = sys.argv[1], sys.argv[2]
q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
pkt = struct.pack("!HHHHHH", 0x1234, 0x8180, 1, 1, 0, 0) + q + struct.pack("!HH", 1, 1)
pkt += struct.pack("!HHHIH", 0xC00C, 1, 1, 300, 4) + socket.inet_aton(ip)
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.bind(("127.0.0.1", 0))
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.bind(("127.0.0.1", 53))
tx.sendto(pkt, rx.getsockname())
rx.settimeout(2)
rx.recv(512)
"#;

/// An A query for `name` to the resolver at `server` (port 53), as a stub
/// resolver sends it; the answer is read and dropped.
const QUERY_DNS: &str = r#"
import socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
pkt = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(pkt, (server, 53))
s.recv(512)
"#;

/// A service on the node's own address that pods may not reach: the node's
/// firewall refuses what comes in from pod 1's link. Returns its listener.
fn node_only_service(node: &TestNode) -> std::net::TcpListener {
    let service = node
        .node
        .bind_tcp(&format!("{NODE_UPSTREAM_V4}:{TLS_PORT}"));
    service.set_nonblocking(true).unwrap();
    nft(
        &node.node,
        &node.dir,
        "node-guard",
        &format!(
            "table inet guard {{\n  chain in {{\n    type filter hook input priority 0;\n    iifname \"pod1\" tcp dport {TLS_PORT} reject with tcp reset\n  }}\n}}\n"
        ),
    );
    service
}

/// Nothing connected to `service` (its accept queue stays empty).
fn assert_untouched(service: &std::net::TcpListener) {
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        match service.accept() {
            Ok((_, peer)) => panic!("the node-only service was reached by {peer}"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn kernel_event(node: &TestNode, event: &str) -> u64 {
    let m = node.metrics();
    let prefix = format!("tollgate_ebpf_events{{event=\"{event}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {event} counter in\n{m}"))
}

#[test]
fn a_forged_dns_answer_is_not_learned() {
    let Some(node) = governed_node("a_forged_dns_answer_is_not_learned", 1, "") else {
        return;
    };
    let service = node_only_service(&node);
    let pod = &node.pods[0];
    // The pod tells the kernel "api.anthropic.com is the node's address",
    // from port 53 of its own loopback: no resolver of the pod sent that.
    pod.python(FORGE_DNS, &[ANTHROPIC_HOST, NODE_UPSTREAM_V4]);
    assert!(kernel_event(&node, "dns_ignored") >= 1);
    assert_eq!(kernel_event(&node, "dns_learned"), 0);
    let out = chat(&node, pod, ANTHROPIC_HOST, NODE_UPSTREAM_V4);
    assert!(!out.contains("HTTP/"), "something answered: {out}");
    assert!(
        node.connections().is_empty(),
        "the connection went through the agent: {:?}",
        node.connections()
    );
    assert_untouched(&service);
}

#[test]
fn a_learned_address_opens_nothing_the_pod_could_not_reach() {
    let Some(node) = governed_node(
        "a_learned_address_opens_nothing_the_pod_could_not_reach",
        1,
        "",
    ) else {
        return;
    };
    let service = node_only_service(&node);
    let pod = &node.pods[0];
    // The pod's own nameserver (its resolv.conf names the gateway) answers
    // "api.anthropic.com is the node's address": lying, or told to by the pod.
    let (gateway, _resolver) = node.pod_resolver(
        0,
        &[format!("--host-record={ANTHROPIC_HOST},{NODE_UPSTREAM_V4}")],
    );
    pod.python(QUERY_DNS, &[ANTHROPIC_HOST, &gateway]);
    assert!(
        kernel_event(&node, "dns_learned") >= 1,
        "the answer was learned"
    );
    let out = chat(&node, pod, ANTHROPIC_HOST, NODE_UPSTREAM_V4);
    assert!(
        out.contains(" 502") || out.contains(" 504"),
        "the call to the node's address was answered:\n{out}\n{}",
        node.agent_log()
    );
    // The agent's path ran: redirected, terminated, dialled by the agent…
    let records = node.wait_requests(1);
    assert_eq!(
        records[0]["upstream"],
        format!("{NODE_UPSTREAM_V4}:{TLS_PORT}"),
        "{records:?}"
    );
    // …from the pod's namespace, so the node's firewall held.
    assert_untouched(&service);
}
