//! The pool against a real TLS HTTP/1.1 server on loopback, which counts
//! the connections it accepted and the requests each one carried.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Bytes};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use super::*;
use crate::egress::Egress;

const HOST: &str = "api.test";

/// What the provider saw: per request, the connection it came on.
struct Provider {
    addr: SocketAddr,
    roots: rustls::RootCertStore,
    served: Arc<Mutex<Vec<(usize, String)>>>,
}

impl Provider {
    fn connections(&self) -> usize {
        let served = self.served.lock().unwrap();
        let mut ids: Vec<usize> = served.iter().map(|(c, _)| *c).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }
    fn requests(&self) -> Vec<String> {
        self.served
            .lock()
            .unwrap()
            .iter()
            .map(|(_, p)| p.clone())
            .collect()
    }
}

/// `/ok` answers 5 bytes; `/big` 1 MiB; `/close` answers and closes.
async fn provider() -> Provider {
    let ck = rcgen::generate_simple_self_signed(vec![HOST.to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(Mutex::new(Vec::new()));
    let record = served.clone();
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, record) = (acceptor.clone(), record.clone());
            let id = next.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let path = req.uri().path().to_string();
                    record.lock().unwrap().push((id, path.clone()));
                    async move {
                        let body = match path.as_str() {
                            "/big" => Bytes::from(vec![b'x'; 1 << 20]),
                            _ => Bytes::from_static(b"hello"),
                        };
                        let mut resp = Response::new(Full::new(body));
                        if path == "/close" {
                            resp.headers_mut()
                                .insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Provider {
        addr,
        roots,
        served,
    }
}

fn pool(roots: rustls::RootCertStore) -> UpstreamPool {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let dialer = Dialer::new(Egress::start().unwrap(), 0, Duration::from_secs(2));
    UpstreamPool::new(Arc::new(cfg), Arc::new(dialer))
}

fn own_netns() -> Arc<WorkloadNetns> {
    Arc::new(WorkloadNetns::open(std::process::id()).unwrap())
}

fn get(path: &str) -> Request<ProxyBody> {
    let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
    *req.uri_mut() = path.parse().unwrap();
    req.headers_mut()
        .insert(http::header::HOST, HOST.parse().unwrap());
    req
}

async fn call(p: &UpstreamPool, ns: &Arc<WorkloadNetns>, addr: SocketAddr, path: &str) -> Bytes {
    let resp = p.request(ns, HOST, addr, get(path)).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn calls_one_after_another_ride_one_connection() {
    let up = provider().await;
    let p = pool(up.roots.clone());
    let ns = own_netns();
    for _ in 0..5 {
        assert_eq!(call(&p, &ns, up.addr, "/ok").await, "hello");
    }
    assert_eq!(call(&p, &ns, up.addr, "/big").await.len(), 1 << 20);
    assert_eq!(up.requests().len(), 6);
    assert_eq!(up.connections(), 1, "{:?}", up.served.lock().unwrap());
    assert_eq!(p.len(), 1, "the connection waits idle for the next call");
}

#[tokio::test]
async fn calls_at_once_get_a_connection_each_and_all_go_back_idle() {
    let up = provider().await;
    let p = pool(up.roots.clone());
    let ns = own_netns();
    let (a, b, c) = tokio::join!(
        p.request(&ns, HOST, up.addr, get("/big")),
        p.request(&ns, HOST, up.addr, get("/big")),
        p.request(&ns, HOST, up.addr, get("/ok")),
    );
    // All three heads are in before any body is read: three connections.
    let bodies = [a.unwrap(), b.unwrap(), c.unwrap()].map(|r| r.into_body().collect());
    for body in bodies {
        body.await.unwrap();
    }
    assert_eq!(up.connections(), 3);
    assert_eq!(p.len(), 3);
    call(&p, &ns, up.addr, "/ok").await;
    assert_eq!(up.connections(), 3, "the next call takes an idle one");
}

#[tokio::test]
async fn a_body_left_unread_takes_its_connection_with_it() {
    let up = provider().await;
    let p = pool(up.roots.clone());
    let ns = own_netns();
    let resp = p.request(&ns, HOST, up.addr, get("/big")).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some_and(|d| d.len() < 1 << 20));
    assert!(!body.is_end_stream());
    drop(body);
    assert!(p.is_empty(), "a connection mid-response is never reused");
    assert_eq!(call(&p, &ns, up.addr, "/ok").await, "hello");
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn a_connection_the_provider_closed_is_not_used_again() {
    let up = provider().await;
    let p = pool(up.roots.clone());
    let ns = own_netns();
    assert_eq!(call(&p, &ns, up.addr, "/close").await, "hello");
    // Give the provider's close time to arrive, then call again: the call
    // succeeds on a new connection, nothing is sent into the closed one.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(call(&p, &ns, up.addr, "/ok").await, "hello");
    assert_eq!(up.connections(), 2);
    assert_eq!(up.requests(), ["/close", "/ok"]);
    assert_eq!(p.prune(pooled::IDLE_TIMEOUT), 0, "the live one stays");
    assert_eq!(p.len(), 1);
    assert_eq!(p.prune(Duration::ZERO), 1, "one idle too long goes");
    assert!(p.is_empty());
}

#[tokio::test]
async fn a_burst_leaves_at_most_32_idle_connections_behind() {
    let up = provider().await;
    let p = pool(up.roots.clone());
    let ns = own_netns();
    let calls: Vec<_> = (0..40)
        .map(|_| p.request(&ns, HOST, up.addr, get("/ok")))
        .collect();
    let resps = futures::future::join_all(calls).await;
    for r in resps {
        r.unwrap().into_body().collect().await.unwrap();
    }
    assert_eq!(up.connections(), 40, "each call at once had its own");
    assert_eq!(p.len(), 32, "the rest were closed");
}

#[tokio::test]
async fn a_target_without_a_host_name_is_refused_and_the_pool_keeps_working() {
    let up = provider().await;
    let p = pool(up.roots.clone());
    let ns = own_netns();
    for bad in ["", "not a name!"] {
        let err = p
            .request(&ns, bad, up.addr, get("/ok"))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("hosts"), "{err}");
    }
    assert!(up.requests().is_empty(), "nothing was sent");
    assert_eq!(
        call(&p, &ns, up.addr, "/ok").await,
        "hello",
        "the next call is served"
    );
}

#[tokio::test]
async fn a_provider_that_is_not_there_is_an_error_not_a_wait() {
    let up = provider().await;
    let p = pool(up.roots.clone());
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let err = p
        .request(&own_netns(), HOST, addr, get("/ok"))
        .await
        .expect_err("nothing listens");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

/// Connections are per namespace and go with it. A second namespace needs
/// root (the egress thread enters it, even as a copy of this one).
#[tokio::test]
async fn connections_are_per_namespace_and_go_with_it() {
    if !nix::unistd::geteuid().is_root() {
        assert_ne!(
            std::env::var("TOLLGATE_REQUIRE_PRIVILEGED").as_deref(),
            Ok("1"),
            "root is required (TOLLGATE_REQUIRE_PRIVILEGED=1)"
        );
        eprintln!("skipped: entering a network namespace needs root");
        return;
    }
    let up = provider().await;
    let p = pool(up.roots.clone());
    let ns = own_netns();
    let other = Arc::new(WorkloadNetns {
        id: NetnsId { dev: 0, ino: 1 },
        file: std::fs::File::open("/proc/self/ns/net").unwrap(),
    });
    call(&p, &ns, up.addr, "/ok").await;
    call(&p, &other, up.addr, "/ok").await;
    call(&p, &other, up.addr, "/ok").await;
    assert_eq!(up.connections(), 2, "one per namespace, reused within it");
    assert_eq!(p.len(), 2);
    assert_eq!(p.forget(other.id), 1);
    assert_eq!(p.len(), 1);
    call(&p, &ns, up.addr, "/ok").await;
    assert_eq!(up.connections(), 2, "the one left is still used");
}

/// A call takes an idle connection made on its own proxy thread first (its
/// wake-ups then stay on that thread) and another thread's only when its
/// own thread has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn calls_prefer_connections_made_on_their_own_thread() {
    let up = provider().await;
    let p = Arc::new(pool(up.roots.clone()));
    let ns = own_netns();
    let workers = crate::workers::Workers::start(2).unwrap();
    let on = |thread: usize, calls: usize| {
        let (p, ns, addr) = (p.clone(), ns.clone(), up.addr);
        workers.spawn(thread, async move {
            let all = (0..calls).map(|_| call(&p, &ns, addr, "/ok"));
            futures::future::join_all(all).await;
        })
    };
    let last_connection = || up.served.lock().unwrap().last().unwrap().0;
    on(0, 1).await.unwrap();
    let made_on_0 = last_connection();
    // Thread 1 has none of its own: it borrows thread 0's.
    on(1, 1).await.unwrap();
    assert_eq!(up.connections(), 1, "{:?}", up.served.lock().unwrap());
    // Two at once on thread 1: one borrows thread 0's, one is new (thread 1's).
    on(1, 2).await.unwrap();
    assert_eq!(up.connections(), 2, "{:?}", up.served.lock().unwrap());
    assert_eq!(p.len(), 2);
    for _ in 0..3 {
        on(0, 1).await.unwrap();
        assert_eq!(last_connection(), made_on_0, "thread 0 takes its own");
        on(1, 1).await.unwrap();
        assert_ne!(last_connection(), made_on_0, "thread 1 takes its own");
    }
    assert_eq!(up.connections(), 2);
}
