//! TLS termination for governed provider hosts: the workload's TLS ends here
//! (leaf certificate from the node CA), its HTTP requests (h1 or h2) are
//! parsed by the provider's adapter, forwarded over pooled TLS connections to
//! the provider address it dialled, and every request leaves one audit line
//! and its token usage in the metrics.
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::upstream::{BoxError, ProxyBody, UpstreamPool};
use crate::{
    identity::Workload,
    providers::{self, Api, ResponseParser},
    telemetry::{
        events::{EventLog, RequestRecord, now_rfc3339},
        metrics::Metrics,
    },
    tls::LeafCache,
};

/// One governed provider, as termination sees it.
pub struct GovernedProvider {
    pub hosts: Vec<String>,
    pub api: Api,
}

/// What TLS termination needs, built once at startup when a CA is configured.
pub struct TlsContext {
    pub acceptor: TlsAcceptor,
    pub upstream: UpstreamPool,
    /// By provider id (config order).
    pub providers: Vec<GovernedProvider>,
    pub hello_timeout: Duration,
    pub response_timeout: Duration,
    pub max_request_body: usize,
    pub stream_idle_timeout: Duration,
}

impl TlsContext {
    pub fn new(
        leaves: Arc<LeafCache>,
        upstream: UpstreamPool,
        providers: Vec<GovernedProvider>,
        hello_timeout: Duration,
        response_timeout: Duration,
        max_request_body: usize,
        stream_idle_timeout: Duration,
    ) -> Self {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(leaves);
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let providers = providers
            .into_iter()
            .map(|p| GovernedProvider {
                hosts: p.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                api: p.api,
            })
            .collect();
        Self {
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
            upstream,
            providers,
            hello_timeout,
            response_timeout,
            max_request_body,
            stream_idle_timeout,
        }
    }

    /// Terminate a connection with this server name? Only for a configured
    /// provider host; returns that provider's id and API.
    ///
    /// The provider is the one the *name* belongs to, not the one the kernel
    /// map names for the dialled address: providers behind one CDN share
    /// addresses, and the map holds one provider per address. Connecting to
    /// the dialled (provider-map) address with this name is safe because the
    /// upstream handshake verifies the server really holds that name.
    pub fn governs(&self, sni: &str) -> Option<(u32, Api)> {
        let sni = sni.to_ascii_lowercase();
        self.providers
            .iter()
            .position(|p| p.hosts.contains(&sni))
            .map(|i| (i as u32, self.providers[i].api))
    }
}

/// Who and where, for every request on one connection.
pub struct CallMeta {
    pub workload: Workload,
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
    let stream = match tokio::time::timeout(tls.hello_timeout, tls.acceptor.accept(client)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            // Typically a workload that does not trust the node CA.
            tracing::info!(workload = %meta.workload.label(), host = %meta.host, error = %e,
                "client TLS handshake failed; does the workload trust the node CA (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS)?");
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
    let svc = hyper::service::service_fn(move |req| forward(call.clone(), req));
    if let Err(e) = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
    "terminated"
}

struct Call {
    tls: Arc<TlsContext>,
    events: EventLog,
    metrics: Arc<Metrics>,
    meta: CallMeta,
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
    let mut record = RequestRecord {
        time: now_rfc3339(),
        kind: "request",
        workload: meta.workload.clone(),
        pid: meta.pid,
        comm: meta.comm.clone(),
        provider: meta.provider.clone(),
        host: meta.host.clone(),
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into()),
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
    };

