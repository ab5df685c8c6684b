//! OpenTelemetry export: one span per terminated call, named and attributed
//! by the OpenTelemetry GenAI semantic conventions, sent to an OTLP/HTTP
//! (protobuf) collector with the official `opentelemetry-otlp` exporter.
//!
//! The data path only builds the span and hands it to the SDK's batch
//! processor, whose bounded queue drops (and counts) spans when the
//! collector is slower than the calls; export runs on the processor's own
//! thread, never on a proxy task. Spans are built from the audit record,
//! after the call, with its real start and end times, so the span and the
//! record always agree.
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use opentelemetry::{
    KeyValue,
    trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _},
};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, SpanData},
};
use serde::{Deserialize, Serialize};

use super::records::{Decision, McpExchange, Outcome, RequestRecord};
use crate::providers::mcp_response::Outcome as McpOutcome;

/// `otlp:` in the config.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// OTLP/HTTP collector (protobuf), e.g. `http://otel-collector.monitoring:4318`;
    /// `/v1/traces` is added when the URL has no path. Empty (the default): no export.
    pub endpoint: String,
    /// HTTP headers sent with every export (e.g. `authorization`).
    pub headers: BTreeMap<String, String>,
    /// How long one export may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Spans waiting for export; beyond it new spans are dropped (counted in
    /// `tollgate_otlp_spans_total{result="dropped"}`), calls never wait.
    pub max_queue: usize,
    /// Spans per export request.
    pub max_batch: usize,
    /// Longest a span waits for its batch to fill.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub batch_delay: Duration,
    /// PEM file of the CA an `https` collector's certificate chains to.
    /// Empty: the system's roots.
    pub ca_file: String,
    /// `service.name` of the exported resource.
    pub service_name: String,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
            max_queue: 4096,
            max_batch: 512,
            batch_delay: Duration::from_secs(2),
            ca_file: String::new(),
            service_name: "tollgate".into(),
        }
    }
}

impl OtlpConfig {
    pub fn enabled(&self) -> bool {
        !self.endpoint.is_empty()
    }

    /// The traces URL: `endpoint`, with `/v1/traces` when it has no path.
    pub fn traces_url(&self) -> Result<http::Uri, (&'static str, String)> {
        let uri: http::Uri = self.endpoint.parse().map_err(|e| {
            (
                "endpoint",
                format!(
                    "`{}` is not a URL ({e}); e.g. http://otel-collector:4318",
                    self.endpoint
                ),
            )
        })?;
        match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(_)) => {}
            _ => {
                return Err((
                    "endpoint",
                    format!(
                        "`{}` must be an http:// or https:// URL with a host (OTLP/HTTP; gRPC is not supported)",
                        self.endpoint
                    ),
                ));
            }
        }
        if uri.path() == "/" && !self.endpoint.ends_with('/') {
            return format!("{}/v1/traces", self.endpoint)
                .parse()
                .map_err(|e| ("endpoint", format!("{e}")));
        }
        Ok(uri)
    }

    /// Field and message of the first thing wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        self.traces_url()?;
        if self.max_queue == 0 || self.max_batch == 0 {
            return Err((
                "max_queue",
                "max_queue and max_batch must be at least 1".into(),
            ));
        }
        if self.max_batch > self.max_queue {
            return Err((
                "max_batch",
                format!("must not exceed max_queue ({})", self.max_queue),
            ));
        }
        if self.timeout.is_zero() || self.batch_delay.is_zero() {
            return Err((
                "timeout",
                "timeout and batch_delay must be greater than zero".into(),
            ));
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                return Err(("headers", format!("`{name}` is not a valid HTTP header")));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("otlp.{0}: {1}")]
    Config(&'static str, String),
    #[error("otlp: building the HTTP client failed: {0}")]
    Client(String),
    #[error("otlp: building the exporter failed: {0}")]
    Exporter(String),
}

