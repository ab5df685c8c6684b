//! A Realtime session: a WebSocket opened on a terminated connection
//! (OpenAI `/v1/realtime`, Azure `/openai/realtime`), by an HTTP/1.1
//! upgrade or an HTTP/2 extended CONNECT. The handshake is admitted like any call (rule, operation `realtime`, model from the
//! URL, credential, limits, budget), sent on a provider connection of its
//! own, and once both sides have switched protocols its frames are relayed
//! both ways as they come, each flushed at once. Each `response.done`
//! adds its usage to the session and settles that response's share of the
//! rule's budget and limits, taking the next one's: a budget spent or a
//! limit reached mid-session ends the session with a Realtime `error`
//! event and a close frame. One audit record per session, with every
//! response's usage.
use std::{sync::Arc, time::Instant};

use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
    },
};

use super::{
    account,
    context::Call,
    forward, rescue,
    upstream::{BoxError, ProxyBody},
};
use crate::{
    identity::Workload,
    policy::{BudgetHold, Hold, LimitRenewal},
    providers::realtime::{ServerEvent, error_event, server_event},
    telemetry::records::{Outcome, RealtimeSession, RequestRecord},
};

/// How the workload opens its WebSocket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Handshake {
    /// HTTP/1.1 `GET` with `Upgrade: websocket` (RFC 6455), answered 101.
    Upgrade,
    /// HTTP/2 extended CONNECT with `:protocol = websocket` (RFC 8441) on a
    /// stream of the workload's h2 connection, answered 200.
    ExtendedConnect,
}

/// Is this request a WebSocket handshake, and of which kind?
pub(super) fn handshake<B>(req: &Request<B>) -> Option<Handshake> {
    let upgrade = req.version() == Version::HTTP_11
        && req.method() == http::Method::GET
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connect = req.version() == Version::HTTP_2
        && req.method() == http::Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    match (upgrade, connect) {
        (true, _) => Some(Handshake::Upgrade),
        (_, true) => Some(Handshake::ExtendedConnect),
        _ => None,
    }
}

