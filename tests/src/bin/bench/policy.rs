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
}

/// A budget decision against this node's spend, and against Redis (one
/// MGET over a unix socket to a local redis-server), side by side.
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
        "budget reservation, shared through Redis (unix socket, 1 Lua call)",
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