/// Spans exported, failed (the collector refused or was unreachable) and
/// dropped (queue full), for `tollgate_otlp_spans_total`.
#[derive(Debug, Default)]
pub struct SpanCounts {
    pub exported: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// The exporter, counting what became of each batch.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    counts: Arc<SpanCounts>,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Counted<E>
{
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => self.counts.exported.fetch_add(n, Ordering::Relaxed),
            Err(e) => {
                if self.counts.failed.fetch_add(n, Ordering::Relaxed) == 0 {
                    tracing::warn!(error = %e, "OTLP export failed; spans are being lost (tollgate_otlp_spans_total{{result=\"failed\"}})");
                }
                0
            }
        };
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// One span per call, to the collector.
pub struct Spans {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    pub counts: Arc<SpanCounts>,
    queued: AtomicU64,
    max_queue: u64,
}

impl Spans {
    /// Build the exporter for `cfg` (export on). `node`: this node's name,
    /// a resource attribute; `tls`: how to verify an `https` collector.
    pub fn start(
        cfg: &OtlpConfig,
        node: &str,
        tls: rustls::ClientConfig,
    ) -> Result<Arc<Spans>, OtlpError> {
        cfg.validate().map_err(|(f, m)| OtlpError::Config(f, m))?;
        let url = cfg.traces_url().map_err(|(f, m)| OtlpError::Config(f, m))?;
        let client = http_client(cfg, tls)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(url.to_string())
            .with_timeout(cfg.timeout)
            .with_headers(cfg.headers.clone().into_iter().collect())
            .build()
            .map_err(|e| OtlpError::Exporter(e.to_string()))?;
        let counts = Arc::new(SpanCounts::default());
        let processor = BatchSpanProcessor::builder(Counted {
            inner: exporter,
            counts: counts.clone(),
        })
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(cfg.max_queue)
                .with_max_export_batch_size(cfg.max_batch)
                .with_scheduled_delay(cfg.batch_delay)
                .build(),
        )
        .build();
        let resource = Resource::builder_empty()
            .with_service_name(cfg.service_name.clone())
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("k8s.node.name", node.to_string()),
                KeyValue::new("host.name", node.to_string()),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("tollgate");
        tracing::info!(endpoint = %url, "exporting one OpenTelemetry span per call (OTLP/HTTP)");
        Ok(Arc::new(Spans {
            tracer,
            provider,
            counts,
            queued: AtomicU64::new(0),
            max_queue: cfg.max_queue as u64,
        }))
    }

    /// Hand the span of one finished call to the batch processor.
    pub fn record(&self, r: &RequestRecord) {
        // The SDK drops silently when its queue is full; count it here: a
        // span is queued until exported or failed.
        let done = self.counts.exported.load(Ordering::Relaxed)
            + self.counts.failed.load(Ordering::Relaxed);
        let queued = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        if queued.saturating_sub(done) > self.max_queue {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let end = SystemTime::now();
        let start = end
            .checked_sub(Duration::from_millis(r.duration_ms))
            .unwrap_or(end);
        let mut span = self
            .tracer
            .span_builder(span_name(r))
            .with_kind(SpanKind::Client)
            .with_start_time(start)
            .with_attributes(attributes(r))
            .start(&self.tracer);
        if r.result != Outcome::Ok || r.status >= 400 {
            span.set_status(Status::error(r.result.as_str()));
        }
        span.end_with_timestamp(end);
    }

    /// Export what is queued and stop (at agent shutdown; blocks up to
    /// the export timeout, so call it off the runtime).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OTLP: flushing spans at shutdown failed");
        }
    }
}

/// The exporter's HTTP client: reqwest's blocking client (the batch
/// processor runs export on its own thread) on the agent's rustls setup
/// (ring) given as `tls`. Built on a plain thread: reqwest's blocking
/// client may not be created inside the agent's async runtime.
fn http_client(
    cfg: &OtlpConfig,
    mut tls: rustls::ClientConfig,
) -> Result<reqwest::blocking::Client, OtlpError> {
    // reqwest is built without HTTP/2 here: offer only what it speaks.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let timeout = cfg.timeout;
    std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .build()
            .map_err(|e| OtlpError::Client(e.to_string()))
    })
    .join()
    .map_err(|_| OtlpError::Client("the client builder panicked".into()))?
}

