//! What an LLM call costs through Tollgate, beside what it costs direct and
//! through what a user would run instead: nginx (interception without LLM
//! awareness), LiteLLM proxy (the usual gateway) and mitmproxy (the usual
//! interception tool). Every system serves the same client, in the same
//! pod, against the same mock provider, in the same run; each scenario runs
//! on every system before the next scenario starts, so drift hits all alike.
mod measure;
mod peers;

use std::{path::Path, time::Duration};

use serde_json::{Value, json};
use tollgate_tests::TestNode;

pub use peers::peers_dir;

/// The rule set Tollgate decides with (the bench pod matches the last rule:
/// limits and a budget, so counting runs on every call).
pub const BENCH_RULES: usize = 8;
pub const BENCH_POLICY: &str = r#"
policy:
  default: allow
  rules:
    - {name: no-anthropic-batch, match: {namespaces: [batch]}, providers: [anthropic], action: deny}
    - {name: frontier-research-only, match: {namespaces: [prod, staging]}, models: ["o3*", "gpt-5*"], action: deny, message: frontier models are for research}
    - {name: legacy-no-ca, match: {units: ["legacy-*.service"]}, action: observe}
    - {name: nightly, match: {workloads: ["CronJob/nightly-*"], service_accounts: [batch-runner]}, action: allow, max_output_tokens: 512}
    - {name: ml-team, match: {labels: {team: ml}}, action: allow, model_aliases: {fast: gpt-4o-mini}}
    - {name: sandboxes, match: {namespaces: ["sandbox-*"]}, action: deny}
    - {name: python-tools, match: {processes: ["python*"]}, models: ["*-preview"], action: deny}
    - name: openai-default
      providers: [openai]
      action: allow
      max_request_bytes: 200000
      headers: {remove: [openai-organization]}
      limits: {per: workload, requests_per_minute: 10000000, input_tokens_per_minute: 1000000000, output_tokens_per_minute: 1000000000, concurrent_requests: 5000}
      budget: {per: global, daily_usd: 1000000, monthly_usd: 10000000, soft_percent: 80}
"#;

/// One load shape.
enum Load {
    /// Open loop at a fixed rate for some seconds; `fresh`: a new TCP+TLS
    /// connection per request.
    Rate { rps: u32, secs: u32, fresh: bool },
    /// Closed loop with wrk: connections, seconds.
    Saturate { conns: u32, secs: u32 },
    /// Streams (count, at a time, mock model naming pieces and pace).
    Stream {
        count: u32,
        concurrent: u32,
        model: String,
    },
    /// Idle kept-alive connections held open.
    Idle { conns: usize },
}

