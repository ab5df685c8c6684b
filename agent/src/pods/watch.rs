//! The kube-rs watcher of this node's pods, feeding the [`PodDirectory`].
//!
//! One list+watch of `pods` with the field selector `spec.nodeName=<node>`,
//! so the agent holds its own node's pods only; the watcher resumes from the
//! last resource version and relists after an expired one. When the API
//! server is unreachable it retries with exponential backoff (0.8 s doubling
//! to 30 s, jittered); what was known stays known meanwhile.
use std::{path::PathBuf, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};

use super::{KubernetesConfig, Owner, PodDirectory, PodMeta, owner::Owners};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "cannot read kubeconfig {path}: {source}\nhint: fix `kubernetes.kubeconfig`, or remove it to use the in-cluster service account"
    )]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "cannot configure the Kubernetes client: {0}\nhint: run in a pod with a service account, set $KUBECONFIG or `kubernetes.kubeconfig`, or set `kubernetes.mode: off` for host mode"
    )]
    Infer(String),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `kubernetes.kubeconfig`, else `$KUBECONFIG`, else the
/// in-cluster service account.
pub async fn client(cfg: &KubernetesConfig) -> Result<Client, WatchError> {
    let mut config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| WatchError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| WatchError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => Config::infer()
            .await
            .map_err(|e| WatchError::Infer(e.to_string()))?,
    };
    config.connect_timeout = Some(cfg.request_timeout);
    // The watcher's own backoff (bounded, counted, logged) decides retries;
    // the client's built-in retry would hide an unreachable API server for
    // minutes.
    config.default_retry = false;
    Ok(Client::try_from(config)?)
}

/// Watch `node`'s pods into `dir` until the task is dropped. `errors` counts
/// failed list/watch calls (each is retried with backoff).
pub async fn run(
    client: Client,
    cfg: KubernetesConfig,
    node: String,
    dir: Arc<PodDirectory>,
    errors: prometheus::IntCounter,
) {
    let owners = Owners::new(client.clone(), cfg.request_timeout);
    let api: Api<Pod> = Api::all(client);
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let stream = watcher::watcher(api, wc).default_backoff();
    futures::pin_mut!(stream);
    let mut listing = std::collections::HashSet::new();
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                errors.inc();
                if !failing {
                    tracing::warn!(error = %e, node = %node,
                        "cannot list/watch this node's pods; retrying with backoff. Records carry pod UIDs only until it works (check the API server address and the agent's RBAC: list/watch pods)");
                }
                failing = true;
                continue;
            }
        };
        if failing {
            tracing::info!(node = %node, "pod watch is back");
            failing = false;
        }
        match event {
            Event::Init => listing.clear(),
            Event::InitApply(pod) => {
                if let Some(m) = meta_of(&pod, &owners).await {
                    // Known at once (a connection may be waiting for it);
                    // deletions are settled when the listing is complete.
                    listing.insert(m.uid.clone());
                    dir.upsert(m);
                }
            }
            Event::InitDone => {
                let n = listing.len();
                dir.listing_complete(&std::mem::take(&mut listing));
                tracing::info!(node = %node, pods = n, "pod metadata synced");
            }
            Event::Apply(pod) => {
                if let Some(m) = meta_of(&pod, &owners).await {
                    dir.upsert(m);
                }
            }
            Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    dir.remove(uid);
                }
            }
        }
    }
}

async fn meta_of(pod: &Pod, owners: &Owners) -> Option<PodMeta> {
    let uid = pod.metadata.uid.clone()?;
    let workload: Owner = owners.of(pod).await;
    Some(translate(pod, uid, workload))
}

fn translate(pod: &Pod, uid: String, workload: Owner) -> PodMeta {
    let m = &pod.metadata;
    let spec = pod.spec.as_ref();
    PodMeta {
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        uid,
        workload,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
        serial: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_fields_reach_the_metadata() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "chat-1", "namespace": "team-a", "uid": "u1",
                         "labels": {"app": "chat"}},
            "spec": {"nodeName": "n1", "containers": []}
        }))
        .unwrap();
        let m = translate(
            &pod,
            "u1".into(),
            Owner {
                kind: "Deployment".into(),
                name: "chat".into(),
            },
        );
        assert_eq!(m.namespace, "team-a");
        assert_eq!(m.name, "chat-1");
        assert_eq!(m.service_account, "default", "the API's default");
        assert_eq!(m.node, "n1");
        assert_eq!(m.labels["app"], "chat");
        assert_eq!(m.workload.to_string(), "Deployment/chat");
    }
}
