//! A small Kubernetes API server for tests: the agent's kube-rs client and
//! watcher talk to it exactly as to a real one (same code path: a kubeconfig
//! naming this server, bearer token, list + watch with a field selector,
//! `get` of ReplicaSets and Jobs).
//!
//! It serves what the agent uses and nothing else:
//! * `GET /api/v1/pods?fieldSelector=spec.nodeName=N` — a `PodList` of the
//!   pods on node N, with the current `resourceVersion`;
//! * the same with `watch=true&resourceVersion=V` — the events after V as
//!   JSON lines, then each new one as it happens, until `timeoutSeconds`;
//! * `GET /apis/apps/v1/namespaces/NS/replicasets/NAME` and
//!   `/apis/batch/v1/namespaces/NS/jobs/NAME`.
//!
//! Requests without the expected bearer token get 401, as from a real
//! server; while [`FixtureApi::set_failing`] is on, every request gets 503.
use std::{
    collections::HashMap,
    convert::Infallible,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt, Full, channel::Channel, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Bytes};
use serde_json::{Value, json};

/// The token the fixture's kubeconfig carries and the server requires.
pub const TOKEN: &str = "tollgate-fixture-token";

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct State {
    rv: u64,
    pods: HashMap<String, Value>,
    /// (resource version, event JSON line, node of the pod)
    events: Vec<(u64, String, String)>,
    parents: HashMap<String, Value>,
    watchers: Vec<tokio::sync::mpsc::UnboundedSender<(u64, String, String)>>,
    failing: bool,
    requests: Vec<String>,
}

pub struct FixtureApi {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

impl FixtureApi {
    /// Serve on `listener` (e.g. bound in the test node's namespace).
    pub fn start(listener: std::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let state: Arc<Mutex<State>> = Arc::default();
        let st = state.clone();
        let runtime = crate::http_fixture::serve_http1(listener, move |req| {
            let answer = answer(&st, req);
            async move { answer }
        });
        Self {
            addr,
            state,
            _runtime: runtime,
        }
    }

    /// A kubeconfig for this server, written into `dir`.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let p = dir.join("kubeconfig");
        std::fs::write(
            &p,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fixture\n  cluster:\n    server: http://{}\n\
                 users:\n- name: agent\n  user:\n    token: {TOKEN}\n\
                 contexts:\n- name: fixture\n  context:\n    cluster: fixture\n    user: agent\n\
                 current-context: fixture\n",
                self.addr
            ),
        )
        .unwrap();
        p
    }

    /// Add or change a pod (a `v1/Pod` object; `metadata.uid` and
    /// `spec.nodeName` set by the caller).
    pub fn apply_pod(&self, mut pod: Value) {
        let mut s = self.state.lock().unwrap();
        s.rv += 1;
        pod["apiVersion"] = json!("v1");
        pod["kind"] = json!("Pod");
        pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
        let kind = if s.pods.contains_key(&uid) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.pods.insert(uid, pod.clone());
        publish(&mut s, kind, pod);
    }

    pub fn delete_pod(&self, uid: &str) {
        let mut s = self.state.lock().unwrap();
        let Some(mut pod) = s.pods.remove(uid) else {
            return;
        };
        s.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        publish(&mut s, "DELETED", pod);
    }

    /// A ReplicaSet or Job (`kind` `ReplicaSet`/`Job`) the owner lookups find.
    pub fn add_parent(&self, kind: &str, namespace: &str, name: &str, owner: Option<(&str, &str)>) {
        let api = if kind == "ReplicaSet" {
            "apps/v1"
        } else {
            "batch/v1"
        };
        let mut obj = json!({
            "apiVersion": api, "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "uid": format!("{kind}-{name}")},
        });
        if let Some((k, n)) = owner {
            obj["metadata"]["ownerReferences"] = json!([{
                "apiVersion": if k == "Deployment" { "apps/v1" } else { "batch/v1" },
                "kind": k, "name": n, "uid": format!("{k}-{n}"), "controller": true
            }]);
        }
        self.state
            .lock()
            .unwrap()
            .parents
            .insert(parent_path(kind, namespace, name), obj);
    }

    /// While on, every request is answered 503 (an unreachable API server).
    pub fn set_failing(&self, failing: bool) {
        let mut s = self.state.lock().unwrap();
        s.failing = failing;
        if failing {
            // Open watches end too, as when the server goes away.
            s.watchers.clear();
        }
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn publish(s: &mut State, kind: &str, pod: Value) {
    let node = pod["spec"]["nodeName"].as_str().unwrap_or("").to_string();
    let line = format!("{}\n", json!({"type": kind, "object": pod}));
    let ev = (s.rv, line, node);
    s.watchers.retain(|w| w.send(ev.clone()).is_ok());
    s.events.push(ev);
}

fn parent_path(kind: &str, ns: &str, name: &str) -> String {
    match kind {
        "ReplicaSet" => format!("/apis/apps/v1/namespaces/{ns}/replicasets/{name}"),
        _ => format!("/apis/batch/v1/namespaces/{ns}/jobs/{name}"),
    }
}

fn answer(st: &Arc<Mutex<State>>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let mut s = st.lock().unwrap();
    s.requests.push(format!("{} {}", req.method(), req.uri()));
    if s.failing {
        return status(StatusCode::SERVICE_UNAVAILABLE, "fixture is failing");
    }
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    if path == "/api/v1/pods" {
        let node = query
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("spec.nodeName="))
            .map(str::to_string);
        if query.get("watch").map(String::as_str) == Some("true") {
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let timeout = query
                .get("timeoutSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(290u64);
            let backlog: Vec<_> = s.events.iter().filter(|e| e.0 > from).cloned().collect();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            s.watchers.push(tx);
            drop(s);
            let (mut out, body) = Channel::<Bytes, Infallible>::new(16);
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
                let wanted = |n: &str| node.as_deref().is_none_or(|want| want == n);
                for (_, line, n) in backlog {
                    if wanted(&n) && out.send_data(Bytes::from(line)).await.is_err() {
                        return;
                    }
                }
                while let Ok(Some((_, line, n))) =
                    tokio::time::timeout_at(deadline, rx.recv()).await
                {
                    if wanted(&n) && out.send_data(Bytes::from(line)).await.is_err() {
                        return;
                    }
                }
            });
            return Response::builder()
                .header("content-type", "application/json")
                .body(body.boxed())
                .unwrap();
        }
        let items: Vec<&Value> = s
            .pods
            .values()
            .filter(|p| {
                node.as_deref()
                    .is_none_or(|n| p["spec"]["nodeName"].as_str() == Some(n))
            })
            .collect();
        let list = json!({
            "apiVersion": "v1", "kind": "PodList",
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        return json_response(StatusCode::OK, &list);
    }
    match s.parents.get(&path) {
        Some(obj) => json_response(StatusCode::OK, obj),
        None => status(StatusCode::NOT_FOUND, "not found"),
    }
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    json_response(
        code,
        &json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                "message": message, "code": code.as_u16()}),
    )
}

/// A Pod object as the API server serves it: metadata (owner reference
/// when `owner` is given), node and service account.
pub fn pod_object(
    uid: &str,
    ns: &str,
    name: &str,
    node: &str,
    sa: &str,
    owner: Option<(&str, &str)>,
    labels: Value,
) -> Value {
    let mut p = json!({
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app"}]},
    });
    if let Some((kind, owner)) = owner {
        p["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": kind, "name": owner,
            "uid": format!("{kind}-{owner}"), "controller": true
        }]);
    }
    p
}