struct Scenario {
    key: &'static str,
    title: String,
    load: Load,
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let s = |full: u32, q: u32| if quick { q } else { full };
    let chunk_ms: u32 = std::env::var("TOLLGATE_BENCH_CHUNK_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let (streams, idle) = (s(100, 50), if quick { 200 } else { 1000 });
    vec![
        Scenario {
            key: "rate_200",
            title: "chat JSON (1 KiB in, 2 KiB out), keep-alive, 200 req/s open loop".into(),
            load: Load::Rate {
                rps: 200,
                secs: s(5, 2),
                fresh: false,
            },
        },
        Scenario {
            key: "rate_1000",
            title: "same, 1000 req/s open loop".into(),
            load: Load::Rate {
                rps: 1000,
                secs: s(5, 2),
                fresh: false,
            },
        },
        Scenario {
            key: "saturation",
            title: "same, saturation: wrk closed loop, 32 connections".into(),
            load: Load::Saturate {
                conns: 32,
                secs: s(8, 3),
            },
        },
        Scenario {
            key: "fresh_tls",
            title: "same, new TCP + TLS connection per request, 100 req/s".into(),
            load: Load::Rate {
                rps: 100,
                secs: s(4, 2),
                fresh: true,
            },
        },
        Scenario {
            key: "streaming",
            title: format!(
                "streaming: {streams} streams, 50 at a time, 200 chunks {chunk_ms} ms apart; latency = per-chunk delay, CPU per 1,000 streams"
            ),
            load: Load::Stream {
                count: streams,
                concurrent: 50,
                model: format!("mock-timed-200x{chunk_ms}"),
            },
        },
        Scenario {
            key: "idle",
            title: format!("{idle} idle keep-alive TLS connections: memory"),
            load: Load::Idle { conns: idle },
        },
    ]
}

/// Run every scenario on every system; print the tables and targets;
/// return the results for results.json.
pub fn run(node: &TestNode, ungoverned: &Path, quick: bool) -> Value {
    let systems = peers::all(node, ungoverned);
    println!("\nSystems (same pod, same client, same mock provider, same run):");
    let mut unavailable = serde_json::Map::new();
    let mut about = serde_json::Map::new();
    for s in &systems {
        match s {
            Ok(s) => {
                println!("  {:<10} {}", s.name, s.about);
                about.insert(s.name.into(), s.about.clone().into());
            }
            Err((name, why)) => {
                println!("  {name:<10} NOT MEASURED: {why}");
                unavailable.insert((*name).into(), why.clone().into());
            }
        }
    }
    let systems: Vec<&peers::System> = systems.iter().filter_map(|s| s.as_ref().ok()).collect();
    // Warm every path (TLS sessions, pools, Python imports on first call).
    for s in &systems {
        measure::client(node, s, &["rate", "20", "1", "keepalive"]);
    }
    let mut results = Vec::new();
    // TOLLGATE_BENCH_SCENARIOS=rate_200,streaming,…: only these.
    let only = std::env::var("TOLLGATE_BENCH_SCENARIOS").ok();
    let wanted = |key: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|k| k.trim() == key))
    };
    // Latency rows: several rounds, systems interleaved within each, so a
    // slow spell of this shared machine hits every system alike; the
    // per-field median is kept.
    let rounds = if quick { 1 } else { 3 };
    for sc in scenarios(quick).into_iter().filter(|sc| wanted(sc.key)) {
        let n = match sc.load {
            Load::Rate { .. } | Load::Stream { .. } | Load::Saturate { .. } => rounds,
            Load::Idle { .. } => 1,
        };
        let mut per_system = vec![Vec::new(); systems.len()];
        let mut profiled = None;
        for _ in 0..n {
            for (i, s) in systems.iter().enumerate() {
                let profile = (s.name == "tollgate" && profiled.is_none())
                    .then(|| measure::Profile::start(s.pid, sc.key));
                per_system[i].push(one(node, s, &sc.load));
                if let Some(p) = profile.flatten() {
                    profiled = Some(p.finish());
                }
                // Let a backlog (an overloaded peer) drain before the next system.
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        let mut rows: Vec<Value> = per_system.iter().map(|r| crate::median(r)).collect();
        for r in &mut rows {
            r["rounds"] = n.into();
        }
        added_vs_direct(&mut rows);
        print_table(&sc, &rows);
        if let Some(p) = profiled {
            println!("profile of Tollgate during this scenario: {p}");
        }
        results.push(json!({"scenario": sc.key, "title": sc.title, "rows": rows}));
    }
    let targets = targets(&results);
    json!({"systems": about, "unavailable": unavailable, "scenarios": results, "targets": targets})
}

/// One scenario on one system, with its CPU and peak memory.
fn one(node: &TestNode, s: &peers::System, load: &Load) -> Value {
    let sampler = measure::Sampler::start(s.pid);
    let mut r = match load {
        Load::Rate { rps, secs, fresh } => measure::client(
            node,
            s,
            &[
                "rate",
                &rps.to_string(),
                &secs.to_string(),
                if *fresh { "fresh" } else { "keepalive" },
            ],
        ),
        Load::Saturate { conns, secs } => measure::wrk(node, s, *conns, *secs),
        Load::Stream {
            count,
            concurrent,
            model,
        } => measure::client(
            node,
            s,
            &["stream", &count.to_string(), &concurrent.to_string(), model],
        ),
        Load::Idle { conns } => measure::idle(node, s, *conns),
    };
    let (cpu_us, peak_kib) = sampler.finish();
    let count = r["count"].as_u64().unwrap_or(0);
    r["system"] = s.name.into();
    r["peak_rss_mib"] = (peak_kib as f64 / 1024.0).into();
    if !matches!(load, Load::Idle { .. }) {
        // Per 1,000 calls (streams for the streaming scenario).
        let calls = if let Load::Stream { count, .. } = load {
            *count as u64
        } else {
            count
        };
        r["cpu_s_per_1000"] = (cpu_us as f64 / 1000.0 / calls.max(1) as f64).into();
    }
    r
}

/// Each row's added p50/p99 against the direct row of the same scenario.
fn added_vs_direct(rows: &mut [Value]) {
    let Some(direct) = rows.iter().find(|r| r["system"] == "direct").cloned() else {
        return;
    };
    for r in rows.iter_mut() {
        for k in ["p50", "p99"] {
            let (Some(t), Some(d)) = (
                r[format!("{k}_ns")].as_i64(),
                direct[format!("{k}_ns")].as_i64(),
            ) else {
                continue;
            };
            r[format!("added_{k}_us")] = ((t - d) as f64 / 1000.0).into();
        }
    }
}

fn ms(v: &Value) -> String {
    match v.as_f64() {
        Some(ns) if ns >= 10_000_000.0 => format!("{:.0}ms", ns / 1e6),
        Some(ns) if ns >= 1_000_000.0 => format!("{:.1}ms", ns / 1e6),
        Some(ns) => format!("{:.0}µs", ns / 1e3),
        None => "—".into(),
    }
}

fn print_table(sc: &Scenario, rows: &[Value]) {
    let rounds = rows.first().and_then(|r| r["rounds"].as_u64()).unwrap_or(1);
    if rounds > 1 {
        println!("\n{} (median of {rounds} interleaved rounds)\n", sc.title);
    } else {
        println!("\n{}\n", sc.title);
    }
    if let Load::Idle { .. } = sc.load {
        println!(
            "{:<10} {:>7} {:>12} {:>12} {:>10}",
            "system", "held", "RSS idle", "RSS held", "per conn"
        );
        for r in rows {
            let kib = |k: &str| r[k].as_f64().unwrap_or(0.0);
            println!(
                "{:<10} {:>7} {:>9.1}MiB {:>9.1}MiB {:>7.1}KiB{}",
                r["system"].as_str().unwrap_or(""),
                r["count"],
                kib("rss_before_kib") / 1024.0,
                kib("rss_held_kib") / 1024.0,
                kib("kib_per_conn"),
                failure(r),
            );
        }
        return;
    }
    println!(
        "{:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6}",
        "system",
        "req/s",
        "p50",
        "p90",
        "p99",
        "max",
        "+p50",
        "+p99",
        "CPU s/1k",
        "peak RSS",
        "errors"
    );
    for r in rows {
        let added = |k: &str| {
            r[k].as_f64()
                .map_or("—".into(), |us| ms(&json!(us * 1000.0)))
        };
        println!(
            "{:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9.3} {:>6.0}MiB {:>6}{}",
            r["system"].as_str().unwrap_or(""),
            r["rps"].as_f64().map_or("—".into(), |v| format!("{v:.0}")),
            ms(&r["p50_ns"]),
            ms(&r["p90_ns"]),
            ms(&r["p99_ns"]),
            ms(&r["max_ns"]),
            added("added_p50_us"),
            added("added_p99_us"),
            r["cpu_s_per_1000"].as_f64().unwrap_or(0.0),
            r["peak_rss_mib"].as_f64().unwrap_or(0.0),
            r["errors"].as_u64().unwrap_or(0),
            failure(r),
        );
    }
    if let Load::Stream { .. } = sc.load {
        let ttft: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{} {}",
                    r["system"].as_str().unwrap_or(""),
                    ms(&r["ttft"]["p50_ns"])
                )
            })
            .collect();
        println!("time to first token, p50: {}", ttft.join(", "));
    }
}

