//! An OTLP/HTTP trace receiver for the tests: it decodes each export
//! request with the official protobuf definitions (`opentelemetry-proto`)
//! and keeps the spans, flattened, as the far side's record of what the
//! agent sent. It can be told to refuse (503) to test failure accounting.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use http_body_util::{BodyExt, Full};
use hyper::{Response, body::Bytes};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
};
use prost::Message;

/// One received span: its name, kind, times, attributes, and its
/// resource's attributes, values as JSON.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    pub kind: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub status_code: i32,
    pub attributes: serde_json::Map<String, serde_json::Value>,
    pub resource: serde_json::Map<String, serde_json::Value>,
}

#[derive(Default)]
struct State {
    spans: Vec<ReceivedSpan>,
    /// (path, content-type, authorization) of every request.
    requests: Vec<(String, String, String)>,
}

pub struct OtlpReceiver {
    pub addr: std::net::SocketAddr,
    state: Arc<Mutex<State>>,
    refusing: Arc<AtomicBool>,
    _runtime: tokio::runtime::Runtime,
}

fn json(v: &Option<AnyValue>) -> serde_json::Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone().into(),
        Some(Value::BoolValue(b)) => (*b).into(),
        Some(Value::IntValue(i)) => (*i).into(),
        Some(Value::DoubleValue(d)) => (*d).into(),
        other => format!("{other:?}").into(),
    }
}

fn map(kvs: &[KeyValue]) -> serde_json::Map<String, serde_json::Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), json(&kv.value)))
        .collect()
}

impl OtlpReceiver {
    /// Serve on `listener` (e.g. bound in the test node's namespace).
    pub fn start(listener: std::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let state: Arc<Mutex<State>> = Arc::default();
        let refusing = Arc::new(AtomicBool::new(false));
        let (st, refuse) = (state.clone(), refusing.clone());
        let runtime = crate::http_fixture::serve_http1(listener, move |req| {
            let (st, refuse) = (st.clone(), refuse.clone());
            async move {
                let header = |n: &str| {
                    req.headers()
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                let seen = (
                    req.uri().path().to_string(),
                    header("content-type"),
                    header("authorization"),
                );
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                st.lock().unwrap().requests.push(seen);
                let status = if refuse.load(Ordering::Relaxed) {
                    503
                } else {
                    match body
                        .ok()
                        .and_then(|b| ExportTraceServiceRequest::decode(b).ok())
                    {
                        Some(export) => {
                            let mut got = Vec::new();
                            for rs in &export.resource_spans {
                                let resource = rs
                                    .resource
                                    .as_ref()
                                    .map(|r| map(&r.attributes))
                                    .unwrap_or_default();
                                for ss in &rs.scope_spans {
                                    for s in &ss.spans {
                                        got.push(ReceivedSpan {
                                            name: s.name.clone(),
                                            kind: s.kind,
                                            start_unix_nano: s.start_time_unix_nano,
                                            end_unix_nano: s.end_time_unix_nano,
                                            status_code: s.status.as_ref().map_or(0, |s| s.code),
                                            attributes: map(&s.attributes),
                                            resource: resource.clone(),
                                        });
                                    }
                                }
                            }
                            st.lock().unwrap().spans.extend(got);
                            200
                        }
                        None => 400,
                    }
                };
                Response::builder()
                    .status(status)
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
        });
        Self {
            addr,
            state,
            refusing,
            _runtime: runtime,
        }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state.lock().unwrap().spans.clone()
    }

    /// (path, content-type, authorization) of every request received.
    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Answer 503 to every export from now on (or stop).
    pub fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::Relaxed);
    }
}
