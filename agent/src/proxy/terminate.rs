//! TLS termination for governed provider hosts: the workload's TLS ends here
//! (leaf certificate from the node CA) and its HTTP requests (h1 or h2) are
//! served, each by `forward`, until the client closes the connection (or
//! upgrades it: a Realtime WebSocket session).
use std::sync::Arc;

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpStream;

use super::{
    context::{Call, CallMeta, Termination},
    forward::forward,
};
use crate::telemetry::{events::EventLog, metrics::Metrics, records::ConnectionResult};

/// Serve one terminated connection until the client closes it.
pub async fn serve(
    tls: Arc<Termination>,
    events: EventLog,
    metrics: Arc<Metrics>,
    client: TcpStream,
    meta: CallMeta,
) -> ConnectionResult {
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
            return ConnectionResult::ClientRejectedCa;
        }
        Ok(Err(e)) => {
            tracing::info!(workload = %meta.workload.label(), host = %meta.host, error = %e,
                "client TLS handshake failed");
            return ConnectionResult::ClientTlsFailed;
        }
        Err(_) => return ConnectionResult::ClientTlsFailed,
    };
    let call = Arc::new(Call {
        tls,
        events,
        metrics,
        meta,
    });
    let header_timeout = call.tls.settings.request_header_timeout;
    let max_head = call.tls.settings.max_request_head;
    // Boxed: hyper keeps a slot for the service's future, as large as the
    // future, for the connection's whole life; unboxed, a request's state
    // (some 14 KiB) was held by every idle kept-alive connection. Boxed, it
    // is allocated per request and freed with it.
    let svc = hyper::service::service_fn(move |req| Box::pin(forward(call.clone(), req)));
    let mut server = auto::Builder::new(TokioExecutor::new());
    // Bounds a client can hit: a request head within the header timeout
    // (HTTP/1, slowloris), at most MAX_STREAMS concurrent h2 streams.
    server
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        // Also the read buffer an idle kept-alive connection holds.
        .max_buf_size(max_head);
    server
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        // RFC 8441: a WebSocket (a Realtime session) on an h2 stream.
        .enable_connect_protocol();
    if let Err(e) = server
        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
    ConnectionResult::Terminated
}

/// Concurrent HTTP/2 streams per workload connection (an SDK opens a
/// handful; a flood of stream openings beyond is refused by the protocol).
const MAX_STREAMS: u32 = 128;