fn failure(r: &Value) -> String {
    r["failed"]
        .as_str()
        .map_or(String::new(), |f| format!("  FAILED: {f}"))
}

/// A target: Tollgate's `key` in `scenario` against `factor` × the peer's
/// (or `factor` itself when there is no peer).
struct Target {
    scenario: &'static str,
    key: &'static str,
    peer: Option<&'static str>,
    factor: f64,
    at_most: bool,
    unit: &'static str,
    text: &'static str,
}

const TARGETS: &[Target] = &[
    Target {
        scenario: "rate_200",
        key: "added_p50_us",
        peer: Some("nginx"),
        factor: 1.3,
        at_most: true,
        unit: "µs",
        text: "Tollgate added p50 ≤ 1.3 × nginx added p50",
    },
    Target {
        scenario: "rate_1000",
        key: "added_p50_us",
        peer: Some("nginx"),
        factor: 1.3,
        at_most: true,
        unit: "µs",
        text: "Tollgate added p50 ≤ 1.3 × nginx added p50",
    },
    Target {
        scenario: "saturation",
        key: "rps",
        peer: Some("nginx"),
        factor: 0.7,
        at_most: false,
        unit: "req/s",
        text: "Tollgate throughput ≥ 0.7 × nginx",
    },
    Target {
        scenario: "saturation",
        key: "rps",
        peer: Some("litellm"),
        factor: 10.0,
        at_most: false,
        unit: "req/s",
        text: "Tollgate throughput ≥ 10 × LiteLLM",
    },
    Target {
        scenario: "rate_200",
        key: "added_p99_us",
        peer: Some("litellm"),
        factor: 0.1,
        at_most: true,
        unit: "µs",
        text: "Tollgate added p99 ≤ 1/10 of LiteLLM added p99",
    },
    Target {
        scenario: "streaming",
        key: "added_p50_us",
        peer: None,
        factor: 50.0,
        at_most: true,
        unit: "µs",
        text: "Tollgate per-chunk delay added ≤ 50 µs p50",
    },
];

