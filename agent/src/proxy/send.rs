//! Sending a terminated request upstream: to the provider address the
//! workload dialled, or along the rule's failover chain when that attempt
//! fails before its response starts (`policy::failover`).
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use super::{context::Call, pooled::UpstreamBody, upstream::UpstreamError};
use crate::{
    policy::{FailoverChain, remove_credentials},
    providers::{Upstream, rewrite},
    telemetry::records::{Attempt, AttemptResult, Outcome},
};

/// Where one attempt goes.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    pub provider: String,
    pub host: String,
    pub addr: SocketAddr,
    /// Model to ask for instead of the request's (a failover target's).
    pub model: Option<String>,
    pub credential_file: Option<std::path::PathBuf>,
    /// Not the target the call was made to: without its own key it gets
    /// no credential (never the workload's or the rule's).
    pub moved: bool,
}

/// How a send ended.
// One per request, moved once and never stored: boxing the response would
// only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Sent {
    /// The response to relay (possibly a provider error when no retry was left).
    Response(Response<UpstreamBody>, Endpoint),
    /// No response: status and result for the workload's error.
    Failed {
        status: StatusCode,
        result: Outcome,
        message: String,
    },
}

/// The attempts to make: the dialled endpoint, or the chain's plan (the
/// chain is handed back when it applies to this call).
pub(super) fn plan(
    call: &Call,
    chain: Option<Arc<FailoverChain>>,
    model: Option<&str>,
) -> (Vec<Endpoint>, Option<Arc<FailoverChain>>) {
    let meta = &call.meta;
    let dialled = Endpoint {
        provider: meta.provider.clone(),
        host: meta.host.clone(),
        addr: meta.upstream,
        model: None,
        credential_file: None,
        moved: false,
    };
    let Some(chain) = chain else {
        return (vec![dialled], None);
    };
    let targets = chain.plan(&meta.provider, model);
    if targets.is_empty() {
        return (vec![dialled], None);
    }
    let upstreams = &call.tls.upstreams;
    let addresses = upstreams.addresses.load();
    let endpoints = targets
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            if i == 0 {
                // The call's own target: where the workload was going.
                return Some(Endpoint {
                    credential_file: t.credential_file.clone(),
                    ..dialled.clone()
                });
            }
            let id = upstreams
                .endpoints
                .iter()
                .position(|p| p.name == t.provider)?;
            let p = &upstreams.endpoints[id];
            let ips = addresses.get(id)?;
            // Same address family as the workload used, if the provider has one.
            let ip = ips
                .iter()
                .find(|ip| ip.is_ipv4() == meta.upstream.is_ipv4())
                .or(ips.first())?;
            let port = if p.ports.contains(&meta.upstream.port()) {
                meta.upstream.port()
            } else {
                *p.ports.first()?
            };
            Some(Endpoint {
                provider: p.name.clone(),
                host: p.host.clone(),
                addr: SocketAddr::new(*ip, port),
                model: Some(t.model.clone()),
                credential_file: t.credential_file.clone(),
                moved: true,
            })
        })
        .collect();
    (endpoints, Some(chain))
}

