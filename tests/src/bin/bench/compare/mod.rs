//! What an LLM call costs through Tollgate, beside what it costs direct and
//! through what a user would run instead: nginx (interception without LLM
//! awareness), LiteLLM proxy (the usual gateway) and mitmproxy (the usual
//! interception tool). Every system serves the same client, in the same
//! pod, against the same mock provider, in the same run; each scenario runs
//! on every system before the next scenario starts, so drift hits all alike.
mod allocs;
mod judge;
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
pricing:
  models:
    - {match: "mock-*", input: 0.15, output: 0.60}
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
    // slow spell of this shared machine hits every system alike; each
    // comparison is made within a round, then summarised over rounds
    // (`judge`).
    let rounds = if quick { 1 } else { 5 };
    let mut measured = Vec::new();
    for sc in scenarios(quick).into_iter().filter(|sc| wanted(sc.key)) {
        let n = match sc.load {
            Load::Rate { .. } | Load::Stream { .. } | Load::Saturate { .. } => rounds,
            Load::Idle { .. } => 1,
        };
        let mut all_rounds = Vec::new();
        let mut profiled: Vec<(&str, String)> = Vec::new();
        for i in 0..n {
            let mut round = Vec::new();
            for s in &systems {
                let profile = (i == 0)
                    .then(|| measure::Profile::start(s.pid, s.name, sc.key))
                    .flatten();
                round.push(one(node, s, &sc.load));
                if let Some(p) = profile {
                    profiled.push((s.name, p.finish()));
                }
                // Let a backlog (an overloaded peer) drain before the next system.
                std::thread::sleep(Duration::from_millis(500));
            }
            all_rounds.push(round);
        }
        if !matches!(sc.load, Load::Idle { .. }) {
            if measure::Syscalls::wanted() {
                counted_round(node, &systems, &sc, Counted::Syscalls);
            }
            if allocs::Allocs::wanted() {
                counted_round(node, &systems, &sc, Counted::Allocations);
            }
        }
        let r = judge::Rounds {
            scenario: sc.key,
            rounds: all_rounds,
        };
        let rows: Vec<Value> = systems
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let own: Vec<Value> = r.rounds.iter().map(|round| round[i].clone()).collect();
                let mut row = crate::median(&own);
                row["rounds"] = n.into();
                row["vs"] = r.derived(s.name);
                row
            })
            .collect();
        print_table(&sc, &rows, &r);
        if rows
            .iter()
            .any(|row| row["system"] == "tollgate" && row["errors"].as_u64().unwrap_or(0) > 0)
        {
            // Say why, not only how many.
            for row in rows.iter().filter(|r| r["system"] == "tollgate") {
                if let Some(e) = row["first_error"].as_str() {
                    println!("Tollgate's first error: {e}");
                }
            }
        }
        for (system, p) in profiled {
            println!("profile of {system} during this scenario: {p}");
        }
        results
            .push(json!({"scenario": sc.key, "title": sc.title, "rows": rows, "rounds": r.rounds}));
        measured.push(r);
    }
    let verdicts = judge::judge(&measured);
    judge::print(&verdicts);
    if let Some(s) = measured
        .iter()
        .find(|r| r.scenario == "rate_200")
        .and_then(|r| {
            r.spread(|x| Some(x.added("tollgate", "/p50_ns")? - x.added("floor", "/p50_ns")?))
        })
    {
        println!(
            "\nWhat LLM awareness costs on top of interception (rate_200, Tollgate's added p50 minus the floor's): {}",
            judge::added(Some(s))
        );
    }
    json!({"systems": about, "unavailable": unavailable, "scenarios": results, "targets": verdicts})
}

/// What an extra round counts per call.
#[derive(Clone, Copy)]
enum Counted {
    /// System calls (`strace -c`, TOLLGATE_BENCH_SYSCALLS).
    Syscalls,
    /// Heap allocations (uprobes on the allocator, TOLLGATE_BENCH_ALLOCS).
    Allocations,
}