/// The issue's targets, each with its measured value and whether it is met.
fn targets(results: &[Value]) -> Vec<Value> {
    let get = |scenario: &str, system: &str, key: &str| -> Option<f64> {
        results.iter().find(|s| s["scenario"] == scenario)?["rows"]
            .as_array()?
            .iter()
            .find(|r| r["system"] == system)?[key]
            .as_f64()
    };
    let mut out = Vec::new();
    for t in TARGETS {
        let value = get(t.scenario, "tollgate", t.key);
        let limit = match t.peer {
            Some(peer) => get(t.scenario, peer, t.key).map(|v| v * t.factor),
            None => Some(t.factor),
        };
        let name = format!("{}: {}", t.scenario, t.text);
        let (Some(v), Some(l)) = (value, limit) else {
            out.push(json!({"target": name, "met": null, "why": "a system or number is missing"}));
            continue;
        };
        let met = if t.at_most { v <= l } else { v >= l };
        out.push(json!({"target": name, "value": v, "limit": l, "met": met, "unit": t.unit}));
    }
    println!("\nTargets (printed, not asserted)\n");
    for t in &out {
        let name = t["target"].as_str().unwrap_or("");
        match (t["met"].as_bool(), t["value"].as_f64(), t["limit"].as_f64()) {
            (Some(true), Some(v), Some(l)) => {
                println!(
                    "  met     {name}: {v:.0} vs {l:.0} {}",
                    t["unit"].as_str().unwrap_or("")
                )
            }
            (Some(false), Some(v), Some(l)) => println!(
                "  MISSED  {name}: {v:.0} vs {l:.0} {} (by {:.0}%)",
                t["unit"].as_str().unwrap_or(""),
                ((v - l) / l.abs().max(1e-9) * 100.0).abs()
            ),
            _ => println!("  n/a     {name}: {}", t["why"].as_str().unwrap_or("")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(system: &str, p50_us: i64, p99_us: i64, rps: f64) -> Value {
        json!({"system": system, "p50_ns": p50_us * 1000, "p99_ns": p99_us * 1000, "rps": rps})
    }

    #[test]
    fn added_latency_is_relative_to_the_direct_row() {
        let mut rows = vec![row("direct", 300, 900, 0.0), row("nginx", 550, 1400, 0.0)];
        added_vs_direct(&mut rows);
        assert_eq!(rows[0]["added_p50_us"], 0.0);
        assert_eq!(rows[1]["added_p50_us"], 250.0);
        assert_eq!(rows[1]["added_p99_us"], 500.0);
    }

    #[test]
    fn targets_say_met_missed_or_why_not() {
        let scenario = |key: &str, rows: Vec<Value>| {
            let mut rows = rows;
            added_vs_direct(&mut rows);
            json!({"scenario": key, "rows": rows})
        };
        let results = vec![
            scenario(
                "rate_200",
                vec![
                    row("direct", 300, 900, 200.0),
                    row("tollgate", 700, 1500, 200.0),
                    row("nginx", 500, 1900, 200.0),
                ],
            ),
            scenario(
                "saturation",
                vec![
                    row("direct", 1, 1, 9000.0),
                    row("tollgate", 1, 1, 6000.0),
                    row("nginx", 1, 1, 7000.0),
                ],
            ),
        ];
        let t = targets(&results);
        let get = |prefix: &str| {
            t.iter()
                .find(|t| t["target"].as_str().unwrap().starts_with(prefix))
                .unwrap()
        };
        // Tollgate adds 400 µs, nginx 200 µs: 400 > 1.3 × 200.
        let p50 = get("rate_200: Tollgate added p50");
        assert_eq!(p50["met"], false);
        assert_eq!(p50["limit"], 260.0);
        // 6000 ≥ 0.7 × 7000.
        assert_eq!(get("saturation: Tollgate throughput ≥ 0.7")["met"], true);
        // No LiteLLM row: not judged, and said so.
        let litellm = get("saturation: Tollgate throughput ≥ 10");
        assert!(litellm["met"].is_null() && litellm["why"].is_string());
    }
}
