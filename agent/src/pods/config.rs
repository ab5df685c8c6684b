//! The `kubernetes` configuration section.
use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum KubernetesMode {
    /// On when the agent runs in a pod (`KUBERNETES_SERVICE_HOST` is set) or
    /// `kubeconfig` is given; off otherwise (host mode).
    #[default]
    Auto,
    /// Always on: the agent fails to start without API access settings.
    On,
    /// Never ask the API server: pods are known by UID and container only.
    Off,
}

/// Pod metadata from the Kubernetes API (namespace, owner workload, service
/// account, labels) for audit records, metrics and policy selectors.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub mode: KubernetesMode,
    /// A kubeconfig file. Empty: `$KUBECONFIG`, then the in-cluster service
    /// account (the DaemonSet's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// How long a new connection from a pod the watch has not delivered yet
    /// waits for its metadata before going on without it (it is then decided
    /// and recorded by pod UID only; later requests on it pick it up).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub metadata_wait: Duration,
    /// Timeout of one API request (owner lookups; the watch itself is long).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            mode: KubernetesMode::Auto,
            kubeconfig: None,
            metadata_wait: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl KubernetesConfig {
    /// Whether to watch pods, given the process environment.
    pub fn enabled(&self) -> bool {
        match self.mode {
            KubernetesMode::On => true,
            KubernetesMode::Off => false,
            KubernetesMode::Auto => {
                self.kubeconfig.is_some() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            }
        }
    }
}
