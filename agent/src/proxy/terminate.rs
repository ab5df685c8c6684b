//! TLS termination for governed provider hosts: the workload's TLS ends here
//! (leaf certificate from the node CA), its HTTP requests (h1 or h2) are
//! parsed by the provider's adapter, forwarded over pooled TLS connections to
//! the provider address it dialled, and every request leaves one audit line
//! and its token usage in the metrics.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Instant};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::{
    account::{budget_response, error_response, limited_response},
    metered::{Finish, Metered},
    send::{self, ProviderAddresses, ProviderEndpoint, Sent},
    upstream::{BoxError, ProxyBody, UpstreamPool},
};
use crate::{
    config::{CaptureConfig, TlsConfig},
    identity::Workload,
    policy::{
        RequestDecision, Subject,
        budgets::BudgetKey,
        credentials::{self, Credentials},
        gate::LimitStore,
        limits::{Estimate, LimitKey},
        spend::BudgetStore,
    },
    providers::{self, Api, ResponseParser, rewrite},
    telemetry::{
        events::{EventLog, RequestRecord, now_rfc3339},
        metrics::Metrics,
        redact,
    },
    tls::LeafCache,
};

/// What TLS termination needs, built once at startup when a CA is configured.
pub struct TlsContext {
    pub acceptor: TlsAcceptor,
    pub upstream: UpstreamPool,
    /// Timeouts and limits (`tls` section of the config).
    pub settings: TlsConfig,
    /// What request records capture beyond metadata (`audit.capture`).
    pub capture: CaptureConfig,
    /// Policy and prices, swapped on reload.
    pub live: crate::live::LiveRules,
    /// Workloads that rejected the node CA, relayed for a while.
    pub distrust: super::trust::Distrust,
    /// Limit buckets (kept across reloads; shared when state is Redis).
    pub limiter: Arc<LimitStore>,
    /// Provider keys for credential injection, re-read on change.
    pub credentials: Credentials,
    /// Spend per budget (kept across reloads; saved across restarts).
    pub budgets: Arc<BudgetStore>,
    /// Providers by id, and their known addresses: failover targets.
    pub endpoints: Vec<ProviderEndpoint>,
    pub addresses: ProviderAddresses,
}

impl TlsContext {
    pub fn new(
        leaves: Arc<LeafCache>,
        upstream: UpstreamPool,
        settings: TlsConfig,
        capture: CaptureConfig,
        live: crate::live::LiveRules,
        budgets: Arc<BudgetStore>,
        limiter: Arc<LimitStore>,
        endpoints: Vec<ProviderEndpoint>,
        addresses: ProviderAddresses,
    ) -> Self {
        let ca_rejected_retry = settings.ca_rejected_retry;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(leaves);
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
            upstream,
            settings,
            capture,
            live,
            limiter,
            distrust: super::trust::Distrust::new(ca_rejected_retry),
            credentials: Credentials::default(),
            budgets,
            endpoints,
            addresses,
        }
    }
}

/// The key a limit or budget with `per` counts `workload` under.
pub fn limit_key(workload: &Workload, per: LimitKey) -> String {
    match per {
        LimitKey::Workload => match &workload.kubernetes {
            Some(k) => format!("{}/{}", k.namespace, k.workload),
            None => workload.label().to_string(),
        },
        LimitKey::Namespace => match &workload.kubernetes {
            Some(k) => format!("namespace:{}", k.namespace),
            None => workload.label().to_string(),
        },
        LimitKey::Pod => workload
            .pod_uid
            .clone()
            .unwrap_or_else(|| workload.label().to_string()),
        LimitKey::Global => String::new(),
    }
}

impl CallMeta {
    /// The workload as of this request: a pod whose metadata arrived after
    /// its connection began is named from then on.
    pub fn workload_now(&self) -> Workload {
        let mut w = self.workload.clone();
        if w.kubernetes.is_none() {
            w.kubernetes = self.identity.pod_meta(&w);
        }
        w
    }

