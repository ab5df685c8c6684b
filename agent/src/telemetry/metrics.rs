//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoint.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    /// Relayed connections by workload, provider and result.
    pub connections: IntCounterVec,
    /// Bytes relayed by workload, provider and direction (`sent` = to provider).
    pub bytes: IntCounterVec,
    /// Kernel program events (redirected, passed_no_listener, …), copied at scrape time.
    pub kernel_events: IntGaugeVec,
    pub provider_addresses: IntGauge,
    pub namespaces: IntGauge,
    pub active_connections: IntGauge,
    /// Audit records the log writer could not keep up with or could not write.
    pub audit_dropped: IntGauge,
    /// OpenTelemetry GenAI `gen_ai.client.token.usage`, by token type.
    pub token_usage: HistogramVec,
    /// OpenTelemetry GenAI `gen_ai.client.operation.duration`.
    pub operation_duration: HistogramVec,
    /// Time to first response byte of streamed calls (first token).
    pub time_to_first_token: HistogramVec,
    /// Token totals (sums are what budgets and dashboards read).
    pub tokens: IntCounterVec,
    /// Requests by status class and result.
    pub requests: IntCounterVec,
    /// USD spent, from the price table.
    pub cost: CounterVec,
    /// MCP messages by server, method, tool and result.
    pub mcp_calls: IntCounterVec,
    /// How long MCP calls took, answer included.
    pub mcp_call_duration: HistogramVec,
    /// Responses streaming to workloads now.
    pub active_streams: IntGauge,
    /// Failed provider calls by kind (transport failures, 429, 5xx).
    pub upstream_errors: IntCounterVec,
    /// Requests by decision (`allow`, `deny`) and reason.
    pub decisions: IntCounterVec,
    /// Config reloads by result (`applied`, `rejected`).
    pub config_reloads: IntCounterVec,
    /// Rules of the policy in force.
    pub policy_rules: IntGauge,
    /// Budget spend by rule, key and period (set at scrape time).
    pub budget_spent: prometheus::GaugeVec,
    /// Soft budget limits reached, by rule and period.
    pub budget_soft_reached: IntCounterVec,
    /// Shared-state (Redis) failures; each decision fell back to local spend.
    pub state_errors: prometheus::IntCounter,
    /// Provider (address, port) pairs learned from workloads' DNS answers
    /// and still valid (set at scrape time).
    pub dns_learned: IntGauge,
    /// Pods of this node whose metadata the agent holds (set at scrape time).
    pub kubernetes_pods: IntGauge,
    /// Failed list/watch calls to the Kubernetes API (each retried).
    pub kubernetes_watch_errors: prometheus::IntCounter,
    /// Distinct model label values per provider; beyond the cap, `other`.
    models: std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>,
    /// Set once programs are attached and the first DNS round is done.
    pub ready: AtomicBool,
    /// `ready` as a metric (1 or 0, set at scrape time), for alerts.
    ready_gauge: IntGauge,
    /// OTLP spans by result: exported, failed, dropped (set at scrape time).
    pub otlp_spans: IntGaugeVec,
}

