//! Relaying a connection byte for byte to the provider the workload asked
//! for, counting what passes (allow without a CA, observe), and the record
//! of every connection that is not terminated (relayed or refused).
use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{
    client_hello::{Hello, HelloSniffer},
    context::ProxyContext,
    dial::DialError,
};
use crate::{
    bpf::maps::OrigDst,
    identity::Workload,
    netns::WorkloadNetns,
    telemetry::records::{ClientProtocol, ConnectionRecord, ConnectionResult, Decision},
};

/// Relay `client` to the dialled address and record it. `stop` ends the
/// relay early (the workload's budget or limit was spent: TLS uprobes).
pub(super) async fn relay_to_provider(
    ctx: &ProxyContext,
    client: TcpStream,
    c: Closing,
    stop: Option<CancellationToken>,
) {
    let t = match ctx.dialer.dial(&c.netns, c.orig.dest).await {
        Ok(upstream) => {
            let _ = upstream.set_nodelay(true);
            match stop {
                None => relay(client, upstream).await,
                Some(stop) => tokio::select! {
                    t = relay(client, upstream) => t,
                    () = stop.cancelled() => Transfer {
                        error: Some(RelayError::QuotaSpent),
                        ..Transfer::default()
                    },
                },
            }
        }
        Err(e) => Transfer {
            error: Some(e.into()),
            ..Transfer::default()
        },
    };
    finish(ctx, t, c);
}

/// Close `client` unserved (policy refused it) and record it with what its
/// first bytes said.
pub(super) fn refuse(ctx: &ProxyContext, client: TcpStream, c: Closing, hello: Hello) {
    drop(client);
    let t = Transfer {
        hello,
        ..Transfer::default()
    };
    finish(ctx, t, c);
}

/// A relayed (or refused) connection, as its record needs it.
pub(super) struct Closing {
    pub time: String,
    pub workload: Workload,
    pub orig: OrigDst,
    pub provider: String,
    pub peer: SocketAddr,
    pub started: Instant,
    pub decision: Decision,
    pub reason: String,
    /// Where the relayed connection is made: the workload's namespace.
    pub netns: Arc<WorkloadNetns>,
}

/// Count and record one relayed or refused connection.
fn finish(ctx: &ProxyContext, t: Transfer, c: Closing) {
    let (sent, received) = (t.sent, t.received);
    let result = if c.decision == Decision::Deny {
        ConnectionResult::Denied
    } else {
        t.error
            .as_ref()
            .map_or(ConnectionResult::Ok, RelayError::result)
    };
    let (client_protocol, tls) = match t.hello {
        Hello::Tls(info) => (ClientProtocol::Tls, Some(info)),
        Hello::NotTls => (ClientProtocol::Plaintext, None),
        Hello::Malformed(e) => {
            tracing::debug!(peer = %c.peer, error = %e, "malformed TLS ClientHello");
            (ClientProtocol::MalformedTls, None)
        }
        Hello::Pending => (ClientProtocol::None, None),
    };
    let [ns, name, pod] = c.workload.metric_labels();
    let provider = c.provider;
    ctx.metrics
        .connections
        .with_label_values(&[&ns, &name, &pod, &provider, result.as_str()])
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
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("relay failed: {0}")]
    Io(std::io::Error),
    #[error(
        "closed: the workload's budget or limit is spent (its calls are read with TLS uprobes)"
    )]
    QuotaSpent,
}

impl RelayError {
    fn result(&self) -> ConnectionResult {
        match self {
            RelayError::Dial(DialError::Connect { .. } | DialError::Socket { .. }) => {
                ConnectionResult::UpstreamConnectFailed
            }
            RelayError::Dial(DialError::Timeout { .. }) => ConnectionResult::UpstreamTimeout,
            RelayError::Io(_) => ConnectionResult::RelayError,
            RelayError::QuotaSpent => ConnectionResult::QuotaExhausted,
        }
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