    let (mut parts, body) = req.into_parts();
    // The adapter needs the whole request (model, stream flag); LLM requests
    // are bounded JSON documents, so reading them first costs an upload's time.
    let body = match Limited::new(body, call.tls.max_request_body)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            record.result = if too_big {
                "request_too_large"
            } else {
                "client_error"
            };
            let (status, msg) = if too_big {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds {} bytes", call.tls.max_request_body),
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
    let request = providers::parse_request(meta.api, &record.path, &body);
    let input_chars = serde_json::from_slice(&body)
        .map(|v| providers::input_chars(&v))
        .unwrap_or(0);
    record.operation = request.operation;
    record.model = request.model;
    record.stream = request.stream;

    let authority = if meta.upstream.port() == 443 {
        meta.host.clone()
    } else {
        format!("{}:{}", meta.host, meta.upstream.port())
    };
    parts.uri = match Uri::builder()
        .scheme("https")
        .authority(authority.as_str())
        .path_and_query(record.path.as_str())
        .build()
    {
        Ok(u) => u,
        Err(e) => {
            record.result = "client_error";
            return Ok(error_response(
                &call,
                StatusCode::BAD_REQUEST,
                &format!("invalid request target: {e}"),
                record,
                started,
            ));
        }
    };
    // The pool speaks h2 to the provider when ALPN chose it, whatever the workload spoke.
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&authority).expect("validated host"),
    );
    parts.headers.remove(header::CONTENT_LENGTH); // recomputed from the buffered body

    let upstream_req = Request::from_parts(
        parts,
        Full::new(body).map_err(|never| match never {}).boxed(),
    );
    let client = call.tls.upstream.client(&meta.host, meta.upstream);
    match tokio::time::timeout(call.tls.response_timeout, client.request(upstream_req)).await {
        Ok(Ok(resp)) => {
            record.ttfb_ms = started.elapsed().as_millis() as u64;
            record.status = resp.status().as_u16();
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let content_type = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let parser = ResponseParser::new(meta.api, content_type, input_chars);
            let body = Metered {
                inner: body.map_err(BoxError::from).boxed(),
                idle: Box::pin(tokio::time::sleep(call.tls.stream_idle_timeout)),
                idle_timeout: call.tls.stream_idle_timeout,
                deferred_error: None,
                bytes: 0,
                first_byte: None,
                started,
                parser: Some(parser),
                finish: Some(Finish {
                    call: call.clone(),
                    record,
                }),
            };
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Ok(Err(e)) => {
            record.result = "upstream_error";
            let msg = format!("provider {} at {} failed: {e}", meta.host, meta.upstream);
            Ok(error_response(
                &call,
                StatusCode::BAD_GATEWAY,
                &msg,
                record,
                started,
            ))
        }
        Err(_) => {
            record.result = "upstream_timeout";
            let msg = format!(
                "provider {} sent no response within {:?}",
                meta.host, call.tls.response_timeout
            );
            Ok(error_response(
                &call,
                StatusCode::GATEWAY_TIMEOUT,
                &msg,
                record,
                started,
            ))
        }
    }
}

/// Write the audit record and the metrics of one finished request.
fn account(call: &Call, record: &RequestRecord, started: Instant, ttft: Option<Duration>) {
    let m = &call.metrics;
    let workload = record.workload.label().to_string();
    let model = m.model_label(
        &record.provider,
        record.response_model.as_deref().or(record.model.as_deref()),
    );
    let labels = [workload.as_str(), record.provider.as_str(), model.as_str()];
    let class = format!("{}xx", record.status / 100);
    m.requests
        .with_label_values(&[&workload, &record.provider, &model, &class, record.result])
        .inc();
    m.operation_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    if let (true, Some(t)) = (record.stream, ttft) {
        m.time_to_first_token
            .with_label_values(&labels)
            .observe(t.as_secs_f64());
    }
    let u = &record.usage;
    if u.input_tokens + u.output_tokens > 0 {
        for (kind, n) in [("input", u.input_tokens), ("output", u.output_tokens)] {
            m.token_usage
                .with_label_values(&[&workload, &record.provider, &model, kind])
                .observe(n as f64);
        }
        for (kind, n) in [
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cached_input", u.cached_input_tokens),
            ("reasoning", u.reasoning_tokens),
        ] {
            m.tokens
                .with_label_values(&[&workload, &record.provider, &model, kind])
                .inc_by(n);
        }
    }
    call.events.record(record);
}