/// `{gen_ai.operation.name} {gen_ai.request.model}`, as the conventions name spans.
/// An MCP call's span is `{mcp.method.name} {tool or prompt}` (the MCP conventions).
fn span_name(r: &RequestRecord) -> String {
    if let Some(x) = &r.mcp {
        let method = x.method.as_deref().unwrap_or(r.method.as_str());
        return match x.tool.as_deref().or(x.prompt.as_deref()) {
            Some(target) => format!("{method} {target}"),
            None => method.to_owned(),
        };
    }
    match &r.model {
        Some(m) => format!("{} {m}", r.operation),
        None => r.operation.as_str().to_owned(),
    }
}

/// The span's attributes: GenAI conventions, server and HTTP, Kubernetes
/// (of the calling pod: one agent serves many pods, so these are span
/// attributes, not the resource's), and Tollgate's own.
fn attributes(r: &RequestRecord) -> Vec<KeyValue> {
    let operation = match r.mcp.as_ref().and_then(|x| x.method.as_deref()) {
        Some("tools/call") => "execute_tool",
        _ => r.operation.as_str(),
    };
    let mut a = vec![
        KeyValue::new("gen_ai.operation.name", operation),
        KeyValue::new("gen_ai.provider.name", r.provider.clone()),
        KeyValue::new("server.address", r.host.clone()),
        KeyValue::new("server.port", i64::from(r.upstream.port())),
        KeyValue::new("http.request.method", r.method.clone()),
        KeyValue::new("http.response.status_code", i64::from(r.status)),
        KeyValue::new("tollgate.call.id", r.id.clone()),
        KeyValue::new("tollgate.decision", r.decision.as_str()),
        KeyValue::new("tollgate.reason", r.reason.clone()),
        KeyValue::new("tollgate.result", r.result.as_str()),
        KeyValue::new("tollgate.stream", r.stream),
    ];
    if let Some(m) = &r.model {
        a.push(KeyValue::new("gen_ai.request.model", m.clone()));
    }
    if let Some(m) = &r.response_model {
        a.push(KeyValue::new("gen_ai.response.model", m.clone()));
    }
    if let Some(x) = &r.mcp {
        mcp_attributes(x, &mut a);
    } else if r.decision == Decision::Allow && r.result == Outcome::Ok {
        let u = &r.usage;
        a.push(KeyValue::new(
            "gen_ai.usage.input_tokens",
            u.input_tokens as i64,
        ));
        a.push(KeyValue::new(
            "gen_ai.usage.output_tokens",
            u.output_tokens as i64,
        ));
        if u.cached_input_tokens > 0 {
            a.push(KeyValue::new(
                "gen_ai.usage.cache_read.input_tokens",
                u.cached_input_tokens as i64,
            ));
        }
        if u.estimated {
            a.push(KeyValue::new("tollgate.usage.estimated", true));
        }
    }
    if let Some(c) = r.cost_usd {
        a.push(KeyValue::new("tollgate.cost_usd", c));
    }
    if r.stream && r.ttft_ms > 0 {
        a.push(KeyValue::new("tollgate.ttft_ms", r.ttft_ms as i64));
    }
    let tool_failed = r.mcp.as_ref().and_then(|x| x.answered.outcome);
    if r.result != Outcome::Ok {
        a.push(KeyValue::new("error.type", r.result.as_str()));
    } else if let Some(o @ (McpOutcome::Error | McpOutcome::ToolError)) = tool_failed {
        a.push(KeyValue::new(
            "error.type",
            match o {
                McpOutcome::ToolError => "tool_error",
                _ => "jsonrpc_error",
            },
        ));
    } else if r.status >= 400 {
        a.push(KeyValue::new("error.type", r.status.to_string()));
    }
    if let Some(k) = &r.workload.kubernetes {
        a.push(KeyValue::new("k8s.namespace.name", k.namespace.clone()));
        a.push(KeyValue::new("k8s.pod.name", k.name.clone()));
        a.push(KeyValue::new("k8s.pod.uid", k.uid.clone()));
        if let Some(key) = owner_key(&k.workload.kind) {
            a.push(KeyValue::new(key, k.workload.name.clone()));
        }
    } else if let Some(uid) = &r.workload.pod_uid {
        a.push(KeyValue::new("k8s.pod.uid", uid.clone()));
    }
    a
}

