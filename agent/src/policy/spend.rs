//! Where budget spend is kept: on this node (`Budgets`), and, with
//! `state.backend: redis`, also in Redis for the whole cluster — decisions
//! then read the cluster's totals and reservations, and fall back to this
//! node's own when Redis does not answer in time.
use std::sync::Arc;

use prometheus::IntCounter;
use time::OffsetDateTime;

use super::{
    budgets::{BudgetKey, Budgets, Exhausted, SoftCrossed},
    shared::SharedBudgets,
};

pub struct BudgetStore {
    pub local: Budgets,
    shared: Option<Arc<SharedBudgets>>,
    /// Redis failures (each fell back to local spend).
    errors: IntCounter,
}

/// What reports a soft limit crossed (a log line and a counter).
pub type SoftWarn = Box<dyn Fn(&BudgetKey, SoftCrossed) + Send + Sync>;

/// A call's reservation on its budget: settled on the call's real cost
/// when it ends (`settle`); given back if the call is dropped before it
/// was sent.
pub struct BudgetHold {
    store: Arc<BudgetStore>,
    pub key: BudgetKey,
    /// The call's id (the Redis reservation's name).
    id: String,
    /// Worst-case cost reserved.
    pub reserved_usd: f64,
    settled: bool,
}

impl BudgetHold {
    /// Replace the reservation by `cost` (None: the call could not be
    /// priced after all — the reservation is charged, erring toward the
    /// budget).
    pub fn settle(mut self, cost: Option<f64>, warn: SoftWarn) {
        self.settled = true;
        let usd = cost.unwrap_or(self.reserved_usd);
        self.store
            .settle(&self.key, &self.id, self.reserved_usd, usd, Some(warn));
    }
}

impl BudgetHold {
    /// For a call that spends in parts (a Realtime session, response by
    /// response): settle what the part just ended cost, then reserve as
    /// much again for the next part — refused when the budget is spent.
    /// `part` names the new reservation (unique within the call).
    pub async fn renew(
        self,
        cost: Option<f64>,
        warn: SoftWarn,
        part: u64,
    ) -> Result<BudgetHold, Exhausted> {
        let (store, key, usd) = (self.store.clone(), self.key.clone(), self.reserved_usd);
        let id = format!("{}/{part}", self.id.split('/').next().unwrap_or_default());
        self.settle(cost, warn);
        store
            .reserve(&key, &id, usd, OffsetDateTime::now_utc())
            .await
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        if !self.settled {
            // Never sent: nothing spent.
            self.store
                .settle(&self.key, &self.id, self.reserved_usd, 0.0, None);
        }
    }
}

impl BudgetStore {
    pub fn new(local: Budgets, shared: Option<SharedBudgets>, errors: IntCounter) -> Self {
        Self {
            local,
            shared: shared.map(Arc::new),
            errors,
        }
    }

    /// Reserve `usd` for call `id` under `b`, or refuse: by the cluster's
    /// spend and reservations when shared, else this node's.
    pub async fn reserve(
        self: &Arc<Self>,
        b: &BudgetKey,
        id: &str,
        usd: f64,
        now: OffsetDateTime,
    ) -> Result<BudgetHold, Exhausted> {
        let hold = || BudgetHold {
            store: self.clone(),
            key: b.clone(),
            id: id.to_string(),
            reserved_usd: usd,
            settled: false,
        };
        if let Some(shared) = &self.shared {
            match shared.reserve(b, id, usd, now).await {
                Ok(Ok(())) => {
                    self.local.hold(b, usd);
                    return Ok(hold());
                }
                Ok(Err(exhausted)) => return Err(exhausted),
                Err(e) => self.fell_back(&e),
            }
        }
        self.local.reserve(b, usd, now)?;
        Ok(hold())
    }

    /// Charge `usd` to `b` for a call that holds no reservation (one the
    /// journal found unfinished after a restart).
    pub fn charge(self: &Arc<Self>, b: &BudgetKey, id: &str, usd: f64, warn: SoftWarn) {
        self.settle(b, id, 0.0, usd, Some(warn));
    }

    /// End call `id`'s reservation of `reserved` with its cost `usd`:
    /// locally at once, and in Redis off the data path.
    fn settle(
        self: &Arc<Self>,
        b: &BudgetKey,
        id: &str,
        reserved: f64,
        usd: f64,
        warn: Option<SoftWarn>,
    ) {
        let now = OffsetDateTime::now_utc();
        self.local.release(b, reserved);
        let local = if usd > 0.0 {
            self.local.charge(b, usd, now)
        } else {
            Vec::new()
        };
        let report = move |b: &BudgetKey, crossed: Vec<SoftCrossed>| {
            if let Some(w) = &warn {
                crossed.into_iter().for_each(|s| w(b, s));
            }
        };
        let Some(shared) = self.shared.clone() else {
            report(b, local);
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, b, id) = (self.clone(), b.clone(), id.to_string());
        rt.spawn(async move {
            match shared.settle(&b, &id, usd, now).await {
                Ok(crossed) => report(&b, crossed),
                Err(e) => {
                    store.fell_back(&e);
                    report(&b, local);
                }
            }
        });
    }

    fn fell_back(&self, e: &super::shared::SharedError) {
        self.errors.inc();
        // One line per failure would flood the log during an outage.
        if self.errors.get() % 100 == 1 {
            tracing::warn!(error = %e, failures = self.errors.get(),
                "shared budget state unavailable; deciding with this node's spend (tollgate_state_errors_total)");
        }
    }
}
