//! HTTPS load client for `tollgate-bench`, run inside a test pod: the same
//! client measures the direct path (from a cgroup the agent does not govern)
//! and the proxied one (from the pod's governed cgroup, redirected), so the
//! difference is what Tollgate adds.
//!
//! Usage: tollgate-bench-http ADDR:PORT HOST CA_PEM MODE ARGS…
//!   rate RPS SECONDS keepalive|fresh   POST a chat completion (JSON answer) at
//!       a fixed rate, open loop (each request sent on schedule whatever
//!       the earlier ones are doing, so a stall is not hidden; latency from
//!       its send, since the timer wakes it up to 1 ms late), over pooled HTTP/1.1 keep-alive
//!       connections or one new TCP+TLS connection per request.
//!   stream COUNT                       COUNT sequential `mock-timed` streams:
//!       each event carries the mock's send time, so its arrival shows the
//!       relay delay of every chunk.
//!   hold CONNS                         open CONNS keep-alive connections (one
//!       request each), print `held N`, keep them until stdin closes.
//! Prints one JSON object (latencies in ns). HTTP/1.1 towards the target,
//! like the Python and Node SDKs.
use std::{
    future::Future,
    io::BufRead,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo},
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tollgate_tests::mock_llm::monotonic_ns;

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#;
const TIMED: &str = r#"{"model":"mock-timed","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello"}]}"#;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: tollgate-bench-http ADDR:PORT HOST CA_PEM (rate RPS SECONDS keepalive|fresh | stream COUNT | hold CONNS)";
    assert!(args.len() >= 5, "{usage}");
    raise_nofile();
    let target = Target {
        addr: args[0].parse().expect("ADDR:PORT"),
        host: args[1].clone(),
        tls: tls_connector(&args[2]),
    };
    let n = |i: usize| -> u64 { args.get(i).and_then(|a| a.parse().ok()).expect(usage) };
    let out = match args[3].as_str() {
        "rate" => {
            rate(
                &target,
                n(4),
                n(5),
                args.get(6).map(String::as_str) == Some("fresh"),
            )
            .await
        }
        "stream" => stream(&target, n(4)).await,
        "hold" => hold(&target, n(4)).await,
        _ => panic!("{usage}"),
    };
    println!("{out}");
}

struct Target {
    addr: SocketAddr,
    host: String,
    tls: TlsConnector,
}

impl Target {
    fn client(&self, keepalive: bool) -> Client<Connector, Full<Bytes>> {
        let mut b = Client::builder(TokioExecutor::new());
        if !keepalive {
            b.pool_max_idle_per_host(0);
        }
        b.build(Connector {
            addr: self.addr,
            host: ServerName::try_from(self.host.clone()).expect("host name"),
            tls: self.tls.clone(),
        })
    }

    fn post(&self, body: &'static str) -> Request<Full<Bytes>> {
        Request::post(format!("https://{}/v1/chat/completions", self.host))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-bench")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }
}

/// Open-loop fixed-rate load; latency from each request's scheduled start.
async fn rate(t: &Target, rps: u64, seconds: u64, fresh: bool) -> serde_json::Value {
    let client = t.client(!fresh);
    let total = rps * seconds;
    let interval = Duration::from_nanos(1_000_000_000 / rps.max(1));
    // Bound in-flight work: beyond it the target is overloaded, and waiting
    // would turn this into a closed loop that hides it.
    let slots = Arc::new(tokio::sync::Semaphore::new(1024));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<u64>>();
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut overload = 0u64;
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            overload += 1;
            continue;
        };
        let (client, req, tx) = (client.clone(), t.post(CHAT), tx.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            let ok = match client.request(req).await {
                Ok(r) if r.status().is_success() => r.into_body().collect().await.is_ok(),
                _ => false,
            };
            let _ = tx.send(ok.then(|| sent.elapsed().as_nanos() as u64));
            drop(permit);
        });
    }
    drop(tx);
    let mut lat = Vec::new();
    let mut errors = overload;
    // Bounded: every task ends (the client has timeouts below the OS's).
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
        match r {
            Some(ns) => lat.push(ns),
            None => errors += 1,
        }
    }
    summary(lat, errors)
}

/// Sequential timed streams: per-event relay delay and time to first byte.
async fn stream(t: &Target, count: u64) -> serde_json::Value {
    let client = t.client(true);
    let (mut chunk_lat, mut ttfb, mut errors) = (Vec::new(), Vec::new(), 0u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    for _ in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let started = Instant::now();
        let Ok(resp) = client.request(t.post(TIMED)).await else {
            errors += 1;
            continue;
        };
        ttfb.push(started.elapsed().as_nanos() as u64);
        let mut body = resp.into_body();
        let mut carry = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let now = monotonic_ns();
            let Some(d) = frame.data_ref() else { continue };
            carry.push_str(&String::from_utf8_lossy(d));
            // Complete events only; a frame may hold several or half of one.
            while let Some(end) = carry.find("\n\n") {
                let event: String = carry.drain(..end + 2).collect();
                if let Some(sent) = event
                    .split("\"sent_ns\":")
                    .nth(1)
                    .and_then(|r| r.trim_end_matches(['}', '\n']).parse::<u64>().ok())
                {
                    chunk_lat.push(now.saturating_sub(sent));
                }
            }
        }
    }
    let mut out = summary(chunk_lat, errors);
    out["ttfb"] = summary(ttfb, 0);
    out
}

/// Hold `conns` idle keep-alive connections until stdin closes.
async fn hold(t: &Target, conns: u64) -> serde_json::Value {
    let mut held = Vec::new();
    let mut errors = 0u64;
    for _ in 0..conns {
        // One client per connection: its pool keeps exactly that connection.
        let client = t.client(true);
        let ok = match client.request(t.post(CHAT)).await {
            Ok(r) => r.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        if ok {
            held.push(client);
        } else {
            errors += 1;
        }
    }
    println!("held {}", held.len());
    // The parent measures memory now, then closes our stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        while std::io::stdin()
            .lock()
            .read_line(&mut line)
            .is_ok_and(|n| n > 0)
        {}
    })
    .await;
    serde_json::json!({"held": held.len(), "errors": errors})
}

fn summary(mut v: Vec<u64>, errors: u64) -> serde_json::Value {
    v.sort_unstable();
    let pct = |p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    serde_json::json!({
        "count": v.len(), "errors": errors,
        "p50_ns": pct(0.50), "p90_ns": pct(0.90), "p99_ns": pct(0.99),
        "mean_ns": if v.is_empty() { 0 } else { v.iter().sum::<u64>() / v.len() as u64 },
    })
}

fn tls_connector(ca: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

/// 1,000 held connections need more descriptors than the usual soft limit.
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Dials one address with one server name, whatever the URI says.
#[derive(Clone)]
struct Connector {
    addr: SocketAddr,
    host: ServerName<'static>,
    tls: TlsConnector,
}

impl tower_service::Service<hyper::Uri> for Connector {
    type Response = Conn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Conn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: hyper::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(this.addr))
                .await
                .map_err(|_| std::io::Error::other("connect timed out"))??;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.host, tcp).await?;
            Ok(Conn(TokioIo::new(tls)))
        })
    }
}

struct Conn(TokioIo<TlsStream<TcpStream>>);

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