/// An error the proxy itself answers, shaped like a provider error (OpenAI's
/// `{"error": {...}}`, which SDKs of every OpenAI-compatible API parse).
fn error_response(
    call: &Call,
    status: StatusCode,
    message: &str,
    mut record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    record.status = status.as_u16();
    record.duration_ms = started.elapsed().as_millis() as u64;
    record.error = Some(message.to_string());
    account(call, &record, started, None);
    let body = serde_json::json!({
        "error": { "message": format!("tollgate: {message}"), "type": "tollgate_error", "code": record.result }
    })
    .to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-tollgate-reason", record.result)
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response is valid")
}

/// How long a failed stream's already-received events get to reach the
/// workload before the failure is reported (see `Metered::fail_after_flush`).
/// Long against a local flush, short against a human noticing.
const FLUSH_GRACE: Duration = Duration::from_millis(100);

/// What to do when a response body ends.
struct Finish {
    call: Arc<Call>,
    record: RequestRecord,
}

/// The response body on its way to the workload: relayed frame by frame (no
/// buffering), each data frame shown to the provider's usage parser, and the
/// request accounted exactly once when the body ends, fails, or is dropped
/// early (the client went away mid-stream: partial usage is still recorded).
struct Metered {
    inner: ProxyBody,
    /// Fires when the provider sends nothing for `idle_timeout`; reset by each frame.
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_timeout: Duration,
    /// An error to report on the next poll (see `fail_after_flush`).
    deferred_error: Option<BoxError>,
    bytes: u64,
    first_byte: Option<Duration>,
    started: Instant,
    parser: Option<ResponseParser>,
    finish: Option<Finish>,
}

impl Metered {
    /// Report `e` only after a short grace. When a body fails, hyper resets
    /// the stream (h2) or drops the connection (h1), and frames still queued
    /// for the workload are discarded; when the provider's last events and
    /// its failure arrive together, the workload would lose events it is
    /// owed. The grace lets the connection flush them first.
    fn fail_after_flush(
        &mut self,
        e: BoxError,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.deferred_error = Some(e);
        let deadline = tokio::time::Instant::now() + FLUSH_GRACE;
        self.idle.as_mut().reset(deadline);
        // Register the timer with this task so it wakes us.
        let _ = self.idle.as_mut().poll(cx);
        Poll::Pending
    }

    fn finish(&mut self, result: &'static str, error: Option<String>) {
        let Some(Finish { call, mut record }) = self.finish.take() else {
            return;
        };
        if let Some(p) = self.parser.take() {
            let info = p.finish();
            record.usage = info.usage;
            record.response_model = info.response_model;
        }
        record.response_bytes = self.bytes;
        record.ttft_ms = self.first_byte.map_or(0, |d| d.as_millis() as u64);
        record.duration_ms = self.started.elapsed().as_millis() as u64;
        record.result = result;
        record.error = error;
        account(&call, &record, self.started, self.first_byte);
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.deferred_error.is_some() {
            // Waiting out the flush grace (see fail_after_flush).
            if self.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            return Poll::Ready(self.deferred_error.take().map(Err));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = tokio::time::Instant::now() + self.idle_timeout;
                self.idle.as_mut().reset(deadline);
                if let Some(d) = frame.data_ref() {
                    if self.first_byte.is_none() && !d.is_empty() {
                        self.first_byte = Some(self.started.elapsed());
                    }
                    self.bytes += d.len() as u64;
                    let d = d.clone();
                    if let Some(p) = self.parser.as_mut() {
                        p.feed(&d);
                    }
                }
                // hyper stops polling once a body says it has ended (e.g. a
                // content-length body whose last byte just came), so "ended"
                // must be noticed here, not only at a final None.
                if self.inner.is_end_stream() {
                    self.finish("ok", None);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.finish("upstream_error", Some(e.to_string()));
                self.fail_after_flush(e, cx)
            }
            Poll::Ready(None) => {
                self.finish("ok", None);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if self.idle.as_mut().poll(cx).is_ready() {
                    // A provider that stops mid-stream would hold the workload
                    // forever: end the stream with an error, keep the usage seen.
                    let msg = format!("provider sent nothing for {:?}", self.idle_timeout);
                    self.finish("upstream_idle_timeout", Some(msg.clone()));
                    return self.fail_after_flush(msg.into(), cx);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // Dropped before the end: the client stopped reading.
        self.finish("client_disconnected", None);
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
