//! The parts of the configuration that change while the agent runs — the
//! policy and the price table — and the watcher that reloads them.
//!
//! The config file is re-read when its modification time or size changes
//! (a Kubernetes ConfigMap update swaps a symlink; the check follows it) and
//! on SIGHUP. A new file is validated whole, exactly as at startup; if it is
//! invalid, the error is logged, `tollgate_config_reloads_total{result="rejected"}`
//! counts it, and the running policy stays. Sections that cannot change
//! without a restart (ports, cgroup root, providers, …) are reported, not applied.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;

use crate::{config::Config, policy::Policy, pricing::PriceTable, telemetry::metrics::Metrics};

/// What one call is judged and priced by.
pub struct Rules {
    pub policy: Policy,
    pub prices: PriceTable,
}

pub type LiveRules = Arc<ArcSwap<Rules>>;

impl Rules {
    /// From a validated config (validation compiled both already).
    pub fn new(cfg: &Config) -> Self {
        let names: Vec<String> = cfg.providers.iter().map(|p| p.name.clone()).collect();
        Self {
            policy: Policy::with_mcp(&cfg.policy, &names, &cfg.mcp_server_names())
                .expect("validated with the config"),
            prices: PriceTable::new(&cfg.pricing).expect("validated with the config"),
        }
    }

    pub fn live(cfg: &Config) -> LiveRules {
        Arc::new(ArcSwap::from_pointee(Self::new(cfg)))
    }
}

/// How often the file's metadata is checked.
const POLL: Duration = Duration::from_secs(1);

/// Reload `path` into `live` on change or SIGHUP, until the task is aborted.
pub async fn watch(path: PathBuf, running: Config, live: LiveRules, metrics: Arc<Metrics>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; reloading on file change only");
            None
        }
    };
    let mut seen = stamp(&path);
    let mut running = running;
    metrics
        .policy_rules
        .set(live.load().policy.rule_count() as i64);
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let forced = tokio::select! {
            _ = hangup => true,
            _ = tokio::time::sleep(POLL) => false,
        };
        let now = stamp(&path);
        if !forced && now == seen {
            continue;
        }
        seen = now;
        match Config::load(&path) {
            Err(e) => {
                metrics
                    .config_reloads
                    .with_label_values(&["rejected"])
                    .inc();
                tracing::error!("config reload rejected; the running policy stays in force:\n{e}");
            }
            Ok(new) => {
                for section in restart_only_changes(&running, &new) {
                    tracing::warn!(
                        section,
                        "changed in the config file; applies after a restart (policy and pricing apply now)"
                    );
                }
                let rules = Rules::new(&new);
                let n = rules.policy.rule_count();
                live.store(Arc::new(rules));
                metrics.config_reloads.with_label_values(&["applied"]).inc();
                metrics.policy_rules.set(n as i64);
                tracing::info!(
                    rules = n,
                    signal = forced,
                    "config reloaded: policy and prices applied"
                );
                running = new;
            }
        }
    }
}

/// Modification time and size: what changes when the file is rewritten.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Top-level sections that differ and are only read at startup.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let section = |c: &Config| {
        let v = serde_yaml::to_value(c).unwrap_or_default();
        let mut m = v.as_mapping().cloned().unwrap_or_default();
        m.remove("policy");
        m.remove("pricing");
        m
    };
    let (a, b) = (section(old), section(new));
    const NAMES: [&str; 16] = [
        "cgroup_root",
        "proxy",
        "failure_mode",
        "heartbeat",
        "dns",
        "providers",
        "opt_out",
        "discovery",
        "metrics",
        "tls",
        "audit",
        "node_name",
        "budget_state_file",
        "state",
        "bpffs_dir",
        "policy",
    ];
    NAMES
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_startup_sections_are_reported() {
        let old = Config::default();
        let mut new = Config {
            policy: serde_yaml::from_str("default: deny").unwrap(),
            ..Config::default()
        };
        new.pricing.defaults = false;
        assert!(restart_only_changes(&old, &new).is_empty());
        new.proxy.port = 1;
        new.audit.max_files = 9;
        assert_eq!(restart_only_changes(&old, &new), ["proxy", "audit"]);
    }
}
