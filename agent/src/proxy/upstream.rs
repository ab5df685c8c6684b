//! Pooled TLS connections to providers.
//!
//! A client (with its own connection pool, h2 when the provider offers it)
//! exists per (workload namespace, host, address): each dials exactly the
//! provider address the workload connected to — an address the kernel found
//! in the provider map — from inside the workload's own network namespace,
//! with the host as SNI, verified against the system roots plus configured
//! extra roots. There is no name resolution here and no other destination:
//! the proxy cannot be steered anywhere a provider is not, and no pod's
//! call rides another pod's connection. Clients of a namespace that went,
//! or unused for a while, are dropped (`forget`, `prune`).
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::Uri;
use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
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

use super::dial::Dialer;
use crate::netns::{NetnsId, WorkloadNetns};

/// Body errors: hyper's own, or the proxy's (an idle provider stream).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = BoxBody<Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error(
        "cannot read extra root certificates {path}: {message}\nhint: tls.extra_roots lists PEM files"
    )]
    Roots {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(
        "no root certificates to verify providers with\nhint: enable tls.system_roots or list tls.extra_roots"
    )]
    NoRoots,
}

/// rustls client config: system roots (optional) + extra roots, ALPN h2 and http/1.1.
pub fn client_config(
    system_roots: bool,
    extra: &[std::path::PathBuf],
) -> Result<Arc<rustls::ClientConfig>, UpstreamTlsError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if system_roots {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "some system root certificates could not be read");
        }
        let (added, _) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, "system root certificates loaded");
    }
    for path in extra {
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| UpstreamTlsError::Roots {
                path: path.clone(),
                message: format!("{e:?}"),
            })?;
        if certs.is_empty() {
            return Err(UpstreamTlsError::Roots {
                path: path.clone(),
                message: "no certificate in file".into(),
            });
        }
        for c in certs {
            roots.add(c).map_err(|e| UpstreamTlsError::Roots {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(UpstreamTlsError::NoRoots);
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A provider target whose host is no name TLS can verify.
#[derive(Debug, thiserror::Error)]
#[error(
    "provider host `{host}` is not a DNS name the provider's certificate can be verified against\nhint: give the provider `hosts` (a failover target needs one)"
)]
pub struct InvalidHost {
    pub host: String,
}

type PoolKey = (NetnsId, String, SocketAddr);

struct Pooled {
    client: Client<FixedConnector, ProxyBody>,
    last_used: Instant,
}

pub struct UpstreamPool {
    tls: TlsConnector,
    /// ALPN http/1.1 only: for connections that upgrade (Realtime WebSockets).
    tls_http1: TlsConnector,
    dialer: Arc<Dialer>,
    clients: Mutex<HashMap<PoolKey, Pooled>>,
}

impl UpstreamPool {
    pub fn new(tls: Arc<rustls::ClientConfig>, dialer: Arc<Dialer>) -> Self {
        let mut http1 = (*tls).clone();
        http1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            tls: TlsConnector::from(tls),
            tls_http1: TlsConnector::from(Arc::new(http1)),
            dialer,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The pooled client for `host` at `addr`, dialling from `netns`. Fails,
    /// without touching the pool, when `host` is not a name TLS can verify
    /// (a provider listed by `addresses` only, with no `hosts`): that call is
    /// refused, the next ones are not affected.
    pub fn client(
        &self,
        netns: &Arc<WorkloadNetns>,
        host: &str,
        addr: SocketAddr,
    ) -> Result<Client<FixedConnector, ProxyBody>, InvalidHost> {
        let key = (netns.id, host.to_string(), addr);
        // Built before the lock: nothing fallible runs while it is held.
        let name = ServerName::try_from(host.to_string()).map_err(|_| InvalidHost {
            host: host.to_string(),
        })?;
        let mut clients = self.lock();
        let pooled = clients.entry(key).or_insert_with(|| {
            let connector = FixedConnector {
                addr,
                host: name,
                tls: self.tls.clone(),
                dialer: self.dialer.clone(),
                netns: netns.clone(),
            };
            Pooled {
                client: Client::builder(TokioExecutor::new())
                    // Providers close idle connections after ~60-90 s; dropping
                    // ours first avoids sending a request into a closing socket.
                    .pool_idle_timeout(Duration::from_secs(50))
                    .build(connector),
                last_used: Instant::now(),
            }
        });
        pooled.last_used = Instant::now();
        Ok(pooled.client.clone())
    }

    /// A connection of its own (never pooled) to `host` at `addr` from
    /// `netns`, speaking HTTP/1.1: for a request that upgrades it.
    pub async fn connect_http1(
        &self,
        netns: &Arc<WorkloadNetns>,
        host: &str,
        addr: SocketAddr,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(host.to_string()).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                InvalidHost {
                    host: host.to_string(),
                },
            )
        })?;
        dial_tls(&self.dialer, netns, addr, name, &self.tls_http1).await
    }

    /// Drop the clients of a namespace that is gone (and its handle with them).
    pub fn forget(&self, netns: NetnsId) -> usize {
        let mut clients = self.lock();
        let before = clients.len();
        clients.retain(|(ns, _, _), _| *ns != netns);
        before - clients.len()
    }

    /// Drop clients unused for `idle`: their connections closed long ago
    /// (`pool_idle_timeout`), only the entry was left. Calls in flight keep
    /// their own clone.
    pub fn prune(&self, idle: Duration) -> usize {
        let mut clients = self.lock();
        let before = clients.len();
        clients.retain(|_, p| p.last_used.elapsed() < idle);
        before - clients.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Pooled>> {
        self.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Connects to one fixed address with one fixed SNI, whatever the URI says.
#[derive(Clone)]
pub struct FixedConnector {
    addr: SocketAddr,
    host: ServerName<'static>,
    tls: TlsConnector,
    dialer: Arc<Dialer>,
    netns: Arc<WorkloadNetns>,
}

impl tower_service::Service<Uri> for FixedConnector {
    type Response = UpstreamConn;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tls = dial_tls(&this.dialer, &this.netns, this.addr, this.host, &this.tls).await?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(UpstreamConn {
                io: TokioIo::new(tls),
                h2,
            })
        })
    }
}

