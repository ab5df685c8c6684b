//! One terminated request, as a handful of steps: read the body, admit it
//! (`policy::admission`), send it (`send`), and relay the response metered
//! (`metered`); whatever is refused or fails is answered by `rescue`.
use std::{convert::Infallible, sync::Arc, time::Instant};

use http::{HeaderMap, HeaderValue, Request, Response, Version, header};
use http_body_util::BodyExt;
use hyper::body::{Bytes, Incoming};

use super::{
    buffered::Reservation,
    context::Call,
    detach::{ClientHere, Detachable, Leg},
    mcp,
    metered::{Finish, Metered},
    realtime, rescue, restart,
    send::{self, Sent},
    upstream::{BoxError, ProxyBody},
};
use crate::{
    identity::Workload,
    policy::{Admitted, BudgetHold, Candidate, Refusal, Seen, Subject, Verdict},
    providers::{Api, ResponseParser, stream_usage::UsageChunkFilter, tokenizer},
    telemetry::{
        events::now_rfc3339,
        records::{Decision, Outcome, RequestRecord},
        redact,
    },
};

pub(super) async fn forward(
    call: Arc<Call>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let workload = call.meta.workload_now();
    let mut record = new_record(&call, &workload, &req);
    if let Some(kind) = realtime::handshake(&req) {
        return Ok(realtime::session(call, req, kind, &workload, record, started).await);
    }
    if req.method() == http::Method::CONNECT {
        // A tunnel through a terminated connection would carry what no
        // adapter reads: only a WebSocket's extended CONNECT is taken.
        let why = "Tollgate does not tunnel CONNECT to a provider host (only an HTTP/2 \
                   extended CONNECT with :protocol websocket, a Realtime session, is taken)";
        let (status, outcome) = (http::StatusCode::METHOD_NOT_ALLOWED, Outcome::ClientError);
        return Ok(rescue::failed(
            &call,
            status,
            outcome,
            why.into(),
            record,
            started,
        ));
    }
    if call.meta.adapter.api() == Api::Mcp {
        return Ok(mcp::exchange(call, req, workload, record, started).await);
    }
    // The unredacted target goes upstream; the record keeps the redacted one.
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let (mut parts, body) = req.into_parts();

    // 1. The whole body: the adapter needs it (model, stream flag), and LLM
    //    requests are bounded JSON documents. What it holds counts against
    //    the node's bound until the provider has answered.
    let mut held = call.tls.bodies.reservation();
    let body = match read_request_body(&call, body, &mut held, &mut record).await {
        Ok(b) => b,
        Err(refusal) => return Ok(rescue::refused(&call, &refusal, record, started)),
    };

    // 2. Admission: parse, rule, rewrites, credential, budget, limits.
    let headers = std::mem::take(&mut parts.headers);
    let asks = call.meta.asks_stream_usage;
    let proposed = Proposed {
        target,
        headers,
        body,
        asks_stream_usage: asks,
        mcp_tools: None,
    };
    let (verdict, input_chars) = admit(&call, &workload, &mut record, proposed).await;
    let admitted = match verdict {
        Ok(a) => a,
        Err(refusal) => return Ok(rescue::refused(&call, &refusal, record, started)),
    };
    journal_begin(
        &call,
        &record,
        admitted.routed_model.as_deref(),
        crate::providers::estimated_tokens(input_chars),
        admitted.budget.as_ref(),
    );
    // 3-4 run in this task while the client waits; a client that goes away
    // before the response headers (hyper drops this future) does not cancel
    // a call the provider is already serving: it moves to a task of its own
    // and is still read, recorded and charged (`detach`).
    let sending = Sending {
        input_chars,
        held,
        started,
    };
    let leg = move |mut here| -> Leg<Delivery> {
        Box::pin(async move { deliver(call, parts, admitted, record, sending, &mut here).await })
    };
    Ok(match Detachable::new(leg, orphaned).await {
        Delivery::Answer(resp) => resp,
        Delivery::Relay(parts, body, left) => {
            drop(left); // none: the client is still here
            Response::from_parts(parts, BodyExt::boxed(*body))
        }
    })
}

