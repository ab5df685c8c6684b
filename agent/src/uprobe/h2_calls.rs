//! HTTP/2: a connection's calls by stream. The workload's frames (its
//! requests) and the provider's (the answers) are paired by stream id;
//! everything else is `exchange`'s, as for HTTP/1.1.
use std::{collections::HashMap, time::Instant};

use super::{
    exchange::{
        Answering, Dir, Finished, Sent, SentWhole, answering, finish, sent_whole, unanswered,
    },
    http1::Head,
    http2::{Frame, H2Framer},
};
use crate::providers::Api;

/// Streams open at once that are followed; a workload opening more is not
/// read further (no provider allows that many).
const MAX_STREAMS: usize = 1024;

#[derive(Default)]
struct Stream {
    /// The request while its body comes.
    building: Option<Sent>,
    /// The request sent whole, until its answer begins.
    sent: Option<SentWhole>,
    answering: Option<Answering>,
}

pub(super) struct H2Calls {
    api: Api,
    client: H2Framer,
    server: H2Framer,
    streams: HashMap<u32, Stream>,
}

impl H2Calls {
    pub(super) fn new(api: Api) -> Self {
        Self {
            api,
            client: H2Framer::client(),
            server: H2Framer::server(),
            streams: HashMap::new(),
        }
    }

    /// True when the frames stop making sense (nothing more is read).
    pub(super) fn feed(
        &mut self,
        dir: Dir,
        bytes: &[u8],
        now: Instant,
        done: &mut Vec<Finished>,
    ) -> bool {
        let mut frames = Vec::new();
        match dir {
            Dir::Write => self.client.feed(bytes, &mut frames),
            Dir::Read => self.server.feed(bytes, &mut frames),
        }
        for f in frames {
            let broken = match dir {
                Dir::Write => self.request_frame(f, now, done),
                Dir::Read => self.response_frame(f, now, done),
            };
            if broken {
                return true;
            }
        }
        false
    }

    fn request_frame(&mut self, f: Frame, now: Instant, done: &mut Vec<Finished>) -> bool {
        match f {
            Frame::Headers {
                stream,
                headers,
                end,
            } => {
                if !self.streams.contains_key(&stream) && self.streams.len() >= MAX_STREAMS {
                    return true;
                }
                let s = self.streams.entry(stream).or_default();
                if s.building.is_none() && s.sent.is_none() && s.answering.is_none() {
                    s.building = Some(Sent::new(request_head(headers), "HTTP/2.0", now));
                }
                if end {
                    self.request_done(stream);
                }
            }
            Frame::Data { stream, data, end } => {
                if let Some(b) = self
                    .streams
                    .get_mut(&stream)
                    .and_then(|s| s.building.as_mut())
                {
                    b.data(&data);
                }
                if end {
                    self.request_done(stream);
                }
            }
            Frame::Reset { stream } => {
                // The workload gave up on the call: what came of it ends now.
                self.reset(stream, now, done);
            }
            Frame::Broken => return true,
        }
        false
    }

    fn request_done(&mut self, stream: u32) {
        let api = self.api;
        if let Some(s) = self.streams.get_mut(&stream)
            && let Some(b) = s.building.take()
        {
            s.sent = Some(sent_whole(api, b));
        }
    }

    fn response_frame(&mut self, f: Frame, now: Instant, done: &mut Vec<Finished>) -> bool {
        match f {
            Frame::Headers {
                stream,
                headers,
                end,
            } => {
                let head = response_head(headers);
                let Some(s) = self.streams.get_mut(&stream) else {
                    return false;
                };
                if s.answering.is_none() && !(100..200).contains(&head.status) {
                    // An answer that comes before its request ended (rare)
                    // ends what was sent of it.
                    if let Some(b) = s.building.take() {
                        s.sent = Some(sent_whole(self.api, b));
                    }
                    if let Some(sent) = s.sent.take() {
                        s.answering = Some(answering(self.api, sent, &head, now));
                    }
                }
                if end {
                    self.answered(stream, now, done);
                }
            }
            Frame::Data { stream, data, end } => {
                if let Some(a) = self
                    .streams
                    .get_mut(&stream)
                    .and_then(|s| s.answering.as_mut())
                {
                    a.data(&data, now);
                }
                if end {
                    self.answered(stream, now, done);
                }
            }
            Frame::Reset { stream } => self.reset(stream, now, done),
            Frame::Broken => return true,
        }
        false
    }

    fn answered(&mut self, stream: u32, now: Instant, done: &mut Vec<Finished>) {
        if let Some(a) = self.streams.remove(&stream).and_then(|s| s.answering) {
            done.push(finish(a, now, true));
        }
    }

    fn reset(&mut self, stream: u32, now: Instant, done: &mut Vec<Finished>) {
        if let Some(s) = self.streams.remove(&stream) {
            end_stream(s, now, done);
        }
    }

