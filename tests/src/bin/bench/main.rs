//! `cargo xtask bench`: Tollgate's costs, each printed beside a baseline
//! measured in the same run on the same machine, in one test node:
//!
//! * `connect` — the connect() cost of the kernel programs;
//! * `compare` — an LLM call direct, through Tollgate, nginx, LiteLLM and
//!   mitmproxy: latency at fixed rates, saturation throughput, new TLS
//!   connections, streamed chunks, idle connections; CPU and memory;
//! * `policy` — the cost of a policy decision with many rules and workloads.
//!
//!
//! Usage: tollgate-bench [--quick] [connect|compare|policy]…  (default: all)
//! Writes target/bench/results.json beside the printed tables.
mod compare;
mod connect;
mod policy;

use serde_json::Value;
use tollgate_tests::{TestNode, require_privileged};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let picked: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    for p in &picked {
        assert!(
            ["connect", "compare", "policy"].contains(p),
            "unknown benchmark `{p}`: choose connect, compare, policy (default: all)"
        );
    }
    if std::env::var_os("TOLLGATE_LOG").is_none() {
        // The agent logs as in production, not at the tests' debug level.
        // SAFETY: single-threaded here; nothing reads the environment concurrently.
        unsafe { std::env::set_var("TOLLGATE_LOG", "info") };
    }
    let wants = |name: &str| picked.is_empty() || picked.contains(&name);
    let mut results = serde_json::json!({
        "mode": if quick { "quick" } else { "full" },
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    });
    if wants("policy") {
        policy::run(quick);
    }
    if wants("connect") || wants("compare") {
        node_benchmarks(quick, &wants, &mut results);
    }
    let path = compare::peers_dir().join("results.json");
    let _ = std::fs::create_dir_all(compare::peers_dir());
    std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    println!(
        "
results: {}",
        path.display()
    );
}

/// The benchmarks that need a test node (root).
fn node_benchmarks(quick: bool, wants: &dyn Fn(&str) -> bool, results: &mut Value) {
    if !require_privileged("bench") {
        std::process::exit(1);
    }
    let mut node = TestNode::new(1);
    // Same pod namespace, two cgroups: one outside the governed subtree (no
    // programs run for it: the baseline, direct path) and the pod's own.
    let ungoverned = node.cgroups.mkdir("ungoverned.scope");
    // TOLLGATE_BENCH_AGENT_CONFIG: YAML merged into the agent's config, to
    // compare settings (e.g. `proxy: {worker_threads: 1}`).
    node.start_agent(&tollgate_tests::yaml::merge_yaml(
        compare::BENCH_POLICY,
        &std::env::var("TOLLGATE_BENCH_AGENT_CONFIG").unwrap_or_default(),
    ));
    println!(
        "Tollgate benchmarks, {} mode ({} CPUs). Baselines run in the same node, interleaved with what they are compared to.",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if wants("connect") {
        results["connect"] = connect::run(&node, &ungoverned, quick);
    }
    if wants("compare") {
        results["compare"] = compare::run(&node, &ungoverned, quick);
    }
}

/// A binary built beside this one.
pub fn sibling(name: &str) -> std::path::PathBuf {
    std::env::current_exe().unwrap().with_file_name(name)
}

/// Per-field median over rounds (count and errors summed).
pub fn median(rounds: &[Value]) -> Value {
    let field = |k: &str| {
        let mut v: Vec<u64> = rounds.iter().map(|r| r[k].as_u64().unwrap_or(0)).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let sum = |k: &str| {
        rounds
            .iter()
            .map(|r| r[k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    serde_json::json!({
        "count": sum("count"), "errors": sum("errors"),
        "p50_ns": field("p50_ns"), "p99_ns": field("p99_ns"), "mean_ns": field("mean_ns"),
    })
}

pub fn us(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64 / 1000.0
}
