//! Budgets for calls read at a TLS library. Such a call is not the proxy's
//! to refuse (it is relayed, encrypted), so it is charged after the fact;
//! when its budget is spent, the workload's cgroup goes on the kernel's
//! `BLOCKED` list: its next provider connects are refused (EPERM) and its
//! open captured connections are closed, until the budget resets.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{
    bpf::Maps,
    policy::{BudgetKey, spend::BudgetStore},
    telemetry::metrics::Metrics,
};

/// How often a blocked workload's budget is looked at again.
const RECHECK: Duration = Duration::from_secs(5);

struct Blocked {
    key: BudgetKey,
    workload: String,
}

/// The budgets' side of TLS uprobes.
pub struct Spending {
    budgets: Arc<BudgetStore>,
    maps: Arc<Maps>,
    metrics: Arc<Metrics>,
    blocked: Mutex<HashMap<u64, Blocked>>,
    /// Captured connections open now: their cgroup, and how to close them.
    open: Mutex<HashMap<u64, (u64, CancellationToken)>>,
}

impl Spending {
    pub fn new(budgets: Arc<BudgetStore>, maps: Arc<Maps>, metrics: Arc<Metrics>) -> Arc<Self> {
        let me = Arc::new(Self {
            budgets,
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
                me.block(cgroup, workload, key);
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

    fn block(&self, cgroup: u64, workload: String, key: BudgetKey) {
        tracing::warn!(workload = %workload, rule = %key.rule, key = %key.key,
            "budget spent by calls read with TLS uprobes: this workload's provider connections are refused at connect() until it resets");
        self.lock_blocked()
            .insert(cgroup, Blocked { key, workload });
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

    /// Unblock workloads whose budget reset (a new day or month, a raised
    /// limit, a rule gone).
    async fn recheck(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RECHECK);
        loop {
            tick.tick().await;
            let blocked: Vec<(u64, BudgetKey)> = self
                .lock_blocked()
                .iter()
                .map(|(c, b)| (*c, b.key.clone()))
                .collect();
            let mut freed = false;
            for (cgroup, key) in blocked {
                if !self.spent(&key, "recheck").await {
                    if let Some(b) = self.lock_blocked().remove(&cgroup) {
                        tracing::info!(workload = %b.workload, rule = %b.key.rule,
                            "budget available again: this workload's provider connections are allowed");
                    }
                    freed = true;
                }
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
