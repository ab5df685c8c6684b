//! HTTP/1.1 messages out of one direction of captured plaintext.
//!
//! Hand-written framing around `httparse` (which parses each head): the
//! bytes are *observed*, not served, so no server or client state machine
//! (hyper's) fits — there is nobody to answer, the stream arrives in
//! arbitrary pieces from the kernel, and a response's framing depends on the
//! request it answers (HEAD, 1xx/204/304). What is done here is only the
//! body framing of RFC 9112 §6: Content-Length, chunked, until close.
//! Fuzzed (`fuzz/fuzz_targets/captured_http.rs`).

/// Longest head kept waiting for its end; a longer one ends the stream
/// (`Part::Broken`): no provider sends one.
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers one head may have.
const MAX_HEADERS: usize = 128;

/// A parsed request or response head.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Head {
    /// Requests: method and target.
    pub method: String,
    pub target: String,
    /// Responses: the status.
    pub status: u16,
    /// Lowercase names, values as text (non-UTF-8 values are dropped).
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.headers.iter().any(|(n, v)| {
            n == "transfer-encoding"
                && v.rsplit(',')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
        })
    }

    fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }
}

/// How a message's body is delimited, as the caller decides it from the
/// head (and, for a response, from the request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (a response without length).
    Close,
}

impl Framing {
    /// A request's body (RFC 9112 §6.3: no length and not chunked: none).
    pub fn of_request(head: &Head) -> Self {
        if head.chunked() {
            Framing::Chunked
        } else {
            head.content_length().map_or(Framing::None, Framing::Length)
        }
    }

    /// A response's body, given the method of the request it answers.
    pub fn of_response(head: &Head, method: &str) -> Self {
        let s = head.status;
        if method.eq_ignore_ascii_case("HEAD") || (100..200).contains(&s) || s == 204 || s == 304 {
            Framing::None
        } else if head.chunked() {
            Framing::Chunked
        } else {
            head.content_length()
                .map_or(Framing::Close, Framing::Length)
        }
    }
}

/// What one direction's bytes held, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    Head(Head),
    /// Body bytes (chunked framing removed).
    Data(Vec<u8>),
    /// The message ended.
    End,
    /// The bytes are not HTTP/1.1 (or a head too long): nothing more is
    /// parsed in this direction.
    Broken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Length(u64),
    /// Waiting for a chunk-size line.
    ChunkSize,
    /// Inside a chunk: bytes left, then its CRLF.
    ChunkData(u64),
    ChunkCrlf,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Close,
    Broken,
}

/// One direction's framer. `feed` takes bytes as they come; `framing`
/// decides a body from each head.
#[derive(Debug)]
pub struct Framer {
    phase: Phase,
    /// Bytes not consumed yet (a partial head or size line).
    buf: Vec<u8>,
    request: bool,
}

impl Framer {
    pub fn requests() -> Self {
        Self::new(true)
    }

    pub fn responses() -> Self {
        Self::new(false)
    }

    fn new(request: bool) -> Self {
        Self {
            phase: Phase::Head,
            buf: Vec::new(),
            request,
        }
    }

    pub fn is_broken(&self) -> bool {
        self.phase == Phase::Broken
    }

