//! TLS termination for governed provider hosts: the workload's TLS ends here
//! (leaf certificate from the node CA), its HTTP requests (h1 or h2) are
//! forwarded over pooled TLS connections to the provider address it dialled,
//! and every request leaves one audit line.
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::upstream::{ProxyBody, UpstreamPool};
use crate::{
    identity::Workload,
    telemetry::events::{EventLog, RequestRecord, now_rfc3339},
    tls::LeafCache,
};

/// What TLS termination needs, built once at startup when a CA is configured.
pub struct TlsContext {
    pub acceptor: TlsAcceptor,
    pub leaves: Arc<LeafCache>,
    pub upstream: UpstreamPool,
    /// Host names per provider id: a connection is terminated only when its
    /// SNI is a host of the provider whose address it dialled.
    pub provider_hosts: Vec<Vec<String>>,
    pub hello_timeout: Duration,
    pub response_timeout: Duration,
}

impl TlsContext {
    pub fn new(
        leaves: Arc<LeafCache>,
        upstream: UpstreamPool,
        provider_hosts: Vec<Vec<String>>,
        hello_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(leaves.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
            leaves,
            upstream,
            provider_hosts: provider_hosts
                .into_iter()
                .map(|hs| hs.into_iter().map(|h| h.to_ascii_lowercase()).collect())
                .collect(),
            hello_timeout,
            response_timeout,
        }
    }

    /// Terminate this connection? Only for a host of the dialled provider.
    pub fn governs(&self, provider_id: u32, sni: &str) -> bool {
        let sni = sni.to_ascii_lowercase();
        self.provider_hosts
            .get(provider_id as usize)
            .is_some_and(|hs| hs.contains(&sni))
    }
}

/// Who and where, for every request on one connection.
pub struct CallMeta {
    pub workload: Workload,
    pub pid: u32,
    pub comm: String,
    pub provider: String,
    pub host: String,
    pub upstream: SocketAddr,
}

/// Serve one terminated connection until the client closes it. Returns the
/// connection's result label (`terminated`, `client_tls_failed`).
pub async fn serve(
    tls: Arc<TlsContext>,
    events: EventLog,
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
    let meta = Arc::new(meta);
    let svc = hyper::service::service_fn(move |req| {
        forward(tls.clone(), events.clone(), meta.clone(), req)
    });
    if let Err(e) = auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
    "terminated"
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
    tls: Arc<TlsContext>,
    events: EventLog,
    meta: Arc<CallMeta>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
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
        client_http: format!("{:?}", req.version()),
        upstream: meta.upstream,
        status: 0,
        request_bytes: 0,
        response_bytes: 0,
        ttfb_ms: 0,
        duration_ms: 0,
        result: "ok",
        error: None,
    };

    let (mut parts, body) = req.into_parts();
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
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                &format!("invalid request target: {e}"),
                &events,
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

    let sent = Arc::new(AtomicU64::new(0));
    let body = Metered {
        inner: body.boxed(),
        bytes: sent.clone(),
        on_end: None,
    }
    .boxed();
    let client = tls.upstream.client(&meta.host, meta.upstream);
    let response = tokio::time::timeout(
        tls.response_timeout,
        client.request(Request::from_parts(parts, body)),
    )
    .await;
    record.request_bytes = sent.load(Ordering::Relaxed);
    match response {
        Ok(Ok(resp)) => {
            record.ttfb_ms = started.elapsed().as_millis() as u64;
            record.status = resp.status().as_u16();
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let received = Arc::new(AtomicU64::new(0));
            let on_end: OnEnd = Box::new(move |bytes, result, error| {
                record.response_bytes = bytes;
                record.request_bytes = sent.load(Ordering::Relaxed);
                record.duration_ms = started.elapsed().as_millis() as u64;
                record.result = result;
                record.error = error;
                events.record(&record);
            });
            let body = Metered {
                inner: body.boxed(),
                bytes: received,
                on_end: Some(on_end),
            };
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Ok(Err(e)) => {
            record.result = "upstream_error";
            let msg = format!("provider {} at {} failed: {e}", meta.host, meta.upstream);
            Ok(error_response(
                StatusCode::BAD_GATEWAY,
                &msg,
                &events,
                record,
                started,
            ))
        }
        Err(_) => {
            record.result = "upstream_timeout";
            let msg = format!(
                "provider {} sent no response within {:?}",
                meta.host, tls.response_timeout
            );
            Ok(error_response(
                StatusCode::GATEWAY_TIMEOUT,
                &msg,
                &events,
                record,
                started,
            ))
        }
    }
}

/// An error the proxy itself answers, shaped like a provider error (OpenAI's
/// `{"error": {...}}`, which SDKs of every OpenAI-compatible API parse).
fn error_response(
    status: StatusCode,
    message: &str,
    events: &EventLog,
    mut record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    record.status = status.as_u16();
    record.duration_ms = started.elapsed().as_millis() as u64;
    record.error = Some(message.to_string());
    events.record(&record);
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

type OnEnd = Box<dyn FnOnce(u64, &'static str, Option<String>) + Send + Sync>;

/// A body that counts its data bytes and reports once when it ends, fails,
/// or is dropped early (the client went away mid-response).
struct Metered {
    inner: ProxyBody,
    bytes: Arc<AtomicU64>,
    on_end: Option<OnEnd>,
}

impl Metered {
    fn finish(&mut self, result: &'static str, error: Option<String>) {
        if let Some(f) = self.on_end.take() {
            f(self.bytes.load(Ordering::Relaxed), result, error);
        }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                // hyper stops polling once a body says it has ended (e.g. a
                // content-length body whose last byte just came), so "ended"
                // must be noticed here, not only at a final None.
                if self.inner.is_end_stream() {
                    self.finish("ok", None);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let msg = e.to_string();
                self.finish("upstream_error", Some(msg));
            }
            Poll::Ready(None) => self.finish("ok", None),
            Poll::Pending => {}
        }
        polled
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
