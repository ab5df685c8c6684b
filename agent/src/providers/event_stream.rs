//! The AWS event-stream framing (`application/vnd.amazon.eventstream`) of
//! Bedrock's streamed answers (`ConverseStream`,
//! `InvokeModelWithResponseStream`), read frame by frame as the bytes pass:
//! each message's prelude, headers and payload, checked against both CRCs
//! by the AWS SDK's own reader (`aws-smithy-eventstream`). A frame that
//! fails its checks stops the reading (the bytes still reach the workload:
//! its SDK will refuse them too); what was read before stays counted.
use aws_smithy_eventstream::frame::read_message_from;
use aws_smithy_types::event_stream::{HeaderValue, Message};
use bytes::BytesMut;

/// A frame's bounds: its prelude and CRCs (16 bytes) at least; the framing
/// allows up to 16 MiB of payload and 128 KiB of headers.
const MIN_FRAME: usize = 16;
const MAX_FRAME: usize = 16 * 1024 * 1024 + 128 * 1024 + 16;

/// One decoded message, as adapters see it.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// `:message-type`: `event`, or `exception` / `error` for a failure.
    pub message_type: &'a str,
    /// `:event-type` (`contentBlockDelta`, `metadata`, `chunk`, …), or
    /// `:exception-type` / `:error-code` for a failure.
    pub event_type: &'a str,
    pub payload: &'a [u8],
}

#[derive(Debug, Default)]
pub struct EventStreamReader {
    held: BytesMut,
    /// A frame failed its checks (or outgrew the bound): nothing more is read.
    pub broken: bool,
    /// Messages decoded.
    pub messages: u64,
}

impl EventStreamReader {
    pub fn feed(&mut self, chunk: &[u8], mut on: impl FnMut(Event<'_>)) {
        if self.broken {
            return;
        }
        self.held.extend_from_slice(chunk);
        // Each frame starts with its total length (4 bytes, big-endian):
        // one that cannot be a frame stops the reading at once instead of
        // waiting for bytes that never make one.
        while self.held.len() >= 4 {
            let len = u32::from_be_bytes([self.held[0], self.held[1], self.held[2], self.held[3]]);
            let len = len as usize;
            if !(MIN_FRAME..=MAX_FRAME).contains(&len) {
                tracing::debug!(
                    len,
                    "an event-stream frame claims an impossible length; usage of the rest is not read"
                );
                self.stop();
                return;
            }
            if self.held.len() < len {
                return;
            }
            match read_message_from(self.held.split_to(len).freeze()) {
                Ok(m) => {
                    self.messages += 1;
                    on(event(&m));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "an event-stream frame failed its checks; usage of the rest is not read");
                    self.stop();
                    return;
                }
            }
        }
    }

    fn stop(&mut self) {
        self.broken = true;
        self.held = BytesMut::new();
    }
}

fn event(m: &Message) -> Event<'_> {
    let header = |name: &str| {
        m.headers()
            .iter()
            .find(|h| h.name().as_str() == name)
            .and_then(|h| match h.value() {
                HeaderValue::String(s) => Some(s.as_str()),
                _ => None,
            })
    };
    let message_type = header(":message-type").unwrap_or("event");
    let event_type = header(":event-type")
        .or_else(|| header(":exception-type"))
        .or_else(|| header(":error-code"))
        .unwrap_or("");
    Event {
        message_type,
        event_type,
        payload: m.payload(),
    }
}

/// One event-stream message's bytes (the framing as a provider writes it):
/// for tests here and the mock provider.
pub fn encode(message_type: &str, event_type: &str, payload: &[u8]) -> Vec<u8> {
    use aws_smithy_types::event_stream::Header;
    let kind = if message_type == "event" {
        ":event-type"
    } else {
        ":exception-type"
    };
    let m = Message::new(bytes::Bytes::copy_from_slice(payload))
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String(message_type.to_string().into()),
        ))
        .add_header(Header::new(
            kind,
            HeaderValue::String(event_type.to_string().into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".to_string().into()),
        ));
    let mut out = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&m, &mut out)
        .expect("a message of bounded headers always encodes");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], chunk: usize) -> (Vec<(String, String, String)>, EventStreamReader) {
        let mut r = EventStreamReader::default();
        let mut seen = Vec::new();
        for c in bytes.chunks(chunk) {
            r.feed(c, |e| {
                seen.push((
                    e.message_type.to_string(),
                    e.event_type.to_string(),
                    String::from_utf8_lossy(e.payload).into_owned(),
                ))
            });
        }
        (seen, r)
    }

    #[test]
    fn messages_are_read_across_any_split() {
        let mut s = encode("event", "messageStart", br#"{"role":"assistant"}"#);
        s.extend(encode(
            "event",
            "contentBlockDelta",
            br#"{"delta":{"text":"Hi"}}"#,
        ));
        s.extend(encode(
            "exception",
            "throttlingException",
            br#"{"message":"slow down"}"#,
        ));
        for chunk in [1, 3, 7, 64, s.len()] {
            let (seen, r) = read(&s, chunk);
            assert!(!r.broken);
            assert_eq!(r.messages, 3);
            assert_eq!(
                seen[0],
                (
                    "event".into(),
                    "messageStart".into(),
                    r#"{"role":"assistant"}"#.into()
                )
            );
            assert_eq!(seen[1].1, "contentBlockDelta");
            assert_eq!(seen[2].0, "exception");
            assert_eq!(seen[2].1, "throttlingException");
        }
    }

    #[test]
    fn a_frame_that_fails_its_crc_stops_the_reading() {
        let good = encode("event", "a", b"{}");
        let mut bad = encode("event", "b", b"{\"x\":1}");
        let n = bad.len();
        bad[n - 6] ^= 0xff; // a payload byte: the message CRC no longer holds
        let mut s = good.clone();
        s.extend(&bad);
        s.extend(&good);
        let (seen, r) = read(&s, 5);
        assert!(r.broken);
        assert_eq!(seen.len(), 1, "what came before the bad frame counts");
        // A prelude claiming more than the framing allows.
        let mut huge = vec![0xff, 0xff, 0xff, 0xff];
        huge.extend([0u8; 8]);
        let (seen, r) = read(&huge, 12);
        assert!(r.broken && seen.is_empty());
    }
}