/// The provider is always asked with an HTTP/1.1 upgrade (what every
/// Realtime endpoint takes). A workload's own upgrade goes as it came; for
/// an extended CONNECT Tollgate makes the upgrade's headers, with a key of
/// its own whose accept it checks (returned). Extensions are never offered
/// upstream: frames are relayed decoded, and the framing crate speaks none
/// (permessage-deflate would leave compressed frames it cannot read), so
/// none is negotiated and the workload's answer names none (RFC 6455 §9.1).
fn upstream_headers(kind: Handshake, headers: &mut HeaderMap, host: &str) -> Option<String> {
    headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    if kind == Handshake::Upgrade {
        return None;
    }
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    if let (false, Ok(h)) = (
        headers.contains_key(header::HOST),
        HeaderValue::from_str(host),
    ) {
        headers.insert(header::HOST, h);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(
        header::SEC_WEBSOCKET_VERSION,
        HeaderValue::from_static("13"),
    );
    if let Ok(k) = HeaderValue::from_str(&key) {
        headers.insert(header::SEC_WEBSOCKET_KEY, k);
    }
    Some(key)
}

/// The provider's `101` as the workload's answer: as it came for an
/// upgrade; for an extended CONNECT a `200` without the upgrade's own
/// headers (hyper drops the connection-specific ones on h2).
fn client_answer(kind: Handshake, parts: &mut http::response::Parts) {
    if kind == Handshake::ExtendedConnect {
        parts.status = StatusCode::OK;
        parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        forward::strip_hop_by_hop(&mut parts.headers);
    }
}

/// Admit the handshake, make it upstream, and hand the workload the
/// provider's answer: its `101 Switching Protocols` (`200` to an extended
/// CONNECT; the session then runs on a task of its own), its refusal, or
/// the proxy's own.
pub(super) async fn session(
    call: Arc<Call>,
    mut req: Request<Incoming>,
    kind: Handshake,
    workload: &Workload,
    mut record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    let client_upgrade = hyper::upgrade::on(&mut req);
    // An h2 request names its host in `:authority`, not in a Host header.
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let (mut parts, _) = req.into_parts();
    // SDKs send their default `content-type: application/json` on the
    // handshake too; it has no body to be JSON, so admission does not see it.
    let content_type = parts.headers.remove(header::CONTENT_TYPE);
    let headers = std::mem::take(&mut parts.headers);
    let proposed = forward::Proposed {
        target,
        headers,
        body: Bytes::new(),
        asks_stream_usage: false,
        mcp_tools: None,
    };
    tracing::debug!(id = %record.id, workload = %workload.label(), ?kind, "realtime handshake: admitting");
    let (verdict, _) = forward::admit(&call, workload, &mut record, proposed).await;
    let admitted = match verdict {
        Ok(a) => a,
        Err(refusal) => return rescue::refused(&call, &refusal, record, started),
    };
    record.routed_model = admitted.routed_model;
    record.credential_injected = admitted.credential_injected;
    let (budget, hold, renewal) = (admitted.budget, admitted.hold, admitted.renewal);
    // Its usage so far is unknown if the agent is killed during it.
    let routed = record.routed_model.as_deref();
    forward::journal_begin(&call, &record, routed, 0, budget.as_ref());

    // A connection of its own: an upgraded connection is never pooled.
    let meta = &call.meta;
    record.upstream = meta.upstream;
    let io = match call
        .tls
        .upstreams
        .pool
        .connect_http1(&meta.netns, &meta.host, meta.upstream)
        .await
    {
        Ok(io) => io,
        Err(e) => return upstream_failed(&call, record, started, e.to_string()),
    };
    tracing::debug!(id = %record.id, upstream = %meta.upstream, "realtime handshake: provider connected");
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(c) => c,
        Err(e) => return upstream_failed(&call, record, started, e.to_string()),
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "realtime provider connection ended with an error");
        }
    });
    let mut upstream_req = Request::new(
        http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *upstream_req.method_mut() = http::Method::GET;
    *upstream_req.uri_mut() = match admitted.target.parse() {
        Ok(u) => u,
        Err(e) => return upstream_failed(&call, record, started, format!("target: {e}")),
    };
    let mut headers = admitted.headers;
    let host = authority.as_deref().unwrap_or(&meta.host);
    let our_key = upstream_headers(kind, &mut headers, host);
    *upstream_req.headers_mut() = headers;
    if let Some(ct) = content_type {
        upstream_req.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    // The 101 is the provider's response head: waited for as any call's is.
    let waited = call.tls.settings.upstream_response_timeout;
    let mut resp = match tokio::time::timeout(waited, sender.send_request(upstream_req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return upstream_failed(&call, record, started, e.to_string()),
        Err(_) => {
            return rescue::failed(
                &call,
                StatusCode::GATEWAY_TIMEOUT,
                Outcome::UpstreamTimeout,
                format!(
                    "the provider did not answer the Realtime handshake within {waited:?} (tls.upstream_response_timeout)"
                ),
                record,
                started,
            );
        }
    };
    record.ttfb_ms = started.elapsed().as_millis() as u64;
    record.status = resp.status().as_u16();
    tracing::debug!(id = %record.id, status = record.status, ms = record.ttfb_ms, "realtime handshake: provider answered");
    forward::response_ids(&mut record, resp.headers_mut());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The provider refused the session (a bad key, an unknown model):
        // its answer goes to the workload as it is, recorded.
        record.duration_ms = started.elapsed().as_millis() as u64;
        finish(&call, record, budget, hold, started);
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, body.map_err(BoxError::from).boxed());
    }
    if let Some(key) = our_key {
        let accept = resp.headers().get(header::SEC_WEBSOCKET_ACCEPT);
        let expected = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        if accept.and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            let why = "its Sec-WebSocket-Accept does not answer Tollgate's key".to_string();
            return upstream_failed(&call, record, started, why);
        }
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    client_answer(kind, &mut parts);
    record.status = parts.status.as_u16();
    let session = Session {
        call: call.clone(),
        record,
        budget,
        hold,
        renewal,
        started,
    };
    tokio::spawn(async move {
        match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok((client, provider)) => session.relay(client, provider).await,
            Err(e) => session.end(Outcome::ClientError, "error", Some(e.to_string())),
        }
    });
    Response::from_parts(
        parts,
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}

