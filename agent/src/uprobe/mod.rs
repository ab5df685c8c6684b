//! Exact usage for pods that do not trust the node CA (README "TLS
//! uprobes"): their provider connections are relayed untouched, and the
//! plaintext is read in the kernel at their TLS library.
//!
//! * `attach` — which TLS library a process uses; probing it once.
//! * `http1` — HTTP/1.1 framing of one direction of captured bytes.
//! * `http2` — HTTP/2 frames of one direction, header blocks decoded.
//! * `exchange`, `h2_calls` — one connection's requests paired with their
//!   responses (in order for HTTP/1.1, by stream for HTTP/2), read by the
//!   provider adapters.
//! * `reader` — the ring buffer's consumer: records and metrics.
//! * `spend` — budgets and limits, counted after each call; a spent one
//!   refuses the workload's provider connections at connect().
//!
//! The agent asks for a connection's capture (`TlsCapture::begin`) when it
//! decides to relay it, before its first byte passes: the handshake cannot
//! finish, so no request can be written, before the process is probed and
//! the socket is on the kernel's capture list. Only sockets on that list are
//! ever read; it holds nothing but provider connections the agent relays.
pub mod attach;
pub mod exchange;
mod h2_calls;
pub mod http1;
pub mod http2;
pub mod reader;
pub mod spend;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    bpf::tls_probes::TlsProbes, identity::Workload, providers::Api, telemetry::records::Decision,
};

/// `tls_uprobes:` in the config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UprobeConfig {
    /// Read the plaintext of relayed provider connections (pods that do not
    /// trust the node CA, `action: observe`, no CA) at the workload's
    /// OpenSSL, for per-call records with model, usage and cost
    /// (`observed_via: tls_uprobe`). Off by default: it reads pods' request
    /// and response bodies in the kernel (provider connections only).
    pub enabled: bool,
}

/// How long a relayed connection may wait for its process to be probed
/// before it is relayed uncaptured.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A process without a TLS library is looked at again after this long (it
/// may load one later, as Python does on `import ssl`).
const RECHECK: Duration = Duration::from_secs(5);

/// One captured connection, as its records need it.
#[derive(Debug, Clone)]
pub struct Session {
    pub workload: Workload,
    pub pid: u32,
    pub comm: String,
    pub provider: String,
    pub api: Api,
    /// The provider address the workload dialled.
    pub upstream: SocketAddr,
    /// The relay's decision (`allow`, `observe`) and its reason.
    pub decision: Decision,
    pub reason: String,
    /// The connecting task's cgroup: what a spent budget blocks.
    pub cgroup: u64,
}

/// What `TlsCapture::begin` decided for a relayed connection.
pub enum Begun {
    /// Captured; the token closes it if the workload's budget is spent.
    Captured(tokio_util::sync::CancellationToken),
    /// Relayed without capture (no TLS library found, probing failed).
    Uncaptured,
    /// The workload's budget is spent: close it unserved.
    Refused,
}

enum Control {
    Begin(u64, Session),
    End(u64, tollgate_common::CaptureState),
}

/// What a process's probing came to.
#[derive(Debug, Clone)]
enum Probed {
    /// Probes attached (to this library).
    Yes { start_time: u64 },
    /// No TLS library found, or it could not be probed; looked at again after `RECHECK`.
    No { at: Instant, start_time: u64 },
}

/// The agent's handle on TLS capture, shared by the proxy's connections.
pub struct TlsCapture {
    probes: Arc<TlsProbes>,
    spending: Arc<spend::Spending>,
    processes: Mutex<HashMap<u32, Probed>>,
    control: mpsc::UnboundedSender<Control>,
}