    /// The stream ended (the connection closed): a body read until close ends.
    pub fn close(&mut self, out: &mut Vec<Part>) {
        if self.phase == Phase::Close {
            out.push(Part::End);
        }
        self.phase = Phase::Broken;
        self.buf.clear();
    }

    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        framing: &mut dyn FnMut(&Head) -> Framing,
        out: &mut Vec<Part>,
    ) {
        while !bytes.is_empty() {
            match self.phase {
                Phase::Broken => return,
                Phase::Head => {
                    let used = self.head(bytes, framing, out);
                    bytes = &bytes[used..];
                }
                Phase::Length(left) => {
                    let n = (left.min(bytes.len() as u64)) as usize;
                    out.push(Part::Data(bytes[..n].to_vec()));
                    bytes = &bytes[n..];
                    self.phase = if left == n as u64 {
                        out.push(Part::End);
                        Phase::Head
                    } else {
                        Phase::Length(left - n as u64)
                    };
                }
                Phase::Close => {
                    out.push(Part::Data(bytes.to_vec()));
                    return;
                }
                Phase::ChunkData(left) => {
                    let n = (left.min(bytes.len() as u64)) as usize;
                    out.push(Part::Data(bytes[..n].to_vec()));
                    bytes = &bytes[n..];
                    self.phase = if left == n as u64 {
                        Phase::ChunkCrlf
                    } else {
                        Phase::ChunkData(left - n as u64)
                    };
                }
                Phase::ChunkSize | Phase::ChunkCrlf | Phase::Trailers => {
                    // A line longer than a head may be is not HTTP, however
                    // it is cut.
                    let Some(line) = self.line(&mut bytes) else {
                        if self.buf.len() > MAX_HEAD {
                            self.broken(out);
                        }
                        return;
                    };
                    if line.len() > MAX_HEAD {
                        return self.broken(out);
                    }
                    self.chunk_line(&line, out);
                }
            }
        }
    }

    /// One line of chunked framing (without its line end).
    fn chunk_line(&mut self, line: &[u8], out: &mut Vec<Part>) {
        self.phase = match self.phase {
            Phase::ChunkCrlf if line.is_empty() => Phase::ChunkSize,
            Phase::ChunkSize => {
                let size = line.split(|b| *b == b';').next().unwrap_or_default();
                match std::str::from_utf8(size)
                    .ok()
                    .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                {
                    Some(0) => Phase::Trailers,
                    Some(n) => Phase::ChunkData(n),
                    None => return self.broken(out),
                }
            }
            Phase::Trailers if line.is_empty() => {
                out.push(Part::End);
                Phase::Head
            }
            Phase::Trailers => Phase::Trailers,
            _ => return self.broken(out),
        };
    }

    /// A whole line from the held bytes and `bytes`, consuming it.
    fn line(&mut self, bytes: &mut &[u8]) -> Option<Vec<u8>> {
        match bytes.iter().position(|b| *b == b'\n') {
            Some(i) => {
                self.buf.extend_from_slice(&bytes[..i]);
                *bytes = &bytes[i + 1..];
                let mut line = std::mem::take(&mut self.buf);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(line)
            }
            None => {
                self.buf.extend_from_slice(bytes);
                *bytes = &[];
                None
            }
        }
    }

    /// Parse a head from the held bytes plus `bytes`; how many of `bytes`
    /// were used.
    fn head(
        &mut self,
        bytes: &[u8],
        framing: &mut dyn FnMut(&Head) -> Framing,
        out: &mut Vec<Part>,
    ) -> usize {
        let held = self.buf.len();
        self.buf.extend_from_slice(bytes);
        // Blank lines before a message are allowed (RFC 9112 §2.2).
        let lead = self
            .buf
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        let parsed = parse_head(&self.buf[lead..], self.request);
        match parsed {
            // Too long, whether it arrived whole or in pieces.
            Ok(Some((_, len))) if lead + len > MAX_HEAD => {
                self.broken(out);
                bytes.len()
            }
            Ok(Some((head, len))) => {
                let used = (lead + len).saturating_sub(held);
                self.buf.clear();
                let f = framing(&head);
                out.push(Part::Head(head));
                self.phase = match f {
                    Framing::None => {
                        out.push(Part::End);
                        Phase::Head
                    }
                    Framing::Length(0) => {
                        out.push(Part::End);
                        Phase::Head
                    }
                    Framing::Length(n) => Phase::Length(n),
                    Framing::Chunked => Phase::ChunkSize,
                    Framing::Close => Phase::Close,
                };
                used
            }
            Ok(None) if self.buf.len() <= MAX_HEAD => bytes.len(),
            _ => {
                self.broken(out);
                bytes.len()
            }
        }
    }

    fn broken(&mut self, out: &mut Vec<Part>) {
        self.phase = Phase::Broken;
        self.buf = Vec::new();
        out.push(Part::Broken);
    }
}

