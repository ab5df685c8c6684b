//! Real-kernel tests of the redirect path: real connections from inside pod
//! namespaces and cgroups, the real agent, real eBPF programs.
//!
//! How a test tells a redirected connection from a direct one (`node::route`):
//! the mock provider reports the TCP peer it saw, curl its own end. Direct,
//! they are the same socket; redirected, curl's ends on the agent's loopback
//! listener and the mock's peer is the agent's socket — made in the pod's
//! namespace, so from the pod's own address (asserted where it matters).
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tollgate_tests::{
    TestNode,
    node::{OTHER_PORT, PROVIDER_PORT, UPSTREAM_V4, UPSTREAM_V4_ALT, UPSTREAM_V6},
    node::{Route, governed_node, peer_ip, route},
    pod::{CURL_ENDS, curl_answer},
    process::wait_until,
    require_privileged,
};

fn provider_url() -> String {
    format!("http://{UPSTREAM_V4}:{PROVIDER_PORT}/v1/models")
}

#[test]
fn provider_connection_is_redirected_and_attributed_to_its_pod() {
    let Some(node) = governed_node(
        "provider_connection_is_redirected_and_attributed_to_its_pod",
        1,
        "",
    ) else {
        return;
    };
    let pod = &node.pods[0];

    let answer = pod
        .curl(&provider_url())
        .expect("provider call through the agent");
    assert_eq!(
        route(&answer),
        Route::Agent,
        "connection was not relayed by the agent: {answer}"
    );
    assert_eq!(
        peer_ip(&answer),
        pod.ip4,
        "the agent dials from the pod's namespace: the provider sees the pod"
    );
    assert_eq!(answer["request"], "GET /v1/models HTTP/1.1");

    let recs = node.wait_connections(1);
    let r = &recs[0];
    assert_eq!(r["workload"]["pod_uid"], pod.uid.as_str(), "{r}");
    assert_eq!(
        r["workload"]["container_id"],
        pod.container_id.as_str(),
        "{r}"
    );
    assert_eq!(r["comm"], "curl");
    assert_eq!(r["provider"], "openai");
    assert_eq!(r["destination"], format!("{UPSTREAM_V4}:{PROVIDER_PORT}"));
    assert_eq!(r["result"], "ok", "{r}");
    assert!(r["bytes_sent"].as_u64().unwrap() > 40, "{r}");
    assert!(r["bytes_received"].as_u64().unwrap() > 100, "{r}");
    assert!(r["pid"].as_u64().unwrap() > 1);

    let m = node.metrics();
    assert!(
        m.contains("tollgate_ebpf_events{event=\"redirected\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "tollgate_connections_total{{namespace=\"\",pod=\"{0}\",provider=\"openai\",result=\"ok\",workload=\"{0}\"}} 1",
            pod.uid
        )),
        "{m}"
    );
}

#[test]
fn non_provider_connections_are_untouched() {
    let Some(node) = governed_node("non_provider_connections_are_untouched", 1, "") else {
        return;
    };
    let pod = &node.pods[0];
    // Same host, a port no provider uses.
    let answer = pod
        .curl(&format!("http://{UPSTREAM_V4}:{OTHER_PORT}/"))
        .unwrap();
    assert_eq!(
        route(&answer),
        Route::Direct,
        "non-provider connection went through the agent"
    );
    // A provider call afterwards is the only redirect (the kernel counts at
    // connect time, so the count is final once curl has returned) and the
    // only record.
    pod.curl(&provider_url()).unwrap();
    let m = node.metrics();
    assert!(
        m.contains("tollgate_ebpf_events{event=\"redirected\"} 1"),
        "{m}"
    );
    let recs = node.wait_connections(1);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(
        recs[0]["destination"],
        format!("{UPSTREAM_V4}:{PROVIDER_PORT}")
    );
}

#[test]
fn ipv6_and_v4_mapped_connections_are_redirected() {
    let Some(node) = governed_node("ipv6_and_v4_mapped_connections_are_redirected", 1, "") else {
        return;
    };
    let pod = &node.pods[0];

    let v6 = pod
        .curl(&format!("http://[{UPSTREAM_V6}]:{PROVIDER_PORT}/"))
        .expect("IPv6 provider call");
    assert_eq!(route(&v6), Route::Agent, "{v6}");
    assert_eq!(
        peer_ip(&v6),
        pod.ip6,
        "from the pod's own IPv6 address: {v6}"
    );

    // An AF_INET6 socket connecting to a v4-mapped address takes the IPv4 path in the kernel.
    let mapped = pod
        .curl(&format!("http://[::ffff:{UPSTREAM_V4}]:{PROVIDER_PORT}/"))
        .expect("v4-mapped provider call");
    assert_eq!(route(&mapped), Route::Agent, "{mapped}");

    let recs = node.wait_connections(2);
    let dests: Vec<&str> = recs
        .iter()
        .map(|r| r["destination"].as_str().unwrap())
        .collect();
    assert!(
        dests.contains(&format!("[{UPSTREAM_V6}]:{PROVIDER_PORT}").as_str()),
        "{dests:?}"
    );
    assert!(
        dests.contains(&format!("{UPSTREAM_V4}:{PROVIDER_PORT}").as_str()),
        "{dests:?}"
    );
    for r in &recs {
        assert_eq!(r["workload"]["pod_uid"], pod.uid.as_str());
    }

    // IPv6 to a port no provider uses stays direct.
    let direct = pod
        .curl(&format!("http://[{UPSTREAM_V6}]:{OTHER_PORT}/"))
        .unwrap();
    assert_eq!(route(&direct), Route::Direct);
}

#[test]
fn application_sees_original_peer_through_getpeername() {
    let Some(node) = governed_node("application_sees_original_peer_through_getpeername", 1, "")
    else {
        return;
    };
    let pod = &node.pods[0];
    let script = format!(
        "import socket\ns=socket.create_connection(('{UPSTREAM_V4}',{PROVIDER_PORT}))\nprint(s.getpeername()[0], s.getpeername()[1])\ns.close()"
    );
    let out = pod
        .netns
        .command_in_cgroup("python3", Some(&pod.cgroup))
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        seen,
        format!("{UPSTREAM_V4} {PROVIDER_PORT}"),
        "getpeername must show the provider, not the proxy"
    );
    // And it really was redirected.
    node.wait_connections(1);
}

