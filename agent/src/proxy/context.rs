//! What the proxy's parts share: the per-node context every accepted
//! connection sees (`ProxyContext`), the termination side built when a CA is
//! configured (`Termination`), and one terminated connection's identity
//! (`Call`, `CallMeta`), shared by its requests.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio_rustls::TlsAcceptor;

use arc_swap::ArcSwap;

use super::{buffered::BodyBudget, dial::Dialer, trust::Distrust, upstream::UpstreamPool};
use crate::{
    bpf::Maps,
    config::{CaptureConfig, TlsConfig},
    identity::{IdentityCache, Workload},
    live::LiveRules,
    netns::WorkloadNetns,
    policy::Enforcer,
    providers::{Adapter, Api, Upstream, adapter},
    telemetry::{events::EventLog, metrics::Metrics},
    tls::LeafCache,
};

/// Everything a connection needs, shared by all connections.
pub struct ProxyContext {
    /// Policy and prices, swapped on reload.
    pub live: LiveRules,
    pub maps: Arc<Maps>,
    pub identity: Arc<IdentityCache>,
    pub metrics: Arc<Metrics>,
    pub events: EventLog,
    /// By provider id (config order, as in the kernel map).
    pub providers: Vec<KnownProvider>,
    /// How long a client may take to send its first bytes (ClientHello).
    pub hello_timeout: Duration,
    /// Opens provider connections inside the workload's namespace.
    pub dialer: Arc<Dialer>,
    /// `proxy.max_connections_per_namespace`.
    pub max_connections_per_namespace: usize,
    /// Present when a node CA is configured: governed hosts are terminated.
    pub tls: Option<Arc<Termination>>,
    /// Present with `tls_uprobes.enabled`: relayed connections are read at
    /// the workload's TLS library.
    pub tls_capture: Option<Arc<crate::uprobe::TlsCapture>>,
}

/// A configured provider, as the proxy tells them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownProvider {
    pub name: String,
    /// Lowercase host names.
    pub hosts: Vec<String>,
    pub api: Api,
    /// `providers[].stream_usage` resolved: ask streams for their usage.
    pub asks_stream_usage: bool,
}

impl ProxyContext {
    /// The provider a TLS server name belongs to.
    ///
    /// The name, not the dialled address, decides: providers behind one CDN
    /// share addresses, and the kernel map holds one provider per address.
    /// Terminating and then dialling that (provider-map) address with this
    /// name is safe because the upstream handshake verifies the server
    /// really holds the name.
    pub fn by_host(&self, sni: &str) -> Option<&KnownProvider> {
        by_host(&self.providers, sni)
    }
}

pub(super) fn by_host<'a>(providers: &'a [KnownProvider], sni: &str) -> Option<&'a KnownProvider> {
    let sni = sni.to_ascii_lowercase();
    providers.iter().find(|p| p.hosts.contains(&sni))
}

/// TLS termination and what terminated requests are governed with, built
/// once at startup when a CA is configured.
pub struct Termination {
    pub acceptor: TlsAcceptor,
    /// Timeouts and limits (`tls` section of the config).
    pub settings: TlsConfig,
    /// What request records capture beyond metadata (`audit.capture`).
    pub capture: CaptureConfig,
    /// Workloads that rejected the node CA, relayed for a while.
    pub distrust: Distrust,
    /// Policy and prices, swapped on reload.
    pub live: LiveRules,
    /// Limits, budgets and provider keys: what admission keeps.
    pub enforcer: Enforcer,
    /// Request bodies held node-wide (`tls.max_buffered_bytes`).
    pub bodies: Arc<BodyBudget>,
    /// Slots for calls whose client left before the response headers
    /// (`tls.max_abandoned_calls`).
    pub abandoned: Arc<tokio::sync::Semaphore>,
    /// Where requests go.
    pub upstreams: Upstreams,
    /// MCP event streams of the older HTTP+SSE transport, where refusals
    /// of the calls POSTed to them are answered.
    pub mcp_streams: super::mcp::EventStreams,
}

/// The provider side of terminated calls: pooled connections, and the
/// providers failover may move a call to.
pub struct Upstreams {
    pub pool: UpstreamPool,
    /// Providers by id, and their known addresses: failover targets.
    pub endpoints: Vec<ProviderEndpoint>,
    pub addresses: ProviderAddresses,
}

/// Known addresses of each provider (by id, config order), refreshed with DNS.
pub type ProviderAddresses = Arc<ArcSwap<Vec<Vec<IpAddr>>>>;

/// A configured provider as a failover target needs it.
#[derive(Debug, Clone)]
pub struct ProviderEndpoint {
    pub name: String,
    pub host: String,
    pub ports: Vec<u16>,
}

/// The TLS server side of termination: leaves from the node CA, ALPN h2 and
/// http/1.1, `session_tickets` TLS 1.3 tickets (`tls.session_tickets`).
pub fn acceptor(
    leaves: Arc<LeafCache>,
    session_tickets: usize,
) -> Result<TlsAcceptor, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(leaves);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.send_tls13_tickets = session_tickets;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Who and where, for every request on one terminated connection.
pub struct CallMeta {
    pub workload: Workload,
    /// For pod metadata that arrives during the connection.
    pub identity: Arc<IdentityCache>,
    pub pid: u32,
    pub comm: String,
    pub provider: String,
    pub adapter: &'static dyn Adapter,
    /// See `KnownProvider::asks_stream_usage`.
    pub asks_stream_usage: bool,
    pub host: String,
    pub upstream: SocketAddr,
    /// The workload's network namespace: where its provider connections are made.
    pub netns: Arc<WorkloadNetns>,
}

impl CallMeta {
    pub fn new(known: &KnownProvider, host: String, upstream: SocketAddr, who: Who) -> Self {
        Self {
            workload: who.workload,
            identity: who.identity,
            pid: who.pid,
            comm: who.comm,
            provider: known.name.clone(),
            adapter: adapter(known.api),
            asks_stream_usage: known.asks_stream_usage,
            host,
            upstream,
            netns: who.netns,
        }
    }

    /// The workload as of this request: a pod whose metadata arrived after
    /// its connection began is named from then on.
    pub fn workload_now(&self) -> Workload {
        let mut w = self.workload.clone();
        if w.kubernetes.is_none() {
            w.kubernetes = self.identity.pod_meta(&w);
        }
        w
    }

    /// Where the connection's requests go, as the adapter needs it.
    pub fn to(&self) -> Upstream<'_> {
        Upstream {
            provider: &self.provider,
            host: &self.host,
        }
    }
}

/// The workload behind a connection.
pub struct Who {
    pub workload: Workload,
    pub identity: Arc<IdentityCache>,
    pub pid: u32,
    pub comm: String,
    pub netns: Arc<WorkloadNetns>,
}

/// One terminated connection, shared by its requests.
pub struct Call {
    pub tls: Arc<Termination>,
    pub events: EventLog,
    pub metrics: Arc<Metrics>,
    pub meta: CallMeta,
}