impl TlsCapture {
    /// Start capturing: the reader task runs until `control` closes.
    pub fn start(
        probes: Arc<TlsProbes>,
        ring: aya::maps::RingBuf<aya::maps::MapData>,
        books: reader::Books,
    ) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let spending = books.spending.clone();
        let reader = reader::Reader::new(ring, books)?;
        tokio::spawn(reader.run(rx));
        Ok(Arc::new(Self {
            probes,
            spending,
            processes: Mutex::default(),
            control: tx,
        }))
    }

    /// A connection of `session.pid` with socket `cookie` is about to be
    /// relayed: make sure the process is probed and put the socket on the
    /// capture list. A workload whose budget is spent is refused; one that
    /// cannot be captured (no TLS library found, probing failed or took
    /// too long) is relayed anyway.
    pub async fn begin(self: &Arc<Self>, cookie: u64, session: Session) -> Begun {
        if self.spending.is_blocked(session.cgroup) {
            return Begun::Refused;
        }
        let pid = session.pid;
        // A process probed already (the usual case) needs no blocking task.
        let start_time = attach::start_time(pid).unwrap_or(0);
        let probed = match self.known(pid, start_time) {
            Some(answer) => answer,
            None => {
                let me = self.clone();
                let probing = tokio::task::spawn_blocking(move || me.probe(pid, start_time));
                matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, probing).await,
                    Ok(Ok(true))
                )
            }
        };
        if !probed {
            return Begun::Uncaptured;
        }
        if let Err(e) = self.probes.capture(cookie) {
            tracing::warn!(error = %e, "could not put a relayed connection on the TLS capture list; it is relayed uncaptured");
            return Begun::Uncaptured;
        }
        let stop = self.spending.opened(cookie, session.cgroup);
        let _ = self.control.send(Control::Begin(cookie, session));
        Begun::Captured(stop)
    }

    /// The relayed connection ended: off the list, and its calls end.
    pub fn end(&self, cookie: u64) {
        self.spending.closed(cookie);
        let state = self.probes.release(cookie).unwrap_or_default();
        let _ = self.control.send(Control::End(cookie, state));
    }

    /// What probing `pid` (started at `start_time`) came to, if that is
    /// still the answer: None for a process not probed yet, a new process
    /// under a reused pid, or one whose time to be looked at again came.
    fn known(&self, pid: u32, start_time: u64) -> Option<bool> {
        match self.lock().get(&pid)? {
            Probed::Yes { start_time: t } if *t == start_time => Some(true),
            Probed::No { at, start_time: t } if *t == start_time && at.elapsed() < RECHECK => {
                Some(false)
            }
            _ => None,
        }
    }

    /// Probe `pid` (blocking: reads /proc and ELF files), unless a
    /// concurrent connection of it did meanwhile.
    fn probe(&self, pid: u32, start_time: u64) -> bool {
        if let Some(answer) = self.known(pid, start_time) {
            return answer;
        }
        if matches!(self.lock().get(&pid), Some(Probed::Yes { .. })) {
            self.probes.detach(pid); // a new process under a reused pid
        }
        self.sweep();
        let began = Instant::now();
        let state = match attach::probe(&self.probes, pid) {
            Ok(library) => {
                let took_ms = began.elapsed().as_millis() as u64;
                tracing::info!(pid, library = %library.display(), took_ms, "TLS uprobes attached: this process's relayed provider calls are read at its TLS library");
                Probed::Yes { start_time }
            }
            Err(e) => {
                tracing::info!(pid, reason = %e, "TLS uprobes not attached: this process's relayed provider connections are recorded by bytes only");
                Probed::No {
                    at: Instant::now(),
                    start_time,
                }
            }
        };
        let yes = matches!(state, Probed::Yes { .. });
        self.lock().insert(pid, state);
        yes
    }

    /// Forget processes that are gone (and detach their probes).
    fn sweep(&self) {
        let gone: Vec<u32> = self
            .lock()
            .keys()
            .copied()
            .filter(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
            .collect();
        for pid in gone {
            self.lock().remove(&pid);
            self.probes.detach(pid);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Probed>> {
        self.processes.lock().unwrap_or_else(|e| e.into_inner())
    }
}