#[test]
fn second_pod_is_attributed_to_the_second_pod() {
    let Some(node) = governed_node("second_pod_is_attributed_to_the_second_pod", 2, "") else {
        return;
    };
    node.pods[0].curl(&provider_url()).unwrap();
    node.wait_connections(1);
    node.pods[1].curl(&provider_url()).unwrap();
    let recs = node.wait_connections(2);
    assert_eq!(recs[0]["workload"]["pod_uid"], node.pods[0].uid.as_str());
    assert_eq!(recs[1]["workload"]["pod_uid"], node.pods[1].uid.as_str());
    assert_ne!(node.pods[0].uid, node.pods[1].uid);
}

#[test]
fn agent_own_upstream_connections_are_not_redirected() {
    if !require_privileged("agent_own_upstream_connections_are_not_redirected") {
        return;
    }
    // The harness runs the agent inside the governed subtree, in the node
    // namespace, where it also opens a listener for itself: if its upstream
    // connections were redirected, each call would loop back into the agent.
    let mut node = TestNode::new(1);
    node.start_agent("");
    assert!(
        wait_until(Duration::from_secs(5), || {
            let out = node
                .node
                .command("ss")
                .args([
                    "-Hltn",
                    &format!("sport = :{}", tollgate_tests::node::PROXY_PORT),
                ])
                .output()
                .ok()?;
            (!out.stdout.is_empty()).then_some(())
        })
        .is_some(),
        "the agent should govern (and listen in) its own namespace too"
    );
    for _ in 0..3 {
        let a = node.pods[0].curl(&provider_url()).unwrap();
        assert_eq!(route(&a), Route::Agent);
    }
    // A loop would redirect the agent's own upstream connections too: the
    // kernel's count (final once the calls have returned) says it did not.
    let m = node.metrics();
    assert!(
        m.contains("tollgate_ebpf_events{event=\"redirected\"} 3"),
        "{m}"
    );
    let recs = node.wait_connections(3);
    assert_eq!(recs.len(), 3, "one record per call, no loop: {recs:?}");
    assert!(recs.iter().all(|r| r["comm"] == "curl"), "{recs:?}");
}

