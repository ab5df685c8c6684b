//! Mock provider endpoint for the test node: answers every HTTP request with
//! JSON naming the TCP peer it saw and the address it was reached on.
//!
//! That answer is what the redirect tests check: a relayed connection arrives
//! from the node's address, a direct one from the pod's. HTTP handling is a
//! few lines by hand on purpose: the test needs only "read a request head,
//! write one response, close", and nothing between the socket and the peer
//! address it reports.
//!
//! Usage: tollgate-mock-upstream ADDR:PORT...
use std::net::SocketAddr;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addrs: Vec<SocketAddr> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap_or_else(|e| panic!("bad address {a}: {e}")))
        .collect();
    assert!(
        !addrs.is_empty(),
        "usage: tollgate-mock-upstream ADDR:PORT..."
    );
    let mut tasks = Vec::new();
    for addr in addrs {
        let l = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut s, peer)) = l.accept().await else { continue };
                tokio::spawn(async move {
                    // Request heads here are small; 64 KiB bounds a misbehaving client.
                    let mut buf = vec![0u8; 65536];
                    let mut n = 0;
                    while n < buf.len() {
                        match s.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                        // A TLS ClientHello (this mock speaks no TLS yet): answer
                        // with a handshake_failure alert so the client fails fast.
                        if buf[0] == 0x16 {
                            let _ = s.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]).await;
                            return;
                        }
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    let line = String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string();
                    let body = serde_json::json!({
                        "peer": peer.to_string(),
                        "peer_ip": peer.ip().to_string(),
                        "local": addr.to_string(),
                        "request": line,
                    })
                    .to_string();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