/// A delivery whose client left: a provider response is finished unread
/// (its usage recorded and charged); an answer of the proxy's own is
/// recorded already.
fn orphaned(delivery: Delivery) -> Leg<()> {
    Box::pin(async move {
        if let Delivery::Relay(_, body, left) = delivery {
            body.client_gone_before_headers().await;
            drop(left);
        }
    })
}

/// What the provider leg ends in: an answer of the proxy's own (an error,
/// already recorded), or the provider's response head and its metered body
/// (and, when its client left, the slot it is being finished in).
enum Delivery {
    Answer(Response<ProxyBody>),
    /// Boxed: the metered body carries its whole record.
    Relay(
        http::response::Parts,
        Box<Metered>,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ),
}

/// What the request step hands the provider step beside the request.
struct Sending {
    input_chars: u64,
    /// The request body's share of the node's bound, until it is sent.
    held: Reservation,
    started: Instant,
}

/// Steps 3 and 4: send the admitted request and meter its response. `here`
/// closes when the workload stops waiting for it (the client left):
/// the call goes on in one of `Termination::abandoned`'s slots (`tls.max_abandoned_calls`), or, all
/// taken, is cancelled and recorded as the client's.
async fn deliver(
    call: Arc<Call>,
    mut parts: http::request::Parts,
    admitted: Admitted,
    mut record: RequestRecord,
    sending: Sending,
    here: &mut ClientHere,
) -> Delivery {
    let Sending {
        input_chars,
        held,
        started,
    } = sending;
    // 3. Send: to the dialled provider, or along the rule's failover chain.
    let Admitted {
        target,
        headers,
        body,
        routed_model,
        capped_output_tokens,
        asked_stream_usage,
        credential_injected,
        failover,
        budget,
        hold,
        renewal: _,
    } = admitted;
    record.stream_usage_asked = asked_stream_usage;
    record.routed_model = routed_model;
    record.capped_output_tokens = capped_output_tokens;
    record.credential_injected = credential_injected;
    parts.headers = headers;
    // Providers are spoken to in HTTP/1.1, whatever the workload spoke (`pooled`).
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH); // recomputed from the buffered body
    let model = record.routed_model.clone().or_else(|| record.model.clone());
    // Kept (a reference, not a copy) in case no usage comes: an OpenAI
    // model's tokens are then counted with its tokenizer.
    let api = call.meta.adapter.api();
    let keeps_text = api == Api::Openai
        && body.len() <= tokenizer::MAX_REQUEST_BODY
        && model
            .as_deref()
            .is_none_or(|m| tokenizer::Encoding::for_model(api, m).is_some());
    let texts = keeps_text.then(|| tokenizer::Texts {
        request: Some(body.clone()),
        input_chars,
        ..Default::default()
    });
    let (endpoints, chain) = send::plan(&call, failover, model.as_deref());
    let mut attempts = Vec::new();
    let mut left = None;
    let sent = {
        let send = send::send(
            &call,
            &parts,
            &target,
            body,
            &endpoints,
            chain.as_deref(),
            &mut attempts,
        );
        tokio::pin!(send);
        loop {
            tokio::select! {
                sent = &mut send => break sent,
                () = here.closed(), if left.is_none() => {
                    match call.tls.abandoned.clone().try_acquire_owned() {
                        Ok(slot) => left = Some(slot),
                        Err(_) => break Sent::Failed {
                            status: http::StatusCode::BAD_GATEWAY,
                            result: Outcome::ClientDisconnected,
                            message: "the client went away before the response headers and tls.max_abandoned_calls calls of clients that left are being finished already: cancelled (no usage was seen)"
                                .to_string(),
                        },
                    }
                }
            }
        }
    };
    if chain.is_some() {
        record.attempts = attempts;
    }
    // The body is gone with the attempts: its bytes are free for others.
    drop(held);

    // 4. The response, relayed frame by frame and accounted when it ends.
    let (resp, ep) = match sent {
        Sent::Response(resp, ep) => (resp, ep),
        Sent::Failed {
            status,
            result,
            message,
        } => {
            return Delivery::Answer(rescue::failed(
                &call, status, result, message, record, started,
            ));
        }
    };
    if ep.provider != call.meta.provider {
        record.served_by = Some(ep.provider.clone());
    }
    record.upstream = ep.addr;
    record.ttfb_ms = started.elapsed().as_millis() as u64;
    record.status = resp.status().as_u16();
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    response_ids(&mut record, &mut parts.headers);
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut parser =
        ResponseParser::new(api, content_type, input_chars).with_headers(&parts.headers);
    if texts.is_some() {
        parser = parser.keep_text();
    }
    // What asking for usage added comes back out before the workload sees it.
    let filter = (asked_stream_usage && content_type.starts_with("text/event-stream"))
        .then(UsageChunkFilter::default);
    if filter.is_some() {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let body = Metered::new(
        body.map_err(BoxError::from).boxed(),
        started,
        parser,
        filter,
        Finish {
            call: call.clone(),
            record,
            hold,
            budget,
            texts,
        },
    );
    Delivery::Relay(parts, Box::new(body), left)
}

