//! Policy decisions with many rules and many workloads: the per-call cost
//! of `Policy::request`, beside a baseline of one hash-map lookup per call
//! (what any per-workload table costs). No privileges, no node needed.
use std::{collections::HashMap, hint::black_box, time::Instant};

use tollgate_agent::{
    identity::Workload,
    pods::{Owner, PodMeta},
    policy::{Policy, PolicyConfig, Subject},
};

fn uid(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-000000000000")
}

pub fn run(quick: bool) {
    let (rules, workloads) = (1_000, 10_000);
    let calls = if quick { 50_000 } else { 500_000 };
    // A realistic mix: half the rules name pods, some namespaces, owner
    // workloads with labels, cgroup globs and processes; every fourth
    // limits models.
    let mut yaml = String::from("default: allow\nrules:\n");
    for i in 0..rules {
        let sel = match i % 10 {
            0..=4 => format!("{{pod_uids: [\"{}\"]}}", uid(i * 7 % workloads)),
            5 => format!("{{namespaces: [\"team-{}\"]}}", i % 60),
            6 => format!(
                "{{workloads: [\"Deployment/app{}*\"], labels: {{tier: \"gold\"}}}}",
                i % 500
            ),
            7 | 8 => format!("{{cgroups: [\"**/*team{}*/**\"]}}", i % 50),
            _ => format!("{{processes: [\"worker-{i}*\"]}}"),
        };
        let models = if i % 4 == 0 {
            ", models: [\"gpt-4o*\", \"o3*\"]"
        } else {
            ""
        };
        let action = if i % 3 == 0 { "deny" } else { "allow" };
        yaml += &format!("  - {{name: r{i}, match: {sel}{models}, action: {action}}}\n");
    }
    let cfg: PolicyConfig = serde_yaml::from_str(&yaml).expect("bench policy parses");
    let policy = Policy::new(&cfg, &["openai".into(), "anthropic".into()]).expect("valid");
    let ws: Vec<Workload> = (0..workloads)
        .map(|i| Workload {
            cgroup: format!(
                "/kubepods.slice/kubepods-team{}.slice/kubepods-pod{}.slice/cri-containerd-{i:064x}.scope",
                i % 60,
                uid(i).replace('-', "_")
            ),
            pod_uid: Some(uid(i)),
            kubernetes: Some(std::sync::Arc::new(PodMeta {
                namespace: format!("team-{}", i % 60),
                name: format!("app{}-{i}", i % 500),
                uid: uid(i),
                workload: Owner {
                    kind: "Deployment".into(),
                    name: format!("app{}", i % 500),
                },
                service_account: "default".into(),
                node: "bench".into(),
                labels: [(
                    "tier".to_string(),
                    if i % 2 == 0 { "gold" } else { "silver" }.to_string(),
                )]
                .into(),
                serial: i as u64 + 1,
            })),
            ..Default::default()
        })
        .collect();
    let models = ["gpt-4o-mini", "gpt-4o", "o3-mini", "claude-sonnet-4-5"];
    let table: HashMap<String, usize> = ws
        .iter()
        .enumerate()
        .map(|(i, w)| (w.cgroup.clone(), i))
        .collect();

    // First decision per workload: selectors matched against all rules.
    let mut cold = Vec::with_capacity(workloads);
    for w in &ws {
        let t = Instant::now();
        black_box(policy.request(
            Subject {
                workload: w,
                comm: "python3",
            },
            "openai",
            tollgate_agent::providers::Operation::Chat,
            Some("gpt-4o"),
        ));
        cold.push(t.elapsed().as_nanos() as u64);
    }
    // Steady state: random workloads, models and providers.
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut warm, mut base) = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    for _ in 0..calls {
        let r = next();
        let w = &ws[(r % workloads as u64) as usize];
        let model = models[(r >> 32) as usize % models.len()];
        let provider = if r & 1 == 0 { "openai" } else { "anthropic" };
        let t = Instant::now();
        black_box(table.get(black_box(&w.cgroup)));
        base.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        black_box(policy.request(
            Subject {
                workload: w,
                comm: "python3",
            },
            provider,
            tollgate_agent::providers::Operation::Chat,
            Some(model),
        ));
        warm.push(t.elapsed().as_nanos() as u64);
    }
    println!(
        "\nPolicy decisions, {rules} rules, {workloads} workloads ({} mode)\n",
        if quick { "quick" } else { "full" }
    );
    println!(
        "{:<58} {:>9} {:>9} {:>9}  target",
        "", "calls", "p50", "p99"
    );
    row(
        "baseline: one hash-map lookup of the workload",
        &mut base,
        "",
    );
    row("decision (workload seen before)", &mut warm, "  ≤ 5 µs p99");
    row(
        "first decision of a workload (selectors against all rules)",
        &mut cold,
        "",
    );
    budget_checks(quick);
    journal_cost(quick);
}

