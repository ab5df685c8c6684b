//! Accept redirected connections, judge them by policy, and hand them to the
//! terminating proxy (`terminate`) or relay them byte for byte to the
//! provider the workload asked for, counting what passes (observe), or
//! close them (deny without termination).
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::{
    client_hello::{Hello, HelloSniffer, peek_hello},
    terminate::{self, CallMeta, TlsContext},
};
use crate::{
    bpf::{Maps, maps::OrigDst},
    identity::{IdentityCache, Workload},
    policy::{ConnectionDecision, Subject},
    telemetry::{
        events::{ConnectionRecord, EventLog, now_rfc3339},
        metrics::Metrics,
    },
};

/// Everything a relay needs, shared by all connections.
pub struct RelayContext {
    /// Policy and prices, swapped on reload.
    pub live: crate::live::LiveRules,
    pub maps: Arc<Maps>,
    pub identity: Arc<IdentityCache>,
    pub metrics: Arc<Metrics>,
    pub events: EventLog,
    /// By provider id (config order, as in the kernel map).
    pub providers: Vec<KnownProvider>,
    /// How long a client may take to send its first bytes (ClientHello).
    pub hello_timeout: Duration,
    pub skip_mark: u32,
    pub connect_timeout: Duration,
    /// Present when a node CA is configured: governed hosts are terminated.
    pub tls: Option<Arc<TlsContext>>,
}

/// A configured provider, as the proxy tells them apart.
pub struct KnownProvider {
    pub name: String,
    /// Lowercase host names.
    pub hosts: Vec<String>,
    pub api: crate::providers::Api,
}

impl RelayContext {
    /// The provider a TLS server name belongs to.
    ///
    /// The name, not the dialled address, decides: providers behind one CDN
    /// share addresses, and the kernel map holds one provider per address.
    /// Terminating and then dialling that (provider-map) address with this
    /// name is safe because the upstream handshake verifies the server
    /// really holds the name.
    fn by_host(&self, sni: &str) -> Option<&KnownProvider> {
        let sni = sni.to_ascii_lowercase();
        self.providers.iter().find(|p| p.hosts.contains(&sni))
    }
}

