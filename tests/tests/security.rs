//! The proxy's trust boundary: the agent works with only the capabilities
//! deploy/README.md documents, listens only where configured, and never
//! lets a credential or the CA key into its logs, metrics, audit records or
//! error bodies.
use std::time::Duration;

use tollgate_tests::{
    TestNode, node::PROVIDER_HOST, node::output_in, process::wait_until, require_privileged,
};

/// CAP_* bit numbers of the documented set.
const DOCUMENTED: [(&str, u32); 6] = [
    ("bpf", 39),
    ("perfmon", 38),
    ("net_admin", 12),
    ("sys_admin", 21),
    ("sys_resource", 24),
    ("sys_ptrace", 19),
];

fn caps(status_file: &str, field: &str) -> u64 {
    std::fs::read_to_string(status_file)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("{field} in {status_file}"))
}

fn terminated_call(node: &TestNode, pod: usize, auth: &str) -> String {
    node.pods[pod].chat(
        &node.node_ca_cert(),
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        &["-H", &format!("authorization: Bearer {auth}")],
    )
}

#[test]
fn agent_governs_with_only_the_documented_capabilities() {
    if !require_privileged("agent_governs_with_only_the_documented_capabilities") {
        return;
    }
    let mut node = TestNode::new(1);
    let add: Vec<String> = DOCUMENTED.iter().map(|(n, _)| format!("+{n}")).collect();
    let bounding = format!("--bounding-set=-all,{}", add.join(","));
    node.start_agent_wrapped("", &["setpriv", &bounding, "--inh-caps=-all", "--"]);
    let pid = node.agent.as_ref().unwrap().pid();
    let eff = caps(&format!("/proc/{pid}/status"), "CapEff:");
    // This machine's own bounding set may lack some (containers often drop
    // SYS_RESOURCE): the agent then runs with the documented ones it has.
    let ours = caps("/proc/self/status", "CapBnd:");
    let want: u64 = DOCUMENTED.iter().map(|(_, b)| 1u64 << b).sum::<u64>() & ours;
    assert_eq!(
        eff, want,
        "the agent holds exactly the documented set (as far as this machine has it)"
    );
    // And with them it redirects, terminates and forwards.
    let out = terminated_call(&node, 0, "sk-test-secret");
    assert!(out.contains(" 200"), "{out}\n{}", node.agent_log());
    assert_eq!(node.wait_connections(1)[0]["kind"], "request");
}

#[test]
fn agent_listens_only_on_loopback() {
    if !require_privileged("agent_listens_only_on_loopback") {
        return;
    }
    let mut node = TestNode::new(1);
    node.start_agent("");
    let pid = node.agent.as_ref().unwrap().pid().to_string();
    // The node: the agent's own listeners (metrics) are on loopback.
    let ss = output_in(&node.node, "ss", &["-Hltnp"]);
    let ours: Vec<&str> = ss
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .collect();
    assert!(
        !ours.is_empty(),
        "no listener of the agent's in the node: {ss}"
    );
    for l in &ours {
        let local = l.split_whitespace().nth(3).unwrap_or("");
        assert!(
            local.starts_with("127.0.0.1:") || local.starts_with("[::1]:"),
            "the agent listens beyond loopback in the node: {l}"
        );
    }
    // The pod runs nothing that listens: every listener in its namespace is
    // the agent's, and each is the proxy port on loopback.
    let pod_ss = output_in(&node.pods[0].netns, "ss", &["-Hltn"]);
    let proxy = tollgate_tests::node::PROXY_PORT;
    let locals: Vec<&str> = pod_ss
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert!(
        locals.contains(&format!("127.0.0.1:{proxy}").as_str()),
        "{pod_ss}"
    );
    for local in &locals {
        assert!(
            *local == format!("127.0.0.1:{proxy}") || *local == format!("[::1]:{proxy}"),
            "a listener beyond the proxy's loopback port in the pod: {local}\n{pod_ss}"
        );
    }
}

