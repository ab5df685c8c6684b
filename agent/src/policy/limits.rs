//! Rate, token and concurrency limits per rule and key, on this node.
//!
//! Each limit is a token bucket that refills continuously at limit/60 per
//! second up to the per-minute limit (so a minute's allowance may be spent
//! in a burst, and is back a minute later). Hand-written rather than
//! `governor`: token limits must *reserve* an estimate when a request starts
//! and *settle* with the provider's real usage when it ends — a refund or a
//! debt — which a cell-based limiter cannot express.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// Whose calls share one set of buckets.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum LimitKey {
    /// Each workload on its own: a pod's owner (`Deployment/chat` in its
    /// namespace, all replicas together) when the pod is known, else the
    /// pod, systemd unit or cgroup.
    #[default]
    Workload,
    /// Each pod on its own (its containers share).
    Pod,
    /// Each Kubernetes namespace (workloads outside pods: each on its own).
    Namespace,
    /// Every workload the rule matches, together.
    Global,
}

/// A rule's `limits`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub per: LimitKey,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_tokens_per_minute: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tokens_per_minute: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrent_requests: Option<u32>,
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("requests_per_minute", self.requests_per_minute),
            ("input_tokens_per_minute", self.input_tokens_per_minute),
            ("output_tokens_per_minute", self.output_tokens_per_minute),
            (
                "concurrent_requests",
                self.concurrent_requests.map(u64::from),
            ),
        ] {
            if v == Some(0) {
                return Err((
                    field,
                    "must be at least 1 (use `action: deny` to block)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// What a request is expected to use, reserved before it is sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estimate {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Which limit refused a request, and when to try again.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// `requests`, `input_tokens`, `output_tokens` or `concurrency`.
    pub which: &'static str,
    pub limit: u64,
    pub remaining: u64,
    pub retry_after: Duration,
}

#[derive(Debug)]
struct Bucket {
    available: f64,
    at: Instant,
}

impl Bucket {
    fn full(limit: u64, now: Instant) -> Self {
        Self {
            available: limit as f64,
            at: now,
        }
    }

    fn refill(&mut self, limit: u64, now: Instant) {
        let rate = limit as f64 / 60.0;
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.available = (self.available + rate * dt).min(limit as f64);
        self.at = now;
    }

    /// Time until `need` is available at `limit` per minute.
    fn wait(&self, need: f64, limit: u64) -> Duration {
        let rate = limit as f64 / 60.0;
        Duration::from_secs_f64(((need - self.available) / rate).max(0.0))
    }
}

#[derive(Debug)]
struct State {
    requests: Bucket,
    input: Bucket,
    output: Bucket,
    in_flight: u32,
    used: Instant,
}

type Key = (String, String);

/// All buckets of this node. Survives policy reloads: buckets are keyed by
/// rule name, and limits are read from the rule in force at each call.
#[derive(Default)]
pub struct Limiter {
    state: Mutex<HashMap<Key, State>>,
}

/// Buckets idle this long are forgotten (they would be full again anyway).
const IDLE: Duration = Duration::from_secs(120);
/// Sweep idle buckets when the map grows past this.
const SWEEP_AT: usize = 10_000;

impl Limiter {
    /// Admit a request of `key` under `rule`'s `limits`, reserving `est`;
    /// or say which limit refuses it and for how long.
    pub fn admit(
        self: &Arc<Self>,
        rule: &str,
        key: &str,
        limits: &LimitsConfig,
        est: Estimate,
    ) -> Result<Admission, Limited> {
        let now = Instant::now();
        let mut map = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= SWEEP_AT {
            map.retain(|_, s| s.in_flight > 0 || now.duration_since(s.used) < IDLE);
        }
        let s = map
            .entry((rule.to_string(), key.to_string()))
            .or_insert_with(|| State {
                requests: Bucket::full(limits.requests_per_minute.unwrap_or(0), now),
                input: Bucket::full(limits.input_tokens_per_minute.unwrap_or(0), now),
                output: Bucket::full(limits.output_tokens_per_minute.unwrap_or(0), now),
                in_flight: 0,
                used: now,
            });
        s.used = now;
        if let Some(max) = limits.concurrent_requests
            && s.in_flight >= max
        {
            return Err(Limited {
                which: "concurrency",
                limit: max.into(),
                remaining: 0,
                retry_after: Duration::from_secs(1),
            });
        }
        // A reservation larger than a whole minute's allowance could never
        // pass: it is clamped, and waits for a full bucket instead.
        let checks = [
            ("requests", limits.requests_per_minute, 1, &mut s.requests),
            (
                "input_tokens",
                limits.input_tokens_per_minute,
                est.input_tokens,
                &mut s.input,
            ),
            (
                "output_tokens",
                limits.output_tokens_per_minute,
                est.output_tokens,
                &mut s.output,
            ),
        ];
        let mut take = Vec::new();
        for (which, limit, need, bucket) in checks {
            let Some(limit) = limit else { continue };
            bucket.refill(limit, now);
            let need = need.min(limit) as f64;
            if bucket.available < need {
                return Err(Limited {
                    which,
                    limit,
                    remaining: bucket.available.max(0.0) as u64,
                    retry_after: bucket.wait(need, limit),
                });
            }
            take.push((bucket, need));
        }
        for (bucket, need) in take {
            bucket.available -= need;
        }
        let counted = limits.concurrent_requests.is_some();
        if counted {
            s.in_flight += 1;
        }
        Ok(Admission {
            limiter: self.clone(),
            key: (rule.to_string(), key.to_string()),
            reserved: Estimate {
                input_tokens: limits
                    .input_tokens_per_minute
                    .map_or(0, |l| est.input_tokens.min(l)),
                output_tokens: limits
                    .output_tokens_per_minute
                    .map_or(0, |l| est.output_tokens.min(l)),
            },
            limits: limits.clone(),
            counted,
            settled: false,
        })
    }
}

/// An admitted request's hold on its buckets: settle it with the real usage;
/// dropped unsettled (the call failed before any usage), the reservation is
/// refunded. Either way the concurrency slot is released.
pub struct Admission {
    limiter: Arc<Limiter>,
    key: Key,
    reserved: Estimate,
    limits: LimitsConfig,
    counted: bool,
    settled: bool,
}

impl Admission {
    /// Replace the reservation by what was used: refund the difference, or
    /// take the excess (the bucket may go negative: later calls wait).
    pub fn settle(mut self, input_tokens: u64, output_tokens: u64) {
        self.apply(input_tokens, output_tokens);
    }

    fn apply(&mut self, input_tokens: u64, output_tokens: u64) {
        if self.settled {
            return;
        }
        self.settled = true;
        let mut map = self.limiter.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = map.get_mut(&self.key) else {
            return;
        };
        if let Some(l) = self.limits.input_tokens_per_minute {
            s.input.available = (s.input.available + self.reserved.input_tokens as f64
                - input_tokens as f64)
                .min(l as f64);
        }
        if let Some(l) = self.limits.output_tokens_per_minute {
            s.output.available = (s.output.available + self.reserved.output_tokens as f64
                - output_tokens as f64)
                .min(l as f64);
        }
        if self.counted {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.apply(0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(y: &str) -> LimitsConfig {
        serde_yaml::from_str(y).unwrap()
    }

    #[test]
    fn requests_per_minute_burst_then_wait() {
        let l = Arc::new(Limiter::default());
        let cfg = limits("requests_per_minute: 3");
        let est = Estimate::default();
        for _ in 0..3 {
            l.admit("r", "w", &cfg, est).unwrap().settle(0, 0);
        }
        let e = l.admit("r", "w", &cfg, est).err().unwrap();
        assert_eq!(e.which, "requests");
        assert_eq!(e.limit, 3);
        // One request refills every 20 s.
        assert!(
            e.retry_after > Duration::from_secs(19) && e.retry_after <= Duration::from_secs(20),
            "{e:?}"
        );
        // Another key has its own bucket.
        assert!(l.admit("r", "other", &cfg, est).is_ok());
    }

    #[test]
    fn token_reservations_settle_to_real_usage() {
        let l = Arc::new(Limiter::default());
        let cfg = limits("output_tokens_per_minute: 1000");
        let big = Estimate {
            input_tokens: 0,
            output_tokens: 800,
        };
        let a = l.admit("r", "w", &cfg, big).unwrap();
        // 200 left: a second 800-token reservation waits…
        assert_eq!(
            l.admit("r", "w", &cfg, big).err().unwrap().which,
            "output_tokens"
        );
        // …until the first settles at its real 50 tokens: 950 left.
        a.settle(0, 50);
        let b = l.admit("r", "w", &cfg, big).unwrap();
        drop(b); // failed before usage: refunded
        assert!(l.admit("r", "w", &cfg, big).is_ok());
    }

    #[test]
    fn usage_beyond_the_reservation_is_a_debt() {
        let l = Arc::new(Limiter::default());
        let cfg = limits("input_tokens_per_minute: 100");
        let est = Estimate {
            input_tokens: 10,
            output_tokens: 0,
        };
        l.admit("r", "w", &cfg, est).unwrap().settle(250, 0);
        let e = l.admit("r", "w", &cfg, est).err().unwrap();
        assert_eq!(e.remaining, 0);
        // 150 in debt + 10 needed at 100/min ≈ 96 s.
        assert!(e.retry_after > Duration::from_secs(90), "{e:?}");
    }

    #[test]
    fn concurrency_slots_are_released_on_settle_or_drop() {
        let l = Arc::new(Limiter::default());
        let cfg = limits("concurrent_requests: 1");
        let a = l.admit("r", "w", &cfg, Estimate::default()).unwrap();
        assert_eq!(
            l.admit("r", "w", &cfg, Estimate::default())
                .err()
                .unwrap()
                .which,
            "concurrency"
        );
        drop(a);
        assert!(l.admit("r", "w", &cfg, Estimate::default()).is_ok());
    }

    #[test]
    fn oversized_reservations_wait_for_a_full_bucket() {
        let l = Arc::new(Limiter::default());
        let cfg = limits("output_tokens_per_minute: 100");
        let huge = Estimate {
            input_tokens: 0,
            output_tokens: 100_000,
        };
        let held = l.admit("r", "w", &cfg, huge);
        assert!(held.is_ok(), "clamped to the minute's allowance");
        assert!(l.admit("r", "w", &cfg, huge).is_err());
        assert!(limits("requests_per_minute: 0").validate().is_err());
    }
}