/// The call journal's cost per call: its begin line (serialised and
/// written) and its end line, against the same entry only serialised; and
/// what 1,000 calls add to the file before it is compacted.
fn journal_cost(quick: bool) {
    use tollgate_agent::journal::Journal;
    /// The journal's begin line, as it serialises it.
    #[derive(serde::Serialize)]
    struct Line<'a> {
        b: &'a str,
        v: &'a serde_json::Value,
    }
    let n = if quick { 5_000 } else { 50_000 };
    // An entry the size of a real one: a request record as of admission.
    let entry = serde_json::json!({
        "record": {"time": "2026-11-25T18:43:58.577Z", "kind": "request", "id": "01a21405-8ff1-709c-8da5-950770f6b5d8",
            "decision": "allow", "reason": "rule:team-a", "workload": {"cgroup": "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_4e5f_6a7b_8c9d_0e1f2a3b4c5d.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
            "container_id": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "pod_uid": "0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d",
            "kubernetes": {"namespace": "team-a", "pod": "chat-7f9c6d5b8-x2k4q", "workload": "Deployment/chat"}},
            "pid": 18689, "comm": "python", "provider": "openai", "host": "api.openai.com", "method": "POST",
            "path": "/v1/chat/completions", "operation": "chat", "model": "gpt-4o-mini", "stream": true,
            "usage": {"input_tokens": 0, "output_tokens": 0, "cached_input_tokens": 0, "reasoning_tokens": 0, "estimated": false},
            "client_http": "HTTP/1.1", "upstream": "162.159.140.245:443", "status": 0, "request_bytes": 128},
        "model": "gpt-4o-mini", "input_tokens": 12,
        "budget": {"rule": "rule:team-a", "key": "team-a/Deployment/chat", "config": {"per": "workload", "daily_usd": 50.0, "soft_percent": 80.0}}
    });
    let dir = std::env::current_exe()
        .unwrap()
        .with_file_name(format!("bench-journal-{}", std::process::id()));
    let (journal, _) = Journal::open(&dir.join("calls.journal")).expect("open the bench journal");
    let ids: Vec<String> = (0..n)
        .map(|i| format!("01a21405-8ff1-709c-8da5-{i:012}"))
        .collect();
    let (mut base, mut with) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let size_before = journal.size();
    let mut per_1000 = 0;
    for (i, id) in ids.iter().enumerate() {
        // Interleaved: the baseline and the journal take turns.
        let t = Instant::now();
        black_box(serde_json::to_vec(&Line { b: id, v: &entry }).unwrap());
        base.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        journal.begin(id, &entry);
        journal.end(id);
        with.push(t.elapsed().as_nanos() as u64);
        if i == 999 {
            per_1000 = journal.size().saturating_sub(size_before);
        }
    }
    row(
        "baseline: a call's journal entry serialised only",
        &mut base,
        "",
    );
    row(
        "call journal: begin + end written (fsync batched)",
        &mut with,
        &format!(
            "  {:.0} KiB per 1,000 calls before compaction",
            per_1000 as f64 / 1024.0
        ),
    );
    drop(journal);
    let _ = std::fs::remove_dir_all(dir);
}

