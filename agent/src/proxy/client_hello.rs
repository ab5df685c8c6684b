//! What a client's first bytes say: a TLS ClientHello (server name, ALPN), plain
//! text, or something malformed.
//!
//! The relay feeds this a copy of each chunk it forwards, so inspection adds
//! no latency and no buffering, and a protocol where the server speaks first
//! is never stalled waiting for the client. Parsing is rustls's own
//! (`server::Acceptor`), not a hand-written parser.
use std::io::Cursor;

pub use crate::telemetry::records::TlsInfo;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Hello {
    /// Not enough bytes yet (or the client sent nothing).
    #[default]
    Pending,
    Tls(TlsInfo),
    /// The first byte is not a TLS handshake record: plaintext (or another protocol).
    NotTls,
    /// Starts like TLS but is not a valid ClientHello.
    Malformed(String),
}

/// Largest ClientHello we keep reading for. One TLS record carries at most
/// 16 KiB; ClientHellos with post-quantum key shares are ~2 KiB, and a few
/// clients split large ones over records. 64 KiB bounds a client that keeps
/// sending handshake bytes forever.
const MAX_HELLO: usize = 64 * 1024;
/// TLS record content type "handshake".
const HANDSHAKE: u8 = 0x16;

pub struct HelloSniffer {
    acceptor: Option<rustls::server::Acceptor>,
    seen: usize,
    state: Hello,
}

impl Default for HelloSniffer {
    fn default() -> Self {
        Self {
            acceptor: Some(rustls::server::Acceptor::default()),
            seen: 0,
            state: Hello::Pending,
        }
    }
}

impl HelloSniffer {
    /// Feed the next bytes the client sent; returns the state after them.
    pub fn feed(&mut self, mut bytes: &[u8]) -> &Hello {
        if self.state != Hello::Pending || bytes.is_empty() {
            return &self.state;
        }
        if self.seen == 0 && bytes[0] != HANDSHAKE {
            self.state = Hello::NotTls;
            return &self.state;
        }
        let Some(acceptor) = self.acceptor.as_mut() else {
            return &self.state;
        };
        while !bytes.is_empty() {
            let mut cur = Cursor::new(bytes);
            match acceptor.read_tls(&mut cur) {
                Ok(n) => {
                    self.seen += n;
                    bytes = &bytes[n..];
                }
                Err(e) => {
                    self.state = Hello::Malformed(e.to_string());
                    return &self.state;
                }
            }
            match acceptor.accept() {
                Ok(Some(accepted)) => {
                    let hello = accepted.client_hello();
                    let info = TlsInfo {
                        sni: hello.server_name().map(str::to_owned),
                        alpn: hello
                            .alpn()
                            .map(|it| {
                                it.map(|p| String::from_utf8_lossy(p).into_owned())
                                    .collect()
                            })
                            .unwrap_or_default(),
                    };
                    self.acceptor = None;
                    self.state = Hello::Tls(info);
                    return &self.state;
                }
                Ok(None) => {}
                Err((e, _alert)) => {
                    self.acceptor = None;
                    self.state = Hello::Malformed(e.to_string());
                    return &self.state;
                }
            }
            if self.seen > MAX_HELLO {
                self.acceptor = None;
                self.state = Hello::Malformed(format!(
                    "no complete ClientHello in the first {MAX_HELLO} bytes"
                ));
                return &self.state;
            }
        }
        &self.state
    }

    pub fn state(&self) -> &Hello {
        &self.state
    }
}

