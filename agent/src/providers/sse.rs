//! Incremental Server-Sent Events parser.
//!
//! Hand-written on purpose: the SSE framing rules (WHATWG HTML §9.2) are a
//! dozen lines, and the proxy needs a *push* parser it can feed arbitrary
//! network chunks to as they are relayed; the SSE crates on crates.io wrap a
//! futures `Stream` and would own the body we must pass through untouched.

/// Longest line kept. Provider events are a few KiB; a line beyond this is
/// dropped (and counted) instead of growing memory without bound.
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
    skipping_long_line: bool,
    pub dropped_lines: u64,
}

/// One dispatched event: its `event:` name (empty when none) and joined `data:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

impl SseParser {
    /// Feed bytes; `on_event` is called for each complete event.
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(SseEvent)) {
        for &b in bytes {
            if b == b'\n' {
                if self.skipping_long_line {
                    self.skipping_long_line = false;
                    self.line.clear();
                    continue;
                }
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.on_line(&line, &mut on_event);
            } else if !self.skipping_long_line {
                if self.line.len() >= MAX_LINE {
                    self.skipping_long_line = true;
                    self.dropped_lines += 1;
                    self.line.clear();
                } else {
                    self.line.push(b);
                }
            }
        }
    }

    fn on_line(&mut self, line: &[u8], on_event: &mut impl FnMut(SseEvent)) {
        if line.is_empty() {
            if self.has_data {
                on_event(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return; // comment / keep-alive
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {} // id, retry: not needed for usage
        }
    }
}

/// Ends (exclusive) of the complete events in `b`: each just after the
/// blank line (`\n\n` or `\n\r\n`) that ends it. For filters that pass
/// events on as they came and edit only some.
pub fn event_ends(b: &[u8]) -> impl Iterator<Item = usize> + '_ {
    (1..b.len()).filter_map(move |i| {
        let blank = b[i] == b'\n'
            && (b[i - 1] == b'\n' || (i >= 2 && b[i - 1] == b'\r' && b[i - 2] == b'\n'));
        blank.then_some(i + 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| out.push(e));
        }
        out
    }

    #[test]
    fn parses_across_arbitrary_chunk_boundaries() {
        let stream = b"event: message_start\ndata: {\"a\":1}\n\n: ping\r\ndata: line1\r\ndata: line2\r\n\r\ndata: [DONE]\n\n";
        let whole = events(&[stream]);
        assert_eq!(whole.len(), 3);
        assert_eq!(
            whole[0],
            SseEvent {
                event: "message_start".into(),
                data: "{\"a\":1}".into()
            }
        );
        assert_eq!(whole[1].data, "line1\nline2");
        assert_eq!(whole[2].data, "[DONE]");
        // Byte by byte gives the same events.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(&bytes), whole);
    }

    #[test]
    fn overlong_lines_are_dropped_not_buffered() {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        p.feed(b"data: ", |e| out.push(e));
        p.feed(&vec![b'x'; MAX_LINE + 10], |e| out.push(e));
        p.feed(b"\ndata: ok\n\n", |e| out.push(e));
        assert_eq!(p.dropped_lines, 1);
        assert_eq!(
            out,
            vec![SseEvent {
                event: String::new(),
                data: "ok".into()
            }]
        );
    }
}
