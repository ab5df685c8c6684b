//! HTTPS load client for `tollgate-bench`, run inside a test pod: the same
//! client measures the direct path (from a cgroup the agent does not govern)
//! and the proxied one (from the pod's governed cgroup, redirected), so the
//! difference is what Tollgate adds.
//!
//! Usage: tollgate-bench-http ADDR:PORT HOST CA_PEM MODE ARGS…
//!   rate RPS SECONDS keepalive|fresh   POST a chat completion (JSON answer) at
//!       a fixed rate, open loop (each request sent on schedule whatever
//!       the earlier ones are doing, so a stall is not hidden), over pooled
//!       HTTP/1.1 keep-alive connections or one new TCP+TLS connection per
//!       request. Latency is measured from each request's scheduled send
//!       time, as wrk2 does (no coordinated omission: a client that falls
//!       behind adds its lag to every late call), and `behind_*` says how
//!       late the sends were against the schedule.
//!   stream COUNT CONCURRENT MODEL      COUNT `mock-timed-…` streams (MODEL
//!       names pieces and pace), CONCURRENT at a time: each event carries the
//!       mock's send time in its content, so its arrival shows the relay
//!       delay of every chunk, whatever a gateway re-serialises.
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
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tollgate_tests::mock_llm::{BENCH_CHAT, monotonic_ns};

const CHAT: &str = BENCH_CHAT;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: tollgate-bench-http ADDR:PORT HOST CA_PEM (rate RPS SECONDS keepalive|fresh | stream COUNT CONCURRENT MODEL | hold CONNS)";
    assert!(args.len() >= 5, "{usage}");
    raise_nofile();
    let target = Target {
        addr: args[0].parse().expect("ADDR:PORT"),
        host: args[1].clone(),
        tls: tollgate_tests::tls_client::connector(&args[2], &[b"http/1.1"]),
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
        "stream" => {
            let model = args.get(6).expect(usage);
            let body = format!(
                r#"{{"model":"{model}","stream":true,"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"Count slowly."}}]}}"#
            );
            stream(&target, n(4), n(5), body).await
        }
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
        chat_request(&self.host, Bytes::from_static(body.as_bytes()))
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
    // Each call reports (its latency or why it failed, how late it started).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Result<u64, String>, u64)>();
    let start = Instant::now() + Duration::from_millis(50);
    let (rt, host) = (tokio::runtime::Handle::current(), t.host.clone());
    // The schedule is kept by a thread of its own that sleeps to each send
    // time: tokio's timer wheel wakes up to a millisecond late, which would
    // be the client's lateness in every system's figures alike.
    let dispatcher = std::thread::spawn(move || {
        // SAFETY: prctl(PR_SET_TIMERSLACK) on this thread only: wake on time.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64) };
        let mut overload = 0u64;
        for i in 0..total {
            let scheduled = start + interval * i as u32;
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                overload += 1;
                continue;
            };
            let req = chat_request(&host, Bytes::from_static(CHAT.as_bytes()));
            let (client, tx) = (client.clone(), tx.clone());
            rt.spawn(async move {
                let late = scheduled.elapsed().as_nanos() as u64;
                // An overloaded target fails the call rather than the run.
                let call = async {
                    let r = client.request(req).await.map_err(|e| format!("{e:?}"))?;
                    let status = r.status();
                    let body = r.into_body().collect().await.map_err(|e| e.to_string())?;
                    if !status.is_success() {
                        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
                        return Err(format!(
                            "{status}: {}",
                            text.chars().take(300).collect::<String>()
                        ));
                    }
                    Ok(())
                };
                let r = match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
                    Ok(Ok(())) => Ok(scheduled.elapsed().as_nanos() as u64),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!("no answer in {REQUEST_TIMEOUT:?}")),
                };
                let _ = tx.send((r, late));
                drop(permit);
            });
        }
        overload
    });
    let overload = tokio::task::spawn_blocking(move || dispatcher.join().expect("dispatcher"))
        .await
        .expect("dispatcher");
    let (mut lat, mut behind, mut first_error) = (Vec::new(), Vec::new(), None);
    let mut errors = overload;
    if overload > 0 {
        first_error = Some(format!("{overload} sends skipped: 1024 calls in flight"));
    }
    // Bounded: every task ends (the client has timeouts below the OS's).
    while let Ok(Some((r, late))) = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
        behind.push(late);
        match r {
            Ok(ns) => lat.push(ns),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    // Answers per second from the first scheduled send to the last answer
    // (an overloaded target keeps answering after the schedule ends).
    let elapsed = start.elapsed().max(Duration::from_secs(seconds));
    let mut out = summary(lat, errors);
    out["rps"] = (out["count"].as_f64().unwrap_or(0.0) / elapsed.as_secs_f64()).into();
    let lag = summary(behind, 0);
    out["behind_p50_ns"] = lag["p50_ns"].clone();
    out["behind_p99_ns"] = lag["p99_ns"].clone();
    out["behind_max_ns"] = lag["max_ns"].clone();
    if let Some(e) = first_error {
        out["first_error"] = e.into();
    }
    out
}

