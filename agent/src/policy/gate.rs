//! Where limits are counted: this node (`limits::Limiter`), or, with
//! `state.backend: redis`, the whole cluster (`shared::SharedLimits`) —
//! falling back to this node's buckets when Redis does not answer in time.
use std::sync::Arc;

use prometheus::IntCounter;

use super::{
    limits::{Admission, Estimate, Limited, Limiter, LimitsConfig},
    shared::{SharedError, SharedLimits},
};

pub struct LimitStore {
    local: Arc<Limiter>,
    shared: Option<Arc<SharedLimits>>,
    errors: IntCounter,
}

/// An admitted request's hold on its buckets; see `Admission`.
pub enum Hold {
    Local(Admission),
    Shared(SharedHold),
}

impl Hold {
    /// Settle the reservation with the real usage.
    pub fn settle(self, input_tokens: u64, output_tokens: u64) {
        match self {
            Hold::Local(a) => a.settle(input_tokens, output_tokens),
            Hold::Shared(mut h) => h.finish(input_tokens, output_tokens),
        }
    }
}

pub struct SharedHold {
    store: Arc<SharedLimits>,
    errors: IntCounter,
    rule: String,
    key: String,
    limits: LimitsConfig,
    reserved: Estimate,
    settled: bool,
}

impl SharedHold {
    fn finish(&mut self, input_tokens: u64, output_tokens: u64) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let (store, errors) = (self.store.clone(), self.errors.clone());
        let (rule, key, limits) = (self.rule.clone(), self.key.clone(), self.limits.clone());
        let d_in = self.reserved.input_tokens as f64 - input_tokens as f64;
        let d_out = self.reserved.output_tokens as f64 - output_tokens as f64;
        // Off the data path; a lost settlement only errs toward refusing.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.settle(&rule, &key, &limits, d_in, d_out).await {
                    errors.inc();
                    tracing::debug!(error = %e, "settling a shared limit failed");
                }
            });
        }
    }
}

impl Drop for SharedHold {
    fn drop(&mut self) {
        self.finish(0, 0); // failed before any usage: refund
    }
}

impl LimitStore {
    pub fn new(shared: Option<SharedLimits>, errors: IntCounter) -> Self {
        Self {
            local: Arc::default(),
            shared: shared.map(Arc::new),
            errors,
        }
    }

    /// Admit under `limits`, cluster-wide when shared.
    pub async fn admit(
        &self,
        rule: &str,
        key: &str,
        limits: &LimitsConfig,
        est: Estimate,
    ) -> Result<Hold, Limited> {
        if let Some(shared) = &self.shared {
            match shared.admit(rule, key, limits, est).await {
                Ok(Ok(())) => {
                    let clamp = |n: u64, l: Option<u64>| l.map_or(0, |l| n.min(l));
                    return Ok(Hold::Shared(SharedHold {
                        store: shared.clone(),
                        errors: self.errors.clone(),
                        rule: rule.into(),
                        key: key.into(),
                        limits: limits.clone(),
                        reserved: Estimate {
                            input_tokens: clamp(est.input_tokens, limits.input_tokens_per_minute),
                            output_tokens: clamp(
                                est.output_tokens,
                                limits.output_tokens_per_minute,
                            ),
                        },
                        settled: false,
                    }));
                }
                Ok(Err(limited)) => return Err(limited),
                Err(e) => self.fell_back(&e),
            }
        }
        self.local.admit(rule, key, limits, est).map(Hold::Local)
    }

    fn fell_back(&self, e: &SharedError) {
        self.errors.inc();
        if self.errors.get() % 100 == 1 {
            tracing::warn!(error = %e, failures = self.errors.get(),
                "shared limit state unavailable; limiting with this node's buckets (tollgate_state_errors_total)");
        }
    }
}
