//! The benchmark keeps measuring what it claims to: a quick run of
//! `tollgate-bench compare` (one scenario, Tollgate and the floor relay
//! beside the direct path) must get every call answered by every system,
//! and judge its targets. Nothing here is a timing assertion: a bench whose
//! calls all fail (as when the bench policy met a newer safety rule) prints
//! nonsense figures, and only a run like this one notices.
use std::process::Command;

use serde_json::Value;
use tollgate_tests::{node::bench_bin, require_privileged};

#[test]
fn the_benchmark_gets_every_call_answered() {
    if !require_privileged("the_benchmark_gets_every_call_answered") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tollgate-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(bench_bin())
        .args(["--quick", "compare"])
        .env("TOLLGATE_BENCH_SYSTEMS", "tollgate,floor")
        .env("TOLLGATE_BENCH_SCENARIOS", "rate_200")
        .env("TOLLGATE_BENCH_PEERS", &dir)
        .output()
        .expect("run tollgate-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let scenario = results["compare"]["scenarios"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["scenario"] == "rate_200"))
        .unwrap_or_else(|| panic!("no rate_200 scenario: {stdout}"));
    for system in ["direct", "tollgate", "floor"] {
        let row = scenario["rows"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["system"] == system))
            .unwrap_or_else(|| panic!("no {system} row: {stdout}"));
        assert!(row.get("failed").is_none(), "{system}: {row}");
        assert_eq!(row["errors"], 0, "{system}: {row}");
        // 200 calls/s for 2 s, every one answered.
        assert_eq!(row["count"], 400, "{system}: {row}");
    }
    // The figures are made of them: Tollgate's against the direct path of
    // the same round...
    let tollgate = scenario["rows"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["system"] == "tollgate"))
        .unwrap();
    assert!(
        tollgate["vs"]["p50_x_direct"]["median"]
            .as_f64()
            .is_some_and(|x| x > 0.0),
        "{tollgate}"
    );
    assert!(
        tollgate["vs"]["added_p50_ns"]["median"].is_number(),
        "{tollgate}"
    );
    // The scheduler's account: the agent's proxy threads ran for its calls
    // (at least once per call: each request is a read a thread waits for).
    let main = &tollgate["threads"]["tollgate-proxy"];
    assert!(
        main["runs_per_call"].as_f64().is_some_and(|r| r >= 1.0)
            && main["cpu_us_per_call"].as_f64().is_some_and(|us| us > 0.0),
        "{tollgate}"
    );
    // ...and a target against a system not measured says so instead of passing.
    let targets = results["compare"]["targets"].as_array().unwrap();
    let nginx = targets
        .iter()
        .find(|t| t["target"] == "rate_200: Tollgate added p50 ≤ 1.0 × nginx's")
        .unwrap();
    assert_eq!(nginx["verdict"], "n/a", "{nginx}");
}
