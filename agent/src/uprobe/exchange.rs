//! One captured connection's calls: requests (what the workload wrote) paired
//! with responses (what it read) — in order for HTTP/1.1, by stream for
//! HTTP/2 (`h2_calls`) — read by the same provider adapters as terminated
//! calls. The protocol is told by the workload's first bytes (HTTP/2's
//! client preface).
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::http1::{Framer, Framing, Head, Part};
use crate::providers::{self, Api, RequestInfo, ResponseInfo, ResponseParser};

/// Request body bytes kept to read the model and stream flag from; the
/// rest of a longer body is counted only.
pub const MAX_REQUEST_BODY: usize = 16 << 20;

/// Which way captured bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// The workload wrote them (requests).
    Write,
    /// The workload read them (responses).
    Read,
}

/// A call seen whole (or ended by the connection's end).
#[derive(Debug)]
pub struct Finished {
    /// `HTTP/1.1` or `HTTP/2.0`, as the workload spoke.
    pub http: &'static str,
    pub method: String,
    pub target: String,
    pub host: String,
    pub request: RequestInfo,
    /// 0 when no response came.
    pub status: u16,
    pub response: ResponseInfo,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub ttfb: Duration,
    pub ttft: Option<Duration>,
    pub duration: Duration,
    /// The provider's id of the call (`x-request-id`, `request-id`).
    pub provider_request_id: Option<String>,
    /// The response ended as HTTP frames it (false: cut by the connection's
    /// end or a hole in the capture).
    pub complete: bool,
}

pub(super) struct Sent {
    head: Head,
    /// `HTTP/1.1` or `HTTP/2.0`.
    http: &'static str,
    body: Vec<u8>,
    body_bytes: u64,
    started: Instant,
}

pub(super) struct Answering {
    sent: Sent,
    request: RequestInfo,
    status: u16,
    parser: ResponseParser,
    bytes: u64,
    head_at: Instant,
    first_byte: Option<Instant>,
    request_id: Option<String>,
}

/// One connection's reconstruction.
pub struct Exchange {
    api: Api,
    proto: Proto,
    /// The capture lost bytes: nothing more is read on this connection.
    pub holed: bool,
}

enum Proto {
    /// No byte written yet (or too few to tell).
    Unknown(Vec<u8>),
    // Boxed: a connection is one or the other, and the framers are large.
    H1(Box<H1Calls>),
    H2(Box<super::h2_calls::H2Calls>),
}

impl Exchange {
    pub fn new(api: Api) -> Self {
        Self {
            api,
            proto: Proto::Unknown(Vec::new()),
            holed: false,
        }
    }

    /// Bytes of one direction, as captured.
    pub fn feed(&mut self, dir: Dir, bytes: &[u8], now: Instant, done: &mut Vec<Finished>) {
        if self.holed {
            return;
        }
        if let Proto::Unknown(held) = &mut self.proto {
            if dir == Dir::Read {
                return; // the server does not speak first
            }
            held.extend_from_slice(bytes);
            if held.len() < 3 && super::http2::PREFACE.starts_with(held) {
                return; // "P", "PR": not told apart from "POST" yet
            }
            let first = std::mem::take(held);
            self.proto = if first.starts_with(&super::http2::PREFACE[..3]) {
                Proto::H2(Box::new(super::h2_calls::H2Calls::new(self.api)))
            } else {
                Proto::H1(Box::new(H1Calls::new(self.api)))
            };
            return self.feed(dir, &first, now, done);
        }
        let broken = match &mut self.proto {
            Proto::H1(c) => {
                c.feed(dir, bytes, now, done);
                false
            }
            Proto::H2(c) => c.feed(dir, bytes, now, done),
            Proto::Unknown(_) => false,
        };
        if broken {
            self.hole(now, done);
        }
    }

    /// Bytes were lost: what is in flight ends incomplete, nothing more is read.
    pub fn hole(&mut self, now: Instant, done: &mut Vec<Finished>) {
        self.end(now, done);
        self.holed = true;
    }

    /// The connection ended: what is in flight ends.
    pub fn end(&mut self, now: Instant, done: &mut Vec<Finished>) {
        match &mut self.proto {
            Proto::H1(c) => c.end(now, done),
            Proto::H2(c) => c.end(now, done),
            Proto::Unknown(_) => {}
        }
    }
}

/// HTTP/1.1: responses answer requests in order.
struct H1Calls {
    api: Api,
    requests: Framer,
    responses: Framer,
    building: Option<Sent>,
    /// Requests sent whole, waiting for their response.
    waiting: VecDeque<SentWhole>,
    answering: Option<Answering>,
}

