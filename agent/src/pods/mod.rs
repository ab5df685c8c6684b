//! Kubernetes pod metadata for the workloads on this node.
//!
//! The kernel tells a connection's cgroup, and the cgroup path its pod UID
//! (`identity`). Who that pod is — namespace, name, owning workload, service
//! account, labels — comes from the API server: `watch` keeps this node's
//! pods (field selector `spec.nodeName`) in a [`PodDirectory`] keyed by UID.
//! Keying by UID is what keeps attribution right: a UID is never reused, so
//! a record can lack metadata (the pod is not known yet) but never carry
//! another pod's.
mod config;
mod owner;
pub mod watch;

pub use config::{KubernetesConfig, KubernetesMode};

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// The workload that owns a pod: `Deployment/chat`, `CronJob/nightly`,
/// `StatefulSet/db`, or the pod itself when nothing owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// What the API server says about one pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodMeta {
    pub namespace: String,
    #[serde(rename = "pod")]
    pub name: String,
    #[serde(skip)]
    pub uid: String,
    pub workload: Owner,
    pub service_account: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(skip)]
    pub labels: BTreeMap<String, String>,
    /// Changes whenever this pod's metadata does (policy memo key).
    #[serde(skip)]
    pub serial: u64,
}

/// Deleted pods stay known this long, so records of their last calls (a
/// stream that outlives the pod's deletion) are still attributed.
const TOMBSTONE: Duration = Duration::from_secs(300);

/// This node's pods by UID.
#[derive(Default)]
pub struct PodDirectory {
    pods: RwLock<HashMap<String, Arc<PodMeta>>>,
    removed: std::sync::Mutex<VecDeque<(Instant, String)>>,
    serial: AtomicU64,
    synced: AtomicBool,
    /// Wakes callers waiting for a pod to become known.
    changed: tokio::sync::Notify,
}

impl PodDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.pods
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(uid)
            .cloned()
    }

    /// The pod's metadata, waiting up to `wait` for it to arrive (a pod the
    /// watch has not delivered yet, typically right after the agent starts).
    pub async fn get_or_wait(&self, uid: &str, wait: Duration) -> Option<Arc<PodMeta>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut said = false;
        loop {
            let notified = self.changed.notified();
            if let Some(p) = self.get(uid) {
                return Some(p);
            }
            if !said {
                said = true;
                tracing::debug!(pod_uid = uid, ?wait, "waiting for this pod's metadata");
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Add or update a pod.
    pub fn upsert(&self, mut meta: PodMeta) {
        let mut pods = self
            .pods
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pods.get(&meta.uid).is_some_and(|old| same(old, &meta)) {
            return;
        }
        meta.serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        pods.insert(meta.uid.clone(), Arc::new(meta));
        drop(pods);
        self.changed.notify_waiters();
    }

    /// A pod was deleted: forget it after [`TOMBSTONE`].
    pub fn remove(&self, uid: &str) {
        let now = Instant::now();
        let mut removed = self
            .removed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        removed.push_back((now, uid.to_string()));
        let mut pods = self
            .pods
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some((at, _)) = removed.front() {
            if now.duration_since(*at) < TOMBSTONE {
                break;
            }
            let (_, old) = removed.pop_front().expect("front exists");
            pods.remove(&old);
        }
    }

    /// A complete listing (after a (re)connect) has been upserted; `listed`
    /// are its UIDs. Pods not in it were deleted while the watch was away.
    pub fn listing_complete(&self, listed: &std::collections::HashSet<String>) {
        let tombstoned: std::collections::HashSet<String> = self
            .removed
            .lock()
            .unwrap()
            .iter()
            .map(|(_, u)| u.clone())
            .collect();
        let gone: Vec<String> = self
            .pods
            .read()
            .unwrap()
            .keys()
            .filter(|u| !listed.contains(*u) && !tombstoned.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            self.remove(&uid);
        }
        self.synced.store(true, Ordering::Relaxed);
        self.changed.notify_waiters();
    }

    /// Whether a complete listing has arrived since the agent started.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.pods
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn same(a: &PodMeta, b: &PodMeta) -> bool {
    a.namespace == b.namespace
        && a.name == b.name
        && a.workload == b.workload
        && a.service_account == b.service_account
        && a.labels == b.labels
        && a.node == b.node
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn meta(uid: &str, ns: &str, name: &str) -> PodMeta {
        PodMeta {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
            workload: Owner {
                kind: "Pod".into(),
                name: name.into(),
            },
            service_account: "default".into(),
            node: "n1".into(),
            labels: BTreeMap::new(),
            serial: 0,
        }
    }

    #[tokio::test]
    async fn waiting_caller_gets_the_pod_when_it_arrives() {
        let dir = Arc::new(PodDirectory::new());
        let d = dir.clone();
        let waiter = tokio::spawn(async move { d.get_or_wait("u1", Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        dir.upsert(meta("u1", "team-a", "chat-1"));
        let got = waiter.await.unwrap().expect("arrived");
        assert_eq!(got.namespace, "team-a");
        // An unknown pod times out with nothing rather than someone else's.
        assert!(
            dir.get_or_wait("u2", Duration::from_millis(30))
                .await
                .is_none()
        );
    }

    #[test]
    fn relist_forgets_pods_deleted_while_away_after_the_grace() {
        let dir = PodDirectory::new();
        dir.upsert(meta("u1", "a", "p1"));
        dir.upsert(meta("u2", "a", "p2"));
        assert!(!dir.synced());
        dir.upsert(meta("u2", "a", "p2"));
        dir.listing_complete(&["u2".to_string()].into());
        assert!(dir.synced());
        // Still attributable during the grace period.
        assert!(dir.get("u1").is_some());
        // Another relist does not mark it deleted twice.
        dir.listing_complete(&["u2".to_string()].into());
        assert_eq!(
            dir.removed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len(),
            1
        );
        // An unchanged pod keeps its serial (the policy memo stays valid).
        let s = dir.get("u2").unwrap().serial;
        dir.upsert(meta("u2", "a", "p2"));
        assert_eq!(dir.get("u2").unwrap().serial, s);
        let mut changed = meta("u2", "a", "p2");
        changed.labels.insert("tier".into(), "gold".into());
        dir.upsert(changed);
        assert_ne!(dir.get("u2").unwrap().serial, s);
    }
}