    /// OpenAI itself or Azure OpenAI (they name output limits their own way).
    pub fn openai_native(&self) -> bool {
        self.provider == "openai" || self.host.ends_with(".openai.azure.com")
    }
}

/// Output tokens reserved against a token limit for a request that names no
/// output limit: a typical chat answer; settled with the real count after.
const DEFAULT_OUTPUT_ESTIMATE: u64 = 1024;

/// Who and where, for every request on one connection.
pub struct CallMeta {
    pub workload: Workload,
    /// For pod metadata that arrives during the connection.
    pub identity: Arc<crate::identity::IdentityCache>,
    pub pid: u32,
    pub comm: String,
    pub provider: String,
    pub api: Api,
    pub host: String,
    pub upstream: SocketAddr,
}

/// Serve one terminated connection until the client closes it. Returns the
/// connection's result label (`terminated`, `client_tls_failed`).
pub async fn serve(
    tls: Arc<TlsContext>,
    events: EventLog,
    metrics: Arc<Metrics>,
    client: TcpStream,
    meta: CallMeta,
) -> &'static str {
    let stream = match tokio::time::timeout(
        tls.settings.client_hello_timeout,
        tls.acceptor.accept(client),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if super::trust::Distrust::is_rejection(&e) => {
            let observe = tls.settings.on_ca_rejected == crate::config::OnCaRejected::Observe;
            let first = observe && tls.distrust.mark(&meta.workload.cgroup, &meta.host);
            if first || !observe {
                tracing::warn!(workload = %meta.workload.label(), host = %meta.host, error = %e,
                    relayed_for = ?tls.settings.ca_rejected_retry, observe,
                    "the workload rejected the node CA's certificate; its calls are {} \
                     (make it trust the node CA: SSL_CERT_FILE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS)",
                    if observe { "relayed without inspection from now on" } else { "refused (tls.on_ca_rejected: terminate)" });
            }
            return "client_rejected_ca";
        }
        Ok(Err(e)) => {
            tracing::info!(workload = %meta.workload.label(), host = %meta.host, error = %e,
                "client TLS handshake failed");
            return "client_tls_failed";
        }
        Err(_) => return "client_tls_failed",
    };
    let call = Arc::new(Call {
        tls,
        events,
        metrics,
        meta,
    });
    let header_timeout = call.tls.settings.request_header_timeout;
    let svc = hyper::service::service_fn(move |req| forward(call.clone(), req));
    let mut server = auto::Builder::new(TokioExecutor::new());
    // Bounds a client can hit: a request head within the header timeout
    // (HTTP/1, slowloris), at most MAX_STREAMS concurrent h2 streams.
    server
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    server
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS);
    if let Err(e) = server.serve_connection(TokioIo::new(stream), svc).await {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
    "terminated"
}

/// Concurrent HTTP/2 streams per workload connection (an SDK opens a
/// handful; a flood of stream openings beyond is refused by the protocol).
const MAX_STREAMS: u32 = 128;

/// One terminated connection, shared by its requests.
pub(super) struct Call {
    pub tls: Arc<TlsContext>,
    pub events: EventLog,
    pub metrics: Arc<Metrics>,
    pub meta: CallMeta,
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for n in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        h.remove(n);
    }
}

