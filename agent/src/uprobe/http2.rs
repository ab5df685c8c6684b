//! HTTP/2 frames out of one direction of captured plaintext (RFC 9113),
//! header blocks decoded with `loona-hpack`.
//!
//! Hand-written framing, as `http1` is: the bytes are observed, not served
//! (no flow control, no SETTINGS to answer), so only what reading needs is
//! here — the 9-byte frame header, padding, HEADERS + CONTINUATION joined
//! into one block, END_STREAM, RST_STREAM. Every header block is decoded,
//! in order, whatever its stream: HPACK's dynamic table depends on all of
//! them. Fuzzed (`fuzz/fuzz_targets/captured_http.rs`).

/// What a client's direction starts with.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame payload read (the protocol's maximum is 16 MiB; a
/// peer must be told before it sends more than 16 KiB).
const MAX_FRAME: usize = 1 << 24;
/// Largest header block kept while its CONTINUATIONs come.
const MAX_BLOCK: usize = 256 * 1024;
/// HPACK dynamic table size a peer may ask for.
const MAX_TABLE: usize = 64 * 1024;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const PUSH_PROMISE: u8 = 5;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What one direction held, in order, per stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A header block (lowercase names; pseudo-headers included).
    Headers {
        stream: u32,
        headers: Vec<(String, String)>,
        end: bool,
    },
    Data {
        stream: u32,
        data: Vec<u8>,
        end: bool,
    },
    /// The stream was reset.
    Reset { stream: u32 },
    /// Not HTTP/2 (or an undecodable header block): nothing more is read.
    Broken,
}

/// One direction's reader.
pub struct H2Framer {
    /// Waiting for the client preface first.
    preface: bool,
    buf: Vec<u8>,
    hpack: loona_hpack::Decoder<'static>,
    /// A header block waiting for its CONTINUATIONs: stream, END_STREAM, bytes.
    block: Option<(u32, bool, Vec<u8>)>,
    broken: bool,
}

impl H2Framer {
    /// The client's direction (starts with the preface).
    pub fn client() -> Self {
        Self::new(true)
    }

    /// The server's direction.
    pub fn server() -> Self {
        Self::new(false)
    }

    fn new(preface: bool) -> Self {
        let mut hpack = loona_hpack::Decoder::new();
        hpack.set_max_allowed_table_size(MAX_TABLE);
        Self {
            preface,
            buf: Vec::new(),
            hpack,
            block: None,
            broken: false,
        }
    }

    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        if self.broken {
            return;
        }
        self.buf.extend_from_slice(bytes);
        if self.preface {
            let n = self.buf.len().min(PREFACE.len());
            if self.buf[..n] != PREFACE[..n] {
                return self.broken(out);
            }
            if n < PREFACE.len() {
                return;
            }
            self.buf.drain(..PREFACE.len());
            self.preface = false;
        }
        let mut at = 0;
        while self.buf.len() - at >= 9 {
            let h = &self.buf[at..at + 9];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if len > MAX_FRAME {
                return self.broken(out);
            }
            if self.buf.len() - at < 9 + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let payload = self.buf[at + 9..at + 9 + len].to_vec();
            at += 9 + len;
            if !self.frame(kind, flags, stream, &payload, out) {
                return self.broken(out);
            }
        }
        self.buf.drain(..at);
    }

    /// One frame; false when it breaks the stream of frames.
    fn frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
        out: &mut Vec<Frame>,
    ) -> bool {
        // A header block in progress admits only its CONTINUATIONs.
        if let Some((s, _, _)) = &self.block
            && (kind != CONTINUATION || *s != stream)
        {
            return false;
        }
        match kind {
            DATA => {
                let Some(data) = unpadded(flags, payload) else {
                    return false;
                };
                out.push(Frame::Data {
                    stream,
                    data: data.to_vec(),
                    end: flags & END_STREAM != 0,
                });
            }
            HEADERS | PUSH_PROMISE => {
                let Some(mut block) = unpadded(flags, payload) else {
                    return false;
                };
                if kind == HEADERS && flags & PRIORITY != 0 {
                    let Some(rest) = block.get(5..) else {
                        return false;
                    };
                    block = rest;
                }
                if kind == PUSH_PROMISE {
                    // The promised stream's id, then its request's headers:
                    // decoded for HPACK's sake, not reported (a promise is
                    // no call the workload made).
                    let Some(rest) = block.get(4..) else {
                        return false;
                    };
                    block = rest;
                }
                let end = flags & END_STREAM != 0 && kind == HEADERS;
                let id = if kind == HEADERS { stream } else { 0 };
                if flags & END_HEADERS != 0 {
                    return self.block_done(id, end, block, out);
                }
                if block.len() > MAX_BLOCK {
                    return false;
                }
                self.block = Some((id, end, block.to_vec()));
            }
            CONTINUATION => {
                let Some((s, end, mut block)) = self.block.take() else {
                    return false;
                };
                block.extend_from_slice(payload);
                if block.len() > MAX_BLOCK {
                    return false;
                }
                if flags & END_HEADERS != 0 {
                    return self.block_done(s, end, &block, out);
                }
                self.block = Some((s, end, block));
            }
            RST_STREAM => out.push(Frame::Reset { stream }),
            GOAWAY => {}
            _ => {} // SETTINGS, PING, PRIORITY, WINDOW_UPDATE, unknown: nothing to read
        }
        true
    }

    /// A whole header block of `stream` (0: a push promise's, not reported).
    fn block_done(&mut self, stream: u32, end: bool, block: &[u8], out: &mut Vec<Frame>) -> bool {
        let Ok(decoded) = self.hpack.decode(block) else {
            return false;
        };
        if stream == 0 {
            return true;
        }
        let headers = decoded
            .into_iter()
            .filter_map(|(n, v)| {
                Some((
                    String::from_utf8(n).ok()?.to_ascii_lowercase(),
                    String::from_utf8(v).ok()?,
                ))
            })
            .collect();
        out.push(Frame::Headers {
            stream,
            headers,
            end,
        });
        true
    }

    fn broken(&mut self, out: &mut Vec<Frame>) {
        self.broken = true;
        self.buf = Vec::new();
        self.block = None;
        out.push(Frame::Broken);
    }
}

