//! Which workloads a rule is for. Kubernetes selectors (namespace, owner
//! workload, labels, service account) look at the pod metadata from the API
//! server; host selectors (cgroup path, systemd unit, process name) at what
//! the kernel tells.
use std::collections::BTreeMap;

use globset::{GlobMatcher, GlobSet};
use serde::{Deserialize, Serialize};

use super::{
    Subject,
    globs::{PolicyError, globs},
};

/// Every non-empty field must match (and); any entry of a field may (or).
/// A Kubernetes field never matches a workload whose pod metadata is not
/// known (host workloads, or `kubernetes.mode: off`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Selector {
    /// Globs over the pod's namespace, e.g. `team-*`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Globs over the pod's owner workload as `Kind/name` (`Deployment/chat`,
    /// `CronJob/*`); a glob without `/` matches the name alone. ReplicaSets
    /// are followed to their Deployment, Jobs to their CronJob; a pod
    /// nothing owns is `Pod/<name>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<String>,
    /// Pod labels that must all be present, each value a glob (`*`: any).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Globs over the pod's service account name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Kubernetes pod UIDs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pod_uids: Vec<String>,
    /// Globs over the workload's cgroup path below the cgroup2 mount (no
    /// leading `/`; `*` also crosses `/`), e.g. `**/*pod<uid>.slice/**`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<String>,
    /// Globs over systemd unit names (host mode), e.g. `batch-*.service`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    /// Globs over process names (`comm`, 15 characters at most), e.g. `python*`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<String>,
}

/// A selector with its globs built.
pub(super) struct CompiledSelector {
    namespaces: Option<GlobSet>,
    /// (globs with a `/`, globs over the name alone)
    workloads: (Option<GlobSet>, Option<GlobSet>),
    labels: Vec<(String, GlobMatcher)>,
    service_accounts: Option<GlobSet>,
    pod_uids: Vec<String>,
    cgroups: Option<GlobSet>,
    units: Option<GlobSet>,
    processes: Option<GlobSet>,
}

impl Selector {
    /// Build the globs; `at` is the field path of this selector.
    pub(super) fn compile(&self, at: &str) -> Result<CompiledSelector, PolicyError> {
        let (kinded, bare): (Vec<String>, Vec<String>) = self
            .workloads
            .iter()
            .cloned()
            .partition(|w| w.contains('/'));
        let labels = self
            .labels
            .iter()
            .map(|(k, v)| {
                globset::Glob::new(v)
                    .map(|g| (k.clone(), g.compile_matcher()))
                    .map_err(|e| PolicyError {
                        field: format!("{at}.labels.{k}"),
                        message: format!("`{v}` is not a valid glob: {}", e.kind()),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(CompiledSelector {
            namespaces: globs(&self.namespaces, &format!("{at}.namespaces"))?,
            workloads: (
                globs(&kinded, &format!("{at}.workloads"))?,
                globs(&bare, &format!("{at}.workloads"))?,
            ),
            labels,
            service_accounts: globs(&self.service_accounts, &format!("{at}.service_accounts"))?,
            pod_uids: self.pod_uids.clone(),
            cgroups: globs(&self.cgroups, &format!("{at}.cgroups"))?,
            units: globs(&self.units, &format!("{at}.units"))?,
            processes: globs(&self.processes, &format!("{at}.processes"))?,
        })
    }
}

impl CompiledSelector {
    pub(super) fn matches(&self, s: Subject<'_>) -> bool {
        let w = s.workload;
        self.matches_pod(s)
            && self
                .cgroups
                .as_ref()
                .is_none_or(|g| g.is_match(w.cgroup.trim_start_matches('/')))
            && (self.pod_uids.is_empty()
                || w.pod_uid
                    .as_ref()
                    .is_some_and(|u| self.pod_uids.contains(u)))
            && self
                .units
                .as_ref()
                .is_none_or(|g| w.unit.as_ref().is_some_and(|u| g.is_match(u)))
            && self.processes.as_ref().is_none_or(|g| g.is_match(s.comm))
    }

    fn matches_pod(&self, s: Subject<'_>) -> bool {
        let wants_pod = self.namespaces.is_some()
            || self.workloads.0.is_some()
            || self.workloads.1.is_some()
            || !self.labels.is_empty()
            || self.service_accounts.is_some();
        if !wants_pod {
            return true;
        }
        let Some(k) = s.workload.kubernetes.as_deref() else {
            return false;
        };
        let workload_ok = match &self.workloads {
            (None, None) => true,
            (kinded, bare) => {
                bare.as_ref().is_some_and(|g| g.is_match(&k.workload.name))
                    || kinded
                        .as_ref()
                        .is_some_and(|g| g.is_match(k.workload.to_string()))
            }
        };
        self.namespaces
            .as_ref()
            .is_none_or(|g| g.is_match(&k.namespace))
            && workload_ok
            && self
                .labels
                .iter()
                .all(|(key, g)| k.labels.get(key).is_some_and(|v| g.is_match(v)))
            && self
                .service_accounts
                .as_ref()
                .is_none_or(|g| g.is_match(&k.service_account))
    }
}
