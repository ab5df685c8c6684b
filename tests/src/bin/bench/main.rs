//! `cargo xtask bench`: Tollgate's costs, each printed beside a baseline
//! measured in the same run on the same machine, in one test node:
//!
//! * `connect` — the connect() cost of the kernel programs;
//! * `compare` — an LLM call direct, through Tollgate, nginx, LiteLLM and
//!   mitmproxy: latency at fixed rates, saturation throughput, new TLS
//!   connections, streamed chunks, idle connections; CPU and memory;
//! * `policy` — the cost of a policy decision with many rules and workloads;
//! * `uprobes` — what TLS uprobes add to a workload's own CPU per call.
//!
//!
//! Usage: tollgate-bench [--quick] [connect|compare|policy|uprobes]…  (default: all)
//! Writes target/bench/results.json beside the printed tables.
mod compare;
mod connect;
mod policy;
mod uprobes;

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
            ["connect", "compare", "policy", "uprobes"].contains(p),
            "unknown benchmark `{p}`: choose connect, compare, policy, uprobes (default: all)"
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
    if wants("uprobes") {
        if !require_privileged("bench") {
            std::process::exit(1);
        }
        results["uprobes"] = uprobes::run(quick);
    }
    let dir = compare::peers_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = std::fs::canonicalize(&dir)
        .unwrap_or(dir)
        .join("results.json");
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

/// Rounds of one measurement combined: every numeric field's median, but
/// counts and errors summed and peaks the largest; nested objects (e.g. a
/// stream's time to first token) likewise; other fields from the first round.
pub fn median(rounds: &[Value]) -> Value {
    let Some(first) = rounds.first() else {
        return Value::Null;
    };
    let Some(obj) = first.as_object() else {
        return first.clone();
    };
    let mut out = serde_json::Map::new();
    for (k, v) in obj {
        let all: Vec<&Value> = rounds.iter().map(|r| &r[k]).collect();
        let combined = if v.is_object() {
            median(&all.into_iter().cloned().collect::<Vec<_>>())
        } else if v.is_number() {
            let mut n: Vec<f64> = all.iter().filter_map(|x| x.as_f64()).collect();
            n.sort_by(f64::total_cmp);
            let pick = match k.as_str() {
                "count" | "errors" => n.iter().sum(),
                k if k.starts_with("peak") => n.last().copied().unwrap_or(0.0),
                _ => n[n.len() / 2],
            };
            // Integers stay integers (latencies in ns, counts).
            if v.is_u64() {
                json_u64(pick)
            } else {
                pick.into()
            }
        } else {
            v.clone()
        };
        out.insert(k.clone(), combined);
    }
    Value::Object(out)
}

fn json_u64(v: f64) -> Value {
    (v.max(0.0).round() as u64).into()
}

pub fn us(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn rounds_combine_by_median_sum_and_peak() {
        let rounds = [
            json!({"system": "tollgate", "count": 10, "errors": 1, "p50_ns": 300, "rps": 9.5, "peak_rss_mib": 20.0, "ttft": {"p50_ns": 5}}),
            json!({"system": "tollgate", "count": 10, "errors": 0, "p50_ns": 100, "rps": 10.0, "peak_rss_mib": 25.0, "ttft": {"p50_ns": 7}}),
            json!({"system": "tollgate", "count": 10, "errors": 2, "p50_ns": 200, "rps": 8.0, "peak_rss_mib": 22.0, "ttft": {"p50_ns": 6}}),
        ];
        let m = super::median(&rounds);
        assert_eq!(m["system"], "tollgate");
        assert_eq!(m["count"], 30);
        assert_eq!(m["errors"], 3);
        assert_eq!(m["p50_ns"], 200);
        assert_eq!(m["rps"], 9.5);
        assert_eq!(m["peak_rss_mib"], 25.0);
        assert_eq!(m["ttft"]["p50_ns"], 6);
    }
}