#[test]
fn killed_agent_fails_open() {
    let Some(mut node) = governed_node("killed_agent_fails_open", 1, "") else {
        return;
    };
    assert_eq!(
        route(&node.pods[0].curl(&provider_url()).unwrap()),
        Route::Agent
    );
    assert_eq!(attached_programs(&node), 8, "one set of programs");
    node.kill_agent();
    let a = node.pods[0]
        .curl(&provider_url())
        .expect("fail-open: the provider stays reachable");
    assert_eq!(
        route(&a),
        Route::Direct,
        "with the agent gone the connection goes direct"
    );
    // SIGKILL left nothing attached (fail-open links die with the agent)…
    assert_eq!(attached_programs(&node), 0);
    // …and a restart attaches one set again, and governs.
    node.start_agent("");
    assert_eq!(attached_programs(&node), 8, "no duplicate programs");
    assert_eq!(
        route(&node.pods[0].curl(&provider_url()).unwrap()),
        Route::Agent
    );
}

/// Tollgate programs attached to the governed cgroup, as the kernel lists them.
fn attached_programs(node: &TestNode) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&node.governed)
        .output()
        .expect("bpftool (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("tollgate_"))
        .count()
}

#[test]
fn killed_agent_fails_closed_when_configured_and_restart_recovers() {
    let Some(mut node) = governed_node(
        "killed_agent_fails_closed_when_configured_and_restart_recovers",
        1,
        "failure_mode: closed\n",
    ) else {
        return;
    };
    assert_eq!(
        route(&node.pods[0].curl(&provider_url()).unwrap()),
        Route::Agent
    );
    node.kill_agent();

    let refused = node.pods[0].curl(&provider_url());
    assert!(
        refused.is_err(),
        "fail-closed must refuse provider connections: {refused:?}"
    );
    // Only provider connections: everything else still works.
    let other = node.pods[0]
        .curl(&format!("http://{UPSTREAM_V4}:{OTHER_PORT}/"))
        .unwrap();
    assert_eq!(route(&other), Route::Direct);

    // A new agent takes over; the old pinned programs go (no duplicates).
    node.start_agent("failure_mode: closed\n");
    assert_eq!(
        route(&node.pods[0].curl(&provider_url()).unwrap()),
        Route::Agent
    );
    let runs = std::fs::read_dir(&node.bpffs_dir).unwrap().count();
    assert_eq!(runs, 1, "exactly one pinned program set after restart");
    assert_eq!(attached_programs(&node), 8, "and one set attached");
    assert!(
        node.agent_log()
            .contains("detached programs pinned by an earlier run")
    );
}

#[test]
fn hung_agent_fails_open_after_heartbeat_timeout() {
    let Some(node) = governed_node("hung_agent_fails_open_after_heartbeat_timeout", 1, "") else {
        return;
    };
    assert_eq!(
        route(&node.pods[0].curl(&provider_url()).unwrap()),
        Route::Agent
    );
    // Stopped, not dead: its listeners still exist, only the heartbeat stops.
    node.agent.as_ref().unwrap().signal(libc::SIGSTOP);
    // Not synchronisation: the behaviour under test is what happens once the
    // heartbeat timeout (2 s) has passed, which only time can bring.
    std::thread::sleep(Duration::from_millis(3000));
    let a = node.pods[0].curl(&provider_url());
    node.agent.as_ref().unwrap().signal(libc::SIGCONT);
    assert_eq!(
        route(&a.expect("stale heartbeat must not break connections")),
        Route::Direct
    );
    // Beats again: governed again.
    let back = wait_until(Duration::from_secs(5), || {
        let a = node.pods[0].curl(&provider_url()).ok()?;
        (route(&a) == Route::Agent).then_some(())
    });
    assert!(
        back.is_some(),
        "agent did not resume governing after SIGCONT"
    );
}

#[test]
fn sigterm_detaches_cleanly() {
    let Some(mut node) = governed_node("sigterm_detaches_cleanly", 1, "") else {
        return;
    };
    let ok = node
        .agent
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(15));
    assert_eq!(
        ok,
        Some(true),
        "agent should exit 0 on SIGTERM:\n{}",
        node.agent_log()
    );
    assert!(node.agent_log().contains("programs detached"));
    let a = node.pods[0].curl(&provider_url()).unwrap();
    assert_eq!(route(&a), Route::Direct);
}

