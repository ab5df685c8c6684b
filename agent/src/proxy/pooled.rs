//! Provider connections kept between calls, driven by the call that uses them.
//!
//! A connection speaks HTTP/1.1 (as nginx's `proxy_pass` with keep-alive
//! does) and has no task of its own: the call that holds it polls it, first
//! while its request goes out and its response head comes back
//! (`exchange`), then whenever its response body is read (`UpstreamBody`).
//! So a call costs no hand-off to a connection task and no wake-up across
//! tasks: the IO a request needs is done in the task that waits for it.
//! A connection whose response was read to its end goes back to the
//! idle set (`IdleConns`) for the next call to the same place; one whose
//! response was left unread, or that the provider closed, is dropped.
use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::{Body, Bytes, Frame, Incoming},
    client::conn::http1,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::upstream::{BoxError, ProxyBody};
use crate::netns::NetnsId;

/// Providers close idle connections after ~60-90 s; dropping ours first
/// avoids sending a request into a closing socket.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle connections kept per (namespace, host, address) and proxy thread:
/// enough for the calls one workload makes at once, bounded so that a
/// burst leaves no crowd of sockets behind.
const MAX_IDLE_PER_KEY: usize = 32;

pub type PoolKey = (NetnsId, String, SocketAddr);
type Io = TokioIo<TlsStream<TcpStream>>;

/// One HTTP/1.1 provider connection: the request side and the IO side.
pub struct Conn {
    send: http1::SendRequest<ProxyBody>,
    io: http1::Connection<Io, ProxyBody>,
    /// When it was last put back idle.
    since: Instant,
    /// The proxy thread it was made on (`workers`), whose IO driver reports
    /// its socket's readiness: only calls on that thread reuse it.
    thread: usize,
}

impl Conn {
    pub async fn handshake(tls: TlsStream<TcpStream>) -> hyper::Result<Self> {
        let (send, io) = http1::Builder::new().handshake(TokioIo::new(tls)).await?;
        Ok(Self {
            send,
            io,
            since: Instant::now(),
            thread: crate::workers::current(),
        })
    }

    /// Poll the IO side; `true` once the connection has ended.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> bool {
        match Pin::new(&mut self.io).poll(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "provider connection ended");
                true
            }
            Poll::Pending => false,
        }
    }

    /// Ready for another request, judged now without waiting: whatever the
    /// provider sent meanwhile (a close) is read first. Polled with a
    /// waker that wakes nobody: an idle connection belongs to no task.
    fn ready_now(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        // Twice: after a response ends, the first poll moves the
        // connection to idle and the second finds it asking for the next.
        for _ in 0..2 {
            if self.poll_io(&mut cx) {
                return false;
            }
            match self.send.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => return true,
                Poll::Ready(Err(_)) => return false,
                Poll::Pending => {}
            }
        }
        false
    }
}

/// Why `exchange` got no response head.
// Made once per failed attempt and matched at once: boxing the request
// would add an allocation to the path that retries it.
#[allow(clippy::large_enum_variant)]
pub enum ExchangeError {
    /// The connection could not take the request: it was not written and
    /// may go on another connection.
    NotSent(Request<ProxyBody>),
    /// Written (or partly), and failed: not to be sent again, the
    /// provider may be serving it.
    Failed(BoxError),
}

/// Send `req` on `conn` and drive the connection until the response head
/// is in.
pub async fn exchange(
    mut conn: Conn,
    req: Request<ProxyBody>,
) -> Result<(Response<Incoming>, Conn), ExchangeError> {
    let mut response = std::pin::pin!(conn.send.try_send_request(req));
    let mut ended = false;
    let got = std::future::poll_fn(|cx| {
        if !ended {
            ended = conn.poll_io(cx);
        }
        let r = response.as_mut().poll(cx);
        if r.is_pending() && ended {
            // The dispatcher answers every request it took before it ends;
            // this only guards against waiting on a closed connection.
            return Poll::Ready(None);
        }
        r.map(Some)
    })
    .await;
    match got {
        Some(Ok(resp)) => Ok((resp, conn)),
        Some(Err(mut e)) => Err(match e.take_message() {
            Some(req) => ExchangeError::NotSent(req),
            None => ExchangeError::Failed(e.into_error().into()),
        }),
        None => Err(ExchangeError::Failed(
            "the provider closed the connection before answering".into(),
        )),
    }
}

/// Idle provider connections, newest last, per place they go to. A call
/// takes one made on its own proxy thread first: there the connection's
/// readiness wakes the call directly. Failing that it takes another
/// thread's (whose IO driver then passes each wake-up on), still far
/// cheaper than a new TCP and TLS handshake.
#[derive(Default)]
pub struct IdleConns {
    by_key: Mutex<HashMap<PoolKey, Vec<Conn>>>,
}