/// What a request, a Realtime session or an MCP message asks to send.
pub(super) struct Proposed {
    /// Path and query, unredacted.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub asks_stream_usage: bool,
    /// See `Candidate::mcp_tools`.
    pub mcp_tools: Option<Vec<String>>,
}

/// Step 2, for a request, a Realtime session and an MCP message alike:
/// admit it under the live rules, and note in its record what it turned
/// out to be (operation, model, stream, deciding rule, upload). Also
/// returns the characters of input text, for estimates.
pub(super) async fn admit(
    call: &Call,
    workload: &Workload,
    record: &mut RequestRecord,
    proposed: Proposed,
) -> (Verdict, u64) {
    let Proposed {
        target,
        headers,
        body,
        asks_stream_usage,
        mcp_tools,
    } = proposed;
    let rules = call.tls.live.load_full();
    let mut seen = Seen::default();
    let request = Candidate {
        id: &record.id,
        method: &record.method,
        subject: Subject {
            workload,
            comm: &call.meta.comm,
        },
        to: call.meta.to(),
        adapter: call.meta.adapter,
        asks_stream_usage,
        target,
        headers,
        body,
        mcp_tools,
    };
    let verdict = call
        .tls
        .enforcer
        .admit(&rules.policy, &rules.prices, request, &mut seen)
        .await;
    drop(rules);
    record.operation = seen.info.operation;
    record.model = seen.info.model;
    record.stream = seen.info.stream;
    record.reason = seen.reason;
    record.batch_input = seen.batch_input;
    (verdict, seen.input_chars)
}

/// An admitted call is journaled before anything is sent, so a crash from
/// here on cannot leave it unrecorded (`restart`).
pub(super) fn journal_begin(
    call: &Call,
    record: &RequestRecord,
    routed_model: Option<&str>,
    input_tokens: u64,
    budget: Option<&BudgetHold>,
) {
    if let Some(j) = call.events.journal() {
        let begun = restart::Begun {
            record,
            model: routed_model.or(record.model.as_deref()),
            input_tokens,
            budget: budget.map(|b| &b.key),
        };
        j.begin(&record.id, &begun);
    }
}

/// The provider's id of the call into the record; the record's id to the
/// workload (`x-tollgate-request-id`).
pub(super) fn response_ids(record: &mut RequestRecord, headers: &mut HeaderMap) {
    record.provider_request_id = ["x-request-id", "request-id", "apim-request-id"]
        .iter()
        .find_map(|h| headers.get(*h))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Ok(id) = HeaderValue::from_str(&record.id) {
        headers.insert("x-tollgate-request-id", id);
    }
}

