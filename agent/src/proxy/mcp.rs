//! One HTTP exchange with an MCP server (`mcp_servers`): a POSTed JSON-RPC
//! message (or batch), the GET that opens the server's event stream, or
//! the DELETE that ends a session. Read, decided by the rules' `mcp`
//! (`policy::admission` with the tools it calls), sent like a provider
//! request (`send`), and its answer relayed through
//! `providers::mcp_response` (outcome read, tool lists filtered) to one
//! audit record and the MCP metrics (`account`).
//!
//! The answer is relayed by a task of its own through a channel: however
//! the exchange ends — the answer's end, the server's failure, the client
//! leaving — the task sees it and records the call exactly once.
//!
//! The older HTTP+SSE transport answers a POSTed message on the event
//! stream the client opened with a GET, not in the POST's response: such
//! a stream, once its `endpoint` event has named where messages go, is
//! registered (`EventStreams`), and the refusal of a message POSTed there
//! is sent down the stream, between two of the server's events, where the
//! client reads its answers.
use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Instant,
};

use http::{Method, Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    account::account,
    context::Call,
    forward::{self, Proposed},
    pooled::UpstreamBody,
    rescue,
    send::{self, Sent},
    upstream::{BoxError, ProxyBody},
};
use crate::{
    identity::Workload,
    policy::{Hold, RequestDecision, Subject},
    providers::{
        Operation, mcp,
        mcp_response::{ResponseReader, Visible},
    },
    telemetry::records::{McpExchange, Outcome, RequestRecord},
};

/// Frames of an answer queued for a slow client before the relay waits.
const QUEUED_FRAMES: usize = 16;

/// Refusals queued for one event stream; beyond, the POST's own answer
/// carries the refusal.
const QUEUED_REFUSALS: usize = 16;

/// The HTTP+SSE transport's event streams being relayed, by workload
/// (cgroup), server and the endpoint its `endpoint` event named.
#[derive(Default)]
pub struct EventStreams {
    streams: Mutex<HashMap<StreamKey, mpsc::Sender<Bytes>>>,
}

type StreamKey = (String, String, String);

impl EventStreams {
    /// Where refusals of messages POSTed to `key`'s endpoint go, if a
    /// stream is open for it.
    fn sink(&self, key: &StreamKey) -> Option<mpsc::Sender<Bytes>> {
        let streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.get(key).filter(|tx| !tx.is_closed()).cloned()
    }

    fn open(&self, key: StreamKey) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(QUEUED_REFUSALS);
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.insert(key, tx);
        rx
    }

    fn close(&self, key: &StreamKey) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.remove(key);
    }
}

/// The stream key of a message POSTed to `target`, or of a stream whose
/// endpoint event named `target` (a path, or an absolute URL of the same
/// origin: the client refuses another).
fn stream_key(call: &Call, target: &str) -> StreamKey {
    let path = match target.parse::<http::Uri>() {
        Ok(u) if u.scheme().is_some() => u
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string()),
        _ => target.to_string(),
    };
    (
        call.meta.workload.cgroup.clone(),
        call.meta.provider.clone(),
        path,
    )
}