/// Beyond this a call counts as an error (an overloaded peer queues for long).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Timed streams, `concurrent` at a time: per-event relay delay (send by
/// the mock → arrival here) and time to first token.
async fn stream(t: &Target, count: u64, concurrent: u64, body: String) -> serde_json::Value {
    let client = t.client(true);
    let deadline = Instant::now() + Duration::from_secs(120);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrent.max(1) {
        let (client, next, body) = (client.clone(), next.clone(), Bytes::from(body.clone()));
        let host = t.host.clone();
        tasks.spawn(async move {
            let (mut chunks, mut ttft, mut errors) = (Vec::new(), Vec::new(), 0u64);
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count
                && Instant::now() < deadline
            {
                let req = chat_request(&host, body.clone());
                match tokio::time::timeout(Duration::from_secs(60), one_stream(&client, req)).await
                {
                    Ok(Some((c, first))) => {
                        ttft.push(first);
                        chunks.extend(c);
                    }
                    _ => errors += 1,
                }
            }
            (chunks, ttft, errors)
        });
    }
    let (mut chunk_lat, mut ttft, mut errors) = (Vec::new(), Vec::new(), 0u64);
    while let Some(r) = tasks.join_next().await {
        let (c, f, e) = r.expect("stream task");
        chunk_lat.extend(c);
        ttft.extend(f);
        errors += e;
    }
    let mut out = summary(chunk_lat, errors);
    out["ttft"] = summary(ttft, 0);
    out
}

type Http = Client<Connector, Full<Bytes>>;

/// A POST of `body` to the chat completions path of `host`.
fn chat_request(host: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::post(format!("https://{host}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-bench")
        .body(Full::new(body))
        .unwrap()
}

/// One stream: each stamped event's relay delay, and the time to the first.
async fn one_stream(client: &Http, req: Request<Full<Bytes>>) -> Option<(Vec<u64>, u64)> {
    let started = Instant::now();
    let resp = client.request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut body = resp.into_body();
    let (mut carry, mut lat, mut first) = (String::new(), Vec::new(), None);
    while let Some(frame) = body.frame().await {
        let now = monotonic_ns();
        let Some(d) = frame.ok()?.into_data().ok() else {
            continue;
        };
        carry.push_str(&String::from_utf8_lossy(&d));
        // Complete events only; a frame may hold several or half of one.
        while let Some(end) = carry.find("\n\n") {
            let event: String = carry.drain(..end + 2).collect();
            if let Some(sent) = stamp(&event) {
                first.get_or_insert(started.elapsed().as_nanos() as u64);
                lat.push(now.saturating_sub(sent));
            }
        }
    }
    Some((lat, first?))
}

/// The mock's send time in an event's content: `"content":"t<ns> "`.
fn stamp(event: &str) -> Option<u64> {
    let rest = event.split("\"content\":\"t").nth(1)?;
    let digits = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..digits].parse().ok()
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
        "max_ns": v.last().copied().unwrap_or(0),
        "mean_ns": if v.is_empty() { 0 } else { v.iter().sum::<u64>() / v.len() as u64 },
    })
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_send_stamp_is_read_from_the_content() {
        let raw = r#"data: {"choices":[{"delta":{"content":"t18330059075518 "}}],"sent_ns":1}"#;
        assert_eq!(super::stamp(raw), Some(18330059075518));
        // As LiteLLM re-serialises it: other fields first, no sent_ns.
        let gw = r#"data: {"id":"x","choices":[{"index":0,"delta":{"role":"assistant","content":"t42 "}}]}"#;
        assert_eq!(super::stamp(gw), Some(42));
        assert_eq!(
            super::stamp(r#"data: {"choices":[{"delta":{"content":"hello"}}]}"#),
            None
        );
        assert_eq!(super::stamp("data: [DONE]"), None);
    }
}