    pub(super) fn end(&mut self, now: Instant, done: &mut Vec<Finished>) {
        let mut ids: Vec<u32> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(s) = self.streams.remove(&id) {
                end_stream(s, now, done);
            }
        }
    }
}

/// A stream cut short: its call, as far as it got.
fn end_stream(s: Stream, now: Instant, done: &mut Vec<Finished>) {
    if let Some(a) = s.answering {
        done.push(finish(a, now, false));
    } else if let Some((sent, request, _)) = s.sent {
        done.push(unanswered(sent, request, now));
    }
}

/// A request's head from its header block: `:method`, `:path`, and
/// `:authority` as `host`, as HTTP/1.1 would have them.
fn request_head(headers: Vec<(String, String)>) -> Head {
    let mut head = Head::default();
    for (n, v) in headers {
        match n.as_str() {
            ":method" => head.method = v,
            ":path" => head.target = v,
            ":authority" => head.headers.push(("host".into(), v)),
            n if n.starts_with(':') => {}
            _ => head.headers.push((n, v)),
        }
    }
    head
}

fn response_head(headers: Vec<(String, String)>) -> Head {
    let mut head = Head::default();
    for (n, v) in headers {
        match n.as_str() {
            ":status" => head.status = v.parse().unwrap_or(0),
            n if n.starts_with(':') => {}
            _ => head.headers.push((n, v)),
        }
    }
    head
}

#[cfg(test)]
mod tests {
    use super::super::{
        exchange::Exchange,
        http2::{PREFACE, frame},
    };
    use super::*;

    #[test]
    fn two_streams_answered_out_of_order() {
        let mut enc = loona_hpack::Encoder::new();
        let body = br#"{"model":"gpt-4o-mini","messages":[]}"#;
        let mut w = PREFACE.to_vec();
        w.extend(frame(4, 0, 0, &[]));
        for stream in [1u32, 3] {
            let hb = enc.encode([
                (&b":method"[..], &b"POST"[..]),
                (b":path", b"/v1/chat/completions"),
                (b":authority", b"api.openai.com"),
                (b"content-type", b"application/json"),
            ]);
            w.extend(frame(1, 0x4, stream, &hb));
            w.extend(frame(0, 0x1, stream, body));
        }
        let mut dec = loona_hpack::Encoder::new();
        let mut r = frame(4, 0, 0, &[]);
        let answer = |tokens: u64| {
            format!(
                r#"{{"model":"gpt-4o-mini-2024-07-18","usage":{{"prompt_tokens":{tokens},"completion_tokens":1}}}}"#
            )
        };
        for (stream, tokens) in [(3u32, 30u64), (1, 10)] {
            let hb = dec.encode([
                (&b":status"[..], &b"200"[..]),
                (b"content-type", b"application/json"),
            ]);
            r.extend(frame(1, 0x4, stream, &hb));
            r.extend(frame(0, 0x1, stream, answer(tokens).as_bytes()));
        }
        let now = Instant::now();
        for cut in [1usize, 5, 9, 64, 10_000] {
            let mut x = Exchange::new(Api::Openai);
            let mut done = Vec::new();
            for part in w.chunks(cut) {
                x.feed(Dir::Write, part, now, &mut done);
            }
            for part in r.chunks(cut) {
                x.feed(Dir::Read, part, now, &mut done);
            }
            assert_eq!(done.len(), 2, "cut {cut}");
            let inputs: Vec<u64> = done.iter().map(|f| f.response.usage.input_tokens).collect();
            assert_eq!(inputs, [30, 10], "stream 3 answered first");
            for f in &done {
                assert_eq!(f.request.model.as_deref(), Some("gpt-4o-mini"));
                assert_eq!(
                    (f.host.as_str(), f.status, f.complete),
                    ("api.openai.com", 200, true)
                );
                assert_eq!(f.request_bytes as usize, body.len());
            }
        }
    }

    #[test]
    fn a_reset_stream_and_the_connections_end_report_what_they_cut() {
        let mut enc = loona_hpack::Encoder::new();
        let mut w = PREFACE.to_vec();
        let hb = enc.encode([(&b":method"[..], &b"GET"[..]), (b":path", b"/v1/models")]);
        w.extend(frame(1, 0x4 | 0x1, 1, &hb));
        let hb = enc.encode([(&b":method"[..], &b"GET"[..]), (b":path", b"/v1/models/x")]);
        w.extend(frame(1, 0x4 | 0x1, 3, &hb));
        w.extend(frame(3, 0, 1, &[0, 0, 0, 8]));
        let now = Instant::now();
        let mut x = Exchange::new(Api::Openai);
        let mut done = Vec::new();
        x.feed(Dir::Write, &w, now, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].target.as_str(), done[0].status), ("/v1/models", 0));
        x.end(now, &mut done);
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].target, "/v1/models/x");
    }
}