pub(super) async fn exchange(
    call: Arc<Call>,
    req: Request<Incoming>,
    workload: Workload,
    mut record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    record.operation = Operation::Mcp;
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let stream = stream_key(&call, &target);
    let (mut parts, body) = req.into_parts();
    let mut held = call.tls.bodies.reservation();
    let body = match forward::read_request_body(&call, body, &mut held, &mut record).await {
        Ok(b) => b,
        Err(refusal) => return rescue::refused(&call, &refusal, record, started),
    };
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let session = header("mcp-session-id").map(McpExchange::session_of);
    // A POST carries messages; GET and DELETE have none to read.
    let messages = match parts.method {
        Method::POST => match mcp::read_request(&body)
            .and_then(|m| mcp::check_headers(&m, header).map(|()| m))
        {
            Ok(m) => m,
            Err(why) => {
                record.mcp = Some(McpExchange {
                    session,
                    ..Default::default()
                });
                return rescue::unreadable_mcp(&call, &why, record, started);
            }
        },
        _ => Vec::new(),
    };
    let mut exchange = McpExchange::of(&messages);
    exchange.session = session;
    record.mcp = Some(exchange);
    let ids: Vec<Value> = messages
        .iter()
        .filter(|m| m.is_request())
        .filter_map(|m| m.id.clone())
        .collect();
    let tools = messages.iter().filter_map(|m| m.tool.clone()).collect();

    let proposed = Proposed {
        target,
        headers: std::mem::take(&mut parts.headers),
        body,
        asks_stream_usage: false,
        mcp_tools: Some(tools),
    };
    let (verdict, _) = forward::admit(&call, &workload, &mut record, proposed).await;
    record.operation = Operation::Mcp;
    let admitted = match verdict {
        Ok(a) => a,
        Err(refusal) => {
            let sink = call.tls.mcp_streams.sink(&stream);
            return rescue::refused_mcp(&call, &refusal, record, started, &ids, sink);
        }
    };
    forward::journal_begin(&call, &record, None, 0, None);
    record.credential_injected = admitted.credential_injected;
    parts.headers = admitted.headers;
    parts.version = Version::HTTP_11;
    forward::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    let visible = visible_tools(&call, &workload);
    let relay = Relay {
        call: call.clone(),
        record,
        hold: admitted.hold,
        started,
        idle: parts.method == Method::POST,
    };

    // Sent from a task of its own: a client that leaves before the answer
    // does not cancel a call the server is already running.
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (endpoints, _) = send::plan(&relay.call, None, None);
        let mut attempts = Vec::new();
        let sent = send::send(
            &relay.call,
            &parts,
            &admitted.target,
            admitted.body,
            &endpoints,
            None,
            &mut attempts,
        )
        .await;
        drop(held);
        let _ = tx.send(relay.answer(sent, ids, visible));
    });
    rx.await.unwrap_or_else(|_| {
        // The task ended without an answer: it panicked (a bug, logged by tokio).
        let mut r = Response::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r
    })
}

/// Whether this workload may call a tool of the server: what the policy
/// in force now would decide for a `tools/call` of it.
fn visible_tools(call: &Call, workload: &Workload) -> Visible {
    let rules = call.tls.live.load_full();
    let workload = workload.clone();
    let comm = call.meta.comm.clone();
    let server = call.meta.provider.clone();
    Arc::new(move |tool: &str| {
        let subject = Subject {
            workload: &workload,
            comm: &comm,
        };
        matches!(
            rules.policy.mcp(subject, &server, Some(tool)),
            RequestDecision::Allow { .. }
        )
    })
}

/// An admitted exchange on its way: what its record needs when it ends.
struct Relay {
    call: Arc<Call>,
    record: RequestRecord,
    hold: Option<Hold>,
    started: Instant,
    /// Bounded by `tls.stream_idle_timeout`: answers to POSTs. The event
    /// stream a GET opens is the server's to keep quiet for as long as it
    /// has nothing to say.
    idle: bool,
}

impl Relay {
    /// The server's answer, relayed; or the proxy's, when there is none.
    fn answer(mut self, sent: Sent, ids: Vec<Value>, visible: Visible) -> Response<ProxyBody> {
        let (resp, ep) = match sent {
            Sent::Response(resp, ep) => (resp, ep),
            Sent::Failed {
                status,
                result,
                message,
            } => {
                return rescue::failed(
                    &self.call,
                    status,
                    result,
                    message,
                    self.record,
                    self.started,
                );
            }
        };
        let record = &mut self.record;
        record.upstream = ep.addr;
        record.ttfb_ms = self.started.elapsed().as_millis() as u64;
        record.status = resp.status().as_u16();
        let (mut parts, body) = resp.into_parts();
        forward::strip_hop_by_hop(&mut parts.headers);
        forward::response_ids(record, &mut parts.headers);
        let exchange = record.mcp.get_or_insert_with(Default::default);
        if exchange.session.is_none()
            && let Some(s) = parts
                .headers
                .get("mcp-session-id")
                .and_then(|v| v.to_str().ok())
        {
            // `initialize` is answered with the session it opens.
            exchange.session = Some(McpExchange::session_of(s));
        }
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let reader = ResponseReader::new(content_type, ids, Some(visible));
        // A filtered tool list is shorter than the server said.
        parts.headers.remove(header::CONTENT_LENGTH);
        let (tx, rx) = mpsc::channel(QUEUED_FRAMES);
        tokio::spawn(self.relay(body, reader, tx));
        Response::from_parts(parts, ChannelBody { rx }.boxed())
    }

