//! Forgetting the metric series of pods that are gone.
//!
//! Every per-workload metric carries a `pod` label, and pods come and go
//! by the thousand on a busy node: kept forever, their series would grow
//! the agent's memory and every scrape without bound. A pod that has been
//! gone from the node for a grace period (`metrics.pod_series_grace`, long
//! enough for a scrape or two to see its last counts) has its series removed.
use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};

use super::metrics::Metrics;

/// When each pod label was first seen missing from the node.
#[derive(Default)]
pub struct GonePods {
    since: Mutex<HashMap<String, Instant>>,
}

impl GonePods {
    /// Compare the pods with series against `live` (the pod labels of the
    /// workloads on the node now) and drop the series of those missing for
    /// `grace`. Returns how many pods were forgotten.
    pub fn sweep(&self, m: &Metrics, live: &HashSet<String>, grace: Duration) -> usize {
        let present = pods_with_series(m);
        let now = Instant::now();
        let gone: HashSet<String> = {
            let mut since = self
                .since
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            since.retain(|pod, _| present.contains(pod) && !live.contains(pod));
            for pod in present.iter().filter(|p| !live.contains(*p)) {
                since.entry(pod.clone()).or_insert(now);
            }
            let gone: HashSet<String> = since
                .iter()
                .filter(|(_, at)| now.duration_since(**at) >= grace)
                .map(|(pod, _)| pod.clone())
                .collect();
            since.retain(|pod, _| !gone.contains(pod));
            gone
        };
        if !gone.is_empty() {
            drop_pods(&m.connections, &gone);
            drop_pods(&m.bytes, &gone);
            drop_pods(&m.token_usage, &gone);
            drop_pods(&m.operation_duration, &gone);
            drop_pods(&m.time_to_first_token, &gone);
            drop_pods(&m.tokens, &gone);
            drop_pods(&m.requests, &gone);
            drop_pods(&m.cost, &gone);
            drop_pods(&m.mcp_calls, &gone);
            drop_pods(&m.mcp_call_duration, &gone);
        }
        gone.len()
    }
}

/// The `pod` label values of every per-pod series (the empty label of
/// connections no workload was found for is not a pod).
fn pods_with_series(m: &Metrics) -> HashSet<String> {
    let mut pods = HashSet::new();
    // Every per-pod family records a pod's calls with `requests` or
    // `connections`; the others are written with them.
    for family in m
        .requests
        .collect()
        .into_iter()
        .chain(m.connections.collect())
    {
        for metric in family.get_metric() {
            for l in metric.get_label() {
                if l.name() == "pod" && !l.value().is_empty() {
                    pods.insert(l.value().to_string());
                }
            }
        }
    }
    pods
}

/// Remove the series of `vec` whose `pod` label is in `gone`.
fn drop_pods<P: MetricVecBuilder>(vec: &MetricVec<P>, gone: &HashSet<String>) {
    for family in vec.collect() {
        for metric in family.get_metric() {
            let labels: HashMap<&str, &str> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if labels.get("pod").is_some_and(|p| gone.contains(*p)) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_of_a_pod_gone_for_the_grace_are_dropped() {
        let m = Metrics::new();
        for pod in ["a-1", "b-1"] {
            m.requests
                .with_label_values(&["ns", "Deployment/x", pod, "openai", "gpt-4o", "2xx", "ok"])
                .inc();
            m.tokens
                .with_label_values(&["ns", "Deployment/x", pod, "openai", "gpt-4o", "input"])
                .inc_by(5);
        }
        let gone = GonePods::default();
        let live: HashSet<String> = ["a-1".to_string()].into();
        assert_eq!(
            gone.sweep(&m, &live, Duration::from_secs(600)),
            0,
            "within the grace"
        );
        assert!(m.render().contains("b-1"));
        assert_eq!(gone.sweep(&m, &live, Duration::ZERO), 1);
        let text = m.render();
        assert!(!text.contains("b-1"), "{text}");
        assert!(text.contains("a-1"), "the live pod keeps its series");
        // A pod that comes back within the grace starts over.
        let none = HashSet::new();
        gone.sweep(&m, &none, Duration::from_secs(600));
        assert_eq!(gone.sweep(&m, &live, Duration::ZERO), 0);
    }
}