/// A running count of one system's process tree.
enum Counter {
    Syscalls(measure::Syscalls),
    Allocations(allocs::Allocs),
}

impl Counter {
    fn start(what: Counted, pid: u32, name: &str, scenario: &str) -> Option<Self> {
        match what {
            Counted::Syscalls => measure::Syscalls::start(pid, name, scenario).map(Self::Syscalls),
            Counted::Allocations => {
                allocs::Allocs::start(pid, name, scenario).map(Self::Allocations)
            }
        }
    }

    /// (events in all, the most frequent kinds with their counts).
    fn finish(self) -> Option<(u64, Vec<(String, u64)>)> {
        match self {
            Self::Syscalls(s) => s.finish(),
            Self::Allocations(a) => a.finish(),
        }
    }
}

/// One more round of `sc` with each system (but direct) under a counter
/// (`strace -c`, or uprobes on the allocator): counts per call, printed;
/// the round's own figures are not used (the counter slows what it counts).
fn counted_round(node: &TestNode, systems: &[&peers::System], sc: &Scenario, what: Counted) {
    let (title, how) = match what {
        Counted::Syscalls => ("system calls", "under strace -c"),
        Counted::Allocations => ("heap allocations", "with uprobes on the allocator"),
    };
    println!(
        "\n{title} per call ({}; an extra round {how}, figures unused)",
        sc.key
    );
    for s in systems.iter().filter(|s| s.name != "direct") {
        let Some(counter) = Counter::start(what, s.pid, s.name, sc.key) else {
            return;
        };
        let r = one(node, s, &sc.load);
        let calls = match sc.load {
            Load::Stream { count, .. } => count as u64,
            _ => r["count"].as_u64().unwrap_or(0),
        };
        match counter.finish() {
            Some((total, top)) if calls > 0 => {
                let top: Vec<String> = top
                    .iter()
                    .map(|(n, c)| format!("{n} {:.1}", *c as f64 / calls as f64))
                    .collect();
                println!(
                    "  {:<10} {:>6.1} per call ({calls} calls): {}",
                    s.name,
                    total as f64 / calls as f64,
                    top.join(", ")
                );
            }
            _ => println!("  {:<10} nothing counted", s.name),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
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
    let used = sampler.finish();
    let count = r["count"].as_u64().unwrap_or(0);
    r["system"] = s.name.into();
    r["peak_rss_mib"] = (used.peak_kib as f64 / 1024.0).into();
    if !matches!(load, Load::Idle { .. }) {
        // Per 1,000 calls (streams for the streaming scenario).
        let calls = if let Load::Stream { count, .. } = load {
            *count as u64
        } else {
            count
        };
        let per_call = |v: f64| v / calls.max(1) as f64;
        r["cpu_s_per_1000"] = per_call(used.cpu_us as f64 / 1000.0).into();
        // Wake-ups per call and CPU per wake-up: whether a system costs more
        // because it sleeps and wakes more often or does more each time.
        let (ns, runs) = used
            .sched
            .values()
            .fold((0, 0), |(n, r), (tn, tr)| (n + tn, r + tr));
        r["runs_per_call"] = per_call(runs as f64).into();
        if runs > 0 {
            r["cpu_us_per_run"] = (ns as f64 / 1e3 / runs as f64).into();
        }
        r["threads"] = used
            .sched
            .iter()
            .map(|(name, (ns, runs))| {
                let v = json!({
                    "runs_per_call": per_call(*runs as f64),
                    "cpu_us_per_call": per_call(*ns as f64 / 1e3),
                });
                (name.clone(), v)
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    r
}

fn print_table(sc: &Scenario, rows: &[Value], r: &judge::Rounds) {
    let rounds = r.rounds.len();
    if rounds > 1 {
        println!(
            "\n{} ({rounds} interleaved rounds: each system's median; ×/+ figures per round vs the same round's direct/nginx, median [range])\n",
            sc.title
        );
    } else {
        println!("\n{} (1 round: no interval)\n", sc.title);
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
    let stream = matches!(sc.load, Load::Stream { .. });
    println!(
        "{:<10} {:>7} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>24} {:>8} {:>6} {:>6} {:>8} {:>6} {:>8}",
        "system",
        "req/s",
        "p50",
        "p99",
        "max",
        "p50/dir",
        "p50/ngx",
        "p99/ngx",
        if stream {
            "+p50 per chunk"
        } else {
            "+p50 vs direct"
        },
        "CPU s/1k",
        "runs",
        "µs/run",
        "peak RSS",
        "errors",
        if stream { "TTFT" } else { "behind" },
    );
    for row in rows {
        let name = row["system"].as_str().unwrap_or("");
        let spread = |k: &str| {
            let v = &row["vs"][k];
            Some(judge::Spread {
                median: v["median"].as_f64()?,
                lo: v["lo"].as_f64()?,
                hi: v["hi"].as_f64()?,
                rounds: v["rounds"].as_u64()? as usize,
            })
        };
        let ns = |k: &str| row[k].as_f64().map_or("—".into(), judge::dur);
        let last = if stream {
            row["ttft"]["p50_ns"]
                .as_f64()
                .map_or("—".into(), judge::dur)
        } else {
            // How late the client's sends ran against the schedule (p99).
            row["behind_p99_ns"].as_f64().map_or("—".into(), judge::dur)
        };
        println!(
            "{:<10} {:>7} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>24} {:>8.3} {:>6.1} {:>6.0} {:>5.0}MiB {:>6} {:>8}{}",
            name,
            row["rps"]
                .as_f64()
                .map_or("—".into(), |v| format!("{v:.0}")),
            ns("p50_ns"),
            ns("p99_ns"),
            ns("max_ns"),
            judge::times(spread("p50_x_direct")),
            judge::times(spread("p50_x_nginx")),
            judge::times(spread("p99_x_nginx")),
            if name == "direct" {
                String::new()
            } else {
                judge::added(spread("added_p50_ns"))
            },
            row["cpu_s_per_1000"].as_f64().unwrap_or(0.0),
            row["runs_per_call"].as_f64().unwrap_or(0.0),
            row["cpu_us_per_run"].as_f64().unwrap_or(0.0),
            row["peak_rss_mib"].as_f64().unwrap_or(0.0),
            row["errors"].as_u64().unwrap_or(0),
            last,
            failure(row),
        );
    }
    if !stream {
        println!(
            "latency from each call's scheduled send (no coordinated omission); behind = how late the client sent, p99"
        );
    }
    let per = if stream { "stream" } else { "call" };
    println!(
        "runs = times the system's threads were put on a CPU per {per} (wake-ups and preemptions), µs/run = CPU per run (schedstat); per thread, runs / CPU µs per {per}:"
    );
    for row in rows.iter().filter(|r| r["system"] != "direct") {
        let Some(threads) = row["threads"].as_object() else {
            continue;
        };
        let mut threads: Vec<(&String, f64, f64)> = threads
            .iter()
            .map(|(name, t)| {
                let f = |k: &str| t[k].as_f64().unwrap_or(0.0);
                (name, f("runs_per_call"), f("cpu_us_per_call"))
            })
            .collect();
        threads.sort_by(|a, b| b.2.total_cmp(&a.2));
        let shown: Vec<String> = threads
            .iter()
            .take(5)
            .map(|(name, runs, us)| format!("{name} {runs:.1}/{us:.0}"))
            .collect();
        println!(
            "  {:<10} {}",
            row["system"].as_str().unwrap_or(""),
            shown.join(", ")
        );
    }
}

fn failure(r: &Value) -> String {
    r["failed"]
        .as_str()
        .map_or(String::new(), |f| format!("  FAILED: {f}"))
}
