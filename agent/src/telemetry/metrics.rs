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
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

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
    /// Set once programs are attached and the first DNS round is done.
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let connections = IntCounterVec::new(
            Opts::new(
                "tollgate_connections_total",
                "Provider connections handled by the proxy",
            ),
            &["workload", "provider", "result"],
        )
        .expect("valid metric");
        let bytes = IntCounterVec::new(
            Opts::new(
                "tollgate_relay_bytes_total",
                "Bytes relayed between workloads and providers",
            ),
            &["workload", "provider", "direction"],
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
        for c in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(bytes.clone()),
            Box::new(kernel_events.clone()),
            Box::new(provider_addresses.clone()),
            Box::new(namespaces.clone()),
            Box::new(active_connections.clone()),
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
            ready: AtomicBool::new(false),
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// Serve the endpoint until the task is aborted. `before_scrape` refreshes
/// gauges copied from the kernel.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    before_scrape: Arc<dyn Fn() + Send + Sync>,
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
        let before = before_scrape.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                let before = before.clone();
                async move { Ok::<_, Infallible>(route(req.uri().path(), &metrics, &*before)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(
    path: &str,
    metrics: &Metrics,
    before: &(dyn Fn() + Send + Sync),
) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" => {
            before();
            (200, metrics.render())
        }
        "/healthz" => (200, "ok\n".to_string()),
        "/readyz" if metrics.ready.load(Ordering::Relaxed) => (200, "ready\n".to_string()),
        "/readyz" => (
            503,
            "not ready: programs or provider addresses not loaded yet\n".to_string(),
        ),
        _ => (
            404,
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(body)))
        .expect("static response is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_routes() {
        let m = Metrics::new();
        m.connections
            .with_label_values(&["w", "openai", "ok"])
            .inc();
        let r = route("/metrics", &m, &|| {});
        assert_eq!(r.status(), 200);
        assert!(m.render().contains(
            "tollgate_connections_total{provider=\"openai\",result=\"ok\",workload=\"w\"} 1"
        ));
        assert_eq!(route("/readyz", &m, &|| {}).status(), 503);
        m.ready.store(true, Ordering::Relaxed);
        assert_eq!(route("/readyz", &m, &|| {}).status(), 200);
        assert_eq!(route("/nope", &m, &|| {}).status(), 404);
    }
}