/// The MCP conventions' attributes of a call (the session as Tollgate
/// records it, a digest, under a name of its own: it is not the id).
fn mcp_attributes(x: &McpExchange, a: &mut Vec<KeyValue>) {
    let text = |k: &'static str, v: &Option<String>| v.clone().map(|v| KeyValue::new(k, v));
    a.extend(
        [
            text("mcp.method.name", &x.method),
            text("gen_ai.tool.name", &x.tool),
            text("gen_ai.prompt.name", &x.prompt),
            text("mcp.resource.uri", &x.resource),
            text("mcp.protocol.version", &x.protocol_version),
            text("jsonrpc.request.id", &x.id),
            text("tollgate.mcp.session", &x.session),
        ]
        .into_iter()
        .flatten(),
    );
    if let Some(code) = x.answered.error_code {
        a.push(KeyValue::new("rpc.jsonrpc.error_code", code));
    }
}

/// The conventions' attribute for a pod's owner workload.
fn owner_key(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Deployment" => "k8s.deployment.name",
        "StatefulSet" => "k8s.statefulset.name",
        "DaemonSet" => "k8s.daemonset.name",
        "Job" => "k8s.job.name",
        "CronJob" => "k8s.cronjob.name",
        "ReplicaSet" => "k8s.replicaset.name",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(endpoint: &str) -> OtlpConfig {
        OtlpConfig {
            endpoint: endpoint.into(),
            ..OtlpConfig::default()
        }
    }

    #[test]
    fn endpoints() {
        for (endpoint, want) in [
            (
                "http://collector:4318",
                Ok("http://collector:4318/v1/traces"),
            ),
            (
                "https://c.example/otlp/v1/traces",
                Ok("https://c.example/otlp/v1/traces"),
            ),
            ("http://collector:4318/", Ok("http://collector:4318/")),
            ("collector:4317", Err("endpoint")),
            ("grpc://collector:4317", Err("endpoint")),
            ("not a url", Err("endpoint")),
        ] {
            let got = cfg(endpoint).traces_url();
            match want {
                Ok(url) => assert_eq!(got.unwrap().to_string(), url, "{endpoint}"),
                Err(field) => assert_eq!(got.unwrap_err().0, field, "{endpoint}"),
            }
        }
    }

    #[test]
    fn validation() {
        assert!(OtlpConfig::default().validate().is_ok(), "off is valid");
        let mut c = cfg("http://collector:4318");
        assert!(c.validate().is_ok());
        c.max_batch = c.max_queue + 1;
        assert_eq!(c.validate().unwrap_err().0, "max_batch");
        let mut c = cfg("http://collector:4318");
        c.headers.insert("bad header".into(), "x".into());
        assert_eq!(c.validate().unwrap_err().0, "headers");
        let mut c = cfg("http://collector:4318");
        c.timeout = Duration::ZERO;
        assert_eq!(c.validate().unwrap_err().0, "timeout");
    }

    #[test]
    fn mcp_calls_carry_the_mcp_conventions() {
        let x = McpExchange {
            method: Some("tools/call".into()),
            id: Some("3".into()),
            tool: Some("add".into()),
            protocol_version: Some("2026-07-28".into()),
            answered: crate::providers::mcp_response::Answered {
                error_code: Some(-32602),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut a = Vec::new();
        mcp_attributes(&x, &mut a);
        let get = |k: &str| {
            a.iter()
                .find(|kv| kv.key.as_str() == k)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(get("mcp.method.name").as_deref(), Some("tools/call"));
        assert_eq!(get("gen_ai.tool.name").as_deref(), Some("add"));
        assert_eq!(get("jsonrpc.request.id").as_deref(), Some("3"));
        assert_eq!(get("rpc.jsonrpc.error_code").as_deref(), Some("-32602"));
        assert_eq!(get("gen_ai.prompt.name"), None);
    }

    #[test]
    fn owner_attributes() {
        assert_eq!(owner_key("Deployment"), Some("k8s.deployment.name"));
        assert_eq!(owner_key("Job"), Some("k8s.job.name"));
        assert_eq!(owner_key("Node"), None);
    }
}
