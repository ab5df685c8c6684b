//! Who made a connection: cgroup id → cgroup path → workload.
//!
//! Kubernetes pods are recognised from the kubelet's cgroup layouts (systemd
//! and cgroupfs drivers; containerd, CRI-O and Docker scopes); anything else is
//! a host workload named by its cgroup path. The pod UID and container ID
//! are what the kernel alone can tell; namespace, name, owner workload and
//! labels are joined from the API server's view (`pods`) by UID.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Workload {
    /// cgroup path relative to the cgroup2 mount.
    pub cgroup: String,
    /// Pod UID, when the cgroup is a kubelet pod's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Container ID, when the cgroup is a container scope.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// systemd unit (host mode), e.g. `myapp.service`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// What the Kubernetes API says about the pod (namespace, name, owner
    /// workload, service account), once known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<Arc<crate::pods::PodMeta>>,
}

impl Workload {
    /// Bounded, human label for metrics: pod UID, else unit, else cgroup path.
    pub fn label(&self) -> &str {
        self.pod_uid
            .as_deref()
            .or(self.unit.as_deref())
            .unwrap_or(&self.cgroup)
    }

    /// The pod's namespace; empty for host workloads and unknown pods.
    pub fn namespace(&self) -> &str {
        self.kubernetes
            .as_ref()
            .map_or("", |k| k.namespace.as_str())
    }

    /// The workload for metrics and per-workload limits: `Kind/name` of the
    /// pod's owner when known (`Deployment/chat`), else [`Self::label`].
    pub fn workload_name(&self) -> String {
        match &self.kubernetes {
            Some(k) => k.workload.to_string(),
            None => self.label().to_string(),
        }
    }

    /// The pod's name when known, else its UID; empty outside pods.
    pub fn pod(&self) -> &str {
        match (&self.kubernetes, &self.pod_uid) {
            (Some(k), _) => &k.name,
            (None, Some(u)) => u,
            (None, None) => "",
        }
    }

    /// `namespace`, `workload` and `pod` label values for metrics.
    pub fn metric_labels(&self) -> [String; 3] {
        [
            self.namespace().to_string(),
            self.workload_name(),
            self.pod().to_string(),
        ]
    }
}

/// Parse a cgroup path (relative to the cgroup2 mount).
pub fn parse(cgroup: &str) -> Workload {
    let mut w = Workload {
        cgroup: cgroup.to_string(),
        ..Default::default()
    };
    for seg in cgroup.split('/') {
        // systemd driver: kubepods-burstable-pod<uid with _>.slice
        if let Some(rest) = seg.strip_suffix(".slice") {
            if let Some(idx) = rest.rfind("-pod") {
                let uid = &rest[idx + 4..];
                if looks_like_uid(uid) {
                    w.pod_uid = Some(uid.replace('_', "-"));
                }
            }
            continue;
        }
        // cgroupfs driver: kubepods/burstable/pod<uid>/<container id>
        if let Some(uid) = seg.strip_prefix("pod")
            && looks_like_uid(uid)
        {
            w.pod_uid = Some(uid.to_string());
            continue;
        }
        // systemd scopes: cri-containerd-<id>.scope, crio-<id>.scope, docker-<id>.scope
        if let Some(rest) = seg.strip_suffix(".scope") {
            for prefix in ["cri-containerd-", "crio-", "docker-", "containerd-"] {
                if let Some(id) = rest.strip_prefix(prefix)
                    && is_container_id(id)
                {
                    w.container_id = Some(id.to_string());
                }
            }
            continue;
        }
        // cgroupfs driver: <id> (containerd), crio-<id> (CRI-O), docker-<id>
        if w.pod_uid.is_some() {
            let id = ["crio-", "docker-"]
                .iter()
                .find_map(|p| seg.strip_prefix(p))
                .unwrap_or(seg);
            if is_container_id(id) {
                w.container_id = Some(id.to_string());
                continue;
            }
        }
        if seg.ends_with(".service") {
            w.unit = Some(seg.to_string());
        }
    }
    w
}

fn looks_like_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// cgroup id → workload, refreshed by each cgroup scan. Ids the scan has not
/// seen yet (a cgroup created since) are resolved on demand by a walk.
pub struct IdentityCache {
    root: PathBuf,
    mount: PathBuf,
    by_id: RwLock<HashMap<u64, Workload>>,
    /// Pod metadata from the API server, and how long a connection waits
    /// for a pod not known yet (`kubernetes.metadata_wait`).
    pods: Option<(Arc<crate::pods::PodDirectory>, std::time::Duration)>,
}