/// A complete head at the start of `b` and its length; None: not complete yet.
fn parse_head(b: &[u8], request: bool) -> Result<Option<(Head, usize)>, httparse::Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (len, mut head) = if request {
        let mut r = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(len) = r.parse(b)? else {
            return Ok(None);
        };
        (
            len,
            Head {
                method: r.method.unwrap_or_default().to_string(),
                target: r.path.unwrap_or_default().to_string(),
                ..Head::default()
            },
        )
    } else {
        let mut r = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = r.parse(b)? else {
            return Ok(None);
        };
        (
            len,
            Head {
                status: r.code.unwrap_or_default(),
                ..Head::default()
            },
        )
    };
    head.headers = headers
        .iter()
        .take_while(|h| !h.name.is_empty())
        .filter_map(|h| {
            let v = std::str::from_utf8(h.value).ok()?;
            Some((h.name.to_ascii_lowercase(), v.to_string()))
        })
        .collect();
    Ok(Some((head, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(f: &mut Framer, chunks: &[&[u8]], method: &str) -> Vec<Part> {
        let mut out = Vec::new();
        let request = f.request;
        for c in chunks {
            f.feed(
                c,
                &mut |h| {
                    if request {
                        Framing::of_request(h)
                    } else {
                        Framing::of_response(h, method)
                    }
                },
                &mut out,
            );
        }
        out
    }

    /// Data parts joined, so chunking does not matter to the comparison.
    fn joined(parts: Vec<Part>) -> Vec<Part> {
        let mut out: Vec<Part> = Vec::new();
        for p in parts {
            match (out.last_mut(), p) {
                (Some(Part::Data(d)), Part::Data(more)) => d.extend(more),
                (_, p) => out.push(p),
            }
        }
        out
    }

    const REQ: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Length: 11\r\n\r\n{\"a\":12345}GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn requests_by_length_and_none_in_any_cut() {
        let whole = joined(parts(&mut Framer::requests(), &[REQ], ""));
        assert_eq!(whole.len(), 5, "{whole:?}");
        let Part::Head(h) = &whole[0] else { panic!() };
        assert_eq!(
            (h.method.as_str(), h.target.as_str()),
            ("POST", "/v1/chat/completions")
        );
        assert_eq!(h.header("host"), Some("api.openai.com"));
        assert_eq!(whole[1], Part::Data(b"{\"a\":12345}".to_vec()));
        assert_eq!(whole[2], Part::End);
        assert!(matches!(&whole[3], Part::Head(h) if h.method == "GET"));
        assert_eq!(whole[4], Part::End);
        for cut in 1..REQ.len() {
            let got = joined(parts(
                &mut Framer::requests(),
                &[&REQ[..cut], &REQ[cut..]],
                "",
            ));
            assert_eq!(got, whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = REQ.chunks(1).collect();
        assert_eq!(joined(parts(&mut Framer::requests(), &bytes, "")), whole);
    }

    #[test]
    fn chunked_responses_with_extensions_and_trailers() {
        let resp: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        let whole = joined(parts(&mut Framer::responses(), &[resp], "POST"));
        assert_eq!(whole.len(), 5, "{whole:?}");
        assert!(matches!(&whole[0], Part::Head(h) if h.status == 200));
        assert_eq!(whole[1], Part::Data(b"hello world".to_vec()));
        assert_eq!(whole[2], Part::End);
        assert!(matches!(&whole[3], Part::Head(h) if h.status == 204));
        assert_eq!(whole[4], Part::End);
        for cut in 1..resp.len() {
            let got = joined(parts(
                &mut Framer::responses(),
                &[&resp[..cut], &resp[cut..]],
                "POST",
            ));
            assert_eq!(got, whole, "cut at {cut}");
        }
    }

    #[test]
    fn framing_table() {
        let head = |status: u16, h: &[(&str, &str)]| Head {
            status,
            headers: h
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..Head::default()
        };
        let cases = [
            (
                head(200, &[("content-length", "5")]),
                "POST",
                Framing::Length(5),
            ),
            (
                head(200, &[("transfer-encoding", "gzip, chunked")]),
                "POST",
                Framing::Chunked,
            ),
            (head(200, &[]), "POST", Framing::Close),
            (head(200, &[("content-length", "5")]), "HEAD", Framing::None),
            (head(204, &[]), "POST", Framing::None),
            (head(304, &[]), "GET", Framing::None),
            (head(101, &[]), "GET", Framing::None),
        ];
        for (h, method, want) in cases {
            assert_eq!(Framing::of_response(&h, method), want, "{h:?} {method}");
        }
        assert_eq!(Framing::of_request(&head(0, &[])), Framing::None);
    }

    #[test]
    fn a_body_until_close_ends_at_close_and_garbage_breaks() {
        let mut f = Framer::responses();
        let mut out = parts(&mut f, &[b"HTTP/1.1 200 OK\r\n\r\nabc", b"def"], "GET");
        f.close(&mut out);
        assert_eq!(
            joined(out)[1..],
            [Part::Data(b"abcdef".to_vec()), Part::End]
        );

        let mut f = Framer::requests();
        let out = parts(&mut f, &[b"\x16\x03\x01 not http at all\r\n\r\n"], "");
        assert_eq!(out, vec![Part::Broken]);
        assert!(f.is_broken());
        let mut f = Framer::requests();
        let endless = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(
            parts(&mut f, &[b"GET / HTTP/1.1\r\nX: ", &endless], ""),
            vec![Part::Broken]
        );
    }
}
