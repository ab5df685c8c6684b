//! Where budget spend is kept: on this node (`Budgets`), and, with
//! `state.backend: redis`, also in Redis for the whole cluster — decisions
//! then read the cluster's totals, and fall back to this node's own when
//! Redis does not answer in time.
use std::sync::Arc;

use prometheus::IntCounter;
use time::OffsetDateTime;

use super::{
    budgets::{BudgetKey, Budgets, Exhausted, SoftCrossed, verdict},
    shared::SharedBudgets,
};

pub struct BudgetStore {
    pub local: Budgets,
    shared: Option<Arc<SharedBudgets>>,
    /// Redis failures (each fell back to local spend).
    errors: IntCounter,
}

impl BudgetStore {
    pub fn new(local: Budgets, shared: Option<SharedBudgets>, errors: IntCounter) -> Self {
        Self {
            local,
            shared: shared.map(Arc::new),
            errors,
        }
    }

    /// Refuse if `b` is spent, by the cluster's totals when shared.
    pub async fn check(&self, b: &BudgetKey, now: OffsetDateTime) -> Result<(), Exhausted> {
        if let Some(shared) = &self.shared {
            match shared.totals(b, now).await {
                Ok(t) => return verdict(b, t.day_usd, t.month_usd, now),
                Err(e) => self.fell_back(&e),
            }
        }
        self.local.check(b, now)
    }

    /// Charge `usd` to `b`: locally at once, and to Redis off the data path.
    /// `warn` reports soft limits crossed (once, cluster-wide when shared).
    pub fn charge(
        self: &Arc<Self>,
        b: &BudgetKey,
        usd: f64,
        now: OffsetDateTime,
        warn: impl Fn(&BudgetKey, SoftCrossed) + Send + 'static,
    ) {
        let local = self.local.charge(b, usd, now);
        let Some(shared) = self.shared.clone() else {
            local.into_iter().for_each(|s| warn(b, s));
            return;
        };
        let (store, b) = (self.clone(), b.clone());
        tokio::spawn(async move {
            match shared.charge(&b, usd, now).await {
                Ok(crossed) => crossed.into_iter().for_each(|s| warn(&b, s)),
                Err(e) => {
                    store.fell_back(&e);
                    local.into_iter().for_each(|s| warn(&b, s));
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