/// A budget reservation against this node's spend, and against Redis (one
/// Lua script over a unix socket to a local redis-server), side by side.
fn budget_checks(quick: bool) {
    use tollgate_agent::policy::{
        budgets::{BudgetConfig, BudgetKey, Budgets},
        limits::LimitKey,
        shared::{Backend, SharedBudgets, SharedLimits, StateConfig},
        spend::BudgetStore,
    };
    let n = if quick { 2_000 } else { 20_000 };
    let redis = tollgate_tests::redis::RedisServer::start("bench");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = BudgetKey {
        rule: "rule:bench".into(),
        key: "w".into(),
        config: BudgetConfig {
            per: LimitKey::Workload,
            daily_usd: Some(1e9),
            monthly_usd: None,
            soft_percent: 80.0,
        },
    };
    let errors = prometheus::IntCounter::new("e", "e").unwrap();
    let counter = errors.clone();
    let local = std::sync::Arc::new(BudgetStore::new(Budgets::default(), None, errors.clone()));
    let shared = std::sync::Arc::new(BudgetStore::new(
        Budgets::default(),
        Some(
            SharedBudgets::new(&StateConfig {
                backend: Backend::Redis,
                redis_url: redis.url(),
                timeout: std::time::Duration::from_secs(1),
            })
            .unwrap(),
        ),
        errors.clone(),
    ));
    let time = |store: &std::sync::Arc<BudgetStore>| {
        rt.block_on(async {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                let now = time::OffsetDateTime::now_utc();
                let id = format!("call-{i}");
                let t = Instant::now();
                let hold = store.reserve(&key, &id, 1e-4, now).await;
                v.push(t.elapsed().as_nanos() as u64);
                // Settled (off the timed path, as after a call).
                drop(black_box(hold));
            }
            v.sort_unstable();
            v
        })
    };
    time(&shared); // connect and warm
    let (mut l, mut r) = (time(&local), time(&shared));
    row("budget reservation, this node's spend", &mut l, "");
    let errors = match errors.get() {
        0 => String::new(),
        n => format!("  ({n} Redis errors)"),
    };
    row(
        "budget reservation, shared through Redis (1 Lua call)",
        &mut r,
        &errors,
    );

    // Rate-limit admission: this node's buckets vs the Lua script in Redis.
    use tollgate_agent::policy::{
        gate::LimitStore,
        limits::{Estimate, LimitsConfig},
    };
    let limits = LimitsConfig {
        requests_per_minute: Some(u64::MAX / 4),
        ..Default::default()
    };
    let state = StateConfig {
        backend: Backend::Redis,
        redis_url: redis.url(),
        timeout: std::time::Duration::from_secs(1),
    };
    let stores = [
        LimitStore::new(None, counter.clone()),
        LimitStore::new(Some(SharedLimits::new(&state).unwrap()), counter.clone()),
    ];
    let mut rows: Vec<Vec<u64>> = stores
        .iter()
        .map(|store| {
            rt.block_on(async {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    let hold = store
                        .admit("rule:bench", "w", &limits, Estimate::default())
                        .await;
                    v.push(t.elapsed().as_nanos() as u64);
                    black_box(hold.is_ok());
                }
                v
            })
        })
        .collect();
    row(
        "rate-limit admission, this node's buckets",
        &mut rows[0],
        "",
    );
    row(
        "rate-limit admission, shared through Redis (1 Lua call)",
        &mut rows[1],
        "",
    );
}

/// One table row: name, count, p50 and p99 in µs, and a suffix (target, errors).
fn row(name: &str, v: &mut [u64], suffix: &str) {
    v.sort_unstable();
    let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0;
    println!(
        "{name:<58} {:>9} {:>7.2}µs {:>7.2}µs{suffix}",
        v.len(),
        pct(0.5),
        pct(0.99)
    );
}
