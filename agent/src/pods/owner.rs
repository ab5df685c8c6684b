//! A pod's owning workload: ReplicaSet → Deployment and Job → CronJob are
//! followed through the API (RBAC: `get` on replicasets and jobs); other
//! controllers (StatefulSet, DaemonSet, …) own their pods directly.
use std::{collections::HashMap, sync::Mutex, time::Duration};

use k8s_openapi::{
    api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{Api, Client};

use super::Owner;

/// Parents looked up so far, by (namespace, kind, name). A ReplicaSet's or
/// Job's owner never changes, so entries do not expire; the map starts over
/// beyond this size.
const CACHE: usize = 10_000;

pub struct Owners {
    client: Client,
    timeout: Duration,
    cache: Mutex<HashMap<(String, String, String), Owner>>,
}

impl Owners {
    pub fn new(client: Client, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            cache: Mutex::default(),
        }
    }

    pub async fn of(&self, pod: &Pod) -> Owner {
        let meta = &pod.metadata;
        let ns = meta.namespace.clone().unwrap_or_default();
        let Some(r) = controller(meta) else {
            return Owner {
                kind: "Pod".into(),
                name: meta.name.clone().unwrap_or_default(),
            };
        };
        if r.kind != "ReplicaSet" && r.kind != "Job" {
            return Owner {
                kind: r.kind.clone(),
                name: r.name.clone(),
            };
        }
        let key = (ns.clone(), r.kind.clone(), r.name.clone());
        if let Some(o) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return o.clone();
        }
        match self.parent(&ns, r).await {
            Ok(o) => {
                let mut cache = self
                    .cache
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if cache.len() >= CACHE {
                    cache.clear();
                }
                cache.insert(key, o.clone());
                o
            }
            Err(e) => {
                tracing::warn!(
                    namespace = %ns, kind = %r.kind, name = %r.name, error = %e,
                    "cannot read the pod's {} to find its workload; inferring it from names (check the agent's RBAC: get replicasets and jobs)",
                    r.kind
                );
                infer(meta, r)
            }
        }
    }

    async fn parent(&self, ns: &str, r: &OwnerReference) -> Result<Owner, String> {
        let parent_meta = if r.kind == "ReplicaSet" {
            let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), ns);
            tokio::time::timeout(self.timeout, api.get(&r.name))
                .await
                .map_err(|_| format!("no answer within {:?}", self.timeout))?
                .map_err(|e| e.to_string())?
                .metadata
        } else {
            let api: Api<Job> = Api::namespaced(self.client.clone(), ns);
            tokio::time::timeout(self.timeout, api.get(&r.name))
                .await
                .map_err(|_| format!("no answer within {:?}", self.timeout))?
                .map_err(|e| e.to_string())?
                .metadata
        };
        Ok(match controller(&parent_meta) {
            Some(p) if p.kind == "Deployment" || p.kind == "CronJob" => Owner {
                kind: p.kind.clone(),
                name: p.name.clone(),
            },
            // A bare ReplicaSet or Job is the workload itself.
            _ => Owner {
                kind: r.kind.clone(),
                name: r.name.clone(),
            },
        })
    }
}

/// The owner reference marked `controller`, else the first one.
fn controller(meta: &ObjectMeta) -> Option<&OwnerReference> {
    let refs = meta.owner_references.as_deref()?;
    refs.iter()
        .find(|r| r.controller == Some(true))
        .or(refs.first())
}

/// The workload when the API cannot say: a Deployment names its ReplicaSets
/// `<deployment>-<pod-template-hash>` and labels the pods with that hash.
fn infer(meta: &ObjectMeta, r: &OwnerReference) -> Owner {
    let hash = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    if r.kind == "ReplicaSet"
        && let Some(dep) = hash.and_then(|h| r.name.strip_suffix(&format!("-{h}")))
    {
        return Owner {
            kind: "Deployment".into(),
            name: dep.into(),
        };
    }
    Owner {
        kind: r.kind.clone(),
        name: r.name.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_owner(kind: &str, name: &str, hash: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some("p".into()),
            owner_references: Some(vec![OwnerReference {
                kind: kind.into(),
                name: name.into(),
                controller: Some(true),
                ..Default::default()
            }]),
            labels: hash.map(|h| [("pod-template-hash".to_string(), h.to_string())].into()),
            ..Default::default()
        }
    }

    #[test]
    fn inference_strips_the_template_hash_only_when_it_matches() {
        let m = with_owner("ReplicaSet", "chat-7d9f8b6c5", Some("7d9f8b6c5"));
        let o = infer(&m, controller(&m).unwrap());
        assert_eq!(o.to_string(), "Deployment/chat");
        let m = with_owner("ReplicaSet", "chat-7d9f8b6c5", Some("other"));
        assert_eq!(
            infer(&m, controller(&m).unwrap()).to_string(),
            "ReplicaSet/chat-7d9f8b6c5"
        );
        let m = with_owner("Job", "nightly-29000000", None);
        assert_eq!(
            infer(&m, controller(&m).unwrap()).to_string(),
            "Job/nightly-29000000"
        );
    }

    #[test]
    fn controller_reference_wins_over_others() {
        let mut m = with_owner("StatefulSet", "db", None);
        m.owner_references.as_mut().unwrap().insert(
            0,
            OwnerReference {
                kind: "Other".into(),
                name: "x".into(),
                ..Default::default()
            },
        );
        assert_eq!(controller(&m).unwrap().kind, "StatefulSet");
    }
}