/// Accept on one namespace's listener until the task is aborted.
pub async fn accept_loop(ctx: Arc<RelayContext>, listener: TcpListener, netns_cookie: u64) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move { handle(ctx, stream, peer, netns_cookie).await });
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(ctx: Arc<RelayContext>, client: TcpStream, peer: SocketAddr, netns_cookie: u64) {
    let Some(orig) = ctx.maps.take_orig_dst(netns_cookie, peer) else {
        // Nobody redirected this connection here: someone dialled the port
        // directly. The proxy has no destination to offer; close.
        tracing::debug!(%peer, "connection without a redirect record; closing");
        ctx.metrics
            .connections
            .with_label_values(&["", "unknown", "", "unknown", "no_record"])
            .inc();
        return;
    };
    let started = Instant::now();
    let time = now_rfc3339();
    let workload = ctx.identity.resolve(orig.cgroup_id).await;
    let mut provider = ctx
        .providers
        .get(orig.provider_id as usize)
        .map(|p| p.name.clone())
        .unwrap_or_else(|| format!("provider-{}", orig.provider_id));
    let _active = ActiveGuard::new(&ctx.metrics);
    let _ = client.set_nodelay(true);

    // The ClientHello's server name (peeked, not consumed) says which
    // provider this is and, with a CA, that it can be terminated. Policy
    // needs the provider even when nothing is terminated (deny by provider).
    let mut governed = None;
    let mut distrusted = false;
    if let Hello::Tls(info) = peek_hello(&client, ctx.hello_timeout).await {
        if let Some(known) = info.sni.as_deref().and_then(|s| ctx.by_host(s)) {
            provider = known.name.clone();
            if let Some(tls) = &ctx.tls {
                let sni = info.sni.clone().expect("matched a host");
                if tls.distrust.is_distrusted(&workload.cgroup, &sni) {
                    // It rejected the node CA: relayed, not terminated (`trust`).
                    distrusted = true;
                } else {
                    governed = Some((tls.clone(), sni, known.api));
                }
            }
        }
    }
    let subject = Subject {
        workload: &workload,
        comm: &orig.comm,
    };
    let decision = ctx.live.load().policy.connection(subject, &provider);
    let (decision, reason) = match decision {
        // Terminated, a denied call gets the provider-shaped 403 with the
        // rule's message (the request stage meets the same rule).
        ConnectionDecision::Terminate { .. } | ConnectionDecision::Deny { .. }
            if governed.is_some() =>
        {
            let (tls, sni, api) = governed.expect("checked");
            let meta = CallMeta {
                api,
                workload: workload.clone(),
                identity: ctx.identity.clone(),
                pid: orig.tgid,
                comm: orig.comm.clone(),
                provider: provider.clone(),
                host: sni,
                upstream: orig.dest,
            };
            let result =
                terminate::serve(tls, ctx.events.clone(), ctx.metrics.clone(), client, meta).await;
            let [ns, name, pod] = workload.metric_labels();
            ctx.metrics
                .connections
                .with_label_values(&[&ns, &name, &pod, &provider, result])
                .inc();
            return;
        }
        ConnectionDecision::Deny { reason, .. } => {
            // Nothing to answer in (no termination): close, say why.
            tracing::info!(workload = %workload.label(), %provider, %reason, "provider connection denied by policy");
            ("deny", reason)
        }
        ConnectionDecision::Observe { reason } => ("observe", reason),
        // Would be terminated, but the workload rejects the node CA.
        ConnectionDecision::Terminate { .. } if distrusted => ("observe", "ca_rejected".into()),
        ConnectionDecision::Terminate { reason } => ("allow", reason),
    };
    ctx.metrics
        .decisions
        .with_label_values(&[&provider, decision, &reason])
        .inc();
    let denied = decision == "deny";
    let t = if denied {
        drop(client);
        Transfer::default()
    } else {
        // Relay the bytes untouched to where the workload was going.
        match dial(orig.dest, ctx.skip_mark, ctx.connect_timeout).await {
            Ok(upstream) => {
                let _ = upstream.set_nodelay(true);
                relay(client, upstream).await
            }
            Err(e) => Transfer {
                error: Some(e),
                ..Transfer::default()
            },
        }
    };
    finish(
        &ctx,
        t,
        Closing {
            time,
            workload,
            orig,
            provider,
            peer,
            started,
            decision,
            reason,
            denied,
        },
    );
}

/// A relayed (or refused) connection, as its record needs it.
struct Closing {
    time: String,
    workload: Workload,
    orig: OrigDst,
    provider: String,
    peer: SocketAddr,
    started: Instant,
    decision: &'static str,
    reason: String,
    denied: bool,
}

/// Count and record one relayed or refused connection.
fn finish(ctx: &RelayContext, t: Transfer, c: Closing) {
    let (sent, received) = (t.sent, t.received);
    let result = if c.denied {
        "denied"
    } else {
        t.error.as_ref().map_or("ok", RelayError::kind)
    };
    let (client_protocol, tls) = match t.hello {
        Hello::Tls(info) => ("tls", Some(info)),
        Hello::NotTls => ("plaintext", None),
        Hello::Malformed(e) => {
            tracing::debug!(peer = %c.peer, error = %e, "malformed TLS ClientHello");
            ("malformed_tls", None)
        }
        Hello::Pending => ("none", None),
    };
    let [ns, name, pod] = c.workload.metric_labels();
    let provider = c.provider;
    ctx.metrics
        .connections
        .with_label_values(&[&ns, &name, &pod, &provider, result])
        .inc();
    for (direction, n) in [("sent", sent), ("received", received)] {
        ctx.metrics
            .bytes
            .with_label_values(&[&ns, &name, &pod, &provider, direction])
            .inc_by(n);
    }
    ctx.events.record(&ConnectionRecord {
        time: c.time,
        workload: c.workload,
        pid: c.orig.tgid,
        comm: c.orig.comm,
        provider,
        destination: c.orig.dest,
        client: c.peer,
        bytes_sent: sent,
        bytes_received: received,
        duration_ms: c.started.elapsed().as_millis() as u64,
        result,
        error: t.error.map(|e| e.to_string()),
        client_protocol,
        decision: c.decision,
        reason: c.reason,
        tls,
    });
}