fn upstream_failed(
    call: &Call,
    record: RequestRecord,
    started: Instant,
    message: String,
) -> Response<ProxyBody> {
    rescue::failed(
        call,
        StatusCode::BAD_GATEWAY,
        Outcome::UpstreamError,
        format!("the Realtime session could not be opened at the provider: {message}"),
        record,
        started,
    )
}

/// A session whose upgrade went through on both sides.
struct Session {
    call: Arc<Call>,
    record: RequestRecord,
    budget: Option<BudgetHold>,
    /// The current response's hold on the rule's limits (the session's
    /// first, then one per response), and how to take the next.
    hold: Option<Hold>,
    renewal: Option<LimitRenewal>,
    started: Instant,
}

/// Why Tollgate ends a session: the Realtime `error` event's code, the
/// record's result, and the message.
struct Ended {
    code: &'static str,
    result: Outcome,
    message: String,
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Each frame written as soon as it is sent (no write buffer: nothing is
/// held back), a small read buffer (tungstenite's default is 128 KiB per
/// direction per leg, idle sessions would keep half a MiB each), and
/// tungstenite's own bounds on messages (64 MiB) and frames (16 MiB):
/// above the Realtime API's 15 MiB audio appends.
fn ws_config() -> Option<WebSocketConfig> {
    Some(
        WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0),
    )
}

impl Session {
    async fn relay(mut self, client: hyper::upgrade::Upgraded, provider: hyper::upgrade::Upgraded) {
        let mut client = Ws::from_raw_socket(TokioIo::new(client), Role::Server, ws_config()).await;
        let mut provider =
            Ws::from_raw_socket(TokioIo::new(provider), Role::Client, ws_config()).await;
        let mut tally = RealtimeSession::default();
        let (result, ended_by, error) = loop {
            tokio::select! {
                m = client.next() => match m {
                    Some(Ok(Message::Close(frame))) => {
                        let _ = provider.send(Message::Close(frame)).await;
                        break (Outcome::Ok, "client", None);
                    }
                    // Each leg keeps its own connection alive.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(m)) => {
                        tally.client_frames += 1;
                        self.record.request_bytes += m.len() as u64;
                        if let Err(e) = provider.send(m).await {
                            break (Outcome::UpstreamError, "provider", Some(e.to_string()));
                        }
                    }
                    Some(Err(e)) => break (Outcome::ClientError, "client", Some(e.to_string())),
                    None => break (Outcome::Ok, "client", None),
                },
                m = provider.next() => match m {
                    Some(Ok(Message::Close(frame))) => {
                        let _ = client.send(Message::Close(frame)).await;
                        break (Outcome::Ok, "provider", None);
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(m)) => {
                        tally.server_frames += 1;
                        self.record.response_bytes += m.len() as u64;
                        let event = match &m {
                            Message::Text(t) => server_event(t.as_str()),
                            _ => ServerEvent::Other,
                        };
                        if let Err(e) = client.send(m).await {
                            break (Outcome::ClientDisconnected, "client", Some(e.to_string()));
                        }
                        if let Some(ended) = self.saw(event, &mut tally).await {
                            end_session(&mut client, &mut provider, &ended).await;
                            break (ended.result, "policy", Some(ended.message));
                        }
                    }
                    Some(Err(e)) => break (Outcome::UpstreamError, "provider", Some(e.to_string())),
                    None => break (Outcome::Ok, "provider", None),
                },
            }
        };
        // Let the closing handshakes finish (bounded: a peer may be gone):
        // each leg's Close sent, then what the peer still sends read until
        // its own Close ends the stream. Closing the socket with the peer's
        // frames unread would make the kernel reset the connection, and a
        // reset can cost the peer the frames it was still to read (a
        // policy's `error` event and Close among them).
        let close = async {
            tokio::join!(drain(&mut client), drain(&mut provider));
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
        self.record.realtime = Some(tally);
        self.end(result, ended_by, error);
    }