/// Peek (without consuming) until the client's first bytes tell what they
/// are, the client stops, or `timeout` passes. The bytes stay in the socket:
/// the caller can still splice them or hand the stream to a TLS acceptor.
///
/// A ClientHello spread over several TLS records is read whole (rustls'
/// `Acceptor` joins them), up to `MAX_HELLO` bytes; beyond, `Malformed`.
pub async fn peek_hello(stream: &tokio::net::TcpStream, timeout: std::time::Duration) -> Hello {
    // One full record first (nearly every ClientHello fits); the buffer
    // grows to MAX_HELLO plus a record header — what the sniffer reads at
    // most — only for a client whose ClientHello needs more. Every
    // connection peeks at once under load, so the first size is what the
    // proxy's memory pays.
    const FIRST_RECORD: usize = 5 + 16 * 1024;
    const PEEK: usize = MAX_HELLO + 5;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; FIRST_RECORD];
    // peek() returns at once while bytes are queued, so waiting for the rest
    // of a split ClientHello needs a (short, growing) sleep between looks.
    let mut backoff = std::time::Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Hello::Pending, // EOF, error or timeout: nothing to tell
        };
        let state = HelloSniffer::default().feed(&buf[..n]).clone();
        if state != Hello::Pending {
            return state;
        }
        if n == buf.len() {
            if buf.len() == PEEK {
                return Hello::Malformed(format!(
                    "no complete ClientHello in the first {MAX_HELLO} bytes"
                ));
            }
            buf.resize(PEEK, 0);
            continue; // more may be queued already: look again at once
        }
        if tokio::time::Instant::now() + backoff >= deadline {
            return Hello::Pending;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A real ClientHello, as rustls's client writes it.
    fn client_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn extracts_sni_and_alpn_whole() {
        let hello = client_hello("api.openai.com", &["h2", "http/1.1"]);
        let mut s = HelloSniffer::default();
        assert_eq!(
            s.feed(&hello),
            &Hello::Tls(TlsInfo {
                sni: Some("api.openai.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()]
            })
        );
    }

    #[test]
    fn extracts_sni_byte_by_byte() {
        let hello = client_hello("api.anthropic.com", &[]);
        let mut s = HelloSniffer::default();
        for (i, b) in hello.iter().enumerate() {
            let st = s.feed(std::slice::from_ref(b)).clone();
            if i + 1 < hello.len() {
                assert_eq!(st, Hello::Pending, "complete too early at byte {i}");
            }
        }
        assert_eq!(
            s.state(),
            &Hello::Tls(TlsInfo {
                sni: Some("api.anthropic.com".into()),
                alpn: vec![]
            })
        );
        // Later bytes change nothing.
        assert!(matches!(s.feed(b"more"), Hello::Tls(_)));
    }

    #[test]
    fn plaintext_and_garbage() {
        assert_eq!(
            HelloSniffer::default().feed(b"GET / HTTP/1.1\r\n"),
            &Hello::NotTls
        );
        let mut s = HelloSniffer::default();
        let st = s
            .feed(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xff, 0xff, 0xff, 0xff, 0xff])
            .clone();
        assert!(matches!(st, Hello::Malformed(_)), "{st:?}");
        let mut s = HelloSniffer::default();
        assert_eq!(s.feed(&[]), &Hello::Pending);
    }

    #[tokio::test]
    async fn peek_leaves_bytes_in_place_and_waits_for_split_hellos() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hello = client_hello("api.openai.com", &["h2"]);
        let h = hello.clone();
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (a, b) = h.split_at(20);
            c.write_all(a).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            c.write_all(b).await.unwrap();
            c
        });
        let (mut s, _) = l.accept().await.unwrap();
        let got = peek_hello(&s, std::time::Duration::from_secs(5)).await;
        assert!(
            matches!(&got, Hello::Tls(i) if i.sni.as_deref() == Some("api.openai.com")),
            "{got:?}"
        );
        let mut all = vec![0u8; hello.len()];
        s.read_exact(&mut all).await.unwrap();
        assert_eq!(all, hello, "peeking consumed nothing");
        drop(client.await.unwrap());
        // A silent client: Pending after the timeout.
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(
            peek_hello(&s, std::time::Duration::from_millis(50)).await,
            Hello::Pending
        );
    }

    #[test]
    fn endless_handshake_bytes_are_bounded() {
        // Valid record headers announcing handshake fragments that never complete.
        let mut s = HelloSniffer::default();
        let mut rec = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xff];
        rec.resize(5 + 0x4000, 0);
        let mut state = Hello::Pending;
        for _ in 0..8 {
            state = s.feed(&rec).clone();
            if state != Hello::Pending {
                break;
            }
        }
        assert!(matches!(state, Hello::Malformed(_)), "{state:?}");
    }
}