/// The record of a request as it arrives; the steps fill in the rest.
fn new_record(call: &Call, workload: &Workload, req: &Request<Incoming>) -> RequestRecord {
    let meta = &call.meta;
    RequestRecord {
        time: now_rfc3339(),
        kind: "request",
        id: uuid::Uuid::now_v7().to_string(),
        decision: Decision::Allow,
        reason: String::new(),
        routed_model: None,
        capped_output_tokens: None,
        retry_after_ms: None,
        credential_injected: false,
        attempts: Vec::new(),
        served_by: None,
        workload: workload.clone(),
        pid: meta.pid,
        comm: meta.comm.clone(),
        provider: meta.provider.clone(),
        host: meta.host.clone(),
        method: req.method().to_string(),
        // Redacted: Gemini accepts the API key as `?key=`.
        path: redact::path(req.uri().path_and_query().map_or("/", |p| p.as_str())),
        operation: crate::providers::Operation::Other,
        model: None,
        response_model: None,
        stream: false,
        stream_usage_asked: false,
        usage: Default::default(),
        provider_usage: None,
        client_http: format!("{:?}", req.version()),
        observed_via: None,
        upstream: meta.upstream,
        status: 0,
        request_bytes: 0,
        response_bytes: 0,
        ttfb_ms: 0,
        ttft_ms: 0,
        duration_ms: 0,
        result: Outcome::Ok,
        error: None,
        cost_usd: None,
        provider_request_id: None,
        request_headers: call
            .tls
            .capture
            .headers
            .then(|| redact::headers(req.headers())),
        request_body: None,
        response_body: None,
        realtime: None,
        batch_input: None,
        mcp: None,
    }
}

/// Step 1, for a request and an MCP message alike: the whole body, within
/// `tls.max_request_body` and `tls.request_body_timeout`, its bytes held in
/// `held` (the node's bound), its size (and with `audit.capture.bodies`
/// its redacted text) in the record.
pub(super) async fn read_request_body(
    call: &Call,
    body: Incoming,
    held: &mut Reservation,
    record: &mut RequestRecord,
) -> Result<Bytes, Refusal> {
    let settings = &call.tls.settings;
    let read = read_body(body, settings.max_request_body, held);
    let body = tokio::time::timeout(settings.request_body_timeout, read)
        .await
        .map_err(|_| Refusal::BodyTimeout {
            after: settings.request_body_timeout,
        })??;
    record.request_bytes = body.len() as u64;
    let capture = &call.tls.capture;
    if capture.bodies {
        record.request_body = Some(redact::body(&body, capture.max_body_bytes));
    }
    Ok(body)
}

/// Read the body frame by frame, at most `max` bytes, each frame reserved
/// in `held` (the node-wide bound) before it is kept. Past the bound the
/// rest is read and dropped, holding nothing, so the client — still
/// sending — gets its 503 cleanly instead of a reset.
async fn read_body(
    mut body: Incoming,
    max: usize,
    held: &mut Reservation,
) -> Result<Bytes, Refusal> {
    // One frame (the usual small JSON body) is kept as it came, uncopied;
    // more grow one buffer (chunks joined at the end would hold the body twice).
    let mut first: Option<Bytes> = None;
    let mut buf = Vec::new();
    let mut seen = 0usize;
    let mut overloaded = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Refusal::BodyUnreadable {
            error: e.to_string(),
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing the provider needs
        };
        seen += data.len();
        if seen > max {
            return Err(Refusal::BodyTooLarge { limit: max });
        }
        if overloaded {
            continue;
        }
        if !held.grow(data.len()) {
            overloaded = true;
            (first, buf) = (None, Vec::new());
            held.release();
            continue;
        }
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            None => buf.extend_from_slice(&data),
            Some(one) => {
                buf.extend_from_slice(&one);
                buf.extend_from_slice(&data);
            }
        }
    }
    if overloaded {
        return Err(Refusal::Overloaded {
            limit: held.limit(),
        });
    }
    Ok(first.unwrap_or_else(|| Bytes::from(buf)))
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

pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
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