/// Relay failures, named for which side broke.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("connecting to provider {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to provider {addr} timed out after {after:?}")]
    ConnectTimeout { addr: SocketAddr, after: Duration },
    #[error("relay failed: {0}")]
    Io(std::io::Error),
}

impl RelayError {
    fn kind(&self) -> &'static str {
        match self {
            RelayError::Connect { .. } => "upstream_connect_failed",
            RelayError::ConnectTimeout { .. } => "upstream_timeout",
            RelayError::Io(_) => "relay_error",
        }
    }
}

/// Connect to the provider with the agent's mark set, so the kernel programs
/// leave this socket alone even if the agent runs inside a governed cgroup.
pub async fn dial(addr: SocketAddr, mark: u32, timeout: Duration) -> Result<TcpStream, RelayError> {
    let connect = async {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_mark(mark)?;
        s.set_nonblocking(true)?;
        let std_stream: std::net::TcpStream = s.into();
        TcpSocket::from_std_stream(std_stream).connect(addr).await
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(RelayError::Connect { addr, source }),
        Err(_) => Err(RelayError::ConnectTimeout {
            addr,
            after: timeout,
        }),
    }
}

/// What one relayed connection moved, and what its first bytes said.
#[derive(Debug, Default)]
struct Transfer {
    /// Bytes sent to the provider.
    sent: u64,
    /// Bytes received from the provider.
    received: u64,
    error: Option<RelayError>,
    hello: Hello,
}

/// Copy both ways until both sides are done. Byte counts survive a failing
/// side, so accounting survives resets. The client's first bytes are shown to
/// a ClientHello parser as they pass.
async fn relay(client: TcpStream, upstream: TcpStream) -> Transfer {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let mut sniffer = HelloSniffer::default();
    let (up, down) = tokio::join!(
        copy_counted(&mut cr, &mut uw, |chunk| {
            if *sniffer.state() == Hello::Pending {
                sniffer.feed(chunk);
            }
        }),
        copy_counted(&mut ur, &mut cw, |_| {})
    );
    // A reset after the exchange is how many peers close; it is not a
    // failure worth reporting (ztunnel draws the same line).
    let error = up.1.or(down.1).filter(|e| {
        !matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    });
    Transfer {
        sent: up.0,
        received: down.0,
        error: error.map(RelayError::Io),
        hello: sniffer.state().clone(),
    }
}

/// Buffer per direction: one TLS record (max 16 KiB) fits, so a record is
/// forwarded in one write without being split.
const COPY_BUF: usize = 16 * 1024;

/// Copy until EOF, then half-close the writer; `inspect` sees each chunk
/// before it is written. Returns bytes copied and the error that stopped it.
async fn copy_counted<R, W>(
    r: &mut R,
    w: &mut W,
    mut inspect: impl FnMut(&[u8]),
) -> (u64, Option<std::io::Error>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; COPY_BUF];
    let mut n: u64 = 0;
    loop {
        let read = match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) => return (n, Some(e)),
        };
        inspect(&buf[..read]);
        if let Err(e) = w.write_all(&buf[..read]).await {
            return (n, Some(e));
        }
        n += read as u64;
    }
    let _ = w.shutdown().await;
    (n, None)
}

struct ActiveGuard<'a>(&'a Metrics);
impl<'a> ActiveGuard<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.active_connections.inc();
        Self(m)
    }
}
impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active_connections.dec();
    }
}
