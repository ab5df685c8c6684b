//! The connect() cost of the kernel programs. A pod of the test node times
//! connect() in a loop:
//! 1. baseline — to a loopback listener (accepted by another process, as
//!    the agent accepts redirected ones), from a cgroup outside the governed
//!    subtree (no programs run for it);
//! 2. the same with the agent's programs attached (what every non-provider
//!    connection pays: one hash lookup);
//! 3. to a provider address, redirected to the proxy's loopback listener
//!    (lookup, listener check, record, rewrite, sock_ops) — compared with
//!    baseline 1, since a redirected connect *is* a loopback connect.
use std::path::Path;

use serde_json::Value;
use tollgate_tests::{
    TestNode,
    node::{PROVIDER_PORT, UPSTREAM_V4},
};

use crate::{median, sibling, us};

/// Print the connect() table. `ungoverned`: a cgroup of the pod's namespace
/// outside the governed subtree.
pub fn run(node: &TestNode, ungoverned: &Path, quick: bool) -> Value {
    let (n_local, n_provider) = if quick { (2_000, 300) } else { (20_000, 2_000) };
    let bench = |node: &TestNode, cgroup: &Path, target: &str, n: usize| -> Value {
        let pod = &node.pods[0];
        let bin = sibling("tollgate-bench-connect");
        let out = pod
            .netns
            .command_in_cgroup(bin.to_str().unwrap(), Some(cgroup))
            .args([target, &n.to_string()])
            .output()
            .expect("run tollgate-bench-connect");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("bench JSON")
    };
    let governed = node.pods[0].cgroup.clone();
    let provider_target = format!("{UPSTREAM_V4}:{PROVIDER_PORT}");
    // Warm-up, then interleaved rounds so drift (frequency, caches) hits all three alike.
    bench(node, ungoverned, "local", 500);
    let rounds = 5;
    let (mut base, mut again, mut attached, mut provider) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        base.push(bench(node, ungoverned, "local", n_local / rounds));
        attached.push(bench(node, &governed, "local", n_local / rounds));
        provider.push(bench(
            node,
            &governed,
            &provider_target,
            n_provider / rounds,
        ));
        // The baseline once more: how far two identical runs differ here is
        // the noise floor against which the other ratios must be read.
        again.push(bench(node, ungoverned, "local", n_local / rounds));
    }
    let (base, again, attached, provider) = (
        median(&base),
        median(&again),
        median(&attached),
        median(&provider),
    );

    println!(
        "\nconnect() cost, eBPF programs attached vs not (same run, same pod namespace, median of 5 interleaved rounds, {} mode)\n",
        if quick { "quick" } else { "full" }
    );
    println!(
        "{:<52} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "scenario", "calls", "p50", "p99", "mean", "p50 ratio"
    );
    let b50 = base["p50_ns"].as_u64().unwrap_or(1).max(1) as f64;
    for (name, v) in [
        ("loopback connect, no programs (baseline)", &base),
        ("same again (noise floor: identical to baseline)", &again),
        (
            "loopback connect, programs attached (non-provider)",
            &attached,
        ),
        ("provider connect, redirected to proxy listener", &provider),
    ] {
        let ratio = v["p50_ns"].as_u64().unwrap_or(0) as f64 / b50;
        println!(
            "{:<52} {:>7} {:>7.1}µs {:>7.1}µs {:>7.1}µs {:>8.2}x{}",
            name,
            v["count"],
            us(&v["p50_ns"]),
            us(&v["p99_ns"]),
            us(&v["mean_ns"]),
            ratio,
            if v["errors"].as_u64().unwrap_or(0) > 0 {
                format!("  ({} errors)", v["errors"])
            } else {
                String::new()
            }
        );
    }
    println!(
        "\nratio = p50 / baseline p50; read ratios against the noise-floor row. A redirected connect is compared with a plain loopback connect,"
    );
    println!(
        "because after the rewrite that is what it is; the network path to the real provider is saved, not added."
    );
    serde_json::json!({
        "baseline": base, "noise_floor": again,
        "attached_non_provider": attached, "provider_redirected": provider,
    })
}