/// A padded frame's payload without its padding.
fn unpadded(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    if flags & PADDED == 0 {
        return Some(payload);
    }
    let (&pad, rest) = payload.split_first()?;
    rest.len().checked_sub(usize::from(pad)).map(|n| &rest[..n])
}

/// One frame's bytes (tests of this module and of `h2_calls`).
#[cfg(test)]
pub(super) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(headers: &[(&[u8], &[u8])]) -> Vec<u8> {
        loona_hpack::Encoder::new().encode(headers.iter().copied())
    }

    fn frames(f: &mut H2Framer, bytes: &[u8], cut: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        for part in bytes.chunks(cut.max(1)) {
            f.feed(part, &mut out);
        }
        out
    }

    #[test]
    fn a_request_in_headers_continuation_and_padded_data_in_any_cut() {
        let hb = block(&[
            (b":method", b"POST"),
            (b":path", b"/v1/chat/completions"),
            (b":authority", b"api.openai.com"),
            (b"content-type", b"application/json"),
        ]);
        let (a, b) = hb.split_at(5);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        bytes.extend(frame(HEADERS, 0, 1, a));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        let mut padded = vec![3];
        padded.extend_from_slice(b"{\"a\":1}");
        padded.extend_from_slice(&[0, 0, 0]);
        bytes.extend(frame(DATA, PADDED | END_STREAM, 1, &padded));
        bytes.extend(frame(RST_STREAM, 0, 3, &[0, 0, 0, 8]));
        let whole = frames(&mut H2Framer::client(), &bytes, bytes.len());
        assert_eq!(whole.len(), 3, "{whole:?}");
        let Frame::Headers {
            stream: 1,
            headers,
            end: false,
        } = &whole[0]
        else {
            panic!("{whole:?}")
        };
        assert!(headers.contains(&(":path".into(), "/v1/chat/completions".into())));
        assert_eq!(
            whole[1],
            Frame::Data {
                stream: 1,
                data: b"{\"a\":1}".to_vec(),
                end: true
            }
        );
        assert_eq!(whole[2], Frame::Reset { stream: 3 });
        for cut in [1, 2, 7, 9, 10, 33] {
            assert_eq!(
                frames(&mut H2Framer::client(), &bytes, cut),
                whole,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn not_http2_and_bad_blocks_break() {
        let mut f = H2Framer::client();
        assert_eq!(
            frames(&mut f, b"POST / HTTP/1.1\r\n\r\n", 100),
            vec![Frame::Broken]
        );
        let mut f = H2Framer::server();
        let bad = frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(frames(&mut f, &bad, 100), vec![Frame::Broken]);
        // Found by the fuzzer (fluke-hpack panicked on it; loona-hpack, its
        // successor, answers an error): a dynamic table size update whose
        // integer is cut short.
        let mut f = H2Framer::server();
        let cut = frame(HEADERS, END_HEADERS, 1, &[0x3f]);
        assert_eq!(frames(&mut f, &cut, 100), vec![Frame::Broken]);
        // A DATA frame inside a header block.
        let mut f = H2Framer::server();
        let mut bytes = frame(HEADERS, 0, 1, &block(&[(b":status", b"200")]));
        bytes.extend(frame(DATA, 0, 1, b"x"));
        assert_eq!(frames(&mut f, &bytes, 100), vec![Frame::Broken]);
    }
}