    /// Relay `body` through `reader` to `tx` until it ends, then account.
    async fn relay(
        mut self,
        mut body: UpstreamBody,
        mut reader: ResponseReader,
        tx: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    ) {
        let idle = self.call.tls.settings.stream_idle_timeout;
        let mut bytes = 0u64;
        // The HTTP+SSE transport's stream, once it named its endpoint.
        let mut refusals: Option<(StreamKey, mpsc::Receiver<Bytes>)> = None;
        let result = loop {
            let next = async {
                if self.idle {
                    tokio::time::timeout(idle, body.frame()).await.ok()
                } else {
                    Some(body.frame().await)
                }
            };
            let refused = async {
                match refusals.as_mut() {
                    Some((_, rx)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let frame = tokio::select! {
                f = next => f,
                Some(event) = refused => {
                    // Between two of the server's events: what the reader
                    // passed on always ends at an event's end.
                    if tx.send(Ok(Frame::data(event))).await.is_err() {
                        break Outcome::ClientDisconnected;
                    }
                    continue;
                }
                () = tx.closed() => break Outcome::ClientDisconnected,
            };
            let out = match frame {
                None => {
                    let _ = tx.send(Err("the MCP server went quiet".into())).await;
                    break Outcome::UpstreamIdleTimeout;
                }
                Some(None) => {
                    let tail = reader.finish();
                    if !tail.is_empty() && tx.send(Ok(Frame::data(tail))).await.is_err() {
                        break Outcome::ClientDisconnected;
                    }
                    break Outcome::Ok;
                }
                Some(Some(Err(e))) => {
                    self.record.error = Some(format!("the MCP server's answer failed: {e}"));
                    let _ = tx.send(Err(e.into())).await;
                    break Outcome::UpstreamError;
                }
                Some(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        bytes += data.len() as u64;
                        let fed = reader.feed(data);
                        if refusals.is_none()
                            && let Some(endpoint) = reader.answered.endpoint.as_deref()
                        {
                            let key = stream_key(&self.call, endpoint);
                            let rx = self.call.tls.mcp_streams.open(key.clone());
                            refusals = Some((key, rx));
                        }
                        match fed {
                            Ok(out) if out.is_empty() => continue,
                            Ok(out) => Ok(Frame::data(out)),
                            Err(e) => {
                                self.record.error = Some(e.to_string());
                                let _ = tx.send(Err(e.into())).await;
                                break Outcome::UpstreamError;
                            }
                        }
                    }
                    Err(frame) => Ok(frame), // trailers pass as they are
                },
            };
            if tx.send(out).await.is_err() {
                break Outcome::ClientDisconnected;
            }
        };
        if let Some((key, _)) = &refusals {
            self.call.tls.mcp_streams.close(key);
        }
        let record = &mut self.record;
        record.result = result;
        record.response_bytes = bytes;
        record.duration_ms = self.started.elapsed().as_millis() as u64;
        if let Some(x) = record.mcp.as_mut() {
            x.answered = reader.answered;
        }
        if let Some(hold) = self.hold {
            hold.settle(0, 0);
        }
        account(&self.call, self.record, None, self.started, None);
    }
}

/// The answer's body as the workload reads it: the frames the relay task
/// sends. Dropped by hyper when the client goes away, which the task sees.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}
