//! Budgets and limits for calls read at a TLS library. Such a call is not
//! the proxy's to refuse (it is relayed, encrypted), so it is counted after
//! the fact: its cost charged to its rule's budget, its request and tokens
//! to its rule's limits. When the budget is spent, or the call did not fit
//! the limits, the workload's cgroup goes on the kernel's `BLOCKED` list:
//! its next provider connects are refused (EPERM) and its open captured
//! connections are closed — until the budget resets, or for as long as the
//! limit says to wait.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{
    bpf::Maps,
    policy::{
        BudgetKey,
        gate::LimitStore,
        limits::{Estimate, LimitsConfig},
        spend::BudgetStore,
    },
    telemetry::metrics::Metrics,
};

/// How often a blocked workload's budget is looked at again.
const RECHECK: Duration = Duration::from_secs(5);

/// Why a workload is blocked, and so what lifts it.
enum Why {
    /// Its budget is spent: lifted when it has room again.
    Budget(BudgetKey),
    /// A call did not fit its limits: lifted at this time.
    Limit(std::time::Instant),
}

struct Blocked {
    why: Why,
    workload: String,
}

/// A rule's limits, as a call read at a TLS library counts against them.
pub struct LimitKey {
    pub rule: String,
    pub key: String,
    pub limits: LimitsConfig,
}

/// The budgets' side of TLS uprobes.
pub struct Spending {
    budgets: Arc<BudgetStore>,
    limits: Arc<LimitStore>,
    maps: Arc<Maps>,
    metrics: Arc<Metrics>,
    blocked: Mutex<HashMap<u64, Blocked>>,
    /// Captured connections open now: their cgroup, and how to close them.
    open: Mutex<HashMap<u64, (u64, CancellationToken)>>,
}

impl Spending {
    pub fn new(
        budgets: Arc<BudgetStore>,
        limits: Arc<LimitStore>,
        maps: Arc<Maps>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            budgets,
            limits,
            maps,
            metrics,
            blocked: Mutex::default(),
            open: Mutex::default(),
        });
        tokio::spawn(me.clone().recheck());
        me
    }

    /// Whether `cgroup`'s budget is spent.
    pub fn is_blocked(&self, cgroup: u64) -> bool {
        self.lock_blocked().contains_key(&cgroup)
    }

    /// A captured connection of `cgroup` opens: what closes it if the
    /// workload's budget is spent meanwhile.
    pub fn opened(&self, cookie: u64, cgroup: u64) -> CancellationToken {
        let token = CancellationToken::new();
        self.lock_open().insert(cookie, (cgroup, token.clone()));
        token
    }

    pub fn closed(&self, cookie: u64) {
        self.lock_open().remove(&cookie);
    }

    /// Charge call `id`'s cost `usd` to `key`; block `cgroup` if that
    /// leaves the budget spent.
    pub fn charge(
        self: &Arc<Self>,
        cgroup: u64,
        workload: String,
        key: BudgetKey,
        id: String,
        usd: f64,
    ) {
        let warn = crate::proxy::account::soft_warn(&self.metrics);
        self.budgets.charge(&key, &id, usd, warn);
        let me = self.clone();
        tokio::spawn(async move {
            if me.spent(&key, &id).await {
                tracing::warn!(workload = %workload, rule = %key.rule, key = %key.key,
                    "budget spent by calls read with TLS uprobes: this workload's provider connections are refused at connect() until it resets");
                me.block(cgroup, workload, Why::Budget(key));
            }
        });
    }

    /// Count one call of `input`/`output` tokens against `key`'s limits;
    /// block `cgroup` for as long as they say when it did not fit.
    pub fn count(
        self: &Arc<Self>,
        cgroup: u64,
        workload: String,
        key: LimitKey,
        input: u64,
        output: u64,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let est = Estimate {
                input_tokens: input,
                output_tokens: output,
            };
            match me.limits.admit(&key.rule, &key.key, &key.limits, est).await {
                Ok(hold) => hold.settle(input, output),
                Err(limited) => {
                    tracing::warn!(workload = %workload, rule = %key.rule, key = %key.key,
                        limit = limited.which, retry_after_ms = limited.retry_after.as_millis() as u64,
                        "a call read with TLS uprobes went over its rule's limit: this workload's provider connections are refused at connect() for as long as the limit says to wait");
                    let until = std::time::Instant::now() + limited.retry_after;
                    me.block(cgroup, workload, Why::Limit(until));
                }
            }
        });
    }

    /// Whether `key`'s budget refuses another call (by the cluster's spend
    /// when shared): a reservation of nothing, given back at once.
    async fn spent(&self, key: &BudgetKey, id: &str) -> bool {
        let now = time::OffsetDateTime::now_utc();
        match self
            .budgets
            .reserve(key, &format!("{id}-check"), 0.0, now)
            .await
        {
            Ok(hold) => {
                hold.settle(Some(0.0), Box::new(|_, _| {}));
                false
            }
            Err(_) => true,
        }
    }

    fn block(&self, cgroup: u64, workload: String, why: Why) {
        self.lock_blocked()
            .insert(cgroup, Blocked { why, workload });
        self.sync();
        let closing: Vec<CancellationToken> = self
            .lock_open()
            .values()
            .filter(|(c, _)| *c == cgroup)
            .map(|(_, t)| t.clone())
            .collect();
        for t in closing {
            t.cancel();
        }
    }

    fn sync(&self) {
        let set: HashSet<u64> = self.lock_blocked().keys().copied().collect();
        if let Err(e) = self.maps.sync_blocked(&set) {
            tracing::error!(error = %e, "could not write the blocked workloads to the kernel");
        }
    }

    /// Unblock workloads whose budget has room again (a new day or month)
    /// or whose limit's wait is over.
    async fn recheck(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RECHECK);
        loop {
            tick.tick().await;
            let now = std::time::Instant::now();
            let blocked: Vec<(u64, Option<BudgetKey>, bool)> = self
                .lock_blocked()
                .iter()
                .map(|(c, b)| match &b.why {
                    Why::Budget(k) => (*c, Some(k.clone()), false),
                    Why::Limit(until) => (*c, None, now >= *until),
                })
                .collect();
            let mut freed = false;
            for (cgroup, budget, waited) in blocked {
                let lifted = match budget {
                    Some(key) => !self.spent(&key, "recheck").await,
                    None => waited,
                };
                if !lifted {
                    continue;
                }
                if let Some(b) = self.lock_blocked().remove(&cgroup) {
                    tracing::info!(workload = %b.workload,
                        "budget or limit has room again: this workload's provider connections are allowed");
                }
                freed = true;
            }
            if freed {
                self.sync();
            }
        }
    }

    fn lock_blocked(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Blocked>> {
        self.blocked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (u64, CancellationToken)>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}