async fn forward(
    call: Arc<Call>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let meta = &call.meta;
    let workload = meta.workload_now();
    let capture = &call.tls.capture;
    let mut record = RequestRecord {
        time: now_rfc3339(),
        kind: "request",
        id: uuid::Uuid::now_v7().to_string(),
        decision: "allow",
        reason: String::new(),
        routed_model: None,
        capped_output_tokens: None,
        retry_after_ms: None,
        credential_injected: false,
        attempts: Vec::new(),
        served_by: None,
        budget: None,
        workload: workload.clone(),
        pid: meta.pid,
        comm: meta.comm.clone(),
        provider: meta.provider.clone(),
        host: meta.host.clone(),
        method: req.method().to_string(),
        // Redacted: Gemini accepts the API key as `?key=`.
        path: redact::path(req.uri().path_and_query().map_or("/", |p| p.as_str())),
        operation: "other",
        model: None,
        response_model: None,
        stream: false,
        usage: Default::default(),
        client_http: format!("{:?}", req.version()),
        upstream: meta.upstream,
        status: 0,
        request_bytes: 0,
        response_bytes: 0,
        ttfb_ms: 0,
        ttft_ms: 0,
        duration_ms: 0,
        result: "ok",
        error: None,
        cost_usd: None,
        provider_request_id: None,
        request_headers: capture.headers.then(|| redact::headers(req.headers())),
        request_body: None,
        response_body: None,
    };
    // The unredacted target goes upstream; the record keeps the redacted one.
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());

    let (mut parts, body) = req.into_parts();
    // The adapter needs the whole request (model, stream flag); LLM requests
    // are bounded JSON documents, so reading them first costs an upload's time.
    let max_body = call.tls.settings.max_request_body;
    let body = match Limited::new(body, max_body).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            record.result = if too_big {
                record.decision = "deny";
                record.reason = "request_too_large".into();
                "request_too_large"
            } else {
                "client_error"
            };
            let (status, msg) = if too_big {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds {max_body} bytes (tls.max_request_body)"),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body failed: {e}"),
                )
            };
            return Ok(error_response(&call, status, &msg, record, started));
        }
    };
    record.request_bytes = body.len() as u64;
    if capture.bodies {
        record.request_body = Some(redact::body(&body, capture.max_body_bytes));
    }
    // Parsed once: the adapter, the input size and the output limit read it.
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    // A body declared JSON that is not (empty, cut short) is never sent on:
    // the provider would reject it, and HTTP/2 reports a stream the client
    // reset (CANCEL) as a body that simply ended — forwarding it would make
    // a flood of reset streams into billed provider calls.
    let declares_json = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if declares_json && json.is_none() {
        record.result = "client_error";
        let msg = if body.is_empty() {
            "the request declares a JSON body but sent none (or reset its stream); not forwarded"
        } else {
            "the request body is not valid JSON (cut short?); not forwarded"
        };
        return Ok(error_response(
            &call,
            StatusCode::BAD_REQUEST,
            msg,
            record,
            started,
        ));
    }
    let request = providers::parse_request_json(meta.api, &target, json.as_ref());
    let input_chars = json.as_ref().map_or(0, providers::input_chars);
    let asked_output = json.as_ref().and_then(providers::output_limit);
    drop(json);
    record.operation = request.operation;
    record.model = request.model;
    record.stream = request.stream;

    let subject = Subject {
        workload: &workload,
        comm: &meta.comm,
    };
    let decision =
        call.tls
            .live
            .load()
            .policy
            .request(subject, &meta.provider, record.model.as_deref());
    let (mut target, mut body) = (target, body);
    let mut admission = None;
    let failover;
    match decision {
        RequestDecision::Deny { reason, message } => {
            record.decision = "deny";
            record.reason = reason;
            record.result = "denied";
            return Ok(error_response(
                &call,
                StatusCode::FORBIDDEN,
                &message,
                record,
                started,
            ));
        }
        RequestDecision::Allow { reason, caps } => {
            record.reason = reason;
            let (path, rewritten, changed) = rewrite::apply(
                meta.api,
                &target,
                &body,
                caps.model.as_deref(),
                caps.max_output_tokens,
                meta.openai_native(),
            );
            target = path;
            if let Some(b) = rewritten {
                body = Bytes::from(b);
            }
            record.routed_model = changed.model;
            record.capped_output_tokens = changed.capped_output_tokens;
            failover = caps.failover;
            if let Some(max) = caps.max_request_bytes.filter(|m| body.len() > *m) {
                let message = format!(
                    "request body of {} bytes exceeds the {max} bytes policy {} allows",
                    body.len(),
                    record.reason
                );
                record.decision = "deny";
                record.reason = format!("{}:request_too_large", record.reason);
                record.result = "request_too_large";
                let status = StatusCode::PAYLOAD_TOO_LARGE;
                return Ok(error_response(&call, status, &message, record, started));
            }
            if let Some(h) = &caps.headers {
                h.apply(&mut parts.headers);
            }
            if let Some(file) = &caps.credential_file {
                match call.tls.credentials.get(file) {
                    Ok(key) => {
                        target = credentials::inject(
                            meta.api,
                            &meta.host,
                            &mut parts.headers,
                            &target,
                            &key,
                        );
                        record.credential_injected = true;
                    }
                    Err(e) => {
                        tracing::error!(rule = %record.reason, error = %e, "credential injection failed; the call is refused");
                        record.result = "credential_unavailable";
                        return Ok(error_response(
                            &call,
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!(
                                "the provider credential of policy {} is unavailable",
                                record.reason
                            ),
                            record,
                            started,
                        ));
                    }
                }
            }
            if let Some(config) = caps.budget {
                let b = BudgetKey {
                    rule: record.reason.clone(),
                    key: limit_key(&workload, config.per),
                    config,
                };
                if let Err(e) = call
                    .tls
                    .budgets
                    .check(&b, time::OffsetDateTime::now_utc())
                    .await
                {
                    return Ok(budget_response(&call, e, record, started));
                }
                record.budget = Some(b);
            }
            if let Some(limits) = caps.limits {
                let key = limit_key(&workload, limits.per);
                // Reserve what the call may use: its input from the text
                // size, its output up to the limit it asks for.
                // A cap the policy applied replaces what the request asked.
                let asked = match record.capped_output_tokens {
                    Some(cap) => Some(cap),
                    None => asked_output,
                };
                let est = Estimate {
                    input_tokens: input_chars.div_ceil(4),
                    output_tokens: asked.unwrap_or(DEFAULT_OUTPUT_ESTIMATE),
                };
                match call
                    .tls
                    .limiter
                    .admit(&record.reason, &key, &limits, est)
                    .await
                {
                    Ok(a) => admission = Some(a),
                    Err(limited) => {
                        return Ok(limited_response(&call, limited, record, started));
                    }
                }
            }
        }
    }

    // The pool speaks h2 to the provider when ALPN chose it, whatever the workload spoke.
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH); // recomputed from the buffered body
    let model = record.routed_model.clone().or_else(|| record.model.clone());
    let (endpoints, chain) = send::plan(&call, failover, model.as_deref());
    let mut attempts = Vec::new();
    let sent = send::send(
        &call,
        &parts,
        &target,
        body,
        &endpoints,
        chain.as_deref(),
        &mut attempts,
    )
    .await;
    if chain.is_some() {
        record.attempts = attempts;
    }
    match sent {
        Sent::Response(resp, ep) => {
            if ep.provider != meta.provider {
                record.served_by = Some(ep.provider.clone());
            }
            record.upstream = ep.addr;
            record.ttfb_ms = started.elapsed().as_millis() as u64;
            record.status = resp.status().as_u16();
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            record.provider_request_id = ["x-request-id", "request-id", "apim-request-id"]
                .iter()
                .find_map(|h| parts.headers.get(*h))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if let Ok(id) = HeaderValue::from_str(&record.id) {
                parts.headers.insert("x-tollgate-request-id", id);
            }
            let content_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let parser = ResponseParser::new(meta.api, content_type, input_chars);
            let body = Metered::new(
                body.map_err(BoxError::from).boxed(),
                started,
                parser,
                Finish {
                    call: call.clone(),
                    record,
                    admission,
                },
            );
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Sent::Failed {
            status,
            result,
            message,
        } => {
            record.result = result;
            Ok(error_response(&call, status, &message, record, started))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_connection_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-custom"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("authorization", HeaderValue::from_static("Bearer sk-test"));
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("authorization"));
    }
}