/// Send `parts` + `body` to `endpoints` in turn until one answers without
/// a retryable failure (or the chain's attempts or deadline run out).
pub(super) async fn send(
    call: &Call,
    parts: &http::request::Parts,
    path: &str,
    body: Bytes,
    endpoints: &[Endpoint],
    chain: Option<&FailoverChain>,
    attempts: &mut Vec<Attempt>,
) -> Sent {
    let started = Instant::now();
    let response_timeout = call.tls.settings.upstream_response_timeout;
    let deadline = chain.map_or(response_timeout, |c| c.deadline);
    let mut last = Sent::Failed {
        status: StatusCode::BAD_GATEWAY,
        result: Outcome::UpstreamError,
        message: "no provider address for any failover target".into(),
    };
    for (n, ep) in endpoints.iter().enumerate() {
        let more = n + 1 < endpoints.len();
        if n > 0 {
            let wait = chain.map_or(Duration::ZERO, |c| c.backoff_before(n as u32 + 1));
            if started.elapsed() + wait >= deadline {
                break;
            }
            tokio::time::sleep(wait).await;
        }
        let req = match build(call, parts, path, &body, ep).await {
            Ok(r) => r,
            Err(message) => {
                return Sent::Failed {
                    status: StatusCode::BAD_REQUEST,
                    result: Outcome::ClientError,
                    message,
                };
            }
        };
        let t0 = Instant::now();
        let left = deadline
            .saturating_sub(started.elapsed())
            .min(response_timeout);
        let mut attempt = Attempt {
            provider: ep.provider.clone(),
            host: ep.host.clone(),
            upstream: ep.addr,
            model: ep.model.clone(),
            status: 0,
            result: AttemptResult::Ok,
            ms: 0,
        };
        let pool = &call.tls.upstreams.pool;
        let request = pool.request(&call.meta.netns, &ep.host, ep.addr, req);
        let outcome = tokio::time::timeout(left, request).await;
        attempt.ms = t0.elapsed().as_millis() as u64;
        match outcome {
            Ok(Ok(resp)) => {
                let status = resp.status();
                attempt.status = status.as_u16();
                let retryable = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
                if retryable && more && chain.is_some() {
                    // Its body is dropped unread: the workload never sees it.
                    attempt.result = AttemptResult::Retried;
                    attempts.push(attempt);
                    continue;
                }
                attempts.push(attempt);
                return Sent::Response(resp, ep.clone());
            }
            Ok(Err(UpstreamError::InvalidHost(e))) => {
                tracing::error!(provider = %ep.provider, error = %e, "a provider target cannot be dialled");
                attempt.result = AttemptResult::UpstreamError;
                last = Sent::Failed {
                    status: StatusCode::BAD_GATEWAY,
                    result: Outcome::UpstreamError,
                    message: format!("provider {} cannot be dialled: {e}", ep.provider),
                };
            }
            Ok(Err(e)) => {
                attempt.result = AttemptResult::UpstreamError;
                last = Sent::Failed {
                    status: StatusCode::BAD_GATEWAY,
                    result: Outcome::UpstreamError,
                    message: format!("provider {} at {} failed: {e}", ep.host, ep.addr),
                };
            }
            Err(_) => {
                attempt.result = AttemptResult::UpstreamTimeout;
                last = Sent::Failed {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    result: Outcome::UpstreamTimeout,
                    message: format!(
                        "provider {} sent no response within {left:?} (tls.upstream_response_timeout or the failover deadline)",
                        ep.host
                    ),
                };
            }
        }
        attempts.push(attempt);
        if chain.is_none() {
            break;
        }
    }
    last
}

/// The request for one endpoint: its authority, its model, its credentials.
async fn build(
    call: &Call,
    parts: &http::request::Parts,
    path: &str,
    body: &Bytes,
    ep: &Endpoint,
) -> Result<Request<super::upstream::ProxyBody>, String> {
    let authority = if ep.addr.port() == 443 {
        ep.host.clone()
    } else {
        format!("{}:{}", ep.host, ep.addr.port())
    };
    let mut headers = parts.headers.clone();
    let mut path = path.to_string();
    let mut body = body.clone();
    let adapter = call.meta.adapter;
    let to = Upstream {
        provider: &ep.provider,
        host: &ep.host,
    };
    if let Some(model) = &ep.model {
        let (p, b, _) = rewrite::apply(adapter, to, &path, &body, Some(model), None, None);
        path = p;
        if let Some(b) = b {
            body = Bytes::from(b);
        }
    }
    // Set before the credential: a SigV4 signature covers it.
    headers.insert(
        header::HOST,
        HeaderValue::from_str(&authority).map_err(|e| e.to_string())?,
    );
    // SigV4 covers the host and the region: a Bedrock call moved to
    // another endpoint is signed again, for it, with the target's keys.
    if ep.moved && ep.credential_file.is_none() && adapter.api() == crate::providers::Api::Bedrock {
        return Err(format!(
            "a Bedrock call moved to {} must be signed again for it: give that failover target a credential_file (AWS keys or a web identity)",
            ep.host
        ));
    }
    if let Some(file) = &ep.credential_file {
        call.tls
            .enforcer
            .credential(
                adapter,
                to,
                file,
                parts.method.as_str(),
                &mut path,
                &mut headers,
                &body,
            )
            .await?;
    } else if ep.moved {
        path = remove_credentials(&mut headers, &path);
    }
    // Origin-form: the connection is the provider's already, and the
    // Host header (set above) names it.
    let uri = Uri::builder()
        .path_and_query(path.as_str())
        .build()
        .map_err(|e| format!("invalid request target: {e}"))?;
    let mut req = Request::new(Full::new(body).map_err(|never| match never {}).boxed());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}