#[test]
fn dns_changes_move_the_provider_map() {
    let Some(mut node) = governed_node("dns_changes_move_the_provider_map", 1, "") else {
        return;
    };
    let alt_url = format!("http://{UPSTREAM_V4_ALT}:{PROVIDER_PORT}/");
    assert_eq!(
        route(&node.pods[0].curl(&alt_url).unwrap()),
        Route::Direct,
        "ALT is not a provider address yet"
    );

    // The provider moves: DNS now answers with ALT only (TTL 2 s, grace 0).
    node.set_dns(&[UPSTREAM_V4_ALT]);
    let moved = wait_until(Duration::from_secs(10), || {
        let a = node.pods[0].curl(&alt_url).ok()?;
        (route(&a) == Route::Agent).then_some(())
    });
    assert!(
        moved.is_some(),
        "new provider address was never redirected:\n{}",
        node.agent_log()
    );
    let gone = wait_until(Duration::from_secs(10), || {
        let a = node.pods[0].curl(&provider_url()).ok()?;
        (route(&a) == Route::Direct).then_some(())
    });
    assert!(
        gone.is_some(),
        "stale provider address was never removed:\n{}",
        node.agent_log()
    );
}

#[test]
fn opted_out_pod_is_not_redirected() {
    if !require_privileged("opted_out_pod_is_not_redirected") {
        return;
    }
    let mut node = TestNode::new(2);
    let uid = node.pods[0].uid.replace('-', "_");
    node.start_agent(&format!("opt_out:\n  cgroups: [\"**/*pod{uid}.slice\"]\n"));
    // Opt-outs are written by the scan before it opens listeners, and
    // start_agent waited for every pod's listener: they are in force.
    let a = node.pods[0].curl(&provider_url()).unwrap();
    assert_eq!(route(&a), Route::Direct, "opted-out pod must go direct");
    let b = node.pods[1].curl(&provider_url()).unwrap();
    assert_eq!(route(&b), Route::Agent, "other pods stay governed");
    assert!(
        node.metrics()
            .contains("tollgate_ebpf_events{event=\"opted_out\"} 1")
    );
}

#[test]
fn restart_while_traffic_flows_does_not_break_new_connections() {
    let Some(mut node) = governed_node(
        "restart_while_traffic_flows_does_not_break_new_connections",
        1,
        "",
    ) else {
        return;
    };
    let url = provider_url();
    let pod_netns = node.pods[0].netns.path();
    let cgroup = node.pods[0].cgroup.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let done = Arc::new(AtomicUsize::new(0));
    let done2 = done.clone();
    // A client calling every 50 ms (at most 200 calls) while the agent is replaced.
    let traffic = std::thread::spawn(move || {
        let mut results = Vec::new();
        while !stop2.load(Ordering::Relaxed) && results.len() < 200 {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={pod_netns}"))
                .args([
                    "sh",
                    "-c",
                    &format!(
                        "echo $$ > {}/cgroup.procs && exec curl -sS -m 5 --connect-timeout 3 -w '{CURL_ENDS}' {url}",
                        cgroup.display()
                    ),
                ])
                .output()
                .unwrap();
            results.push(if out.status.success() {
                curl_answer(&out.stdout).map(|v| route(&v))
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            });
            done2.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
        results
    });
    // Some calls before the restart…
    let calls_past = |n: usize| {
        wait_until(Duration::from_secs(30), || {
            (done.load(Ordering::Relaxed) >= n).then_some(())
        })
        .expect("the client keeps calling")
    };
    calls_past(5);
    let ok = node
        .agent
        .as_mut()
        .unwrap()
        .terminate(Duration::from_secs(15));
    assert_eq!(ok, Some(true), "{}", node.agent_log());
    node.start_agent("");
    // …and some after it.
    calls_past(done.load(Ordering::Relaxed) + 5);
    stop.store(true, Ordering::Relaxed);
    let results = traffic.join().unwrap();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} calls failed during restart: {failures:?}",
        failures.len(),
        results.len()
    );
    assert!(
        results.len() >= 10,
        "too few calls to say anything: {}",
        results.len()
    );
    let relayed = results
        .iter()
        .filter(|r| r.as_ref() == Ok(&Route::Agent))
        .count();
    assert!(relayed > 0, "no call was relayed at all: {results:?}");
    // After the restart the new agent governs again.
    assert_eq!(
        route(&node.pods[0].curl(&provider_url()).unwrap()),
        Route::Agent
    );
}