impl IdentityCache {
    pub fn new(root: &Path, mount: &Path) -> Self {
        Self {
            root: root.into(),
            mount: mount.into(),
            by_id: RwLock::new(HashMap::new()),
            pods: None,
        }
    }

    /// Join pod metadata from `dir` (Kubernetes mode).
    pub fn with_pods(
        mut self,
        dir: Arc<crate::pods::PodDirectory>,
        wait: std::time::Duration,
    ) -> Self {
        self.pods = Some((dir, wait));
        self
    }

    /// The pod metadata known now for `w` (no waiting), if it is a pod.
    pub fn pod_meta(&self, w: &Workload) -> Option<Arc<crate::pods::PodMeta>> {
        let (dir, _) = self.pods.as_ref()?;
        dir.get(w.pod_uid.as_deref()?)
    }

    /// [`Self::lookup`] plus the pod's metadata, waiting up to
    /// `kubernetes.metadata_wait` for a pod the watch has not delivered.
    pub async fn resolve(&self, id: u64) -> Workload {
        let mut w = self.lookup(id);
        if let (Some((dir, wait)), Some(uid)) = (&self.pods, &w.pod_uid) {
            w.kubernetes = dir.get_or_wait(uid, *wait).await;
            if w.kubernetes.is_none() {
                tracing::debug!(pod_uid = %uid, "no metadata for this pod yet; recorded by UID");
            }
        }
        w
    }

    pub fn refresh(&self, entries: &[crate::cgroup::CgroupEntry]) {
        let fresh: HashMap<u64, Workload> = entries
            .iter()
            .map(|e| (e.id, parse(&self.rel(&e.path))))
            .collect();
        *self
            .by_id
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
    }

    fn rel(&self, p: &Path) -> String {
        format!("/{}", p.strip_prefix(&self.mount).unwrap_or(p).display())
    }

    pub fn lookup(&self, id: u64) -> Workload {
        if let Some(w) = self
            .by_id
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
        {
            return w.clone();
        }
        match crate::cgroup::find_by_id(&self.root, id) {
            Some(p) => {
                let w = parse(&self.rel(&p));
                self.by_id
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(id, w.clone());
                w
            }
            // Gone already (short-lived process): keep the id so the record
            // is still attributable to something precise.
            None => Workload {
                cgroup: format!("cgroup-id:{id}"),
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f9d8e7c-1234-4abc-9def-0123456789ab";
    const CID: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904b825dc642cb6eb9a060e54bf";

    #[test]
    fn systemd_containerd_layout() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        );
        let w = parse(&p);
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(CID));
        assert_eq!(w.label(), UID);
    }

    #[test]
    fn cgroupfs_crio_and_guaranteed_layouts() {
        let w = parse(&format!("/kubepods/besteffort/pod{UID}/{CID}"));
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(CID));
        let w = parse(&format!(
            "/kubepods.slice/kubepods-pod{}.slice/crio-{CID}.scope",
            UID.replace('-', "_")
        ));
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn every_driver_runtime_and_qos_layout() {
        let u = UID.replace('-', "_");
        let layouts = [
            // systemd driver: QoS slices (guaranteed pods sit directly under kubepods.slice)
            format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{CID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{CID}.scope"
            ),
            // cgroupfs driver
            format!("/kubepods/pod{UID}/{CID}"),
            format!("/kubepods/burstable/pod{UID}/crio-{CID}"),
            format!("/kubepods/besteffort/pod{UID}/{CID}"),
            // nested under a node-level parent (kind, k3s in a container)
            format!("/system.slice/k3s.service/kubepods/burstable/pod{UID}/{CID}"),
        ];
        for p in layouts {
            let w = parse(&p);
            assert_eq!(w.pod_uid.as_deref(), Some(UID), "{p}");
            assert_eq!(w.container_id.as_deref(), Some(CID), "{p}");
        }
        // The pod's own cgroup (no container yet): the pod, no container.
        let w = parse(&format!("/kubepods/burstable/pod{UID}"));
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id, None);
    }

    #[test]
    fn host_workloads() {
        let w = parse("/system.slice/myapp.service");
        assert_eq!(w.unit.as_deref(), Some("myapp.service"));
        assert_eq!(w.label(), "myapp.service");
        let w = parse("/tollgate.slice/batch");
        assert_eq!(w.pod_uid, None);
        assert_eq!(w.label(), "/tollgate.slice/batch");
    }
}
