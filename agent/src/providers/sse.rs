//! Incremental Server-Sent Events parser.
//!
//! Hand-written on purpose: the SSE framing rules (WHATWG HTML §9.2) are a
//! dozen lines, and the proxy needs a *push* parser it can feed arbitrary
//! network chunks to as they are relayed; the SSE crates on crates.io wrap a
//! futures `Stream` and would own the body we must pass through untouched.

/// Longest line kept. Provider events are a few KiB; a line beyond this is
/// dropped (and counted) instead of growing memory without bound.
const MAX_LINE: usize = 1 << 20;

/// A line buffer grown past this (by a long event) is given back after it.
const KEEP_LINE_CAPACITY: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct SseParser {
    /// The line being read; its capacity is kept from line to line (a
    /// stream is thousands of lines of similar length).
    line: Vec<u8>,
    /// The event being read, handed out by reference and then cleared, so
    /// its buffers serve the next event too.
    current: SseEvent,
    has_data: bool,
    skipping_long_line: bool,
    pub dropped_lines: u64,
}

/// One dispatched event: its `event:` name (empty when none) and joined `data:`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

impl SseParser {
    /// Feed bytes; `on_event` is called for each complete event.
    pub fn feed(&mut self, mut bytes: &[u8], mut on_event: impl FnMut(&SseEvent)) {
        while !bytes.is_empty() {
            let (part, ended) = match memchr::memchr(b'\n', bytes) {
                Some(i) => {
                    let part = &bytes[..i];
                    bytes = &bytes[i + 1..];
                    (part, true)
                }
                None => (std::mem::take(&mut bytes), false),
            };
            if !self.skipping_long_line {
                if self.line.len() + part.len() > MAX_LINE {
                    self.skipping_long_line = true;
                    self.dropped_lines += 1;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            if !ended {
                continue;
            }
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
            line.clear();
            if line.capacity() > KEEP_LINE_CAPACITY {
                line = Vec::new();
            }
            self.line = line;
        }
    }

    fn on_line(&mut self, line: &[u8], on_event: &mut impl FnMut(&SseEvent)) {
        if line.is_empty() {
            if self.has_data {
                on_event(&self.current);
            }
            self.current.event.clear();
            self.current.data.clear();
            if self.current.data.capacity() > KEEP_LINE_CAPACITY {
                self.current.data = String::new();
            }
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
            "event" => {
                self.current.event.clear();
                self.current.event.push_str(value);
            }
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
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
            p.feed(c, |e| out.push(e.clone()));
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
        p.feed(b"data: ", |e| out.push(e.clone()));
        p.feed(&vec![b'x'; MAX_LINE + 10], |e| out.push(e.clone()));
        p.feed(b"\ndata: ok\n\n", |e| out.push(e.clone()));
        assert_eq!(p.dropped_lines, 1);
        assert_eq!(
            out,
            vec![SseEvent {
                event: String::new(),
                data: "ok".into()
            }]
        );
    }

    #[test]
    fn a_line_of_the_longest_length_is_kept_one_byte_more_dropped() {
        for (len, kept) in [(MAX_LINE, true), (MAX_LINE + 1, false)] {
            // "data:" plus the value makes the line `len` bytes long.
            let mut stream = b"data:".to_vec();
            stream.resize(len, b'x');
            stream.extend_from_slice(b"\n\ndata: next\n\n");
            for chunk in [7, 4096, stream.len()] {
                let mut p = SseParser::default();
                let mut out = Vec::new();
                for c in stream.chunks(chunk) {
                    p.feed(c, |e| out.push(e.data.len()));
                }
                let want = if kept { vec![len - 5, 4] } else { vec![4] };
                assert_eq!(out, want, "line of {len}, chunks of {chunk}");
                assert_eq!(p.dropped_lines, u64::from(!kept));
            }
        }
    }
}