#[test]
fn credentials_and_the_ca_key_never_leak() {
    if !require_privileged("credentials_and_the_ca_key_never_leak") {
        return;
    }
    let mut node = TestNode::new(1);
    let key_file = node.dir.join("injected-key");
    let injected = "sk-real-NEVER-LOG-7f3a";
    let workload_key = "sk-workload-NEVER-LOG-19c2";
    std::fs::write(&key_file, format!("{injected}\n")).unwrap();
    let cfg = format!(
        "audit:\n  capture: {{headers: true, bodies: true}}\n\
         policy:\n  rules:\n    - {{name: deny-4o, models: [gpt-4o], action: deny, message: no}}\n\
         \x20   - {{name: limited, models: [gpt-4o-mini-limited], action: allow, limits: {{requests_per_minute: 1}}}}\n\
         \x20   - {{name: inject, providers: [openai], action: allow, credential_file: {}}}\n",
        key_file.display()
    );
    node.start_agent(&cfg);
    let mut bodies = Vec::new();
    // Allowed with injection, denied, rate-limited: each answer the workload gets.
    bodies.push(terminated_call(&node, 0, workload_key));
    for model in ["gpt-4o", "gpt-4o-mini-limited", "gpt-4o-mini-limited"] {
        let out = node.pods[0]
            .https_post_command(
                &node.node_ca_cert(),
                PROVIDER_HOST,
                "/v1/chat/completions",
                &format!(r#"{{"model":"{model}","messages":[]}}"#),
            )
            .args(["-H", &format!("authorization: Bearer {workload_key}")])
            .output()
            .unwrap();
        bodies.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    assert!(
        bodies[0].contains(&format!("x-mock-credential: Bearer {injected}")),
        "the provider got the injected key: {}",
        bodies[0]
    );
    assert!(bodies[3].contains("rate limit"), "{}", bodies[3]);
    wait_until(Duration::from_secs(5), || {
        (node.connections().len() >= 4).then_some(())
    })
    .expect("four records");

    let ca_key = std::fs::read_to_string(node.node_ca().join("ca.key")).unwrap();
    // A line from the middle of the key's base64: any fragment would do.
    let key_fragment = ca_key
        .lines()
        .find(|l| l.len() > 20 && !l.starts_with("-----"))
        .expect("PEM body")
        .to_string();
    let audit = std::fs::read_to_string(node.connection_log()).unwrap();
    let log = node.agent_log();
    let metrics = node.metrics();
    for (what, text) in [
        ("audit log", audit.as_str()),
        ("agent log", log.as_str()),
        ("metrics", metrics.as_str()),
    ] {
        for secret in [injected, workload_key, key_fragment.as_str()] {
            assert!(!text.contains(secret), "{secret} leaked into the {what}");
        }
    }
    // Error bodies the proxy wrote (deny, 429) carry no credential either.
    for b in &bodies[1..] {
        for secret in [injected, workload_key, key_fragment.as_str()] {
            assert!(!b.contains(secret), "{secret} in an error body: {b}");
        }
    }
    // The captured headers are there, redacted.
    assert!(audit.contains("request_headers"), "{audit}");
}

#[test]
fn a_pod_cannot_read_the_telemetry_without_the_token() {
    if !require_privileged("a_pod_cannot_read_the_telemetry_without_the_token") {
        return;
    }
    let mut node = TestNode::new(1);
    let token_file = node.dir.join("metrics-token");
    std::fs::write(&token_file, "t0ken-only-the-scraper-has\n").unwrap();
    // As the chart runs it: the endpoint on an address pods can reach (here
    // the pod's gateway on the node), guarded by a token.
    let gateway = node.pods[0].ip4.replace(".2", ".1");
    let addr = format!("{gateway}:9464");
    node.start_agent(&format!(
        "metrics: {{listen: \"{addr}\", bearer_token_file: {}}}",
        token_file.display()
    ));
    // One governed call, so there is usage to leak.
    assert!(terminated_call(&node, 0, "sk-test-secret").contains(" 200"));
    let pod = &node.pods[0];
    let from_pod = |path: &str, extra: &[&str]| {
        let out = pod
            .netns
            .command_in_cgroup("curl", Some(&pod.cgroup))
            .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(format!("http://{addr}{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(from_pod("/metrics", &[]), "401");
    assert_eq!(from_pod("/status", &[]), "401");
    assert_eq!(
        from_pod("/metrics", &["-H", "Authorization: Bearer guess"]),
        "401"
    );
    assert_eq!(from_pod("/healthz", &[]), "200", "probes need no token");
    // The scraper with the token reads everything.
    let scrape = output_in(
        &node.node,
        "curl",
        &[
            "-sS",
            "-m",
            "5",
            "-H",
            "Authorization: Bearer t0ken-only-the-scraper-has",
            &format!("http://{addr}/metrics"),
        ],
    );
    assert!(scrape.contains("gen_ai_client_token_usage"), "{scrape}");
    let status = |extra: &[&str]| {
        node.node
            .command(&tollgate_tests::node::agent_bin())
            .args(["status", "--addr", &addr])
            .args(extra)
            .output()
            .unwrap()
    };
    let denied = status(&[]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("--token-file"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    let ok = status(&["--token-file", token_file.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("policy rules in force"));
}

#[test]
fn a_pod_cannot_crowd_out_other_tenants_model_labels() {
    let Some(node) = tollgate_tests::node::governed_node(
        "a_pod_cannot_crowd_out_other_tenants_model_labels",
        2,
        r#"policy: {rules: [{name: no-bogus, models: ["bogus-*"], action: deny}]}"#,
    ) else {
        return;
    };
    // Pod 1 sends more made-up model names than there are label slots (64
    // per provider); none reaches the provider, so none is confirmed.
    for i in 0..70 {
        let out = node.pods[0].chat(
            &node.node_ca_cert(),
            &format!(r#"{{"model":"bogus-{i}","messages":[]}}"#),
            &[],
        );
        assert!(out.contains(" 403"), "{out}");
    }
    // Pod 2's real model keeps its own label.
    assert!(terminated_call(&node, 1, "sk-test-secret").contains(" 200"));
    let m = node.metrics();
    assert!(
        !m.contains("model=\"bogus-"),
        "a made-up name became a label:\n{m}"
    );
    assert!(m.contains("model=\"unconfirmed\""), "{m}");
    assert!(
        m.contains(&format!(
            "model=\"gpt-4o-mini-2024-07-18\",namespace=\"\",pod=\"{}\"",
            node.pods[1].uid
        )),
        "the real model was relabelled:\n{m}"
    );
    assert!(
        node.provider_requests()
            .iter()
            .all(|r| r["model"] != "bogus-0")
    );
}

/// A root process in the pod joins the proxy port's listener group
/// (SO_REUSEPORT, the agent's own user) to take the pod's redirected
/// connections itself: the group's steering program hands every one to the
/// agent's listeners, so each call is still governed and recorded.
#[test]
fn a_pod_that_joins_the_proxy_ports_listeners_is_handed_none_of_its_connections() {
    if !require_privileged(
        "a_pod_that_joins_the_proxy_ports_listeners_is_handed_none_of_its_connections",
    ) {
        return;
    }
    let mut node = TestNode::new(1);
    // Two proxy threads whatever this machine's CPUs: a group of two.
    node.start_agent("proxy:\n  worker_threads: 2\n");
    let pod = &node.pods[0];
    let squatter = r#"
import select, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
s.setblocking(False)
print("bound", flush=True)
taken = 0
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if sys.stdin in ready:
        break
    try:
        c, _ = s.accept()
        taken += 1
        c.close()
    except BlockingIOError:
        pass
print("taken", taken, flush=True)
"#;
    let mut child = pod
        .netns
        .command_in_cgroup("python3", Some(&pod.cgroup))
        .args([
            "-c",
            squatter,
            &tollgate_tests::node::PROXY_PORT.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(
        line.trim(),
        "bound",
        "the pod joined the group as the agent's user"
    );
    const CALLS: usize = 24;
    for i in 0..CALLS {
        let answer = terminated_call(&node, 0, "sk-test-secret");
        assert!(answer.contains(" 200"), "call {i}: {answer}");
    }
    drop(child.stdin.take()); // the squatter reports and exits
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let _ = child.wait();
    assert_eq!(
        line.trim(),
        "taken 0",
        "the pod's own socket took connections"
    );
    // The mock provider received every call, through the agent (its
    // record of each), and the audit log has each one.
    let reached = node.mock_requests_where(|l| l.starts_with("POST /v1/chat/completions"));
    assert_eq!(reached.len(), CALLS, "{reached:?}");
    assert_eq!(node.wait_requests(CALLS).len(), CALLS);
}