impl IdleConns {
    /// The newest idle connection to `key` that is still usable, one made
    /// on this thread first; the ones found closed or too old on the way
    /// are dropped.
    pub fn take(&self, key: &PoolKey) -> Option<Conn> {
        let thread = crate::workers::current();
        loop {
            let mut conn = {
                let mut by_key = self.lock();
                let conns = by_key.get_mut(key)?;
                let newest = conns
                    .iter()
                    .rposition(|c| c.thread == thread)
                    .unwrap_or(conns.len().checked_sub(1)?);
                let conn = conns.remove(newest);
                if conns.is_empty() {
                    by_key.remove(key);
                }
                conn
            };
            // Checked outside the lock: polling reads the socket.
            if conn.since.elapsed() < IDLE_TIMEOUT && conn.ready_now() {
                return Some(conn);
            }
        }
    }

    /// Keep `conn` for the next call to `key`, if it can take one.
    fn put(&self, key: PoolKey, mut conn: Conn) {
        if !conn.ready_now() {
            return;
        }
        conn.since = Instant::now();
        let spare = {
            let mut by_key = self.lock();
            let conns = by_key.entry(key).or_default();
            let thread = conn.thread;
            if conns.iter().filter(|c| c.thread == thread).count() < MAX_IDLE_PER_KEY {
                conns.push(conn);
                None
            } else {
                Some(conn)
            }
        };
        drop(spare); // closed outside the lock
    }

    /// Drop the idle connections of a namespace that is gone.
    pub fn forget(&self, netns: NetnsId) -> usize {
        let gone: Vec<Vec<Conn>> = {
            let mut by_key = self.lock();
            let keys: Vec<PoolKey> = by_key.keys().filter(|k| k.0 == netns).cloned().collect();
            keys.iter().filter_map(|k| by_key.remove(k)).collect()
        };
        gone.iter().map(Vec::len).sum()
    }

    /// Drop idle connections idle for `idle` or more, or that the provider closed.
    pub fn prune(&self, idle: Duration) -> usize {
        let all: Vec<(PoolKey, Vec<Conn>)> =
            std::mem::take(&mut *self.lock()).into_iter().collect();
        let mut dropped = 0;
        let mut kept: Vec<(PoolKey, Vec<Conn>)> = Vec::with_capacity(all.len());
        for (key, conns) in all {
            let before = conns.len();
            let live: Vec<Conn> = conns
                .into_iter()
                .filter_map(|mut c| (c.since.elapsed() < idle && c.ready_now()).then_some(c))
                .collect();
            dropped += before - live.len();
            if !live.is_empty() {
                kept.push((key, live));
            }
        }
        let mut by_key = self.lock();
        for (key, mut live) in kept {
            // Calls that ran meanwhile may have put others back.
            let conns = by_key.entry(key).or_default();
            live.append(conns);
            let mut per_thread: HashMap<usize, usize> = HashMap::new();
            live.retain(|c| {
                let n = per_thread.entry(c.thread).or_default();
                *n += 1;
                *n <= MAX_IDLE_PER_KEY
            });
            *conns = live;
        }
        dropped
    }

    /// Idle connections held.
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Conn>>> {
        self.by_key
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A provider's response body, read through the connection it came on:
/// reading it drives that connection, and once it has been read to its end
/// the connection goes back idle for the next call.
pub struct UpstreamBody {
    body: Incoming,
    conn: Option<Conn>,
    home: Option<(Arc<IdleConns>, PoolKey)>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("ended", &self.body.is_end_stream())
            .field("connection", &self.conn.is_some())
            .finish()
    }
}

impl UpstreamBody {
    pub fn new(body: Incoming, conn: Conn, home: Arc<IdleConns>, key: PoolKey) -> Self {
        Self {
            body,
            conn: Some(conn),
            home: Some((home, key)),
        }
    }

    /// The response has been read to its end: its connection may serve another.
    fn release(&mut self) {
        if let (Some(conn), Some((home, key))) = (self.conn.take(), self.home.take()) {
            home.put(key, conn);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        // The body is fed by the connection: look, let the connection read,
        // look again. Both register this task's waker, so whatever arrives
        // later wakes the one task that reads it.
        for _ in 0..2 {
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => {}
                Poll::Ready(Some(Ok(frame))) => {
                    if this.body.is_end_stream() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if let Some(conn) = &mut this.conn
                && conn.poll_io(cx)
            {
                this.conn = None;
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Whoever read it stopped at the end (a body that says it has
        // ended is not polled again): the connection is fit for another
        // call. Dropped before its end, the connection goes with it.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}