/// Dial `addr` from `netns` and complete TLS for `host`, both within the
/// dialer's timeout each.
async fn dial_tls(
    dialer: &Dialer,
    netns: &Arc<WorkloadNetns>,
    addr: SocketAddr,
    host: ServerName<'static>,
    tls: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = dialer
        .dial(netns, addr)
        .await
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionRefused, e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    tokio::time::timeout(dialer.timeout(), tls.connect(host, tcp))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "provider TLS handshake timed out",
            )
        })?
}

/// A provider connection, telling hyper whether ALPN chose h2.
pub struct UpstreamConn {
    io: TokioIo<TlsStream<TcpStream>>,
    h2: bool,
}

impl Connection for UpstreamConn {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for UpstreamConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::Egress;

    fn pool() -> UpstreamPool {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let dialer = Dialer::new(Egress::start().unwrap(), 0, Duration::from_secs(1));
        UpstreamPool::new(Arc::new(cfg), Arc::new(dialer))
    }

    fn own_netns() -> Arc<WorkloadNetns> {
        Arc::new(WorkloadNetns::open(std::process::id()).unwrap())
    }

    #[tokio::test]
    async fn a_target_without_a_host_name_is_refused_and_the_pool_keeps_working() {
        let p = pool();
        let ns = own_netns();
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        let err = p
            .client(&ns, "", addr)
            .expect_err("an empty host is refused");
        assert!(err.to_string().contains("hosts"), "{err}");
        assert!(p.client(&ns, "not a name!", addr).is_err());
        assert!(
            p.client(&ns, "api.openai.com", addr).is_ok(),
            "the next call is served"
        );
        assert_eq!(p.len(), 1, "nothing pooled for bad names");
    }

    #[tokio::test]
    async fn clients_are_per_namespace_and_go_with_it_or_when_idle() {
        let p = pool();
        let ns = own_netns();
        let other = Arc::new(WorkloadNetns {
            id: NetnsId { dev: 0, ino: 1 },
            file: std::fs::File::open("/proc/self/ns/net").unwrap(),
        });
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        p.client(&ns, "api.openai.com", addr).unwrap();
        p.client(&ns, "api.openai.com", addr).unwrap();
        p.client(&other, "api.openai.com", addr).unwrap();
        assert_eq!(p.len(), 2, "one client per namespace, reused within it");
        assert_eq!(p.forget(other.id), 1);
        assert_eq!(p.len(), 1);
        assert_eq!(p.prune(Duration::from_secs(3600)), 0, "recently used stays");
        assert_eq!(p.prune(Duration::ZERO), 1, "idle goes");
        assert!(p.is_empty());
    }
}
