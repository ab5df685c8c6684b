//! `cargo xtask demo`: a miniature node on this machine, the agent in host
//! mode governing two workloads, each calling a (mock) LLM provider (whose
//! addresses the agent learned from DNS), and what the agent saw of it.
use std::time::Duration;

use tollgate_tests::{
    TestNode,
    node::{
        Layout, OTHER_PORT, PROVIDER_HOST, PROVIDER_PORT, Route, UPSTREAM_V4, UPSTREAM_V6, route,
    },
    require_privileged,
};

fn main() {
    if !require_privileged("demo") {
        std::process::exit(1);
    }
    println!("Building a miniature node: node, upstream and two workload network namespaces,");
    println!(
        "cgroups under tollgate.slice, dnsmasq answering {PROVIDER_HOST} → {UPSTREAM_V4} / {UPSTREAM_V6},"
    );
    println!("and a mock provider on {UPSTREAM_V4}:{PROVIDER_PORT}.\n");
    let mut node = TestNode::with_layout(2, Layout::Host);

    println!("Starting `tollgate run` in host mode with this config:\n");
    for line in node.agent_config("").lines() {
        println!("    {line}");
    }
    node.start_agent("");
    println!("\nAgent is up and listening inside both workload namespaces.\n");

    let calls = [
        (
            0,
            format!("http://{UPSTREAM_V4}:{PROVIDER_PORT}/v1/chat/completions"),
            "provider, IPv4",
        ),
        (
            1,
            format!("http://[{UPSTREAM_V6}]:{PROVIDER_PORT}/v1/models"),
            "provider, IPv6",
        ),
        (
            1,
            format!("http://{UPSTREAM_V4}:{PROVIDER_PORT}/v1/embeddings"),
            "provider, IPv4",
        ),
        (
            0,
            format!("http://{UPSTREAM_V4}:{OTHER_PORT}/health"),
            "not a provider",
        ),
    ];
    for (pod, url, what) in &calls {
        let p = &node.pods[*pod];
        match p.curl(url) {
            Ok(answer) => {
                let peer = answer["peer"].as_str().unwrap_or("(not reported)");
                let via = match route(&answer) {
                    Route::Agent => "via tollgate, from the pod's namespace",
                    Route::Direct => "direct",
                };
                println!(
                    "workload-{} → {url:<50} ({what}): ok, upstream saw {peer} ({via})",
                    p.index
                );
            }
            Err(e) => println!("workload-{} → {url} ({what}): FAILED: {e}", p.index),
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let records = node.wait_connections(3);

    println!("\nWhat the agent saw (connection log, one JSON line per connection):\n");
    println!(
        "{:<36} {:>7} {:<6} {:<8} {:<20} {:>6} {:>6} {:<6}",
        "workload (cgroup)", "pid", "comm", "provider", "destination", "sent", "recv", "result"
    );
    for r in &records {
        println!(
            "{:<36} {:>7} {:<6} {:<8} {:<20} {:>6} {:>6} {:<6}",
            r["workload"]["cgroup"]
                .as_str()
                .unwrap_or("?")
                .rsplit("tollgate.slice")
                .next()
                .map(|s| format!("tollgate.slice{s}"))
                .unwrap_or_default(),
            r["pid"],
            r["comm"].as_str().unwrap_or("?"),
            r["provider"].as_str().unwrap_or("?"),
            r["destination"].as_str().unwrap_or("?"),
            r["bytes_sent"],
            r["bytes_received"],
            r["result"].as_str().unwrap_or("?"),
        );
    }
    println!("\nMetrics (/metrics), Tollgate's own series:\n");
    for line in node
        .metrics()
        .lines()
        .filter(|l| l.starts_with("tollgate_") && !l.ends_with(" 0"))
    {
        println!("    {line}");
    }
    println!("\nThe non-provider call went direct and is not in the log. Cleaning up.");
}