impl H1Calls {
    fn new(api: Api) -> Self {
        Self {
            api,
            requests: Framer::requests(),
            responses: Framer::responses(),
            building: None,
            waiting: VecDeque::new(),
            answering: None,
        }
    }

    fn feed(&mut self, dir: Dir, bytes: &[u8], now: Instant, done: &mut Vec<Finished>) {
        let mut parts = Vec::new();
        match dir {
            Dir::Write => {
                self.requests
                    .feed(bytes, &mut Framing::of_request, &mut parts);
                for p in parts {
                    self.on_request_part(p, now);
                }
            }
            Dir::Read => {
                // Each final head answers the next request waiting; the
                // queue moves only after this feed, so count them here.
                let waiting = &self.waiting;
                let mut answered = 0;
                let mut framing = |h: &Head| {
                    let method = waiting
                        .get(answered)
                        .map_or("", |(s, ..)| s.head.method.as_str());
                    if !(100..200).contains(&h.status) {
                        answered += 1;
                    }
                    Framing::of_response(h, method)
                };
                self.responses.feed(bytes, &mut framing, &mut parts);
                for p in parts {
                    self.on_response_part(p, now, done);
                }
            }
        }
    }

    fn end(&mut self, now: Instant, done: &mut Vec<Finished>) {
        let mut parts = Vec::new();
        self.responses.close(&mut parts);
        for p in parts {
            self.on_response_part(p, now, done);
        }
        if let Some(a) = self.answering.take() {
            done.push(finish(a, now, false));
        }
        for (sent, request, _) in self.waiting.drain(..) {
            done.push(unanswered(sent, request, now));
        }
    }

    fn on_request_part(&mut self, p: Part, now: Instant) {
        match p {
            Part::Head(head) => {
                self.building = Some(Sent::new(head, "HTTP/1.1", now));
            }
            Part::Data(d) => {
                if let Some(s) = self.building.as_mut() {
                    s.data(&d);
                }
            }
            Part::End => {
                if let Some(sent) = self.building.take() {
                    self.waiting.push_back(sent_whole(self.api, sent));
                }
            }
            Part::Broken => {}
        }
    }

    fn on_response_part(&mut self, p: Part, now: Instant, done: &mut Vec<Finished>) {
        match p {
            Part::Head(head) if (100..200).contains(&head.status) => {} // interim
            Part::Head(head) => {
                let Some(sent) = self.waiting.pop_front() else {
                    return;
                };
                self.answering = Some(answering(self.api, sent, &head, now));
            }
            Part::Data(d) => {
                if let Some(a) = self.answering.as_mut() {
                    a.data(&d, now);
                }
            }
            Part::End => {
                if let Some(a) = self.answering.take() {
                    done.push(finish(a, now, true));
                }
            }
            Part::Broken => {}
        }
    }
}

impl Sent {
    pub(super) fn new(head: Head, http: &'static str, now: Instant) -> Self {
        Self {
            head,
            http,
            body: Vec::new(),
            body_bytes: 0,
            started: now,
        }
    }

    pub(super) fn data(&mut self, d: &[u8]) {
        self.body_bytes += d.len() as u64;
        if self.body.len() + d.len() <= MAX_REQUEST_BODY {
            self.body.extend_from_slice(d);
        }
    }
}

impl Answering {
    pub(super) fn data(&mut self, d: &[u8], now: Instant) {
        self.first_byte.get_or_insert(now);
        self.bytes += d.len() as u64;
        self.parser.feed(d);
    }
}

/// A request, what the adapter read of it, and its input size.
pub(super) type SentWhole = (Sent, RequestInfo, u64);

/// A request sent whole, read by the adapter.
pub(super) fn sent_whole(api: Api, sent: Sent) -> SentWhole {
    let json = (sent.body_bytes as usize <= MAX_REQUEST_BODY)
        .then(|| serde_json::from_slice::<Value>(&sent.body).ok())
        .flatten();
    let request = providers::parse_request_json(api, &sent.head.target, json.as_ref());
    let input_chars = json.as_ref().map_or(0, providers::input_chars);
    (sent, request, input_chars)
}

/// The response `head` to `sent` begins.
pub(super) fn answering(api: Api, sent: SentWhole, head: &Head, now: Instant) -> Answering {
    let (sent, request, input_chars) = sent;
    let ct = head.header("content-type").unwrap_or_default();
    let request_id = head
        .header("x-request-id")
        .or_else(|| head.header("request-id"))
        .map(str::to_string);
    Answering {
        parser: ResponseParser::new(api, ct, input_chars),
        sent,
        request,
        status: head.status,
        bytes: 0,
        head_at: now,
        first_byte: None,
        request_id,
    }
}

