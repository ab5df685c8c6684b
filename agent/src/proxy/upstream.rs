//! Connections to providers.
//!
//! Every call's provider connection is one of its workload namespace's, to
//! the one provider address the workload connected to — an address the
//! kernel found in the provider map — dialled from inside that namespace,
//! with the host as SNI, verified against the system roots plus configured
//! extra roots. There is no name resolution here and no other destination:
//! the proxy cannot be steered anywhere a provider is not, and no pod's
//! call rides another pod's connection. Connections speak HTTP/1.1 and are
//! kept between calls per (namespace, host, address) (`pooled`); those of a
//! namespace that went, or idle too long, are closed (`forget`, `prune`).
use std::{net::SocketAddr, sync::Arc};

use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    dial::Dialer,
    pooled::{self, Conn, ExchangeError, IdleConns, UpstreamBody},
};
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

/// rustls client config: system roots (optional) + extra roots, ALPN http/1.1.
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
    // HTTP/1.1 only: a connection driven by the call that uses it has no
    // stream machinery to run (see `pooled`).
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
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

/// `host` as the name TLS verifies the provider's certificate against.
fn server_name(host: &str) -> Result<ServerName<'static>, InvalidHost> {
    ServerName::try_from(host.to_string()).map_err(|_| InvalidHost {
        host: host.to_string(),
    })
}

/// Why a call got no response head from its provider.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    InvalidHost(#[from] InvalidHost),
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Exchange(BoxError),
}

pub struct UpstreamPool {
    tls: TlsConnector,
    dialer: Arc<Dialer>,
    idle: Arc<IdleConns>,
}

impl UpstreamPool {
    pub fn new(tls: Arc<rustls::ClientConfig>, dialer: Arc<Dialer>) -> Self {
        Self {
            tls: TlsConnector::from(tls),
            dialer,
            idle: Arc::default(),
        }
    }

    /// Send `req` (origin-form target, Host set) to `host` at `addr` from
    /// `netns`: on an idle connection to that place when one is left, else
    /// on a new one. A request an idle connection could not take (the
    /// provider had closed it) goes on the next; one that was written is
    /// never sent twice. Fails before dialling when `host` is not a name
    /// TLS can verify (a provider listed by `addresses` only, with no
    /// `hosts`): that call is refused, the next ones are not affected.
    pub async fn request(
        &self,
        netns: &Arc<WorkloadNetns>,
        host: &str,
        addr: SocketAddr,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let name = server_name(host)?;
        let key = (netns.id, host.to_string(), addr);
        while let Some(conn) = self.idle.take(&key) {
            match pooled::exchange(conn, req).await {
                Ok((resp, conn)) => return Ok(self.relayed(resp, conn, key)),
                Err(ExchangeError::NotSent(r)) => req = r,
                Err(ExchangeError::Failed(e)) => return Err(UpstreamError::Exchange(e)),
            }
        }
        let tls = dial_tls(&self.dialer, netns, addr, name, &self.tls)
            .await
            .map_err(UpstreamError::Connect)?;
        let conn = Conn::handshake(tls)
            .await
            .map_err(|e| UpstreamError::Exchange(e.into()))?;
        match pooled::exchange(conn, req).await {
            Ok((resp, conn)) => Ok(self.relayed(resp, conn, key)),
            Err(ExchangeError::NotSent(_)) => Err(UpstreamError::Exchange(
                "a new provider connection refused its first request".into(),
            )),
            Err(ExchangeError::Failed(e)) => Err(UpstreamError::Exchange(e)),
        }
    }

    fn relayed(
        &self,
        resp: Response<hyper::body::Incoming>,
        conn: Conn,
        key: pooled::PoolKey,
    ) -> Response<UpstreamBody> {
        resp.map(|body| UpstreamBody::new(body, conn, self.idle.clone(), key))
    }

    /// A connection of its own (never pooled) to `host` at `addr` from
    /// `netns`, speaking HTTP/1.1: for a request that upgrades it.
    pub async fn connect_http1(
        &self,
        netns: &Arc<WorkloadNetns>,
        host: &str,
        addr: SocketAddr,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = server_name(host)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        dial_tls(&self.dialer, netns, addr, name, &self.tls).await
    }

    /// Close the idle connections of a namespace that is gone (and with
    /// them the last handles that kept it alive).
    pub fn forget(&self, netns: NetnsId) -> usize {
        self.idle.forget(netns)
    }

    /// Close idle connections the provider closed or that idled for
    /// `idle` (the scanner passes `pooled::IDLE_TIMEOUT`). Calls in flight
    /// hold their own.
    pub fn prune(&self, idle: std::time::Duration) -> usize {
        self.idle.prune(idle)
    }

    /// Idle connections held.
    pub fn len(&self) -> usize {
        self.idle.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

#[cfg(test)]
#[path = "upstream_tests.rs"]
mod tests;