/// Models named in metric labels per provider. The model is whatever a
/// workload sends, so it is capped: a client sending random names cannot
/// blow up the metrics' cardinality.
const MAX_MODELS_PER_PROVIDER: usize = 64;

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let connections = IntCounterVec::new(
            Opts::new(
                "tollgate_connections_total",
                "Provider connections handled by the proxy",
            ),
            &["namespace", "workload", "pod", "provider", "result"],
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "tollgate_relay_bytes_total",
                "Bytes relayed between workloads and providers",
            ),
            &["namespace", "workload", "pod", "provider", "direction"],
        )
        .expect("valid metric");
        let kernel_events = IntGaugeVec::new(
            Opts::new(
                "tollgate_ebpf_events",
                "Decisions of the kernel connect hooks since the programs were loaded",
            ),
            &["event"],
        )
        .expect("valid metric");
        let provider_addresses = IntGauge::new(
            "tollgate_provider_map_entries",
            "(address, port) entries in the kernel provider map",
        )
        .expect("valid metric");
        let namespaces = IntGauge::new(
            "tollgate_workload_namespaces",
            "Network namespaces with a proxy listener",
        )
        .expect("valid metric");
        let active_connections = IntGauge::new(
            "tollgate_active_connections",
            "Connections being relayed now",
        )
        .expect("valid metric");
        let audit_dropped = IntGauge::new(
            "tollgate_audit_records_dropped_total",
            "Audit records dropped because the writer fell behind or the write failed",
        )
        .expect("valid metric");
        let labels = ["namespace", "workload", "pod", "provider", "model"];
        // Buckets as the OpenTelemetry GenAI semantic conventions advise.
        let token_usage = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_token_usage",
                "Tokens used per call, by token type",
            )
            .buckets(vec![
                1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
                4194304.0,
            ]),
            &[
                "namespace",
                "workload",
                "pod",
                "provider",
                "model",
                "gen_ai_token_type",
            ],
        )
        .expect("valid metric");
        let duration_buckets = vec![
            0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
        ];
        let operation_duration = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_operation_duration_seconds",
                "Duration of provider calls",
            )
            .buckets(duration_buckets.clone()),
            &labels,
        )
        .expect("valid metric");
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_server_time_to_first_token_seconds",
                "Time to the first streamed response byte",
            )
            .buckets(duration_buckets),
            &labels,
        )
        .expect("valid metric");
        let tokens = IntCounterVec::new(
            Opts::new(
                "tollgate_tokens_total",
                "Tokens used, by type (input includes cached, output includes reasoning)",
            ),
            &[
                "namespace",
                "workload",
                "pod",
                "provider",
                "model",
                "token_type",
            ],
        )
        .expect("valid metric");
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Provider requests handled by the terminating proxy",
            ),
            &[
                "namespace",
                "workload",
                "pod",
                "provider",
                "model",
                "status_class",
                "result",
            ],
        )
        .expect("valid metric");
        let mcp_calls = IntCounterVec::new(
            Opts::new(
                "tollgate_mcp_calls_total",
                "MCP messages of workloads, by server, method, tool and result",
            ),
            &[
                "namespace",
                "workload",
                "pod",
                "server",
                "method",
                "tool",
                "result",
            ],
        )
        .expect("valid metric");
        let mcp_call_duration = HistogramVec::new(
            prometheus::HistogramOpts::new(
                "tollgate_mcp_call_duration_seconds",
                "Duration of MCP calls, from the request to the end of the answer",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["namespace", "workload", "pod", "server", "method"],
        )
        .expect("valid metric");
        let cost = CounterVec::new(
            Opts::new(
                "tollgate_cost_usd_total",
                "Spend in USD at the configured price table",
            ),
            &labels,
        )
        .expect("valid metric");
        let active_streams = IntGauge::new(
            "tollgate_active_streams",
            "Streamed responses being relayed to workloads now",
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_errors_total",
                "Failed provider calls: upstream_error, upstream_timeout, upstream_idle_timeout, status_429, status_5xx",
            ),
            &["provider", "kind"],
        )
        .expect("valid metric");
        let decisions = IntCounterVec::new(
            Opts::new(
                "tollgate_decisions_total",
                "Requests by governance decision and its reason",
            ),
            &["provider", "decision", "reason"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "tollgate_config_reloads_total",
                "Config reloads: applied, or rejected (the running policy stays)",
            ),
            &["result"],
        )
        .expect("valid metric");
        // Both series from the start, at 0: an alert on `increase(…)` sees
        // the first rejection (a series born at 1 has no increase).
        for result in ["applied", "rejected"] {
            config_reloads.with_label_values(&[result]);
        }
        let policy_rules = IntGauge::new("tollgate_policy_rules", "Rules of the policy in force")
            .expect("valid metric");
        let budget_spent = prometheus::GaugeVec::new(
            Opts::new(
                "tollgate_budget_spent_usd",
                "Spend charged to policy budgets in the current period",
            ),
            &["rule", "key", "period"],
        )
        .expect("valid metric");
        let budget_soft_reached = IntCounterVec::new(
            Opts::new(
                "tollgate_budget_soft_limit_reached_total",
                "Budgets that crossed their soft share",
            ),
            &["rule", "period"],
        )
        .expect("valid metric");
        let state_errors = prometheus::IntCounter::new(
            "tollgate_state_errors_total",
            "Shared state (Redis) requests that failed or timed out; decided with this node's spend",
        )
        .expect("valid metric");
        let dns_learned = IntGauge::new(
            "tollgate_dns_learned_addresses",
            "Provider (address, port) pairs learned from workloads' DNS answers, still valid",
        )
        .expect("valid metric");
        let kubernetes_pods = IntGauge::new(
            "tollgate_kubernetes_pods",
            "Pods of this node whose metadata (namespace, owner, labels) the agent holds",
        )
        .expect("valid metric");
        let kubernetes_watch_errors = prometheus::IntCounter::new(
            "tollgate_kubernetes_watch_errors_total",
            "Failed list/watch calls to the Kubernetes API; each is retried with backoff",
        )
        .expect("valid metric");
        let ready_gauge = IntGauge::new(
            "tollgate_ready",
            "1 once programs are attached and the first DNS round is done (what /readyz answers), else 0",
        )
        .expect("valid metric");
        let otlp_spans = IntGaugeVec::new(
            Opts::new(
                "tollgate_otlp_spans_total",
                "OpenTelemetry spans (one per call) by result: exported, failed (collector refused or unreachable), dropped (queue full)",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(otlp_spans.clone()),
            Box::new(ready_gauge.clone()),
            Box::new(kubernetes_pods.clone()),
            Box::new(dns_learned.clone()),
            Box::new(kubernetes_watch_errors.clone()),
            Box::new(bytes.clone()),
            Box::new(kernel_events.clone()),
            Box::new(provider_addresses.clone()),
            Box::new(namespaces.clone()),
            Box::new(active_connections.clone()),
            Box::new(audit_dropped.clone()),
            Box::new(token_usage.clone()),
            Box::new(operation_duration.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(tokens.clone()),
            Box::new(requests.clone()),
            Box::new(cost.clone()),
            Box::new(mcp_calls.clone()),
            Box::new(mcp_call_duration.clone()),
            Box::new(active_streams.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(decisions.clone()),
            Box::new(config_reloads.clone()),
            Box::new(policy_rules.clone()),
            Box::new(budget_spent.clone()),
            Box::new(budget_soft_reached.clone()),
            Box::new(state_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Arc::new(Self {
            registry,
            connections,
            bytes,
            kernel_events,
            provider_addresses,
            namespaces,
            active_connections,
            audit_dropped,
            token_usage,
            operation_duration,
            time_to_first_token,
            tokens,
            requests,
            cost,
            mcp_calls,
            mcp_call_duration,
            active_streams,
            upstream_errors,
            decisions,
            config_reloads,
            policy_rules,
            budget_spent,
            budget_soft_reached,
            state_errors,
            kubernetes_pods,
            kubernetes_watch_errors,
            dns_learned,
            models: Default::default(),
            ready: AtomicBool::new(false),
            ready_gauge,
            otlp_spans,
        })
    }

    /// The label to use for `model` of `provider` (bounded, see MAX_MODELS_PER_PROVIDER).
    pub fn model_label(&self, provider: &str, model: Option<&str>) -> String {
        let Some(model) = model else {
            return "unknown".into();
        };
        let mut models = self
            .models
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seen = models.entry(provider.to_string()).or_default();
        if seen.contains(model) || seen.len() < MAX_MODELS_PER_PROVIDER {
            seen.insert(model.to_string());
            model.to_string()
        } else {
            "other".into()
        }
    }

    pub fn render(&self) -> String {
        self.ready_gauge
            .set(i64::from(self.ready.load(Ordering::Relaxed)));
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// What the endpoint asks of the rest of the agent.
pub struct Hooks {
    /// Refresh gauges copied from elsewhere (kernel counters, budgets).
    pub before_scrape: Box<dyn Fn() + Send + Sync>,
    /// The JSON of `/status` (`tollgate status`).
    pub status: Box<dyn Fn() -> String + Send + Sync>,
    /// When set, `/metrics` and `/status` need `Authorization: Bearer <token>`;
    /// `/healthz` and `/readyz` (probes, no data) never do.
    pub token: Option<super::token::BearerToken>,
}

/// Serve the endpoint until the task is aborted.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    hooks: Arc<Hooks>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        let hooks = hooks.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let hooks = hooks.clone();
                async move {
                    let authorized = hooks.token.as_ref().is_none_or(|t| {
                        t.admits(
                            req.headers()
                                .get(hyper::header::AUTHORIZATION)
                                .map(|v| v.as_bytes()),
                        )
                    });
                    Ok::<_, Infallible>(route(req.uri().path(), authorized, &metrics, &hooks))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `authorized`: the request carried the token, or none is required.
fn route(path: &str, authorized: bool, metrics: &Metrics, hooks: &Hooks) -> Response<Full<Bytes>> {
    let mut content_type = "text/plain; version=0.0.4";
    if !authorized && matches!(path, "/metrics" | "/status") {
        return Response::builder()
            .status(401)
            .header("content-type", content_type)
            .header("www-authenticate", "Bearer realm=\"tollgate\"")
            .body(Full::new(Bytes::from(
                "unauthorized: /metrics and /status need `Authorization: Bearer <token>`, the token in the agent's metrics.bearer_token_file (`tollgate status --token-file`)\n",
            )))
            .expect("static response is valid");
    }
    let (status, body) = match path {
        "/metrics" => {
            (hooks.before_scrape)();
            (200, metrics.render())
        }
        "/status" => {
            content_type = "application/json";
            (200, (hooks.status)())
        }
        "/healthz" => (200, "ok\n".to_string()),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => (200, "ready\n".to_string()),
        "/readyz" => (
            503,
            "not ready: programs or provider addresses not loaded yet\n".to_string(),
        ),
        _ => (
            404,
            "not found: try /metrics, /healthz, /readyz or /status\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop() -> Hooks {
        Hooks {
            before_scrape: Box::new(|| {}),
            status: Box::new(|| "{}".into()),
            token: None,
        }
    }

    #[test]
    fn without_the_token_only_the_probes_answer() {
        let m = Metrics::new();
        m.ready.store(true, Ordering::Relaxed);
        for (path, authorized, want) in [
            ("/metrics", false, 401),
            ("/status", false, 401),
            ("/healthz", false, 200),
            ("/readyz", false, 200),
            ("/metrics", true, 200),
            ("/status", true, 200),
        ] {
            let r = route(path, authorized, &m, &noop());
            assert_eq!(r.status(), want, "{path} authorized={authorized}");
        }
        let r = route("/metrics", false, &m, &noop());
        assert!(r.headers().contains_key("www-authenticate"));
    }

    #[test]
    fn renders_and_routes() {
        let m = Metrics::new();
        m.connections
            .with_label_values(&["team-a", "Deployment/chat", "chat-1", "openai", "ok"])
            .inc();
        let r = route("/metrics", true, &m, &noop());
        assert_eq!(r.status(), 200);
        assert!(m.render().contains(
            "tollgate_connections_total{namespace=\"team-a\",pod=\"chat-1\",provider=\"openai\",result=\"ok\",workload=\"Deployment/chat\"} 1"
        ));
        assert_eq!(route("/readyz", true, &m, &noop()).status(), 503);
        m.ready.store(true, Ordering::Relaxed);
        assert_eq!(route("/readyz", true, &m, &noop()).status(), 200);
        assert_eq!(route("/nope", true, &m, &noop()).status(), 404);
    }

    #[test]
    fn model_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_MODELS_PER_PROVIDER {
            assert_eq!(
                m.model_label("openai", Some(&format!("m{i}"))),
                format!("m{i}")
            );
        }
        assert_eq!(m.model_label("openai", Some("one-too-many")), "other");
        assert_eq!(
            m.model_label("openai", Some("m0")),
            "m0",
            "known models keep their label"
        );
        assert_eq!(
            m.model_label("anthropic", Some("fresh")),
            "fresh",
            "per provider"
        );
        assert_eq!(m.model_label("openai", None), "unknown");
    }
}
