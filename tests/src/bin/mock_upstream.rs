//! Mock provider endpoint for the test node: answers every HTTP request with
//! JSON naming the TCP peer it saw, the address it was reached on, and (over
//! TLS) the server name the client asked for and the Host header.
//!
//! That answer is what the redirect tests check: a relayed connection arrives
//! from the node's address, a direct one from the pod's. HTTP handling is a
//! few lines by hand on purpose: the test needs only "read a request head,
//! write one response, close", and nothing between the socket and the peer
//! address it reports.
//!
//! Usage: tollgate-mock-upstream [--cert PEM --key PEM] ADDR:PORT... [tls:ADDR:PORT...]
//! `tls:` listeners speak TLS (http/1.1) with the given certificate; the
//! others speak TLS to clients that start with a ClientHello (when a
//! certificate is given; else they answer it with a TLS alert) and plain HTTP
//! to the rest.
use std::{net::SocketAddr, sync::Arc};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
};
use tokio_rustls::TlsAcceptor;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (mut cert, mut key, mut addrs) = (None, None, Vec::new());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cert" => cert = args.next(),
            "--key" => key = args.next(),
            _ => addrs.push(a),
        }
    }
    assert!(
        !addrs.is_empty(),
        "usage: tollgate-mock-upstream [--cert PEM --key PEM] ADDR:PORT... [tls:ADDR:PORT...]"
    );
    let acceptor = cert.zip(key).map(|(c, k)| {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c)
            .expect("cert file")
            .collect::<Result<_, _>>()
            .expect("cert PEM");
        let key = PrivateKeyDer::from_pem_file(&k).expect("key PEM");
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key match");
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(cfg))
    });
    let mut tasks = Vec::new();
    for spec in addrs {
        // `tls:` listeners always speak TLS; the others speak TLS to a client
        // whose first byte is a handshake record (when a certificate is
        // configured) and plaintext HTTP otherwise, like one provider port
        // that tests reach both ways.
        let (always_tls, addr) = match spec.strip_prefix("tls:") {
            Some(a) => (true, a.to_string()),
            None => (false, spec),
        };
        assert!(
            !always_tls || acceptor.is_some(),
            "tls: listeners need --cert and --key"
        );
        let tls = acceptor.clone();
        let addr: SocketAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("bad address {addr}: {e}"));
        let l = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, peer)) = l.accept().await else {
                    continue;
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    let speaks_tls = always_tls
                        || s.peek(&mut first)
                            .await
                            .is_ok_and(|n| n == 1 && first[0] == 0x16);
                    match tls.filter(|_| speaks_tls) {
                        None => answer(s, peer, addr, None).await,
                        Some(acc) => {
                            if let Ok(t) = acc.accept(s).await {
                                let sni = t.get_ref().1.server_name().map(str::to_owned);
                                answer(t, peer, addr, Some(sni.unwrap_or_default())).await;
                            }
                        }
                    }
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    peer: SocketAddr,
    local: SocketAddr,
    sni: Option<String>,
) {
    // Request heads here are small; 64 KiB bounds a misbehaving client.
    let mut buf = vec![0u8; 65536];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
        // A TLS ClientHello on a plaintext listener: answer with a
        // handshake_failure alert so the client fails fast.
        if sni.is_none() && buf[0] == 0x16 {
            let _ = s
                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
                .await;
            return;
        }
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head_end = buf[..n]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(n, |p| p + 4);
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let line = head.lines().next().unwrap_or_default().to_string();
    let header = |name: &str| {
        head.lines().find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        })
    };
    // The request body (LLM calls are POSTs with a content-length).
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(buf.len() - head_end);
    while n < head_end + length {
        match s.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    if let Some(resp) =
        tollgate_tests::mock_llm::respond(&path, &buf[head_end..n.min(head_end + length)])
    {
        // No content-length: the body ends when the connection closes, and
        // each piece is flushed on its own, as a provider streams.
        let head = format!(
            "HTTP/1.1 {} Mock\r\ncontent-type: {}\r\nconnection: close\r\nx-request-id: req_mock\r\n\r\n",
            resp.status, resp.content_type
        );
        let _ = s.write_all(head.as_bytes()).await;
        for c in resp.chunks {
            if s.write_all(c.as_bytes()).await.is_err() || s.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(resp.chunk_delay).await;
        }
        match resp.fault {
            // Drop without shutdown: no TLS close_notify, no end of stream.
            tollgate_tests::mock_llm::Fault::Cut => return,
            tollgate_tests::mock_llm::Fault::Stall => {
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                return;
            }
            tollgate_tests::mock_llm::Fault::None => {}
        }
        let _ = s.shutdown().await;
        return;
    }
    let host = header("host");
    let authorization = header("authorization").is_some();
    let body = serde_json::json!({
        "peer": peer.to_string(),
        "peer_ip": peer.ip().to_string(),
        "local": local.to_string(),
        "request": line,
        "host": host,
        "sni": sni,
        "saw_authorization": authorization,
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}