pub(super) fn finish(a: Answering, now: Instant, ended: bool) -> Finished {
    let response = a.parser.finish();
    let complete = ended || response.complete;
    Finished {
        http: a.sent.http,
        host: a.sent.head.header("host").unwrap_or_default().to_string(),
        method: a.sent.head.method,
        target: a.sent.head.target,
        request: a.request,
        status: a.status,
        response,
        request_bytes: a.sent.body_bytes,
        response_bytes: a.bytes,
        ttfb: a.head_at.saturating_duration_since(a.sent.started),
        ttft: a
            .first_byte
            .map(|t| t.saturating_duration_since(a.sent.started)),
        duration: now.saturating_duration_since(a.sent.started),
        provider_request_id: a.request_id,
        complete,
    }
}

pub(super) fn unanswered(sent: Sent, request: RequestInfo, now: Instant) -> Finished {
    Finished {
        http: sent.http,
        host: sent.head.header("host").unwrap_or_default().to_string(),
        method: sent.head.method,
        target: sent.head.target,
        request,
        status: 0,
        response: ResponseInfo::default(),
        request_bytes: sent.body_bytes,
        response_bytes: 0,
        ttfb: Duration::ZERO,
        ttft: None,
        duration: now.saturating_duration_since(sent.started),
        provider_request_id: None,
        complete: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

    fn request(body: &str) -> Vec<u8> {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn a_json_call_and_a_streamed_one_on_one_connection() {
        let mut x = Exchange::new(Api::Openai);
        let t0 = Instant::now();
        let mut done = Vec::new();
        x.feed(Dir::Write, &request(CHAT), t0, &mut done);
        let answer = r#"{"id":"c1","model":"gpt-4o-mini-2024-07-18","usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: req_1\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        let (a, b) = resp.as_bytes().split_at(40);
        x.feed(Dir::Read, a, t0, &mut done);
        assert!(done.is_empty());
        x.feed(Dir::Read, b, t0 + Duration::from_millis(5), &mut done);
        assert_eq!(done.len(), 1);
        let f = &done[0];
        assert_eq!(f.request.model.as_deref(), Some("gpt-4o-mini"));
        assert!(!f.request.stream);
        assert_eq!(
            (
                f.status,
                f.response.usage.input_tokens,
                f.response.usage.output_tokens
            ),
            (200, 9, 3)
        );
        assert_eq!(
            f.response.response_model.as_deref(),
            Some("gpt-4o-mini-2024-07-18")
        );
        assert_eq!(f.provider_request_id.as_deref(), Some("req_1"));
        assert_eq!((f.host.as_str(), f.complete), ("api.openai.com", true));

        let streamed = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
        x.feed(Dir::Write, &request(streamed), t0, &mut done);
        let events = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
        let mut resp = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for e in events.split_inclusive("\n\n") {
            resp.extend(format!("{:x}\r\n{e}\r\n", e.len()).as_bytes());
        }
        resp.extend(b"0\r\n\r\n");
        for piece in resp.chunks(7) {
            x.feed(Dir::Read, piece, t0, &mut done);
        }
        assert_eq!(done.len(), 2);
        let f = &done[1];
        assert!(f.request.stream);
        assert_eq!(
            (
                f.response.usage.input_tokens,
                f.response.usage.output_tokens
            ),
            (4, 1)
        );
        assert!(!f.response.usage.estimated);
        assert_eq!(f.response_bytes as usize, events.len());
    }

    #[test]
    fn a_call_cut_by_the_end_or_a_hole_is_still_reported() {
        let mut x = Exchange::new(Api::Openai);
        let now = Instant::now();
        let mut done = Vec::new();
        x.feed(Dir::Write, &request(CHAT), now, &mut done);
        x.end(now, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].status, done[0].complete), (0, false));
        assert_eq!(done[0].request.model.as_deref(), Some("gpt-4o-mini"));

        let mut x = Exchange::new(Api::Openai);
        let mut done = Vec::new();
        x.feed(Dir::Write, &request(CHAT), now, &mut done);
        x.feed(
            Dir::Read,
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"us",
            now,
            &mut done,
        );
        x.hole(now, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].status, done[0].complete), (200, false));
        assert!(done[0].response.usage.estimated);
        x.feed(Dir::Write, &request(CHAT), now, &mut done);
        assert_eq!(done.len(), 1, "nothing is read after a hole");
    }
}