    /// Take in one server event. A finished response settles its share of
    /// the budget and the limits and takes the next one's: Some(why) when
    /// either refuses it.
    async fn saw(&mut self, event: ServerEvent, tally: &mut RealtimeSession) -> Option<Ended> {
        let usage = match event {
            ServerEvent::Session { model: Some(m) } => {
                self.record.response_model = Some(m);
                return None;
            }
            ServerEvent::ResponseDone { usage, .. } => usage,
            _ => return None,
        };
        tally.responses += 1;
        if tally.response_usage.len() < RealtimeSession::MAX_LISTED {
            tally.response_usage.push(usage);
        }
        self.record.usage.add(&usage);
        let rule = self.record.reason.clone();
        if let Some(hold) = self.budget.take() {
            let cost = self.price(&usage);
            let warn = account::soft_warn(&self.call.metrics);
            match hold.renew(cost, warn, tally.responses).await {
                Ok(next) => self.budget = Some(next),
                Err(spent) => {
                    self.record.reason = format!("{rule}:budget_{}", spent.period);
                    return Some(Ended {
                        code: "budget_exhausted",
                        result: Outcome::BudgetExhausted,
                        message: format!(
                            "the {} budget of policy {rule} is spent ({:.4} of {:.4} USD): Tollgate ends this Realtime session",
                            spent.period, spent.spent, spent.limit
                        ),
                    });
                }
            }
        }
        if let Some(hold) = self.hold.take() {
            hold.settle(usage.input_tokens, usage.output_tokens);
        }
        if let Some(r) = &self.renewal {
            match self.call.tls.enforcer.readmit(r).await {
                Ok(next) => self.hold = Some(next),
                Err(limited) => {
                    self.record.reason = format!("{rule}:{}", limited.which);
                    self.record.retry_after_ms = Some(limited.retry_after.as_millis() as u64);
                    return Some(Ended {
                        code: "rate_limited",
                        result: Outcome::RateLimited,
                        message: format!(
                            "the {} limit of policy {rule} is reached ({} a minute; retry in {:.1} s): Tollgate ends this Realtime session",
                            limited.which,
                            limited.limit,
                            limited.retry_after.as_secs_f64()
                        ),
                    });
                }
            }
        }
        None
    }

    fn price(&self, usage: &crate::providers::Usage) -> Option<f64> {
        let model = self
            .record
            .response_model
            .as_deref()
            .or(self.record.routed_model.as_deref())
            .or(self.record.model.as_deref())?;
        self.call
            .tls
            .live
            .load()
            .prices
            .cost(&self.record.provider, model, usage)
    }

    /// The session's record: its responses' usage, priced and counted.
    /// What the budget has not been charged already (responses settle one
    /// by one) is settled here.
    fn end(mut self, result: Outcome, ended_by: &'static str, error: Option<String>) {
        if let Some(t) = self.record.realtime.as_mut() {
            t.ended_by = ended_by;
        }
        self.record.result = result;
        self.record.error = error;
        self.record.duration_ms = self.started.elapsed().as_millis() as u64;
        // Every finished response was settled as it ended: what is held
        // now is the reservation for one that never finished.
        if let Some(b) = self.budget.take() {
            b.settle(Some(0.0), account::soft_warn(&self.call.metrics));
        }
        if let Some(h) = self.hold.take() {
            h.settle(0, 0);
        }
        finish(&self.call, self.record, None, None, self.started);
    }
}

/// Send our Close (if not sent yet) and read `ws` until the peer's Close
/// ends it.
async fn drain(ws: &mut Ws) {
    let _ = ws.close(None).await;
    while let Some(Ok(_)) = ws.next().await {}
}

/// Tell the workload why its session ends, in the Realtime API's own
/// terms, then close both legs (1008: policy violation).
async fn end_session(client: &mut Ws, provider: &mut Ws, ended: &Ended) {
    let _ = client
        .send(Message::text(error_event(ended.code, &ended.message)))
        .await;
    let frame = || CloseFrame {
        code: CloseCode::Policy,
        reason: ended.code.replace('_', " ").into(),
    };
    let _ = client.send(Message::Close(Some(frame()))).await;
    let _ = provider.send(Message::Close(Some(frame()))).await;
}

fn finish(
    call: &Call,
    record: RequestRecord,
    budget: Option<BudgetHold>,
    hold: Option<Hold>,
    started: Instant,
) {
    if let Some(h) = hold {
        h.settle(record.usage.input_tokens, record.usage.output_tokens);
    }
    account::account(call, record, budget, started, None);
}

#[cfg(test)]
#[path = "realtime_tests.rs"]
mod tests;
